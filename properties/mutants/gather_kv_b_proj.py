"""Broken gather_kv_b_proj implementations, each made from the production kernel by exact edits.

Every stray access stays inside the tensors or their guard bands: the cache and w_scale are built
inside Guarded buffers (properties/inputs/gather_kv_b_proj.py), and the weight-row mutant keeps its
rows below N.
"""
import functools

from properties.mutants._mutate import entry

OP = "gather_kv_b_proj"
_entry = functools.partial(entry, "kernels.gather_kv_b_proj", "gather_kv_b_proj")

# qk_nope assumed equal to v_head_dim: a head's rows split into K-nope and V halves at (qk + v) / 2
# (the true split only when they are equal; every store stays inside the k/v buffer)
qk_equals_v = _entry("qk_equals_v", ("    is_k = i_r < QK\n", "    is_k = i_r < HD // 2\n"))

# unmasked tail read: the sequence search takes `<` for `<=`, so the first token of every sequence
# is read as token len(b-1) of the previous one: past its length, in the tail of its last block
# (or a spare table entry); the slot is inside the cache, so it shows as a wrong or NaN row
tail_read_past_len = _entry("tail_read_past_len", ("m_go = b_cu <= o_t", "m_go = b_cu < o_t"))

# upstream's bug: with an fp8 cache, a bf16/fp16 weight is rounded to fp8 before the dot
bf16_weight_to_fp8 = _entry(
    "bf16_weight_to_fp8",
    ("\n            if EXACT_ROUNDING:\n                # interpreter: numpy",
     "\n            if cache.dtype.element_ty == tl.float8e4nv:\n"
     "                b_w = b_w.to(tl.float8e4nv)\n"
     "            if EXACT_ROUNDING:\n                # interpreter: numpy"))

# the 128x128 block scale indexed by head instead of by the absolute weight row r // 128
# (rows past the scale tensor land in its guard band), in the product's per-step scaling and in
# the weight's preparation (which then learns the head size)
block_scale_per_head = _entry(
    "block_scale_per_head",
    ("b_s = tl.load(w_scale + ((n0 + o_n) // 128) * s_sn", "b_s = tl.load(w_scale + ((n0 + o_n) // (QK + VD)) * s_sn"),
    ("b_s = tl.load(w_scale + (o_n // 128) * s_sn", "b_s = tl.load(w_scale + (o_n // HD) * s_sn"),
    ("def _prepare_weight_kernel(w, w_scale, out, N, L, s_wn,", "def _prepare_weight_kernel(w, w_scale, out, N, L, HD, s_wn,"),
    ("        w_kv_b, w_scale if scaled else w_kv_b, out, N, L, *w_kv_b.stride()",
     "        w_kv_b, w_scale if scaled else w_kv_b, out, N, L, HD, *w_kv_b.stride()"),
    ("def prepare_weight(w_kv_b: torch.Tensor, w_scale: Optional[torch.Tensor], dtype: torch.dtype)",
     "def prepare_weight(w_kv_b: torch.Tensor, w_scale: Optional[torch.Tensor], dtype: torch.dtype, HD: int = 128)"),
    ("prepare_weight(w_kv_b, w_scale, w_dtype), None", "prepare_weight(w_kv_b, w_scale, w_dtype, QK + VD), None"))

# the block scale multiplies the running sum, not the K step's partial product: earlier steps
# are scaled again at every later step
block_scale_compounds = _entry(
    "block_scale_compounds",
    ("b_acc += b_p * b_s[None, :]", "b_acc = (b_acc + b_p) * b_s[None, :]"))

# k_pe of heads >= 1 read two columns early (the last latent columns leak into the rope part)
pe_shifted_per_head = _entry(
    "pe_shifted_per_head",
    ("p_c = (cache + L * s_cd) + o_row[:, None] + o_p[None, :] * s_cd",
     "p_c = (cache + (L - 2 * tl.minimum(i_h, 1)) * s_cd) + o_row[:, None] + o_p[None, :] * s_cd"))

# k_pe rounded twice: through bfloat16, then to out_dtype
pe_rounded_twice = _entry(
    "pe_rounded_twice",
    ("    return cast_to(b_pe, out_ty, EXACT_ROUNDING)",
     "    return cast_to(cast_to(b_pe, tl.bfloat16, EXACT_ROUNDING).to(tl.float32), out_ty, EXACT_ROUNDING)"))

