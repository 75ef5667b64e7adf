"""From calibration statistics to a QuantPlan: runs the planning passes in the paper's order.

For each activation group: smoothing scales (Eq. 5, or SmoothQuant's), the truncation threshold
(Eq. 6-7) on the smoothed channel maxima, the flatten counts (Eq. 2) and the channel map; then for
each layer of the group: the weight smoothed (diag(s) W), row-divided by the next group's scales
where those are folded into it, flattened (Eq. 4), its bit width (Eq. 8), and quantized per tensor.
Level fp8 puts every layer in the e4m3 format instead (unflattened); level auto measures every
candidate format of every layer and chooses (planning/formats.py).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from fq_compile.config import Config
from fq_compile.passes.match import LayerParams
from fq_compile.passes.observe import CalibrationError, InputStats
from fq_compile.plan import (
    FORMAT_BITS,
    GroupPlan,
    LayerPlan,
    QuantPlan,
    model_hash,
    parameter_shapes,
    weight_fingerprint,
)
from fq_compile.planning import bits as bits_pass
from fq_compile.planning.align import align_groups
from fq_compile.planning.bit_patterns import limit_patterns
from fq_compile.planning.flatten import (
    channel_map,
    extra_channels,
    flatten_values,
    weight_splits,
)
from fq_compile.planning.smooth import smoothing_scales
from fq_compile.planning.threshold import truncation_threshold
from fq_compile.planning import formats
from fq_compile.planning.formats import quantize_layer
from fq_compile.planning.weights import flattened_weight


def layer_weight(params: dict[str, torch.Tensor], ref: LayerParams) -> torch.Tensor:
    """A layer's weight as nn.Linear stores it, [N, K], in float32 on the CPU (where planning runs,
    whatever the model's device); a Conv1D weight ([K, N]) is transposed."""
    w = params[ref.weight].detach()
    return (w.t() if ref.transposed else w).float().cpu()


def plan_weight(params: dict[str, torch.Tensor], lp: LayerPlan) -> torch.Tensor:
    """`layer_weight` of a planned layer (its parameter is '<layer>.weight', or '<layer>' itself)."""
    name = lp.name + ".weight" if lp.name + ".weight" in params else lp.name
    return layer_weight(params, LayerParams(name, None, lp.transposed))


def plan_group(name: str, stats: InputStats, weights: dict[str, torch.Tensor], fold: str, fold_note: str,
               config: Config, act_max: torch.Tensor | None = None) -> GroupPlan:
    """The group's channel map and scales from its channel maxima (`stats.absmax` unless `act_max`)."""
    act_max = (stats.absmax if act_max is None else act_max).float()
    wcat = torch.cat([weights[l].float() for l in stats.layers], dim=0)
    w_colmax = wcat.abs().amax(dim=0)
    s = smoothing_scales(config.smoothing_method, act_max, w_colmax, config.alpha)
    smoothed_max = act_max / s
    if config.flatten:
        t = truncation_threshold(smoothed_max, config.threshold_beta, config.outlier_clip)
        extra = extra_channels(smoothed_max, t)
    else:
        t = float(smoothed_max.max())
        if not t > 0:
            raise CalibrationError(f"input of {name} was all zeros during calibration")
        extra = torch.zeros_like(act_max, dtype=torch.int64)
    dup = torch.zeros_like(extra)
    if config.flatten and config.flatten_weights:
        wcol = (wcat * s).abs().amax(dim=0)
        tw = truncation_threshold(wcol, config.weight_beta, config.outlier_clip)
        dup = weight_splits(wcol, tw, blocked=extra > 0)
    token = any(config.token_scaled(layer) for layer in stats.layers)
    return GroupPlan(name=name, layers=list(stats.layers), in_features=act_max.numel(), threshold=t, smooth=s,
                     fold=fold, extra=extra, weight_dup=dup, act_max=act_max, pad_multiple=config.pad_multiple,
                     cmap=channel_map(extra, dup, config.pad_multiple), fold_note=fold_note,
                     activation_scale="token" if token else "tensor")


