"""Where a decode step's wall time goes on the host (issue 23): one method, one OPT shape, batch 1.

    python benchmarks/device/decode_host.py --model 1.3b --method fq-O3 [--tokens 32] [--out DIR]

After the first generate() (timed, with Dynamo's compile-time table) and a warm one, these looks at
the same warm generate of --tokens new tokens:
  1. wall time per token, no instrumentation; then where the host waits for the GPU (torch.cuda's sync
     debug mode, per Python line) and what it issues per token (compiled regions, CUDA-graph replays,
     launches outside graphs, synchronizations);
  2. GPU busy time per token from a CUDA-only torch.profiler trace (no CPU op tracing, which would
     slow the host and inflate the idle figure), union of kernel intervals;
  3. cProfile of the host side: the functions with the most own time and most cumulative time per
     token (HF generate's loop, Dynamo guards, our runtime, CUDA graph replays, syncs).
Models come from benchmarks/e2e.py (random weights, the paper's Table 4 plan shares); rows are written
to --out/decode-host-<method>-<model>.md as they finish.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks import e2e  # noqa: E402
from fq_compile.kernels import stopwatch  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="1.3b")
    ap.add_argument("--method", default="fq-O3")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--out", default=".")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--device", default="cuda", help="cpu with --model tiny: a check of the script, not a figure")
    ap.add_argument("--dynamic", choices=["none", "true"], default="none",
                    help="torch.compile dynamic: none (Dynamo's default, what e2e.py's decode rows and users get) or "
                         "true (float attributes become graph inputs, wrapped into tensors on every call)")
    ap.add_argument("--defer-stop", choices=["default", "off"], default="default",
                    help="ours: options defer_stop (default True); off: the host waits for every step")
    args = ap.parse_args(argv)
    out = Path(args.out) / f"decode-host-{args.method}-{args.model}.md"
    lines = [f"# Decode host profile: {args.method}, OPT-{args.model} shape, batch 1, {args.tokens} new tokens", "",
             f"{torch.cuda.get_device_name() if args.device == 'cuda' else 'CPU'}, torch {torch.__version__}; command: python {' '.join(sys.argv)}", ""]

    def emit(*text):
        lines.extend(text)
        out.write_text("\n".join(lines) + "\n")
        print(*text, sep="\n", flush=True)

    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    opts = SimpleNamespace(dynamic_flag=True if args.dynamic == "true" else None, batches=[], seqs=[], profile=False,
                           decode=[1], max_autotune=False, auto_formats=None, gemm=None, cudagraphs="auto",
                           defer_stop=args.defer_stop)
    e2e.watch_stop_checks()
    t = time.monotonic()
    model, plan, info = e2e.prepare(args.method, args.model, dev, torch.float16, opts)
    emit(f"prepare (build + plan + compile wrapper): {time.monotonic() - t:.1f} s; {info}")
    ids = torch.randint(0, min(1000, model.config.vocab_size), (1, args.prompt), generator=torch.Generator().manual_seed(0)).to(dev)
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=args.tokens, min_new_tokens=args.tokens,
              do_sample=False, use_cache=True, pad_token_id=1)
    if args.method != "fp16-eager":
        kw["cache_implementation"] = "static"
    before = e2e.compile_counts()
    stopwatch.reset()
    t = time.monotonic()
    model.generate(ids, **kw)
    sync()
    first = time.monotonic() - t
    emit(f"first generate(): {first:.1f} s; {e2e.compile_counts(before)}", "",
         "Its stages (fq_compile/kernels/stopwatch.py, each stage's own seconds):", "", "```",
         stopwatch.table(first), "```", "", "Dynamo's compile-time table:", "", "```",
         torch._dynamo.utils.compile_times(repr="str", aggregate=True)[:4000], "```", "")
    # the second call apart: on the H100 it was ~600 ms slower than the later ones at 13B (results/
    # e2e-decode-13b-2026-12-07-h100.md); its GPU-busy share says whether the GPU or the host took it
    from torch.profiler import ProfilerActivity, profile

    before = e2e.compile_counts()
    acts = [ProfilerActivity.CUDA] if dev.type == "cuda" else [ProfilerActivity.CPU]
    with profile(activities=acts) as prof2:
        t = time.monotonic()
        model.generate(ids, **kw)
        sync()
        second = time.monotonic() - t
    busy2 = _busy_ms(prof2)
    emit(f"second generate(): {second * 1e3:.1f} ms (GPU busy {busy2:.1f} ms); {e2e.compile_counts(before)}", "")

    n = args.tokens

    def per_token(label):
        """Three warm generate() calls, ms per token each; the line says their median and each."""
        walls = []
        for _ in range(3):
            t = time.monotonic()
            model.generate(ids, **kw)
            sync()
            walls.append((time.monotonic() - t) * 1e3 / n)
        wall = sorted(walls)[1]
        return (f"{label}: {wall:.3f} ms/token = {1e3 / wall:.1f} tok/s (median of 3, prefill included in the mean); "
                f"calls {', '.join(f'{w:.3f}' for w in walls)} ms/token")

    emit(per_token("wall per token") + f"; stop check deferred: {bool(e2e.STOP_CHECKS['deferred'])}")
    # Dynamo's guard evaluation per call (CPU, 40-layer OPT at hidden 64 through this backend: 2.1-2.6 ms a
    # call, 0.27 ms with skip_guard_eval_unsafe: benchmarks/guard_cost.py): what skipping it would give here
    label = "the same with torch.compiler.set_stance(skip_guard_eval_unsafe=True) (not what users get)"
    try:
        with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
            emit(per_token(label))
    except RuntimeError as e:      # H100, 2026-12-07: "Recompilation triggered with skip_guard_eval_unsafe stance"
        emit(f"{label}: unavailable ({str(e).splitlines()[0]})")
    if dev.type == "cuda":
        emit(*host_syncs(model, ids, kw, n=args.tokens), *step_calls(model, ids, kw, n=args.tokens))

    pr = cProfile.Profile()
    pr.enable()
    model.generate(ids, **kw)
    sync()
    pr.disable()
    for key in ("tottime", "cumulative"):
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats(key).print_stats(args.top)
        body = s.getvalue()
        emit(f"## cProfile, sorted by {key} ({n} tokens; divide by {n} for per token)", "", "```",
             body[body.find("ncalls"):][:12000], "```", "")

    if dev.type != "cuda":
        return

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t = time.monotonic()
        model.generate(ids, **kw)
        sync()
        pwall = (time.monotonic() - t) * 1e3 / n
    spans = _spans(prof)
    busy = _busy_ms(prof) / n
    emit(f"CUDA-only trace: wall {pwall:.3f} ms/token, GPU busy {busy:.3f} ms/token "
         f"({100 * busy / pwall:.0f}%), idle {pwall - busy:.3f} ms/token; {len(spans) // n} kernels/token", "")
    per_name: dict[str, list[float]] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.elapsed_us() > 0:
            per_name.setdefault(e.name[:100], []).append(e.time_range.elapsed_us())
    rows = sorted(per_name.items(), key=lambda kv: -sum(kv[1]))[:args.top]
    emit(f"## GPU kernels by total time ({args.top} largest; us per token, launches per token, median us per launch)",
         "", "| kernel | us/token | launches/token | median us |", "|---|---|---|---|",
         *(f"| `{k}` | {sum(v) / n:.1f} | {len(v) / n:.1f} | {sorted(v)[len(v) // 2]:.1f} |" for k, v in rows), "")


def host_syncs(model, ids, kw, n: int) -> list[str]:
    """Where the host waits for the GPU inside one warm generate(): torch.cuda's sync debug mode warns at
    every synchronizing CUDA call (item() of a GPU tensor, .cpu(), a blocking copy); counted per Python
    line.  With the deferred stop check a step should have none: any line here holds the host back."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            model.generate(ids, **kw)
            torch.cuda.synchronize()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    where: dict[str, int] = {}
    for w in caught:
        if "synchroniz" in str(w.message):
            key = f"{Path(w.filename).name}:{w.lineno}"
            where[key] = where.get(key, 0) + 1
    rows = sorted(where.items(), key=lambda kv: -kv[1])
    return [f"## Host waits for the GPU in one generate() ({n} tokens; torch.cuda.set_sync_debug_mode)", "",
            "| where (Python line) | synchronizing calls | per token |", "|---|---|---|",
            *(f"| `{k}` | {c} | {c / n:.2f} |" for k, c in rows[:20]), "" if rows else "none", ""]


