"""Tensors from a case: everything random comes from one seeded torch.Generator (on the CPU, then
moved), so the same case builds the same tensors on any backend."""
import torch

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
          "float8_e4m3fn": torch.float8_e4m3fn, "int32": torch.int32, "int64": torch.int64}
FP8_MAX = 448.0


def dtype(name: str) -> torch.dtype:
    return DTYPES[name]


def generator(seed: int) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(int(seed))
    return g


def randn(shape, dtype_name: str, gen: torch.Generator, device, *, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(tuple(shape), generator=gen, dtype=torch.float32) * scale).to(dtype(dtype_name)).to(device)


def padded_rows(rows: int, width: int, pad: int, dtype_name: str, gen, device, *, scale=1.0):
    """[rows, width] view of a [rows, width + pad] tensor (row stride > width when pad > 0)."""
    full = randn((rows, width + pad), dtype_name, gen, device, scale=scale)
    return full[:, :width]


def rope_table(max_pos: int, rotary_dim: int, base: float, dtype_name: str, device):
    """cos, sin [max_pos, R/2] from inverse frequencies base^(-2i/R), computed in float64
    (row 0 is exactly cos 1, sin 0)."""
    inv_freq = base ** (-torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    angles = torch.arange(max_pos, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return angles.cos().to(dtype(dtype_name)).to(device), angles.sin().to(dtype(dtype_name)).to(device)


def _extremes(dtype_name: str):
    """The most negative and most positive index the index dtype holds (+-2^40 for int64): a wild
    value must stay wild after the conversion (2^40 in int32 would wrap to the valid index 0)."""
    if dtype_name == "int32":
        return -(2**31), 2**31 - 1
    return -(2**40), 2**40


def positions(T: int, max_pos: int, p_outside: float, gen, device, *, dtype_name="int64"):
    """Positions in [0, max_pos), a fraction p_outside of them outside it (max_pos, beyond, negative)."""
    pos = torch.randint(0, max(max_pos, 1), (T,), generator=gen)
    outside = torch.rand(T, generator=gen) < p_outside
    wild = torch.tensor([max_pos, max_pos + 1, max_pos + 1000, -1, _extremes(dtype_name)[0]])
    pick = wild[torch.randint(0, wild.numel(), (T,), generator=gen)]
    return torch.where(outside, pick, pos).to(dtype(dtype_name)).to(device)


def slot_mapping(T: int, capacity: int, plan: dict, gen, device, *, dtype_name="int64"):
    """[T] slots: distinct valid slots where capacity allows, then a fraction p_duplicate replaced by
    another token's valid slot and a fraction p_invalid replaced by invalid values (-1, capacity,
    capacity + k, large negative) as plan["invalid_kinds"] says."""
    perm = torch.randperm(max(capacity, 1), generator=gen)
    if capacity >= T:
        slots = perm[:T].clone()
    else:
        slots = perm[torch.randint(0, max(capacity, 1), (T,), generator=gen)] if capacity else torch.full((T,), -1)
    if T > 1 and capacity > 0:
        dup = torch.rand(T, generator=gen) < plan["p_duplicate"]
        src = torch.randint(0, T, (T,), generator=gen)
        slots = torch.where(dup, slots[src], slots)
    invalid = (torch.rand(T, generator=gen) < plan["p_invalid"]) | torch.tensor(capacity == 0)
    low, high = _extremes(dtype_name)
    kinds = {"minus1": [-1], "capacity": [capacity, capacity + 1],
             "mixed": [-1, -2, low, capacity, capacity + 7, high]}[plan["invalid_kinds"]]
    wild = torch.tensor(kinds)[torch.randint(0, len(kinds), (T,), generator=gen)]
    slots = torch.where(invalid, wild, slots)
    return slots.to(dtype(dtype_name)).to(device)


def scale_tensor(value, device, *, shape=(1,)):
    """None or a float32 scale tensor of shape [] or [1]."""
    if value is None:
        return None
    return torch.full(shape, float(value), dtype=torch.float32, device=device)


def cu_seqlens(lens, device, *, dtype_name: str = "int32") -> torch.Tensor:
    """[len(lens) + 1] prefix sums of the sequence lengths, starting at 0."""
    out = [0]
    for n in lens:
        out.append(out[-1] + int(n))
    return torch.tensor(out, dtype=dtype(dtype_name), device=device)