# blocks addressed by their position in the table, not by the ids kv_indices holds (wrapped to
# the cache's block count so no read leaves it)
blocks_by_position = _entry(
    "blocks_by_position",
    ("        kv_cache, kv_indptr, kv_indices, cu_kv_lens, w_kv_b, ws,",
     "        kv_cache, kv_indptr, torch.arange(kv_indices.numel(), device=dev, dtype=kv_indices.dtype) "
     "% max(kv_cache.shape[0], 1), cu_kv_lens, w_kv_b, ws,"))

# the latent load ignores the K mask: the last K step reads past column L, through the rope part
# into the stride gap, the next slot's row or the guard band (its weight columns are zero, but
# 0 * NaN is NaN)
latent_unmasked_k = _entry(
    "latent_unmasked_k",
    ("b_a = tl.load(p_a, mask=m_row[:, None] & m_k[None, :], other=0.0)",
     "b_a = tl.load(p_a, mask=m_row[:, None], other=0.0)"))

# the launcher does not refuse 2^20 or more weight rows (the kernel's float division is exact
# only below)
tile_limit_unchecked = _entry("tile_limit_unchecked", ("    if n_out_tiles * cfg.BN >= 2 ** 20:", "    if False:"))

# rows are masked against the host's total only: with a host total past cu_kv_lens[-1] the rows
# past it are read (as tokens past the last sequence's length) and written
device_total_ignored = _entry(
    "device_total_ignored",
    ("    m_t = (o_t < total) & (o_t < tl.load(cu_kv_lens + B).to(tl.int64))\n", "    m_t = o_t < total\n"))

# the host total is not validated (a negative one reaches torch.empty)
total_unchecked = _entry("total_unchecked", ('        check_int("total", total, lo=0, hi=2 ** 62)\n', ""))

# the launcher checks nothing
no_checks = _entry(
    "no_checks",
    ("    P, H, mode = _check(",
     "    P, H, mode = (kv_cache.shape[-1] - kv_lora_rank, w_kv_b.shape[0] // (qk_nope_head_dim + v_head_dim), "
     "0 if w_scale is None else (1 if w_scale.dim() == 1 else 2)) if True else _check("))

# A speed plant, not a correctness one (no property can kill it; it is not in MUTANTS): the output
# offsets without the contiguity hints, which Triton lowers to 2-byte stores. The 16-byte store
# check of ci/compile_check.py must fail on it.
scalar_output_stores = _entry(
    "scalar_output_stores", ("            o_o = tl.max_contiguous(tl.multiple_of(o_o, [1, 8]), [1, 8])\n", "            pass\n"))


def sm90_scalar_row_loads():
    """A speed plant of the sm_90 kernel (not in MUTANTS): L left unspecialized, so the masks
    o_k < L are not seen as constant over 16 columns and every latent-row load is scalar. The
    16-byte load check of ci/compile_check.py must fail on it."""
    from properties.mutants._mutate import mutate
    return mutate("kernels.gather_kv_b_proj_sm90",
                  [('@gluon.jit(do_not_specialize=["total", "B", "n_search", "block_size", "P",',
                    '@gluon.jit(do_not_specialize=["total", "B", "n_search", "block_size", "L", "P",')],
                  tag="sm90_scalar_row_loads")


def _sm90_entry(tag, *replacements):
    """A mutant of the sm_90 kernel, reached through the production launcher (GPU only: on the
    interpreter the property that kills it skips)."""
    return _entry(tag, ("from kernels import gather_kv_b_proj_sm90 as sm90\n",
                        "from properties.mutants._mutate import mutate\n"
                        f"sm90 = mutate('kernels.gather_kv_b_proj_sm90', {list(replacements)!r}, tag={tag + '_k'!r})\n"))


# the sm_90 kernel's V pieces land qk_nope columns to the right (the column inside the head not
# reduced by qk: the portable kernel's qk_equals_v in another form; the TMA store clips at the
# last head, so nothing lands outside v)
sm90_v_column = _sm90_entry("sm90_v_column", ("[t0, i_h * VD + (i_r - QK)]", "[t0, i_h * VD + i_r]"))

# the sm_90 kernel stores a consumer's 64 rows by TMA when they end before the host total, even past
# cu_kv_lens[-1] (rows past it get zeros)
sm90_device_total_ignored = _sm90_entry("sm90_device_total_ignored",
                                        ("full = (t0 + BM <= dev_total) & (t0 + BM <= total)",
                                         "full = t0 + BM <= total"))

