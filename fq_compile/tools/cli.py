"""`fq-compile`'s commands (demo, quantize, dump, eval; quantize --save and demo --from: the deploy
artefact, fq_compile/deploy.py); the parser is fq_compile/tools/cli_parser.py, which the console script
(fq_compile_cli.py) runs before importing the package."""

from __future__ import annotations

import json
import statistics
import sys
import textwrap
import time
from contextlib import contextmanager

import torch
from tabulate import tabulate


def _config(args, level: str):
    from fq_compile.config import Config
    from fq_compile.tools.evaluate import parse_overrides

    return Config.from_dict(dict(parse_overrides(args.overrides), level=level, seed=args.seed))


def _calib(tokenizer, args):
    from fq_compile.tools.data import calibration_batches

    return calibration_batches(tokenizer, n=args.calib_batches, seqlen=args.calib_seqlen, seed=args.seed,
                               data_dir=args.data_dir)


def _calibrate(model, tokenizer, args, level: str):
    from fq_compile import calibrate

    return calibrate(model, _calib(tokenizer, args), _config(args, level), progress=not args.no_progress)


def _test_ids(tokenizer, args):
    from fq_compile.tools.data import wikitext_test

    return tokenizer(wikitext_test(args.data_dir), return_tensors="pt").input_ids[0]


