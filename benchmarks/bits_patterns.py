"""What limiting the blocks' INT4/INT8 patterns (Config.bits_patterns, planning/bit_patterns.py) keeps of INT4.

    python benchmarks/bits_patterns.py                                   # SmolLM2-135M, O3, k = 1..4, PPL off vs 4
    python benchmarks/bits_patterns.py --ppl-ks 0 --ks 1,2,3,4,6         # the pattern table and the off PPL only

Regional compilation compiles one body per distinct per-block bit pattern; Eq. 8 gives a calibrated O2/O3 plan
many.  The model is calibrated at --level with the limit off (bits_patterns=0): its Eq. 8 bits give the table's
first row, and `limit_patterns` applied to those same bits gives the rows for each k in --ks -- what the planner
does with Config(bits_patterns=k), since it limits Eq. 8's bits before quantizing (checked: every config of
--ppl-ks is also calibrated with the limit on, and its bits must equal the table's).  Columns: distinct
patterns over the blocks (compiled bodies), INT4 share of the layers and of the linear weights (N x K),
layers promoted.  --ppl-ks: perplexity on held-out WikiText-2 *validation* windows (disjoint from the
calibration windows: the selection protocol, never the test split) for those k (0: off).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path

import torch
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.provenance import git_rev  # noqa: E402
from fq_compile import Config  # noqa: E402
from fq_compile.planning.bit_patterns import limit_patterns  # noqa: E402
from fq_compile.planning.calibrate import calibrate  # noqa: E402
from fq_compile.tools.data import calibration_batches, selection_tokens  # noqa: E402
from fq_compile.tools.evaluate import evaluate_config  # noqa: E402
from fq_compile.tools.models import SMOLLM2_ALIAS, load_model  # noqa: E402


def inputs_of(plan):
    """(bits, size N x K, group) per planned layer: what the planner hands limit_patterns."""
    return ({n: lp.bits for n, lp in plan.layers.items()},
            {n: lp.out_features * lp.in_features for n, lp in plan.layers.items()},
            {n: lp.group for n, lp in plan.layers.items()})


def table_rows(plan, ks: list[int]) -> tuple[list[list], dict[int, dict[str, int]]]:
    """One row per k (0: Eq. 8's bits as calibrated) and the bits each k gives."""
    bits, size, group = inputs_of(plan)
    rows, out = [], {}
    for k in ks:
        new, rep = limit_patterns(bits, size, group, k)
        out[k] = new
        rows.append(["off" if k == 0 else k, rep.blocks, rep.patterns_after if k else rep.patterns_before,
                     f"{100 * rep.share('layers', 'after'):.1f}%", f"{100 * rep.share('size', 'after'):.1f}%",
                     len(rep.promoted), "yes" if rep.exact else "greedy"])
    return rows, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=SMOLLM2_ALIAS)
    ap.add_argument("--level", default="O3", choices=["O2", "O3"])
    ap.add_argument("--ks", default="1,2,3,4", help="pattern limits for the table, comma-separated")
    ap.add_argument("--ppl-ks", default="0,4", help="limits to calibrate and measure perplexity for (0: off); "
                                                    "empty: the table only")
    ap.add_argument("--calib", type=int, default=16, help="calibration windows of 512 tokens")
    ap.add_argument("--windows", type=int, default=4, help="held-out validation windows of 2048 tokens")
    ap.add_argument("--out", default=None, help="also write the markdown here")
    args = ap.parse_args(argv)

    loaded = load_model(args.model)
    batches = calibration_batches(loaded.tokenizer, n=args.calib)
    tokens = selection_tokens(loaded.tokenizer, n=args.windows) if args.ppl_ks else None
    ppl_ks = [int(k) for k in args.ppl_ks.split(",") if k != ""]
    results = {}
    t = time.time()
    torch._dynamo.reset()                  # each configuration from empty Dynamo caches (evaluate_config's note)
    if 0 in ppl_ks:
        results[0] = evaluate_config(loaded.model, batches, tokens, Config(level=args.level, bits_patterns=0))
        off = results[0]["plan"]
    else:
        off = calibrate(loaded.model, batches, Config(level=args.level, bits_patterns=0))
    print(f"off: {time.time() - t:.0f} s", flush=True)
    ks = [0] + [int(k) for k in args.ks.split(",") if k]
    rows, predicted = table_rows(off, sorted(set(ks) | set(ppl_ks)))
    rows = [r for r, k in zip(rows, sorted(set(ks) | set(ppl_ks))) if k in ks]
    ppl_rows = []
    for k in ppl_ks:
        if k not in results:
            torch._dynamo.reset()
            t = time.time()
            results[k] = evaluate_config(loaded.model, batches, tokens, Config(level=args.level, bits_patterns=k))
            print(f"k={k}: {time.time() - t:.0f} s", flush=True)
        plan = results[k]["plan"]
        bits = {n: lp.bits for n, lp in plan.layers.items()}
        if bits != predicted[k]:
            raise SystemExit(f"bits_patterns={k}: the calibrated plan's bits differ from limit_patterns on the off "
                             "plan's Eq. 8 bits")
        r = results[k]
        ppl_rows.append(["off" if k == 0 else k, f"{r['ppl']:.3f}",
                         f"{100 * (r['ppl'] / results[ppl_ks[0]]['ppl'] - 1):+.2f}%" if k != ppl_ks[0] else "-",
                         f"{100 * r['int4']:.1f}%", f"{100 * r['int4_weights']:.1f}%",
                         f"{r['weight_bytes'] / 2**20:.1f} MiB ({r['weight_bytes'] / r['fp16_bytes']:.3f}x)",
                         plan.calibration.get("bits_patterns", "-").removeprefix("bit patterns: ")])
    head = (f"model: {args.model}; level {args.level}; calibration: {args.calib} random windows of 512 tokens "
            f"(seed 0), WikiText-2 validation; date: {datetime.date.today()}; device: CPU ({platform.machine()}, "
            f"{torch.get_num_threads()} threads); torch {torch.__version__}; git {git_rev()}\n"
            f"command: python benchmarks/bits_patterns.py {' '.join(argv if argv is not None else sys.argv[1:])}\n")
    text = head + "\n## Per-block bit patterns against the limit k (Eq. 8's bits of the off plan, limited)\n\n" + \
        tabulate(rows, headers=["k", "blocks", "bit patterns (bodies)", "INT4 layers", "INT4 weights (N x K)",
                                "layers promoted", "exact"], tablefmt="github")
    if ppl_rows:
        text += (f"\n\n## Perplexity, {args.windows} held-out validation windows of 2048 tokens (selection protocol, "
                 "not the test split)\n\n" +
                 tabulate(ppl_rows, headers=["k", "PPL", f"vs {'off' if ppl_ks[0] == 0 else ppl_ks[0]}",
                                             "INT4 layers", "INT4 weights", "weight bytes (x fp16)",
                                             "plan.calibration['bits_patterns']"], tablefmt="github"))
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
