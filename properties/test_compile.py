"""Every production kernel variant (and every mutant) compiles for the GPU (sm_90).

The Triton interpreter accepts programs that the GPU compiler rejects; ci.compile_check runs the
real compiler (front end to ptxas) on the CPU in a separate process without TRITON_INTERPRET.
"""
import os
import subprocess
import sys

from properties import backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_kernels_compile_for_sm90():
    """On the interpreter: every production variant and every mutant, plus the static checks
    (same arithmetic for the qkv gate layouts, 16-byte gather stores, shared memory). On the GPU
    the property tests and the mutant gate compile every kernel for real, so only the production
    variants and the static checks run here (with the mutants this took 9 minutes of a GPU run)."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "KERNELFUZZ_BACKEND")}
    env["TRITON_CACHE_DIR"] = os.path.join(env.get("TRITON_CACHE_DIR", os.path.join(ROOT, ".triton-cache")), "sm90")
    args = [] if backend.BACKEND == "cuda" else ["--mutants"]
    done = subprocess.run([sys.executable, "-m", "ci.compile_check", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
