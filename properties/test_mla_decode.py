"""Properties of mla_decode (SPEC.md section 2), for every registered implementation.

The padded-replica property also reaches an implementation's internal padded path where it has
one (the production kernel's `mla_decode_padded`, or a `padded` attribute of the function);
any other implementation is judged on the public contract only.
"""
import importlib

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from oracles.mla_decode import mla_decode as oracle
from properties import builders
from properties.bad_input import check_bad_calls, editors
from properties.compare import _fail, assert_agree, assert_bitwise, assert_close
from properties.guard import Unchanged, poison_allocations
from properties.harness import prop
from properties.inputs import mla_decode as inp

OP = "mla_decode"


def run(impl, x, *args, **changes):
    """Call with poisoned allocations (an unwritten output element is NaN); returns (o, lse or
    None), checking that the result is a tuple exactly when return_lse is set."""
    with poison_allocations():
        out = x.call(impl, *args, **changes)
    want_lse = changes.get("return_lse", x.kwargs["return_lse"])
    if want_lse:
        if not (isinstance(out, tuple) and len(out) == 2):
            _fail(f"return_lse=True: expected a tuple (o, lse), got {type(out).__name__}")
        return out
    if not isinstance(out, torch.Tensor):
        _fail(f"return_lse=False: expected the tensor o, got {type(out).__name__}")
    return out, None


def golden_and_reference(x, *args, **changes):
    """The oracle's (o, lse) in float64 and in float32 on the same inputs."""
    changes = {**changes, "return_lse": True}
    return (x.call(oracle, *args, **changes, compute_dtype=torch.float64),
            x.call(oracle, *args, **changes, compute_dtype=torch.float32))


def check_shapes(what, x, o, lse):
    B, H = x.q.shape[:2]
    L = x.kwargs["kv_lora_rank"]
    if o.dtype != x.q.dtype or tuple(o.shape) != (B, H, L):
        _fail(f"{what}o: expected [{B}, {H}, {L}] {x.q.dtype}, got {list(o.shape)} {o.dtype}")
    if lse is not None and (lse.dtype != torch.float32 or tuple(lse.shape) != (B, H)):
        _fail(f"{what}lse: expected [{B}, {H}] float32, got {list(lse.shape)} {lse.dtype}")


def check_result(what, x, o, lse, gold, ref):
    """o within the budget in q's dtype, lse (when returned) within the budget in float32."""
    check_shapes(what, x, o, lse)
    assert_close(f"{what}o", o, gold[0], ref[0], x.q.dtype)
    if lse is not None:
        assert_close(f"{what}lse", lse, gold[1], ref[1], torch.float32)


@prop(inp.cases(), examples=3.0)
def test_equivalence(impl, case):
    """o and lse equal the float64 oracle within the budget, over head counts that pad, mask or
    neither, L and P (0 included), page sizes, kv lengths from 0 up, spare and shared pages, bf16,
    fp16 and fp8 caches with kv_scale, sm_scale, every split count and strided views; no input
    changes."""
    x = inp.build(case)
    unchanged = Unchanged(**x.tensors())
    o, lse = run(impl, x)
    gold, ref = golden_and_reference(x)
    check_result("", x, o, lse, gold, ref)
    unchanged.check()


@prop(inp.cases(divides=True, splits="int", min_batch=1), examples=0.5)
def test_pad_equals_mask(impl, case):
    """For H dividing 16 and the same num_kv_splits, head_padding "pad", "mask" and "auto" give
    bit-identical o and lse (SPEC.md: the padded and masked head tiles compute each row alike)."""
    x = inp.build(case)
    outs = {hp: run(impl, x, head_padding=hp, return_lse=True) for hp in ("pad", "mask", "auto")}
    check_shapes("pad: ", x, *outs["pad"])
    for hp in ("mask", "auto"):
        assert_bitwise(f"o ({hp} vs pad)", outs[hp][0], outs["pad"][0])
        assert_bitwise(f"lse ({hp} vs pad)", outs[hp][1], outs["pad"][1])


def padded_entry(impl):
    """The implementation's internal padded path (returns the 16-row o and lse before the
    replicas are dropped), or None: a `padded` attribute of its function (mutants), else for the
    production kernel its module's `mla_decode_padded`."""
    fn = getattr(impl.fn, "padded", None)
    if fn is None and impl.kind == "production":
        fn = getattr(importlib.import_module(impl.fn.__module__), "mla_decode_padded", None)
    return fn


