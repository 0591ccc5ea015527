"""Shared timing and reporting for the benchmarks (GPU only; not a test)."""
import json
import os

import torch

COPY_TBPS = 3.0      # measured H100 device-to-device copy, bytes read + written, TB/s
MATMUL_TFLOPS = 800  # measured H100 bf16 dense matmul, TFLOP/s
# measured on this workplace's machines (device-to-device copy counting read + write; bf16 matmul)
CEILINGS = {"H100": (3.0, 800.0), "H200": (4.3, 790.0)}


def ceilings():
    """(copy TB/s, bf16 TFLOP/s) measured for the current GPU; the H100's when unknown."""
    name = device_name()
    for key, value in CEILINGS.items():
        if key in name:
            return value
    return COPY_TBPS, MATMUL_TFLOPS


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def bench_ms(fn, *, warmup_ms: int = 25, rep_ms: int = 100) -> float:
    """Median milliseconds of fn() over repeated runs timed with CUDA events."""
    import triton.testing
    return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")


def graph_ms(fn, *, rep_ms: int = 100) -> float:
    """Median milliseconds of fn() replayed from a CUDA graph (no host work between calls)."""
    import triton.testing
    return triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median")


def record(rows, path=None) -> None:
    """Print rows (a list of dicts) as a table and append them as JSON lines to `path` or $BENCH_OUT."""
    if not rows:
        return
    keys = list(rows[0].keys())
    widths = {k: max(len(k), *(len(_fmt(r.get(k))) for r in rows)) for k in keys}
    print("  ".join(k.ljust(widths[k]) for k in keys))
    for r in rows:
        print("  ".join(_fmt(r.get(k)).ljust(widths[k]) for k in keys))
    path = path or os.environ.get("BENCH_OUT")
    if path:
        with open(path, "a") as f:
            for r in rows:
                f.write(json.dumps({"device": device_name(), **r}) + "\n")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)
