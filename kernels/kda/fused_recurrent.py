"""KDA forward, token by token (the decode form): one program per (sequence, value head, V tile).

The float32 state S [K, V-tile] lives in registers for the whole sequence:
    S <- diag(exp(g_t)) S;  S <- S + beta_t k_t (v_t - S^T k_t)^T;  o_t = S^T q_t.
Value head hv reads q/k head hv // (HV // H) (GVA by index mapping, nothing repeated).
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from kernels._triton import cast_to, interpreting
from kernels.kda._common import check_kda_args, empty_result, load_state, pow2, store_state

L2_EPS = tl.constexpr(1e-6)  # q / sqrt(sum q^2 + 1e-6), as fla's l2norm (constexpr: usable in kernels)


@triton.jit
def _token_inputs(p_q, p_k, p_g, p_v, p_beta, t, m_t, m_k, m_v, scale, s_q_t, s_k_t, s_g_t, s_v_t, s_b_t,
                  USE_QK_L2NORM: tl.constexpr):
    """Token t's q (L2-normed if asked, scaled), k (L2-normed if asked), decay exp(g), v and beta,
    as float32; zeros where m_t is false (past the sequence's end)."""
    # [BK]
    b_q = tl.load(p_q + t * s_q_t, mask=m_k & m_t, other=0.0).to(tl.float32)
    b_k = tl.load(p_k + t * s_k_t, mask=m_k & m_t, other=0.0).to(tl.float32)
    b_g = tl.load(p_g + t * s_g_t, mask=m_k & m_t, other=0.0).to(tl.float32)
    # [BV]
    b_v = tl.load(p_v + t * s_v_t, mask=m_v & m_t, other=0.0).to(tl.float32)
    b_beta = tl.load(p_beta + t * s_b_t, mask=m_t, other=0.0).to(tl.float32)
    if USE_QK_L2NORM:
        b_q = b_q / tl.sqrt(tl.sum(b_q * b_q) + L2_EPS)
        b_k = b_k / tl.sqrt(tl.sum(b_k * b_k) + L2_EPS)
    # exp in float64, rounded once to float32: a float32 exp (the GPU's ex2.approx, numpy's under
    # the interpreter) is off by 1-2 ulp, and where the state's entries cancel (a result several
    # times smaller than the terms) that alone exceeds the float32 budget
    return b_q * scale, b_k, tl.exp(b_g.to(tl.float64)).to(tl.float32), b_v, b_beta


@triton.jit(do_not_specialize=["T", "HV", "K", "V", "GROUP"])
def _kda_recurrent_kernel(
    # pointers
    q, k, v, g, beta, o, h0, ht, cu_seqlens,
    # sizes and scalars
    scale, T, HV, K, V, GROUP,
    # strides (elements)
    s_q_b, s_q_t, s_q_h, s_q_k,
    s_k_b, s_k_t, s_k_h, s_k_k,
    s_v_b, s_v_t, s_v_h, s_v_v,
    s_g_b, s_g_t, s_g_h, s_g_k,
    s_b_b, s_b_t, s_b_h,
    s_h0_n, s_h0_h, s_h0_k, s_h0_v,
    # constexprs
    BK: tl.constexpr, BV: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr, STORE_FINAL_STATE: tl.constexpr,
    IS_VARLEN: tl.constexpr, USE_QK_L2NORM: tl.constexpr, EXACT_ROUNDING: tl.constexpr,
):
    i_v, i_nh = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    i_n, i_hv = i_nh // HV, i_nh % HV
    i_h = i_hv // GROUP  # GVA: contiguous groups of value heads share one q/k head
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
        i_b = i_n * 0
    else:
        bos = i_n * 0
        eos = bos + T
        i_b = i_n

    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    m_h = m_k[:, None] & m_v[None, :]

    # [BK, BV]
    b_h = load_state(h0, i_n, i_hv, o_k, o_v, m_h, s_h0_n, s_h0_h, s_h0_k, s_h0_v, BK, BV, USE_INITIAL_STATE)

    p_q = q + i_b * s_q_b + i_h * s_q_h + o_k * s_q_k
    p_k = k + i_b * s_k_b + i_h * s_k_h + o_k * s_k_k
    p_v = v + i_b * s_v_b + i_hv * s_v_h + o_v * s_v_v
    p_g = g + i_b * s_g_b + i_hv * s_g_h + o_k * s_g_k
    p_beta = beta + i_b * s_b_b + i_hv * s_b_h
    # o is allocated contiguous [B, T, HV, V]
    p_o = o + (i_b * T * HV + i_hv) * V + o_v
    # token t's inputs are loaded and prepared during token t - 1, off the state's dependency chain
    # (the loads, the L2 norms and exp(g) do not depend on the state)
    b_q, b_k, b_d, b_v, b_beta = _token_inputs(p_q, p_k, p_g, p_v, p_beta, bos, bos < eos, m_k, m_v, scale,
                                               s_q_t, s_k_t, s_g_t, s_v_t, s_b_t, USE_QK_L2NORM)
    for t in range(bos, eos):
        n_q, n_k, n_d, n_v, n_beta = _token_inputs(p_q, p_k, p_g, p_v, p_beta, t + 1, t + 1 < eos, m_k, m_v,
                                                   scale, s_q_t, s_k_t, s_g_t, s_v_t, s_b_t, USE_QK_L2NORM)
        b_h = b_h * b_d[:, None]
        # [BV] delta: beta (v - S^T k)
        b_u = b_beta * (b_v - tl.sum(b_h * b_k[:, None], 0))
        b_h += b_k[:, None] * b_u[None, :]
        b_o = tl.sum(b_h * b_q[:, None], 0)
        tl.store(p_o + t * HV * V, cast_to(b_o, o.dtype.element_ty, EXACT_ROUNDING), mask=m_v)
        b_q, b_k, b_d, b_v, b_beta = n_q, n_k, n_d, n_v, n_beta

    if STORE_FINAL_STATE:
        store_state(ht, b_h, i_n, i_hv, o_k, o_v, m_h, HV, K, V)


# (BV, num_warps) per padded head dim BK. A token's time is the latency of its dependent chain (the
# decay, the sum S^T k over K, the rank-1 update), so one warp (the K sums stay within its lanes,
# no shared-memory round trip) over a narrow V tile wins. `python -m bench.kda --recurrent-sweep`
# (H100, bf16, V = 128, ms): one sequence of 4096 tokens at HV 16, then decode (256 one-token
# sequences, HV 32, initial states), against the earlier (BV, warps) = (64, 4) below BK 128 and
# (32, 4) at 128:
#   BK 8: 3.78 / 0.078 against 5.10 / 0.133;  BK 16 (32, 2): 3.97 / 0.081 against 4.19 / 0.094;
#   BK 32: 3.11-3.15 / 0.080-0.136 against 5.69-5.80 / 0.137-0.149;
#   BK 64: 3.71-3.72 / 0.159-0.193 against 22.7-22.8 / 0.259-0.273;
#   BK 128: 4.62-4.63 / 0.323-0.413 against 4.79-4.80 / 0.325-0.438.
# BK 256 keeps (32, 8): 6.0 / 0.76-0.87; (32, 4) 5.8 / 0.66-0.93 and (16, 4) 5.2 / 0.81-0.95 trade
# one shape for the other. At BK 16, (16, 4) prefills in 3.49 but decodes in 0.214, and (32, 1)
# decodes in 0.070 but prefills in 4.52.
_CONFIGS = {8: (64, 1), 16: (32, 2), 32: (32, 1), 64: (16, 1), 128: (16, 1), 256: (32, 8)}


def _launch_config(K: int, V: int):
    """One config from the head dims: (BV, num_warps). The state tile is BK x BV float32."""
    BV, num_warps = _CONFIGS[max(8, pow2(K))]
    return min(BV, pow2(V)), num_warps


def fused_recurrent_kda(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                        beta: torch.Tensor, *, scale: Optional[float] = None,
                        initial_state: Optional[torch.Tensor] = None, output_final_state: bool = False,
                        cu_seqlens: Optional[torch.Tensor] = None, use_qk_l2norm: bool = False,
                        config: Optional[Tuple[int, int]] = None):
    """Kimi Delta Attention forward, recurrent (token by token) form.

    Args:
        q, k: [B, T, H, K] bf16/fp16/fp32, any strides. K <= 256.
        v: [B, T, HV, V], q's dtype, HV % H == 0; value head hv reads q/k head hv // (HV // H). V <= 256.
        g: [B, T, HV, K] float32 natural-log decay (<= 0; finite; -1000 is fine).
        beta: [B, T, HV] float32 or q's dtype.
        scale: multiplies q (after the optional L2 norm); default K ** -0.5.
        initial_state: None or [N, HV, K, V] float32; initial_state[i] belongs to sequence i.
        output_final_state: return the final state [N, HV, K, V] float32 (else None).
        cu_seqlens: None or [N + 1] int32/int64 prefix sums of the packed sequence lengths (B must
            be 1); the state resets at each boundary. N = B without it.
        use_qk_l2norm: divide q and k by sqrt(sum x^2 + 1e-6) in the kernel first.
        config: launch override (BV, num_warps) for benchmarks.

    Returns:
        (o [B, T, HV, V] in q's dtype, final_state [N, HV, K, V] float32 or None).
    """
    d = check_kda_args(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
                       use_qk_l2norm)
    if d.T == 0 or d.N == 0:
        return empty_result(q, v, d, initial_state, output_final_state)
    o = torch.empty((d.B, d.T, d.HV, d.V), dtype=q.dtype, device=q.device)
    ht = torch.empty((d.N, d.HV, d.K, d.V), dtype=torch.float32, device=q.device) if output_final_state else None
    BV, num_warps = config if config is not None else _launch_config(d.K, d.V)
    h0 = initial_state if initial_state is not None else o
    h0_strides = initial_state.stride() if initial_state is not None else (0, 0, 0, 0)
    grid = (triton.cdiv(d.V, BV), d.N * d.HV)
    _kda_recurrent_kernel[grid](
        q, k, v, g, beta, o, h0, ht if ht is not None else o,
        cu_seqlens if cu_seqlens is not None else o,
        d.scale, d.T, d.HV, d.K, d.V, d.HV // d.H,
        *q.stride(), *k.stride(), *v.stride(), *g.stride(), *beta.stride(), *h0_strides,
        BK=pow2(d.K), BV=BV,
        USE_INITIAL_STATE=initial_state is not None, STORE_FINAL_STATE=output_final_state,
        IS_VARLEN=cu_seqlens is not None, USE_QK_L2NORM=use_qk_l2norm,
        EXACT_ROUNDING=interpreting(), num_warps=num_warps,
    )
    return o, ht
