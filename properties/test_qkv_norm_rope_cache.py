"""Properties of qkv_norm_rope_cache (SPEC.md section 1), for every registered implementation."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from oracles.qkv_norm_rope_cache import qkv_norm_rope_cache as oracle
from properties import backend
from properties import strategies as kst
from properties.bad_input import check_bad_calls, editors
from properties.compare import _fail, assert_bitwise, assert_close
from properties.guard import Unchanged, poison_allocations
from properties.harness import prop
from properties.inputs import qkv_norm_rope_cache as inp

OP = "qkv_norm_rope_cache"


def run(impl, inputs):
    """Call with poisoned allocations; split the result into (q, gate or None, k, v)."""
    with poison_allocations():
        out = inputs.call(impl)
    if len(out) == 4:
        return out[0], out[1], out[2], out[3]
    return out[0], None, out[1], out[2]


def golden_and_reference(inputs):
    return (oracle(*inputs.args, **inputs.kwargs, compute_dtype=torch.float64),
            oracle(*inputs.args, **inputs.kwargs, compute_dtype=torch.float32))


def check_cache_rows(name, cache, layout, slots, capacity, rows_gold, rows_ref):
    """Each written slot holds, element by element, the row of one of the tokens that map to it."""
    got = inp.cache_rows(cache, layout).double().cpu()
    rows_gold, rows_ref = rows_gold.cpu(), rows_ref.cpu().double()
    slots = slots.long().cpu()
    valid = ((slots >= 0) & (slots < capacity)).nonzero().flatten()
    if valid.numel() == 0:
        return
    targets = torch.unique(slots[valid])
    actual, gold, ref = [], [], []
    for s in targets.tolist():
        tokens = valid[slots[valid] == s]
        a = got[s]
        cand = rows_gold[tokens]                             # [n, kvh, D]
        pick = (cand - a[None]).abs().argmin(dim=0, keepdim=True)
        actual.append(a)
        gold.append(cand.gather(0, pick)[0])
        ref.append(rows_ref[tokens].gather(0, pick)[0])
    assert_close(name, torch.stack(actual), torch.stack(gold), torch.stack(ref), out_dtype=cache.dtype)


def fp16_safe(case):
    """A float16 cache overflows to inf past 65504 (no clamp for non-fp8 caches): keep scales sane."""
    return case.cache_dtype != "float16" or all(s is None or abs(s) >= 2 ** -4 for s in (case.k_scale, case.v_scale))


@prop(inp.cases().filter(fp16_safe), examples=2.0)
def test_equivalence(impl, case):
    """Every output and every written cache row equals the float64 oracle within the budget; no
    other byte of the caches, guard bands or inputs changes."""
    x = inp.build(case)
    unchanged = Unchanged(**x.read_only())
    q, g, k, v = run(impl, x)
    gold, ref = golden_and_reference(x)
    dt = x.args[0].dtype
    assert_close("q", q, gold.q, ref.q, dt)
    if case.gate:
        assert_close("gate", g, gold.gate, ref.gate, dt)
    assert_close("k", k, gold.k, ref.k, dt)
    assert_close("v", v, gold.v, ref.v, dt)
    slots = x.args[8]
    check_cache_rows("key_cache", x.key_cache.tensor, case.layout, slots, x.capacity, gold.k_rows, ref.k_rows)
    check_cache_rows("value_cache", x.value_cache.tensor, case.layout, slots, x.capacity, gold.v_rows, ref.v_rows)
    rows = inp.row_mask(x, case.layout)
    x.key_cache.check("key_cache", rows)
    x.value_cache.check("value_cache", rows)
    x.qkv.check("qkv")
    unchanged.check()


MOSTLY_INVALID = st.fixed_dictionaries({
    "p_invalid": st.one_of(st.just(1.0), st.floats(0.5, 1.0)),
    "p_duplicate": st.just(0.0),
    "invalid_kinds": st.sampled_from(["minus1", "capacity", "mixed"]),
})


@prop(inp.cases(slot_plan=MOSTLY_INVALID).filter(fp16_safe))
def test_invalid_slots_write_nothing(impl, case):
    """Slots -1, negative, == capacity and beyond write nothing (safe skip, no host sync): every
    cache element outside the valid slots' rows and every guard element stays bit-exact; q/k/v
    are still produced for those tokens."""
    x = inp.build(case)
    q, g, k, v = run(impl, x)
    rows = inp.row_mask(x, case.layout)
    x.key_cache.check("key_cache", rows)
    x.value_cache.check("value_cache", rows)
    for name, out in (("q", q), ("k", k), ("v", v)):
        if not torch.isfinite(out).all():
            _fail(f"{name}: holds NaN/inf for tokens with invalid slots (output not produced)")


@prop(inp.cases(duplicates=False).filter(lambda c: c.gate is not None and fp16_safe(c)))
def test_gate_layouts_agree(impl, case):
    """The same q and gate laid out interleaved and blocked give bit-identical results."""
    a = inp.build(case.replace(gate="interleaved"))
    b = inp.build(case.replace(gate="blocked"))
    T, qh, D = case.T, case.qh, case.D
    src = a.qkv.tensor
    qg = src[:, : 2 * qh * D].reshape(T, qh, 2, D)
    blocked = torch.cat([qg[:, :, 0].reshape(T, qh * D), qg[:, :, 1].reshape(T, qh * D), src[:, 2 * qh * D:]], dim=1)
    b.qkv.tensor.copy_(blocked)
    out_a, out_b = run(impl, a), run(impl, b)
    for name, x_, y_ in zip(("q", "gate", "k", "v"), out_a, out_b):
        assert_bitwise(name, x_, y_)
    assert_bitwise("key_cache", a.key_cache.tensor, b.key_cache.tensor)
    assert_bitwise("value_cache", a.value_cache.tensor, b.value_cache.tensor)


@prop(inp.cases(duplicates=False).filter(fp16_safe))
def test_cache_layouts_agree(impl, case):
    """NHD and HND caches hold bit-identical rows (and identical q/k/v)."""
    a = inp.build(case, layout="NHD")
    b = inp.build(case, layout="HND")
    out_a, out_b = run(impl, a), run(impl, b)
    for name, x_, y_ in zip(("q", "gate", "k", "v"), out_a, out_b):
        if x_ is not None:
            assert_bitwise(name, x_, y_)
    hit = inp.written_rows(a)
    for name in ("key_cache", "value_cache"):
        rows_a = inp.cache_rows(getattr(a, name).tensor, "NHD")[hit]
        rows_b = inp.cache_rows(getattr(b, name).tensor, "HND")[hit]
        assert_bitwise(f"{name} rows", rows_a, rows_b)
        getattr(a, name).check(name, inp.row_mask(a, "NHD"))
        getattr(b, name).check(name, inp.row_mask(b, "HND"))


SPLIT_CASES = st.builds(lambda c, cut: c.replace(cut=cut),
                        inp.cases(duplicates=False, min_tokens=2).filter(fp16_safe), st.floats(0.0, 1.0))


@prop(SPLIT_CASES)
def test_token_split(impl, case):
    """Calling on tokens [0, t) then [t, T) gives the same outputs and caches as one call."""
    t = int(case.cut * case.T)
    whole, parts = inp.build(case), inp.build(case)
    out_w = run(impl, whole)
    outs = []
    for lo, hi in ((0, t), (t, case.T)):
        args = list(parts.args)
        for i in (0, 5, 8):  # qkv, positions, slot_mapping
            args[i] = parts.args[i][lo:hi]
        outs.append(run(impl, inp.Inputs(tuple(args), parts.kwargs, None, None, None, parts.capacity)))
    for n, name in enumerate(("q", "gate", "k", "v")):
        if out_w[n] is not None:
            assert_bitwise(name, torch.cat([outs[0][n], outs[1][n]]), out_w[n])
    assert_bitwise("key_cache", parts.key_cache.tensor, whole.key_cache.tensor)
    assert_bitwise("value_cache", parts.value_cache.tensor, whole.value_cache.tensor)


@prop(inp.cases(duplicates=False).filter(fp16_safe))
def test_position_zero_is_unrotated(impl, case):
    """At position 0 (cos 1, sin 0) q and k are the normalised values unrotated: bit-identical to
    the same tokens at an out-of-range position (rotated by the identity, by contract), and within
    the budget of the oracle's RMSNorm alone."""
    at_zero, outside = inp.build(case), inp.build(case)
    at_zero.args[5].zero_()
    outside.args[5].fill_(case.max_pos)
    q0, g0, k0, v0 = run(impl, at_zero)
    q1, g1, k1, v1 = run(impl, outside)
    assert_bitwise("q", q0, q1)
    assert_bitwise("k", k0, k1)
    gold, ref = golden_and_reference(at_zero)
    assert_close("q at position 0", q0, gold.q, ref.q, q0.dtype)
    assert_close("k at position 0", k0, gold.k, ref.k, k0.dtype)