@prop(inp.cases(divides=True, min_batch=1).filter(lambda c: c.H < inp.HEAD_TILE), examples=0.4)
def test_padded_replicas_identical(impl, case):
    """Through the internal padded path: padded row h * (16 // H) + r, for every r, is bit-identical
    to head h of the public o and lse (every replica of a head is computed alike before it is
    dropped, and the public result keeps one of them, for o and lse both). Implementations without
    a padded path pass vacuously (they are judged on the public contract)."""
    padded = padded_entry(impl)
    if padded is None:
        if impl.kind == "production":
            _fail("the production kernel's module has no mla_decode_padded: the padded path is untested")
        return
    x = inp.build(case)
    with poison_allocations():
        o_pad, lse_pad = x.call(padded, head_padding="pad", return_lse=True)
    o, lse = run(impl, x, head_padding="pad", return_lse=True)
    B, H, L = case.B, case.H, case.L
    if tuple(o_pad.shape) != (B, inp.HEAD_TILE, L) or tuple(lse_pad.shape) != (B, inp.HEAD_TILE):
        _fail(f"padded path: expected o [{B}, 16, {L}] and lse [{B}, 16], got {list(o_pad.shape)}, {list(lse_pad.shape)}")
    rep = inp.HEAD_TILE // H
    for r in range(rep):
        assert_bitwise(f"o: padded rows h * {rep} + {r} vs public o", o_pad[:, r::rep], o)
        assert_bitwise(f"lse: padded rows h * {rep} + {r} vs public lse", lse_pad[:, r::rep], lse)


@prop(inp.cases(splits="many", min_batch=1), examples=0.6)
def test_split_invariance(impl, case):
    """num_kv_splits = S (2..64, more splits than tokens included) and 1 give o and lse that agree
    within twice the budget of the oracle on these inputs (each within the budget of golden)."""
    x = inp.build(case)
    o1, l1 = run(impl, x, num_kv_splits=1, return_lse=True)
    o_s, l_s = run(impl, x, return_lse=True)
    check_shapes("", x, o_s, l_s)
    gold, ref = golden_and_reference(x)
    S = case.num_kv_splits
    assert_agree(f"o ({S} splits vs 1)", o_s, o1, gold[0], ref[0], x.q.dtype)
    assert_agree(f"lse ({S} splits vs 1)", l_s, l1, gold[1], ref[1], torch.float32)


def permuted_pages(x, case):
    """The same call with every page moved to another place of the pool (page p to perm[p]) and
    the page ids renamed to match."""
    N = x.values.shape[0]
    perm = torch.randperm(N, generator=builders.generator(case.seed + 1))
    values = torch.empty_like(x.values)
    values[perm] = x.values
    read = torch.zeros_like(x.read)
    read[perm] = x.read
    ids = perm[x.kv_indices.long().cpu()].tolist()
    indices = inp.index_tensor(ids, inp.index_dtypes(case)[1], case.layout, x.kv_indices.device)
    return x.with_cache(values, read=read, kv_indices=indices)


@prop(inp.cases(min_batch=1).filter(lambda c: sum(c.lens) > 0), examples=0.5)
def test_page_placement(impl, case):
    """Permuting the pool's pages and renaming the page ids to match gives bit-identical o and lse:
    only the page table decides which page holds a token."""
    x = inp.build(case)
    y = permuted_pages(x, case)
    o, lse = run(impl, x, return_lse=True)
    o2, lse2 = run(impl, y, return_lse=True)
    assert_bitwise("o (pages permuted)", o2, o)
    assert_bitwise("lse (pages permuted)", lse2, lse)


@prop(inp.cases(min_batch=1).filter(lambda c: c.H >= 2), examples=0.5)
def test_head_permutation(impl, case):
    """Permuting q's heads permutes o and lse the same way, bit-exact (the heads share the cache
    and nothing else; a padded head's replicas come from that head whichever it is)."""
    x = inp.build(case)
    sigma = torch.randperm(case.H, generator=builders.generator(case.seed + 1))
    o, lse = run(impl, x, return_lse=True)
    o2, lse2 = run(impl, x, x.q[:, sigma.to(x.q.device)], *x.args[1:], return_lse=True)
    assert_bitwise("o (heads permuted)", o2, o[:, sigma.to(o.device)])
    assert_bitwise("lse (heads permuted)", lse2, lse[:, sigma.to(lse.device)])


POISONED = st.builds(lambda c, kind: c.replace(poison=kind), inp.cases(min_batch=1), st.sampled_from(["nan", "huge"]))


