"""Level `auto`: each layer's format chosen by its measured output error and a device cost model.

Candidates per layer (plan.py): `int8` and `int4` (FlattenQuant's flattened INT8 / W4A4, on K'
channels), `fp8` (per-tensor static e4m3 activations and e4m3 weights, K channels) and `w4a8` (INT4
weights, e4m3 activations: int4 values are exact in e4m3, so it runs on the FP8 units).

Error.  For every candidate the layer is quantized exactly as the plan would store it and run through
the CPU reference ops (the ops' semantics, not a model of them) on the calibration rows kept for the
layer's input (Config.calib_samples, sampled uniformly over every calibration token); the error is
the relative output MSE ||Y_f - Y||^2 / ||Y||^2 against the unquantized layer Y = X W^T.  The rows
are held out: the group is planned again from the maxima of the other calibration rows
(planner._measurement_groups, passes/observe.HELD_OUT), so static scales saturate where new text
passes the calibrated range, as they do at run time.  The same
measure on naive FP8 (no smoothing, per-tensor e4m3 weights and activations) is the yardstick: the
error budget is a multiple of the naive-FP8 error of the same layer (Config.error_budget;
1.0 = "no layer worse than naive FP8" by this measure).

Cost.  A layer's time relative to bf16 on the target, the mean of two regimes (DeviceModel.time):
prefill, compute-bound, K_eff / K / rate (the multiply rate of the format's tensor cores relative to
bf16; flattening multiplies the work by K'/K), and decode, memory-bound, the weight bytes relative to
bf16's (K_eff / K * bytes per weight / 2).  A plan's cost is the sum over layers of N * K times that,
i.e. the bf16-equivalent time the linears take.  Targets (`Config.target`):

    hopper  H100/H200: FP8 and INT8 tensor cores at 2x bf16, no INT4 ones (INT4 is unpacked onto
            the INT8 / FP8 units: it saves bytes, not multiplies)
    ampere  A100: INT8 2x, INT4 4x, no FP8 (fp8 and w4a8 are not candidates)
    cpu     our CPU path runs every format as float GEMMs: only K'/K and the bytes differ

Choice.  Memory mode (Config.memory_budget; the default, at 0.55x fp16 bytes) or error mode
(Config.error_budget).  Error mode: layer by layer, the fastest format whose
error is within error_budget times naive FP8's error on that same layer (none within: the most
accurate).  The cap is per layer, not summed: a summed cap let a plan trade one layer's error for
another's, and since layers differ in how much their error reaches the loss, such a plan came out
less accurate than naive FP8 on held-out text (SmolLM2-135M, 4 validation windows: +2.89% against
+2.58%).  Memory mode: a multiple-choice knapsack, solved by Lagrangian
relaxation (`solve`): minimise the summed error subject to the weight bytes within that fraction of
fp16's.  For a price lambda every layer picks the format minimising error + lambda * bytes; the
smallest lambda whose choice fits is found over the sorted breakpoints, and any slack left is spent
greedily on the best error improvements per byte.  This generalises Eq. 8 (a per-layer INT4/INT8
choice from a KL ratio), which stays the O2/O3 rule.  Each layer's plan records its format, error,
every candidate's error and why (`explain()` prints them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fq_compile.config import LAYER_FORMATS, Config
from fq_compile.kernels.flatten_quantize import QMAX, flatten_quantize_reference, flatten_quantize_rows_reference
from fq_compile.kernels.fp8 import E4M3_MAX, fp8_linear_reference, fp8_quantize_reference
from fq_compile.kernels.int_gemm import quant_linear_reference
from fq_compile.passes.lower import fp8_constants, op_constants
from fq_compile.plan import FLATTENED_FORMATS, FORMAT_BITS, GroupPlan
from fq_compile.planning.weights import (
    flattened_weight,
    fp8_weight_scale,
    quantize_fp8_weight,
    quantize_weight,
    smoothed_weight,
    weight_scale,
)

BYTES_PER_WEIGHT = {"int8": 1.0, "int4": 0.5, "fp8": 1.0, "w4a8": 0.5}


@dataclass(frozen=True)
class DeviceModel:
    """Multiply rates of each format's tensor cores relative to bf16 (a format absent: not supported)."""

    name: str
    rate: dict
    note: str

    def supports(self, fmt: str) -> bool:
        return fmt in self.rate

    def time(self, fmt: str, k: int, k_flat: int) -> float:
        """The layer's time relative to bf16: mean of compute-bound prefill and memory-bound decode."""
        work = (k_flat if fmt in FLATTENED_FORMATS else k) / k
        prefill = work / self.rate[fmt]
        decode = work * BYTES_PER_WEIGHT[fmt] / 2.0
        return 0.5 * (prefill + decode)


