"""Tensor-parallel benchmark (issue 16): OPT-30B / OPT-66B shapes over 2 GPUs against one GPU.

    torchrun --nproc-per-node 2 benchmarks/tp.py --models 66b --methods fp16-eager,fq-O3 --seqs 2048 --out $OUT
    torchrun --nproc-per-node 2 benchmarks/tp.py --models 66b --methods fq-O3 --batches '' --decode 1,16 --out $OUT
    python benchmarks/tp.py --models 66b --methods fq-O3 --batches 8 --seqs 2048 --out $OUT        # one GPU
    python benchmarks/tp.py --report a/tp.jsonl b/tp.jsonl --results-dir benchmarks/results          # tables
    torchrun --nproc-per-node 2 benchmarks/tp.py --smoke --out /tmp/tp    # tiny OPT, CPU (gloo): checks the script

Launched by torchrun with N processes, every method runs tensor-parallel over N ranks (NCCL on GPUs,
gloo on the CPU): the model is built on the meta device, parallelised with the standard column/row
plan (fq_compile/tools/parallel.py), then each rank materialises only its own shards, with random
fp16 weights (speed does not depend on values; the replicated parameters are drawn alike on every
rank).  Run as one process, the same methods run on one device.  Methods, each on a fresh model:

  fp16-eager      the Hugging Face model as is (TP: DTensor linears, NCCL all-reduce)
  fp16-inductor   torch.compile, Inductor default mode
  fq-O1, fq-O3    FlattenQuant through our backend; synthetic plans (fq_compile/tools/synthetic.py)
                  with the flatten ratio and INT4 share of the paper's Table 4 for that size, built by
                  each rank for its own shards from the local weights (nothing of the full model is
                  ever materialised), the fp16 weights released as they are quantized

Prefill: model(input_ids, use_cache=False), lm_head included.  Decode: generate() with a static KV
cache (one decode graph, no recompile per step), greedy, `--new-tokens` tokens after a `--prompt`-token
prompt (default 1: the prompt runs through the decode graph, so there is one compile), tokens/s over
the whole call.  Times: median of repeated calls timed with CUDA events after a warm-up, taken on
every rank (each call ends in collectives, so ranks run in lockstep) and reported as the slowest
rank's.  Memory per rank: allocated after the first call (weights, plan), peak per point.  Rows go
to $OUT/tp.jsonl as each point finishes (rank 0 writes); each run ends with its table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fq_compile  # noqa: E402,F401  (registers backend='flattenquant')
from fq_compile.runtime.resident import resident_bytes  # noqa: E402
from fq_compile.runtime.state import reports  # noqa: E402
from fq_compile.runtime.tensor_parallel import local_tensor  # noqa: E402
from fq_compile.tools.models import opt_config  # noqa: E402
from fq_compile.tools.parallel import parallelize  # noqa: E402
from fq_compile.tools.synthetic import PAPER_TABLE4, synthetic_plan  # noqa: E402

METHODS = ["fp16-eager", "fp16-inductor", "fq-O1", "fq-O3"]
TABLE4_LABEL = "paper Table 4 figures"
T0 = time.monotonic()


# -- processes ---------------------------------------------------------------------------------------

def setup(args):
    """(device, mesh or None, rank, world): torchrun's environment gives the ranks."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world == 1:
        return device, None, rank, world
    dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    from torch.distributed.device_mesh import init_device_mesh

    return device, init_device_mesh(device.type, (world,)), rank, world


def slowest(x: float, world: int) -> float:
    """The largest value of x over the ranks (one all-reduce)."""
    if world == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64, device="cuda" if torch.cuda.is_available() else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def barrier(world: int):
    if world > 1:
        dist.barrier()


# -- models and methods ----------------------------------------------------------------------------------

def build_model(size: str, device, mesh, dtype, seed: int = 0):
    """OPT of that shape, built on the meta device, parallelised over `mesh` (if any), then
    materialised on `device` (each rank its own shards) and filled with random weights: norms 1,
    biases 0, everything else N(0, 0.02), drawn in one order with one seed on every rank."""
    from transformers import OPTConfig, OPTForCausalLM

    if size == "tiny":
        cfg = OPTConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, ffn_dim=256, num_attention_heads=4,
                        max_position_embeddings=512, word_embed_proj_dim=64)
    else:
        cfg = opt_config(f"opt-{size}")
    with torch.device("meta"):
        model = OPTForCausalLM._from_config(cfg, dtype=dtype)
    if mesh is not None:
        parallelize(model, mesh)
    model.to_empty(device=device)
    model.tie_weights()                      # to_empty gives lm_head a tensor of its own: share it again
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            t = local_tensor(p)
            if "layer_norm" in name and name.endswith("weight"):
                t.fill_(1.0)
            elif name.endswith("bias"):
                t.zero_()
            else:
                t.normal_(0.0, 0.02, generator=gen)
    return model.eval()


