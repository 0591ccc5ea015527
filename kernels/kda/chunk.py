"""KDA forward, chunked (the prefill form), chunk size BT = 64, in four kernels.

Within a chunk (rows i, j in [0, BT)), with G_i = sum_{s <= i} g_s the per-channel cumulative decay:
    Akk[i, j] = beta_i sum_c k_ic k_jc exp(G_ic - G_jc)      for j < i
    Aqk[i, j] = scale sum_c q_ic k_jc exp(G_ic - G_jc)       for j <= i
    Y = (I + Akk)^-1                (unit lower triangular: 16 x 16 diagonal blocks inverted, then combined)
    w = Y (beta k exp(G)),  u = Y (beta v)                     (the WY / UT representation)
and with S the float32 state at the chunk's start:
    U = u - w S;  o = (q scale exp(G)) S + Aqk U;  S <- diag(exp(G_last)) S + (k exp(G_last - G))^T U.
Only decay differences exp(G_i - G_j) with i >= j are ever formed (all <= 1), so g = -1000 gives
no NaN/inf; and each difference is computed as the sum sum_{s=j+1}^{i} g_s, never as G_i - G_j
(two long cumulative sums of g = -1000 differ by a small decay with an absolute error of
~ulp(|G|), which would wreck exp of the difference). Off-diagonal 16 x 16 sub-blocks factor into a
sum within row i's sub-block, the total decays of the sub-blocks between, and a sum within row j's
sub-block (every factor <= 1), and run on tensor cores; the diagonal sub-blocks are formed element
by element (all pairs of rows at once).

Kernels, in launch order: _kda_chunk_diag_kernel (the diagonal 16 x 16 sub-blocks of Aqk and of Akk,
the latter stored inverted, and with use_qk_l2norm the rows' q and k norms; parallel over chunks x
16-row sub-blocks x heads),
_kda_chunk_offdiag_kernel (the rest of Akk and Aqk, and k exp(G_last - G) from the same decayed
keys; parallel over chunks x heads), _kda_chunk_wu_kernel (solve, w, u, q exp(G), exp(G_last);
parallel over chunks x heads), _kda_chunk_fwd_kernel (sequential over the chunks of one (sequence,
value head, V tile), float32 state in registers as row blocks of 64, writes o and the final
state). Value head hv reads q/k head hv // (HV // H). Intermediates are head-major [HV, rows, *]
(a chunk's tile is contiguous), their row widths padded to powers of two (whole state-kernel
tiles); k exp(G_last - G) is stored transposed per chunk slot, [slots, HV, KS, 64] (the state
update's A operand, K-major); with cu_seqlens a device-side table maps each chunk slot to
(sequence, chunk), so the launcher never synchronises.
"""
import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from kernels._triton import cast_to, interpreting, round_bits
from kernels.kda._common import check_kda_args, empty_result, load_state, pow2, store_state
from kernels.kda.fused_recurrent import L2_EPS, fused_recurrent_kda

BT = 64  # chunk size
MIN_CHUNK_K = 32  # below this head dim chunk_kda runs the token-by-token form (see chunk_kda)
BC = 16  # sub-block rows of the diagonal and off-diagonal kernels: BT // BC sub-blocks per chunk
INTERPRETER_SMS = 8  # SM count the launch config assumes for CPU tensors (the interpreter)


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


@triton.jit
def _chunk_slot(i_t, i_n, NT, IS_VARLEN: tl.constexpr):
    """Row of chunk slot i_t (sequence i_n) in the per-slot intermediates, k exp(G_last - G) and
    exp(G_last): the slot itself with cu_seqlens, else i_n * NT + i_t."""
    if IS_VARLEN:
        return i_t
    else:
        return i_n * NT + i_t


@triton.jit(do_not_specialize=["T", "HV", "GROUP", "R"])
def _kda_chunk_diag_kernel(
    q, k, g, beta, Akk, Aqk, nrm, chunk_indices, cu_seqlens,
    scale, T, HV, K, GROUP, R,
    s_q_b, s_q_t, s_q_h, s_q_k,
    s_k_b, s_k_t, s_k_h, s_k_k,
    s_g_b, s_g_t, s_g_h, s_g_k,
    s_b_b, s_b_t, s_b_h,
    BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BKN: tl.constexpr,
    IS_VARLEN: tl.constexpr, USE_QK_L2NORM: tl.constexpr, EXACT_ROUNDING: tl.constexpr,
):
    """The diagonal sub-block of rows [r, r + BC) of a chunk's Akk and Aqk (columns r .. r + BC - 1),
    element by element, Akk's stored as (I + Akk_d)^-1 - I (the WY/UT kernel's solve needs only
    that), and with USE_QK_L2NORM the rows' reciprocal q and k norms (nrm), which the off-diagonal
    and WY/UT kernels read (so this kernel runs first)."""
    NC: tl.constexpr = BT // BC
    i_tc, i_nh = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    i_t, i_c = i_tc // NC, i_tc % NC
    i_b, i_n, i_hv, i_h, bos, eos, t0, row_base = _chunk_coords(
        i_t, i_nh, chunk_indices, cu_seqlens, T, HV, GROUP, IS_VARLEN)
    r = i_c * BC  # first row of this sub-block within the chunk

    o_i = tl.arange(0, BC)
    m_i = (t0 + r + o_i) < eos
    # clamp masked rows to the chunk's first row before forming pointers
    t_i = tl.where(m_i, t0 + r + o_i, bos)
    p_ks = k + i_b * s_k_b + i_h * s_k_h + t_i[:, None] * s_k_t
    p_qs = q + i_b * s_q_b + i_h * s_q_h + t_i[:, None] * s_q_t
    p_gs = g + i_b * s_g_b + i_hv * s_g_h + t_i[:, None] * s_g_t

    # [BC] reciprocal L2 norms of the sub-block's q and k rows
    b_rks = tl.full([BC], 1.0, dtype=tl.float32)
    b_rqs = tl.full([BC], 1.0, dtype=tl.float32)
    if USE_QK_L2NORM:
        b_sks = tl.zeros([BC], dtype=tl.float32)
        b_sqs = tl.zeros([BC], dtype=tl.float32)
        # column steps of BKN = 64, not BK (H100, HV 16: diagonal kernel 0.775 -> 0.751 ms; 32: 0.836,
        # 128: 1.015, with spills)
        for i_k in range(0, tl.cdiv(K, BKN)):
            o_k = i_k * BKN + tl.arange(0, BKN)
            m_k = o_k < K
            b_ks = tl.load(p_ks + o_k[None, :] * s_k_k, mask=m_i[:, None] & m_k[None, :], other=0.0).to(tl.float32)
            b_qs = tl.load(p_qs + o_k[None, :] * s_q_k, mask=m_i[:, None] & m_k[None, :], other=0.0).to(tl.float32)
            b_sks += tl.sum(b_ks * b_ks, 1)
            b_sqs += tl.sum(b_qs * b_qs, 1)
        b_rks = 1.0 / tl.sqrt(b_sks + L2_EPS)
        b_rqs = 1.0 / tl.sqrt(b_sqs + L2_EPS)
        # nrm [2, HV, rows]: k's, then q's
        tl.store(nrm + i_hv * R + row_base + t_i, b_rks, mask=m_i)
        tl.store(nrm + (HV + i_hv) * R + row_base + t_i, b_rqs, mask=m_i)

    # [BC, BC, BK] per-channel terms of the diagonal sub-block; summed over the channels after the
    # loop (a sum across lanes)
    b_Akk_d3 = tl.zeros([BC, BC, BK], dtype=tl.float32)
    b_Aqk_d3 = tl.zeros([BC, BC, BK], dtype=tl.float32)
    o_j = tl.arange(0, BC)
    m_lt = o_i[:, None] > o_j[None, :]
    m_le = o_i[:, None] >= o_j[None, :]
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        # [BC, BK]
        b_ks = tl.load(p_ks + o_k[None, :] * s_k_k, mask=m_i[:, None] & m_k[None, :], other=0.0).to(tl.float32)
        b_ks = b_ks * b_rks[:, None]
        b_qs = tl.load(p_qs + o_k[None, :] * s_q_k, mask=m_i[:, None] & m_k[None, :], other=0.0).to(tl.float32)
        b_qs = b_qs * b_rqs[:, None]
        b_gs = tl.load(p_gs + o_k[None, :] * s_g_k, mask=m_i[:, None] & m_k[None, :], other=0.0).to(tl.float32)
        # all (i, j) pairs at once: E[i, j, c] = exp(sum_{s=j+1}^{i} g_sc) = prod_{s=j+1}^{i} exp(g_sc)
        # for j <= i, a cumulative product down i of exp(g) set to 1 on rows i <= j (so E <= 1;
        # pairs j > i are masked after the loop)
        # [BC, BC, BK]
        b_E = tl.cumprod(tl.where(m_lt[:, :, None], tl.exp(b_gs)[:, None, :], 1.0), 0) * b_ks[None, :, :]
        b_Akk_d3 += b_ks[:, None, :] * b_E
        b_Aqk_d3 += b_qs[:, None, :] * b_E

    # [BC]
    b_beta = tl.load(beta + i_b * s_b_b + i_hv * s_b_h + t_i * s_b_t, mask=m_i, other=0.0).to(tl.float32)
    # Akk, Aqk: head-major [HV, rows, BT]
    o_row = (i_hv * R + row_base + t_i) * BT
    # [BC, BC]
    b_Akk_d = tl.sum(b_Akk_d3, 2)
    b_Aqk_d = tl.sum(b_Aqk_d3, 2)
    b_Akk_d = tl.where(m_lt, b_Akk_d, 0.0) * b_beta[:, None]
    b_Aqk_d = tl.where(m_le, b_Aqk_d, 0.0) * scale
    m_d = m_i[:, None] & (o_j < BC)[None, :]
    # Akk's diagonal block is only needed inverted: Z = (I + Akk_d)^-1 - I (strictly lower) goes in
    # its place. Here it runs on a program per sub-block (H100, HV 16: this kernel 0.77 -> 0.82 ms);
    # the WY/UT kernel's forward substitution of BC - 1 dependent steps took it 0.29 (1.37 -> 1.08)
    b_Zd = tl.where(m_lt, _unit_lower_inverse(b_Akk_d, BC), 0.0)
    tl.store(Akk + o_row[:, None] + r + o_j[None, :], b_Zd, mask=m_d)
    tl.store(Aqk + o_row[:, None] + r + o_j[None, :], cast_to(b_Aqk_d, Aqk.dtype.element_ty, EXACT_ROUNDING),
             mask=m_d)


