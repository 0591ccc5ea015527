"""Properties as plain functions of (impl, case), run by hypothesis, replayed from JSON.

A case is a `Case`: a dict of plain scalars (ints, floats, strings, bools, None) plus an integer
seed, so a shrunk failure is a handful of values that survive hypothesis upgrades. Tensors are
built from the case by properties/inputs/<op>.py.

`prop(strategy)` turns `def test_x(impl, case)` into a hypothesis test over `strategy`. The same
body is reachable as `test_x.kf_body` for the regression corpus and for `--case` replays. While a
body runs, the current (op, property, impl, case) is known here, so every failure message can end
with the one-line command that reproduces it, and a campaign can keep the shrunk case.
"""
import contextlib
import contextvars
import json
import os
import shlex

from hypothesis import given, settings

REPRO_COMMAND = os.environ.get("KERNELFUZZ_REPRO_COMMAND", "./ci/test")
_current = contextvars.ContextVar("kernelfuzz_case", default=None)
last_repro = None  # the repro line of the last failing case in this process (read by conftest)


class Case(dict):
    """A drawn case: plain JSON values with attribute access."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None

    def replace(self, **changes) -> "Case":
        return Case({**self, **changes})

    def to_json(self) -> str:
        return json.dumps(self, sort_keys=True, separators=(",", ":"))


def nodeid(module: str, prop: str, impl: str) -> str:
    return f"properties/{module}.py::{prop}[{impl}]"


def repro_line() -> str:
    cur = _current.get()
    if cur is None:
        return "(not inside a property: rerun the failing test id shown above)"
    module, prop, impl, case = cur
    line = f"{REPRO_COMMAND} '{nodeid(module, prop, impl.name)}' --case {shlex.quote(case.to_json())}"
    kind = getattr(impl, "kind", "production")
    if kind != "production":  # the implementation must be added again to be selected
        line += f" --impl {impl.op}={impl.name if kind == 'mutant' else impl.target}"
    return line


class DeviceFault(BaseException):
    """A kernel left the GPU context unusable (an illegal address, a launch failure, ...).

    Every later CUDA call in the process fails too, so hypothesis must not go on "shrinking" (its
    minimal case would be whatever ran last in a dead context): as a BaseException this stops it
    at once, with the case that faulted. conftest.py then ends the process so that pytest-xdist
    replaces the worker with a fresh context."""


_FAULTS = ("illegal memory access", "illegal address", "unspecified launch failure",
           "misaligned address", "illegal instruction", "device-side assert")


def is_device_fault(exc: BaseException) -> bool:
    """True for the CUDA errors that poison the context (reported by torch or by Triton)."""
    text = f"{type(exc).__name__}: {exc}"
    return "CUDA" in text and any(s in text for s in _FAULTS)


@contextlib.contextmanager
def running(module: str, prop: str, impl, case: Case):
    token = _current.set((module, prop, impl, case))
    try:
        yield
    except DeviceFault:
        raise
    except BaseException as e:
        global last_repro
        last_repro = repro_line()
        _record_failure(module, prop, impl, case, e)
        if is_device_fault(e):
            raise DeviceFault(f"{type(e).__name__}: {str(e).strip().splitlines()[0]}\n"
                              f"  the GPU context is lost; reproduce: {last_repro}") from e
        if hasattr(e, "add_note") and "reproduce:" not in str(e):
            e.add_note("reproduce: " + last_repro)
        raise
    finally:
        _current.reset(token)


def run_case(body, impl, case: Case) -> None:
    module = body.__module__.rpartition(".")[2]
    with running(module, body.__name__, impl, Case(case)):
        body(impl, Case(case))


def _record_failure(module, prop, impl, case, exc) -> None:
    """Keep the last failing case of each (property, impl): after shrinking, hypothesis replays
    the minimal example last, so that is what stays. The campaign turns these into regressions."""
    folder = os.environ.get("KERNELFUZZ_FAILURES")
    if not folder or getattr(impl, "kind", None) == "mutant":
        return
    os.makedirs(folder, exist_ok=True)
    entry = {"op": module.removeprefix("test_"), "property": prop, "impl": impl.name, "case": case,
             "error": (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]}
    with open(os.path.join(folder, f"{module}.{prop}.{impl.name}.json"), "w") as f:
        json.dump(entry, f, sort_keys=True)


def prop(strategy, *, examples: float = 1.0):
    """Decorator: a property `body(impl, case)` becomes a hypothesis test drawing case from
    `strategy`. `examples` scales the loaded profile's max_examples for this property."""
    def decorate(body):
        def test(impl, case):
            run_case(body, impl, case)

        test.__name__ = body.__name__
        test.__qualname__ = body.__qualname__
        test.__module__ = body.__module__
        test.__doc__ = body.__doc__
        n = max(2, round(settings.default.max_examples * examples))
        wrapped = settings(max_examples=n)(given(case=strategy)(test))
        wrapped.kf_body = body
        wrapped.kf_strategy = strategy
        return wrapped
    return decorate