SATURATING = st.builds(
    lambda c, ks, vs: c.replace(k_scale=ks, v_scale=vs, magnitude=300.0),
    inp.cases(cache_dtype="float8_e4m3fn"),
    kst.quant_scales(allow_none=False, min_exp=-14, max_exp=-4),
    kst.quant_scales(allow_none=False, min_exp=-14, max_exp=-4))


@prop(SATURATING)
def test_fp8_cache_saturates(impl, case):
    """With scales small enough that k / k_scale and v / v_scale leave the fp8 range, the cache
    holds +-448 there, never NaN or inf."""
    x = inp.build(case)
    run(impl, x)
    gold = oracle(*x.args, **x.kwargs)
    slots = x.args[8].long().cpu()
    for name, cache, rows in (("key_cache", x.key_cache.tensor, gold.k_rows), ("value_cache", x.value_cache.tensor, gold.v_rows)):
        got = inp.cache_rows(cache, case.layout).float().cpu()
        rows = rows.cpu()
        for t in gold.written.cpu().nonzero().flatten().tolist():
            row = got[slots[t]]
            if not torch.isfinite(row).all():
                _fail(f"{name}: slot {int(slots[t])} holds NaN/inf (fp8 must saturate at +-448)")
            # golden clamps to +-448: where it is saturated the row must be exactly +-448 (unless a
            # duplicate slot's other token wrote it)
            sat = rows[t].abs() >= 448
            if (slots == slots[t]).sum() == 1 and sat.any() and not torch.equal(row[sat].cpu().double(), rows[t][sat].cpu()):
                _fail(f"{name}: slot {int(slots[t])}: saturated elements are not +-448: {row[sat][:4].tolist()}")


