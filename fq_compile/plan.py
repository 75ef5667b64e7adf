"""QuantPlan: everything the compiler decided, as plain data that can be saved and reloaded.

A plan holds, per activation group (the linears that read one tensor, e.g. q/k/v) the smoothing
scales, where they are folded, the threshold T and the flatten counts; per layer the bits, the
quantized (flattened) weights, scales and bias, and fingerprints of the floating-point weight and
bias it was made from; per attention site (when Config.attention quantizes it) the static Q/K/V
scales and the formats of its two products.  On disk it is one safetensors file: the tensors, plus
JSON metadata in the header (format name and version, the config, a hash of the model's parameter
names and shapes, a sha256 of the tensor bytes, and a sha256 over all of these, so that no byte of
the file can change unnoticed).  No pickle anywhere, so loading a plan cannot run code.  A
truncated, corrupted or foreign file is refused with a `PlanFormatError`; so is a file whose
checksum holds but whose fields are out of range or inconsistent (`QuantPlan.validate`, which
names the field).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field

import torch

from fq_compile.config import Config
from fq_compile.kernels.attention import KV_BLOCKS

FORMAT_NAME = "fq_compile.plan"
FORMAT_VERSION = 6   # 2: the channel map is stored, not recomputed (its layout may change); weight scales
#                         per output channel (a float32 [N] tensor)
#                      3: exact weight fingerprints (a string), bias fingerprints, a checksum over the whole file
#                      4: per-layer format (int8, int4, fp8, w4a8) with its measured error and why
#                      5: layers over weights stored [K, N] (transposed: GPT-2's Conv1D), every parameter's shape
#                      6: per-token activation scales per group (GroupPlan.activation_scale); a version-5 file
#                         is read as it was written: every group per tensor
READABLE_VERSIONS = ("5", str(FORMAT_VERSION))
# what plans of an older version lack (why they are refused)
_OLDER = {"1": "weight fingerprints that cannot tell weights apart reliably, no per-layer formats, "
               "no transposed layers (GPT-2's Conv1D)",
          "2": "weight fingerprints that cannot tell weights apart reliably, no per-layer formats, "
               "no transposed layers (GPT-2's Conv1D)",
          "3": "no per-layer formats (FP8, W4A8), no record of which layers read their weight transposed "
               "(GPT-2's Conv1D)",
          "4": "no record of which layers read their weight transposed (GPT-2's Conv1D) nor of the "
               "model's parameter shapes"}

# Per-layer formats: the weight operand and the activation each one reads.
#   int8  flattened INT8 activation x INT8 weight [N, K']          (fq.int8_linear; O1-O3, the baselines)
#   int4  flattened INT4 activation x packed INT4 weight [N, K'/2] (fq.int4_linear; Eq. 8 at O2/O3)
#   fp8   per-tensor e4m3 activation (not flattened) x e4m3 weight [N, K]       (fq.fp8_linear)
#   w4a8  per-tensor e4m3 activation (not flattened) x packed INT4 weight [N, K/2] (fq.w4a8_linear)
FORMAT_BITS = {"int8": 8, "int4": 4, "fp8": 8, "w4a8": 4}
FLATTENED_FORMATS = ("int8", "int4")


class PlanFormatError(ValueError):
    """The file is not a readable fq_compile plan."""


class PlanMismatchError(ValueError):
    """The plan does not belong to the model or graph it is applied to."""


class ArtefactFormatError(PlanFormatError):
    """The directory is not a complete, unchanged quantized artefact (fq_compile.save_quantized) of
    a format version this fq_compile reads (fq_compile/deploy.py)."""


def parameter_shapes(model: torch.nn.Module) -> dict[str, list[int]]:
    """Every parameter's shape by name (tied weights once, under their first name); a DTensor
    parameter (tensor parallelism) by this rank's local shard, the shape its rank-local plan reads."""
    return {name: list(p.to_local().shape if hasattr(p, "to_local") else p.shape)
            for name, p in model.named_parameters()}


