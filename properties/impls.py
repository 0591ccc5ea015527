"""The built-in implementations: production kernels and the mutants of properties/mutants/."""
import importlib
import pkgutil

from properties import registry

PRODUCTION = {
    "qkv_norm_rope_cache": {"triton": "kernels.qkv_norm_rope_cache:qkv_norm_rope_cache"},
    "kda": {"chunk": "kernels.kda:chunk_kda", "fused_recurrent": "kernels.kda:fused_recurrent_kda"},
    "mla_decode": {"triton": "kernels.mla_decode:mla_decode"},
    "gather_kv_b_proj": {"triton": "kernels.gather_kv_b_proj:gather_kv_b_proj"},
}


def register_all() -> None:
    for op, impls in PRODUCTION.items():
        for name, target in impls.items():
            registry.register(op, name, target)
    from properties import mutants
    for info in pkgutil.iter_modules(mutants.__path__):
        module = importlib.import_module(f"properties.mutants.{info.name}")
        for name, (target, kills, why) in getattr(module, "MUTANTS", {}).items():
            registry.register(module.OP, name, f"{module.__name__}:{target}", kind="mutant",
                              kills=kills, why=why)
