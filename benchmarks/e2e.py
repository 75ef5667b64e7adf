"""End-to-end benchmark (issues 5 and 13): whole OPT models, compiled, called the way inference code calls
them; prefill latency (Figure 4 analog), decode tokens/s, resident and peak memory (Table 6 analog).

    python benchmarks/e2e.py --models 13b --methods all --batches 8 --seqs 2048 --out $OUT
    python benchmarks/e2e.py --models 13b --methods fp16-eager,fq-O3 --decode 1,16,64 --out $OUT
    python benchmarks/e2e.py --models 13b --methods fp16-eager,fp16-static,fq-O3 --batches '' --decode 1,16,64 \
        --decode-profile --out $OUT                      # the decode table of issue 10 (benchmarks/device/decode.sh)
    python benchmarks/e2e.py --profile --models 13b --methods fp16-inductor,fp8-naive,fq-O1,fq-O3 --out $OUT
    python benchmarks/e2e.py --report run1/e2e.jsonl run2/e2e.jsonl --results-dir benchmarks/results
    python benchmarks/e2e.py --summary $OUT/e2e.jsonl                  # a short table of what a run measured
    python benchmarks/e2e.py --smoke --out /tmp/e2e          # tiny config on the CPU: checks the script

Models: OPT shapes from OPTConfig at real sizes (1.3b, 6.7b, 13b, 30b), random fp16 weights made on
the GPU (speed does not depend on values).  Methods, each on a fresh model:
  fp16-eager      the Hugging Face model as is
  fp16-inductor   torch.compile, Inductor default mode (--max-autotune: mode="max-autotune")
  fp16-static     decode only: the fp16 model with generate(cache_implementation="static"), which
                  Hugging Face compiles itself (decode steps, Inductor, mode="reduce-overhead"):
                  its fastest fp16 decode path
  fp8-naive       every decoder linear -> dynamic per-tensor activation scale + static per-tensor
                  FP8 e4m3 weight, torch._scaled_mm, under Inductor
  smoothquant     SmoothQuant-W8A8 through our backend (per-tensor INT8, no flattening)
  torchao-int8    torchao Int8DynamicActivationInt8WeightConfig (its defaults), then torch.compile
  torchao-fp8     torchao Float8DynamicActivationFloat8WeightConfig (its defaults: per tensor)
  torchao-int8wo  torchao Int8WeightOnlyConfig (its defaults): what users pick for decode
  torchao-int4wo  torchao Int4WeightOnlyConfig(group_size=128, tinygemm tile packing), on a bf16 copy
                  of the model (the tinygemm kernel takes bf16 activations)
  fq-O1, fq-O3    FlattenQuant through our backend: fast = torch.compile(model, backend="flattenquant",
                  options=...), prefill fast(...), decode fast.generate(...) (default settings: the GEMM and
                  quantize kernels kernels/dispatch.py picks; --gemm or FQ_GEMM / FQ_QUANTIZE force one, and
                  label the rows)
  fq-fp8          our static per-tensor FP8 level (fq.fp8_quantize + fq.fp8_linear) through our backend
  fq-auto         level auto: the per-layer formats in the shares --auto-formats gives (e.g. those a
                  calibrated auto plan chose: benchmarks/accuracy.py prints them), flattened layers at the
                  paper's flatten ratio
Our plans are synthetic (fq_compile/synthetic.py): the flatten ratio and INT4 share of the paper's
Table 4 for that size ("paper Table 4 figures"), INT4 in the same share of blocks at every layer
position; the output head stays fp16 for every method.  Our backend releases the fp16 weights.

Prefill: model(input_ids, use_cache=False) (lm_head included, no KV cache), median of repeated runs
timed with CUDA events after warm-up.  Decode: generate() with KV cache, 128-token prompt, 128 new
tokens, greedy, tokens/s over the whole call; the first call (which compiles) is timed and reported
as "first call s".  Cache: fp16-eager the default dynamic cache; every other method
`--cache` (default static: CUDA graphs need it, see fq_compile/generation.py).  In a decode-only run
(--batches ''), the compiled baselines are not compiled up front: generate() with a static cache
compiles their decode steps (Hugging Face's own path); our methods compile every call.
--decode-profile adds, per method, a torch.profiler trace of one short generate() at the first decode
batch: per decode step, wall time, GPU busy time by kernel category, and the idle rest (launch gaps,
Python, host syncs).  Memory: GPU bytes allocated after the first call
(weights, plan, anything the compiled model keeps), peak allocated per prefill point (activations,
no KV cache) and per decode point (KV cache included).  Results: one JSON object per line appended
to $OUT/e2e.jsonl as each point finishes; --report merges such files into markdown tables (ratios
vs the faster of fp16 eager / Inductor) and a Figure 4-like PNG.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import gc
import json
import os
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fq_compile  # noqa: E402,F401  (registers backend='flattenquant')
from fq_compile.generation import cudagraphs_recorded  # noqa: E402
from fq_compile.kernels import stopwatch  # noqa: E402
from fq_compile.runtime.resident import resident_bytes  # noqa: E402
from fq_compile.runtime.state import reports  # noqa: E402
from fq_compile.tools.models import opt_config  # noqa: E402
from fq_compile.tools.synthetic import PAPER_TABLE4, synthetic_plan  # noqa: E402

METHODS = ["fp16-eager", "fp16-inductor", "fp16-static", "fp8-naive", "smoothquant", "torchao-int8", "torchao-fp8",
           "torchao-int8wo", "torchao-int4wo", "fq-O1", "fq-O3", "fq-fp8", "fq-auto"]
OURS = ("smoothquant", "fq-O1", "fq-O3", "fq-fp8", "fq-auto")
FP16 = ("fp16-eager", "fp16-inductor", "fp16-static")
MODELS = ("1.3b", "6.7b", "13b", "30b")
TABLE4_LABEL = "paper Table 4 figures"
PROMPT, NEW_TOKENS = 128, 128
T0 = time.monotonic()


class Unavailable(RuntimeError):
    """A method that cannot run here (package missing, no FP8 support): reported, not fatal."""


# -- models and methods ------------------------------------------------------------------------------

def build_model(size: str, device, dtype, layers: int | None = None, seed: int = 0):
    from transformers import OPTConfig, OPTForCausalLM

    if size == "tiny":
        cfg = OPTConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, ffn_dim=256, num_attention_heads=4,
                        max_position_embeddings=512, word_embed_proj_dim=64)
    else:
        cfg = opt_config(f"opt-{size}")
    if layers is not None:
        cfg.num_hidden_layers = layers
    torch.manual_seed(seed)
    with torch.device(device):
        model = OPTForCausalLM._from_config(cfg, dtype=dtype)
    return model.eval()


def parse_shares(text: str) -> dict[str, float]:
    """"fp8=0.3,w4a8=0.5,int8=0.2" -> {"fp8": 0.3, ...} (normalised to sum 1)."""
    if not text:
        raise ValueError("fq-auto needs --auto-formats, e.g. fp8=0.3,w4a8=0.5,int8=0.2")
    out = {}
    for item in text.split(","):
        k, _, v = item.partition("=")
        out[k.strip()] = float(v)
    total = sum(out.values())
    return {k: v / total for k, v in out.items()}


def table4(size: str) -> tuple[float, float]:
    return PAPER_TABLE4["13b" if size == "tiny" else size]


class NaiveFP8Linear(torch.nn.Module):
    """y = scaled_mm(fp8(x / sx), fp8(W / sw)) * sx * sw + b: per-tensor scales, sx from the current
    activation's max (dynamic), sw fixed; the plain recipe FlattenQuant is measured against."""

    def __init__(self, lin: torch.nn.Linear):
        super().__init__()
        w = lin.weight.detach()
        self.out_features, self.in_features = w.shape
        fmax = torch.finfo(torch.float8_e4m3fn).max
        w_scale = (w.abs().amax().float() / fmax).clamp_min(1e-12)
        self.register_buffer("w_scale", w_scale)
        self.register_buffer("weight_t", (w.float() / w_scale).to(torch.float8_e4m3fn).t())  # column-major
        self.register_buffer("bias", None if lin.bias is None else lin.bias.detach().clone())
        self.fmax = fmax

    def forward(self, x):
        x2 = x.reshape(-1, self.in_features)
        sx = (x2.abs().amax().float() / self.fmax).clamp_min(1e-12)
        xq = (x2.float() / sx).clamp(-self.fmax, self.fmax).to(torch.float8_e4m3fn)
        y = torch._scaled_mm(xq, self.weight_t, scale_a=sx, scale_b=self.w_scale, bias=self.bias, out_dtype=x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)


