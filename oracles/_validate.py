"""Input validation for the oracles, independent of the kernels' own checks.

The oracles reject the same bad calls as the kernels, with the same exception types, so that a
bad-input table can be run against either.
"""
import torch


def need(cond: bool, exc: type, msg: str) -> None:
    if not cond:
        raise exc(msg)


def tensor(name: str, x, dtypes, shape=None, device=None) -> None:
    """x is a tensor of one of `dtypes`; `shape` entries of None are free."""
    need(isinstance(x, torch.Tensor), TypeError, f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    need(x.dtype in dtypes, TypeError, f"{name}: expected dtype in {dtypes}, got {x.dtype}")
    if shape is not None:
        need(x.dim() == len(shape), ValueError, f"{name}: expected rank {len(shape)}, got shape {tuple(x.shape)}")
        for i, n in enumerate(shape):
            need(n is None or x.shape[i] == n, ValueError,
                 f"{name}: expected size {n} in dim {i}, got shape {tuple(x.shape)}")
    if device is not None:
        need(x.device == device, ValueError, f"{name}: expected device {device}, got {x.device}")


def integer(name: str, v, lo=None, hi=None, multiple_of=None) -> None:
    need(isinstance(v, int) and not isinstance(v, bool), TypeError, f"{name}: expected an int, got {v!r}")
    need(lo is None or v >= lo, ValueError, f"{name}: expected >= {lo}, got {v}")
    need(hi is None or v <= hi, ValueError, f"{name}: expected <= {hi}, got {v}")
    need(multiple_of is None or v % multiple_of == 0, ValueError,
         f"{name}: expected a multiple of {multiple_of}, got {v}")


def scale(name: str, s, device) -> None:
    if s is not None:
        tensor(name, s, (torch.float32,), device=device)
        need(s.numel() == 1 and s.dim() <= 1, ValueError, f"{name}: expected one element, got shape {tuple(s.shape)}")
