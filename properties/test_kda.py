"""Properties of kda (SPEC.md section 4), for every registered implementation (chunk_kda and
fused_recurrent_kda both follow the one contract and run every property)."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from oracles.kda import kda as oracle
from properties import registry
from properties import strategies as kst
from properties.bad_input import check_bad_calls, editors
from properties.compare import _fail, assert_agree, assert_bitwise, assert_close
from properties.guard import Unchanged, poison_allocations
from properties.harness import prop
from properties.inputs import kda as inp

OP = "kda"
FORMS = {"chunk": "fused_recurrent", "fused_recurrent": "chunk"}


def run(impl, x, *args, **changes):
    """Call with poisoned allocations (an unwritten output element is NaN); returns (o, state)."""
    with poison_allocations():
        o, s = x.call(impl, *args, **changes)
    return o, s


def golden_and_reference(x, *args, **changes):
    return (x.call(oracle, *args, **changes, compute_dtype=torch.float64),
            x.call(oracle, *args, **changes, compute_dtype=torch.float32))


def check_result(what, x, o, s, gold, ref, *, final_state=True):
    """o within the budget in q's dtype, the final state within the budget in float32 (or None)."""
    if o.dtype != x.q.dtype:
        _fail(f"{what}o: dtype {o.dtype}, expected q's dtype {x.q.dtype}")
    assert_close(f"{what}o", o, gold[0], ref[0], x.q.dtype)
    if not final_state:
        if s is not None:
            _fail(f"{what}final_state: expected None with output_final_state=False, got {type(s).__name__}")
        return
    if s is None or s.dtype != torch.float32:
        _fail(f"{what}final_state: expected a float32 tensor, got {getattr(s, 'dtype', s)}")
    assert_close(f"{what}final_state", s, gold[1], ref[1], torch.float32)


@prop(inp.cases(), examples=0.4)
def test_equivalence(impl, case):
    """o and the final state equal the float64 oracle within the budget, over head counts with GVA
    ratios 1..8, K and V (not only powers of two), T across chunk boundaries, packed sequences,
    bf16/fp16/fp32, beta in float32 or q's dtype, with and without initial state, q/k L2 norm and
    scale, strided views; no input changes."""
    x = inp.build(case)
    unchanged = Unchanged(**x.tensors())
    o, s = run(impl, x)
    gold, ref = golden_and_reference(x)
    check_result("", x, o, s, gold, ref, final_state=case.final_state)
    unchanged.check()


def partner(impl):
    """The production implementation of the other form: chunk for fused_recurrent and back.
    Mutants say which form they break (`kda_form`); anything else is compared with the recurrent
    form, the literal recurrence."""
    form = getattr(impl.fn, "kda_form", None) or (impl.name if impl.kind == "production" else "chunk")
    return registry.get(OP, FORMS.get(form, "fused_recurrent"))


@prop(inp.cases(final_state=True), examples=0.12)
def test_forms_agree(impl, case):
    """chunk_kda and fused_recurrent_kda agree with each other on the same inputs: o and the final
    state differ by at most the sum of the two kernels' budgets (twice the one budget; see
    assert_agree), the budget taken from the float64 and float32 oracle results on these inputs."""
    x = inp.build(case)
    other = partner(impl)
    o, s = run(impl, x)
    o2, s2 = run(other, x)
    gold, ref = golden_and_reference(x)
    assert_agree(f"o ({impl.name} vs {other.name})", o, o2, gold[0], ref[0], x.q.dtype)
    assert_agree(f"final_state ({impl.name} vs {other.name})", s, s2, gold[1], ref[1], torch.float32)


