"""User-facing configuration: one `Config` whose `level` picks a row of the paper's Table 2.

Every knob has the paper's default (section 5.1) and can be overridden; values are validated at
construction so that a typo fails at once with the knob's name and its range, not deep inside
calibration.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

# level -> (smoothing, flatten activations, mixed 4/8 bits by Eq. 8, GPTQ, per-layer format choice)
LEVELS = {
    "fp16": dict(quantize=False, smoothing="none", flatten=False, mixed_bits=False, gptq=False, format="int8"),
    "w8a8": dict(quantize=True, smoothing="none", flatten=False, mixed_bits=False, gptq=False, format="int8"),
    "smoothquant": dict(quantize=True, smoothing="smoothquant", flatten=False, mixed_bits=False, gptq=False,
                        format="int8"),
    "O1": dict(quantize=True, smoothing="sigmoid", flatten=True, mixed_bits=False, gptq=False, format="int8"),
    "O2": dict(quantize=True, smoothing="sigmoid", flatten=True, mixed_bits=True, gptq=False, format="int8"),
    "O3": dict(quantize=True, smoothing="sigmoid", flatten=True, mixed_bits=True, gptq=True, format="int8"),
    # naive per-tensor static FP8 (e4m3): what a Hopper user picks first; the baseline to beat
    "fp8": dict(quantize=True, smoothing="none", flatten=False, mixed_bits=False, gptq=False, format="fp8"),
    # per-layer format by measured output error and a device cost model (planning/formats.py)
    "auto": dict(quantize=True, smoothing="sigmoid", flatten=True, mixed_bits=False, gptq=True, format="auto"),
}
# the per-layer formats (plan.py): INT8/INT4 flattened (the paper's), FP8 e4m3, INT4 weights x FP8 activations
LAYER_FORMATS = ("int8", "int4", "fp8", "w4a8")
TARGETS = ("hopper", "ampere", "cpu")
# auto's budget when neither error_budget nor memory_budget is set: the most accurate plan within
# 0.55x the fp16 weight bytes (chosen on 4 held-out WikiText-2 validation windows, SmolLM2-135M:
# +0.78% perplexity against naive FP8's +2.58%; the per-layer error cap 1.0x naive FP8 gave +1.76%
# at 0.52x, 0.5x gave +1.46% at 0.585x: benchmarks/results/accuracy-smollm2-135m-auto-*select-cpu.md)
DEFAULT_MEMORY_BUDGET = 0.55
# Eq. 7's beta when Config.beta is None: the paper's 1.3, except where a level was re-chosen (see Config.beta)
PAPER_BETA = 1.3
LEVEL_BETA = {"O1": 3.0}
ALIGN_BUDGET = 0.02     # Config.align_budget: see benchmarks/results/align-cost-*.md
BITS_PATTERNS = 4       # Config.bits_patterns: see its docstring and benchmarks/results/bits-align-*.md

class ConfigError(ValueError):
    """A Config knob holds a value outside its range."""


@dataclass(frozen=True)
class Config:
    """What to quantize and how.

    level: one of fp16 (pass-through), w8a8 (naive per-tensor static INT8), smoothquant (SmoothQuant
        alpha smoothing + per-tensor static INT8), O1 (FlattenQuant, all INT8), O2 (FlattenQuant,
        INT4/INT8 chosen per layer by Eq. 8), O3 (O2 + GPTQ on the flattened weights).
    alpha: smoothing migration strength (Eq. 5 and SmoothQuant), in [0, 1].
    beta: truncation threshold coefficient T = beta * mean(clipped channel maxima) (Eq. 7), > 0; a
        larger beta flattens fewer channels (a smaller K', a cheaper GEMM).  None keeps the level's:
        3.0 for O1, chosen as the cheapest flattening within O1's accuracy target on held-out
        validation windows under per-token scales (SmolLM2-135M, 16 windows: beta 3 flattens 1.3% of
        channels at +0.38% perplexity, beta 1.3 16.1% at +0.15%, no flattening +1.53%:
        benchmarks/results/accuracy-smollm2-135m-beta-select*-cpu.md; on the H100, OPT-13B shape at
        8 x 2048, O1 at that flatten ratio runs at 1.05x naive FP8's time, at the paper's 21.5% 1.20x:
        benchmarks/results/prefill-2026-12-06-h100.md).  On the test split's 4-window quick set beta 3
        costs +0.92% (beta 1.3 +0.38%, naive FP8 +2.25%): beta=1.3 for the paper's accuracy.  1.3 (the
        paper's setting) for the other levels, whose INT4 layers have not been re-measured at beta 3.
    gamma: Eq. 8 bit choice: KL4/KL8 < gamma -> INT4, > 0.
    pad_multiple: flattened channel count padded to a multiple of this (32 in the paper).
    outlier_clip: apply the Eq. 6 boxplot clip before averaging channel maxima.
    smoothing: override the level's smoothing ("none", "smoothquant", "sigmoid"); None keeps it.
    flatten_weights: also flatten weight columns whose max exceeds the weight threshold (paper 4.1,
        last paragraph) by splitting them into equal parts and repeating the activation channel.
    weight_beta: threshold coefficient for weight flattening (same Eq. 6-7 on column maxima).
    weight_scale: weight scale granularity: "channel" (default: one per output channel, applied in the
        GEMM epilogue at no cost; the activation side stays per tensor) or "tensor" (one per layer, the
        paper's). Chosen on held-out validation windows
        (benchmarks/results/accuracy-smollm2-135m-weight-scale-select-cpu.md).
    weight_clip: weight scales from the max ("max") or the MSE-optimal clip ("mse"); None keeps the
        level's: per-channel scales at 8 bits only (O1, w8a8, smoothquant) take the row max (measured
        better than the row MSE clip on the same windows); levels with INT4 layers (O2, O3, auto) keep the MSE
        clip; per-tensor scales take "mse" for O1-O3 and "max" for w8a8/smoothquant
        (benchmarks/results/accuracy-smollm2-135m-select-cpu.md): without flattening, a weight-MSE clip
        cuts the weights that meet the outlier activation channels.
    fold: fold smoothing scales into the producing norm / linear where exact (else applied in op).
    skip: substrings of layer names kept in floating point (the output head by default).
    gptq_damp: GPTQ dampening, as a fraction of the mean Hessian diagonal (O3), in (0, 1].
    gptq_block: GPTQ column block size (O3), >= 1.
    kl_method: Eq. 8's KL reading: "tensorrt" (default: each bit width at its own KL-optimal clip, as
        TensorRT's entropy calibration) or "fixed" (KL at the scale the layer really uses); see
        passes/bits.py.
    error_budget: auto, speed first: each layer's output error (relative MSE on held-out calibration
        rows) may reach this multiple of what naive per-tensor FP8 gives that layer; each layer takes
        the fastest format within it (none within: the most accurate).  1.0: no layer worse than
        naive FP8, by that measure.  > 0.  Used when set and memory_budget is not.
    memory_budget: auto, accuracy first: the weights may take this fraction of their fp16 bytes, and
        the plan with the least summed error within it wins.  In (0, 1].  Wins over error_budget when
        both are set.  Neither set: memory_budget DEFAULT_MEMORY_BUDGET (0.55).
    target: auto's cost model: "hopper" (FP8 = INT8 rate, no INT4 tensor cores), "ampere" (INT8 2x,
        INT4 4x, no FP8) or "cpu"; see planning/formats.py.
    formats: auto's candidate formats (subset of int8, int4, fp8, w4a8); None: all the target runs.
    calib_samples: activation rows kept per linear input for the Eq. 8 KL estimate and auto's errors.
    kl_bins: histogram bins for the Eq. 8 KL estimate.
    seed: seeds the row sampling during calibration.
    attention: attention's two batched products (fq::attention, passes/attention.py): "fp" leaves them
        in floating point; "int8" / "fp8" quantizes Q and K (static scales) for Q.K^T on the INT8 / FP8
        e4m3 tensor cores, and P and V for P.V in the same format unless attention_pv says otherwise.
        Works at every level, fp16 included (attention alone).
    attention_pv: "int8" or "fp8" for P and V; None follows `attention`.
    attention_scales: "tensor" (one static scale per tensor, as the paper) or "head" (one per head).
    activation_scale: the INT8/INT4 activations' scale: "tensor" (one static scale per tensor from the
        calibrated threshold T, as the paper) or "token" (the same static channel map, each row its own
        scale at run time: r = max_j |x_j| / (s_j (E_j + 1)), so values beyond the calibrated range never
        saturate; applied in the GEMM epilogue beside the weight scale; kernels/flatten_quantize.py).
        None keeps the level's: "token" for O1-O3 and auto, "tensor" for the w8a8 and smoothquant
        baselines.  FP8-format layers keep their per-tensor scale either way.  Chosen on held-out
        validation windows (benchmarks/results/accuracy-smollm2-135m-token-select-cpu.md: O1 +0.09%
        perplexity with token scales, +0.26% with them in down_proj only, +1.47% per tensor; naive FP8
        +2.58%).
    token_layers: with activation_scale "token", only the layers whose names contain one of these
        substrings take per-token scales (e.g. ("down_proj",)); empty: every INT8/INT4 layer.
    align_budget: block alignment (planning/align.py): decoder blocks are padded with zero columns (values
        unchanged) to a few common sets of flattened widths K', so that regional compilation compiles one
        body per set instead of one per block (a calibrated plan's K' differs in every block); the fewest
        sets whose padding adds at most this fraction of the blocks' multiply-adds.  0: no padding (each
        group padded to pad_multiple only); explain() says what it did.
    bits_patterns: O2/O3: at most this many distinct per-block INT4/INT8 patterns (planning/bit_patterns.py).
        Eq. 8 chooses bits per layer, so blocks differ in which layers are INT4, and regional compilation
        compiles one body per distinct pattern; after Eq. 8, INT4 layers are promoted to INT8 (never the
        reverse: no layer loses precision; an activation group is promoted whole) until at most this many
        patterns remain, keeping the most INT4 weight size; before any weight is quantized (GPTQ included), so
        promoted layers get real INT8 weights.  The all-INT8 pattern counts when used.  0: off (Eq. 8's
        bits as they are); explain() says what it did.  Default BITS_PATTERNS = 4, an estimate, not a
        measurement at 13B: issue 23 wants OPT-13B's first O3 generate() within 90 s; on the H100 it took
        106 s, Inductor 82.7 s for the synthetic plan's 8 bodies, where O1's one body took 30.0 s of Inductor
        (another run: benchmarks/results/e2e-decode-13b-2026-12-07-h100*.md), ~7.5 s per extra body, so
        dropping to <= 5 bodies should meet it and 4 leaves a margin.  4 keeps most of the INT4 weights: on
        SmolLM2-135M's O3 plan (12 patterns over 30 blocks) 9.6% of the linear weights stay INT4 of Eq. 8's
        13.1% (k=3: 8.5%, k=2: 5.7%), on the old synthetic OPT-13B plan 40.4% of 45%
        (benchmarks/results/bits-align-smollm2-135m-cpu-2026-12-07.md).
    """

    level: str = "O1"
    alpha: float = 0.5
    beta: float | None = None
    gamma: float = 1.86
    pad_multiple: int = 32
    outlier_clip: bool = True
    smoothing: str | None = None
    flatten_weights: bool = False
    weight_beta: float = 1.3
    weight_scale: str = "channel"
    weight_clip: str | None = None
    fold: bool = True
    skip: tuple[str, ...] = ("lm_head",)
    gptq_damp: float = 0.01
    gptq_block: int = 128
    kl_method: str = "tensorrt"
    error_budget: float | None = None
    memory_budget: float | None = None
    target: str = "hopper"
    formats: tuple[str, ...] | None = None
    calib_samples: int = 512
    kl_bins: int = 2048
    seed: int = 0
    attention: str = "fp"
    attention_pv: str | None = None
    attention_scales: str = "tensor"
    activation_scale: str | None = None
    token_layers: tuple[str, ...] = ()
    align_budget: float = ALIGN_BUDGET
    bits_patterns: int = BITS_PATTERNS
    _derived: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        if self.level not in LEVELS:
            raise ConfigError(f"Config.level={self.level!r} is unknown; choose one of {', '.join(LEVELS)}")
        _check_range("alpha", self.alpha, 0.0, 1.0)
        if self.beta is not None:
            _check_positive("beta", self.beta)
        _check_positive("gamma", self.gamma)
        _check_positive("weight_beta", self.weight_beta)
        if not isinstance(self.pad_multiple, int) or self.pad_multiple < 2 or self.pad_multiple % 2:
            raise ConfigError(f"Config.pad_multiple={self.pad_multiple!r} must be an even integer >= 2 "
                              "(INT4 packs two per byte)")
        if self.smoothing not in (None, "none", "smoothquant", "sigmoid"):
            raise ConfigError(f"Config.smoothing={self.smoothing!r} must be None, 'none', 'smoothquant' or 'sigmoid'")
        if self.weight_scale not in ("tensor", "channel"):
            raise ConfigError(f"Config.weight_scale={self.weight_scale!r} must be 'tensor' or 'channel'")
        if self.weight_clip not in (None, "max", "mse"):
            raise ConfigError(f"Config.weight_clip={self.weight_clip!r} must be None, 'max' or 'mse'")
        if self.kl_method not in ("fixed", "tensorrt"):
            raise ConfigError(f"Config.kl_method={self.kl_method!r} must be 'fixed' or 'tensorrt'")
        _check_range("gptq_damp", self.gptq_damp, 1e-8, 1.0)
        if not isinstance(self.gptq_block, int) or self.gptq_block < 1:
            raise ConfigError(f"Config.gptq_block={self.gptq_block!r} must be an integer >= 1")
        if not isinstance(self.calib_samples, int) or self.calib_samples < 16:
            raise ConfigError(f"Config.calib_samples={self.calib_samples!r} must be an integer >= 16")
        if not isinstance(self.kl_bins, int) or self.kl_bins < 64:
            raise ConfigError(f"Config.kl_bins={self.kl_bins!r} must be an integer >= 64")
        if self.error_budget is not None:
            _check_positive("error_budget", self.error_budget)
        if self.memory_budget is not None:
            _check_range("memory_budget", self.memory_budget, 1e-6, 1.0)
        if self.target not in TARGETS:
            raise ConfigError(f"Config.target={self.target!r} must be one of {', '.join(TARGETS)}")
        if self.formats is not None:
            if isinstance(self.formats, str) or not self.formats or any(f not in LAYER_FORMATS for f in self.formats):
                raise ConfigError(f"Config.formats={self.formats!r} must be None or a non-empty tuple of "
                                  f"{', '.join(LAYER_FORMATS)}")
            object.__setattr__(self, "formats", tuple(self.formats))
        if isinstance(self.skip, str) or not all(isinstance(s, str) for s in self.skip):
            raise ConfigError(f"Config.skip={self.skip!r} must be a tuple of name substrings")
        object.__setattr__(self, "skip", tuple(self.skip))
        if self.attention not in ("fp", "int8", "fp8"):
            raise ConfigError(f"Config.attention={self.attention!r} must be 'fp', 'int8' or 'fp8'")
        if self.attention_pv not in (None, "int8", "fp8"):
            raise ConfigError(f"Config.attention_pv={self.attention_pv!r} must be None, 'int8' or 'fp8'")
        if self.attention_pv is not None and self.attention == "fp":
            raise ConfigError(f"Config.attention_pv={self.attention_pv!r} needs Config.attention='int8' or 'fp8'")
        if self.attention_scales not in ("tensor", "head"):
            raise ConfigError(f"Config.attention_scales={self.attention_scales!r} must be 'tensor' or 'head'")
        if self.activation_scale not in (None, "tensor", "token"):
            raise ConfigError(f"Config.activation_scale={self.activation_scale!r} must be None, 'tensor' or 'token'")
        if isinstance(self.token_layers, str) or not all(isinstance(s, str) for s in self.token_layers):
            raise ConfigError(f"Config.token_layers={self.token_layers!r} must be a tuple of name substrings")
        object.__setattr__(self, "token_layers", tuple(self.token_layers))
        _check_range("align_budget", self.align_budget, 0.0, 100.0)
        if isinstance(self.bits_patterns, bool) or not isinstance(self.bits_patterns, int) or self.bits_patterns < 0:
            raise ConfigError(f"Config.bits_patterns={self.bits_patterns!r} must be an integer >= 0 (0: off)")
        spec = dict(LEVELS[self.level])
        if self.smoothing is not None:
            spec["smoothing"] = self.smoothing
        if self.weight_clip is not None:
            spec["weight_clip"] = self.weight_clip
        elif self.weight_scale == "channel":    # auto may choose INT4 layers (int4, w4a8)
            spec["weight_clip"] = "mse" if spec["mixed_bits"] or spec["format"] == "auto" else "max"
        else:
            spec["weight_clip"] = "mse" if spec["flatten"] else "max"
        spec["weight_granularity"] = "tensor" if self.level == "fp8" else self.weight_scale
        spec["activation_scale"] = self.activation_scale or ("token" if spec["flatten"] else "tensor")
        spec["beta"] = self.beta if self.beta is not None else LEVEL_BETA.get(self.level, PAPER_BETA)
        self._derived.update(spec)

    # what the level implies, with overrides applied
    @property
    def quantize(self) -> bool:
        return self._derived["quantize"]

    @property
    def threshold_beta(self) -> float:
        """Eq. 7's beta actually used: beta, or the level's (see beta)."""
        return self._derived["beta"]

    @property
    def smoothing_method(self) -> str:
        return self._derived["smoothing"]

    @property
    def weight_clip_method(self) -> str:
        return self._derived["weight_clip"]

    @property
    def flatten(self) -> bool:
        return self._derived["flatten"]

    @property
    def weight_granularity(self) -> str:
        """The weight scales actually used: weight_scale, except per tensor for the naive fp8 level."""
        return self._derived["weight_granularity"]

    @property
    def format(self) -> str:
        """"int8" (O1-O3 and the baselines: INT8, INT4 where Eq. 8 says), "fp8", or "auto"."""
        return self._derived["format"]

    @property
    def activation_granularity(self) -> str:
        """The INT8/INT4 activations' scale actually used: "tensor" or "token" (activation_scale, or the
        level's)."""
        return self._derived["activation_scale"]

    @property
    def auto_budget(self) -> tuple[str, float]:
        """auto's budget actually used: ("memory", fraction of fp16 bytes) or ("error", multiple of
        naive FP8's error per layer); see memory_budget / error_budget."""
        if self.memory_budget is not None:
            return "memory", self.memory_budget
        if self.error_budget is not None:
            return "error", self.error_budget
        return "memory", DEFAULT_MEMORY_BUDGET

    def token_scaled(self, layer: str) -> bool:
        """Whether the group that `layer` reads takes per-token scales (activation_scale, token_layers)."""
        if self.activation_granularity != "token":
            return False
        return not self.token_layers or any(t in layer for t in self.token_layers)

    @property
    def mixed_bits(self) -> bool:
        return self._derived["mixed_bits"]

    @property
    def gptq(self) -> bool:
        return self._derived["gptq"]

    @property
    def attention_formats(self) -> tuple[str, str] | None:
        """(Q.K^T format, P.V format), or None when attention stays in floating point."""
        if self.attention == "fp":
            return None
        return self.attention, self.attention_pv or self.attention

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.name.startswith("_")}

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        known = {f.name for f in dataclasses.fields(cls) if not f.name.startswith("_")}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown Config knob(s): {', '.join(sorted(unknown))}")
        d = dict(d)
        if "skip" in d:
            d["skip"] = tuple(d["skip"])
        if d.get("formats") is not None:
            d["formats"] = tuple(d["formats"])
        if "token_layers" in d:
            d["token_layers"] = tuple(d["token_layers"])
        return cls(**d)


def _check_range(name, v, lo, hi):
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not (lo <= v <= hi) or math.isnan(v):
        raise ConfigError(f"Config.{name}={v!r} is out of range; it must lie in [{lo}, {hi}]")


def _check_positive(name, v):
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not (v > 0) or math.isinf(v):
        raise ConfigError(f"Config.{name}={v!r} is out of range; it must be a finite number > 0")
