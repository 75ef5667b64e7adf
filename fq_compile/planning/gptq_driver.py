"""O3 (and auto): GPTQ on the integer weights, block by block over the model's decoder layers.

For block b, the calibration batches run through the model compiled with the current plan (blocks
before b already GPTQ-quantized, so their errors reach block b's inputs), with Hessian observers on
the inputs of block b's layer groups; each forward stops as soon as those have all been seen.  The
layers of block b are then quantized by GPTQ with their planned weight scales and bit width, and
their integer weights are replaced in place, so the compiled model sees them on the next pass.
Flattened layers (int8, int4) use the Hessian of the flattened smoothed input; w4a8 layers that of
the smoothed input (their GEMM is not flattened); fp8 layers keep their round-to-nearest e4m3 weights.
"""

from __future__ import annotations

import re

import torch
from tqdm.auto import tqdm

from fq_compile.kernels.flatten_quantize import QMAX
from fq_compile.kernels.packing import pack_int4, unpack_int4
from fq_compile.plan import FLATTENED_FORMATS, QuantPlan
from fq_compile.planning.flatten import flatten_values
from fq_compile.planning.gptq import HessianAccumulator, gptq_quantize, gptq_quantize_flattened
from fq_compile.planning.planner import plan_weight
from fq_compile.planning.weights import flattened_weight, quantize_weight, smoothed_weight

_BLOCK = re.compile(r"\.(?:layers|h|blocks)\.(\d+)\.")


class _StopForward(Exception):
    """Raised by the last active observer: the rest of the forward pass is not needed."""


def _block_of(group: str) -> int:
    m = _BLOCK.search(group)
    return int(m.group(1)) if m else -1


class _HessianObserver(torch.nn.Module):
    def __init__(self, session, group):
        super().__init__()
        self.session, self.group = session, group

    def forward(self, x):
        self.session.observe(self.group, x)


class _Session:
    def __init__(self, plan: QuantPlan):
        self.plan = plan
        self.active: dict[str, HessianAccumulator] = {}
        self.smooth_in_op: dict[str, bool] = {}
        self.seen: set[str] = set()

    def observe(self, group, x):
        accs = self.active.get(group)
        if accs is None:
            return
        g = self.plan.groups[group]
        xs = x.float() / g.smooth.to(x.device) if self.smooth_in_op.get(group, True) else x.float()
        flat, plain = accs
        if flat is not None:
            flat.add(flatten_values(xs, g.cmap, g.threshold))
        if plain is not None:
            plain.add(xs)
        self.seen.add(group)
        if self.seen >= set(self.active):
            raise _StopForward

    def hook(self, gm, g, x, smoothing, first_user):
        self.smooth_in_op[g.name] = smoothing == "op"
        name = f"fq_hessian_{len([m for m in gm._modules if m.startswith('fq_hessian_')])}"
        gm.add_submodule(name, _HessianObserver(self, g.name))
        with gm.graph.inserting_before(first_user):
            gm.graph.call_module(name, (x,))


def apply_gptq(model, plan: QuantPlan, batches, call, device, progress: bool = True) -> None:
    """Replace every planned layer's round-to-nearest weights by GPTQ's, block by block."""
    from fq_compile.passes.lower import rewrite

    for lp in plan.layers.values():      # on the model's device, so in-place updates reach the graph
        lp.weight_q = lp.weight_q.to(device)
    session = _Session(plan)
    params = dict(model.named_parameters())

    def backend(gm, example_inputs):
        rewrite(gm, example_inputs, plan, group_hook=session.hook)
        return gm.forward

    compiled = torch.compile(model, backend=backend)
    blocks: dict[int, list[str]] = {}
    for gname in plan.groups:
        blocks.setdefault(_block_of(gname), []).append(gname)
    cfg = plan.config

    def accumulators(g):
        fmts = {plan.layers[l].format for l in g.layers}
        return (HessianAccumulator(g.flat_features) if fmts & set(FLATTENED_FORMATS) else None,
                HessianAccumulator(g.in_features) if "w4a8" in fmts else None)

    for b in tqdm(sorted(blocks), desc="fq_compile: GPTQ blocks", disable=not progress):
        session.active = {gn: accumulators(plan.groups[gn]) for gn in blocks[b]}
        session.active = {gn: a for gn, a in session.active.items() if a != (None, None)}
        if not session.active:             # only fp8 layers here: nothing to run GPTQ on
            continue
        with torch.no_grad():
            for batch in batches:
                session.seen = set()
                try:
                    call(compiled, batch, device)
                except _StopForward:
                    pass
        for gn in session.active:
            g = plan.groups[gn]
            for layer in g.layers:
                lp = plan.layers[layer]
                rows = plan.groups[lp.rows_folded_from].smooth if lp.rows_folded_from else None
                weight = plan_weight(params, lp)
                if lp.format == "w4a8":
                    acc = session.active[gn][1]
                    if acc.rows:
                        q = gptq_quantize(smoothed_weight(weight, g, rows), acc.hessian(), lp.weight_scale, QMAX[4],
                                          cfg.gptq_block, cfg.gptq_damp)
                        lp.weight_q.copy_(pack_int4(q).to(lp.weight_q.device))
                    continue
                acc = session.active[gn][0]
                if lp.format not in FLATTENED_FORMATS or acc.rows == 0:
                    continue
                h = acc.hessian()
                wf = flattened_weight(weight, g, rows)
                rtn = quantize_weight(wf, lp.weight_scale, 8, g.cmap) if lp.bits == 8 else \
                    unpack_int4(quantize_weight(wf, lp.weight_scale, 4, g.cmap))
                original = torch.zeros(g.flat_features, dtype=torch.bool)
                original[: g.in_features] = True
                q = gptq_quantize_flattened(wf, h, lp.weight_scale, QMAX[lp.bits], rtn, original,
                                            cfg.gptq_block, cfg.gptq_damp)
                q = pack_int4(q) if lp.bits == 4 else q
                lp.weight_q.copy_(q.to(lp.weight_q.device))
        session.active = {}
    plan.calibration["gptq_blocks"] = len(blocks)
