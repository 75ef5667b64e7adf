"""Calibration observers: find every linear layer in a Dynamo graph and insert one observer in
front of each distinct input tensor (q/k/v share one), keyed by the layers' parameter names.

An observer records, per input channel, max |x| (Eq. 5-7 need it) and keeps a uniform random sample
of rows (the Eq. 8 histograms are built from it after T is known).  Each row draws a random key; the
rows whose key is below HELD_OUT form a held-out part: the sample keeps the smallest keys, so it is
drawn from them first, and `fit_absmax` (kept only for level auto: StatsStore.hold_out) is the
channel maxima of the other rows.  Level auto measures
each format's error on held-out rows with scales set from `fit_absmax` (planning/formats.py): a
static scale then meets values beyond its calibrated range, as it will at run time.  Non-finite values stop the
calibration at once, naming the layer, instead of producing a plan full of NaN.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

from fq_compile.passes.match import LayerParams, LinearForm, layer_name, layer_params, linear_forms, other_weight_reads


HELD_OUT = 0.25          # the share of calibration rows held out of `fit_absmax` (see the module docstring)


class CalibrationError(RuntimeError):
    """Calibration saw something that would make a wrong plan (NaN/Inf, no data, ...)."""


@dataclass
class InputStats:
    """Running statistics of one linear input (shared by every layer that reads it)."""

    layers: list[str]
    in_features: int
    sample_size: int
    generator: torch.Generator
    params: dict[str, LayerParams] = field(default_factory=dict)   # layer -> its parameters' names
    absmax: torch.Tensor | None = None
    hold_out: bool = False                     # keep fit_absmax (level auto's measurement needs it)
    fit_absmax: torch.Tensor | None = None     # max |x| over the rows not held out
    rows: int = 0
    _sample: torch.Tensor | None = None
    _keys: torch.Tensor | None = None

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        x2 = x.detach().reshape(-1, x.shape[-1])
        if not bool(torch.isfinite(x2).all()):
            raise CalibrationError(f"NaN/Inf in the input of {', '.join(self.layers)} during calibration; "
                                   "the model overflows on this data (try float32/bfloat16 for calibration)")
        a = x2.abs()
        m = a.amax(dim=0).float().cpu()
        self.absmax = m if self.absmax is None else torch.maximum(self.absmax, m)
        self.rows += x2.shape[0]
        # reservoir by random keys: keeping the smallest keys is a uniform sample of all rows seen
        keys = torch.rand(x2.shape[0], generator=self.generator)
        fit = keys >= HELD_OUT
        if self.hold_out and bool(fit.any()):
            fm = a[fit.to(a.device)].amax(dim=0).float().cpu()
            self.fit_absmax = fm if self.fit_absmax is None else torch.maximum(self.fit_absmax, fm)
        take = torch.topk(keys, min(self.sample_size, x2.shape[0]), largest=False).indices
        rows = x2[take.to(x2.device)].float().cpu()
        if self._sample is None:
            self._sample, self._keys = rows, keys[take]
        else:
            allk = torch.cat([self._keys, keys[take]])
            allr = torch.cat([self._sample, rows])
            keep = torch.topk(allk, min(self.sample_size, allk.numel()), largest=False).indices
            self._sample, self._keys = allr[keep], allk[keep]

    @property
    def sample(self) -> torch.Tensor:
        return self._sample

    @property
    def held_out_sample(self) -> torch.Tensor | None:
        """The sampled rows that are held out of `fit_absmax` (None: none were sampled)."""
        if self._sample is None:
            return None
        rows = self._sample[self._keys < HELD_OUT]
        return rows if rows.shape[0] else None


@dataclass
class AttentionStats:
    """Max |Q|, |K|, |V| per head and channel at one attention site's inputs ([B, H, S, D] tensors,
    K and V with their kv heads); v_layer is the linear that produces V (its rows may carry a fold)."""

    site: str
    v_layer: str | None = None
    layer_idx: int | None = None
    q_absmax: torch.Tensor | None = None
    k_absmax: torch.Tensor | None = None
    v_absmax: torch.Tensor | None = None
    calls: int = 0

    @torch.no_grad()
    def update(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        maxima = []
        for name, x in (("Q", q), ("K", k), ("V", v)):
            if not bool(torch.isfinite(x).all()):
                raise CalibrationError(f"NaN/Inf in the {name} of attention {self.site} during calibration")
            maxima.append(x.detach().abs().amax(dim=(0, 2)).float().cpu())     # [H, D]
        if self.q_absmax is None:
            self.q_absmax, self.k_absmax, self.v_absmax = maxima
        else:
            self.q_absmax, self.k_absmax, self.v_absmax = (
                torch.maximum(a, b) for a, b in zip((self.q_absmax, self.k_absmax, self.v_absmax), maxima))
        self.calls += 1


class AttentionObserver(torch.nn.Module):
    """The attention observer node's module (named fq_observer_attn_*, which the fold analysis ignores)."""

    def __init__(self, stats: AttentionStats):
        super().__init__()
        self.stats = stats

    def forward(self, q, k, v):
        self.stats.update(q, k, v)