@prop(POISONED, examples=0.6)
def test_unread_slots_poisoned(impl, case):
    """Tokens at or beyond kv_lens in a sequence's last pages, its spare pages, unreferenced pool
    pages and the gaps of a strided cache filled with NaN or the dtype's largest value change
    nothing: o and lse bit-identical to the clean cache."""
    x = inp.build(case)
    y = x.with_cache(x.values, fill=inp.poison_value(case.poison, x.values.dtype))
    o, lse = run(impl, x, return_lse=True)
    o2, lse2 = run(impl, y, return_lse=True)
    assert_bitwise(f"o ({case.poison} in unread slots)", o2, o)
    assert_bitwise(f"lse ({case.poison} in unread slots)", lse2, lse)


@prop(inp.cases(zero_lens=True, min_batch=1), examples=0.4)
def test_empty_sequences(impl, case):
    """A sequence with kv_lens 0 gets o = 0 and lse = -inf (never NaN), whatever the split count,
    also when every sequence is empty and the page table holds no page; the others stay finite."""
    x = inp.build(case)
    o, lse = run(impl, x, return_lse=True)
    check_shapes("", x, o, lse)
    for b, n in enumerate(case.lens):
        if n == 0:
            if not bool((o[b] == 0).all()):
                _fail(f"o[{b}]: kv_lens 0 must give zeros, got {o[b].flatten()[:4].tolist()}...")
            if not bool((lse[b] == float("-inf")).all()):
                _fail(f"lse[{b}]: kv_lens 0 must give -inf, got {lse[b][:4].tolist()}...")
        elif not (bool(torch.isfinite(o[b]).all()) and bool(torch.isfinite(lse[b]).all())):
            _fail(f"sequence {b} (kv_lens {n}): non-finite o or lse next to an empty sequence")


