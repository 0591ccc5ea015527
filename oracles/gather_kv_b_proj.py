"""Oracle for gather_kv_b_proj (SPEC.md section 3), from the math, in float64 by default.

Token by token through the block table: token j of sequence b reads
cache[kv_indices[kv_indptr[b] + j // block_size], j % block_size]; c = kv_scale * latent,
pe = kv_scale * rope part; proj = (W * w_scale) @ c; k = [K-nope rows of each head | pe],
v = V rows of each head. Outputs are in compute_dtype, not rounded to out_dtype (float64 is exact
for the products; float32 is the working-precision reference of the error budget).
"""
from typing import Tuple

import torch

from oracles import _validate as val

FP8 = torch.float8_e4m3fn
CACHES = (torch.bfloat16, torch.float16, FP8)
WEIGHTS = (torch.bfloat16, torch.float16, FP8)
OUTS = (torch.bfloat16, torch.float16, torch.float32)
INDEX = (torch.int32, torch.int64)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def gather_kv_b_proj(kv_cache, kv_indptr, kv_indices, cu_kv_lens, w_kv_b, *, kv_lora_rank,
                     qk_nope_head_dim, v_head_dim, w_scale=None, kv_scale=None,
                     out_dtype=torch.bfloat16,
                     compute_dtype=torch.float64) -> Tuple[torch.Tensor, torch.Tensor]:
    L, QK, VD = kv_lora_rank, qk_nope_head_dim, v_head_dim
    # ---- validation: the same bad calls as the kernel, with the same exception types
    val.tensor("kv_cache", kv_cache, CACHES)
    val.need(kv_cache.dim() == 3, ValueError, f"kv_cache: expected rank 3, got shape {tuple(kv_cache.shape)}")
    dev = kv_cache.device
    val.integer("kv_lora_rank", L, lo=16, hi=1024, multiple_of=16)
    val.integer("qk_nope_head_dim", QK, lo=1, hi=512)
    val.integer("v_head_dim", VD, lo=1, hi=512)
    val.need(kv_cache.shape[1] >= 1, ValueError, f"kv_cache: expected block_size >= 1, got {tuple(kv_cache.shape)}")
    P = kv_cache.shape[2] - L
    val.need(0 <= P <= 128 and P % 2 == 0, ValueError,
             f"kv_cache: expected last dim L + P with P even in [0, 128], got {kv_cache.shape[2]} with L = {L}")
    val.tensor("kv_indptr", kv_indptr, INDEX, shape=(None,), device=dev)
    val.need(kv_indptr.shape[0] >= 1, ValueError, "kv_indptr: expected shape [B + 1], got an empty tensor")
    B = kv_indptr.shape[0] - 1
    val.tensor("kv_indices", kv_indices, INDEX, shape=(None,), device=dev)
    val.tensor("cu_kv_lens", cu_kv_lens, INDEX, shape=(B + 1,), device=dev)
    val.tensor("w_kv_b", w_kv_b, WEIGHTS, shape=(None, L), device=dev)
    N = w_kv_b.shape[0]
    val.need(N % (QK + VD) == 0, ValueError,
             f"w_kv_b: expected rows a multiple of qk_nope_head_dim + v_head_dim = {QK + VD}, got {N}")
    H = N // (QK + VD)
    if w_scale is not None:
        val.tensor("w_scale", w_scale, (torch.float32,), device=dev)
        nb = (_ceil_div(N, 128), _ceil_div(L, 128))
        val.need((w_scale.dim() == 1 and w_scale.shape[0] == N) or
                 (w_scale.dim() == 2 and tuple(w_scale.shape) == nb), ValueError,
                 f"w_scale: expected [{N}] or [{nb[0]}, {nb[1]}], got {tuple(w_scale.shape)}")
    val.scale("kv_scale", kv_scale, dev)
    val.need(out_dtype in OUTS, TypeError, f"out_dtype: expected one of {OUTS}, got {out_dtype!r}")
    total = int(cu_kv_lens[-1])
    val.need(total >= 0, ValueError, f"cu_kv_lens: expected a non-negative total, got {total}")

    # ---- the math
    cd = compute_dtype
    W = w_kv_b.to(cd)
    if w_scale is not None:
        if w_scale.dim() == 1:
            W = W * w_scale.to(cd)[:, None]
        else:  # block (r // 128, l // 128) of the absolute row r and column l
            rows = torch.arange(N, device=dev) // 128
            cols = torch.arange(L, device=dev) // 128
            W = W * w_scale.to(cd)[rows[:, None], cols[None, :]]
    s = kv_scale.to(cd).reshape(()) if kv_scale is not None else torch.ones((), dtype=cd, device=dev)
    bs = kv_cache.shape[1]
    lat = torch.zeros((total, L + P), dtype=cd, device=dev)
    indptr, indices, cu = kv_indptr.tolist(), kv_indices.tolist(), cu_kv_lens.tolist()
    for b in range(B):
        for j in range(cu[b + 1] - cu[b]):
            blk = indices[indptr[b] + j // bs]
            lat[cu[b] + j] = kv_cache[blk, j % bs].to(cd) * s
    proj = (lat[:, :L] @ W.T).reshape(total, H, QK + VD)  # [total, N] -> per head
    pe = lat[:, L:][:, None, :].expand(total, H, P)
    k = torch.cat([proj[:, :, :QK], pe], dim=-1)
    v = proj[:, :, QK:].contiguous()
    return k, v
