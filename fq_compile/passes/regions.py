"""Regional compilation: each repeated decoder block compiled once, not once per block.

Inductor's compile time grows linearly with the number of decoder blocks (0.67 s a block for plain Inductor,
0.95 s for ours on the CPU; 141 of the 167 s of OPT-1.3B's first generate() on the H100:
benchmarks/NOTES-decode.md).  Yet after our rewrite most blocks are the same program on other tensors.
This pass finds them in the rewritten graph and outlines each block into a call of the higher-order op
`invoke_subgraph` (what torch.compiler.nested_compile_region produces), every block with the same program
calling the same body:

    y0, k0 = invoke_subgraph(fq_block_0, "fq_block_0", hidden, mask, cache_k_0, <plan tensors of block 0>)
    y1, k1 = invoke_subgraph(fq_block_0, "fq_block_0", y0,     mask, cache_k_1, <plan tensors of block 1>)

AOTAutograd traces a body once per identifier and Inductor lowers it once (ir.InvokeSubgraph), so the
compile work is one block's per distinct body; the generated code calls it once per block, inside the same
compiled graph (one CUDA-graph replay per decode step stays one).  Side effects inside a block (a static KV
cache's in-place update) stay inside the body.

What a block is: the nodes whose `nn_module_stack` puts them under the same numbered child of one module
list (`...layers.7`), the list with the most children; nodes our rewrite added without a stack (the
activation quantize) join the block of their users.  The plan's tensors (get_attr buffers) and every other
value the block reads from outside become operands, so two blocks share a body when their node sequences
are the same op for op (targets, constants, local wiring) and their operands agree in shape, stride, dtype
and device -- the condition under which one traced body is correct for both.  A flattened layer's K'
differs from layer to layer in a calibrated plan; planning pads blocks to a few common sets of K'
(planning/align.py) so that they share, and blocks that still differ get bodies of their own: correct,
only less saving (the report says how many distinct bodies a graph has).  A block that reads a tensor's
value as a Python number (`.item()`) stays inline: a body is traced on fake operands.

A block whose nodes interleave with outside work that depends on them is left inline.  The outlined graph
is a new GraphModule over the same buffers; the backend keeps the original and compiles that instead if
Inductor refuses the outlined one (a warning says so).
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass, field

import torch
from torch import fx

_NUMBERED = re.compile(r"^(?P<prefix>.+?)(?:\.(?P<dot>\d+)|\[(?P<bracket>\d+)\])$")


@dataclass
class RegionReport:
    """What outlining did to one graph: blocks found, outlined, distinct bodies, and why not where not."""
    blocks: int = 0
    outlined: int = 0
    bodies: int = 0
    note: str = ""
    skipped: dict[str, str] = field(default_factory=dict)      # block -> reason

    def summary(self) -> str:
        if not self.blocks:
            return "regional compilation: no repeated blocks in this graph"
        s = (f"regional compilation: {self.outlined} of {self.blocks} blocks outlined into {self.bodies} "
             f"compiled bod{'y' if self.bodies == 1 else 'ies'}")
        return s + (f" ({self.note})" if self.note else "")


# -- which block a node belongs to ---------------------------------------------------------------------

def _numbered(stack: dict | None) -> tuple[str, int] | None:
    """(module-list path, index) of the outermost numbered module in a node's nn_module_stack."""
    for value in (stack or {}).values():
        path = value[0] if isinstance(value, tuple) else str(value)
        m = _NUMBERED.match(path)
        if m:
            return m.group("prefix"), int(m.group("dot") or m.group("bracket"))
    return None


def assign_blocks(graph: fx.Graph, inserted: set[fx.Node] | None = None) -> dict[fx.Node, int]:
    """node -> block index for the call nodes of the module list with the most numbered children.
    inserted: the nodes our passes added (None: those without an nn_module_stack); each joins the
    block all its users are in."""
    found = {n: _numbered(n.meta.get("nn_module_stack")) for n in graph.nodes if n.op in ("call_function", "call_method")}
    per_prefix: dict[str, set[int]] = {}
    for key in found.values():
        if key:
            per_prefix.setdefault(key[0], set()).add(key[1])
    if not per_prefix:
        return {}
    prefix = max(per_prefix, key=lambda p: len(per_prefix[p]))
    if len(per_prefix[prefix]) < 2:
        return {}
    block = {n: key[1] for n, key in found.items() if key and key[0] == prefix}
    if inserted is None:
        inserted = {n for n in graph.nodes if "nn_module_stack" not in n.meta}
    for n in reversed(list(graph.nodes)):
        if n in inserted and n.op in ("call_function", "call_method") and n not in block and n.users:
            owners = {block.get(u) for u in n.users}
            if len(owners) == 1 and None not in owners:
                block[n] = owners.pop()
    return block