def _bad_calls(x, case):
    """(what, make the call's (args, kwargs), exception type, regex naming the argument)."""
    a, kw = list(x.args), dict(x.kwargs)
    q, kv, indptr, indices, lens = a
    B, H, D = q.shape
    L = case.L
    dev = q.device

    with_arg, with_kw = editors(a, kw)

    def dims(d):  # q and kv_cache with last dim d
        zq = torch.zeros((B, H, d), dtype=q.dtype, device=dev)
        zc = torch.zeros((kv.shape[0], kv.shape[1], d), dtype=kv.dtype, device=dev)
        return lambda: ([zq, zc, indptr, indices, lens], kw)

    def heads(h, **changes):
        zq = torch.zeros((B, h, D), dtype=q.dtype, device=dev)
        return lambda: ([zq, kv, indptr, indices, lens], {**kw, **changes})

    other = torch.float16 if q.dtype == torch.bfloat16 else torch.bfloat16
    rows = [
        ("q int32", with_arg(0, q.to(torch.int32)), TypeError, "q"),
        ("q float32", with_arg(0, q.float()), TypeError, "q"),
        ("q rank 2", with_arg(0, q.reshape(B * H, D)), ValueError, "q"),
        ("q not a tensor", with_arg(0, q.tolist()), TypeError, "q"),
        ("P odd", dims(D + 1), ValueError, "q|kv_lora_rank"),
        ("P > 128", dims(L + 130), ValueError, "q|kv_lora_rank"),
        ("P negative", with_kw(kv_lora_rank=D + 16 - D % 16), ValueError, "q|kv_lora_rank"),
        ("kv_lora_rank not a multiple of 16", with_kw(kv_lora_rank=L + 8), ValueError, "kv_lora_rank"),
        ("kv_lora_rank zero", with_kw(kv_lora_rank=0), ValueError, "kv_lora_rank"),
        ("kv_lora_rank > 1024", with_kw(kv_lora_rank=1040), ValueError, "kv_lora_rank"),
        ("kv_lora_rank float", with_kw(kv_lora_rank=float(L)), TypeError, "kv_lora_rank"),
        ("kv_cache int8", with_arg(1, torch.zeros(kv.shape, dtype=torch.int8, device=dev)), TypeError, "kv_cache"),
        ("kv_cache float32", with_arg(1, torch.zeros(kv.shape, device=dev)), TypeError, "kv_cache"),
        ("kv_cache other half dtype", with_arg(1, torch.zeros(kv.shape, dtype=other, device=dev)), TypeError, "kv_cache"),
        ("kv_cache rank 4", with_arg(1, kv.unsqueeze(2)), ValueError, "kv_cache"),
        ("kv_cache width", with_arg(1, torch.zeros((kv.shape[0], kv.shape[1], D + 2), dtype=kv.dtype, device=dev)),
         ValueError, "kv_cache"),
        ("kv_cache page_size 0", with_arg(1, torch.zeros((kv.shape[0], 0, D), dtype=kv.dtype, device=dev)),
         ValueError, "kv_cache"),
        ("kv_indptr length", with_arg(2, torch.zeros(B + 2, dtype=torch.int32, device=dev)), ValueError, "kv_indptr"),
        ("kv_indptr float", with_arg(2, indptr.float()), TypeError, "kv_indptr"),
        ("kv_indices rank 2", with_arg(3, indices.reshape(1, -1)), ValueError, "kv_indices"),
        ("kv_indices int16", with_arg(3, indices.to(torch.int16)), TypeError, "kv_indices"),
        ("kv_lens length", with_arg(4, torch.zeros(B + 1, dtype=torch.int32, device=dev)), ValueError, "kv_lens"),
        ("kv_lens float", with_arg(4, lens.float()), TypeError, "kv_lens"),
        ("sm_scale string", with_kw(sm_scale="0.1"), TypeError, "sm_scale"),
        ("sm_scale bool", with_kw(sm_scale=True), TypeError, "sm_scale"),
        ("sm_scale nan", with_kw(sm_scale=float("nan")), ValueError, "sm_scale"),
        ("sm_scale inf", with_kw(sm_scale=float("inf")), ValueError, "sm_scale"),
        ("kv_scale float64", with_kw(kv_scale=torch.ones(1, dtype=torch.float64, device=dev)), TypeError, "kv_scale"),
        ("kv_scale two elements", with_kw(kv_scale=torch.ones(2, device=dev)), ValueError, "kv_scale"),
        ("kv_scale shape [1, 1]", with_kw(kv_scale=torch.ones((1, 1), device=dev)), ValueError, "kv_scale"),
        ("num_kv_splits 0", with_kw(num_kv_splits=0), ValueError, "num_kv_splits"),
        ("num_kv_splits 65", with_kw(num_kv_splits=65), ValueError, "num_kv_splits"),
        ("num_kv_splits float", with_kw(num_kv_splits=2.0), TypeError, "num_kv_splits"),
        ("head_padding unknown", with_kw(head_padding="repeat"), ValueError, "head_padding"),
        ("head_padding pad with H = 3", heads(3, head_padding="pad"), ValueError, "head_padding"),
        ("head_padding pad with H = 32", heads(32, head_padding="pad"), ValueError, "head_padding"),
        ("return_lse int", with_kw(return_lse=1), TypeError, "return_lse"),
        ("return_lse string", with_kw(return_lse="yes"), TypeError, "return_lse"),
    ]
    if dev.type == "cuda":
        rows.append(("kv_lens on the CPU", with_arg(4, lens.cpu()), ValueError, "kv_lens"))
        rows.append(("kv_scale on the CPU", with_kw(kv_scale=torch.ones(1)), ValueError, "kv_scale"))
    return rows


@prop(inp.cases(min_batch=1), examples=0.2)
def test_bad_input_rejected(impl, case):
    """Each bad call of the table raises ValueError/TypeError naming the argument, before anything
    is written: no input changes (the outputs are fresh tensors)."""
    x = inp.build(case)
    unchanged = Unchanged(**x.tensors())
    with poison_allocations():
        check_bad_calls(impl, _bad_calls(x, case))
    unchanged.check()


def _oracle_only_bad_calls(x, case):
    """Preconditions the kernels trust (SPEC.md: not checked on the device) but the oracle, which
    reads the page table anyway, rejects: kv_lens beyond the sequence's pages."""
    lens = x.kv_lens.clone()
    b = int(torch.randint(0, case.B, (1,), generator=builders.generator(case.seed)))
    npages = int(x.kv_indptr[b + 1]) - int(x.kv_indptr[b])
    lens[b] = npages * case.page_size + 1
    return [("kv_lens beyond its pages", lambda: ([x.q, x.kv_cache, x.kv_indptr, x.kv_indices, lens], x.kwargs),
             ValueError, "kv_lens")]


@settings(max_examples=5)
@given(case=inp.cases(min_batch=1))
def test_oracle_rejects_bad_input(case):
    """The oracle validates as strictly as the kernels: the same table raises the same errors; it
    also rejects a page table too short for kv_lens."""
    x = inp.build(case)
    check_bad_calls(oracle, _bad_calls(x, case) + _oracle_only_bad_calls(x, case))
