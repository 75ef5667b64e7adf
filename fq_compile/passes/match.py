"""Small helpers over Dynamo's FX graphs, written once so every pass reads graphs the same way."""

from __future__ import annotations

import operator
import re

import torch
import torch.fx as fx

LINEAR_TARGETS = (torch._C._nn.linear, torch.nn.functional.linear)

_MODULE_RE = re.compile(r"_modules\['([^']+)'\]|_parameters\['([^']+)'\]|_buffers\['([^']+)'\]")


def source_name(node: fx.Node) -> str | None:
    """Dynamo's name of where a placeholder's value comes from, e.g. "L['self']._modules['model']
    ._parameters['weight']" (a method in some torch versions, a property in others)."""
    if node.op != "placeholder":
        return None
    source = getattr(node.meta.get("grapharg"), "source", None)
    if source is None:
        return None
    name = source.name() if callable(getattr(source, "name", None)) else getattr(source, "name", None)
    return name if isinstance(name, str) else None


def param_fqn(node: fx.Node) -> str | None:
    """The fully-qualified name of the parameter a placeholder stands for, or None.

    Dynamo records where each graph input came from (e.g. L['self']._modules['model']...
    ._parameters['weight']); we read that source rather than un-mangling the placeholder's name,
    which is ambiguous when module names contain underscores."""
    name = source_name(node)
    if name is None or "_parameters[" not in name:
        return None
    parts = [a or b or c for a, b, c in _MODULE_RE.findall(name)]
    return ".".join(parts) if parts else None


_SOURCE_HEAD = re.compile(r"([LG])\['([^'\\]+)'\]")
_SOURCE_STEP = re.compile(r"\.([A-Za-z_]\w*)|\[(-?\d+)\]|\['([^'\\]*)'\]")


def _resolve_source(expr: str, f_locals, f_globals):
    """The object a Dynamo source name denotes, read from the traced frame's locals/globals; only
    subscripts and plain attribute reads are followed.  None when the name has another form."""
    m = _SOURCE_HEAD.match(expr)
    if m is None:
        return None
    scope = f_locals if m.group(1) == "L" else f_globals
    if not hasattr(scope, "get") or m.group(2) not in scope:
        return None
    obj, pos = scope[m.group(2)], m.end()
    while pos < len(expr):
        m = _SOURCE_STEP.match(expr, pos)
        if m is None:
            return None
        attr, idx, key = m.groups()
        try:
            if attr is not None:
                if attr.startswith("__"):
                    return None
                obj = getattr(obj, attr)
            else:
                obj = obj[int(idx)] if idx is not None else obj[key]
        except Exception:
            return None
        pos = m.end()
    return obj


def owner_modules(gm: fx.GraphModule, example_inputs, weights: dict[fx.Node, str]) -> dict[str, torch.nn.Module]:
    """The modules whose `weight` each placeholder in `weights` (placeholder -> layer name) is, found
    through the frame Dynamo is tracing while it calls the backend.  Layers that cannot be found
    (another source form, no frame being traced) are left out."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
    except Exception:
        tx = None
    tx = getattr(getattr(tx, "output", None), "root_tx", None) or tx
    if tx is None:
        return {}
    f_locals, f_globals = getattr(tx, "f_locals", None), getattr(tx, "f_globals", None)
    runtime = placeholder_inputs(gm, example_inputs)
    found = {}
    for node, layer in weights.items():
        name = source_name(node)
        if name is None or not name.endswith("._parameters['weight']"):
            continue
        module = _resolve_source(name[: -len("._parameters['weight']")], f_locals, f_globals)
        if isinstance(module, torch.nn.Module) and getattr(module, "weight", None) is runtime.get(node):
            found[layer] = module
    return found


def is_linear(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in LINEAR_TARGETS


def linear_args(node: fx.Node):
    """(input, weight, bias) of a linear call, whichever way the arguments were passed."""
    args = list(node.args) + [None] * (3 - len(node.args))
    x = node.kwargs.get("input", args[0])
    w = node.kwargs.get("weight", args[1])
    b = node.kwargs.get("bias", args[2])
    return x, w, b


def example_value(node) -> torch.Tensor | None:
    if not isinstance(node, fx.Node):
        return None
    v = node.meta.get("example_value", node.meta.get("val"))
    return v if isinstance(v, torch.Tensor) else None


def placeholder_inputs(gm: fx.GraphModule, example_inputs) -> dict[fx.Node, object]:
    """Map each placeholder to the runtime tensor Dynamo passes for it."""
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return dict(zip(phs, example_inputs))


def layer_name(weight_fqn: str) -> str:
    return weight_fqn[: -len(".weight")] if weight_fqn.endswith(".weight") else weight_fqn


def is_getitem(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is operator.getitem


class ParamNames:
    """Absolute parameter names for a graph's placeholders.

    Dynamo names a parameter relative to the frame it traced: the whole model normally, but after a
    graph break inside a submodule the frame's `self` is that submodule (so 'self_attn.q_proj.weight'
    instead of 'model.layers.0.self_attn.q_proj.weight').  With the model at hand (calibration) we
    name each input by identity; with only a plan (compile time) we find the frame's prefix from a
    linear weight whose values match exactly one planned layer ending in the relative name."""

    def __init__(self, gm: fx.GraphModule, example_inputs, by_id: dict[int, str] | None = None,
                 known: dict[str, str | None] | None = None):
        runtime = placeholder_inputs(gm, example_inputs)
        self.names: dict[fx.Node, str] = {}
        rel = {n: param_fqn(n) for n in runtime if param_fqn(n) is not None}
        if by_id is not None:
            for n, t in runtime.items():
                name = by_id.get(id(t), rel.get(n))
                if name is not None:
                    self.names[n] = name
            return
        prefix = ""
        if known:
            prefix = self._prefix(gm, rel, runtime, known)
        self.names = {n: prefix + r for n, r in rel.items()}

    @staticmethod
    def _prefix(gm, rel, runtime, known) -> str:
        """The frame's prefix: from a linear weight whose relative name (e.g. 'mlp.fc1.weight', or
        just 'weight' when the frame is the linear's own forward) ends exactly one planned layer's
        weight name, or several of which only one has this weight's fingerprint."""
        from fq_compile.runtime.guards import fingerprint

        weights = [linear_args(n)[1] for n in gm.graph.nodes if is_linear(n)]
        weights = [w for w in weights if w in rel]
        if any(layer_name(rel[w]) in known for w in weights):
            return ""
        for w in weights:
            r = rel[w]
            cands = [k for k in known if (k + ".weight").endswith("." + r)]
            t = runtime.get(w)
            if isinstance(t, torch.Tensor) and len(cands) > 1:
                fp = fingerprint(t)
                cands = [k for k in cands if known[k] == fp]
            if len(cands) == 1:
                full = cands[0] + ".weight"
                return full[: len(full) - len(r)]
        return ""

    def __call__(self, node) -> str | None:
        return self.names.get(node) if isinstance(node, fx.Node) else None
