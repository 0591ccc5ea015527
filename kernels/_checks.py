"""Argument checks for the launchers: fail before anything is allocated, launched or written.

Every message names the argument, what was expected and what was given. Nothing here reads
tensor data (no host synchronisation): only dtypes, shapes, strides and devices.
"""
from typing import Iterable, Optional, Sequence

import torch

FLOAT_ACTIVATIONS = (torch.bfloat16, torch.float16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)
FP8 = torch.float8_e4m3fn


def _names(dtypes: Iterable[torch.dtype]) -> str:
    return " or ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(name: str, x, *, dtypes: Optional[Sequence[torch.dtype]] = None,
                 ndim: Optional[int] = None, shape: Optional[Sequence] = None,
                 device: Optional[torch.device] = None, unit_last_stride: bool = False) -> None:
    """Raise TypeError/ValueError unless `x` is a tensor of the given dtype, rank, shape and device.

    `shape` may hold None for a free dimension; `ndim` defaults to len(shape).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if dtypes is not None and x.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype {_names(dtypes)}, got {str(x.dtype).replace('torch.', '')}")
    if ndim is None and shape is not None:
        ndim = len(shape)
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {tuple(x.shape)}")
    if shape is not None:
        for i, want in enumerate(shape):
            if want is not None and x.shape[i] != want:
                raise ValueError(f"{name}: expected shape[{i}] == {want}, got shape {tuple(x.shape)}")
    if device is not None and x.device != device:
        raise ValueError(f"{name}: expected device {device}, got {x.device}")
    if unit_last_stride and x.dim() > 0 and x.shape[-1] > 1 and x.stride(-1) != 1:
        raise ValueError(f"{name}: expected unit stride in the last dimension, got strides {x.stride()}")


def check_scale(name: str, s, device: torch.device) -> None:
    """A scale is None or a float32 tensor with exactly one element on `device`."""
    if s is None:
        return
    check_tensor(name, s, dtypes=(torch.float32,), device=device)
    if s.numel() != 1 or s.dim() > 1:
        raise ValueError(f"{name}: expected a float32 tensor of shape [] or [1], got shape {tuple(s.shape)}")


def check_int(name: str, v, *, lo: Optional[int] = None, hi: Optional[int] = None,
              multiple_of: Optional[int] = None) -> None:
    """`v` is a Python int (not bool) in [lo, hi], divisible by multiple_of."""
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name}: expected an int, got {type(v).__name__} {v!r}")
    if lo is not None and v < lo:
        raise ValueError(f"{name}: expected >= {lo}, got {v}")
    if hi is not None and v > hi:
        raise ValueError(f"{name}: expected <= {hi}, got {v}")
    if multiple_of is not None and v % multiple_of != 0:
        raise ValueError(f"{name}: expected a multiple of {multiple_of}, got {v}")


def check_choice(name: str, v, choices: Sequence) -> None:
    if v not in choices:
        raise ValueError(f"{name}: expected one of {list(choices)}, got {v!r}")
