"""Accuracy tables on a real model (issue 6): the paper's Table 3 / Table 4 analogs and ablations.

    python benchmarks/accuracy.py --model smollm2-135m --ppl-tokens 8192 --out benchmarks/results/accuracy.md
    python benchmarks/accuracy.py --split select --rows "O1; O1 weight_clip=mse" --no-ablations

Every row is calibrated on the same WikiText-2 validation windows and evaluated on the same tokens,
side by side in one run, through `fq_compile.tools.evaluate.evaluate_config`: the code path of
`fq-compile eval`, whose command for each row is listed in the output so that a row can be
reproduced alone.

--split test (default) measures the test split (--ppl-tokens limits it, and the output says so;
0 is the whole split).  --split select measures held-out *validation* windows that overlap none of
the calibration windows (`fq_compile.tools.data.heldout_windows`): settings are chosen there, never on
the test split.  Ablations vary one knob of --ablation-base (default O1: O3's GPTQ makes a row
minutes long on a CPU); the gamma rows need mixed bits and vary --gamma-base (default O2).
Results are rewritten after every row (markdown + JSON), so a killed run keeps what it measured.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fq_compile import Config  # noqa: E402
from fq_compile.tools.data import calibration_batches, selection_tokens, wikitext_test  # noqa: E402
from fq_compile.tools.evaluate import evaluate_config, parse_overrides, perplexity  # noqa: E402
from fq_compile.tools.models import load_model  # noqa: E402

BETAS = (1.1, 1.2, 1.4, 1.5)
GAMMAS = (1.82, 1.84, 1.86, 1.88, 1.90)


def _git_rev() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def parse_row(spec: str) -> tuple[str, dict]:
    """"O1 beta=1.1 smoothing=none" -> ("O1", {"beta": 1.1, "smoothing": "none"})."""
    parts = spec.split()
    if not parts:
        raise ValueError("empty row spec")
    return parts[0], parse_overrides(parts[1:])


def ablation_rows(base: str, gamma_base: str) -> list[str]:
    rows = [f"{base} smoothing=none", f"{base} smoothing=smoothquant", f"{base} outlier_clip=false"]
    rows += [f"{base} beta={b}" for b in BETAS]
    if gamma_base:
        rows += [f"{gamma_base} gamma={g}" for g in GAMMAS]
    return rows


def cli_command(args, level: str, overrides: dict) -> str:
    """The `fq-compile eval` line that reproduces one test-split row (it also prints fp32)."""
    cmd = ["fq-compile", "eval", "--model", args.model, "--level", level]
    for k, v in overrides.items():
        cmd += ["--set", f"{k}={json.dumps(v) if not isinstance(v, str) else v}"]
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    if (args.calib_batches, args.calib_seqlen) != (16, 512):
        cmd += ["--calib-batches", str(args.calib_batches), "--calib-seqlen", str(args.calib_seqlen)]
    if args.ppl_seqlen != 2048:
        cmd += ["--ppl-seqlen", str(args.ppl_seqlen)]
    if args.device and args.device != "cpu":
        cmd += ["--device", args.device]
    if args.dtype != "float32":
        cmd += ["--dtype", args.dtype]
    if args.no_inductor:
        cmd += ["--no-inductor"]
    cmd += ["--ppl-tokens", str(args.ppl_tokens), "--tasks", ""]
    return shlex.join(cmd)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="alias, .gguf file, local dir or hub id")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="the model's floating-point dtype (the fp baseline and the non-GEMM ops)")
    p.add_argument("--calib-batches", type=int, default=16)
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--split", default="test", choices=["test", "select"],
                   help="test: the test split; select: held-out validation windows (for choosing settings)")
    p.add_argument("--select-windows", type=int, default=4, help="--split select: how many held-out windows")
    p.add_argument("--ppl-seqlen", type=int, default=2048)
    p.add_argument("--ppl-tokens", type=int, default=4 * 2048, help="--split test: limit the tokens (0: the whole split)")
    p.add_argument("--levels", default="w8a8,smoothquant,O1,O2,O3", help="Table 3/4 rows (comma-separated)")
    p.add_argument("--rows", default="", help="more rows, ';'-separated: 'LEVEL key=value ...'")
    p.add_argument("--ablation-base", default="O1")
    p.add_argument("--gamma-base", default="O2", help="level of the gamma rows ('' to skip them)")
    p.add_argument("--no-ablations", action="store_true")
    p.add_argument("--no-inductor", action="store_true",
                   help="run the fq:: ops (GPU kernels included) without Inductor around them: same integer "
                        "arithmetic, minutes less compiling per row")
    p.add_argument("--no-fp", action="store_true", help="skip the floating-point row (when splitting a run)")
    p.add_argument("--out", default=None, help="write the tables (markdown) here, and JSON beside it, after every row")
    args = p.parse_args(argv)
    max_tokens = args.ppl_tokens or None if args.split == "test" else None
    device = torch.device(args.device)

    lm = load_model(args.model, dtype=getattr(torch, args.dtype), device=device)
    model, tok = lm.model, lm.tokenizer
    calib = calibration_batches(tok, n=args.calib_batches, seqlen=args.calib_seqlen, data_dir=args.data_dir)
    if args.split == "test":
        ids = tok(wikitext_test(args.data_dir), return_tensors="pt").input_ids[0]
    else:
        ids = selection_tokens(tok, args.select_windows, args.ppl_seqlen, args.calib_batches, args.calib_seqlen,
                               data_dir=args.data_dir)

    levels = [l.strip() for l in args.levels.split(",") if l.strip()]
    rows = [r.strip() for r in args.rows.split(";") if r.strip()]
    if not args.no_ablations:
        rows += ablation_rows(args.ablation_base, args.gamma_base)
    specs = [(l, l, {}) for l in levels] + [(r, *parse_row(r)) for r in rows]
    for _, level, kw in specs:             # fail on a typo before an hour of work, not after
        Config(level=level, **kw)

    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()})"
    header = (f"model: {lm.name}; dtype: {args.dtype}; {'no Inductor' if args.no_inductor else 'Inductor on a GPU, none on the CPU'}; date: {datetime.date.today()}; device: {dev}; "
              f"torch {torch.__version__}; git {_git_rev()}\n"
              f"command: python benchmarks/accuracy.py {shlex.join(sys.argv[1:] if argv is None else argv)}\n"
              f"calibration: {args.calib_batches} random windows of {args.calib_seqlen} tokens (seed 0), WikiText-2 validation\n")
    runs: dict[str, dict] = {}

    def scope() -> str:
        w = next(iter(runs.values()))["windows"] if runs else "?"
        if args.split == "select":
            return (f"perplexity: {w} held-out WikiText-2 *validation* windows of {args.ppl_seqlen} tokens, disjoint "
                    f"from the calibration windows (selection protocol; not the test split)")
        if max_tokens:
            return f"perplexity: first {max_tokens} test tokens ({w} windows of {args.ppl_seqlen}): a limited run"
        return f"perplexity: the whole WikiText-2 test split ({w} windows of {args.ppl_seqlen})"

    def write():
        base_ppl = runs["fp"]["ppl"] if "fp" in runs else None

        def rel(v):
            return "-" if base_ppl is None else f"{100 * (v / base_ppl - 1):+.2f}%"

        t3 = [[k, f"{v['ppl']:.3f}", "-" if k == "fp" else rel(v["ppl"]), f"{100 * v['int4']:.1f}%",
               f"{100 * v['flatten']:.1f}%"] for k, v in runs.items() if k == "fp" or k in levels]
        tab = [[k, f"{v['ppl']:.3f}", rel(v["ppl"]), f"{100 * v['int4']:.1f}%", f"{100 * v['flatten']:.1f}%"]
               for k, v in runs.items() if k != "fp" and k not in levels]
        cols = ["PPL", "vs fp", "INT4 layers", "flatten ratio"]
        text = header + scope() + "\n"
        text += ("\n## Table 3 / Table 4 analogs: WikiText-2 perplexity, INT4 share of linear layers, average flatten ratio\n\n"
                 + tabulate(t3, ["level", *cols], tablefmt="github"))
        if tab:
            text += "\n\n## Other rows and ablations (one knob changed at a time)\n\n" + tabulate(tab, ["configuration", *cols],
                                                                                                  tablefmt="github")
        if args.split == "test":
            text += ("\n\n## Reproduce one row\n\n" + "\n".join(f"- {k}: `{v['command']}`" for k, v in runs.items()
                                                                 if "command" in v))
        if args.out:
            Path(args.out).write_text(text + "\n")
            Path(args.out).with_suffix(".json").write_text(json.dumps(
                dict(model=lm.name, split=args.split, dtype=args.dtype, device=dev, runs=runs), indent=2, default=str))
        return text

    if not args.no_fp:
        t = time.time()
        with torch.no_grad():
            fp = perplexity(model, ids, args.ppl_seqlen, max_tokens, progress=False, device=device)
        runs["fp"] = dict(ppl=fp.ppl, windows=fp.windows, int4=0.0, flatten=0.0, seconds=time.time() - t)
        print(f"{'fp (' + args.dtype + ')':32s} ppl {fp.ppl:8.3f}", flush=True)
        write()
    for label, level, kw in specs:
        torch._dynamo.reset()          # each row starts from empty Dynamo caches (a script may; the library never does)
        with torch.no_grad():
            r = evaluate_config(model, calib, ids, Config(level=level, **kw), args.ppl_seqlen, max_tokens,
                                progress=False, device=device, inductor=False if args.no_inductor else None)
        r.pop("plan"), r.pop("compiled")
        r["command"] = cli_command(args, level, kw)
        runs[label] = r
        print(f"{label:32s} ppl {r['ppl']:8.3f}  int4 {100 * r['int4']:5.1f}%  flatten {100 * r['flatten']:5.1f}%  "
              f"({r['seconds']:.0f} s)", flush=True)
        write()
    print("\n" + write())
    return 0


if __name__ == "__main__":
    sys.exit(main())
