"""Argument checks and small helpers shared by chunk_kda and fused_recurrent_kda."""
import math
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from kernels._checks import FLOAT_ACTIVATIONS, INDEX_DTYPES, check_int, check_tensor

MAX_HEAD_DIM = 256  # largest K and V: one [K, V-tile] float32 state block per program


class Dims(NamedTuple):
    B: int
    T: int
    H: int
    HV: int
    K: int
    V: int
    N: int        # number of sequences: B, or len(cu_seqlens) - 1
    scale: float


def check_kda_args(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
                   use_qk_l2norm) -> Dims:
    """Validate every argument of chunk_kda / fused_recurrent_kda; nothing reads tensor data."""
    check_tensor("q", q, dtypes=FLOAT_ACTIVATIONS, ndim=4)
    B, T, H, K = q.shape
    dev = q.device
    check_tensor("k", k, dtypes=(q.dtype,), shape=(B, T, H, K), device=dev)
    check_tensor("v", v, dtypes=(q.dtype,), shape=(B, T, None, None), device=dev)
    HV, V = v.shape[2], v.shape[3]
    check_int("K (q.shape[3])", K, lo=1, hi=MAX_HEAD_DIM)
    check_int("V (v.shape[3])", V, lo=1, hi=MAX_HEAD_DIM)
    check_int("H (q.shape[2])", H, lo=1)
    check_int("HV (v.shape[2])", HV, lo=1)
    if HV % H != 0:
        raise ValueError(f"v: expected the number of value heads HV to be a multiple of H={H}, got HV={HV}")
    check_tensor("g", g, dtypes=(torch.float32,), shape=(B, T, HV, K), device=dev)
    check_tensor("beta", beta, dtypes=tuple({torch.float32, q.dtype}), shape=(B, T, HV), device=dev)
    if scale is None:
        scale = 1.0 / math.sqrt(K)
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale: expected a float or None, got {type(scale).__name__}")
    elif not (math.isfinite(scale) and scale != 0):
        raise ValueError(f"scale: expected a finite nonzero float, got {scale}")
    for name, flag in (("output_final_state", output_final_state), ("use_qk_l2norm", use_qk_l2norm)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name}: expected a bool, got {type(flag).__name__}")
    if cu_seqlens is not None:
        check_tensor("cu_seqlens", cu_seqlens, dtypes=INDEX_DTYPES, ndim=1, device=dev)
        if cu_seqlens.shape[0] < 1:
            raise ValueError(f"cu_seqlens: expected at least 1 element (N + 1), got shape {tuple(cu_seqlens.shape)}")
        if B != 1:
            raise ValueError(f"q: expected batch size 1 with cu_seqlens, got B={B}")
        N = cu_seqlens.shape[0] - 1
    else:
        N = B
    if initial_state is not None:
        check_tensor("initial_state", initial_state, dtypes=(torch.float32,), shape=(N, HV, K, V), device=dev)
    return Dims(B, T, H, HV, K, V, N, float(scale))


def pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def empty_result(q, v, d: Dims, initial_state, output_final_state):
    """T == 0 or no sequence: o is empty, the final state is the initial state (or zeros)."""
    o = torch.empty((d.B, d.T, d.HV, d.V), dtype=q.dtype, device=q.device)
    if not output_final_state:
        return o, None
    if initial_state is not None:
        return o, initial_state.clone()
    return o, torch.zeros((d.N, d.HV, d.K, d.V), dtype=torch.float32, device=q.device)


@triton.jit
def load_state(h0, i_n, i_hv, o_k, o_v, m_h, s_n, s_h, s_k, s_v,
               BK: tl.constexpr, BV: tl.constexpr, USE_INITIAL_STATE: tl.constexpr):
    """[BK, BV] float32 state block: initial_state[i_n, i_hv, o_k, o_v] (any strides), or zeros."""
    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_INITIAL_STATE:
        p_h0 = h0 + i_n * s_n + i_hv * s_h + o_k[:, None] * s_k + o_v[None, :] * s_v
        b_h += tl.load(p_h0, mask=m_h, other=0.0).to(tl.float32)
    return b_h


@triton.jit
def store_state(ht, b_h, i_n, i_hv, o_k, o_v, m_h, HV, K, V):
    """Write a [BK, BV] state block to the final state, allocated contiguous [N, HV, K, V]."""
    tl.store(ht + (i_n * HV + i_hv) * K * V + o_k[:, None] * V + o_v[None, :], b_h, mask=m_h)
