"""How many pytest-xdist workers: on the GPU, every GPU shared by an equal number of workers (the
float64 oracles run on the CPU and most of a property's time is theirs, so one worker per GPU
would leave the GPU idle): KERNELFUZZ_WORKERS_PER_GPU, default the cores left after one for the
controller, divided among the GPUs, at most 16 per GPU. On the CPU interpreter one per core, at
most 2."""
import os

MAX_PER_GPU = 16


def count() -> int:
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    import torch
    cores = os.cpu_count() or 1
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0") and torch.cuda.is_available():
        gpus = torch.cuda.device_count()
        per_gpu = os.environ.get("KERNELFUZZ_WORKERS_PER_GPU")
        if per_gpu is not None:
            if not per_gpu.isdigit() or int(per_gpu) < 1:
                raise ValueError(f"KERNELFUZZ_WORKERS_PER_GPU: expected a positive integer, got {per_gpu!r}")
            return gpus * int(per_gpu)
        return gpus * max(1, min(MAX_PER_GPU, (cores - 1) // gpus))
    return max(1, min(2, cores))
