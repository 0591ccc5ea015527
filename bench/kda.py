"""Benchmark chunk_kda and fused_recurrent_kda (GPU only):
`python -m bench.kda [--sweep] [--recurrent] [--profile]` (--profile: per-kernel CUDA times);
`python -m bench.kda --recurrent-sweep`: fused_recurrent_kda's (BV, num_warps) configs per head dim.

Shapes: B = 1, T = 32768 (one sequence, and varlen: 8 sequences of 4096 packed), H = 16,
HV in {16, 32}, K = V = 128, bf16 q/k/v/beta, float32 g = logsigmoid(randn) (fla's default gate
mode: g is the precomputed log decay), q/k L2-normalised in the kernel.

FLOP count (the chunked algorithm's useful matrix work, chunk BT = 64, per token and value head;
triangular products counted half):
    Akk, Aqk, w = Y (beta k e^G)       3 * BT * K
    u = Y (beta v), Aqk U              2 * BT * V
    w S, (q e^G) S, (k e^(G_L - G))^T U 6 * K * V
i.e. FLOPs = T * HV * (3 BT K + 2 BT V + 6 K V) = 139264 * T * HV for K = V = 128 (the 64^3 / 3
triangular solve per chunk and all elementwise work are left out). The same count is used for
every implementation, so the TFLOP/s column is a speed ratio to MATMUL_TFLOPS, not a claim about
the work each one does.

The eager baseline is a float32 chunked PyTorch implementation of the same math (per-chunk
[HV, 64, 64, K] decay tensor, triangular solve, state passing). fla's chunk_kda (flash-linear-
attention / fla-core) is timed on the same inputs when it imports; its first call per shape
autotunes for a minute or more.
"""
import argparse
import math

import torch
import torch.nn.functional as F

from bench.timing import MATMUL_TFLOPS, bench_ms, record

BT = 64


def torch_chunk_kda(q, k, v, g, beta, scale, cu_seqlens=None, use_qk_l2norm=True):
    """Float32 chunked KDA in plain PyTorch: returns (o [1, T, HV, V] float32, final [N, HV, K, V])."""
    _, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    grp = HV // H
    qf = q[0].float().repeat_interleave(grp, 1).transpose(0, 1)  # [HV, T, K]
    kf = k[0].float().repeat_interleave(grp, 1).transpose(0, 1)
    if use_qk_l2norm:
        qf = qf / torch.sqrt((qf * qf).sum(-1, keepdim=True) + 1e-6)
        kf = kf / torch.sqrt((kf * kf).sum(-1, keepdim=True) + 1e-6)
    qf = qf * scale
    vf = v[0].float().transpose(0, 1)
    gf = g[0].float().transpose(0, 1)
    bf = beta[0].float().transpose(0, 1)  # [HV, T]
    bounds = [0, T] if cu_seqlens is None else cu_seqlens.tolist()
    o = torch.empty((HV, T, V), dtype=torch.float32, device=q.device)
    finals = []
    for bos, eos in zip(bounds[:-1], bounds[1:]):
        S = torch.zeros((HV, K, V), dtype=torch.float32, device=q.device)
        for s in range(bos, eos, BT):
            e = min(s + BT, eos)
            L = e - s
            qc, kc, vc, gc, bc = qf[:, s:e], kf[:, s:e], vf[:, s:e], gf[:, s:e], bf[:, s:e]
            G = gc.cumsum(1)
            lower = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
            diff = (G[:, :, None, :] - G[:, None, :, :]).masked_fill(~lower[None, :, :, None], -math.inf)
            E = diff.exp()  # [HV, L, L, K]
            Akk = torch.einsum("hic,hjc,hijc->hij", kc, kc, E).tril(-1) * bc[:, :, None]
            Aqk = torch.einsum("hic,hjc,hijc->hij", qc, kc, E)
            Lm = Akk + torch.eye(L, device=q.device)
            w = torch.linalg.solve_triangular(Lm, bc[..., None] * kc * G.exp(), upper=False, unitriangular=True)
            u = torch.linalg.solve_triangular(Lm, bc[..., None] * vc, upper=False, unitriangular=True)
            U = u - w @ S
            o[:, s:e] = (qc * G.exp()) @ S + Aqk @ U
            GL = G[:, -1:, :]
            S = GL[:, 0, :, None].exp() * S + (kc * (GL - G).exp()).transpose(1, 2) @ U
        finals.append(S)
    return o.transpose(0, 1)[None], torch.stack(finals)


