"""Properties of gather_kv_b_proj (SPEC.md section 3), for every registered implementation.

The rope part's convention (test_rope_part_exact): k[t, h, qk_nope:] is the cache's rope part
dequantised as a float32 product, pe.float() * kv_scale (exact inputs, one float32 rounding; pe
alone without a scale), then rounded once to out_dtype; no rounding to the cache dtype or to any
other type in between. Every head holds the same bits.
"""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from oracles.gather_kv_b_proj import gather_kv_b_proj as oracle
from properties import backend
from properties.bad_input import check_bad_calls, editors
from properties.compare import _fail, assert_bitwise, assert_close
from properties.guard import Unchanged, forbid_launches, poison_allocations, poisoned
from properties.harness import prop
from properties.inputs import gather_kv_b_proj as inp

OP = "gather_kv_b_proj"


def run(impl, x, *args, **changes):
    """Call with poisoned allocations (an output element never written is NaN): (k, v)."""
    with poison_allocations():
        k, v = x.call(impl, *args, **changes)
    return k, v


def golden_and_reference(x, *args, **changes):
    return (x.call(oracle, *args, **changes, compute_dtype=torch.float64),
            x.call(oracle, *args, **changes, compute_dtype=torch.float32))


def check_result(what, x, k, v, gold, ref):
    """k and v in out_dtype, of the contract's shapes, within the budget of the oracle."""
    out_dtype = x.kwargs["out_dtype"]
    for name, out in (("k", k), ("v", v)):
        if out.dtype != out_dtype:
            _fail(f"{what}{name}: dtype {out.dtype}, expected out_dtype {out_dtype}")
    assert_close(f"{what}k", k, gold[0], ref[0], out_dtype)
    assert_close(f"{what}v", v, gold[1], ref[1], out_dtype)


def check_finite(what, *outs):
    for name, out in zip(("k", "v"), outs):
        if not torch.isfinite(out.float()).all():
            i = int((~torch.isfinite(out.float())).flatten().nonzero()[0])
            _fail(f"{what}{name}: holds NaN/inf (first at flat index {i} of shape {tuple(out.shape)})")


@prop(inp.cases(), examples=3.0)
def test_equivalence(impl, case):
    """k and v equal the float64 oracle within the budget, over head counts, asymmetric and odd
    qk_nope / v_head_dim, every L and P (0 included), block sizes 1..64 (128 on the GPU), packed
    sequences of length 0..64 (thousands on the GPU) with shared prefix blocks and spare table
    entries, every cache x weight dtype (bf16/fp16/fp8) with kv_scale, w_scale none / per row /
    128x128 blocks, every out_dtype, int32/int64 tables, strided cache and weight; the cache
    (guard bands included), w_scale and every other input are unchanged."""
    x = inp.build(case)
    unchanged = Unchanged(**x.tensors())
    k, v = run(impl, x)
    gold, ref = golden_and_reference(x)
    check_result("", x, k, v, gold, ref)
    x.cache.check("kv_cache")
    if x.w_scale is not None:
        x.w_scale.check("w_scale")
    unchanged.check()


@prop(inp.cases(min_total=1).filter(lambda c: c.P > 0))
def test_rope_part_exact(impl, case):
    """The rope part of K is bit-identical across heads and equals the cache's rope part
    dequantised in float32 and rounded once to out_dtype (the module docstring's convention),
    computed here from the cache rows each token reads."""
    x = inp.build(case)
    k, _ = run(impl, x)
    qk = case.qk
    pe = x.token_rows()[:, case.L:].float()
    if x.kwargs["kv_scale"] is not None:
        pe = pe * x.kwargs["kv_scale"].cpu().reshape(())
    expected = pe.to(x.kwargs["out_dtype"])
    got = k[:, :, qk:].cpu()
    for h in range(1, case.H):
        assert_bitwise(f"k[:, {h}, {qk}:] vs head 0 (rope part)", got[:, h], got[:, 0])
    assert_bitwise(f"k[:, 0, {qk}:] (rope part) vs (pe.float() * kv_scale).to(out_dtype)", got[:, 0], expected)


