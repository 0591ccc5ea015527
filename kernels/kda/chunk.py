"""KDA forward, chunked (the prefill form), chunk size BT = 64, in three kernels.

Within a chunk (rows i, j in [0, BT)), with G_i = sum_{s <= i} g_s the per-channel cumulative decay:
    Akk[i, j] = beta_i sum_c k_ic k_jc exp(G_ic - G_jc)      for j < i
    Aqk[i, j] = scale sum_c q_ic k_jc exp(G_ic - G_jc)       for j <= i
    Y = (I + Akk)^-1                                          (unit lower triangular, forward substitution)
    w = Y (beta k exp(G)),  u = Y (beta v)                     (the WY / UT representation)
and with S the float32 state at the chunk's start:
    U = u - w S;  o = (q scale exp(G)) S + Aqk U;  S <- diag(exp(G_last)) S + (k exp(G_last - G))^T U.
Only decay differences exp(G_i - G_j) with i >= j are ever formed (all <= 1), so g = -1000 gives
no NaN/inf; and each difference is computed as the sum sum_{s=j+1}^{i} g_s, never as G_i - G_j
(two long cumulative sums of g = -1000 differ by a small decay with an absolute error of
~ulp(|G|), which would wreck exp of the difference). Off-diagonal 16 x 16 sub-blocks factor at the
sub-block's first row r: exp(sum_{s=r}^{i} g_s) exp(sum_{s=j+1}^{r-1} g_s), both factors <= 1, and run
on tensor cores; the diagonal sub-blocks are formed element by element.

Kernels: _kda_chunk_intra_kernel (Akk, Aqk; parallel over chunks x 16-row sub-blocks x heads),
_kda_chunk_wu_kernel (solve, w, u, q exp(G), k exp(G_last - G), exp(G_last); parallel over chunks x
heads), _kda_chunk_fwd_kernel (sequential over the chunks of one (sequence, value head, V tile),
float32 state in registers, writes o and the final state). Value head hv reads q/k head
hv // (HV // H). Intermediates are token-indexed [rows, HV, *]; with cu_seqlens a device-side
table maps each chunk slot to (sequence, chunk), so the launcher never synchronises.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from kernels._triton import cast_to, interpreting
from kernels.kda._common import check_kda_args, empty_result, load_state, pow2, store_state
from kernels.kda.fused_recurrent import fused_recurrent_kda

BT = 64  # chunk size
MIN_CHUNK_K = 8  # below this head dim chunk_kda runs the token-by-token form (see chunk_kda)
BC = 16  # sub-block rows of the intra-chunk kernel: NC = BT // BC sub-blocks per chunk


@triton.jit
def _chunk_coords(i_t, i_nh, chunk_indices, cu_seqlens, T, HV, GROUP, IS_VARLEN: tl.constexpr):
    """(i_b, i_n, i_hv, i_h, bos, eos, t0, row_base) for chunk slot i_t of program column i_nh."""
    if IS_VARLEN:
        i_n = tl.load(chunk_indices + i_t * 2).to(tl.int64)
        i_tl = tl.load(chunk_indices + i_t * 2 + 1).to(tl.int64)
        i_hv = i_nh
        i_b = i_n * 0
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
        row_base = i_b
    else:
        i_n = i_nh // HV
        i_hv = i_nh % HV
        i_tl = i_t
        i_b = i_n
        bos = i_n * 0
        eos = bos + T
        row_base = i_n * T
    i_h = i_hv // GROUP
    t0 = bos + i_tl * 64
    return i_b, i_n, i_hv, i_h, bos, eos, t0, row_base


@triton.jit(do_not_specialize=["T", "HV", "K", "GROUP"])
def _kda_chunk_intra_kernel(
    q, k, g, beta, Akk, Aqk, chunk_indices, cu_seqlens,
    scale, T, HV, K, GROUP,
    s_q_b, s_q_t, s_q_h, s_q_k,
    s_k_b, s_k_t, s_k_h, s_k_k,
    s_g_b, s_g_t, s_g_h, s_g_k,
    s_b_b, s_b_t, s_b_h,
    BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
    IS_VARLEN: tl.constexpr, USE_QK_L2NORM: tl.constexpr, DOT_PREC: tl.constexpr,
    EXACT_ROUNDING: tl.constexpr,
):
    NC: tl.constexpr = BT // BC
    i_tc, i_nh = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    i_t, i_c = i_tc // NC, i_tc % NC
    i_b, i_n, i_hv, i_h, bos, eos, t0, row_base = _chunk_coords(
        i_t, i_nh, chunk_indices, cu_seqlens, T, HV, GROUP, IS_VARLEN)
    r = i_c * BC  # first row of this sub-block within the chunk

    o_t = tl.arange(0, BT)
    o_i = tl.arange(0, BC)
    m_t = (t0 + o_t) < eos
    m_i = (t0 + r + o_i) < eos
    # clamp masked rows to the chunk's first row before forming pointers
    t_t = tl.where(m_t, t0 + o_t, bos)
    t_i = tl.where(m_i, t0 + r + o_i, bos)
    p_kf = k + i_b * s_k_b + i_h * s_k_h + t_t[:, None] * s_k_t
    p_ks = k + i_b * s_k_b + i_h * s_k_h + t_i[:, None] * s_k_t
    p_qs = q + i_b * s_q_b + i_h * s_q_h + t_i[:, None] * s_q_t
    p_gs = g + i_b * s_g_b + i_hv * s_g_h + t_i[:, None] * s_g_t

    # [BT], [BC]: reciprocal L2 norms of the chunk's k rows and the sub-block's q, k rows
    b_rkf = tl.full([BT], 1.0, dtype=tl.float32)
    b_rks = tl.full([BC], 1.0, dtype=tl.float32)
    b_rqs = tl.full([BC], 1.0, dtype=tl.float32)
    if USE_QK_L2NORM:
        b_skf = tl.zeros([BT], dtype=tl.float32)
        b_sks = tl.zeros([BC], dtype=tl.float32)
        b_sqs = tl.zeros([BC], dtype=tl.float32)
        for i_k in range(0, tl.cdiv(K, BK)):
            o_k = i_k * BK + tl.arange(0, BK)
            m_k = o_k < K
            b_kf = tl.load(p_kf + o_k[None, :] * s_k_k, mask=m_t[:, None] & m_k[None, :], other=0.0).to(tl.float32)
            b_ks = tl.load(p_ks + o_k[None, :] * s_k_k, mask=m_i[:, None] & m_k[None, :], other=0.0).to(tl.float32)
            b_qs = tl.load(p_qs + o_k[None, :] * s_q_k, mask=m_i[:, None] & m_k[None, :], other=0.0).to(tl.float32)
            b_skf += tl.sum(b_kf * b_kf, 1)
            b_sks += tl.sum(b_ks * b_ks, 1)
            b_sqs += tl.sum(b_qs * b_qs, 1)
        b_rkf = 1.0 / tl.sqrt(b_skf + 1e-6)
        b_rks = 1.0 / tl.sqrt(b_sks + 1e-6)
        b_rqs = 1.0 / tl.sqrt(b_sqs + 1e-6)

    # [BC, BT]
    b_Akk = tl.zeros([BC, BT], dtype=tl.float32)
    b_Aqk = tl.zeros([BC, BT], dtype=tl.float32)
    m_j = o_t < r  # columns in earlier sub-blocks
    # rows shifted by one (j + 1), kept while j + 1 < r: suffix sums over rows j + 1 .. r - 1
    m_j1 = ((o_t + 1) < r) & ((t0 + o_t + 1) < eos)
    t_j1 = tl.where(m_j1, t0 + o_t + 1, bos)
    p_gj1 = g + i_b * s_g_b + i_hv * s_g_h + t_j1[:, None] * s_g_t
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        # [BT, BK]
        b_kf = tl.load(p_kf + o_k[None, :] * s_k_k, mask=m_t[:, None] & m_k[None, :], other=0.0).to(tl.float32)
        b_kf = b_kf * b_rkf[:, None]
        b_gj1 = tl.load(p_gj1 + o_k[None, :] * s_g_k, mask=m_j1[:, None] & m_k[None, :], other=0.0).to(tl.float32)
        # decay sums are formed directly as sums over the rows between (never as differences of
        # two long cumulative sums, which would cancel): sum_{s=j+1}^{r-1} g_s
        b_Sj = tl.cumsum(b_gj1, 0, reverse=True)
        # [BC, BK]
        b_ks = tl.load(p_ks + o_k[None, :] * s_k_k, mask=m_i[:, None] & m_k[None, :], other=0.0).to(tl.float32)
        b_ks = b_ks * b_rks[:, None]
        b_qs = tl.load(p_qs + o_k[None, :] * s_q_k, mask=m_i[:, None] & m_k[None, :], other=0.0).to(tl.float32)
        b_qs = b_qs * b_rqs[:, None]
        b_gs = tl.load(p_gs + o_k[None, :] * s_g_k, mask=m_i[:, None] & m_k[None, :], other=0.0).to(tl.float32)

        # off-diagonal sub-blocks (j < r <= i): exp(G_i - G_j) = exp(sum_{s=r}^{i} g_s) * exp(sum_{s=j+1}^{r-1} g_s),
        # both factors <= 1
        # [BT, BK]
        b_kr = tl.where(m_j[:, None], b_kf * tl.exp(b_Sj), 0.0)
        # [BC, BK]
        b_es = tl.exp(tl.cumsum(b_gs, 0))
        b_Akk += tl.dot(b_ks * b_es, tl.trans(b_kr), input_precision=DOT_PREC)
        b_Aqk += tl.dot(b_qs * b_es, tl.trans(b_kr), input_precision=DOT_PREC)

        # diagonal sub-block, element by element: exp(sum_{s=j+1}^{i} g_s) for r <= j <= i
        for jj in range(0, BC):
            # [BK]
            b_kj = tl.sum(tl.where((o_i == jj)[:, None], b_ks, 0.0), 0)
            m_ij = (o_i >= jj)[:, None]
            # [BC, BK]
            b_Dj = tl.cumsum(tl.where((o_i > jj)[:, None], b_gs, 0.0), 0)
            b_d = tl.where(m_ij, tl.exp(b_Dj), 0.0) * b_kj[None, :]
            # [BC]
            b_akk = tl.where(o_i > jj, tl.sum(b_ks * b_d, 1), 0.0)
            b_aqk = tl.sum(b_qs * b_d, 1)
            m_col = (o_t == r + jj)[None, :]
            b_Akk += tl.where(m_col, b_akk[:, None], 0.0)
            b_Aqk += tl.where(m_col, b_aqk[:, None], 0.0)

    # [BC]
    b_beta = tl.load(beta + i_b * s_b_b + i_hv * s_b_h + t_i * s_b_t, mask=m_i, other=0.0).to(tl.float32)
    b_Akk = b_Akk * b_beta[:, None]
    b_Aqk = b_Aqk * scale
    # Akk, Aqk: contiguous [rows, HV, BT]
    o_row = ((row_base + t_i) * HV + i_hv) * BT
    m_s = m_i[:, None] & (o_t < BT)[None, :]
    tl.store(Akk + o_row[:, None] + o_t[None, :], b_Akk, mask=m_s)
    tl.store(Aqk + o_row[:, None] + o_t[None, :], cast_to(b_Aqk, Aqk.dtype.element_ty, EXACT_ROUNDING), mask=m_s)


@triton.jit(do_not_specialize=["T", "HV", "K", "V", "GROUP", "NT"])
def _kda_chunk_wu_kernel(
    q, k, v, g, beta, Akk, w, u, qg, kg, gl, chunk_indices, cu_seqlens,
    scale, T, HV, K, V, GROUP, NT,
    s_q_b, s_q_t, s_q_h, s_q_k,
    s_k_b, s_k_t, s_k_h, s_k_k,
    s_v_b, s_v_t, s_v_h, s_v_v,
    s_g_b, s_g_t, s_g_h, s_g_k,
    s_b_b, s_b_t, s_b_h,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    IS_VARLEN: tl.constexpr, USE_QK_L2NORM: tl.constexpr, DOT_PREC: tl.constexpr,
    EXACT_ROUNDING: tl.constexpr,
):
    i_t, i_nh = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    i_b, i_n, i_hv, i_h, bos, eos, t0, row_base = _chunk_coords(
        i_t, i_nh, chunk_indices, cu_seqlens, T, HV, GROUP, IS_VARLEN)
    if IS_VARLEN:
        i_slot = i_t
    else:
        i_slot = i_n * NT + i_t

    o_t = tl.arange(0, BT)
    m_t = (t0 + o_t) < eos
    t_t = tl.where(m_t, t0 + o_t, bos)
    o_row = (row_base + t_t) * HV + i_hv  # row of the token-indexed intermediates

    # Y = (I + Akk)^-1 by forward substitution on Z = Y - I:
    # Z[i] = -Akk[i] + sum_j (-Akk[i, j]) Z[j]   (rows j < i already final; Akk[i, j >= i] = 0)
    # [BT, BT]
    b_A = -tl.load(Akk + o_row[:, None] * BT + o_t[None, :], mask=m_t[:, None], other=0.0)
    for i in range(1, BT):
        m_r = (t0 + i) < eos
        # [BT]
        b_a = -tl.load(Akk + (o_row * 0 + (row_base + t0 + i) * HV + i_hv) * BT + o_t,
                       mask=m_r & (o_t < i), other=0.0)
        b_a = b_a + tl.sum(b_a[:, None] * b_A, 0)
        b_A = tl.where((o_t == i)[:, None], b_a[None, :], b_A)
    b_A += tl.where(o_t[:, None] == o_t[None, :], 1.0, 0.0)

    # [BT]
    b_beta = tl.load(beta + i_b * s_b_b + i_hv * s_b_h + t_t * s_b_t, mask=m_t, other=0.0).to(tl.float32)
    p_k = k + i_b * s_k_b + i_h * s_k_h + t_t[:, None] * s_k_t
    p_q = q + i_b * s_q_b + i_h * s_q_h + t_t[:, None] * s_q_t
    p_g = g + i_b * s_g_b + i_hv * s_g_h + t_t[:, None] * s_g_t
    # rows shifted by one, for the suffix sums sum_{s=i+1}^{last} g_s
    m_t1 = ((o_t + 1) < BT) & ((t0 + o_t + 1) < eos)
    p_g1 = g + i_b * s_g_b + i_hv * s_g_h + tl.where(m_t1, t0 + o_t + 1, bos)[:, None] * s_g_t
    b_rk = tl.full([BT], 1.0, dtype=tl.float32)
    b_rq = tl.full([BT], 1.0, dtype=tl.float32)
    if USE_QK_L2NORM:
        b_sk = tl.zeros([BT], dtype=tl.float32)
        b_sq = tl.zeros([BT], dtype=tl.float32)
        for i_k in range(0, tl.cdiv(K, BK)):
            o_k = i_k * BK + tl.arange(0, BK)
            m_tk = m_t[:, None] & (o_k < K)[None, :]
            b_k = tl.load(p_k + o_k[None, :] * s_k_k, mask=m_tk, other=0.0).to(tl.float32)
            b_q = tl.load(p_q + o_k[None, :] * s_q_k, mask=m_tk, other=0.0).to(tl.float32)
            b_sk += tl.sum(b_k * b_k, 1)
            b_sq += tl.sum(b_q * b_q, 1)
        b_rk = 1.0 / tl.sqrt(b_sk + 1e-6)
        b_rq = 1.0 / tl.sqrt(b_sq + 1e-6)
    b_rq = b_rq * scale

    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        m_tk = m_t[:, None] & m_k[None, :]
        # [BT, BK]
        b_k = tl.load(p_k + o_k[None, :] * s_k_k, mask=m_tk, other=0.0).to(tl.float32) * b_rk[:, None]
        b_q = tl.load(p_q + o_k[None, :] * s_q_k, mask=m_tk, other=0.0).to(tl.float32) * b_rq[:, None]
        b_g = tl.load(p_g + o_k[None, :] * s_g_k, mask=m_tk, other=0.0).to(tl.float32)
        b_G = tl.cumsum(b_g, 0)
        # [BK] decay over the whole (valid part of the) chunk
        b_Gl = tl.sum(b_g, 0)
        b_w = tl.dot(b_A, b_k * b_beta[:, None] * tl.exp(b_G), input_precision=DOT_PREC)
        b_qg = b_q * tl.exp(b_G)
        b_g1 = tl.load(p_g1 + o_k[None, :] * s_g_k, mask=m_t1[:, None] & m_k[None, :], other=0.0).to(tl.float32)
        # exp(G_last - G_i) as exp(sum_{s=i+1}^{last} g_s): a sum, not a difference of cumulative sums
        b_kg = b_k * tl.exp(tl.cumsum(b_g1, 0, reverse=True))
        p_out = o_row[:, None] * K + o_k[None, :]
        tl.store(w + p_out, cast_to(b_w, w.dtype.element_ty, EXACT_ROUNDING), mask=m_tk)
        tl.store(qg + p_out, cast_to(b_qg, qg.dtype.element_ty, EXACT_ROUNDING), mask=m_tk)
        tl.store(kg + p_out, cast_to(b_kg, kg.dtype.element_ty, EXACT_ROUNDING), mask=m_tk)
        tl.store(gl + (i_slot * HV + i_hv) * K + o_k, tl.exp(b_Gl), mask=m_k)

    p_v = v + i_b * s_v_b + i_hv * s_v_h + t_t[:, None] * s_v_t
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_tv = m_t[:, None] & (o_v < V)[None, :]
        # [BT, BV]
        b_v = tl.load(p_v + o_v[None, :] * s_v_v, mask=m_tv, other=0.0).to(tl.float32)
        b_u = tl.dot(b_A, b_v * b_beta[:, None], input_precision=DOT_PREC)
        tl.store(u + o_row[:, None] * V + o_v[None, :], cast_to(b_u, u.dtype.element_ty, EXACT_ROUNDING), mask=m_tv)


@triton.jit(do_not_specialize=["T", "HV", "K", "V", "NT"])
def _kda_chunk_fwd_kernel(
    w, u, qg, kg, gl, Aqk, o, h0, ht, cu_seqlens, chunk_offsets,
    T, HV, K, V, NT,
    s_h0_n, s_h0_h, s_h0_k, s_h0_v,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr, STORE_FINAL_STATE: tl.constexpr, IS_VARLEN: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, EXACT_ROUNDING: tl.constexpr,
):
    i_v, i_nh = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    i_n, i_hv = i_nh // HV, i_nh % HV
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
        slot0 = tl.load(chunk_offsets + i_n).to(tl.int64)
        row_base = i_n * 0
    else:
        bos = i_n * 0
        eos = bos + T
        slot0 = i_n * NT
        row_base = i_n * T
    DO = qg.dtype.element_ty  # operand dtype of the output dots

    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    m_h = m_k[:, None] & m_v[None, :]

    # [BK, BV]
    b_h = load_state(h0, i_n, i_hv, o_k, o_v, m_h, s_h0_n, s_h0_h, s_h0_k, s_h0_v, BK, BV, USE_INITIAL_STATE)

    for i_t in range(0, tl.cdiv(eos - bos, BT)):
        t0 = bos + i_t * BT
        m_t = (t0 + o_t) < eos
        o_row = (row_base + tl.where(m_t, t0 + o_t, bos)) * HV + i_hv
        m_tk = m_t[:, None] & m_k[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        # [BT, BK]
        b_w = tl.load(w + o_row[:, None] * K + o_k[None, :], mask=m_tk, other=0.0)
        b_kg = tl.load(kg + o_row[:, None] * K + o_k[None, :], mask=m_tk, other=0.0)
        b_qg = tl.load(qg + o_row[:, None] * K + o_k[None, :], mask=m_tk, other=0.0)
        # [BT, BV]
        b_u = tl.load(u + o_row[:, None] * V + o_v[None, :], mask=m_tv, other=0.0).to(tl.float32)
        # [BT, BT]
        b_Aqk = tl.load(Aqk + o_row[:, None] * BT + o_t[None, :], mask=m_t[:, None], other=0.0)
        # [BK]
        b_gl = tl.load(gl + ((slot0 + i_t) * HV + i_hv) * K + o_k, mask=m_k, other=0.0)
        # state path (U and the state update) in float32 operands at DOT_PREC; the output path in
        # DO (bf16 for bf16 inputs: tensor cores; float32 otherwise)
        # [BT, BV] the chunk's deltas: U = u - w S
        b_U = b_u - tl.dot(b_w, b_h, input_precision=DOT_PREC)
        b_ho = b_h.to(DO)
        b_Uo = b_U.to(DO)
        if UPCAST:
            b_qg, b_Aqk = b_qg.to(tl.float32), b_Aqk.to(tl.float32)
            b_ho, b_Uo = b_ho.to(tl.float32), b_Uo.to(tl.float32)
        b_o = tl.dot(b_qg, b_ho, input_precision=DOT_PREC) + tl.dot(b_Aqk, b_Uo, input_precision=DOT_PREC)
        # o is contiguous [B, T, HV, V]: its row index equals the intermediates'
        tl.store(o + o_row[:, None] * V + o_v[None, :], cast_to(b_o, o.dtype.element_ty, EXACT_ROUNDING), mask=m_tv)
        b_h = b_h * b_gl[:, None] + tl.dot(tl.trans(b_kg), b_U, input_precision=DOT_PREC)

    if STORE_FINAL_STATE:
        store_state(ht, b_h, i_n, i_hv, o_k, o_v, m_h, HV, K, V)


def _launch_config(K: int, V: int) -> dict:
    """One config from the head dims. BV tiles the state kernel; BK_I / BK_W / BV_W block the
    intra-chunk kernels' head-dim loops. Every dot dimension is at least 16 (the GPU's minimum)."""
    BK = dot_dim(K)
    # The state kernel runs BV = 64, unpipelined, whatever V is: on the GPU (H100 and H200, Triton
    # 3.6) every narrower V tile tried (16, 32; 1 or 2 stages) gave an illegal address or wrong
    # output on some shapes (K = 33 / V = 20 varlen, K = 64, K = 149, K = 255), while BV = 64 with
    # 1 stage passed all of them; the cause is not understood. Known so far (H100, the bench
    # shape): the interpreter computes BV 16 and 32 correctly; BV 32 faults with 4 warps as with
    # 8; it runs correctly with plain tf32 or ieee state dots (dot_prec config key) and faults
    # with 3xTF32, Triton's or written out as three tf32 dots on a hi/lo split. Moving the output
    # (the two bf16 dots) to a kernel of its own does not cure it: with the state path alone,
    # BV 32 ran the bench shape correctly (15.1 ms in all against 18.0 with BV 64) but faulted in
    # the fuzzed GPU tests (illegal memory access; H100). One stage also
    # keeps K = 256 with the float32 output path (fp16/fp32 inputs) inside shared memory.
    # The intra-chunk kernel runs 2 warps and the WY/UT kernel K steps of 32 (H100, T = 32768,
    # H = HV = 16, K = V = 128, bf16: 17.0 ms in all against 21.6 ms with 4 warps / BK 64; alone,
    # 2 intra warps 19.0 ms, BK_W 32 19.5 ms; 1 or 8 intra warps, 2 or 8 WY/UT warps and BV_W 32
    # were slower or no faster).
    return dict(BV=64, warps_fwd=4 if BK <= 64 else 8, stages_fwd=1,
                BK_I=min(BK, 64), warps_intra=2, BK_W=min(BK, 32), BV_W=max(16, min(pow2(V), 64)), warps_wu=4)


def dot_dim(n: int) -> int:
    """Block size of a dot dimension holding n: a power of two, at least 16."""
    return max(16, pow2(n))


def chunk_kda(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
              *, scale: Optional[float] = None, initial_state: Optional[torch.Tensor] = None,
              output_final_state: bool = False, cu_seqlens: Optional[torch.Tensor] = None,
              use_qk_l2norm: bool = False, config: Optional[dict] = None):
    """Kimi Delta Attention forward, chunked form (chunk size 64).

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
        config: launch override for benchmarks (keys of _launch_config, and dot_prec: the
            state-path dot precision, "tf32x3" for 16-bit inputs and "ieee" for float32).

    With K < MIN_CHUNK_K (8) it runs fused_recurrent_kda instead: the chunked solve is not accurate
    enough there (see the comment at the dispatch).

    Returns:
        (o [B, T, HV, V] in q's dtype, final_state [N, HV, K, V] float32 or None).

    Precision: the final state is a float32 output, so the state path (Akk, the solve, w, u,
    k exp(G_last - G), the state GEMMs) is float32 with 3xTF32 tensor-core dots (IEEE dots for
    float32 inputs). Only the output path (q exp(G), Aqk, and the o GEMMs) runs in bf16 for bf16
    inputs (fla keeps everything in bf16, which misses the float32 state budget by ~1e3x).
    """
    d = check_kda_args(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
                       use_qk_l2norm)
    if d.T == 0 or d.N == 0:
        return empty_result(q, v, d, initial_state, output_final_state)
    if d.K < MIN_CHUNK_K:
        # With K < 8 the 64 keys of a chunk are nearly collinear and the forward substitution of
        # the UT transform amplifies float32 rounding past the error budget (K = 4, no decay:
        # 1.02x-2x of it, where the token-by-token form stays at 0.2-0.4x); the recurrent form is
        # exact enough and cheap for a state this small.
        return fused_recurrent_kda(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                                   output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                                   use_qk_l2norm=use_qk_l2norm)
    cfg = _launch_config(d.K, d.V)
    if config is not None:
        cfg.update(config)
    dev = q.device
    B, T, HV, K, V, N = d.B, d.T, d.HV, d.K, d.V, d.N
    is_varlen = cu_seqlens is not None
    if is_varlen:
        # chunk slot -> (sequence, chunk within it), on the device; slots past the last chunk map to
        # an empty chunk of the last sequence and write nothing.
        lens = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64)
        counts = (lens + BT - 1) // BT
        ends = torch.cumsum(counts, 0)
        chunk_offsets = ends - counts
        NT = triton.cdiv(T, BT) + N  # upper bound on the total number of chunks
        slots = torch.arange(NT, device=dev, dtype=torch.int64)
        seq = torch.searchsorted(ends, slots, right=True).clamp_(max=N - 1)
        chunk_indices = torch.stack([seq, slots - chunk_offsets[seq]], 1).to(torch.int32)
        grid_cols, n_slots = HV, NT
    else:
        NT = triton.cdiv(T, BT)
        chunk_offsets = chunk_indices = None
        grid_cols, n_slots = B * HV, B * NT
    rows = B * T
    # the final state is a float32 output (budget eps(float32)): everything on the state path stays
    # float32; only the output path (q e^G, Aqk) drops to bf16 for bf16 inputs
    f32 = torch.float32
    o_path = torch.bfloat16 if q.dtype == torch.bfloat16 else f32
    dot_prec = cfg.get("dot_prec", "ieee" if q.dtype == f32 else "tf32x3")
    Akk = torch.empty((rows, HV, BT), dtype=f32, device=dev)
    Aqk = torch.empty((rows, HV, BT), dtype=o_path, device=dev)
    w = torch.empty((rows, HV, K), dtype=f32, device=dev)
    qg = torch.empty((rows, HV, K), dtype=o_path, device=dev)
    kg = torch.empty((rows, HV, K), dtype=f32, device=dev)
    u = torch.empty((rows, HV, V), dtype=f32, device=dev)
    gl = torch.empty((n_slots, HV, K), dtype=torch.float32, device=dev)
    o = torch.empty((B, T, HV, V), dtype=q.dtype, device=dev)
    ht = torch.empty((N, HV, K, V), dtype=torch.float32, device=dev) if output_final_state else None
    dummy = o
    ci = chunk_indices if is_varlen else dummy
    cs = cu_seqlens if is_varlen else dummy
    exact = interpreting()

    _kda_chunk_intra_kernel[(NT * (BT // BC), grid_cols)](
        q, k, g, beta, Akk, Aqk, ci, cs,
        d.scale, T, HV, K, HV // d.H,
        *q.stride(), *k.stride(), *g.stride(), *beta.stride(),
        BT=BT, BC=BC, BK=cfg["BK_I"], IS_VARLEN=is_varlen, USE_QK_L2NORM=use_qk_l2norm,
        DOT_PREC=dot_prec, EXACT_ROUNDING=exact, num_warps=cfg["warps_intra"],
    )
    _kda_chunk_wu_kernel[(NT, grid_cols)](
        q, k, v, g, beta, Akk, w, u, qg, kg, gl, ci, cs,
        d.scale, T, HV, K, V, HV // d.H, NT,
        *q.stride(), *k.stride(), *v.stride(), *g.stride(), *beta.stride(),
        BT=BT, BK=cfg["BK_W"], BV=cfg["BV_W"], IS_VARLEN=is_varlen, USE_QK_L2NORM=use_qk_l2norm,
        DOT_PREC=dot_prec, EXACT_ROUNDING=exact, num_warps=cfg["warps_wu"],
    )
    h0 = initial_state if initial_state is not None else dummy
    h0_strides = initial_state.stride() if initial_state is not None else (0, 0, 0, 0)
    BV = cfg["BV"]
    _kda_chunk_fwd_kernel[(triton.cdiv(V, BV), N * HV)](
        w, u, qg, kg, gl, Aqk, o, h0, ht if ht is not None else dummy, cs,
        chunk_offsets if is_varlen else dummy,
        T, HV, K, V, NT, *h0_strides,
        BT=BT, BK=dot_dim(K), BV=BV, USE_INITIAL_STATE=initial_state is not None,
        STORE_FINAL_STATE=output_final_state, IS_VARLEN=is_varlen,
        UPCAST=exact and o_path != f32, DOT_PREC=dot_prec, EXACT_ROUNDING=exact,
        num_warps=cfg["warps_fwd"], num_stages=cfg["stages_fwd"],
    )
    return o, ht
