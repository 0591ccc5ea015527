"""Fused QKV split, per-head RMSNorm on Q and K, RoPE, and paged KV-cache write.

One Triton kernel. Program (t, j) handles token t and head tile j: tiles [0, NQT) are query heads
(plus the raw gate copy), tiles [NQT, NQT + NKT) are key/value heads (K normalised and rotated, V
copied, both written to `out` and, through slot_mapping, to the cache).

Cache layouts need no flag: the kernel addresses the cache through its four strides
(block, slot in block, head, dim), so NHD [num_blocks, block_size, kvh, D] and HND
[num_blocks, kvh, block_size, D] differ only in the strides passed.

Safe skips: a slot outside [0, num_blocks * block_size) masks the cache store of that token; its
address is formed from slot 0 so no pointer ever leaves the cache. A position outside
[0, max_pos) rotates by the identity (cos 1, sin 0) and its table row is never read.
"""
import math
from typing import Optional

import torch
import triton
import triton.language as tl

from kernels._checks import (FLOAT_ACTIVATIONS, FP8, INDEX_DTYPES, check_choice, check_int,
                             check_scale, check_tensor)
from kernels._triton import FP8_MAX, cast_to, interpreting

CACHE_DTYPES = (torch.bfloat16, torch.float16, torch.float32, FP8)
MAX_HEAD_DIM = 512
TILE_ELEMENTS = 2048  # heads x dims held per program: [BH, BD] float32, twice (value and RoPE partner)


@triton.jit
def _norm_rope(b_x, b_xp, p_w, o_d, o_pd, m_d, D, eps, w_offset, b_cos, b_sin, b_sign):
    """RMSNorm over the head's D dims, then rotate. b_x [BH, BD]; b_xp the same heads at the
    RoPE partner dims o_pd. Dims >= R carry cos 1, sin 0 and partner == self: unchanged."""
    # [BH]
    # the sum of squares is accumulated in float64: exact for bf16/fp16 inputs whatever the
    # summation order, so the result does not depend on the register layout the compiler picks
    # for a given pointer alignment (token slices and gate layouts stay bit-identical)
    b_x64 = b_x.to(tl.float64)
    b_rstd = tl.rsqrt(tl.sum(b_x64 * b_x64, axis=1).to(tl.float32) / D + eps)
    # [BD]
    b_w = tl.load(p_w + o_d, mask=m_d, other=0.0).to(tl.float32) + w_offset
    b_wp = tl.load(p_w + o_pd, mask=m_d, other=0.0).to(tl.float32) + w_offset
    # [BH, BD]
    b_y = b_x * b_rstd[:, None] * b_w[None, :]
    b_yp = b_xp * b_rstd[:, None] * b_wp[None, :]
    return b_y * b_cos[None, :] + b_sign[None, :] * b_yp * b_sin[None, :]


@triton.jit(do_not_specialize=["T", "QH", "KVH", "MAX_POS", "CACHE_BS", "CAPACITY",
                              "q_hs", "g_col", "g_hs", "k_col", "v_col"])
