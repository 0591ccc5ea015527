"""MLA decode over a paged latent cache: split-KV (flash-decoding) Triton kernel pair.

Contract: SPEC.md section 2 (issue 3). One latent head [L + P] per token is shared by all query
heads; scores s = sm_scale * q . kv over L + P dims, o = softmax(s) @ kv[:, :L], lse = logsumexp(s).

Stage 1 (`_mla_decode_stage1_kernel`), grid (head tiles, splits, B). Program (j, s, b) runs the
online softmax of BH query heads of sequence b over the s-th slice of its tokens. The latent dims
are cut into NC chunks of BC columns: q, each [BN, L] cache tile and the [BH, L] output
accumulator are tuples of NC per-chunk tiles. q.k is one `tl.dot` per chunk ([BH, BC] x [BC, BN],
each from a zero accumulator) plus the rope `tl.dot` ([BH, BP] x [BP, BN]), added in float32;
p.v is one `tl.dot` per chunk ([BH, BN] x [BN, BC]); float32 accumulation throughout. Why chunks:
the tensor cores round each K = 16 step of an accumulation chain toward zero, so one 512-long
chain drifts by up to ~16 float32 ulps of its partial sums, visible in lse where one score is the
whole answer (an H100, one token: 1.27e-6 off against a budget of 6.9e-7). A simulation of that
rounding put 42% of one-token bf16 lse cases over the budget with one chain and 1.3% (the float32
reference's own luck) with chunks of 64 (BC = 64; 128 for fp8 caches, see SCORE_CHUNK_FP8). The
chunked kernel is also faster than the single-tile one it replaced (H100, H = 16, bf16, page 64:
0.127-0.130 ms against 0.133-0.142 ms on the same inputs). Scores, running max and lse in
natural-log units, exponentials as exp2((s - m) * log2(e)). Tokens are gathered one by one
through the page table (page kv_indices[kv_indptr[b] + t // page_size], slot t % page_size), so
any run-time page_size works and a page's position in the pool does not matter. It writes the
normalised partial output and partial lse (float32) of every (b, head, split), empty splits
included (o 0, lse -inf).
Stage 2 (`_mla_decode_stage2_kernel`), grid (output heads, B): merges the splits with weights
exp(lse_s - max lse) and writes o in q's dtype and lse. No split ever yields NaN: a sequence with
kv_lens 0 has only empty splits and gets o = 0, lse = -inf, without any host synchronisation.

Head tiles (`_config`, a pure function of the run head count and L): BH = 16 rows for up to 16
heads, 32 beyond (4 warps, every dot a synchronous mma.sync; see _config for why not 64); BH 16
when L > 512. The head tile is the fastest grid axis, so the programs that read the same
(sequence, split) slice of the cache run together and the re-reads of H = 128 (4 tiles of 32)
mostly hit L2. Measured on an H100 (B = 64, kv_len 4096, bf16, page 64): H = 128 takes 0.434 ms
with BH 32 (0.585 with BH 16; the earlier single-tile kernel, 0.467 with BH 64); H = 16 takes
0.127-0.130 ms (about 2.35 TB/s of cache read).

Page and slot of a token: with a power-of-two page_size (PAGE_POW2) a shift and a mask, otherwise
a 32-bit division; token positions are int32. (64-bit divisions per token once made the kernel
compute-bound: an fp8 cache, half the bytes, took as long as bf16, 0.21 ms at H = 16.) The rope
columns are masked in runs of 8 when P % 8 == 0 (P_ALIGN8), so their loads stay 16 bytes wide and
are pipelined with the latent ones.

Head padding (`head_padding`): "pad" (default for H dividing 16) is repeat_interleave(16 // H)
done virtually: padded row i of the 16-row tile reads q head i // (16 // H), so no padded copy of
q is made; stage 2 reads padded row h * (16 // H) for output head h, so o **and lse** come back
with H heads. "mask" runs the H heads in a tile whose rows >= H are masked (loaded as 0, never
stored). Rows of a tile are computed independently (same compiled kernel, same row-wise
operations), so both paths give bit-identical o and lse for the same num_kv_splits.
`mla_decode_padded` returns the 16-row padded o and lse before the replicas are dropped.

Split count (`_default_splits`, no host sync): as many splits as fill one wave of 2 programs per
SM (SM count from the device properties; a fixed 8 on the CPU interpreter), never more splits than
cdiv(kv_indices.numel() * page_size, 256) (the host-side bound on any sequence's length), in [1, 64].
The token range of split s is [s * c, min((s + 1) * c, kv_len)) with c = cdiv(kv_len, splits)
rounded up to BN, computed on the device from kv_lens.

Choices where SPEC.md is silent:
- kv_scale multiplies the cache whenever it is given (any cache dtype), as in sections 1 and 3.
- kv_cache must be fp8 (float8_e4m3fn) or have q's dtype. fp8 values are converted exactly to q's
  dtype for the tensor-core dots; kv_scale is applied to the float32 scores and output.
- P = 0 is supported (no rope dot). page_size >= 1.
- On the GPU, p is rounded to q's dtype for the p.v dot (as in every flash-attention kernel).
  Under the Triton interpreter the dot operands are upcast to float32 (its bf16/fp16 dot is wrong).
- L is left to Triton's divisibility-by-16 specialization (always a multiple of 16: one variant)
  so the latent loads vectorise; every other size is do_not_specialize.
"""
import functools
import math
from typing import Optional, Tuple, Union