def _bad_calls(x, case):
    """(what, make the call's (args, kwargs), exception type, regex naming the argument)."""
    a, kw = list(x.args), dict(x.kwargs)

    with_arg, with_kw = editors(a, kw)

    qkv, cos, pos, kc, slots = a[0], a[3], a[5], a[6], a[8]
    dev = qkv.device
    rows = []
    rows += [("qkv int32", with_arg(0, qkv.to(torch.int32)), TypeError, "qkv"),
             ("qkv rank 1", with_arg(0, qkv.reshape(-1)), ValueError, "qkv"),
             ("qkv too narrow", with_arg(0, qkv[:, :-2]), ValueError, "qkv"),
             ("qkv not a tensor", with_arg(0, ((1.0, 2.0),)), TypeError, "qkv"),
             ("q_norm_weight length", with_arg(1, a[1][:-1]), ValueError, "q_norm_weight"),
             ("k_norm_weight int", with_arg(2, a[2].to(torch.int64)), TypeError, "k_norm_weight"),
             ("cos wrong width", with_arg(3, torch.ones(cos.shape[0], cos.shape[1] + 1, device=dev)), ValueError, "cos"),
             ("sin rows differ", with_arg(4, torch.zeros(cos.shape[0] + 1, cos.shape[1], device=dev)), ValueError, "sin"),
             ("cos float64", with_arg(3, cos.double()), TypeError, "cos"),
             ("positions float", with_arg(5, pos.float()), TypeError, "positions"),
             ("positions length", with_arg(5, torch.zeros(case.T + 1, dtype=torch.int64, device=dev)), ValueError, "positions"),
             ("slot_mapping length", with_arg(8, torch.zeros(case.T + 2, dtype=torch.int64, device=dev)), ValueError, "slot_mapping"),
             ("slot_mapping float", with_arg(8, slots.float()), TypeError, "slot_mapping"),
             ("key_cache rank 3", with_arg(6, kc.reshape(kc.shape[0], -1, kc.shape[-1])), ValueError, "key_cache"),
             ("key_cache int8", with_arg(6, torch.zeros(kc.shape, dtype=torch.int8, device=dev)), TypeError, "key_cache"),
             ("value_cache shape", with_arg(7, torch.zeros(kc.shape[0] + 1, *kc.shape[1:], dtype=kc.dtype, device=dev)), ValueError, "value_cache"),
             ("num_q_heads not a multiple", with_kw(num_q_heads=case.qh + 1, num_kv_heads=2 * case.qh + 2), ValueError, "num_q_heads|qkv"),
             ("num_q_heads zero", with_kw(num_q_heads=0), ValueError, "num_q_heads"),
             ("num_kv_heads float", with_kw(num_kv_heads=float(case.kvh)), TypeError, "num_kv_heads"),
             ("head_dim odd", with_kw(head_dim=case.D + 1), ValueError, "head_dim"),
             ("rotary_dim odd", with_kw(rotary_dim=3), ValueError, "rotary_dim"),
             ("rotary_dim > head_dim", with_kw(rotary_dim=case.D + 2), ValueError, "rotary_dim"),
             ("rotary_dim zero", with_kw(rotary_dim=0), ValueError, "rotary_dim"),
             ("is_neox string", with_kw(is_neox="yes"), TypeError, "is_neox"),
             ("eps negative", with_kw(eps=-1.0), ValueError, "eps"),
             ("gate unknown", with_kw(gate="mixed"), ValueError, "gate"),
             ("cache_layout unknown", with_kw(cache_layout="NDH"), ValueError, "cache_layout"),
             ("k_scale float64", with_kw(k_scale=torch.ones(1, dtype=torch.float64, device=dev)), TypeError, "k_scale"),
             ("v_scale two elements", with_kw(v_scale=torch.ones(2, device=dev)), ValueError, "v_scale")]
    if dev.type == "cuda":
        rows.append(("positions on the CPU", with_arg(5, pos.cpu()), ValueError, "positions"))
    return rows


@prop(inp.cases(min_tokens=1).filter(fp16_safe), examples=0.2)
def test_bad_input_rejected(impl, case):
    """Each bad call of the table raises ValueError/TypeError naming the argument, before anything
    is written (caches, guard bands and qkv bit-exact afterwards)."""
    x = inp.build(case)
    check_bad_calls(impl, _bad_calls(x, case))
    x.key_cache.check("key_cache")
    x.value_cache.check("value_cache")
    x.qkv.check("qkv")


@settings(max_examples=5)
@given(case=inp.cases(min_tokens=1).filter(fp16_safe))
def test_oracle_rejects_bad_input(case):
    """The oracle validates as strictly as the kernels: the same table raises the same errors."""
    check_bad_calls(oracle, _bad_calls(inp.build(case), case))