def _qkv_norm_rope_cache_kernel(
    # pointers
    qkv, q_norm_w, k_norm_w, cos, sin, positions, slot_mapping, k_scale, v_scale,
    q_out, g_out, k_out, v_out, key_cache, value_cache,
    # sizes
    T, QH, KVH, D, R, MAX_POS, CACHE_BS, CAPACITY, NQT,
    # column layout of a qkv row: q head h at h * q_hs, gate of head h at g_col + h * g_hs, K at
    # k_col, V at v_col; all multiples of COL_ALIGN (from D alone, so both gate layouts compile alike)
    q_hs, g_col, g_hs, k_col, v_col,
    eps, w_offset,
    # strides
    s_x_t, s_x_w, s_qw, s_kw, s_cs_p, s_cs_i, s_sn_p, s_sn_i, s_pos, s_slot,
    s_qo_t, s_qo_h, s_qo_d, s_go_t, s_go_h, s_go_d, s_ko_t, s_ko_h, s_ko_d, s_vo_t, s_vo_h, s_vo_d,
    s_kc_b, s_kc_s, s_kc_h, s_kc_d, s_vc_b, s_vc_s, s_vc_h, s_vc_d,
    # constexprs
    BHQ: tl.constexpr, BHK: tl.constexpr, BD: tl.constexpr, IS_NEOX: tl.constexpr,
    HAS_GATE: tl.constexpr, HAS_K_SCALE: tl.constexpr, HAS_V_SCALE: tl.constexpr,
    EXACT_ROUNDING: tl.constexpr, COL_ALIGN: tl.constexpr,
):
    i_t = tl.program_id(0).to(tl.int64)
    i_j = tl.program_id(1)

    o_d = tl.arange(0, BD)
    m_d = o_d < D
    m_rot = o_d < R
    half = R // 2
    # RoPE pairs: NeoX (i, i + R/2), GPT-J (2i, 2i + 1); out_a = a cos - b sin, out_b = b cos + a sin
    if IS_NEOX:
        o_pd = tl.where(o_d < half, o_d + half, o_d - half)
        o_f = tl.where(o_d < half, o_d, o_d - half)
        b_sign = tl.where(o_d < half, -1.0, 1.0)
    else:
        o_pd = o_d ^ 1
        o_f = o_d // 2
        b_sign = tl.where((o_d % 2) == 0, -1.0, 1.0)
    o_pd = tl.where(m_rot, o_pd, o_d)
    o_f = tl.where(m_rot, o_f, 0)

    b_pos = tl.load(positions + i_t * s_pos).to(tl.int64)
    m_pos = (b_pos >= 0) & (b_pos < MAX_POS)
    b_pos = tl.where(m_pos, b_pos, 0)
    # [BD]; identity outside the rotary dims and for out-of-range positions
    b_cos = tl.load(cos + b_pos * s_cs_p + o_f * s_cs_i, mask=m_rot & m_pos, other=1.0).to(tl.float32)
    b_sin = tl.load(sin + b_pos * s_sn_p + o_f * s_sn_i, mask=m_rot & m_pos, other=0.0).to(tl.float32)

    p_row = qkv + i_t * s_x_t
    if i_j < NQT:
        o_qh = i_j * BHQ + tl.arange(0, BHQ)
        m_qd = (o_qh < QH)[:, None] & m_d[None, :]
        # [BHQ, BD]
        o_col = tl.multiple_of(o_qh.to(tl.int64) * q_hs, COL_ALIGN)[:, None]
        b_q = tl.load(p_row + (o_col + o_d[None, :]) * s_x_w, mask=m_qd, other=0.0).to(tl.float32)
        b_qp = tl.load(p_row + (o_col + o_pd[None, :]) * s_x_w, mask=m_qd, other=0.0).to(tl.float32)
        b_q = _norm_rope(b_q, b_qp, q_norm_w, o_d * s_qw, o_pd * s_qw, m_d, D, eps, w_offset,
                         b_cos, b_sin, b_sign)
        p_q = q_out + i_t * s_qo_t + o_qh[:, None].to(tl.int64) * s_qo_h + o_d[None, :] * s_qo_d
        tl.store(p_q, cast_to(b_q, q_out.dtype.element_ty, EXACT_ROUNDING), mask=m_qd)
        if HAS_GATE:
            # [BHQ, BD] raw copy, same dtype
            o_gcol = tl.multiple_of(g_col + o_qh.to(tl.int64) * g_hs, COL_ALIGN)[:, None] + o_d[None, :]
            b_g = tl.load(p_row + o_gcol * s_x_w, mask=m_qd)
            p_g = g_out + i_t * s_go_t + o_qh[:, None].to(tl.int64) * s_go_h + o_d[None, :] * s_go_d
            tl.store(p_g, b_g, mask=m_qd)
    else:
        o_kh = (i_j - NQT) * BHK + tl.arange(0, BHK)
        m_kd = (o_kh < KVH)[:, None] & m_d[None, :]
        o_hcol = o_kh.to(tl.int64) * D
        o_kcol = tl.multiple_of(k_col + o_hcol, COL_ALIGN)[:, None]
        o_vcol = tl.multiple_of(v_col + o_hcol, COL_ALIGN)[:, None]
        # [BHK, BD]
        b_k = tl.load(p_row + (o_kcol + o_d[None, :]) * s_x_w, mask=m_kd, other=0.0).to(tl.float32)
        b_kp = tl.load(p_row + (o_kcol + o_pd[None, :]) * s_x_w, mask=m_kd, other=0.0).to(tl.float32)
        b_k = _norm_rope(b_k, b_kp, k_norm_w, o_d * s_kw, o_pd * s_kw, m_d, D, eps, w_offset,
                         b_cos, b_sin, b_sign)
        b_v = tl.load(p_row + (o_vcol + o_d[None, :]) * s_x_w, mask=m_kd, other=0.0)
        o_ho = o_kh[:, None].to(tl.int64)
        p_k = k_out + i_t * s_ko_t + o_ho * s_ko_h + o_d[None, :] * s_ko_d
        tl.store(p_k, cast_to(b_k, k_out.dtype.element_ty, EXACT_ROUNDING), mask=m_kd)
        p_v = v_out + i_t * s_vo_t + o_ho * s_vo_h + o_d[None, :] * s_vo_d
        tl.store(p_v, b_v, mask=m_kd)

        b_slot = tl.load(slot_mapping + i_t * s_slot).to(tl.int64)
        m_slot = (b_slot >= 0) & (b_slot < CAPACITY)
        b_slot = tl.where(m_slot, b_slot, 0)
        i_blk = b_slot // CACHE_BS
        i_off = b_slot % CACHE_BS
        m_c = m_kd & m_slot
        # K, then V, each divided by its scale; an fp8 cache saturates at +-448
        if HAS_K_SCALE:
            b_k = b_k / tl.load(k_scale).to(tl.float32)
        if key_cache.dtype.element_ty == tl.float8e4nv:
            b_k = tl.minimum(tl.maximum(b_k, -FP8_MAX), FP8_MAX)
        p_kc = key_cache + i_blk * s_kc_b + i_off * s_kc_s + o_ho * s_kc_h + o_d[None, :] * s_kc_d
        tl.store(p_kc, cast_to(b_k, key_cache.dtype.element_ty, EXACT_ROUNDING), mask=m_c)
        b_v = b_v.to(tl.float32)
        if HAS_V_SCALE:
            b_v = b_v / tl.load(v_scale).to(tl.float32)
        if value_cache.dtype.element_ty == tl.float8e4nv:
            b_v = tl.minimum(tl.maximum(b_v, -FP8_MAX), FP8_MAX)
        p_vc = value_cache + i_blk * s_vc_b + i_off * s_vc_s + o_ho * s_vc_h + o_d[None, :] * s_vc_d
        tl.store(p_vc, cast_to(b_v, value_cache.dtype.element_ty, EXACT_ROUNDING), mask=m_c)