def decoder_linears(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]


def to_naive_fp8(model):
    if model.device.type != "cuda" or torch.cuda.get_device_capability() < (8, 9):
        raise Unavailable("FP8 torch._scaled_mm needs a CUDA GPU with compute capability >= 8.9")
    for name, lin in decoder_linears(model):
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, NaiveFP8Linear(lin))
        del lin
    return model


def to_torchao(model, kind: str):
    try:
        import torchao.quantization as tq
    except Exception as e:  # noqa: BLE001  (an ABI mismatch shows up as any kind of import error)
        raise Unavailable(f"torchao import failed on torch {torch.__version__}: {type(e).__name__}: {e}") from None
    if kind == "int8":
        config = tq.Int8DynamicActivationInt8WeightConfig()
    elif kind == "fp8":
        config = tq.Float8DynamicActivationFloat8WeightConfig()
    elif kind == "int8wo":
        config = tq.Int8WeightOnlyConfig()
    else:                                          # int4wo: tinygemm's packing, bf16 activations
        model.to(torch.bfloat16)
        try:
            config = tq.Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d")
        except TypeError:                          # an older torchao: its default layout is tinygemm's
            config = tq.Int4WeightOnlyConfig(group_size=128)
    try:
        tq.quantize_(model, config, filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and "lm_head" not in fqn)
    except Exception as e:  # noqa: BLE001  (missing kernels for this GPU / torch show up as any error)
        raise Unavailable(f"torchao {type(config).__name__} failed: {type(e).__name__}: {str(e)[:200]}") from None
    return model


def prepare(method: str, size: str, device, dtype, args, layers=None):
    """A fresh model set up and compiled for `method`; returns (model, plan or None, info)."""
    model = build_model(size, device, dtype, layers=layers)
    info, plan = {}, None
    compile_kw = {"dynamic": args.dynamic_flag}
    decode_only = not (args.batches and args.seqs) and not args.profile
    if method in ("fp16-eager", "fp16-static"):
        if method == "fp16-static" and not args.decode:
            raise ValueError("fp16-static is a decode method (generate with a static cache); pass --decode")
        return model, None, info
    if method == "fp16-inductor":
        if args.max_autotune:
            compile_kw["mode"] = "max-autotune"
            info["mode"] = "max-autotune"
        model.compile(**compile_kw)
    elif method == "fp8-naive":
        to_naive_fp8(model)
        if not decode_only:
            model.compile(**compile_kw)
    elif method.startswith("torchao-"):
        to_torchao(model, method.split("-")[1])
        if not decode_only:
            model.compile(**compile_kw)
        import torchao

        info["torchao"] = torchao.__version__
    elif method in OURS:
        share, ratio = table4(size)
        if getattr(args, "flatten_ratio", None) is not None:       # e.g. what a higher beta flattens
            ratio = args.flatten_ratio
            info["flatten_ratio_set"] = ratio
        level = {"smoothquant": "smoothquant", "fq-O1": "O1", "fq-O3": "O3", "fq-fp8": "fp8", "fq-auto": "auto"}[method]
        shares = parse_shares(args.auto_formats) if level == "auto" else None
        scale = getattr(args, "activation_scale", None)        # decode_host.py's args have none
        if shares is not None:
            info["format_shares"] = shares
        plan = synthetic_plan(model, level, flatten_ratio=0.0 if level in ("smoothquant", "fp8") else ratio,
                              int4_share=share if level == "O3" else 0.0, format_shares=shares, source=TABLE4_LABEL,
                              activation_scale=scale, bits_patterns=getattr(args, "bits_patterns", None),
                              release_weights=True, progress=False)
        torch._dynamo.reset()                    # drop the replica's capture graphs (synthetic.py)
        n4 = sum(lp.bits == 4 for lp in plan.layers.values())
        if scale:
            info["activation_scale"] = scale
        if level == "O3":
            info["bits_patterns"] = plan.calibration["bits_patterns"]
        info.update(plan_source=TABLE4_LABEL if level != "smoothquant" else "-", level=level,
                    int4_share=round(n4 / len(plan.layers), 4),
                    flatten_ratio=round(statistics.mean(plan.groups[lp.group].flatten_ratio
                                                        for lp in plan.layers.values()), 4))
        options = {"plan": plan, "free_weights": True}
        if args.gemm:
            options["gemm"] = args.gemm               # the backend's GEMM choice (kernels/gemm_dispatch.py)
            info["gemm"] = args.gemm
        if args.cudagraphs != "auto":
            options["cudagraphs"] = args.cudagraphs == "true"
            info["cudagraphs"] = args.cudagraphs
        if getattr(args, "defer_stop", "default") == "off":
            options["defer_stop"] = False              # the host waits for every decode step
        model = torch.compile(model, backend="flattenquant", options=options, **compile_kw)   # fast.generate works
    else:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    return model, plan, info


# -- measuring ---------------------------------------------------------------------------------------

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, warmup: int, reps: int, budget_s: float) -> list[float]:
    """ms per call: `warmup` untimed calls, then up to `reps` timed ones (at least 3, stopping
    once `budget_s` is spent)."""
    for _ in range(warmup):
        fn()
    sync(device)
    out = []
    for i in range(reps):
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
        if i >= 2 and sum(out) / 1e3 > budget_s:
            break
    return out


def copy_bandwidth(nbytes: int = 2 << 30) -> float:
    """GB/s of a device-to-device copy, bytes read + written (median of 10 after 3 warm-ups)."""
    a = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = timed(lambda: b.copy_(a), torch.device("cuda"), 3, 10, 5.0)
    del a, b
    torch.cuda.empty_cache()
    return 2 * nbytes / (statistics.median(ms) * 1e-3) / 1e9


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak(device) -> int | None:
    return torch.cuda.max_memory_allocated() if device.type == "cuda" else None


def allocated(device) -> int | None:
    if device.type != "cuda":
        return None
    gc.collect()
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated()


