"""Where can a group's smoothing scales s be folded into whatever produces its input, exactly?

X diag(s)^-1 costs nothing at run time if the producer already emits X / s:
  * LayerNorm / RMSNorm feeding q/k/v or fc1/gate/up: divide the norm's weight (and bias) by s;
  * ReLU(fc1) feeding fc2, SiLU(gate) * up feeding down_proj: divide fc1's / up's weight rows and
    bias by s (ReLU and the product commute with a positive per-channel scale);
  * attention feeding out_proj / o_proj: divide v_proj's rows by s, since softmax(QK^T) V mixes
    tokens, never channels.  With grouped-query attention one V head serves several query heads,
    so a per-channel s over all heads cannot be folded exactly: it stays in the op.
Everything else keeps s inside the activation quantize op (exact as well, just not free).

The analysis walks the graph backwards from the group's input through ops that only move data
(view, reshape, transpose, contiguous, dtype casts, eval-mode dropout; under tensor parallelism
DTensor's from_local / to_local / redistribute) and requires that every tensor on the way, from the
producer's output to the group's input, has exactly one reader (the graph's output counts as one),
so that scaling the producer changes nothing but this group: a KV cache that keeps V / s and is
returned to the caller, for instance, keeps s in the op.  The values
reach the attention through a concatenation only when every part comes from the same producer
(the past of a KV cache does not).  A row fold needs the producer and the group's input in the
same graph; calibration finds sites on its graphs, and the rewrite (passes/lower.py) checks them
again on each graph it compiles.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from fq_compile.passes.match import form_producing, is_move, layer_name
from fq_compile.passes.shard import layout_change_input

_SDPA = {torch._C._nn.scaled_dot_product_attention, torch.nn.functional.scaled_dot_product_attention}
_MATMUL = {torch.matmul, torch.bmm, operator.matmul}
_RELU = {torch.nn.functional.relu, torch.relu}
_SILU = {torch.nn.functional.silu}
_MUL = {operator.mul, torch.mul}
_LAYER_NORM = {torch.nn.functional.layer_norm}
_RMS_NORM = {getattr(torch.nn.functional, "rms_norm", None)} - {None}


@dataclass(frozen=True)
class FoldSite:
    kind: str                 # "norm", "rows" or "op"
    target: tuple[str, ...]   # norm: (weight fqn, bias fqn?); rows: (producer layer,); op: ()
    note: str = ""
    node: fx.Node | None = None   # the norm node (kind "norm") for the rewrite

    def encode(self) -> str:
        return "op" if self.kind == "op" else f"{self.kind}:{','.join(self.target)}"


def _is_observer(n: fx.Node) -> bool:
    return n.op == "call_module" and n.target.startswith("fq_observer_")


def _real_users(n: fx.Node) -> list[fx.Node]:
    return [u for u in n.users if not _is_observer(u)]


def _is_move(n: fx.Node) -> bool:
    """A data move (match.is_move), or a DTensor view/layout change under tensor parallelism (passes/shard.py)."""
    return layout_change_input(n) is not None or is_move(n)


def _walk_back(n):
    """Follow data-moving ops upstream from `n`; each node passed must feed only the next one.
    Returns the first node that is not a data move, or None when a tensor on the way (not `n`
    itself) has another reader."""
    while isinstance(n, fx.Node) and _is_move(n):
        src = n.args[0]
        if not isinstance(src, fx.Node) or len(_real_users(src)) != 1:
            return None
        n = src
    return n if isinstance(n, fx.Node) else None


def _sole_chain(n):
    """Like _walk_back, but `n` itself must have exactly one reader too (it is an operand of the
    op that consumes it, not the group's input)."""
    if not isinstance(n, fx.Node) or len(_real_users(n)) != 1:
        return None
    return _walk_back(n)


def _fn(n, targets) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_function" and n.target in targets


def _method(n, name) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_method" and n.target == name


def _planned_linear(n, planned: set[str], name_of) -> str | None:
    form = form_producing(n, name_of)
    if form is not None:
        fqn = name_of(form.weight)
        if fqn and layer_name(fqn) in planned:
            return layer_name(fqn)
    return None


def find_fold_site(x: fx.Node, group_nodes: set[fx.Node], planned: set[str], name_of) -> FoldSite:
    """Analyse the producer of input `x` (read by the linear nodes `group_nodes`)."""
    if set(_real_users(x)) - group_nodes:
        return FoldSite("op", (), "the input is also read by other ops")
    p = _walk_back(x)
    if p is None:
        return FoldSite("op", (), "the input passes through ops that are read elsewhere")
    # norms ---------------------------------------------------------------------------------------
    if _fn(p, _LAYER_NORM):
        w = p.args[2] if len(p.args) > 2 else p.kwargs.get("weight")
        b = p.args[3] if len(p.args) > 3 else p.kwargs.get("bias")
        wf = name_of(w) if isinstance(w, fx.Node) else None
        bf = name_of(b) if isinstance(b, fx.Node) else None
        if wf is None or (b is not None and bf is None):
            return FoldSite("op", (), "layer_norm without a parameter weight")
        return FoldSite("norm", (wf,) + ((bf,) if bf else ()), node=p)
    if _fn(p, _RMS_NORM):
        w = p.args[2] if len(p.args) > 2 else p.kwargs.get("weight")
        wf = name_of(w) if isinstance(w, fx.Node) else None
        if wf is None:
            return FoldSite("op", (), "rms_norm without a parameter weight")
        return FoldSite("norm", (wf,), node=p)
    if _fn(p, _MUL) or _method(p, "mul"):
        a, b = p.args[0], p.args[1]
        for w, other in ((a, b), (b, a)):
            wf = name_of(w) if isinstance(w, fx.Node) else None
            if wf is not None and w.meta.get("example_value") is not None and w.meta["example_value"].dim() == 1:
                return FoldSite("norm", (wf,), node=p)           # RMSNorm: weight * normalized(x)
        # SiLU(gate) * up  ->  fold into up's rows
        for act, up in ((a, b), (b, a)):
            act_src = _walk_back(act) if isinstance(act, fx.Node) else None
            if _fn(act_src, _SILU) or _method(act_src, "silu"):
                name = _planned_linear(_sole_chain(up), planned, name_of)
                if name:
                    return FoldSite("rows", (name,))
                return FoldSite("op", (), "the gated product's other factor is not a planned linear read only by it")
        return FoldSite("op", (), "product that is not a norm or a gated activation")
    # ReLU(fc1) -> fc2 ------------------------------------------------------------------------------
    if _fn(p, _RELU) or _method(p, "relu"):
        name = _planned_linear(_sole_chain(p.args[0]), planned, name_of)
        if name:
            return FoldSite("rows", (name,))
        return FoldSite("op", (), "ReLU input is not a planned linear read only by it")
    # attention -> out_proj: fold into v_proj ------------------------------------------------------
    if _fn(p, _SDPA) or _fn(p, _MATMUL):
        if _fn(p, _SDPA):
            v = p.args[2] if len(p.args) > 2 else p.kwargs.get("value")
            if p.kwargs.get("enable_gqa", False):
                return FoldSite("op", (), "grouped-query attention (one V head serves several heads)")
        else:
            v = p.args[1]
        return _value_producer(v, planned, name_of)
    what = getattr(p.target, "__name__", p.target)
    return FoldSite("op", (), f"producer {p.op} {what} does not commute with scaling")


def _value_producer(v, planned: set[str], name_of) -> FoldSite:
    """Walk the V operand back to v_proj; every tensor on the way must be read by nothing else (a
    KV cache holding V / s and returned to the caller would leak the fold); refuse repeat_kv (GQA)."""
    n = v
    while isinstance(n, fx.Node):
        if len(_real_users(n)) != 1:
            return FoldSite("op", (), "the attention values are also read elsewhere (e.g. a KV cache returned "
                                      "to the caller)")
        index = n.args[1] if _fn(n, {operator.getitem}) and isinstance(n.args[1], tuple) else ()
        if _method(n, "expand") or _fn(n, {torch.repeat_interleave}) or any(a is None for a in index):
            return FoldSite("op", (), "grouped-query attention (one V head serves several heads)")
        if _is_move(n):
            n = n.args[0]
            continue
        if _fn(n, {torch.cat}):
            parts = n.args[0] if n.args else n.kwargs.get("tensors", ())
            found = {_value_producer(part, planned, name_of) for part in parts}
            if len(found) == 1 and next(iter(found)).kind == "rows":
                return found.pop()          # every part from the same producer (never a KV cache's past)
            return FoldSite("op", (), "the attention values are concatenated with tensors from elsewhere "
                                      "(a KV cache)")
        name = _planned_linear(n, planned, name_of)
        if name:
            return FoldSite("rows", (name,))
        break
    return FoldSite("op", (), "attention values are not produced by a planned linear")