DEVICES = {
    "hopper": DeviceModel("hopper", {"int8": 2.0, "int4": 2.0, "fp8": 2.0, "w4a8": 2.0},
                          "H100/H200: INT8 = FP8 = 2x bf16, no INT4 tensor cores"),
    "ampere": DeviceModel("ampere", {"int8": 2.0, "int4": 4.0},
                          "A100: INT8 2x, INT4 4x bf16, no FP8"),
    "cpu": DeviceModel("cpu", {"int8": 1.0, "int4": 1.0, "fp8": 1.0, "w4a8": 1.0},
                       "CPU: every format runs as float GEMMs; only K'/K and bytes differ"),
}


def candidate_formats(config: Config, in_features: int) -> tuple[str, ...]:
    """The formats auto tries for a layer: Config.formats (default all) that the target runs; w4a8
    packs two weights per byte along K, so it needs an even K."""
    device = DEVICES[config.target]
    want = config.formats or LAYER_FORMATS
    out = tuple(f for f in want if device.supports(f) and (f != "w4a8" or in_features % 2 == 0))
    if not out:
        raise ValueError(f"Config.formats={want} leaves no format that target {config.target!r} runs "
                         f"({device.note})")
    return out


# -- one layer in one format --------------------------------------------------------------------------

@dataclass
class QuantizedWeight:
    weight_q: torch.Tensor       # int8 [N, K'], packed uint8 [N, K'/2 or K/2], or e4m3 [N, K]
    weight_scale: torch.Tensor   # float32 [N]
    act_scale: float


def fp8_activation_scale(group: GroupPlan) -> float:
    """The e4m3 layers' static activation scale: the calibrated max of the (smoothed) input / 448."""
    top = float((group.act_max.double() / group.smooth.double()).max())
    return top / E4M3_MAX if top > 0 else 1.0


def quantize_layer(fmt: str, weight: torch.Tensor, group: GroupPlan, row_scale: torch.Tensor | None,
                   config: Config) -> QuantizedWeight:
    """The layer's stored weights in format `fmt` (round to nearest; GPTQ may replace them later)."""
    granularity = config.weight_granularity
    if fmt in FLATTENED_FORMATS:
        bits = FORMAT_BITS[fmt]
        wf = flattened_weight(weight, group, row_scale)
        ws = weight_scale(wf, QMAX[bits], config.weight_clip_method, granularity)
        act = 1.0 / QMAX[bits] if group.activation_scale == "token" else group.threshold / QMAX[bits]
        return QuantizedWeight(quantize_weight(wf, ws, bits, group.cmap), ws, act)
    w = smoothed_weight(weight, group, row_scale)
    if fmt == "fp8":
        ws = fp8_weight_scale(w, granularity)
        return QuantizedWeight(quantize_fp8_weight(w, ws), ws, fp8_activation_scale(group))
    if fmt == "w4a8":
        ws = weight_scale(w, QMAX[4], config.weight_clip_method, granularity)
        return QuantizedWeight(quantize_weight(w, ws, 4), ws, fp8_activation_scale(group))
    raise ValueError(f"unknown layer format {fmt!r}")


def simulate(fmt: str, x: torch.Tensor, q: QuantizedWeight, group: GroupPlan) -> torch.Tensor:
    """The layer's output (no bias) on raw inputs x [R, C] through the CPU reference ops, smoothing in
    the op: exactly what the lowered graph computes."""
    scale = (q.weight_scale.double() * q.act_scale).float()
    if fmt in FLATTENED_FORMATS:
        bits = FORMAT_BITS[fmt]
        c = op_constants(group, bits, smooth_in_op=True)
        if "rmult" in c:                     # per-token scales
            xq, r = flatten_quantize_rows_reference(x, c["src"], c["mult"], c["lo"], c["hi"], c["rmult"], bits)
            return quant_linear_reference(xq, q.weight_q, scale, None, bits, torch.float32, row_scale=r)
        xq = flatten_quantize_reference(x, c["src"], c["mult"], c["lo"], c["hi"], bits)
        return quant_linear_reference(xq, q.weight_q, scale, None, bits, torch.float32)
    xq = fp8_quantize_reference(x, fp8_constants(group, q.act_scale, smooth_in_op=True))
    return fp8_linear_reference(xq, q.weight_q, scale, None, torch.float32)


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    """||y - ref||^2 / ||ref||^2 in float64."""
    ref = ref.double()
    den = float(ref.pow(2).sum())
    return float((y.double() - ref).pow(2).sum()) / den if den > 0 else 0.0


