#!/usr/bin/env bash
# Issue 13 on one Hopper GPU (H200 or H100): prefill at its best by default.  Every PART fits one
# <= 9-minute call of the device tool (each python run is capped by `timeout` and e2e.py's
# --time-limit; rows are appended to $OUT/e2e.jsonl as each point finishes, so a call cut short still
# returns what it measured) and ends with a short table.  Run from the repo root, carrying .whl
# (nvidia-cutlass, torchao and tabulate wheels) and, after the first call, .fqcache (the CUTLASS
# libraries built there; the warm machine keeps it between calls anyway):
#
#   OUT=$OUT bash benchmarks/device/prefill.sh PART
#
# PARTs, in the order to run them (minutes are estimates until measured):
#   build         time the CUTLASS first-use build a user gets (an fp16 model: 2 libraries + the API
#                 library, cache emptied first); target <= 60 s on 16 cores                       ~1-2
#   readme        OPT-13B 8 x 2048 at default settings (README's prefill column, issue 24): fp16 eager,
#                 naive FP8, O1 and auto at O1's beta-3 flattening, O1 per-tensor, O3                ~8-9
#   batch         OPT-13B seq 2048 at batch 1 and 32 for fp16 eager, naive FP8 and O1 at beta 3 (readme's rows at
#                 batch 8 complete README's speed-vs-batch plot: e2e.py --report draws it from all three)    ~5-8
#   profile-auto  issue 24's per-block profile of `auto` (beta 3, fp8 0.19 / int8 0.81) beside O1 at beta 3 and
#                 naive FP8 (4 blocks at 8 x 2048: where auto's extra time over O1 goes)                   ~2-3
#   headline      OPT-13B 8 x 2048 in one call: fp16 eager, naive FP8, O1, O3 (default settings), fp16
#                 Inductor last (the slower fp16 at 13B on the H100; lost first if time runs out);
#                 fewer reps (warm-up 1, <= 5 timed, 3 s budget per point)                        ~7-9
#   gpu-tests-a   GPU tests of the dispatcher, the CUTLASS kernels (the 14 instances they use, one
#                 parallel round of ~1-1.5 min shared by xdist workers, none after `build`: the same
#                 FQ_CACHE_DIR) and the fused quantize                                              ~2-4
#   gpu-tests-b   GPU tests of the Triton kernels and whole models through the backend            ~5-8
#   fusion        quantize fused into each producer vs our kernel after it, and the ReLU epilogue
#                 (benchmarks/kernel_bench.py --fusion --cutlass)                                      ~4-6
#   headline-a    OPT-13B 8 x 2048: fp16 eager, fp16 Inductor, naive FP8                          ~4-5
#   headline-b    OPT-13B 8 x 2048: O1, O3 with default settings (no FQ_GEMM, no FQ_QUANTIZE)     ~5-7
#   headline-c    OPT-13B 8 x 2048: O3 with FQ_GEMM forced to cutlass, then to triton              ~5-7
#   headline-d    OPT-13B 8 x 2048: SmoothQuant-W8A8 (ours), torchao int8 / float8, auto           ~6-8
#   profile       one OPT-13B block at 8 x 2048: quantize / GEMM / attention / other ms per block,
#                 fp16 Inductor, naive FP8, O1, O3, and O3 with FQ_QUANTIZE=kernel                 ~5-7
#   o1-variants   OPT-13B 8 x 2048 (issue 24): naive FP8, then O1 at the flattening O1's default
#                 (beta 3) gives on SmolLM2 (1.3% of channels) with per-token scales (the default),
#                 per-tensor ones (the per-token cost, target <= 2%), and the quantize as our one-launch
#                 kernel instead of Inductor's fused one (FQ_QUANTIZE=kernel FQ_ROWS_KERNEL=resident), and
#                 Inductor's fused one with persistent reductions up to 8192 (FQ_PERSISTENT_REDUCTIONS)  ~7-9
#   sweep-SIZE-GROUP  OPT-SIZE (6.7b, 13b, 30b) at batch {1, 8, 32} x seq {512, 1024, 2048}, one
#                 dynamic-shape compile per method; GROUP: fp16 (eager, Inductor), fp8 (naive FP8,
#                 torchao float8), int8 (SmoothQuant, torchao int8), o1, o3 (ours)                 ~5-9
# A short table of the part's rows ends every part (python benchmarks/e2e.py --summary).  Afterwards, on
# any machine with tabulate + matplotlib, merge the fetched rows into the tables, targets and PNG:
#   python benchmarks/e2e.py --report <every fetched e2e.jsonl> --results-dir benchmarks/results
set -euo pipefail
cd "$(dirname "$0")/../.."
PART=${1:?usage: prefill.sh PART (see the header)}
OUT=${OUT:-prefill-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export FQ_CACHE_DIR=${FQ_CACHE_DIR:-$PWD/.fqcache}
LIMIT=${LIMIT:-530}                       # hard stop for one python run, seconds (the call's limit is 600)
LOG=$OUT/prefill-$PART.log
exec > >(tee -a "$LOG") 2>&1

# wheels the device lacks, installed beside torch without touching it (--no-deps)
SITE=/tmp/fq-site
for w in nvidia_cutlass torchao tabulate; do
  whl=$(compgen -G ".whl/${w}-*.whl" | head -1 || true)
  if [[ -n $whl && ! -e $SITE/.done-$w ]]; then
    python3 -m pip install -q --no-index --no-deps --target "$SITE" "$whl" && touch "$SITE/.done-$w" \
      || echo "could not install $whl"
  fi
done
export PYTHONPATH=$PWD:$SITE:${PYTHONPATH:-}

echo "== $(date -u +%F\ %T) part=$PART"
nvidia-smi --query-gpu=name,compute_cap,clocks.sm,clocks.max.sm,memory.used,memory.total --format=csv,noheader || true
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__,
                                        'cuda', torch.version.cuda)"

