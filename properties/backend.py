"""Backend selection: CUDA when a GPU is present, else the Triton CPU interpreter.

`configure()` must run before triton is imported (conftest.py calls it first thing). The pytest
controller decides once and exports the decision to its xdist workers through the environment:

- KERNELFUZZ_BACKEND: "cuda" or "interpreter" (set it yourself to force one).
- KERNELFUZZ_GPUS: the GPUs the run may use, as CUDA_VISIBLE_DEVICES entries (an outer
  CUDA_VISIBLE_DEVICES is honoured). Worker gwN is pinned to entry N mod len before CUDA starts.
- TRITON_CACHE_DIR: each worker gets its own sub-folder of the outer one (or of ~/.triton/cache);
  on the GPU, TRITON_CACHE_MANAGER lets a worker reuse what another worker already compiled
  (properties/triton_cache.py).
- torch's CPU threads: an xdist worker gets its share of the cores (the float64 oracles run on
  the CPU; N workers with all cores each would oversubscribe them N times).
"""
import os

BACKEND = None   # "cuda" | "interpreter"
DEVICE = None    # "cuda" | "cpu"
GPUS = ()        # entries of CUDA_VISIBLE_DEVICES this process may see
WORKER = None    # xdist worker id ("gw0", ...) or None


def _detect() -> str:
    forced = os.environ.get("KERNELFUZZ_BACKEND")
    if forced:
        if forced not in ("cuda", "interpreter"):
            raise ValueError(f"KERNELFUZZ_BACKEND: expected 'cuda' or 'interpreter', got {forced!r}")
        return forced
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return "interpreter"
    # NVML answers without creating a CUDA context, so workers can still be pinned afterwards
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    import torch
    return "cuda" if torch.cuda.is_available() else "interpreter"


def _visible_gpus() -> tuple:
    if os.environ.get("KERNELFUZZ_GPUS") is not None:
        return tuple(g for g in os.environ["KERNELFUZZ_GPUS"].split(",") if g)
    outer = os.environ.get("CUDA_VISIBLE_DEVICES")
    if outer is not None:
        return tuple(g.strip() for g in outer.split(",") if g.strip())
    import torch
    return tuple(str(i) for i in range(torch.cuda.device_count()))


def configure() -> str:
    """Decide the backend, pin this worker's GPU and Triton cache. Idempotent."""
    global BACKEND, DEVICE, GPUS, WORKER
    if BACKEND is not None:
        return BACKEND
    BACKEND = _detect()
    os.environ["KERNELFUZZ_BACKEND"] = BACKEND
    WORKER = os.environ.get("PYTEST_XDIST_WORKER")
    if BACKEND == "interpreter":
        os.environ["TRITON_INTERPRET"] = "1"
        DEVICE = "cpu"
    else:
        DEVICE = "cuda"
        GPUS = _visible_gpus()
        os.environ["KERNELFUZZ_GPUS"] = ",".join(GPUS)
        if WORKER is not None and GPUS:
            index = int(WORKER.lstrip("gw") or 0)
            os.environ["CUDA_VISIBLE_DEVICES"] = GPUS[index % len(GPUS)]
    base = os.environ.get("KERNELFUZZ_TRITON_CACHE_BASE") or os.environ.get("TRITON_CACHE_DIR") \
        or os.path.join(os.path.expanduser("~"), ".triton", "cache")
    os.environ["KERNELFUZZ_TRITON_CACHE_BASE"] = base
    os.environ["TRITON_CACHE_DIR"] = os.path.join(base, WORKER or "main")
    if BACKEND == "cuda":
        os.environ.setdefault("TRITON_CACHE_MANAGER", "properties.triton_cache:SiblingCacheManager")
    if WORKER is not None:
        import torch
        workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, workers)))
    return BACKEND


def pick(*, interpreter, cuda):
    """The value for the current backend: shape bounds scale with it (the interpreter runs one
    program at a time)."""
    return interpreter if BACKEND == "interpreter" else cuda


def describe() -> str:
    if BACKEND == "cuda":
        import torch
        pinned = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "?"
        return f"cuda ({name}; GPUs {','.join(GPUS)}; this process sees {pinned or 'all'})"
    return "triton interpreter (TRITON_INTERPRET=1, CPU tensors)"
