"""Cases and inputs for gather_kv_b_proj (SPEC.md section 3): the paged MLA latent cache of B
sequences expanded through kv_b_proj into per-head K and V.

A case names the sequence lengths `lens` (empty ones included), the block table's shape (block
size, spare table entries past a sequence's length, blocks shared between neighbouring sequences
as a prefix cache shares them, unreferenced blocks), the dims (H, L, P, qk_nope, v_head_dim), the
dtypes (cache, weight, output, index), the weight scale mode and the cache scale. `build` makes
every tensor from the seed: block ids are a random permutation, so a kernel that addresses blocks
by their position in the table reads the wrong rows.

The cache always lives inside a `Guarded` buffer (strided: `row_pad` elements after each slot's
row, `block_pad` after each block), so a write to it and, with `poison`, any read of an
element that holds no token (the tail of a last block, table entries past a length, unreferenced
blocks, stride gaps, guard bands: all NaN) show up (the Triton interpreter converts an fp8 NaN
to +-480, so there a poisoned fp8 row read into an output shows as a changed value, and one read
against a zero weight column does not show). w_scale sits in a Guarded buffer too: a
kernel that indexes the block scale by head reads its guard band, not foreign memory.

Magnitudes keep every output finite in float16 (|kv_scale| < 8, cache values ~ N(0, 8^2) at
most, weights ~ N(0, 1), |w_scale| <= 1): the contract has no saturation for K and V.
"""
from dataclasses import dataclass
from typing import List, Optional

import torch
from hypothesis import strategies as st

from properties import backend, builders
from properties import strategies as kst
from properties.guard import Guarded
from properties.harness import Case

SCALE_BLOCK = 128          # rows x columns of one w_scale block (DeepSeek-V3's fp8 quantisation)
W_SCALES = ("none", "row", "block")
OUT_DTYPES = kst.DTYPE_NAMES
CACHE_DTYPES = ("bfloat16", "float16", kst.FP8_NAME)
WEIGHT_DTYPES = ("bfloat16", "float16", kst.FP8_NAME)


def bounds():
    """Shape bounds for the current backend. Under the interpreter one call of <= 64 tokens,
    H <= 4, L <= 64 and dims <= 48 takes 0.05-0.5 s; on cuda the contract's full ranges, with
    total * N capped (`max_work`) so the float64 oracle stays well under a GiB."""
    return backend.pick(
        interpreter=dict(max_total=64, max_seqs=4, max_heads=4, ranks=(16, 32, 48, 64), max_rope=48,
                         max_dim=48, max_block_size=64, max_extra_blocks=3, max_pad=8, max_work=64 * 4 * 96,
                         sm90_shapes=False),
        cuda=dict(max_total=4096, max_seqs=8, max_heads=16, ranks=tuple(range(16, 1025, 16)), max_rope=128,
                  max_dim=512, max_block_size=128, max_extra_blocks=8, max_pad=64, max_work=2 ** 24,
                  sm90_shapes=True))


# operand and output types that run on the sm_90 kernel: 16-bit operands of one type (a weight
# prepared by weight_plan included: an fp8 weight dequantised from block scales beside bf16 with a
# bf16 output, or converted beside a per-row or no scale) and a 16-bit output; fp8 x fp8 with 128x128
# block scales and a bf16 output (fp8 tensor cores)
SM90_TYPES = st.one_of(
    st.builds(dict, cache_dtype=st.sampled_from(["bfloat16", "float16"]), w_dtype=st.just("same"),
              w_scale=st.sampled_from(["none", "row"]), out_dtype=st.sampled_from(["bfloat16", "float16"])),
    st.builds(dict, cache_dtype=st.just("bfloat16"), w_dtype=st.sampled_from(["bfloat16", kst.FP8_NAME]),
              w_scale=st.just("block"), out_dtype=st.just("bfloat16")),
    st.builds(dict, cache_dtype=st.sampled_from(["bfloat16", "float16"]), w_dtype=st.just(kst.FP8_NAME),
              w_scale=st.sampled_from(["none", "row"]), out_dtype=st.sampled_from(["bfloat16", "float16"])),
    st.builds(dict, cache_dtype=st.just(kst.FP8_NAME), w_dtype=st.just(kst.FP8_NAME), w_scale=st.just("block"),
              out_dtype=st.just("bfloat16")),
).map(lambda t: {**t, "w_dtype": t["cache_dtype"] if t["w_dtype"] == "same" else t["w_dtype"]})


def ranks(values):
    """kv_lora_rank L: DeepSeek's 512 (when in range), the smallest, the largest, or any allowed
    value (multiples of 16). Shrinks towards the smallest."""
    special = [v for v in (values[0], 512, values[-1]) if v in values]
    return st.one_of(st.sampled_from(special), st.sampled_from(values))