def _inputs(T, H, HV, K, V, dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(1, T, H, K, device="cuda", dtype=dtype, generator=gen)
    k = torch.randn(1, T, H, K, device="cuda", dtype=dtype, generator=gen)
    v = torch.randn(1, T, HV, V, device="cuda", dtype=dtype, generator=gen)
    g = F.logsigmoid(torch.randn(1, T, HV, K, device="cuda", dtype=torch.float32, generator=gen))
    beta = torch.randn(1, T, HV, device="cuda", dtype=torch.float32, generator=gen).sigmoid().to(dtype)
    return q, k, v, g, beta


def recurrent_sweep():
    """fused_recurrent_kda's (BV, num_warps) configs per head dim K (V = 128, bf16): one sequence of
    4096 tokens at H = HV = 16 (a token's latency) and decode (256 one-token sequences, HV 32, initial
    states); three interleaved rounds, median ms. Each config is first checked against the oracle's
    float32 recurrence (the prefill on its first 256 tokens: the oracle loops over heads and tokens)."""
    import statistics
    from oracles.kda import kda as oracle_kda
    from kernels.kda import fused_recurrent_kda
    from kernels.kda._common import pow2
    from kernels.kda.fused_recurrent import _launch_config
    tol = 2 * torch.finfo(torch.bfloat16).eps
    cands = [(8, 1), (16, 1), (32, 1), (64, 1), (16, 2), (32, 2), (16, 4), (32, 4), (64, 4), (32, 8)]
    rows = []
    for K in (8, 16, 24, 32, 48, 64, 96, 128, 192, 256):
        for mode in ("prefill", "decode"):
            T, HV, N = (4096, 16, 1) if mode == "prefill" else (256, 32, 256)
            q, k, v, g, beta = _inputs(T, 16, HV, K, 128, torch.bfloat16)
            kw = dict(scale=K ** -0.5, use_qk_l2norm=True, output_final_state=True)
            if mode == "decode":
                kw.update(cu_seqlens=torch.arange(N + 1, device="cuda", dtype=torch.int32),
                          initial_state=torch.randn(N, HV, K, 128, device="cuda"))
            # the checked inputs: the prefill's first 256 tokens, or the whole decode batch
            x = tuple(t[:, :256] for t in (q, k, v, g, beta)) if mode == "prefill" else (q, k, v, g, beta)
            ro, rh = oracle_kda(*x, compute_dtype=torch.float32, **kw)
            # at most 128 state elements per thread (more spill)
            cfgs = [c for c in cands if 128 * 32 * c[1] >= pow2(K) * c[0] >= 32 * c[1]]
            times = {c: [] for c in cfgs}
            for c in cfgs:
                co, ch = fused_recurrent_kda(*x, config=c, **kw)
                if not (_rel_err(co, ro) <= tol and _rel_err(ch, rh) <= tol):
                    raise SystemExit(f"fused_recurrent_kda config {c} disagrees with the float32 oracle "
                                     f"(K={K}, {mode}): rel err o {_rel_err(co, ro):.3g}, state {_rel_err(ch, rh):.3g}")
            for _ in range(3):
                for c in cfgs:
                    times[c].append(bench_ms(lambda: fused_recurrent_kda(q, k, v, g, beta, config=c, **kw),
                                             warmup_ms=5, rep_ms=30))
            default = _launch_config(K, 128)
            for c in cfgs:
                rows.append(dict(op="fused_recurrent_kda", shape=f"{mode} T{T} N{N} H16 HV{HV} K{K} V128",
                                 dtype="bf16", config=f"BV {c[0]} warps {c[1]}" + (" (default)" if c == default else ""),
                                 ms=statistics.median(times[c])))
    record(rows)


def _fla():
    try:
        from fla.ops.kda import chunk_kda as fla_chunk_kda
        return fla_chunk_kda
    except Exception as e:  # noqa: BLE001 - any import failure means "not available"
        print(f"fla not available: {type(e).__name__}: {e}")
        return None


def _rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def kernel_ms(fn, reps: int = 3) -> dict:
    """CUDA time per call of each kernel fn launches (torch.profiler), in ms, largest first."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    times = {}
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", None)
        if us is None:
            us = e.self_cuda_time_total
        if us > 0:
            times[e.key] = us / reps / 1e3
    return dict(sorted(times.items(), key=lambda kv: -kv[1]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, default=32768)
    ap.add_argument("--sweep", action="store_true", help="also time alternative chunk_kda configs")
    ap.add_argument("--recurrent", action="store_true", help="also time fused_recurrent_kda")
    ap.add_argument("--recurrent-sweep", action="store_true",
                    help="only sweep fused_recurrent_kda's configs per head dim (prefill and decode)")
    ap.add_argument("--profile", action="store_true", help="print chunk_kda's per-kernel CUDA times")
    ap.add_argument("--no-fla", action="store_true")
    ap.add_argument("--hv", type=int, nargs="+", default=[16, 32], help="value head counts")
    ap.add_argument("--varlen", choices=("both", "no", "yes"), default="both",
                    help="one sequence, 8 packed sequences, or both")
    args = ap.parse_args()
    if args.recurrent_sweep:
        recurrent_sweep()
        return
    from kernels.kda import chunk_kda, fused_recurrent_kda

    fla = None if args.no_fla else _fla()
    H, K, V, dtype, T = 16, 128, 128, torch.bfloat16, args.T
    # 2 * eps(bf16) relative to max|o|: the error budget's eps term (bf16 output, bf16 intermediates)
    tol = 2 * torch.finfo(torch.bfloat16).eps
    rows = []
    for HV in args.hv:
        for varlen in {"both": (False, True), "no": (False,), "yes": (True,)}[args.varlen]:
            q, k, v, g, beta = _inputs(T, H, HV, K, V, dtype)
            cu = torch.linspace(0, T, 9, device="cuda").round().to(torch.int32) if varlen else None
            scale = K ** -0.5
            kw = dict(scale=scale, cu_seqlens=cu, use_qk_l2norm=True, output_final_state=True)
            o, ht = chunk_kda(q, k, v, g, beta, **kw)
            ro, rh = torch_chunk_kda(q, k, v, g, beta, scale, cu)
            err_o, err_h = _rel_err(o, ro), _rel_err(ht, rh)
            if not (err_o <= tol and err_h <= tol):
                raise SystemExit(f"chunk_kda disagrees with the eager float32 baseline at HV={HV} "
                                 f"varlen={varlen}: rel err o {err_o:.3g}, state {err_h:.3g} > {tol:.3g}")
            flops = T * HV * (3 * BT * K + 2 * BT * V + 6 * K * V)
            shape = f"B1 T{T} H{H} HV{HV} K{K} V{V}" + (" varlen8" if varlen else "")
            ms_eager = bench_ms(lambda: torch_chunk_kda(q, k, v, g, beta, scale, cu), warmup_ms=1, rep_ms=1)
            if args.profile:
                for name, ms in kernel_ms(lambda: chunk_kda(q, k, v, g, beta, **kw)).items():
                    print(f"{shape}: {ms:8.3f} ms  {name[:80]}")
            configs = [None]
            if args.sweep:
                # single changes to the default
                configs += [dict(BV=16), dict(BV=32), dict(BV=64, warps_fwd=8),
                            dict(stages_fwd=1), dict(maxnreg_diag=None),
                            dict(warps_intra=2), dict(BK_O=16, maxnreg_offdiag=128),
                            dict(maxnreg_offdiag=None), dict(BK_W=16), dict(BV_W=64)]
            fla_ms = None
            if fla is not None:
                fkw = dict(scale=scale, output_final_state=True, use_qk_l2norm_in_kernel=True,
                           cu_seqlens=cu.long() if cu is not None else None)
                fo, fh = fla(q, k, v, g, beta, **fkw)
                print(f"fla vs ours ({shape}): rel err o {_rel_err(o, fo):.3g}, state {_rel_err(ht, fh):.3g}")
                fla_ms = bench_ms(lambda: fla(q, k, v, g, beta, **fkw))
            for cfg in configs:
                if cfg is not None:  # a swept config must agree with the baseline like the default
                    co, ch = chunk_kda(q, k, v, g, beta, config=cfg, **kw)
                    if not (_rel_err(co, ro) <= tol and _rel_err(ch, rh) <= tol):
                        raise SystemExit(f"chunk_kda config {cfg} disagrees with the eager float32 baseline "
                                         f"({shape}): rel err o {_rel_err(co, ro):.3g}, state {_rel_err(ch, rh):.3g}")
                ms = bench_ms(lambda: chunk_kda(q, k, v, g, beta, config=cfg, **kw))
                rows.append(dict(op="chunk_kda", shape=shape, dtype="bf16", config=str(cfg or "default"),
                                 ms=ms, tok_per_s=T / ms * 1e3, tflops=flops / ms * 1e-9,
                                 frac_matmul=flops / ms * 1e-9 / MATMUL_TFLOPS, eager_ms=ms_eager,
                                 speedup=ms_eager / ms, fla_ms=fla_ms,
                                 vs_fla=(fla_ms / ms) if fla_ms else None, err_vs_eager=err_o))
            if args.recurrent:
                o2, _ = fused_recurrent_kda(q, k, v, g, beta, **kw)
                err2 = _rel_err(o2, ro)
                ms = bench_ms(lambda: fused_recurrent_kda(q, k, v, g, beta, **kw))
                rows.append(dict(op="fused_recurrent_kda", shape=shape, dtype="bf16", config="default",
                                 ms=ms, tok_per_s=T / ms * 1e3, tflops=flops / ms * 1e-9,
                                 frac_matmul=flops / ms * 1e-9 / MATMUL_TFLOPS, eager_ms=ms_eager,
                                 speedup=ms_eager / ms, fla_ms=fla_ms,
                                 vs_fla=(fla_ms / ms) if fla_ms else None, err_vs_eager=err2))
            del q, k, v, g, beta
    record(rows)


if __name__ == "__main__":
    main()
