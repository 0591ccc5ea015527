"""Benchmark gather_kv_b_proj (GPU only): `python -m bench.gather_kv_b_proj [--sweep]`.

FLOPs = 2 * total * N * L. Bytes = cache rows read (total * (L + P)) + weight (and scales) read +
K and V written. The binding roofline is the larger of FLOPs / peak (800 TFLOP/s bf16/fp16 tensor
cores, 1600 when fp8 x fp8 runs on fp8 tensor cores) and bytes / 3.0 TB/s; `roof` is that time
over the measured time. The eager baseline is index_select gather + dequantise + matmul + cat.
`ms` is the call as the contract defines it (it reads cu_kv_lens[-1] on the host, a synchronisation
that leaves the GPU idle while the host launches); `ms_total` passes the host's `total` (no read,
no synchronisation, like the eager baseline, whose gather plan is made before timing); `roof` and
`speedup` use `ms_total`. `ms_graph` replays the call (total given) from a CUDA graph: the GPU's
time without the host's (the launcher's Python, the TMA descriptors of the sm_90 kernel);
`roof_graph` and `speedup_graph` use it against the eager composition replayed the same way.
--sweep times a few kernel configs per shape (for picking the launcher's default).
"""
import sys

import torch

from bench.timing import COPY_TBPS, MATMUL_TFLOPS, bench_ms, graph_ms, record

FP8 = torch.float8_e4m3fn
MODELS = {  # name: (H, L, P, qk_nope, v) at TP8
    "dsv3": (16, 512, 64, 128, 128),
    "asym": (16, 512, 64, 192, 256),
}
CASES = [  # (cache dtype, weight dtype, weight scale)
    (torch.bfloat16, torch.bfloat16, None),
    (torch.bfloat16, FP8, "block"),
    (FP8, FP8, "block"),
]
TOTAL, B, BLOCK_SIZE = 16384, 8, 64
SWEEP = {  # operand kind -> (BT, BN, BK, num_warps, num_stages, tiles_per_program)
    "16-bit": [(128, 256, 32, 8, 4, 8), (128, 256, 32, 8, 5, 16), (128, 256, 64, 8, 3, 16), (128, 256, 64, 8, 4, 32),
               (128, 128, 64, 4, 3, 16), (64, 256, 32, 4, 4, 16), (256, 128, 32, 8, 4, 16),
               (64, 128, 128, 4, 3, 32)],
    "fp8": [(64, 128, 128, 4, 3, 16), (64, 128, 128, 4, 4, 32), (64, 128, 64, 4, 4, 32),
            (64, 256, 128, 8, 3, 16), (128, 128, 128, 8, 3, 16), (64, 64, 128, 4, 3, 32)],
}


def _name(dt) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", FP8: "fp8"}[dt]