@prop(inp.cases())
def test_block_placement_invariance(impl, case):
    """Moving the cache's blocks (unreferenced ones included) to other ids and renumbering
    kv_indices to match gives bit-identical k and v: blocks are addressed through the table."""
    k0, v0 = run(impl, inp.build(case))
    y = inp.permuted(inp.build(case), seed=case.seed ^ 0x5BD1E995)
    k1, v1 = run(impl, y)
    assert_bitwise("k (blocks permuted)", k1, k0)
    assert_bitwise("v (blocks permuted)", v1, v0)


@prop(inp.cases(min_seqs=2))
def test_batch_split_invariance(impl, case):
    """One call over B packed sequences gives bit-identical rows to one call per sequence (its own
    one-sequence table, the same cache): a token's result does not depend on its neighbours or on
    which token tile it falls in."""
    x = inp.build(case)
    k, v = run(impl, x)
    cu = [0]
    for n in case.lens:
        cu.append(cu[-1] + n)
    for b in range(len(case.lens)):
        kb, vb = run(impl, x, *x.sequence_args(b))
        assert_bitwise(f"k of sequence {b} (rows {cu[b]}..{cu[b + 1]})", k[cu[b]:cu[b + 1]], kb)
        assert_bitwise(f"v of sequence {b} (rows {cu[b]}..{cu[b + 1]})", v[cu[b]:cu[b + 1]], vb)


def same_as_clean_cache(impl, case, poison: str, where: str, what: str) -> None:
    """k and v from a cache poisoned with NaN (`poison`: inp.build's mode) are finite and
    bit-identical to those from the clean cache, and the cache's guards are untouched."""
    k0, v0 = run(impl, inp.build(case))
    x = inp.build(case, poison=poison)
    k1, v1 = run(impl, x)
    check_finite(f"{where}: ", k1, v1)
    assert_bitwise(f"k ({what})", k1, k0)
    assert_bitwise(f"v ({what})", v1, v0)
    x.cache.check("kv_cache")


@prop(inp.cases(min_total=1))
def test_unheld_slots_ignored(impl, case):
    """With every cache slot that holds no token set to NaN (the tail of each last block, spare
    table entries past a length, unreferenced blocks, stride gaps, guard bands), k and v are
    finite and bit-identical to the run on the unpoisoned cache: no such slot is read into an
    output."""
    same_as_clean_cache(impl, case, "unheld", "poisoned cache", "unheld slots NaN")


@prop(inp.cases(min_total=1, tight=True))
def test_no_read_past_cache(impl, case):
    """A cache allocated with no block past the last one holding tokens (its highest id is the
    last block of the last non-empty sequence), inside guard bands and stride gaps filled with
    NaN: k and v are finite and bit-identical to the run with random guard contents. A read
    outside the view that a mask throws away cannot be seen; one that reaches an output shows
    as NaN (on the GPU a read far past the allocation faults)."""
    same_as_clean_cache(impl, case, "outside", "cache inside NaN guard bands", "NaN guard bands")


@prop(inp.cases(min_seqs=2).filter(lambda c: c.lens[-1] > 0))
def test_host_total(impl, case):
    """`total`, the caller's host copy of cu_kv_lens[-1], changes nothing when it is right, and a
    smaller one gives the first rows of the full call, bit-identical. Rows past cu_kv_lens[-1]
    are never read nor written: called on the first B - 1 sequences (cu_kv_lens and kv_indptr cut
    short; the last sequence's table entries and cache rows stay in place, so a stray read lands
    on real tokens) with total = cu_kv_lens[B - 1] + len(last), the rows past cu_kv_lens[B - 1]
    stay NaN (the poisoned allocation) and the rows before equal the full call's."""
    x = inp.build(case)
    k, v = run(impl, x)
    full = sum(case.lens)
    k1, v1 = run(impl, x, total=full)
    assert_bitwise("k (total given)", k1, k)
    assert_bitwise("v (total given)", v1, v)
    k2, v2 = run(impl, x, total=full - 1)
    assert_bitwise(f"k (total = {full - 1}, one short)", k2, k[:full - 1])
    assert_bitwise(f"v (total = {full - 1}, one short)", v2, v[:full - 1])
    cache, indptr, indices, cu, w = x.args
    cut, extra = full - case.lens[-1], case.lens[-1]
    k3, v3 = run(impl, x, cache, indptr[:-1], indices, cu[:-1], w, total=cut + extra)
    for name, got, ref in (("k", k3, k), ("v", v3, v)):
        assert_bitwise(f"{name}[:{cut}] (last sequence cut, total past it)", got[:cut], ref[:cut])
        assert_bitwise(f"{name}[{cut}:] (rows past cu_kv_lens[-1] = {cut}, total = {cut + extra}) vs the "
                       f"poisoned allocation (never written)", got[cut:], poisoned(got[cut:].shape, got.dtype, got.device))