import torch
import triton
import triton.language as tl

from kernels._checks import FP8, INDEX_DTYPES, check_choice, check_int, check_scale, check_tensor
from kernels._triton import cast_to, interpreting

Q_DTYPES = (torch.bfloat16, torch.float16)
HEAD_TILE = 16        # rows of the tensor-core tile that the padding targets (SPEC.md section 2)
MAX_KV_SPLITS = 64    # num_kv_splits range [1, 64] (SPEC.md section 2)
MAX_LORA_RANK = 1024  # L: multiple of 16 up to 1024
MAX_ROPE_DIM = 128    # P: even, up to 128
MIN_SPLIT_TOKENS = 256  # a split shorter than this does not pay for its share of the stage-2 merge
CPU_SM_COUNT = 8      # stand-in SM count off the GPU (interpreter): few programs, fast tests
CTAS_PER_SM = 2       # stage-1 programs resident per SM (registers: [16, 512] fp32 acc + q + kv tile)
# latent q . kv is summed as chunks of this many dims, each a fresh tensor-core chain, added with
# rounded float32 adds (see the module docstring): 64 for 16-bit caches; 128 for fp8 caches, whose
# 4-bit-significand values sum with less rounding (simulated: 0.5% of one-token fp8 cases over the
# budget with chunks of 64 or 128, 2.75% with one chain) and whose per-chunk conversion costs more
# (H100, H = 16, page 64: 0.181 ms with 128, 0.222 ms with 64)
SCORE_CHUNK = 64
SCORE_CHUNK_FP8 = 128
LOG2E = tl.constexpr(1.4426950408889634)  # = 1 / ln(2)


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr):
    # UPCAST (interpreter): float32 operands; every output element is one contiguous [K] product
    # row reduced by numpy's pairwise sum, the same way for every element (numpy's matmul goes
    # through BLAS, whose rounding depends on the row's position in the tile, which would break
    # the bit-exact pad/mask and replica properties). Otherwise a bf16/fp16 tensor-core dot with
    # a float32 accumulator started at acc (None, or zeros the compiler cannot fold; the UPCAST
    # form adds nothing, both being zero).
    if UPCAST:
        # [M, N, K] -> [M, N]
        return tl.sum(a[:, None, :] * tl.trans(b)[None, :, :], axis=2)
    else:
        return tl.dot(a, b, acc)