@dataclass
class ObservedLinear:
    layer: str
    node: fx.Node                 # the call that reads the input (form.node)
    in_features: int
    form: LinearForm | None = None
    params: LayerParams | None = None


@dataclass
class StatsStore:
    """All observers of one calibration run, keyed by group name (see group_name)."""

    sample_size: int = 512
    seed: int = 0
    hold_out: bool = False        # the observers keep fit_absmax (InputStats.hold_out)
    inputs: dict[str, InputStats] = field(default_factory=dict)
    unsupported: dict[str, str] = field(default_factory=dict)   # layer -> reason
    graphs: list[fx.GraphModule] = field(default_factory=list)
    attention: dict[str, AttentionStats] = field(default_factory=dict)        # site -> Q/K/V maxima
    attention_unsupported: dict[str, str] = field(default_factory=dict)       # site -> reason

    def stats_for(self, group: str, layers: list[str], in_features: int,
                  params: dict[str, LayerParams] | None = None) -> InputStats:
        if group not in self.inputs:
            g = torch.Generator().manual_seed(self.seed + len(self.inputs))
            self.inputs[group] = InputStats(layers, in_features, self.sample_size, g, dict(params or {}),
                                            hold_out=self.hold_out)
        return self.inputs[group]


class ActivationObserver(torch.nn.Module):
    """The observer node's module: records its input, returns nothing (the graph runs eagerly)."""

    def __init__(self, stats: InputStats):
        super().__init__()
        self.stats = stats

    def forward(self, x):
        self.stats.update(x)


def group_name(layers: list[str]) -> str:
    """Stable name of an activation group: its layers, e.g. 'model.layers.0.self_attn.{q,k,v}_proj'
    is written 'model.layers.0.self_attn.q_proj+k_proj+v_proj'."""
    first, rest = layers[0], layers[1:]
    prefix = first.rsplit(".", 1)[0] + "." if "." in first else ""
    tails = [r[len(prefix):] if r.startswith(prefix) else r for r in rest]
    return "+".join([first] + tails)


def find_linears(gm: fx.GraphModule, name_of) -> tuple[dict[fx.Node, list[ObservedLinear]], dict[str, str]]:
    """Group the graph's linear layers (every form match.py knows) by input node; list what we
    cannot quantize, with why: linears whose weight is no parameter or whose bias is computed in the
    graph, and weights read otherwise (MoE experts, ...).  The bias is the one the call reads (a
    parameter, whatever its name), never looked up by name."""
    groups: dict[fx.Node, list[ObservedLinear]] = {}
    forms = linear_forms(gm, name_of)
    unsupported: dict[str, str] = other_weight_reads(gm, forms, name_of)
    for form in forms:
        params = layer_params(form, name_of)
        shape = form.weight_shape()
        if params is None or shape is None:
            unsupported[f"<linear {form.node.name}>"] = "weight is not a 2-D model parameter"
            continue
        if params.bias is None and form.bias is not None:
            unsupported[layer_name(params.weight)] = "bias is not a model parameter (computed in the graph)"
            continue
        groups.setdefault(form.x, []).append(ObservedLinear(layer_name(params.weight), form.node, shape[1], form,
                                                            params))
    return groups, unsupported


def insert_observers(gm: fx.GraphModule, store: StatsStore, groups, unsupported, skip=frozenset()) -> fx.GraphModule:
    """Add an observer before the first reader of every linear input (groups and unsupported as
    find_linears returns them); returns gm (modified)."""
    store.unsupported.update(unsupported)
    for i, (x, lins) in enumerate(groups.items()):
        lins = [l for l in lins if l.layer not in skip]
        if not lins:
            continue
        layers = [l.layer for l in lins]
        stats = store.stats_for(group_name(layers), layers, lins[0].in_features,
                                {l.layer: l.params for l in lins if l.params is not None})
        mod_name = f"fq_observer_{i}"
        gm.add_submodule(mod_name, ActivationObserver(stats))
        with gm.graph.inserting_before(lins[0].node):
            gm.graph.call_module(mod_name, (x,))
    gm.graph.lint()
    gm.recompile()
    store.graphs.append(gm)
    return gm
