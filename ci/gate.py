"""The pre-merge gate: the whole suite under the premerge profile, in parallel."""
import os
import sys

import pytest

from ci import workers


def main(argv) -> int:
    os.environ.setdefault("KERNELFUZZ_PROFILE", "premerge")
    args = list(argv)
    if "--case" in " ".join(args) or any(a.startswith("-n") for a in args):
        parallel = []
    else:
        parallel = ["-n", str(workers.count())]
    return pytest.main(parallel + ["--durations=10"] + args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