def level_format(weight: torch.Tensor, group: GroupPlan, row_scale: torch.Tensor | None, config: Config,
                 act_ratio: float | None) -> tuple[str, float | None]:
    """The level's format of a layer and Eq. 8's ratio (None without mixed bits): fp8 at level fp8, else
    INT8, or INT4 where Eq. 8 says at O2/O3 (act_ratio: its group's activation ratio)."""
    fmt = "fp8" if config.format == "fp8" else "int8"
    if not config.mixed_bits:
        return fmt, None
    wf = flattened_weight(weight, group, row_scale)
    w_ratio = bits_pass.tensor_ratio(wf, float(wf.abs().max()), config.kl_bins, config.kl_method)
    fmt = "int4" if bits_pass.choose_bits(act_ratio, w_ratio, config.gamma) == 4 else "int8"
    return fmt, max(act_ratio, w_ratio)


def plan_layer(layer: str, group: GroupPlan, weight: torch.Tensor, bias: torch.Tensor | None,
               row_scale: torch.Tensor | None, row_group: str | None, config: Config, act_ratio: float | None,
               fmt: str | None = None, fingerprints: tuple[str, str | None] | None = None,
               transposed: bool = False, kl_ratio: float | None = None) -> LayerPlan:
    """One layer's plan in format `fmt`; None: the level's (`level_format`: fp8, or INT8 / INT4 by Eq. 8 at
    O2/O3); kl_ratio: Eq. 8's ratio recorded with a given `fmt` (level_format's own otherwise).
    weight is [N, K] (transposed already where the model stores it [K, N]: `transposed`);
    fingerprints: (weight, bias) fingerprints of the model's own tensors, as stored (layout and dtype
    included), as the backend will compute them; computed from `weight` / `bias` when not given."""
    if fingerprints is None:
        fingerprints = (weight_fingerprint(weight), None if bias is None else weight_fingerprint(bias))
    b = None if bias is None else bias.float().clone()
    if row_scale is not None and b is not None:
        b = b / row_scale
    if fmt is None:
        fmt, kl_ratio = level_format(weight, group, row_scale, config, act_ratio)
    q = quantize_layer(fmt, weight, group, row_scale, config)
    return LayerPlan(name=layer, group=group.name, in_features=weight.shape[1], out_features=weight.shape[0],
                     bits=FORMAT_BITS[fmt], format=fmt, weight_q=q.weight_q, weight_scale=q.weight_scale,
                     act_scale=q.act_scale, bias=b, fingerprint=fingerprints[0],
                     kl_ratio=kl_ratio, rows_folded_from=row_group, bias_fingerprint=fingerprints[1],
                     transposed=transposed)


