"""Oracle for `mla_decode` (SPEC.md section 2): MLA decode over a paged latent cache.

Per sequence b: gather its kv_lens[b] tokens through the page table (token t lives in page
kv_indices[kv_indptr[b] + t // page_size], slot t % page_size), dequantise (kv * kv_scale, any
cache dtype when a scale is given), then for every head
    s = sm_scale * q[b, h] . kv_t            over all L + P dims
    lse = log sum_t exp(s_t),  o = sum_t exp(s_t - lse) kv_t[:L].
kv_lens[b] == 0 gives o = 0 and lse = -inf. head_padding and num_kv_splits do not change the
math; they are validated as the kernel validates them. Outputs are in compute_dtype.
"""
import math
from typing import Optional

import torch

from oracles._validate import integer, need, scale, tensor

FP8 = torch.float8_e4m3fn
INDEX = (torch.int32, torch.int64)


def mla_decode(q, kv_cache, kv_indptr, kv_indices, kv_lens, *, kv_lora_rank, sm_scale=None,
               kv_scale=None, num_kv_splits=None, head_padding="auto", return_lse=False,
               compute_dtype: torch.dtype = torch.float64):
    """Reference of kernels.mla_decode.mla_decode; returns o [B, H, L] (and lse [B, H]) in compute_dtype."""
    tensor("q", q, (torch.bfloat16, torch.float16), shape=(None, None, None))
    dev = q.device
    B, H, D = q.shape
    integer("kv_lora_rank", kv_lora_rank, lo=16, hi=1024, multiple_of=16)
    L = kv_lora_rank
    P = D - L
    need(0 <= P <= 128 and P % 2 == 0, ValueError,
         f"q: expected last dim kv_lora_rank + P with P even in [0, 128], got {D} with kv_lora_rank {L}")
    tensor("kv_cache", kv_cache, (q.dtype, FP8), shape=(None, None, D), device=dev)
    page_size = kv_cache.shape[1]
    need(page_size >= 1, ValueError, f"kv_cache: expected page_size >= 1, got shape {tuple(kv_cache.shape)}")
    tensor("kv_indptr", kv_indptr, INDEX, shape=(B + 1,), device=dev)
    tensor("kv_indices", kv_indices, INDEX, shape=(None,), device=dev)
    tensor("kv_lens", kv_lens, INDEX, shape=(B,), device=dev)
    if sm_scale is not None:
        need(isinstance(sm_scale, (int, float)) and not isinstance(sm_scale, bool), TypeError,
             f"sm_scale: expected a float or None, got {sm_scale!r}")
        need(math.isfinite(sm_scale), ValueError, f"sm_scale: expected a finite float, got {sm_scale!r}")
    scale("kv_scale", kv_scale, dev)
    if num_kv_splits is not None:
        integer("num_kv_splits", num_kv_splits, lo=1, hi=64)
    need(head_padding in ("auto", "pad", "mask"), ValueError,
         f"head_padding: expected one of ['auto', 'pad', 'mask'], got {head_padding!r}")
    need(isinstance(return_lse, bool), TypeError, f"return_lse: expected a bool, got {return_lse!r}")
    need(head_padding != "pad" or (H >= 1 and 16 % H == 0), ValueError,
         f"head_padding: 'pad' needs a head count dividing 16, got H = {H}")

    cd = compute_dtype
    scale_sm = torch.tensor(1.0 / math.sqrt(L + P) if sm_scale is None else float(sm_scale), dtype=cd)
    o = torch.zeros(B, H, L, dtype=cd)
    lse = torch.full((B, H), float("-inf"), dtype=cd)
    cache = kv_cache.cpu().to(cd)
    if kv_scale is not None:
        cache = cache * kv_scale.cpu().to(cd).reshape(())
    indptr, indices, lens = kv_indptr.cpu().tolist(), kv_indices.cpu().tolist(), kv_lens.cpu().tolist()
    for b in range(B):
        n = lens[b]
        pages = indices[indptr[b]:indptr[b + 1]]
        need(0 <= n <= len(pages) * page_size, ValueError,
             f"kv_lens: precondition kv_lens[{b}] <= pages * page_size broken ({n} > {len(pages)} * {page_size})")
        if n == 0:
            continue
        # [n, L + P] the sequence's tokens in order
        kv = torch.stack([cache[pages[t // page_size], t % page_size] for t in range(n)])
        for h in range(H):
            s = scale_sm * (kv @ q[b, h].cpu().to(cd))
            m = s.max()
            e = torch.exp(s - m)
            lse[b, h] = m + torch.log(e.sum())
            o[b, h] = (e / e.sum()) @ kv[:, :L]
    o, lse = o.to(dev), lse.to(dev)
    return (o, lse) if return_lse else o
