"""The kernelfuzz harness: strategies, builders, the error budget, poison/guard, the registry."""