def prepare(method: str, size: str, device, mesh, dtype, args):
    """A fresh model set up and compiled for `method`; returns (model, plan or None, info)."""
    model = build_model(size, device, mesh, dtype)
    info, plan = {}, None
    if method == "fp16-inductor":
        model.compile()
    elif method in ("fq-O1", "fq-O3"):
        share, ratio = PAPER_TABLE4["13b" if size == "tiny" else size]
        level = method.split("-")[1]
        plan = synthetic_plan(model, level, flatten_ratio=ratio, int4_share=share if level == "O3" else 0.0,
                              source=TABLE4_LABEL, release_weights=True, progress=False)
        torch._dynamo.reset()                    # drop the replica's capture graphs (synthetic.py)
        n4 = sum(lp.bits == 4 for lp in plan.layers.values())
        info.update(level=level, int4_share=round(n4 / len(plan.layers), 4), flatten_ratio=ratio,
                    plan_source=TABLE4_LABEL)
        options = {"plan": plan, "free_weights": True}
        if args.gemm:
            options["gemm"] = args.gemm
            info["gemm"] = args.gemm
        model.compile(backend="flattenquant", options=options)
    elif method != "fp16-eager":
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    return model, plan, info


# -- measuring ----------------------------------------------------------------------------------------------

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, world, warmup: int, reps: int, budget_s: float) -> list[float]:
    """ms per call on this rank: `warmup` untimed calls, then up to `reps` timed ones (at least 3,
    stopping once `budget_s` is spent; every rank stops at the same count)."""
    for _ in range(warmup):
        fn()
    sync(device)
    out = []
    for i in range(reps):
        barrier(world)
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            out.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            out.append(1e3 * (time.perf_counter() - t))
        if i >= 2 and slowest(sum(out) / 1e3, world) > budget_s:
            break
    return out


def memory(device, world) -> dict:
    if device.type != "cuda":
        return {}
    sync(device)
    return dict(allocated_gb=round(slowest(torch.cuda.memory_allocated() / 1e9, world), 2),
                peak_gb=round(slowest(torch.cuda.max_memory_allocated() / 1e9, world), 2))