@triton.jit
def _unit_lower_inverse(b_L, BC: tl.constexpr):
    """(I + L)^-1 [BC, BC] for a strictly lower L (BC a power of two), by doubling the size of the
    solved diagonal blocks: with Ya, Yb the inverses of two adjacent diagonal blocks of s rows,
        [[I + La, 0], [C, I + Lb]]^-1 = [[Ya, 0], [-Yb C Ya, Yb]],
    in whole-tile form Y <- Y - Y C Y with C the lower-left s x s blocks of the 2s-row groups
    (Y C Y falls exactly there). Exact float32 products (FMA dots), no series in powers of L: the
    intermediates are blocks of the inverse itself, as in a substitution. 2 log2(BC) - 2 products
    of BC x BC, in place of BC - 1 dependent substitution steps."""
    o_i = tl.arange(0, BC)
    # [BC, BC] s = 1: Y = I - C
    b_Y = tl.where(o_i[:, None] == o_i[None, :], 1.0, 0.0) - tl.where(
        (o_i[:, None] // 2 == o_i[None, :] // 2) & (o_i[:, None] % 2 == 1) & (o_i[None, :] % 2 == 0), b_L, 0.0)
    for lvl in tl.static_range(1, BC.bit_length() - 1):
        s = 1 << lvl
        m_c = (o_i[:, None] // (2 * s) == o_i[None, :] // (2 * s)) & ((o_i[:, None] // s) % 2 == 1) & (
            (o_i[None, :] // s) % 2 == 0)
        b_C = tl.where(m_c, b_L, 0.0)
        b_Y = b_Y - tl.dot(tl.dot(b_Y, b_C, input_precision="ieee"), b_Y, input_precision="ieee")
    return b_Y


@triton.jit
def _offdiag_rows(q, k, g, nrm, i_b, i_h, i_hv, bos, eos, t0, row_base, R, HV, o_k, m_k, r,
                  s_q_b, s_q_t, s_q_h, s_q_k, s_k_b, s_k_t, s_k_h, s_k_k, s_g_b, s_g_t, s_g_h, s_g_k,
                  BC: tl.constexpr, USE_QK_L2NORM: tl.constexpr, SPLIT: tl.constexpr):
    """Sub-block rows [r, r + BC), head-dim columns o_k: the B operand of the off-diagonal product,
    [BK, 2 BC] = (k e^P beside q e^P)^T split for 3xTF32, with P_i = sum_{s=r}^{i} g_s (<= 0), and
    the sub-block's total decay exp(sum_{s=r}^{r+BC-1} g_s) [BK]."""
    o_i = tl.arange(0, BC)
    m_i = (t0 + r + o_i) < eos
    t_i = tl.where(m_i, t0 + r + o_i, bos)
    m_ik = m_i[:, None] & m_k[None, :]
    # [BC, BK]
    b_ks = tl.load(k + i_b * s_k_b + i_h * s_k_h + t_i[:, None] * s_k_t + o_k[None, :] * s_k_k, mask=m_ik,
                   other=0.0).to(tl.float32)
    b_qs = tl.load(q + i_b * s_q_b + i_h * s_q_h + t_i[:, None] * s_q_t + o_k[None, :] * s_q_k, mask=m_ik,
                   other=0.0).to(tl.float32)
    b_gs = tl.load(g + i_b * s_g_b + i_hv * s_g_h + t_i[:, None] * s_g_t + o_k[None, :] * s_g_k, mask=m_ik,
                   other=0.0).to(tl.float32)
    if USE_QK_L2NORM:
        # [BC] the rows' reciprocal norms (written by the diagonal kernel)
        b_ks = b_ks * tl.load(nrm + i_hv * R + row_base + t_i, mask=m_i, other=0.0)[:, None]
        b_qs = b_qs * tl.load(nrm + (HV + i_hv) * R + row_base + t_i, mask=m_i, other=0.0)[:, None]
    b_es = tl.exp(tl.cumsum(b_gs, 0))
    # [BK, 2 BC] (k e^P) beside (q e^P), transposed
    b_l2 = tl.reshape(tl.permute(tl.join(b_ks * b_es, b_qs * b_es), (1, 2, 0)), (b_ks.shape[1], 2 * BC))
    l2_hi, l2_lo = _split(b_l2, SPLIT)
    return l2_hi, l2_lo, tl.exp(tl.sum(b_gs, 0))


@triton.jit
def _offdiag_store(Akk, Aqk, beta, b_A2t, i_b, i_hv, s_b_b, s_b_t, s_b_h, bos, eos, t0, row_base, R, r, scale,
                   BT: tl.constexpr, BC: tl.constexpr, EXACT_ROUNDING: tl.constexpr):
    """Write rows [r, r + BC) of Akk and Aqk outside their diagonal sub-block from b_A2t [BT, 2 BC]
    (columns j against the rows' k, then q; zero for j >= r)."""
    o_t = tl.arange(0, BT)
    o_i = tl.arange(0, BC)
    m_i = (t0 + r + o_i) < eos
    t_i = tl.where(m_i, t0 + r + o_i, bos)
    # [BC, BT]
    b_Akk, b_Aqk = tl.split(tl.permute(tl.reshape(tl.trans(b_A2t), (2, BC, BT)), (1, 2, 0)))
    b_beta = tl.load(beta + i_b * s_b_b + i_hv * s_b_h + t_i * s_b_t, mask=m_i, other=0.0).to(tl.float32)
    b_Akk = b_Akk * b_beta[:, None]
    b_Aqk = b_Aqk * scale
    # Akk, Aqk: head-major [HV, rows, BT]
    o_row = (i_hv * R + row_base + t_i) * BT
    m_s = m_i[:, None] & ((o_t < r) | (o_t >= r + BC))[None, :]
    tl.store(Akk + o_row[:, None] + o_t[None, :], b_Akk, mask=m_s)
    tl.store(Aqk + o_row[:, None] + o_t[None, :], cast_to(b_Aqk, Aqk.dtype.element_ty, EXACT_ROUNDING),
             mask=m_s)


@triton.jit(do_not_specialize=["T", "HV", "GROUP", "NT", "R"])
def _kda_chunk_offdiag_kernel(
    q, k, g, beta, Akk, Aqk, nrm, kg, chunk_indices, cu_seqlens,
    scale, T, HV, K, GROUP, NT, R, KS: tl.constexpr,
    s_q_b, s_q_t, s_q_h, s_q_k,
    s_k_b, s_k_t, s_k_h, s_k_k,
    s_g_b, s_g_t, s_g_h, s_g_k,
    s_b_b, s_b_t, s_b_h,
    BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
    IS_VARLEN: tl.constexpr, USE_QK_L2NORM: tl.constexpr, DOT_PREC: tl.constexpr,
    EXACT_ROUNDING: tl.constexpr,
):
    """A chunk's Akk and Aqk outside the diagonal sub-blocks: rows of sub-block c (c = 1, 2, 3)
    against the columns of the sub-blocks before it, and zeros past the diagonal block (also on the
    rows of sub-block 0). Runs after the diagonal kernel (it reads the norms that one writes).

    For i in sub-block c (first row r) and j in an earlier sub-block b:
        exp(G_i - G_j) = exp(sum_{s=r}^{i} g_s) * prod_{b < m < c} exp(T_m) * exp(sum_{s=j+1}^{e_b} g_s)
    with T_m sub-block m's total and e_b the last row of sub-block b; every factor is <= 1 and every
    sum runs over at most BC rows (no difference of cumulative sums). The right factor k_j e^(...)
    is formed once per chunk; sub-block c's operand is sub-block c-1's times exp(T_(c-1)) plus
    sub-block c-1's own rows. The same factor times the later sub-blocks' totals is
    k_j exp(G_last - G_j), the state update's operand, written here (it took the WY/UT kernel a
    64-row suffix scan: H100, HV 16, WY/UT 1.65 -> 1.33 ms, this kernel 0.87 -> 0.99)."""
    i_t, i_nh = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    i_b, i_n, i_hv, i_h, bos, eos, t0, row_base = _chunk_coords(
        i_t, i_nh, chunk_indices, cu_seqlens, T, HV, GROUP, IS_VARLEN)
    i_slot = _chunk_slot(i_t, i_n, NT, IS_VARLEN)
    SPLIT: tl.constexpr = DOT_PREC == "tf32x3"
    NB: tl.constexpr = BT // BC

    o_t = tl.arange(0, BT)
    m_t = (t0 + o_t) < eos
    t_t = tl.where(m_t, t0 + o_t, bos)
    # [BT] sub-block of each row
    o_blk = o_t // BC
    # rows shifted by one (j + 1), kept inside j's sub-block: suffix sums over rows j + 1 .. e_b
    m_t1 = ((o_t % BC) != BC - 1) & ((t0 + o_t + 1) < eos)
    t_t1 = tl.where(m_t1, t0 + o_t + 1, bos)
    p_k = k + i_b * s_k_b + i_h * s_k_h + t_t[:, None] * s_k_t
    p_g1 = g + i_b * s_g_b + i_hv * s_g_h + t_t1[:, None] * s_g_t
    # [BT] reciprocal L2 norms of the chunk's k rows
    b_rk = tl.full([BT], 1.0, dtype=tl.float32)
    if USE_QK_L2NORM:
        b_rk = tl.load(nrm + i_hv * R + row_base + t_t, mask=m_t, other=0.0)

    # [BT, 2 BC] transposed, one per sub-block c = 1, 2, 3: the columns j against the sub-block's
    # k rows, then its q rows (a 64-row warpgroup MMA, the j side read from registers)
    b_A1 = tl.zeros([BT, 2 * BC], dtype=tl.float32)
    b_A2 = tl.zeros([BT, 2 * BC], dtype=tl.float32)
    b_A3 = tl.zeros([BT, 2 * BC], dtype=tl.float32)
    # over the padded width KS: k exp(G_last - G)'s padding columns [K, KS) are written as zeros (k
    # and g load as 0 there), as the state kernel reads whole tiles
    for i_k in range(0, tl.cdiv(KS, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        # [BT, BK]
        b_k = tl.load(p_k + o_k[None, :] * s_k_k, mask=m_t[:, None] & m_k[None, :], other=0.0).to(tl.float32)
        b_g1 = tl.load(p_g1 + o_k[None, :] * s_g_k, mask=m_t1[:, None] & m_k[None, :], other=0.0).to(tl.float32)
        # sum_{s=j+1}^{e_b} g_s: suffix sums inside each sub-block (a scan over BC rows)
        b_S = tl.reshape(tl.cumsum(tl.reshape(b_g1, (NB, BC, BK)), 1, reverse=True), (BT, BK))
        # [BT, BK] each key decayed to its sub-block's end
        b_R = b_k * b_rk[:, None] * tl.exp(b_S)

        l2_hi, l2_lo, b_e1 = _offdiag_rows(q, k, g, nrm, i_b, i_h, i_hv, bos, eos, t0, row_base, R, HV, o_k, m_k,
                                           BC, s_q_b, s_q_t, s_q_h, s_q_k, s_k_b, s_k_t, s_k_h, s_k_k,
                                           s_g_b, s_g_t, s_g_h, s_g_k, BC, USE_QK_L2NORM, SPLIT)
        b_kr = tl.where((o_blk == 0)[:, None], b_R, 0.0)
        b_A1 = _dot_state(b_kr, l2_hi, l2_lo, b_A1, SPLIT, DOT_PREC)

        l2_hi, l2_lo, b_e2 = _offdiag_rows(q, k, g, nrm, i_b, i_h, i_hv, bos, eos, t0, row_base, R, HV, o_k, m_k,
                                           2 * BC, s_q_b, s_q_t, s_q_h, s_q_k, s_k_b, s_k_t, s_k_h, s_k_k,
                                           s_g_b, s_g_t, s_g_h, s_g_k, BC, USE_QK_L2NORM, SPLIT)
        b_kr = tl.where((o_blk == 1)[:, None], b_R, b_kr * b_e1[None, :])
        b_A2 = _dot_state(b_kr, l2_hi, l2_lo, b_A2, SPLIT, DOT_PREC)

        l2_hi, l2_lo, b_e3 = _offdiag_rows(q, k, g, nrm, i_b, i_h, i_hv, bos, eos, t0, row_base, R, HV, o_k, m_k,
                                           3 * BC, s_q_b, s_q_t, s_q_h, s_q_k, s_k_b, s_k_t, s_k_h, s_k_k,
                                           s_g_b, s_g_t, s_g_h, s_g_k, BC, USE_QK_L2NORM, SPLIT)
        b_kr = tl.where((o_blk == 2)[:, None], b_R, b_kr * b_e2[None, :])
        b_A3 = _dot_state(b_kr, l2_hi, l2_lo, b_A3, SPLIT, DOT_PREC)

        # [BT, BK] k exp(G_last - G_i): each key decayed to its sub-block's end, times the later
        # sub-blocks' total decays (products of factors <= 1, no difference of sums); stored
        # transposed per chunk slot, [KS, BT], zero past the sequence's end (b_k loads 0 there)
        b_e23 = b_e2[None, :] * b_e3[None, :]
        b_after = tl.where((o_blk == 3)[:, None], 1.0, tl.where((o_blk == 2)[:, None], b_e3[None, :], tl.where(
            (o_blk == 1)[:, None], b_e23, b_e1[None, :] * b_e23)))
        b_kg = b_R * b_after
        tl.store(kg + ((i_slot * HV + i_hv) * KS + o_k[:, None]) * BT + o_t[None, :],
                 cast_to(tl.trans(b_kg), kg.dtype.element_ty, EXACT_ROUNDING), mask=(o_k < KS)[:, None])

    _offdiag_store(Akk, Aqk, beta, tl.zeros([BT, 2 * BC], dtype=tl.float32), i_b, i_hv, s_b_b, s_b_t, s_b_h,
                   bos, eos, t0, row_base, R, 0, scale, BT, BC, EXACT_ROUNDING)
    _offdiag_store(Akk, Aqk, beta, b_A1, i_b, i_hv, s_b_b, s_b_t, s_b_h, bos, eos, t0, row_base, R, BC, scale,
                   BT, BC, EXACT_ROUNDING)
    _offdiag_store(Akk, Aqk, beta, b_A2, i_b, i_hv, s_b_b, s_b_t, s_b_h, bos, eos, t0, row_base, R, 2 * BC, scale,
                   BT, BC, EXACT_ROUNDING)
    _offdiag_store(Akk, Aqk, beta, b_A3, i_b, i_hv, s_b_b, s_b_t, s_b_h, bos, eos, t0, row_base, R, 3 * BC, scale,
                   BT, BC, EXACT_ROUNDING)


@triton.jit(do_not_specialize=["T", "HV", "GROUP", "NT", "R"])
def _kda_chunk_wu_kernel(
    q, k, v, g, beta, Akk, nrm, w, u, qg, gl, chunk_indices, cu_seqlens,
    scale, T, HV, K, V, GROUP, NT, R, KS: tl.constexpr, VS: tl.constexpr,
    s_q_b, s_q_t, s_q_h, s_q_k,
    s_k_b, s_k_t, s_k_h, s_k_k,
    s_v_b, s_v_t, s_v_h, s_v_v,
    s_g_b, s_g_t, s_g_h, s_g_k,
    s_b_b, s_b_t, s_b_h,
    BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BKL: tl.constexpr,
    IS_VARLEN: tl.constexpr, USE_QK_L2NORM: tl.constexpr, DOT_PREC: tl.constexpr,
    EXACT_ROUNDING: tl.constexpr,
):
    i_t, i_nh = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    i_b, i_n, i_hv, i_h, bos, eos, t0, row_base = _chunk_coords(
        i_t, i_nh, chunk_indices, cu_seqlens, T, HV, GROUP, IS_VARLEN)
    i_slot = _chunk_slot(i_t, i_n, NT, IS_VARLEN)

    o_t = tl.arange(0, BT)
    m_t = (t0 + o_t) < eos
    t_t = tl.where(m_t, t0 + o_t, bos)
    o_row = i_hv * R + row_base + t_t  # row of the head-major intermediates

    p_g = g + i_b * s_g_b + i_hv * s_g_h + t_t[:, None] * s_g_t
    # [BKL] exp(G_last), the decay over the whole (valid part of the) chunk, summed and exponentiated
    # in float64: in float32 the sum's rounding (up to ~|G_last| eps, absolute) and the exp's 1-2 ulp
    # put exp(G_last) past the float32 budget where the state only decays (beta = 0), against a
    # reference that multiplies the tokens' exp(g) one by one. Wide column steps, before anything
    # else is live: each thread takes a float64 exp for few columns.
    for i_k in range(0, tl.cdiv(KS, BKL)):
        o_k = i_k * BKL + tl.arange(0, BKL)
        b_g = tl.load(p_g + o_k[None, :] * s_g_k, mask=m_t[:, None] & (o_k < K)[None, :], other=0.0)
        b_Gl = tl.sum(b_g.to(tl.float64), 0)
        tl.store(gl + (i_slot * HV + i_hv) * KS + o_k, tl.exp(b_Gl).to(tl.float32), mask=o_k < KS)

    # Y = (I + Akk)^-1, blockwise. Akk = Ad + Ao, Ad its BC x BC diagonal blocks, Ao the rest.
    # 1. Yd = (I + Ad)^-1: the diagonal kernel stores Z = Yd - I in place of Ad (strictly lower).
    # 2. I + Akk = (I + Ad)(I + N) with N = Yd Ao strictly lower by blocks (N^4 = 0), so
    #    Y = (I + N)^-1 Yd = (I - N)(I + N^2) Yd.
    o_blk = o_t // BC
    m_same = o_blk[:, None] == o_blk[None, :]
    # [BT, BT] Ao beside Z, strictly lower (rows past the sequence's end are 0)
    b_Akk = tl.load(Akk + o_row[:, None] * BT + o_t[None, :], mask=m_t[:, None], other=0.0)
    b_Akk = tl.where(o_t[:, None] > o_t[None, :], b_Akk, 0.0)
    b_Z = tl.where(m_same, b_Akk, 0.0)
    b_I = tl.where(o_t[:, None] == o_t[None, :], 1.0, 0.0)
    b_Yd = b_Z + b_I
    # 3xTF32 products on operands split once each (_split: cheaper than the per-product split of
    # input_precision="tf32x3", and A's split serves all of w and u)
    SPLIT: tl.constexpr = DOT_PREC == "tf32x3"
    yd_hi, yd_lo = _split(b_Yd, SPLIT)
    ao_hi, ao_lo = _split(tl.where(m_same, 0.0, b_Akk), SPLIT)
    b_N = _dot_pair(yd_hi, yd_lo, ao_hi, ao_lo, tl.zeros([BT, BT], dtype=tl.float32), SPLIT, DOT_PREC)
    n_hi, n_lo = _split(b_N, SPLIT)
    b_N2 = _dot_pair(n_hi, n_lo, n_hi, n_lo, tl.zeros([BT, BT], dtype=tl.float32), SPLIT, DOT_PREC)
    n2_hi, n2_lo = _split(b_N2, SPLIT)
    b_P = b_I - b_N + b_N2 - _dot_pair(n_hi, n_lo, n2_hi, n2_lo, tl.zeros([BT, BT], dtype=tl.float32), SPLIT,
                                       DOT_PREC)
    p_hi, p_lo = _split(b_P, SPLIT)
    b_A = _dot_pair(p_hi, p_lo, yd_hi, yd_lo, tl.zeros([BT, BT], dtype=tl.float32), SPLIT, DOT_PREC)
    a_hi, a_lo = _split(b_A, SPLIT)

    # [BT]
    b_beta = tl.load(beta + i_b * s_b_b + i_hv * s_b_h + t_t * s_b_t, mask=m_t, other=0.0).to(tl.float32)
    p_k = k + i_b * s_k_b + i_h * s_k_h + t_t[:, None] * s_k_t
    p_q = q + i_b * s_q_b + i_h * s_q_h + t_t[:, None] * s_q_t
    # [BT] reciprocal L2 norms of the rows of k and q (from the diagonal kernel)
    b_rk = tl.full([BT], 1.0, dtype=tl.float32)
    b_rq = tl.full([BT], 1.0, dtype=tl.float32)
    if USE_QK_L2NORM:
        b_rk = tl.load(nrm + o_row, mask=m_t, other=0.0)
        b_rq = tl.load(nrm + (HV + i_hv) * R + row_base + t_t, mask=m_t, other=0.0)
    b_rq = b_rq * scale

    # over the padded width KS: the padding columns [K, KS) are written as zeros (k, q and g load as
    # 0 there), as the state kernel reads whole tiles
    for i_k in range(0, tl.cdiv(KS, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        m_tk = m_t[:, None] & m_k[None, :]
        # [BT, BK]
        b_k = tl.load(p_k + o_k[None, :] * s_k_k, mask=m_tk, other=0.0).to(tl.float32) * b_rk[:, None]
        b_q = tl.load(p_q + o_k[None, :] * s_q_k, mask=m_tk, other=0.0).to(tl.float32) * b_rq[:, None]
        b_g = tl.load(p_g + o_k[None, :] * s_g_k, mask=m_tk, other=0.0).to(tl.float32)
        b_G = tl.cumsum(b_g, 0)
        x_hi, x_lo = _split(b_k * b_beta[:, None] * tl.exp(b_G), SPLIT)
        b_w = _dot_pair(a_hi, a_lo, x_hi, x_lo, tl.zeros([BT, BK], dtype=tl.float32), SPLIT, DOT_PREC)
        b_qg = b_q * tl.exp(b_G)
        p_out = o_row[:, None] * KS + o_k[None, :]
        m_out = m_t[:, None] & (o_k < KS)[None, :]
        tl.store(w + p_out, cast_to(b_w, w.dtype.element_ty, EXACT_ROUNDING), mask=m_out)
        tl.store(qg + p_out, cast_to(b_qg, qg.dtype.element_ty, EXACT_ROUNDING), mask=m_out)

    p_v = v + i_b * s_v_b + i_hv * s_v_h + t_t[:, None] * s_v_t
    for i_v in range(0, tl.cdiv(VS, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_tv = m_t[:, None] & (o_v < V)[None, :]
        # [BT, BV]
        b_v = tl.load(p_v + o_v[None, :] * s_v_v, mask=m_tv, other=0.0).to(tl.float32)
        x_hi, x_lo = _split(b_v * b_beta[:, None], SPLIT)
        b_u = _dot_pair(a_hi, a_lo, x_hi, x_lo, tl.zeros([BT, BV], dtype=tl.float32), SPLIT, DOT_PREC)
        # padding columns [V, VS) hold zeros
        tl.store(u + o_row[:, None] * VS + o_v[None, :], cast_to(b_u, u.dtype.element_ty, EXACT_ROUNDING),
                 mask=m_t[:, None] & (o_v < VS)[None, :])


@triton.jit
def _load_tile(p, off, i_k, m_t, BKS: tl.constexpr, MASKED: tl.constexpr):
    """[BT, BKS]: columns [i_k BKS, (i_k + 1) BKS) of a chunk's rows (off: the chunk-relative
    offsets). The columns are padded to whole tiles (see chunk_kda), so only the rows of a last
    partial chunk are masked (MASKED), to 0."""
    if MASKED:
        return tl.load(p + off + i_k * BKS, mask=m_t[:, None], other=0.0)
    else:
        return tl.load(p + off + i_k * BKS)


@triton.jit
def _split(x, SPLIT: tl.constexpr):
    """(hi, lo) with x = hi + lo exactly and hi rounded to tf32 (10 mantissa bits), the operand
    halves of a 3xTF32 product; (x, x) when SPLIT is off."""
    if SPLIT:
        hi = round_bits(x, 13, False)  # ties away: the cheapest rounding on the sequential path
        return hi, x - hi
    else:
        return x, x


@triton.jit
def _dot_pair(a_hi, a_lo, b_hi, b_lo, acc, SPLIT: tl.constexpr, DOT_PREC: tl.constexpr):
    """acc + a b on operands split by _split: 3xTF32 with SPLIT (the halves' three products, small
    terms first), else one product at DOT_PREC on the unsplit a_hi, b_hi."""
    if SPLIT:
        acc = tl.dot(a_lo, b_hi, acc, input_precision="tf32")
        acc = tl.dot(a_hi, b_lo, acc, input_precision="tf32")
        return tl.dot(a_hi, b_hi, acc, input_precision="tf32")
    else:
        return tl.dot(a_hi, b_hi, acc, input_precision=DOT_PREC)


@triton.jit
def _dot_state(a, b_hi, b_lo, acc, SPLIT: tl.constexpr, DOT_PREC: tl.constexpr):
    """acc + a b in float32 operands. SPLIT: 3xTF32 on a B operand already split by _split (a
    split shared by every product that reads it: each split operand is one copy to shared
    memory); otherwise one product at DOT_PREC on b_hi (the unsplit B)."""
    a_hi, a_lo = _split(a, SPLIT)
    return _dot_pair(a_hi, a_lo, b_hi, b_lo, acc, SPLIT, DOT_PREC)


@triton.jit
def _dot_out(a, b_hi, b_lo, acc, O_HI: tl.constexpr, SPLIT: tl.constexpr, DOT_PREC: tl.constexpr):
    """acc + a b on the output path. O_HI (bf16 inputs): a (bf16 q exp(G) or Aqk) times the tf32
    half of B, one tf32 product (exact: both are tf32 values); otherwise as on the state path."""
    if O_HI:
        return tl.dot(a.to(tl.float32), b_hi, acc, input_precision="tf32")
    else:
        return _dot_state(a.to(tl.float32), b_hi, b_lo, acc, SPLIT, DOT_PREC)


@triton.jit
def _load_block(h0, i_k, i_n, i_hv, o_v, K, V, s_n, s_h, s_k, s_v,
                BKS: tl.constexpr, BV: tl.constexpr, USE_INITIAL_STATE: tl.constexpr):
    """[BKS, BV]: state rows block i_k of initial_state (zeros without one)."""
    o_k = i_k * BKS + tl.arange(0, BKS)
    return load_state(h0, i_n, i_hv, o_k, o_v, (o_k < K)[:, None] & (o_v < V)[None, :],
                      s_n, s_h, s_k, s_v, BKS, BV, USE_INITIAL_STATE)


@triton.jit
def _store_block(ht, b_h, i_k, i_n, i_hv, o_v, HV, K, V, BKS: tl.constexpr):
    """Write state rows block i_k to the final state."""
    o_k = i_k * BKS + tl.arange(0, BKS)
    store_state(ht, b_h, i_n, i_hv, o_k, o_v, (o_k < K)[:, None] & (o_v < V)[None, :], HV, K, V)


@triton.jit
def _load_decay(p_gl, i_k, BKS: tl.constexpr):
    """[BKS]: block i_k of the chunk's total decay exp(G_last) (p_gl: the chunk's row)."""
    return tl.load(p_gl + i_k * BKS + tl.arange(0, BKS))


@triton.jit
def _state_step(b_h, b_gl, p_kgt, off_t, i_k, u_hi, u_lo, SPLIT: tl.constexpr, DOT_PREC: tl.constexpr,
                BT: tl.constexpr, BKS: tl.constexpr):
    """State rows block i_k at the chunk's end: diag(exp(G_last)) S + (k exp(G_last - G))^T U.
    p_kgt: the chunk's (k exp(G_last - G))^T [KS, BT], stored transposed and zero past the sequence's
    end, so the product's A operand loads K-major, whole and unmasked."""
    # [BKS, BT]
    b_kgt = tl.load(p_kgt + off_t + i_k * BKS * BT)
    return b_h * b_gl[:, None] + _dot_state(b_kgt, u_hi, u_lo, tl.zeros_like(b_h), SPLIT, DOT_PREC)


@triton.jit
def _chunk_step(b_h1, b_h2, b_h3, b_h4, w, u, qg, kg, gl, Aqk, o, i_t, bos, eos, row_base, slot0, i_hv, R,
                off_k, off_kt, off_u, off_a, o_t, o_v, m_v, KS: tl.constexpr, VS: tl.constexpr, V, HV,
                BT: tl.constexpr, BKS: tl.constexpr, NK: tl.constexpr, BV: tl.constexpr, MASKED: tl.constexpr,
                O_HI: tl.constexpr, SPLIT: tl.constexpr, DOT_PREC: tl.constexpr, EXACT_ROUNDING: tl.constexpr):
    """Chunk i_t of the sequence [bos, eos): writes its o rows and returns the state row blocks
    (b_h1 .. b_h4, NK of them used) at its end. MASKED: a last partial chunk (rows at and past eos
    read as 0 and are not written)."""
    t0 = bos + i_t * BT
    m_t = (t0 + o_t) < eos
    # int64 rows of the chunk's first token (and the value head) in the head-major intermediates
    # and in o; element offset of its exp(G_last) row
    r0 = i_hv * R + row_base + t0
    o_r0 = (row_base + t0) * HV + i_hv
    g_row = ((slot0 + i_t) * HV + i_hv) * KS
    p_w, p_qg, p_kgt = w + r0 * KS, qg + r0 * KS, kg + g_row * BT
    # [BKS] exp(G_last), loaded first: these loads stay synchronous when the others pipeline
    b_gl1 = _load_decay(gl + g_row, 0, BKS)
    if NK >= 2:
        b_gl2 = _load_decay(gl + g_row, 1, BKS)
    if NK >= 4:
        b_gl3 = _load_decay(gl + g_row, 2, BKS)
        b_gl4 = _load_decay(gl + g_row, 3, BKS)
    # the state path (U and the state update) in float32 operands: 3xTF32 products whose B
    # operand (a state block, U) is split once and shared (by the output path too)
    s1_hi, s1_lo = _split(b_h1, SPLIT)
    if NK >= 2:
        s2_hi, s2_lo = _split(b_h2, SPLIT)
    if NK >= 4:
        s3_hi, s3_lo = _split(b_h3, SPLIT)
        s4_hi, s4_lo = _split(b_h4, SPLIT)
    # [BT, BV] the chunk's deltas: U = u - w S, one state row block at a time (rows past eos: 0)
    b_ws = tl.zeros([BT, BV], dtype=tl.float32)
    b_ws = _dot_state(_load_tile(p_w, off_k, 0, m_t, BKS, MASKED), s1_hi, s1_lo, b_ws, SPLIT, DOT_PREC)
    if NK >= 2:
        b_ws = _dot_state(_load_tile(p_w, off_k, 1, m_t, BKS, MASKED), s2_hi, s2_lo, b_ws, SPLIT, DOT_PREC)
    if NK >= 4:
        b_ws = _dot_state(_load_tile(p_w, off_k, 2, m_t, BKS, MASKED), s3_hi, s3_lo, b_ws, SPLIT, DOT_PREC)
        b_ws = _dot_state(_load_tile(p_w, off_k, 3, m_t, BKS, MASKED), s4_hi, s4_lo, b_ws, SPLIT, DOT_PREC)
    b_U = _load_tile(u + r0 * VS, off_u, 0, m_t, BV, MASKED).to(tl.float32) - b_ws
    u_hi, u_lo = _split(b_U, SPLIT)

    # [BT, BV] o = (q exp(G)) S + Aqk U; for bf16 inputs on the tf32 halves of S and U
    # [BT, BT]
    b_Aqk = _load_tile(Aqk + r0 * BT, off_a, 0, m_t, BT, MASKED)
    b_o = _dot_out(b_Aqk, u_hi, u_lo, tl.zeros([BT, BV], dtype=tl.float32), O_HI, SPLIT, DOT_PREC)
    b_o = _dot_out(_load_tile(p_qg, off_k, 0, m_t, BKS, MASKED), s1_hi, s1_lo, b_o, O_HI, SPLIT, DOT_PREC)
    if NK >= 2:
        b_o = _dot_out(_load_tile(p_qg, off_k, 1, m_t, BKS, MASKED), s2_hi, s2_lo, b_o, O_HI, SPLIT, DOT_PREC)
    if NK >= 4:
        b_o = _dot_out(_load_tile(p_qg, off_k, 2, m_t, BKS, MASKED), s3_hi, s3_lo, b_o, O_HI, SPLIT, DOT_PREC)
        b_o = _dot_out(_load_tile(p_qg, off_k, 3, m_t, BKS, MASKED), s4_hi, s4_lo, b_o, O_HI, SPLIT, DOT_PREC)
    # o is contiguous [B, T, HV, V]
    p_o = o + o_r0 * V + (o_t[:, None] * HV) * V + o_v[None, :]
    b_o = cast_to(b_o, o.dtype.element_ty, EXACT_ROUNDING)
    if MASKED:
        tl.store(p_o, b_o, mask=m_t[:, None] & m_v[None, :])
    else:
        tl.store(p_o, b_o, mask=m_v[None, :])

    b_h1 = _state_step(b_h1, b_gl1, p_kgt, off_kt, 0, u_hi, u_lo, SPLIT, DOT_PREC, BT, BKS)
    if NK >= 2:
        b_h2 = _state_step(b_h2, b_gl2, p_kgt, off_kt, 1, u_hi, u_lo, SPLIT, DOT_PREC, BT, BKS)
    if NK >= 4:
        b_h3 = _state_step(b_h3, b_gl3, p_kgt, off_kt, 2, u_hi, u_lo, SPLIT, DOT_PREC, BT, BKS)
        b_h4 = _state_step(b_h4, b_gl4, p_kgt, off_kt, 3, u_hi, u_lo, SPLIT, DOT_PREC, BT, BKS)
    return b_h1, b_h2, b_h3, b_h4


@triton.jit(do_not_specialize=["T", "HV", "K", "V", "NT", "R"])
def _kda_chunk_fwd_kernel(
    w, u, qg, kg, gl, Aqk, o, h0, ht, cu_seqlens, chunk_offsets,
    T, HV, K, V, NT, R, KS: tl.constexpr, VS: tl.constexpr,
    s_h0_n, s_h0_h, s_h0_k, s_h0_v,
    BT: tl.constexpr, BKS: tl.constexpr, NK: tl.constexpr, BV: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr, STORE_FINAL_STATE: tl.constexpr, IS_VARLEN: tl.constexpr,
    O_HI: tl.constexpr, DOT_PREC: tl.constexpr, EXACT_ROUNDING: tl.constexpr,
):
    """The state [K, V tile] is held as NK (1, 2 or 4) row blocks of BKS rows, each a tensor of its
    own, so every dot works on one block and only one block's operand is live at a time (a single
    [BK, BV] state with BK = 128 spilled registers).

    The chunk loop is bound by instruction issue (one warpgroup per SM, each instruction waiting
    on the one before), so a chunk's tiles are read at compile-time offsets from one int64 base:
    the intermediates are head-major with constexpr power-of-two row widths (KS = NK BKS, VS a
    multiple of BV). Whole chunks load without masks; only a last partial chunk masks its rows.
    sm_90a, bench shape (BV 16): 2876 -> 1508 SASS instructions per chunk."""
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
    SPLIT: tl.constexpr = DOT_PREC == "tf32x3"

    o_t = tl.arange(0, BT)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    # chunk-relative element offsets of the head-major intermediates: compile-time constants
    # [BT, BKS], [BT, BV], [BT, BT]
    off_k = o_t[:, None] * KS + tl.arange(0, BKS)[None, :]
    off_kt = tl.arange(0, BKS)[:, None] * BT + o_t[None, :]  # [BKS, BT]
    off_u = o_t[:, None] * VS + o_v[None, :]
    off_a = o_t[:, None] * BT + o_t[None, :]
    # [BKS, BV] state row blocks
    b_h1 = _load_block(h0, 0, i_n, i_hv, o_v, K, V, s_h0_n, s_h0_h, s_h0_k, s_h0_v, BKS, BV, USE_INITIAL_STATE)
    if NK >= 2:
        b_h2 = _load_block(h0, 1, i_n, i_hv, o_v, K, V, s_h0_n, s_h0_h, s_h0_k, s_h0_v, BKS, BV, USE_INITIAL_STATE)
    if NK >= 4:
        b_h3 = _load_block(h0, 2, i_n, i_hv, o_v, K, V, s_h0_n, s_h0_h, s_h0_k, s_h0_v, BKS, BV, USE_INITIAL_STATE)
        b_h4 = _load_block(h0, 3, i_n, i_hv, o_v, K, V, s_h0_n, s_h0_h, s_h0_k, s_h0_v, BKS, BV, USE_INITIAL_STATE)

    # state row blocks NK does not use stand in for the missing ones (passed through unchanged)
    if NK < 2:
        b_h2 = b_h1
    if NK < 4:
        b_h3 = b_h1
        b_h4 = b_h1
    # whole chunks unmasked, then a last partial chunk with its rows masked
    n_full = (eos - bos) // BT
    for i_t in range(0, n_full):
        b_h1, b_h2, b_h3, b_h4 = _chunk_step(
            b_h1, b_h2, b_h3, b_h4, w, u, qg, kg, gl, Aqk, o, i_t, bos, eos, row_base, slot0, i_hv, R, off_k, off_kt,
            off_u, off_a, o_t, o_v, m_v, KS, VS, V, HV, BT, BKS, NK, BV, False, O_HI, SPLIT, DOT_PREC, EXACT_ROUNDING)
    if n_full * BT < eos - bos:
        b_h1, b_h2, b_h3, b_h4 = _chunk_step(
            b_h1, b_h2, b_h3, b_h4, w, u, qg, kg, gl, Aqk, o, n_full, bos, eos, row_base, slot0, i_hv, R, off_k,
            off_kt, off_u, off_a, o_t, o_v, m_v, KS, VS, V, HV, BT, BKS, NK, BV, True, O_HI, SPLIT, DOT_PREC,
            EXACT_ROUNDING)

    if STORE_FINAL_STATE:
        _store_block(ht, b_h1, 0, i_n, i_hv, o_v, HV, K, V, BKS)
        if NK >= 2:
            _store_block(ht, b_h2, 1, i_n, i_hv, o_v, HV, K, V, BKS)
        if NK >= 4:
            _store_block(ht, b_h3, 2, i_n, i_hv, o_v, HV, K, V, BKS)
            _store_block(ht, b_h4, 3, i_n, i_hv, o_v, HV, K, V, BKS)


def _launch_config(K: int, V: int, bf16_out_path: bool, half_inputs: bool, n_heads: int,
                   n_sm: int) -> dict:
    """One config from the head dims, the output path's dtype, whether q/k are 16-bit, the number
    of (sequence, value head) pairs and the device's SM count. BV tiles the state kernel; BK_I
    (BKN for the norms), BK_O and BK_W / BV_W block the head-dim loops of the diagonal, off-diagonal
    and WY/UT kernels. Every dot dimension is at least 16 (the GPU's minimum)."""
    BK = dot_dim(K)
    # The state kernel is sequential over chunks and runs one program per (sequence, value head,
    # V tile): narrow V tiles buy parallelism while the programs fit on the SMs. BV = 32 with 4
    # warps (H100, T = 32768, H = 16, K = V = 128, bf16): HV 16 9.9 ms, HV 32 15.8 ms, against
    # 12.1 / 17.9 with BV = 64 and 8 warps (BV 32 on 8 warps: 11.1 / 17.0). BV = 16 where its
    # programs still fit on the SMs (one sequence, HV 16: 128 programs on 132 SMs): 8.54 against
    # 9.21 ms; past that it loses (HV 32: 14.5 against 14.4; varlen 8 x 4096, HV 16: 7.26 against
    # 6.54).
    # The output dots never take a bf16 B operand converted from registers: Triton 3.6 miscompiles
    # a [64, BV < 64] one (with 8 warps compute-sanitizer reports an out-of-bounds shared read, with
    # 4 warps o comes out NaN while the float32 state is right). They read the float32 tf32 halves
    # of S and U that the state path's 3xTF32 products already split (one shared copy each):
    # 9 -> 6 register-to-shared copies per chunk, state kernel 3.19 -> 2.90 ms (HV 16).
    # Two stages (the next chunk's tiles copied in while this one computes) fit in shared memory
    # with the bf16 output path up to K = 128 (128 KiB there at BV = 32); fp16 and fp32 inputs
    # keep a float32 output path and one stage (BV 32, one stage: 10.7 ms).
    # The WY/UT kernel runs K steps of 32 and V steps of 32 (BV = 64 states: BK_W 16 12.7 ms
    # against 12.5; BV_W 64 12.5 against 12.1; 8 WY/UT warps 14.5).
    BV = 16 if n_heads * triton.cdiv(V, 16) <= n_sm else 32
    # the bf16 output path up to K = 128 pipelines 2 stages, 3 with BV = 16 (200 KiB of shared
    # memory at K = 128; HV 16: 8.38 against 8.53 ms), while the programs fit on the SMs. Past
    # that, two programs share an SM (255 registers each) and one stage keeps both resident: two
    # stages (96 KiB of copy buffers beside 32 KiB of split operands) leave one per SM (varlen 8 x
    # 4096, state kernel: HV 16 1.35 against 1.75 ms, HV 32 2.60 against 3.49).
    fits = n_heads * triton.cdiv(V, BV) <= n_sm
    stages = (3 if BV == 16 else 2) if bf16_out_path and BK <= 128 and fits else 1
    # The diagonal kernel holds two [16, 16, BK] accumulators; capped at 128 registers it fits 4
    # programs per SM without spills for 16-bit q/k and K % 16 == 0 (odd K and float32 inputs stay
    # uncapped). The off-diagonal kernel (one program per chunk, three [64, 32] accumulators) runs
    # K steps of 32 capped at 160 registers (H100, HV 16 / HV 32: 0.99 / 1.96 ms, against 1.01 / 1.98
    # at 168, 1.05 / 2.03 uncapped (234), 1.20 / 2.34 at 184, 1.16 / 2.23 at 128; before it wrote
    # k exp(G_last - G): K steps of 16 0.92, K steps of 64 1.24, 8 warps 2.5 at HV 16).
    maxnreg_diag = 128 if half_inputs and K % 16 == 0 else None
    return dict(BV=BV, warps_fwd=4, stages_fwd=stages,
                BK_I=16, BKN=64, warps_intra=4, maxnreg_diag=maxnreg_diag, BK_O=min(BK, 32), warps_offdiag=4,
                maxnreg_offdiag=160 if half_inputs else None,
                BK_W=min(BK, 32), BV_W=max(16, min(pow2(V), 32)), warps_wu=4)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of the device (a host query, cached). Under the interpreter a
    small stand-in, so the CPU tests see both state-kernel tile widths."""
    if device.type != "cuda":
        return INTERPRETER_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


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

    With K < MIN_CHUNK_K (32) it runs fused_recurrent_kda instead: the chunked form is not accurate
    enough there (see the comment at the dispatch).

    Returns:
        (o [B, T, HV, V] in q's dtype, final_state [N, HV, K, V] float32 or None).

    Precision: the final state is a float32 output, so the state path (Akk, the solve, w, u,
    k exp(G_last - G), the state GEMMs) is float32 with 3xTF32 tensor-core dots (IEEE dots for
    float32 inputs). Only the output path's q exp(G) and Aqk are stored in bf16 for bf16 inputs,
    multiplied with the tf32-rounded halves of S and U (fla keeps everything in bf16, which misses
    the float32 state budget by ~1e3x).
    """
    d = check_kda_args(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
                       use_qk_l2norm)
    if d.T == 0 or d.N == 0:
        return empty_result(q, v, d, initial_state, output_final_state)
    if d.K < MIN_CHUNK_K:
        # A chunk's 64 keys in K < 32 dims are at least twice overcomplete: each chunk overwrites
        # the state several times over, and the chunked form's float32 products (the solve, w, u,
        # U = u - w S, the sum of the chunk's rank-1 state updates) cancel heavily. Worst final
        # state over its float32 budget, random keys, gates zero, slow and logsigmoid, T <= 200
        # (30 draws per K on the CPU interpreter / 50 on an H200): K = 8: 0.96 / 0.89, and 1.65 in
        # one draw on the CPU (a kept regression); K = 16: 0.89 / 0.80; K = 32: 0.60 / 0.54. The
        # recurrent form stays within the budget, at a price in long prefills: T = 32768, H = 16,
        # V = 128, bf16 on an H100, 34-45 ms (K = 8, 16, 24; HV 16 and 32) against 2.1-4.5 ms
        # chunked, its time being T steps of one token's latency.
        return fused_recurrent_kda(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                                   output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                                   use_qk_l2norm=use_qk_l2norm)
    # Packed sequences must equal the per-sequence calls bit for bit (test_varlen_packing), yet BV
    # follows N. On the GPU the results are bit-identical for BV 16 and 32 (each output element
    # accumulates over K in the same order; checked on an H100 for fp32/fp16/bf16, odd K/V and
    # varlen). Under the interpreter numpy's sgemm rounds differently by tile width, so there BV
    # depends on HV only.
    n_heads = d.HV if interpreting() else d.N * d.HV
    cfg = _launch_config(d.K, d.V, q.dtype == torch.bfloat16, q.dtype != torch.float32, n_heads,
                         _sm_count(q.device))
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
    # row widths of the intermediates, padded to whole state-kernel tiles (it reads them unmasked)
    BV = cfg["BV"]
    KS, VS = dot_dim(K), max(dot_dim(V), BV)
    Akk = torch.empty((HV, rows, BT), dtype=f32, device=dev)
    Aqk = torch.empty((HV, rows, BT), dtype=o_path, device=dev)
    w = torch.empty((HV, rows, KS), dtype=f32, device=dev)
    qg = torch.empty((HV, rows, KS), dtype=o_path, device=dev)
    kg = torch.empty((n_slots, HV, KS, BT), dtype=f32, device=dev)  # transposed per chunk
    u = torch.empty((HV, rows, VS), dtype=f32, device=dev)
    gl = torch.empty((n_slots, HV, KS), dtype=torch.float32, device=dev)
    o = torch.empty((B, T, HV, V), dtype=q.dtype, device=dev)
    ht = torch.empty((N, HV, K, V), dtype=torch.float32, device=dev) if output_final_state else None
    dummy = o
    # reciprocal L2 norms of q and k per value head and row (k's, then q's): the diagonal kernel
    # computes them, the off-diagonal and WY/UT kernels read them
    nrm = torch.empty((2, HV, rows), dtype=f32, device=dev) if use_qk_l2norm else dummy
    ci = chunk_indices if is_varlen else dummy
    cs = cu_seqlens if is_varlen else dummy
    exact = interpreting()

    _kda_chunk_diag_kernel[(NT * (BT // BC), grid_cols)](
        q, k, g, beta, Akk, Aqk, nrm, ci, cs, d.scale, T, HV, K, HV // d.H, rows,
        *q.stride(), *k.stride(), *g.stride(), *beta.stride(),
        BT=BT, BC=BC, BK=cfg["BK_I"], BKN=min(KS, cfg["BKN"]), IS_VARLEN=is_varlen,
        USE_QK_L2NORM=use_qk_l2norm, EXACT_ROUNDING=exact, num_warps=cfg["warps_intra"],
        maxnreg=cfg["maxnreg_diag"],
    )
    _kda_chunk_offdiag_kernel[(NT, grid_cols)](
        q, k, g, beta, Akk, Aqk, nrm, kg, ci, cs, d.scale, T, HV, K, HV // d.H, NT, rows, KS,
        *q.stride(), *k.stride(), *g.stride(), *beta.stride(),
        BT=BT, BC=BC, BK=cfg["BK_O"], IS_VARLEN=is_varlen, USE_QK_L2NORM=use_qk_l2norm,
        DOT_PREC=dot_prec, EXACT_ROUNDING=exact, num_warps=cfg["warps_offdiag"], maxnreg=cfg["maxnreg_offdiag"],
    )
    _kda_chunk_wu_kernel[(NT, grid_cols)](
        q, k, v, g, beta, Akk, nrm, w, u, qg, gl, ci, cs,
        d.scale, T, HV, K, V, HV // d.H, NT, rows, KS, VS,
        *q.stride(), *k.stride(), *v.stride(), *g.stride(), *beta.stride(),
        BT=BT, BC=BC, BK=cfg["BK_W"], BV=cfg["BV_W"], BKL=min(KS, 128), IS_VARLEN=is_varlen,
        USE_QK_L2NORM=use_qk_l2norm, DOT_PREC=dot_prec, EXACT_ROUNDING=exact, num_warps=cfg["warps_wu"],
    )
    h0 = initial_state if initial_state is not None else dummy
    h0_strides = initial_state.stride() if initial_state is not None else (0, 0, 0, 0)
    _kda_chunk_fwd_kernel[(triton.cdiv(V, BV), N * HV)](
        w, u, qg, kg, gl, Aqk, o, h0, ht if ht is not None else dummy, cs,
        chunk_offsets if is_varlen else dummy,
        T, HV, K, V, NT, rows, KS, VS, *h0_strides,
        BT=BT, BKS=min(dot_dim(K), 64), NK=max(1, dot_dim(K) // 64),
        BV=BV, USE_INITIAL_STATE=initial_state is not None, STORE_FINAL_STATE=output_final_state,
        IS_VARLEN=is_varlen,
        O_HI=o_path == torch.bfloat16, DOT_PREC=dot_prec, EXACT_ROUNDING=exact,
        num_warps=cfg["warps_fwd"], num_stages=cfg["stages_fwd"],
    )
    return o, ht
