#!/usr/bin/env bash
# Issue 4 on one H100: build the CUTLASS sm_90a GEMMs, run their GPU tests, and measure them beside
# the Triton kernels and cuBLAS (benchmarks/kernel_bench.py --cutlass), writing the dispatch table.
# Each PART fits one <= 9-minute call, the build included (one shared library per instance, built in
# parallel on first use).  The build is cached in $FQ_CACHE_DIR (default .fqcache/ in the repo,
# git-ignored), which the warm machine keeps between calls.
#
#   bash benchmarks/device/cutlass.sh test            # build (timed) + GPU tests + table5 shape
#   bash benchmarks/device/cutlass.sh bench 13B       # the OPT-13B shapes
#   bash benchmarks/device/cutlass.sh bench 30B,66B   # the OPT-30B/66B shapes
#   bash benchmarks/device/cutlass.sh check           # nvcc -c of every instance only (no GPU needed)
#
# Needs .whl/nvidia_cutlass-4.2.0.0-py3-none-any.whl (the C++ headers; installed with --no-deps).
# Results under $OUT: cutlass-<part>.log, kernels-cutlass-<part>.md (rewritten after every case),
# gemm_table-<part>.json (the dispatch table entries measured in this call).  Merge the parts on any
# machine with:
#   python benchmarks/kernel_bench.py --merge-tables gemm_table-*.json --write-table fq_compile/kernels/gemm_table.json
set -euo pipefail
cd "$(dirname "$0")/../.."

PART=${1:-test}
SHAPES=${2:-}
MS=${MS:-1,16,256,4096,16384}
LIMIT=${LIMIT:-500}            # seconds for the benchmark: stop before the 10-minute call limit
OUT=${OUT:-/tmp/fq-cutlass}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export FQ_CACHE_DIR=${FQ_CACHE_DIR:-$PWD/.fqcache}
if ! python3 -c "import importlib.util as u, sys; sys.exit(u.find_spec('cutlass_library') is None)" 2>/dev/null; then
  compgen -G ".whl/nvidia_cutlass-*.whl" >/dev/null || { echo "no .whl/nvidia_cutlass-*.whl" >&2; exit 2; }
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/nvidia_cutlass-*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
TAG=${PART}${SHAPES:+-${SHAPES//,/_}}
LOG=$OUT/cutlass-$TAG.log
exec > >(tee -a "$LOG") 2>&1
echo "== $(date -u +%H:%M:%S) part=$PART shapes=${SHAPES:-default} ms=$MS"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader || true
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
nvcc --version | tail -1

if [[ $PART == check ]]; then
  time python3 -m fq_compile.kernels.cutlass.gemm --nvcc-check --jobs "$(nproc)"
  exit
fi

echo "== build (what a bf16 model needs on first use)"
time python3 -m fq_compile.kernels.cutlass.gemm --build --dtypes bf16

bench() {  # $1: shapes (substrings of benchmarks/kernel_bench.py SHAPES names)
  timeout --signal=INT "$LIMIT" python3 benchmarks/kernel_bench.py --cutlass --cutlass-only --no-fp8-variant \
    --shapes "$1" --ms "$MS" --out "$OUT/kernels-cutlass-$TAG.md" --write-table "$OUT/gemm_table-$TAG.json" \
    || echo "benchmark stopped (status $?): the files under \$OUT hold the cases finished"
}

case $PART in
  test)
    echo "== GPU tests"
    time python3 -m pytest -q -m gpu tests/kernels/test_dispatch.py -p no:cacheprovider 2>&1 | tail -40 || true
    echo "== benchmark table5"
    bench "${SHAPES:-table5}"
    ;;
  bench)
    [[ -n $SHAPES ]] || { echo "bench needs shapes, e.g. 13B or 30B,66B" >&2; exit 2; }
    bench "$SHAPES"
    ;;
  *) echo "unknown part $PART (test | bench SHAPES | check)" >&2; exit 2;;
esac
echo "== done $(date -u +%H:%M:%S)"