def make_inputs(H, L, P, qk, v, cache_dtype, w_dtype, w_scale_kind, *, total=TOTAL, batch=B,
                block_size=BLOCK_SIZE, device="cuda", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    lens = torch.full((batch,), total // batch, dtype=torch.int64)
    lens[-1] += total - int(lens.sum())
    nblk = (lens + block_size - 1) // block_size
    num_blocks = int(nblk.sum()) + 16
    cu = torch.zeros(batch + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lens, 0)
    ip = torch.zeros(batch + 1, dtype=torch.int32)
    ip[1:] = torch.cumsum(nblk, 0)
    ids = torch.randperm(num_blocks, device=device, generator=g)[: int(nblk.sum())].to(torch.int32)
    cache = torch.randn(num_blocks, block_size, L + P, device=device, generator=g)
    kv_scale = None
    if cache_dtype == FP8:
        cache = (cache * 32).clamp(-448, 448)
        kv_scale = torch.tensor([1 / 32], device=device)
    cache = cache.to(cache_dtype)
    N = H * (qk + v)
    w = torch.randn(N, L, device=device, generator=g) * L ** -0.5
    w_scale = None
    if w_dtype == FP8:
        w_scale = torch.rand((N + 127) // 128, (L + 127) // 128, device=device, generator=g) * 1e-2 + 1e-3
        w = (w / w_scale.repeat_interleave(128, 0)[:N].repeat_interleave(128, 1)[:, :L]).clamp(-448, 448)
    w = w.to(w_dtype)
    # token -> flat slot, for the eager baseline (host-side plan, not timed)
    slots = []
    for b in range(batch):
        j = torch.arange(int(lens[b]))
        blk = ids.cpu()[int(ip[b]) + j // block_size].long()
        slots.append(blk * block_size + j % block_size)
    slots = torch.cat(slots).to(device)
    kw = dict(kv_lora_rank=L, qk_nope_head_dim=qk, v_head_dim=v, w_scale=w_scale, kv_scale=kv_scale,
              out_dtype=torch.bfloat16)
    return (cache, ip.to(device), ids, cu.to(device), w), kw, slots


def eager(cache, w, slots, *, kv_lora_rank, qk_nope_head_dim, v_head_dim, w_scale, kv_scale, out_dtype):
    """index_select gather + dequantise + bf16 matmul (float32 accumulation) + cat."""
    L, qk, v = kv_lora_rank, qk_nope_head_dim, v_head_dim
    lat = cache.view(-1, cache.shape[-1]).index_select(0, slots).to(out_dtype)
    if kv_scale is not None:
        lat = lat * kv_scale.to(out_dtype)
    wd = w.to(torch.float32)
    if w_scale is not None:
        N = w.shape[0]
        wd = wd * w_scale.repeat_interleave(128, 0)[:N].repeat_interleave(128, 1)[:, :L]
    proj = lat[:, :L] @ wd.to(out_dtype).T
    total, H = lat.shape[0], w.shape[0] // (qk + v)
    proj = proj.view(total, H, qk + v)
    pe = lat[:, None, L:].expand(total, H, lat.shape[-1] - L)
    return torch.cat([proj[..., :qk], pe], dim=-1), proj[..., qk:]


def _check_close(name, x, ref):
    err = (x.float() - ref.float()).abs().max().item()
    tol = 4 * 2 ** -8 * ref.float().abs().max().item()  # two bf16 roundings of each side
    if not err <= tol:
        raise AssertionError(f"{name}: kernel differs from eager by {err:.3g} > {tol:.3g}")


def main(sweep: bool = False) -> None:
    from kernels.gather_kv_b_proj import Config, gather_kv_b_proj, gather_kv_b_proj_launch, pick_config
    rows = []
    for model, (H, L, P, qk, v) in MODELS.items():
        for cache_dtype, w_dtype, ws_kind in CASES:
            args, kw, slots = make_inputs(H, L, P, qk, v, cache_dtype, w_dtype, ws_kind)
            cache, ip, ids, cu, w = args
            k, vv = gather_kv_b_proj(*args, **kw)
            ek, ev = eager(cache, w, slots, **kw)
            _check_close(f"{model} k", k, ek)
            _check_close(f"{model} v", vv, ev)
            N = w.shape[0]
            flops = 2 * TOTAL * N * L
            bytes_ = (TOTAL * (L + P) * cache.element_size() + w.numel() * w.element_size()
                      + (kw["w_scale"].numel() * 4 if kw["w_scale"] is not None else 0)
                      + (k.numel() + vv.numel()) * k.element_size())
            peak = MATMUL_TFLOPS * (2 if (cache_dtype == FP8 and w_dtype == FP8) else 1)
            t_roof_ms = max(flops / (peak * 1e12), bytes_ / (COPY_TBPS * 1e12)) * 1e3
            bound = "flop" if flops / (peak * 1e12) >= bytes_ / (COPY_TBPS * 1e12) else "byte"
            configs = [None]
            if sweep:
                # bf16 x block-scaled fp8 runs as bf16 x bf16 (the weight tile dequantised)
                kind = "fp8" if cache_dtype == w_dtype == FP8 else "16-bit"
                configs += [Config(*c) for c in SWEEP[kind]]
            ms_e = bench_ms(lambda: eager(cache, w, slots, **kw))
            ms_eg = graph_ms(lambda: eager(cache, w, slots, **kw))
            for cfg in configs:
                try:
                    fn = (lambda: gather_kv_b_proj_launch(*args, **kw, config=cfg))
                    fn_total = (lambda: gather_kv_b_proj_launch(*args, **kw, total=TOTAL, config=cfg))
                    for f in (fn, fn_total):
                        ck, cv = f()
                        _check_close(f"{model} {cfg} k", ck, ek)
                        _check_close(f"{model} {cfg} v", cv, ev)
                    ms, ms_t, ms_g = bench_ms(fn), bench_ms(fn_total), graph_ms(fn_total)
                except AssertionError:
                    raise  # a config that computes a wrong answer stops the benchmark
                except Exception as e:  # a config that does not fit (shared memory) is skipped
                    print(f"skip {cfg}: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr)
                    continue
                rows.append(dict(
                    shape=f"{model} H{H} L{L} P{P} qk{qk} v{v} T{TOTAL}",
                    dtype=f"cache {_name(cache_dtype)} w {_name(w_dtype)}{'+' + ws_kind if ws_kind else ''}",
                    config="default" if cfg is None else "/".join(map(str, cfg)),
                    ms=ms, ms_total=ms_t, tflops=flops / ms_t * 1e-9, gbps=bytes_ / ms_t * 1e-6, bound=bound,
                    roof=t_roof_ms / ms_t, eager_ms=ms_e, speedup=ms_e / ms_t,
                    ms_graph=ms_g, roof_graph=t_roof_ms / ms_g, speedup_graph=ms_eg / ms_g))
    record(rows)


if __name__ == "__main__":
    main(sweep="--sweep" in sys.argv)