def build_plan(model: torch.nn.Module, inputs: dict[str, InputStats], folds: dict[str, tuple[str, str]],
               skipped: dict[str, str], config: Config, progress: bool = True) -> QuantPlan:
    """folds: group -> (encoded fold site, note) from the fold analysis.  Each layer's weight and
    bias are the parameters its graph's call reads (InputStats.params), never looked up by name."""
    plan = QuantPlan(config=config, model_type=type(model).__name__, model_hash=model_hash(model),
                     skipped=dict(skipped), parameters=parameter_shapes(model))
    params = dict(model.named_parameters())

    def ref_of(st: InputStats, layer: str) -> LayerParams:
        """The layer's parameters as its graph named them (bias from the graph node, not by name)."""
        ref = st.params.get(layer)
        if ref is None:      # stats made without graph names: nn.Linear's
            ref = LayerParams(layer + ".weight", layer + ".bias" if layer + ".bias" in params else None)
        return ref

    refs = {l: ref_of(st, l) for st in inputs.values() for l in st.layers}

    def weight_of(layer):
        # planning runs on the CPU, where statistics and plan tensors live, whatever the model's device
        return layer_weight(params, refs[layer])

    def bias_of(layer):
        name = refs[layer].bias
        return None if name is None else params[name].detach().float().cpu()

    def fingerprints_of(layer):
        name = refs[layer].bias
        bias_fp = None if name is None else weight_fingerprint(params[name])
        return weight_fingerprint(params[refs[layer].weight]), bias_fp

    for name, st in tqdm(list(inputs.items()), desc="fq_compile: planning groups", disable=not progress):
        if st.absmax is None:
            for l in st.layers:
                plan.skipped[l] = "never executed during calibration"
            continue
        fold, note = folds.get(name, ("op", "no fold analysis"))
        if not config.fold:
            fold, note = "op", "folding disabled (Config.fold=False)"
        weights = {l: weight_of(l) for l in st.layers}
        plan.groups[name] = plan_group(name, st, weights, fold, note, config)
    if config.align_budget > 0:             # blocks padded to a few K' sets: few compiled bodies (passes/regions.py)
        def rows(g):
            return sum(params[refs[l].weight].shape[1 if refs[l].transposed else 0] for l in g.layers)

        report = align_groups(plan.groups, {n: rows(g) for n, g in plan.groups.items()}, config.align_budget)
        plan.calibration["align"] = report.summary()
    for g in plan.groups.values():          # the norm values s was chosen for (checked at each compile)
        if g.fold.startswith("norm:"):
            g.fold_fingerprints = {fqn: weight_fingerprint(params[fqn]) for fqn in g.fold[len("norm:"):].split(",")}
    # rows folds: the producer layer's rows are divided by the consumer group's scales
    row_fold = {}
    for g in plan.groups.values():
        if g.fold.startswith("rows:"):
            producer = g.fold[len("rows:"):]
            if not any(producer in og.layers for og in plan.groups.values()):
                g.fold, g.fold_note = "op", f"producer {producer} is not quantized"
                continue
            row_fold[producer] = g
    if config.format == "auto":
        _plan_auto(plan, inputs, row_fold, weight_of, bias_of, fingerprints_of, config, progress,
                   transposed_of=lambda layer: refs[layer].transposed)
        return plan
    # each layer's format first (Eq. 8 at O2/O3), then the bit patterns limited, then the weights quantized
    chosen: dict[str, tuple[str, float | None]] = {}
    size: dict[str, int] = {}
    promoted: set[str] = set()
    if config.mixed_bits:
        for name, g in tqdm(list(plan.groups.items()), desc="fq_compile: choosing bits", disable=not progress):
            sample = flatten_values(inputs[name].sample / g.smooth, g.cmap, g.threshold)
            act_ratio = bits_pass.tensor_ratio(sample, g.threshold, config.kl_bins, config.kl_method)
            for layer in g.layers:
                rg = row_fold.get(layer)
                w = weight_of(layer)
                size[layer] = w.numel()
                chosen[layer] = level_format(w, g, None if rg is None else rg.smooth, config, act_ratio)
        promoted = _limit_bit_patterns(plan, chosen, size, config)
    for name, g in tqdm(list(plan.groups.items()), desc="fq_compile: quantizing layers", disable=not progress):
        for layer in g.layers:
            rg = row_fold.get(layer)
            fmt, ratio = chosen.get(layer, (None, None))       # None: plan_layer takes the level's
            lp = plan_layer(layer, g, weight_of(layer), bias_of(layer), None if rg is None else rg.smooth,
                            None if rg is None else rg.name, config, None, fmt=fmt,
                            fingerprints=fingerprints_of(layer), transposed=refs[layer].transposed, kl_ratio=ratio)
            if layer in promoted:
                lp.why = (f"INT4 by Eq. 8, promoted to INT8: at most {config.bits_patterns} bit patterns over the "
                          "blocks (Config.bits_patterns)")
            plan.layers[layer] = lp
    return plan


