"""The `flattenquant` torch.compile backend.

    torch.compile(model, backend="flattenquant", options={"plan": plan})

Dynamo hands us one FX graph per region; we rewrite it with the plan (passes/lower.py) and give
the result to Inductor, which fuses the element-wise work around our ops and calls them (their GPU
kernels inline through torch.library.triton_op).  Options:

    plan       the QuantPlan from fq_compile.calibrate (or QuantPlan.load); required
    dump_dir   write each rewritten graph's code and the explain() table there (env FQ_DUMP_DIR)
    inductor   False runs the rewritten graph eagerly through the reference ops (for debugging)
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from . import kernels  # noqa: F401  (registers torch.ops.fq.*)
from .passes.lower import GraphReport, rewrite
from .plan import QuantPlan

_KNOWN_OPTIONS = {"plan", "dump_dir", "inductor"}


class BackendOptionsError(ValueError):
    """The options passed to torch.compile(..., backend="flattenquant") are wrong."""


def flattenquant(gm: torch.fx.GraphModule, example_inputs, options: dict | None = None, **kwargs):
    """Dynamo backend entry point (registered as 'flattenquant' through the torch_dynamo_backends
    entry-point group, so users need no import)."""
    if kwargs.get("mode") not in (None, "default"):
        raise BackendOptionsError(f"backend='flattenquant' does not take mode={kwargs['mode']!r}")
    options = dict(options or {})
    unknown = set(options) - _KNOWN_OPTIONS
    if unknown:
        raise BackendOptionsError(f"unknown flattenquant option(s) {sorted(unknown)}; known: {sorted(_KNOWN_OPTIONS)}")
    plan = options.get("plan")
    if plan is None:
        raise BackendOptionsError(
            "backend='flattenquant' needs a plan: plan = fq_compile.calibrate(model, batches, "
            "fq_compile.Config(level='O1')) (or fq_compile.QuantPlan.load(path)), then "
            "torch.compile(model, backend='flattenquant', options={'plan': plan})")
    if isinstance(plan, (str, os.PathLike)):
        plan = QuantPlan.load(plan)
    if not isinstance(plan, QuantPlan):
        raise BackendOptionsError(f"options['plan'] must be a QuantPlan or a path to one, got {type(plan).__name__}")

    index = len(plan.reports)
    if plan.config.quantize:
        report = rewrite(gm, example_inputs, plan, index)
    else:
        report = GraphReport(index, code=gm.code)
    plan.reports.append(report)

    dump_dir = options.get("dump_dir") or os.environ.get("FQ_DUMP_DIR")
    if dump_dir:
        from .explain import explain

        d = Path(dump_dir)
        d.mkdir(parents=True, exist_ok=True)
        (d / f"graph_{index}.py").write_text(report.code)
        (d / "explain.txt").write_text(explain(plan) + "\n")

    if options.get("inductor", True) is False:
        return gm.forward
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs)
