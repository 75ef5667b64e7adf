"""Issue 24: which GEMM should an FP8 layer of an fp16 model run?  Prefill shapes of OPT-13B.

    python benchmarks/fp8_gemm.py [--ms 16384,2048] [--ratio 0.013] [--out fp8-gemm.md]

On the 13B prefill row of 2026-12-07 (H100, results/e2e-prefill-13b-2026-12-07-h100-076f56c.md) `auto`
with 19% of its layers FP8 took 578.7 ms against O1's 530.2 (all flattened INT8) and naive FP8's 491.5.
In an fp16 model our FP8 layers ran the Triton FP8 GEMM (kernels/triton/fp8.py, fp8_gemm_choice: cuBLAS
applies a per-channel scale in its epilogue only with row-wise scaling, then believed to give bfloat16
output only), while naive FP8 calls cuBLAS with per-tensor scales straight into fp16.  This table's first
H100 run (results/fp8-gemm-2026-12-07-h100-970198a.md) found row-wise into fp16 taken by torch 2.11 and
1.6-1.8x faster than the Triton GEMM; fp8_gemm_choice's auto takes it since.  This table times, per layer
shape and M, the GEMM alone (the activation already e4m3 / int8; fp16 out, bias, per-channel weight
scales; CUDA-graph replays, inputs rotated past L2 as in kernel_bench.py):

  naive        torch._scaled_mm, per-tensor scales, fp16 out (what fp8-naive runs per layer)
  triton       fq::fp8_linear's Triton GEMM, fp16 out (FQ_FP8_GEMM=triton; auto's choice before 2026-12-08)
  cublas+pass  torch._scaled_mm into float32, then scale and bias as one element-wise pass (FQ_FP8_GEMM=scaled_mm)
  rowwise bf16 torch._scaled_mm with row-wise scales into bfloat16 (what a bfloat16 model's FP8 layers run)
  rowwise fp16 the same into fp16, where this torch allows it ("refused" otherwise: the probe);
               auto's choice for fp16 models where it is allowed
  int8 K'      fq::int8_linear on the flattened K' with per-token scales (O1's GEMM at the given flatten
               ratio; the dispatch table's choice of CUTLASS / Triton)

and each as a ratio to naive.  It answers which kernel our FP8 layers should call in fp16 models
(and whether `auto` can ever beat naive FP8 with them), before any per-layer profile.
--smoke runs the table's plumbing on the CPU with the reference ops (times meaningless).
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import fq_compile.kernels  # noqa: E402,F401  (registers the fq:: ops and their CUDA implementations)
from kernel_bench import n_sets, try_time  # noqa: E402
from provenance import git_rev  # noqa: E402

LAYERS = [("13B qkv/out", 5120, 5120), ("13B fc1", 5120, 20480), ("13B fc2", 20480, 5120)]   # name, K, N
COLUMNS = ["naive", "triton", "cublas+pass", "rowwise bf16", "rowwise fp16", "int8 K'"]


def flat_width(k: int, ratio: float) -> int:
    """K' for a flatten ratio, padded to 32 as the channel maps are."""
    return 32 * math.ceil(k * (1 + ratio) / 32)


def _timer(device):
    """kernel_bench.py's try_time on CUDA (CUDA-graph replays; None where the call is refused); a plain
    wall-clock mean on the CPU (--smoke)."""
    if device.type == "cuda":
        return try_time

    def cpu_time(make):
        calls = make()
        t = time.perf_counter()
        for c in calls:
            c()
        return 1e3 * (time.perf_counter() - t) / len(calls)
    return cpu_time


