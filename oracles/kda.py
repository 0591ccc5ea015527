"""Kimi Delta Attention forward: the literal recurrence, token by token, per value head.

Per value head hv (reading q/k head hv // (HV // H)), for each token t of a sequence:
    (optional) q_t, k_t <- x / sqrt(sum x^2 + 1e-6)
    q_t <- q_t * scale                       (scale defaults to K ** -0.5)
    S   <- diag(exp(g_t)) S                  (S is [K, V], g_t is [K])
    S   <- S + beta_t k_t (v_t - S^T k_t)^T
    o_t <- S^T q_t
The state starts at initial_state[i] (or zeros) for each sequence i and resets at each cu_seqlens
boundary. Everything runs in compute_dtype (float64 by default: the golden result; float32 gives
the working-precision reference of the error budget). One function serves both kernel forms.
"""
import math

import torch

from oracles import _validate as val

_FLOATS = (torch.bfloat16, torch.float16, torch.float32)
_INDEX = (torch.int32, torch.int64)


def _check(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, use_qk_l2norm):
    val.tensor("q", q, _FLOATS)
    val.need(q.dim() == 4, ValueError, f"q: expected rank 4 [B, T, H, K], got shape {tuple(q.shape)}")
    B, T, H, K = q.shape
    dev = q.device
    val.tensor("k", k, (q.dtype,), (B, T, H, K), dev)
    val.tensor("v", v, (q.dtype,), (B, T, None, None), dev)
    HV, V = v.shape[2], v.shape[3]
    val.need(1 <= K <= 256, ValueError, f"K: expected 1 <= K <= 256, got {K}")
    val.need(1 <= V <= 256, ValueError, f"V: expected 1 <= V <= 256, got {V}")
    val.need(H >= 1 and HV >= 1, ValueError, f"heads: expected H, HV >= 1, got H={H}, HV={HV}")
    val.need(HV % H == 0, ValueError, f"v: expected HV to be a multiple of H={H}, got HV={HV}")
    val.tensor("g", g, (torch.float32,), (B, T, HV, K), dev)
    val.tensor("beta", beta, tuple({torch.float32, q.dtype}), (B, T, HV), dev)
    if scale is None:
        scale = 1.0 / math.sqrt(K)
    else:
        val.need(isinstance(scale, (int, float)) and not isinstance(scale, bool), TypeError,
                 f"scale: expected a float or None, got {type(scale).__name__}")
        val.need(math.isfinite(scale) and scale != 0, ValueError, f"scale: expected finite nonzero, got {scale}")
    for name, flag in (("output_final_state", output_final_state), ("use_qk_l2norm", use_qk_l2norm)):
        val.need(isinstance(flag, bool), TypeError, f"{name}: expected a bool, got {type(flag).__name__}")
    if cu_seqlens is not None:
        val.tensor("cu_seqlens", cu_seqlens, _INDEX, device=dev)
        val.need(cu_seqlens.dim() == 1 and cu_seqlens.shape[0] >= 1, ValueError,
                 f"cu_seqlens: expected shape [N + 1], got {tuple(cu_seqlens.shape)}")
        val.need(B == 1, ValueError, f"q: expected batch size 1 with cu_seqlens, got B={B}")
        N = cu_seqlens.shape[0] - 1
    else:
        N = B
    if initial_state is not None:
        val.tensor("initial_state", initial_state, (torch.float32,), (N, HV, K, V), dev)
    return B, T, H, HV, K, V, N, float(scale)


def kda(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False,
        cu_seqlens=None, use_qk_l2norm=False, compute_dtype=torch.float64):
    """Returns (o [B, T, HV, V], final_state [N, HV, K, V] or None), both in compute_dtype."""
    B, T, H, HV, K, V, N, scale = _check(q, k, v, g, beta, scale, initial_state, output_final_state,
                                         cu_seqlens, use_qk_l2norm)
    cd = compute_dtype
    if cu_seqlens is not None:
        bounds = [int(x) for x in cu_seqlens.tolist()]
        seqs = [(0, bounds[i], bounds[i + 1]) for i in range(N)]
    else:
        seqs = [(b, 0, T) for b in range(B)]
    q, k, v, g, beta = (x.to(cd) for x in (q, k, v, g, beta))
    o = torch.zeros((B, T, HV, V), dtype=cd, device=q.device)
    final = torch.zeros((N, HV, K, V), dtype=cd, device=q.device)
    group = HV // H
    for n, (b, bos, eos) in enumerate(seqs):
        for hv in range(HV):
            h = hv // group
            S = (initial_state[n, hv].to(cd) if initial_state is not None
                 else torch.zeros((K, V), dtype=cd, device=q.device))
            for t in range(bos, eos):
                q_t, k_t = q[b, t, h], k[b, t, h]
                if use_qk_l2norm:
                    q_t = q_t / torch.sqrt((q_t * q_t).sum() + 1e-6)
                    k_t = k_t / torch.sqrt((k_t * k_t).sum() + 1e-6)
                q_t = q_t * scale
                S = torch.exp(g[b, t, hv])[:, None] * S
                S = S + beta[b, t, hv] * torch.outer(k_t, v[b, t, hv] - S.T @ k_t)
                o[b, t, hv] = S.T @ q_t
            final[n, hv] = S
    return o, (final if output_final_state else None)


chunk_kda = kda
fused_recurrent_kda = kda
