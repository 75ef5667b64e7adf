"""What block alignment (Config.align_budget, fq_compile/planning/align.py) costs a calibrated plan.

    python benchmarks/align_cost.py                         # SmolLM2-135M, O1 at beta 3 and the paper's 1.3
    python benchmarks/align_cost.py --model <path> --betas 3

Alignment pads decoder blocks with zero columns to a few common sets of flattened widths K', so that
regional compilation compiles one body per set instead of one per block.  The values do not change, but
every GEMM of a padded layer multiplies the zero columns.  For each beta (the flatten threshold, which sets
K'), the model is calibrated once with alignment off, and the same groups are then aligned at each budget.
The table gives the sets of widths (compiled bodies) and the multiply-adds per token (sum of N x K' over
the flattened layers: what prefill computes, and for INT8 weights also the bytes a decode step reads),
aligned against unaligned.
The prefill time this costs on the GPU is measured by benchmarks/e2e.py (issue 24); this script prices it.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import platform
import sys
from pathlib import Path

import torch
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fq_compile  # noqa: E402
from benchmarks.provenance import git_rev  # noqa: E402
from fq_compile import Config  # noqa: E402
from fq_compile.planning.align import align_groups  # noqa: E402
from fq_compile.tools.data import calibration_batches  # noqa: E402
from fq_compile.tools.models import SMOLLM2_ALIAS, load_model  # noqa: E402


def rows_of(plan) -> dict[str, int]:
    """A group's output rows summed over its layers (N of every GEMM that reads it)."""
    return {n: sum(plan.layers[l].out_features for l in g.layers) for n, g in plan.groups.items()}


def macs(plan, groups) -> int:
    """Multiply-adds per token of the plan's flattened layers under `groups`' widths: sum of N x K'."""
    return sum(lp.out_features * groups[lp.group].flat_features for lp in plan.layers.values())


def rows_for(beta: float, plan, budgets: list[float]) -> list[list]:
    out = []
    flat = sum(float(g.extra.sum()) for g in plan.groups.values()) / sum(g.in_features for g in plan.groups.values())
    for budget in budgets:
        aligned = copy.deepcopy(plan.groups)
        report = align_groups(aligned, rows_of(plan), budget)
        ratio = macs(plan, aligned) / macs(plan, plan.groups)
        out.append([beta, f"{100 * flat:.1f}%", "one set (every block)" if budget >= 100 else f"{100 * budget:g}%",
                    report.blocks, report.widths, f"+{100 * report.overhead:.2f}%", f"{ratio:.4f}x"])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=SMOLLM2_ALIAS)
    ap.add_argument("--betas", default="3,1.3", help="flatten threshold coefficients, comma-separated")
    ap.add_argument("--budgets", default="0.005,0.01,0.02,0.05,100",
                    help="Config.align_budget values (100: every block padded to one set of widths)")
    ap.add_argument("--calib", type=int, default=16, help="calibration windows of 512 tokens")
    ap.add_argument("--out", default=None, help="also write the table (markdown) here")
    args = ap.parse_args(argv)

    loaded = load_model(args.model)
    batches = calibration_batches(loaded.tokenizer, n=args.calib)
    rows = []
    budgets = [float(b) for b in args.budgets.split(",")]
    for beta in [float(b) for b in args.betas.split(",")]:
        plan = fq_compile.calibrate(loaded.model, batches, Config(level="O1", beta=beta, align_budget=0.0))
        rows += rows_for(beta, plan, budgets)
        print(tabulate(rows[-len(budgets):]), flush=True)
    table = tabulate(rows, headers=["beta", "flattened channels", "align budget", "blocks", "sets of K' (bodies)",
                                    "multiply-adds added (aligned layers)",
                                    "flattened GEMM work (prefill compute, decode bytes)"], tablefmt="github")
    head = (f"model: {args.model}; calibration: {args.calib} random windows of 512 tokens (seed 0), WikiText-2 "
            f"validation; level O1 (K' does not depend on the level's formats); date: {datetime.date.today()}; "
            f"device: CPU ({platform.machine()}); torch {torch.__version__}; git {git_rev()}\n"
            f"command: python benchmarks/align_cost.py {' '.join(argv if argv is not None else sys.argv[1:])}\n")
    print(head + "\n" + table)
    if args.out:
        Path(args.out).write_text(head + "\n" + table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