run() {
  timeout "$LIMIT" python3 benchmarks/e2e.py --out "$OUT" --time-limit $((LIMIT - 50)) "$@" \
    || echo "e2e.py exited with $?"
}
sweep() {  # $1 size, $2 methods
  run --models "$1" --methods "$2" --batches 8,32,1 --seqs 2048,1024,512 --dynamic true --budget 3 --reps 6
}
summary() { python3 benchmarks/e2e.py --summary "$OUT/e2e.jsonl" || true; }

case $PART in
  build)
    rm -rf "$FQ_CACHE_DIR"/cutlass-*
    echo "first use for an fp16 model (target <= 60 s on 16 cores):"
    time python3 -m fq_compile.kernels.cutlass.gemm --build --dtypes fp16
    echo "then a bf16 model:"
    python3 -m fq_compile.kernels.cutlass.gemm --build --dtypes bf16
    ls -la "$FQ_CACHE_DIR"/cutlass-*/ ;;
  gpu-tests-a)
    timeout "$LIMIT" python3 -m pytest -q -m gpu -p no:cacheprovider -rfEs \
      tests/kernels/test_dispatch.py tests/kernels/test_fused_quantize.py 2>&1 | tail -30 \
      || echo "gpu tests: status $?" ;;
  gpu-tests-b)
    XDIST=$(python3 -c "import xdist" 2>/dev/null && echo "-n 4" || true)
    timeout "$LIMIT" python3 -m pytest -q -m gpu -p no:cacheprovider -rfEs $XDIST \
      tests/kernels/test_triton.py tests/test_backend.py 2>&1 | tail -30 || echo "gpu tests: status $?" ;;
  fusion)
    timeout "$LIMIT" python3 benchmarks/kernel_bench.py --fusion --cutlass --out "$OUT/fusion.md" \
      || echo "kernel_bench.py exited with $?"
    cat "$OUT/fusion.md" 2>/dev/null || true ;;
  headline) run --models 13b --methods fp16-eager,fp8-naive,fq-O1,fq-O3,fp16-inductor --batches 8 --seqs 2048 \
              --warmup 1 --reps 5 --budget 3 ;;
  readme)
    # the README headline's prefill column and issue 24's rows at what a user gets by default: O1 and auto
    # at the flattening O1's default beta 3 gives on SmolLM2 (1.3% of channels), auto in the formats it
    # chose there (40 of 210 layers FP8, the rest INT8: accuracy-smollm2-135m-full-cpu-2026-12-07.md), O1
    # with per-tensor scales beside the per-token default (their cost, target <= 2%)
    P=(--models 13b --batches 8 --seqs 2048 --warmup 1 --reps 5 --budget 3)
    LIMIT=110 run "${P[@]}" --methods fp16-eager,fp8-naive
    LIMIT=100 run "${P[@]}" --methods fq-O1 --flatten-ratio 0.013 --label beta3
    LIMIT=100 run "${P[@]}" --methods fq-auto --auto-formats fp8=0.19,int8=0.81 --flatten-ratio 0.013 --label beta3
    LIMIT=90 run "${P[@]}" --methods fq-O1 --flatten-ratio 0.013 --label beta3-tensor --activation-scale tensor
    LIMIT=100 run "${P[@]}" --methods fq-O3 ;;
  batch)
    P=(--models 13b --batches 1,32 --seqs 2048 --warmup 1 --reps 5 --budget 3)
    LIMIT=150 run "${P[@]}" --methods fp16-eager,fp8-naive
    LIMIT=150 run "${P[@]}" --methods fq-O1 --flatten-ratio 0.013 --label beta3 ;;
  profile-auto)
    A=(--profile --models 13b --batches 8 --seqs 2048 --flatten-ratio 0.013 --label beta3)
    LIMIT=100 run --profile --models 13b --batches 8 --seqs 2048 --methods fp8-naive
    LIMIT=100 run "${A[@]}" --methods fq-O1
    LIMIT=100 run "${A[@]}" --methods fq-auto --auto-formats fp8=0.19,int8=0.81 ;;
  headline-a) run --models 13b --methods fp16-eager,fp16-inductor,fp8-naive --batches 8 --seqs 2048 ;;
  headline-b) run --models 13b --methods fq-O3,fq-O1 --batches 8 --seqs 2048 ;;
  headline-c) run --models 13b --methods fq-O3 --batches 8 --seqs 2048 --gemm cutlass
              run --models 13b --methods fq-O3 --batches 8 --seqs 2048 --gemm triton ;;
  headline-d) run --models 13b --methods smoothquant,torchao-int8,torchao-fp8,fq-auto --batches 8 --seqs 2048 ;;
  o1-variants)
    O1=(--models 13b --batches 8 --seqs 2048 --warmup 1 --reps 5 --budget 3 --methods fq-O1 --flatten-ratio 0.013)
    LIMIT=120 run --models 13b --batches 8 --seqs 2048 --warmup 1 --reps 5 --budget 3 --methods fp8-naive
    LIMIT=120 run "${O1[@]}" --label beta3
    LIMIT=100 run "${O1[@]}" --label beta3-tensor --activation-scale tensor
    FQ_QUANTIZE=kernel FQ_ROWS_KERNEL=resident LIMIT=100 run "${O1[@]}" --label beta3-resident
    FQ_PERSISTENT_REDUCTIONS=8192 LIMIT=100 run "${O1[@]}" --label beta3-persistent ;;
  profile)
    run --profile --models 13b --methods fp16-inductor,fp8-naive,fq-O1,fq-O3 --batches 8 --seqs 2048
    FQ_QUANTIZE=kernel run --profile --models 13b --methods fq-O3 --batches 8 --seqs 2048
    python3 - "$OUT/e2e.jsonl" <<'EOF'
