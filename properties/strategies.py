"""Hypothesis strategies for kernel cases: scalars only (tensors come from a seed, see builders).

Conventions (as hypothesis's own strategy code): keyword-only `min_*`/`max_*` bounds validated
first, with messages naming the bad value; each docstring says which way examples shrink.
"""
import math

from hypothesis import strategies as st

from properties import backend

DTYPE_NAMES = ("bfloat16", "float16", "float32")
FP8_NAME = "float8_e4m3fn"


def _check_bounds(lo_name: str, lo, hi_name: str, hi) -> None:
    if lo > hi:
        raise ValueError(f"Cannot have {hi_name}={hi} < {lo_name}={lo}")


def seeds():
    """A 32-bit seed for the torch.Generator that builds the tensors. Shrinks towards 0."""
    return st.integers(0, 2**32 - 1)


def token_counts(*, max_tokens: int, min_tokens: int = 0):
    """Token counts with 0 and 1 drawn often. Shrinks towards min_tokens."""
    _check_bounds("min_tokens", min_tokens, "max_tokens", max_tokens)
    edges = [n for n in (0, 1, 2) if min_tokens <= n <= max_tokens]
    return st.one_of(st.sampled_from(edges), st.integers(min_tokens, max_tokens)) if edges \
        else st.integers(min_tokens, max_tokens)


