"""Implementation registry: properties receive an op's implementation from here, never by import.

Every implementation of an op follows that op's contract (SPEC.md). Kinds:
- "production": our kernels (kernels/), run by every property;
- "external": added on the command line with `--impl OP=module:function` (another library's
  kernel), run beside production;
- "mutant": a deliberately broken implementation (properties/mutants/), run only by the mutant
  gate, which requires each property it names in `kills` to fail on it.
Implementations are named by "module:function" strings and imported on first call, so building
the registry imports no kernel (and no triton) before the backend is configured.
"""
import importlib
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

KINDS = ("production", "external", "mutant")


@dataclass
class Impl:
    op: str
    name: str
    target: str                   # "module:function"
    kind: str = "production"
    kills: Tuple[str, ...] = ()   # mutants: properties that must fail on it
    why: str = ""                 # mutants: the planted bug, one line
    _fn: Optional[Callable] = field(default=None, repr=False)

    @property
    def fn(self) -> Callable:
        if self._fn is None:
            module, _, attr = self.target.partition(":")
            if not module or not attr:
                raise ValueError(f"implementation {self.name}: expected 'module:function', got {self.target!r}")
            self._fn = getattr(importlib.import_module(module), attr)
        return self._fn

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


_REGISTRY: Dict[str, Dict[str, Impl]] = {}


def register(op: str, name: str, target: str, *, kind: str = "production", kills=(), why: str = "") -> Impl:
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
    impls = _REGISTRY.setdefault(op, {})
    if name in impls and impls[name].target != target:
        raise ValueError(f"implementation {op}/{name} is already registered as {impls[name].target}")
    impls[name] = Impl(op, name, target, kind, tuple(kills), why)
    return impls[name]


def add_from_option(spec: str) -> Impl:
    """Register `OP=module:function` (the --impl option) as an external implementation."""
    op, eq, target = spec.partition("=")
    if not eq or ":" not in target:
        raise ValueError(f"--impl: expected OP=module:function, got {spec!r}")
    name = target.replace(":", ".")
    return register(op, name, target, kind="external")


def implementations(op: str, kinds=("production", "external")) -> list:
    _load_builtin()
    return [i for i in _REGISTRY.get(op, {}).values() if i.kind in kinds]


def get(op: str, name: str) -> Impl:
    _load_builtin()
    try:
        return _REGISTRY[op][name]
    except KeyError:
        known = sorted(_REGISTRY.get(op, {}))
        raise ValueError(f"implementation: expected one of {known} for {op}, got {name!r}") from None


def ops() -> list:
    _load_builtin()
    return sorted(_REGISTRY)


_loaded = False


def _load_builtin() -> None:
    """Production kernels and the mutants, registered by name (nothing imported yet)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    from properties import impls  # noqa: F401  (registers as a side effect of the call below)
    impls.register_all()
