"""`fq-compile`: the command-line front end over the same API.

    fq-compile demo      calibrate + compile SmolLM2-135M at O1 on CPU, print the perplexity table,
                         the graph dump and greedy continuations of fp32 and quantized side by side
    fq-compile quantize  calibrate a model and save its plan
    fq-compile dump      print explain() of a saved plan
    fq-compile eval      WikiText-2 perplexity of fp32 and quantized levels, as a table (+ JSON)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import contextmanager

import torch
from tabulate import tabulate

from fq_compile.config import LEVELS, Config


def _common(p: argparse.ArgumentParser):
    p.add_argument("--model", default="smollm2-135m",
                   help="alias (smollm2-135m, opt-125m...), .gguf file, local dir or hub id")
    p.add_argument("--data-dir", default=None,
                   help="WikiText-2 directory (default: $FQ_DATA_DIR, ../shared/data, else the hub)")
    p.add_argument("--calib-batches", type=int, default=16, help="calibration windows from the validation split")
    p.add_argument("--calib-seqlen", type=int, default=512, help="tokens per calibration window")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a Config knob for every level, e.g. --set beta=1.4 (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _config(args, level: str) -> Config:
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
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    start = ids.shape[1]
    for _ in range(new_tokens):
        nxt = model_call(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
        if tokenizer.eos_token_id is not None and int(nxt) == tokenizer.eos_token_id:
            break
    return tokenizer.decode(ids[0, start:], skip_special_tokens=True)


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
    need = 8 + 4 * levels
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


@torch.no_grad()
def cmd_demo(args) -> int:
    from fq_compile import explain
    from fq_compile.tools.evaluate import perplexity
    from fq_compile.tools.models import load_model

    clock = _Stopwatch()
    lm = load_model(args.model)
    model, tok = lm.model, lm.tokenizer
    ids = _test_ids(tok, args)
    clock.lap("load the model and the test split")
    levels = [args.level] + [c for c in args.compare.split(",") if c and c != args.level]
    progress = not args.no_progress
    first = {}          # the first window's fp32 logits, kept from the perplexity pass (no extra forward)

    def keep_first(i, logits):
        if i == 0:
            first["fp32"] = logits

    def error_of(level):
        def on_window(i, logits):
            if i == 0:
                first[level] = _rel_err(logits, first["fp32"])
        return on_window

    with _room_for_levels(len(levels)):
        fp = perplexity(model, ids, args.ppl_seqlen, args.ppl_tokens, progress,
                        on_window=_chain(keep_first, clock.windows()))
        clock.lap_windows("fp32 perplexity")
        rows = [["fp32", f"{fp.ppl:.3f}", "-", "-"]]
        plans, compiled = {}, {}
        for level in levels:
            plan = _calibrate(model, tok, args, level)
            clock.lap(f"{level} calibration")
            fast = _compile(model, plan)
            ppl = perplexity(fast, ids, args.ppl_seqlen, args.ppl_tokens, progress,
                             on_window=_chain(error_of(level), clock.windows()))
            clock.lap_windows(f"{level} perplexity", compiled=True)
            n4 = sum(lp.bits == 4 for lp in plan.layers.values())
            rows.append([level, f"{ppl.ppl:.3f}", f"{100 * (ppl.ppl / fp.ppl - 1):+.2f}%", f"{first[level]:.4f}"
                         + (f"  ({n4} INT4 layers)" if n4 else "")])
            plans[level], compiled[level] = plan, fast
        first.clear()
        limited = args.ppl_tokens is not None
        print(f"\n== {lm.name}: WikiText-2 test perplexity, {args.ppl_seqlen}-token windows"
              + (f", first {args.ppl_tokens} tokens only" if limited else "") + " ==")
        print(tabulate(rows, headers=["level", "PPL", "vs fp32", "logits rel. error (first window)"]))
        print(f"\n== graph dump ({args.level}) ==")
        print(explain(plans[args.level]))
        print(f"\n== greedy continuation, {args.max_new_tokens} tokens ==")
        fp_text = greedy(model, tok, args.prompt, args.max_new_tokens)
        q_text = greedy(compiled[args.level], tok, args.prompt, args.max_new_tokens)
        clock.lap("greedy continuations (fp32 and quantized)")
    print(tabulate([["prompt", args.prompt], ["fp32", fp_text], [args.level, q_text]], tablefmt="grid",
                   maxcolwidths=[8, 90]))
    print("\n== where the time went ==")
    print(clock.table())
    return 0


def cmd_quantize(args) -> int:
    from fq_compile.tools.models import load_model

    lm = load_model(args.model)
    plan = _calibrate(lm.model, lm.tokenizer, args, args.level)
    plan.save(args.out)
    print(f"saved {args.level} plan for {lm.name} to {args.out} ({len(plan.layers)} layers)")
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
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="fq-compile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="the main job: calibrate, compile, evaluate and dump SmolLM2-135M")
    _common(d)
    d.add_argument("--level", default="O1", choices=[l for l in LEVELS if l not in ("fp16", "O3")])
    d.add_argument("--compare", default="w8a8", help="comma-separated levels measured beside --level")
    d.add_argument("--ppl-seqlen", type=int, default=2048)
    d.add_argument("--ppl-tokens", type=int, default=4 * 2048, help="limit the test tokens (0: the whole split)")
    d.add_argument("--prompt", default="The tower is 324 metres tall, about the same height as")
    d.add_argument("--max-new-tokens", type=int, default=24)
    q = sub.add_parser("quantize", help="calibrate and save a plan")
    _common(q)
    q.add_argument("--level", default="O1", choices=list(LEVELS))
    q.add_argument("--out", required=True)
    u = sub.add_parser("dump", help="print the graph dump of a saved plan (explain())")
    u.add_argument("plan")
    u.add_argument("--full", action="store_true", help="every layer's row, not only the short view")
    u.add_argument("--top", type=int, default=5, help="layers listed per 'largest ...' table of the short view")
    u.add_argument("--format", default="text", choices=["text", "csv", "markdown"],
                   help="csv / markdown: the per-layer rows alone, to export")
    e = sub.add_parser("eval", help="WikiText-2 perplexity table")
    _common(e)
    e.add_argument("--level", default="O1", help="comma-separated levels")
    e.add_argument("--plan", default=None, help="evaluate this saved plan instead of calibrating")
    e.add_argument("--ppl-seqlen", type=int, default=2048)
    e.add_argument("--ppl-tokens", type=int, default=0, help="limit the test tokens (0: the whole split)")
    e.add_argument("--json", default=None, help="also write the results here")
    e.add_argument("--tasks", default="openbookqa,lambada_openai,piqa,hellaswag,winogrande,arc_easy",
                   help="zero-shot tasks (lm-eval) read from <data-dir>/<task>/<split>.jsonl; comma-separated, "
                        "empty: skip")
    e.add_argument("--zs-limit", type=int, default=0,
                   help="score only the first N rows of each zero-shot task (0: all)")
    e.add_argument("--device", default=None, help="run the model there (e.g. cuda); default: where it loads (CPU)")
    e.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="the model's floating-point dtype (the baseline and the non-GEMM ops)")
    e.add_argument("--no-inductor", action="store_true",
                   help="no Inductor around the fq:: ops on a GPU either (on the CPU it is the default; "
                        "same integers, float ops unfused)")
    args = p.parse_args(argv)
    if getattr(args, "ppl_tokens", None) == 0:
        args.ppl_tokens = None
    from fq_compile import ConfigError, PlanFormatError, PlanMismatchError

    try:
        return {"demo": cmd_demo, "quantize": cmd_quantize, "dump": cmd_dump, "eval": cmd_eval}[args.cmd](args)
    except (FileNotFoundError, ImportError, ConfigError, PlanFormatError, PlanMismatchError) as e:
        print(f"fq-compile: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