class Recorder:
    def __init__(self, out_dir: Path, meta: dict, rank: int):
        self.rank, self.meta = rank, meta
        self.path = out_dir / "tp.jsonl"
        if rank == 0:
            out_dir.mkdir(parents=True, exist_ok=True)
        self.rows = []

    def __call__(self, **row):
        row = {**self.meta, **row, "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        self.rows.append(row)
        if self.rank != 0:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        keep = {k: v for k, v in row.items() if k not in self.meta and k != "time"}
        print(f"[{time.monotonic() - T0:6.0f}s] {json.dumps(keep)}", flush=True)


def out_of_time(args, world) -> bool:
    late = bool(args.time_limit) and slowest(time.monotonic() - T0, world) > args.time_limit
    if late:
        print(f"stopping: --time-limit {args.time_limit}s reached; rows so far are in tp.jsonl", flush=True)
    return late


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def run_method(method, size, device, mesh, world, args, rec):
    vocab = 512 if size == "tiny" else 50272
    tp = world
    t = time.monotonic()
    try:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        model, plan, info = prepare(method, size, device, mesh, dtype, args)
    except Exception as e:  # noqa: BLE001  (an OOM while building is a result: the method does not fit)
        if not is_oom(e):
            raise
        rec(kind="setup", model=size, method=method, tp=tp, error=f"out of memory: {str(e)[:160]}")
        torch.cuda.empty_cache()
        return
    info["setup_s"] = round(slowest(time.monotonic() - t, world), 1)
    if plan is not None:
        rb = resident_bytes(model, plan, device)
        info["plan_gb"] = round(slowest(rb["plan"] / 1e9, world), 2)
    gen = torch.Generator().manual_seed(0)
    first = True
    with torch.no_grad():
        for b in args.batches:
            for s in args.seqs:
                if out_of_time(args, world):
                    return
                ids = torch.randint(0, vocab, (b, s), generator=gen).to(device)
                try:
                    if first:
                        t = time.monotonic()
                        model(input_ids=ids, use_cache=False)
                        sync(device)
                        info["first_call_s"] = round(slowest(time.monotonic() - t, world), 1)
                        rec(kind="memory", model=size, method=method, tp=tp, **memory(device, world), **info)
                        first = False
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats()
                    ms = timed(lambda: model(input_ids=ids, use_cache=False), device, world, args.warmup, args.reps,
                               args.budget)
                except Exception as e:  # noqa: BLE001
                    if not is_oom(e):
                        raise
                    rec(kind="prefill", model=size, method=method, tp=tp, batch=b, seq=s,
                        error=f"out of memory: {str(e)[:160]}")
                    torch.cuda.empty_cache()
                    continue
                rec(kind="prefill", model=size, method=method, tp=tp, batch=b, seq=s,
                    ms=round(slowest(statistics.median(ms), world), 3), reps=[round(x, 3) for x in ms],
                    **memory(device, world), **info)
        for b in args.decode:
            if out_of_time(args, world):
                return
            ids = torch.randint(0, vocab, (b, args.prompt), generator=gen).to(device)
            kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                      min_new_tokens=args.new_tokens, do_sample=False, use_cache=True, pad_token_id=1,
                      cache_implementation=args.cache,
                      disable_compile=True)   # our compiled forward, not generate()'s own torch.compile
            try:
                t = time.monotonic()
                model.generate(ids, **kw)          # warm-up: compiles the decode graph
                sync(device)
                warm_s = round(slowest(time.monotonic() - t, world), 1)
                if first:
                    rec(kind="memory", model=size, method=method, tp=tp, **memory(device, world), **info,
                        first_call_s=warm_s)
                    first = False
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                ms = timed(lambda: model.generate(ids, **kw), device, world, 0, args.decode_reps, args.budget)
            except Exception as e:  # noqa: BLE001
                if not is_oom(e):
                    raise
                rec(kind="decode", model=size, method=method, tp=tp, batch=b, error=f"out of memory: {str(e)[:160]}")
                torch.cuda.empty_cache()
                continue
            med = slowest(statistics.median(ms), world)
            rec(kind="decode", model=size, method=method, tp=tp, batch=b, prompt=args.prompt,
                new_tokens=args.new_tokens, cache=args.cache, ms=round(med, 3),
                tokens_per_s=round(b * args.new_tokens / (med / 1e3), 2), warmup_s=warm_s,
                reps=[round(x, 3) for x in ms], **memory(device, world), **info)
    if plan is not None:
        rec(kind="graphs", model=size, method=method, tp=tp, graphs=len(reports(plan)),
            released_gb=round(sum(r.released_bytes for r in reports(plan)) / 1e9, 2))


# -- tables --------------------------------------------------------------------------------------------------

def load_rows(files) -> list[dict]:
    rows = []
    for f in files:
        rows += [json.loads(line) for line in Path(f).read_text().splitlines() if line.strip()]
    return rows