def rope_dims(*, max_dim: int):
    """P: 0 (no rope part), DeepSeek's 64 (when in range), 2, max_dim, or any even value in
    between. Shrinks towards 0."""
    special = sorted({d for d in (2, 64, max_dim) if d <= max_dim})
    return st.one_of(st.just(0), st.sampled_from(special), st.integers(1, max_dim // 2).map(lambda h: 2 * h))


def length_edges(block_size: int, max_total: int) -> list:
    """Lengths around block boundaries and around the token tiles (16 under the interpreter, 64
    on the GPU)."""
    out = []
    for m in (block_size, 2 * block_size, 16, 32, 64, 128, 1024):
        out += [m - 1, m, m + 1]
    return sorted({n for n in out if 0 < n <= max_total})


def uniform_scales():
    """A scale other than +-1 (so applying it twice, or at the wrong step, changes the result).
    Shrinks towards 0.5."""
    return st.one_of(st.just(0.5), st.builds(lambda sign, e, m: sign * m * 2.0 ** e,
                                             st.sampled_from([1.0, -1.0]), st.integers(-4, 1),
                                             st.floats(1.0, 2.0, exclude_max=True, width=32))
                     ).filter(lambda s: abs(s) != 1.0)


@st.composite
def cases(draw, *, min_seqs: int = 0, min_total: int = 0, w_scale=None, tight: bool = False,
          sm90: Optional[bool] = None):
    """A full call of the op: B = 0 (no sequence) up to max_seqs sequences, empty ones included.
    `w_scale` fixes the scale mode; `tight` asks for a table whose highest block id holds tokens
    (the cache is then allocated with no block past it); `min_total` >= 1 makes sure some
    sequence is not empty. Shrinks towards no sequence, one head, small dims, bf16, no scales.

    On the GPU half the cases have the shapes the sm_90 kernel takes (kernels/gather_kv_b_proj_sm90:
    qk_nope and v_head_dim multiples of 64, P a multiple of 8 (16 with an fp8 cache), paddings of 16,
    L <= 512), so every
    property runs on both kernels; `sm90=True` asks for such a case with operand and output types
    that select it too (test_sm90_matches_portable), `sm90=False` for any case."""
    b = bounds()
    min_seqs = max(min_seqs, 1 if min_total else 0)
    shapes = sm90 if sm90 is not None else b["sm90_shapes"] and draw(st.booleans())
    H = draw(st.integers(1, b["max_heads"]))
    if shapes:
        # (qk = v = 64 past the interpreter's bounds: there test_sm90_matches_portable skips)
        qk = 64 * draw(st.integers(1, max(1, b["max_dim"] // 64)))
        vd = 64 * draw(st.integers(1, max(1, b["max_dim"] // 64)))
        L = draw(ranks(tuple(r for r in b["ranks"] if r <= 512)))
        P = 8 * draw(st.integers(0, b["max_rope"] // 8))
        # (16 elements: 16-byte rows for fp8 too)
        pads = st.integers(0, b["max_pad"] // 16).map(lambda n: 16 * n)
    else:
        qk = draw(kst.head_dims(max_dim=b["max_dim"]))
        vd = draw(kst.head_dims(max_dim=b["max_dim"]))
        L = draw(ranks(b["ranks"]))
        P = draw(rope_dims(max_dim=b["max_rope"]))
        pads = kst.row_pads(max_pad=b["max_pad"])
    block_size = draw(kst.block_sizes(max_block_size=b["max_block_size"]))
    cap = max(min_total, min(b["max_total"], b["max_work"] // (H * (qk + vd))))
    # now and then no sequence at all (B = 0); shrinks towards it
    no_call = min_seqs == 0 and draw(st.integers(0, 15)) == 0
    lens = [] if no_call else draw(kst.seq_lens(max_total=cap, max_seqs=b["max_seqs"], min_seqs=max(min_seqs, 1),
                                                edges=length_edges(block_size, cap)))
    if sum(lens) < min_total:
        lens[-1] += min_total - sum(lens)
    # (the draws keep their order from before the sm_90 shapes, so the interpreter's cases stay)
    seed, spare_refs, share_prefix = draw(kst.seeds()), draw(st.booleans()), draw(st.booleans())
    extra_blocks = 0 if tight else draw(st.integers(0, b["max_extra_blocks"]))
    if sm90 is True:
        types = draw(SM90_TYPES)
        if types["cache_dtype"] == kst.FP8_NAME:
            P -= P % 16  # fp8 rows of L + P bytes start 16-byte aligned
    else:
        types = dict(cache_dtype=draw(st.sampled_from(CACHE_DTYPES)), w_dtype=draw(st.sampled_from(WEIGHT_DTYPES)),
                     w_scale=w_scale or draw(st.sampled_from(W_SCALES)))
    kv_scale = draw(kst.quant_scales(min_exp=-6, max_exp=2))
    magnitude = draw(st.sampled_from([1.0, 8.0]))
    if sm90 is not True:
        types["out_dtype"] = draw(st.sampled_from(OUT_DTYPES))
    return Case(
        seed=seed, lens=lens, H=H, qk=qk, vd=vd, L=L, P=P, block_size=block_size, spare_refs=spare_refs,
        share_prefix=share_prefix, extra_blocks=extra_blocks, tight=tight, **types, kv_scale=kv_scale,
        magnitude=magnitude,
        index_dtype=draw(st.sampled_from(["int32", "int64"])),
        row_pad=draw(pads),
        block_pad=draw(pads),
        w_pad=draw(pads),
    )


@dataclass
class Inputs:
    args: tuple              # kv_cache, kv_indptr, kv_indices, cu_kv_lens, w_kv_b
    kwargs: dict             # kv_lora_rank, qk_nope_head_dim, v_head_dim, w_scale, kv_scale, out_dtype
    cache: Guarded           # kv_cache's buffer (cache.tensor is args[0])
    w_scale: Optional[Guarded]
    held: torch.Tensor       # [num_blocks, block_size] bool (CPU): slots holding some token
    tables: List[list]       # block ids of each sequence (spare entries included)
    lens: List[int]

    @property
    def kv_cache(self) -> torch.Tensor:
        return self.args[0]

    def call(self, fn, *args, **changes):
        return fn(*(args or self.args), **{**self.kwargs, **changes})

    def tensors(self) -> dict:
        """Every tensor argument by name (for Unchanged)."""
        names = ("kv_cache", "kv_indptr", "kv_indices", "cu_kv_lens", "w_kv_b")
        out = dict(zip(names, self.args))
        out.update({k: v for k, v in self.kwargs.items() if isinstance(v, torch.Tensor)})
        return out

    def sequence_args(self, b: int) -> tuple:
        """The arguments of a call on sequence b alone (same cache, its own table)."""
        cache, indptr, indices, cu, w = self.args
        lo, hi = int(indptr[b]), int(indptr[b + 1])
        dev, idt = indptr.device, indptr.dtype
        return (cache, torch.tensor([0, hi - lo], dtype=idt, device=dev), indices[lo:hi].clone(),
                torch.tensor([0, self.lens[b]], dtype=cu.dtype, device=dev), w)

    def token_rows(self) -> torch.Tensor:
        """[total, L + P] the cache row each output token reads, in the cache's dtype (CPU)."""
        cache = self.kv_cache.cpu()
        bs = cache.shape[1]
        rows = [cache[blk[j // bs], j % bs] for blk, n in zip(self.tables, self.lens) for j in range(n)]
        if not rows:
            return cache.new_zeros((0, cache.shape[2]))
        return torch.stack(rows)


def nan_bits(dtype: torch.dtype) -> torch.Tensor:
    """The bit pattern of NaN in `dtype`, as the integer type of its width (masked fills are not
    implemented for fp8, so NaN is written through an integer view)."""
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[torch.empty((), dtype=dtype).element_size()]
    return torch.tensor([float("nan")]).to(dtype).view(ints), ints


def fill_nan_(x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> None:
    """x[mask] = NaN (all of x without a mask), for any float dtype, fp8 included."""
    bits, ints = nan_bits(x.dtype)
    view = x.view(ints)
    if mask is None:
        view.fill_(int(bits))
    else:
        view[mask.to(x.device).expand(x.shape)] = int(bits)


def _tables(case, gen):
    """(the table of each sequence as block numbers 0..n-1 before they are permuted into ids, n).

    Sequence b needs ceil(len / bs) blocks, plus one spare entry past its length when spare_refs
    (drawn per sequence). With share_prefix, its first k full blocks are the previous sequence's
    first k full blocks (k drawn), as a prefix cache shares them: the same block holds the same
    tokens for both."""
    bs = case.block_size
    tables, fresh = [], 0
    for b, n in enumerate(case.lens):
        need = -(-n // bs)
        if case.spare_refs and bool(torch.rand(1, generator=gen) < 0.5):
            need += 1
        shared = []
        if case.share_prefix and b > 0:
            full = min(n // bs, case.lens[b - 1] // bs)
            k = int(torch.randint(0, full + 1, (1,), generator=gen)) if full else 0
            shared = tables[-1][:k]
        own = list(range(fresh, fresh + need - len(shared)))
        fresh += len(own)
        tables.append(shared + own)
    return tables, fresh


def build(case, device=None, *, poison: Optional[str] = None) -> Inputs:
    """The call's tensors from the case. poison="outside": every element of the cache's buffer
    outside the view (stride gaps, guard bands) is NaN; poison="unheld": besides, every slot row
    that holds no token (tails of last blocks, spare table entries, unreferenced blocks) is NaN.
    A read of any of them that reaches an output makes it NaN; the held rows are the same bits
    with or without poison."""
    device = device or backend.DEVICE
    gen = builders.generator(case.seed)
    H, qk, vd, L, P, bs = case.H, case.qk, case.vd, case.L, case.P, case.block_size
    N = H * (qk + vd)
    tables, fresh = _tables(case, gen)
    num_blocks = fresh + case.extra_blocks
    # block ids: a random permutation of the table's slots; with `tight`, the last block of the
    # last non-empty sequence takes the highest id (no block after it is allocated)
    perm = torch.randperm(max(num_blocks, 1), generator=gen).tolist()
    if case.tight and any(case.lens):
        b = max(i for i, n in enumerate(case.lens) if n > 0)
        slot = tables[b][-(-case.lens[b] // bs) - 1]
        top = perm.index(num_blocks - 1)
        perm[top], perm[slot] = perm[slot], perm[top]
    tables = [[perm[i] for i in t] for t in tables]
    held = torch.zeros((max(num_blocks, 1), bs), dtype=torch.bool)
    for t, n in zip(tables, case.lens):
        for j in range(n):
            held[t[j // bs], j % bs] = True
    held = held[:num_blocks]

    # the cache: [num_blocks, bs, L + P], slot rows row_pad apart, blocks block_pad apart
    cdt = builders.dtype(case.cache_dtype)
    values = torch.randn((num_blocks, bs, L + P), generator=gen) * case.magnitude
    row = L + P + case.row_pad
    strides = (bs * row + case.block_pad, row, 1)
    cache = Guarded((num_blocks, bs, L + P), cdt, device, gen, strides=strides, fill=values.to(cdt))
    if poison is not None:
        if poison not in ("outside", "unheld"):
            raise ValueError(f"poison: expected None, 'outside' or 'unheld', got {poison!r}")
        fill_nan_(cache.buffer)
        cache.tensor.copy_(values.to(cdt).to(device))
        if poison == "unheld":
            fill_nan_(cache.tensor, ~held[:, :, None])
        cache.before = cache.buffer.clone()

    indptr = builders.cu_seqlens([len(t) for t in tables], device, dtype_name=case.index_dtype)
    indices = torch.tensor([i for t in tables for i in t], dtype=builders.dtype(case.index_dtype), device=device)
    cu = builders.cu_seqlens(case.lens, device, dtype_name=case.index_dtype)

    w = builders.padded_rows(N, L, case.w_pad, case.w_dtype, gen, device)
    ws = None
    if case.w_scale != "none":
        shape = (N,) if case.w_scale == "row" else (-(-N // SCALE_BLOCK), -(-L // SCALE_BLOCK))
        sign = torch.where(torch.rand(shape, generator=gen) < 0.2, -1.0, 1.0)
        vals = sign * 2.0 ** (-4.0 * torch.rand(shape, generator=gen))     # |w_scale| in (1/16, 1]
        # guard bands wide enough for a kernel that indexes the block rows by head
        ws = Guarded(shape, torch.float32, device, gen, guard=64 + H * shape[-1], fill=vals)
    kwargs = dict(kv_lora_rank=L, qk_nope_head_dim=qk, v_head_dim=vd,
                  w_scale=ws.tensor if ws is not None else None,
                  kv_scale=builders.scale_tensor(case.kv_scale, device),
                  out_dtype=builders.dtype(case.out_dtype))
    return Inputs((cache.tensor, indptr, indices, cu, w), kwargs, cache, ws, held, tables, list(case.lens))


def permuted(x: Inputs, seed: int) -> Inputs:
    """The same call with the cache's blocks moved by a random permutation (unreferenced blocks
    included) and kv_indices renumbered to match: block i's contents now live at block perm[i]."""
    cache, indptr, indices, cu, w = x.args
    nb = cache.shape[0]
    perm = torch.randperm(nb, generator=builders.generator(seed))
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(nb)
    x.cache.tensor.copy_(x.cache.tensor[inv.to(cache.device)].clone())
    x.cache.before = x.cache.buffer.clone()
    new_indices = perm.to(indices.device)[indices.long()].to(indices.dtype)
    held = x.held[inv]
    tables = [[int(perm[i]) for i in t] for t in x.tables]
    return Inputs((x.cache.tensor, indptr, new_indices, cu, w), x.kwargs, x.cache, x.w_scale, held, tables, x.lens)
