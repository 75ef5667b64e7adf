"""QuantPlan: everything the compiler decided, as plain data that can be saved and reloaded.

A plan holds, per activation group (the linears that read one tensor, e.g. q/k/v) the smoothing
scales, where they are folded, the threshold T and the flatten counts; per layer the bits, the
quantized (flattened) weights, scales and bias.  On disk it is one safetensors file: the tensors,
plus JSON metadata in the header (format name and version, the config, a hash of the model's
parameter names and shapes, a sha256 of the tensor bytes).  No pickle anywhere, so loading a plan
cannot run code; a truncated, corrupted or foreign file is refused with a `PlanFormatError`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

import torch

from fq_compile.config import Config

FORMAT_NAME = "fq_compile.plan"
FORMAT_VERSION = 2   # 2: the channel map is stored, not recomputed (its layout may change)


class PlanFormatError(ValueError):
    """The file is not a readable fq_compile plan."""


class PlanMismatchError(ValueError):
    """The plan does not belong to the model or graph it is applied to."""


def parameter_shapes(model: torch.nn.Module) -> dict[str, list[int]]:
    """Every parameter's shape by name (tied weights once, under their first name)."""
    return {name: list(p.shape) for name, p in model.named_parameters()}


def model_hash(model: torch.nn.Module) -> str:
    """sha256 over the sorted (parameter name, shape) pairs: identifies an architecture + size."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        h.update(f"{name}:{tuple(p.shape)};".encode())
    return h.hexdigest()


def weight_fingerprint(w: torch.Tensor) -> float:
    """Cheap identity of a weight's values (sum of |w| in float64): catches a plan calibrated on
    other weights of the same shape (e.g. a random-init model instead of the checkpoint)."""
    return float(w.detach().double().abs().sum())


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
    weight_scale: float
    act_scale: float              # T / qmax(bits)
    bias: torch.Tensor | None     # float32 [N] (rows already divided by a folded smoothing scale)
    fingerprint: float
    kl_ratio: float | None = None
    rows_folded_from: str | None = None   # group whose smoothing is folded into this layer's rows
    transposed: bool = False      # the model stores the weight [K, N] (GPT-2's Conv1D); weight_q is [N, K'] anyway

    @property
    def model_weight_shape(self) -> tuple[int, int]:
        """The shape of the model's parameter this layer quantizes, as the model stores it."""
        return (self.in_features, self.out_features) if self.transposed else (self.out_features, self.in_features)

    @property
    def scale(self) -> float:
        return self.act_scale * self.weight_scale

    @property
    def weight_bytes(self) -> int:
        return self.weight_q.numel() * self.weight_q.element_size()