def _limit_bit_patterns(plan: QuantPlan, chosen: dict[str, tuple[str, float | None]], size: dict[str, int],
                        config: Config) -> set[str]:
    """Config.bits_patterns applied to the Eq. 8 formats in `chosen` (in place: promoted layers become
    int8), before any weight is quantized (size: layer -> N x K, what INT4 saves is weighed by); the report
    goes to plan.calibration["bits_patterns"].  Returns the promoted layers."""
    bits = {layer: FORMAT_BITS[fmt] for layer, (fmt, _) in chosen.items()}
    group = {layer: name for name, g in plan.groups.items() for layer in g.layers}
    _, report = limit_patterns(bits, size, group, config.bits_patterns)
    plan.calibration["bits_patterns"] = report.summary()
    for layer in report.promoted:
        chosen[layer] = ("int8", chosen[layer][1])
    return set(report.promoted)


MIN_HELD_OUT = 8        # fewer held-out rows in any group: auto measures on every sampled row instead


def _measurement_groups(plan: QuantPlan, inputs: dict[str, InputStats], row_fold: dict, weight_of, config: Config):
    """What auto measures its errors on: per group, (rows, group plan, row folds by layer).  Where the
    calibration held rows out (passes/observe.py), the group is planned again from the other rows'
    maxima and the error is measured on the held-out rows: a static scale then meets values beyond
    its calibrated range, as at run time (measured on the rows that set the maxima, static scales'
    errors were underestimated and auto came out less accurate than naive FP8 on test data).  With
    too few rows held out (tiny calibration sets): every sampled row and the plan's own groups."""
    held = {name: inputs[name].held_out_sample for name in plan.groups}
    if any(h is None or h.shape[0] < MIN_HELD_OUT or inputs[name].fit_absmax is None for name, h in held.items()):
        return {name: (inputs[name].sample, g) for name, g in plan.groups.items()}, row_fold, "calibration rows"
    fit = {name: plan_group(name, inputs[name], {l: weight_of(l) for l in g.layers}, g.fold, g.fold_note, config,
                            act_max=inputs[name].fit_absmax)
           for name, g in plan.groups.items()}
    fit_fold = {layer: fit[g.name] for layer, g in row_fold.items()}
    rows = min(h.shape[0] for h in held.values())
    return ({name: (held[name], fit[name]) for name in plan.groups}, fit_fold,
            f"held-out calibration rows (>= {rows} per group; scales from the other rows)")


def _plan_auto(plan: QuantPlan, inputs: dict[str, InputStats], row_fold: dict, weight_of, bias_of, fingerprints_of,
               config: Config, progress: bool, transposed_of=lambda layer: False) -> None:
    """Level auto: measure every candidate format of every layer (`_measurement_groups`), choose under
    the budget (planning/formats.py), then quantize each layer in its format."""
    device = formats.DEVICES[config.target]
    options, errors, naive = {}, {}, {}
    measured, fold_of, where = _measurement_groups(plan, inputs, row_fold, weight_of, config)
    for name, (x, g) in tqdm(list(measured.items()), desc="fq_compile: measuring formats", disable=not progress):
        for layer in g.layers:
            rg = fold_of.get(layer)
            w = weight_of(layer)
            cands = formats.candidate_formats(config, g.in_features)
            errors[layer] = formats.measure_layer(x, w, g, None if rg is None else rg.smooth, config, cands)
            naive[layer] = formats.naive_fp8_error(x, w, g.act_max)
            options[layer] = formats.options_for(errors[layer], w.shape[0], w.shape[1], g.flat_features, device)
    choice, why, summary = formats.choose_formats(options, config, naive)
    for name, g in tqdm(list(plan.groups.items()), desc="fq_compile: quantizing layers", disable=not progress):
        for layer in g.layers:
            rg = row_fold.get(layer)
            lp = plan_layer(layer, g, weight_of(layer), bias_of(layer), None if rg is None else rg.smooth,
                            None if rg is None else rg.name, config, None, fmt=choice[layer],
                            fingerprints=fingerprints_of(layer), transposed=transposed_of(layer))
            lp.error, lp.errors, lp.why = errors[layer][choice[layer]], errors[layer], why[layer]
            plan.layers[layer] = lp
    summary["measured_on"] = where
    plan.calibration["auto"] = summary
