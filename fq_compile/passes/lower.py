"""Rewrite a Dynamo graph with a QuantPlan: fold smoothing into norms, replace planned linears.

Each planned linear layer (any form passes/match.py finds: `linear(x, W, b)`, Conv1D's
`addmm(b, x, W)`, `x @ W.T + b`) becomes

    xq = fq.flatten_quantize(x, src, mult, lo, hi, bits)      # once per (input, bits): q/k/v share it
    y  = fq.int8_linear(xq, Wq, scale, bias, dtype)           # or fq.int4_linear

where x has a producer Inductor can fuse with (a norm, ReLU, SiLU * up, a residual add, a transpose
copy), the quantize is `fq.flatten_quantize_fused(x, ..., bits, direct)` instead: the same integers as
aten ops that Inductor fuses into that producer (kernels/flatten_quantize.py, kernels/dispatch.py
`decide_quantize`).  A ReLU that is a GEMM's only consumer moves into its epilogue (passes/epilogue.py)
unless it already fuses into a quantize.  Each layer's report records both kernel choices (quantize,
GEMM) and why, for explain(); the GEMM choice is the one the dispatcher will make when Inductor traces
the op at this shape (M from the graph's example input; a dynamic M by its hint), and the CUTLASS
kernels it needs start building in the background here, while Inductor compiles.

Where x has at most `decode_max_m()` rows (64: decode steps), the pair is one fused op

    y  = fq.flat_linear(x, src, mult, lo, hi, bits, Wq, scale, bias, dtype)

whose GPU implementation streams the weight and quantizes x in its prologue, or on an activation
quantized once, or runs the pair, whichever it measured fastest for the shape (kernels/flat_linear.py).
The group's quantize is emitted as for larger graphs (once per input and bits, fused into x's producer by
Inductor where it can be) and handed to the op as well (`xq`, and `r` with per-token scales): the op's
variants on a quantized activation read it instead of launching a quantize of their own per call; the
fused variant reads x.
With symbolic shapes the row count is compared with a guard, so a graph made for decode is not
reused for a long prefill (the op would still be right there, only slower).

For a layer in an FP8 format (plan.py: fp8, w4a8; no flattening) the pair is

    xq = fq.fp8_quantize(x, mult)                             # once per input; fq.fp8_quantize_fused
                                                              # (aten ops) where Inductor fuses it
    y  = fq.fp8_linear(xq, Wq, scale, bias, dtype)            # or fq.w4a8_linear (packed INT4 weights)

with the plan's tensors attached to the GraphModule as buffers (get_attr nodes, which Inductor
treats as constants).  Norm folds are applied here, from the live norm parameters, so a plan never
stores floating-point copies of model weights; row folds are already inside the plan's weights.
Linears the plan does not cover stay as they are and are reported with the reason.

Every fold the plan records is checked again on this graph before anything is replaced: a norm
fold needs the norm in this graph, a row fold needs its producer and the group's input in this
graph with nothing else reading the tensors in between (passes/fold.py).  Where a fold does not
hold here, the smoothing goes into the quantize op instead, and a producer whose plan rows carry
1/s multiplies its output by s again, so each graph is exact on its own.

The weight (and bias) the graph's linear call reads must have the plan's fingerprint (exact, dtype
included); the report lists every parameter whose values the rewrite consumed, with its
fingerprint, for the backend's per-call check (runtime/guards.py).  Plan tensors reach each graph
through `runtime.state.device_tensor`, so every graph and recompile shares one device copy.  A
weight whose storage was already released (resident.py) is named from the release registry and
never read: its fingerprint is not checked, only its name and shape (a placeholder of a model loaded
from a quantized artefact, deploy.py, must have been vouched for with the plan's fingerprint).  A
DTensor parameter (tensor parallelism, passes/shard.py) is checked against the plan's whole-tensor
or rank-local fingerprint and watched by its local shard's (runtime/tensor_parallel.check_dtensor).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from fq_compile.kernels import dispatch
from fq_compile.kernels import flat_linear as flat_linear_op
from fq_compile.kernels.flatten_quantize import QMAX, direct_prefix
from fq_compile.passes.epilogue import fuse_relu_epilogues
from fq_compile.passes.fold import find_fold_site
from fq_compile.passes.match import (
    LinearForm,
    ParamNames,
    describe_producer,
    example_value,
    layer_name,
    linear_forms,
    other_weight_reads,
    param_fqn,
    placeholder_inputs,
)
from fq_compile.passes import siblings
from fq_compile.passes.shard import local_input, tp_linear, wrap_output
from fq_compile.plan import GroupPlan, PlanMismatchError, QuantPlan, stale_message
from fq_compile.runtime.guards import fingerprint
from fq_compile.runtime.resident import is_released, released_name, vouched_fingerprint
from fq_compile.runtime.tensor_parallel import check_dtensor, check_unsharded, is_dtensor
from fq_compile.runtime.state import device_tensor, state_of

# the activation each layer format reads: flattened INT8 / INT4, or per-tensor e4m3 (plan.py)
_ACTIVATION = {"int8": "a8", "int4": "a4", "fp8": "f8", "w4a8": "f8"}


@dataclass
class LayerReport:
    layer: str
    op: str                 # "fq.int8_linear", "fq.int4_linear", "fq.flat_linear (int8|int4)" (decode-sized
                            # graphs) or "linear (floating point)"
    smoothing: str          # where s lives: "norm:<param>", "rows:<layer>", "op", or "-"
    reason: str = ""
    quantize: str = ""      # how the activation is quantized: "fused by Inductor", "Triton kernel", ...
    quantize_why: str = ""
    gemm: str = ""          # the GEMM kernel at this graph's shape: "CUTLASS <config>", "Triton", ...
    gemm_why: str = ""
    act: str = "none"       # epilogue activation folded into the GEMM ("relu")
    fused: str = ""         # the layers sharing this layer's GEMM (passes/siblings.py), e.g. "q_proj+k_proj+v_proj"
    scales: str = ""        # the activation's scale: "per tensor", "per token" (flattened formats), "" otherwise


@dataclass
class GraphReport:
    index: int
    layers: list[LayerReport] = field(default_factory=list)
    code: str = ""
    # parameters (fqn -> placeholder) that only replaced linears read: what free_weights may release
    replaced_params: dict = field(default_factory=dict, repr=False, compare=False)
    released_bytes: int = 0     # what free_weights freed after this graph was compiled
    # placeholder -> (fqn, fingerprint) of every parameter whose values the rewrite consumed
    watched: dict = field(default_factory=dict, repr=False, compare=False)
    # placeholder -> layer name of each replaced linear's weight (to find its module)
    layer_weights: dict = field(default_factory=dict, repr=False, compare=False)
    attention: list = field(default_factory=list)   # passes/attention.py: one AttentionReport per site
    regions: str = ""           # passes/regions.py: how many blocks were outlined into how many bodies


def _const(gm: fx.GraphModule, name: str, t: torch.Tensor) -> fx.Node:
    """Attach a plan tensor as a buffer of the graph module.  AOTAutograd lifts buffers to inputs
    and, for a Dynamo graph, wants to know where each came from: we name it a constant source."""
    name = name.replace(".", "_").replace("+", "_")
    gm.register_buffer(name, t)
    sources = getattr(gm, "_param_name_to_source", None)
    if isinstance(sources, dict):
        from torch._dynamo.source import ConstantSource

        sources[name] = ConstantSource(f"fq_compile.{name}")
    return gm.graph.get_attr(name)


def rewrite(gm: fx.GraphModule, example_inputs, plan: QuantPlan, index: int = 0, group_hook=None,
            gemm_mode: str | None = None, fuse_siblings: bool = False) -> GraphReport:
    """Replace the plan's linears in `gm` (see the module docstring); returns what was done.

    group_hook(gm, group_plan, x_node, smoothing, first_linear_node) runs before each group is
    rewritten: calibration uses it to observe the inputs of the partially quantized model (GPTQ).
    gemm_mode: the backend's options['gemm'] (None: FQ_GEMM), for the recorded GEMM choices.
    fuse_siblings: layers of one group that can share a GEMM run as one over their concatenated weights
    (passes/siblings.py; the backend's options['fuse_siblings']).  Off here by default: calibration's
    GPTQ pass rewrites through this function and updates the plan's weights in place afterwards.

    In four steps, each its own function: find and check the planned linears, grouped by the tensor
    they read (`_collect`); decide where each group's smoothing lives in this graph (`_decide_folds`);
    lower each group (`_lower_group`: its activation quantize, then per layer the GEMM, `_lower_layer`, or
    one GEMM for siblings that share it, `_lower_siblings`);
    fold ReLUs into GEMM epilogues and start the CUTLASS builds the choices need."""
    mode = dispatch.parse_mode(gemm_mode, "options['gemm']") if gemm_mode is not None else None
    runtime = placeholder_inputs(gm, example_inputs)
    rw = _Rewrite(gm, plan, GraphReport(index), runtime, _param_names(gm, example_inputs, runtime, plan), mode,
                  fuse_siblings)
    by_input = _collect(rw)
    groups, folds = _decide_folds(rw, by_input)
    realized_rows = {g.fold[len("rows:"):] for g in groups.values() if folds[g.name][0].startswith("rows:")}
    for x, members in by_input.items():
        _lower_group(rw, x, members, groups[x], folds[groups[x].name], realized_rows, group_hook)
    for node in fuse_relu_epilogues(gm):
        if node in rw.gemm_nodes:
            rw.gemm_nodes[node][0].act = "relu"
    _prefetch(rw.gemm_nodes.values(), example_inputs)
    gm.graph.lint()
    gm.recompile()
    rw.report.code = gm.code
    return rw.report


@dataclass
class _Rewrite:
    """What the steps of one `rewrite` share."""

    gm: fx.GraphModule
    plan: QuantPlan
    report: GraphReport
    runtime: dict                    # placeholder -> its runtime value
    name_of: ParamNames
    mode: str | None                 # options['gemm']
    fuse_siblings: bool              # options['fuse_siblings']: siblings share one GEMM (passes/siblings.py)
    tp: dict = field(default_factory=dict)          # DTensor linears: layer -> TPLinear (passes/shard.py)
    readers: dict = field(default_factory=dict)     # linear call node -> the node that reads x for it (TP)
    to_local: dict = field(default_factory=dict)
    # GEMM node -> (its report, the dispatcher's choice, out dtype): ReLU epilogues and CUTLASS prefetch
    gemm_nodes: dict = field(default_factory=dict)


def _collect(rw: _Rewrite) -> dict[fx.Node, list[tuple[str, LinearForm]]]:
    """The graph's planned linears grouped by the tensor they read (as calibration grouped them),
    each checked against the plan: known layer, weight shape and layout, fingerprints, bias.
    Linears left in floating point are reported with the reason."""
    plan, report, name_of = rw.plan, rw.report, rw.name_of
    forms = linear_forms(rw.gm, name_of)
    by_input: dict[fx.Node, list[tuple[str, LinearForm]]] = {}
    for form in forms:
        x, w, b = form.x, form.weight, form.bias
        fqn = name_of(w)
        if fqn is None:
            report.layers.append(LayerReport(f"<linear {form.node.name}>", "linear (floating point)", "-",
                                             "weight is not a model parameter"))
            continue
        name = layer_name(fqn)
        if name in plan.skipped:
            report.layers.append(LayerReport(name, "linear (floating point)", "-", plan.skipped[name]))
            continue
        if name not in plan.layers:
            raise PlanMismatchError(
                f"layer {name!r} is in the graph but not in the plan: the plan was made for another model "
                f"({plan.model_type}, {len(plan.layers)} layers); calibrate this model with fq_compile.calibrate")
        lp = plan.layers[name]
        wt = rw.runtime.get(w)
        t = tp_linear(plan, name, form.out, x, wt)    # a DTensor weight: this rank's part (passes/shard.py)
        if t is not None:
            if form.transposed or lp.transposed:
                raise PlanMismatchError(f"layer {name!r}: tensor parallelism over a weight stored [K, N] "
                                        "(GPT-2's Conv1D) is not supported")
            rw.tp[name] = t
            x, rw.readers[form.node] = local_input(rw.gm, x, rw.to_local)
        else:
            check_unsharded(plan, name)
            shape = tuple(wt.shape) if isinstance(wt, torch.Tensor) else tuple(example_value(w).shape)
            if shape != lp.model_weight_shape or form.transposed != lp.transposed:
                raise PlanMismatchError(f"layer {name!r}: the plan was made for weight shape "
                                        f"{lp.model_weight_shape}, this model has {shape}"
                                        + (" (stored transposed)" if form.transposed != lp.transposed else ""))
        _check_values(fqn, w, wt, lp.fingerprint, report)
        report.layer_weights[w] = name
        bias_fqn = name_of(b) if isinstance(b, fx.Node) else None
        if (b is None) != (lp.bias is None) or (b is not None and bias_fqn is None):
            what = "no bias" if b is None else "a bias parameter" if bias_fqn else "a bias computed in the graph"
            raise PlanMismatchError(f"layer {name!r}: the plan was made {'with' if lp.bias is not None else 'without'} "
                                    f"a bias, this graph's linear call reads {what}; recalibrate for this model")
        if b is not None:
            _check_values(bias_fqn, b, rw.runtime.get(b), lp.bias_fingerprint, report)
        by_input.setdefault(x, []).append((name, form))
    rewritten = {name for members in by_input.values() for name, _ in members}
    for name, why in other_weight_reads(rw.gm, forms, name_of).items():
        if name in plan.layers and name not in rewritten:
            raise PlanMismatchError(_unrewritable(name, why))
        report.layers.append(LayerReport(name, "floating point", "-", plan.skipped.get(name, why)))
    return by_input


def _unrewritable(name: str, why: str) -> str:
    """The error for a layer the plan quantizes whose weight this graph reads only in a way the rewrite
    cannot replace: compiling on would run it in floating point while explain() and the plan say INT."""
    return (f"layer {name!r} is quantized by the plan, but this graph reads its weight only as {why}; "
            "compiling on would run it in floating point")


def _decide_folds(rw: _Rewrite, by_input) -> tuple[dict[fx.Node, GroupPlan], dict[str, tuple[str, str, object]]]:
    """Each input's plan group, and where the group's smoothing lives in *this* graph, decided
    before any node is replaced."""
    planned = set(rw.plan.layers)
    here = {name for members in by_input.values() for name, _ in members}
    groups, folds = {}, {}
    for x, members in by_input.items():
        names = {rw.plan.layers[n].group for n, _ in members}
        if len(names) != 1:
            raise PlanMismatchError(f"layers {[n for n, _ in members]} read one tensor here but belong to "
                                    f"different plan groups {sorted(names)}")
        g = groups[x] = rw.plan.groups[names.pop()]
        folds[g.name] = _fold_here(x, {rw.readers.get(form.node, form.node) for _, form in members}, g, planned,
                                   rw.name_of, here)
    return groups, folds


@dataclass
class _Group:
    """One input tensor being lowered: what its layers share."""

    x: fx.Node
    g: GroupPlan                     # this rank's group under tensor parallelism
    smoothing: str                   # where s lives in this graph: "norm:...", "rows:...", "op"
    note: str                        # why it stays in the op, when it does
    device: torch.device
    info: object                     # dispatch.DeviceInfo
    m: int | None                    # the GEMMs' M (rows), None when unknown
    qchoice: dispatch.Choice         # how the activation is quantized
    decode: bool                     # decode-sized: quantize inside the GEMM (fq.flat_linear)
    consts: dict = field(default_factory=dict)      # bits -> {src, mult, lo, hi[, rmult]} graph constants
    quantized: dict = field(default_factory=dict)   # activation kind (a8, a4, f8) -> (integers, row scales)


def _lower_group(rw: _Rewrite, x: fx.Node, members, g: GroupPlan, fold, realized_rows: set, group_hook) -> None:
    smoothing, note, site = fold
    if smoothing.startswith("norm:") and not _apply_norm_fold(rw.gm, site, g, rw.runtime, rw.name_of, rw.report):
        smoothing, note = "op", "the norm's parameters are not tensors in this graph"
    sharded = [rw.tp[n] for n, _ in members if n in rw.tp]
    if sharded and (len(sharded) != len(members) or len({id(t.group) for t in sharded}) != 1):
        raise PlanMismatchError(f"layers {[n for n, _ in members]} read one tensor but are not parallelised alike")
    g = sharded[0].group if sharded else g       # a row-parallel group: this rank's channel map
    if group_hook is not None:
        group_hook(rw.gm, g, x, smoothing, members[0][1].node)
    xv = example_value(x)
    device = xv.device if xv is not None else torch.device("cpu")
    info = dispatch.device_info(device)
    producer, fusable = describe_producer(x)
    grp = _Group(x, g, smoothing, note, device, info, _rows(xv), dispatch.decide_quantize(info, producer, fusable),
                 _decode_sized(x))
    for run in _runs(rw, members):
        if len(run) == 1:
            _lower_layer(rw, grp, *run[0], realized_rows)
        else:
            _lower_siblings(rw, grp, run, realized_rows)


def _layer_plan(rw: _Rewrite, name: str):
    return rw.tp[name].layer if name in rw.tp else rw.plan.layers[name]


def _out_dtype(form: LinearForm) -> torch.dtype:
    v = example_value(form.out)
    return v.dtype if v is not None else torch.float32


def _runs(rw: _Rewrite, members) -> list[list]:
    """The group's layers as GEMM runs: siblings that can share one GEMM together (passes/siblings.py),
    every other layer alone; one run per layer when options['fuse_siblings'] is off."""
    if not rw.fuse_siblings:
        return [[m] for m in members]
    keys = [siblings.fusion_key(_layer_plan(rw, n), _out_dtype(f), n in rw.tp) for n, f in members]
    return siblings.sibling_runs(members, keys)


def _lower_layer(rw: _Rewrite, grp: _Group, name: str, form: LinearForm, realized_rows: set) -> None:
    """One planned linear: its GEMM (and the group's quantize, the first time a kind is needed) in
    place of the linear, the row fold undone where it does not hold here, and its report."""
    gm, plan, device = rw.gm, rw.plan, grp.device
    lp = _layer_plan(rw, name)
    out_dtype = _out_dtype(form)
    act = _ACTIVATION[lp.format]
    with gm.graph.inserting_before(form.node):
        args, rmult = _activation(rw, grp, lp, act)
        wq = _const(gm, f"fq_{name}_wq", device_tensor(plan, f"{name}.wq", lp.weight_q, device))
        bias = (_const(gm, f"fq_{name}_bias", device_tensor(plan, f"{name}.bias", lp.bias, device))
                if lp.bias is not None else None)
        scale = _const(gm, f"fq_{name}_scale", _layer_scale(plan, lp, device))
        gemm = _gemm(rw, grp, lp, (args, rmult), (wq, scale, bias), lp.out_features, out_dtype)
    _finish_layer(rw, grp, name, form, gemm, gemm, realized_rows)


def _lower_siblings(rw: _Rewrite, grp: _Group, run: list, realized_rows: set) -> None:
    """Layers of one group that share one GEMM over their concatenated weights (passes/siblings.py),
    placed before the first of them; each layer's columns then take its linear's place."""
    gm, names = rw.gm, [n for n, _ in run]
    lps = [_layer_plan(rw, n) for n in names]
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    first = min((f.node for _, f in run), key=order.__getitem__)
    label = siblings.run_label(names)
    wq, scale, bias = siblings.fused_tensors(rw.plan, names, grp.device)
    n_total = sum(lp.out_features for lp in lps)
    with gm.graph.inserting_before(first):
        operands = _activation(rw, grp, lps[0], _ACTIVATION[lps[0].format])
        consts = [_const(gm, f"fq_{names[0]}_{label}_{k}", t) if t is not None else None
                  for k, t in (("wq", wq), ("scale", scale), ("bias", bias))]
        gemm = _gemm(rw, grp, lps[0], operands, consts, n_total, _out_dtype(run[0][1]))
        parts = siblings.split_output(gm.graph, gemm, [lp.out_features for lp in lps])
    for (name, form), part in zip(run, parts):
        _finish_layer(rw, grp, name, form, part, gemm, realized_rows, (label, n_total))


def _gemm(rw: _Rewrite, grp: _Group, lp, operands, consts, n: int, out_dtype) -> fx.Node:
    """The GEMM node of `lp`'s format on the group's activation, over `n` output channels: fq.flat_linear
    at decode sizes (flattened formats), else the format's linear op on the group's quantize."""
    (args, rmult), (wq, scale, bias) = operands, consts
    act = _ACTIVATION[lp.format]
    xq, rows = grp.quantized[act]
    if grp.decode and act != "f8":
        flat_linear_op.reserve(grp.device, n)   # its workspace, before any CUDA graph
        return rw.gm.graph.call_function(torch.ops.fq.flat_linear.default,
                                         (grp.x, *args, lp.bits, wq, scale, bias, out_dtype),
                                         {"rmult": rmult, "r": rows, "xq": xq} if rmult is not None else {"xq": xq})
    op = getattr(torch.ops.fq, f"{lp.format}_linear").default
    return rw.gm.graph.call_function(op, (xq, wq, scale, bias, out_dtype),
                                     {"row_scale": rows} if rows is not None else {})


def _finish_layer(rw: _Rewrite, grp: _Group, name: str, form: LinearForm, new: fx.Node, gemm: fx.Node,
                  realized_rows: set, run: tuple | None = None) -> None:
    """`new` (the layer's output) takes the linear's place, its row fold undone where it does not hold
    here, the DTensor wrap restored; then the layer's report row (run: (label, N) of a shared GEMM)."""
    lp = _layer_plan(rw, name)
    out_dtype = _out_dtype(form)
    reason = "" if grp.smoothing != "op" else grp.note
    if lp.rows_folded_from and name not in realized_rows:
        with rw.gm.graph.inserting_before(form.node):
            new = _unfold_rows(rw, name, lp, new, out_dtype, grp.device)
        reason = (reason + "; " if reason else "") + (
            f"output multiplied by the smoothing of {lp.rows_folded_from} (not folded in this graph)")
    if name in rw.tp:
        new = wrap_output(rw.gm, new, rw.tp[name])    # back to the DTensor the graph expects
    _replace_linear(rw, form, new)
    act = _ACTIVATION[lp.format]
    per_token = act != "f8" and grp.consts[lp.bits].get("rmult") is not None
    _report_layer(rw, grp, name, lp, act, grp.decode and act != "f8", per_token, reason, gemm, out_dtype, run)


def _activation(rw: _Rewrite, grp: _Group, lp, act: str):
    """The layer's activation operands: (flattening constants, per-token rmult or None) for the
    flattened formats, ([], None) for e4m3; the group's quantize node (integers, row scales), made
    once per kind, in grp.quantized[act] (the decode op takes it beside x, as `xq` and `r`)."""
    gm, g = rw.gm, grp.g
    in_op = grp.smoothing == "op"
    if act == "f8":
        if act not in grp.quantized:     # per-tensor e4m3, not flattened (fp8, w4a8)
            mult = _const(gm, f"fq_{g.name}_f8_mult", _fp8_constants(rw.plan, g, lp, in_op, grp.device))
            op = torch.ops.fq.fp8_quantize_fused if grp.qchoice.impl == "fused" else torch.ops.fq.fp8_quantize
            grp.quantized[act] = (gm.graph.call_function(op.default, (grp.x, mult)), None)
        return [], None
    if lp.bits not in grp.consts:        # flattened INT8 / INT4 (int8, int4)
        base = f"fq_{g.name}_a{lp.bits}"
        c = _group_constants(rw.plan, g, lp.bits, in_op, grp.device)
        grp.consts[lp.bits] = {k: _const(gm, f"{base}_{k}", v) for k, v in c.items()}
    args = [grp.consts[lp.bits][k] for k in ("src", "mult", "lo", "hi")]
    rmult = grp.consts[lp.bits].get("rmult")        # per-token scales
    if act not in grp.quantized:
        grp.quantized[act] = _quantize_node(gm, grp.x, args, rmult, lp.bits, grp.qchoice, g)
    return args, rmult


def _unfold_rows(rw: _Rewrite, name: str, lp, new: fx.Node, out_dtype, device) -> fx.Node:
    """The plan's rows carry 1/s of a group whose input is not folded in this graph: multiply the
    output by s again."""
    s = rw.plan.groups[lp.rows_folded_from].smooth
    key = f"{lp.rows_folded_from}.smooth"
    if name in rw.tp and rw.tp[name].shard.dim == 0 and s.numel() != lp.out_features:
        # column-parallel with the full plan: this rank's rows of s (a rank-local plan holds them)
        sh = rw.tp[name].shard
        s, key = s[sh.offset: sh.offset + sh.size], f"{key}[{sh.offset}:{sh.offset + sh.size}]"
    unfold = _const(rw.gm, f"fq_{name}_unfold", device_tensor(rw.plan, key, s, device))
    return rw.gm.graph.call_method("to", (rw.gm.graph.call_function(torch.mul, (new, unfold)), out_dtype))


def _replace_linear(rw: _Rewrite, form: LinearForm, new: fx.Node) -> None:
    """`new` takes the linear's place; the matmul, bias add and W.T views go; parameters only the
    replaced linears read are recorded (what free_weights may release)."""
    node = form.out
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    for dead in dict.fromkeys((node, form.node, *form.views)):   # the bias add, the matmul, W.T
        if not dead.users:
            rw.gm.graph.erase_node(dead)
    for p_node in (form.weight, form.bias):
        fqn = rw.name_of(p_node)
        if fqn is not None and not p_node.users:
            rw.report.replaced_params[fqn] = p_node


def _report_layer(rw: _Rewrite, grp: _Group, name, lp, act, fused, per_token, reason, gemm, out_dtype,
                  run: tuple | None = None) -> None:
    """The layer's row of the graph report: op, smoothing, both kernel choices and why; run: (label, N)
    where the layer shares its GEMM with its siblings (its row says so, the choice is the shared GEMM's)."""
    n = run[1] if run else lp.out_features
    before = len(rw.report.layers)
    _report_row(rw, grp, name, lp, act, fused, per_token, reason, gemm, out_dtype, n)
    if run and len(rw.report.layers) > before:
        lr = rw.report.layers[-1]
        lr.fused = run[0]
        lr.gemm_why = (lr.gemm_why + "; " if lr.gemm_why else "") + f"one GEMM of N={n} with its siblings"


def _report_row(rw: _Rewrite, grp: _Group, name, lp, act, fused, per_token, reason, gemm, out_dtype, n) -> None:
    if act == "f8":
        rw.report.layers.append(LayerReport(
            name, f"fq.{lp.format}_linear", grp.smoothing, reason, quantize="fused by Inductor" if grp.qchoice.impl == "fused" else grp.qchoice.label(),
            scales="per tensor",
            quantize_why=f"per-tensor e4m3, not flattened ({grp.qchoice.why})", gemm="fp8 GEMM",
            gemm_why="on CUDA cuBLAS _scaled_mm or Triton (FQ_FP8_GEMM); the reference elsewhere"))
        return
    scales = "per token" if per_token else "per tensor"
    if fused:
        rw.report.layers.append(LayerReport(
            name, f"fq.flat_linear (int{lp.bits})", grp.smoothing, reason,
            quantize=f"{grp.qchoice.label()}, or inside fq.flat_linear",
            quantize_why=f"decode-sized input (<= {flat_linear_op.decode_max_m()} rows): the op reads the group's "
                         f"quantize ({grp.qchoice.why}) or quantizes in its prologue, as it measured fastest",
            gemm="Triton weight-streaming (kernels/triton/decode.py)", gemm_why="M <= decode_max_m()", scales=scales))
        return
    g = grp.g
    gchoice = dispatch.decide(lp.bits, grp.m, n, g.flat_features, out_dtype, grp.info, mode=rw.mode) \
        if grp.m is not None else dispatch.Choice("triton", "", "rows unknown at compile time")
    lr = LayerReport(name, f"fq.{lp.format}_linear", grp.smoothing, reason, quantize=grp.qchoice.label(),
                     quantize_why=grp.qchoice.why, gemm=gchoice.label(), gemm_why=gchoice.why, scales=scales)
    rw.report.layers.append(lr)
    rw.gemm_nodes[gemm] = (lr, gchoice, out_dtype)


def _quantize_node(gm: fx.GraphModule, x: fx.Node, args: list, rmult: fx.Node | None, bits: int,
                   qchoice: dispatch.Choice, g: GroupPlan) -> tuple[fx.Node, fx.Node | None]:
    """The activation quantize of a flattened group: (integers, per-token scales or None).  Fused
    into x's producer by Inductor (the aten decomposition) or the opaque op (our kernel)."""
    fused = qchoice.impl == "fused"
    direct = (direct_prefix(g.cmap.src, bits) if qchoice.config == "slice" else 0,) if fused else ()
    if rmult is None:
        op = torch.ops.fq.flatten_quantize_fused.default if fused else torch.ops.fq.flatten_quantize.default
        return gm.graph.call_function(op, (x, *args, bits, *direct)), None
    op = torch.ops.fq.flatten_quantize_rows_fused.default if fused else torch.ops.fq.flatten_quantize_rows.default
    both = gm.graph.call_function(op, (x, *args, rmult, bits, *direct))
    # r is float and would carry x's autograd history into the GEMM, which has no autograd formula
    # (a call outside torch.no_grad()); the integers end it, so must r
    rows = gm.graph.call_method("detach", (gm.graph.call_function(operator.getitem, (both, 1)),))
    return gm.graph.call_function(operator.getitem, (both, 0)), rows


def _rows(xv) -> int | None:
    """The GEMM's M: the product of the activation's leading sizes (dynamic ones by their hint)."""
    if xv is None:
        return None
    m = 1
    for d in xv.shape[:-1]:
        h = dispatch.size_hint(d)
        if h is None:
            return None
        m *= h
    return m


def _prefetch(chosen, example_inputs) -> None:
    """Start building the CUTLASS kernels the chosen layers need (no-op where none are chosen)."""
    pairs = [(dtype, lr.act) for lr, choice, dtype in chosen if choice.impl == "cutlass"]
    devices = {t.device for t in example_inputs if isinstance(t, torch.Tensor) and t.is_cuda}
    if pairs and devices:
        dispatch.prefetch_cutlass(next(iter(devices)), pairs)


def _decode_sized(x: fx.Node) -> bool:
    """Whether the linears reading x see at most decode_max_m() rows (a guard when symbolic).  Not
    where x requires grad (a call outside torch.no_grad()): fq.flat_linear takes the float activation
    and has no autograd formula, while the quantize + GEMM pair ends the graph's autograd at the
    integer activation, as every quantized path does."""
    limit = flat_linear_op.decode_max_m()
    v = example_value(x)
    if limit == 0 or v is None or v.dim() == 0 or v.requires_grad:
        return False
    rows = 1
    for d in v.shape[:-1]:
        rows = rows * d
    return bool(rows <= limit)


def _check_values(fqn: str, node: fx.Node, t, expected: str | None, report: GraphReport) -> None:
    """The parameter `t` (placeholder `node`) must hold the values the plan was made from; it is
    watched from now on.  Released storage cannot be read: it was checked before it was released."""
    if not isinstance(t, torch.Tensor):
        return
    if is_dtensor(t):           # tensor parallelism: the guard watches the local shard (runtime/tensor_parallel.py)
        report.watched[node] = (fqn, expected if is_released(t) else check_dtensor(fqn, t, expected))
        return
    if not is_released(t):
        got = fingerprint(t)
        if got != expected:
            raise PlanMismatchError(stale_message(fqn, expected, got))
    elif vouched_fingerprint(t) not in (None, expected):     # a placeholder of a loaded artefact (deploy.py)
        raise PlanMismatchError(
            f"{fqn}: this model was loaded from a quantized artefact whose plan was made from other weights "
            f"(fingerprint {vouched_fingerprint(t)}, this plan's {expected}); the floating-point weights are not "
            "in the artefact, so only its own plan can run it: options={'plan': model.fq_plan}")
    report.watched[node] = (fqn, expected)


def _param_names(gm, example_inputs, runtime, plan) -> ParamNames:
    """Absolute parameter names of the graph's placeholders.  Where some weights were released, the
    registry holds their full names, which also give the frame's prefix for every other placeholder
    (ParamNames' own prefix search would read the released weights' values)."""
    released = {n: released_name(t) for n, t in runtime.items() if released_name(t) is not None}
    if not released:
        known = {n: lp.fingerprint for n, lp in plan.layers.items()}
        known.update({n: None for n in plan.skipped})
        return ParamNames(gm, example_inputs, known=known)
    rel = {n: param_fqn(n) for n in runtime if param_fqn(n) is not None}
    prefix = ""
    for n, full in released.items():
        r = rel.get(n)
        if r and full.endswith(r) and (len(full) == len(r) or full[-len(r) - 1] == "."):
            prefix = full[: len(full) - len(r)]
            break
    by_id = {id(runtime[n]): released.get(n, prefix + r) for n, r in rel.items()}
    return ParamNames(gm, example_inputs, by_id=by_id)


def op_constants(g: GroupPlan, bits: int, smooth_in_op: bool) -> dict[str, torch.Tensor]:
    """src/mult/lo/hi for fq::flatten_quantize at this bit width (see its docstring); the
    smoothing scales go into mult unless they were folded into the producer.  A per-token group
    (g.activation_scale "token") gets mult = 1 / s (the row's multiplier supplies qmax / r at run
    time) and rmult = 1 / (s (E + 1)) for fq::flatten_quantize_rows."""
    qmax = QMAX[bits]
    cm = g.cmap
    src = cm.src.to(torch.int64)
    inv_s = 1.0 / g.smooth.double() if smooth_in_op else torch.ones(g.in_features, dtype=torch.float64)
    token = g.activation_scale == "token"
    mult = (inv_s.double()[src] * (1.0 if token else qmax / g.threshold)).float()
    mult = torch.where(cm.active, mult, torch.zeros_like(mult))
    lo = cm.lo * qmax
    hi = torch.where(cm.hi.isinf(), cm.hi, cm.hi * qmax)
    out = dict(src=cm.src, mult=mult, lo=lo.float(), hi=hi.float())
    if token:
        out["rmult"] = (inv_s / (g.extra.double() + 1.0)).float()
    return out


def fp8_constants(g: GroupPlan, act_scale: float, smooth_in_op: bool) -> torch.Tensor:
    """mult for fq::fp8_quantize: 1 / (smoothing scale * activation scale) per input channel (the
    smoothing scales only where they stay in the op)."""
    inv_s = 1.0 / g.smooth.double() if smooth_in_op else torch.ones(g.in_features, dtype=torch.float64)
    return (inv_s / act_scale).float()


def _fp8_constants(plan, g, lp, smooth_in_op: bool, device) -> torch.Tensor:
    """The group's fp8_quantize mult on `device`, built and copied once per plan.  Every e4m3 layer
    of a group reads one activation, so they share one activation scale (the planner makes them so)."""
    scales = {plan.layers[n].act_scale for n in g.layers if _ACTIVATION[plan.layers[n].format] == "f8"}
    if len(scales) != 1:
        raise PlanMismatchError(f"group {g.name}: its e4m3 layers disagree on the activation scale {sorted(scales)}")
    key = f"{g.name}.f8.{'s' if smooth_in_op else 'f'}"
    cache = state_of(plan).constants
    ident = (lp.act_scale, id(g.smooth))
    if key not in cache or cache[key][0] != ident:
        cache[key] = (ident, fp8_constants(g, lp.act_scale, smooth_in_op))
    return device_tensor(plan, key, cache[key][1], device)


def _layer_scale(plan, lp, device) -> torch.Tensor:
    """The layer's epilogue scale vector (LayerPlan.scale) on `device`, built and copied once per plan."""
    key = f"{lp.name}.scale"
    cache = state_of(plan).constants
    ident = (id(lp.weight_scale), lp.act_scale)
    if key not in cache or cache[key][0] != ident:
        cache[key] = (ident, lp.scale)
    return device_tensor(plan, key, cache[key][1], device)


def _group_constants(plan, g, bits: int, smooth_in_op: bool, device) -> dict[str, torch.Tensor]:
    """The group's flatten_quantize constants on `device`, built and copied once per plan."""
    key = f"{g.name}.a{bits}.{'s' if smooth_in_op else 'f'}"
    cache = state_of(plan).constants
    ident = (g.threshold, id(g.smooth), id(g.cmap))
    if key not in cache or cache[key][0] != ident:
        cache[key] = (ident, op_constants(g, bits, smooth_in_op=smooth_in_op))
    return {k: device_tensor(plan, f"{key}.{k}", v, device) for k, v in cache[key][1].items()}


def _fold_here(x, group_nodes, g, planned, name_of, here: set[str]) -> tuple[str, str, object]:
    """Where the group's smoothing lives in this graph: (g.fold, "", site) where the plan's fold
    site is present and valid here, else ("op", why, None).  `here`: the planned layers of this graph."""
    if g.fold == "op":
        return "op", g.fold_note, None
    site = find_fold_site(x, group_nodes, planned, name_of)
    if site.encode() == g.fold:
        return g.fold, "", site
    kind, _, target = g.fold.partition(":")
    if kind == "rows" and target not in here:
        why = f"its producer {target} is not in this graph"
    elif site.kind == "op" and site.note:
        why = site.note
    else:
        why = f"the fold site found here is {site.encode()}"
    return "op", f"planned fold {g.fold} does not hold in this graph: {why}", None


def _apply_norm_fold(gm, site, g, runtime, name_of, report) -> bool:
    """Fold the group's smoothing into its producing norm `site.node` (a graph constant from the
    live norm parameters, watched for in-place changes); False when a parameter is not a tensor."""
    node = site.node
    params = {name_of(a): a for a in node.all_input_nodes if name_of(a) is not None}
    live = {fqn: runtime.get(params[fqn]) for fqn in site.target}
    if not all(isinstance(t, torch.Tensor) for t in live.values()):
        return False
    s = g.smooth.double()
    for fqn, t in live.items():
        ph = params[fqn]
        _check_values(fqn, ph, t, g.fold_fingerprints.get(fqn), report)
        folded = (t.detach().double() / s.to(t.device)).to(t.dtype)
        with gm.graph.inserting_before(node):
            c = _const(gm, f"fq_fold_{fqn}", folded)
        node.replace_input_with(ph, c)
    return True
