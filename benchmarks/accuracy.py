"""Accuracy tables on a real model (issues 6, 11): our levels side by side with what users pick instead.

    python benchmarks/accuracy.py --model smollm2-135m --ppl-tokens 8192 --out benchmarks/results/accuracy.md
    python benchmarks/accuracy.py --split select --rows "O1; O1 weight_clip=mse" --no-ablations
    python benchmarks/accuracy.py --no-ppl --tasks piqa,arc_easy,openbookqa,hellaswag --no-ablations --out ...

Rows: fp (the model as loaded), the peers (benchmarks/peers.py: torchao-style int8-dynamic and
float8-rowwise, FAKE QUANT on the CPU, labelled so), then --levels (default: naive FP8 = our `fp8`
level, w8a8, smoothquant, O1, O2, O3, auto at its default budget: the most accurate plan within
0.55x the fp16 weight bytes) and --rows (default: auto speed first, no layer over naive FP8's error,
and auto within 0.40x of the fp16 weight bytes).  Columns: perplexity, the share of linear weights in 4 bits,
the weight bytes (and their ratio to fp16), the formats, and the end-to-end prefill time of that
plan on the OPT-13B shape, which only the device measures (benchmarks/e2e.py, the command printed
under the table): the column is left for that run.  --tasks adds a zero-shot table (lm-eval through
`fq_compile.tools.zeroshot`, the code path of `fq-compile eval --tasks`); --no-ppl skips perplexity.

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
import sys
import time
from pathlib import Path

import torch
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.peers import PEERS, fake_quant_copy  # noqa: E402
from benchmarks.provenance import git_rev  # noqa: E402
from fq_compile import Config  # noqa: E402
from fq_compile.tools.data import (  # noqa: E402
    calibration_batches,
    selection_tokens,
    wikitext_calibration,
    wikitext_test,
)
from fq_compile.tools.evaluate import evaluate_config, parse_overrides, perplexity  # noqa: E402
from fq_compile.tools.models import load_model  # noqa: E402

BETAS = (1.1, 1.2, 1.4, 1.5)
GAMMAS = (1.82, 1.84, 1.86, 1.88, 1.90)
LEVELS = "fp8,w8a8,smoothquant,O1,O2,O3,auto"
ROWS = "auto error_budget=1.0; auto memory_budget=0.4"
ROW_LABELS = {"fp8": "naive FP8 (fp8: per-tensor static e4m3)", "auto": "auto (hopper, default: memory budget 0.55x fp16)",
              "auto error_budget=1.0": "auto (hopper, error budget 1.0x naive FP8 per layer)",
              "auto memory_budget=0.4": "auto (hopper, memory budget 0.40x fp16)"}
E2E_NOTE = ("e2e prefill OPT-13B 8x2048: measured on the device only (the lead's run fills this column): "
            "`python benchmarks/e2e.py --models 13b --methods fp16-inductor,fp8-naive,fq-fp8,fq-O1,fq-O3,fq-auto "
            "--auto-formats <shares of the auto row> --batches 8 --seqs 2048 --out $OUT`")



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
    """The `fq-compile eval` line that reproduces one row (it also prints fp32)."""
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
    cmd += ["--ppl-tokens", str(args.ppl_tokens if not args.no_ppl else 2048), "--tasks", args.tasks]
    if args.tasks and args.zs_limit:
        cmd += ["--zs-limit", str(args.zs_limit)]
    return shlex.join(cmd)


def peer_command(args, peer: str) -> str:
    """The benchmark line that reproduces one peer row alone."""
    cmd = ["python", "benchmarks/accuracy.py", "--model", args.model, "--levels", "", "--rows", "", "--peers", peer,
           "--no-ablations", "--no-fp", "--ppl-tokens", str(args.ppl_tokens), "--tasks", args.tasks]
    if args.no_ppl:
        cmd += ["--no-ppl"]
    if args.tasks and args.zs_limit:
        cmd += ["--zs-limit", str(args.zs_limit)]
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    if args.device and args.device != "cpu":
        cmd += ["--device", args.device]
    if args.dtype != "float32":
        cmd += ["--dtype", args.dtype]
    return shlex.join(cmd)


def zero_shot(args, call, tok) -> dict:
    from fq_compile.tools.zeroshot import evaluate_zero_shot

    return evaluate_zero_shot(call, tok, tasks=args.tasks, data_dir=args.data_dir,
                              limit=args.zs_limit or None, batch_size=args.zs_batch_size, progress=False)


def _fmt_bytes(v: dict) -> str:
    if not v.get("fp16_bytes"):
        return "-"
    return f"{v['weight_bytes'] / 2**20:.1f} MiB ({v['weight_bytes'] / v['fp16_bytes']:.3f}x)"


def _fmt_formats(v: dict) -> str:
    f = v.get("formats") or {}
    return ", ".join(f"{k} {n}" for k, n in sorted(f.items())) or "-"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="alias, .gguf file, local dir or hub id")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="the model's floating-point dtype (the fp baseline and the non-GEMM ops)")
    p.add_argument("--calib-batches", type=int, default=16)
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--calib-text", default="random", choices=["random", "first"],
                   help="calibration windows: random (seed 0) or the first ones of the validation text "
                        "(--split test only: --split select draws its windows apart from the random ones)")
    p.add_argument("--split", default="test", choices=["test", "select"],
                   help="test: the test split; select: held-out validation windows (for choosing settings)")
    p.add_argument("--select-windows", type=int, default=4, help="--split select: how many held-out windows")
    p.add_argument("--ppl-seqlen", type=int, default=2048)
    p.add_argument("--ppl-tokens", type=int, default=4 * 2048, help="--split test: limit the tokens (0: the whole split)")
    p.add_argument("--no-ppl", action="store_true", help="skip perplexity (a zero-shot-only table)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a Config knob for every level row (as fq-compile eval --set), "
                        "e.g. weight_scale=channel")
    p.add_argument("--levels", default=LEVELS, help="level rows (comma-separated)")
    p.add_argument("--rows", default=ROWS, help="more rows, ';'-separated: 'LEVEL key=value ...'")
    p.add_argument("--peers", default=",".join(PEERS),
                   help=f"fake-quant peer rows (comma-separated: {', '.join(PEERS)})")
    p.add_argument("--tasks", default="",
                   help="zero-shot tasks (comma-separated), e.g. piqa,arc_easy,openbookqa,hellaswag")
    p.add_argument("--zs-limit", type=int, default=0, help="score only the first N rows of each task (0: all)")
    p.add_argument("--zs-batch-size", type=int, default=16,
                   help="zero-shot requests per forward (lm-eval's batch size; 1 runs ~10x slower on a CPU)")
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
    if args.calib_text == "first":
        if args.split != "test":
            raise SystemExit("--calib-text first is for --split test (the select windows avoid the random ones)")
        v = tok(wikitext_calibration(args.data_dir), return_tensors="pt").input_ids[0]
        calib = [v[i * args.calib_seqlen:(i + 1) * args.calib_seqlen].unsqueeze(0) for i in range(args.calib_batches)]
    else:
        calib = calibration_batches(tok, n=args.calib_batches, seqlen=args.calib_seqlen, data_dir=args.data_dir)
    if args.split == "test":
        ids = tok(wikitext_test(args.data_dir), return_tensors="pt").input_ids[0]
    else:
        ids = selection_tokens(tok, args.select_windows, args.ppl_seqlen, args.calib_batches, args.calib_seqlen,
                               data_dir=args.data_dir)
    if args.no_ppl:
        ids = ids[: args.ppl_seqlen]          # one window, only to satisfy the shared code path; not reported

    levels = [l.strip() for l in args.levels.split(",") if l.strip()]
    rows = [r.strip() for r in args.rows.split(";") if r.strip()]
    peers = [q.strip() for q in args.peers.split(",") if q.strip()]
    for q in peers:
        if q not in PEERS:
            raise SystemExit(f"unknown peer {q!r}; choose from {', '.join(PEERS)}")
    if not args.no_ablations:
        rows += ablation_rows(args.ablation_base, args.gamma_base)
    common = parse_overrides(args.overrides)
    specs = [(l, l, dict(common)) for l in levels] + [(r, lv, {**common, **kw}) for r, lv, kw in
                                                      ((r, *parse_row(r)) for r in rows)]
    for _, level, kw in specs:             # fail on a typo before an hour of work, not after
        Config(level=level, **kw)
    main_rows = set(levels) | set(ROWS.split(";")) | set(peers) | {"fp"}

    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()})"
    header = (f"model: {lm.name}; dtype: {args.dtype}; {'no Inductor' if args.no_inductor else 'Inductor on a GPU, none on the CPU'}; date: {datetime.date.today()}; device: {dev}; "
              f"torch {torch.__version__}; git {git_rev()}\n"
              f"command: python benchmarks/accuracy.py {shlex.join(sys.argv[1:] if argv is None else argv)}\n"
              + (f"calibration: the first {args.calib_batches} windows of {args.calib_seqlen} tokens of WikiText-2 validation "
                 "(the rows' fq-compile eval commands below calibrate on random windows instead)\n"
                 if args.calib_text == "first" else
                 f"calibration: {args.calib_batches} random windows of {args.calib_seqlen} tokens (seed 0), WikiText-2 validation\n"))
    runs: dict[str, dict] = {}

    def scope() -> str:
        if args.no_ppl:
            return "perplexity: not measured in this run (--no-ppl)"
        w = next(iter(runs.values())).get("windows", "?") if runs else "?"
        if args.split == "select":
            return (f"perplexity: {w} held-out WikiText-2 *validation* windows of {args.ppl_seqlen} tokens, disjoint "
                    f"from the calibration windows (selection protocol; not the test split)")
        if max_tokens:
            return f"perplexity: first {max_tokens} test tokens ({w} windows of {args.ppl_seqlen}): a limited run"
        return f"perplexity: the whole WikiText-2 test split ({w} windows of {args.ppl_seqlen})"

    def label(k):
        return PEERS.get(k) or ROW_LABELS.get(k, k)

    def write():
        base = runs.get("fp", {}).get("ppl")

        def rel(v):
            return "-" if base is None or v is None else f"{100 * (v / base - 1):+.2f}%"

        def row(k, v):
            ppl = v.get("ppl")
            return [label(k), "-" if ppl is None else f"{ppl:.3f}", "-" if k == "fp" else rel(ppl),
                    f"{100 * v.get('int4_weights', 0.0):.1f}%", _fmt_bytes(v), _fmt_formats(v),
                    f"{100 * v['flatten']:.1f}%" if v.get("flatten") else "-", "(device)" if k != "fp" else "-"]

        cols = ["PPL", "vs fp", "4-bit weights", "weight bytes (x fp16)", "formats (layers)", "flatten ratio",
                "e2e prefill OPT-13B"]
        main = [row(k, v) for k, v in runs.items() if k in main_rows]
        other = [row(k, v)[:-1] for k, v in runs.items() if k not in main_rows]
        text = header + scope() + "\n"
        if not args.no_ppl:
            text += ("\n## WikiText-2 perplexity, 4-bit share of linear weights, weight bytes, formats\n\n"
                     + tabulate(main, ["row", *cols], tablefmt="github") + f"\n\n{E2E_NOTE}")
            if other:
                text += ("\n\n## Other rows and ablations (one knob changed at a time)\n\n"
                         + tabulate(other, ["configuration", *cols[:-1]], tablefmt="github"))
        zs = {k: v["zero_shot"] for k, v in runs.items() if v.get("zero_shot")}
        if zs:
            tasks = list(dict.fromkeys(t for r in zs.values() for t in r["tasks"]))
            fp_avg = zs.get("fp", {}).get("average", {}).get("acc")
            zrows = []
            for k, r in zs.items():
                avg = r["average"].get("acc")
                norm = r["average"].get("acc_norm")
                accs = [f"{100 * r['tasks'][t]['acc']:.2f}" if t in r["tasks"] else "-" for t in tasks]
                zrows.append([label(k), *accs, "-" if norm is None else f"{100 * norm:.2f}",
                              "-" if avg is None else f"{100 * avg:.2f}",
                              "-" if avg is None or fp_avg is None or k == "fp" else f"{100 * (avg - fp_avg):+.2f}"])
            missing = sorted({t for r in zs.values() for t in r["missing"]})
            limit = next(iter(zs.values())).get("limit")
            scope_zs = f"first {limit} rows per task" if limit else "full sets"
            text += (f"\n\n## Zero-shot accuracy (%, lm-eval, acc per task; {scope_zs})\n\n"
                     + tabulate(zrows, ["row", *tasks, "avg acc_norm", "avg acc", "avg acc vs fp (points)"],
                                tablefmt="github"))
            if missing:
                text += "\n\nmissing (no local files, not run): " + ", ".join(
                    f"{t} ({next(r['missing'][t] for r in zs.values() if t in r['missing'])})" for t in missing)
        cmds = list(dict.fromkeys(f"- {label(k)}: `{v['command']}`" for k, v in runs.items() if "command" in v))
        if args.split == "test" and cmds:
            text += "\n\n## Reproduce one row\n\n" + "\n".join(cmds)
        if args.out:
            Path(args.out).write_text(text + "\n")
            Path(args.out).with_suffix(".json").write_text(json.dumps(
                dict(model=lm.name, split=args.split, dtype=args.dtype, device=dev, header=header, runs=runs),
                indent=2, default=str))
        return text

    def finish(key, r, call, t0):
        if args.tasks:
            r["zero_shot"] = zero_shot(args, call, tok)
        r["seconds"] = time.time() - t0
        runs[key] = r
        ppl = "-" if r.get("ppl") is None else f"{r['ppl']:8.3f}"
        avg = (r.get("zero_shot") or {}).get("average", {}).get("acc")
        print(f"{key:32s} ppl {ppl}  4-bit {100 * r.get('int4_weights', 0):5.1f}%  "
              f"{'' if avg is None else f'zero-shot avg {100 * avg:.2f}  '}({r['seconds']:.0f} s)", flush=True)
        write()

    if not args.no_fp:
        t = time.time()
        r = {}
        if not args.no_ppl:
            with torch.no_grad():
                fp = perplexity(model, ids, args.ppl_seqlen, max_tokens, progress=False, device=device)
            r = dict(ppl=fp.ppl, windows=fp.windows)
        finish("fp", r, model, t)
    for q in peers:
        t = time.time()
        peer = fake_quant_copy(model, q)
        r = dict(command=peer_command(args, q), fake_quant=True)
        if not args.no_ppl:
            with torch.no_grad():
                res = perplexity(peer, ids, args.ppl_seqlen, max_tokens, progress=False, device=device)
            r.update(ppl=res.ppl, windows=res.windows)
        n = sum(m.weight.numel() for m in peer.modules() if type(m).__name__ == "FakeQuantLinear")
        r.update(int4_weights=0.0, weight_bytes=n, fp16_bytes=2 * n, formats={q: "all"})
        finish(q, r, peer, t)
        del peer
    for key, level, kw in specs:
        t = time.time()
        torch._dynamo.reset()          # each row starts from empty Dynamo caches (a script may; the library never does)
        with torch.no_grad():
            r = evaluate_config(model, calib, ids, Config(level=level, **kw), args.ppl_seqlen, max_tokens,
                                progress=False, device=device, inductor=False if args.no_inductor else None)
        plan, fast = r.pop("plan"), r.pop("compiled")
        if args.no_ppl:
            r.pop("ppl", None), r.pop("windows", None)
        r["command"] = cli_command(args, level, kw)
        if "auto" in plan.calibration:
            r["auto"] = plan.calibration["auto"]
        finish(key, r, fast, t)
    print("\n" + write())
    return 0


if __name__ == "__main__":
    sys.exit(main())
