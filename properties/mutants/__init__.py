"""Deliberately broken implementations, registered like any other implementation.

Each module names its OP and a MUTANTS table: name -> (function, properties that must fail on it,
the planted bug). The mutant gate (properties/test_mutants.py) runs every listed property against
its mutant and requires a failure, so no property is a check that cannot fail.

Replay one by hand, e.g.:
    ./ci/test properties/test_qkv_norm_rope_cache.py --impl qkv_norm_rope_cache=wrap_invalid_slots
"""
