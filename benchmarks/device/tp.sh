#!/usr/bin/env bash
# Tensor-parallel benchmark of issue 16 on the 2-GPU kind (nvidia-h200-x2), split into calls that each
# fit the 10-minute limit: every python run is capped by `timeout` and --time-limit, and rows are
# appended to $OUT/tp.jsonl as each point finishes, so a call cut short still returns what it measured.
# Run from the repo root, one device call per PART (each stays under the 10-minute cap):
#
#   OUT=$OUT bash benchmarks/device/tp.sh PART
#
# or, where no per-call cap applies, every part in the order below (~45-60 min):
#
#   OUT=$OUT bash benchmarks/device/tp.sh all
#
# PARTs, in priority order (times are estimates until the first run; most of each is building the
# model and compiling it once per method; `check` first, it catches a broken path in minutes):
#   check         GPU test of TP=2 under Inductor + NCCL (tests/test_tensor_parallel.py -m gpu) and
#                 every method on a tiny OPT over 2 GPUs and on 1 GPU, prefill + decode        ~3-4 min
#   66b-prefill   OPT-66B shape, prefill 8 x 2048, TP=2: fp16 eager, FlattenQuant O3          ~6-9 min
#   66b-decode    OPT-66B, decode batch 1 and 16 (generate, static KV cache), TP=2: O3, fp16 Inductor
#                 (the fp16 baseline that matters for decode: eager DTensor dispatch costs per op)  ~6-9 min
#   66b-1gpu      OPT-66B on ONE GPU: O3 prefill 8 x 2048 + decode batch 1, then fp16 eager (fits?) ~6-9 min
#   66b-more      OPT-66B prefill TP=2: fp16 Inductor, FlattenQuant O1; decode batch 1: fp16 eager ~6-9 min
#   30b           OPT-30B shape, TP=2: fp16 Inductor and O3, prefill 8 x 2048 + decode batch 1 ~6-9 min
#   30b-more      OPT-30B: fp16 eager and O1 TP=2, O3 on one GPU, prefill + decode batch 1    ~6-9 min
# Afterwards, on any machine with tabulate:
#   python benchmarks/tp.py --report <every tp.jsonl> --results-dir benchmarks/results
set -euo pipefail
cd "$(dirname "$0")/../.."
PART=${1:?usage: tp.sh PART|all (see the header)}
if [ "$PART" = all ]; then
  for p in check 66b-prefill 66b-decode 66b-1gpu 66b-more 30b 30b-more; do
    bash benchmarks/device/tp.sh "$p" || echo "part $p exited with $?"
  done
  exit 0
fi
OUT=${OUT:-tp-out}
mkdir -p "$OUT"
# NVLink multicast stays off on this host (device docs, KINDS.md): NCCL, PyTorch symmetric memory, NVSHMEM
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>&1 | tail -2
fi
export PYTHONPATH=$PWD:/tmp/site:${PYTHONPATH:-}
LIMIT=${LIMIT:-540}                        # hard stop for one python run, seconds
TP="torchrun --standalone --nproc-per-node 2"
tp()  { timeout "$LIMIT" $TP benchmarks/tp.py --out "$OUT" --time-limit $((LIMIT - 90)) "$@" \
          || echo "tp.py (TP=2) exited with $?"; }
one() { timeout "$LIMIT" python3 benchmarks/tp.py --out "$OUT" --time-limit $((LIMIT - 90)) "$@" \
          || echo "tp.py (1 GPU) exited with $?"; }

nvidia-smi --query-gpu=index,name,memory.used,memory.total --format=csv | tee -a "$OUT/tp-$PART.log" || true
case $PART in
  check)       LIMIT=240 timeout 240 python3 -m pytest -q -rA -m gpu -p no:cacheprovider tests/test_tensor_parallel.py \
                 || echo "gpu test exited with $?"
               LIMIT=150 tp --models tiny --methods all --batches 2 --seqs 64 --decode 1 --new-tokens 8 --reps 3
               LIMIT=120 one --models tiny --methods fp16-eager,fq-O3 --batches 2 --seqs 64 --decode 1 --new-tokens 8 \
                 --reps 3 ;;
  66b-prefill) tp --models 66b --methods fp16-eager,fq-O3 --batches 8 --seqs 2048 ;;
  66b-decode)  tp --models 66b --methods fq-O3,fp16-inductor --batches '' --decode 1,16 ;;
  66b-1gpu)    one --models 66b --methods fq-O3,fp16-eager --batches 8 --seqs 2048 --decode 1 ;;
  66b-more)    LIMIT=330 tp --models 66b --methods fp16-inductor,fq-O1 --batches 8 --seqs 2048
               LIMIT=200 tp --models 66b --methods fp16-eager --batches '' --decode 1 ;;
  30b)         tp --models 30b --methods fp16-inductor,fq-O3 --batches 8 --seqs 2048 --decode 1 ;;
  30b-more)    LIMIT=300 tp --models 30b --methods fp16-eager,fq-O1 --batches 8 --seqs 2048 --decode 1
               LIMIT=230 one --models 30b --methods fq-O3 --batches 8 --seqs 2048 --decode 1 ;;
  *) echo "unknown PART $PART" >&2; exit 2 ;;
esac 2>&1 | tee -a "$OUT/tp-$PART.log"
