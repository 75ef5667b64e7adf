"""Dynamo's guard evaluation per decode step (issue 23: the host's share of a step), on any machine.

    python benchmarks/guard_cost.py [--layers 40] [--tokens 8]

Before every call of a compiled frame Dynamo checks its guards (one per tensor, module attribute,
dimension marking ...); the profiler records that as "TorchDynamo Cache Lookup".  The count grows with
the number of layers, not their width, so an OPT with OPT-13B's 40 decoder layers at hidden size 64
prices it on the CPU.  Rows: our backend (O3 synthetic plan) through fast.generate, and a plain Dynamo
compile (backend="eager", model.compile) as what any torch.compile user pays; each with full guard
evaluation and under torch.compiler.set_stance(skip_guard_eval_unsafe=True), which runs only the guards
that tell cache entries apart (unsafe in general: nothing checks that a call still fits the entry).
Static cache, greedy, batch 1; the figures are per compiled call (the prefill and each decode step), in
a CPU-only torch.profiler trace, so they include the profiler's own overhead.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.e2e import build_model  # noqa: E402
from fq_compile.tools.synthetic import synthetic_plan  # noqa: E402


def lookup_ms(backend: str, layers: int, tokens: int) -> tuple[float, float, int]:
    """(guard ms per call with full evaluation, with skip_guard_eval_unsafe, compiled calls per generate)."""
    from torch.profiler import ProfilerActivity, profile

    model = build_model("tiny", torch.device("cpu"), torch.float32, layers=layers)   # hidden 64, vocab 512
    torch._dynamo.reset()
    if backend == "flattenquant":
        plan = synthetic_plan(model, "O3", flatten_ratio=0.2, int4_share=0.45, source="guard_cost.py",
                              release_weights=False, progress=False)
        torch._dynamo.reset()
        fast = torch.compile(model, backend="flattenquant", options={"plan": plan})
    else:
        model.compile(backend=backend)
        fast = model
    ids = torch.randint(0, 500, (1, 16), generator=torch.Generator().manual_seed(0))
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
              pad_token_id=1, cache_implementation="static")
    out = []
    with torch.no_grad():
        fast.generate(ids, **kw)
        fast.generate(ids, **kw)
        for skip in (False, True):
            stance = torch.compiler.set_stance(skip_guard_eval_unsafe=True) if skip else contextlib.nullcontext()
            with stance, profile(activities=[ProfilerActivity.CPU]) as prof:
                fast.generate(ids, **kw)
            ev = [e.cpu_time_total for e in prof.events() if e.name == "TorchDynamo Cache Lookup"]
            out.append((sum(ev) / len(ev) / 1e3, len(ev)))
    return out[0][0], out[1][0], out[0][1]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=40)
    ap.add_argument("--tokens", type=int, default=8)
    args = ap.parse_args(argv)
    from tabulate import tabulate

    rows = []
    for backend in ("flattenquant", "eager"):
        full, skip, calls = lookup_ms(backend, args.layers, args.tokens)
        rows.append([backend, calls, f"{full:.3f}", f"{skip:.3f}", f"{full / skip:.1f}x"])
    print(f"# Dynamo guard evaluation per compiled call, OPT with {args.layers} layers (hidden 64)\n")
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {datetime.date.today()}; "
          f"command: python benchmarks/guard_cost.py --layers {args.layers} --tokens {args.tokens}\n")
    print(tabulate(rows, headers=["backend", "compiled calls / generate()", "guards ms / call",
                                  "with skip_guard_eval_unsafe", "ratio"], tablefmt="github", disable_numparse=True))


if __name__ == "__main__":
    main()
