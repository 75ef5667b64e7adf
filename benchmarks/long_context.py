"""Long-context decode through generate(): the 8-bit KV cache against a float16 one (issue 25, item 3).

    python benchmarks/long_context.py --contexts 8192,32768 --batches 1,16 --out $OUT/long-context.md     (CUDA)
    python benchmarks/long_context.py --shape tiny --contexts 96 --batches 1,2 --new 4 --out /tmp/lc.md  (CPU smoke)

Model: a Llama-shaped decoder with random weights (`--shape llama-1b`: Llama-3.2-1B's shape, float16 on CUDA;
`tiny` for the smoke run), so a context of 32k tokens costs no download and no positional limit.  Rows, all
generate() with a static cache (preallocated for context + new tokens) and greedy decoding:

    fp16 (Inductor)     the float16 model, torch.compile(model), transformers' StaticCache
    ours, fp16 KV       O1 linears (one calibration, random tokens), attention in floating point, StaticCache
    ours, 8-bit KV      the same linears, attention on fq::attention (INT8 Q.K^T and P.V, split keys in decode),
                        K and V kept in INT8 (fq_compile.kv_cache(kind="static"))

For each (context, batch): a random prompt of `context` tokens; decode ms per step = (time of generate() with
--new tokens - time with 1 token) / (new - 1), median of --reps timed pairs after one untimed pair (compiles);
tokens/s = batch / that.  KV bytes are the cache's K and V tensors (fq_compile.runtime.kv_cache.kv_cache_bytes);
peak GB is the GPU's peak allocation during the row's calls (compiles included).  Rows are written as they finish, so a run cut by
its time limit keeps what it measured.  Target (issue 25): batch 16 at 32k, >= 1.3x tokens/s with the 8-bit
cache and 0.5x its KV memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fq_compile  # noqa: E402
from benchmarks.provenance import git_rev  # noqa: E402
from fq_compile import Config  # noqa: E402
from fq_compile.runtime.kv_cache import kv_cache_bytes  # noqa: E402

SHAPES = {   # hidden, layers, heads, kv heads, intermediate, vocab
    "llama-1b": (2048, 16, 32, 8, 8192, 128256),
    "tiny": (64, 2, 4, 2, 128, 512),
}
ROWS = ("fp16 (Inductor)", "ours, fp16 KV", "ours, 8-bit KV")


def build(shape: str, device, dtype, max_positions: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, heads, kv_heads, inter, vocab = SHAPES[shape]
    cfg = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, intermediate_size=inter, vocab_size=vocab,
                      max_position_embeddings=max_positions, tie_word_embeddings=True)
    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM(cfg).to(dtype).eval()


def plans(model, device, vocab: int):
    """One O1 calibration with attention statistics (random tokens): the linears-only plan and the one
    with INT8 attention."""
    gen = torch.Generator().manual_seed(1)
    calib = [torch.randint(0, vocab, (2, 256), generator=gen).to(device) for _ in range(2)]
    plan = fq_compile.calibrate(model, calib, Config(level="O1", attention="int8"), progress=False)
    linear_only = dataclasses.replace(plan, attention={}, attention_skipped={},
                                      config=Config.from_dict({**plan.config.to_dict(), "attention": "fp"}))
    return linear_only, plan


def cache_for(row: str, model, plan, batch: int, length: int, device, dtype):
    from transformers import StaticCache

    if row == "ours, 8-bit KV":
        return fq_compile.kv_cache(plan, model, kind="static", max_cache_len=length)
    return StaticCache(config=model.config, max_cache_len=length)


def decode_ms(model, cache, ids, new: int, reps: int, device) -> list[float]:
    """(generate(new) - generate(1)) / (new - 1) in ms, `reps` times after one untimed pair."""
    def run(n):
        cache.reset()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, past_key_values=cache, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           pad_token_id=0)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return 1e3 * (time.perf_counter() - t)

    run(new), run(1)
    return [(run(new) - run(1)) / (new - 1) for _ in range(reps)]


def report(args, device, rows) -> str:
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    head = (f"device: {dev}; date: {datetime.date.today()}; torch {torch.__version__}; git {git_rev()}\n"
            f"command: python benchmarks/long_context.py {' '.join(args.argv)}\n"
            f"model: {args.shape} shape (random weights, {args.dtype}); generate() with a static cache, greedy; "
            f"decode ms per step = (generate({args.new}) - generate(1)) / {args.new - 1}, median of {args.reps}\n\n")
    table = []
    for r in rows:
        base = next((b for b in rows if b["row"] == "ours, fp16 KV" and b["context"] == r["context"]
                     and b["batch"] == r["batch"]), None)
        vs = "-" if base is None or r is base else f"{r['tokens_s'] / base['tokens_s']:.2f}x / {r['kv_bytes'] / base['kv_bytes']:.2f}x"
        table.append([r["context"], r["batch"], r["row"], f"{r['ms']:.2f}", f"{r['tokens_s']:.1f}",
                      f"{r['kv_bytes'] / 1e9:.3f}", "-" if r["peak"] is None else f"{r['peak'] / 1e9:.2f}", vs])
    text = head + tabulate(table, ["context", "batch", "row", "decode ms / step", "tokens/s", "KV GB", "peak GB",
                                   "vs ours fp16 KV (tokens/s / KV bytes)"], tablefmt="github")
    if args.out:
        Path(args.out).write_text(text + "\n")
        Path(args.out).with_suffix(".json").write_text(json.dumps(rows, indent=1))
    return text


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--shape", default="llama-1b", choices=sorted(SHAPES))
    ap.add_argument("--contexts", default="8192,32768")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--new", type=int, default=32, help="new tokens per timed generate()")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rows", default=";".join(ROWS), help="';'-separated, of: " + "; ".join(ROWS))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--time-limit", type=float, default=540.0, help="seconds: no new (context, batch) after this")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    args.argv = argv
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    args.dtype = str(dtype).removeprefix("torch.")
    contexts = [int(c) for c in args.contexts.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    wanted = [r.strip() for r in args.rows.split(";") if r.strip()]
    if set(wanted) - set(ROWS) or args.new < 2:
        raise SystemExit(f"--rows: choose from {ROWS}; --new must be >= 2")
    for knob in ("recompile_limit", "cache_size_limit"):      # three backends, several shapes: one frame
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, max(getattr(torch._dynamo.config, knob), 64))
    start = time.time()
    model = build(args.shape, device, dtype, max(contexts) + args.new)
    linear_only, with_attention = plans(model, device, SHAPES[args.shape][5])
    compiled = {}
    rows = []
    for context in contexts:
        for batch in batches:
            if time.time() - start > args.time_limit:
                print(f"time limit: stopping before context {context}, batch {batch}", flush=True)
                return 0
            ids = torch.randint(0, SHAPES[args.shape][5], (batch, context),
                                generator=torch.Generator().manual_seed(context + batch)).to(device)
            for row in wanted:
                plan = with_attention if row == "ours, 8-bit KV" else linear_only
                if row not in compiled:
                    compiled[row] = (torch.compile(model) if row == ROWS[0] else
                                     torch.compile(model, backend="flattenquant", options={"plan": plan}))
                cache = cache_for(row, model, plan, batch, context + args.new, device, dtype)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                ms = statistics.median(decode_ms(compiled[row], cache, ids, args.new, args.reps, device))
                rows.append(dict(row=row, context=context, batch=batch, ms=ms, tokens_s=1e3 * batch / ms,
                                 kv_bytes=kv_cache_bytes(cache),
                                 peak=torch.cuda.max_memory_allocated() if device.type == "cuda" else None))
                print(f"context {context} batch {batch} {row}: {ms:.2f} ms/step", flush=True)
                del cache
                report(args, device, rows)
    print(report(args, device, rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