@prop(inp.cases(min_qk_heads=2).filter(lambda c: c.HV > c.H), examples=0.12)
def test_gva_consistency(impl, case):
    """H q/k heads shared by HV // H value heads each give bit-identical o and final state to the
    same q/k repeat-interleaved to HV heads (ratio 1). Bit-exact, not within the budget: GVA is
    index mapping only, so value head hv performs the same float operations on the same q/k values
    (read from head hv // (HV // H) instead of from its own copy); only the addresses differ. A
    modulo mapping (hv % H) reads other values and is caught at any tolerance. H >= 2 here (with one
    q/k head every mapping reads head 0; test_equivalence draws that case)."""
    x = inp.build(case)
    group = case.HV // case.H
    q = x.q.repeat_interleave(group, dim=2)
    k = x.k.repeat_interleave(group, dim=2)
    o, s = run(impl, x)
    o1, s1 = run(impl, x, q, k, x.v, x.g, x.beta)
    assert_bitwise("o (GVA vs repeated q/k)", o, o1)
    if case.final_state:
        assert_bitwise("final_state (GVA vs repeated q/k)", s, s1)


@prop(inp.cases(varlen=True, min_seqs=2, final_state=True), examples=0.16)
def test_varlen_packing(impl, case):
    """Packed sequences (cu_seqlens, empty ones included) give bit-identical o rows and final
    states to one B = 1 call per sequence with its own initial state: the state resets at every
    boundary, and chunks align to each sequence's first token, so each sequence sees the same
    float operations as alone."""
    x = inp.build(case)
    o, s = run(impl, x)
    h0 = x.kwargs["initial_state"]
    for b, bos, eos, n in x.sequences():
        part = [t[:, bos:eos] for t in x.args]
        o_n, s_n = run(impl, x, *part, cu_seqlens=None,
                       initial_state=None if h0 is None else h0[n:n + 1])
        assert_bitwise(f"o of sequence {n} (tokens {bos}..{eos})", o[:, bos:eos], o_n)
        assert_bitwise(f"final_state of sequence {n}", s[n:n + 1], s_n)


CHAIN_CASES = st.builds(lambda c, cut: c.replace(cut=cut),
                        inp.cases(varlen=False, final_state=True, min_tokens=1),
                        st.one_of(kst.fractions(), st.sampled_from([64, 65, 63]).map(lambda t: -t)))


def cut_of(case) -> int:
    """The split point: a fraction of T, or (negative) a token index near a chunk boundary."""
    t = int(-case.cut) if case.cut < 0 else int(case.cut * case.T)
    return min(t, case.T)


@prop(CHAIN_CASES, examples=0.16)
def test_state_chaining(impl, case):
    """Two calls over tokens [0, t) and [t, T), the second starting from the first's final state,
    give the one-call result: the chained o and final state are within the budget of the float64
    oracle run over all T tokens at once (the chained kernel's float32 hand-over state is what the
    float32 reference carries too)."""
    x = inp.build(case)
    t = cut_of(case)
    first = [a[:, :t] for a in x.args]
    second = [a[:, t:] for a in x.args]
    o1, s1 = run(impl, x, *first, output_final_state=True)
    o2, s2 = run(impl, x, *second, initial_state=s1, output_final_state=True)
    gold, ref = golden_and_reference(x)
    check_result(f"chained at t={t}: ", x, torch.cat([o1, o2], dim=1), s2, gold, ref)


