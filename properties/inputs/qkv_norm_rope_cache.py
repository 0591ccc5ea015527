"""Cases and inputs for qkv_norm_rope_cache (SPEC.md section 1)."""
from dataclasses import dataclass
from typing import Optional

import torch
from hypothesis import strategies as st

from properties import backend, builders
from properties import strategies as kst
from properties.guard import Guarded
from properties.harness import Case


def bounds():
    """Shape bounds for the current backend (the interpreter runs one program at a time)."""
    return backend.pick(
        interpreter=dict(max_tokens=20, max_kv_heads=3, max_ratio=4, max_head_dim=48,
                         max_block_size=8, max_blocks=6, max_pos=24),
        cuda=dict(max_tokens=512, max_kv_heads=8, max_ratio=8, max_head_dim=256,
                  max_block_size=64, max_blocks=32, max_pos=8192))


@st.composite
def cases(draw, *, slot_plan=None, duplicates: bool = True, cache_dtype=None, min_tokens: int = 0):
    """A full call of the op. `slot_plan` (a strategy) overrides the slot mix; duplicates=False
    keeps valid slots distinct (for properties whose result would depend on which duplicate wins)."""
    b = bounds()
    T = draw(kst.token_counts(max_tokens=b["max_tokens"], min_tokens=min_tokens))
    qh, kvh = draw(kst.head_counts(max_kv_heads=b["max_kv_heads"], max_ratio=b["max_ratio"]))
    D = draw(kst.even_dims(min_dim=2, max_dim=b["max_head_dim"]))
    R = draw(kst.rotary_dims(D))
    plan = draw(slot_plan if slot_plan is not None else kst.slot_plans())
    if not duplicates:
        plan = {**plan, "p_duplicate": 0.0}
    block_size = draw(kst.block_sizes(max_block_size=b["max_block_size"]))
    num_blocks = draw(st.integers(1, b["max_blocks"]))
    if not duplicates:  # room for every token in a distinct slot
        num_blocks = max(num_blocks, -(-T // block_size))
    return Case(
        seed=draw(kst.seeds()), T=T, qh=qh, kvh=kvh, D=D, R=R,
        is_neox=draw(st.booleans()),
        dtype=draw(kst.float_dtypes()),
        weight_dtype=draw(kst.float_dtypes()),
        table_dtype=draw(st.sampled_from(["float32", "activation"])),
        cache_dtype=cache_dtype or draw(kst.cache_dtypes()),
        layout=draw(st.sampled_from(["NHD", "HND"])),
        gate=draw(st.sampled_from([None, "interleaved", "blocked"])),
        block_size=block_size, num_blocks=num_blocks,
        max_pos=draw(st.integers(1, b["max_pos"])),
        p_pos_outside=draw(st.one_of(st.just(0.0), kst.fractions())),
        base=draw(kst.rope_bases()),
        k_scale=draw(kst.quant_scales()), v_scale=draw(kst.quant_scales()),
        magnitude=draw(st.sampled_from([1.0, 4.0, 300.0])),
        eps=draw(st.sampled_from([1e-6, 1e-5, 0.0])),
        norm_weight_offset=draw(st.sampled_from([0.0, 1.0])),
        row_pad=draw(kst.row_pads()),
        index_dtype=draw(st.sampled_from(["int64", "int32"])),
        **plan,
    )


@dataclass
class Inputs:
    args: tuple             # positional arguments, in contract order
    kwargs: dict            # keyword arguments
    key_cache: Guarded
    value_cache: Guarded
    qkv: Guarded
    capacity: int

    def read_only(self) -> dict:
        """The inputs other than qkv and the caches (which are guarded), by argument name."""
        names = ("qkv", "q_norm_weight", "k_norm_weight", "cos", "sin", "positions",
                 "key_cache", "value_cache", "slot_mapping")
        out = {n: a for n, a in zip(names, self.args) if n not in ("qkv", "key_cache", "value_cache")}
        out.update({k: v for k, v in self.kwargs.items() if isinstance(v, torch.Tensor)})
        return out

    def call(self, impl):
        return impl(*self.args, **self.kwargs)


def width(case) -> int:
    return ((2 * case.qh if case.gate else case.qh) + 2 * case.kvh) * case.D


def cache_shape(case, layout: Optional[str] = None):
    layout = layout or case.layout
    if layout == "NHD":
        return (case.num_blocks, case.block_size, case.kvh, case.D)
    return (case.num_blocks, case.kvh, case.block_size, case.D)


def build(case, device=None, *, layout: Optional[str] = None) -> Inputs:
    device = device or backend.DEVICE
    layout = layout or case.layout
    g = builders.generator(case.seed)
    T, D, W = case.T, case.D, width(case)
    act = builders.dtype(case.dtype)
    # qkv: a [T, W] view of rows W + row_pad long, inside guard bands
    values = torch.randn((T, W), generator=g) * case.magnitude
    qkv = Guarded((T, W), act, device, g, strides=(W + case.row_pad, 1), fill=values.to(act))
    qw = builders.randn((D,), case.weight_dtype, g, device, scale=0.5) + (0.0 if case.norm_weight_offset else 1.0)
    kw = builders.randn((D,), case.weight_dtype, g, device, scale=0.5) + (0.0 if case.norm_weight_offset else 1.0)
    table = "float32" if case.table_dtype == "float32" else case.dtype
    cos, sin = builders.rope_table(case.max_pos, case.R, case.base, table, device)
    positions = builders.positions(T, case.max_pos, case.p_pos_outside, g, device, dtype_name=case.index_dtype)
    capacity = case.num_blocks * case.block_size
    plan = {k: case[k] for k in ("p_invalid", "p_duplicate", "invalid_kinds")}
    slots = builders.slot_mapping(T, capacity, plan, g, device, dtype_name=case.index_dtype)
    cdt = builders.dtype(case.cache_dtype)
    shape = cache_shape(case, layout)
    # a guard band as large as the cache on each side: a kernel that mixes up strides or takes
    # slot == capacity as valid writes into it (and is caught) instead of corrupting the process
    numel = case.num_blocks * case.block_size * case.kvh * D
    kc = Guarded(shape, cdt, device, g, guard=max(64, numel))
    vc = Guarded(shape, cdt, device, g, guard=max(64, numel))
    kwargs = dict(num_q_heads=case.qh, num_kv_heads=case.kvh, head_dim=D, rotary_dim=case.R,
                  is_neox=case.is_neox, eps=case.eps, norm_weight_offset=case.norm_weight_offset,
                  gate=case.gate, cache_layout=layout,
                  k_scale=builders.scale_tensor(case.k_scale, device),
                  v_scale=builders.scale_tensor(case.v_scale, device))
    args = (qkv.tensor, qw, kw, cos, sin, positions, kc.tensor, vc.tensor, slots)
    return Inputs(args, kwargs, kc, vc, qkv, capacity)


def written_rows(inputs: Inputs) -> torch.Tensor:
    """[num_blocks, block_size] (NHD order) bool: slots some token writes."""
    slots = inputs.args[8].long().cpu()
    valid = slots[(slots >= 0) & (slots < inputs.capacity)]
    hit = torch.zeros(inputs.capacity, dtype=torch.bool)
    hit[valid] = True
    return hit


def cache_rows(cache: torch.Tensor, layout: str) -> torch.Tensor:
    """The cache as [capacity, kvh, D] rows, slot order."""
    nhd = cache if layout == "NHD" else cache.transpose(1, 2)
    return nhd.reshape(-1, nhd.shape[2], nhd.shape[3])


def row_mask(inputs: Inputs, layout: str) -> torch.Tensor:
    """Bool mask over the cache tensor marking the rows of written slots."""
    hit = written_rows(inputs)
    nb = inputs.key_cache.tensor.shape[0]
    per_block = hit.reshape(nb, -1)  # [nb, bs]
    if layout == "NHD":
        return per_block[:, :, None, None]
    return per_block[:, None, :, None]
