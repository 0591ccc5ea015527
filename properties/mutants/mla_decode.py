"""Broken mla_decode implementations, each made from the production kernel by exact source edits.

Each mutant's function carries `padded`, the same mutated module's `mla_decode_padded`, so the
padded-replica property reaches the mutant's padded path as it reaches production's.
"""
from properties.mutants._mutate import entry

OP = "mla_decode"
MODULE = "kernels.mla_decode"


def _entry(tag, *replacements):
    fn = entry(MODULE, "mla_decode", tag, *replacements)
    fn.padded = entry(MODULE, "mla_decode_padded", tag, *replacements)
    return fn


ROW_HEAD = "o_qh = tl.where(m_h, o_h // REP, 0).to(tl.int64)"

# padded row i reads q head i % H instead of i // (16 // H) (kept rows h * REP read head 0 ...)
replica_wrong_head = _entry("replica_wrong_head", (ROW_HEAD, "o_qh = tl.where(m_h, o_h % (H_run // REP), 0).to(tl.int64)"))

# only the kept replica (row h * REP) reads its head; the dropped replicas read head 0
replicas_not_replicated = _entry(
    "replicas_not_replicated", (ROW_HEAD, "o_qh = tl.where(m_h & (o_h % REP == 0), o_h // REP, 0).to(tl.int64)"))

# upstream's bug: the padded path returns lse with all 16 padded rows
lse_padded = _entry(
    "lse_padded",
    ("lse = torch.empty((B, H_out), dtype=torch.float32, device=dev)",
     "lse = torch.empty((B, H_run), dtype=torch.float32, device=dev)"),
    ("        tl.store(lse + i_b * s_lse_b + i_h * s_lse_h, b_lse)",
     "        for r in range(REP):\n"
     "            tl.store(lse + i_b * s_lse_b + (i_h * REP + r) * s_lse_h, b_lse)"))

# lse merged from padded row h (a replica of head h // REP) instead of row h * REP; o is right
lse_wrong_row = _entry(
    "lse_wrong_row",
    ("    if STORE_LSE:\n",
     "    if STORE_LSE:\n"
     "        b_lse_s = tl.load(mid_lse + i_b * s_ml_b + i_h * s_ml_h + o_s.to(tl.int64) * s_ml_s,\n"
     "                          mask=o_s < num_splits, other=float('-inf'))\n"
     "        b_max = tl.max(b_lse_s, axis=0)\n"
     "        b_max = tl.where(b_max == float('-inf'), 0.0, b_max)\n"
     "        b_den = tl.sum(tl.exp(b_lse_s - b_max), axis=0)\n"
     "        b_empty = b_den == 0.0\n"))

# the split merge weights o by exp(lse_s - lse_0) (split 0's lse as the max; floored so that an
# empty sequence still gives 0, not NaN) but normalises with the true max
merge_wrong_max = _entry(
    "merge_wrong_max",
    ("b_w = tl.exp(tl.load(p_ml + i_s * s_ml_s) - b_max)",
     "b_w = tl.exp(tl.load(p_ml + i_s * s_ml_s) - tl.maximum(tl.load(p_ml), -1e30))"))

# kv_lens rounded up to whole pages: the tokens past kv_len in the last page are attended
unmasked_page_tail = _entry(
    "unmasked_page_tail",
    ("b_len = tl.load(kv_lens + i_b * s_len).to(tl.int32)",
     "b_len = tl.cdiv(tl.load(kv_lens + i_b * s_len).to(tl.int32), page_size) * page_size"))

# the page id is the entry's position in kv_indices (an identity page table), not its value
page_by_position = _entry(
    "page_by_position",
    ("b_page = tl.load(kv_indices + (b_page0 + o_pg) * s_ind, mask=m_n, other=0).to(tl.int64)",
     "b_page = (b_page0 + o_pg) + 0 * tl.load(kv_indices + (b_page0 + o_pg) * s_ind, "
     "mask=m_n, other=0).to(tl.int64)"))

# sm_scale defaults to 1 / sqrt(L) (the rope dims forgotten)
sm_scale_default = _entry(
    "sm_scale_default",
    ("sm_scale = 1.0 / math.sqrt(L + P) if sm_scale is None", "sm_scale = 1.0 / math.sqrt(L) if sm_scale is None"))

# the merge of a sequence whose splits are all empty computes exp(-inf - -inf) = NaN
no_empty_guard = _entry(
    "no_empty_guard", ("    b_max = tl.where(b_max == float(\"-inf\"), 0.0, b_max)\n", "\n"))

# head_padding is not validated (an unknown value runs the masked path)
no_head_padding_check = _entry(
    "no_head_padding_check",
    ('    check_choice("head_padding", head_padding, ("auto", "pad", "mask"))\n', "\n"))

MUTANTS = {
    "replica_wrong_head": ("replica_wrong_head", ("test_equivalence", "test_pad_equals_mask", "test_head_permutation",
                                                  "test_padded_replicas_identical"),
                           "padded row i reads q head i % H instead of i // (16 // H)"),
    "replicas_not_replicated": ("replicas_not_replicated", ("test_padded_replicas_identical",),
                                "dropped replicas read head 0 (the kept one is right: o and lse correct)"),
    "lse_padded": ("lse_padded", ("test_equivalence", "test_pad_equals_mask"),
                   "the pad path returns the padded [B, 16] lse (upstream's bug)"),
    "lse_wrong_row": ("lse_wrong_row", ("test_equivalence", "test_pad_equals_mask"),
                      "lse merged from padded row h instead of h * (16 // H)"),
    "merge_wrong_max": ("merge_wrong_max", ("test_equivalence", "test_split_invariance"),
                        "split merge weights use the first split's lse as the max"),
    "unmasked_page_tail": ("unmasked_page_tail", ("test_equivalence", "test_unread_slots_poisoned"),
                           "tokens past kv_len in the last page are attended"),
    "page_by_position": ("page_by_position", ("test_equivalence", "test_page_placement"),
                         "page id = position in kv_indices (identity page table)"),
    "sm_scale_default": ("sm_scale_default", ("test_equivalence",), "sm_scale defaults to 1 / sqrt(L)"),
    "no_empty_guard": ("no_empty_guard", ("test_empty_sequences",), "kv_lens 0 gives NaN (no empty-merge guard)"),
    "no_head_padding_check": ("no_head_padding_check", ("test_bad_input_rejected",), "head_padding not validated"),
}