def step_calls(model, ids, kw, n: int) -> list[str]:
    """What the host issues per token (a CPU + CUDA trace): compiled regions entered, CUDA-graph replays,
    kernel launches outside graphs, host-side synchronizations: one replay and nothing else is the goal."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        model.generate(ids, **kw)
        torch.cuda.synchronize()
    keys = {"compiled regions entered": ("Torch-Compiled Region",), "CUDA-graph launches": ("cudaGraphLaunch",),
            "kernel launches outside CUDA graphs": ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"),
            "host synchronizations": ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize"),
            "memcpy calls": ("cudaMemcpyAsync", "cudaMemcpy")}
    counts = {k: 0 for k in keys}
    guard_us = 0.0
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            continue
        if e.name == "TorchDynamo Cache Lookup":          # Dynamo's guard evaluation before each compiled call
            guard_us += e.cpu_time_total
        for k, names in keys.items():
            if e.name.startswith(names):
                counts[k] += 1
    return [f"## Host calls per token (CPU + CUDA trace of one generate(), {n} tokens; the prefill included)", "",
            "| what | per token |", "|---|---|", *(f"| {k} | {v / n:.2f} |" for k, v in counts.items()),
            f"| Dynamo guard evaluation (TorchDynamo Cache Lookup), ms | {guard_us / 1e3 / n:.3f} |", ""]


def _spans(prof):
    return sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                  if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.elapsed_us() > 0)


def _busy_ms(prof) -> float:
    """GPU milliseconds covered by at least one kernel (the union of the kernels' intervals)."""
    busy, end = 0.0, None
    for a, b in _spans(prof):
        busy += max(0, b - max(a, end if end is not None else a))
        end = b if end is None else max(end, b)
    return busy / 1e3


if __name__ == "__main__":
    main()
