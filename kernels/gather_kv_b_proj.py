"""MLA prefill with a prefix cache: gather the paged latent cache and expand it through kv_b_proj.

Contract: SPEC.md section 3 (from aiter PR 2739, generalised). For token t of sequence b (token j
of b, t = cu_kv_lens[b] + j) the latent row lives at block kv_indices[kv_indptr[b] + j // block_size],
slot j % block_size, and

    c  = kv_scale * cache[block, slot, :L]          pe = kv_scale * cache[block, slot, L:]
    proj = (W * w_scale) @ c                          (W = w_kv_b, [N, L], N = H (qk_nope + v))
    k[t, h] = [proj[h (qk+v) : h (qk+v) + qk] | pe]   v[t, h] = proj[h (qk+v) + qk : (h+1)(qk+v)]

Design
- One 1-D grid over (token tile of BT rows) x (output tile of BN columns). Output tiles never cross
  a K-nope or V segment of one head: head h owns cdiv(qk, BN) K tiles and cdiv(v, BN) V tiles, so
  every store is a contiguous masked run of one row of k or v, and qk_nope != v_head_dim costs no
  special case. The output tile index runs fastest, so the programs in flight share their gathered
  latent rows (L2) and sweep the whole weight (a few MB, L2-resident).
- A token tile is BT consecutive rows of the packed output; every row finds its own sequence by a
  vectorised binary search over cu_kv_lens (ceil(log2 B) steps, no host sync, no extra launch), so
  a tile may span sequences and no program is wasted on short sequences. A row only reads the slot
  of its own token (j < kv_len[b]): the tail of the last block and unreferenced blocks are never
  read, and a cache that ends right after the last referenced block is safe. block_size is a
  run-time value (any >= 1).
- Each K step loads a [BT, BK] gathered latent tile and G [BK, BN] weight tiles (G consecutive
  output tiles, a step, share the latent tile: G accumulators) and multiplies on tensor cores
  with float32 accumulation. Operand dtype: fp8 x fp8 runs on fp8 tensor cores when
  the output is bfloat16, and as bf16 x bf16 (exact conversion) otherwise: Hopper's fp8 MMA keeps
  only about 14 bits of its accumulator (measured on an H100: a relative error of 5.5e-5 on one
  16-term product), far inside bf16's rounding but outside float32's or float16's budget. An
  fp8 operand beside a bf16/fp16 one is converted to that 16-bit type (exact); bf16 beside fp16 runs
  as tf32 (exact for both). A bf16/fp16 weight is never rounded to fp8. kv_scale and a per-row
  w_scale multiply the float32 accumulator at the end; a 128x128 block w_scale multiplies each K
  step's partial product (BK divides 128, so a K step lies in one column block) with the scale of
  the ABSOLUTE weight row r // 128 (blocks may straddle K/V and head boundaries).
- The rope part is written by the first K tile of every head: the float32 product cache * kv_scale,
  rounded once to out_dtype (the same value torch gives for (pe.double() * kv_scale).to(out_dtype),
  which converts through float32), bit-identical across heads.
- Under the Triton interpreter the dot operands are upcast to float32 (its bf16/fp16 dots are
  wrong), each K step is a broadcast product summed over k in order (numpy's sgemm behind its
  tl.dot rounds a row by its position in the tile, which breaks batch split invariance), and
  bf16 stores go through cast_to's exact rounding.

The one host read: the output row count total = cu_kv_lens[-1] must be known to allocate k and v
(the contract returns them), so the launcher reads that single element. No other tensor data is
read on the host; nothing is validated on the device.
"""
from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from kernels._checks import INDEX_DTYPES, FP8, check_int, check_scale, check_tensor
from kernels._triton import cast_to, interpreting

CACHE_DTYPES = (torch.bfloat16, torch.float16, FP8)
WEIGHT_DTYPES = (torch.bfloat16, torch.float16, FP8)
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
SCALE_BLOCK = 128  # DeepSeek-V3 fp8 weight quantisation block: 128 rows x 128 columns

_TL = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32,
       FP8: tl.float8e4nv}

W_SCALE_NONE, W_SCALE_ROW, W_SCALE_BLOCK = 0, 1, 2