@dataclass
class QuantPlan:
    config: Config
    model_type: str
    model_hash: str
    groups: dict[str, GroupPlan] = field(default_factory=dict)
    layers: dict[str, LayerPlan] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)   # layer -> why it stays in floating point
    calibration: dict = field(default_factory=dict)          # batches, tokens, ...
    parameters: dict[str, list[int]] = field(default_factory=dict)   # every model parameter's shape (explain's bytes)

    # -- lookup -----------------------------------------------------------------------------------
    def group_of(self, layer: str) -> GroupPlan:
        return self.groups[self.layers[layer].group]

    def check_model(self, model: torch.nn.Module) -> None:
        """Raise PlanMismatchError naming the first layer that does not match `model`."""
        params = dict(model.named_parameters())
        for name, lp in self.layers.items():
            w = params.get(name + ".weight", params.get(name))
            if w is None:
                raise PlanMismatchError(f"plan layer {name!r} does not exist in this {type(model).__name__}: "
                                        f"the plan was made for another model ({self.model_type})")
            if tuple(w.shape) != lp.model_weight_shape:
                raise PlanMismatchError(f"layer {name!r}: the plan expects weight shape "
                                        f"{lp.model_weight_shape}, the model has {tuple(w.shape)}")

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
                                 fold=g.fold, fold_note=g.fold_note, pad_multiple=g.pad_multiple)
        for lname, lp in self.layers.items():
            li = len(layers)
            tensors[f"l{li}.weight_q"] = lp.weight_q.contiguous()
            if lp.bias is not None:
                tensors[f"l{li}.bias"] = lp.bias.contiguous()
            layers[lname] = dict(index=li, group=lp.group, in_features=lp.in_features, out_features=lp.out_features,
                                 bits=lp.bits, weight_scale=lp.weight_scale, act_scale=lp.act_scale,
                                 has_bias=lp.bias is not None, fingerprint=lp.fingerprint, kl_ratio=lp.kl_ratio,
                                 rows_folded_from=lp.rows_folded_from, transposed=lp.transposed)
        meta = dict(config=self.config.to_dict(), model_type=self.model_type, model_hash=self.model_hash,
                    groups=groups, layers=layers, skipped=self.skipped, calibration=self.calibration,
                    parameters=self.parameters)
        return {k: v.detach().cpu() for k, v in tensors.items()}, meta

    def save(self, path: str | os.PathLike) -> None:
        from safetensors.torch import save_file

        tensors, meta = self._tensors_and_meta()
        header = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION), "plan": json.dumps(meta),
                  "tensor_sha256": _tensor_digest(tensors)}
        tmp = f"{os.fspath(path)}.tmp"
        save_file(tensors, tmp, metadata=header)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "QuantPlan":
        from safetensors import SafetensorError, safe_open

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no plan file at {path}")
        try:
            with safe_open(path, framework="pt") as f:
                header = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise PlanFormatError(f"{path} is not a readable fq_compile plan (truncated or corrupt?): {e}") from None
        if header.get("format") != FORMAT_NAME:
            raise PlanFormatError(f"{path} is a safetensors file but not an fq_compile plan "
                                  f"(format={header.get('format')!r})")
        version = header.get("format_version")
        if version != str(FORMAT_VERSION):
            raise PlanFormatError(f"{path} has plan format version {version}; this fq_compile reads version "
                                  f"{FORMAT_VERSION}: recalibrate, or use the fq_compile that wrote it")
        if header.get("tensor_sha256") != _tensor_digest(tensors):
            raise PlanFormatError(f"{path}: tensor data does not match its checksum (the file is corrupt)")
        try:
            meta = json.loads(header["plan"])
            return cls._from_meta(meta, tensors)
        except (KeyError, TypeError, ValueError, json.JSONDecodeError) as e:
            raise PlanFormatError(f"{path}: plan metadata is malformed ({type(e).__name__}: {e})") from None

    @classmethod
    def _from_meta(cls, meta: dict, tensors: dict) -> "QuantPlan":
        plan = cls(config=Config.from_dict(meta["config"]), model_type=meta["model_type"],
                   model_hash=meta["model_hash"], skipped=dict(meta["skipped"]),
                   calibration=dict(meta.get("calibration", {})),
                   parameters={k: [int(d) for d in v] for k, v in meta.get("parameters", {}).items()})
        for gname, g in meta["groups"].items():
            gi = g["index"]
            plan.groups[gname] = GroupPlan(
                name=gname, layers=list(g["layers"]), in_features=int(g["in_features"]),
                threshold=float(g["threshold"]), smooth=tensors[f"g{gi}.smooth"], fold=g["fold"],
                extra=tensors[f"g{gi}.extra"], weight_dup=tensors[f"g{gi}.weight_dup"],
                act_max=tensors[f"g{gi}.act_max"], pad_multiple=int(g["pad_multiple"]), fold_note=g.get("fold_note", ""),
                cmap=ChannelMap(*(tensors[f"g{gi}.cmap.{k}"] for k in ("src", "lo", "hi", "weight_factor", "active"))))
        for lname, l in meta["layers"].items():
            li = l["index"]
            lp = LayerPlan(name=lname, group=l["group"], in_features=int(l["in_features"]),
                           out_features=int(l["out_features"]), bits=int(l["bits"]),
                           weight_q=tensors[f"l{li}.weight_q"], weight_scale=float(l["weight_scale"]),
                           act_scale=float(l["act_scale"]), bias=tensors[f"l{li}.bias"] if l["has_bias"] else None,
                           fingerprint=float(l["fingerprint"]), kl_ratio=l["kl_ratio"],
                           rows_folded_from=l["rows_folded_from"], transposed=bool(l.get("transposed", False)))
            g = plan.groups[lp.group]
            k = g.flat_features // 2 if lp.bits == 4 else g.flat_features
            if tuple(lp.weight_q.shape) != (lp.out_features, k):
                raise ValueError(f"layer {lname}: weight_q has shape {tuple(lp.weight_q.shape)}, expected {(lp.out_features, k)}")
            plan.layers[lname] = lp
        return plan


def _tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
