"""Broken kda implementations, each made from one production kernel module by exact source edits.

`kda_form` on each function names the form it breaks, so test_forms_agree compares it with the
production kernel of the other form.
"""
from properties.mutants._mutate import entry

OP = "kda"
CHUNK = "kernels.kda.chunk"
RECURRENT = "kernels.kda.fused_recurrent"


def _entry(tag, module, *replacements):
    form, fn_name = ("chunk", "chunk_kda") if module == CHUNK else ("fused_recurrent", "fused_recurrent_kda")

    fn = entry(module, fn_name, tag, *replacements)
    fn.kda_form = form
    return fn


# value head hv reads q/k head hv % H instead of hv // (HV // H) (H = HV // GROUP)
gva_modulo_chunk = _entry("gva_modulo_chunk", CHUNK, ("i_h = i_hv // GROUP", "i_h = i_hv % (HV // GROUP)"))
gva_modulo_recurrent = _entry(
    "gva_modulo_recurrent", RECURRENT,
    ("i_h = i_hv // GROUP  # GVA", "i_h = i_hv % (HV // GROUP)  # GVA"))

# the decay multiplies the state after the delta update instead of before it
decay_after_update_recurrent = _entry(
    "decay_after_update_recurrent", RECURRENT,
    ("        b_h = b_h * b_d[:, None]\n", ""),
    ("        b_h += b_k[:, None] * b_u[None, :]\n",
     "        b_h += b_k[:, None] * b_u[None, :]\n"
     "        b_h = b_h * b_d[:, None]\n"))
decay_after_update_chunk = _entry(
    "decay_after_update_chunk", CHUNK,
    ("return b_h * b_gl[:, None] + _dot_state(b_kgt, u_hi, u_lo, tl.zeros_like(b_h), SPLIT, DOT_PREC)",
     "return (b_h + _dot_state(b_kgt, u_hi, u_lo, tl.zeros_like(b_h), SPLIT, DOT_PREC)) * b_gl[:, None]"))

# varlen: each sequence's program starts at the first token of the pack, so the state carries
# the previous sequences' tokens instead of resetting at the boundary
no_varlen_reset_recurrent = _entry(
    "no_varlen_reset_recurrent", RECURRENT,
    ("bos = tl.load(cu_seqlens + i_n).to(tl.int64)", "bos = tl.load(cu_seqlens).to(tl.int64) + i_n * 0"))

# varlen: the intra-chunk kernels take the pack's end as every sequence's end, so a sequence's
# last partial chunk decays by (and writes rows of) the next sequence's tokens
chunk_crosses_boundary = _entry(
    "chunk_crosses_boundary", CHUNK,
    ("eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)\n        row_base = i_b",
     "eos = T + 0 * tl.load(cu_seqlens + i_n + 1).to(tl.int64)\n        row_base = i_b"))

# the state kernel skips the last partial chunk (o rows left unwritten, state misses them)
drop_last_partial_chunk = _entry(
    "drop_last_partial_chunk", CHUNK,
    ("    if n_full * BT < eos - bos:\n", "    if False:\n"))

# beta read as 1
beta_ignored = _entry(
    "beta_ignored", RECURRENT,
    ("b_beta = tl.load(p_beta + t * s_b_t, mask=m_t, other=0.0).to(tl.float32)",
     "b_beta = tl.load(p_beta + t * s_b_t, mask=m_t, other=0.0).to(tl.float32) * 0.0 + 1.0"))

# use_qk_l2norm ignored
l2norm_skipped = _entry(
    "l2norm_skipped", RECURRENT,
    ("    if USE_QK_L2NORM:\n        b_q = b_q / tl.sqrt", "    if False:\n        b_q = b_q / tl.sqrt"))

# the state kernel starts from zeros: the initial state is never read
initial_state_ignored = _entry(
    "initial_state_ignored", CHUNK,
    ("BV=BV, USE_INITIAL_STATE=initial_state is not None,", "BV=BV, USE_INITIAL_STATE=False,"))

# T == 0 returns zeros instead of the initial state
empty_drops_initial_state = _entry(
    "empty_drops_initial_state", CHUNK,
    ("return empty_result(q, v, d, initial_state, output_final_state)",
     "return empty_result(q, v, d, None, output_final_state)"))

# exp(G_last - G_i) formed as exp(G_last) * exp(-G_i): 0 * inf = NaN once the decays are deep
decay_as_product = _entry(
    "decay_as_product", CHUNK,
    ("        b_kg = b_R * b_after\n",
     "        b_gf = tl.load(g + i_b * s_g_b + i_hv * s_g_h + t_t[:, None] * s_g_t + o_k[None, :] * s_g_k,\n"
     "                       mask=m_t[:, None] & m_k[None, :], other=0.0)\n"
     "        b_kg = b_k * b_rk[:, None] * (tl.exp(tl.sum(b_gf, 0))[None, :] * tl.exp(-tl.cumsum(b_gf, 0)))\n"))

# the WY/UT kernel writes w and q exp(G) only up to column K, leaving the padding columns [K, KS)
# that the state kernel reads with whole 16-column vector loads unwritten
padding_unwritten = _entry(
    "padding_unwritten", CHUNK,
    ("m_out = m_t[:, None] & (o_k < KS)[None, :]", "m_out = m_t[:, None] & (o_k < K)[None, :]"))

