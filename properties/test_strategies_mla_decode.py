"""Discovery tests for the mla_decode cases: the strategies reach the edges the properties rely on,
seen through the real builders where the edge lives in the tensors."""
import pytest
import torch
from hypothesis import Phase, find, settings

from properties.inputs import mla_decode as mla

# no shrinking: any example with the edge will do (shrinking would rebuild tensors hundreds of times)
SEARCH = settings(max_examples=3000, database=None, deadline=None, phases=[Phase.generate])


def built(c):
    return mla.build(c)


def indices(c):
    return built(c).kv_indices.long().cpu()


def fp8_values(c):
    return built(c).values.float() if c.cache == "float8_e4m3fn" else None


MLA_EDGES = {
    "B == 0": lambda c: c.B == 0,
    "B == 3": lambda c: c.B == 3 and min(c.lens) > 0,
    "H == 1": lambda c: c.H == 1 and sum(c.lens) > 0,
    "H == 4 padded": lambda c: c.H == 4 and c.head_padding == "pad",
    "H == 2 auto": lambda c: c.H == 2 and c.head_padding == "auto",
    "H == 8 masked": lambda c: c.H == 8 and c.head_padding == "mask",
    "H == 16": lambda c: c.H == 16,
    "H == 3 (masked tile)": lambda c: c.H == 3,
    "H == 12": lambda c: c.H == 12,
    "H > 16": lambda c: c.H > 16 and c.H % 16 != 0,
    "L == 512": lambda c: c.L == 512 and sum(c.lens) > 0,
    "L not a power of two": lambda c: c.L & (c.L - 1) != 0,
    "P == 0": lambda c: c.P == 0,
    "P == 64": lambda c: c.P == 64,
    "P not a power of two": lambda c: c.P > 0 and c.P & (c.P - 1) != 0,
    "page_size 1": lambda c: c.page_size == 1 and sum(c.lens) > 1,
    "page_size 64": lambda c: c.page_size == 64,
    "page_size odd > 1": lambda c: c.page_size % 2 == 1 and c.page_size > 1,
    "kv_len 0 beside a longer sequence": lambda c: 0 in c.lens and max(c.lens) > 32,
    "every sequence empty, no pages": lambda c: c.B > 0 and sum(c.lens) == 0 and built(c).kv_indices.numel() == 0,
    "kv_len 1": lambda c: 1 in c.lens,
    "kv_len not a multiple of page_size": lambda c: any(n % c.page_size for n in c.lens) and c.page_size > 1,
    "kv_len > 256": lambda c: max(c.lens, default=0) > 256,
    "kv_len a multiple of 32": lambda c: any(n and n % 32 == 0 for n in c.lens),
    "spare pages in a sequence": lambda c: any(
        int(b - a) * c.page_size - n >= c.page_size
        for a, b, n in zip(built(c).kv_indptr.tolist()[:-1], built(c).kv_indptr.tolist()[1:], c.lens)),
    "unreferenced pool pages": lambda c: c.spare_pages > 0 and sum(c.lens) > 0,
    "pages shared between sequences": lambda c: indices(c).unique().numel() < indices(c).numel(),
    "pages out of sequence order": lambda c: indices(c).numel() > 2 and not bool((indices(c).diff() == 1).all()),
    "fp8 cache holds +-448": lambda c: c.cache == "float8_e4m3fn" and bool((fp8_values(c).abs() == 448).any()),
    "fp8 with negative kv_scale": lambda c: c.cache == "float8_e4m3fn" and c.kv_scale is not None and c.kv_scale < 0,
    "bf16/fp16 cache with kv_scale": lambda c: c.cache == "activation" and c.kv_scale not in (None, 1.0),
    "float16": lambda c: c.dtype == "float16" and sum(c.lens) > 0,
    "sm_scale negative": lambda c: c.sm_scale is not None and c.sm_scale < 0,
    "sm_scale 0": lambda c: c.sm_scale == 0.0,
    "sm_scale default": lambda c: c.sm_scale is None,
    "64 splits": lambda c: c.num_kv_splits == 64,
    "more splits than 32-token blocks": lambda c: c.num_kv_splits is not None and sum(c.lens) > 0
    and c.num_kv_splits * 32 > max(c.lens),
    "launcher's split count": lambda c: c.num_kv_splits is None and sum(c.lens) > 0,
    "no lse asked": lambda c: not c.return_lse,
    "strided q and cache": lambda c: c.B > 0 and not built(c).q.is_contiguous() and not built(c).kv_cache.is_contiguous(),
    "int32 page table": lambda c: built(c).kv_indices.dtype == torch.int32,
    "mixed index dtypes": lambda c: built(c).kv_indptr.dtype == torch.int64 and built(c).kv_indices.dtype == torch.int32,
    "kv_scale of shape []": lambda c: c.kv_scale is not None and built(c).kwargs["kv_scale"].dim() == 0,
}


@pytest.mark.parametrize("edge", sorted(MLA_EDGES))
def test_mla_decode_cases_reach(edge):
    find(mla.cases(), MLA_EDGES[edge], settings=SEARCH)


def test_mla_decode_property_strategies_reach():
    """The narrowed strategies of the properties still reach what they exist for."""
    find(mla.cases(zero_lens=True, min_batch=1), lambda c: c.B > 1 and sum(c.lens) == 0, settings=SEARCH)
    find(mla.cases(zero_lens=True, min_batch=1), lambda c: c.B > 1 and 0 in c.lens and max(c.lens) > 0, settings=SEARCH)
    for H in mla.DIVIDING_HEADS:
        find(mla.cases(divides=True, splits="int", min_batch=1), lambda c: c.H == H and c.head_padding == "mask",
             settings=SEARCH)
    find(mla.cases(splits="many", min_batch=1), lambda c: c.num_kv_splits == 64, settings=SEARCH)
    find(mla.cases(splits="many", min_batch=1), lambda c: c.num_kv_splits == 2 and max(c.lens) > 64, settings=SEARCH)


def test_mla_decode_builders_are_deterministic():
    c = find(mla.cases(), lambda c: c.B > 1 and sum(c.lens) > 3 and c.layout == "strided" and c.shared,
             settings=SEARCH)
    a, b = mla.build(c), mla.build(c)
    for x, y in zip(a.args, b.args):
        xs = x.view(torch.uint8) if x.dtype == torch.float8_e4m3fn else x
        ys = y.view(torch.uint8) if y.dtype == torch.float8_e4m3fn else y
        assert torch.equal(xs, ys) and x.stride() == y.stride()
    assert torch.equal(a.read, b.read)


def test_mla_decode_read_mask_matches_the_page_table():
    """Inputs.read marks exactly the slots of tokens t < kv_lens[b] through the page table."""
    c = find(mla.cases(), lambda c: c.B > 1 and c.page_size > 1 and c.slack and c.spare_pages
             and any(n % c.page_size for n in c.lens), settings=SEARCH)
    x = mla.build(c)
    want = torch.zeros_like(x.read)
    ptr, ind = x.kv_indptr.tolist(), x.kv_indices.tolist()
    for b, n in enumerate(c.lens):
        for t in range(n):
            want[ind[ptr[b] + t // c.page_size], t % c.page_size] = True
    assert torch.equal(x.read, want)
    assert int(x.read.sum()) < x.read.numel()
