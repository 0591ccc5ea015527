"""Discovery tests for the kda cases: the strategy reaches the edges the properties rely on,
seen through the real builders where the edge lives in the tensors."""
import pytest
import torch
from hypothesis import find, settings

from properties import strategies as kst
from properties.inputs import kda

SEARCH = settings(max_examples=3000, database=None, deadline=None)


def g_of(c):
    return kda.build(c).g


def crosses_chunk(n):
    return n > kda.CHUNK and n % kda.CHUNK != 0


KDA_EDGES = {
    "T == 0": lambda c: c.T == 0,
    "T == 1": lambda c: c.T == 1,
    "T == chunk": lambda c: c.T == kda.CHUNK,
    "T crosses a chunk, not a multiple": lambda c: crosses_chunk(c.T),
    "B == 2": lambda c: c.B == 2 and c.T > 0,
    "ratio 1 with H > 1": lambda c: c.HV == c.H and c.H > 1,
    "GVA ratio 8": lambda c: c.HV == 8 * c.H,
    "GVA with H >= 2": lambda c: c.H >= 2 and c.HV >= 2 * c.H,
    "K not a power of two": lambda c: c.K & (c.K - 1) != 0,
    "V odd": lambda c: c.V % 2 == 1 and c.V > 1,
    "K != V": lambda c: c.K != c.V,
    "varlen with an empty sequence": lambda c: c.lens is not None and 0 in c.lens and c.T > 0,
    "varlen sequence crossing a chunk": lambda c: c.lens is not None and len(c.lens) >= 2
    and any(crosses_chunk(n) for n in c.lens),
    "varlen, 3 sequences or more": lambda c: c.lens is not None and len([n for n in c.lens if n]) >= 3,
    "g == -1000": lambda c: c.T > 0 and bool((g_of(c) == kda.G_MIN).any()),
    "g in [-999, -20]": lambda c: c.T > 0 and bool(((g_of(c) > -999) & (g_of(c) < -20)).any()),
    "masked: g only 0 and -1000, both": lambda c: c.gate == "masked" and c.T > 1
    and bool(((g_of(c) == 0) | (g_of(c) == kda.G_MIN)).all()) and bool((g_of(c) == 0).any())
    and bool((g_of(c) == kda.G_MIN).any()),
    "no decay (g == 0)": lambda c: c.T > 0 and bool((g_of(c) == 0).all()),
    "beta in bf16": lambda c: c.dtype == "bfloat16" and kda.build(c).beta.dtype == torch.bfloat16,
    "float16": lambda c: c.dtype == "float16" and c.T > 0,
    "q/k L2 norm": lambda c: c.l2norm and c.T > 0,
    "negative scale": lambda c: c.scale is not None and c.scale < 0,
    "strided q, k, v, g": lambda c: c.T > 1 and not any(t.is_contiguous() for t in kda.build(c).args),
    "strided initial state": lambda c: c.h0 and not kda.build(c).kwargs["initial_state"].is_contiguous(),
    "no final state asked": lambda c: not c.final_state,
    "int64 cu_seqlens": lambda c: c.lens is not None and kda.build(c).kwargs["cu_seqlens"].dtype == torch.int64,
}


@pytest.mark.parametrize("edge", sorted(KDA_EDGES))
def test_kda_cases_reach(edge):
    find(kda.cases(), KDA_EDGES[edge], settings=SEARCH)


def test_kda_property_strategies_reach():
    """The narrowed strategies of the properties still reach what they exist for."""
    find(kda.cases(varlen=True, min_seqs=2), lambda c: len([n for n in c.lens if n]) >= 2
         and crosses_chunk(c.lens[0]), settings=SEARCH)
    find(kda.cases(min_qk_heads=2), lambda c: c.H >= 2 and c.HV >= 2 * c.H, settings=SEARCH)
    find(kda.cases(max_tokens=0), lambda c: c.lens == [], settings=SEARCH)
    find(kda.cases(gates=("extreme", "masked")), lambda c: c.T > kda.CHUNK, settings=SEARCH)


def test_seq_lens_bounds():
    find(kst.seq_lens(max_total=10, max_seqs=4, min_seqs=2), lambda ls: sum(ls) == 10, settings=SEARCH)
    with pytest.raises(ValueError, match="max_seqs=1 < min_seqs=2"):
        kst.seq_lens(max_total=10, max_seqs=1, min_seqs=2)


def test_kda_builders_are_deterministic():
    c = find(kda.cases(), lambda c: c.T > 3 and c.h0 and c.layout == "strided", settings=SEARCH)
    a, b = kda.build(c), kda.build(c)
    for x, y in zip(list(a.args) + [a.kwargs["initial_state"]], list(b.args) + [b.kwargs["initial_state"]]):
        assert torch.equal(x, y) and x.stride() == y.stride()
