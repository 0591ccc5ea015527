"""Entry points behind ./ci/test (the gate) and ./ci/campaign (the fuzz campaign)."""
