"""Kernel benchmark for issue 3: FlattenQuant INT8 / INT4 linear layers vs cuBLAS on one GPU.

    python benchmarks/kernel_bench.py [--quick] [--out results.md]
    python benchmarks/kernel_bench.py --cutlass [--write-table gemm_table.json] [--shapes ...] [--ms ...]
    python benchmarks/kernel_bench.py --merge-tables a.json b.json --write-table fq_compile/kernels/gemm_table.json
    python benchmarks/kernel_bench.py --fusion [--fusion-shape 16384,4096] [--out fusion.md]
    python benchmarks/kernel_bench.py --decode [--ms 1,16,64] [--out decode.md]     # issue 10: weight streaming

For each linear shape (the paper's Table 5 case and OPT-13B/30B/66B layers) and M in
{1, 16, 256, 2048, 16384} it times, with CUDA-graph replays (triton.testing.do_bench_cudagraph) and inputs rotated
so that the working set exceeds L2:
  bf16     torch.nn.functional.linear on the ORIGINAL K (the layer being replaced)
  int_mm   torch._int_mm on the flattened K' (int32 out, no quantize, no epilogue)
  fp8      torch._scaled_mm e4m3 on K' (per-tensor scales, bf16 out, no quantize)
  INT8     fq::flatten_quantize (bf16 -> int8 [M, K']) + fq::int8_linear (bias, bf16 out)
  INT4     the same with packed INT4 (weights and activations), GEMM on INT8 tensor cores
  act      the activation kernel alone (INT8 variant), as % of the INT8 GEMM alone
and prints one table.  K' = K + K/4 extended channels rounded to 32 (Table 5: 4096 -> 5120).
A second table (also alone with --fusion) compares, for every producer of a quantized activation in
OPT / Llama blocks (none, LayerNorm, RMSNorm, ReLU, SiLU(gate) * up, residual add, transpose copy),
our Triton quantize kernel after the producer's own kernel against `fq::flatten_quantize_fused`
fused into the producer by Inductor (the two choices of kernels/dispatch.py `decide_quantize`), both
compiled the way the flattenquant backend compiles, checked bit-exact against each other, plus the
ReLU GEMM epilogue against GEMM + ReLU (CUTLASS, when --cutlass).
The INT8/INT4 columns above are the Triton kernels (FQ_GEMM=triton is forced).  --cutlass adds,
measured in the same run on the same inputs:
  C8 / C4  the CUTLASS GEMM alone (bias, bf16 out), best of every tile config (which one: cfg)
  xT       Triton GEMM time / CUTLASS GEMM time (>1: CUTLASS faster)
  best lin flatten_quantize + the faster of the two GEMMs, as ratio to bf16 cuBLAS
--write-table turns these measurements into the dispatch table kernels/dispatch.py reads (per bits,
N, K', M: the faster implementation, CUTLASS only when >= 2% faster, and its best config; keyed by the
GPU's architecture, so it serves every GPU of that architecture), merged into the file when it exists
for the same architecture, rewritten after every case.

--decode (issue 23) times the decode path on the OPT-13B layer shapes at M in {1, 16, 64}:
fq::flat_linear as its tuner chose, every candidate it chose among (kernels/triton/decode.py: the
fused weight-streaming kernel's tilings, the same kernel on a pre-quantized activation,
flatten_quantize + the GEMM op) and fp16 F.linear, as GB/s of weight bytes read per call next to
the device's copy bandwidth measured in the same run (a device-to-device copy, bytes read + written).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import triton
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fq_compile.kernels  # noqa: E402,F401  (registers fq:: ops and the Triton implementations)
from fq_compile.kernels import dispatch as gd  # noqa: E402
from fq_compile.kernels.cutlass import gemm as cg  # noqa: E402
from fq_compile.kernels.packing import pack_int4  # noqa: E402
from fq_compile.kernels.triton import gemm as tg  # noqa: E402

L2_BYTES = 50 * 2**20
MS = [1, 16, 256, 2048, 16384]
# (name, K in, N out)
SHAPES = [
    ("table5 4096x4096", 4096, 4096),
    ("13B qkv/out", 5120, 5120), ("13B fc1", 5120, 20480), ("13B fc2", 20480, 5120),
    ("30B fc1", 7168, 28672), ("30B fc2", 28672, 7168),
    ("66B qkv/out", 9216, 9216), ("66B fc1", 9216, 36864), ("66B fc2", 36864, 9216),
]


def flat_k(k: int) -> int:
    return (k + k // 4 + 31) // 32 * 32


def channel_tables(c: int, kp: int, qmax: int, device):
    """A plausible flatten map: c originals, then (kp - c) extras spread 4 per hot channel."""
    extra = kp - c
    hot = torch.randperm(c)[: max(1, extra // 4)]
    reps = torch.full((hot.numel(),), extra // hot.numel())
    reps[: extra - int(reps.sum())] += 1
    src = torch.cat([torch.arange(c), torch.repeat_interleave(hot, reps)])
    e = torch.zeros(c)
    e[hot] = reps.float()
    slice_idx = torch.cat([torch.arange(int(r)) for r in reps]).float()
    lo = torch.cat([e * qmax, slice_idx * qmax])
    hi = torch.cat([torch.full((c,), float("inf")), torch.full((extra,), float(qmax))])
    mult = (torch.rand(c) + 0.5)[src] * (qmax / 4.0)
    return [t.to(device) for t in (src.to(torch.int32), mult.float(), lo.float(), hi.float())]


def n_sets(bytes_per_set: int) -> int:
    """Input sets to rotate through so one sweep over them is >= 2x L2."""
    return max(1, min(16, math.ceil(2 * L2_BYTES / max(bytes_per_set, 1))))


def _run_all(calls):
    def run():
        for c in calls:
            c()
    return run


def time_graph(calls) -> float:
    """Median ms per call: `calls` (closures, one per input set, rotated so that the working set exceeds
    L2) replayed from a CUDA graph by triton.testing.do_bench_cudagraph (no host launch gaps), divided
    by their number.  Its first, uncaptured call compiles and autotunes."""
    return triton.testing.do_bench_cudagraph(_run_all(calls), rep=150, return_mode="median") / len(calls)


def time_events(calls) -> float:
    """Median ms per call without a CUDA graph (triton.testing.do_bench: host launch gaps included):
    the fallback where capture fails."""
    return triton.testing.do_bench(_run_all(calls), warmup=25, rep=150, return_mode="median") / len(calls)


def try_time(make_calls, eager_fallback=False):
    try:
        return time_graph(make_calls())
    except Exception as e:  # a baseline that refuses the shape (e.g. _int_mm with M <= 16)
        print(f"    skipped: {type(e).__name__}: {str(e).splitlines()[0][:120]}", flush=True)
        if eager_fallback:
            try:
                t = time_events(make_calls())
                print(f"    timed without a CUDA graph: {t:.4f} ms", flush=True)
                return t
            except Exception as e2:
                print(f"    eager timing failed too: {type(e2).__name__}: {str(e2).splitlines()[0][:120]}", flush=True)
        return None


CUTLASS_MARGIN = 0.98  # the table picks CUTLASS only when it takes <= 98% of Triton's time


def bench_cutlass(r, key, bits, operands, bias, lin_calls, configs):
    """Time every CUTLASS config on the operand sets; r[key] = best ms, r[key+'_cfg'] = its config,
    r[key+'_all'] = {config: ms}, r['clin'+bits] = flatten_quantize + the best config."""
    bf16 = torch.bfloat16
    times = {}
    for cfg in configs:
        times[cfg] = try_time(lambda cfg=cfg: [lambda a=a, b=b: cg.cutlass_int_linear(a, b, 1e-3, bias, bf16, bits, config=cfg)
                                              for a, b in operands], eager_fallback=True)
    ok = {c: t for c, t in times.items() if t}
    r[key + "_all"] = times
    r[key], r[key + "_cfg"] = (min(ok.values()), min(ok, key=ok.get)) if ok else (None, None)
    if ok:
        best = r[key + "_cfg"]
        r[f"clin{bits}"] = try_time(lambda: [lambda x=x, b=b: cg.cutlass_int_linear(q(x), b, 1e-3, bias, bf16, bits, config=best)
                                             for q, x, b in lin_calls], eager_fallback=True)


SMALL_M_CONFIGS = ("pp_64x128x128_c1x1", "pp_128x128x128_c1x2", "coop_128x128x128_c2x1")


def bench_case(k, n, m, dev, fp8_variant=True, cutlass_configs=(), baselines=True):
    kp = flat_k(k)
    r = {}
    bf16 = torch.bfloat16
    # inputs per set
    ns = n_sets(m * k * 2 + n * k * 2)
    xs = [torch.randn(m, k, device=dev, dtype=bf16) for _ in range(ns)]
    ws = [torch.randn(n, k, device=dev, dtype=bf16) * 0.02 for _ in range(ns)]
    r["bf16"] = try_time(lambda: [lambda x=x, w=w: torch.nn.functional.linear(x, w) for x, w in zip(xs, ws)])
    del ws

    ns8 = n_sets(m * kp + n * kp + m * n * 4)
    xq = [torch.randint(-127, 128, (m, kp), device=dev, dtype=torch.int8) for _ in range(ns8)]
    wq = [torch.randint(-127, 128, (n, kp), device=dev, dtype=torch.int8) for _ in range(ns8)]
    if baselines:
        r["int_mm"] = try_time(lambda: [lambda a=a, b=b: torch._int_mm(a, b.t()) for a, b in zip(xq, wq)])
        one = torch.ones((), device=dev)
        xf8 = [a.to(torch.float8_e4m3fn) for a in xq]
        wf8 = [b.to(torch.float8_e4m3fn) for b in wq]
        r["fp8"] = try_time(lambda: [lambda a=a, b=b: torch._scaled_mm(a, b.t(), scale_a=one, scale_b=one, out_dtype=bf16)
                                     for a, b in zip(xf8, wf8)])
        del xf8, wf8
    else:
        r["int_mm"] = r["fp8"] = None
    if cutlass_configs and m <= 64:  # skinny M: only the configs with small or ping-pong tiles
        cutlass_configs = tuple(c for c in cutlass_configs if c in SMALL_M_CONFIGS) or cutlass_configs

    bias = torch.randn(n, device=dev)
    src, mult, lo, hi = channel_tables(k, kp, 127, dev)
    # x sets for the full linear; the activation is read once per call
    nsx = n_sets(m * k * 2 + n * kp + m * kp)
    xs_full = [xs[i % len(xs)] for i in range(max(nsx, ns8))]
    fq = torch.ops.fq.flatten_quantize
    r["act8"] = try_time(lambda: [lambda x=x: fq(x, src, mult, lo, hi, 8) for x in xs_full[:nsx]])
    r["gemm8"] = try_time(lambda: [lambda a=a, b=b: torch.ops.fq.int8_linear(a, b, 1e-3, bias, bf16)
                                   for a, b in zip(xq, wq)])
    r["lin8"] = try_time(lambda: [lambda x=x, b=b: torch.ops.fq.int8_linear(fq(x, src, mult, lo, hi, 8), b, 1e-3, bias, bf16)
                                  for x, b in zip(xs_full, wq)])
    if cutlass_configs:
        q8 = lambda x: fq(x, src, mult, lo, hi, 8)  # noqa: E731
        bench_cutlass(r, "c8", 8, list(zip(xq, wq)), bias, [(q8, x, b) for x, b in zip(xs_full, wq)], cutlass_configs)
    del xq, wq

    ns4 = n_sets(m * kp // 2 + n * kp // 2 + m * n * 4)
    xq4 = [pack_int4(torch.randint(-7, 8, (m, kp), device=dev, dtype=torch.int8)) for _ in range(ns4)]
    wq4 = [pack_int4(torch.randint(-7, 8, (n, kp), device=dev, dtype=torch.int8)) for _ in range(ns4)]
    src4, mult4, lo4, hi4 = channel_tables(k, kp, 7, dev)
    xs_full4 = [xs[i % len(xs)] for i in range(ns4)]
    r["gemm4"] = try_time(lambda: [lambda a=a, b=b: torch.ops.fq.int4_linear(a, b, 1e-3, bias, bf16)
                                   for a, b in zip(xq4, wq4)])
    if fp8_variant and baselines:
        r["gemm4_fp8"] = try_time(lambda: [lambda a=a, b=b: tg.int_linear_cuda(a, b, 1e-3, bias, bf16, 4, fp8=True)
                                           for a, b in zip(xq4, wq4)])
    r["lin4"] = try_time(lambda: [lambda x=x, b=b: torch.ops.fq.int4_linear(fq(x, src4, mult4, lo4, hi4, 4), b, 1e-3,
                                                                            bias, bf16)
                                  for x, b in zip(xs_full4, wq4)])
    r["act4"] = try_time(lambda: [lambda x=x: fq(x, src4, mult4, lo4, hi4, 4) for x in xs_full[:nsx]]) if baselines else None
    if cutlass_configs:
        q4 = lambda x: fq(x, src4, mult4, lo4, hi4, 4)  # noqa: E731
        bench_cutlass(r, "c4", 4, list(zip(xq4, wq4)), bias, [(q4, x, b) for x, b in zip(xs_full4, wq4)], cutlass_configs)
    del xq4, wq4, xs
    torch.cuda.empty_cache()
    r["tops8"] = 2 * m * n * kp / (r["gemm8"] * 1e-3) / 1e12 if r.get("gemm8") else None
    return r


def ratio(a, b):
    return f"{a / b:.2f}" if a and b else "-"


def fmt(t):
    return "-" if t is None else (f"{t * 1000:.1f}us" if t < 1 else f"{t:.3f}ms")


def best_of(*ts):
    ok = [t for t in ts if t]
    return min(ok) if ok else None


def table_entries(r, m, n, kp):
    """Dispatch-table entries of one measured case (per bits: Triton vs the best CUTLASS config)."""
    out = []
    for bits, tkey, ckey in ((8, "gemm8", "c8"), (4, "gemm4", "c4")):
        t, c = r.get(tkey), r.get(ckey)
        if not t and not c:
            continue
        impl = "cutlass" if c and (not t or c <= CUTLASS_MARGIN * t) else "triton"
        out.append({"bits": bits, "m": m, "n": n, "k": kp, "impl": impl, "config": r.get(ckey + "_cfg") or "",
                    "ms": {"triton": t, "cutlass": c, **{f"cutlass:{cfg}": v for cfg, v in (r.get(ckey + "_all") or {}).items()}}})
    return out


def device_arch(index: int = 0) -> tuple[str, int]:
    props = torch.cuda.get_device_properties(index)
    return f"sm_{props.major}{props.minor}", props.multi_processor_count


def write_table(path, device, entries, meta, arch: str, sm_count: int):
    """Merge entries into the JSON table at path (same architecture) keyed by (bits, m, n, k), and
    rewrite it."""
    p = Path(path)
    old = []
    if p.exists():
        data = json.loads(p.read_text())
        if data.get("arch") == arch:
            old = data.get("entries", [])
        else:
            print(f"  {p}: measured on {data.get('arch') or data.get('device')!r}, replacing it with {arch}",
                  flush=True)
    key = lambda e: (e["bits"], e["m"], e["n"], e["k"])  # noqa: E731
    merged = {key(e): e for e in old}
    merged.update({key(e): e for e in entries})
    meta = {k: v for k, v in meta.items() if k not in ("arch", "sm_count", "device", "format")}
    body = {"format": gd.TABLE_FORMAT, "arch": arch, "sm_count": sm_count, "device": device, **meta,
            "entries": [merged[k] for k in sorted(merged)]}
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(body, indent=1) + "\n")
    gd.Table.from_json(body)  # what we write, the dispatcher can read


def merge_tables(paths, out):
    datas = [json.loads(Path(p).read_text()) for p in paths]
    archs = {d.get("arch") for d in datas}
    if len(archs) != 1 or None in archs:
        raise SystemExit(f"tables of different (or unnamed) architectures: {sorted(map(str, archs))}")
    arch = archs.pop()
    meta = {k: v for k, v in datas[-1].items() if k not in ("entries", "format")}
    meta["merged_from"] = [str(p) for p in paths]
    if Path(out).exists() and json.loads(Path(out).read_text()).get("arch") != arch:
        Path(out).unlink()
    for d in datas:
        write_table(out, d.get("device"), d.get("entries", []), meta, arch, d.get("sm_count") or meta.get("sm_count"))
    print(f"wrote {out}: {len(json.loads(Path(out).read_text())['entries'])} entries for {arch}")


def _producers(c: int, dev):
    """The producers of quantized activations in OPT / Llama blocks, as (x, r, g) -> activation."""
    ln = torch.nn.LayerNorm(c, device=dev, dtype=torch.bfloat16)
    rms_w = torch.rand(c, device=dev, dtype=torch.bfloat16) + 0.5

    def rms(x):
        h = x.float()
        return rms_w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)

    return {
        "none (graph input)": lambda x, r, g: x,
        "LayerNorm": lambda x, r, g: ln(x),
        "RMSNorm": lambda x, r, g: rms(x),
        "ReLU": lambda x, r, g: torch.relu(x),
        "SiLU(gate) * up": lambda x, r, g: torch.nn.functional.silu(g) * x,
        "residual add": lambda x, r, g: x + r,
        "transpose copy": lambda x, r, g: x.transpose(0, 1).reshape(x.shape),
    }


def activation_vs_inductor(dev, m=16384, k=4096, per_token=False, flat_ratio=0.25, producers=None):
    """Part 2 of issue 13: for each producer, our Triton quantize kernel after the producer's own
    (Inductor) kernel vs the quantize fused into the producer by Inductor (fq::flatten_quantize_fused,
    every position gathered: what the backend emits; and the variant reading the original channels
    as a slice), compiled as the flattenquant backend compiles.  Columns: the producer alone, each
    variant, the quantize's cost over the producer alone, bit-exactness of the three.
    per_token: the per-token ops (fq::flatten_quantize_rows / _rows_fused, Config.activation_scale=
    "token", the default plan); flat_ratio: the flattened share (K' = k + ratio * k rounded up to 32);
    producers: names of `_producers` to time (None: all).  Per token, "our kernel" is the op as the
    backend calls it (FQ_ROWS_KERNEL: two launches by default) and "one-launch" the row-resident kernel
    (kernels/triton/flatten_quantize.py rows_resident_kernel)."""
    from fq_compile.backend import _inductor_settings
    from fq_compile.kernels import dispatch
    from fq_compile.kernels.flatten_quantize import direct_prefix
    from fq_compile.kernels.triton import flatten_quantize as tfq
    kp = (k + math.ceil(k * flat_ratio) + 31) // 32 * 32
    rows = []
    b = 8
    for bits in (8, 4):
        qmax = 127 if bits == 8 else 7
        src, mult, lo, hi = channel_tables(k, kp, qmax, dev)
        rmult = (mult[:k] / torch.bincount(src.long(), minlength=k).float()).float()   # as bench_decode
        direct = direct_prefix(src, bits)
        sets = [tuple(torch.randn(b, m // b, k, device=dev, dtype=torch.bfloat16) for _ in range(3)) for _ in range(2)]
        for name, prod in _producers(k, dev).items():
            if producers and name not in producers:
                continue
            torch._dynamo.reset()
            if per_token:
                ops = {"kernel": lambda y: torch.ops.fq.flatten_quantize_rows(y, src, mult, lo, hi, rmult, bits),
                       "gather": lambda y: torch.ops.fq.flatten_quantize_rows_fused(y, src, mult, lo, hi, rmult,
                                                                                     bits, 0),
                       "slice": lambda y: torch.ops.fq.flatten_quantize_rows_fused(y, src, mult, lo, hi, rmult,
                                                                                    bits, direct),
                       "resident": lambda y: tfq.flatten_quantize_rows_cuda(y, src, mult, lo, hi, rmult, bits,
                                                                            resident=True)}
            else:
                ops = {"kernel": lambda y: torch.ops.fq.flatten_quantize(y, src, mult, lo, hi, bits),
                       "gather": lambda y: torch.ops.fq.flatten_quantize_fused(y, src, mult, lo, hi, bits, 0),
                       "slice": lambda y: torch.ops.fq.flatten_quantize_fused(y, src, mult, lo, hi, bits, direct)}
            with _inductor_settings(), dispatch.use(None), torch.no_grad():
                fns = {"alone": lambda x, r, g, p=prod: p(x, r, g)}
                fns.update({n: (lambda x, r, g, p=prod, op=op: op(p(x, r, g))) for n, op in ops.items()})
                fns = {n: torch.compile(f, dynamic=False) for n, f in fns.items()}
                others = [v for v in fns if v not in ("alone", "kernel")]
                exact = all(_same(fns["kernel"](*xs), fns[v](*xs)) for xs in sets for v in others)
                t = {n: try_time(lambda f=f: [lambda xs=xs: f(*xs) for xs in sets]) for n, f in fns.items()}
            over = {n: (t[n] - t["alone"]) if t[n] and t["alone"] else None for n in ("kernel", "gather", "slice")}
            rows.append([f"INT{bits}", name, fmt(t["alone"]), fmt(t["kernel"]), fmt(t.get("resident")),
                         fmt(t["gather"]), fmt(t["slice"]), ratio(t["kernel"], t["gather"]), fmt(over["kernel"]),
                         fmt(over["gather"]), exact])
            print("   ", rows[-1], flush=True)
    return rows


def _same(a, b) -> bool:
    """Equal outputs: tensors, or (integers, row scales) pairs of the per-token ops."""
    if isinstance(a, (tuple, list)):
        return all(torch.equal(x, y) for x, y in zip(a, b))
    return torch.equal(a, b)


FUSION_HEAD = ["bits", "producer", "producer alone", "producer + our kernel", "+ our one-launch kernel (per token)",
               "fused (gather, default)",
               "fused (slice + gather)", "x (>1: fused faster)", "quantize cost, kernel", "quantize cost, fused",
               "bit-exact"]


def relu_epilogue(dev, m=16384, k=5120, n=20480):
    """The ReLU GEMM epilogue (OPT fc1 -> ReLU) against the GEMM then a ReLU kernel, CUTLASS and Triton."""
    kp = flat_k(k)
    xq = [torch.randint(-127, 128, (m, kp), device=dev, dtype=torch.int8) for _ in range(2)]
    wq = torch.randint(-127, 128, (n, kp), device=dev, dtype=torch.int8)
    bias = torch.randn(n, device=dev)
    bf = torch.bfloat16
    rows = []
    cfg = cg.default_config(m, n, kp, torch.cuda.get_device_properties(0).multi_processor_count)
    impls = {"CUTLASS " + cfg: lambda a, act: cg.cutlass_int_linear(a, wq, 1e-3, bias, bf, 8, config=cfg, act=act),
             "Triton": lambda a, act: tg.int_linear_cuda(a, wq, 1e-3, bias, bf, 8, act=act)}
    for name, f in impls.items():
        sep = try_time(lambda f=f: [lambda a=a: torch.relu(f(a, "none")) for a in xq])
        epi = try_time(lambda f=f: [lambda a=a: f(a, "relu") for a in xq])
        exact = all(torch.equal(torch.relu(f(a, "none")), f(a, "relu")) for a in xq)
        rows.append([name, f"{m}x{n}x{kp}", fmt(sep), fmt(epi), ratio(sep, epi), exact])
    return rows


DECODE_SHAPES = [("13B qkv/out", 5120, 5120), ("13B fc1", 5120, 20480), ("13B fc2", 20480, 5120)]
DECODE_MS = [1, 16, 64]


def copy_bandwidth(dev, nbytes: int = 2 << 30) -> float:
    """GB/s of a device-to-device copy, counting the bytes read and written (median of replays)."""
    a = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    ms = time_graph([lambda: b.copy_(a)])
    del a, b
    torch.cuda.empty_cache()
    return 2 * nbytes / (ms * 1e-3) / 1e9


def bench_decode(k, n, m, dev, per_token=True):
    """ms per call of fq::flat_linear as the tuner chose it, of each candidate it chose among
    (kernels/triton/decode.py: fused tilings, pre-quantized tilings, quantize + GEMM) and of fp16
    linear, weights rotated past L2; per_token: with per-token activation scales (the default plan).
    The op gets x quantized beside x, as the lowering passes it (the pre-quantized variants read it and
    launch no quantize; in a model it is computed in the kernel producing x)."""
    from fq_compile.kernels.triton import decode as td

    kp = flat_k(k)
    r = {}
    f16 = torch.float16
    x = torch.randn(m, k, device=dev, dtype=f16)
    bias = torch.randn(n, device=dev)
    scale = torch.rand(n, device=dev) * 1e-3 + 1e-4
    ws16 = [torch.randn(n, k, device=dev, dtype=f16) * 0.02 for _ in range(n_sets(n * k * 2))]
    r["fp16"] = try_time(lambda: [lambda w=w: torch.nn.functional.linear(x, w) for w in ws16])
    del ws16
    for bits in (8, 4):
        qmax = 127 if bits == 8 else 7
        src, mult, lo, hi = channel_tables(k, kp, qmax, dev)
        rmult = None
        if per_token:   # each channel's multiplier / (E_j + 1), as the planner sets it
            rmult = (mult[:k] / torch.bincount(src.long(), minlength=k).float()).float()
        wb = n * kp // (2 if bits == 4 else 1)
        ws = [torch.randint(-qmax, qmax + 1, (n, kp), device=dev, dtype=torch.int8) for _ in range(n_sets(wb))]
        if bits == 4:
            ws = [pack_int4(w) for w in ws]
        args = (x, src, mult, lo, hi, bits)
        # x quantized once, as the lowering hands it to the op (computed in the LayerNorm's kernel: not timed)
        if rmult is None:
            xq, rq = torch.ops.fq.flatten_quantize(x, src, mult, lo, hi, bits), None
        else:
            xq, rq = torch.ops.fq.flatten_quantize_rows(x, src, mult, lo, hi, rmult, bits)
        given = dict(rmult=rmult, r=rq, xq=xq)
        ref = td.flat_linear_cuda(*args, ws[0], scale, bias, f16, rmult=rmult, config=("gemm", None))
        y = torch.ops.fq.flat_linear(*args, ws[0], scale, bias, f16, rmult, rq, xq)      # tunes on first use
        r[f"exact{bits}"] = bool(torch.equal(y, ref))
        r[f"chosen{bits}"] = try_time(lambda: [lambda w=w: torch.ops.fq.flat_linear(*args, w, scale, bias, f16, rmult,
                                                                                     rq, xq) for w in ws])
        cand = {}
        for i, c in enumerate(td.candidates(bits)):
            name = td.config_name(bits, c)
            if c[0] in ("gemv", "dp4a") and m > td.GEMV_MAX_M:        # not a candidate at this M
                cand[name] = None
                continue
            cand[name] = try_time(lambda c=c: [lambda w=w: td.flat_linear_cuda(*args, w, scale, bias, f16, **given,
                                                                                config=c) for w in ws])
            exact = torch.equal(td.flat_linear_cuda(*args, ws[0], scale, bias, f16, **given, config=c), ref)
            r[f"exact{bits}"] &= bool(exact)
        r[f"cand{bits}"] = cand
        r[f"bytes{bits}"] = wb
        del ws
        torch.cuda.empty_cache()
    r["bytes16"] = n * k * 2
    return r


def decode_main(args):
    from tabulate import tabulate

    dev = "cuda"
    torch.manual_seed(0)
    copy = copy_bandwidth(dev)
    print(f"copy bandwidth: {copy:.0f} GB/s (read + write)", flush=True)
    ms = [int(v) for v in args.ms.split(",")] if args.ms else DECODE_MS
    shapes = [s for s in DECODE_SHAPES if not args.shapes or any(kk in s[0] for kk in args.shapes.split(","))]
    per_token = args.scales == "token"

    def gbs(nbytes, t):
        return nbytes / (t * 1e-3) / 1e9 if t else None

    def cell(nbytes, t):
        g = gbs(nbytes, t)
        return "-" if g is None else f"{fmt(t)} {g:.0f} GB/s ({100 * g / copy:.0f}%)"

    def best(cand):
        name = min((k for k, t in cand.items() if t), key=cand.get, default=None)
        return name, cand.get(name)

    from fq_compile.kernels.triton import decode as td

    head = ["layer", "M", "fp16 linear", "INT8 chosen", "INT8 fastest candidate", "chosen vs fastest", "INT4 chosen",
            "INT4 fastest candidate", "chosen vs fastest", "INT8 x fp16", "INT4 x fp16", "every path exact (8/4)"]
    names = list(dict.fromkeys(td.config_name(b, c) for b in (8, 4) for c in td.candidates(b)))  # both widths'
    cand_head = ["layer", "M", "bits"] + names
    props = torch.cuda.get_device_properties(0)
    meta = (f"device: {props.name} ({props.multi_processor_count} SMs), "
            f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}, "
            f"torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}\n"
            f"command: python {' '.join(sys.argv)}\n"
            f"copy bandwidth (device-to-device, read + written bytes): {copy:.0f} GB/s\n"
            f"activation scales: {'per token (the default plan)' if per_token else 'per tensor (static)'}\n"
            "cells: time per call, then GB/s of weight bytes read (fp16: N x K x 2; INT8: N x K'; INT4: N x K' / 2) "
            "and that as % of the copy bandwidth; median of CUDA-graph replays, weights rotated past 2x L2; "
            "chosen: fq::flat_linear as the tuner picked (first-use timing, eager); chosen vs fastest: the fastest "
            "candidate's time / the chosen one's (1.00: the tuner picked the best); fp16 out, bias, random "
            "per-channel scales; exact: every candidate equals flatten_quantize + GEMM bit for bit")

    def write(rows, details, done: bool) -> str:
        """The tables so far; rewritten after every row, so a run cut by its cap keeps what it measured."""
        text = (f"# Decode kernels (issue 23)\n\n{meta}\n"
                + ("" if done else f"\npartial: {len(rows)} of {len(shapes) * len(ms)} rows (the run was cut or "
                                   "is still running)\n")
                + f"\n{tabulate(rows, head, tablefmt='github')}\n\nEvery candidate (fusedI / prequantI: tiling I of "
                f"kernels/triton/decode.py CONFIGS; gemvI / dp4aI: of GEMV_CONFIGS / DP4A_CONFIGS):\n\n{tabulate(details, cand_head, tablefmt='github')}\n")
        if args.out:
            Path(args.out).write_text(text)
        return text

    rows, details = [], []
    for name, k, n in shapes:
        for m in ms:
            print(f"{name} M={m}", flush=True)
            r = bench_decode(k, n, m, dev, per_token)
            row = [f"{name} ({k}->{n}, K' {flat_k(k)})", m, cell(r["bytes16"], r["fp16"])]
            for bits in (8, 4):
                bname, bt = best(r[f"cand{bits}"])
                row += [cell(r[f"bytes{bits}"], r[f"chosen{bits}"]), f"{bname} {fmt(bt)}",
                        ratio(bt, r[f"chosen{bits}"])]
                details.append([name, m, bits] + [fmt(r[f"cand{bits}"][c]) if c in r[f"cand{bits}"] else "-"
                                                  for c in names])
            row += [ratio(r["fp16"], r["chosen8"]), ratio(r["fp16"], r["chosen4"]), f"{r['exact8']}/{r['exact4']}"]
            rows.append(row)
            print("   ", rows[-1], flush=True)
            write(rows, details, done=False)
    print()
    print(write(rows, details, done=True))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="table5 + one 66B shape only")
    ap.add_argument("--shapes", default=None, help="comma-separated substrings of shape names")
    ap.add_argument("--ms", default=None, help="comma-separated M values")
    ap.add_argument("--no-fp8-variant", action="store_true")
    ap.add_argument("--no-inductor", action="store_true")
    ap.add_argument("--out", default=None, help="write the markdown results file here")
    ap.add_argument("--cutlass", action="store_true", help="add the CUTLASS columns (builds the extension)")
    ap.add_argument("--cutlass-configs", default=None, help="comma-separated CUTLASS configs (default: all)")
    ap.add_argument("--cutlass-only", action="store_true",
                    help="with --cutlass: skip the int_mm / fp8 / INT4-on-FP8 / act4 / Inductor baselines")
    ap.add_argument("--write-table", default=None, help="write/merge the dispatch table JSON here")
    ap.add_argument("--merge-tables", nargs="+", default=None, help="merge these table JSONs into --write-table")
    ap.add_argument("--fusion", action="store_true",
                    help="only the quantize-fusion table (and the ReLU epilogue with --cutlass)")
    ap.add_argument("--fusion-shape", default="16384,4096", help="M,C of the fusion table")
    ap.add_argument("--fusion-ratio", type=float, default=0.25, help="flattened share of the fusion table's K'")
    ap.add_argument("--producers", default=None,
                    help="comma list of the fusion table's producers (default: all; e.g. 'ReLU,LayerNorm')")
    ap.add_argument("--decode", action="store_true", help="the decode kernels (issue 23): GB/s vs copy bandwidth")
    ap.add_argument("--scales", choices=["token", "tensor"], default="token",
                    help="with --decode or --fusion: per-token activation scales (the default plan) or static ones")
    args = ap.parse_args()
    from tabulate import tabulate

    if args.decode:
        decode_main(args)
        return

    if args.merge_tables:
        if not args.write_table:
            raise SystemExit("--merge-tables needs --write-table")
        merge_tables(args.merge_tables, args.write_table)
        return
    if args.fusion:
        torch.manual_seed(0)
        return fusion_main(args, "cuda")
    os.environ["FQ_GEMM"] = "triton"  # the INT8/INT4 columns time the Triton kernels
    cutlass_configs = ()
    if args.cutlass:
        cutlass_configs = tuple(args.cutlass_configs.split(",")) if args.cutlass_configs else tuple(cg.CONFIGS)
        bad = [c for c in cutlass_configs if c not in cg.CONFIGS]
        if bad:
            raise SystemExit(f"unknown CUTLASS configs {bad}; known: {sorted(cg.CONFIGS)}")
        t0 = time.time()
        cg.ensure([(c, torch.bfloat16, "none") for c in cutlass_configs])  # build (or load) before any timing
        print(f"CUTLASS kernels ready in {time.time() - t0:.0f}s ({cg.build_dir()})", flush=True)
    elif args.write_table:
        raise SystemExit("--write-table needs --cutlass")

    dev = "cuda"
    torch.manual_seed(0)
    shapes = SHAPES
    if args.quick:
        shapes = [SHAPES[0], SHAPES[7]]
    if args.shapes:
        keys = args.shapes.split(",")
        shapes = [s for s in SHAPES if any(kk in s[0] for kk in keys)]
    ms = [int(v) for v in args.ms.split(",")] if args.ms else MS
    head = ["layer (K->N, K')", "M", "bf16", "int_mm", "fp8 mm", "INT8 lin", "x bf16", "x int_mm", "x fp8",
            "INT4 lin", "x bf16", "x fp8", "INT4 gemm i8/f8 core", "act8", "act8 % gemm8", "gemm8 TOPS"]
    if cutlass_configs:
        head += ["C8 gemm", "C8 cfg", "xT8", "C8 TOPS", "best8 lin x bf16", "C4 gemm", "C4 cfg", "xT4", "best4 lin x bf16"]
    rows = []
    entries = []
    device = torch.cuda.get_device_name(0)
    arch, sm_count = device_arch(0)
    table_meta = {"created": f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
                  "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
                  "command": "python " + " ".join(sys.argv), "margin": CUTLASS_MARGIN,
                  "times": "ms per GEMM (bias, bf16 out), median of CUDA-graph replays"}
    for name, k, n in shapes:
        for m in ms:
            print(f"{name} M={m}", flush=True)
            r = bench_case(k, n, m, dev, fp8_variant=not args.no_fp8_variant, cutlass_configs=cutlass_configs,
                           baselines=not (args.cutlass_only and cutlass_configs))
            rows.append([f"{name} ({k}->{n}, {flat_k(k)})", m, fmt(r["bf16"]), fmt(r["int_mm"]), fmt(r["fp8"]),
                         fmt(r["lin8"]), ratio(r["bf16"], r["lin8"]), ratio(r["int_mm"], r["lin8"]),
                         ratio(r["fp8"], r["lin8"]), fmt(r["lin4"]), ratio(r["bf16"], r["lin4"]),
                         ratio(r["fp8"], r["lin4"]),
                         f"{fmt(r['gemm4'])}/{fmt(r.get('gemm4_fp8'))}",
                         fmt(r["act8"]), f"{100 * r['act8'] / r['gemm8']:.1f}%" if r["act8"] and r["gemm8"] else "-",
                         f"{r['tops8']:.0f}" if r["tops8"] else "-"])
            if cutlass_configs:
                kp = flat_k(k)
                ctops = 2 * m * n * kp / (r["c8"] * 1e-3) / 1e12 if r.get("c8") else None
                rows[-1] += [fmt(r.get("c8")), r.get("c8_cfg") or "-", ratio(r["gemm8"], r.get("c8")),
                             f"{ctops:.0f}" if ctops else "-", ratio(r["bf16"], best_of(r["lin8"], r.get("clin8"))),
                             fmt(r.get("c4")), r.get("c4_cfg") or "-", ratio(r["gemm4"], r.get("c4")),
                             ratio(r["bf16"], best_of(r["lin4"], r.get("clin4")))]
                entries += table_entries(r, m, n, kp)
                if args.write_table:
                    write_table(args.write_table, device, table_entries(r, m, n, kp), table_meta, arch, sm_count)
            print("   ", rows[-1], flush=True)
            if args.out:  # partial results survive a cut-off run
                Path(args.out).write_text("partial\n\n" + tabulate(rows, head, tablefmt="github") + "\n")
    table = tabulate(rows, head, tablefmt="github")
    act_table = None
    if not args.no_inductor and not (args.cutlass_only and cutlass_configs):
        act_rows = activation_vs_inductor(dev)
        act_table = tabulate(act_rows, FUSION_HEAD, tablefmt="github")
    props = torch.cuda.get_device_properties(0)
    meta = (f"device: {props.name} ({props.multi_processor_count} SMs), "
            f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}, "
            f"torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}\n"
            f"command: python {' '.join(sys.argv)}\n"
            f"times: median of CUDA-graph replays, inputs rotated past 2x L2; ratios = baseline time / ours "
            f"(>1: ours faster). bf16 runs on the original K; int_mm/fp8/ours on K' (flattened).")
    print()
    print(meta)
    print()
    print(table)
    if act_table:
        print()
        print(act_table)
    if args.out:
        text = f"# Kernel benchmark (issue 3)\n\n{meta}\n\n{table}\n"
        if act_table:
            text += ("\n## Quantize: our kernel after the producer vs fused into it (M=16384, K=4096->5120)\n\n"
                     f"{act_table}\n")
        Path(args.out).write_text(text)


def fusion_main(args, dev):
    """--fusion: the quantize-fusion table (and the ReLU epilogue with --cutlass) alone."""
    from tabulate import tabulate

    m, c = (int(v) for v in args.fusion_shape.split(","))
    per_token = args.scales == "token"
    producers = [p.strip() for p in args.producers.split(",")] if args.producers else None
    kp = (c + math.ceil(c * args.fusion_ratio) + 31) // 32 * 32
    props = torch.cuda.get_device_properties(0)
    meta = (f"device: {props.name} (sm_{props.major}{props.minor}, {props.multi_processor_count} SMs), "
            f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}, torch {torch.__version__}, "
            f"triton {triton.__version__}\ncommand: python {' '.join(sys.argv)}\n"
            f"times: median of CUDA-graph replays of compiled code (bf16 input [8, {m // 8}, {c}], K' = {kp}); "
            f"activation scales: {'per token (the default plan)' if per_token else 'per tensor (static)'}")
    text = f"# Quantize fusion (issue 13, part 2)\n\n{meta}\n\n"
    rows = activation_vs_inductor(dev, m, c, per_token, args.fusion_ratio, producers)
    text += tabulate(rows, FUSION_HEAD, tablefmt="github") + "\n"
    if args.cutlass:
        text += "\n## ReLU in the GEMM epilogue vs GEMM + ReLU kernel (INT8, bf16 out)\n\n"
        text += tabulate(relu_epilogue(dev), ["GEMM", "M x N x K'", "GEMM + ReLU", "ReLU epilogue", "x", "bit-exact"],
                         tablefmt="github") + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
