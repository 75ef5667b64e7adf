"""Tensor parallelism: one plan, made on the full model, run by every rank of a model parallelised
with `torch.distributed.tensor.parallel.parallelize_module` (ColwiseParallel / RowwiseParallel).

Under torch.compile each rank's Dynamo graph holds the parallelised linears as DTensor calls:
`linear(from_local(h, mesh, placements), W, b)` with W and b DTensor parameters (global shapes, the
rank's shard inside), followed by the style's `redistribute(...)` and `to_local()`.  The rewrite
(passes/lower.py) asks this module, per quantized linear, which part of the weight this rank holds
(`layer_shard`) and the plan's tensors for that part (`local_layer`), and computes on local tensors:

    fq.flatten_quantize(h, this rank's constants) -> fq.int8/int4_linear(this rank's weights)
    -> DTensor.from_local(y, mesh, the linear's own output placements)

so everything after it (the redistribute that all-reduces a row-parallel output, in floating
point) stays DTensor's.  What each rank holds of a layer:

  * column-parallel (weight Shard(0), input replicated): output rows [o, o + n) of the integer
    weight, of the per-channel weight scales and of the bias; the activation constants are the whole
    group's (every rank quantizes the same full input to the same integers).
  * row-parallel (weight Shard(1), input Shard(-1)): the input channels [o, o + n).  Flattening adds
    channels, so the rank's channel map is built from its own channels: the positions of the plan's
    map whose source channel it owns, in the plan's order (originals, then their extra slices, then
    their weight splits), padded again to the group's pad_multiple, so that K' stays even for INT4
    packing and tile-aligned.  The integer weight columns are gathered from the same positions (the
    same integers, nothing requantized; INT4 is unpacked, gathered and repacked within the shard).
    The per-channel weight scales are whole; the bias is added by the rank at coordinate 0 of the
    sharded mesh dimension only, so that the all-reduce adds it once (every rank's plan keeps it:
    the parameter is replicated on every rank and checked there).  The ranks' int32
    accumulators sum to the single-process accumulator exactly; each rank applies the float32
    epilogue to its own, and the all-reduce sums the results.
  * replicated (a DTensor weight sharded nowhere): the whole layer.

Activation scales (T / qmax) are global and static: no collective is needed to quantize.

A plan's rank-local views are derived state: they are built on first use and kept in the plan's
runtime state (runtime/state.py), while the plan itself stays the full model's.  `shard_plan` turns
a plan into the rank-local plan of one rank (each rank can save and load only its own); such a plan
records its shards in `plan.calibration["tensor_parallel"]` and is used as it is.

Fingerprints (plan.weight_fingerprint, checked at compile time and per call by runtime/guards.py):
a full plan holds the whole tensors' fingerprints, a rank-local plan those of this rank's shards
(`shard_fingerprint`).  A DTensor parameter is checked against whichever the plan holds
(`check_dtensor`): the whole tensor's by gathering it once when the graph is compiled (a
collective; every rank compiles the same graph), and from then on, per call, its local shard is
watched with the shard's own fingerprint, so the per-call guard needs no collective.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from fq_compile.kernels.packing import pack_int4, unpack_int4
from fq_compile.plan import (
    ChannelMap,
    GroupPlan,
    LayerPlan,
    PlanMismatchError,
    QuantPlan,
    stale_message,
    weight_fingerprint,
)
from fq_compile.runtime.state import state_of

TP_KEY = "tensor_parallel"     # plan.calibration key of a rank-local plan: layer -> LayerShard fields


def dtensor_class():
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def is_dtensor(t) -> bool:
    cls = dtensor_class()
    return cls is not None and isinstance(t, cls)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The rank's local part of a DTensor; any other tensor as it is."""
    return t.to_local() if is_dtensor(t) else t


@dataclass(frozen=True)
class LayerShard:
    """The part of one linear's weight [N, C] that this rank holds."""

    dim: int | None        # 0: output rows (column-parallel), 1: input channels (row-parallel), None: whole
    offset: int            # first global row (dim 0) or channel (dim 1)
    size: int              # rows or channels held here
    full: tuple[int, int]  # the global weight shape (N, C)
    index: int             # this rank's coordinate on the sharded mesh dimension (0 when whole)
    count: int             # ranks on that mesh dimension (1 when whole)

    @property
    def style(self) -> str:
        return {0: "colwise", 1: "rowwise", None: "replicated"}[self.dim]

    def describe(self) -> str:
        return f"{self.style} {self.index}/{self.count}"

    @classmethod
    def from_record(cls, rec) -> "LayerShard":
        dim, offset, size, full, index, count = rec
        return cls(dim, int(offset), int(size), (int(full[0]), int(full[1])), int(index), int(count))

    def record(self) -> list:
        return [self.dim, self.offset, self.size, list(self.full), self.index, self.count]


