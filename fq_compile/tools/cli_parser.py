"""`fq-compile`: the command-line front end over the same API.

    fq-compile demo      calibrate + compile SmolLM2-135M at O1 on CPU, print the perplexity and weight-bytes
                         table beside fp32, naive FP8 and W8A8, the graph dump and greedy continuations
    fq-compile quantize  calibrate a model and save its plan (--out) or a quantized artefact to deploy (--save)
    fq-compile dump      print explain() of a saved plan
    fq-compile eval      WikiText-2 perplexity (and zero-shot accuracy) of fp32 and quantized levels (+ JSON)
"""

# Standard library only, and nothing from fq_compile: the `fq-compile` launcher (fq_compile_cli.py, outside
# the package) loads this file by path, so that `fq-compile -h` and argument errors answer without importing
# fq_compile, torch or transformers (~4 s).  The commands themselves run in fq_compile/tools/cli.py.

from __future__ import annotations

import argparse

# fq_compile.config.LEVELS and fq_compile.tools.zeroshot.DEFAULT_TASKS, copied here because importing
# either module imports torch; tests/tools/test_cli.py checks that the copies agree
LEVELS = ("fp16", "w8a8", "smoothquant", "O1", "O2", "O3", "fp8", "auto")
ZERO_SHOT_TASKS = ("openbookqa", "lambada_openai", "piqa", "hellaswag", "winogrande", "arc_easy")
AUTO_TASKS = "auto"


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every option's default in its help line; the description printed as written."""


def _common(p: argparse.ArgumentParser):
    p.add_argument("--model", default="smollm2-135m",
                   help="alias (smollm2-135m, opt-125m...), .gguf file, local dir or hub id")
    p.add_argument("--data-dir", default=None,
                   help="WikiText-2 (and zero-shot) directory; None: $FQ_DATA_DIR, ../shared/data, else the hub")
    p.add_argument("--calib-batches", type=int, default=16, help="calibration windows from the validation split")
    p.add_argument("--calib-seqlen", type=int, default=512, help="tokens per calibration window")
    p.add_argument("--seed", type=int, default=0, help="calibration windows' seed (and Config.seed)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a Config knob for every level, e.g. --set beta=1.4 (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fq-compile", description=__doc__, formatter_class=_Formatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="the main job: calibrate, compile, evaluate and dump SmolLM2-135M",
                       formatter_class=_Formatter,
                       description="Calibrate and compile the model at --level and at each --compare level, then "
                                   "print WikiText-2 perplexity and weight bytes per level beside the floating-point "
                                   "model, the graph dump of --level, greedy continuations of every level, and on a "
                                   "CUDA device prefill and decode tokens/s of each (fp16 vs ours).")
    _common(d)
    d.add_argument("--level", default="O1", choices=[l for l in LEVELS if l not in ("fp16", "O3")],
                   help="the level shown in full (graph dump)")
    d.add_argument("--compare", default="fp8,w8a8",
                   help="comma-separated levels measured beside --level (fp8: naive FP8, the baseline a Hopper "
                        "user starts from; w8a8: the paper's)")
    d.add_argument("--device", default="auto",
                   help="auto: cuda (fp16, with tokens/s) when available, else cpu (fp32, no speed figures)")
    d.add_argument("--ppl-seqlen", type=int, default=2048, help="tokens per perplexity window")
    d.add_argument("--ppl-tokens", type=int, default=4 * 2048, help="limit the test tokens (0: the whole split)")
    d.add_argument("--prompt", default="The tower is 324 metres tall, about the same height as",
                   help="prompt of the greedy continuations")
    d.add_argument("--max-new-tokens", type=int, default=24, help="tokens per greedy continuation")
    d.add_argument("--decode-tokens", type=int, default=64,
                   help="CUDA only: new tokens per timed generate() call (decode tokens/s)")
    d.add_argument("--json", default=None, help="also write the table's figures here (benchmarks/plots.py reads it)")
    d.add_argument("--from", dest="from_dir", default=None, metavar="DIR",
                   help="run a saved artefact (fq-compile quantize --save) without its fp weights; ignores --level")
    q = sub.add_parser("quantize", help="calibrate and save a plan (--out) or an artefact to deploy (--save)",
                       formatter_class=_Formatter)
    _common(q)
    q.add_argument("--level", default="O1", choices=list(LEVELS), help="Config.level")
    q.add_argument("--out", default=None, help="write the plan file here")
    q.add_argument("--save", default=None, metavar="DIR",
                   help="write a quantized artefact (plan, fp tensors, config, tokenizer) to deploy from")
    u = sub.add_parser("dump", help="print the graph dump of a saved plan (explain())", formatter_class=_Formatter)
    u.add_argument("plan", help="a plan file (fq-compile quantize, QuantPlan.save)")
    u.add_argument("--full", action="store_true", help="every layer's row, not only the short view")
    u.add_argument("--top", type=int, default=5, help="layers listed per 'largest ...' table of the short view")
    u.add_argument("--format", default="text", choices=["text", "csv", "markdown"],
                   help="csv / markdown: the per-layer rows alone, to export")
    e = sub.add_parser("eval", help="WikiText-2 perplexity and zero-shot table", formatter_class=_Formatter)
    _common(e)
    e.add_argument("--level", default="O1", help="comma-separated levels")
    e.add_argument("--plan", default=None, help="evaluate this saved plan instead of calibrating")
    e.add_argument("--ppl-seqlen", type=int, default=2048, help="tokens per perplexity window")
    e.add_argument("--ppl-tokens", type=int, default=0, help="limit the test tokens (0: the whole split)")
    e.add_argument("--json", default=None, help="also write the results here")
    e.add_argument("--tasks", default=AUTO_TASKS,
                   help="zero-shot tasks (lm-eval) read from <data-dir>/<task>/<split>.jsonl, comma-separated; "
                        f"empty: none; {AUTO_TASKS}: those of {', '.join(ZERO_SHOT_TASKS)} whose data file exists "
                        "(the missing ones are named)")
    e.add_argument("--zs-limit", type=int, default=0,
                   help="score only the first N rows of each zero-shot task (0: all)")
    e.add_argument("--device", default=None, help="run the model there (e.g. cuda); None: where it loads (CPU)")
    e.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="the model's floating-point dtype (the baseline and the non-GEMM ops)")
    e.add_argument("--no-inductor", action="store_true",
                   help="no Inductor around the fq:: ops on a GPU either (on the CPU it is the default; "
                        "same integers, float ops unfused)")
    return p
