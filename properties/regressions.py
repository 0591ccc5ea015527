"""The regression corpus: failing cases kept as plain JSON, replayed by a plain test every run.

properties/regressions/<op>.json holds a list of entries
    {"property": "test_equivalence", "case": {...}, "why": "..."}
with the case's scalars and seed only, so entries survive hypothesis upgrades and test edits
(a case key the strategy no longer draws is an error, not silently ignored).
"""
import json
import os

FOLDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "regressions")


def path(op: str) -> str:
    return os.path.join(FOLDER, f"{op}.json")


def load(op: str) -> list:
    if not os.path.exists(path(op)):
        return []
    with open(path(op)) as f:
        return json.load(f)


def ops() -> list:
    return sorted(n[:-5] for n in os.listdir(FOLDER) if n.endswith(".json"))


def add(op: str, prop: str, case: dict, why: str) -> bool:
    """Append an entry unless the same (property, case) is already kept. True if added."""
    entries = load(op)
    if any(e["property"] == prop and e["case"] == case for e in entries):
        return False
    entries.append({"property": prop, "case": case, "why": why})
    with open(path(op) + ".tmp", "w") as f:
        json.dump(entries, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(path(op) + ".tmp", path(op))
    return True
