"""How many pytest-xdist workers: one per GPU, or one per core (at most 2) on the interpreter."""
import os


def count() -> int:
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    import torch
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0") and torch.cuda.is_available():
        return torch.cuda.device_count()
    return max(1, min(2, os.cpu_count() or 1))
