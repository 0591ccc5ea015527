"""A fuzz campaign: every op's properties under the nightly profile, on every GPU (or the CPU
interpreter), with a fresh random seed. Each shrunk failure of a production implementation is
added to properties/regressions/<op>.json, so it is replayed by every later test run.
"""
import argparse
import glob
import json
import os
import random
import sys
import time
import xml.etree.ElementTree as ET

import pytest

from ci import workers


def parse(argv):
    p = argparse.ArgumentParser(prog="ci/campaign", description=__doc__)
    p.add_argument("--examples", type=int, default=None,
                   help="max_examples per property (default: 300 on GPUs, 25 on the interpreter)")
    p.add_argument("--seed", type=int, default=None, help="hypothesis seed (default: random, printed)")
    p.add_argument("--ops", nargs="*", default=None, help="ops to fuzz (default: all)")
    p.add_argument("--no-record", action="store_true", help="do not add failures to the corpus")
    return p.parse_args(argv)


def main(argv) -> int:
    args = parse(argv)
    n = workers.count()
    on_gpu = "TRITON_INTERPRET" not in os.environ and n > 0 and _has_gpu()
    examples = args.examples or (300 if on_gpu else 25)
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = os.path.join(".kernelfuzz", f"campaign-{stamp}")
    os.makedirs(out, exist_ok=True)
    os.environ.update(KERNELFUZZ_PROFILE="nightly", KERNELFUZZ_MAX_EXAMPLES=str(examples),
                      KERNELFUZZ_FAILURES=os.path.join(os.path.abspath(out), "failures"))
    from properties import registry
    ops = args.ops or registry.ops()
    files = [f"properties/test_{op}.py" for op in ops]
    print(f"kernelfuzz campaign: ops {', '.join(ops)}; {examples} examples per property; seed {seed}; "
          f"{n} worker(s); results in {out}", flush=True)
    junit = os.path.join(out, "junit.xml")
    code = pytest.main(["-n", str(n), "-q", f"--hypothesis-seed={seed}", f"--junitxml={junit}", "-p", "no:cacheprovider"] + files)
    added = [] if args.no_record else _record(os.environ["KERNELFUZZ_FAILURES"])
    _summary(junit, added, seed)
    return int(code)


def _has_gpu() -> bool:
    import torch
    return torch.cuda.is_available()


def _record(folder: str) -> list:
    from properties import regressions
    added = []
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        with open(path) as f:
            e = json.load(f)
        if regressions.add(e["op"], e["property"], e["case"], f"campaign: {e['error']}"):
            added.append(e)
    return added


def _summary(junit: str, added: list, seed: int) -> None:
    rows = {}
    if os.path.exists(junit):
        for case in ET.parse(junit).getroot().iter("testcase"):
            op = case.get("classname", "").rpartition(".")[2].removeprefix("test_")
            prop = case.get("name", "")
            status = "failed" if case.find("failure") is not None or case.find("error") is not None else (
                "skipped" if case.find("skipped") is not None else "passed")
            r = rows.setdefault(op, {"passed": 0, "failed": 0, "skipped": 0, "seconds": 0.0, "failing": []})
            r[status] += 1
            r["seconds"] += float(case.get("time", 0))
            if status == "failed":
                r["failing"].append(prop)
    cols = ("op", "passed", "failed", "seconds", "new regressions", "failing properties")
    body = [(op, str(r["passed"]), str(r["failed"]), f"{r['seconds']:.0f}",
             str(sum(1 for e in added if e["op"] == op)), ", ".join(r["failing"])) for op, r in sorted(rows.items())]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # the GPU machine may lack rich: plain text
        print(f"kernelfuzz campaign (seed {seed})")
        for row in (cols,) + tuple(body):
            print("  ".join(row))
        return
    table = Table(title=f"kernelfuzz campaign (seed {seed})")
    for col in cols:
        table.add_column(col, no_wrap=(col == "op"))
    for row in body:
        table.add_row(*row)
    Console().print(table)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