# the sm_90 kernel's own sequence search (the same search in Gluon) takes `<` for `<=`, as
# tail_read_past_len does in the portable kernel
sm90_tail_read = _sm90_entry("sm90_tail_read", ("m_go = b_cu <= o_t", "m_go = b_cu < o_t"))


# the sm_90 kernel's second consumer warpgroup takes the first one's rows (the rows i_w * 64.. of
# the program's tile): rows 64..127 of every token tile are never written
sm90_second_consumer_rows = _sm90_entry("sm90_second_consumer_rows",
                                        ("t0 = (i_p // N_GROUPS) * (2 * BM) + i_w * BM",
                                         "t0 = (i_p // N_GROUPS) * (2 * BM)"))

# fp8 x fp8 on the sm_90 kernel: the product of K step i scaled by block i - 1's scale (the scale
# loaded one step ahead, one step too early)
sm90_fp8_scale_lag = _sm90_entry("sm90_fp8_scale_lag",
                                 ("b_s = gl.load(w_scale + (i_g + i_q * N_GROUPS) * s_sn + i_k * s_sl)",
                                  "b_s = gl.load(w_scale + (i_g + i_q * N_GROUPS) * s_sn + (i_k - 1) * s_sl)"))

MUTANTS = {
    "qk_equals_v": ("qk_equals_v", ("test_equivalence",),
                    "qk_nope_head_dim assumed equal to v_head_dim (K/V split at (qk + v) / 2)"),
    "tail_read_past_len": ("tail_read_past_len",
                           ("test_equivalence", "test_unheld_slots_ignored", "test_batch_split_invariance"),
                           "a sequence's first token read from past the previous sequence's length"),
    "bf16_weight_to_fp8": ("bf16_weight_to_fp8", ("test_equivalence",),
                           "bf16/fp16 weight rounded to fp8 when the cache is fp8 (upstream)"),
    "block_scale_per_head": ("block_scale_per_head", ("test_equivalence",),
                             "block w_scale row indexed by head instead of by absolute row // 128"),
    "block_scale_compounds": ("block_scale_compounds", ("test_equivalence", "test_uniform_block_scale_is_row_scale"),
                              "block w_scale multiplies the running sum at every K step"),
    "pe_shifted_per_head": ("pe_shifted_per_head", ("test_equivalence", "test_rope_part_exact"),
                            "k_pe of heads >= 1 read two columns early"),
    "pe_rounded_twice": ("pe_rounded_twice", ("test_rope_part_exact",), "k_pe rounded through bfloat16 first"),
    "blocks_by_position": ("blocks_by_position", ("test_equivalence", "test_block_placement_invariance"),
                           "block id = position in the table, kv_indices ignored"),
    "latent_unmasked_k": ("latent_unmasked_k", ("test_no_read_past_cache", "test_unheld_slots_ignored"),
                          "latent load not masked at column L: reads past the row"),
    "no_checks": ("no_checks", ("test_bad_input_rejected",), "the launcher validates nothing"),
    "tile_limit_unchecked": ("tile_limit_unchecked", ("test_tile_count_limit_rejected",),
                             "2^20 or more weight rows are not refused"),
    "device_total_ignored": ("device_total_ignored", ("test_host_total",),
                             "rows masked by the host total only: rows past cu_kv_lens[-1] read and written"),
    "total_unchecked": ("total_unchecked", ("test_bad_total_rejected",), "the host total is not validated"),
    "sm90_v_column": ("sm90_v_column", ("test_sm90_matches_portable",),
                      "the sm_90 kernel's V pieces stored qk_nope columns to the right"),
    "sm90_device_total_ignored": ("sm90_device_total_ignored", ("test_sm90_matches_portable",),
                                  "the sm_90 kernel stores a consumer's rows past cu_kv_lens[-1] by TMA"),
    "sm90_tail_read": ("sm90_tail_read", ("test_sm90_matches_portable",),
                       "the sm_90 kernel's sequence search reads token len(b-1) of the previous sequence"),
    "sm90_second_consumer_rows": ("sm90_second_consumer_rows", ("test_sm90_matches_portable",),
                                  "the sm_90 kernel's second consumer warpgroup computes the first one's rows"),
    "sm90_fp8_scale_lag": ("sm90_fp8_scale_lag", ("test_sm90_matches_portable",),
                           "fp8 x fp8 on the sm_90 kernel: K step i scaled by block i - 1's scale"),
}
