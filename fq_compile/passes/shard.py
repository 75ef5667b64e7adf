"""The rewrite's tensor-parallel side: a linear whose weight is a DTensor becomes this rank's local ops.

Dynamo traces a model parallelised with ColwiseParallel / RowwiseParallel into graphs where each
such linear reads `x = DTensor.from_local(h, mesh, placements)` (the style's input hook; under
torch 2.11 a `prim from_local` function with the mesh fixed inside, under 2.13 a call with the mesh
as a graph input) and DTensor parameters, and returns a DTensor that the style's output hook
redistributes (all-reduces a row-parallel output) and turns back into a local tensor.  For each:

  * its local input is h (what from_local wraps, the same values), or `x.to_local()` for any other
    DTensor input; linears reading the same h (q/k/v: one from_local call each) share one quantize,
    and the fold analysis looks at h's producer through the from_local calls;
  * the plan's layer for this rank comes from runtime/tensor_parallel.py (`layer_shard`, `local_layer`);
  * the op's local output is wrapped back with `DTensor.from_local(y, mesh, placements)`, the
    placements Dynamo recorded for the linear's output (Shard(-1) for a column-parallel linear,
    Partial for a row-parallel one), so the graph after it is unchanged.

Inputs are checked against the layer's style: replicated for column-parallel, sharded on the last
dimension like the weight's channels for row-parallel; anything else is refused with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from fq_compile.passes.match import example_value
from fq_compile.plan import GroupPlan, LayerPlan, PlanMismatchError, QuantPlan
from fq_compile.runtime.tensor_parallel import (
    LayerShard,
    dtensor_class,
    is_dtensor,
    layer_shard,
    local_layer,
)


@dataclass
class TPLinear:
    """One DTensor linear of a graph as this rank runs it."""

    layer: LayerPlan          # the rank's part of the plan's layer
    group: GroupPlan          # its group as the rank sees it (its own channel map when row-parallel)
    shard: LayerShard
    mesh: object              # the weight's DeviceMesh
    out_placements: tuple     # what Dynamo recorded for the linear's output


def tp_linear(plan: QuantPlan, name: str, node: fx.Node, x: fx.Node, weight) -> TPLinear | None:
    """The rank's view of linear `node` (layer `name`, input node `x`, weight value `weight`), or None
    when the weight is not a DTensor."""
    shard = layer_shard(weight)
    if shard is None:
        return None
    from torch.distributed.tensor import Partial, Replicate, Shard

    xv, yv = example_value(x), example_value(node)
    if not is_dtensor(xv) or not is_dtensor(yv):
        raise PlanMismatchError(f"layer {name!r}: the weight is a DTensor but the linear's input or output is not "
                                "(parallelize the model with torch.distributed.tensor.parallel styles)")
    mesh = weight.device_mesh
    if xv.device_mesh != mesh:
        raise PlanMismatchError(f"layer {name!r}: input and weight live on different device meshes")
    wp, xp, yp = tuple(weight.placements), tuple(xv.placements), tuple(yv.placements)
    if shard.dim == 1:
        ok = all(isinstance(a, Replicate) if not isinstance(w, Shard) else
                 (type(a) is Shard and a.dim % xv.ndim == xv.ndim - 1) for a, w in zip(xp, wp))
        ok = ok and all(isinstance(p, Partial) for p, w in zip(yp, wp) if isinstance(w, Shard))
        want = "sharded on its last dimension (RowwiseParallel)"
    else:
        ok = all(isinstance(a, Replicate) for a in xp)
        want = "replicated (ColwiseParallel)"
        if shard.dim == 0 and shard.full[0] % shard.count:
            raise PlanMismatchError(f"layer {name!r}: {shard.full[0]} output channels do not split evenly over "
                                    f"{shard.count} ranks (uneven column-parallel shards are not supported)")
    if not ok:
        raise PlanMismatchError(f"layer {name!r}: weight placements {wp} need an input {want}; this graph has input "
                                f"placements {xp} and output placements {yp}")
    lp, g = local_layer(plan, name, shard)
    return TPLinear(lp, g, shard, mesh, yp)


def local_input(gm: fx.GraphModule, x: fx.Node, memo: dict) -> tuple[fx.Node, fx.Node]:
    """(the node of x's local tensor, the node that reads it on the linear's behalf): h and the
    from_local node for x = from_local(h, ...), else a `x.to_local()` node (made once per x) twice."""
    src = from_local_input(x)
    if src is not None:
        return src, x
    if x not in memo:
        with gm.graph.inserting_after(x):
            memo[x] = gm.graph.call_method("to_local", (x,))
        xv = example_value(x)
        if is_dtensor(xv):
            memo[x].meta["example_value"] = xv._local_tensor     # the rewrite reads its device and dtype
    return memo[x], memo[x]


def wrap_output(gm: fx.GraphModule, y: fx.Node, tp: TPLinear) -> fx.Node:
    """DTensor.from_local(y, mesh, the linear's output placements), inserted after y."""
    with gm.graph.inserting_after(y):
        return gm.graph.call_function(from_local_fn(tp.mesh, tp.out_placements), (y,))


def from_local_fn(mesh, placements):
    """A function t -> DTensor.from_local(t, mesh, placements) for a graph node: the mesh and the
    placements are fixed when the graph is rewritten, as Dynamo fixes them in its own from_local calls."""
    DTensor = dtensor_class()
    placements = tuple(placements)

    def fq_tp_from_local(t):
        return DTensor.from_local(t, mesh, placements, run_check=False)

    return fq_tp_from_local


def from_local_input(node) -> fx.Node | None:
    """For a node computing DTensor.from_local(t, ...) (whichever way Dynamo recorded it), the node
    of t; None for anything else."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.args):
        return None
    DTensor = dtensor_class()
    target = node.target
    if DTensor is None or not (target is DTensor.from_local or "from_local" in getattr(target, "__name__", "")):
        return None
    src = node.args[0]
    if not is_dtensor(example_value(node)) or not isinstance(src, fx.Node) or is_dtensor(example_value(src)):
        return None
    return src


_LAYOUT_NAMES = ("from_local", "to_local", "redistribute")


def layout_change_input(node) -> fx.Node | None:
    """For a node that only changes a tensor's DTensor view or layout (from_local, to_local,
    redistribute, however Dynamo recorded them), the node of the tensor it reads; None for anything
    else.  Per-channel scaling commutes with these (they move or add values, never mix channels),
    so the fold analysis (passes/fold.py) looks through them."""
    if not isinstance(node, fx.Node) or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    if node.op == "call_method" and node.target in ("to_local", "redistribute"):
        return node.args[0]
    if node.op == "call_function" and any(k in getattr(node.target, "__name__", "") for k in _LAYOUT_NAMES):
        return node.args[0]
    return None