@triton.jit(do_not_specialize=["H_run", "REP", "P", "page_size", "page_shift", "num_splits"])
def _mla_decode_stage1_kernel(
    # pointers
    q, kv, kv_indptr, kv_indices, kv_lens, kv_scale, mid_o, mid_lse,
    # scalars
    sm_scale,
    # sizes: H_run rows (16 when padding), row i reads q head i // REP; L latent, P rope dims
    H_run, REP, L, P, page_size, page_shift, num_splits,
    # strides
    s_q_b, s_q_h, s_q_d, s_kv_p, s_kv_s, s_kv_d, s_ptr, s_ind, s_len,
    s_mo_b, s_mo_h, s_mo_s, s_mo_d, s_ml_b, s_ml_h, s_ml_s,
    # constexprs
    BH: tl.constexpr, BL: tl.constexpr, BC: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
    HAS_PE: tl.constexpr, HAS_KV_SCALE: tl.constexpr, UPCAST: tl.constexpr, P_ALIGN8: tl.constexpr,
    PAGE_POW2: tl.constexpr,
):
    i_h, i_s, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b = i_b.to(tl.int64)
    i_s64 = i_s.to(tl.int64)

    # token positions within a sequence are int32 (kv_lens < 2^31): the per-token page and slot
    # divisions stay 32-bit (64-bit integer division is a long software routine on the GPU)
    b_len = tl.load(kv_lens + i_b * s_len).to(tl.int32)
    b_page0 = tl.load(kv_indptr + i_b * s_ptr).to(tl.int64)
    # split s covers [s * c, min((s + 1) * c, kv_len)), c = cdiv(kv_len, splits) rounded up to BN
    b_chunk = tl.cdiv(tl.cdiv(b_len, num_splits), BN) * BN
    b_start = i_s * b_chunk
    b_end = tl.minimum(b_start + b_chunk, b_len)

    # [BH] padded row index, valid rows, and the q head each row reads
    o_h = i_h * BH + tl.arange(0, BH)
    m_h = o_h < H_run
    o_qh = tl.where(m_h, o_h // REP, 0).to(tl.int64)
    # the latent dims in NC = BL // BC chunks of BC columns: q, every cache tile and the output
    # accumulator are tuples of per-chunk tiles, so each chunk's q.k is a chain of its own
    NC: tl.constexpr = BL // BC
    # [BC]
    o_c = tl.arange(0, BC)
    # NC x [BH, BC]
    b_q = ()
    for c in tl.static_range(NC):
        o_l = c * BC + o_c
        p_q = q + i_b * s_q_b + o_qh[:, None] * s_q_h + o_l[None, :].to(tl.int64) * s_q_d
        b_qc = tl.load(p_q, mask=m_h[:, None] & (o_l < L)[None, :], other=0.0)
        if UPCAST:
            b_qc = b_qc.to(tl.float32)
        b_q = b_q + (b_qc,)
    if HAS_PE:
        # [BP]
        o_p = tl.arange(0, BP)
        # P % 8 == 0 (every production model): a mask constant over 8 columns keeps the rope
        # loads 16 bytes wide, so they can be pipelined like the latent ones
        if P_ALIGN8:
            m_p = (o_p // 8) < (P // 8)
        else:
            m_p = o_p < P
        # [BH, BP]
        p_qpe = q + i_b * s_q_b + o_qh[:, None] * s_q_h + (L + o_p[None, :]).to(tl.int64) * s_q_d
        b_qpe = tl.load(p_qpe, mask=m_h[:, None] & m_p[None, :], other=0.0)
        if UPCAST:
            b_qpe = b_qpe.to(tl.float32)

    # scores, max and lse stay in natural-log units (no log2(e) round trip in lse)
    b_scale = sm_scale
    if HAS_KV_SCALE:
        b_scale = sm_scale * tl.load(kv_scale).to(tl.float32)
    # [BH, BN] zeros the compiler cannot prove zero: `s + tl.dot(a, b, b_zero)` is then not folded
    # into `tl.dot(a, b, s)`, so every chunk's product starts a fresh chain
    b_zero = tl.zeros([BH, BN], dtype=tl.float32) * b_scale

    # [BH]
    b_m = tl.full([BH], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BH], dtype=tl.float32)
    # NC x [BH, BC]
    b_acc = ()
    for c in tl.static_range(NC):
        b_acc = b_acc + (tl.zeros([BH, BC], dtype=tl.float32),)
    for n0 in range(b_start, b_end, BN):
        # [BN] token positions; masked lanes use page slot 0 of the sequence's first page id
        o_n = n0 + tl.arange(0, BN)
        m_n = o_n < b_end
        o_n = tl.where(m_n, o_n, 0)
        if PAGE_POW2:
            # page_size == 2^page_shift (every production layout): shift and mask, no division
            o_pg = o_n >> page_shift
            o_sl = o_n & (page_size - 1)
        else:
            o_pg = o_n // page_size
            o_sl = o_n - o_pg * page_size
        b_page = tl.load(kv_indices + (b_page0 + o_pg) * s_ind, mask=m_n, other=0).to(tl.int64)
        p_row = kv + b_page * s_kv_p + o_sl.to(tl.int64) * s_kv_s
        # NC x [BN, BC] the latent cache tile; [BH, BN] the scores, chunk by chunk
        b_kv = ()
        b_s = b_zero
        for c in tl.static_range(NC):
            o_l = c * BC + o_c
            b_kvc = tl.load(p_row[:, None] + o_l[None, :].to(tl.int64) * s_kv_d,
                            mask=m_n[:, None] & (o_l < L)[None, :], other=0.0)
            if UPCAST:
                b_kvc = b_kvc.to(tl.float32)
            else:
                b_kvc = b_kvc.to(q.dtype.element_ty)
            b_kv = b_kv + (b_kvc,)
            b_s = b_s + _dot(b_q[c], tl.trans(b_kvc), b_zero, UPCAST)
        if HAS_PE:
            # [BN, BP]
            b_kpe = tl.load(p_row[:, None] + (L + o_p[None, :]).to(tl.int64) * s_kv_d,
                            mask=m_n[:, None] & m_p[None, :], other=0.0)
            if UPCAST:
                b_kpe = b_kpe.to(tl.float32)
            else:
                b_kpe = b_kpe.to(q.dtype.element_ty)
            b_s = b_s + _dot(b_qpe, tl.trans(b_kpe), b_zero, UPCAST)
        b_s = tl.where(m_n[None, :], b_s * b_scale, float("-inf"))
        # [BH] every block holds at least one valid token, so b_m_new is finite
        b_m_new = tl.maximum(b_m, tl.max(b_s, axis=1))
        b_alpha = tl.exp2((b_m - b_m_new) * LOG2E)
        # [BH, BN]
        b_p = tl.exp2((b_s - b_m_new[:, None]) * LOG2E)
        b_l = b_l * b_alpha + tl.sum(b_p, axis=1)
        if not UPCAST:
            b_p = b_p.to(q.dtype.element_ty)
        b_new = ()
        for c in tl.static_range(NC):
            b_new = b_new + (b_acc[c] * b_alpha[:, None] + _dot(b_p, b_kv[c], None, UPCAST),)
        b_acc = b_new
        b_m = b_m_new

    # [BH] an empty split (no token) gives o 0 and lse -inf
    b_empty = b_l == 0.0
    b_lse = tl.where(b_empty, float("-inf"), b_m + tl.log(tl.where(b_empty, 1.0, b_l)))
    b_rcp = tl.where(b_empty, 0.0, 1.0 / tl.where(b_empty, 1.0, b_l))
    if HAS_KV_SCALE:
        b_rcp = b_rcp * tl.load(kv_scale).to(tl.float32)
    o_hs = o_h.to(tl.int64)
    for c in tl.static_range(NC):
        o_l = c * BC + o_c
        # [BH, BC]
        p_mo = mid_o + i_b * s_mo_b + o_hs[:, None] * s_mo_h + i_s64 * s_mo_s + o_l[None, :].to(tl.int64) * s_mo_d
        tl.store(p_mo, b_acc[c] * b_rcp[:, None], mask=m_h[:, None] & (o_l < L)[None, :])
    tl.store(mid_lse + i_b * s_ml_b + o_hs * s_ml_h + i_s64 * s_ml_s, b_lse, mask=m_h)


@triton.jit(do_not_specialize=["REP", "num_splits"])
def _mla_decode_stage2_kernel(
    # pointers
    mid_o, mid_lse, o, lse,
    # sizes: output head h merges padded row h * REP
    REP, L, num_splits,
    # strides
    s_mo_b, s_mo_h, s_mo_s, s_mo_d, s_ml_b, s_ml_h, s_ml_s,
    s_o_b, s_o_h, s_o_d, s_lse_b, s_lse_h,
    # constexprs
    BL: tl.constexpr, BS: tl.constexpr, STORE_LSE: tl.constexpr, EXACT_ROUNDING: tl.constexpr,
):
    i_h, i_b = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    i_row = i_h * REP
    p_ml = mid_lse + i_b * s_ml_b + i_row * s_ml_h
    p_mo = mid_o + i_b * s_mo_b + i_row * s_mo_h
    # [BS]
    o_s = tl.arange(0, BS)
    b_lse_s = tl.load(p_ml + o_s.to(tl.int64) * s_ml_s, mask=o_s < num_splits, other=float("-inf"))
    b_max = tl.max(b_lse_s, axis=0)
    # all splits empty (kv_len 0): weights 0, o 0, lse -inf; never -inf - -inf
    b_max = tl.where(b_max == float("-inf"), 0.0, b_max)
    b_den = tl.sum(tl.exp(b_lse_s - b_max), axis=0)
    # [BL]
    o_l = tl.arange(0, BL)
    m_l = o_l < L
    b_acc = tl.zeros([BL], dtype=tl.float32)
    for i_s in range(num_splits):
        b_w = tl.exp(tl.load(p_ml + i_s * s_ml_s) - b_max)
        b_acc += b_w * tl.load(p_mo + i_s * s_mo_s + o_l.to(tl.int64) * s_mo_d, mask=m_l, other=0.0)
    b_empty = b_den == 0.0
    b_o = b_acc / tl.where(b_empty, 1.0, b_den)
    p_o = o + i_b * s_o_b + i_h * s_o_h + o_l.to(tl.int64) * s_o_d
    tl.store(p_o, cast_to(b_o, o.dtype.element_ty, EXACT_ROUNDING), mask=m_l)
    if STORE_LSE:
        b_lse = tl.where(b_empty, float("-inf"), b_max + tl.log(tl.where(b_empty, 1.0, b_den)))
        tl.store(lse + i_b * s_lse_b + i_h * s_lse_h, b_lse)


def _config(H_run: int, L: int) -> dict:
    """Stage-1 launch config, a pure function of the run head count and L (see module docstring).

    Measured on an H100 (B = 64, kv_len 4096, L 512, P 64, bf16, page 64, auto splits; one
    process, the same inputs, median of 4 rounds): H = 16, BN 32 / 4 warps: 5 stages 0.127 ms,
    4 stages 0.130, 6 stages 0.127; BN 16 0.136. H = 128: BH 32 / BN 32 / 4 warps / 2 stages
    0.434 ms, 3 stages 0.449; BH 16 / 5 stages 0.585; BH 32 with 8 warps 0.86.
    """
    BL = max(16, triton.next_power_of_2(L))
    if BL >= 1024:
        return dict(BH=16, BN=16, num_warps=8, num_stages=2)
    # no BH = 64: at 64 rows p.v runs on wgmma, which is asynchronous, and Triton 3.6 then prefetches
    # the next cache tile into the single buffer the pending wgmma still reads (seen in the TTGIR:
    # async_copy_global_to_local into the buffer before any warp_group_dot_wait; on an H100,
    # H = 33 and 64 gave zeros); at 16 and 32 rows every dot is a synchronous mma.sync
    if H_run > 16:
        return dict(BH=32, BN=32, num_warps=4, num_stages=2)
    return dict(BH=16, BN=32, num_warps=4, num_stages=5)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return CPU_SM_COUNT


def _default_splits(B: int, n_tiles: int, max_tokens: int, device: torch.device) -> int:
    """Split count from B, the head tiles, the SM count and the host-side token bound; no sync."""
    # one full wave: programs per SM that fit (measured occupancy of the default configs) times
    # the SM count, floored so that a partial second wave never doubles the time (H200, B = 64,
    # H = 16: 5 splits = 320 programs for 264 slots took 0.30 ms, 4 splits 0.21 ms)
    want = (CTAS_PER_SM * _sm_count(device)) // max(1, B * n_tiles)
    cap = triton.cdiv(max(1, max_tokens), MIN_SPLIT_TOKENS)
    return max(1, min(MAX_KV_SPLITS, want, cap))


def _launch(q, kv_cache, kv_indptr, kv_indices, kv_lens, kv_lora_rank, sm_scale, kv_scale,
            num_kv_splits, head_padding, return_lse, padded_out, config=None):
    """Check, allocate, launch. padded_out: return the 16-row padded (o, lse) (pad path only)."""
    # ---- checks (shapes, dtypes, devices only; no tensor data is read) ----
    check_tensor("q", q, dtypes=Q_DTYPES, ndim=3)
    dev = q.device
    B, H, D = q.shape
    check_int("kv_lora_rank", kv_lora_rank, lo=16, hi=MAX_LORA_RANK, multiple_of=16)
    L = kv_lora_rank
    P = D - L
    if P < 0 or P > MAX_ROPE_DIM or P % 2 != 0:
        raise ValueError(f"q: expected last dim kv_lora_rank + P with P even in [0, {MAX_ROPE_DIM}], "
                         f"got q.shape[2] = {D} with kv_lora_rank = {L} (P = {P})")
    check_tensor("kv_cache", kv_cache, dtypes=(q.dtype, FP8), ndim=3, device=dev)
    if kv_cache.shape[2] != D:
        raise ValueError(f"kv_cache: expected shape[2] == q.shape[2] == {D}, got shape {tuple(kv_cache.shape)}")
    page_size = kv_cache.shape[1]
    if page_size < 1:
        raise ValueError(f"kv_cache: expected page_size (shape[1]) >= 1, got shape {tuple(kv_cache.shape)}")
    check_tensor("kv_indptr", kv_indptr, dtypes=INDEX_DTYPES, shape=(B + 1,), device=dev)
    check_tensor("kv_indices", kv_indices, dtypes=INDEX_DTYPES, ndim=1, device=dev)
    check_tensor("kv_lens", kv_lens, dtypes=INDEX_DTYPES, shape=(B,), device=dev)
    if sm_scale is not None:
        if isinstance(sm_scale, bool) or not isinstance(sm_scale, (int, float)):
            raise TypeError(f"sm_scale: expected a float or None, got {type(sm_scale).__name__} {sm_scale!r}")
        if not math.isfinite(sm_scale):
            raise ValueError(f"sm_scale: expected a finite float, got {sm_scale!r}")
    check_scale("kv_scale", kv_scale, dev)
    if num_kv_splits is not None:
        check_int("num_kv_splits", num_kv_splits, lo=1, hi=MAX_KV_SPLITS)
    check_choice("head_padding", head_padding, ("auto", "pad", "mask"))
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse: expected a bool, got {type(return_lse).__name__} {return_lse!r}")
    divides = H >= 1 and HEAD_TILE % H == 0
    if head_padding == "pad" and not divides:
        raise ValueError(f"head_padding: 'pad' needs a head count dividing {HEAD_TILE}, got H = {H}")
    if padded_out:
        if head_padding == "mask":
            raise ValueError("head_padding: the padded entry point runs the 'pad' path, got 'mask'")
        if not divides:
            raise ValueError(f"q: the padded entry point needs a head count dividing {HEAD_TILE}, got H = {H}")
    pad = divides and head_padding in ("auto", "pad")
    REP = HEAD_TILE // H if pad else 1
    H_run = HEAD_TILE if pad else H
    H_out = H_run if padded_out else H

    # ---- outputs ----
    o = torch.empty((B, H_out, L), dtype=q.dtype, device=dev)
    lse = torch.empty((B, H_out), dtype=torch.float32, device=dev)
    if B == 0 or H == 0:
        return o, lse
    sm_scale = 1.0 / math.sqrt(L + P) if sm_scale is None else float(sm_scale)

    cfg = dict(_config(H_run, L))
    if config:
        cfg.update(config)
    BH, BN = cfg["BH"], cfg["BN"]
    n_tiles = triton.cdiv(H_run, BH)
    S = num_kv_splits if num_kv_splits is not None else _default_splits(
        B, n_tiles, kv_indices.numel() * page_size, dev)
    BL = max(16, triton.next_power_of_2(L))
    BP = max(16, triton.next_power_of_2(max(P, 1)))
    # score chunk width (a power of two, at most BL); the config key "BC" overrides it (bench)
    BC = min(BL, cfg.get("BC", SCORE_CHUNK_FP8 if kv_cache.dtype == FP8 else SCORE_CHUNK))
    mid_o = torch.empty((B, H_run, S, L), dtype=torch.float32, device=dev)
    mid_lse = torch.empty((B, H_run, S), dtype=torch.float32, device=dev)
    kv_scale_arg = kv_scale if kv_scale is not None else mid_lse  # unused pointer when absent

    _mla_decode_stage1_kernel[(n_tiles, S, B)](
        q, kv_cache, kv_indptr, kv_indices, kv_lens, kv_scale_arg, mid_o, mid_lse,
        sm_scale,
        H_run, REP, L, P, page_size, page_size.bit_length() - 1, S,
        q.stride(0), q.stride(1), q.stride(2),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2),
        kv_indptr.stride(0), kv_indices.stride(0), kv_lens.stride(0),
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_o.stride(3),
        mid_lse.stride(0), mid_lse.stride(1), mid_lse.stride(2),
        BH=BH, BL=BL, BC=BC, BP=BP, BN=BN, HAS_PE=P > 0, HAS_KV_SCALE=kv_scale is not None,
        UPCAST=interpreting(), P_ALIGN8=P % 8 == 0,
        PAGE_POW2=page_size & (page_size - 1) == 0, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    _mla_decode_stage2_kernel[(H_out, B)](
        mid_o, mid_lse, o, lse,
        1 if padded_out else REP, L, S,
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_o.stride(3),
        mid_lse.stride(0), mid_lse.stride(1), mid_lse.stride(2),
        o.stride(0), o.stride(1), o.stride(2), lse.stride(0), lse.stride(1),
        BL=BL, BS=MAX_KV_SPLITS, STORE_LSE=return_lse or padded_out, EXACT_ROUNDING=interpreting(),
        num_warps=4,
    )
    return o, lse


def mla_decode(q: torch.Tensor, kv_cache: torch.Tensor, kv_indptr: torch.Tensor,
               kv_indices: torch.Tensor, kv_lens: torch.Tensor, *, kv_lora_rank: int,
               sm_scale: Optional[float] = None, kv_scale: Optional[torch.Tensor] = None,
               num_kv_splits: Optional[int] = None, head_padding: str = "auto",
               return_lse: bool = False) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """MLA decode attention over a paged latent cache (SPEC.md section 2).

    Args:
        q: [B, H, L + P] bfloat16 or float16; L = kv_lora_rank, P the rope dim (even, 0..128).
        kv_cache: [num_pages, page_size, L + P] in q's dtype or float8_e4m3fn; one latent head.
        kv_indptr: [B + 1] int32/int64; pages of sequence b are kv_indices[kv_indptr[b]:kv_indptr[b+1]].
        kv_indices: [num_indices] int32/int64 page ids in [0, num_pages).
        kv_lens: [B] int32/int64 tokens per sequence (<= its pages * page_size); 0 allowed.
        kv_lora_rank: L, a multiple of 16 in [16, 1024].
        sm_scale: score scale, default 1 / sqrt(L + P).
        kv_scale: None or float32 [] / [1]; the cache is dequantised as kv_cache * kv_scale.
        num_kv_splits: None (chosen without host sync) or an int in [1, 64].
        head_padding: "auto" (pad when H divides 16, else mask), "pad" (H must divide 16) or "mask".
        return_lse: also return lse.

    Returns:
        o [B, H, L] in q's dtype, and with return_lse lse [B, H] float32 (natural log);
        a sequence with kv_lens 0 gives o = 0 and lse = -inf.
    """
    o, lse = _launch(q, kv_cache, kv_indptr, kv_indices, kv_lens, kv_lora_rank, sm_scale, kv_scale,
                     num_kv_splits, head_padding, return_lse, padded_out=False)
    return (o, lse) if return_lse else o


def mla_decode_padded(q: torch.Tensor, kv_cache: torch.Tensor, kv_indptr: torch.Tensor,
                      kv_indices: torch.Tensor, kv_lens: torch.Tensor, *, kv_lora_rank: int,
                      sm_scale: Optional[float] = None, kv_scale: Optional[torch.Tensor] = None,
                      num_kv_splits: Optional[int] = None, head_padding: str = "auto",
                      return_lse: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Internal: the "pad" path of `mla_decode`, returning the padded (o [B, 16, L], lse [B, 16]).

    Same arguments as `mla_decode`; H must divide 16 and head_padding must not be "mask".
    Padded row i is a replica of head i // (16 // H); mla_decode returns rows h * (16 // H).
    Both o and lse are always returned (return_lse is accepted and ignored).
    """
    return _launch(q, kv_cache, kv_indptr, kv_indices, kv_lens, kv_lora_rank, sm_scale, kv_scale,
                   num_kv_splits, head_padding, return_lse, padded_out=True)