def bench_shape(k: int, n: int, m: int, ratio: float, device, timer) -> dict:
    """ms per call of every column at one shape."""
    f16, e4m3 = torch.float16, torch.float8_e4m3fn
    ns = n_sets(m * k + n * k + 2 * m * n)
    xs = [torch.randn(m, k, device=device).clamp(-400, 400).to(e4m3) for _ in range(ns)]
    ws = [torch.randn(n, k, device=device).clamp(-400, 400).to(e4m3) for _ in range(ns)]
    scale = torch.rand(n, device=device) * 1e-4 + 1e-5
    bias = torch.randn(n, device=device, dtype=f16)
    one = torch.ones((), device=device)
    ones_m = torch.ones((m, 1), device=device)
    r = {}
    if device.type == "cuda":
        from fq_compile.kernels.triton import fp8 as tf

        r["naive"] = timer(lambda: [lambda a=a, b=b: torch._scaled_mm(a, b.t(), scale_a=one, scale_b=one, bias=bias,
                                                                       out_dtype=f16) for a, b in zip(xs, ws)])
        r["triton"] = timer(lambda: [lambda a=a, b=b: tf.fp8_gemm_triton(a, b, scale, bias, f16, int4_w=False)
                                     for a, b in zip(xs, ws)])

        def cublas_pass(a, b):
            acc = torch._scaled_mm(a, b.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
            return (acc * scale + bias.float()).to(f16)
        r["cublas+pass"] = timer(lambda: [lambda a=a, b=b: cublas_pass(a, b) for a, b in zip(xs, ws)])
        for col, dt in (("rowwise bf16", torch.bfloat16), ("rowwise fp16", f16)):
            r[col] = timer(lambda dt=dt: [lambda a=a, b=b: torch._scaled_mm(a, b.t(), scale_a=ones_m,
                                                                             scale_b=scale.reshape(1, n), out_dtype=dt)
                                          for a, b in zip(xs, ws)])
    else:                     # --smoke: the reference op in every column's place
        ref = lambda a, b: torch.ops.fq.fp8_linear(a, b, scale, bias, f16)  # noqa: E731
        for col in COLUMNS[:-1]:
            r[col] = timer(lambda: [lambda a=a, b=b: ref(a, b) for a, b in zip(xs, ws)])
    xs = ws = None            # free the e4m3 sets before the int8 ones
    kp = flat_width(k, ratio)
    ns8 = n_sets(m * kp + n * kp + 2 * m * n)
    xq = [torch.randint(-127, 128, (m, kp), device=device, dtype=torch.int8) for _ in range(ns8)]
    wq = [torch.randint(-127, 128, (n, kp), device=device, dtype=torch.int8) for _ in range(ns8)]
    row = torch.rand(m, device=device) * 1e-2 + 1e-3                # per-token scales (O1's default)
    r["int8 K'"] = timer(lambda: [lambda a=a, b=b: torch.ops.fq.int8_linear(a, b, scale, bias, f16, row_scale=row)
                                  for a, b in zip(xq, wq)])
    return r


def table(results: list[tuple[str, int, int, int, dict]], ratio: float) -> str:
    from tabulate import tabulate

    rows = []
    for name, k, n, m, r in results:
        base = r.get("naive")
        cells = []
        for col in COLUMNS:
            t = r.get(col)
            if t is None:
                cells.append("refused")   # try_time printed why
            else:
                cells.append(f"{1e3 * t:.0f}us ({base / t:.2f}x)" if base else f"{1e3 * t:.0f}us")
        rows.append([f"{name} ({k}->{n}, K' {flat_width(k, ratio)})", m, *cells])
    return tabulate(rows, headers=["layer", "M", *COLUMNS], tablefmt="github", disable_numparse=True)


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ms", default="16384,2048", help="comma-separated M (tokens per GEMM)")
    ap.add_argument("--ratio", type=float, default=0.013, help="flatten ratio of the INT8 column (O1 at beta 3: 0.013)")
    ap.add_argument("--out", default=None, help="write the markdown here too")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, reference ops: the plumbing only")
    args = ap.parse_args(argv)
    if args.smoke:
        device, layers, ms = torch.device("cpu"), [("tiny", 64, 96)], [8]
    else:
        if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
            raise SystemExit("fp8_gemm.py needs a CUDA GPU with FP8 tensor cores (compute capability >= 8.9); "
                             "--smoke checks the script on the CPU")
        device, layers, ms = torch.device("cuda"), LAYERS, [int(x) for x in args.ms.split(",")]
    timer = _timer(device)
    dev_name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (smoke: times meaningless)"
    results, text = [], ""
    for name, k, n in layers:
        for m in ms:
            print(f"{name} M={m}", flush=True)
            results.append((name, k, n, m, bench_shape(k, n, m, args.ratio, device, timer)))
            text = _report(results, dev_name, args, argv)
            if args.out:          # after every shape: a run cut by a time limit keeps what it measured
                Path(args.out).write_text(text)
    print(text)
    return text


def _report(results, dev_name: str, args, argv) -> str:
    return "\n".join([
        "# FP8 GEMM choices for fp16 models (issue 24)", "",
        f"device: {dev_name}, date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"torch {torch.__version__}, tree {os.environ.get('FQ_TREE') or git_rev()}",
        f"command: python benchmarks/fp8_gemm.py {' '.join(argv if argv is not None else sys.argv[1:])}",
        "cells: median time per call (CUDA-graph replays, inputs rotated past 2x L2) and naive's time / the "
        "cell's (>1: faster than naive FP8's GEMM); GEMM alone, fp16 out, bias; 'refused': this torch rejects "
        f"the call; int8 K': flatten ratio {args.ratio}", "",
        table(results, args.ratio), ""])


if __name__ == "__main__":
    main()
