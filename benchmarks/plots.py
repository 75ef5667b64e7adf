"""The README's plots, drawn from committed results files only: re-run it when new results land.

    python benchmarks/plots.py                       # both plots, from the default files below
    python benchmarks/plots.py --accuracy A.json,B.json --kernels benchmarks/results/kernels-X.md

accuracy vs weight bytes (--accuracy): perplexity of each row of one or more runs against its weight
    bytes over fp16's, one series per file.  A file is the JSON that `fq-compile demo --json` writes
    (every parameter counted) or benchmarks/accuracy.py's (the quantized linear layers counted): both
    hold {"runs": {row: {"ppl", "weight_bytes", "fp16_bytes"}}}; rows without bytes are left out, and
    the script says so.
speed vs rows (--kernels): one layer's GEMM time against M = batch x tokens, from benchmarks/kernel_bench.py's
    markdown table, as speed-up over bf16 (on K) for FP8 _scaled_mm, our INT8 and our INT4 linear (on K').

Each PNG names the files it came from; the PNGs go to benchmarks/results/ (--out).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import textwrap
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ACCURACY = RESULTS / "demo-smollm2-135m-cpu-2026-12-06.json"
KERNELS = RESULTS / "kernels-2026-11-23-h100.md"
LAYERS = ("13B qkv/out", "13B fc1")
OURS = ("O1", "O2", "O3", "auto")


def _rel(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(RESULTS.parent.parent))
    except ValueError:
        return str(path)


def accuracy_points(path: Path) -> tuple[list[dict], list[str]]:
    """[{row, ppl, ratio}] of one run, and what was left out."""
    runs = json.loads(Path(path).read_text())["runs"]
    points, left = [], []
    for row, r in runs.items():
        if r.get("ppl") is None:
            continue
        if not r.get("weight_bytes") or not r.get("fp16_bytes"):
            left.append(f"{row} (no weight bytes recorded)")
            continue
        points.append(dict(row=row, ppl=r["ppl"], ratio=r["weight_bytes"] / r["fp16_bytes"]))
    return points, left


def _seconds(cell: str) -> float | None:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", cell.strip())
    return float(m.group(1)) * {"us": 1e-6, "ms": 1e-3, "s": 1.0}[m.group(2)] if m else None


def kernel_rows(path: Path) -> dict[str, list[dict]]:
    """benchmarks/kernel_bench.py's first table: layer -> [{M, bf16, fp8 mm, INT8 lin, INT4 lin} in seconds]."""
    lines = [l for l in Path(path).read_text().splitlines() if l.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    out: dict[str, list[dict]] = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) != len(head) or not cells[1].isdigit():
            break
        row = dict(zip(head, cells))
        out.setdefault(row[head[0]], []).append(
            {"M": int(row["M"]), **{k: _seconds(row[k]) for k in ("bf16", "fp8 mm", "INT8 lin", "INT4 lin")}})
    return out


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy(files: list[Path], png: Path) -> str:
    plt = _plt()
    from matplotlib.ticker import ScalarFormatter

    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    report, series, markers, ppls = [], [], "os^D", []
    for i, path in enumerate(files):
        meta = json.loads(Path(path).read_text())
        points, left = accuracy_points(path)
        placed = []
        for p in sorted(points, key=lambda q: q["ratio"]):
            color = "tab:green" if p["row"].split()[0] in OURS else "tab:gray"
            ax.scatter(p["ratio"], p["ppl"], s=42, color=color, marker=markers[i % len(markers)], zorder=3)
            near = sum(abs(p["ratio"] - x) < 0.12 and abs(p["ppl"] / y - 1) < 0.1 for x, y in placed)
            placed.append((p["ratio"], p["ppl"]))               # close neighbours: labels alternate above / below
            ax.annotate(f"{p['row']} {p['ppl']:.2f}", (p["ratio"], p["ppl"]), textcoords="offset points",
                        xytext=(6, 6 if near % 2 == 0 else -12), fontsize=8)
            ppls.append(p["ppl"])
        report.append(f"{_rel(path)}: " + ", ".join(f"{p['row']} {p['ppl']:.3f} at {p['ratio']:.3f}x" for p in points)
                      + (f"; left out: {', '.join(left)}" if left else ""))
        counted = meta.get("bytes_counted", "the quantized linear layers")
        series.append((f"marker {markers[i % len(markers)]}: " if len(files) > 1 else "data: ")
                      + f"{_rel(path)} ({meta.get('model')}, {meta.get('device')}, "
                      f"{meta.get('windows', '?')} windows; bytes: {counted})")
    ax.set_yscale("log")
    if ppls:
        ax.set_ylim(min(ppls) * 0.93, max(ppls) * 1.12)
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(ScalarFormatter())
    ax.tick_params(axis="y", which="minor", labelsize=7)
    ax.set_xlabel("weight bytes (x fp16)")
    ax.set_ylabel("WikiText-2 test perplexity (log; lower is better)")
    ax.set_title("Accuracy vs weight bytes (green: FlattenQuant levels)", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.set_xlim(0.4, 1.1)
    foot = [line for s_ in series for line in textwrap.wrap(s_, 125)]
    fig.text(0.01, 0.01, "\n".join(foot), fontsize=6, color="dimgray")
    fig.tight_layout(rect=(0, 0.01 + 0.025 * len(foot), 1, 1))
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return "\n".join(report)


def plot_kernels(path: Path, layers, png: Path) -> str:
    plt = _plt()
    rows = kernel_rows(path)
    picked = [name for name in rows if any(name.startswith(l) for l in layers)]
    fig, axes = plt.subplots(1, len(picked), figsize=(4.2 * len(picked), 3.8), sharey=True, squeeze=False)
    for ax, name in zip(axes[0], picked):
        pts = rows[name]
        m = [p["M"] for p in pts]
        for col, label, color in (("fp8 mm", "FP8 torch._scaled_mm (K')", "tab:orange"),
                                  ("INT8 lin", "ours, INT8 linear (K')", "tab:green"),
                                  ("INT4 lin", "ours, INT4 linear (K')", "tab:olive")):
            ax.plot(m, [p["bf16"] / p[col] for p in pts], marker="o", label=label, color=color)
        ax.axhline(1.0, color="tab:blue", lw=1, label="bf16 cuBLAS (K)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("M = batch x tokens (GEMM rows)")
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("speed-up over bf16 (x)")
    axes[0][-1].legend(fontsize=7)
    head = Path(path).read_text().split("\n", 3)
    device = next((l.split("device:", 1)[1].split(",")[0].strip() for l in head if "device:" in l), "?")
    date = next((l.split("date:", 1)[1].split()[0].strip(",") for l in head if "date:" in l), "?")
    fig.suptitle(f"GEMM speed vs rows, {device}, {date}", fontsize=10)
    fig.text(0.01, 0.01, f"data: {_rel(path)} (one GEMM of a layer's shape, not a whole model)", fontsize=6,
             color="dimgray")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return f"{_rel(path)}: " + "; ".join(
        f"{n}: " + ", ".join(f"M={p['M']} INT8 {p['bf16'] / p['INT8 lin']:.2f}x fp8 {p['bf16'] / p['fp8 mm']:.2f}x"
                             for p in rows[n]) for n in picked)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--accuracy", default=str(ACCURACY), help="comma-separated run JSONs ('' skips the plot)")
    p.add_argument("--kernels", default=str(KERNELS), help="a kernel_bench.py markdown result ('' skips the plot)")
    p.add_argument("--layers", default=",".join(LAYERS), help="kernel-table layers to plot (name prefixes)")
    p.add_argument("--out", default=str(RESULTS), help="directory for the PNGs")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files = [Path(f) for f in args.accuracy.split(",") if f.strip()]
    if files:
        png = out / f"plot-accuracy-vs-bytes-{files[0].stem}.png"
        print(f"{png}\n{plot_accuracy(files, png)}")
    if args.kernels:
        png = out / f"plot-gemm-speed-vs-rows-{Path(args.kernels).stem}.png"
        print(f"{png}\n{plot_kernels(Path(args.kernels), [l for l in args.layers.split(',') if l], png)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
