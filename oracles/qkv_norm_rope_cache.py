"""Oracle for qkv_norm_rope_cache (SPEC.md section 1), from the math, in float64 by default.

The cache is not written: for every token the oracle returns the rows it would store (k / k_scale
and v / v_scale, clamped to +-448 for an fp8 cache, not rounded) and whether its slot is valid.
Which token wins a duplicated slot is unspecified, so placing rows is left to the caller.
"""
from typing import NamedTuple, Optional

import torch

from oracles import _validate as val

FLOATS = (torch.bfloat16, torch.float16, torch.float32)
CACHES = FLOATS + (torch.float8_e4m3fn,)
INDEX = (torch.int32, torch.int64)


class Result(NamedTuple):
    q: torch.Tensor            # [T, qh, D]
    gate: Optional[torch.Tensor]  # [T, qh, D] or None
    k: torch.Tensor            # [T, kvh, D]
    v: torch.Tensor            # [T, kvh, D]
    k_rows: torch.Tensor       # [T, kvh, D] value each token stores in the key cache
    v_rows: torch.Tensor       # [T, kvh, D]
    written: torch.Tensor      # [T] bool, slot valid


def rms_norm(x, w, eps):
    """x [..., D] normalised over its last dim, times w [D]."""
    return x / torch.sqrt((x * x).mean(dim=-1, keepdim=True) + eps) * w


def rope(x, cos_rows, sin_rows, R, is_neox):
    """Rotate the first R dims of x [T, H, D]; cos_rows, sin_rows [T, R/2] (1 and 0 for identity)."""
    out = x.clone()
    i = torch.arange(R // 2)
    a_idx, b_idx = (i, i + R // 2) if is_neox else (2 * i, 2 * i + 1)
    a, b = x[..., a_idx], x[..., b_idx]
    c, s = cos_rows[:, None, :], sin_rows[:, None, :]
    out[..., a_idx] = a * c - b * s
    out[..., b_idx] = b * c + a * s
    return out


def qkv_norm_rope_cache(qkv, q_norm_weight, k_norm_weight, cos, sin, positions, key_cache,
                        value_cache, slot_mapping, *, num_q_heads, num_kv_heads, head_dim,
                        rotary_dim=None, is_neox=True, eps=1e-6, norm_weight_offset=0.0, gate=None,
                        cache_layout="NHD", k_scale=None, v_scale=None,
                        compute_dtype=torch.float64) -> Result:
    qh, kvh, D = num_q_heads, num_kv_heads, head_dim
    val.integer("num_q_heads", qh, lo=1)
    val.integer("num_kv_heads", kvh, lo=1)
    val.integer("head_dim", D, lo=2, hi=512, multiple_of=2)
    val.need(qh % kvh == 0, ValueError, f"num_q_heads: must be divisible by num_kv_heads={kvh}, got {qh}")
    R = D if rotary_dim is None else rotary_dim
    val.integer("rotary_dim", R, lo=2, hi=D, multiple_of=2)
    val.need(isinstance(is_neox, bool), TypeError, f"is_neox: expected a bool, got {is_neox!r}")
    for name, x in (("eps", eps), ("norm_weight_offset", norm_weight_offset)):
        val.need(isinstance(x, (int, float)) and not isinstance(x, bool), TypeError,
                 f"{name}: expected a float, got {x!r}")
    val.need(eps >= 0, ValueError, f"eps: expected >= 0, got {eps}")
    val.need(gate in (None, "interleaved", "blocked"), ValueError, f"gate: expected None, 'interleaved' or 'blocked', got {gate!r}")
    val.need(cache_layout in ("NHD", "HND"), ValueError, f"cache_layout: expected 'NHD' or 'HND', got {cache_layout!r}")
    dev = qkv.device if isinstance(qkv, torch.Tensor) else None
    width = (2 * qh + 2 * kvh) * D if gate else (qh + 2 * kvh) * D
    val.tensor("qkv", qkv, FLOATS, (None, width), dev)
    T = qkv.shape[0]
    val.tensor("q_norm_weight", q_norm_weight, FLOATS, (D,), dev)
    val.tensor("k_norm_weight", k_norm_weight, FLOATS, (D,), dev)
    val.tensor("cos", cos, (torch.float32, qkv.dtype), (None, R // 2), dev)
    val.tensor("sin", sin, (torch.float32, qkv.dtype), (cos.shape[0], R // 2), dev)
    val.tensor("positions", positions, INDEX, (T,), dev)
    val.tensor("slot_mapping", slot_mapping, INDEX, (T,), dev)
    layout = (None, None, kvh, D) if cache_layout == "NHD" else (None, kvh, None, D)
    val.tensor("key_cache", key_cache, CACHES, layout, dev)
    val.tensor("value_cache", value_cache, CACHES, tuple(key_cache.shape), dev)
    val.scale("k_scale", k_scale, dev)
    val.scale("v_scale", v_scale, dev)

    f = compute_dtype
    x = qkv.to(f)
    if gate == "interleaved":
        qg = x[:, : 2 * qh * D].reshape(T, qh, 2, D)
        q_raw, g = qg[:, :, 0], qg[:, :, 1]
    elif gate == "blocked":
        q_raw, g = x[:, : qh * D].reshape(T, qh, D), x[:, qh * D: 2 * qh * D].reshape(T, qh, D)
    else:
        q_raw, g = x[:, : qh * D].reshape(T, qh, D), None
    k0 = width - 2 * kvh * D
    k_raw = x[:, k0: k0 + kvh * D].reshape(T, kvh, D)
    v = x[:, k0 + kvh * D:].reshape(T, kvh, D)

    # out-of-range positions rotate by the identity
    pos = positions.long()
    inside = (pos >= 0) & (pos < cos.shape[0])
    rows = torch.where(inside, pos, 0)
    c = torch.where(inside[:, None], cos.to(f)[rows], 1.0)
    s = torch.where(inside[:, None], sin.to(f)[rows], 0.0)

    q = rope(rms_norm(q_raw, q_norm_weight.to(f) + norm_weight_offset, eps), c, s, R, is_neox)
    k = rope(rms_norm(k_raw, k_norm_weight.to(f) + norm_weight_offset, eps), c, s, R, is_neox)

    k_rows = k / k_scale.to(f).reshape(()) if k_scale is not None else k.clone()
    v_rows = v / v_scale.to(f).reshape(()) if v_scale is not None else v.clone()
    if key_cache.dtype == torch.float8_e4m3fn:
        k_rows = k_rows.clamp(-448.0, 448.0)
    if value_cache.dtype == torch.float8_e4m3fn:
        v_rows = v_rows.clamp(-448.0, 448.0)
    bs = key_cache.shape[1] if cache_layout == "NHD" else key_cache.shape[2]
    capacity = key_cache.shape[0] * bs
    slots = slot_mapping.long()
    written = (slots >= 0) & (slots < capacity)
    return Result(q, g, k, v, k_rows, v_rows, written)
