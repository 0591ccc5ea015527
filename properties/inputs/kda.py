"""Cases and inputs for kda (SPEC.md section 4): Kimi Delta Attention forward with grouped value heads.

A case names the shapes (B, T, H, HV, K, V, or packed sequence lengths `lens`), dtypes, flags and
a gate mode and a key mode; `build` makes q, k, v, g, beta (and the initial state, cu_seqlens) from
its seed. Key mode (`keys`, not drawn: set it in a --case replay): "random" (the default), or
"repeated": every key of a head is one direction plus 1% noise and beta lies in [0.8, 1), as when
a prompt repeats a token. A chunk's keys are then nearly collinear; chunk_kda's float32 error there
reaches the error budget on the CPU interpreter and, in a kept regression case, exceeds it on an H100
(bench/RESULTS.md, kda: "Repeated keys").
Without use_qk_l2norm, random keys would make the delta rule diverge (S <- (I - beta k k^T) S is
a contraction only for beta |k|^2 < 2), so k is drawn at ~0.5 / sqrt(K) per element then.
"""
from dataclasses import dataclass
from typing import Optional

import torch
from hypothesis import strategies as st

from properties import backend, builders
from properties import strategies as kst
from properties.harness import Case

CHUNK = 64  # chunk size of chunk_kda: lengths around its multiples are drawn often
GATES = ("logsigmoid", "slow", "zero", "extreme", "masked")
KEYS = ("random", "repeated")
G_MIN = -1000.0  # the most negative gate the contract requires to work


def bounds():
    """Shape bounds for the current backend. The interpreter runs one program at a time and the
    chunked form costs ~0.35 s per (chunk, value head), the recurrent ~4 ms per (token, value head):
    `max_work` caps B * HV * T (value-head tokens) so one call stays near a second or two; packed
    calls keep HV <= max_varlen_value_heads and N * HV <= max_seq_heads (the varlen property
    also runs each sequence alone)."""
    return backend.pick(
        interpreter=dict(max_batch=2, max_tokens=130, max_qk_heads=2, max_ratio=8, max_value_heads=8,
                         max_head_dim=64, max_work=260, max_seqs=4, max_varlen_value_heads=4,
                         max_seq_heads=8),
        cuda=dict(max_batch=4, max_tokens=4096, max_qk_heads=8, max_ratio=8, max_value_heads=32,
                  max_head_dim=256, max_work=32768, max_seqs=8, max_varlen_value_heads=32,
                  max_seq_heads=256))


def chunk_edges(max_tokens: int) -> list:
    """Lengths just below, at and just above the chunk boundaries up to max_tokens."""
    out = []
    for m in range(CHUNK, max_tokens + 2, CHUNK):
        out += [m - 1, m, m + 1]
    return [n for n in out if 0 < n <= max_tokens]


def tokens(*, max_tokens: int, min_tokens: int = 0):
    """T: 0, 1, 2, chunk edges, uniform and log-uniform. Shrinks towards min_tokens."""
    edges = [n for n in chunk_edges(max_tokens) if n >= min_tokens]
    parts = [kst.token_counts(max_tokens=max_tokens, min_tokens=min_tokens)]
    if edges:
        parts.append(st.sampled_from(edges))
    if max_tokens >= max(min_tokens, 1) * 4:
        parts.append(kst.log_uniform_ints(max(min_tokens, 1), max_tokens))
    return st.one_of(*parts)


def scales():
    """scale: None (K^-0.5), 1, or any finite nonzero value, negative included. Shrinks towards None."""
    some = st.builds(lambda sign, m: sign * m, st.sampled_from([1.0, -1.0]), st.floats(0.0625, 2.0, width=32))
    return st.one_of(st.none(), st.just(1.0), some)