# -- one block as a body -------------------------------------------------------------------------------

@dataclass
class _Block:
    index: int
    members: list[fx.Node]
    inputs: list[fx.Node]
    outputs: list[fx.Node]
    signature: tuple | None = None


def _inputs_outputs(members: list[fx.Node]) -> tuple[list[fx.Node], list[fx.Node]]:
    inside = set(members)
    inputs: dict[fx.Node, None] = {}
    for n in members:
        for a in n.all_input_nodes:
            if a not in inside:
                inputs[a] = None
    outputs = [n for n in members if any(u not in inside for u in n.users)]
    return list(inputs), outputs


_VALUE_READS = {"item", "tolist"}


def _reads_a_value(n: fx.Node) -> bool:
    """x.item() / x.tolist() / aten._local_scalar_dense: a data-dependent Python number.  AOTAutograd traces
    an invoke_subgraph body on fake operands, where such a read has no value (DataDependentOutputException
    on the H100, OPT-1.3B compiled with dynamic=True: its layer norms' eps lifted to graph inputs)."""
    if n.op == "call_method":
        return n.target in _VALUE_READS
    return n.op == "call_function" and n.target in (torch.ops.aten._local_scalar_dense.default,
                                                     torch.ops.aten._local_scalar_dense)


def _why_not(members: list[fx.Node], outputs: list[fx.Node], order: dict[fx.Node, int]) -> str | None:
    """Why this block cannot become one call placed at its last node (None: it can)."""
    for n in members:
        if _reads_a_value(n):
            return (f"{n.name} reads a tensor's value as a Python number (a float attribute Dynamo lifted to an "
                    "input under dynamic=True?): a traced body cannot")
    last = order[members[-1]]
    inside = set(members)
    for n in outputs:
        for u in n.users:
            if u not in inside and order[u] < last:
                return f"{u.name} reads {n.name} between the block's nodes"
    if not outputs:
        return "nothing outside reads it"
    return None


def _tensor_meta(v) -> tuple | None:
    if isinstance(v, torch.Tensor):
        return ("tensor", tuple(map(str, v.shape)), tuple(map(str, v.stride())), str(v.dtype), str(v.device),
                bool(v.requires_grad))
    if isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return ("sym", type(v).__name__, str(v))
    return None


def _input_meta(gm: fx.GraphModule, n: fx.Node) -> tuple | None:
    if n.op == "get_attr":
        return _tensor_meta(operator.attrgetter(n.target)(gm))
    for key in ("val", "example_value"):
        meta = _tensor_meta(n.meta.get(key))
        if meta is not None:
            return meta
    return None


def _key(a, local: dict[fx.Node, tuple]):
    """A hashable, exact stand-in for an argument: nodes by their place in the block (`local`), constants
    by type and repr (floats to the last bit), inline tensors by identity."""
    if isinstance(a, fx.Node):
        return local[a]
    if isinstance(a, (list, tuple)):
        return (type(a).__name__, tuple(_key(x, local) for x in a))
    if isinstance(a, dict):
        return ("dict", tuple((k, _key(x, local)) for k, x in a.items()))
    if isinstance(a, slice):
        return ("slice", _key(a.start, local), _key(a.stop, local), _key(a.step, local))
    if isinstance(a, torch.Tensor):
        return ("tensor-id", id(a))
    return (type(a).__name__, repr(a))


def _signature(gm: fx.GraphModule, b: _Block) -> tuple | None:
    """The block's program and operand metadata; None when an operand's metadata is unknown (no sharing)."""
    local = {n: ("in", i) for i, n in enumerate(b.inputs)}
    local.update({n: ("n", i) for i, n in enumerate(b.members)})
    metas = tuple(_input_meta(gm, n) for n in b.inputs)
    if any(m is None for m in metas):
        return None
    program = tuple((n.op, n.target if isinstance(n.target, str) else id(n.target), _key(n.args, local),
                     _key(n.kwargs, local)) for n in b.members)
    return program, metas, tuple(local[o] for o in b.outputs)


