"""gather_kv_b_proj on Hopper (sm_90), written in Gluon.

The same contract and the same products as kernels/gather_kv_b_proj.py (SPEC.md section 3), for
the cases that carry prefill traffic: a bf16/fp16 cache beside a weight of the same type (as
given, or prepared by weight_plan) with a 16-bit output and no per-step scale, or an fp8 cache
beside an fp8 weight with 128x128 block scales and a bf16 output (fp8 tensor cores); L <= 512,
head dims that are multiples of 64. The portable Triton kernel reloads each token tile's latent
rows for every output tile and stores each tile from registers between two tiles' products. Here:

- A program owns BT = 128 token rows and a group of output tiles of BN = 128 weight rows. It is
  warp-specialized: two consumer warpgroups own BM = 64 of the rows each, and one producer warp
  streams the weight.
- A consumer gathers its latent rows [BM, L] once (through the block table, rows past the tokens
  and columns past L zero) and keeps them as the A operand of every product: in registers for
  16-bit rows (L / 4 per thread), in shared memory for fp8 rows. It then runs through the
  program's output tiles on its own: products, epilogue, next tile. The two consumers meet only
  at the weight ring, so one's epilogue runs while the other's products do (H100, DeepSeek-V3
  dims, bf16: 0.135-0.137 ms against 0.145-0.146 for one 8-warp partition whose two warpgroups
  waited for each other at every K step; fp8 x fp8: 0.095 against 0.115).
- The producer copies each K step's weight tile [BN, BK] by TMA into a ring of STAGES buffers. A
  buffer has two mbarriers: `ready` (the copy has landed) and `empty` (both consumers' products
  that read it have retired; each consumer arrives once per step). The step sequence runs across
  the output tiles without a break. 10 stages for 16-bit weights (BK = 64 columns, 16 KB each:
  0.134 ms against 0.136 with 8 and 0.135 with 11); 8 for fp8 (BK = 128 columns), where the
  rows take 64 KB of the shared memory.
- fp8 x fp8: each K step covers BK = 128 columns, one scale block (and the tile's 128 rows one
  scale row), so the step's product starts from zero and is added to the float32 accumulator
  times its block scale, as the Triton kernel does; step i's product is added while step i + 1's
  runs (0.095 / 0.141 ms against 0.098 / 0.161 when each product was waited for at once).
- The epilogue scales the float32 tile, rounds it once to the output type, writes it into the
  consumer's shared memory as two 64-column pieces and hands each to a TMA store (each piece lies
  in one segment of one head: qk_nope and v_head_dim are multiples of 64), which runs while the
  next tile's products do. Rows that reach past the last valid one (cu_kv_lens[-1] or `total`)
  are stored from shared memory by masked 16-byte stores instead.
- The rope part is stored per head from registers at the start, while the first weight copies
  are in flight: kv_scale * pe in float32, rounded once, as the Triton kernel writes it.

The K steps, their order and each rounding are those of the Triton kernel (a chain of k16 wgmma
products with float32 accumulation, the scales on the accumulator, one rounding), so the two give
the same bits (test_sm90_matches_portable). `supported` says when this kernel applies; the
launcher in gather_kv_b_proj.py calls `launch` after its own checks and allocation.
"""
import functools

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma,
                                                              warpgroup_mma, warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

FP8 = torch.float8_e4m3fn
# NUM_WARPS: the default partition, one consumer warpgroup; a second consumer and the producer warp
# are worker partitions
BT, BN, BC, NUM_WARPS = 128, 128, 64, 4
STAGES = {torch.bfloat16: 10, torch.float16: 10, FP8: 8}
# registers are assigned per warpgroup: three of them (the producer's warp rounds up to one), 168 x
# 384 = 64512 of the 65536 at launch, then 24 for the producer's and 240 for each consumer's
# (fp8: 28-36 bytes of spills with 232 / 248)
CONSUMER_REGS, PRODUCER_REGS, MAXNREG = 240, 24, 168
# a token tile's latent rows: in registers for 16-bit rows (L / 4 per thread), in shared memory for
# fp8 rows (128 L bytes)
MAX_L = {torch.bfloat16: 512, torch.float16: 512, FP8: 512}
_GL = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16, FP8: gl.float8e4nv}


