"""Every production kernel variant (and every mutant) compiles for the GPU (sm_90).

The Triton interpreter accepts programs that the GPU compiler rejects; ci.compile_check runs the
real compiler (front end to ptxas) on the CPU in a separate process without TRITON_INTERPRET.
"""
import os
import subprocess
import sys

import pytest

from properties import backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(backend.BACKEND == "cuda", reason="on the GPU every property test compiles its kernels for "
                    "real; this CPU-side check (minutes, serial) belongs to the interpreter's gate")
def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "KERNELFUZZ_BACKEND")}
    env["TRITON_CACHE_DIR"] = os.path.join(env.get("TRITON_CACHE_DIR", os.path.join(ROOT, ".triton-cache")), "sm90")
    done = subprocess.run([sys.executable, "-m", "ci.compile_check", "--mutants"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
