"""First-call compile time against the number of decoder blocks (issue 23: the first generate() call).

    python benchmarks/compile_time.py --layers 2,6,12,24                 # CPU: Inductor's C++ path
    python benchmarks/compile_time.py --layers 2,12,24 --device cuda     # the GPU: Triton code

For each block count: a tiny OPT (benchmarks/e2e.py's `tiny` config, random weights) is compiled once with
plain Inductor (`torch.compile(model)`) and once with our backend (O3 synthetic plan at the paper's Table 4
shares, Inductor on), and the first forward on a 1 x 32 prompt is timed, with the stages of
fq_compile/kernels/stopwatch.py (our rewrite, Inductor).  Only code size grows with the block count (the
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


def first_call(layers: int, ours: bool, device: torch.device, dtype, caches: bool = False) -> dict:
    """Seconds of the first compiled forward (fresh Dynamo caches) and its stages; the model and its
    compile come from benchmarks/e2e.py (prepare: fp16-inductor, or fq-O3 on a Table 4 synthetic plan)."""
    torch._dynamo.reset()
    fast, _, _ = e2e.prepare("fq-O3" if ours else "fp16-inductor", "tiny", device, dtype, _OPTS, layers=layers)
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
    return dict(wall=wall, inductor=stages.get("Inductor compile", (0.0, 0))[0], rewrite=stages.get("rewrite", (0.0, 0))[0])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--layers", default="2,6,12,24", help="block counts, comma-separated")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cache-dir", default=None,
                    help="keep Inductor's caches on, in this directory (run twice: the second run is the warm one)")
    ap.add_argument("--out", default=None, help="write the markdown here too")
    args = ap.parse_args(argv)
    if args.cache_dir:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(args.cache_dir).resolve())
    caches = bool(args.cache_dir)
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    first_call(1, False, device, dtype)      # untimed: imports and Inductor's one-time set-up
    first_call(1, True, device, dtype)
    rows = []
    for n in (int(x) for x in args.layers.split(",")):
        plain = first_call(n, False, device, dtype, caches)
        ours = first_call(n, True, device, dtype, caches)
        rows.append([n, f"{plain['wall']:.1f}", f"{ours['wall']:.1f}", f"{ours['inductor']:.1f}", f"{ours['rewrite']:.1f}",
                     f"{ours['wall'] / plain['wall']:.2f}"])
        print(rows[-1], flush=True)
    # per block: the slope between the smallest and largest block counts
    (n0, p0, o0), (n1, p1, o1) = [(r[0], float(r[1]), float(r[2])) for r in (rows[0], rows[-1])]
    slope = "" if n1 == n0 else (f"per block (slope {n0} -> {n1} blocks): plain Inductor {(p1 - p0) / (n1 - n0):.2f} s, "
                                 f"ours {(o1 - o0) / (n1 - n0):.2f} s")
    dev = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
    text = "\n".join([
        f"# First-call compile time vs decoder blocks ({dev})", "",
        f"date {datetime.date.today()}, tree {git_rev()}, torch {torch.__version__}; command: python {' '.join(sys.argv)}",
        "Tiny OPT (hidden 64, ffn 256), 1 x 32 prompt, fresh Dynamo caches, Inductor caches "
        + (f"on in {args.cache_dir}" if caches else "off") + "; ours: O3 synthetic "
        "plan (Table 4 shares), Inductor on. Seconds of the first forward.", "",
        tabulate(rows, headers=["blocks", "plain Inductor s", "ours s", "ours: Inductor s", "ours: rewrite s",
                                "ours / plain"], tablefmt="github", disable_numparse=True), "", slope, ""])
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