# the intra-chunk diagonal sub-block keeps Aqk's pairs j > i: its cumulative products are 1 there
# (not 0), and only the mask after the loop removes them
aqk_upper_unmasked = _entry(
    "aqk_upper_unmasked", CHUNK,
    ("b_Aqk_d = tl.where(m_le, b_Aqk_d, 0.0) * scale", "b_Aqk_d = b_Aqk_d * scale"))

# the joined off-diagonal product's halves taken in the wrong order: Akk gets q's rows, Aqk k's
joined_halves_swapped = _entry(
    "joined_halves_swapped", CHUNK,
    ("b_Akk, b_Aqk = tl.split(", "b_Aqk, b_Akk = tl.split("))

# the WY/UT kernel reads q's L2 norms (written by the diagonal kernel) for k's rows
norms_swapped = _entry(
    "norms_swapped", CHUNK,
    ("b_rk = tl.load(nrm + o_row, mask=m_t, other=0.0)",
     "b_rk = tl.load(nrm + (HV + i_hv) * R + row_base + t_t, mask=m_t, other=0.0)"))

# the diagonal blocks' inversion by doubling stops one level short: pairs of rows in different
# halves of a 16-row block keep the inverse's lower-left block at zero
inverse_level_short = _entry(
    "inverse_level_short", CHUNK,
    ("for lvl in tl.static_range(1, BC.bit_length() - 1):", "for lvl in tl.static_range(1, BC.bit_length() - 2):"))

# the off-diagonal kernel writes only the earlier sub-blocks' columns, leaving
# the zeros past the diagonal block (which the state kernel's output product reads) unwritten
offdiag_upper_unwritten = _entry(
    "offdiag_upper_unwritten", CHUNK,
    ("m_s = m_i[:, None] & ((o_t < r) | (o_t >= r + BC))[None, :]", "m_s = m_i[:, None] & (o_t < r)[None, :]"))

# g's dtype is never checked (a float32 copy is validated instead; the kernel reads g as given)
g_dtype_unchecked = _entry(
    "g_dtype_unchecked", CHUNK,
    ("d = check_kda_args(q, k, v, g, beta, scale,", "d = check_kda_args(q, k, v, g.float(), beta, scale,"))

MUTANTS = {
    "gva_modulo_chunk": ("gva_modulo_chunk", ("test_gva_consistency", "test_forms_agree"),
                         "chunk: value head hv reads q/k head hv % H, not hv // (HV // H)"),
    "gva_modulo_recurrent": ("gva_modulo_recurrent", ("test_equivalence", "test_gva_consistency"),
                             "recurrent: value head hv reads q/k head hv % H, not hv // (HV // H)"),
    "decay_after_update_recurrent": ("decay_after_update_recurrent", ("test_equivalence",),
                                     "recurrent: decay applied after the delta update"),
    "decay_after_update_chunk": ("decay_after_update_chunk", ("test_state_chaining",),
                                 "chunk: decay applied after the chunk's state update"),
    "no_varlen_reset_recurrent": ("no_varlen_reset_recurrent", ("test_varlen_packing",),
                                  "recurrent: the state is not reset at a varlen boundary"),
    "chunk_crosses_boundary": ("chunk_crosses_boundary", ("test_varlen_packing",),
                               "chunk: a sequence's last chunk runs into the next sequence"),
    "drop_last_partial_chunk": ("drop_last_partial_chunk",
                                ("test_equivalence", "test_forms_agree", "test_state_chaining", "test_extreme_gates"),
                                "chunk: the last partial chunk is dropped"),
    "beta_ignored": ("beta_ignored", ("test_equivalence", "test_beta_zero_only_decays"), "recurrent: beta read as 1"),
    "l2norm_skipped": ("l2norm_skipped", ("test_equivalence",), "recurrent: use_qk_l2norm ignored"),
    "initial_state_ignored": ("initial_state_ignored",
                              ("test_state_chaining", "test_beta_zero_only_decays"),
                              "chunk: the initial state is ignored"),
    "empty_drops_initial_state": ("empty_drops_initial_state", ("test_empty_call",),
                                  "chunk: T == 0 returns zeros instead of the initial state"),
    "decay_as_product": ("decay_as_product", ("test_extreme_gates",),
                         "chunk: exp(G_last - G) as exp(G_last) * exp(-G) (0 * inf = NaN for deep decays)"),
    "padding_unwritten": ("padding_unwritten", ("test_equivalence", "test_forms_agree"),
                          "chunk: the intermediates' padding columns past K are left unwritten"),
    "g_dtype_unchecked": ("g_dtype_unchecked", ("test_bad_input_rejected",), "g's dtype is not checked"),
    "aqk_upper_unmasked": ("aqk_upper_unmasked", ("test_equivalence", "test_forms_agree"),
                           "chunk: Aqk's diagonal sub-block keeps its pairs j > i"),
    "joined_halves_swapped": ("joined_halves_swapped", ("test_equivalence", "test_forms_agree"),
                              "chunk: the joined Akk/Aqk product's halves are swapped"),
    "norms_swapped": ("norms_swapped", ("test_equivalence", "test_forms_agree"),
                      "chunk: the WY/UT kernel scales k's rows by q's L2 norms"),
    "inverse_level_short": ("inverse_level_short", ("test_equivalence", "test_forms_agree"),
                            "chunk: the diagonal blocks' inversion skips its last doubling level"),
    "offdiag_upper_unwritten": ("offdiag_upper_unwritten", ("test_equivalence", "test_forms_agree"),
                                "chunk: the off-diagonal pass leaves Aqk's columns past the block unwritten"),
}