def _on_sm90() -> bool:
    return backend.BACKEND == "cuda" and torch.cuda.get_device_capability() == (9, 0)


@prop(inp.cases(min_seqs=2, min_total=1, sm90=True))
def test_sm90_matches_portable(impl, case):
    """On an sm_90 GPU, for the shapes and types that select the warpgroup kernel
    (kernels/gather_kv_b_proj_sm90: checked, so the property cannot test the portable kernel
    against itself), k and v are bit-identical to the portable Triton kernel's: the same K steps,
    scales and single rounding, over head dims that are multiples of 64, L up to 512, P multiples
    of 8, block sizes 1..128, token tiles cut at every length, padded strides, bf16/fp16 operands
    (fp8 weights prepared) and outputs. With the last sequence cut from the tables and a host total
    past cu_kv_lens[-1], both leave the rows past it unwritten (NaN) and agree on the rest."""
    if not _on_sm90():
        pytest.skip("the sm_90 kernel runs on an sm_90 GPU only")
    from kernels.gather_kv_b_proj import gather_kv_b_proj_launch, selected_kernel
    x = inp.build(case)
    kernel = x.call(selected_kernel)
    if kernel != "sm90":
        _fail(f"the case selects the {kernel} kernel, not the sm_90 one: {case}")
    k, v = run(impl, x)
    kp, vp = run(gather_kv_b_proj_launch, x, portable=True)
    assert_bitwise("k (sm_90 kernel vs portable)", k, kp)
    assert_bitwise("v (sm_90 kernel vs portable)", v, vp)
    if case.lens[-1] > 0:
        cache, indptr, indices, cu, w = x.args
        cut = sum(case.lens) - case.lens[-1]
        cut_args = (cache, indptr[:-1], indices, cu[:-1], w)
        k3, v3 = run(impl, x, *cut_args, total=sum(case.lens))
        k4, v4 = run(gather_kv_b_proj_launch, x, *cut_args, total=sum(case.lens), portable=True)
        for name, got, ref in (("k", k3, k4), ("v", v3, v4)):
            assert_bitwise(f"{name} (last sequence cut, host total {sum(case.lens)} past cu_kv_lens[-1] = {cut}) "
                           f"vs portable", got, ref)
            assert_bitwise(f"{name}[{cut}:] (rows past cu_kv_lens[-1]) vs the poisoned allocation (never written)",
                           got[cut:], poisoned(got[cut:].shape, got.dtype, got.device))


@prop(inp.cases(min_total=1), examples=0.2)
def test_bad_total_rejected(impl, case):
    """A bad host `total` (negative, not an int, non-zero with no sequences) raises
    ValueError/TypeError naming it, before anything is launched."""
    x = inp.build(case)
    a, kw = list(x.args), dict(x.kwargs)
    cache, indptr, indices, cu, w = a
    _, with_kw = editors(a, kw)
    no_seqs = ([cache, indptr[:1], indices, cu[:1], w], {**kw, "total": 1})
    rows = [("total negative", with_kw(total=-1), ValueError, "total"),
            ("total float", with_kw(total=float(sum(case.lens))), TypeError, "total"),
            ("total bool", with_kw(total=True), TypeError, "total"),
            ("total 1 with no sequences", lambda: no_seqs, ValueError, "total")]
    with forbid_launches("a bad total"):
        check_bad_calls(impl, rows)


UNIFORM_CASES = st.builds(lambda c, s: c.replace(uniform=s), inp.cases(w_scale="block"), inp.uniform_scales())