@gluon.jit
def _producer(ptrs, sizes, strides, descs, bufs, i_w: gl.constexpr, L, NK: gl.constexpr, BM: gl.constexpr,
              BN: gl.constexpr, BK: gl.constexpr, BC: gl.constexpr, BP: gl.constexpr, STAGES: gl.constexpr,
              W_SCALE_ROW: gl.constexpr, W_SCALE_BLOCK: gl.constexpr, HAS_KV_SCALE: gl.constexpr,
              HAS_PE: gl.constexpr):
    """One warp: stream the program's weight tiles [BN, BK] through the ring of STAGES buffers; a
    buffer is refilled once both consumers have released it. (The worker partitions share one
    signature, so this one takes the consumers' arguments.)"""
    total, B, n_search, block_size, P, QK, VD, HD, N, N_OUT_TILES, N_GROUPS, H, V_OFF = sizes
    w_desc, k_desc, v_desc = descs
    w_smem, o_smem, a_smem, ready, empty = bufs
    n_k: gl.constexpr = NK
    i_g = gl.program_id(0) % N_GROUPS
    n_steps = gl.cdiv(N_OUT_TILES - i_g, N_GROUPS) * n_k
    for j in range(n_steps):
        s = j % STAGES
        # a fresh barrier counts as released in its first round
        mbarrier.wait(empty.index(s), ((j // STAGES) & 1) ^ 1)
        mbarrier.expect(ready.index(s), w_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(w_desc, [(i_g + (j // n_k) * N_GROUPS) * BN, (j % n_k) * BK],
                                        ready.index(s), w_smem.index(s))


@gluon.jit
def _store_tile(acc, n0, t0, full, dev_total, total, w_scale, kv_scale, k_desc, v_desc, k_out, o_smem, V_OFF,
                N, P, QK, VD, HD, s_kt, s_kh, s_vt, s_vh,
                BM: gl.constexpr, BN: gl.constexpr, BC: gl.constexpr, MMA: gl.constexpr, LD: gl.constexpr,
                W_SCALE_ROW: gl.constexpr, HAS_KV_SCALE: gl.constexpr):
    """Scale the [BM, BN] float32 tile of weight rows n0.. (output columns), round it once to the
    output type and store each column to k or v."""
    LN: gl.constexpr = gl.SliceLayout(0, MMA)
    # [BN] output columns = weight rows
    o_c = n0 + gl.arange(0, BN, layout=LN)
    m_n = o_c < N
    if W_SCALE_ROW:
        acc = acc * gl.load(w_scale + o_c, mask=m_n, other=0.0)[None, :]
    if HAS_KV_SCALE:
        acc = acc * gl.load(kv_scale)
    b_o = acc.to(k_out.dtype.element_ty)
    # the previous tile's pieces have left shared memory
    tma.store_wait(0)
    gl.static_assert(BN == 2 * BC, "a tile is two 64-column pieces")
    b_0, b_1 = b_o.reshape([BM, 2, BC]).permute(0, 2, 1).split()
    o_smem[0].store(b_0)
    o_smem[1].store(b_1)
    fence_async_shared()
    gl.thread_barrier()
    for i_c in gl.static_range(BN // BC):
        c = n0 + i_c * BC
        if c < N:
            # the piece lies in one segment of one head (qk and v are multiples of BC)
            i_h = c // HD
            i_r = c - i_h * HD
            if full:
                if i_r < QK:
                    tma.async_copy_shared_to_global(k_desc, [t0, i_h * (QK + P) + i_r], o_smem[i_c])
                else:
                    tma.async_copy_shared_to_global(v_desc, [t0, i_h * VD + (i_r - QK)], o_smem[i_c])
            else:
                # the tile reaches past the last valid row: masked 16-byte stores from registers
                # [BM, BC]
                b_c = o_smem[i_c].load(LD)
                # [BM]
                o_t = t0 + gl.arange(0, BM, layout=gl.SliceLayout(1, LD)).to(gl.int64)
                m_t = (o_t < total) & (o_t < dev_total)
                o_cc = gl.arange(0, BC, layout=gl.SliceLayout(0, LD))
                # (qk, v, P multiples of 8: so are the strides and V_OFF, and the stores 16 bytes wide)
                if i_r < QK:
                    o_o = o_t[:, None] * s_kt + (i_h.to(gl.int64) * s_kh + i_r + o_cc)[None, :]
                    o_o = gl.max_contiguous(gl.multiple_of(o_o, [1, 8]), [1, 8])
                    gl.store(k_out + o_o, b_c, mask=m_t[:, None])
                else:
                    o_o = o_t[:, None] * s_vt + (V_OFF + i_h.to(gl.int64) * s_vh + (i_r - QK) + o_cc)[None, :]
                    o_o = gl.max_contiguous(gl.multiple_of(o_o, [1, 8]), [1, 8])
                    gl.store(k_out + o_o, b_c, mask=m_t[:, None])
    # every thread has read the pieces before the next tile overwrites them
    gl.thread_barrier()


@gluon.jit
def _consumer(ptrs, sizes, strides, descs, bufs, i_w: gl.constexpr, L, NK: gl.constexpr, BM: gl.constexpr,
              BN: gl.constexpr, BK: gl.constexpr, BC: gl.constexpr, BP: gl.constexpr, STAGES: gl.constexpr,
              W_SCALE_ROW: gl.constexpr, W_SCALE_BLOCK: gl.constexpr, HAS_KV_SCALE: gl.constexpr,
              HAS_PE: gl.constexpr):
    """One warpgroup: token rows i_w * BM.. of the program's tile, through all its output tiles."""
    cache, kv_indptr, kv_indices, cu_kv_lens, w_scale, kv_scale, k_out = ptrs
    total, B, n_search, block_size, P, QK, VD, HD, N, N_OUT_TILES, N_GROUPS, H, V_OFF = sizes
    s_cb, s_cs, s_kt, s_kh, s_vt, s_vh, s_sn, s_sl = strides
    w_desc, k_desc, v_desc = descs
    w_smem, o_smem_all, a_smem_all, ready, empty = bufs
    o_smem = (o_smem_all.index(2 * i_w), o_smem_all.index(2 * i_w + 1))
    NW: gl.constexpr = gl.num_warps()
    dtype: gl.constexpr = cache.dtype.element_ty
    # [BM, BK] latent loads: 16 contiguous bytes per thread (BK = 64 16-bit or 128 fp8 elements)
    VEC: gl.constexpr = 128 // dtype.primitive_bitwidth
    LD: gl.constexpr = gl.BlockedLayout([1, VEC], [4, 8], [NW, 1], [1, 0])
    # [BM, 64] 16-bit output pieces and the rope part: 8 elements (16 bytes) per thread
    LO: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [NW, 1], [1, 0])
    LR: gl.constexpr = gl.SliceLayout(1, LD)
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1],
                                                  instr_shape=[16, BN, 256 // dtype.primitive_bitwidth])

    # program -> (token tile, output tiles i_g, i_g + N_GROUPS, ...); this warpgroup's rows
    i_p = gl.program_id(0)
    i_g = i_p % N_GROUPS
    t0 = (i_p // N_GROUPS) * (2 * BM) + i_w * BM

    # ---- rows: token -> sequence (binary search) -> block, slot
    # [BM]
    o_t = t0.to(gl.int64) + gl.arange(0, BM, layout=LR).to(gl.int64)
    dev_total = gl.load(cu_kv_lens + B).to(gl.int64)
    m_t = (o_t < total) & (o_t < dev_total)
    b_lo = gl.zeros([BM], gl.int64, LR)
    b_hi = b_lo + (B - 1)
    for _ in range(n_search):
        b_mid = (b_lo + b_hi + 1) // 2
        b_cu = gl.load(cu_kv_lens + b_mid, mask=m_t, other=0).to(gl.int64)
        m_go = b_cu <= o_t
        b_lo = gl.where(m_go, b_mid, b_lo)
        b_hi = gl.where(m_go, b_hi, b_mid - 1)
    b_start = gl.load(cu_kv_lens + b_lo, mask=m_t, other=0).to(gl.int64)
    o_j = o_t - b_start
    m_row = m_t & (o_j >= 0)
    o_j = gl.where(m_row, o_j, 0)
    b_first = gl.load(kv_indptr + b_lo, mask=m_row, other=0).to(gl.int64)
    b_blk = gl.load(kv_indices + b_first + o_j // block_size, mask=m_row, other=0).to(gl.int64)
    b_blk = gl.where(m_row, b_blk, 0)
    # [BM] offset of each row's latent vector in the cache (its last dim is contiguous)
    o_row = b_blk * s_cb + (o_j % block_size) * s_cs
    # the strides are multiples of 16 bytes (supported()): 16-byte loads
    o_row = gl.multiple_of(o_row, [VEC])

    # ---- the rows' latent vectors [BM, L], gathered once and kept as the products' A operand
    # (n_k pieces of [BM, BK]); only the weight streams
    n_k: gl.constexpr = NK
    A_L: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=32 // dtype.primitive_bitwidth)
    o_kb = gl.arange(0, BK, layout=gl.SliceLayout(0, LD))
    # fp8 rows stay in shared memory (32 KB per consumer at L = 512): the step's product and the
    # accumulator need the registers (before warp specialization, H100, DeepSeek-V3 dims: 0.116 ms
    # against 0.125 from registers)
    A_SMEM: gl.constexpr = dtype.primitive_bitwidth == 8
    a_all = ()
    for i_k in gl.static_range(n_k):
        # [BK]
        o_k = i_k * BK + o_kb
        # [BM, BK]; rows past the tokens and columns past L are zero
        b_a = gl.load(cache + o_row[:, None] + o_k[None, :], mask=m_row[:, None] & (o_k < L)[None, :], other=0.0)
        if A_SMEM:
            a_smem_all.index(i_w * n_k + i_k).store(b_a)
            a_all = a_all + (a_smem_all.index(i_w * n_k + i_k),)
        else:
            a_all = a_all + (gl.convert_layout(b_a, A_L),)
    if A_SMEM:
        fence_async_shared()
        gl.thread_barrier()

    if HAS_PE:
        # the rope part of heads i_g, i_g + N_GROUPS, ...: kv_scale * pe in float32, rounded once
        # [BP]
        o_p = gl.arange(0, BP, layout=gl.SliceLayout(0, LO))
        # [BM] in the output layout
        o_tp = gl.convert_layout(o_t, gl.SliceLayout(1, LO))
        o_rp = gl.convert_layout(o_row, gl.SliceLayout(1, LO))
        # [BM, BP]
        m_pe = gl.convert_layout(m_row, gl.SliceLayout(1, LO))[:, None] & (o_p < P)[None, :]
        b_pe = gl.load(cache + (o_rp + L)[:, None] + o_p[None, :], mask=m_pe, other=0.0).to(gl.float32)
        if HAS_KV_SCALE:
            b_pe = b_pe * gl.load(kv_scale)
        b_pe = b_pe.to(k_out.dtype.element_ty)
        o_pe = o_tp[:, None] * s_kt + (QK + o_p)[None, :]
        # QK, P and the strides are multiples of 8: 16-byte stores
        o_pe = gl.max_contiguous(gl.multiple_of(o_pe, [1, 8]), [1, 8])
        m_pe = gl.max_constancy(m_pe, [1, 8])
        for i_h in range(i_g, H, N_GROUPS):
            gl.store(k_out + i_h * s_kh + o_pe, b_pe, mask=m_pe)

    # the rows all exist: the tile's pieces go out by TMA
    full = (t0 + BM <= dev_total) & (t0 + BM <= total)
    n_mine = gl.cdiv(N_OUT_TILES - i_g, N_GROUPS)
    acc = gl.zeros([BM, BN], gl.float32, MMA)
    for i_q in range(n_mine):
        if W_SCALE_BLOCK:
            # fp8 x fp8: each step's product [BM, BK] x [BK, BN] (BK = 128 columns, one scale block;
            # the tile's BN = 128 rows, one scale row) starts from zero and is added to the float32
            # accumulator times its block scale; step i_k's product is added while step i_k + 1's runs
            b_s = gl.load(w_scale + (i_g + i_q * N_GROUPS) * s_sn)
            for i_k in gl.static_range(n_k):
                it = i_q * n_k + i_k
                s = it % STAGES
                mbarrier.wait(ready.index(s), (it // STAGES) & 1)
                b_p = warpgroup_mma(a_all[i_k], w_smem.index(s).permute((1, 0)), gl.zeros([BM, BN], gl.float32, MMA),
                                    use_acc=False, is_async=True)
                if i_k > 0:
                    b_q = warpgroup_mma_wait(1, deps=(b_q,))
                    mbarrier.arrive(empty.index((it + STAGES - 1) % STAGES))
                    # the tile's first step adds to zero, as the Triton kernel does (-0.0 becomes 0.0)
                    if i_k == 1:
                        acc = gl.zeros([BM, BN], gl.float32, MMA)
                    acc = acc + b_q * b_s
                    b_s = gl.load(w_scale + (i_g + i_q * N_GROUPS) * s_sn + i_k * s_sl)
                b_q = b_p
            b_q = warpgroup_mma_wait(0, deps=(b_q,))
            mbarrier.arrive(empty.index((i_q * n_k + n_k - 1) % STAGES))
            if n_k == 1:
                acc = gl.zeros([BM, BN], gl.float32, MMA)
            acc = acc + b_q * b_s
        else:
            for i_k in gl.static_range(n_k):
                it = i_q * n_k + i_k
                s = it % STAGES
                mbarrier.wait(ready.index(s), (it // STAGES) & 1)
                # [BM, BN] += [BM, BK] x [BK, BN]
                acc = warpgroup_mma(a_all[i_k], w_smem.index(s).permute((1, 0)), acc, use_acc=i_k > 0, is_async=True)
                # the product of step it - 1 has retired: its buffer goes back to the producer
                acc = warpgroup_mma_wait(1, deps=(acc,))
                if i_k > 0:
                    mbarrier.arrive(empty.index((it + STAGES - 1) % STAGES))
            acc = warpgroup_mma_wait(0, deps=(acc,))
            mbarrier.arrive(empty.index((i_q * n_k + n_k - 1) % STAGES))
        _store_tile(acc, (i_g + i_q * N_GROUPS) * BN, t0, full, dev_total, total, w_scale, kv_scale, k_desc, v_desc,
                    k_out, o_smem, V_OFF, N, P, QK, VD, HD, s_kt, s_kh, s_vt, s_vh, BM, BN, BC, MMA, LO, W_SCALE_ROW,
                    HAS_KV_SCALE)
    tma.store_wait(0)


# L is a run-time value but its piece count NK = cdiv(L, BK) is a constexpr: the latent rows are held
# as a tuple of NK static pieces (masked past L), so a fuzzer drawing L compiles at most
# MAX_L / BK variants per type (8 for 16-bit rows, 4 for fp8), not one per L. L stays specialized
# (it is a multiple of 16): the masks o_k < L are then constant over 16 columns and the row loads
# 16 bytes wide (unspecialized, every load was scalar: 0.138 against 0.133 ms, H100, DeepSeek-V3)
@gluon.jit(do_not_specialize=["total", "B", "n_search", "block_size", "P", "QK", "VD", "HD", "N",
                               "N_OUT_TILES", "N_GROUPS", "H", "V_OFF"])
def _gather_kv_b_proj_sm90_kernel(
    cache, kv_indptr, kv_indices, cu_kv_lens, w_desc, w_scale, kv_scale, k_desc, v_desc, k_out, V_OFF,
    total, B, n_search, block_size, L, P, QK, VD, HD, N, N_OUT_TILES, N_GROUPS, H,
    s_cb, s_cs, s_kt, s_kh, s_vt, s_vh, s_sn, s_sl,
    NK: gl.constexpr, BT: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, BC: gl.constexpr, BP: gl.constexpr,
    STAGES: gl.constexpr, W_SCALE_ROW: gl.constexpr, W_SCALE_BLOCK: gl.constexpr, HAS_KV_SCALE: gl.constexpr,
    HAS_PE: gl.constexpr, CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr,
    num_warps: gl.constexpr,
):
    dtype: gl.constexpr = cache.dtype.element_ty
    BM: gl.constexpr = BT // 2
    n_k: gl.constexpr = NK
    # ---- shared memory: STAGES weight tiles [BN, BK]; per consumer two output pieces [BM, BC] and
    # (fp8) its latent rows [n_k, BM, BK]
    w_smem = gl.allocate_shared_memory(dtype, [STAGES, BN, BK], w_desc.layout)
    o_smem = gl.allocate_shared_memory(k_desc.dtype, [2 * (BN // BC), BM, BC], k_desc.layout)
    if dtype.primitive_bitwidth == 8:
        a_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BM, BK], dtype)
        a_smem = gl.allocate_shared_memory(dtype, [2 * n_k, BM, BK], a_layout)
    else:
        a_smem = w_smem  # unused: 16-bit rows stay in the consumers' registers
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)

    ptrs = (cache, kv_indptr, kv_indices, cu_kv_lens, w_scale, kv_scale, k_out)
    sizes = (total, B, n_search, block_size, P, QK, VD, HD, N, N_OUT_TILES, N_GROUPS, H, V_OFF)
    strides = (s_cb, s_cs, s_kt, s_kh, s_vt, s_vh, s_sn, s_sl)
    descs = (w_desc, k_desc, v_desc)
    bufs = (w_smem, o_smem, a_smem, ready, empty)
    gl.warp_specialize([
        (_consumer, (ptrs, sizes, strides, descs, bufs, 0, L, NK, BM, BN, BK, BC, BP, STAGES, W_SCALE_ROW,
                     W_SCALE_BLOCK, HAS_KV_SCALE, HAS_PE)),
        (_consumer, (ptrs, sizes, strides, descs, bufs, 1, L, NK, BM, BN, BK, BC, BP, STAGES, W_SCALE_ROW,
                     W_SCALE_BLOCK, HAS_KV_SCALE, HAS_PE)),
        (_producer, (ptrs, sizes, strides, descs, bufs, 1, L, NK, BM, BN, BK, BC, BP, STAGES, W_SCALE_ROW,
                     W_SCALE_BLOCK, HAS_KV_SCALE, HAS_PE)),
    ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":  # compiling for sm_90 on a machine without one (ci/compile_check)
        return 132
    return torch.cuda.get_device_properties(device).multi_processor_count


def supported(kv_cache: torch.Tensor, w: torch.Tensor, out_dtype: torch.dtype, w_scale_mode: int,
              qk_nope_head_dim: int, v_head_dim: int, P: int, total: int) -> bool:
    """Whether this kernel applies: an sm_90 GPU (wgmma), a bf16/fp16 cache and a weight of the same
    type in the product, a 16-bit output, no per-step scale (w_scale_mode 0 none or 1 per row), or
    fp8 x fp8 with block scales (w_scale_mode 2) and a bf16 output; head
    dims multiples of 64 and P of 8, L <= MAX_L, rows with 16-byte-aligned starts and a contiguous last dim
    (16-byte loads, TMA)."""
    if kv_cache.device.type != "cuda" or torch.cuda.get_device_capability(kv_cache.device) != (9, 0):
        return False
    if kv_cache.dtype not in _GL or w.dtype != kv_cache.dtype:
        return False
    if kv_cache.dtype == FP8:
        # fp8 x fp8 on fp8 tensor cores: 128x128 block scales, a bf16 output (see _dot_dtype)
        if w_scale_mode != 2 or out_dtype != torch.bfloat16:
            return False
    elif w_scale_mode not in (0, 1) or out_dtype not in (torch.bfloat16, torch.float16):
        return False
    if qk_nope_head_dim % BC or v_head_dim % BC or P % 8:
        return False
    if total + BT >= 2 ** 31 or kv_cache.shape[2] - P > MAX_L[kv_cache.dtype]:
        return False
    e = kv_cache.element_size()
    return (kv_cache.stride(2) == 1 and kv_cache.stride(0) * e % 16 == 0 and kv_cache.stride(1) * e % 16 == 0
            and kv_cache.data_ptr() % 16 == 0 and w.stride(1) == 1 and w.stride(0) * e % 16 == 0
            and w.data_ptr() % 16 == 0)


@functools.lru_cache(maxsize=None)
def _smem_layout(block_shape: tuple, dtype: torch.dtype):
    # built once per shape and type: get_default_for costs tens of microseconds of host time
    return gl.NVMMASharedLayout.get_default_for(list(block_shape), _GL[dtype])


def launch(kv_cache, kv_indptr, kv_indices, cu_kv_lens, w, w_scale, kv_scale, k, v, n_k_el, *,
           total, H, L, P, QK, VD, w_scale_mode):
    """Launch on checked inputs (the caller's _check and supported()); k and v are the contiguous
    views of one buffer that the Triton launcher allocates. w_scale: None, per row [N], or (fp8 x fp8)
    128x128 blocks."""
    N = w.shape[0]
    B = kv_indptr.shape[0] - 1
    BK = 128 if w.dtype == FP8 else 64  # FP8: one scale block per step
    k2 = k.view(total, H * (QK + P))
    v2 = v.view(total, H * VD)
    o_layout = _smem_layout((BT // 2, BC), k.dtype)
    k_desc = TensorDescriptor(k2, list(k2.shape), list(k2.stride()), [BT // 2, BC], o_layout)
    v_desc = TensorDescriptor(v2, list(v2.shape), list(v2.stride()), [BT // 2, BC], o_layout)
    w_desc = TensorDescriptor(w, [N, L], [w.stride(0), 1], [BN, BK], _smem_layout((BN, BK), w.dtype))
    n_out_tiles = triton.cdiv(N, BN)
    n_token_tiles = triton.cdiv(total, BT)
    # at most one wave of programs (one fits an SM: 208-224 KB of shared memory); the output tiles
    # are split into groups when the token tiles are fewer than the SMs. H100, 16384 tokens (128
    # token tiles), graph ms DeepSeek-V3 bf16 / fp8 x fp8, asymmetric bf16 / fp8 x fp8: one group
    # (128 programs) 0.121-0.127 / 0.091 / 0.209 / 0.146; two (256) 0.133 / 0.094 / 0.215 / 0.149;
    # three 0.142 / 0.098 / 0.224 / 0.153
    n_groups = min(n_out_tiles, max(1, _num_sms(kv_cache.device) // n_token_tiles))
    _gather_kv_b_proj_sm90_kernel[(n_token_tiles * n_groups,)](
        kv_cache, kv_indptr, kv_indices, cu_kv_lens, w_desc, w_scale if w_scale is not None else w,
        kv_scale if kv_scale is not None else w, k_desc, v_desc, k, n_k_el,
        total, B, max(B - 1, 0).bit_length(), kv_cache.shape[1], L, P, QK, VD, QK + VD, N, n_out_tiles, n_groups, H,
        kv_cache.stride(0), kv_cache.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        *(w_scale.stride() if w_scale_mode == 2 else (0, 0)),
        NK=triton.cdiv(L, BK), BT=BT, BN=BN, BK=BK, BC=BC, BP=max(16, triton.next_power_of_2(max(P, 1))),
        STAGES=STAGES[w.dtype],
        W_SCALE_ROW=w_scale_mode == 1, W_SCALE_BLOCK=w_scale_mode == 2, HAS_KV_SCALE=kv_scale is not None,
        HAS_PE=P > 0, CONSUMER_REGS=CONSUMER_REGS, PRODUCER_REGS=PRODUCER_REGS, num_warps=NUM_WARPS, maxnreg=MAXNREG,
    )
