"""What block alignment (Config.align_blocks, fq_compile/planning/align.py) costs a calibrated plan.

    python benchmarks/align_cost.py                         # SmolLM2-135M, O1 at beta 3 and the paper's 1.3
    python benchmarks/align_cost.py --model <path> --betas 3

Alignment pads each group to the largest flattened width K' among its copies in the other decoder blocks,
so that regional compilation compiles one body for all of them.  The padded columns are zeros: the values
do not change, but every GEMM of a padded layer multiplies them.  For each beta (the flatten threshold, which
sets K'), the model is calibrated once with alignment off and the same groups are then aligned; the table
gives, summed over the quantized layers: flattened columns K' (over groups), multiply-adds per token
(sum of N x K', what prefill pays) and INT8 weight bytes (what a decode step reads), unaligned and aligned.
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


def macs(plan, groups) -> int:
    """Multiply-adds per token of the plan's flattened layers under `groups`' widths: sum of N x K'."""
    return sum(lp.out_features * groups[lp.group].flat_features for lp in plan.layers.values())


def row(beta: float, plan) -> list:
    aligned = copy.deepcopy(plan.groups)
    report = align_groups(aligned)
    before, after = macs(plan, plan.groups), macs(plan, aligned)
    cols_b = sum(g.flat_features for g in plan.groups.values())
    cols_a = sum(g.flat_features for g in aligned.values())
    flat = sum(float(g.extra.sum()) for g in plan.groups.values()) / sum(g.in_features for g in plan.groups.values())
    return [beta, f"{100 * flat:.1f}%", len(report.positions), f"{cols_b} -> {cols_a}", f"{cols_a / cols_b:.3f}x",
            f"{before / 1e6:.1f}M -> {after / 1e6:.1f}M", f"{after / before:.3f}x"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=SMOLLM2_ALIAS)
    ap.add_argument("--betas", default="3,1.3", help="flatten threshold coefficients, comma-separated")
    ap.add_argument("--calib", type=int, default=16, help="calibration windows of 512 tokens")
    ap.add_argument("--out", default=None, help="also write the table (markdown) here")
    args = ap.parse_args(argv)

    loaded = load_model(args.model)
    batches = calibration_batches(loaded.tokenizer, n=args.calib)
    rows = []
    for beta in [float(b) for b in args.betas.split(",")]:
        plan = fq_compile.calibrate(loaded.model, batches, Config(level="O1", beta=beta, align_blocks=False))
        rows.append(row(beta, plan))
        print(rows[-1], flush=True)
    table = tabulate(rows, headers=["beta", "flattened channels", "aligned positions", "K' summed", "ratio",
                                    "multiply-adds / token", "ratio (prefill compute, decode bytes)"],
                     tablefmt="github")
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