@st.composite
def cases(draw, *, varlen: Optional[bool] = None, min_tokens: int = 0, max_tokens: Optional[int] = None,
          h0: Optional[bool] = None, final_state: Optional[bool] = None, gates=GATES, min_seqs: int = 1,
          min_qk_heads: int = 1):
    """A full call of the op. varlen None draws it; with varlen, B = 1 and T is the sum of the
    drawn lengths (`min_seqs` of them at least; empty sequences included). T >= min_tokens;
    `max_tokens` caps T below the backend bound (0: the empty call). Shrinks towards one head, small dims, T small."""
    b = bounds()
    is_varlen = draw(st.booleans()) if varlen is None else varlen
    max_hv = b["max_varlen_value_heads"] if is_varlen else b["max_value_heads"]
    HV, H = draw(kst.head_counts(max_kv_heads=b["max_qk_heads"], max_ratio=b["max_ratio"],
                                 max_heads=max_hv, min_kv_heads=min_qk_heads))
    B = 1 if is_varlen else draw(st.integers(1, b["max_batch"]))
    cap = max(min_tokens, min(b["max_tokens"], b["max_work"] // (B * HV)))
    if max_tokens is not None:
        cap = min(cap, max_tokens)
    if is_varlen:
        max_seqs = max(min_seqs, min(b["max_seqs"], b["max_seq_heads"] // HV))
        lens = draw(kst.seq_lens(max_total=cap, max_seqs=max_seqs, min_seqs=min_seqs if cap else 0,
                                 edges=chunk_edges(cap)))
        if sum(lens) < min_tokens:  # cap >= min_tokens, so lens is not empty here
            lens[-1] += min_tokens - sum(lens)
        T = sum(lens)
    else:
        lens = None
        T = draw(tokens(max_tokens=cap, min_tokens=min(min_tokens, cap)))
    return Case(
        seed=draw(kst.seeds()), B=B, T=T, H=H, HV=HV, lens=lens,
        K=draw(kst.head_dims(max_dim=b["max_head_dim"])),
        V=draw(kst.head_dims(max_dim=b["max_head_dim"])),
        dtype=draw(kst.float_dtypes()),
        beta_dtype=draw(st.sampled_from(["float32", "activation"])),
        index_dtype=draw(st.sampled_from(["int32", "int64"])),
        h0=draw(st.booleans()) if h0 is None else h0,
        final_state=draw(st.sampled_from([True, True, False])) if final_state is None else final_state,
        l2norm=draw(st.booleans()),
        scale=draw(scales()),
        gate=draw(st.sampled_from(gates)),
        layout=draw(st.sampled_from(["contiguous", "strided"])),
    )


@dataclass
class Inputs:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    g: torch.Tensor
    beta: torch.Tensor
    kwargs: dict        # scale, initial_state, output_final_state, cu_seqlens, use_qk_l2norm

    @property
    def args(self) -> tuple:
        return (self.q, self.k, self.v, self.g, self.beta)

    def tensors(self) -> dict:
        """Every tensor argument by name (for Unchanged)."""
        out = dict(q=self.q, k=self.k, v=self.v, g=self.g, beta=self.beta)
        out.update({n: t for n, t in self.kwargs.items() if isinstance(t, torch.Tensor)})
        return out

    def call(self, fn, *args, **changes):
        """fn(q, k, v, g, beta, **kwargs) with keyword arguments changed (positional ones replaced
        when `args` is given)."""
        return fn(*(args or self.args), **{**self.kwargs, **changes})

    def sequences(self) -> list:
        """(batch row, first token, end token, state index) of each sequence."""
        cu = self.kwargs["cu_seqlens"]
        if cu is None:
            return [(b, 0, self.q.shape[1], b) for b in range(self.q.shape[0])]
        c = [int(x) for x in cu.tolist()]
        return [(0, c[i], c[i + 1], i) for i in range(len(c) - 1)]


def gates(mode: str, shape, gen) -> torch.Tensor:
    """float32 natural-log decays <= 0 of the given mode:
    logsigmoid: logsigmoid(1.5 x + 1), mostly in (-3, 0); slow: in (-0.05, 0] (long memory);
    zero: no decay; extreme: logsigmoid with ~30% of entries in [-1000, -20] and some whole tokens
    at -1000; masked: every entry exactly 0 or -1000 (exp gives exactly 1 or 0)."""
    x = torch.randn(shape, generator=gen)
    if mode == "zero":
        return torch.zeros(shape)
    if mode == "slow":
        return -0.05 * torch.rand(shape, generator=gen)
    base = torch.nn.functional.logsigmoid(1.5 * x + 1.0)
    if mode == "logsigmoid":
        return base
    rows = torch.rand(shape[:-1], generator=gen)[..., None] < 0.1   # whole tokens wiped
    if mode == "extreme":
        deep = G_MIN + (-20.0 - G_MIN) * torch.rand(shape, generator=gen)
        hit = torch.rand(shape, generator=gen) < 0.3
        return torch.where(rows, torch.full(shape, G_MIN), torch.where(hit, deep, base))
    if mode == "masked":
        hit = torch.rand(shape, generator=gen) < 0.15
        return torch.where(rows | hit, torch.full(shape, G_MIN), torch.zeros(shape))
    raise ValueError(f"gate: expected one of {GATES}, got {mode!r}")


def repeated_keys(k: torch.Tensor, gen) -> torch.Tensor:
    """[B, T, H, K] keys: one random direction per head (unit length) plus 1% noise, times
    sqrt(K) (the length of a random row). Drawn after every other tensor, so the other tensors of
    a seed do not change."""
    B, T, H, K = k.shape
    # [H, K]
    base = torch.randn((H, K), generator=gen)
    base = base / base.norm(dim=-1, keepdim=True)
    return (base + 0.01 * torch.randn((B, T, H, K), generator=gen)) * K ** 0.5


def build(case, device=None) -> Inputs:
    device = device or backend.DEVICE
    gen = builders.generator(case.seed)
    B, T, H, HV, K, V = case.B, case.T, case.H, case.HV, case.K, case.V
    act = builders.dtype(case.dtype)
    k_scale = 1.0 if case.l2norm else 0.5 / K ** 0.5
    q = torch.randn((B, T, H, K), generator=gen)
    k = torch.randn((B, T, H, K), generator=gen) * k_scale
    v = torch.randn((B, T, HV, V), generator=gen)
    g = gates(case.gate, (B, T, HV, K), gen)
    beta = torch.rand((B, T, HV), generator=gen)
    N = len(case.lens) if case.lens is not None else B
    h0 = torch.randn((N, HV, K, V), generator=gen) if case.h0 else None
    if case.get("keys", "random") == "repeated":
        k = repeated_keys(k, gen) * k_scale
        beta = 0.8 + 0.2 * beta
    bdt = torch.float32 if case.beta_dtype == "float32" else act
    if case.layout == "strided":
        # q, k, v: head-dim slices of one fused projection row (row stride > width); g, beta and the
        # initial state stored head-major / V-major and seen through permuted views
        W = 2 * H * K + HV * V + 3
        fused = torch.zeros((B, T, W), dtype=act)
        fused[..., :H * K] = q.flatten(2).to(act)
        fused[..., H * K:2 * H * K] = k.flatten(2).to(act)
        fused[..., 2 * H * K:2 * H * K + HV * V] = v.flatten(2).to(act)
        fused = fused.to(device)
        q_, k_ = fused[..., :H * K].unflatten(2, (H, K)), fused[..., H * K:2 * H * K].unflatten(2, (H, K))
        v_ = fused[..., 2 * H * K:2 * H * K + HV * V].unflatten(2, (HV, V))
        g_ = g.permute(0, 2, 1, 3).contiguous().to(device).permute(0, 2, 1, 3)
        beta_ = beta.to(bdt).permute(0, 2, 1).contiguous().to(device).permute(0, 2, 1)
        h0_ = h0.transpose(2, 3).contiguous().to(device).transpose(2, 3) if h0 is not None else None
    else:
        q_, k_, v_ = q.to(act).to(device), k.to(act).to(device), v.to(act).to(device)
        g_, beta_ = g.to(device), beta.to(bdt).to(device)
        h0_ = h0.to(device) if h0 is not None else None
    cu = builders.cu_seqlens(case.lens, device, dtype_name=case.index_dtype) if case.lens is not None else None
    kwargs = dict(scale=case.scale, initial_state=h0_, output_final_state=case.final_state,
                  cu_seqlens=cu, use_qk_l2norm=case.l2norm)
    return Inputs(q_, k_, v_, g_, beta_, kwargs)
