#!/usr/bin/env bash
# Full-split WikiText-2 accuracy tables of issue 6 on one CUDA GPU (H100): all levels and ablations
# over the whole test split (--ppl-tokens 0: 147 windows of 2048 tokens on SmolLM2-135M), the model
# in float32 (its dequantized GGUF weights are the fp baseline; the quantized linears run the fq::
# INT8/INT4 ops on their GPU kernels, everything else stays fp32).  By default the rewritten graphs
# run without Inductor around the fq:: ops (same integer arithmetic, no per-row compile time: every
# row calibrates and compiles afresh); pass --inductor for the fused path.  Planning (MSE clips,
# Eq. 8 KL, GPTQ's column loop) runs on the CPU.  Each PART is meant for one <= 9-minute call,
# in this order of importance:
#
#   bash benchmarks/device/accuracy.sh levels    [--model M] [--data-dir D] [--dtype float32|bfloat16] [--inductor]
#                                                      # fp, w8a8, smoothquant, O1, O2, O3 (Tables 3/4)
#   bash benchmarks/device/accuracy.sh gamma-low ...   # O3 at gamma 1.82, 1.84 (Table 10; 1.86 is the O3 row)
#   bash benchmarks/device/accuracy.sh gamma-high ...  # O3 at gamma 1.88, 1.90
#   bash benchmarks/device/accuracy.sh ablations ...   # O1: smoothing none / smoothquant, outlier clip off, beta 1.1-1.5
#   bash benchmarks/device/accuracy.sh select ...      # the chosen defaults vs alternatives, 16 held-out *validation* windows
#   bash benchmarks/device/accuracy.sh formats-a ...   # issue 11: fp, the two fake-quant peers, naive FP8, w8a8, smoothquant, O1
#   bash benchmarks/device/accuracy.sh formats-b ...   # issue 11: O2, O3, auto (error budget 1.0), auto (memory budget 0.40)
#   bash benchmarks/device/accuracy.sh zeroshot-a ...  # issue 11: zero-shot (piqa, arc_easy, openbookqa, hellaswag) of fp, peers, fp8, w8a8, smoothquant
#   bash benchmarks/device/accuracy.sh zeroshot-b ...  # issue 11: zero-shot of O1, O2, O3, auto, auto (memory 0.40)
#
# SET="weight_scale=channel" (env) adds --set to the issue-11 parts (every level row).
# Defaults: --model .gguf/SmolLM2-135M-Instruct.Q4_1.gguf --data-dir .data (WikiText-2 in the layout
# of /work/shared/data).  Results go to $OUT/accuracy-<part>.md and .json, rewritten after every row,
# so a call cut short still returns the rows it finished; the log is $OUT/accuracy-<part>.log.
set -euo pipefail
cd "$(dirname "$0")/../.."

PART=${1:-levels}
shift || true
MODEL=.gguf/SmolLM2-135M-Instruct.Q4_1.gguf
DATA=.data
DTYPE=float32
INDUCTOR=0
LIMIT=${LIMIT:-530}           # seconds: stop before the 10-minute call limit, keeping the rows done
while [[ $# -gt 0 ]]; do
  case $1 in
    --model) MODEL=$2; shift 2;;
    --data-dir) DATA=$2; shift 2;;
    --dtype) DTYPE=$2; shift 2;;
    --inductor) INDUCTOR=1; shift;;
    *) echo "unknown argument $1" >&2; exit 2;;
  esac
done
OUT=${OUT:-/tmp/fq-accuracy}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ! python3 -c "import gguf" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
[[ -f $MODEL ]] || { echo "no model file at $MODEL" >&2; exit 2; }
[[ -f $DATA/wikitext-2-raw/wiki.test.raw && -f $DATA/wikitext-2/valid.txt ]] || { echo "WikiText-2 missing under $DATA" >&2; exit 2; }

COMMON=(--model "$MODEL" --data-dir "$DATA" --dtype "$DTYPE" --device cuda)
[[ $INDUCTOR == 1 ]] || COMMON+=(--no-inductor)
case $PART in
  levels)    ARGS=(--ppl-tokens 0 --levels w8a8,smoothquant,O1,O2,O3 --rows "" --peers "" --no-ablations);;
  ablations) ARGS=(--ppl-tokens 0 --levels "" --rows "" --peers "" --ablation-base O1 --gamma-base "");;
  gamma-low) ARGS=(--ppl-tokens 0 --levels "" --peers "" --no-ablations --rows "O3 gamma=1.82; O3 gamma=1.84");;
  gamma-high) ARGS=(--ppl-tokens 0 --levels "" --peers "" --no-ablations --rows "O3 gamma=1.88; O3 gamma=1.9");;
  select)    ARGS=(--split select --select-windows 16 --levels O1,O3 --peers "" --no-ablations
                   --rows "O1 weight_clip=max; O1 smoothing=none; O1 smoothing=smoothquant; O1 flatten_weights=true; O3 weight_clip=max; O3 kl_method=fixed");;
  formats-a) ARGS=(--ppl-tokens 0 --levels fp8,w8a8,smoothquant,O1 --rows "" --no-ablations);;
  formats-b) ARGS=(--ppl-tokens 0 --levels O2,O3,auto --no-fp --peers "" --no-ablations);;
  zeroshot-a) ARGS=(--no-ppl --tasks piqa,arc_easy,openbookqa,hellaswag --levels fp8,w8a8,smoothquant --rows "" --no-ablations);;
  zeroshot-b) ARGS=(--no-ppl --tasks piqa,arc_easy,openbookqa,hellaswag --levels O1,O2,O3,auto --no-fp --peers "" --no-ablations);;
  *) echo "unknown part $PART (levels, gamma-low, gamma-high, ablations, select, formats-a, formats-b, zeroshot-a, zeroshot-b)" >&2; exit 2;;
esac
[[ -n ${SET:-} && $PART == formats-* || -n ${SET:-} && $PART == zeroshot-* ]] && ARGS+=(--set "$SET")
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader || true
set +e
timeout -s INT "$LIMIT" python3 benchmarks/accuracy.py "${COMMON[@]}" "${ARGS[@]}" --out "$OUT/accuracy-$PART.md" \
  2>&1 | tee "$OUT/accuracy-$PART.log"
rc=${PIPESTATUS[0]}
set -e
[[ $rc == 124 || $rc == 130 ]] && echo "stopped after ${LIMIT}s: $OUT/accuracy-$PART.md holds the rows finished" | tee -a "$OUT/accuracy-$PART.log"
exit "$rc"