def layer_shard(weight) -> LayerShard | None:
    """This rank's LayerShard of a DTensor weight (None for a plain tensor).  Refuses layouts other
    than one Shard(0) / Shard(1) (the column / row styles) over replicated mesh dimensions."""
    if not is_dtensor(weight):
        return None
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    mesh, placements = weight.device_mesh, tuple(weight.placements)
    full = tuple(int(s) for s in weight.shape)
    if len(full) != 2:
        raise PlanMismatchError(f"tensor parallelism: a linear weight must be 2-D, got shape {full}")
    sharded = [(i, p) for i, p in enumerate(placements) if not isinstance(p, Replicate)]
    if any(type(p) is not Shard for _, p in sharded) or len(sharded) > 1:
        raise PlanMismatchError(f"tensor parallelism: weight placements {placements} are not supported; "
                                "fq_compile runs ColwiseParallel (Shard(0)) and RowwiseParallel (Shard(1)) "
                                "linears, each sharded over one mesh dimension")
    coordinate = mesh.get_coordinate()
    if coordinate is None:
        raise PlanMismatchError("tensor parallelism: this rank is not part of the weight's device mesh")
    if not sharded:
        return LayerShard(None, 0, full[1], full, 0, 1)
    mesh_dim, p = sharded[0]
    dim = p.dim % 2
    shape, offset = compute_local_shape_and_global_offset(full, mesh, placements)
    return LayerShard(dim, int(offset[dim]), int(shape[dim]), full, int(coordinate[mesh_dim]),
                      int(mesh.size(mesh_dim)))


def max_over_shards(t: torch.Tensor, weight) -> torch.Tensor:
    """Element-wise max of `t` over the ranks that hold the other shards of DTensor `weight` (one
    all-reduce over the sharded mesh dimension); `t` itself when `weight` is not sharded."""
    if not is_dtensor(weight):
        return t
    from torch.distributed.tensor import Shard

    dims = [i for i, p in enumerate(weight.placements) if isinstance(p, Shard)]
    if not dims:
        return t
    out = t.contiguous().clone()
    torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.MAX, group=weight.device_mesh.get_group(dims[0]))
    return out


# -- the rank's part of a plan (pure functions of the plan's tensors) -----------------------------------

def owned_positions(cmap: ChannelMap, offset: int, size: int) -> torch.Tensor:
    """Indices (int64, in the map's order) of the positions whose source channel lies in
    [offset, offset + size); padding excluded."""
    src = cmap.src.to(torch.int64)
    keep = cmap.active & (src >= offset) & (src < offset + size)
    return keep.nonzero().squeeze(1)


def shard_channel_map(cmap: ChannelMap, offset: int, size: int, pad_multiple: int) -> ChannelMap:
    """The channel map of input channels [offset, offset + size): the owned positions with their
    sources renumbered from 0, then zero padding to a multiple of `pad_multiple`."""
    idx = owned_positions(cmap, offset, size)
    n = idx.numel()
    owned = ChannelMap((cmap.src[idx] - offset).to(torch.int32), cmap.lo[idx], cmap.hi[idx], cmap.weight_factor[idx],
                       torch.ones(n, dtype=torch.bool))
    return owned.padded_to(n + (-n) % pad_multiple)


def shard_group(g: GroupPlan, offset: int, size: int) -> GroupPlan:
    """The group as the rank holding input channels [offset, offset + size) sees it: its channels'
    smoothing scales, flatten counts and statistics, its own channel map; T is the group's."""
    sl = slice(offset, offset + size)
    return dataclasses.replace(g, in_features=size, smooth=g.smooth[sl], extra=g.extra[sl], weight_dup=g.weight_dup[sl],
                               act_max=g.act_max[sl], cmap=shard_channel_map(g.cmap, offset, size, g.pad_multiple))


def gather_columns(weight_q: torch.Tensor, bits: int, positions: torch.Tensor, width: int) -> torch.Tensor:
    """Integer weight columns at `positions` of the plan's layout, zero-padded to `width` columns
    (packed again for INT4): the same integers, laid out for the rank's channel map."""
    q = unpack_int4(weight_q) if bits == 4 else weight_q
    out = torch.zeros((q.shape[0], width), dtype=torch.int8, device=q.device)
    out[:, : positions.numel()] = q.index_select(1, positions.to(q.device))
    return pack_int4(out) if bits == 4 else out