def _check(qkv, q_norm_weight, k_norm_weight, cos, sin, positions, key_cache, value_cache,
           slot_mapping, num_q_heads, num_kv_heads, head_dim, rotary_dim, is_neox, eps,
           norm_weight_offset, gate, cache_layout, k_scale, v_scale) -> int:
    """Validate every argument; return R (the rotary dim)."""
    check_int("num_q_heads", num_q_heads, lo=1)
    check_int("num_kv_heads", num_kv_heads, lo=1)
    check_int("head_dim", head_dim, lo=2, hi=MAX_HEAD_DIM, multiple_of=2)
    if num_q_heads % num_kv_heads != 0:
        raise ValueError(f"num_q_heads: expected a multiple of num_kv_heads={num_kv_heads}, got {num_q_heads}")
    R = head_dim if rotary_dim is None else rotary_dim
    check_int("rotary_dim", R, lo=2, hi=head_dim, multiple_of=2)
    if not isinstance(is_neox, bool):
        raise TypeError(f"is_neox: expected a bool, got {type(is_neox).__name__}")
    for name, v in (("eps", eps), ("norm_weight_offset", norm_weight_offset)):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"{name}: expected a float, got {type(v).__name__}")
    if not eps >= 0:
        raise ValueError(f"eps: expected >= 0, got {eps}")
    check_choice("gate", gate, (None, "interleaved", "blocked"))
    check_choice("cache_layout", cache_layout, ("NHD", "HND"))

    dev = qkv.device if isinstance(qkv, torch.Tensor) else None
    qh, kvh, D = num_q_heads, num_kv_heads, head_dim
    W = (2 * qh + 2 * kvh) * D if gate is not None else (qh + 2 * kvh) * D
    check_tensor("qkv", qkv, dtypes=FLOAT_ACTIVATIONS, shape=(None, W), device=dev)
    T = qkv.shape[0]
    check_tensor("q_norm_weight", q_norm_weight, dtypes=FLOAT_ACTIVATIONS, shape=(D,), device=dev)
    check_tensor("k_norm_weight", k_norm_weight, dtypes=FLOAT_ACTIVATIONS, shape=(D,), device=dev)
    table_dtypes = tuple({torch.float32, qkv.dtype})
    check_tensor("cos", cos, dtypes=table_dtypes, shape=(None, R // 2), device=dev)
    check_tensor("sin", sin, dtypes=table_dtypes, shape=(cos.shape[0], R // 2), device=dev)
    check_tensor("positions", positions, dtypes=INDEX_DTYPES, shape=(T,), device=dev)
    check_tensor("slot_mapping", slot_mapping, dtypes=INDEX_DTYPES, shape=(T,), device=dev)
    cache_shape = (None, None, kvh, D) if cache_layout == "NHD" else (None, kvh, None, D)
    check_tensor("key_cache", key_cache, dtypes=CACHE_DTYPES, shape=cache_shape, device=dev)
    check_tensor("value_cache", value_cache, dtypes=CACHE_DTYPES, shape=tuple(key_cache.shape), device=dev)
    check_scale("k_scale", k_scale, dev)
    check_scale("v_scale", v_scale, dev)
    return R


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def qkv_norm_rope_cache(qkv: torch.Tensor, q_norm_weight: torch.Tensor, k_norm_weight: torch.Tensor,
                        cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                        key_cache: torch.Tensor, value_cache: torch.Tensor, slot_mapping: torch.Tensor,
                        *, num_q_heads: int, num_kv_heads: int, head_dim: int,
                        rotary_dim: Optional[int] = None, is_neox: bool = True, eps: float = 1e-6,
                        norm_weight_offset: float = 0.0, gate: Optional[str] = None,
                        cache_layout: str = "NHD", k_scale: Optional[torch.Tensor] = None,
                        v_scale: Optional[torch.Tensor] = None, num_warps: Optional[int] = None):
    """Split flat QKV, RMSNorm Q and K per head, apply RoPE, write K and V into a paged cache.

    Args:
        qkv: [T, W] bf16/fp16/fp32, any strides. W = (qh + 2 kvh) D laid out [Q | K | V]; with
            gate="interleaved" W = (2 qh + 2 kvh) D laid out [q0 | g0 | q1 | g1 | ... | K | V];
            with gate="blocked" [all Q | all gates | K | V].
        q_norm_weight, k_norm_weight: [D], any float dtype; the norm multiplies by (w + norm_weight_offset).
        cos, sin: [max_pos, R / 2] float32 or qkv's dtype, row = position.
        positions: [T] int64 (int32 accepted). A position outside [0, max_pos) is rotated by the
            identity (cos 1, sin 0): the table is not read for it.
        key_cache, value_cache: NHD [num_blocks, block_size, kvh, D] or HND
            [num_blocks, kvh, block_size, D], bf16/fp16/fp32/float8_e4m3fn, written in place.
        slot_mapping: [T] int64 (int32 accepted). Slot s is valid iff 0 <= s < num_blocks * block_size;
            an invalid slot writes nothing to the caches (q, k, v are still produced).
        rotary_dim: R, even, 2 <= R <= D (default D); dims >= R pass through RoPE unchanged.
        is_neox: pairs (i, i + R/2) when True, (2i, 2i + 1) (GPT-J) when False.
        k_scale, v_scale: None or float32 [] / [1]; the cache holds k / k_scale and v / v_scale,
            clamped to +-448 first for a float8_e4m3fn cache.
        num_warps: launch override for benchmarks (default 4).

    Returns:
        (q [T, qh, D], k [T, kvh, D], v [T, kvh, D]) in qkv's dtype, or
        (q, gate_out [T, qh, D], k, v) when gate is given. k and v are not divided by the scales.
    """
    R = _check(qkv, q_norm_weight, k_norm_weight, cos, sin, positions, key_cache, value_cache,
               slot_mapping, num_q_heads, num_kv_heads, head_dim, rotary_dim, is_neox, eps,
               norm_weight_offset, gate, cache_layout, k_scale, v_scale)
    T = qkv.shape[0]
    qh, kvh, D = num_q_heads, num_kv_heads, head_dim
    q = torch.empty((T, qh, D), dtype=qkv.dtype, device=qkv.device)
    k = torch.empty((T, kvh, D), dtype=qkv.dtype, device=qkv.device)
    v = torch.empty((T, kvh, D), dtype=qkv.dtype, device=qkv.device)
    g = torch.empty((T, qh, D), dtype=qkv.dtype, device=qkv.device) if gate is not None else None
    outs = (q, k, v) if g is None else (q, g, k, v)
    if T == 0:
        return outs

    if gate is None:
        q_hs, g_col, g_hs, k_col = D, 0, 0, qh * D
    elif gate == "interleaved":
        q_hs, g_col, g_hs, k_col = 2 * D, D, 2 * D, 2 * qh * D
    else:
        q_hs, g_col, g_hs, k_col = D, qh * D, D, 2 * qh * D
    v_col = k_col + kvh * D

    if cache_layout == "NHD":
        num_blocks, block_size = key_cache.shape[0], key_cache.shape[1]
        kc_strides = (key_cache.stride(0), key_cache.stride(1), key_cache.stride(2), key_cache.stride(3))
        vc_strides = (value_cache.stride(0), value_cache.stride(1), value_cache.stride(2), value_cache.stride(3))
    else:
        num_blocks, block_size = key_cache.shape[0], key_cache.shape[2]
        kc_strides = (key_cache.stride(0), key_cache.stride(2), key_cache.stride(1), key_cache.stride(3))
        vc_strides = (value_cache.stride(0), value_cache.stride(2), value_cache.stride(1), value_cache.stride(3))

    BD = _pow2(D)
    BHQ = min(_pow2(qh), max(1, TILE_ELEMENTS // BD))
    BHK = min(_pow2(kvh), max(1, TILE_ELEMENTS // BD))
    NQT = triton.cdiv(qh, BHQ)
    grid = (T, NQT + triton.cdiv(kvh, BHK))
    g_arg = g if g is not None else q
    _qkv_norm_rope_cache_kernel[grid](
        qkv, q_norm_weight, k_norm_weight, cos, sin, positions, slot_mapping,
        k_scale if k_scale is not None else qkv, v_scale if v_scale is not None else qkv,
        q, g_arg, k, v, key_cache, value_cache,
        T, qh, kvh, D, R, cos.shape[0], block_size, num_blocks * block_size, NQT,
        q_hs, g_col, g_hs, k_col, v_col,
        float(eps), float(norm_weight_offset),
        qkv.stride(0), qkv.stride(1), q_norm_weight.stride(0), k_norm_weight.stride(0),
        cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1),
        positions.stride(0), slot_mapping.stride(0),
        *q.stride(), *g_arg.stride(), *k.stride(), *v.stride(), *kc_strides, *vc_strides,
        BHQ=BHQ, BHK=BHK, BD=BD, IS_NEOX=is_neox, HAS_GATE=gate is not None,
        HAS_K_SCALE=k_scale is not None, HAS_V_SCALE=v_scale is not None,
        EXACT_ROUNDING=interpreting(), COL_ALIGN=math.gcd(D, 16), num_warps=num_warps or 4,
    )
    return outs