@triton.jit
def _rope_out(b_pe, kv_scale, out_ty: tl.constexpr, HAS_KV_SCALE: tl.constexpr, EXACT_ROUNDING: tl.constexpr):
    # [BT, BP] cache rope part -> kv_scale * pe in float32, rounded once to the output type
    b_pe = b_pe.to(tl.float32)
    if HAS_KV_SCALE:
        b_pe = b_pe * tl.load(kv_scale)
    return cast_to(b_pe, out_ty, EXACT_ROUNDING)


@triton.jit
def _store_tile(p_o, b_o, m_row, m_n, full):
    # [BT, BN] output tile; a full column tile (full) stores with a row mask only, constant along
    # the columns, so the stores stay 16 bytes wide (ci/compile_check.py checks the vector width)
    if full:
        tl.store(p_o, b_o, mask=m_row[:, None])
    else:
        tl.store(p_o, b_o, mask=m_row[:, None] & m_n[None, :])


@triton.jit
def _divmod_small(n, d, inv_d):
    """(n // d, n % d) for int32 0 <= n < 2^20 and d >= 1, with inv_d = float32(1 / d): a float
    multiply instead of an integer division (~25 instructions, paid in every K step). Exact:
    (n + 0.5) / d lies at least 0.5 / d from an integer, and the float error is below
    (n / d) 2^-23 < 2^-3 / d."""
    q = tl.cast((n * 1.0 + 0.5) * inv_d, tl.int32)
    return q, n - q * d


@triton.jit
def _segment_tile(i_n, QK, VD, NT_K, NT_V, inv_nt, BN: tl.constexpr):
    # output tile i_n -> (head, K-nope or V segment, first column in the segment, segment width,
    # first weight row); inv_nt = 1 / (NT_K + NT_V)
    i_h, i_r = _divmod_small(i_n, NT_K + NT_V, inv_nt)
    is_k = i_r < NT_K
    d0 = tl.where(is_k, i_r, i_r - NT_K) * BN
    seg = tl.where(is_k, QK, VD)
    w_row0 = i_h * (QK + VD) + tl.where(is_k, 0, QK) + d0
    return i_h, is_k, d0, seg, w_row0


@triton.jit
def _step_tile(i_s, g, G: tl.constexpr, N_OUT_TILES):
    # output tile g of step i_s; a tile past the last one (N_OUT_TILES not a multiple of G) is the
    # last one again: the same inputs and arithmetic, so storing it twice writes the same bits
    i_n = i_s * G + g
    if G > 1:
        i_n = tl.minimum(i_n, N_OUT_TILES - 1)
    return i_n


# L is left specialised: it is always a multiple of 16, so it compiles once and its divisibility
# lets the K mask stay constant over 16 columns (vectorised loads).
# QK is specialised too (divisible by 16 or not: two variants) so the rope stores stay aligned.
@triton.jit(do_not_specialize=["total", "B", "n_search", "block_size", "P", "VD",
                               "NT_K", "NT_V", "N_OUT_TILES", "N_STEPS", "N_GROUPS", "H"])
