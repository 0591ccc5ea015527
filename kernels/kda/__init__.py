"""Kimi Delta Attention forward (grouped value heads): chunked prefill and token-by-token forms."""
from kernels.kda.chunk import chunk_kda
from kernels.kda.fused_recurrent import fused_recurrent_kda

__all__ = ["chunk_kda", "fused_recurrent_kda"]