def measure_layer(x: torch.Tensor, weight: torch.Tensor, group: GroupPlan, row_scale: torch.Tensor | None,
                  config: Config, formats) -> dict[str, float]:
    """Output error of each format on calibration rows x [R, C] (see the module docstring)."""
    ref = x.double() @ weight.double().t()
    out = {}
    for fmt in formats:
        y = simulate(fmt, x, quantize_layer(fmt, weight, group, row_scale, config), group).double()
        if row_scale is not None:            # compare in the layer's true output space
            y = y * row_scale.double()
        out[fmt] = relative_error(y, ref)
    return out


def naive_fp8_error(x: torch.Tensor, weight: torch.Tensor, act_max: torch.Tensor) -> float:
    """The yardstick: per-tensor static e4m3 activations (calibrated max), per-tensor e4m3 weights,
    no smoothing (level fp8)."""
    top = float(act_max.max())
    act_scale = top / E4M3_MAX if top > 0 else 1.0
    ws = fp8_weight_scale(weight.float(), "tensor")
    xq = fp8_quantize_reference(x, torch.full((x.shape[-1],), 1.0 / act_scale, dtype=torch.float64).float())
    y = fp8_linear_reference(xq, quantize_fp8_weight(weight.float(), ws), (ws.double() * act_scale).float(), None,
                             torch.float32)
    return relative_error(y, x.double() @ weight.double().t())


# -- the choice -----------------------------------------------------------------------------------------

@dataclass
class Option:
    """One format of one layer: its relative time (cost per N*K), weight bytes and output error."""

    format: str
    time: float
    bytes: float
    error: float
    size: int          # N * K: the layer's weight in the cost


def options_for(errors: dict[str, float], n: int, k: int, k_flat: int, device: DeviceModel) -> dict[str, Option]:
    return {f: Option(f, device.time(f, k, k_flat), n * (k_flat if f in FLATTENED_FORMATS else k) * BYTES_PER_WEIGHT[f],
                      e, n * k) for f, e in errors.items()}


def solve(options: dict[str, dict[str, tuple[float, float]]], budget: float) -> tuple[dict[str, str], float]:
    """Multiple-choice knapsack by Lagrangian relaxation: options[layer][fmt] = (objective, constrained);
    minimise the summed objective with the summed constrained value <= budget.  Returns the choice and
    the price lambda (0: the budget does not bind; inf: unreachable, the least constrained choice)."""
    def pick(lam):
        return {l: min(opts, key=lambda f: (opts[f][0] + lam * opts[f][1], opts[f][1], opts[f][0], f))
                for l, opts in options.items()}

    def total(choice, i):
        return sum(options[l][f][i] for l, f in choice.items())

    choice = pick(0.0)
    if total(choice, 1) <= budget:
        return choice, 0.0
    least = {l: min(opts, key=lambda f: (opts[f][1], opts[f][0], f)) for l, opts in options.items()}
    if total(least, 1) > budget:
        return least, math.inf
    points = set()
    for opts in options.values():
        vals = list(opts.values())
        for o1, c1 in vals:
            for o2, c2 in vals:
                if c1 > c2 and o2 > o1:          # paying o2 - o1 saves c1 - c2: worth it above this price
                    points.add((o2 - o1) / (c1 - c2))
    points = sorted(points)
    lo, hi = 0, len(points) - 1                  # the largest breakpoint always fits (least-constrained)
    while lo < hi:
        mid = (lo + hi) // 2
        if total(pick(points[mid] * (1 + 1e-9)), 1) <= budget:
            hi = mid
        else:
            lo = mid + 1
    lam = points[lo] * (1 + 1e-9)
    choice = pick(lam)
    # spend the slack: the best objective saving per unit of constraint that still fits, repeatedly
    slack = budget - total(choice, 1)
    while True:
        best = None
        for l, f in choice.items():
            o0, c0 = options[l][f]
            for g, (o, c) in options[l].items():
                if o < o0 and c - c0 <= slack:
                    gain = (o0 - o) / max(c - c0, 1e-300)
                    if best is None or gain > best[0]:
                        best = (gain, l, g, c - c0)
        if best is None:
            break
        _, l, g, dc = best
        choice[l] = g
        slack -= dc
    return choice, lam