def _gather_kv_b_proj_kernel(
    # pointers
    cache, kv_indptr, kv_indices, cu_kv_lens, w, w_scale, kv_scale, k_out, v_out,
    # sizes (run time)
    total, B, n_search, block_size, L, P, QK, VD, NT_K, NT_V, N_OUT_TILES, N_STEPS, N_GROUPS, H,
    inv_nk, inv_nt,
    # strides
    s_cb, s_cs, s_cd,
    s_wn, s_wl,
    s_sn, s_sl,
    s_kt, s_kh, s_kd,
    s_vt, s_vh, s_vd,
    # block sizes and flags
    BT: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BP: tl.constexpr, G: tl.constexpr,
    EVEN_K: tl.constexpr, W_SCALE_MODE: tl.constexpr, HAS_KV_SCALE: tl.constexpr, HAS_PE: tl.constexpr,
    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, EXACT_ROUNDING: tl.constexpr,
):
    # program -> (token tile, steps i_g, i_g + N_GROUPS, ... of G output tiles each)
    i_p = tl.program_id(0)
    i_t = (i_p // N_GROUPS).to(tl.int64)
    i_g = i_p % N_GROUPS

    # ---- rows: token -> sequence (binary search) -> block, slot
    # [BT]
    o_t = i_t * BT + tl.arange(0, BT).to(tl.int64)
    m_t = o_t < total
    # largest b in [0, B-1] with cu_kv_lens[b] <= t (skips empty sequences)
    b_lo = tl.zeros([BT], dtype=tl.int64)
    b_hi = tl.zeros([BT], dtype=tl.int64) + (B - 1)
    for _ in range(n_search):
        b_mid = (b_lo + b_hi + 1) // 2
        b_cu = tl.load(cu_kv_lens + b_mid, mask=m_t, other=0).to(tl.int64)
        m_go = b_cu <= o_t
        b_lo = tl.where(m_go, b_mid, b_lo)
        b_hi = tl.where(m_go, b_hi, b_mid - 1)
    b_start = tl.load(cu_kv_lens + b_lo, mask=m_t, other=0).to(tl.int64)
    o_j = o_t - b_start
    m_row = m_t & (o_j >= 0)
    o_j = tl.where(m_row, o_j, 0)
    b_first = tl.load(kv_indptr + b_lo, mask=m_row, other=0).to(tl.int64)
    b_blk = tl.load(kv_indices + b_first + o_j // block_size, mask=m_row, other=0).to(tl.int64)
    b_blk = tl.where(m_row, b_blk, 0)
    # [BT] offset of each row's latent vector in the cache
    o_row = b_blk * s_cb + (o_j % block_size) * s_cs

    # The row mapping above is paid once per token tile and shared by all its output tiles. One
    # flat loop over (step, K step) keeps the copy pipeline full across output tiles (a nested
    # loop drains and refills it at every tile): a step is G consecutive output tiles that share
    # each gathered [BT, BK] latent tile (G accumulators, G dots per K step); loop index `it` is K
    # step it % n_k of step i_g + (it // n_k) * N_GROUPS. Tile scalars are int32 (N_OUT_TILES is
    # small).
    n_k = tl.cdiv(L, BK)
    n_mine = tl.cdiv(N_STEPS - i_g, N_GROUPS)
    # [BK], [BN]; int32 lane offsets added to int64 scalars/rows keep their contiguity
    o_k = tl.arange(0, BK)
    o_n = tl.arange(0, BN)
    o_wn = o_n.to(tl.int64) * s_wn
    # G x [BT, BN] = [BT, L] x [L, BN]
    acc = ()
    for g in tl.static_range(G):
        acc = acc + (tl.zeros([BT, BN], dtype=tl.float32),)
    for it in range(0, n_mine * n_k):
        i_q, i_kk = _divmod_small(it, n_k, inv_nk)
        i_s = i_g + i_q * N_GROUPS
        k0 = i_kk * BK
        # [BK]
        m_k = (k0 + o_k) < L
        # [BT, BK] gathered latent rows. Weight rows past the tile point at a valid weight row
        # (o_wrow): a matmul keeps columns apart and those columns are never stored, so the
        # weight load needs a mask only for a K tail (L not a multiple of BK); the per-element
        # predicates made the main loop issue-bound. (Rows past the tile's tokens point at a
        # valid cache row too, but without their mask Triton 3.6 fails to compile the fp8
        # block-scale variant: "operand does not dominate this use".)
        p_a = cache + o_row[:, None] + (k0 + o_k)[None, :] * s_cd
        if EVEN_K:
            b_a = tl.load(p_a, mask=m_row[:, None], other=0.0)
        else:
            b_a = tl.load(p_a, mask=m_row[:, None] & m_k[None, :], other=0.0)
        b_new = ()
        for g in tl.static_range(G):
            i_n = _step_tile(i_s, g, G, N_OUT_TILES)
            i_h, is_k, d0, seg, w_row0 = _segment_tile(i_n, QK, VD, NT_K, NT_V, inv_nt, BN)
            # [BN] weight rows of this tile
            m_n = o_n < seg - d0
            o_wrow = tl.where(m_n, w_row0 + o_n, w_row0)
            # [BK, BN] weight rows (transposed view): the tile's first row, then per-lane offsets
            # (loop invariant, int64) with the lanes past the segment on that first row
            p_w = (w + w_row0.to(tl.int64) * s_wn) + tl.where(m_n, o_wn, 0)[None, :] + (k0 + o_k)[:, None] * s_wl
            if EVEN_K:
                b_w = tl.load(p_w)
            else:
                b_w = tl.load(p_w, mask=m_k[:, None], other=0.0)
            b_acc = acc[g]
            if EXACT_ROUNDING:
                # interpreter: numpy's sgemm (its tl.dot) rounds a row differently depending on
                # its position in the tile; products summed over k in order are the same for
                # every row
                # [BT, BN]
                b_p = tl.sum(b_a.to(tl.float32)[:, :, None] * b_w.to(tl.float32)[None, :, :], axis=1)
            if W_SCALE_MODE == 2:
                # [BN] block scale of absolute row r // 128, column block k0 // 128 (BK divides 128)
                b_s = tl.load(w_scale + (o_wrow // 128) * s_sn + (k0 // 128) * s_sl, mask=m_n, other=0.0)
                if not EXACT_ROUNDING:
                    b_p = tl.dot(b_a.to(DOT_DTYPE), b_w.to(DOT_DTYPE), input_precision=INPUT_PRECISION)
                b_acc += b_p * b_s[None, :]
            elif EXACT_ROUNDING:
                b_acc += b_p
            else:
                b_acc = tl.dot(b_a.to(DOT_DTYPE), b_w.to(DOT_DTYPE), b_acc, input_precision=INPUT_PRECISION)
            b_new = b_new + (b_acc,)
        acc = b_new

        if k0 + BK >= L:
            # ---- the step's last K step: scales, store, reset
            b_new = ()
            for g in tl.static_range(G):
                i_n = _step_tile(i_s, g, G, N_OUT_TILES)
                i_h, is_k, d0, seg, w_row0 = _segment_tile(i_n, QK, VD, NT_K, NT_V, inv_nt, BN)
                m_n = o_n < seg - d0
                b_acc = acc[g]
                if W_SCALE_MODE == 1:
                    # [BN]
                    b_s = tl.load(w_scale + (w_row0 + o_n) * s_sn, mask=m_n, other=0.0)
                    b_acc = b_acc * b_s[None, :]
                if HAS_KV_SCALE:
                    b_acc = b_acc * tl.load(kv_scale)
                m_full = d0 + BN <= seg
                if is_k:
                    p_o = (k_out + i_h * s_kh + d0 * s_kd) + o_t[:, None] * s_kt + o_n[None, :] * s_kd
                    _store_tile(p_o, cast_to(b_acc, k_out.dtype.element_ty, EXACT_ROUNDING), m_row, m_n, m_full)
                else:
                    p_o = (v_out + i_h * s_vh + d0 * s_vd) + o_t[:, None] * s_vt + o_n[None, :] * s_vd
                    _store_tile(p_o, cast_to(b_acc, v_out.dtype.element_ty, EXACT_ROUNDING), m_row, m_n, m_full)
                b_new = b_new + (tl.zeros([BT, BN], dtype=tl.float32),)
            acc = b_new

    if HAS_PE:
        # the rope part of heads i_g, i_g + N_GROUPS, ...
        for i_h in range(i_g, H, N_GROUPS):
            # [BP]
            o_p = tl.arange(0, BP)
            # [BT, BP]
            p_c = (cache + L * s_cd) + o_row[:, None] + o_p[None, :] * s_cd
            p_pe = (k_out + i_h * s_kh + QK * s_kd) + o_t[:, None] * s_kt + o_p[None, :] * s_kd
            if P == BP:
                b_pe = tl.load(p_c, mask=m_row[:, None], other=0.0)
                b_pe = _rope_out(b_pe, kv_scale, k_out.dtype.element_ty, HAS_KV_SCALE, EXACT_ROUNDING)
                tl.store(p_pe, b_pe, mask=m_row[:, None])
            else:
                m_pe = m_row[:, None] & (o_p < P)[None, :]
                b_pe = tl.load(p_c, mask=m_pe, other=0.0)
                b_pe = _rope_out(b_pe, kv_scale, k_out.dtype.element_ty, HAS_KV_SCALE, EXACT_ROUNDING)
                tl.store(p_pe, b_pe, mask=m_pe)


class Config(NamedTuple):
    BT: int          # token rows per tile
    BN: int          # output columns per tile (within one K-nope or V segment of one head)
    BK: int          # latent columns per step; divides 128 (block scales)
    num_warps: int
    num_stages: int
    tiles_per_program: int = 8  # output tiles one program computes for its token tile
    G: int = 1                  # output tiles per step, sharing each gathered latent tile


def _pad_cols(qk: int, v: int, bn: int) -> int:
    return triton.cdiv(qk, bn) * bn + triton.cdiv(v, bn) * bn


def pick_config(cache_dtype: torch.dtype, w_dtype: torch.dtype, qk: int, v: int) -> Config:
    """One config from coarse properties: the operand width and the padding waste of the head dims.

    BN is the widest of 128/64/32/16 whose padded columns per head stay within 1/8 of the
    tightest (BN = 16) padding: 128 for qk = v = 128, 64 for qk = 192 / v = 256.
    """
    tight = _pad_cols(qk, v, 16)
    bn = next(b for b in (128, 64, 32, 16) if _pad_cols(qk, v, b) * 8 <= tight * 9)
    if interpreting():
        return Config(BT=16, BN=min(bn, 32), BK=32, num_warps=4, num_stages=1, G=2)
    # measured on an H100 (bench --sweep, 16384 tokens, DeepSeek-V3 and qk 192 / v 256 dims; one
    # sweep after the K step was slimmed, where the same config moves by ~7% within the run):
    # 16-bit operands: 128 x 128 tiles, BK 64, 4 warps, 3 stages, 8 output tiles per program
    # (0.31 ms DeepSeek-V3; 64-row tiles 0.38-0.44; steps of G = 2 tiles with 8 warps 0.32-0.33);
    # with BN = 64, steps of 2 tiles and 8 warps (qk 192 / v 256: 0.515 ms; single tiles on 4
    # warps 0.529; G = 4 0.565-0.591, the best before the K step was slimmed);
    # any fp8 operand: 64-row tiles, BK 128, 32 output tiles per program (fp8 x fp8 0.28 ms;
    # 128-row tiles 0.60; G = 2 0.33), and with BN = 64 steps of 2 tiles (qk 192 / v 256: fp8 x fp8
    # 0.534 against 0.630 ms, bf16 x fp8 0.883 against 0.975)
    if FP8 in (cache_dtype, w_dtype):
        return Config(BT=64, BN=bn, BK=128, num_warps=4, num_stages=3, tiles_per_program=32, G=2 if bn <= 64 else 1)
    if bn <= 64:
        return Config(BT=128, BN=bn, BK=64, num_warps=8, num_stages=3, tiles_per_program=16, G=2)
    return Config(BT=128, BN=bn, BK=64, num_warps=4, num_stages=3, tiles_per_program=8)


def _dot_dtype(cache_dtype: torch.dtype, w_dtype: torch.dtype, out_dtype: torch.dtype) -> Tuple[object, str]:
    """Tensor-core operand type with exact products (see the module docstring)."""
    if interpreting():
        return tl.float32, "ieee"
    if cache_dtype == w_dtype == FP8:
        return (tl.float8e4nv if out_dtype == torch.bfloat16 else tl.bfloat16), "tf32"
    if cache_dtype == w_dtype:
        return _TL[cache_dtype], "tf32"
    if cache_dtype == FP8:
        return _TL[w_dtype], "tf32"
    if w_dtype == FP8:
        return _TL[cache_dtype], "tf32"
    return tl.float32, "tf32"  # bf16 x fp16: both are exact in tf32


def _check(kv_cache, kv_indptr, kv_indices, cu_kv_lens, w_kv_b, kv_lora_rank, qk_nope_head_dim,
           v_head_dim, w_scale, kv_scale, out_dtype) -> Tuple[int, int, int]:
    """Validate everything; return (P, H, W_SCALE_MODE)."""
    check_tensor("kv_cache", kv_cache, dtypes=CACHE_DTYPES, ndim=3)
    dev = kv_cache.device
    check_int("kv_lora_rank", kv_lora_rank, lo=16, hi=1024, multiple_of=16)
    check_int("qk_nope_head_dim", qk_nope_head_dim, lo=1, hi=512)
    check_int("v_head_dim", v_head_dim, lo=1, hi=512)
    if kv_cache.shape[1] < 1:
        raise ValueError(f"kv_cache: expected block_size (shape[1]) >= 1, got shape {tuple(kv_cache.shape)}")
    P = kv_cache.shape[2] - kv_lora_rank
    if P < 0 or P > 128 or P % 2:
        raise ValueError(f"kv_cache: expected shape[2] == kv_lora_rank + P with P even in [0, 128], "
                         f"got shape[2] = {kv_cache.shape[2]} and kv_lora_rank = {kv_lora_rank}")
    check_tensor("kv_indptr", kv_indptr, dtypes=INDEX_DTYPES, ndim=1, device=dev)
    if kv_indptr.shape[0] < 1:
        raise ValueError(f"kv_indptr: expected shape [B + 1] with B >= 0, got shape {tuple(kv_indptr.shape)}")
    B = kv_indptr.shape[0] - 1
    check_tensor("kv_indices", kv_indices, dtypes=INDEX_DTYPES, ndim=1, device=dev)
    check_tensor("cu_kv_lens", cu_kv_lens, dtypes=INDEX_DTYPES, shape=(B + 1,), device=dev)
    check_tensor("w_kv_b", w_kv_b, dtypes=WEIGHT_DTYPES, shape=(None, kv_lora_rank), device=dev)
    N = w_kv_b.shape[0]
    hd = qk_nope_head_dim + v_head_dim
    if N % hd:
        raise ValueError(f"w_kv_b: expected shape[0] a multiple of qk_nope_head_dim + v_head_dim = {hd}, "
                         f"got shape {tuple(w_kv_b.shape)}")
    mode = W_SCALE_NONE
    if w_scale is not None:
        check_tensor("w_scale", w_scale, dtypes=(torch.float32,), device=dev)
        blocks = (triton.cdiv(N, SCALE_BLOCK), triton.cdiv(kv_lora_rank, SCALE_BLOCK))
        if w_scale.dim() == 1 and w_scale.shape[0] == N:
            mode = W_SCALE_ROW
        elif w_scale.dim() == 2 and tuple(w_scale.shape) == blocks:
            mode = W_SCALE_BLOCK
        else:
            raise ValueError(f"w_scale: expected shape [{N}] (per row) or [{blocks[0]}, {blocks[1]}] "
                             f"(128x128 blocks), got shape {tuple(w_scale.shape)}")
    check_scale("kv_scale", kv_scale, dev)
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"out_dtype: expected bfloat16 or float16 or float32, got {out_dtype!r}")
    return P, N // hd, mode


def gather_kv_b_proj_launch(kv_cache, kv_indptr, kv_indices, cu_kv_lens, w_kv_b, *, kv_lora_rank,
                            qk_nope_head_dim, v_head_dim, w_scale=None, kv_scale=None,
                            out_dtype=torch.bfloat16, config: Optional[Config] = None):
    """The launcher: check, allocate, launch. `config` overrides pick_config (benchmarks)."""
    P, H, mode = _check(kv_cache, kv_indptr, kv_indices, cu_kv_lens, w_kv_b, kv_lora_rank,
                        qk_nope_head_dim, v_head_dim, w_scale, kv_scale, out_dtype)
    L, QK, VD = kv_lora_rank, qk_nope_head_dim, v_head_dim
    B = kv_indptr.shape[0] - 1
    # the single host read: the output row count (see the module docstring)
    total = int(cu_kv_lens[-1])
    if total < 0:
        raise ValueError(f"cu_kv_lens: expected a non-negative total cu_kv_lens[-1], got {total}")
    dev = kv_cache.device
    k = torch.empty((total, H, QK + P), dtype=out_dtype, device=dev)
    v = torch.empty((total, H, VD), dtype=out_dtype, device=dev)
    if total == 0 or H == 0:
        return k, v
    cfg = config or pick_config(kv_cache.dtype, w_kv_b.dtype, QK, VD)
    if cfg.BK > SCALE_BLOCK or SCALE_BLOCK % cfg.BK:
        raise ValueError(f"config: expected BK dividing {SCALE_BLOCK}, got {cfg.BK}")
    if cfg.G < 1:
        raise ValueError(f"config: expected G (output tiles per step) >= 1, got {cfg.G}")
    nt_k, nt_v = triton.cdiv(QK, cfg.BN), triton.cdiv(VD, cfg.BN)
    n_out_tiles = H * (nt_k + nt_v)
    n_steps = triton.cdiv(n_out_tiles, cfg.G)
    n_groups = triton.cdiv(n_steps, max(1, cfg.tiles_per_program // cfg.G))
    n_k = triton.cdiv(L, cfg.BK)
    if max(n_out_tiles, n_steps * n_k) >= 2 ** 20:  # the kernel's float divisions are exact below
        raise ValueError(f"w_kv_b: H = {H} heads give {n_out_tiles} output tiles and {n_steps * n_k} "
                         f"K steps per token tile, expected both below 2^20")
    grid = (triton.cdiv(total, cfg.BT) * n_groups,)
    if grid[0] >= 2 ** 31:
        raise ValueError(f"cu_kv_lens: total = {total} tokens needs {grid[0]} programs, more than 2^31 - 1")
    dot_dtype, precision = _dot_dtype(kv_cache.dtype, w_kv_b.dtype, out_dtype)
    ws = w_scale if w_scale is not None else w_kv_b  # dummy pointer when absent
    s_sn = w_scale.stride(0) if w_scale is not None else 0
    s_sl = w_scale.stride(1) if mode == W_SCALE_BLOCK else 0
    _gather_kv_b_proj_kernel[grid](
        kv_cache, kv_indptr, kv_indices, cu_kv_lens, w_kv_b, ws,
        kv_scale if kv_scale is not None else w_kv_b, k, v,
        total, B, max(B - 1, 0).bit_length(), kv_cache.shape[1], L, P, QK, VD,
        nt_k, nt_v, n_out_tiles, n_steps, n_groups, H, 1.0 / n_k, 1.0 / (nt_k + nt_v),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2),
        w_kv_b.stride(0), w_kv_b.stride(1),
        s_sn, s_sl,
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        BT=cfg.BT, BN=cfg.BN, BK=cfg.BK, BP=max(16, triton.next_power_of_2(max(P, 1))), G=cfg.G,
        EVEN_K=L % cfg.BK == 0,
        W_SCALE_MODE=mode, HAS_KV_SCALE=kv_scale is not None, HAS_PE=P > 0,
        DOT_DTYPE=dot_dtype, INPUT_PRECISION=precision, EXACT_ROUNDING=interpreting(),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return k, v


def gather_kv_b_proj(kv_cache: torch.Tensor, kv_indptr: torch.Tensor, kv_indices: torch.Tensor,
                     cu_kv_lens: torch.Tensor, w_kv_b: torch.Tensor, *, kv_lora_rank: int,
                     qk_nope_head_dim: int, v_head_dim: int, w_scale: Optional[torch.Tensor] = None,
                     kv_scale: Optional[torch.Tensor] = None,
                     out_dtype: torch.dtype = torch.bfloat16) -> Tuple[torch.Tensor, torch.Tensor]:
    """Expand the paged MLA latent cache of B sequences into per-head K and V.

    Args:
        kv_cache: [num_blocks, block_size, L + P] bfloat16/float16/float8_e4m3fn; L = kv_lora_rank
            (latent), P = rope dim (even, 0..128). Any strides; block_size >= 1 (run time).
        kv_indptr: [B + 1] int32/int64, block-table offsets of each sequence into kv_indices.
        kv_indices: [num_refs] int32/int64 block ids in [0, num_blocks).
        cu_kv_lens: [B + 1] int32/int64 token prefix sums (cu_kv_lens[0] = 0); total =
            cu_kv_lens[-1]. Token j of sequence b is output row cu_kv_lens[b] + j.
        w_kv_b: [N, L] bfloat16/float16/float8_e4m3fn, N = H (qk_nope_head_dim + v_head_dim);
            head h owns rows [h (qk + v), h (qk + v) + qk) (K-nope), then v rows (V).
        kv_lora_rank: L, a multiple of 16 in [16, 1024].
        qk_nope_head_dim, v_head_dim: in [1, 512], need not be equal nor powers of two.
        w_scale: None, per-row [N] float32, or 128x128-block [ceil(N/128), ceil(L/128)] float32
            indexed by the absolute row r // 128 and column l // 128; multiplies W (any W dtype).
        kv_scale: None or a one-element float32 tensor; multiplies the cache.
        out_dtype: bfloat16, float16 or float32.

    Returns:
        k: [total, H, qk_nope_head_dim + P] out_dtype, [k_nope | pe]; pe (kv_scale * cache rope
           part, the float32 product rounded once to out_dtype) is bit-identical across heads.
        v: [total, H, v_head_dim] out_dtype.
    Reads cu_kv_lens[-1] on the host once (the output size). Raises TypeError/ValueError on bad input.
    """
    return gather_kv_b_proj_launch(kv_cache, kv_indptr, kv_indices, cu_kv_lens, w_kv_b,
                                   kv_lora_rank=kv_lora_rank, qk_nope_head_dim=qk_nope_head_dim,
                                   v_head_dim=v_head_dim, w_scale=w_scale, kv_scale=kv_scale,
                                   out_dtype=out_dtype)