def head_counts(*, max_kv_heads: int, max_ratio: int, max_heads: int = None, min_kv_heads: int = 1):
    """(num_heads, num_kv_heads) with num_heads % num_kv_heads == 0: ratio 1 (MHA) and large
    ratios (MQA-like) both reachable. Shrinks towards (min_kv_heads, min_kv_heads)."""
    _check_bounds("min_kv_heads", min_kv_heads, "max_kv_heads", max_kv_heads)
    if max_ratio < 1:
        raise ValueError(f"Cannot have max_ratio={max_ratio} < 1")

    @st.composite
    def draw_counts(draw):
        kvh = draw(st.integers(min_kv_heads, max_kv_heads))
        top = max_ratio if max_heads is None else max(1, min(max_ratio, max_heads // kvh))
        ratio = draw(st.one_of(st.just(1), st.just(top), st.integers(1, top)))
        return kvh * ratio, kvh

    return draw_counts()


def even_dims(*, min_dim: int = 2, max_dim: int):
    """Even sizes, powers of two and not. Shrinks towards min_dim."""
    _check_bounds("min_dim", min_dim, "max_dim", max_dim)
    pow2 = [d for d in (2 ** k for k in range(1, 11)) if min_dim <= d <= max_dim]
    return st.one_of(st.sampled_from(pow2), st.integers(min_dim // 2 + min_dim % 2, max_dim // 2).map(lambda h: 2 * h)) \
        if pow2 else st.integers(min_dim // 2 + min_dim % 2, max_dim // 2).map(lambda h: 2 * h)


def rotary_dims(head_dim: int):
    """Rotary dims for a head: full, half, 2, or any even value in [2, head_dim]. Shrinks towards full."""
    if head_dim < 2 or head_dim % 2:
        raise ValueError(f"Cannot draw rotary dims for odd or tiny head_dim={head_dim}")
    return st.one_of(st.just(head_dim), st.just(max(2, (head_dim // 4) * 2)), st.just(2),
                     st.integers(1, head_dim // 2).map(lambda h: 2 * h))


def block_sizes(*, max_block_size: int, min_block_size: int = 1):
    """Page/block sizes: powers of two and odd ones. Shrinks towards min_block_size."""
    _check_bounds("min_block_size", min_block_size, "max_block_size", max_block_size)
    pow2 = [b for b in (1, 2, 4, 8, 16, 32, 64, 128) if min_block_size <= b <= max_block_size]
    return st.one_of(st.sampled_from(pow2), st.integers(min_block_size, max_block_size))


def rope_bases():
    """RoPE bases: the usual 1e4 / 5e5 / 1e6 and any in [10, 1e7]. Shrinks towards 1e4."""
    return st.one_of(st.sampled_from([10000.0, 500000.0, 1000000.0]),
                     st.floats(1.0, 7.0).map(lambda e: float(10.0 ** e)))


def quant_scales(*, allow_none: bool = True, min_exp: int = -14, max_exp: int = 8):
    """A finite, nonzero float32 scale, negative allowed, from tiny (values saturate the fp8
    range) to large (values fall into fp8 subnormals); or None (= 1). Shrinks towards None, then 1."""
    _check_bounds("min_exp", min_exp, "max_exp", max_exp)
    finite = st.builds(lambda sign, e, m: sign * m * 2.0 ** e,
                       st.sampled_from([1.0, -1.0]), st.integers(min_exp, max_exp),
                       st.floats(1.0, 2.0, exclude_max=True, width=32))
    finite = st.one_of(st.just(1.0), finite)
    return st.one_of(st.none(), finite) if allow_none else finite


def float_dtypes():
    """Activation dtypes: all three; the interpreter rounds bf16 exactly through kernels' cast_to."""
    return st.sampled_from(DTYPE_NAMES)


def cache_dtypes():
    """Cache dtypes, fp8 included. Shrinks towards bfloat16."""
    return st.sampled_from(DTYPE_NAMES + (FP8_NAME,))


def row_pads(*, max_pad: int = 8):
    """Extra elements per row beyond the width (non-contiguous views). Shrinks towards 0."""
    return st.one_of(st.just(0), st.integers(1, max_pad))


def fractions():
    """A fraction in [0, 1] with 0 and 1 reachable. Shrinks towards 0."""
    return st.one_of(st.just(0.0), st.just(1.0), st.floats(0.0, 1.0))


def slot_plans():
    """How a slot mapping mixes valid slots, -1 padding, large negative and >= capacity slots,
    and duplicates (fractions; tensors come from the seed). Shrinks towards all valid, distinct."""
    return st.fixed_dictionaries({
        "p_invalid": fractions(),
        "p_duplicate": st.one_of(st.just(0.0), fractions()),
        "invalid_kinds": st.sampled_from(["minus1", "capacity", "mixed"]),
    })


def pick(*, interpreter, cuda):
    """Shorthand for backend.pick in strategy bounds."""
    return backend.pick(interpreter=interpreter, cuda=cuda)


def log_uniform_ints(lo: int, hi: int):
    """Integers in [lo, hi], log-uniformly spread (small lengths and thousands both common)."""
    _check_bounds("lo", lo, "hi", hi)
    return st.floats(math.log(max(lo, 1)), math.log(max(hi, 1))).map(lambda x: max(lo, min(hi, int(math.exp(x)))))


def head_dims(*, max_dim: int, min_dim: int = 1):
    """Head sizes: powers of two and any other value (odd included). Shrinks towards min_dim."""
    _check_bounds("min_dim", min_dim, "max_dim", max_dim)
    pow2 = [d for d in (2 ** k for k in range(0, 11)) if min_dim <= d <= max_dim]
    return st.one_of(st.sampled_from(pow2), st.integers(min_dim, max_dim)) if pow2 \
        else st.integers(min_dim, max_dim)


def _fit_total(lens, max_total):
    out, left = [], max_total
    for n in lens:
        out.append(min(n, left))
        left -= out[-1]
    return out


def seq_lens(*, max_total: int, max_seqs: int, min_seqs: int = 1, edges=()):
    """Lengths of packed sequences (varlen): a list of min_seqs..max_seqs lengths whose sum is at
    most max_total (later ones are clipped), with 0 (empty sequences) and `edges` (e.g. around a
    chunk size) drawn often. Shrinks towards [0] * min_seqs."""
    _check_bounds("min_seqs", min_seqs, "max_seqs", max_seqs)
    _check_bounds("0", 0, "max_total", max_total)
    one = token_counts(max_tokens=max_total)
    near = [n for n in edges if 0 <= n <= max_total]
    if near:
        one = st.one_of(one, st.sampled_from(near))
    return st.lists(one, min_size=min_seqs, max_size=max_seqs).map(lambda lens: _fit_total(lens, max_total))
