"""MLA prefill with a prefix cache: gather the paged latent cache and expand it through kv_b_proj.

Contract: SPEC.md section 3 (from aiter PR 2739, generalised). For token t of sequence b (token j
of b, t = cu_kv_lens[b] + j) the latent row lives at block kv_indices[kv_indptr[b] + j // block_size],
slot j % block_size, and

    c  = kv_scale * cache[block, slot, :L]          pe = kv_scale * cache[block, slot, L:]
    proj = (W * w_scale) @ c                          (W = w_kv_b, [N, L], N = H (qk_nope + v))
    k[t, h] = [proj[h (qk+v) : h (qk+v) + qk] | pe]   v[t, h] = proj[h (qk+v) + qk : (h+1)(qk+v)]

Design
- One 1-D grid over (token tile of BT rows) x (output tile of BN columns). An output tile is BN
  consecutive rows of W, i.e. BN consecutive columns of the [k_nope | v] of one or more heads: tiles
  ignore head and K/V segment boundaries, so qk_nope != v_head_dim costs no padding and no special
  case. In the epilogue each column finds its head and segment (a float division by qk + v) and is
  stored to k or v: k and v are two views of one buffer (v right after k), so one offset tensor,
  a per-column row stride and column offset, addresses both. When qk, v and P are multiples of 8,
  every aligned run of 8 columns lies in one segment and is contiguous in memory; the compiler is
  told so (tl.max_contiguous / tl.multiple_of) and the stores stay 16 bytes wide. The output tile
  index runs fastest, so the programs in flight share their gathered latent rows (L2) and sweep
  the whole weight (a few MB, L2-resident).
- A token tile is BT consecutive rows of the packed output; every row finds its own sequence by a
  vectorised binary search over cu_kv_lens (ceil(log2 B) steps, no host sync, no extra launch), so
  a tile may span sequences and no program is wasted on short sequences. A row only reads the slot
  of its own token (j < kv_len[b]): the tail of the last block and unreferenced blocks are never
  read, and a cache that ends right after the last referenced block is safe. block_size is a
  run-time value (any >= 1).
- Each K step loads a [BT, BK] gathered latent tile and a [BK, BN] weight tile and multiplies on
  tensor cores with float32 accumulation; the tile loop is flattened into the K loop, so the copy
  pipeline stays full from one output tile to the next. Operand dtype: fp8 x fp8 runs on fp8
  tensor cores when the output is bfloat16, and as bf16 x bf16 (exact conversion) otherwise:
  Hopper's fp8 MMA keeps
  only about 14 bits of its accumulator (measured on an H100: a relative error of 5.5e-5 on one
  16-term product), far inside bf16's rounding but outside float32's or float16's budget. An
  fp8 operand beside a bf16/fp16 one is converted to that 16-bit type (exact); bf16 beside fp16 runs
  as tf32 (exact for both). A bf16/fp16 weight is never rounded to fp8. kv_scale and a per-row
  w_scale multiply the float32 accumulator at the end. A 128x128 block w_scale is indexed by the
  ABSOLUTE weight row r // 128 (blocks may straddle K/V and head boundaries) and column k // 128
  (BK divides 128, so a K step lies in one column block). For a bf16 output from bf16 operands
  (bf16, or fp8 beside bf16) the weight is dequantised first by a small kernel of its own
  (W * w_scale rounded once to bf16: at most 2^-9 of each term, inside the output's own
  rounding; [N, L], a few MB, once per call rather than once per token tile), and the product
  runs unscaled, the K steps in one chain of tensor-core products; an fp8 weight with a per-row
  or no scale beside a 16-bit cache is converted exactly to the cache's type the same way
  (weight_plan); otherwise (float16/float32 outputs, fp8 x fp8, a float16
  partner) the scale multiplies each K step's exact partial product. A float32 output sums
  each K step's product (128 columns) apart from the accumulator, in IEEE float32 (_add_rn): an
  H100 carrying the accumulator through the whole chain of products misses float32's budget.
- The rope part is written per head after the output tiles (the program of output tiles i_g,
  i_g + N_GROUPS, ... writes heads i_g, i_g + N_GROUPS, ...): the float32 product
  cache * kv_scale, rounded once to out_dtype (the same value torch gives for
  (pe.double() * kv_scale).to(out_dtype), which converts through float32), bit-identical across
  heads.
- Under the Triton interpreter the dot operands are upcast to float32 (its bf16/fp16 dots are
  wrong), each K step is a broadcast product summed over k in order (numpy's sgemm behind its
  tl.dot rounds a row by its position in the tile, which breaks batch split invariance), and
  bf16 stores go through cast_to's exact rounding.

On an sm_90 GPU, 16-bit operands of one type (after weight_plan), a 16-bit output, no per-step
scale, L <= 512 and head dims that are multiples of 64 go to kernels/gather_kv_b_proj_sm90.py
instead (Gluon: the token tile's latent rows held in registers, the weight by TMA, the output
tiles stored by TMA; the same bits). `portable=True` or a `config` keeps this kernel.

The one host read: the output row count total = cu_kv_lens[-1] must be known to allocate k and v
(the contract returns them), so the launcher reads that single element, unless the caller passes
its host copy as `total` (then nothing is read and the call does not synchronise). The kernel
masks rows against both: rows past cu_kv_lens[-1] are never read nor written. No other tensor
data is read on the host; nothing is validated on the device.
"""
from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from kernels import gather_kv_b_proj_sm90 as sm90
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
def _add_rn(x, y):
    """x + y in IEEE float32 (round to nearest), kept apart from the product y: Triton folds a plain
    `acc + tl.dot(a, b)` into the tensor-core chain `tl.dot(a, b, acc)`, and an H100 carrying the
    accumulator through a long chain of wgmma products loses float32 bits (measured: a float32
    output with L = 512-1024 off by up to 6.9x the error budget; with a fresh product per K step
    of 128, added here, at most 0.79x)."""
    return tl.inline_asm_elementwise("add.rn.f32 $0, $1, $2;", "=r,r,r", [x, y], dtype=tl.float32,
                                     is_pure=True, pack=1)


