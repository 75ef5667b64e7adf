#!/usr/bin/env bash
# End-to-end benchmark of issue 5 on one H100, split into calls that each fit the 10-minute limit
# (each python run is capped by `timeout` and --time-limit; rows are appended to $OUT/e2e.jsonl as
# every point finishes, so a call cut short still returns what it measured).  Run from the repo root:
#
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
#   PYTHONUNBUFFERED=1 bash benchmarks/device/e2e.sh PART
#
# PARTs, in priority order (wall times are estimates until the first run; most of each is compiling
# a 40-layer model once per method):
#   gpu-check    every method, prefill + decode + profile on a tiny OPT, and the GPU tests of
#                tests/test_resident.py: catches a broken path before the big compiles              ~2-3 min
#   headline-a   OPT-13B shape, prefill 8 x 2048: fp16 eager, fp16 Inductor, naive FP8           ~5-7 min
#   headline-b   OPT-13B shape, prefill 8 x 2048: FlattenQuant O3, O1                             ~5-7 min
#   headline-c   OPT-13B shape, prefill 8 x 2048: SmoothQuant-W8A8 (ours), torchao int8 / float8   ~6-8 min
#   decode-a     OPT-13B decode batch 1 (generate, KV cache): fp16 eager, fp16 Inductor            ~4-6 min
#   decode-b     OPT-13B decode batch 1: FlattenQuant O3                                           ~4-6 min
#   profile      one OPT-13B decoder layer at 8 x 2048, kernel time by category, 5 methods         ~3-4 min
#   sweep-13b-a  OPT-13B prefill, batch {1,8,32} x seq {512,1024,2048}: fp16 Inductor, fq-O3       ~8-9 min
#   sweep-13b-b  the same for fp16 eager, naive FP8, fq-O1                                         ~8-9 min
#   sweep-30b    OPT-30B prefill, batch {1,8} x seq {512,2048}: fp16 eager, fq-O3                  ~8-9 min
#   decode-more  OPT-13B decode batch 16 and 64: fp16 eager, fq-O3                                 ~6-8 min
#   formats      issue 11: OPT-13B prefill 8 x 2048: our static FP8 level and auto (AUTO_FORMATS=
#                "fp8=..,w4a8=..,int8=..,int4=..": the shares an auto plan chose; its accuracy table
#                lists them), beside naive FP8                                                       ~6-8 min
#   formats-decode  issue 11: OPT-13B decode batch 1: fq-fp8, fq-auto, naive FP8                       ~6-8 min
# Afterwards, here or on any machine with tabulate + matplotlib:
#   python benchmarks/e2e.py --report <every e2e.jsonl> --results-dir benchmarks/results
set -euo pipefail
cd "$(dirname "$0")/../.."
PART=${1:?usage: e2e.sh PART (see the header)}
OUT=${OUT:-e2e-out}
mkdir -p "$OUT"
LIMIT=${LIMIT:-560}                       # hard stop for one python run, seconds
run() { timeout "$LIMIT" python3 benchmarks/e2e.py --out "$OUT" --time-limit $((LIMIT - 60)) "$@" || echo "e2e.py exited with $?"; }

nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,memory.used,memory.total --format=csv | tee -a "$OUT/e2e-$PART.log" || true
case $PART in
  headline-a)  run --models 13b --methods fp16-eager,fp16-inductor,fp8-naive --batches 8 --seqs 2048 ;;
  headline-b)  run --models 13b --methods fq-O3,fq-O1 --batches 8 --seqs 2048 ;;
  headline-c)  run --models 13b --methods smoothquant,torchao-int8,torchao-fp8 --batches 8 --seqs 2048 ;;
  decode-a)    run --models 13b --methods fp16-eager,fp16-inductor --batches '' --decode 1 ;;
  decode-b)    run --models 13b --methods fq-O3 --batches '' --decode 1 ;;
  profile)     run --profile --models 13b --methods fp16-inductor,fp8-naive,smoothquant,fq-O1,fq-O3 --batches 8 --seqs 2048 ;;
  sweep-13b-a) run --models 13b --methods fp16-inductor,fq-O3 --batches 8,32,1 --seqs 512,1024,2048 --budget 4 ;;
  sweep-13b-b) run --models 13b --methods fp16-eager,fp8-naive,fq-O1 --batches 8,32,1 --seqs 512,1024,2048 --budget 4 ;;
  sweep-30b)   run --models 30b --methods fp16-eager,fq-O3 --batches 8,1 --seqs 512,2048 --budget 4 ;;
  decode-more) run --models 13b --methods fp16-eager,fq-O3 --batches '' --decode 16,64 ;;
  formats)     run --models 13b --methods fp8-naive,fq-fp8,fq-auto --auto-formats "${AUTO_FORMATS:?set AUTO_FORMATS}" \
                   --batches 8 --seqs 2048 ;;
  formats-decode) run --models 13b --methods fp8-naive,fq-fp8,fq-auto --auto-formats "${AUTO_FORMATS:?set AUTO_FORMATS}" \
                   --batches '' --decode 1 ;;
  gpu-check)   python3 -m pytest -q -m gpu tests/test_resident.py -p no:cacheprovider || echo "gpu tests failed"
               run --models tiny --methods all --auto-formats fp8=0.4,w4a8=0.4,int8=0.2 --batches 2,4 --seqs 64 \
                   --decode 1 --prompt 16 --new-tokens 8
               run --profile --models tiny --methods fp16-inductor,fp8-naive,fq-O3 --batches 2 --seqs 64 ;;
  smoke)       run --smoke --decode 1 ;;
  *) echo "unknown PART $PART" >&2; exit 2 ;;
esac 2>&1 | tee -a "$OUT/e2e-$PART.log"
