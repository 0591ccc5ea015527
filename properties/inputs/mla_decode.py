"""Cases and inputs for mla_decode (SPEC.md section 2): MLA decode over a paged latent cache.

A case names the batch (B sequences with kv lengths `lens`), the query heads H, the latent and
rope dims L and P, the page size and how the page table is laid out (spare pages per sequence
beyond its length, unreferenced pages in the pool, a prefix of pages shared between sequences),
the dtypes, the scales and the launch options; `build` makes the tensors from its seed.

Every sequence's pages are distinct pool pages (a random permutation of the pool, so a page's
position in the pool never follows its position in the sequence), except that with `shared`
sequences b >= 1 start with pages of sequence 0 (prefix caching). The pool always has at least as
many pages as kv_indices has entries. `Inputs.read` marks the cache slots some sequence reads
(token t < kv_lens[b] of its pages): everything else may be poisoned without changing the result.
"""
import math
from dataclasses import dataclass, replace
from typing import Optional

import torch
from hypothesis import strategies as st

from properties import backend, builders
from properties import strategies as kst
from properties.harness import Case

HEAD_TILE = 16                      # the padding target of the contract: "pad" needs H | 16
DIVIDING_HEADS = (1, 2, 4, 8, 16)
MAX_SPLITS = 64
DEEPSEEK_SM_SCALE = 0.1352337788608801  # = 192 ** -0.5 * (0.1 * ln 40 + 1) ** 2 (DeepSeek-V3 mscale)
INDEX_LAYOUTS = ("int32", "int64", "mixed")


def bounds():
    """Shape bounds for the current backend. Under the interpreter one call costs ~0.1 s for these
    sizes (B <= 3, H <= 20, L mostly <= 64, kv lengths <= 300); many splits cost more, so the
    split counts drawn there stay small but for a rare 64. On the GPU `max_work` caps
    sum(kv_lens) * H, which bounds the float64 oracle's time (it runs on the CPU)."""
    return backend.pick(
        interpreter=dict(max_batch=3, heads=(1, 2, 3, 4, 5, 8, 12, 16, 20), max_heads=20,
                         latent=(16, 32, 48, 64, 16, 32, 64, 512), max_latent=512, max_rope=64,
                         max_page_size=64, max_len=300, max_work=3 * 20 * 300, max_spare=3,
                         splits=(1, 2, 3, 5, 8), max_drawn_splits=16),
        cuda=dict(max_batch=6, heads=(1, 2, 4, 8, 16, 3, 5, 12, 20, 32, 64, 128), max_heads=128,
                  latent=(512,), max_latent=1024, max_rope=128,
                  max_page_size=128, max_len=6000, max_work=1 << 18, max_spare=8,
                  splits=(1, 2, 3, 5, 8, 16, 64), max_drawn_splits=64))


def head_counts(*, divides: bool = False):
    """H: the backend's list (the dividing ones 1, 2, 4, 8, 16 and masked ones like 3, 5, 12, 20)
    or any count up to the bound; with divides, only H | 16. Shrinks towards 1."""
    if divides:
        return st.sampled_from(DIVIDING_HEADS)
    b = bounds()
    return st.one_of(st.sampled_from(b["heads"]), st.integers(1, b["max_heads"]))


