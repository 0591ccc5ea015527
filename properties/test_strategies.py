"""Discovery tests: the strategies reach the edges the properties rely on.

Each test asks hypothesis to *find* a case with the edge (through the real builders, so the
tensors show it, not only the scalars). A strategy that stops reaching an edge fails here.
"""
import pytest
import torch
from hypothesis import find, settings

from oracles.qkv_norm_rope_cache import qkv_norm_rope_cache as oracle
from properties import strategies as kst
from properties.inputs import qkv_norm_rope_cache as qkv

SEARCH = settings(max_examples=3000, database=None, deadline=None)


def slots(c):
    return qkv.build(c).args[8].long()


def capacity(c):
    return c.num_blocks * c.block_size


def saturates(c):
    if c.cache_dtype != "float8_e4m3fn" or c.T == 0:
        return False
    x = qkv.build(c)
    r = oracle(*x.args, **x.kwargs)
    # the oracle clamps; saturation shows as rows at exactly +-448
    return bool(((r.k_rows.abs() == 448) | (r.v_rows.abs() == 448)).any())


QKV_EDGES = {
    "slot -1": lambda c: bool((slots(c) == -1).any()),
    "slot == capacity": lambda c: bool((slots(c) == capacity(c)).any()),
    "slot large negative": lambda c: bool((slots(c) <= -(2**31)).any()),
    "duplicate valid slots": lambda c: (lambda s: s[(s >= 0) & (s < capacity(c))].unique().numel()
                                        < int(((s >= 0) & (s < capacity(c))).sum()))(slots(c)),
    "T == 0": lambda c: c.T == 0,
    "T == 1": lambda c: c.T == 1,
    "rotary_dim < head_dim": lambda c: c.R < c.D,
    "rotary_dim == 2": lambda c: c.R == 2 and c.D > 2,
    "head_dim not a power of two": lambda c: c.D & (c.D - 1) != 0,
    "position >= table length": lambda c: bool((qkv.build(c).args[5].long() >= c.max_pos).any()),
    "negative position": lambda c: bool((qkv.build(c).args[5].long() < 0).any()),
    "fp8 saturation": saturates,
    "negative scale": lambda c: c.k_scale is not None and c.k_scale < 0,
    "qh == kvh": lambda c: c.qh == c.kvh and c.kvh > 1,
    "qh >> kvh": lambda c: c.qh >= 4 * c.kvh,
    "row stride > width": lambda c: c.row_pad > 0 and c.T > 1,
    "HND with gate": lambda c: c.layout == "HND" and c.gate == "blocked",
}


@pytest.mark.parametrize("edge", sorted(QKV_EDGES))
def test_qkv_cases_reach(edge):
    find(qkv.cases(), QKV_EDGES[edge], settings=SEARCH)


def test_quant_scales_span_tiny_to_saturating():
    find(kst.quant_scales(allow_none=False), lambda s: abs(s) < 2.0 ** -12, settings=SEARCH)
    find(kst.quant_scales(allow_none=False), lambda s: abs(s) > 2.0 ** 7, settings=SEARCH)
    find(kst.quant_scales(allow_none=False), lambda s: s < 0, settings=SEARCH)


def test_strategy_bounds_are_validated():
    with pytest.raises(ValueError, match="max_tokens=1 < min_tokens=2"):
        kst.token_counts(min_tokens=2, max_tokens=1)
    with pytest.raises(ValueError, match="max_kv_heads"):
        kst.head_counts(min_kv_heads=3, max_kv_heads=2, max_ratio=1)


def test_builders_are_deterministic():
    c = find(qkv.cases(), lambda c: c.T > 3 and c.row_pad > 0, settings=SEARCH)
    a, b = qkv.build(c), qkv.build(c)
    for x, y in zip(a.args, b.args):
        assert torch.equal(x.view(torch.uint8) if x.dtype == torch.float8_e4m3fn else x,
                           y.view(torch.uint8) if y.dtype == torch.float8_e4m3fn else y)
