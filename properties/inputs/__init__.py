"""Per-op case strategies and tensor builders: `cases(**bounds)` draws a Case, `build(case)`
makes the call's tensors from it (deterministically: building twice gives equal tensors)."""
