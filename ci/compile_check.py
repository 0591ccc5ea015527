"""Compile every production kernel for the GPU (sm_90) on a machine without one.

Triton's interpreter accepts programs the GPU compiler rejects (e.g. a variable whose block shape
differs between the branches of an `if`). This runs each op's public function on small CPU tensors
with JITFunction.run replaced by a compile-only step for an sm_90 target, so the real
front end, optimiser and ptxas see every kernel variant listed in CASES. It launches nothing.
It also checks the generated code where a property of it matters (each check is also run on a
plant it must reject): qkv's two gate layouts compile to the same arithmetic, gather's full output
tiles store 16 bytes at a time, mla_decode's stage 1 uses no (asynchronous) wgmma.

    python -m ci.compile_check [--mutants]   # exit 1 if any variant fails to compile
"""
import os
import re
import sys
import time
import traceback

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    raise SystemExit("ci.compile_check compiles for the GPU: run it without TRITON_INTERPRET")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.experimental.gluon._runtime import GluonASTSource  # noqa: E402
from triton.runtime import jit  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)  # H100 / H200
compiled = []


def _compile_only(self, *args, grid, warmup, **kwargs):
    backend = make_backend(TARGET)
    binder = jit.create_function_from_signature(self.signature, self.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = self._pack_args(backend, kwargs, bound, specialization, options)
    start = time.time()
    source = GluonASTSource if self.is_gluon() else ASTSource
    kernel = triton.compile(source(self, signature, constexprs, attrs), target=TARGET, options=options.__dict__)
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


def mla_cases(mla_decode):
    def case(B=2, H=16, L=512, P=64, page_size=64, dtype=torch.bfloat16, cache=None, kv_scale=False,
             head_padding="auto", return_lse=False, splits=None):
        cache = cache or dtype
        pages = 4
        q = torch.randn(B, H, L + P).to(dtype)
        kv = torch.zeros(pages * B, page_size, L + P, dtype=cache)
        indptr = torch.arange(0, pages * B + 1, pages, dtype=torch.int32)
        indices = torch.arange(pages * B, dtype=torch.int32)
        lens = torch.full((B,), pages * page_size - 1, dtype=torch.int32)
        s = torch.ones(1) if kv_scale else None
        mla_decode(q, kv, indptr, indices, lens, kv_lora_rank=L, kv_scale=s, num_kv_splits=splits,
                   head_padding=head_padding, return_lse=return_lse)

    # the first case runs on every mutant: the pad path with lse, so each mutated line compiles
    yield "H=4 pad, lse, DeepSeek-V3 dims", lambda: case(H=4, head_padding="pad", return_lse=True)
    yield "H=16", lambda: case(H=16)
    yield "H=128 (BH 32), lse", lambda: case(H=128, return_lse=True)
    yield "H=20 (BH 32)", lambda: case(H=20)
    yield "H=5 mask, fp16", lambda: case(H=5, head_padding="mask", dtype=torch.float16)
    yield "fp8 cache with kv_scale, H=8", lambda: case(H=8, cache=torch.float8_e4m3fn, kv_scale=True, return_lse=True)
    yield "fp8 cache, fp16 q, H=128", lambda: case(H=128, dtype=torch.float16, cache=torch.float8_e4m3fn, kv_scale=True)
    yield "L=1024 P=128", lambda: case(L=1024, P=128, return_lse=True)
    yield "L=1024 P=128, H=128", lambda: case(L=1024, P=128, H=128)
    yield "P=0", lambda: case(L=512, P=0)
    yield "L=16 P=2, page_size 1", lambda: case(L=16, P=2, page_size=1)
    yield "page_size 1, 64 splits", lambda: case(page_size=1, splits=64)
    yield "page_size 64, 1 split", lambda: case(page_size=64, splits=1, return_lse=True)


def _sm90_case(H=2, L=512, P=64, qk=128, v=128, dtype=torch.bfloat16, out=torch.bfloat16, row_scale=False,
               kv_scale=False, block_size=16, block_scale=False, sm90=None):
    """The sm_90 gather kernel (or a plant of its module), launched directly: its launcher's
    dispatch needs an sm_90 device."""
    if sm90 is None:
        from kernels import gather_kv_b_proj_sm90 as sm90
    T = 25
    kv_cache = torch.zeros(2, block_size, L + P).to(dtype)
    N = H * (qk + v)
    n_k_el = T * H * (qk + P)
    buf = torch.empty(n_k_el + T * H * v, dtype=out)
    sm90.launch(kv_cache, torch.tensor([0, 2], dtype=torch.int32), torch.arange(2, dtype=torch.int32),
                torch.tensor([0, T], dtype=torch.int32), torch.zeros(N, L).to(dtype),
                torch.ones(N) if row_scale else torch.ones(-(-N // 128), -(-L // 128)) if block_scale else None,
                torch.ones(1) if kv_scale else None,
                buf[:n_k_el].view(T, H, qk + P), buf[n_k_el:].view(T, H, v), n_k_el, total=T, H=H, L=L, P=P,
                QK=qk, VD=v, w_scale_mode=1 if row_scale else 2 if block_scale else 0)


def gather_cases(gather_kv_b_proj):
    fp8 = torch.float8_e4m3fn

    def case(H=2, L=512, P=64, qk=128, v=128, cache=torch.bfloat16, weight=torch.bfloat16,
             w_scale=None, kv_scale=False, out=torch.bfloat16, block_size=16):
        lens = [5, 0, 20]
        blocks = [-(-n // block_size) for n in lens]
        indptr = torch.tensor([0, blocks[0], blocks[0] + blocks[1], sum(blocks)], dtype=torch.int32)
        indices = torch.arange(sum(blocks), dtype=torch.int32)
        cu = torch.tensor([0, 5, 5, 25], dtype=torch.int32)
        kv_cache = torch.zeros(sum(blocks), block_size, L + P).to(cache)
        N = H * (qk + v)
        w = torch.zeros(N, L).to(weight)
        ws = {None: None, "row": torch.ones(N), "block": torch.ones(-(-N // 128), -(-L // 128))}[w_scale]
        gather_kv_b_proj(kv_cache, indptr, indices, cu, w, kv_lora_rank=L, qk_nope_head_dim=qk, v_head_dim=v,
                         w_scale=ws, kv_scale=torch.ones(1) if kv_scale else None, out_dtype=out)

    # the first case (also compiled for every mutant) reaches the most mutated code: an fp8 cache
    # beside a bf16 weight, block scales, kv_scale, a rope part
    yield "DeepSeek dims, fp8 cache x bf16 weight, block scales", lambda: case(cache=fp8, w_scale="block", kv_scale=True)
    yield "bf16 DeepSeek-V3 (L=512 P=64 qk=v=128 H=2)", lambda: case()
    yield "bf16 DeepSeek-V3, fp32 out (16-byte fp32 stores: a layout conversion in shared memory)", \
        lambda: case(out=torch.float32)
    yield "bf16 cache x fp16 weight (tf32 dots), fp32 out, DeepSeek-V3 dims", \
        lambda: case(weight=torch.float16, out=torch.float32)
    yield "bf16 cache x fp8 weight, block scales (the weight dequantised to bf16 first)", \
        lambda: case(weight=fp8, w_scale="block")
    yield "fp8 cache x fp16 weight, block scales, fp16 out (per-step scales)", \
        lambda: case(cache=fp8, weight=torch.float16, w_scale="block", kv_scale=True, out=torch.float16)
    yield "bf16 cache and weight, block scales, fp32 out (per-step scales, a float32 tile)", \
        lambda: case(w_scale="block", out=torch.float32)
    yield "bf16 cache x fp16 weight (tf32 dots), block scales, fp32 out (per-step scales)", \
        lambda: case(weight=torch.float16, w_scale="block", out=torch.float32)
    yield "fp8 cache x fp8 weight, block scales", lambda: case(cache=fp8, weight=fp8, w_scale="block", kv_scale=True)
    yield "fp8 cache x fp8 weight, fp32 out (bf16 dots)", lambda: case(cache=fp8, weight=fp8, out=torch.float32)
    yield "qk=192 v=256, fp8 weight, per-row scale (converted to bf16 first)", \
        lambda: case(qk=192, v=256, weight=fp8, w_scale="row")
    yield "fp16 cache x fp8 weight, block scales, fp16 out (the fp8 weight in the kernel, per-step scales)", \
        lambda: case(cache=torch.float16, weight=fp8, w_scale="block", out=torch.float16)
    yield "P=0, fp16 cache and weight, fp16 out", lambda: case(P=0, cache=torch.float16, weight=torch.float16,
                                                                out=torch.float16)
    yield "bf16 cache x fp16 weight, fp32 out, odd dims", lambda: case(H=3, L=48, P=2, qk=100, v=33,
                                                                       weight=torch.float16, out=torch.float32,
                                                                       block_size=1)

    sm90_case = _sm90_case

    yield "sm_90 kernel: bf16 DeepSeek-V3", lambda: sm90_case()
    yield "sm_90 kernel: fp16, qk=192 v=256, row scale, kv_scale, fp16 out", \
        lambda: sm90_case(qk=192, v=256, dtype=torch.float16, out=torch.float16, row_scale=True, kv_scale=True)
    yield "sm_90 kernel: P=0, L=208, bf16 out from fp16", lambda: sm90_case(P=0, L=208, dtype=torch.float16)
    yield "sm_90 kernel: P=8 (row strides multiples of 8, not 16), block size 3", \
        lambda: sm90_case(P=8, L=64, qk=64, v=512, block_size=3)
    yield "sm_90 kernel: fp8 x fp8, block scales, kv_scale (fp8 tensor cores)", \
        lambda: sm90_case(dtype=fp8, block_scale=True, kv_scale=True)
    yield "sm_90 kernel: fp8 x fp8, L=256, qk=192 v=256, P=16", \
        lambda: sm90_case(dtype=fp8, block_scale=True, L=256, qk=192, v=256, P=16)


def kda_cases(kda):
    def case(T=130, H=4, HV=8, K=128, V=128, dtype=torch.bfloat16, lens=None, h0=True, l2norm=False):
        B = 1 if lens else 2
        T = sum(lens) if lens else T
        q, k = torch.randn(B, T, H, K).to(dtype), torch.randn(B, T, H, K).to(dtype)
        v = torch.randn(B, T, HV, V).to(dtype)
        g = -torch.rand(B, T, HV, K)
        beta = torch.rand(B, T, HV).to(dtype)
        cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32) if lens else None
        N = len(lens) if lens else B
        s0 = torch.zeros(N, HV, K, V) if h0 else None
        kda(q, k, v, g, beta, initial_state=s0, output_final_state=True, cu_seqlens=cu, use_qk_l2norm=l2norm)

    yield "H=4 HV=8 K=V=128 bf16, initial state", lambda: case()
    # the launch config assumes 8 SMs for CPU tensors: HV = 16 runs more state programs than SMs
    # (V tiles of 32, one stage), HV = 2 fills them with V tiles of 32 (2 stages), HV = 1 with
    # V tiles of 16 (3 stages)
    yield "H=HV=16 K=V=128 bf16 (the bench shape; more programs than SMs, one stage)", \
        lambda: case(H=16, HV=16, T=64)
    yield "H=HV=2 K=V=128 bf16, one sequence (state kernel on V tiles of 32, 2 stages)", \
        lambda: case(H=2, HV=2, lens=[64])
    yield "H=HV=1 K=V=128 bf16, one sequence (state kernel on V tiles of 16, 3 stages)", \
        lambda: case(H=1, HV=1, lens=[64])
    yield "varlen, l2norm, fp16", lambda: case(lens=[3, 64, 70], l2norm=True, dtype=torch.float16)
    yield "K=100 V=200 fp32", lambda: case(K=100, V=200, dtype=torch.float32, h0=False)
    yield "K=V=256 bf16", lambda: case(K=256, V=256, H=2, HV=2)
    yield "K=230 V=64 fp16 (float32 output path)", lambda: case(K=230, V=64, H=2, HV=2, dtype=torch.float16)
    yield "K=255 V=255 fp32", lambda: case(K=255, V=255, H=1, HV=1, dtype=torch.float32)
    yield "K=8 V=4 (dots padded to 16)", lambda: case(K=8, V=4)


# op -> (production "module:function" or a list of them, cases(fn) yielding (name, thunk))
CASES = {"qkv_norm_rope_cache": ("kernels.qkv_norm_rope_cache:qkv_norm_rope_cache", qkv_cases),
         "mla_decode": ("kernels.mla_decode:mla_decode", mla_cases),
         "gather_kv_b_proj": ("kernels.gather_kv_b_proj:gather_kv_b_proj", gather_cases),
         "kda": (["kernels.kda:chunk_kda", "kernels.kda:fused_recurrent_kda"], kda_cases)}
SMEM_LIMIT = 232448  # bytes of shared memory one block may use on sm_90 (227 KB, opt-in maximum)


def _load(target: str):
    import importlib
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def variants(with_mutants: bool):
    """(label, thunk): every case on the production kernel; with_mutants, the first case of each
    op on each registered mutant too (the mutant gate runs them on the GPU)."""
    for op, (targets, cases) in CASES.items():
        targets = [targets] if isinstance(targets, str) else targets
        for target in targets:
            form = f" [{target.rpartition(':')[2]}]" if len(targets) > 1 else ""
            for name, thunk in cases(_load(target)):
                yield f"{op}{form}: {name}", thunk
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


def vector_store_checks():
    """gather_kv_b_proj's K and V stores (most of the op's memory traffic) must be 16 bytes wide:
    a row mask Triton could not see as constant along the columns once made every store 2 bytes
    wide, and an output tile now spans K and V columns, whose offsets reach the compiler only
    through contiguity hints. With P = 0 the output tiles must use 16-byte stores; with
    DeepSeek-V3's dims (qk, v and P multiples of 8) every store of the kernel, rope part
    included, must be 16 bytes wide. Both checks must also fail on a plant without the tiles'
    hints (properties/mutants/gather_kv_b_proj.py: scalar_output_stores)."""
    from properties.mutants.gather_kv_b_proj import scalar_output_stores
    for label, fn, want in (("production", _load(CASES["gather_kv_b_proj"][0]), True),
                            ("plant scalar_output_stores", scalar_output_stores, False)):
        compiled.clear()
        # P = 0: no rope stores, so every 16-byte store is a K or V output store
        name, thunk = [c for c in gather_cases(fn) if c[0].startswith("P=0")][0]
        thunk()
        vector = "st.global.v4.b32" in compiled[0][3]
        yield (f"gather_kv_b_proj {label}: {name}: full-tile output stores "
               f"{'are' if want else 'are not'} 16 bytes wide (st.global.v4)"), vector == want
        compiled.clear()
        name, thunk = [c for c in gather_cases(fn) if c[0].startswith("bf16 DeepSeek-V3")][0]
        thunk()
        stores = set(re.findall(r"st\.global\.[\w.]+", compiled[0][3]))
        yield (f"gather_kv_b_proj {label}: {name}: every store {'is' if want else 'is not'} 16 bytes "
               f"wide (found {sorted(stores)})"), (stores == {"st.global.v4.b32"}) == want


def sm90_vector_load_checks():
    """The sm_90 gather kernel's latent-row loads must be 16 bytes wide: with L unspecialized the
    masks o_k < L were not seen as constant over 16 columns and every row load became a 1- or
    2-byte load (0.138 against 0.133 ms on an H100). The check must also fail on that plant
    (properties/mutants/gather_kv_b_proj.py: sm90_scalar_row_loads)."""
    from properties.mutants.gather_kv_b_proj import sm90_scalar_row_loads
    from kernels import gather_kv_b_proj_sm90 as prod
    for label, mod, want in (("production", prod, True),
                             ("plant sm90_scalar_row_loads", sm90_scalar_row_loads(), False)):
        for name, kw in (("bf16 DeepSeek-V3", {}),
                         ("fp8 x fp8", dict(dtype=torch.float8_e4m3fn, block_scale=True, kv_scale=True))):
            compiled.clear()
            _sm90_case(sm90=mod, **kw)
            loads = set(re.findall(r"ld\.global\.[\w.]+", compiled[0][3]))
            # (the fp8 rope part is 8 bytes per thread: ld.global.v2.b32)
            wide = "ld.global.v4.b32" in loads and not any(re.search(r"\.[bus](8|16)$", x) for x in loads)
            yield (f"gather_kv_b_proj sm_90 {label}: {name}: latent-row loads {'are' if want else 'are not'} "
                   f"16 bytes wide (found {sorted(loads)})"), wide == want


def synchronous_mma_checks():
    """mla_decode's stage 1 must not use wgmma: with 64-row head tiles p.v ran on asynchronous
    wgmma and Triton 3.6 prefetched the next cache tile into the single buffer a pending wgmma
    still read (zeros on an H100 at H = 33 and 64). Every production variant is checked; the check
    must also fail on a plant that forces 64-row tiles."""
    import kernels.mla_decode as mla

    def stage1_uses_wgmma():
        return any("wgmma.mma_async" in ptx for name, _, _, ptx in compiled if "stage1" in name)

    for name, thunk in mla_cases(mla.mla_decode):
        compiled.clear()
        thunk()
        yield f"mla_decode production: {name}: stage 1 has no wgmma", not stage1_uses_wgmma()
    compiled.clear()
    B, H, L, P = 2, 128, 512, 64
    q = torch.randn(B, H, L + P).to(torch.bfloat16)
    kv = torch.zeros(8, 64, L + P, dtype=torch.bfloat16)
    mla._launch(q, kv, torch.tensor([0, 4, 8], dtype=torch.int32), torch.arange(8, dtype=torch.int32),
                torch.tensor([200, 255], dtype=torch.int32), L, None, None, None, "auto", True, False,
                config=dict(BH=64, BN=32, num_warps=8, num_stages=3))
    yield "mla_decode plant BH 64: stage 1 uses wgmma (the check can fail)", stage1_uses_wgmma()


def main(argv) -> int:
    jit.JITFunction.run = _compile_only
    failed = 0
    checks = (list(same_arithmetic_checks()) + list(vector_store_checks()) + list(sm90_vector_load_checks())
              + list(synchronous_mma_checks()))
    for label, ok in checks:
        print(f"{'ok   ' if ok else 'FAIL '} {label}")
        failed += not ok
    for label, thunk in variants("--mutants" in argv):
        compiled.clear()
        try:
            thunk()
            detail = ", ".join(f"{k} ({shared} B shared, {sec:.1f} s)" for k, shared, sec, _ in compiled)
            over = [k for k, shared, _, _ in compiled if shared > SMEM_LIMIT]
            if over:
                failed += 1
                print(f"FAIL  {label}: shared memory over the {SMEM_LIMIT} B limit: {detail}")
                continue
            print(f"ok    {label}: {detail}")
        except Exception:
            failed += 1
            print(f"FAIL  {label}\n{traceback.format_exc(limit=-3)}")
    print(f"{failed} variant(s) failed to compile for {TARGET}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