def shard_layer(lp: LayerPlan, g: GroupPlan, shard: LayerShard, local_group: GroupPlan | None = None
                ) -> tuple[LayerPlan, GroupPlan]:
    """The layer and group as the rank holding `shard` runs them (see the module docstring).
    `local_group`: shard_group(g, ...) when the caller already made it (layers of one group share it)."""
    if shard.full != (lp.out_features, lp.in_features):
        raise PlanMismatchError(f"layer {lp.name!r}: the plan was made for weight shape "
                                f"{(lp.out_features, lp.in_features)}, this tensor-parallel model has {shard.full}")
    if shard.dim == 0:
        rows = slice(shard.offset, shard.offset + shard.size)
        return dataclasses.replace(
            lp, out_features=shard.size, weight_q=lp.weight_q[rows].clone(), weight_scale=lp.weight_scale[rows].clone(),
            bias=None if lp.bias is None else lp.bias[rows].clone()), g
    if shard.dim == 1:
        gl = local_group or shard_group(g, shard.offset, shard.size)
        wq = gather_columns(lp.weight_q, lp.bits, owned_positions(g.cmap, shard.offset, shard.size), gl.flat_features)
        return dataclasses.replace(lp, in_features=shard.size, weight_q=wq), gl
    return lp, g


# -- per-process views of a plan -------------------------------------------------------------------------

def rank_local_layers(plan: QuantPlan) -> dict[str, LayerShard]:
    """Layers of a rank-local plan (shard_plan's output) with the shard each holds; {} for a full plan."""
    return {k: LayerShard.from_record(v) for k, v in plan.calibration.get(TP_KEY, {}).items()}


def local_layer(plan: QuantPlan, name: str, shard: LayerShard) -> tuple[LayerPlan, GroupPlan]:
    """The plan's layer `name` and its group for the rank holding `shard`: from a rank-local plan as
    they are (after checking the shard is the same), else sliced from the full plan once per process
    and kept in the plan's runtime state."""
    held = plan.calibration.get(TP_KEY, {}).get(name)
    lp = plan.layers[name]
    if held is not None:
        held = LayerShard.from_record(held)
        if held != shard:
            raise PlanMismatchError(f"layer {name!r}: this rank-local plan holds {held.describe()} rows/channels "
                                    f"{held.offset}:{held.offset + held.size}, the model's weight is "
                                    f"{shard.describe()} {shard.offset}:{shard.offset + shard.size}; "
                                    "load the plan of this rank")
        return bias_once(lp, shard), plan.groups[lp.group]
    cache = state_of(plan).constants
    key = ("tp", name, shard)
    if key not in cache or cache[key][0] is not lp:
        g = plan.groups[lp.group]
        gl = None
        if shard.dim == 1:
            gkey = ("tp-group", g.name, shard.offset, shard.size)
            if gkey not in cache or cache[gkey][0] is not g:
                cache[gkey] = (g, shard_group(g, shard.offset, shard.size))
            gl = cache[gkey][1]
        lv, gv = shard_layer(lp, g, shard, gl)
        cache[key] = (lp, (bias_once(lv, shard), gv))
    return cache[key][1]


def bias_once(lp: LayerPlan, shard: LayerShard) -> LayerPlan:
    """A row-parallel layer as its op runs on this rank: the bias only at coordinate 0 (the
    all-reduce of the partial outputs adds it once)."""
    if shard.dim == 1 and shard.index != 0 and lp.bias is not None:
        return dataclasses.replace(lp, bias=None)
    return lp


def shard_fingerprint(t: torch.Tensor) -> str:
    """weight_fingerprint of this rank's local part of `t` (a DTensor's shard; any other tensor whole)."""
    return weight_fingerprint(local_tensor(t))


def check_dtensor(name: str, t, expected: str | None) -> str:
    """Check DTensor parameter `t` against the plan's fingerprint `expected` and return the
    fingerprint of its local shard, which the per-call guard watches.  `expected` is either this
    rank's shard's (a rank-local plan, or a replicated parameter) or, when its shape is the whole
    tensor's, the whole tensor's: then the shards are gathered (a collective, see the module docstring)."""
    local = shard_fingerprint(t)
    if expected is not None and expected.partition(":")[0] != local.partition(":")[0]:
        got = weight_fingerprint(t)
    else:
        got = local
    if got != expected:
        raise PlanMismatchError(stale_message(name, expected, got))
    return local


