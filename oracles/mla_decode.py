"""Oracle for `mla_decode` (SPEC.md section 2): MLA decode over a paged latent cache.

Per sequence b: gather its kv_lens[b] tokens through the page table (token t lives in page
kv_indices[kv_indptr[b] + t // page_size], slot t % page_size), dequantise (kv * kv_scale, any
cache dtype when a scale is given), then for every head
    s = sm_scale * q[b, h] . kv_t            over all L + P dims
    lse = log sum_t exp(s_t),  o = sum_t exp(s_t - lse) kv_t[:L].
kv_lens[b] == 0 gives o = 0 and lse = -inf. head_padding and num_kv_splits do not change the
math; they are validated as the kernel validates them. Outputs are in compute_dtype.

The score q . kv_t is a literal accumulation in compute_dtype: s = 0; s = s + q_i * kv_t,i for
i = 0 .. L + P - 1 in order, each product and each sum rounded to compute_dtype (vectorised over
tokens and heads, never a library dot or matmul). In float64 that is the golden score; in float32
it carries the accumulation error a float32 kernel really has. A library matmul would not: its
blocked, often pairwise-like sums can be nearly exact for a given input, and then the error budget
(2 * (max|reference - golden| + eps * max|golden|)) collapses where a score cancels
(|q . kv| << sum |q_i kv_i|, e.g. one token whose lse is that single score), failing kernels
whose float32 accumulation is perfectly ordinary. The softmax, lse and o = p @ kv[:, :L] follow
the formulas above in compute_dtype.
Limit: the reference's error is still one random sample per element, so an lse tensor of a single
element (B = 1, H = 1, one or two tokens) can still get a reference that is nearly exact by chance
(measured on the interpreter: 1 to 2.5% of such cases fail, none of 200 with 4 elements or 5
tokens); that is the per-tensor budget rule's limit, not this accumulation's.
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
    qc = q.cpu().to(cd)
    indptr, indices, lens = kv_indptr.cpu().tolist(), kv_indices.cpu().tolist(), kv_lens.cpu().tolist()
    for b in range(B):
        n = lens[b]
        pages = indices[indptr[b]:indptr[b + 1]]
        need(0 <= n <= len(pages) * page_size, ValueError,
             f"kv_lens: precondition kv_lens[{b}] <= pages * page_size broken ({n} > {len(pages)} * {page_size})")
        if n == 0:
            continue
        # [n, L + P] the sequence's tokens in order: token t in page pages[t // page_size], slot t % page_size
        t = torch.arange(n)
        kv = cache[torch.tensor(pages, dtype=torch.int64)[t // page_size], t % page_size]
        # [n, H] scores: the literal in-order accumulation over the L + P dims (module docstring)
        dot = torch.zeros(n, H, dtype=cd)
        for i in range(D):
            dot = dot + kv[:, i, None] * qc[b, None, :, i]
        s = scale_sm * dot
        m = s.max(dim=0).values
        e = torch.exp(s - m[None, :])
        den = e.sum(dim=0)
        lse[b] = m + torch.log(den)
        o[b] = (e / den[None, :]).transpose(0, 1) @ kv[:, :L]
    o, lse = o.to(dev), lse.to(dev)
    return (o, lse) if return_lse else o
