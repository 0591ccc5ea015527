"""Small Triton helpers shared by the kernels: interpreter detection and exact output casts.

The Triton CPU interpreter (TRITON_INTERPRET=1) converts float32 to bfloat16 by truncation and
loses the exponent carry when rounding float32 to float8e4nv (1.97 becomes 1.0). Both casts are
exact when the value is already representable in the target format, so under the interpreter
`cast_to` first rounds to nearest-even in float32 by integer arithmetic on the bits, then casts.
On the GPU the hardware conversion (round to nearest even) is used unchanged.
"""
import os

import triton
import triton.language as tl

FP8_MAX = tl.constexpr(448.0)  # largest finite float8_e4m3fn value: 1.75 * 2**8 (constexpr: usable in kernels)


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def round_bits(x, DROP: tl.constexpr, TIES_EVEN: tl.constexpr = True):
    """float32 x rounded to nearest with 23 - DROP mantissa bits kept (DROP = 13: tf32); ties to
    even, or away from zero with TIES_EVEN off (two integer operations fewer, for hot loops where
    any rounding to nearest will do)."""
    b_bits = x.to(tl.uint32, bitcast=True)
    if TIES_EVEN:
        b_bits = b_bits + ((1 << (DROP - 1)) - 1) + ((b_bits >> DROP) & 1)
    else:
        b_bits = b_bits + (1 << (DROP - 1))
    b_bits = (b_bits >> DROP) << DROP
    return b_bits.to(tl.float32, bitcast=True)


@triton.jit
def cast_to(x, dtype: tl.constexpr, EXACT_ROUNDING: tl.constexpr):
    """Cast a float32 block to `dtype` with round-to-nearest-even.

    EXACT_ROUNDING (set under the interpreter) rounds in float32 first so that the cast is exact.
    fp8 inputs must already be clamped to +-FP8_MAX by the caller.
    """
    if EXACT_ROUNDING:
        if dtype == tl.bfloat16:
            x = round_bits(x, 16)
        elif dtype == tl.float8e4nv:
            # normal numbers keep 3 mantissa bits; below 2**-6 the spacing is fixed at 2**-9
            b_norm = round_bits(x, 20)
            b_sub = ((x * 512.0 + 12582912.0) - 12582912.0) * 0.001953125  # 12582912 = 1.5 * 2**23
            x = tl.where(tl.abs(x) < 0.015625, b_sub, b_norm)
    return x.to(dtype)