def latent_dims():
    """L = kv_lora_rank: a multiple of 16; the backend's usual values or any up to the bound.
    Shrinks towards 16."""
    b = bounds()
    return st.one_of(st.sampled_from(b["latent"]),
                     st.integers(1, b["max_latent"] // 16).map(lambda k: 16 * k)) \
        if backend.BACKEND != "interpreter" else st.sampled_from(b["latent"])


def rope_dims():
    """P: 0 (no rope), 64 (DeepSeek), 2, or any even value up to the bound. Shrinks towards 0."""
    b = bounds()
    return st.one_of(st.sampled_from([0, 64, 2, 16]), st.integers(0, b["max_rope"] // 2).map(lambda h: 2 * h))


def kv_lengths(*, max_len: int, min_len: int = 0):
    """One sequence's kv length: 0, 1, 2, edges of 32-token blocks and of 256-token split sizes,
    uniform and log-uniform (short and thousands both common). Shrinks towards min_len."""
    edges = [n for n in (31, 32, 33, 255, 256, 257, 1024, 4097) if min_len <= n <= max_len]
    parts = [kst.token_counts(max_tokens=max_len, min_tokens=min_len)]
    if max_len >= max(min_len, 1) * 4:
        parts.append(kst.log_uniform_ints(max(min_len, 1), max_len))
    if edges:
        parts.append(st.sampled_from(edges))
    return st.one_of(*parts)


def split_counts(*, allow_none: bool = True, min_splits: int = 1):
    """num_kv_splits: None (the launcher's choice), small counts, any up to the backend's bound,
    or 64 (the contract's maximum). Shrinks towards None, then small."""
    b = bounds()
    some = st.one_of(st.sampled_from([s for s in b["splits"] if s >= min_splits]),
                     st.integers(min_splits, b["max_drawn_splits"]),
                     st.just(MAX_SPLITS))
    return st.one_of(st.none(), some) if allow_none else some


def sm_scales():
    """sm_scale: None (1 / sqrt(L + P)), DeepSeek's, 0 (uniform softmax) or any in [-1, 1]
    (negative allowed: the math holds). Shrinks towards None."""
    return st.one_of(st.none(), st.sampled_from([DEEPSEEK_SM_SCALE, 0.0]),
                     st.floats(-1.0, 1.0, width=32, allow_subnormal=False))


@st.composite
def cases(draw, *, divides: bool = False, splits: Optional[str] = "any", min_batch: int = 0,
          min_len: int = 0, zero_lens: bool = False, head_padding: Optional[str] = None):
    """A full call of the op.

    divides: H | 16 only. splits: "any" (None included), "int" (an explicit count) or "many"
    (an explicit count >= 2). min_batch / min_len: lower bounds on B and on every kv length.
    zero_lens: at least one sequence has kv_lens 0 (sometimes all, with no pages at all).
    head_padding: force one ("pad" needs divides). Shrinks towards B small, H 1, L 16, P 0,
    short sequences, bf16, no scales, the launcher's split count.
    """
    b = bounds()
    B = draw(st.one_of(st.integers(max(min_batch, 1), b["max_batch"]), st.integers(min_batch, b["max_batch"])))
    H = draw(head_counts(divides=divides))
    L = draw(latent_dims())
    P = draw(rope_dims())
    max_len = max(min_len, min(b["max_len"], b["max_work"] // max(1, B * H)))
    lens = draw(st.lists(kv_lengths(max_len=max_len, min_len=min_len), min_size=B, max_size=B))
    if zero_lens and B:
        if draw(st.integers(0, 3)) == 0:
            lens = [0] * B
        else:
            lens[draw(st.integers(0, B - 1))] = 0
    page_size = draw(kst.block_sizes(max_block_size=b["max_page_size"]))
    dtype = draw(st.sampled_from(["bfloat16", "float16"]))
    cache = draw(st.sampled_from(["activation", "float8_e4m3fn"]))
    # |scale| < 64 keeps |kv * kv_scale| <= 448 * 64 inside float16's range (o is a convex mix of kv)
    kv_scale = draw(kst.quant_scales(min_exp=-8, max_exp=5))
    if splits == "any":
        num_kv_splits = draw(split_counts())
    else:
        num_kv_splits = draw(split_counts(allow_none=False, min_splits=2 if splits == "many" else 1))
    if head_padding is None:
        choices = ["auto", "mask"] + (["pad"] if HEAD_TILE % H == 0 else [])
        head_padding = draw(st.sampled_from(choices))
    all_empty = sum(lens) == 0
    return Case(
        seed=draw(kst.seeds()), B=B, H=H, L=L, P=P, lens=lens, page_size=page_size,
        slack=draw(st.sampled_from([0, 0, 1, 2])),
        spare_pages=0 if all_empty and draw(st.booleans()) else draw(st.integers(0, b["max_spare"])),
        shared=draw(st.booleans()) if B >= 2 else False,
        dtype=dtype, cache=cache, kv_scale=kv_scale,
        kv_magnitude=draw(st.sampled_from([1.0, 4.0, 30.0] if cache == "activation" else [1.0, 16.0, 100.0])),
        sm_scale=draw(sm_scales()), num_kv_splits=num_kv_splits, head_padding=head_padding,
        return_lse=draw(st.sampled_from([True, True, False])),
        index_dtype=draw(st.sampled_from(INDEX_LAYOUTS)),
        layout=draw(st.sampled_from(["contiguous", "strided"])),
    )


@dataclass
class Inputs:
    q: torch.Tensor
    kv_cache: torch.Tensor
    kv_indptr: torch.Tensor
    kv_indices: torch.Tensor
    kv_lens: torch.Tensor
    kwargs: dict                # kv_lora_rank, sm_scale, kv_scale, num_kv_splits, head_padding, return_lse
    read: torch.Tensor          # [num_pages, page_size] bool (CPU): slots some sequence reads
    values: torch.Tensor        # [num_pages, page_size, L + P] (CPU): the cache's values, layout aside
    layout: str

    @property
    def args(self) -> tuple:
        return (self.q, self.kv_cache, self.kv_indptr, self.kv_indices, self.kv_lens)

    def tensors(self) -> dict:
        """Every tensor argument by name (for Unchanged)."""
        out = dict(q=self.q, kv_cache=self.kv_cache, kv_indptr=self.kv_indptr, kv_indices=self.kv_indices,
                   kv_lens=self.kv_lens)
        out.update({n: t for n, t in self.kwargs.items() if isinstance(t, torch.Tensor)})
        return out

    def call(self, fn, *args, **changes):
        """fn(q, kv_cache, kv_indptr, kv_indices, kv_lens, **kwargs), keyword arguments changed
        (positional ones replaced when `args` is given)."""
        return fn(*(args or self.args), **{**self.kwargs, **changes})

    def with_cache(self, values: torch.Tensor, *, fill=None, read: Optional[torch.Tensor] = None,
                   kv_indices: Optional[torch.Tensor] = None) -> "Inputs":
        """The same call with the cache holding `values` (same layout), optionally the unread
        slots and the layout's gaps set to `fill`, and other page ids."""
        read = self.read if read is None else read
        cache = cache_tensor(values, self.layout, self.kv_cache.device, fill=fill, read=read)
        return replace(self, kv_cache=cache, values=values, read=read,
                       kv_indices=self.kv_indices if kv_indices is None else kv_indices)


def cache_tensor(values: torch.Tensor, layout: str, device, *, fill=None, read=None) -> torch.Tensor:
    """The cache [num_pages, page_size, D] holding `values`. "strided" stores it slot-major with
    4 spare elements on each side of every row (strides (D + 8, num_pages * (D + 8), 1)). With
    `fill`, every element outside the slots marked in `read` (the layout's gaps included) holds
    `fill` instead (a poison the kernel must never read)."""
    N, S, D = values.shape
    if layout == "strided":
        storage = torch.zeros((S, N, D + 8), dtype=values.dtype)
        view = storage.transpose(0, 1)[:, :, 4:4 + D]
    else:
        storage = torch.zeros((N, S, D), dtype=values.dtype)
        view = storage
    if fill is None:
        view.copy_(values)
    else:
        storage.fill_(fill)
        view[read] = values[read]
    storage = storage.to(device)
    if layout == "strided":
        return storage.transpose(0, 1)[:, :, 4:4 + D]
    return storage


def index_tensor(values, dtype_name: str, layout: str, device) -> torch.Tensor:
    """A 1-d index tensor; "strided": every other element of a twice longer tensor."""
    t = torch.tensor(values, dtype=builders.dtype(dtype_name))
    if layout == "strided":
        wide = torch.full((2 * t.numel(),), -7, dtype=t.dtype)
        wide[::2] = t
        return wide.to(device)[::2]
    return t.to(device)


def index_dtypes(case) -> tuple:
    """(kv_indptr, kv_indices, kv_lens) dtype names."""
    if case.index_dtype == "mixed":
        return "int64", "int32", "int64"
    return (case.index_dtype,) * 3


def page_table(case, gen):
    """(indptr list, indices list, num_pages): sequence b holds ceil(lens[b] / page_size) pages
    plus up to `slack` more; the pool has `spare_pages` unreferenced pages on top."""
    ps = case.page_size
    counts = [-(-n // ps) + int(torch.randint(0, case.slack + 1, (1,), generator=gen)) for n in case.lens]
    total = sum(counts)
    num_pages = total + case.spare_pages
    pool = torch.randperm(max(num_pages, 1), generator=gen)[:total].tolist()
    indptr, seqs = [0], []
    for c in counts:
        seqs.append(pool[indptr[-1]:indptr[-1] + c])
        indptr.append(indptr[-1] + c)
    if case.shared:
        for pages in seqs[1:]:
            k = min(len(pages), len(seqs[0])) // 2
            pages[:k] = seqs[0][:k]
    return indptr, [p for pages in seqs for p in pages], num_pages


def read_slots(case, indptr, indices, num_pages) -> torch.Tensor:
    """[num_pages, page_size] bool: slot (page, s) is read by some sequence."""
    read = torch.zeros((num_pages, case.page_size), dtype=torch.bool)
    for b, n in enumerate(case.lens):
        t = torch.arange(n)
        pages = torch.tensor(indices[indptr[b]:indptr[b + 1]], dtype=torch.int64)
        read[pages[t // case.page_size], t % case.page_size] = True
    return read


def build(case, device=None) -> Inputs:
    device = device or backend.DEVICE
    gen = builders.generator(case.seed)
    B, H, L, P = case.B, case.H, case.L, case.P
    D = L + P
    act = builders.dtype(case.dtype)
    indptr, indices, num_pages = page_table(case, gen)
    q = torch.randn((B, H, D), generator=gen)
    raw = torch.randn((num_pages, case.page_size, D), generator=gen) * case.kv_magnitude
    if case.cache == "float8_e4m3fn":
        values = raw.clamp(-builders.FP8_MAX, builders.FP8_MAX).to(torch.float8_e4m3fn)
    else:
        values = raw.to(act)
    if case.layout == "strided":  # q: heads apart, rows padded (strides (D + 6, B * (D + 6), 1))
        store = torch.zeros((H, B, D + 6), dtype=act)
        store[:, :, 3:3 + D] = q.transpose(0, 1).to(act)
        q_ = store.to(device).transpose(0, 1)[:, :, 3:3 + D]
    else:
        q_ = q.to(act).to(device)
    read = read_slots(case, indptr, indices, num_pages)
    dptr, dind, dlen = index_dtypes(case)
    kwargs = dict(kv_lora_rank=L, sm_scale=case.sm_scale,
                  kv_scale=builders.scale_tensor(case.kv_scale, device,
                                                 shape=(1,) if case.seed % 2 else ()),
                  num_kv_splits=case.num_kv_splits, head_padding=case.head_padding,
                  return_lse=case.return_lse)
    return Inputs(q=q_, kv_cache=cache_tensor(values, case.layout, device),
                  kv_indptr=index_tensor(indptr, dptr, case.layout, device),
                  kv_indices=index_tensor(indices, dind, case.layout, device),
                  kv_lens=index_tensor(list(case.lens), dlen, case.layout, device),
                  kwargs=kwargs, read=read, values=values, layout=case.layout)


def poison_value(kind: str, dtype: torch.dtype) -> float:
    """"nan", or "huge": the dtype's largest finite value (448 for fp8)."""
    if kind == "nan":
        return math.nan
    return builders.FP8_MAX if dtype == torch.float8_e4m3fn else torch.finfo(dtype).max