def model_hash(model: torch.nn.Module) -> str:
    """sha256 over the sorted (parameter name, shape) pairs: identifies an architecture + size."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        h.update(f"{name}:{tuple(p.shape)};".encode())
    return h.hexdigest()


# weight_fingerprint: the element bit patterns, viewed as signed integers of their own width, are
# summed with pseudo-random odd weights a[row] * b[col] over rows of _FP_COLS elements, in int64
# arithmetic that wraps modulo 2**64 (so the sum is the same in any order and on any device).
_FP_COLS = 4096
_FP_ROWS_PER_CHUNK = 1024
_FP_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_M1, _M2, _GOLDEN = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB, 0x9E3779B97F4A7C15


def _signed64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _odd_mix(i: torch.Tensor) -> torch.Tensor:
    """splitmix64 of int64 positions (wrapping int64 arithmetic), forced odd."""
    z = i * _signed64(_GOLDEN)
    z = (z ^ ((z >> 30) & ((1 << 34) - 1))) * _signed64(_M1)
    z = (z ^ ((z >> 27) & ((1 << 37) - 1))) * _signed64(_M2)
    z = z ^ ((z >> 31) & ((1 << 33) - 1))
    return z | 1


def weight_fingerprint(w: torch.Tensor) -> str:
    """Exact identity of a tensor's values, e.g. 'float32[576,576]:3f0c...': dtype, shape, and a
    64-bit checksum of its bytes (read as int64 words, or as integers of the element width when
    they do not fill whole words), each word multiplied by an odd pseudo-random factor of its
    position.  Changing any one element changes it (negating entries included); two different
    tensors share it with probability ~2**-64; it does not depend on the device.  A change of
    dtype changes it too: a plan belongs to the weights it was calibrated on, as stored.
    Computed on the tensor's device in chunks (no full-size temporary).  A DTensor (tensor
    parallelism) gives the whole tensor's fingerprint: its shards are gathered first, a collective
    that every rank of its mesh must call (runtime/tensor_parallel.py: shard_fingerprint is the
    rank-local one)."""
    if hasattr(w, "full_tensor") and hasattr(w, "device_mesh"):
        w = w.full_tensor()
    t = w.detach()
    if t.is_complex() or t.element_size() not in _FP_INT:
        raise TypeError(f"weight_fingerprint: unsupported dtype {t.dtype}")
    flat = t.contiguous().reshape(-1)
    flat = flat.view(_FP_INT[t.element_size()])
    if flat.numel() * t.element_size() % 8 == 0 and t.element_size() < 8:
        try:                        # whole 8-byte words: no conversion pass, fewer products
            flat = flat.view(torch.int64)
        except RuntimeError:        # a storage offset that is not 8-byte aligned
            pass
    n = flat.numel()
    acc = torch.zeros((), dtype=torch.int64, device=t.device)
    if n:
        b = _odd_mix(torch.arange(_FP_COLS, dtype=torch.int64, device=t.device))
        full = n // _FP_COLS
        rows = flat[: full * _FP_COLS].view(full, _FP_COLS)
        for r0 in range(0, full, _FP_ROWS_PER_CHUNK):
            x = rows[r0: r0 + _FP_ROWS_PER_CHUNK].to(torch.int64)
            a = _odd_mix(torch.arange(r0, r0 + x.shape[0], dtype=torch.int64, device=t.device) + (1 << 40))
            acc = acc + ((x * b).sum(1) * a).sum()
        tail = n - full * _FP_COLS
        if tail:
            x = flat[full * _FP_COLS:].to(torch.int64)
            a = _odd_mix(torch.tensor(full, dtype=torch.int64, device=t.device) + (1 << 40))
            acc = acc + (x * b[:tail]).sum() * a
    dtype = str(t.dtype).removeprefix("torch.")
    return f"{dtype}[{','.join(str(d) for d in t.shape)}]:{int(acc) & ((1 << 64) - 1):016x}"


def fingerprint_difference(expected: str, got: str) -> str:
    """What differs between two fingerprints, in words (for error messages)."""
    e, g = expected.partition(":")[0], got.partition(":")[0]
    if e.split("[")[0] != g.split("[")[0]:
        return f"dtype {g.split('[')[0]} instead of {e.split('[')[0]}"
    if e != g:
        return f"shape {g[len(g.split('[')[0]):]} instead of {e[len(e.split('[')[0]):]}"
    return "other values"


@dataclass
class ChannelMap:
    """Position p of the flattened tensor reads channel src[p], slice [lo[p], lo[p] + hi[p]) of |x|/T,
    and its weight column is weight_factor[p] * W[:, src[p]] (0 for padding)."""

    src: torch.Tensor            # int32 [K']
    lo: torch.Tensor             # float32 [K'], units of T
    hi: torch.Tensor             # float32 [K'], units of T (inf: unbounded remainder)
    weight_factor: torch.Tensor  # float32 [K']: 1 for activation pieces, 1/(D+1) for weight splits, 0 for padding
    active: torch.Tensor         # bool [K']: False on padding

    @property
    def size(self) -> int:
        return int(self.src.numel())

    def padded_to(self, size: int) -> "ChannelMap":
        """This map with zero positions appended up to `size` (src 0, lo = hi = 0, weight factor 0,
        inactive): they add nothing to the product."""
        pad = size - self.size
        if pad < 0:
            raise ValueError(f"cannot pad a channel map of {self.size} positions to {size}")
        if pad == 0:
            return self

        def padded(t, fill):
            return torch.cat([t, torch.full((pad,), fill, dtype=t.dtype, device=t.device)])

        return ChannelMap(padded(self.src, 0), padded(self.lo, 0.0), padded(self.hi, 0.0),
                          padded(self.weight_factor, 0.0), padded(self.active, False))


@dataclass
class GroupPlan:
    """One activation tensor and the linear layers that read it (they share smoothing and T)."""

    name: str
    layers: list[str]
    in_features: int
    threshold: float              # T, in smoothed units
    smooth: torch.Tensor          # float32 [C]; X diag(s)^-1
    fold: str                     # "op", "norm:<weight fqn>[,<bias fqn>]" or "rows:<producer layer>"
    extra: torch.Tensor           # int64 [C]  E_j (Eq. 2)
    weight_dup: torch.Tensor      # int64 [C]  D_j (weight-column splits)
    act_max: torch.Tensor         # float32 [C] observed max |X_j| before smoothing
    pad_multiple: int
    cmap: ChannelMap              # the K' layout the op and the weights share (planning/flatten.py)
    fold_note: str = ""           # why smoothing stays in the op, when it does
    # norm folds: weight_fingerprint of each norm parameter named in `fold` (the rewrite divides
    # their live values by s, and s was chosen for these values)
    fold_fingerprints: dict[str, str] = field(default_factory=dict)
    # the INT8/INT4 activation's scale: "tensor" (static, T / qmax) or "token" (one per row at run time,
    # kernels/flatten_quantize.py `flatten_quantize_rows`); e4m3 layers of the group stay per tensor
    activation_scale: str = "tensor"

    @property
    def flat_features(self) -> int:
        return self.cmap.size

    @property
    def flatten_ratio(self) -> float:
        """Extra channels over original channels (paper Table 4), padding excluded."""
        return float(self.extra.sum() + self.weight_dup.sum()) / self.in_features


@dataclass
class LayerPlan:
    """One quantized linear layer."""

    name: str                     # module path, e.g. model.layers.0.self_attn.q_proj
    group: str
    in_features: int
    out_features: int
    bits: int
    weight_q: torch.Tensor        # int8 [N, K'] or packed uint8 [N, K'/2]
    weight_scale: torch.Tensor    # float32 [N]: per output channel (all equal for a per-tensor scale)
    act_scale: float              # T / qmax(bits); per-token groups: 1 / qmax (the row's r carries the rest)
    bias: torch.Tensor | None     # float32 [N] (rows already divided by a folded smoothing scale)
    fingerprint: str              # weight_fingerprint of the floating-point weight the plan was made from
    kl_ratio: float | None = None
    rows_folded_from: str | None = None   # group whose smoothing is folded into this layer's rows
    bias_fingerprint: str | None = None   # weight_fingerprint of the floating-point bias (None: no bias)
    transposed: bool = False      # the model stores the weight [K, N] (GPT-2's Conv1D); weight_q is [N, K'] anyway
    format: str | None = None     # see FORMAT_BITS; None: "int4" or "int8" from bits
    error: float | None = None    # the chosen format's output error on calibration rows (relative MSE)
    errors: dict | None = None    # format -> output error of every candidate measured (level auto)
    why: str = ""                 # why this format (level auto)

    def __post_init__(self):
        if self.format is None:      # checked with every other field by QuantPlan.validate
            self.format = "int4" if self.bits == 4 else "int8"

    @property
    def model_weight_shape(self) -> tuple[int, int]:
        """The shape of the model's parameter this layer quantizes, as the model stores it."""
        return (self.in_features, self.out_features) if self.transposed else (self.out_features, self.in_features)

    @property
    def flattened(self) -> bool:
        """True when the layer reads the group's flattened activation (K' columns), False for FP8 ones (K)."""
        return self.format in FLATTENED_FORMATS

    def weight_shape(self, group: "GroupPlan") -> tuple[int, int]:
        """The stored weight's shape: [N, K' or K], halved along K for packed INT4."""
        k = group.flat_features if self.flattened else self.in_features
        return (self.out_features, k // 2 if self.bits == 4 else k)

    @property
    def scale(self) -> torch.Tensor:
        """The GEMM epilogue's float32 [N] vector: activation scale x each channel's weight scale
        (the product taken in float64, rounded once)."""
        return (self.weight_scale.double() * self.act_scale).float()

    @property
    def weight_bytes(self) -> int:
        return self.weight_q.numel() * self.weight_q.element_size()


@dataclass
class AttentionPlan:
    """One attention site (fq::attention, passes/attention.py): static scales of its quantized Q, K, V.

    The observed maxima are kept per head and channel, so the scales can be re-planned for another
    format or granularity without calibrating again (planning/attention.py)."""

    name: str                     # the attention module, e.g. model.layers.0.self_attn
    num_heads: int
    num_kv_heads: int
    head_dim: int
    v_head_dim: int
    qk_format: str                # "int8" | "fp8": Q and K
    pv_format: str                # "int8" | "fp8": P and V
    q_scale: torch.Tensor         # float32 [Hq]
    k_scale: torch.Tensor         # float32 [Hkv]
    v_scale: torch.Tensor         # float32 [Hkv]
    q_absmax: torch.Tensor        # float32 [Hq, D]   observed max |Q|
    k_absmax: torch.Tensor        # float32 [Hkv, D]
    v_absmax: torch.Tensor        # float32 [Hkv, Dv] as the quantized model produces V (row folds applied)
    kv_block: int                 # the online softmax's key block: part of the op's semantics
    layer_idx: int | None = None  # the model's KV-cache index of this layer (runtime/kv_cache.py)

    TENSORS = ("q_scale", "k_scale", "v_scale", "q_absmax", "k_absmax", "v_absmax")


@dataclass(eq=False)     # compared by identity: Dynamo compares the options of two compiles (and so their
class QuantPlan:        # plans) on a recompile, and field-wise equality would compare tensors (an error)
    config: Config
    model_type: str
    model_hash: str
    groups: dict[str, GroupPlan] = field(default_factory=dict)
    layers: dict[str, LayerPlan] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)   # layer -> why it stays in floating point
    calibration: dict = field(default_factory=dict)          # batches, tokens, ...
    parameters: dict[str, list[int]] = field(default_factory=dict)   # every model parameter's shape (explain's bytes)
    attention: dict[str, AttentionPlan] = field(default_factory=dict)
    attention_skipped: dict[str, str] = field(default_factory=dict)   # site -> why it stays in floating point

    # -- lookup -----------------------------------------------------------------------------------
    def group_of(self, layer: str) -> GroupPlan:
        return self.groups[self.layers[layer].group]

    def check_model(self, model: torch.nn.Module) -> None:
        """Raise PlanMismatchError naming the first layer that does not match `model`: missing,
        another shape, or other weight / bias values than the plan was calibrated on."""
        params = dict(model.named_parameters())
        for name, lp in self.layers.items():
            w = params.get(name + ".weight", params.get(name))
            if w is None:
                raise PlanMismatchError(f"plan layer {name!r} does not exist in this {type(model).__name__}: "
                                        f"the plan was made for another model ({self.model_type})")
            if tuple(w.shape) != lp.model_weight_shape:
                raise PlanMismatchError(f"layer {name!r}: the plan expects weight shape "
                                        f"{lp.model_weight_shape}, the model has {tuple(w.shape)}")
            for what, t, expected in (("weight", w, lp.fingerprint), ("bias", params.get(name + ".bias"),
                                                                       lp.bias_fingerprint)):
                if what == "bias" and (t is None) != (expected is None):
                    raise PlanMismatchError(f"layer {name!r}: the plan was made {'with' if expected else 'without'} "
                                            f"a bias, the model's layer has {'one' if t is not None else 'none'}")
                if t is None or (t.numel() and t.untyped_storage().nbytes() == 0):   # released: cannot be read
                    continue
                got = weight_fingerprint(t)
                if got != expected:
                    raise PlanMismatchError(stale_message(f"{name}.{what}", expected, got))

    # -- validation --------------------------------------------------------------------------------
    def validate(self) -> None:
        """Check every field: types, ranges (bits in {4, 8}, scales finite and > 0, channel-map
        indices in range, ...) and consistency (shapes, groups <-> layers, folds <-> producers).
        Raises PlanFormatError naming the field; load() and save() call it."""
        _Validator(self).run()

    # -- persistence -------------------------------------------------------------------------------
    def _tensors_and_meta(self):
        tensors, groups, layers = {}, {}, {}
        for gname, g in self.groups.items():
            gi = len(groups)
            for key in ("smooth", "extra", "weight_dup", "act_max"):
                tensors[f"g{gi}.{key}"] = getattr(g, key).contiguous()
            for key in ("src", "lo", "hi", "weight_factor", "active"):
                tensors[f"g{gi}.cmap.{key}"] = getattr(g.cmap, key).contiguous()
            groups[gname] = dict(index=gi, layers=g.layers, in_features=g.in_features, threshold=g.threshold,
                                 fold=g.fold, fold_note=g.fold_note, pad_multiple=g.pad_multiple,
                                 fold_fingerprints=g.fold_fingerprints, activation_scale=g.activation_scale)
        for lname, lp in self.layers.items():
            li = len(layers)
            # a row view of weights fused with its siblings' (passes/siblings.py) is written as a tensor of its own
            wq = lp.weight_q
            tensors[f"l{li}.weight_q"] = wq.clone() if wq._base is not None else wq.contiguous()
            tensors[f"l{li}.weight_scale"] = lp.weight_scale.contiguous()
            if lp.bias is not None:
                tensors[f"l{li}.bias"] = lp.bias.contiguous()
            layers[lname] = dict(index=li, group=lp.group, in_features=lp.in_features, out_features=lp.out_features,
                                 bits=lp.bits, act_scale=lp.act_scale,
                                 has_bias=lp.bias is not None, fingerprint=lp.fingerprint,
                                 bias_fingerprint=lp.bias_fingerprint, kl_ratio=lp.kl_ratio,
                                 rows_folded_from=lp.rows_folded_from, transposed=lp.transposed, format=lp.format,
                                 error=lp.error, errors=lp.errors, why=lp.why)
        attention = {}
        for aname, ap in self.attention.items():
            ai = len(attention)
            for key in AttentionPlan.TENSORS:
                tensors[f"a{ai}.{key}"] = getattr(ap, key).contiguous()
            attention[aname] = dict(index=ai, num_heads=ap.num_heads, num_kv_heads=ap.num_kv_heads,
                                    head_dim=ap.head_dim, v_head_dim=ap.v_head_dim, qk_format=ap.qk_format,
                                    pv_format=ap.pv_format, kv_block=ap.kv_block, layer_idx=ap.layer_idx)
        meta = dict(config=self.config.to_dict(), model_type=self.model_type, model_hash=self.model_hash,
                    groups=groups, layers=layers, skipped=self.skipped, calibration=self.calibration,
                    parameters=self.parameters)
        if attention or self.attention_skipped:     # absent keys read as none (plans written before)
            meta.update(attention=attention, attention_skipped=self.attention_skipped)
        return {k: v.detach().cpu() for k, v in tensors.items()}, meta

    def save(self, path: str | os.PathLike) -> None:
        """Write the plan to `path` (atomically: a temporary file, then a rename)."""
        from safetensors.torch import save_file

        self.validate()
        tensors, meta = self._tensors_and_meta()
        header = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION), "plan": json.dumps(meta),
                  "tensor_sha256": _tensor_digest(tensors)}
        header["checksum"] = _header_checksum(header)
        tmp = f"{os.fspath(path)}.tmp"
        save_file(tensors, tmp, metadata=header)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "QuantPlan":
        """Read and check a plan file (format, version, checksum over the whole file, every field)."""
        from safetensors import safe_open

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no plan file at {path}")
        try:
            with safe_open(path, framework="pt") as f:
                header = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:      # safetensors raises several types for a damaged header
            raise PlanFormatError(f"{path} is not a readable fq_compile plan (truncated or corrupt?): "
                                  f"{type(e).__name__}: {e}") from None
        if header.get("format") != FORMAT_NAME:
            raise PlanFormatError(f"{path} is a safetensors file but not an fq_compile plan "
                                  f"(format={header.get('format')!r})")
        version = header.get("format_version")
        if version not in READABLE_VERSIONS:
            if version in _OLDER:
                raise PlanFormatError(
                    f"{path} has plan format version {version}; this fq_compile reads version {FORMAT_VERSION} "
                    f"(older plans hold {_OLDER[version]}): recalibrate with fq_compile.calibrate (or fq-compile "
                    "quantize) and save the plan again, or use the fq_compile that wrote it")
            raise PlanFormatError(f"{path} has plan format version {version}; this fq_compile reads version "
                                  f"{FORMAT_VERSION}: use the fq_compile that wrote it, or recalibrate")
        if header.get("checksum") != _header_checksum(header):
            raise PlanFormatError(f"{path}: the metadata does not match its checksum (the file is corrupt)")
        if header.get("tensor_sha256") != _tensor_digest(tensors):
            raise PlanFormatError(f"{path}: tensor data does not match its checksum (the file is corrupt)")
        try:
            meta = json.loads(header["plan"])
            plan = cls._from_meta(meta, tensors)
        except PlanFormatError as e:
            raise PlanFormatError(f"{path}: {e}") from None
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise PlanFormatError(f"{path}: plan metadata is malformed ({type(e).__name__}: {e})") from None
        try:
            plan.validate()
        except PlanFormatError as e:
            raise PlanFormatError(f"{path}: {e}") from None
        return plan

    @classmethod
    def _from_meta(cls, meta: dict, tensors: dict) -> "QuantPlan":
        def tensor(key, where):
            if key not in tensors:
                raise PlanFormatError(f"{where}: tensor {key!r} is missing from the file")
            return tensors[key]

        cfg = dict(meta["config"])
        cfg.setdefault("activation_scale", "tensor")     # written before per-token scales existed (version 5)
        try:
            config = Config.from_dict(cfg)
        except ValueError as e:          # ConfigError
            raise PlanFormatError(f"config: {e}") from None
        plan = cls(config=config, model_type=meta["model_type"], model_hash=meta["model_hash"],
                   skipped=dict(meta["skipped"]), calibration=dict(meta.get("calibration", {})),
                   parameters=meta["parameters"])
        for gname, g in meta["groups"].items():
            gi, where = g["index"], f"groups[{gname!r}]"
            plan.groups[gname] = GroupPlan(
                name=gname, layers=list(g["layers"]), in_features=g["in_features"], threshold=g["threshold"],
                smooth=tensor(f"g{gi}.smooth", where), fold=g["fold"], extra=tensor(f"g{gi}.extra", where),
                weight_dup=tensor(f"g{gi}.weight_dup", where), act_max=tensor(f"g{gi}.act_max", where),
                pad_multiple=g["pad_multiple"], fold_note=g["fold_note"], fold_fingerprints=g["fold_fingerprints"],
                activation_scale=g.get("activation_scale", "tensor"),
                cmap=ChannelMap(*(tensor(f"g{gi}.cmap.{k}", where) for k in ("src", "lo", "hi", "weight_factor",
                                                                            "active"))))
        for lname, l in meta["layers"].items():
            li, where = l["index"], f"layers[{lname!r}]"
            plan.layers[lname] = LayerPlan(
                name=lname, group=l["group"], in_features=l["in_features"], out_features=l["out_features"],
                bits=l["bits"], weight_q=tensor(f"l{li}.weight_q", where),
                weight_scale=tensor(f"l{li}.weight_scale", where),
                act_scale=l["act_scale"], bias=tensor(f"l{li}.bias", where) if l["has_bias"] else None,
                fingerprint=l["fingerprint"], kl_ratio=l["kl_ratio"], rows_folded_from=l["rows_folded_from"],
                bias_fingerprint=l["bias_fingerprint"], transposed=l["transposed"], format=l["format"],
                error=l["error"], errors=l["errors"], why=l["why"])
        plan.attention_skipped = dict(meta.get("attention_skipped", {}))
        for aname, a in meta.get("attention", {}).items():
            ai, where = a["index"], f"attention[{aname!r}]"
            plan.attention[aname] = AttentionPlan(
                name=aname, num_heads=a["num_heads"], num_kv_heads=a["num_kv_heads"], head_dim=a["head_dim"],
                v_head_dim=a["v_head_dim"], qk_format=a["qk_format"], pv_format=a["pv_format"],
                kv_block=a["kv_block"], layer_idx=a["layer_idx"],
                **{key: tensor(f"a{ai}.{key}", where) for key in AttentionPlan.TENSORS})
        return plan


