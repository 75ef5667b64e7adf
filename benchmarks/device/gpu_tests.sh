#!/usr/bin/env bash
# The whole GPU test suite (`python -m pytest -m gpu`) on the lent GPU, with the CUTLASS build timed
# first, plus a probe of what the machine has (torchao, CPU int8 instructions).  One call, <= 9 min.
#
#   bash benchmarks/device/gpu_tests.sh            # from the repo root; needs .whl/nvidia_cutlass-*.whl
#
# Output under $OUT: gpu-tests.log (pytest -rA), cutlass-build.log, probe.txt; the CUTLASS library is
# copied to $OUT so a later call can carry it (.fqcache/cutlass-<hash>/) instead of building again.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/fq-gpu-tests}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 FQ_CACHE_DIR=${FQ_CACHE_DIR:-$PWD/.fqcache}
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH=$PWD:/tmp/site:${PYTHONPATH:-}
{
  date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'cc', torch.cuda.get_device_capability(), 'sms', torch.cuda.get_device_properties(0).multi_processor_count)"
  grep -o -w -E 'avx512_vnni|avx_vnni|amx_int8|avx512f' /proc/cpuinfo | sort | uniq -c; nproc
  python3 -c "import torchao, torch; print('torchao', torchao.__version__)" 2>&1 | tail -1
  python3 - <<'PY'
import time, torch
from fq_compile.kernels.int_gemm import int_matmul_reference
a = torch.randint(-127, 128, (512, 576), dtype=torch.int8); b = torch.randint(-127, 128, (1536, 576), dtype=torch.int8)
def t(f, n=5):
    f(); s = time.perf_counter()
    for _ in range(n): f()
    return (time.perf_counter() - s) / n * 1e3
print(f"CPU 512x576x1536 int8: torch._int_mm {t(lambda: torch._int_mm(a, b.t().contiguous()), 3):.1f} ms, "
      f"float32 chunks (ours) {t(lambda: int_matmul_reference(a, b)):.1f} ms, threads {torch.get_num_threads()}")
PY
} 2>&1 | tee "$OUT/probe.txt"
echo "== CUTLASS build"
( time python3 -m fq_compile.kernels.cutlass.gemm --build ) 2>&1 | tee "$OUT/cutlass-build.log" | tail -4
cp "$FQ_CACHE_DIR"/cutlass-*/fq_cutlass_*.so "$OUT/" 2>/dev/null || true
echo "== pytest -m gpu"
timeout "${LIMIT:-420}" python3 -m pytest -m gpu -q -rA -p no:cacheprovider ${PYTEST_ARGS:--n 4} > "$OUT/gpu-tests.log" 2>&1
echo "pytest exit $?"
grep -E "^(FAILED|ERROR)" "$OUT/gpu-tests.log" | cut -c1-300 | head -40
grep -cE "^PASSED" "$OUT/gpu-tests.log" | sed "s/^/passed: /"
tail -3 "$OUT/gpu-tests.log"