def local_views(plan: QuantPlan) -> dict[str, tuple[LayerShard, LayerPlan, GroupPlan]]:
    """Every layer this process runs as a tensor-parallel shard: name -> (its shard, the layer and
    the group as this rank holds them); what explain() shows."""
    out = {name: (shard, plan.layers[name], plan.groups[plan.layers[name].group])
           for name, shard in rank_local_layers(plan).items()}
    for key, (src, view) in state_of(plan).constants.items():
        if isinstance(key, tuple) and key[0] == "tp" and plan.layers.get(key[1]) is src:
            out[key[1]] = (key[2], *view)
    return out


def check_unsharded(plan: QuantPlan, name: str) -> None:
    """Refuse a rank-local plan's layer on a plain (not DTensor) weight."""
    held = plan.calibration.get(TP_KEY, {}).get(name)
    if held is not None:
        raise PlanMismatchError(f"layer {name!r}: the plan holds one rank's shard of it "
                                f"({LayerShard.from_record(held).describe()}), the model's weight is not a DTensor; "
                                "use the full plan, or parallelize the model first")


def _local_fingerprints(name: str, lp: LayerPlan, w, b) -> dict:
    """The rank-local plan's fingerprints of layer `name`: its weight's and bias's local shards',
    after checking the whole tensors against the full plan's (gathered: every rank calls this)."""
    out = {}
    for key, t, expected in (("fingerprint", w, lp.fingerprint), ("bias_fingerprint", b, lp.bias_fingerprint)):
        if t is None or expected is None:
            if (t is None) != (expected is None):
                raise PlanMismatchError(f"layer {name!r}: the plan was made {'with' if expected else 'without'} "
                                        f"a bias, the model's layer has {'one' if t is not None else 'none'}")
            continue
        if local_tensor(t).untyped_storage().nbytes() == 0 and local_tensor(t).numel():
            raise PlanMismatchError(f"layer {name!r}: its weights were released (free_weights); make the "
                                    "rank-local plan before compiling with free_weights=True")
        out[key] = check_dtensor(f"{name}.{'weight' if key == 'fingerprint' else 'bias'}", t, expected)
    return out


def shard_plan(plan: QuantPlan, model: torch.nn.Module) -> QuantPlan:
    """The rank-local plan of this rank for `model` after `parallelize_module`: every planned layer
    whose weight is a DTensor keeps only this rank's shard (see the module docstring), everything else
    is shared with `plan`.  The model's sharded weights and biases are checked against the plan's
    fingerprints (gathered, so every rank calls shard_plan, in the same order); the rank-local plan
    holds their shards' fingerprints instead.  Save it per rank (`plan.save(f"model.rank{rank}.fqplan")`)
    to let each rank load only its part; the backend uses it as it is."""
    if rank_local_layers(plan):
        raise ValueError("shard_plan() takes the full model's plan; this one already holds one rank's shards")
    params = dict(model.named_parameters())
    out = dataclasses.replace(plan, groups=dict(plan.groups), layers=dict(plan.layers),
                              skipped=dict(plan.skipped), calibration=dict(plan.calibration),
                              parameters=dict(plan.parameters))
    record, local_groups = {}, {}
    for name, lp in plan.layers.items():
        w = params.get(name + ".weight")
        if w is None:
            raise PlanMismatchError(f"plan layer {name!r} does not exist in this {type(model).__name__}")
        shard = layer_shard(w)
        if shard is None or shard.dim is None:
            continue
        g = plan.groups[lp.group]
        key = (shard.offset, shard.size) if shard.dim == 1 else None
        if key is not None and lp.group in local_groups and local_groups[lp.group][0] != key:
            raise PlanMismatchError(f"layers of group {lp.group!r} read one input but hold different channels")
        gl = None
        if key is not None:
            gl = local_groups.setdefault(lp.group, (key, shard_group(g, *key)))[1]
        lv, g_local = shard_layer(lp, g, shard, gl)
        out.layers[name] = dataclasses.replace(lv, **_local_fingerprints(name, lp, w, params.get(name + ".bias")))
        if g_local is not g:
            out.groups[lp.group] = g_local
        record[name] = shard.record()
        if out.parameters:
            out.parameters[name + ".weight"] = list(local_tensor(w).shape)   # the shard this rank's layer reads
    for gname, (_, gl) in local_groups.items():
        unsharded = [l for l in plan.groups[gname].layers if l in plan.layers and l not in record]
        if unsharded:
            raise PlanMismatchError(f"group {gname!r}: {unsharded} are not row-parallel like the rest of the group")
    out.calibration[TP_KEY] = record
    return out