class Recorder:
    def __init__(self, out_dir: Path, meta: dict):
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / "e2e.jsonl"
        self.meta = meta

    def __call__(self, **row):
        row = {**self.meta, **row, "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        keep = {k: v for k, v in row.items() if k not in self.meta and k != "time"}
        print(f"[{time.monotonic() - T0:6.0f}s] {json.dumps(keep)}", flush=True)


def out_of_time(args) -> bool:
    if args.time_limit and time.monotonic() - T0 > args.time_limit:
        print(f"stopping: --time-limit {args.time_limit}s reached; rows so far are in e2e.jsonl", flush=True)
        return True
    return False


def label(method: str, args) -> str:
    """The method's name in the results: ours carry a non-default --gemm choice, so runs with
    different GEMM kernels land in different columns; --label adds a suffix (e.g. warm-cache)."""
    if method not in OURS:
        name = method
    else:
        tags = [args.gemm] if args.gemm else []
        q = os.environ.get("FQ_QUANTIZE", "").strip().lower()
        if q in ("kernel", "fused"):
            tags.append(f"q{q}")
        g = os.environ.get("FQ_GEMM", "").strip().lower()
        if g in ("triton", "cutlass") and not args.gemm:
            tags.append(g)
        name = "+".join([method] + tags)
    return f"{name}@{args.label}" if getattr(args, "label", None) else name


def weight_bytes(model, plan, device) -> dict:
    """Parameter (and plan) bytes on the device; tensor subclasses without a plain storage
    (torchao) are counted by the allocator figure only."""
    try:
        rb = resident_bytes(model, plan, device)
    except (RuntimeError, NotImplementedError, TypeError):
        return {}
    return dict(weight_bytes_model=rb["model"], weight_bytes_plan=rb["plan"] if plan is not None else None)


def run_method(method, size, device, dtype, args, rec):
    vocab = 512 if size == "tiny" else 50272
    t = time.monotonic()
    try:
        model, plan, info = prepare(method, size, device, dtype, args, layers=args.layers)
        if args.layers:
            info["layers"] = args.layers            # a block count other than the model's own
    except Unavailable as e:
        rec(kind="unavailable", model=size, method=label(method, args), reason=str(e))
        return
    prep_s = time.monotonic() - t
    gen = torch.Generator(device="cpu").manual_seed(0)
    first = True
    with torch.no_grad():
        for b in args.batches:
            for s in args.seqs:
                if out_of_time(args):
                    return
                ids = torch.randint(0, vocab, (b, s), generator=gen).to(device)

                def call():
                    model(input_ids=ids, use_cache=False)

                try:
                    if first:
                        t = time.monotonic()
                        call()
                        sync(device)
                        first_s = time.monotonic() - t
                        res = allocated(device)
                        rec(kind="memory", model=size, method=label(method, args), resident_bytes=res, setup_s=round(prep_s, 1),
                            first_call_s=round(first_s, 1), first_shape=[b, s], **weight_bytes(model, plan, device), **info)
                        first = False
                    reset_peak(device)
                    ms = timed(call, device, args.warmup, args.reps, args.budget)
                except torch.cuda.OutOfMemoryError as e:
                    rec(kind="prefill", model=size, method=label(method, args), batch=b, seq=s, error=f"out of memory: {str(e)[:120]}")
                    gc.collect()
                    torch.cuda.empty_cache()
                    continue
                rec(kind="prefill", model=size, method=label(method, args), batch=b, seq=s, ms=round(statistics.median(ms), 3),
                    reps=[round(x, 3) for x in ms], peak_bytes=peak(device), **info)
        cache = "dynamic" if method == "fp16-eager" else args.cache
        for i, b in enumerate(args.decode):
            if out_of_time(args):
                return
            ids = torch.randint(0, vocab, (b, args.prompt), generator=gen).to(device)
            kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                      min_new_tokens=args.new_tokens, do_sample=False, use_cache=True, pad_token_id=1)
            if cache == "static":
                kw["cache_implementation"] = "static"
            try:
                before = compile_counts()
                phases = dynamo_phases()
                STOP_CHECKS["deferred"] = 0
                stopwatch.reset()
                profiler = cProfile.Profile() if args.first_call_profile and i == 0 else None
                t = time.monotonic()
                if profiler is not None:
                    profiler.enable()
                model.generate(ids, **kw)          # first call: compiles the graphs of this batch size
                sync(device)
                warm_s = time.monotonic() - t
                if profiler is not None:
                    profiler.disable()
                hot = {} if profiler is None else {"first_call_functions": python_hotspots(profiler)}
                stages = {k: round(v[0], 1) for k, v in stopwatch.totals().items()}
                phases = dynamo_phases(phases)
                if first:
                    rec(kind="memory", model=size, method=label(method, args), resident_bytes=allocated(device),
                        setup_s=round(prep_s, 1), first_call_s=round(warm_s, 1), first_shape=["generate", b],
                        **weight_bytes(model, plan, device), **info)
                    first = False
                compiled = compile_counts(before)
                reset_peak(device)
                before = compile_counts()
                recorded = [cudagraphs_recorded(device)]     # fq_compile/generation.py

                def call():
                    model.generate(ids, **kw)
                    recorded.append(cudagraphs_recorded(device))

                ms = timed(call, device, 0, args.decode_reps, args.budget)
                again = compile_counts(before)
            except torch.cuda.OutOfMemoryError as e:
                rec(kind="decode", model=size, method=label(method, args), batch=b, error=f"out of memory: {str(e)[:120]}")
                gc.collect()
                torch.cuda.empty_cache()
                continue
            med = statistics.median(ms)
            info["stop_check"] = "deferred" if STOP_CHECKS["deferred"] else "per step"
            rec(kind="decode", model=size, method=label(method, args), batch=b, prompt=args.prompt, new_tokens=args.new_tokens,
                cache=cache, ms=round(med, 3), tokens_per_s=round(b * args.new_tokens / (med / 1e3), 2),
                reps=[round(x, 3) for x in ms], first_call_s=round(warm_s, 1), peak_bytes=peak(device),
                first_call_compiles=compiled, timed_compiles=again,
                first_call_stages=stages, first_call_dynamo_phases=phases, **hot,
                cudagraphs_recorded_per_call=(None if None in recorded
                                              else [b_ - a_ for a_, b_ in zip(recorded, recorded[1:])]), **info)
            if args.decode_profile and i == 0:
                profile_decode(model, ids, kw, method, size, device, args, rec, info)
    if plan is not None:
        rec(kind="graphs", model=size, method=label(method, args), graphs=len(reports(plan)),
            released_bytes=sum(r.released_bytes for r in reports(plan)))
    model = plan = None                        # free the GPU before the next method


def python_hotspots(profiler, top: int = 25) -> list:
    """The functions a cProfile'd call spent most of its own time in: [function, own s, cumulative s, calls],
    by own time (where a first call's Python goes: Dynamo, AOTAutograd, Inductor, ours)."""
    stats = pstats.Stats(profiler).stats
    rows = sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]
    return [[f"{Path(fn).name}:{line}({name})", round(tt, 2), round(ct, 2), nc]
            for (fn, line, name), (cc, nc, tt, ct, callers) in rows]


STOP_CHECKS = {"deferred": 0}


def watch_stop_checks(force: bool = False) -> None:
    """Count the deferred stop checks Hugging Face's generate() makes (our backend asks for them on CUDA:
    fq_compile/generation.py), so that each decode row says whether its host waited for every step.
    force (--defer-stop all): every method's generate() defers on CUDA, the fp16 and FP8 peers included,
    by Hugging Face's own rule for the devices where it defers ("mps"): what the same host-side change gives
    them, measured beside ours."""
    try:
        from transformers.generation import utils as gen_utils
    except ImportError:  # pragma: no cover - transformers is a dependency
        return
    cls = getattr(gen_utils, "DeferredStopCheck", None)
    if cls is None:
        if force:
            raise SystemExit("--defer-stop all needs transformers' DeferredStopCheck (transformers >= 5.17)")
        return
    init = cls.__init__

    def counted(self, *a, **k):
        STOP_CHECKS["deferred"] += 1
        init(self, *a, **k)

    cls.__init__ = counted
    if force:
        supported = cls.is_supported

        def is_supported(device, *a, **k):
            return supported(torch.device("mps") if device.type == "cuda" else device, *a, **k)

        cls.is_supported = staticmethod(is_supported)


def compile_counts(before: dict | None = None) -> dict:
    """Dynamo graphs compiled, graph breaks and Inductor's CUDA-graph skips so far (or since `before`), and
    `break_reasons`: Dynamo's reason for each graph break, with its count (a first call's breaks on the H100
    are not the CPU's: 4 graphs / 3 breaks there, 3 / 0 for the same tiny generate() here)."""
    from torch._dynamo.utils import counters

    reasons = {str(k)[:300]: v for k, v in counters["graph_break"].items()}
    now = {"graphs": counters["stats"]["unique_graphs"], "graph_breaks": sum(reasons.values()),
           "cudagraph_skips": counters["inductor"]["cudagraph_skips"]}
    if before is None:
        return dict(now, break_reasons=reasons)
    spent = {k: now[k] - before.get(k, 0) for k in now}
    old = before.get("break_reasons", {})
    spent["break_reasons"] = {k: v - old.get(k, 0) for k, v in reasons.items() if v > old.get(k, 0)}
    return spent


def dynamo_phases(before: dict | None = None, top: int = 12) -> dict:
    """Seconds per phase that Dynamo and Inductor time (torch._dynamo.utils.compilation_time_metrics;
    nested phases overlap), since `before`: where a first call's compile time goes, the `top` largest."""
    try:
        from torch._dynamo.utils import compilation_time_metrics
    except ImportError:
        return {}
    now = {k: sum(v) for k, v in compilation_time_metrics.items()}
    if before is None:
        return now
    spent = {k: round(v - before.get(k, 0.0), 1) for k, v in now.items() if v - before.get(k, 0.0) >= 0.05}
    return dict(sorted(spent.items(), key=lambda kv: -kv[1])[:top])


