"""The one error budget (SPEC.md), used by every property; and bit-exact comparison.

For an output tensor with golden (float64 oracle) result G, working-precision reference F
(the oracle in float32 on the same rounded inputs) and kernel result K:

    max|K - G| <= 2 * (max|F - G| + eps(out_dtype) * max|G|)

fp8 outputs are compared as stored values upcast to float64 (dequantised by the caller when a
scale applies) with eps = 2**-3. Where G is finite, a non-finite K always fails; where G is not
finite (an lse of -inf), K must hold the same value. Failures name the worst element, its index,
the error, the budget and the line that reproduces the case.

With KERNELFUZZ_MARGINS=DIR every comparison also appends its worst error over its budget to
DIR/margins-<pid>.tsv (ratio, name, error, budget, reproduction line): how close the passing
cases come, so that a campaign shows the draws that nearly fail, each replayable.
"""
import math
import os

import torch

from properties import harness

FP8_EPS = 2.0 ** -3
MARGINS_ENV = "KERNELFUZZ_MARGINS"


def eps_of(dtype: torch.dtype) -> float:
    if dtype in (torch.float8_e4m3fn,):
        return FP8_EPS
    return torch.finfo(dtype).eps


def _index(flat_index: int, shape) -> tuple:
    out = []
    for n in reversed(tuple(shape)):
        out.append(flat_index % n if n else 0)
        flat_index //= max(n, 1)
    return tuple(reversed(out))


def _fail(msg: str) -> None:
    raise AssertionError(msg + "\n  reproduce: " + harness.repro_line())


def _log_margin(name: str, worst: float, budget: float) -> None:
    """Append one comparison's worst error over its budget to the margins log, if one is asked for."""
    out_dir = os.environ.get(MARGINS_ENV)
    if not out_dir:
        return
    os.makedirs(out_dir, exist_ok=True)
    ratio = worst / budget if budget > 0 else (0.0 if worst == 0 else math.inf)
    with open(os.path.join(out_dir, f"margins-{os.getpid()}.tsv"), "a") as fh:
        fh.write(f"{ratio:.4g}\t{name}\t{worst:.4g}\t{budget:.4g}\t{harness.repro_line()}\n")


def budget_of(golden: torch.Tensor, reference: torch.Tensor, out_dtype: torch.dtype):
    """(budget, reference error, max|golden|) over the elements where golden is finite."""
    g = golden.detach().to(torch.float64).cpu()
    r = reference.detach().to(torch.float64).cpu()
    finite = torch.isfinite(g)
    if not finite.any():
        return 0.0, 0.0, 0.0
    ref_err = (r[finite] - g[finite]).abs().max().item()
    if not math.isfinite(ref_err):
        ref_err = math.inf
    gmax = g[finite].abs().max().item()
    return 2.0 * (ref_err + eps_of(out_dtype) * gmax), ref_err, gmax


