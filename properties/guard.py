"""Poison and guard: outputs start as NaN; buffers a kernel must not touch sit between guard bands
and are compared bit-exact after the call; inputs are checked unchanged.
"""
from typing import Optional, Sequence

import torch

from properties.compare import _fail, equal_bits


def poisoned(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """A tensor full of NaN (floats) or of the largest value (integers)."""
    if dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.full(shape, torch.iinfo(dtype).max, dtype=dtype, device=device)


def random_bits(numel: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """`numel` elements of random bit patterns (NaN and inf included): a sentinel no kernel writes."""
    raw = torch.randint(0, 256, (numel * torch.empty((), dtype=dtype).element_size(),),
                        dtype=torch.uint8, generator=gen)
    return raw.view(dtype)


class Guarded:
    """A strided view inside a larger buffer filled with a sentinel pattern.

    `tensor` is the view the kernel sees; `guard` elements of the buffer before and after it, and
    any gaps its strides leave, belong to nobody. `check(allowed)` compares every element of the
    buffer bit-exact with its state at creation, except those of `tensor` where `allowed` is True.
    """

    def __init__(self, shape: Sequence[int], dtype: torch.dtype, device, gen: torch.Generator, *,
                 strides: Optional[Sequence[int]] = None, guard: int = 64,
                 fill: Optional[torch.Tensor] = None):
        shape = tuple(int(n) for n in shape)
        if strides is None:
            strides, acc = [], 1
            for n in reversed(shape):
                strides.append(acc)
                acc *= max(n, 1)
            strides = tuple(reversed(strides))
        span = 1 + sum((n - 1) * s for n, s in zip(shape, strides)) if all(shape) else 0
        self.guard = guard
        self.buffer = random_bits(span + 2 * guard, dtype, gen).to(device)
        self.tensor = self.buffer.as_strided(shape, tuple(strides), guard)
        if fill is not None:
            self.tensor.copy_(fill)
        self.before = self.buffer.clone()
        self._strides = tuple(strides)

    def check(self, name: str, allowed: Optional[torch.Tensor] = None) -> None:
        """Every element outside `allowed` (a bool mask broadcastable to `tensor`) is unchanged."""
        free = torch.zeros(self.buffer.numel(), dtype=torch.bool, device=self.buffer.device)
        if allowed is not None:
            view = free.as_strided(self.tensor.shape, self._strides, self.guard)
            view[allowed.to(free.device).expand(self.tensor.shape)] = True
        same = equal_bits(self.buffer, self.before)
        bad = ~same & ~free
        if bad.any():
            i = int(bad.nonzero()[0])
            where = "guard band before" if i < self.guard else (
                "guard band after" if i >= self.buffer.numel() - self.guard else "buffer")
            at = ""
            if where == "buffer":
                marker = torch.zeros(self.buffer.numel(), dtype=torch.bool)
                marker[i] = True
                inside = marker.as_strided(self.tensor.shape, self._strides, self.guard).nonzero()
                at = f" (element {tuple(inside[0].tolist())} of the view)" if inside.numel() else " (a gap between strides)"
            _fail(f"{name}: {int(bad.sum())} element(s) changed that must not be; first at buffer offset "
                  f"{i} in the {where}{at}: {self.before[i].float().item()!r} -> {self.buffer[i].float().item()!r}")


class Unchanged:
    """Snapshot inputs; `check()` fails if any changed (bit-exact)."""

    def __init__(self, **tensors):
        self.tensors = {k: (v, v.clone()) for k, v in tensors.items() if isinstance(v, torch.Tensor)}

    def check(self) -> None:
        for name, (now, then) in self.tensors.items():
            if not equal_bits(now, then).all():
                _fail(f"input {name} was modified by the call")


_ORIGINAL = {}


def _poisoning(alloc):
    def wrapper(*args, **kwargs):
        out = alloc(*args, **kwargs)
        if out.dtype.is_floating_point:
            out.fill_(float("nan"))
        elif out.dtype != torch.bool:
            out.fill_(torch.iinfo(out.dtype).max)
        return out
    return wrapper


class poison_allocations:
    """Context manager: inside it, torch.empty / empty_like / empty_strided return NaN-filled
    tensors (largest value for integers), so an output element a kernel forgets to write shows up,
    whatever implementation allocates it."""

    NAMES = ("empty", "empty_like", "empty_strided")

    def __enter__(self):
        for name in self.NAMES:
            _ORIGINAL.setdefault(name, getattr(torch, name))
            setattr(torch, name, _poisoning(_ORIGINAL[name]))
        return self

    def __exit__(self, *exc):
        for name in self.NAMES:
            setattr(torch, name, _ORIGINAL[name])
        return False


class forbid_launches:
    """Context manager: inside it, launching any Triton kernel (compiled or interpreted) raises
    AssertionError(`why`), so a property can require an implementation to refuse or return
    before anything runs."""

    def __init__(self, why: str):
        self.why = why

    def __enter__(self):
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction

        def launched(*args, **kwargs):
            raise AssertionError(f"a kernel was launched: {self.why}")

        self._saved = [(kind, kind.__dict__["run"]) for kind in (JITFunction, InterpretedFunction)]
        for kind, _ in self._saved:
            kind.run = launched
        return self

    def __exit__(self, *exc):
        for kind, run in self._saved:
            kind.run = run
        return False