def stale_message(param: str, expected: str, got: str) -> str:
    """The error for a parameter whose values are not those the plan was made from."""
    return (f"{param}: the weights differ from those the plan was calibrated on "
            f"({fingerprint_difference(expected, got)}; fingerprint {got}, the plan's {expected}). "
            "The plan holds quantized copies of the values it was "
            "calibrated on and cannot follow a change of the floating-point weights: recalibrate "
            "(plan = fq_compile.calibrate(model, batches, config)) and compile again with the new plan")


def _header_checksum(header: dict) -> str:
    """sha256 over every metadata field but the checksum itself (the tensor bytes enter through
    tensor_sha256), so that a change anywhere in the file is refused."""
    h = hashlib.sha256()
    for key in sorted(k for k in header if k != "checksum"):
        value = header[key]
        h.update(f"{len(key)}:{key}={len(value)}:".encode())
        h.update(value.encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def _tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().data if t.numel() else b"")   # the bytes, not a copy of them
    return h.hexdigest()


# -- validation ---------------------------------------------------------------------------------------

_FP_RE = re.compile(r"^[a-z0-9_]+\[[0-9,]*\]:[0-9a-f]{16}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_FOLD_KINDS = ("op", "norm", "rows")


class _Validator:
    """QuantPlan.validate: one method per object, each check names the field it reads."""

    def __init__(self, plan: "QuantPlan"):
        self.plan = plan

    @staticmethod
    def fail(where: str, problem: str):
        raise PlanFormatError(f"plan field {where}: {problem}")

    # scalars ------------------------------------------------------------------------------------
    def integer(self, where, v, lo=None):
        if not isinstance(v, int) or isinstance(v, bool):
            self.fail(where, f"{v!r} must be an integer")
        if lo is not None and v < lo:
            self.fail(where, f"{v} must be >= {lo}")
        return v

    def positive(self, where, v):
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or not v > 0:
            self.fail(where, f"{v!r} must be a finite number > 0")
        return float(v)

    def string(self, where, v, pattern=None, what="a string"):
        if not isinstance(v, str) or (pattern is not None and not pattern.match(v)):
            self.fail(where, f"{v!r} must be {what}")
        return v

    def scale(self, where, v, n: int):
        """Weight scales: a float32 tensor [n] (one per output channel) of finite values > 0."""
        self.tensor(where, v, (torch.float32,), (n,))
        if not bool((torch.isfinite(v) & (v > 0)).all()):
            self.fail(where, "every entry must be finite and > 0")

    # tensors ------------------------------------------------------------------------------------
    def tensor(self, where, t, dtypes, shape):
        if not isinstance(t, torch.Tensor):
            self.fail(where, f"must be a tensor, got {type(t).__name__}")
        if t.dtype not in dtypes:
            self.fail(where, f"dtype {t.dtype}, expected {' or '.join(str(d) for d in dtypes)}")
        if tuple(t.shape) != tuple(shape):
            self.fail(where, f"shape {tuple(t.shape)}, expected {tuple(shape)}")
        return t

    def values(self, where, ok: torch.Tensor, rule: str):
        if not bool(ok.all()):
            i = int((~ok).nonzero()[0][0]) if ok.dim() else 0
            self.fail(where, f"{rule} (first offending index {i})")

    # the plan ---------------------------------------------------------------------------------------
    def run(self):
        p = self.plan
        if not isinstance(p.config, Config):
            self.fail("config", f"must be a Config, got {type(p.config).__name__}")
        self.string("model_type", p.model_type)
        self.string("model_hash", p.model_hash, _HEX64, "64 hexadecimal digits (sha256)")
        for key, obj in (("groups", p.groups), ("layers", p.layers), ("skipped", p.skipped),
                         ("calibration", p.calibration)):
            if not isinstance(obj, dict):
                self.fail(key, f"must be a dict, got {type(obj).__name__}")
        if not isinstance(p.parameters, dict):
            self.fail("parameters", f"must be a dict, got {type(p.parameters).__name__}")
        for name, shape in p.parameters.items():
            if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                      for d in shape):
                self.fail(f"parameters[{name!r}]", f"{shape!r} must be a list of sizes (integers >= 0)")
        for name, why in p.skipped.items():
            self.string(f"skipped[{name!r}]", why)
            if name in p.layers:
                self.fail(f"skipped[{name!r}]", "the layer is both skipped and quantized")
        for name, g in p.groups.items():
            self.group(name, g)
        for name, lp in p.layers.items():
            self.layer(name, lp)
        for key, obj in (("attention", p.attention), ("attention_skipped", p.attention_skipped)):
            if not isinstance(obj, dict):
                self.fail(key, f"must be a dict, got {type(obj).__name__}")
        for name, why in p.attention_skipped.items():
            self.string(f"attention_skipped[{name!r}]", why)
            if name in p.attention:
                self.fail(f"attention_skipped[{name!r}]", "the site is both skipped and quantized")
        for name, ap in p.attention.items():
            self.attention(name, ap)

    def attention(self, name, ap):
        w = f"attention[{name!r}]"
        if not isinstance(ap, AttentionPlan) or ap.name != name:
            self.fail(f"{w}.name", f"{getattr(ap, 'name', ap)!r} does not match its key")
        hq = self.integer(f"{w}.num_heads", ap.num_heads, lo=1)
        hkv = self.integer(f"{w}.num_kv_heads", ap.num_kv_heads, lo=1)
        if hq % hkv:
            self.fail(f"{w}.num_kv_heads", f"{hkv} does not divide num_heads {hq}")
        d = self.integer(f"{w}.head_dim", ap.head_dim, lo=1)
        dv = self.integer(f"{w}.v_head_dim", ap.v_head_dim, lo=1)
        for key in ("qk_format", "pv_format"):
            if getattr(ap, key) not in ("int8", "fp8"):
                self.fail(f"{w}.{key}", f"{getattr(ap, key)!r} must be 'int8' or 'fp8'")
        if self.integer(f"{w}.kv_block", ap.kv_block) not in KV_BLOCKS:
            self.fail(f"{w}.kv_block", f"{ap.kv_block} must be one of {KV_BLOCKS}")
        if ap.layer_idx is not None:
            self.integer(f"{w}.layer_idx", ap.layer_idx, lo=0)
        for key, n in (("q_scale", hq), ("k_scale", hkv), ("v_scale", hkv)):
            self.scale(f"{w}.{key}", getattr(ap, key), n)
        for key, shape in (("q_absmax", (hq, d)), ("k_absmax", (hkv, d)), ("v_absmax", (hkv, dv))):
            t = self.tensor(f"{w}.{key}", getattr(ap, key), (torch.float32,), shape)
            self.values(f"{w}.{key}", (torch.isfinite(t) & (t >= 0)).flatten(), "every entry must be finite and >= 0")

    def group(self, name, g):
        w = f"groups[{name!r}]"
        if not isinstance(g, GroupPlan) or g.name != name:
            self.fail(f"{w}.name", f"{getattr(g, 'name', g)!r} does not match its key")
        if not isinstance(g.layers, list) or not g.layers:
            self.fail(f"{w}.layers", "must be a non-empty list of layer names")
        for layer in g.layers:
            if layer not in self.plan.layers or self.plan.layers[layer].group != name:
                self.fail(f"{w}.layers", f"{layer!r} is not a plan layer of this group")
        c = self.integer(f"{w}.in_features", g.in_features, lo=1)
        self.positive(f"{w}.threshold", g.threshold)
        pad = self.integer(f"{w}.pad_multiple", g.pad_multiple, lo=2)
        if pad % 2:
            self.fail(f"{w}.pad_multiple", f"{pad} must be even (INT4 packs two values per byte)")
        self.string(f"{w}.fold_note", g.fold_note)
        s = self.tensor(f"{w}.smooth", g.smooth, (torch.float32,), (c,))
        self.values(f"{w}.smooth", torch.isfinite(s) & (s > 0), "every entry must be finite and > 0")
        a = self.tensor(f"{w}.act_max", g.act_max, (torch.float32,), (c,))
        self.values(f"{w}.act_max", torch.isfinite(a) & (a >= 0), "every entry must be finite and >= 0")
        extra = self.tensor(f"{w}.extra", g.extra, (torch.int64,), (c,))
        dup = self.tensor(f"{w}.weight_dup", g.weight_dup, (torch.int64,), (c,))
        self.values(f"{w}.extra", extra >= 0, "every entry must be >= 0")
        self.values(f"{w}.weight_dup", dup >= 0, "every entry must be >= 0")
        self.values(f"{w}.weight_dup", (extra == 0) | (dup == 0), "a channel cannot be flattened twice")
        self.cmap(w, g.cmap, c, int(extra.sum() + dup.sum()), pad)
        self.fold(w, name, g.fold)
        if g.activation_scale not in ("tensor", "token"):
            self.fail(f"{w}.activation_scale", f"{g.activation_scale!r} must be 'tensor' or 'token'")

    def cmap(self, w, cm, c, extra, pad):
        if not isinstance(cm, ChannelMap):
            self.fail(f"{w}.cmap", f"must be a ChannelMap, got {type(cm).__name__}")
        k = cm.src.numel() if isinstance(cm.src, torch.Tensor) else -1
        used = c + extra
        if k < used or k % pad:      # padded beyond the next multiple where blocks are aligned (planning/align.py)
            self.fail(f"{w}.cmap.src", f"{k} positions; expected {used} padded to a multiple of {pad}")
        src = self.tensor(f"{w}.cmap.src", cm.src, (torch.int32,), (k,))
        lo = self.tensor(f"{w}.cmap.lo", cm.lo, (torch.float32,), (k,))
        hi = self.tensor(f"{w}.cmap.hi", cm.hi, (torch.float32,), (k,))
        wf = self.tensor(f"{w}.cmap.weight_factor", cm.weight_factor, (torch.float32,), (k,))
        active = self.tensor(f"{w}.cmap.active", cm.active, (torch.bool,), (k,))
        self.values(f"{w}.cmap.active", active[:used].all() & ~active[used:].any(),
                    f"the first {used} positions must be active and the padding inactive")
        self.values(f"{w}.cmap.src", (src >= 0) & (src < c), f"every index must lie in [0, {c})")
        self.values(f"{w}.cmap.src", src[:c] == torch.arange(c, dtype=src.dtype, device=src.device),
                    "the first positions must be the original channels in order")
        self.values(f"{w}.cmap.lo", torch.isfinite(lo) & (lo >= 0), "every entry must be finite and >= 0")
        self.values(f"{w}.cmap.hi", ~active | (hi > 0), "every active entry must be > 0 (inf: unbounded)")
        self.values(f"{w}.cmap.hi", ~torch.isnan(hi), "no entry may be NaN")
        self.values(f"{w}.cmap.weight_factor", torch.isfinite(wf) & (wf >= 0) & (wf <= 1) & (active | (wf == 0)),
                    "every entry must lie in [0, 1] (0 on padding)")

    def fold(self, w, name, fold):
        kind, sep, target = self.string(f"{w}.fold", fold).partition(":")
        if kind not in _FOLD_KINDS or (kind == "op") == bool(sep) or (kind != "op" and not target):
            self.fail(f"{w}.fold", f"{fold!r} is not 'op', 'norm:<parameter>[,<parameter>]' or 'rows:<layer>'")
        fps = self.plan.groups[name].fold_fingerprints
        if not isinstance(fps, dict):
            self.fail(f"{w}.fold_fingerprints", f"must be a dict, got {type(fps).__name__}")
        if kind == "norm" and not 1 <= len(target.split(",")) <= 2:
            self.fail(f"{w}.fold", f"{fold!r}: a norm fold names its weight and at most a bias")
        if set(fps) != (set(target.split(",")) if kind == "norm" else set()):
            self.fail(f"{w}.fold_fingerprints", f"keys {sorted(fps)} must be the norm parameters of fold {fold!r}")
        for key, fp in fps.items():
            self.string(f"{w}.fold_fingerprints[{key!r}]", fp, _FP_RE, "a weight_fingerprint string")
        if kind == "rows":
            producer = self.plan.layers.get(target)
            if producer is None or producer.rows_folded_from != name:
                self.fail(f"{w}.fold", f"{fold!r}: the producer must be a plan layer whose rows_folded_from "
                                       f"is {name!r}")

    def layer(self, name, lp):
        w = f"layers[{name!r}]"
        if not isinstance(lp, LayerPlan) or lp.name != name:
            self.fail(f"{w}.name", f"{getattr(lp, 'name', lp)!r} does not match its key")
        g = self.plan.groups.get(lp.group)
        if g is None or name not in g.layers:
            self.fail(f"{w}.group", f"{lp.group!r} is not a plan group listing this layer")
        if self.integer(f"{w}.in_features", lp.in_features) != g.in_features:
            self.fail(f"{w}.in_features", f"{lp.in_features} != its group's in_features {g.in_features}")
        n = self.integer(f"{w}.out_features", lp.out_features, lo=1)
        if not isinstance(lp.transposed, bool):
            self.fail(f"{w}.transposed", f"{lp.transposed!r} must be true or false")
        shape = self.plan.parameters.get(name + ".weight", self.plan.parameters.get(name))
        if shape is not None and tuple(shape) != lp.model_weight_shape:
            self.fail(f"{w}.transposed" if tuple(shape) == lp.model_weight_shape[::-1] else f"{w}.out_features",
                      f"the model's weight is {shape}, the layer reads {list(lp.model_weight_shape)}")
        if lp.bits not in (4, 8) or isinstance(lp.bits, bool):
            self.fail(f"{w}.bits", f"{lp.bits!r} must be 4 or 8")
        if lp.format not in FORMAT_BITS:
            self.fail(f"{w}.format", f"{lp.format!r} must be one of {', '.join(FORMAT_BITS)}")
        if FORMAT_BITS[lp.format] != lp.bits:
            self.fail(f"{w}.bits", f"{lp.bits} but format {lp.format} has {FORMAT_BITS[lp.format]}-bit weights")
        k = g.cmap.src.numel() if lp.flattened else lp.in_features
        if lp.bits == 4 and k % 2:
            self.fail(f"{w}.in_features", f"{k} columns cannot be packed two per byte ({lp.format})")
        if lp.format == "fp8":
            q = self.tensor(f"{w}.weight_q", lp.weight_q, (torch.float8_e4m3fn,), (n, k))
            self.values(f"{w}.weight_q", torch.isfinite(q.float()).flatten(), "e4m3 weights must not be NaN")
        elif lp.bits == 8:
            q = self.tensor(f"{w}.weight_q", lp.weight_q, (torch.int8,), (n, k))
            self.values(f"{w}.weight_q", (q != -128).flatten(), "INT8 weights lie in [-127, 127]")
        else:
            q = self.tensor(f"{w}.weight_q", lp.weight_q, (torch.uint8,), (n, k // 2))
            nib = torch.stack((q & 0xF, q >> 4))
            self.values(f"{w}.weight_q", (nib != 8).flatten(), "packed INT4 weights lie in [-7, 7]")
        self.scale(f"{w}.weight_scale", lp.weight_scale, n)
        act = self.positive(f"{w}.act_scale", lp.act_scale)
        qmax = 127 if lp.bits == 8 else 7
        want, what = (1 / qmax, f"1 / {qmax} (per-token group)") if g.activation_scale == "token" else \
            (g.threshold / qmax, f"the group's threshold / {qmax} = {g.threshold / qmax!r}")
        if lp.flattened and not math.isclose(act, want, rel_tol=1e-6):
            self.fail(f"{w}.act_scale", f"{act!r} != {what}")
        if lp.errors is not None and not (isinstance(lp.errors, dict) and set(lp.errors) <= set(FORMAT_BITS)):
            self.fail(f"{w}.errors", f"{lp.errors!r} must be None or a dict keyed by formats")
        for key, v in ([("error", lp.error)] + [(f"errors[{f!r}]", e) for f, e in (lp.errors or {}).items()]):
            if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v)
                                  or v < 0):
                self.fail(f"{w}.{key}", f"{v!r} must be None or a finite number >= 0")
        self.string(f"{w}.why", lp.why)
        self.string(f"{w}.fingerprint", lp.fingerprint, _FP_RE, "a weight_fingerprint string")
        if lp.bias is None:
            if lp.bias_fingerprint is not None:
                self.fail(f"{w}.bias_fingerprint", "set for a layer without bias")
        else:
            b = self.tensor(f"{w}.bias", lp.bias, (torch.float32,), (n,))
            self.values(f"{w}.bias", torch.isfinite(b), "every entry must be finite")
            self.string(f"{w}.bias_fingerprint", lp.bias_fingerprint, _FP_RE, "a weight_fingerprint string")
        if lp.kl_ratio is not None and (not isinstance(lp.kl_ratio, (int, float)) or isinstance(lp.kl_ratio, bool)
                                        or not math.isfinite(lp.kl_ratio) or lp.kl_ratio < 0):
            self.fail(f"{w}.kl_ratio", f"{lp.kl_ratio!r} must be None or a finite number >= 0")
        if lp.rows_folded_from is not None:
            rg = self.plan.groups.get(lp.rows_folded_from)
            if rg is None or rg.fold != f"rows:{name}":
                self.fail(f"{w}.rows_folded_from",
                          f"{lp.rows_folded_from!r} is not a group whose fold is 'rows:{name}'")
            if rg.in_features != n:
                self.fail(f"{w}.rows_folded_from", f"group {lp.rows_folded_from!r} has {rg.in_features} channels, "
                                                   f"this layer {n} outputs")