def _body(b: _Block) -> fx.GraphModule:
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for i, n in enumerate(b.inputs):
        p = g.placeholder(f"arg{i}")
        p.meta = dict(n.meta)
        env[n] = p
    for n in b.members:
        env[n] = g.node_copy(n, env.__getitem__)
    g.output(tuple(env[o] for o in b.outputs))
    return fx.GraphModule(torch.nn.Module(), g, class_name="FqBlock")


def _replace(graph: fx.Graph, b: _Block, name: str, remap: dict[fx.Node, fx.Node]) -> None:
    """b's nodes -> one invoke_subgraph call; remap: outputs of blocks replaced before -> their getitems."""
    inside = set(b.members)
    with graph.inserting_after(b.members[-1]):
        attr = graph.get_attr(name)
    with graph.inserting_after(attr):
        call = graph.call_function(torch.ops.higher_order.invoke_subgraph,
                                   (attr, name, *(remap.get(i, i) for i in b.inputs)))
    after = call
    for i, o in enumerate(b.outputs):
        with graph.inserting_after(after):
            item = graph.call_function(operator.getitem, (call, i))
        item.meta = dict(o.meta)
        o.replace_all_uses_with(item, delete_user_cb=lambda u: u not in inside)
        remap[o] = item
        after = item
    for n in reversed(b.members):
        graph.erase_node(n)


# -- the pass ------------------------------------------------------------------------------------------

def outline_blocks(gm: fx.GraphModule, inserted: set[fx.Node] | None = None,
                   min_repeats: int = 2) -> tuple[fx.GraphModule, RegionReport]:
    """A new GraphModule over gm's buffers in which every block whose body at least `min_repeats` blocks
    share is one invoke_subgraph call; gm itself is left as it was.  inserted: the nodes of gm our
    passes added (see assign_blocks)."""
    report = RegionReport()
    graph = fx.Graph()
    copies: dict[fx.Node, fx.Node] = {}
    graph.output(graph.graph_copy(gm.graph, copies))
    for old, copy in copies.items():       # what Dynamo keeps on its placeholders besides meta
        if hasattr(old, "_dynamo_source"):
            copy._dynamo_source = old._dynamo_source
    block_of = assign_blocks(graph, None if inserted is None else {copies[n] for n in inserted if n in copies})
    if not block_of:
        return gm, report
    order = {n: i for i, n in enumerate(graph.nodes)}
    members: dict[int, list[fx.Node]] = {}
    for n in graph.nodes:
        if n in block_of:
            members.setdefault(block_of[n], []).append(n)
    report.blocks = len(members)
    blocks = []
    for index in sorted(members):
        ms = members[index]
        inputs, outputs = _inputs_outputs(ms)
        why = _why_not(ms, outputs, order)
        if why:
            report.skipped[str(index)] = why
            continue
        b = _Block(index, ms, inputs, outputs)
        b.signature = _signature(gm, b)
        if b.signature is None:
            report.skipped[str(index)] = "an operand's shape is unknown"
            continue
        blocks.append(b)
    by_signature: dict[tuple, list[_Block]] = {}
    for b in blocks:
        by_signature.setdefault(b.signature, []).append(b)
    shared = [bs for bs in by_signature.values() if len(bs) >= min_repeats]
    if not shared:
        report.note = f"no two of {report.blocks} blocks are the same program on same-shaped operands"
        return gm, report
    new = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    new.meta = dict(getattr(gm, "meta", {}))
    for attr in ("_param_name_to_source",):       # what AOTAutograd reads of a Dynamo graph's buffers
        if hasattr(gm, attr):
            setattr(new, attr, getattr(gm, attr))
    body_of = {}
    for k, bs in enumerate(shared):
        new.add_submodule(f"fq_block_{k}", _body(bs[0]))
        body_of.update((b.index, f"fq_block_{k}") for b in bs)
    remap: dict[fx.Node, fx.Node] = {}
    for b in sorted((b for bs in shared for b in bs), key=lambda b: b.index):   # graph order: inputs remapped
        _replace(new.graph, b, body_of[b.index], remap)
    report.outlined, report.bodies = len(body_of), len(shared)
    single = sum(len(bs) for bs in by_signature.values() if len(bs) < min_repeats)
    if single:
        report.note = f"{single} block(s) unlike any other stay inline"
    new.graph.lint()
    new.recompile()
    return new, report
