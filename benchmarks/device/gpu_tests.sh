#!/usr/bin/env bash
# The whole GPU test suite (`python -m pytest -m gpu`) in one call on the lent GPU, with a fresh
# CUTLASS build, ending with a summary (device, tree, wall time, passed/failed/skipped, the 20 slowest
# tests) that is also written to $OUT/gpu-tests-summary.md (the body of benchmarks/results/gpu-tests-*.md).
#
#   bash benchmarks/device/gpu_tests.sh      # from the repo root; carry .whl (nvidia_cutlass-*.whl)
#
# How it fits in minutes: the CUTLASS libraries the tests call are built in the background from the
# first second (one parallel nvcc round over the host's cores) while pytest-xdist runs the other GPU
# tests; tests/conftest.py hands the GPU tests out longest first, by the durations of the last full
# run (tests/gpu_durations.txt), and the CUTLASS tests last.  Every test's outcome and duration is
# appended to $OUT/gpu-tests-durations.txt as it finishes, so a run cut by LIMIT still says what ran;
# copy it over tests/gpu_durations.txt when you commit the run's record.
# Knobs: LIMIT (seconds for pytest, default 540), WORKERS (xdist workers, default 8),
# PYTEST_ARGS (extra pytest arguments, e.g. -k attention), FQ_CACHE_DIR (reuse a CUTLASS build),
# FQ_TREE (the commit to name in the record).
set -uo pipefail
cd "$(dirname "$0")/../.."
START=$(date +%s)
OUT=${OUT:-/tmp/fq-gpu-tests}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 FQ_CACHE_DIR=${FQ_CACHE_DIR:-$(mktemp -d /tmp/fq-cache.XXXX)}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>&1 | tail -2
fi
export PYTHONPATH=$PWD:/tmp/site:${PYTHONPATH:-}
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
VERSIONS=$(python3 -c "import torch, triton, transformers; print('torch', torch.__version__, '| triton', triton.__version__, '| transformers', transformers.__version__)")
# the device's copy of the tree may carry a stale .git: pass FQ_TREE=$(git rev-parse --short HEAD) from the caller
TREE=${FQ_TREE:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD -- fq_compile tests 2>/dev/null || echo "+uncommitted")}
echo "$GPU | $VERSIONS | tree $TREE | $(nproc) cores" | tee "$OUT/probe.txt"

echo "== CUTLASS build (background): the instances the GPU tests call"
( t=$(date +%s); python3 -c "from tests.kernels.test_dispatch import _build_test_instances as b; b()" \
    > "$OUT/cutlass-build.log" 2>&1; echo "exit $? after $(( $(date +%s) - t )) s" >> "$OUT/cutlass-build.log" ) &
BUILD=$!

echo "== pytest -m gpu"
# how many tests this run should report (a run cut by LIMIT after its last test still says "all N reported")
WANT=$(python3 -m pytest -m gpu --collect-only -q -p no:cacheprovider ${PYTEST_ARGS:-} 2>/dev/null \
       | grep -oE '^[0-9]+(/[0-9]+)? tests? collected' | grep -oE '^[0-9]+')
: > "$OUT/gpu-tests-durations.txt"
FQ_TEST_LOG="$OUT/gpu-tests-durations.txt" timeout "${LIMIT:-540}" python3 -m pytest -m gpu -q -rfEs \
  -p no:cacheprovider --durations=20 --durations-min=0 -n "${WORKERS:-8}" ${PYTEST_ARGS:-} > "$OUT/gpu-tests.log" 2>&1
RC=$?
wait $BUILD
WALL=$(( $(date +%s) - START ))

count() { grep -cE "^ *[0-9.]+s call +$1 " "$OUT/gpu-tests-durations.txt"; }
{
  echo "device: $GPU"
  echo "software: $VERSIONS"
  echo "tree: $TREE"
  echo "command: bash benchmarks/device/gpu_tests.sh (WORKERS=${WORKERS:-8} LIMIT=${LIMIT:-540} ${PYTEST_ARGS:-})"
  echo "date: $(date -u +%Y-%m-%dT%H:%MZ)"
  echo "wall: ${WALL} s (wheels, fresh CUTLASS build in the background, pytest; machine start excluded)"
  echo "CUTLASS build: $(tail -1 "$OUT/cutlass-build.log")"
  echo "pytest exit: $RC$([ $RC -eq 124 ] && echo ' (cut by LIMIT)')"
  echo "passed: $(count passed)  failed: $(count failed)  skipped: $(grep -cE ' skipped ' "$OUT/gpu-tests-durations.txt")  errors: $(grep -cE '^ *[0-9.]+s (setup|teardown) +failed ' "$OUT/gpu-tests-durations.txt")"
  GOT=$(grep -oE '(call|setup) +(passed|failed|skipped) +\S+' "$OUT/gpu-tests-durations.txt" | awk '{print $3}' | sort -u | wc -l)
  if [ -z "$WANT" ]; then echo "reported: $GOT tests (collected count unavailable)"
  elif [ "$GOT" -ge "$WANT" ]; then echo "reported: all $WANT collected tests"
  else echo "reported: $GOT of $WANT collected tests ($((WANT - GOT)) never reported: cut by LIMIT or crashed)"; fi
  echo
  echo "failures and skips:"
  grep -E "^(FAILED|ERROR|SKIPPED)" "$OUT/gpu-tests.log" | cut -c1-220
  echo
  echo "20 slowest:"
  sort -rn "$OUT/gpu-tests-durations.txt" | head -20
} > "$OUT/gpu-tests-summary.md"
tail -n 40 "$OUT/gpu-tests.log" | grep -vE "^(FAILED|ERROR|SKIPPED)" | tail -n 15
echo "=================== summary"
cat "$OUT/gpu-tests-summary.md"