def profile_decode(model, ids, kw, method, size, device, args, rec, info, steps: int = 16):
    """Where one decode step's time goes, the prefill excluded: generate() with steps + 1 new tokens
    minus generate() with 1 (the prefill and its token), divided by `steps`, both after the timed runs
    (nothing compiles).  The step's wall time from calls timed without the profiler (the profiler's
    per-launch cost inflates a traced wall: 11.45 ms a token traced against 7.83 timed for O3 on the
    H100 of 2026-12-07); its GPU busy time (union of kernel intervals) and per-category kernel time from
    torch.profiler traces of the same two calls; idle = wall - busy (launch gaps, Python, host syncs)."""
    if device.type != "cuda":
        return

    def generate(n):
        return lambda: model.generate(ids, **dict(kw, max_new_tokens=n, min_new_tokens=n))

    long_, short = generate(steps + 1), generate(1)
    long_()
    short()
    sync(device)
    step = (statistics.median(timed(long_, device, 0, 5, 30.0))
            - statistics.median(timed(short, device, 0, 5, 30.0))) / steps
    (busy_l, wall_l, k_l), (busy_s, wall_s, k_s) = _traced(long_, device), _traced(short, device)
    busy = (busy_l - busy_s) / steps
    step_k = per_step(k_l, k_s, steps)
    cats = {}
    for name in k_l:                     # the categories of the long trace's kernels, as the step's
        cats[category(name)] = cats.get(category(name), 0.0) + step_k[name][0] / 1e3
    launches = sum(n for _, n in k_l.values()) - sum(n for _, n in k_s.values())
    rec(kind="decode_profile", model=size, method=label(method, args), batch=int(ids.shape[0]), steps=steps,
        step_ms=round(step, 3), step_busy_ms=round(busy, 3), step_idle_ms=round(step - busy, 3),
        traced_step_ms=round((wall_l - wall_s) / steps, 3), step_kernels=launches // steps,
        step_top_kernels=top_kernels(step_k), **{f"{c}_step_ms": round(v, 3) for c, v in cats.items()}, **info)


def per_step(long_: dict, short: dict, steps: int) -> dict:
    """{kernel name: (us, launches)} of one decode step: the long trace's less the short one's, / steps."""
    zero = (0.0, 0)
    return {name: ((long_.get(name, zero)[0] - short.get(name, zero)[0]) / steps,
                   (long_.get(name, zero)[1] - short.get(name, zero)[1]) / steps) for name in {*long_, *short}}


def top_kernels(step: dict, top: int = 15) -> list:
    """The `top` largest kernels of a step (`per_step`) by time: [name (first 100 characters), us, launches,
    category]."""
    rows = [[name[:100], round(us, 1), round(n, 2), category(name)] for name, (us, n) in step.items() if n > 0]
    return sorted(rows, key=lambda r: -r[1])[:top]