def assert_close(name: str, actual: torch.Tensor, golden: torch.Tensor, reference: torch.Tensor,
                 out_dtype: torch.dtype = None) -> None:
    """Check `actual` against the budget set by `golden` and `reference` (same shapes)."""
    out_dtype = out_dtype or actual.dtype
    if tuple(actual.shape) != tuple(golden.shape) or tuple(reference.shape) != tuple(golden.shape):
        _fail(f"{name}: shape {tuple(actual.shape)}, golden {tuple(golden.shape)}, "
              f"reference {tuple(reference.shape)} differ")
    if actual.numel() == 0:
        return
    a = actual.detach().to(torch.float64).cpu()
    g = golden.detach().to(torch.float64).cpu()
    r = reference.detach().to(torch.float64).cpu()
    finite = torch.isfinite(g)
    # non-finite golden values (e.g. lse = -inf) must be reproduced exactly
    special = ~finite & ~((a == g) | (torch.isnan(a) & torch.isnan(g)))
    if special.any():
        i = int(special.flatten().nonzero()[0])
        _fail(f"{name}: golden is {g.flatten()[i].item()} at index {_index(i, g.shape)}, "
              f"kernel gives {a.flatten()[i].item()}")
    budget, ref_err, gmax = budget_of(g, r, out_dtype)
    err = torch.where(finite, (a - g).abs(), torch.zeros_like(g))
    err = torch.where(finite & ~torch.isfinite(a), torch.full_like(g, math.inf), err)
    i = int(err.flatten().argmax())
    worst = err.flatten()[i].item()
    _log_margin(name, worst, budget)
    if not worst <= budget:
        _fail(f"{name}: error {worst:.4g} at index {_index(i, g.shape)} exceeds the budget {budget:.4g} "
              f"(kernel {a.flatten()[i].item():.6g}, golden {g.flatten()[i].item():.6g}, "
              f"float32 reference {r.flatten()[i].item():.6g}; budget = 2 * (reference error "
              f"{ref_err:.3g} + eps({str(out_dtype).replace('torch.', '')}) {eps_of(out_dtype):.3g} "
              f"* max|golden| {gmax:.4g}); shape {tuple(g.shape)}")


def _bits(x: torch.Tensor) -> torch.Tensor:
    x = x.detach().contiguous()
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]
    return x.view(ints)


def equal_bits(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise: same bits, or both NaN (payloads aside)."""
    same = _bits(a) == _bits(b.to(a.device))
    if a.dtype.is_floating_point:
        same |= torch.isnan(a.detach().float()) & torch.isnan(b.detach().to(a.device).float())
    return same


def assert_bitwise(name: str, actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal bits everywhere (NaN payloads aside), same shape and dtype."""
    if actual.dtype != expected.dtype or tuple(actual.shape) != tuple(expected.shape):
        _fail(f"{name}: {actual.dtype} {tuple(actual.shape)} vs {expected.dtype} {tuple(expected.shape)}")
    same = equal_bits(actual, expected)
    if not same.all():
        bad = (~same).flatten().nonzero().flatten()
        i = int(bad[0])
        _fail(f"{name}: not bit-exact: {bad.numel()} of {same.numel()} elements differ; first at index "
              f"{_index(i, actual.shape)}: {actual.flatten()[i].item()!r} vs {expected.flatten()[i].item()!r}")


def assert_agree(name, a, b, golden, reference, out_dtype):
    """Two results of the same computation (two kernels, or one kernel two ways) agree:
    max|a - b| <= 2 * budget where golden is finite. Each may sit anywhere within the one budget of
    the golden result, so two correct results differ by at most twice it (|a - b| <= |a - G| +
    |G - b|); where golden is not finite (an lse of -inf) both hold it exactly."""
    g = golden.detach().double().cpu()
    a64, b64 = a.detach().double().cpu(), b.detach().double().cpu()
    fin = torch.isfinite(g)
    for label, t in (("first", a64), ("second", b64)):
        if not torch.equal(t[~fin], g[~fin]):
            _fail(f"{name}: the {label} result does not hold golden's non-finite values ({g[~fin][:4].tolist()})")
    if not fin.any():
        return
    budget, ref_err, gmax = budget_of(golden, reference, out_dtype)
    err = (a64 - b64).abs()
    err = torch.where(fin, torch.where(torch.isnan(err), torch.full_like(err, float("inf")), err), torch.zeros_like(err))
    worst = err.max().item()
    if not worst <= 2 * budget:
        i = int(err.flatten().argmax())
        _fail(f"{name}: the two differ by {worst:.4g} at index {_index(i, g.shape)} ({a64.flatten()[i].item():.6g} vs "
              f"{b64.flatten()[i].item():.6g}), more than twice the budget {budget:.4g} (= 2 * (reference "
              f"error {ref_err:.3g} + eps {eps_of(out_dtype):.3g} * max|golden| {gmax:.4g}))")
