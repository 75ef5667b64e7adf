"""What flattening costs the GEMMs, layer by layer (issue 13, part 3): the flatten ratio of every
activation group, its flattened width K' padded to 32 (the paper) and to the GEMM's K tile (128),
and the K tiles the GEMM then runs over against the unflattened layer's.

    python benchmarks/flatten.py --smollm2 --out benchmarks/results/flatten-smollm2-135m-cpu.md
    python benchmarks/flatten.py --synthetic 6.7b,13b,30b --out benchmarks/results/flatten-synthetic.md

  --smollm2     calibrates the real SmolLM2-135M (O1, CPU, WikiText-2 validation windows) and reads
                the plan: the measured ratios of a real model.
  --synthetic   OPT shapes with the synthetic plans e2e.py times (fq_compile/tools/synthetic.py: the
                paper's Table 4 flatten ratio for that size, half on a few outlier channels, half as
                single slices), built from the shapes alone (no weights needed).

GEMM time follows K tiles: CUTLASS and Triton's TMA kernel read a partial last tile as zeros, so
K' = 6240 costs the same 49 tiles as 6272.  Padding K' up to the tile therefore adds no GEMM work,
only activation and weight bytes ((128 - 32) columns at most), and buys mask-free loads for the
Triton pointer kernel; the table shows both widths so the cost of each is visible per layer.
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import shlex
import sys
from pathlib import Path

import torch
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fq_compile.planning.flatten import channel_map  # noqa: E402
from fq_compile.tools.synthetic import PAPER_TABLE4, _extra_counts  # noqa: E402

K_TILE = 128


def tiles(k: int) -> int:
    return math.ceil(k / K_TILE)


def row(name: str, n: int, c: int, extra: int, kp32: int, kp_tile: int) -> list:
    return [name, f"{n}x{c}", extra, f"{100 * extra / c:.1f}%", kp32, kp_tile, f"{tiles(c)} -> {tiles(kp32)}",
            f"+{100 * (tiles(kp32) / tiles(c) - 1):.1f}%", f"+{100 * (kp32 / c - 1):.1f}%",
            f"+{100 * (kp_tile - kp32) / kp32:.1f}%"]


HEAD = ["layer group", "N x C", "extra ch", "flatten ratio", "K' (pad 32)", "K' (pad 128)", "K tiles",
        "GEMM work (tiles)", "bytes (K', pad 32)", "pad 128 adds bytes"]


def totals(rows_raw) -> list[list]:
    """N-weighted totals over (n, c, kp32, kp_tile) of every layer."""
    work = sum(n * tiles(c) for n, c, _, _ in rows_raw)
    work_f = sum(n * tiles(k) for n, _, k, _ in rows_raw)
    b = sum(n * c for n, c, _, _ in rows_raw)
    b32 = sum(n * k for n, _, k, _ in rows_raw)
    b128 = sum(n * k for n, _, _, k in rows_raw)
    return [["GEMM work added (K tiles, N-weighted)", f"+{100 * (work_f / work - 1):.1f}%"],
            ["columns added (weights, activations), pad 32", f"+{100 * (b32 / b - 1):.1f}%"],
            ["columns added (weights, activations), pad 128", f"+{100 * (b128 / b - 1):.1f}%"]]


def synthetic(size: str, seed: int = 0):
    """Per group position of one OPT block (extras are drawn per block; blocks differ only in which
    channels carry them, so one block shows every width)."""
    from fq_compile.tools.models import opt_config

    cfg = opt_config(f"opt-{size}")
    h, f = cfg.hidden_size, cfg.ffn_dim
    ratio = PAPER_TABLE4[size][1]
    gen = torch.Generator().manual_seed(seed)
    out, raw = [], []
    for name, n, c in (("q/k/v", 3 * h, h), ("out_proj", h, h), ("fc1", f, h), ("fc2", h, f)):
        extra = _extra_counts(c, round(ratio * c), gen)
        kp32 = channel_map(extra, None, 32).size
        kp_tile = channel_map(extra, None, K_TILE).size
        out.append(row(name, n, c, int(extra.sum()), kp32, kp_tile))
        raw.append((n, c, kp32, kp_tile))
    return out, raw, ratio


def smollm2(calib_batches: int, seqlen: int, data_dir=None):
    import fq_compile
    from fq_compile.tools.data import calibration_batches
    from fq_compile.tools.models import load_model

    lm = load_model("smollm2-135m")
    calib = calibration_batches(lm.tokenizer, n=calib_batches, seqlen=seqlen, data_dir=data_dir)
    plan = fq_compile.calibrate(lm.model, calib, fq_compile.Config(level="O1"), progress=True)
    out, raw = [], []
    for g in plan.groups.values():
        n = sum(plan.layers[layer].out_features for layer in g.layers)
        extra = int(g.extra.sum() + g.weight_dup.sum())
        kp32 = g.flat_features
        kp_tile = kp32 + (-kp32) % K_TILE
        out.append(row(g.name, n, g.in_features, extra, kp32, kp_tile))
        raw.append((n, g.in_features, kp32, kp_tile))
    return out, raw, plan


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smollm2", action="store_true", help="calibrate SmolLM2-135M (O1, CPU) and report its plan")
    ap.add_argument("--synthetic", default="", help="comma list of OPT sizes (6.7b,13b,30b) for the synthetic plans")
    ap.add_argument("--calib-batches", type=int, default=16)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--data-dir", default=None, help="WikiText-2 folder (default: $FQ_DATA_DIR or ../shared/data)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    lines = ["# Flatten ratio and K' overhead per layer (issue 13, part 3)", "",
             f"date: {datetime.date.today()}; machine: CPU ({platform.machine()}); torch {torch.__version__}",
             f"command: python benchmarks/flatten.py {shlex.join(sys.argv[1:] if argv is None else argv)}", "",
             "K tiles: the GEMM's 128-wide K steps over the original C and over K' (what GEMM time follows); "
             "bytes: activation and weight columns, K'/C.", ""]
    if args.smollm2:
        out, raw, plan = smollm2(args.calib_batches, args.calib_seqlen, args.data_dir)
        mean = sum(g.flatten_ratio for g in plan.groups.values()) / len(plan.groups)
        lines += [f"## SmolLM2-135M, O1, calibrated on {args.calib_batches} x {args.calib_seqlen} WikiText-2 "
                  f"validation tokens (mean flatten ratio {100 * mean:.1f}%)", "",
                  tabulate(out, HEAD, tablefmt="github", disable_numparse=True), "",
                  tabulate(totals(raw), ["total", ""], tablefmt="github"), ""]
    for size in [s.strip() for s in args.synthetic.split(",") if s.strip()]:
        out, raw, ratio = synthetic(size)
        lines += [f"## OPT-{size}, synthetic plan (paper Table 4 flatten ratio {100 * ratio:.1f}%), one block", "",
                  tabulate(out, HEAD, tablefmt="github", disable_numparse=True), "",
                  tabulate(totals(raw), ["total", ""], tablefmt="github"), ""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