def tables(rows: list[dict]) -> str:
    """Markdown: prefill ms and decode tokens/s per model x (method, TP), each with its ratio to the
    faster fp16 TP=2 method; memory per rank; then device, dates and commands."""
    from tabulate import tabulate

    out = []
    done = [r for r in rows if "error" not in r]
    errors = [r for r in rows if "error" in r]
    for size in sorted({r["model"] for r in rows}):
        def col(r):
            return f"{r['method']} TP={r['tp']}"

        for kind, key, better in (("prefill", "ms", min), ("decode", "tokens_per_s", max)):
            pts = [r for r in done if r["model"] == size and r["kind"] == kind]
            if not pts:
                continue
            cols = sorted({col(r) for r in pts}, key=lambda c: (not c.startswith("fp16"), c))
            point = (lambda r: (r["batch"], r["seq"])) if kind == "prefill" else (lambda r: (r["batch"],))
            body = []
            for p in sorted({point(r) for r in pts}):
                here = {col(r): r[key] for r in pts if point(r) == p}
                base = [v for c, v in here.items() if c.startswith("fp16") and c.endswith("TP=2")]
                ref = better(base) if base else None
                cells = []
                for c in cols:
                    v = here.get(c)
                    if v is None:
                        cells.append("-")
                        continue
                    ratio = (ref / v if kind == "prefill" else v / ref) if ref else None
                    cells.append(f"{v:.1f}" + (f" ({ratio:.2f}x)" if ratio else ""))
                body.append(list(p) + cells)
            unit = "ms (x faster than the faster fp16 TP=2)" if kind == "prefill" else "tokens/s (x fp16 TP=2)"
            heads = (["batch", "seq"] if kind == "prefill" else ["batch"]) + cols
            out.append(f"## OPT-{size}: {kind}, {unit}\n")
            out.append(tabulate(body, headers=heads, tablefmt="github") + "\n")
            if any("peak_gb" in r for r in pts):
                peaks = [list(p) + [next((r.get("peak_gb", "-") for r in pts if point(r) == p and col(r) == c), "-")
                                    for c in cols] for p in sorted({point(r) for r in pts})]
                what = "activations, no KV cache" if kind == "prefill" else "KV cache included"
                out.append(f"### OPT-{size}: {kind}, peak GB per GPU (slowest rank; weights + {what})\n")
                out.append(tabulate(peaks, headers=heads, tablefmt="github") + "\n")
        mem = {col(r): r for r in rows if r["model"] == size and r["kind"] == "memory"}
        if mem:
            body = [[c, r.get("allocated_gb", "-"), r.get("plan_gb", "-"), r.get("int4_share", "-"),
                     r.get("setup_s", "-"), r.get("first_call_s", "-")] for c, r in sorted(mem.items())]
            out.append(f"## OPT-{size}: memory per rank after the first call, GB\n")
            out.append(tabulate(body, headers=["method", "allocated GB (slowest rank)", "plan GB", "INT4 share",
                                               "setup s", "first call s (compile)"], tablefmt="github") + "\n")
    if errors:
        out.append("## Did not run\n")
        body = [[r["model"], r["method"], r["tp"], r["kind"], r.get("batch", ""), r["error"]] for r in errors]
        heads = ["model", "method", "TP", "part", "batch", "error"]
        out.append(tabulate(body, headers=heads, tablefmt="github") + "\n")
    devices = sorted({f"{r.get('device')} x{r.get('world')}, torch {r.get('torch')}" for r in rows})
    dates = sorted({r["time"][:10] for r in rows})
    commands = sorted({r.get("command", "") for r in rows})
    out.append("device: " + "; ".join(devices) + f"; dates {', '.join(dates)}\n")
    out.append("commands:\n" + "\n".join(f"    {c}" for c in commands) + "\n")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)

    def ints(s):
        return [int(x) for x in s.split(",") if x]

    ap.add_argument("--models", default="30b", help="comma list of OPT sizes (30b, 66b, ...)")
    ap.add_argument("--methods", default="all", help=f"comma list of {', '.join(METHODS)} or 'all'")
    ap.add_argument("--batches", type=ints, default=[8])
    ap.add_argument("--seqs", type=ints, default=[2048])
    ap.add_argument("--decode", type=ints, default=[], help="decode batch sizes (generate with a KV cache)")
    ap.add_argument("--prompt", type=int, default=1)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--cache", default="static", choices=["static", "dynamic"])
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--decode-reps", type=int, default=3)
    ap.add_argument("--budget", type=float, default=20.0, help="seconds of timed calls per point at most")
    ap.add_argument("--time-limit", type=float, default=0.0, help="stop starting new points after this many seconds")
    ap.add_argument("--gemm", default=None, help="the backend's GEMM choice: triton | cutlass | auto")
    ap.add_argument("--out", default="tp-out")
    ap.add_argument("--smoke", action="store_true", help="tiny OPT on the CPU: checks the script, measures nothing")
    ap.add_argument("--report", nargs="*", help="merge tp.jsonl files into markdown tables")
    ap.add_argument("--results-dir", default=None)
    args = ap.parse_args(argv)
    if args.report:
        text = tables(load_rows(args.report))
        print(text)
        if args.results_dir:
            rows = load_rows(args.report)
            dev = rows[0].get("device", "device").split()[-1].lower() if rows else "device"
            path = Path(args.results_dir) / f"tp-{min(r['time'][:10] for r in rows)}-{dev}.md"
            path.write_text("# Tensor-parallel benchmark (issue 16)\n\n" + text)
            print(f"wrote {path}")
        return
    if args.smoke:
        args.models, args.batches, args.seqs = "tiny", [2], [32]
        args.decode = args.decode or [1]
        args.new_tokens, args.reps, args.warmup, args.decode_reps = 4, 2, 1, 1
    device, mesh, rank, world = setup(args)
    methods = METHODS if args.methods == "all" else args.methods.split(",")
    launcher = f"torchrun --nproc-per-node {world}" if world > 1 else "python"
    meta = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
                world=world, torch=torch.__version__, command=f"{launcher} {' '.join(sys.argv)}")
    rec = Recorder(Path(args.out), meta, rank)
    for size in args.models.split(","):
        for method in methods:
            if out_of_time(args, world):
                break
            run_method(method, size, device, mesh, world, args, rec)
            torch._dynamo.reset()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if rank == 0 and rec.rows:
        print(tables(rec.rows))
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
