"""Discovery tests for the gather_kv_b_proj cases: the strategy reaches the edges the properties
rely on, seen through the real builders where the edge lives in the tensors."""
import itertools

import pytest
import torch
from hypothesis import Phase, find, settings

from properties.inputs import gather_kv_b_proj as gkv

# generate only: the first case with the edge is enough (shrinking it would cost more than finding it)
SEARCH = settings(max_examples=3000, database=None, deadline=None, phases=[Phase.generate])
TILE = 16  # token rows per tile under the interpreter (64 on the GPU): a boundary off it splits a tile


def indices_of(c):
    return gkv.build(c).args[2].tolist()


def nonempty(c):
    return [n for n in c.lens if n]


GKV_EDGES = {
    "no sequence (B == 0)": lambda c: c.lens == [],
    "sequences, all empty": lambda c: len(c.lens) >= 2 and sum(c.lens) == 0,
    "an empty sequence between two others": lambda c: any(c.lens[i] == 0 and c.lens[i - 1] and c.lens[i + 1]
                                                          for i in range(1, len(c.lens) - 1)),
    "3 non-empty sequences or more": lambda c: len(nonempty(c)) >= 3,
    "total tokens at the bound": lambda c: sum(c.lens) == gkv.bounds()["max_total"],
    "a sequence boundary inside a token tile": lambda c: len(nonempty(c)) >= 2 and c.lens[0] % TILE != 0,
    "length a multiple of the block size": lambda c: any(n and n % c.block_size == 0 and c.block_size > 1 for n in c.lens),
    "length one past a block": lambda c: any(n == c.block_size + 1 for n in c.lens) and c.block_size > 1,
    "block_size 1": lambda c: c.block_size == 1 and sum(c.lens) > 1,
    "block_size 64": lambda c: c.block_size == 64 and sum(c.lens) > 0,
    "odd block_size > 1": lambda c: c.block_size % 2 == 1 and c.block_size > 1 and sum(c.lens) > 0,
    "a block shared by two sequences": lambda c: (lambda ix: len(ix) > len(set(ix)))(indices_of(c)),
    "a spare table entry past a length": lambda c: c.spare_refs and sum(len(t) for t in gkv.build(c).tables)
    > sum(-(-n // c.block_size) for n in c.lens),
    "unreferenced blocks": lambda c: c.extra_blocks > 0 and sum(c.lens) > 0,
    "H >= 2 with qk_nope != v_head_dim": lambda c: c.H >= 2 and c.qk != c.vd,
    "odd qk_nope": lambda c: c.qk % 2 == 1 and c.qk > 1,
    "odd v_head_dim": lambda c: c.vd % 2 == 1 and c.vd > 1,
    "qk_nope wider than one interpreter tile (32)": lambda c: c.qk > 32,
    "P == 0": lambda c: c.P == 0,
    "P at the bound": lambda c: c.P == gkv.bounds()["max_rope"],
    "P not a power of two": lambda c: c.P and c.P & (c.P - 1) != 0,
    "L over two K steps (64)": lambda c: c.L == 64,
    "w_scale per row": lambda c: c.w_scale == "row",
    "block w_scale with two block rows": lambda c: c.w_scale == "block" and c.H * (c.qk + c.vd) > 128,
    "negative kv_scale": lambda c: c.kv_scale is not None and c.kv_scale < 0,
    "out float32": lambda c: c.out_dtype == "float32",
    "out float16": lambda c: c.out_dtype == "float16",
    "int64 tables": lambda c: gkv.build(c).args[1].dtype == torch.int64,
    "strided cache (row and block gaps)": lambda c: c.row_pad > 0 and c.block_pad > 0 and sum(c.lens) > 0,
    "strided weight": lambda c: not gkv.build(c).args[4].is_contiguous(),
}
for _cache, _w in itertools.product(gkv.CACHE_DTYPES, gkv.WEIGHT_DTYPES):
    GKV_EDGES[f"cache {_cache} x weight {_w}"] = (lambda cd, wd: lambda c: c.cache_dtype == cd and c.w_dtype == wd
                                                  and sum(c.lens) > 0)(_cache, _w)


@pytest.mark.parametrize("edge", sorted(GKV_EDGES))
def test_gather_kv_b_proj_cases_reach(edge):
    find(gkv.cases(), GKV_EDGES[edge], settings=SEARCH)


def test_gather_kv_b_proj_property_strategies_reach():
    """The narrowed strategies of the properties still reach what they exist for."""
    # tight: the highest block id holds tokens, and its last slot too (a read past it leaves the cache)
    find(gkv.cases(min_total=1, tight=True), lambda c: bool(gkv.build(c).held[-1].any()), settings=SEARCH)
    find(gkv.cases(min_total=1, tight=True), lambda c: bool(gkv.build(c).held[-1, -1]) and c.block_size > 1,
         settings=SEARCH)
    find(gkv.cases(min_seqs=2), lambda c: len(nonempty(c)) >= 2 and c.lens[0] % c.block_size != 0, settings=SEARCH)
    find(gkv.cases(w_scale="block"), lambda c: c.H >= 2 and c.L > 32, settings=SEARCH)
    find(gkv.uniform_scales(), lambda s: s < 0, settings=SEARCH)


def test_gather_kv_b_proj_tight_cache_ends_at_last_held_block():
    """With tight=True the cache has no block past the highest id holding tokens."""
    c = find(gkv.cases(min_total=1, tight=True), lambda c: len(nonempty(c)) >= 2 and c.spare_refs, settings=SEARCH)
    x = gkv.build(c)
    assert bool(x.held[-1].any()) and x.kv_cache.shape[0] == x.held.shape[0]


def test_gather_kv_b_proj_poison_keeps_held_rows():
    """Poisoning changes no held row: the same bits as the plain build."""
    c = find(gkv.cases(min_total=3), lambda c: c.extra_blocks > 0 and c.cache_dtype == "float8_e4m3fn", settings=SEARCH)
    a, b = gkv.build(c), gkv.build(c, poison="unheld")
    assert torch.equal(a.token_rows().view(torch.uint8), b.token_rows().view(torch.uint8))
    assert bool(b.kv_cache[~b.held].float().isnan().all())


def test_gather_kv_b_proj_builders_are_deterministic():
    c = find(gkv.cases(), lambda c: sum(c.lens) > 3 and c.w_scale == "block", settings=SEARCH)
    a, b = gkv.build(c), gkv.build(c)
    for x, y in zip(list(a.args) + [a.kwargs["w_scale"]], list(b.args) + [b.kwargs["w_scale"]]):
        x8 = x.view(torch.uint8) if x.dtype == torch.float8_e4m3fn else x
        y8 = y.view(torch.uint8) if y.dtype == torch.float8_e4m3fn else y
        assert torch.equal(x8, y8) and x.stride() == y.stride()