@prop(UNIFORM_CASES)
def test_uniform_block_scale_is_row_scale(impl, case):
    """A 128x128-block w_scale holding one value s gives k and v within the budget of the oracle
    with the per-row w_scale holding s (both are W * s; the kernel applies a block scale per K
    step and a row scale once at the end, so only within the budget), and so does the per-row
    call."""
    xb = inp.build(case)
    xr = inp.build(case.replace(w_scale="row"))
    for x in (xb, xr):
        x.w_scale.tensor.fill_(case.uniform)
        x.w_scale.before = x.w_scale.buffer.clone()
    kb, vb = run(impl, xb)
    kr, vr = run(impl, xr)
    gold, ref = golden_and_reference(xr)
    check_result("uniform block scale: ", xb, kb, vb, gold, ref)
    check_result("uniform row scale: ", xr, kr, vr, gold, ref)


def _bad_calls(x, case):
    """(what, make the call's (args, kwargs), exception type, regex naming the argument)."""
    a, kw = list(x.args), dict(x.kwargs)
    cache, indptr, indices, cu, w = a
    dev = cache.device
    L, P, qk, vd, N = case.L, case.P, case.qk, case.vd, w.shape[0]

    with_arg, with_kw = editors(a, kw)

    blocks = (-(-N // 128), -(-L // 128))
    rows = [  # the first row must be harmless on a kernel that checks nothing (the no_checks mutant)
        ("kv_cache int32", with_arg(0, torch.zeros(cache.shape, dtype=torch.int32, device=dev)), TypeError, "kv_cache"),
        ("kv_cache float32", with_arg(0, cache.float()), TypeError, "kv_cache"),
        ("kv_cache rank 2", with_arg(0, cache.reshape(cache.shape[0], -1)), ValueError, "kv_cache"),
        ("kv_cache not a tensor", with_arg(0, ((1.0,),)), TypeError, "kv_cache"),
        ("P odd", with_arg(0, cache[..., :-1]), ValueError, "kv_cache"),
        ("P > 128", with_arg(0, torch.zeros(1, 1, L + 130, dtype=cache.dtype, device=dev)), ValueError, "kv_cache"),
        ("block_size 0", with_arg(0, torch.zeros(2, 0, L + P, dtype=cache.dtype, device=dev)), ValueError, "kv_cache"),
        ("kv_lora_rank not a multiple of 16", with_kw(kv_lora_rank=L - 2), ValueError, "kv_lora_rank"),
        ("kv_lora_rank 0", with_kw(kv_lora_rank=0), ValueError, "kv_lora_rank"),
        ("kv_lora_rank float", with_kw(kv_lora_rank=float(L)), TypeError, "kv_lora_rank"),
        ("qk_nope_head_dim 0", with_kw(qk_nope_head_dim=0), ValueError, "qk_nope_head_dim"),
        ("qk_nope_head_dim 513", with_kw(qk_nope_head_dim=513), ValueError, "qk_nope_head_dim"),
        ("v_head_dim bool", with_kw(v_head_dim=True), TypeError, "v_head_dim"),
        ("v_head_dim negative", with_kw(v_head_dim=-vd), ValueError, "v_head_dim"),
        ("w_kv_b rows not a multiple of qk_nope + v", with_arg(4, w[:N - 1]), ValueError, "w_kv_b"),
        ("w_kv_b columns != kv_lora_rank", with_arg(4, w[:, :L - 16] if L > 16 else torch.zeros(N, 32, dtype=w.dtype, device=dev)),
         ValueError, "w_kv_b"),
        ("w_kv_b float32", with_arg(4, w.float()), TypeError, "w_kv_b"),
        ("w_kv_b rank 3", with_arg(4, w.reshape(1, N, L)), ValueError, "w_kv_b"),
        ("w_scale per row, one short", with_kw(w_scale=torch.ones(N - 1, device=dev)), ValueError, "w_scale"),
        ("w_scale blocks, one row too many", with_kw(w_scale=torch.ones(blocks[0] + 1, blocks[1], device=dev)), ValueError, "w_scale"),
        ("w_scale blocks transposed", with_kw(w_scale=torch.ones(blocks[1], blocks[0] + 1, device=dev)), ValueError, "w_scale"),
        ("w_scale rank 3", with_kw(w_scale=torch.ones(1, *blocks, device=dev)), ValueError, "w_scale"),
        ("w_scale float64", with_kw(w_scale=torch.ones(N, dtype=torch.float64, device=dev)), TypeError, "w_scale"),
        ("w_scale bfloat16", with_kw(w_scale=torch.ones(blocks, dtype=torch.bfloat16, device=dev)), TypeError, "w_scale"),
        ("kv_scale two elements", with_kw(kv_scale=torch.ones(2, device=dev)), ValueError, "kv_scale"),
        ("kv_scale float16", with_kw(kv_scale=torch.ones(1, dtype=torch.float16, device=dev)), TypeError, "kv_scale"),
        ("kv_indptr float", with_arg(1, indptr.float()), TypeError, "kv_indptr"),
        ("kv_indptr empty", with_arg(1, indptr[:0]), ValueError, "kv_indptr|cu_kv_lens"),
        ("kv_indptr one longer than cu_kv_lens", with_arg(1, torch.cat([indptr, indptr[-1:]])), ValueError, "cu_kv_lens"),
        ("kv_indptr rank 2", with_arg(1, indptr[None]), ValueError, "kv_indptr"),
        ("kv_indices float", with_arg(2, indices.double()), TypeError, "kv_indices"),
        ("kv_indices rank 2", with_arg(2, indices.reshape(1, -1)), ValueError, "kv_indices"),
        ("cu_kv_lens one longer", with_arg(3, torch.cat([cu, cu[-1:]])), ValueError, "cu_kv_lens"),
        ("cu_kv_lens one shorter", with_arg(3, cu[:-1]), ValueError, "cu_kv_lens"),
        ("cu_kv_lens int16", with_arg(3, cu.to(torch.int16)), TypeError, "cu_kv_lens"),
        ("cu_kv_lens negative total", with_arg(3, torch.cat([cu[:-1], torch.full_like(cu[-1:], -1)])), ValueError, "cu_kv_lens"),
        ("out_dtype float8", with_kw(out_dtype=torch.float8_e4m3fn), TypeError, "out_dtype"),
        ("out_dtype int32", with_kw(out_dtype=torch.int32), TypeError, "out_dtype"),
        ("out_dtype string", with_kw(out_dtype="bfloat16"), TypeError, "out_dtype"),
    ]
    if dev.type == "cuda":
        rows += [("cu_kv_lens on the CPU", with_arg(3, cu.cpu()), ValueError, "cu_kv_lens"),
                 ("w_kv_b on the CPU", with_arg(4, w.cpu()), ValueError, "w_kv_b"),
                 ("w_scale on the CPU", with_kw(w_scale=torch.ones(N)), ValueError, "w_scale")]
    return rows


@prop(inp.cases(min_total=1), examples=0.2)
def test_bad_input_rejected(impl, case):
    """Each bad call of the table raises ValueError/TypeError naming the argument (N not a
    multiple of qk_nope + v, w_scale of a wrong shape or dtype, odd or too large P, L not a
    multiple of 16, kv_indptr / cu_kv_lens of inconsistent sizes, ...); the cache and its guard
    bands are unchanged afterwards."""
    x = inp.build(case)
    check_bad_calls(impl, _bad_calls(x, case))
    x.cache.check("kv_cache")


@settings(max_examples=5)
@given(case=inp.cases(min_total=1))
def test_oracle_rejects_bad_input(case):
    """The oracle validates as strictly as the kernels: the same table raises the same errors."""
    check_bad_calls(oracle, _bad_calls(inp.build(case), case))


@prop(st.fixed_dictionaries({"log2_heads": st.integers(19, 21)}), examples=0.1)
def test_tile_count_limit_rejected(impl, case):
    """The kernel divides output column indices by a float multiply that is exact below 2^20: a
    weight with 2^20 or more rows (2^log2_heads heads of qk_nope = v = 1, as a stride-0 view) is
    refused with a ValueError naming w_kv_b before any kernel is launched (a launch fails the
    property at once: the call runs under guard.forbid_launches)."""
    dev, H, L = backend.DEVICE, 2 ** case.log2_heads, 16
    cache = torch.zeros(1, 4, L, dtype=torch.bfloat16, device=dev)
    w = torch.zeros(1, L, dtype=torch.bfloat16, device=dev).expand(2 * H, L)
    i32 = dict(dtype=torch.int32, device=dev)
    with forbid_launches(f"{2 * H} weight rows (2^20 or more)"):
        with pytest.raises(ValueError, match="w_kv_b.*2\\^20"):
            impl(cache, torch.tensor([0, 1], **i32), torch.tensor([0], **i32), torch.tensor([0, 1], **i32), w,
                 kv_lora_rank=L, qk_nope_head_dim=1, v_head_dim=1)