@triton.jit
def _divmod_small(n, d, inv_d):
    """(n // d, n % d) for int32 0 <= n < 2^20 and d >= 1, with inv_d = float32(1 / d): a float
    multiply instead of an integer division by a run-time value (~25 instructions). Exact:
    (n + 0.5) / d lies at least 0.5 / d from an integer, and the float error is below
    (n / d) 2^-23 < 2^-3 / d."""
    q = tl.cast((n * 1.0 + 0.5) * inv_d, tl.int32)
    return q, n - q * d


@triton.jit
def _col_dest(n, HD, QK, inv_hd, s_kh, s_kd, s_vh, s_vd):
    """[BN] output columns n (weight rows, n < 2^20) -> (K-nope column?, offset in a row of k,
    offset in a row of v); HD = qk + v rows per head, inv_hd = 1 / HD."""
    i_h, i_r = _divmod_small(n, HD, inv_hd)
    is_k = i_r < QK
    o_ck = i_h.to(tl.int64) * s_kh + i_r.to(tl.int64) * s_kd
    o_cv = i_h.to(tl.int64) * s_vh + (i_r - QK).to(tl.int64) * s_vd
    return is_k, o_ck, o_cv


# L is left specialised: it is always a multiple of 16, so it compiles once and its divisibility
# lets the K mask stay constant over 16 columns (vectorised loads).
@triton.jit(do_not_specialize=["total", "B", "n_search", "block_size", "P", "QK", "VD", "N",
                               "N_OUT_TILES", "N_GROUPS", "H", "V_OFF"])