def _rel_err(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@torch.no_grad()
def greedy(model_call, tokenizer, prompt: str, new_tokens: int) -> str:
    """Greedy decoding through `model_call` (the module, or a compiled one) without a KV cache: each step
    reruns the prefix, called as the perplexity windows are (`model_call(ids, use_cache=False)`), so a
    compiled model whose graph is already dynamic in the length serves every step without compiling the
    KV cache's shapes; the demo shows the text, decode speed is benchmarks/e2e.py's job."""
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(_device_of(model_call))
    start = ids.shape[1]
    for _ in range(new_tokens):
        nxt = model_call(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
        if tokenizer.eos_token_id is not None and int(nxt) == tokenizer.eos_token_id:
            break
    return tokenizer.decode(ids[0, start:], skip_special_tokens=True)


def _device_of(module) -> torch.device:
    return next(iter(module.parameters()), torch.empty(0)).device


def _compile(model, plan, **options):
    from fq_compile.tools.evaluate import compile_quantized

    return compile_quantized(model, plan, **options)


@contextmanager
def _room_for_levels(levels: int):
    """Every level adds entries to the Dynamo cache of the model's forward (calibration's graphs, then
    the compiled plan's, then other shapes): raise Dynamo's per-function recompile limit for this
    command only, so that no later level silently falls back to eager.  Nothing is reset: graphs
    already compiled stay valid, and each level compiles once."""
    cfg = torch._dynamo.config
    need = 8 + 8 * levels          # calibration, perplexity, greedy steps and on CUDA generate()'s graphs
    with cfg.patch(recompile_limit=max(cfg.recompile_limit, need),
                   accumulated_recompile_limit=max(cfg.accumulated_recompile_limit, 4 * need)):
        yield


class _Stopwatch:
    """Where the demo's time goes: seconds per stage, and for a perplexity pass the part of its first
    window beyond a typical window (the compile, for a compiled model)."""

    def __init__(self):
        self.rows, self.mark = [], time.perf_counter()

    def lap(self, stage: str):
        now = time.perf_counter()
        self.rows.append([stage, now - self.mark])
        self.mark = now

    def windows(self):
        """An on_window hook that timestamps each window; `lap_windows` turns them into rows."""
        self.stamps = [time.perf_counter()]
        return lambda i, logits: self.stamps.append(time.perf_counter())

    def lap_windows(self, stage: str, compiled: bool = False):
        took = [b - a for a, b in zip(self.stamps, self.stamps[1:])]
        rest = sorted(took[1:])
        extra = max(took[0] - rest[len(rest) // 2], 0.0) if compiled and rest else 0.0
        self.lap(f"{stage}: {len(took)} windows")
        if extra:
            self.rows[-1][1] -= extra
            self.rows.insert(-1, [f"{stage}: first call beyond a window (compile)", extra])

    def table(self) -> str:
        total = sum(t for _, t in self.rows)
        return tabulate([[k, f"{t:.0f}"] for k, t in self.rows] + [["total", f"{total:.0f}"]],
                        headers=["stage", "seconds"])


def _chain(*hooks):
    return lambda i, logits: [h(i, logits) for h in hooks]


class _Speed:
    """CUDA only: prefill and decode tokens/s of one model, measured in the demo's run.  Prefill: one
    window of the perplexity length (the shape the perplexity pass compiled), median of 3 calls.
    Decode: generate() of `new_tokens` greedy tokens after the demo's prompt, batch 1 -- the plain
    module with its default cache, compiled ones through fast.generate with a static cache (CUDA
    graphs, generation.py) -- timed on the second call; the first, which compiles, is reported in the
    time table."""

    def __init__(self, tokenizer, prompt: str, window: torch.Tensor, new_tokens: int, clock: "_Stopwatch"):
        self.tok, self.window, self.new, self.clock = tokenizer, window, new_tokens, clock
        self.prompt = tokenizer(prompt, return_tensors="pt").input_ids.to(window.device)
        self.errors = []

    def _seconds(self, fn, reps: int) -> float:
        sync = torch.cuda.synchronize if self.window.is_cuda else (lambda: None)
        out = []
        for _ in range(reps):
            sync()
            t = time.perf_counter()
            fn()
            sync()
            out.append(time.perf_counter() - t)
        return statistics.median(out)

    def measure(self, name: str, call, compiled: bool) -> list[str]:
        """[prefill tokens/s, decode tokens/s] of `call` (the module or the compiled one), as table cells."""
        cells = []
        try:
            x = self.window[None]
            cells.append(f"{x.shape[1] / self._seconds(lambda: call(x, use_cache=False), 3):,.0f}")
        except Exception as e:          # a speed figure that fails must not hide the accuracy table
            self.errors.append(f"{name} prefill: {type(e).__name__}: {e}")
            cells.append("failed")
        if self.new <= 0:
            self.clock.lap(f"{name}: prefill tokens/s")
            return cells + ["-"]
        kw = dict(attention_mask=torch.ones_like(self.prompt), max_new_tokens=self.new, min_new_tokens=self.new,
                  do_sample=False, pad_token_id=self.tok.pad_token_id or self.tok.eos_token_id)
        if compiled:
            kw["cache_implementation"] = "static"
        self.clock.lap(f"{name}: prefill tokens/s")
        try:
            call.generate(self.prompt, **kw)
            self.clock.lap(f"{name}: first generate() call (compiles)")
            cells.append(f"{self.new / self._seconds(lambda: call.generate(self.prompt, **kw), 1):,.1f}")
            self.clock.lap(f"{name}: timed generate()")
        except Exception as e:
            self.errors.append(f"{name} decode: {type(e).__name__}: {e}")
            cells.append("failed")
        return cells


def _measures_speed(device: str) -> bool:
    """The demo's tokens/s columns: on CUDA only (a CPU figure says nothing about the kernels)."""
    return device.startswith("cuda")


@torch.no_grad()
def cmd_demo(args) -> int:
    from fq_compile import explain
    from fq_compile.tools.models import load_model

    if args.from_dir:
        return _demo_from_artefact(args)
    cuda = torch.cuda.is_available() if args.device == "auto" else args.device.startswith("cuda")
    device = ("cuda" if args.device == "auto" else args.device) if cuda else "cpu"
    dtype = torch.float16 if cuda else torch.float32
    base = "fp16" if cuda else "fp32"
    clock = _Stopwatch()
    lm = load_model(args.model, dtype=dtype, device=device)
    model, tok = lm.model, lm.tokenizer
    ids = _test_ids(tok, args)
    clock.lap("load the model and the test split")
    levels = [args.level] + [c for c in dict.fromkeys(args.compare.split(",")) if c and c != args.level]
    configs = {level: _config(args, level) for level in levels}         # a typo fails before any work
    speed = (_Speed(tok, args.prompt, ids[:args.ppl_seqlen].to(device), args.decode_tokens, clock)
             if _measures_speed(device) else None)
    with _room_for_levels(len(levels)):
        fp, rows, runs, plans, compiled = _demo_levels(model, tok, ids, args, base, configs, device, clock, speed)
        _print_levels(lm.name, device, base, rows, args, speed)
        print(f"\n== graph dump ({args.level}; every layer: fq-compile dump --full, or explain(model, full=True)) ==")
        print(explain(plans[args.level]))
        print(f"\n== greedy continuation, {args.max_new_tokens} tokens ==")
        texts = [["prompt", args.prompt], [base, greedy(model, tok, args.prompt, args.max_new_tokens)]]
        texts += [[level, greedy(compiled[level], tok, args.prompt, args.max_new_tokens)] for level in levels]
        clock.lap(f"greedy continuations ({base} and {', '.join(levels)})")
    print(tabulate(texts, tablefmt="grid", maxcolwidths=[11, 90]))
    print("\n== where the time went ==")
    print(clock.table())
    if args.json:
        _write_demo_json(args.json, lm.name, device, dtype, fp, args, clock, runs)
    return 0


def _demo_levels(model, tok, ids, args, base: str, configs: dict, device: str, clock, speed):
    """The floating-point row, one calibration for every level, then each level compiled and measured:
    perplexity, the first window's logits error against the floating-point model, weight bytes and, with
    `speed`, tokens/s.  Returns (fp perplexity, table rows, JSON runs, plans, compiled modules)."""
    from fq_compile.explain import weight_bytes
    from fq_compile.planning.calibrate import calibrate_many
    from fq_compile.tools.evaluate import perplexity

    progress = not args.no_progress
    first = {}          # the first window's baseline logits, kept from the perplexity pass (no extra forward)

    def keep_first(i, logits):
        if i == 0:
            first[base] = logits

    def error_of(level):
        def on_window(i, logits):
            if i == 0:
                first[level] = _rel_err(logits, first[base])
        return on_window

    fp = perplexity(model, ids, args.ppl_seqlen, args.ppl_tokens, progress, device=device,
                    on_window=_chain(keep_first, clock.windows()))
    clock.lap_windows(f"{base} perplexity")
    params = sum(p.numel() for p in dict.fromkeys(model.parameters()))
    rows = [[base, f"{fp.ppl:.3f}", "-", "-", f"{2 * params / 2**20:.1f} (1.00x)"]]
    runs = {base: dict(ppl=fp.ppl, windows=fp.windows, weight_bytes=2 * params, fp16_bytes=2 * params)}
    if speed is not None:
        rows[0] += speed.measure(base, model, compiled=False)
        runs[base].update(prefill_tokens_per_s=rows[0][-2], decode_tokens_per_s=rows[0][-1])
    # one calibration run for every level: the same windows and statistics, each level's own plan
    # (equal to what calibrate() gives it alone; planning/calibrate.py)
    plans = calibrate_many(model, _calib(tok, args), configs, progress=progress)
    clock.lap(f"calibration ({', '.join(configs)})")
    compiled = {}
    for level in configs:
        plan = plans[level]
        fast = _compile(model, plan, free_weights=False)    # the next level compiles the same module
        ppl = perplexity(fast, ids, args.ppl_seqlen, args.ppl_tokens, progress, device=device,
                         on_window=_chain(error_of(level), clock.windows()))
        clock.lap_windows(f"{level} perplexity", compiled=True)
        n4 = sum(lp.bits == 4 for lp in plan.layers.values())
        wb = weight_bytes(plan)
        rows.append([level, f"{ppl.ppl:.3f}", f"{100 * (ppl.ppl / fp.ppl - 1):+.2f}%", f"{first[level]:.4f}"
                     + (f"  ({n4} INT4 layers)" if n4 else ""),
                     f"{wb['after'] / 2**20:.1f} ({wb['after'] / (2 * params):.2f}x)" if wb else "-"])
        runs[level] = dict(ppl=ppl.ppl, windows=ppl.windows, logits_rel_error=first[level], int4_layers=n4,
                           weight_bytes=wb["after"] if wb else None, fp16_bytes=2 * params)
        if speed is not None:
            rows[-1] += speed.measure(level, fast, compiled=True)
            runs[level].update(prefill_tokens_per_s=rows[-1][-2], decode_tokens_per_s=rows[-1][-1])
        compiled[level] = fast
    return fp, rows, runs, plans, compiled


def _print_levels(name: str, device: str, base: str, rows, args, speed) -> None:
    """The demo's first table (and, with `speed`, its tokens/s columns and their notes)."""
    limited = args.ppl_tokens is not None
    print(f"\n== {name} on {device} ({base}): WikiText-2 test perplexity, {args.ppl_seqlen}-token windows"
          + (f", first {args.ppl_tokens} tokens only" if limited else "") + " ==")
    headers = ["level", "PPL", f"vs {base}", "logits rel. error (first window)", "weight MiB (x fp16)"]
    if speed is not None:
        headers += [f"prefill tok/s (1x{args.ppl_seqlen})", f"decode tok/s (1x{args.decode_tokens} new)"]
    print(tabulate(rows, headers=headers, disable_numparse=True))
    print(textwrap.fill("weight MiB: every parameter, floating-point ones at 2 bytes (the plan's accounting, "
                        "explain()); fp8: naive per-tensor FP8 e4m3, w8a8: naive per-tensor INT8 (the paper's "
                        "baseline)", 120))
    if speed is not None:
        where = torch.cuda.get_device_name(device) if device.startswith("cuda") else device
        print(textwrap.fill(f"tokens/s on {where}: prefill one {args.ppl_seqlen}-token "
                            f"window (median of 3), decode generate() of {args.decode_tokens} tokens at batch 1 after "
                            f"the prompt ({base}: the plain module, default cache; quantized: fast.generate, static "
                            "cache); first calls in the time table", 120))
        for err in speed.errors:
            print(f"speed not measured: {err}")


def _write_demo_json(path: str, name: str, device: str, dtype, fp, args, clock, runs) -> None:
    import platform

    where = (torch.cuda.get_device_name(device) if device.startswith("cuda")
             else f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)")
    with open(path, "w") as f:
        json.dump(dict(model=name, source="fq-compile demo", split="test", device=where, dtype=str(dtype),
                       windows=fp.windows, seqlen=args.ppl_seqlen, max_tokens=args.ppl_tokens,
                       bytes_counted="every parameter, floating-point ones at 2 bytes (plan accounting)",
                       seconds=sum(t for _, t in clock.rows), runs=runs), f, indent=2)


@torch.no_grad()
def _demo_from_artefact(args) -> int:
    """demo --from DIR: the artefact loaded without the floating-point weights of its quantized layers
    (fq_compile.load_quantized), compiled; its perplexity, graph dump and greedy continuation."""
    from pathlib import Path

    from transformers import AutoTokenizer

    from fq_compile import explain, load_quantized
    from fq_compile.tools.evaluate import perplexity

    clock = _Stopwatch()
    model = load_quantized(args.from_dir)
    if not (Path(args.from_dir) / "tokenizer_config.json").is_file():
        raise FileNotFoundError(f"{args.from_dir} holds no tokenizer (fq-compile quantize --save writes one)")
    tok = AutoTokenizer.from_pretrained(args.from_dir)
    plan, level = model.fq_plan, model.fq_plan.config.level
    clock.lap("load the artefact (no floating-point weights of quantized layers)")
    ids = _test_ids(tok, args)
    clock.lap("load the test split")
    fast = _compile(model, plan)
    ppl = perplexity(fast, ids, args.ppl_seqlen, args.ppl_tokens, not args.no_progress, on_window=clock.windows())
    clock.lap_windows(f"{level} perplexity", compiled=True)
    print(f"\n== {args.from_dir} ({model.fq_artefact['architecture']}, {level}): WikiText-2 test perplexity, "
          f"{args.ppl_seqlen}-token windows" + (f", first {args.ppl_tokens} tokens only" if args.ppl_tokens else "")
          + " ==")
    print(tabulate([[level, f"{ppl.ppl:.3f}"]], headers=["level", "PPL"]))
    print(f"\n== graph dump ({level}) ==")
    print(explain(plan))
    print(f"\n== greedy continuation, {args.max_new_tokens} tokens ==")
    text = greedy(fast, tok, args.prompt, args.max_new_tokens)
    clock.lap("greedy continuation")
    print(tabulate([["prompt", args.prompt], [level, text]], tablefmt="grid", maxcolwidths=[8, 90]))
    print("\n== where the time went ==")
    print(clock.table())
    return 0


def cmd_quantize(args) -> int:
    from fq_compile.tools.models import load_model

    if not (args.out or args.save):
        print("fq-compile quantize: error: say where to write: --out PLAN_FILE and/or --save ARTEFACT_DIR",
              file=sys.stderr)
        return 2
    lm = load_model(args.model)
    plan = _calibrate(lm.model, lm.tokenizer, args, args.level)
    if args.out:
        plan.save(args.out)
        print(f"saved {args.level} plan for {lm.name} to {args.out} ({len(plan.layers)} layers)")
    if args.save:
        from fq_compile import save_quantized

        save_quantized(lm.model, plan, args.save, tokenizer=lm.tokenizer)
        print(f"saved {args.level} artefact for {lm.name} to {args.save}: load it with fq_compile.load_quantized "
              f"or fq-compile demo --from {args.save}")
    return 0


def cmd_dump(args) -> int:
    from fq_compile import QuantPlan, explain

    print(explain(QuantPlan.load(args.plan), full=args.full, top=args.top, fmt=args.format), end="\n" if
          args.format == "text" else "")
    return 0


@torch.no_grad()
def cmd_eval(args) -> int:
    from fq_compile import QuantPlan
    from fq_compile.tools.evaluate import evaluate_config, perplexity, plan_summary
    from fq_compile.tools.models import load_model

    configs = {} if args.plan else {level: _config(args, level) for level in args.level.split(",")}   # typos fail first
    lm = load_model(args.model, dtype=getattr(torch, args.dtype), device=args.device or "cpu")
    ids = _test_ids(lm.tokenizer, args)
    results = {"model": lm.name, "seqlen": args.ppl_seqlen, "max_tokens": args.ppl_tokens,
               "overrides": list(args.overrides), "levels": {}}
    fp = perplexity(lm.model, ids, args.ppl_seqlen, args.ppl_tokens, not args.no_progress, device=args.device)
    results["levels"]["fp32"] = dict(ppl=fp.ppl, windows=fp.windows)
    tasks = _zero_shot_tasks(args)
    zero_shot = {}
    if tasks:
        from fq_compile.tools.zeroshot import comparison_table, evaluate_zero_shot

        def zs(level, model):
            zero_shot[level] = results["levels"][level]["zero_shot"] = evaluate_zero_shot(
                model, lm.tokenizer, tasks, data_dir=args.data_dir, limit=args.zs_limit or None,
                progress=not args.no_progress)

        zs("fp32", lm.model)
    calib = None if args.plan else _calib(lm.tokenizer, args)
    with _room_for_levels(len(args.level.split(","))):
        for level in args.level.split(","):
            if args.plan:
                plan = QuantPlan.load(args.plan)
                fast = _compile(lm.model, plan, inductor=False if args.no_inductor else None)
                p = perplexity(fast, ids, args.ppl_seqlen, args.ppl_tokens, not args.no_progress, device=args.device)
                r = dict(ppl=p.ppl, windows=p.windows, **plan_summary(plan))
            else:
                r = evaluate_config(lm.model, calib, ids, configs[level], args.ppl_seqlen, args.ppl_tokens,
                                    not args.no_progress, device=args.device,
                                    inductor=False if args.no_inductor else None)
                plan, fast = r.pop("plan"), r.pop("compiled")
            results["levels"][plan.config.level] = r
            if tasks:
                zs(plan.config.level, fast)
    rows = [[k, f"{v['ppl']:.3f}", f"{100 * (v['ppl'] / fp.ppl - 1):+.2f}%", v["windows"],
             f"{100 * v['int4']:.1f}%" if "int4" in v else "-", f"{100 * v['flatten']:.1f}%" if "flatten" in v else "-"]
            for k, v in results["levels"].items()]
    print(tabulate(rows, headers=["level", "WikiText-2 PPL", "vs fp32", "windows", "INT4 layers", "flatten ratio"]))
    if args.ppl_tokens:
        print(f"(limited run: first {args.ppl_tokens} tokens of the test split)")
    if zero_shot:
        print("\nzero-shot accuracy (%), lm-eval:")
        print(comparison_table(zero_shot))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


def _zero_shot_tasks(args) -> list[str]:
    """--tasks as a list; 'auto': the default tasks whose data file exists, the others named once here."""
    from fq_compile.tools.cli_parser import AUTO_TASKS

    if args.tasks.strip() != AUTO_TASKS:
        return [t.strip() for t in args.tasks.split(",") if t.strip()]
    from fq_compile.tools.data import find_data_dir
    from fq_compile.tools.zeroshot import DEFAULT_TASKS, TASKS, task_file

    root = find_data_dir(args.data_dir)
    have = [t for t in DEFAULT_TASKS if root is not None and task_file(root, t) is not None]
    missing = [f"{t} ({t}/{TASKS[t][1]}.jsonl)" for t in DEFAULT_TASKS if t not in have]
    if missing:
        print(f"zero-shot tasks: {', '.join(have) or 'none'}; no data file under {root or 'any data directory'} "
              f"for {', '.join(missing)}")
    return have


def run(args) -> int:
    """Run the command that fq_compile.tools.cli_parser parsed into `args`."""
    if getattr(args, "ppl_tokens", None) == 0:
        args.ppl_tokens = None
    from fq_compile import ConfigError, PlanFormatError, PlanMismatchError

    try:
        return {"demo": cmd_demo, "quantize": cmd_quantize, "dump": cmd_dump, "eval": cmd_eval}[args.cmd](args)
    except (FileNotFoundError, ImportError, ConfigError, PlanFormatError, PlanMismatchError) as e:
        print(f"fq-compile: error: {e}", file=sys.stderr)
        return 2


def main(argv=None) -> int:
    """`fq-compile ...` in-process (tests, `python -m fq_compile.tools.cli`); the console script is
    fq_compile_cli.main, which parses before importing the package."""
    from fq_compile.tools.cli_parser import build_parser

    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