import json, sys
from tabulate import tabulate
rows = [json.loads(l) for l in open(sys.argv[1]) if '"profile"' in l]
print(tabulate([[r["method"], r.get("total_ms"), r.get("quantize_ms", 0), r.get("GEMM_ms", 0), r.get("attention_ms", 0),
                 r.get("other_ms", 0)] for r in rows], ["method", "total", "quantize", "GEMM", "attention", "other"],
               tablefmt="github"))
print("targets per block at 8 x 2048: other <= 0.2 ms, quantize <= 0.5 ms")
EOF
    ;;
  sweep-*-*)
    IFS=- read -r _ size group <<< "$PART"
    case $group in
      fp16) sweep "$size" fp16-eager,fp16-inductor ;;
      fp8)  sweep "$size" fp8-naive,torchao-fp8 ;;
      int8) sweep "$size" smoothquant,torchao-int8 ;;
      o1)   sweep "$size" fq-O1 ;;
      o3)   sweep "$size" fq-O3 ;;
      *) echo "unknown sweep group $group (fp16, fp8, int8, o1, o3)" >&2; exit 2 ;;
    esac ;;
  *) echo "unknown PART $PART" >&2; exit 2 ;;
esac
[[ $PART == build || $PART == gpu-tests-* || $PART == fusion ]] || summary
echo "== done $(date -u +%T)"
