"""First-call compile time against the number of decoder blocks (issue 23: the first generate() call).

    python benchmarks/compile_time.py --layers 2,6,12,24                 # CPU: Inductor's C++ path
    python benchmarks/compile_time.py --layers 2,12,24 --device cuda     # the GPU: Triton code

For each block count: a tiny OPT (benchmarks/e2e.py's `tiny` config, random weights) is compiled with
plain Inductor (`torch.compile(model)`) and with our backend (a synthetic plan of --level at the paper's
Table 4 shares, Inductor on) twice: with regional compilation (fq_compile/passes/regions.py: blocks that are
the same program share one compiled body) and without it (FQ_REGIONS=0, every block compiled); the first
forward on a 1 x 32 prompt is timed, with the stages of fq_compile/kernels/stopwatch.py (our rewrite,
Inductor).  At O1 every block of a synthetic plan is the same program; at O3 the INT4 layers are spread
over depth in at most Config.bits_patterns per-block patterns (--bits-patterns 0: a phase per position, the
plans before that limit: 8 patterns over 40 blocks), and blocks share bodies only where their pattern agrees.  Only code size grows with the block count (the
hidden size stays 64), so the table says how much of a first call is per block and how much of it is ours
compared with plain Inductor's.  Every compile starts from empty Dynamo caches with Inductor's caches off
(force_disable_caches), so nothing is reused between rows; a one-block model of each kind is compiled first,
untimed, so that one-time imports and set-up land in no row.  --cache-dir keeps Inductor's caches (FX graph
and AOTAutograd) on in that directory instead: a second run of the same command then measures warm caches,
what a user's second process sees.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import e2e  # noqa: E402
from benchmarks.provenance import git_rev  # noqa: E402
from fq_compile.kernels import stopwatch  # noqa: E402

# what e2e.prepare reads: a static-shape prefill compile, no knobs
_OPTS = SimpleNamespace(dynamic_flag=False, batches=[1], seqs=[32], profile=False, decode=[], max_autotune=False,
                        auto_formats=None, gemm=None, cudagraphs="auto", flatten_ratio=None, activation_scale=None)


def first_call(layers: int, method: str, device: torch.device, dtype, caches: bool = False,
               regions: bool = True) -> dict:
    """Seconds of the first compiled forward (fresh Dynamo caches) and its stages; the model and its
    compile come from benchmarks/e2e.py (prepare: fp16-inductor, or fq-<level> on a Table 4 synthetic plan);
    regions: our regional compilation on or off."""
    torch._dynamo.reset()
    os.environ["FQ_REGIONS"] = "1" if regions else "0"
    fast, plan, _ = e2e.prepare(method, "tiny", device, dtype, _OPTS, layers=layers)
    ids = torch.randint(0, 512, (1, 32), generator=torch.Generator().manual_seed(0)).to(device)
    import torch._inductor.config as inductor_config

    with inductor_config.patch(force_disable_caches=not caches):
        stopwatch.reset()
        t = time.perf_counter()
        with torch.no_grad():
            fast(input_ids=ids, use_cache=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - t
    stages = stopwatch.totals()
    shared = ""
    if plan is not None:
        from fq_compile.runtime.state import reports

        shared = "; ".join(r.regions.removeprefix("regional compilation: ") for r in reports(plan) if r.regions)
    return dict(wall=wall, inductor=stages.get("Inductor compile", (0.0, 0))[0], rewrite=stages.get("rewrite", (0.0, 0))[0],
                regions=shared)


def _s(x: float, digits: int = 1) -> str:
    """A table cell: the number, or '-' where it was not measured (--regional-only)."""
    return "-" if math.isnan(x) else f"{x:.{digits}f}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--layers", default="2,6,12,24", help="block counts, comma-separated")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cache-dir", default=None,
                    help="keep Inductor's caches on, in this directory (run twice: the second run is the warm one)")
    ap.add_argument("--level", default="O3", choices=["O1", "O3"], help="our synthetic plan's level")
    ap.add_argument("--bits-patterns", type=int, default=None,
                    help="O3: the synthetic plan's Config.bits_patterns (default: Config's; 0: a phase per position, "
                         "the plans before the limit)")
    ap.add_argument("--regional-only", action="store_true",
                    help="time only ours regional (plain Inductor and whole columns left '-'): the cheap comparison")
    ap.add_argument("--out", default=None, help="write the markdown here too")
    args = ap.parse_args(argv)
    _OPTS.bits_patterns = args.bits_patterns
    if args.cache_dir:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(args.cache_dir).resolve())
    caches = bool(args.cache_dir)
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    ours = f"fq-{args.level}"
    if not args.regional_only:
        first_call(1, "fp16-inductor", device, dtype)      # untimed: imports and Inductor's one-time set-up
    first_call(1, ours, device, dtype)
    rows = []
    skipped = dict(wall=math.nan, inductor=math.nan)
    for n in (int(x) for x in args.layers.split(",")):
        plain = skipped if args.regional_only else first_call(n, "fp16-inductor", device, dtype, caches)
        whole = skipped if args.regional_only else first_call(n, ours, device, dtype, caches, regions=False)
        regional = first_call(n, ours, device, dtype, caches, regions=True)
        rows.append([n, _s(plain['wall']), _s(whole['wall']), _s(whole['inductor']),
                     f"{regional['wall']:.1f}", f"{regional['inductor']:.1f}", f"{regional['rewrite']:.1f}",
                     _s(whole['wall'] / plain['wall'], 2), _s(regional['wall'] / plain['wall'], 2),
                     regional["regions"]])
        print(rows[-1], flush=True)
    # per block: the slope between the smallest and largest block counts
    (n0, *a), (n1, *b) = [(r[0], *(float(x) if x != "-" else math.nan for x in (r[1], r[2], r[4])))
                          for r in (rows[0], rows[-1])]
    slope = "" if n1 == n0 else ("per block (slope {} -> {} blocks): plain Inductor {:.2f} s, ours whole {:.2f} s, "
                                 "ours regional {:.2f} s".format(n0, n1, *((y - x) / (n1 - n0) for x, y in zip(a, b))))
    dev = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
    text = "\n".join([
        f"# First-call compile time vs decoder blocks ({dev})", "",
        f"date {datetime.date.today()}, tree {git_rev()}, torch {torch.__version__}; command: python {' '.join(sys.argv)}",
        "Tiny OPT (hidden 64, ffn 256), 1 x 32 prompt, fresh Dynamo caches, Inductor caches "
        + (f"on in {args.cache_dir}" if caches else "off") + f"; ours: {args.level} synthetic "
        "plan (Table 4 shares"
        + (f", Config.bits_patterns={'default' if args.bits_patterns is None else args.bits_patterns}"
           if args.level == "O3" else "")
        + "), Inductor on, whole (FQ_REGIONS=0) and regional (the default). Seconds of the "
        "first forward.", "",
        tabulate(rows, headers=["blocks", "plain Inductor s", "ours whole s", "whole: Inductor s", "ours regional s",
                                "regional: Inductor s", "regional: rewrite s", "whole / plain", "regional / plain",
                                "blocks outlined"], tablefmt="github", disable_numparse=True), "", slope, ""])
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