def decayed_only(x):
    """The beta = 0 closed form in float64: per sequence, S_t = diag(exp(G_t)) S_0 with
    G_t = sum_{s <= t} g_s (per channel), o_t = S_t^T q_t (q L2-normed if asked, then scaled),
    final state S_T (S_0 for an empty sequence)."""
    q = x.q.double()
    K = q.shape[-1]
    if x.kwargs["use_qk_l2norm"]:
        q = q / torch.sqrt((q * q).sum(-1, keepdim=True) + 1e-6)
    scale = x.kwargs["scale"]
    q = q * (K ** -0.5 if scale is None else scale)
    q = q.repeat_interleave(x.v.shape[2] // q.shape[2], dim=2)
    g = x.g.double()
    h0 = x.kwargs["initial_state"].double()
    o = torch.zeros(x.v.shape, dtype=torch.float64, device=q.device)
    S = torch.zeros(h0.shape, dtype=torch.float64, device=q.device)
    for b, bos, eos, n in x.sequences():
        G = g[b, bos:eos].cumsum(0)                     # [L, HV, K]
        o[b, bos:eos] = torch.einsum("thk,hkv->thv", G.exp() * q[b, bos:eos], h0[n])
        S[n] = G[-1].exp()[..., None] * h0[n] if eos > bos else h0[n]
    return o, S


@prop(inp.cases(h0=True, final_state=True), examples=0.12)
def test_beta_zero_only_decays(impl, case):
    """With beta = 0 no delta is written: the state is only decayed, S_T = diag(exp(sum g)) S_0 and
    o_t = S_t^T q_t, within the budget of that closed form in float64 (the working-precision
    reference is the float32 oracle on the same inputs)."""
    x = inp.build(case)
    x.beta.zero_()
    o, s = run(impl, x)
    gold = decayed_only(x)
    ref = x.call(oracle, compute_dtype=torch.float32)
    check_result("beta = 0: ", x, o, s, gold, ref)


@prop(inp.cases(gates=("extreme", "masked")), examples=0.2)
def test_extreme_gates(impl, case):
    """Gates down to -1000 (whole tokens wiped, deep decays mixed with mild ones) and masked gates
    (every entry exactly 0 or -1000) give finite o and state, within the budget of the oracle."""
    x = inp.build(case)
    o, s = run(impl, x)
    for name, t in (("o", o), ("final_state", s)):
        if t is not None and not torch.isfinite(t).all():
            bad = (~torch.isfinite(t)).nonzero()[0].tolist()
            _fail(f"{name}: non-finite value at {tuple(bad)} with gates down to {inp.G_MIN}")
    gold, ref = golden_and_reference(x)
    check_result("", x, o, s, gold, ref, final_state=case.final_state)


@prop(inp.cases(max_tokens=0), examples=0.2)
def test_empty_call(impl, case):
    """T == 0 (and cu_seqlens with no tokens, or no sequence at all): o is [B, 0, HV, V] in q's
    dtype and the final state equals the initial state bit for bit (zeros without one)."""
    x = inp.build(case)
    unchanged = Unchanged(**x.tensors())
    o, s = run(impl, x)
    shape = (case.B, 0, case.HV, case.V)
    if tuple(o.shape) != shape or o.dtype != x.q.dtype:
        _fail(f"o: expected an empty {shape} {x.q.dtype} tensor, got {tuple(o.shape)} {o.dtype}")
    if not case.final_state:
        if s is not None:
            _fail(f"final_state: expected None with output_final_state=False, got {type(s).__name__}")
        return
    h0 = x.kwargs["initial_state"]
    N = len(case.lens) if case.lens is not None else case.B
    want = h0 if h0 is not None else torch.zeros((N, case.HV, case.K, case.V), device=x.q.device)
    assert_bitwise("final_state (T == 0)", s, want)
    unchanged.check()


def _bad_calls(x, case):
    """(what, make the call's (args, kwargs), exception type, regex naming the argument)."""
    a, kw = list(x.args), dict(x.kwargs)
    q, k, v, g, beta = a
    B, T, H, HV, K, V = case.B, case.T, case.H, case.HV, case.K, case.V
    dev = q.device
    h0 = kw["initial_state"]
    N = len(case.lens) if case.lens is not None else B

    with_arg, with_kw = editors(a, kw)

    def heads(h):  # q and k with h heads (v, g, beta keep HV)
        z = torch.zeros((B, T, h, K), dtype=q.dtype, device=dev)
        return lambda: ([z, z.clone(), v, g, beta], kw)

    def batch2():  # every tensor with B = 2, with cu_seqlens
        two = [t.expand(2, *t.shape[1:]) if t.shape[0] == 1 else t[:2] for t in a]
        return two, {**kw, "initial_state": None, "cu_seqlens": torch.tensor([0, T], dtype=torch.int32, device=dev)}

    def wide(KK, VV):  # head dims past the limit
        zq = torch.zeros((B, T, H, KK), dtype=q.dtype, device=dev)
        zv = torch.zeros((B, T, HV, VV), dtype=q.dtype, device=dev)
        zg = torch.zeros((B, T, HV, KK), device=dev)
        return lambda: ([zq, zq.clone(), zv, zg, beta], {**kw, "initial_state": None})

    other = torch.float16 if q.dtype != torch.float16 else torch.bfloat16
    rows = [
        ("q int32", with_arg(0, q.to(torch.int32)), TypeError, "q"),
        ("q rank 3", with_arg(0, q.reshape(B, T, H * K)), ValueError, "q"),
        ("q not a tensor", with_arg(0, q.tolist()), TypeError, "q"),
        ("k shape", with_arg(1, torch.zeros((B, T, H, K + 1), dtype=q.dtype, device=dev)), ValueError, "k"),
        ("k dtype differs from q", with_arg(1, k.to(other)), TypeError, "k"),
        ("v dtype differs from q", with_arg(2, v.to(other)), TypeError, "v"),
        ("v tokens", with_arg(2, torch.zeros((B, T + 1, HV, V), dtype=q.dtype, device=dev)), ValueError, "v"),
        ("HV % H != 0", heads(HV + 1), ValueError, "HV"),
        ("K > 256", wide(257, V), ValueError, "K"),
        ("V > 256", wide(K, 257), ValueError, "V"),
        ("g bfloat16", with_arg(3, g.to(torch.bfloat16)), TypeError, "g"),
        ("g float64", with_arg(3, g.double()), TypeError, "g"),
        ("g heads", with_arg(3, torch.zeros((B, T, HV + 1, K), device=dev)), ValueError, "g"),
        ("g width", with_arg(3, torch.zeros((B, T, HV, K + 1), device=dev)), ValueError, "g"),
        ("beta shape", with_arg(4, torch.zeros((B, T, HV, 1), device=dev)), ValueError, "beta"),
        ("beta float64", with_arg(4, beta.double()), TypeError, "beta"),
        ("scale string", with_kw(scale="0.5"), TypeError, "scale"),
        ("scale zero", with_kw(scale=0.0), ValueError, "scale"),
        ("scale nan", with_kw(scale=float("nan")), ValueError, "scale"),
        ("scale bool", with_kw(scale=True), TypeError, "scale"),
        ("initial_state float16", with_kw(initial_state=torch.zeros((N, HV, K, V), dtype=torch.float16, device=dev)),
         TypeError, "initial_state"),
        ("initial_state count", with_kw(initial_state=torch.zeros((N + 1, HV, K, V), device=dev)), ValueError, "initial_state"),
        ("initial_state shape", with_kw(initial_state=torch.zeros((N, HV, V, K + 1), device=dev)),
         ValueError, "initial_state"),
        ("output_final_state int", with_kw(output_final_state=1), TypeError, "output_final_state"),
        ("use_qk_l2norm string", with_kw(use_qk_l2norm="yes"), TypeError, "use_qk_l2norm"),
        ("cu_seqlens float", with_kw(cu_seqlens=torch.zeros(2, device=dev), initial_state=None), TypeError, "cu_seqlens"),
        ("cu_seqlens rank 2", with_kw(cu_seqlens=torch.zeros((1, 2), dtype=torch.int32, device=dev), initial_state=None),
         ValueError, "cu_seqlens"),
        ("cu_seqlens with B = 2", batch2, ValueError, "batch|B="),
    ]
    if h0 is not None:
        rows.append(("initial_state float64", with_kw(initial_state=h0.double()), TypeError, "initial_state"))
    if dev.type == "cuda":
        rows.append(("v on the CPU", with_arg(2, v.cpu()), ValueError, "v"))
        rows.append(("initial_state on the CPU", with_kw(initial_state=torch.zeros((N, HV, K, V))), ValueError,
                     "initial_state"))
    return rows


@prop(inp.cases(min_tokens=1), examples=0.08)
def test_bad_input_rejected(impl, case):
    """Each bad call of the table raises ValueError/TypeError naming the argument, before anything
    is written: no input changes (outputs are fresh tensors, so inputs are all a call could touch)."""
    x = inp.build(case)
    unchanged = Unchanged(**x.tensors())
    with poison_allocations():
        check_bad_calls(impl, _bad_calls(x, case))
    unchanged.check()


@settings(max_examples=5)
@given(case=inp.cases(min_tokens=1))
def test_oracle_rejects_bad_input(case):
    """The oracle validates as strictly as the kernels: the same table raises the same errors."""
    check_bad_calls(oracle, _bad_calls(inp.build(case), case))
