"""Accuracy tables on a real model (issue 6): the paper's Table 3 / Table 4 analogs and ablations.

    python benchmarks/accuracy.py --model smollm2-135m --ppl-tokens 8192 --out benchmarks/results/accuracy.md

Every configuration is calibrated on the same WikiText-2 validation windows and evaluated on the
same test tokens, side by side in one run.  --ppl-tokens limits the test tokens (the output says so);
0 evaluates the whole test split.  Ablations vary one knob of a base level (default O1, since O3's
GPTQ pass makes each row minutes long on a CPU).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fq_compile  # noqa: E402
from fq_compile import Config  # noqa: E402
from fq_compile.data import calibration_batches, wikitext_test  # noqa: E402
from fq_compile.evaluate import perplexity  # noqa: E402
from fq_compile.models import load_model  # noqa: E402


def _git_rev() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--calib-batches", type=int, default=16)
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--ppl-seqlen", type=int, default=2048)
    p.add_argument("--ppl-tokens", type=int, default=4 * 2048, help="0: the whole test split")
    p.add_argument("--levels", default="w8a8,smoothquant,O1,O2,O3")
    p.add_argument("--ablation-base", default="O1")
    p.add_argument("--no-ablations", action="store_true")
    p.add_argument("--out", default=None, help="write the tables (markdown) here, and JSON beside it")
    args = p.parse_args(argv)
    max_tokens = args.ppl_tokens or None

    lm = load_model(args.model)
    model, tok = lm.model, lm.tokenizer
    calib = calibration_batches(tok, n=args.calib_batches, seqlen=args.calib_seqlen, data_dir=args.data_dir)
    ids = tok(wikitext_test(args.data_dir), return_tensors="pt").input_ids[0]

    def evaluate(call):
        with torch.no_grad():
            return perplexity(call, ids, args.ppl_seqlen, max_tokens, progress=False)

    runs = {}

    def run(label, config):
        t = time.time()
        torch._dynamo.reset()
        plan = fq_compile.calibrate(model, calib, config, progress=False)
        res = evaluate(torch.compile(model, backend="flattenquant", options={"plan": plan}))
        n = len(plan.layers)
        runs[label] = dict(ppl=res.ppl, windows=res.windows, int4=sum(lp.bits == 4 for lp in plan.layers.values()) / n,
                           flatten=sum(plan.groups[lp.group].flatten_ratio for lp in plan.layers.values()) / n,
                           seconds=time.time() - t, config=config.to_dict())
        print(f"{label:28s} ppl {res.ppl:8.3f}  int4 {100 * runs[label]['int4']:5.1f}%  "
              f"flatten {100 * runs[label]['flatten']:5.1f}%  ({runs[label]['seconds']:.0f} s)", flush=True)

    fp = evaluate(model)
    runs["fp32"] = dict(ppl=fp.ppl, windows=fp.windows, int4=0.0, flatten=0.0)
    print(f"{'fp32':28s} ppl {fp.ppl:8.3f}", flush=True)
    levels = [l for l in args.levels.split(",") if l]
    for level in levels:
        run(level, Config(level=level))
    ablations = []
    if not args.no_ablations:
        base = args.ablation_base
        ablations = [("smoothing off", dict(smoothing="none")), ("outlier clip off", dict(outlier_clip=False))]
        ablations += [(f"beta {b}", dict(beta=b)) for b in (1.1, 1.2, 1.4, 1.5)]
        if Config(level=base).mixed_bits:
            ablations += [(f"gamma {g}", dict(gamma=g)) for g in (1.82, 1.84, 1.88, 1.90)]
        for label, kw in ablations:
            run(f"{base} {label}", Config(level=base, **kw))

    base_ppl = runs["fp32"]["ppl"]
    scope = (f"first {max_tokens} test tokens ({runs['fp32']['windows']} windows of {args.ppl_seqlen}): a limited run"
             if max_tokens else f"the whole test split ({runs['fp32']['windows']} windows of {args.ppl_seqlen})")
    t3 = [[k, f"{v['ppl']:.3f}", "-" if k == "fp32" else f"{100 * (v['ppl'] / base_ppl - 1):+.2f}%"]
          for k, v in runs.items() if k == "fp32" or k in levels]
    t4 = [[k, f"{100 * runs[k]['int4']:.1f}%", f"{100 * runs[k]['flatten']:.1f}%"] for k in levels if k in runs]
    tab = [[k, f"{v['ppl']:.3f}", f"{100 * (v['ppl'] / base_ppl - 1):+.2f}%", f"{100 * v['int4']:.1f}%",
            f"{100 * v['flatten']:.1f}%"] for k, v in runs.items() if k not in levels and k != "fp32"]
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()})"
    header = (f"model: {lm.name}; date: {datetime.date.today()}; device: {dev}; torch {torch.__version__}; "
              f"git {_git_rev()}\ncommand: python benchmarks/accuracy.py {' '.join(sys.argv[1:])}\n"
              f"calibration: {args.calib_batches} random windows of {args.calib_seqlen} tokens, WikiText-2 validation; "
              f"perplexity: {scope}\n")
    text = (header + "\n## Table 3 analog: WikiText-2 perplexity\n\n" + tabulate(t3, ["level", "PPL", "vs fp32"], tablefmt="github")
            + "\n\n## Table 4 analog: INT4 share of linear layers, average flatten ratio\n\n"
            + tabulate(t4, ["level", "INT4 layers", "flatten ratio"], tablefmt="github"))
    if tab:
        text += ("\n\n## Ablations (one knob of " + args.ablation_base + " at a time)\n\n"
                 + tabulate(tab, ["configuration", "PPL", "vs fp32", "INT4 layers", "flatten ratio"], tablefmt="github"))
    print("\n" + text)
    if args.out:
        Path(args.out).write_text(text + "\n")
        Path(args.out).with_suffix(".json").write_text(json.dumps(runs, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
