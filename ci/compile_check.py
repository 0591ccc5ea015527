"""Compile every production kernel for the GPU (sm_90) on a machine without one.

Triton's interpreter accepts programs the GPU compiler rejects (e.g. a variable whose block shape
differs between the branches of an `if`). This runs each op's public function on small CPU tensors
with JITFunction.run replaced by a compile-only step for an sm_90 target, so the real
front end, optimiser and ptxas see every kernel variant listed in CASES. It launches nothing.

    python -m ci.compile_check [--mutants]   # exit 1 if any variant fails to compile
"""
import os
import sys
import time
import traceback

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    raise SystemExit("ci.compile_check compiles for the GPU: run it without TRITON_INTERPRET")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime import jit  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)  # H100 / H200
compiled = []


def _compile_only(self, *args, grid, warmup, **kwargs):
    backend = make_backend(TARGET)
    binder = jit.create_function_from_signature(self.signature, self.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = self._pack_args(backend, kwargs, bound, specialization, options)
    start = time.time()
    kernel = triton.compile(ASTSource(self, signature, constexprs, attrs), target=TARGET, options=options.__dict__)
    compiled.append((self.fn.__name__, kernel.metadata.shared, time.time() - start, kernel.asm["ptx"]))
    return None


def qkv_cases(qkv_norm_rope_cache):
    def case(T=8, qh=32, kvh=8, D=128, R=None, gate=None, neox=True, dtype=torch.bfloat16,
             cache=torch.bfloat16, scales=False, layout="NHD"):
        W = ((2 * qh if gate else qh) + 2 * kvh) * D
        qkv = torch.randn(T, W).to(dtype)
        w = torch.ones(D, dtype=dtype)
        R = R or D
        cos, sin = torch.ones(64, R // 2), torch.zeros(64, R // 2)
        shape = (4, 16, kvh, D) if layout == "NHD" else (4, kvh, 16, D)
        kc, vc = torch.zeros(shape, dtype=cache), torch.zeros(shape, dtype=cache)
        s = torch.ones(1) if scales else None
        qkv_norm_rope_cache(qkv, w, w, cos, sin, torch.arange(T), kc, vc, torch.arange(T),
                            num_q_heads=qh, num_kv_heads=kvh, head_dim=D, rotary_dim=R, is_neox=neox,
                            gate=gate, cache_layout=layout, k_scale=s, v_scale=s)

    yield "bf16 Qwen3-8B", lambda: case()
    yield "gate interleaved, GPT-J partial, fp8 cache", lambda: case(gate="interleaved", neox=False, R=64,
                                                                    cache=torch.float8_e4m3fn, scales=True)
    yield "gate blocked, HND, fp16, D=80", lambda: case(gate="blocked", layout="HND", dtype=torch.float16, D=80, R=40)
    yield "fp32, D=256, MHA", lambda: case(qh=4, kvh=4, D=256, dtype=torch.float32, cache=torch.float32)


# op -> (production "module:function", cases(fn) yielding (name, thunk))
CASES = {"qkv_norm_rope_cache": ("kernels.qkv_norm_rope_cache:qkv_norm_rope_cache", qkv_cases)}


def _load(target: str):
    import importlib
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def variants(with_mutants: bool):
    """(label, thunk): every case on the production kernel; with_mutants, the first case of each
    op on each registered mutant too (the mutant gate runs them on the GPU)."""
    for op, (target, cases) in CASES.items():
        for name, thunk in cases(_load(target)):
            yield f"{op}: {name}", thunk
        if with_mutants:
            from properties import registry
            for m in registry.implementations(op, kinds=("mutant",)):
                name, thunk = next(iter(cases(m.fn)))
                yield f"{op}: mutant {m.name}: {name}", thunk


def float_ops(ptx: str) -> list:
    """The kernel's floating-point instruction sequence (registers and addresses aside)."""
    import re
    return re.findall(r"\b((?:fma|mul|add|sub|rsqrt|sqrt|div|max|min|ex2|lg2)\.[a-z0-9.]*f(?:32|64)\b)", ptx)


def same_arithmetic_checks():
    """Calls that must give bit-identical results must compile to the same arithmetic: the two
    gate layouts of qkv_norm_rope_cache (head stride D vs 2D once changed the register layout and
    so the RMSNorm summation order on the GPU)."""
    fn = _load(CASES["qkv_norm_rope_cache"][0])
    ptx = []
    for gate in ("interleaved", "blocked"):
        compiled.clear()
        T, qh, kvh, D = 4, 5, 1, 40
        qkv = torch.randn(T, (2 * qh + 2 * kvh) * D).to(torch.bfloat16)
        w = torch.ones(D, dtype=torch.bfloat16)
        kc = torch.zeros(4, 2, kvh, D, dtype=torch.bfloat16)
        fn(qkv, w, w, torch.ones(8, D // 2), torch.zeros(8, D // 2), torch.arange(T), kc, kc.clone(),
           torch.arange(T), num_q_heads=qh, num_kv_heads=kvh, head_dim=D, gate=gate)
        ptx.append(float_ops(compiled[0][3]))
    yield "qkv_norm_rope_cache: interleaved and blocked gates compile to the same arithmetic", ptx[0] == ptx[1]


def main(argv) -> int:
    jit.JITFunction.run = _compile_only
    failed = 0
    for label, ok in same_arithmetic_checks():
        print(f"{'ok   ' if ok else 'FAIL '} {label}")
        failed += not ok
    for label, thunk in variants("--mutants" in argv):
        compiled.clear()
        try:
            thunk()
            detail = ", ".join(f"{k} ({shared} B shared, {sec:.1f} s)" for k, shared, sec, _ in compiled)
            print(f"ok    {label}: {detail}")
        except Exception:
            failed += 1
            print(f"FAIL  {label}\n{traceback.format_exc(limit=-3)}")
    print(f"{failed} variant(s) failed to compile for {TARGET}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
