"""The mutant gate: every property must be seen failing on a planted bug.

For each registered mutant and each property it names in `kills`, the property runs on the
mutant (derandomized, no shrinking) and must fail through a check (AssertionError or pytest's
fail). A mutant that survives, or one that crashes instead of being caught, fails this test.
"""
import importlib

import pytest
from hypothesis import HealthCheck, Phase, given, settings

from properties import backend, registry
from properties.harness import run_case

MUTANT_EXAMPLES = backend.pick(interpreter=60, cuda=200)


def _cases():
    out = []
    for op in registry.ops():
        for m in registry.implementations(op, kinds=("mutant",)):
            for prop in m.kills:
                out.append(pytest.param(m, prop, id=f"{op}-{m.name}-{prop}"))
    return out


def test_every_property_has_a_mutant():
    """Each property test of each op is named by at least one mutant's kills."""
    for op in registry.ops():
        module = importlib.import_module(f"properties.test_{op}")
        props = {n for n, f in vars(module).items() if n.startswith("test_") and hasattr(f, "kf_body")}
        killed = {p for m in registry.implementations(op, kinds=("mutant",)) for p in m.kills}
        missing = sorted(props - killed)
        assert not missing, f"{op}: properties never seen failing on a mutant: {missing}"
        unknown = sorted(killed - props)
        assert not unknown, f"{op}: mutants name properties that do not exist: {unknown}"


@pytest.mark.parametrize("mutant,prop", _cases())
def test_mutant_is_killed(mutant, prop):
    module = importlib.import_module(f"properties.test_{mutant.op}")
    test = getattr(module, prop)

    @settings(max_examples=MUTANT_EXAMPLES, phases=[Phase.generate], database=None, deadline=None,
              derandomize=True, suppress_health_check=list(HealthCheck), report_multiple_bugs=False)
    @given(case=test.kf_strategy)
    def attack(case):
        run_case(test.kf_body, mutant, case)

    try:
        attack()
    except (AssertionError, pytest.fail.Exception):
        return
    pytest.fail(f"mutant {mutant.name} ({mutant.why}) survived {prop} over {MUTANT_EXAMPLES} examples")


@pytest.mark.parametrize("op", registry.ops())
def test_oracle_validation_is_checked(op, monkeypatch):
    """The plant for each op's test_oracle_rejects_bad_input: oracle validation that checks
    nothing (oracles._validate.need made a no-op) must make that test fail."""
    import oracles._validate
    module = importlib.import_module(f"properties.test_{op}")
    monkeypatch.setattr(oracles._validate, "need", lambda cond, exc, msg: None)
    with pytest.raises(AssertionError, match="no error raised"):
        module.test_oracle_rejects_bad_input()