def _gather_kv_b_proj_kernel(
    # pointers
    cache, kv_indptr, kv_indices, cu_kv_lens, w, w_scale, kv_scale, k_out, V_OFF,
    # sizes (run time)
    total, B, n_search, block_size, L, P, QK, VD, N, N_OUT_TILES, N_GROUPS, H,
    inv_hd,
    # strides
    s_cb, s_cs, s_cd,
    s_wn, s_wl,
    s_sn, s_sl,
    s_kt, s_kh, s_kd,
    s_vt, s_vh, s_vd,
    # block sizes and flags
    BT: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BP: tl.constexpr,
    EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, ALIGNED: tl.constexpr,
    W_SCALE_MODE: tl.constexpr, HAS_KV_SCALE: tl.constexpr, HAS_PE: tl.constexpr,
    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, EXACT_ROUNDING: tl.constexpr,
    STEP_SUM: tl.constexpr,
):
    # program -> (token tile, output tiles i_g, i_g + N_GROUPS, ...)
    i_p = tl.program_id(0)
    i_t = (i_p // N_GROUPS).to(tl.int64)
    i_g = i_p % N_GROUPS

    # ---- rows: token -> sequence (binary search) -> block, slot
    # [BT]
    o_t = i_t * BT + tl.arange(0, BT).to(tl.int64)
    # rows past the host's total (the allocation) or the device's cu_kv_lens[B] do not exist
    m_t = (o_t < total) & (o_t < tl.load(cu_kv_lens + B).to(tl.int64))
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

    # The row mapping above is paid once per token tile and shared by all its output tiles
    # i_g, i_g + N_GROUPS, ... An output tile is BN consecutive weight rows: columns of the
    # [k_nope | v] of one or more heads, each stored to k or v (_col_dest). The tile loop is
    # flattened into the K loop (tl.range flatten): the copy pipeline stays full across tiles.
    n_k = tl.cdiv(L, BK)
    n_mine = tl.cdiv(N_OUT_TILES - i_g, N_GROUPS)
    # [BK], [BN]; int32 lane offsets added to int64 scalars/rows keep their contiguity
    o_k = tl.arange(0, BK)
    o_n = tl.arange(0, BN)
    o_wn = o_n.to(tl.int64) * s_wn
    for i_q in tl.range(0, n_mine, flatten=True):
        n0 = (i_g + i_q * N_GROUPS) * BN
        # [BT, BN] = [BT, L] x [L, BN]
        b_acc = tl.zeros([BT, BN], dtype=tl.float32)
        for i_kk in range(0, n_k):
            k0 = i_kk * BK
            # [BK]
            m_k = (k0 + o_k) < L
            # [BT, BK] gathered latent rows
            p_a = cache + o_row[:, None] + (k0 + o_k)[None, :] * s_cd
            if EVEN_K:
                b_a = tl.load(p_a, mask=m_row[:, None], other=0.0)
            else:
                b_a = tl.load(p_a, mask=m_row[:, None] & m_k[None, :], other=0.0)
            # [BK, BN] weight rows n0.. (transposed view). Rows past N (the last tile when N is not
            # a multiple of BN) point at row n0: a matmul keeps columns apart and those columns
            # are never stored, so the weight load needs a mask only for a K tail.
            if EVEN_N:
                o_w = o_wn
            else:
                o_w = tl.where(o_n < N - n0, o_wn, 0)
            p_w = (w + n0.to(tl.int64) * s_wn) + o_w[None, :] + (k0 + o_k)[:, None] * s_wl
            if EVEN_K:
                b_w = tl.load(p_w)
            else:
                b_w = tl.load(p_w, mask=m_k[:, None], other=0.0)
            if W_SCALE_MODE == 2:
                # [BN] block scale of absolute row r // 128, column block k0 // 128 (BK divides 128)
                b_s = tl.load(w_scale + ((n0 + o_n) // 128) * s_sn + (k0 // 128) * s_sl,
                              mask=o_n < N - n0, other=0.0)
            if EXACT_ROUNDING:
                # interpreter: numpy's sgemm (its tl.dot) rounds a row differently depending on
                # its position in the tile; products summed over k in order are the same for
                # every row
                # [BT, BN]
                b_p = tl.sum(b_a.to(tl.float32)[:, :, None] * b_w.to(tl.float32)[None, :, :], axis=1)
            if W_SCALE_MODE == 2:
                if not EXACT_ROUNDING:
                    b_p = tl.dot(b_a.to(DOT_DTYPE), b_w.to(DOT_DTYPE), input_precision=INPUT_PRECISION)
                b_acc += b_p * b_s[None, :]
            elif EXACT_ROUNDING:
                b_acc += b_p
            elif STEP_SUM:
                # a float32 output: each K step's product starts from zero and is added in IEEE
                # float32 (see _add_rn)
                b_acc = _add_rn(b_acc, tl.dot(b_a.to(DOT_DTYPE), b_w.to(DOT_DTYPE), input_precision=INPUT_PRECISION))
            else:
                b_acc = tl.dot(b_a.to(DOT_DTYPE), b_w.to(DOT_DTYPE), b_acc, input_precision=INPUT_PRECISION)

        # ---- scales, then each column to k or v
        # [BN]
        o_c = n0 + o_n
        m_n = o_c < N
        if W_SCALE_MODE == 1:
            b_s = tl.load(w_scale + o_c * s_sn, mask=m_n, other=0.0)
            b_acc = b_acc * b_s[None, :]
        if HAS_KV_SCALE:
            b_acc = b_acc * tl.load(kv_scale)
        b_o = cast_to(b_acc, k_out.dtype.element_ty, EXACT_ROUNDING)
        is_k, o_ck, o_cv = _col_dest(o_c, QK + VD, QK, inv_hd, s_kh, s_kd, s_vh, s_vd)
        # [BN] row stride and column offset from k_out of each column (v starts V_OFF elements
        # after k, in the same buffer)
        o_rs = tl.where(is_k, s_kt, s_vt)
        o_co = tl.where(is_k, o_ck, V_OFF + o_cv)
        # [BT, BN]
        o_o = o_t[:, None] * o_rs[None, :] + o_co[None, :]
        if ALIGNED:
            # qk, v and P multiples of 8 (so are the strides and V_OFF): an aligned run of 8
            # columns lies in one segment and is contiguous, so the stores can be 16 bytes wide
            o_o = tl.max_contiguous(tl.multiple_of(o_o, [1, 8]), [1, 8])
        if EVEN_N:
            tl.store(k_out + o_o, b_o, mask=m_row[:, None])
        else:
            tl.store(k_out + o_o, b_o, mask=m_row[:, None] & m_n[None, :])

    if HAS_PE:
        # the rope part of heads i_g, i_g + N_GROUPS, ...
        for i_h in range(i_g, H, N_GROUPS):
            # [BP]
            o_p = tl.arange(0, BP)
            # [BT, BP]
            p_c = (cache + L * s_cd) + o_row[:, None] + o_p[None, :] * s_cd
            o_pe = (i_h * s_kh + QK * s_kd) + o_t[:, None] * s_kt + o_p[None, :] * s_kd
            if ALIGNED:
                # QK, P and the strides are multiples of 8: 16-byte stores, as for the tiles
                o_pe = tl.max_contiguous(tl.multiple_of(o_pe, [1, 8]), [1, 8])
            p_pe = k_out + o_pe
            if P == BP:
                b_pe = tl.load(p_c, mask=m_row[:, None], other=0.0)
                b_pe = _rope_out(b_pe, kv_scale, k_out.dtype.element_ty, HAS_KV_SCALE, EXACT_ROUNDING)
                tl.store(p_pe, b_pe, mask=m_row[:, None])
            else:
                m_pe = m_row[:, None] & (o_p < P)[None, :]
                if ALIGNED:
                    m_pe = tl.max_constancy(m_pe, [1, 8])
                b_pe = tl.load(p_c, mask=m_pe, other=0.0)
                b_pe = _rope_out(b_pe, kv_scale, k_out.dtype.element_ty, HAS_KV_SCALE, EXACT_ROUNDING)
                tl.store(p_pe, b_pe, mask=m_pe)


@triton.jit
def _prepare_weight_kernel(w, w_scale, out, N, L, s_wn, s_wl, s_sn, s_sl, s_on, s_ol,
                           BN: tl.constexpr, BL: tl.constexpr, SCALED: tl.constexpr,
                           EXACT_ROUNDING: tl.constexpr):
    """out[n, l] = W[n, l] in out's 16-bit type: converted (exact for an fp8 W), or with SCALED
    W[n, l] * w_scale[n // 128, l // 128] rounded once. One [BN, BL] tile per program (BL = 128:
    a tile lies in one column block of the scale)."""
    i_n, i_l = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    # [BN], [BL]
    o_n = i_n * BN + tl.arange(0, BN)
    o_l = i_l * BL + tl.arange(0, BL)
    m_n = o_n < N
    m = m_n[:, None] & (o_l < L)[None, :]
    # [BN, BL]
    b_w = tl.load(w + o_n[:, None] * s_wn + o_l[None, :] * s_wl, mask=m, other=0.0).to(tl.float32)
    if SCALED:
        # [BN] block scale of absolute row n // 128, column block l // 128 = i_l
        b_s = tl.load(w_scale + (o_n // 128) * s_sn + i_l * s_sl, mask=m_n, other=0.0)
        b_w = b_w * b_s[:, None]
    tl.store(out + o_n[:, None] * s_on + o_l[None, :] * s_ol,
             cast_to(b_w, out.dtype.element_ty, EXACT_ROUNDING), mask=m)


def prepare_weight(w_kv_b: torch.Tensor, w_scale: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """[N, L] in dtype (bfloat16 or float16): w_kv_b converted (exact for fp8), or with a
    128x128-block w_scale the product W * w_scale rounded once (see weight_plan)."""
    N, L = w_kv_b.shape
    out = torch.empty((N, L), dtype=dtype, device=w_kv_b.device)
    BN = 32
    scaled = w_scale is not None
    _prepare_weight_kernel[(triton.cdiv(N, BN), triton.cdiv(L, SCALE_BLOCK))](
        w_kv_b, w_scale if scaled else w_kv_b, out, N, L, *w_kv_b.stride(),
        *(w_scale.stride() if scaled else (0, 0)), *out.stride(),
        BN=BN, BL=SCALE_BLOCK, SCALED=scaled, EXACT_ROUNDING=interpreting(), num_warps=4,
    )
    return out


class Config(NamedTuple):
    BT: int          # token rows per tile
    BN: int          # output columns (weight rows) per tile
    BK: int          # latent columns per step; divides 128 (block scales)
    num_warps: int
    num_stages: int
    tiles_per_program: int = 8  # output tiles one program computes for its token tile


def pick_config(cache_dtype: torch.dtype, w_dtype: torch.dtype, out_dtype: torch.dtype,
                per_step_scale: bool = False) -> Config:
    """One config per operand width (output tiles cross head and segment boundaries, so the head
    dims do not pick the tile); a float32 output takes the per-step config. w_dtype is the
    weight's type in the product (a prepared weight is 16-bit: weight_plan); per_step_scale: a
    block scale multiplies each K step's product (every K step waits for it)."""
    if interpreting():
        return Config(BT=16, BN=32, BK=32, num_warps=4, num_stages=1, tiles_per_program=4)
    # measured on an H100 (16384 tokens, DeepSeek-V3 and qk 192 / v 256 dims, host total given):
    # 16-bit operands: 128 x 256 tiles on 8 warps, BK 64, 4 stages (0.157 / 0.257 ms; 3 stages
    # 0.168 / 0.271; BK 32 with 4-5 stages 0.173-0.180 / 0.284-0.299; 128 x 128 on 4 warps 0.163 /
    # 0.275; 64-row tiles 0.195-0.219);
    # fp8 x fp8: 64 x 128 tiles on 4 warps, BK 128 (one block scale per K step), 4 stages (0.154 /
    # 0.257 against 0.161 / 0.268 with 3); per-step block scales beside a 16-bit operand (float16
    # or float32 out): the same with 3 stages, BK 128 = one scale block per step (bf16 x
    # block-scaled fp8: 0.296-0.319 / 0.507-0.536; 4 stages need 128 KB of shared memory:
    # 0.494-0.507 / 0.856-0.870; fp16 x fp8 converted to fp16 on the 16-bit config: 0.533 / 0.899,
    # against 0.260 / 0.446 here; bf16 x fp8, float32 out, on the float32-output config: 0.757 /
    # 1.29 against 0.330 / 0.556); an fp8 cache beside a 16-bit weight (its tile converted in
    # registers, the product's register operand) takes the 16-bit config (fp8 cache x bf16 weight
    # dequantised from block scales: 0.215 / 0.361 ms, against 0.435 / 0.748 with the per-step
    # config and 0.230 / 0.390 with 128 x 128 on 4 warps).
    if cache_dtype == w_dtype == FP8:
        return Config(BT=64, BN=128, BK=128, num_warps=4, num_stages=4, tiles_per_program=32)
    if per_step_scale:
        return Config(BT=64, BN=128, BK=128, num_warps=4, num_stages=3, tiles_per_program=32)
    # (a float32 output sums each K step apart, so it takes the per-step config: the caller passes
    # per_step_scale)
    return Config(BT=128, BN=256, BK=64, num_warps=8, num_stages=4, tiles_per_program=16)


WEIGHT_AS_IS, WEIGHT_CONVERTED, WEIGHT_DEQUANTISED = 0, 1, 2


def weight_plan(cache_dtype: torch.dtype, w_dtype: torch.dtype, out_dtype: torch.dtype, w_scale_mode: int) -> int:
    """How the weight enters the product. Both prepared forms are made per call by a small kernel
    of their own (prepare_weight: [N, L] 16-bit, a few MB, once per call rather than once per token
    tile); the product then runs as 16-bit x 16-bit on the 16-bit config, in one chain of K steps.
    - WEIGHT_DEQUANTISED: a 128x128 block-scaled weight, bf16 output, operands that multiply as
      bf16 (bf16, or fp8 beside bf16): W * w_scale rounded once to bf16 (at most 2^-9 of each term,
      inside the output's own rounding), then multiplied unscaled. Scaling each K step's exact
      product instead makes every K step wait for its product.
    - WEIGHT_CONVERTED: an fp8 weight beside a 16-bit cache, per-row or no scale: converted
      exactly to the cache's type (the same products; a per-row scale still multiplies the
      accumulator at the end). Converted in the kernel it would go through registers into shared
      memory at every K step.
    - WEIGHT_AS_IS otherwise: fp8 x fp8 (fp8 tensor cores), 16-bit weights, and an fp8 weight with
      block scales beside a 16-bit cache for float16/float32 outputs (per-step scaling, where the
      fp8 weight as is and the weight converted first run alike on the per-step config)."""
    pair = {cache_dtype, w_dtype}
    if (w_scale_mode == W_SCALE_BLOCK and out_dtype == torch.bfloat16
            and pair in ({torch.bfloat16}, {torch.bfloat16, FP8})):
        return WEIGHT_DEQUANTISED
    if w_dtype == FP8 and cache_dtype != FP8 and w_scale_mode != W_SCALE_BLOCK:
        return WEIGHT_CONVERTED
    return WEIGHT_AS_IS


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
                            out_dtype=torch.bfloat16, total: Optional[int] = None,
                            config: Optional[Config] = None, portable: bool = False):
    """The launcher: check, allocate, launch. `config` overrides pick_config and, like `portable`,
    selects the portable Triton kernel where the sm_90 kernel would run (benchmarks, A/B, the
    property that compares the two)."""
    P, H, mode = _check(kv_cache, kv_indptr, kv_indices, cu_kv_lens, w_kv_b, kv_lora_rank,
                        qk_nope_head_dim, v_head_dim, w_scale, kv_scale, out_dtype)
    L, QK, VD = kv_lora_rank, qk_nope_head_dim, v_head_dim
    B = kv_indptr.shape[0] - 1
    if total is None:
        # the single host read: the output row count (see the module docstring)
        total = int(cu_kv_lens[-1])
        if total < 0:
            raise ValueError(f"cu_kv_lens: expected a non-negative total cu_kv_lens[-1], got {total}")
    else:
        check_int("total", total, lo=0, hi=2 ** 62)
        if B == 0 and total > 0:
            raise ValueError(f"total: expected 0 with no sequences (kv_indptr of shape [1]), got {total}")
    dev = kv_cache.device
    # k and v share one buffer (v right after k): the kernel addresses both from k's pointer
    n_k_el = total * H * (QK + P)
    buf = torch.empty(n_k_el + total * H * VD, dtype=out_dtype, device=dev)
    k = buf[:n_k_el].view(total, H, QK + P)
    v = buf[n_k_el:].view(total, H, VD)
    if total == 0 or H == 0:
        return k, v
    plan = weight_plan(kv_cache.dtype, w_kv_b.dtype, out_dtype, mode)
    # the weight's dtype in the product
    w_dtype = {WEIGHT_AS_IS: w_kv_b.dtype, WEIGHT_CONVERTED: kv_cache.dtype,
               WEIGHT_DEQUANTISED: torch.bfloat16}[plan]
    # a float32 output sums each K step's product apart from the accumulator (_add_rn)
    step_sum = out_dtype == torch.float32 and not (plan == WEIGHT_AS_IS and mode == W_SCALE_BLOCK)
    cfg = config or pick_config(kv_cache.dtype, w_dtype, out_dtype,
                                per_step_scale=(plan == WEIGHT_AS_IS and mode == W_SCALE_BLOCK) or step_sum)
    if cfg.BK > SCALE_BLOCK or SCALE_BLOCK % cfg.BK:
        raise ValueError(f"config: expected BK dividing {SCALE_BLOCK}, got {cfg.BK}")
    N = w_kv_b.shape[0]
    n_out_tiles = triton.cdiv(N, cfg.BN)
    n_groups = triton.cdiv(n_out_tiles, max(1, cfg.tiles_per_program))
    if n_out_tiles * cfg.BN >= 2 ** 20:  # the kernel's float division is exact below
        raise ValueError(f"w_kv_b: expected fewer than 2^20 rows in the output tiles of {cfg.BN}, "
                         f"got N = {N} rows (H = {H} heads of qk_nope + v = {QK + VD})")
    grid = (triton.cdiv(total, cfg.BT) * n_groups,)
    if grid[0] >= 2 ** 31:
        raise ValueError(f"cu_kv_lens: total = {total} tokens needs {grid[0]} programs, more than 2^31 - 1")
    if plan == WEIGHT_DEQUANTISED:
        # W * w_scale once (a few MB), then the unscaled bf16 product
        w_kv_b, w_scale, mode = prepare_weight(w_kv_b, w_scale, w_dtype), None, W_SCALE_NONE
    elif plan == WEIGHT_CONVERTED:
        w_kv_b = prepare_weight(w_kv_b, None, w_dtype)
    if config is None and not portable and sm90.supported(kv_cache, w_kv_b, out_dtype, mode, QK, VD, P, total):
        # Hopper, 16-bit operands, head dims multiples of 64: the warpgroup kernel (same bits)
        sm90.launch(kv_cache, kv_indptr, kv_indices, cu_kv_lens, w_kv_b, w_scale, kv_scale, k, v, n_k_el,
                    total=total, H=H, L=L, P=P, QK=QK, VD=VD, w_scale_mode=mode)
        return k, v
    dot_dtype, precision = _dot_dtype(kv_cache.dtype, w_kv_b.dtype, out_dtype)
    ws = w_scale if w_scale is not None else w_kv_b  # dummy pointer when absent
    s_sn = w_scale.stride(0) if w_scale is not None else 0
    s_sl = w_scale.stride(1) if mode == W_SCALE_BLOCK else 0
    _gather_kv_b_proj_kernel[grid](
        kv_cache, kv_indptr, kv_indices, cu_kv_lens, w_kv_b, ws,
        kv_scale if kv_scale is not None else w_kv_b, k, n_k_el,
        total, B, max(B - 1, 0).bit_length(), kv_cache.shape[1], L, P, QK, VD, N,
        n_out_tiles, n_groups, H, 1.0 / (QK + VD),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2),
        w_kv_b.stride(0), w_kv_b.stride(1),
        s_sn, s_sl,
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        BT=cfg.BT, BN=cfg.BN, BK=cfg.BK, BP=max(16, triton.next_power_of_2(max(P, 1))),
        EVEN_K=L % cfg.BK == 0, EVEN_N=N % cfg.BN == 0, ALIGNED=QK % 8 == 0 and VD % 8 == 0 and P % 8 == 0,
        W_SCALE_MODE=mode, HAS_KV_SCALE=kv_scale is not None, HAS_PE=P > 0,
        DOT_DTYPE=dot_dtype, INPUT_PRECISION=precision, EXACT_ROUNDING=interpreting(), STEP_SUM=step_sum,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return k, v


def selected_kernel(kv_cache, kv_indptr, kv_indices, cu_kv_lens, w_kv_b, *, kv_lora_rank, qk_nope_head_dim,
                    v_head_dim, w_scale=None, kv_scale=None, out_dtype=torch.bfloat16,
                    total: Optional[int] = None) -> str:
    """'sm90' or 'portable': the kernel gather_kv_b_proj runs for these (valid) inputs, decided as
    the launcher decides it (a prepared weight is [N, L] contiguous)."""
    P, _, mode = _check(kv_cache, kv_indptr, kv_indices, cu_kv_lens, w_kv_b, kv_lora_rank,
                        qk_nope_head_dim, v_head_dim, w_scale, kv_scale, out_dtype)
    total = int(cu_kv_lens[-1]) if total is None else total
    plan = weight_plan(kv_cache.dtype, w_kv_b.dtype, out_dtype, mode)
    w = w_kv_b
    if plan != WEIGHT_AS_IS:
        w = torch.empty(w_kv_b.shape, device=w_kv_b.device,
                        dtype=torch.bfloat16 if plan == WEIGHT_DEQUANTISED else kv_cache.dtype)
        mode = W_SCALE_NONE if plan == WEIGHT_DEQUANTISED else mode
    on = sm90.supported(kv_cache, w, out_dtype, mode, qk_nope_head_dim, v_head_dim, P, total)
    return "sm90" if on else "portable"


def gather_kv_b_proj(kv_cache: torch.Tensor, kv_indptr: torch.Tensor, kv_indices: torch.Tensor,
                     cu_kv_lens: torch.Tensor, w_kv_b: torch.Tensor, *, kv_lora_rank: int,
                     qk_nope_head_dim: int, v_head_dim: int, w_scale: Optional[torch.Tensor] = None,
                     kv_scale: Optional[torch.Tensor] = None, out_dtype: torch.dtype = torch.bfloat16,
                     total: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
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
        total: None, or the caller's host copy of cu_kv_lens[-1] (an int; serving engines know
            their token count on the host): then nothing is read from the device and the call
            does not synchronise. Rows past cu_kv_lens[-1] are neither read nor written.

    Returns:
        k: [total, H, qk_nope_head_dim + P] out_dtype, [k_nope | pe]; pe (kv_scale * cache rope
           part, the float32 product rounded once to out_dtype) is bit-identical across heads.
        v: [total, H, v_head_dim] out_dtype.
        k and v are contiguous views of one buffer (v starts right after k).
    Without `total`, reads cu_kv_lens[-1] on the host once (the output size). Raises
    TypeError/ValueError on bad input.
    """
    return gather_kv_b_proj_launch(kv_cache, kv_indptr, kv_indices, cu_kv_lens, w_kv_b,
                                   kv_lora_rank=kv_lora_rank, qk_nope_head_dim=qk_nope_head_dim,
                                   v_head_dim=v_head_dim, w_scale=w_scale, kv_scale=kv_scale,
                                   out_dtype=out_dtype, total=total)
