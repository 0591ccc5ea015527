#!/usr/bin/env bash
# One GPU session in one command: facts, the test suite (./ci/test) and/or every benchmark, with a
# short table last. Usage (repository root, on the GPU machine):
#   bench/gpu_run.sh tests|bench|all [extra pytest args]
# Writes logs, JUnit XML, bench JSON lines and the Triton cache (tgz) to $OUT when it is set.
# BENCH_OPS picks the benchmarks; BENCH_ARGS_<op> (else BENCH_ARGS) and BENCH_TIMEOUT_<op> (else
# BENCH_TIMEOUT, 150 s) set one op's arguments and time limit.
set -uo pipefail
what=${1:-all}; shift || true
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
out=${OUT:-/tmp/kernelfuzz-out}; mkdir -p "$out"
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/.triton-cache}
if [ -f .triton-cache.tgz ] && [ ! -d .triton-cache ]; then tar xzf .triton-cache.tgz; fi
nvidia-smi -L
python3 -c "import torch, triton, numpy, hypothesis; print('torch', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__, 'hypothesis', hypothesis.__version__)"
if [ "$what" = tests ] || [ "$what" = all ]; then
    export KERNELFUZZ_LOG="$out/progress.log"
    timeout "${TEST_TIMEOUT:-400}" ./ci/test --junitxml="$out/junit.xml" "$@" > "$out/tests.log" 2>&1
    echo "tests exit code $?"
    echo "outcomes: $(awk '{print $1}' "$out/progress.log" | sort | uniq -c | tr '\n' ' ')"
    grep -E "^(FAILED|ERROR) " "$out/progress.log" | head -60
    sort -k2 -rn "$out/progress.log" | grep -E "^[A-Z]+ +[0-9.]+s" | head -8
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
    export BENCH_OUT="$out/bench.jsonl"
    for op in ${BENCH_OPS:-qkv_norm_rope_cache mla_decode gather_kv_b_proj kda}; do
        [ -f "bench/$op.py" ] || continue
        echo "== bench $op"
        args_var="BENCH_ARGS_$op"; limit_var="BENCH_TIMEOUT_$op"
        timeout "${!limit_var:-${BENCH_TIMEOUT:-150}}" python3 -m "bench.$op" ${!args_var:-${BENCH_ARGS:-}} \
            > "$out/bench-$op.log" 2>&1
        echo "exit code $?"; tail -"${BENCH_TAIL:-25}" "$out/bench-$op.log"
    done
fi
tar czf "$out/triton-cache.tgz" -C "$(dirname "$TRITON_CACHE_DIR")" "$(basename "$TRITON_CACHE_DIR")" 2>/dev/null
[ -f "$out/tests.log" ] && tail -3 "$out/tests.log"
