"""Replay the regression corpus (properties/regressions/*.json) on every implementation."""
import importlib

import pytest

from properties import registry, regressions
from properties.harness import Case, run_case


def _entries():
    out = []
    for op in regressions.ops():
        for i, e in enumerate(regressions.load(op)):
            for impl in registry.implementations(op):
                out.append(pytest.param(op, e, impl, id=f"{op}-{i}-{e['property']}-{impl.name}"))
    return out


@pytest.mark.parametrize("op,entry,implementation", _entries())
def test_regression(op, entry, implementation):
    module = importlib.import_module(f"properties.test_{op}")
    prop = getattr(module, entry["property"])
    run_case(prop.kf_body, implementation, Case(entry["case"]))
