#!/usr/bin/env bash
# Print the Python interpreter the commands run with, setting it up on first use.
# - A machine whose python3 already has torch (seeing a GPU), triton, hypothesis, pytest, xdist,
#   and numpy uses it as it is: nothing is installed or upgraded (the GPU machine has no network).
# - Otherwise (a CPU machine) a virtual environment .venv gets a CPU build of torch and
#   numpy < 2.4 (the Triton interpreter fails on numpy >= 2.4), then the project itself.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
py=${KERNELFUZZ_PYTHON:-python3}
if "$py" -c "import torch, triton, hypothesis, pytest, xdist, numpy, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
    command -v "$py"
    exit 0
fi
venv="$root/.venv"
stamp="$venv/.kernelfuzz-$(sha1sum "$root/pyproject.toml" | cut -c1-12)"
if [ ! -f "$stamp" ]; then
    echo "kernelfuzz: setting up $venv (CPU build of torch, Triton interpreter)" >&2
    python3 -m venv "$venv" >&2
    "$venv/bin/python" -m pip install -q --disable-pip-version-check "torch==2.13.0" "numpy<2.4" -e "$root" >&2
    touch "$stamp"
fi
echo "$venv/bin/python"
