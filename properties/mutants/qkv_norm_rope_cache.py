"""Broken qkv_norm_rope_cache implementations, each made from the production kernel by one edit."""
import functools

from properties.mutants._mutate import entry

OP = "qkv_norm_rope_cache"
_entry = functools.partial(entry, "kernels.qkv_norm_rope_cache", "qkv_norm_rope_cache")


# slot -1 wraps to the last row and slot == capacity is taken as valid (lands in the guard band)
wrap_invalid_slots = _entry(
    "wrap_invalid_slots",
    ("m_slot = (b_slot >= 0) & (b_slot < CAPACITY)", "m_slot = (b_slot >= -1) & (b_slot <= CAPACITY)"),
    ("b_slot = tl.where(m_slot, b_slot, 0)", "b_slot = tl.where(b_slot < 0, b_slot + CAPACITY, b_slot)"))

# GPT-J pairs treated as NeoX pairs
gptj_as_neox = _entry("gptj_as_neox", ("    if IS_NEOX:\n        o_pd", "    if True:\n        o_pd"))

# rotary_dim ignored: every dim rotated
rope_full_head = _entry("rope_full_head", ("    m_rot = o_d < R\n    half = R // 2", "    m_rot = o_d < D\n    half = D // 2"))

# out-of-range positions read the last table row instead of rotating by the identity
clamp_positions = _entry(
    "clamp_positions",
    ("b_pos = tl.where(m_pos, b_pos, 0)", "b_pos = tl.minimum(tl.maximum(b_pos, 0), MAX_POS - 1)\n    m_pos = b_pos >= 0"))

# the RoPE angle uses table row position + 1 (rotates at position 0)
position_off_by_one = _entry(
    "position_off_by_one", ("b_pos = tl.load(positions + i_t * s_pos).to(tl.int64)",
                            "b_pos = tl.load(positions + i_t * s_pos).to(tl.int64) + 1"))

# an fp8 cache takes the torch-on-CUDA behaviour: NaN past +-448 instead of saturating
fp8_nan_past_max = _entry(
    "fp8_nan_past_max",
    ("            b_k = tl.minimum(tl.maximum(b_k, -FP8_MAX), FP8_MAX)",
     "            b_k = tl.where(tl.abs(b_k) > FP8_MAX, float('nan'), b_k)"),
    ("            b_v = tl.minimum(tl.maximum(b_v, -FP8_MAX), FP8_MAX)",
     "            b_v = tl.where(tl.abs(b_v) > FP8_MAX, float('nan'), b_v)"))

# blocked gate layout read as interleaved
blocked_gate_as_interleaved = _entry(
    "blocked_gate_as_interleaved",
    ('    else:\n        q_hs, g_col, g_hs, k_col = D, qh * D, D, 2 * qh * D',
     '    else:\n        q_hs, g_col, g_hs, k_col = 2 * D, D, 2 * D, 2 * qh * D'))

# an HND cache's block size read from dim 1 (the NHD position: kvh here)
hnd_as_nhd = _entry(
    "hnd_as_nhd",
    ("num_blocks, block_size = key_cache.shape[0], key_cache.shape[2]",
     "num_blocks, block_size = key_cache.shape[0], key_cache.shape[1]"))

# RoPE position taken from the row index within the call, not from positions[t]
rope_by_row_index = _entry(
    "rope_by_row_index", ("b_pos = tl.load(positions + i_t * s_pos).to(tl.int64)",
                          "b_pos = i_t + 0 * tl.load(positions + i_t * s_pos).to(tl.int64)"))

# RMSNorm divides by the rotary dim instead of the head dim
norm_over_rotary_dims = _entry(
    "norm_over_rotary_dims", ("axis=1).to(tl.float32) / D + eps)", "axis=1).to(tl.float32) / tl.minimum(D, 2) + eps)"))

# the launcher checks nothing
no_checks = _entry("no_checks", ("    R = _check(qkv,", "    R = (head_dim if rotary_dim is None else rotary_dim) if True else _check(qkv,"))

# heads of the last, partial query tile are never written
drop_partial_tile = _entry(
    "drop_partial_tile", ("m_qd = (o_qh < QH)[:, None] & m_d[None, :]",
                          "m_qd = (o_qh < (QH // BHQ) * BHQ)[:, None] & m_d[None, :]"))

# the normalised values are written back into qkv (an input)
writes_input = _entry(
    "writes_input",
    ("        p_q = q_out + i_t * s_qo_t",
     "        tl.store(p_row + (o_col + o_d[None, :]) * s_x_w, b_q.to(qkv.dtype.element_ty), mask=m_qd)\n"
     "        p_q = q_out + i_t * s_qo_t"))

MUTANTS = {
    "wrap_invalid_slots": ("wrap_invalid_slots", ("test_equivalence", "test_invalid_slots_write_nothing"),
                           "slot -1 wraps to the last row, slot == capacity counts as valid"),
    "gptj_as_neox": ("gptj_as_neox", ("test_equivalence",), "GPT-J pairs (2i, 2i+1) treated as NeoX pairs"),
    "rope_full_head": ("rope_full_head", ("test_equivalence",), "rotary_dim ignored: all D dims rotated"),
    "clamp_positions": ("clamp_positions", ("test_equivalence", "test_position_zero_is_unrotated"),
                        "out-of-range positions read the last cos/sin row"),
    "position_off_by_one": ("position_off_by_one", ("test_equivalence", "test_position_zero_is_unrotated"),
                            "table row position + 1"),
    "fp8_nan_past_max": ("fp8_nan_past_max", ("test_fp8_cache_saturates",),
                         "fp8 caches get NaN past +-448 (torch's CUDA cast) instead of saturating"),
    "blocked_gate_as_interleaved": ("blocked_gate_as_interleaved", ("test_equivalence", "test_gate_layouts_agree"),
                                    "blocked gate layout read as interleaved"),
    "hnd_as_nhd": ("hnd_as_nhd", ("test_equivalence", "test_cache_layouts_agree"), "HND cache block size read from dim 1, as for NHD"),
    "rope_by_row_index": ("rope_by_row_index", ("test_equivalence", "test_token_split"),
                          "RoPE position = row index in the call instead of positions[t]"),
    "norm_over_rotary_dims": ("norm_over_rotary_dims", ("test_equivalence",), "RMSNorm mean over 2 dims, not D"),
    "no_checks": ("no_checks", ("test_bad_input_rejected",), "the launcher validates nothing"),
    "drop_partial_tile": ("drop_partial_tile", ("test_equivalence",), "last partial query-head tile never written"),
    "writes_input": ("writes_input", ("test_equivalence",), "normalised q written back into qkv"),
}
