"""Benchmark qkv_norm_rope_cache on the GPU: achieved GB/s against the measured copy ceiling of the
device (3.0 TB/s H100, 4.3 TB/s H200) and
the speedup over the same computation in eager PyTorch.

Bytes count each byte read and written once: qkv, the two norm weights, the cos/sin rows of the
positions used, positions and slots (read); q, k, v and the K/V cache rows (written).
Run from the repository root: python -m bench.qkv_norm_rope_cache
"""
import argparse

import torch

from bench.timing import bench_ms, ceilings, device_name, record
from kernels.qkv_norm_rope_cache import qkv_norm_rope_cache

SHAPES = [  # Qwen3-8B-like: qh 32, kvh 8, D 128; prefill and decode-like token counts
    dict(T=16384, qh=32, kvh=8, D=128, block_size=16),
    dict(T=64, qh=32, kvh=8, D=128, block_size=16),
]


def eager(qkv, qw, kw, cos, sin, positions, key_cache, value_cache, slots, qh, kvh, D, eps=1e-6):
    """The same computation as separate PyTorch ops (NHD cache, NeoX, full rotary)."""
    T = qkv.shape[0]
    q, k, v = qkv.split([qh * D, kvh * D, kvh * D], dim=1)
    q, k, v = q.reshape(T, qh, D), k.reshape(T, kvh, D), v.reshape(T, kvh, D)

    def norm(x, w):
        x32 = x.float()
        return x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * w.float()

    c, s = cos[positions][:, None, :], sin[positions][:, None, :]

    def rope(x):
        a, b = x[..., : D // 2], x[..., D // 2:]
        return torch.cat([a * c - b * s, b * c + a * s], dim=-1)

    q = rope(norm(q, qw)).to(qkv.dtype)
    k = rope(norm(k, kw)).to(qkv.dtype)
    valid = (slots >= 0) & (slots < key_cache.shape[0] * key_cache.shape[1])
    idx = torch.where(valid, slots, 0)
    kc = key_cache.view(-1, kvh, D)
    vc = value_cache.view(-1, kvh, D)
    kc.index_copy_(0, idx[valid], k[valid])
    vc.index_copy_(0, idx[valid], v.contiguous()[valid])
    return q, k, v


def make(T, qh, kvh, D, block_size, dtype=torch.bfloat16, device="cuda"):
    g = torch.Generator(device=device).manual_seed(0)
    qkv = torch.randn(T, (qh + 2 * kvh) * D, device=device, dtype=dtype, generator=g)
    qw = torch.rand(D, device=device, dtype=dtype, generator=g) + 0.5
    kw = torch.rand(D, device=device, dtype=dtype, generator=g) + 0.5
    max_pos = max(T, 4096)
    inv = 1e6 ** (-torch.arange(0, D, 2, device=device, dtype=torch.float64) / D)
    ang = torch.arange(max_pos, device=device, dtype=torch.float64)[:, None] * inv[None]
    cos, sin = ang.cos().float(), ang.sin().float()
    positions = torch.randperm(max_pos, device=device, generator=g)[:T]
    num_blocks = (T + block_size - 1) // block_size + 1
    kc = torch.zeros(num_blocks, block_size, kvh, D, device=device, dtype=dtype)
    vc = torch.zeros_like(kc)
    slots = torch.randperm(num_blocks * block_size, device=device, generator=g)[:T]
    return qkv, qw, kw, cos, sin, positions, kc, vc, slots


def bytes_moved(T, qh, kvh, D, esize=2):
    width = (qh + 2 * kvh) * D
    read = T * width * esize + 2 * D * esize + T * D * 4 + 2 * T * 8   # qkv, weights, cos+sin rows (R/2 each), pos, slots
    written = T * width * esize + T * 2 * kvh * D * esize              # q, k, v, cache rows
    return read + written


def run(shapes, warps=(None,)):
    rows = []
    for sh in shapes:
        T, qh, kvh, D = sh["T"], sh["qh"], sh["kvh"], sh["D"]
        x = make(**sh)
        kw = dict(num_q_heads=qh, num_kv_heads=kvh, head_dim=D)
        # correctness against eager once, before timing
        ref_kc, ref_vc = x[6].clone(), x[7].clone()
        q_ref, k_ref, _ = eager(*x[:6], ref_kc, ref_vc, x[8], qh, kvh, D)
        q, k, v = qkv_norm_rope_cache(*x, **kw)
        for name, a, b in (("q", q, q_ref), ("k", k, k_ref), ("key_cache", x[6], ref_kc), ("value_cache", x[7], ref_vc)):
            err = (a.float() - b.float()).abs().max().item()
            scale = b.float().abs().max().item()
            if not err <= 2 * 2 ** -8 * scale + 1e-6:
                raise SystemExit(f"bench check failed: {name} max error {err} (max |ref| {scale}) at {sh}")
        for nw in warps:
            ms = bench_ms(lambda: qkv_norm_rope_cache(*x, **kw, num_warps=nw))
            gbs = bytes_moved(T, qh, kvh, D) / ms / 1e6
            ms_eager = bench_ms(lambda: eager(*x, qh, kvh, D))
            rows.append(dict(op="qkv_norm_rope_cache", shape=f"T={T} qh={qh} kvh={kvh} D={D} bs={sh['block_size']} bf16 NHD",
                             warps=nw or 4, ms=ms, GBps=gbs, of_copy_ceiling=gbs / (ceilings()[0] * 1e3),
                             eager_ms=ms_eager, speedup=ms_eager / ms, device=device_name()))
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--sweep", action="store_true", help="also sweep num_warps")
    a = p.parse_args()
    record(run(SHAPES, warps=(None, 2, 8) if a.sweep else (None,)))


if __name__ == "__main__":
    main()
