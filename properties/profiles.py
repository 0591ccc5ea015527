"""Hypothesis profiles, registered here and loaded explicitly by conftest.py.

- dev: quick, random, local database.
- premerge: derandomized (a fixed seed, PREMERGE_SEED, unless --hypothesis-seed is given),
  bounded examples, the database read-only: it replays what the nightly campaign found without
  recording anything. Hypothesis's own derandomize=True would disable the database, so the
  fixed seed is forced instead (`force_seed`).
- nightly: random, many examples, writable database, target() phase on.

Hypothesis loads its own 'ci' profile when the CI variable is set; `load()` always runs after
that, so one of ours is in force. deadline is off everywhere: the first call of a shape JIT-compiles.
"""
import os

from hypothesis import HealthCheck, Phase, settings
from hypothesis.database import DirectoryBasedExampleDatabase, ReadOnlyDatabase

DB_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".hypothesis", "examples")
SLOW = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.differing_executors]
PROFILES = ("dev", "premerge", "nightly")

settings.register_profile(
    "dev", deadline=None, max_examples=20, suppress_health_check=SLOW, print_blob=True)
settings.register_profile(
    "premerge", deadline=None, max_examples=25, suppress_health_check=SLOW,
    database=ReadOnlyDatabase(DirectoryBasedExampleDatabase(DB_DIR)), print_blob=True)
settings.register_profile(
    "nightly", deadline=None, max_examples=400, derandomize=False, suppress_health_check=SLOW,
    database=DirectoryBasedExampleDatabase(DB_DIR), print_blob=True,
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink, Phase.explain])


PREMERGE_SEED = 20260601


def force_seed(seed) -> None:
    """What --hypothesis-seed does: every test draws from this seed."""
    from hypothesis import core
    core.global_force_seed = seed


def default_profile() -> str:
    return os.environ.get("KERNELFUZZ_PROFILE") or ("premerge" if os.environ.get("CI") else "dev")


def load(name=None) -> str:
    name = name or default_profile()
    if name not in PROFILES:
        raise ValueError(f"hypothesis profile: expected one of {PROFILES}, got {name!r}")
    settings.load_profile(name)
    scale = os.environ.get("KERNELFUZZ_MAX_EXAMPLES")
    if scale:
        settings.register_profile(name + "+", settings.get_profile(name), max_examples=int(scale))
        settings.load_profile(name + "+")
    return name