EXACT = 1e-12       # relative MSE at or below this counts as exact (float64 noise of the reference ops)


def _per_layer_choice(layer_options: dict[str, dict[str, Option]], budget: float,
                      naive_errors: dict[str, float]) -> tuple[dict[str, str], dict[str, str], list[str]]:
    """Error mode: each layer independently takes the fastest format whose error is within `budget`
    times naive FP8's on that layer, EXACT at least (ties: the more accurate), or its most accurate
    format when none is.  Returns the choice, why, and the layers where none was within."""
    choice, why, over = {}, {}, []
    for l, opts in layer_options.items():
        cap = max(budget * naive_errors[l], EXACT)
        within = [f for f, o in opts.items() if o.error <= cap]
        if within:
            f = min(within, key=lambda g: (opts[g].time, opts[g].error, g))
        else:
            f = min(opts, key=lambda g: (opts[g].error, opts[g].time, g))
            over.append(l)
        choice[l] = f
        o = opts[f]
        head = f"{f}: time x{o.time:.3f} of bf16, error {o.error:.2e}"
        faster = sorted((g for g in opts if opts[g].time < o.time), key=lambda g: opts[g].time)
        alts = "; ".join(f"{g} x{opts[g].time:.3f} but error {opts[g].error:.2e}" for g in faster)
        if not within:
            why[l] = head + f"; no format within {budget:g}x naive FP8's error ({naive_errors[l]:.2e}) on this " \
                            "layer: the most accurate taken"
        elif not faster:
            why[l] = head + " (fastest candidate)"
        else:
            why[l] = head + f"; over {budget:g}x naive FP8's error ({naive_errors[l]:.2e}) on this layer: " + alts
    return choice, why, sorted(over)


def choose_formats(layer_options: dict[str, dict[str, Option]], config: Config,
                   naive_errors: dict[str, float]) -> tuple[dict[str, str], dict[str, str], dict]:
    """(layer -> format, layer -> why, summary) under the Config's budget (module docstring)."""
    size = max(sum(next(iter(o.values())).size for o in layer_options.values()), 1)
    mode, value = config.auto_budget
    if mode == "error":
        choice, why, over = _per_layer_choice(layer_options, value, naive_errors)
        extra = dict(budget=value, over_budget=over)        # budget: the multiple of naive FP8's error per layer
    else:
        budget = value * 2.0 * size                          # fp16 bytes of the layers times the fraction
        opts = {l: {f: (o.error, o.bytes) for f, o in os_.items()} for l, os_ in layer_options.items()}
        choice, lam = solve(opts, budget)
        why = {}
        for l, f in choice.items():
            o = layer_options[l]
            better = sorted((g for g in opts[l] if opts[l][g][0] < opts[l][f][0]), key=lambda g: opts[l][g][0])
            head = f"{f}: error {o[f].error:.2e}, {o[f].bytes / (2.0 * o[f].size):.3f}x fp16 bytes"
            alts = [f"{g} error {o[g].error:.2e} but {o[g].bytes / (2.0 * o[g].size):.3f}x bytes" for g in better]
            if not better:
                why[l] = head + " (most accurate candidate)"
            elif math.isinf(lam):
                why[l] = head + "; budget unreachable, least bytes taken (" + "; ".join(alts) + ")"
            else:
                why[l] = head + "; rejected for the bytes budget: " + "; ".join(alts)
        extra = dict(budget=budget, used=sum(opts[l][f][1] for l, f in choice.items()), price=lam)
    summary = dict(mode=mode, target=config.target, naive_fp8_error=sum(naive_errors.values()),
                   error=sum(layer_options[l][f].error for l, f in choice.items()),
                   time=sum(layer_options[l][f].time * layer_options[l][f].size for l, f in choice.items()) / size,
                   **extra)
    return choice, why, summary