def _traced(fn, device):
    """(GPU busy ms: union of kernel intervals, wall ms, {kernel name: [us, launches]}) of one fn() under
    torch.profiler."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        t = time.monotonic()
        fn()
        sync(device)
        wall = (time.monotonic() - t) * 1e3
    spans, kernels = [], {}
    for evt in prof.events():
        if getattr(evt, "device_type", None) != DeviceType.CUDA or evt.time_range.elapsed_us() <= 0:
            continue
        spans.append((evt.time_range.start, evt.time_range.end))
        k = kernels.setdefault(evt.name, [0.0, 0])
        k[0] += evt.time_range.elapsed_us()
        k[1] += 1
    busy, end = 0.0, None
    for a, b in sorted(spans):
        if end is None or a > end:
            busy += b - a
            end = b
        elif b > end:
            busy += b - end
            end = b
    return busy / 1e3, wall, kernels


# -- per-layer profile --------------------------------------------------------------------------------

# first match wins: attention kernels may carry "sm90"/"gemm"-like words, our split-K epilogue is
# "dequant_kernel" (part of the GEMM), Inductor's fused FP8/INT8 activation quantize shows "amax"
CATEGORIES = [
    ("attention", ("flash", "fmha", "attention", "sdpa", "efficient")),
    ("GEMM", ("int_gemm", "dequant", "int8_linear", "int4_linear", "cutlass", "gemm", "xmma", "nvjet", "cublas",
              "scaled_mm", "addmm", "aten::mm", "_int_mm", "wgmma", "triton_tem", "unpack_int4",
              "flat_linear_decode")),
    # fused quantizes are Inductor kernels named after their aten ops: ours (round, minimum, _unsafe_index),
    # FP8's cast (clamp, then a cast to e4m3 that the name does not show)
    ("quantize", ("flatten_quantize", "amax", "float8", "e4m3", "quantize", "round", "minimum", "_unsafe_index",
                  "clamp", "row_absmax", "rows_resident")),
]


def category(name: str) -> str:
    """The kernel's category by name.  Inductor's pointwise / reduction kernels (triton_poi_, _red_,
    _per_) are never GEMMs, whatever GEMM their origins name (FP8's input cast is called
    "..._scaled_mm__to_copy_clamp..."): they count as quantize when they quantize, else other."""
    low = name.lower()
    elementwise = low.startswith(("triton_poi_", "triton_red_", "triton_per_"))
    for cat, keys in CATEGORIES:
        if cat == "GEMM" and elementwise:
            continue
        if any(k in low for k in keys):
            return cat
    return "other"


def run_profile(method, size, device, dtype, args, rec):
    """Time per kernel category of one decoder layer at the first --batches x --seqs: a model of
    --profile-layers blocks (4: enough for O3's INT4 share to spread over the layer positions as in
    the full model), lm_head replaced by identity so that the big output GEMM does not swamp the
    layers; times are per block (the embedding and final norm, small, are included)."""
    from torch.profiler import ProfilerActivity, profile

    try:
        model, plan, info = prepare(method, size, device, dtype, args, layers=args.profile_layers)
    except Unavailable as e:
        rec(kind="unavailable", model=size, method=label(method, args), reason=str(e))
        return
    model.lm_head = torch.nn.Identity()
    b, s = args.batches[0], args.seqs[0]
    ids = torch.randint(0, 512 if size == "tiny" else 50272, (b, s), device=device)
    iters = 5
    with torch.no_grad():
        for _ in range(3):
            model(input_ids=ids, use_cache=False)
        sync(device)
        acts = [ProfilerActivity.CUDA] if device.type == "cuda" else [ProfilerActivity.CPU]
        with profile(activities=acts) as prof:
            for _ in range(iters):
                model(input_ids=ids, use_cache=False)
            sync(device)
    totals: dict[str, float] = {}
    kernels: dict[str, float] = {}
    from torch.autograd import DeviceType

    for evt in prof.key_averages():
        if device.type == "cuda":
            if getattr(evt, "device_type", None) != DeviceType.CUDA:
                continue                       # CPU-side ops repeat their kernels' time
            t_us = getattr(evt, "self_device_time_total", None) or getattr(evt, "self_cuda_time_total", 0)
        else:
            if not evt.key.startswith(("fq::", "aten::")):
                continue
            t_us = evt.self_cpu_time_total
        if t_us <= 0:
            continue
        cat = category(evt.key)
        per_block = t_us / iters / 1e3 / args.profile_layers
        totals[cat] = totals.get(cat, 0.0) + per_block
        kernels[evt.key[:90]] = kernels.get(evt.key[:90], 0.0) + per_block
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:12]
    rec(kind="profile", model=size, method=label(method, args), batch=b, seq=s, blocks=args.profile_layers,
        total_ms=round(sum(totals.values()), 3),
        **{f"{k}_ms": round(v, 3) for k, v in totals.items()}, top_kernels=[[k, round(v, 3)] for k, v in top], **info)
    model = plan = None                        # free the GPU before the next method


# -- report ------------------------------------------------------------------------------------------

def load_rows(paths) -> list[dict]:
    rows = {}
    for p in paths:
        for line in Path(p).read_text().splitlines():
            if not line.strip():
                continue
            r = json.loads(line)
            key = (r.get("kind"), r.get("model"), r.get("method"), r.get("batch"), r.get("seq"), r.get("dynamic"))
            rows[key] = r                      # a later run of the same point replaces an earlier one
    # static-shape rows last, so that where a point was measured both ways the tables show the static one
    return sorted(rows.values(), key=lambda r: r.get("dynamic") is False)


def _gb(x):
    return "-" if x is None else f"{x / 1e9:.2f}"


def _order(methods):
    return [m for m in METHODS if m in methods] + sorted(set(methods) - set(METHODS))


def report(paths, results_dir: Path, stem: str) -> str:
    from tabulate import tabulate

    rows = load_rows(paths)
    if not rows:
        raise SystemExit("no rows in " + ", ".join(map(str, paths)))
    first = rows[0]
    lines = ["# End-to-end benchmark (issues 5 and 13)", "",
             f"device: {first.get('device')}, torch {first.get('torch')}, date {first.get('date')}; "
             f"rows merged from {len(paths)} file(s); the commands that measured them are listed below.",
             "Random fp16 OPT weights; our plans are synthetic with the flatten ratio and INT4 share of the "
             f"{TABLE4_LABEL} (INT4 in the same share of blocks at every layer position); lm_head fp16 for all methods.",
             "Ratios: the faster of fp16 eager / fp16 Inductor at that point divided by the method's time (>1: faster).", ""]
    cmds = sorted({(" ".join(f"{k}={v}" for k, v in (r.get("env") or {}).items()) + " " + r["command"]).strip()
                   for r in rows if r.get("command")})
    if cmds:
        lines += ["Commands (benchmarks/device/prefill.sh runs them):", ""] + [f"    {c}" for c in cmds] + [""]
    models = [m for m in MODELS + ("tiny",) if any(r.get("model") == m for r in rows)]
    unavailable = [r for r in rows if r.get("kind") == "unavailable"]
    for size in models:
        pre = [r for r in rows if r.get("kind") == "prefill" and r.get("model") == size and "ms" in r]
        methods = _order({r["method"] for r in pre})
        if pre:
            pts = sorted({(r["batch"], r["seq"]) for r in pre})
            table = []
            for b, s in pts:
                at = {r["method"]: r for r in pre if (r["batch"], r["seq"]) == (b, s)}
                base = min((at[m]["ms"] for m in FP16 if m in at), default=None)
                row = [b, s]
                for m in methods:
                    if m in at:
                        dyn = "†" if at[m].get("dynamic") and m != "fp16-eager" else ""
                        row.append(f"{at[m]['ms']:.1f}{dyn}" + (f" ({base / at[m]['ms']:.2f}x)" if base else ""))
                    else:
                        row.append("-")
                table.append(row)
            lines += [f"## OPT-{size}: prefill latency, ms (x faster fp16)",
                      "† compiled with dynamic shapes (one graph for the sweep); others static", "",
                      tabulate(table, headers=["batch", "seq"] + methods, tablefmt="github", disable_numparse=True), ""]
            peaks = []
            for b, s in pts:
                at = {r["method"]: r for r in pre if (r["batch"], r["seq"]) == (b, s)}
                peaks.append([b, s] + [_gb(at[m].get("peak_bytes")) if m in at else "-" for m in methods])
            lines += [f"### OPT-{size}: peak GPU memory per prefill point, GB (weights + activations, no KV cache)", "",
                      tabulate(peaks, headers=["batch", "seq"] + methods, tablefmt="github", disable_numparse=True), ""]
        lines += decode_tables(rows, size)
        mem = [r for r in rows if r.get("kind") == "memory" and r.get("model") == size]
        if mem:
            fp16 = next((r["resident_bytes"] for m in FP16 for r in mem if r["method"] == m and r.get("resident_bytes")), None)
            table = []
            for r in sorted(mem, key=lambda r: _order([r["method"]] + METHODS).index(r["method"])):
                res = r.get("resident_bytes")
                table.append([r["method"], _gb(res), f"{res / fp16:.2f}" if res and fp16 else "-",
                              _gb(r.get("weight_bytes_model")), _gb(r.get("weight_bytes_plan")),
                              r.get("int4_share", "-"), r.get("flatten_ratio", "-"), r.get("setup_s"), r.get("first_call_s")])
            lines += [f"## OPT-{size}: resident GPU memory after the first call (Table 6 analog; KV cache excluded)", "",
                      tabulate(table, headers=["method", "resident GB", "x fp16", "model params GB", "plan GB",
                                               "INT4 share", "flatten ratio", "setup s", "first call s (compile)"],
                               tablefmt="github", disable_numparse=True), ""]
        prof = [r for r in rows if r.get("kind") == "profile" and r.get("model") == size]
        if prof:
            cats = ["quantize", "GEMM", "attention", "other"]
            table = [[r["method"], f"{r['batch']}x{r['seq']}", r["total_ms"]] + [r.get(f"{c}_ms", 0.0) for c in cats]
                     for r in sorted(prof, key=lambda r: _order([r["method"]] + METHODS).index(r["method"]))]
            lines += [f"## OPT-{size}: one decoder layer, device time by kernel category (ms per block)",
                      "torch.profiler over a model of a few blocks (lm_head removed), divided by the block count; "
                      "kernels sorted by name: Inductor-fused kernels count as 'other' unless their name says amax/quantize", "",
                      tabulate(table, headers=["method", "shape", "total"] + cats, tablefmt="github", disable_numparse=True), ""]
            for r in prof:
                lines += [f"<details><summary>{r['method']}: top kernels</summary>", "",
                          tabulate(r.get("top_kernels", []), headers=["kernel", "ms"], tablefmt="github", disable_numparse=True), "", "</details>", ""]
    lines += targets(rows)
    errors = [r for r in rows if r.get("kind") == "error" or (r.get("error") and r.get("kind") != "error")]
    if unavailable or errors:
        lines += ["## Methods or points that could not run", ""]
        lines += [f"- {r['model']} {r['method']}: unavailable: {r['reason']}" for r in unavailable]
        lines += [f"- {r['model']} {r['method']} {r.get('kind')} {r.get('batch', '')}x{r.get('seq', '')}: {r['error']}"
                  for r in errors]
        lines.append("")
    results_dir.mkdir(parents=True, exist_ok=True)
    md = results_dir / f"{stem}.md"
    png = results_dir / f"{stem}.png"
    plotted = plot(rows, png)
    if plotted:
        lines += [f"![latency vs batch and sequence]({png.name})", ""]
    md.write_text("\n".join(lines))          # the raw rows stay where the runs wrote them, out of the repo
    print("\n".join(lines))
    print(f"wrote {md}" + (f", {png}" if plotted else " (no prefill rows: no plot)"))
    return "\n".join(lines)


def _fastest_fp16(dec, b):
    return max((r["tokens_per_s"] for r in dec if r["method"] in FP16 and r["batch"] == b), default=None)


def _call_range(r) -> str:
    """tokens/s of the slowest and the fastest timed call ("-" for one call): the host's noise shows here
    (H100, 2026-12-07: O3's calls 8.8 to 13.8 ms a token on one machine)."""
    reps = r.get("reps") or []
    if len(reps) < 2:
        return "-"
    n = r["batch"] * r["new_tokens"] * 1e3
    return f"{n / max(reps):.1f}-{n / min(reps):.1f}"


def decode_tables(rows, size) -> list[str]:
    """Issue 10's decode table (one row per method and batch) and, where profiled, where a decode
    step's time goes."""
    from tabulate import tabulate

    dec = [r for r in rows if r.get("kind") == "decode" and r.get("model") == size and "tokens_per_s" in r]
    if not dec:
        return []
    copy = next((r["gb_per_s"] for r in rows if r.get("kind") == "copy"), None)
    wbytes = {r["method"]: (r.get("weight_bytes_model") or 0) + (r.get("weight_bytes_plan") or 0)
              for r in rows if r.get("kind") == "memory" and r.get("model") == size}
    table = []
    for r in sorted(dec, key=lambda r: (_order([r["method"]] + METHODS).index(r["method"]), r["batch"])):
        base = _fastest_fp16(dec, r["batch"])
        bound = copy * 1e9 / wbytes[r["method"]] * r["batch"] if copy and wbytes.get(r["method"]) else None
        c = r.get("first_call_compiles") or {}
        table.append([r["method"], r["batch"], r.get("cache", "-"), r.get("stop_check", "-"), f"{r['tokens_per_s']:.1f}",
                      _call_range(r),
                      f"{r['tokens_per_s'] / base:.2f}" if base else "-",
                      f"{100 * r['tokens_per_s'] / bound:.0f}%" if bound else "-",
                      r.get("first_call_s", r.get("warmup_s", "-")), _gb(r.get("peak_bytes")),
                      f"{c.get('graphs', '-')}/{c.get('graph_breaks', '-')}/{c.get('cudagraph_skips', '-')}",
                      sum((r.get("timed_compiles") or {}).get(k, 0) for k in ("graphs",))])
    d0 = dec[0]
    lines = [f"## OPT-{size}: decode (issue 10)",
             f"generate(): {d0.get('prompt')}-token prompt, {d0.get('new_tokens')} new tokens, greedy, batch as "
             "listed; tokens/s over the whole call (prefill included), median of timed calls after the first; "
             "calls: the slowest and the fastest timed call. "
             "x fp16: over the fastest fp16 method at that batch. % bound: of the weight-streaming bound "
             "(copy bandwidth / resident weight bytes x batch)" + (f", copy bandwidth {copy:.0f} GB/s" if copy else "")
             + ". first call: the first generate() at that batch, compiling included. compiles: Dynamo graphs / "
             "graph breaks / CUDA-graph skips in the first call; recompiles: graphs compiled during the timed calls. "
             "stop check: per step = the host waits for each decode step (Hugging Face's default); deferred = "
             "read one step late, so the host queues the next step while the GPU runs this one.",
             "", tabulate(table, headers=["method", "batch", "cache", "stop check", "tokens/s", "calls", "x fp16", "% bound", "first call s",
                                          "peak GB (KV incl.)", "compiles", "recompiles"],
                          tablefmt="github", disable_numparse=True), ""]
    staged = [r for r in dec if r.get("first_call_stages") is not None]
    if staged:
        names = sorted({k for r in staged for k in r["first_call_stages"]})
        lines += [f"### OPT-{size}: where each first generate() call went (s)",
                  "Each stage's own seconds (fq_compile/kernels/stopwatch.py); the rest: Dynamo tracing, Triton JIT "
                  "outside the stages, CUDA-graph capture, the run.", "",
                  tabulate([[r["method"], r["batch"], r.get("first_call_s", "-")]
                            + [r["first_call_stages"].get(k, 0.0) for k in names]
                            + [round(r.get("first_call_s", 0) - sum(r["first_call_stages"].values()), 1)]
                            for r in staged], headers=["method", "batch", "first call"] + names + ["rest"],
                           tablefmt="github"), ""]
    lines += _first_call_details(dec, size)
    prof = [r for r in rows if r.get("kind") == "decode_profile" and r.get("model") == size]
    if prof:
        cats = ["quantize", "GEMM", "attention", "other"]
        prof = sorted(prof, key=lambda r: _order([r["method"]] + METHODS).index(r["method"]))
        new = [r for r in prof if "step_ms" in r]
        if new:
            ptable = [[r["method"], r["batch"], r["step_ms"], r["step_busy_ms"], r["step_idle_ms"],
                       f"{r['step_idle_ms'] / r['step_ms']:.0%}" if r["step_ms"] > 0 else "-", r["traced_step_ms"],
                       r["step_kernels"]] + [r.get(f"{c}_step_ms", 0.0) for c in cats] for r in new]
            lines += [f"### OPT-{size}: one decode step, where the time goes (ms)",
                      "One step = generate() of 17 new tokens minus generate() of 1 (prefill excluded), / 16. wall: "
                      "timed without the profiler (medians of 5); GPU busy: union of kernel intervals and categories "
                      "(kernel time, may overlap) from torch.profiler traces of the same calls; idle = wall - busy "
                      "(launch gaps, Python, host syncs); traced wall: the same step under the profiler", "",
                      tabulate(ptable, headers=["method", "batch", "wall", "GPU busy", "idle", "idle %", "traced wall",
                                                "kernels"] + cats, tablefmt="github", disable_numparse=True), ""]
            for r in (r for r in new if r.get("step_top_kernels")):
                lines += [f"#### {r['method']}, batch {r['batch']}: the step's largest kernels", "",
                          tabulate(r["step_top_kernels"], headers=["kernel", "us / step", "launches / step", "category"],
                                   tablefmt="github", disable_numparse=True), ""]
        old = [r for r in prof if "step_ms" not in r]
        if old:
            ptable = [[r["method"], r["batch"], r["wall_ms_per_token"], r["busy_ms_per_token"], r["idle_ms_per_token"],
                       r.get("kernels", "-")] + [r.get(f"{c}_ms_per_token", 0.0) for c in cats] for r in old]
            lines += [f"### OPT-{size}: one decode step, where the time goes (ms per token)",
                      "torch.profiler over generate() with 16 new tokens after the timed runs (prefill included); "
                      "busy = union of GPU kernel intervals; idle = traced wall - busy; categories sum kernel time "
                      "(may overlap)", "",
                      tabulate(ptable, headers=["method", "batch", "wall", "GPU busy", "idle", "kernels/token"] + cats,
                               tablefmt="github", disable_numparse=True), ""]
    return lines


def _first_call_details(dec, size) -> list[str]:
    """Where Dynamo and Inductor spent a first generate() (their own phase timers, nested phases overlap) and
    why Dynamo broke graphs in it, per decode row that recorded them."""
    from tabulate import tabulate

    lines = []
    phased = [r for r in dec if r.get("first_call_dynamo_phases")]
    if phased:
        lines += [f"### OPT-{size}: the first generate() call's compile phases (s)",
                  "torch._dynamo.utils.compilation_time_metrics over the first call, the largest phases; nested "
                  "phases overlap (each includes the ones it calls).", ""]
        lines += [f"- {r['method']} (batch {r['batch']}, {r.get('first_call_s', '-')} s): "
                  + ", ".join(f"{k} {v}" for k, v in r["first_call_dynamo_phases"].items()) for r in phased] + [""]
    for r in (r for r in dec if r.get("first_call_functions")):
        lines += [f"### OPT-{size}, {r['method']} (batch {r['batch']}): the first call's Python, by own time (cProfile)",
                  "", tabulate(r["first_call_functions"], headers=["function", "own s", "cumulative s", "calls"],
                               tablefmt="github", disable_numparse=True), ""]
    broken = [r for r in dec if (r.get("first_call_compiles") or {}).get("break_reasons")]
    if broken:
        lines += [f"### OPT-{size}: graph breaks in the first generate() call", ""]
        lines += [f"- {r['method']} (batch {r['batch']}): " + "; ".join(
            f"{n} x {reason}" for reason, n in r["first_call_compiles"]["break_reasons"].items()) for r in broken] + [""]
    return lines


# Result labels that stand for a method's default run: what benchmarks/device/prefill.sh readme and decode.sh
# headline / compile / automem record (a run with no label counts too).
_PREFILL_AS = {"fq-O1": ("fq-O1@beta3", "fq-O1"), "fq-auto": ("fq-auto@beta3", "fq-auto"), "fq-O3": ("fq-O3",),
               "fq-O1 per-tensor": ("fq-O1@beta3-tensor",), "fp8-naive": ("fp8-naive",), "fp16-eager": ("fp16-eager",)}
_DECODE_AS = {"fq-O3": ("fq-O3",), "fq-O1": ("fq-O1",), "fp8-naive": ("fp8-naive",),
              "fq-auto memory-first": ("fq-auto@auto-mem0.30",), "fq-O3 cold": ("fq-O3@cold-cache", "fq-O3"),
              "fq-O3 warm": ("fq-O3@warm-cache",)}


def targets(rows) -> list[str]:
    """The open issues' targets (23: decode; 24: prefill at OPT-13B 8 x 2048 and its sweep), where measured:
    each with the figure, the wanted bound and by how much it is met or missed."""
    def first(names, pick):
        return next((x for x in (pick(n) for n in names) if x is not None), None)

    def ms(method, b=8, s=2048):
        return first(_PREFILL_AS[method], lambda n: next(
            (r["ms"] for r in rows if r.get("kind") == "prefill" and r.get("model") == "13b" and r.get("method") == n
             and r.get("batch") == b and r.get("seq") == s and "ms" in r), None))

    def decode(method, b=1, field="tokens_per_s"):
        return first(_DECODE_AS.get(method, (method,)), lambda n: next(
            (r.get(field) for r in rows if r.get("kind") == "decode" and r.get("model") == "13b"
             and r.get("method") == n and r.get("batch") == b and "tokens_per_s" in r), None))

    def memory(name):
        return next((r for r in rows if r.get("kind") == "memory" and r.get("model") == "13b" and r.get("method") == name),
                    None)

    def weights(name):
        r = memory(name)
        return (r.get("weight_bytes_model") or 0) + (r.get("weight_bytes_plan") or 0) if r else None

    fp16 = {b: max([x for x in (decode(m, b) for m in FP16) if x], default=None) for b in (1, 16, 64)}
    copy = next((r["gb_per_s"] for r in rows if r.get("kind") == "copy"), None)
    o3_bytes = weights("fq-O3")
    o3_bound = copy * 1e9 / o3_bytes if copy and o3_bytes else None
    fp16_bytes = weights("fp16-static") or weights("fp16-eager")
    mem_bytes = weights(_DECODE_AS["fq-auto memory-first"][0])
    # (target, ours, base, wanted, kind): time = ours / base <= wanted; speed = base / ours >= wanted (times in
    # ms); tps = ours / base >= wanted (tokens/s); bytes = ours / base <= wanted; seconds = ours <= wanted
    checks = [
        ("24: auto prefill time / naive FP8's", ms("fq-auto"), ms("fp8-naive"), 1.00, "time"),
        ("24: O1 prefill time / naive FP8's", ms("fq-O1"), ms("fp8-naive"), 1.10, "time"),
        ("24: O1 per-token / per-tensor scales, time", ms("fq-O1"), ms("fq-O1 per-tensor"), 1.02, "time"),
        ("24: O1 prefill vs fp16 eager", ms("fq-O1"), ms("fp16-eager"), 1.35, "speed"),
        ("24: O3 prefill vs fp16 eager", ms("fq-O3"), ms("fp16-eager"), 1.35, "speed"),
        ("24: auto prefill vs fp16 eager", ms("fq-auto"), ms("fp16-eager"), 1.35, "speed"),
        ("23: O3 decode b1 vs fastest fp16", decode("fq-O3"), fp16[1], 1.9, "tps"),
        ("23: O3 decode b1 vs naive FP8", decode("fq-O3"), decode("fp8-naive"), 1.6, "tps"),
        ("23: O3 decode b1 vs its weight-streaming bound", decode("fq-O3"), o3_bound, 0.6, "tps"),
        ("23: O1 decode b1 vs fastest fp16", decode("fq-O1"), fp16[1], 1.4, "tps"),
        ("23: O3 decode b16 vs fastest fp16", decode("fq-O3", 16), fp16[16], 1.5, "tps"),
        ("23: O3 decode b64 vs fastest fp16", decode("fq-O3", 64), fp16[64], 1.3, "tps"),
        ("23: memory-first auto decode b1 vs fastest fp16", decode("fq-auto memory-first"), fp16[1], 2.5, "tps"),
        ("23: memory-first auto weights / fp16's", mem_bytes, fp16_bytes, 0.30, "bytes"),
        ("23: O3 first generate(), cold caches, s", decode("fq-O3 cold", field="first_call_s"), None, 90.0, "seconds"),
        ("23: O3 first generate(), warm caches, s", decode("fq-O3 warm", field="first_call_s"), None, 30.0, "seconds"),
    ]
    table = []
    for name, ours, base, wanted, kind in checks:
        if not ours or (not base and kind != "seconds"):
            table.append([name, "not measured", f"{wanted}", "-"])
            continue
        if kind == "seconds":
            table.append([name, f"{ours:.1f}", f"<= {wanted:.0f}",
                          "met" if ours <= wanted else f"missed by {ours / wanted * 100 - 100:.0f}%"])
            continue
        ratio = base / ours if kind == "speed" else ours / base
        ok = ratio <= wanted if kind in ("bytes", "time") else ratio >= wanted
        table.append([name, f"{ratio:.2f}", f"{'<=' if kind in ('bytes', 'time') else '>='} {wanted}",
                      "met" if ok else f"missed by {abs(ratio / wanted - 1) * 100:.0f}%"])
    # issue 24: auto no slower than naive FP8 at every sweep point with M = batch x seq >= 2048
    pre = [r for r in rows if r.get("kind") == "prefill" and r.get("model") == "13b" and "ms" in r]
    won, seen = 0, 0
    for pt in sorted({(r["batch"], r["seq"]) for r in pre if r["batch"] * r["seq"] >= 2048}):
        auto = ms("fq-auto", *pt)
        fp8 = ms("fp8-naive", *pt)
        if auto and fp8:
            seen += 1
            won += auto <= fp8
    table.append(["24: sweep points (M >= 2048) where auto <= naive FP8's time", f"{won} of {seen}" if seen else
                  "not measured", "all", "-" if not seen else ("met" if won == seen else f"missed at {seen - won}")])
    from tabulate import tabulate

    return ["## Targets of the open issues (OPT-13B shape; prefill 8 x 2048 unless stated)",
            "Issue 23 (decode, batch 1 unless stated; fastest fp16 = fp16 static + compile where measured) and "
            "issue 24 (prefill); the rows a run did not measure say so.", "",
            tabulate(table, headers=["target", "measured", "wanted", "verdict"], tablefmt="github", disable_numparse=True), ""]


def plot(rows, png: Path) -> bool:
    """Figure 4 analog: per model and sequence length, latency vs batch, one line per method."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return False
    pre = [r for r in rows if r.get("kind") == "prefill" and "ms" in r]
    if not pre:
        return False
    models = [m for m in MODELS + ("tiny",) if any(r["model"] == m for r in pre)]
    seqs = sorted({r["seq"] for r in pre})
    fig, axes = plt.subplots(len(models), len(seqs), figsize=(4.2 * len(seqs), 3.4 * len(models)), squeeze=False)
    for i, size in enumerate(models):
        for j, s in enumerate(seqs):
            ax = axes[i][j]
            for m in _order({r["method"] for r in pre if r["model"] == size}):
                pts = sorted((r["batch"], r["ms"]) for r in pre if r["model"] == size and r["seq"] == s and r["method"] == m)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m,
                            linewidth=2.2 if m.startswith("fq-") else 1.2)
            ax.set_title(f"OPT-{size}, seq {s}")
            ax.set_xlabel("batch size")
            ax.set_ylabel("prefill latency (ms)")
            ax.set_xscale("log", base=2)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    return True


# -- main --------------------------------------------------------------------------------------------

def device_slug(name: str) -> str:
    """'h100', 'h200', 'gh200', 'a100', ... from a device name (file names only), 'cpu' or 'gpu'."""
    import re

    if "cpu" in name.lower():
        return "cpu"
    m = re.search(r"\b(GH|H|A|L|B)(\d{2,3})\b", name)
    return (m.group(1) + m.group(2)).lower() if m else "gpu"


def summary(paths) -> str:
    """A short table of prefill rows: ms, x the faster fp16 and x naive FP8 at the same point."""
    from tabulate import tabulate

    rows = load_rows(paths)
    pre = [r for r in rows if r.get("kind") == "prefill" and "ms" in r]
    table = []
    for key in sorted({(r["model"], r["batch"], r["seq"]) for r in pre}, key=lambda k: (MODELS + ("tiny",)).index(k[0])
                      if k[0] in MODELS + ("tiny",) else 99):
        at = {r["method"]: r["ms"] for r in pre if (r["model"], r["batch"], r["seq"]) == key}
        fp16 = min((at[m] for m in FP16 if m in at), default=None)
        fp8 = at.get("fp8-naive")
        for m in _order(at):
            table.append([key[0], f"{key[1]}x{key[2]}", m, f"{at[m]:.1f}", f"{fp16 / at[m]:.2f}" if fp16 else "-",
                          f"{at[m] / fp8:.2f}" if fp8 else "-"])
    other = [f"{r.get('model')} {r.get('method')}: {r.get('kind')} {r.get('reason') or r.get('error')}"
             for r in rows if r.get("kind") in ("unavailable", "error") or r.get("error")]
    dev = rows[0].get("device") if rows else "?"
    text = (f"device {dev}, {rows[0].get('date') if rows else ''}\n"
            + tabulate(table, ["model", "batch x seq", "method", "ms", "x faster fp16", "time / naive FP8"],
                       tablefmt="github", disable_numparse=True))
    if other:
        text += "\n" + "\n".join(other)
    return text


def ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="13b", help=f"comma list of {', '.join(MODELS)} (or tiny: a quick check)")
    ap.add_argument("--methods", default="all", help=f"comma list of {', '.join(METHODS)}, or all")
    ap.add_argument("--batches", type=ints, default=[8])
    ap.add_argument("--seqs", type=ints, default=[2048])
    ap.add_argument("--decode", type=ints, default=[], help="decode batch sizes (generate with KV cache)")
    ap.add_argument("--prompt", type=int, default=PROMPT)
    ap.add_argument("--new-tokens", type=int, default=NEW_TOKENS)
    ap.add_argument("--dynamic", choices=["auto", "true", "false"], default="auto",
                    help="torch.compile dynamic: auto = static (False) for one prefill shape without decode, else "
                         "Dynamo's default (None: static first, dynamic where a later call's shape differs), what "
                         "users get; true lifts float attributes (layer norm eps) to graph inputs, which keeps "
                         "blocks from regional compilation")
    ap.add_argument("--max-autotune", action="store_true", help="fp16-inductor in mode='max-autotune'")
    ap.add_argument("--auto-formats", default="",
                    help="fq-auto: format shares of the layers, e.g. fp8=0.3,w4a8=0.5,int8=0.2")
    ap.add_argument("--gemm", default=None, help="our backend's 'gemm' option (triton, cutlass, auto); default: its own")
    ap.add_argument("--flatten-ratio", type=float, default=None,
                    help="our levels: the share of flattened channels of the synthetic plan (default: the paper's "
                         "Table 4 figure); pair with --label to keep the rows apart")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--decode-reps", type=int, default=5)
    ap.add_argument("--cache", choices=["static", "dynamic"], default="static",
                    help="KV cache of the decode runs (fp16-eager always uses the dynamic one)")
    ap.add_argument("--cudagraphs", choices=["auto", "true", "false"], default="auto",
                    help="our backend's cudagraphs option (fq_compile/generation.py)")
    ap.add_argument("--defer-stop", choices=["default", "all", "off"], default="default",
                    help="generate()'s stop check: default = what each method gets (ours deferred on CUDA, Hugging "
                         "Face's paths one host sync per step); all = deferred for every method (the peers too); "
                         "off = ours with options defer_stop=False. Label such rows (--label)")
    ap.add_argument("--activation-scale", choices=["token", "tensor"], default=None,
                    help="our levels' activation scales (Config.activation_scale); default: the level's own")
    ap.add_argument("--label", default=None, help="suffix for the method names of this run's rows (e.g. warm-cache)")
    ap.add_argument("--layers", type=int, default=None,
                    help="decoder blocks (default: the model's own): e.g. tiny at 13B's 40 blocks, to study a first "
                         "call's structure on the CPU")
    ap.add_argument("--first-call-profile", action="store_true",
                    help="cProfile the first generate() of the first decode batch: its Python hotspots in the row")
    ap.add_argument("--decode-profile", action="store_true",
                    help="profile one short generate per method: per-token wall, GPU busy by category, idle")
    ap.add_argument("--budget", type=float, default=8.0, help="seconds of timed runs per point (after 3 reps)")
    ap.add_argument("--time-limit", type=float, default=0, help="stop starting new points after this many seconds")
    ap.add_argument("--profile", action="store_true", help="per-layer profile instead of the sweep")
    ap.add_argument("--profile-layers", type=int, default=4, help="blocks in the profiled model")
    ap.add_argument("--out", default=os.environ.get("OUT", "e2e-out"))
    ap.add_argument("--smoke", action="store_true", help="tiny config on the CPU (checks the script, not speed)")
    ap.add_argument("--report", nargs="+", metavar="JSONL", help="merge result files into tables + PNG")
    ap.add_argument("--summary", nargs="+", metavar="JSONL", help="print a short table of the prefill rows")
    ap.add_argument("--brief", nargs="+", metavar="JSONL", help="print the decode table of these files (no files written)")
    ap.add_argument("--results-dir", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--stem", default=None, help="report file name stem (default e2e-<date>-<device>)")
    args = ap.parse_args(argv)

    if args.summary:
        print(summary([p for p in args.summary if Path(p).exists()]))
        return
    if args.brief:
        rows = load_rows(args.brief)
        for size in [m for m in MODELS + ("tiny",) if any(r.get("model") == m for r in rows)]:
            print("\n".join(decode_tables(rows, size)))
        for r in rows:
            if r.get("kind") in ("unavailable", "error") or (r.get("error") and r.get("kind") != "error"):
                print(f"- {r.get('method')} {r.get('kind')} {r.get('batch', '')}: {r.get('reason') or r.get('error')}")
        return None
    if args.report:
        first = json.loads(Path(args.report[0]).read_text().splitlines()[0])
        dev = device_slug(str(first.get("device", "")))
        return report(args.report, Path(args.results_dir), args.stem or f"e2e-{first.get('date', 'undated')}-{dev}")

    if args.smoke:
        device, dtype = torch.device("cpu"), torch.float32
        models = ["tiny"]
        if args.seqs == [2048]:
            args.seqs = [16]
        if args.batches == [8]:
            args.batches = [2]
        args.prompt, args.new_tokens = min(args.prompt, 8), min(args.new_tokens, 4)
        args.reps, args.warmup, args.decode_reps = 2, 1, 1
    else:
        if not torch.cuda.is_available():
            raise SystemExit("e2e.py measures on a CUDA GPU; use --smoke to check it on the CPU")
        device, dtype = torch.device("cuda"), torch.float16
        models = [m.strip() for m in args.models.split(",")]
        bad = set(models) - set(MODELS) - {"tiny"}         # tiny on the GPU: a quick check of every path
        if bad:
            raise SystemExit(f"unknown model(s) {sorted(bad)}; choose from {', '.join(MODELS)}")
    methods = METHODS if args.methods == "all" else [m.strip() for m in args.methods.split(",")]
    bad = set(methods) - set(METHODS)
    if bad:
        raise SystemExit(f"unknown method(s) {sorted(bad)}; choose from {', '.join(METHODS)}")
    single = len(args.batches) * len(args.seqs) == 1 and not args.decode
    args.dynamic_flag = {"true": True, "false": False, "auto": False if single or args.profile else None}[args.dynamic]
    for knob in ("recompile_limit", "cache_size_limit"):      # one model sees many shapes and methods
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, max(getattr(torch._dynamo.config, knob), 32))

    import transformers

    meta = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", torch=torch.__version__,
                transformers=transformers.__version__, date=datetime.date.today().isoformat(), dynamic=args.dynamic_flag)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        meta.update(arch=f"sm_{props.major}{props.minor}", sm_count=props.multi_processor_count)
    meta["command"] = "python benchmarks/e2e.py " + " ".join(sys.argv[1:] if argv is None else argv)
    meta["env"] = {k: os.environ[k] for k in ("FQ_GEMM", "FQ_QUANTIZE") if os.environ.get(k)}
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        pass
    meta["defer_stop"] = args.defer_stop
    watch_stop_checks(force=args.defer_stop == "all")
    rec = Recorder(Path(args.out), meta)
    if device.type == "cuda" and args.decode:
        rec(kind="copy", gb_per_s=round(copy_bandwidth(), 1))
    print(f"e2e: models {models}, methods {methods}, batches {args.batches}, seqs {args.seqs}, decode {args.decode}, "
          f"dynamic={args.dynamic_flag}, out {rec.path}", flush=True)
    import torch._inductor.config as inductor_config

    longest = 0.0                                  # the longest method so far: do not start one that cannot finish
    for size in models:
        for method in methods:
            if out_of_time(args):
                return
            if args.time_limit and time.monotonic() - T0 + longest > args.time_limit + 60:
                print(f"stopping before {method}: the longest method so far took {longest:.0f}s, "
                      f"which would overrun --time-limit {args.time_limit:.0f}s", flush=True)
                return
            started = time.monotonic()
            saved = inductor_config.save_config()     # torchao changes Inductor settings for its own run
            try:
                (run_profile if args.profile else run_method)(method, size, device, dtype, args, rec)
            except Exception as e:  # noqa: BLE001  (one method failing must not cost the others' device time)
                import traceback

                tb = traceback.format_exc().strip().splitlines()
                rec(kind="error", model=size, method=label(method, args), error=f"{type(e).__name__}: {str(e)[:300]}",
                    where=tb[-6:-1])
                if args.smoke:
                    raise
            finally:
                longest = max(longest, time.monotonic() - started)
                inductor_config.load_config(saved)
                torch._dynamo.reset()
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
