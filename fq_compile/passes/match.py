"""Small helpers over Dynamo's FX graphs, written once so every pass reads graphs the same way.

This is the one place that finds linear layers and names their parameters.  A linear layer reaches
a Dynamo graph in one of three forms (seen with torch 2.13 and transformers 5.x):

    linear(x, W, b)          nn.Linear and most models (W stored [N, K])
    addmm(b, x2d, W)         GPT-2's Conv1D (W stored transposed, [K, N]) on the [M, K] view of x
    x @ W.T  (+ b)           Falcon's FalconLinear (W stored [N, K], the transpose taken in forward)

`linear_forms` returns each as a `LinearForm` (input, weight and bias nodes, whether the weight is
stored [K, N]); observe.py, fold.py and lower.py read only that.  Parameters of two or more
dimensions that a graph reads some other way (MoE experts as a grouped matmul over a 3-D parameter,
...) are named by `other_weight_reads` with the reason, so that they are listed as kept in floating
point instead of being invisible.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass

import torch
import torch.fx as fx

LINEAR_TARGETS = (torch._C._nn.linear, torch.nn.functional.linear)
_ADDMM = (torch.addmm,)
_MATMUL = (operator.matmul, torch.matmul, torch.mm)
_ADD = (operator.add, torch.add)
_EMBEDDING = (torch.nn.functional.embedding, torch.embedding)

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


@dataclass(frozen=True)
class LinearForm:
    """One linear layer y = x W^T + b as the graph computes it (see the module docstring)."""

    node: fx.Node                 # the call that reads x: linear, addmm or matmul
    x: fx.Node                    # the activation, [..., K]
    weight: fx.Node               # the weight's placeholder
    bias: fx.Node | None          # the bias's node (an argument of `node`, or the add that follows it)
    out: fx.Node                  # the node whose value is y: `node`, or the bias add after a matmul
    transposed: bool = False      # the parameter is stored [K, N] (Conv1D), not nn.Linear's [N, K]
    kind: str = "linear"          # "linear", "addmm" or "matmul"
    views: tuple[fx.Node, ...] = ()   # transposes between the parameter and `node` (dead once rewritten)

    def weight_shape(self) -> tuple[int, int] | None:
        """(N, K) of the layer, whichever way the parameter is stored."""
        v = example_value(self.weight)
        if v is None or v.dim() != 2:
            return None
        return (int(v.shape[1]), int(v.shape[0])) if self.transposed else (int(v.shape[0]), int(v.shape[1]))


@dataclass(frozen=True)
class LayerParams:
    """The parameters one linear layer reads, by fully-qualified name, as the graph names them."""

    weight: str
    bias: str | None = None
    transposed: bool = False      # weight stored [K, N]


def _call(node, targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


_ATEN_TRANSPOSES = tuple(t for name in ("numpy_T", "mT", "t") if hasattr(torch.ops.aten, name)
                         for t in (getattr(torch.ops.aten, name), getattr(torch.ops.aten, name).default))


def _transpose_of(node) -> fx.Node | None:
    """The 2-D tensor `node` transposes (W.T, W.t(), W.transpose(0, 1), W.permute(1, 0)), else None."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_function" and node.target is getattr and len(node.args) == 2 and node.args[1] in ("T", "mT"):
        return node.args[0]
    if _call(node, _ATEN_TRANSPOSES) and len(node.args) == 1:    # torch >= 2.14 traces W.T / W.mT as aten ops
        return node.args[0]
    if node.op == "call_function" and node.target is torch.t:
        return node.args[0]
    if node.op == "call_method" and node.target == "t":
        return node.args[0]
    if (node.op == "call_method" and node.target == "transpose") or _call(node, (torch.transpose,)):
        dims = {d % 2 for d in node.args[1:3] if isinstance(d, int)}
        return node.args[0] if dims == {0, 1} and len(node.args) == 3 else None
    if node.op == "call_method" and node.target == "permute":
        dims = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) else node.args[1:]
        return node.args[0] if tuple(d % 2 for d in dims if isinstance(d, int)) == (1, 0) and len(dims) == 2 else None
    return None


def _weight_operand(b, name_of) -> tuple[fx.Node, bool, tuple[fx.Node, ...]] | None:
    """For the right operand B of x @ B: (the parameter's placeholder, stored [K, N]?, transposes),
    when B is a 2-D model parameter or its transpose; None otherwise (an activation, a 3-D weight)."""
    views: list[fx.Node] = []
    transposed = True                       # x @ P multiplies by P as stored: P is [K, N]
    n = b
    while (src := _transpose_of(n)) is not None:
        views.append(n)
        transposed = not transposed
        n = src
    if not isinstance(n, fx.Node) or n.op != "placeholder" or name_of(n) is None:
        return None
    v = example_value(n)
    if v is None or v.dim() != 2:
        return None
    return n, transposed, tuple(views)


def _bias_add(node: fx.Node, n_out: int | None, name_of) -> tuple[fx.Node, fx.Node] | None:
    """(bias placeholder, add node) when `node`'s only user adds a 1-D parameter of size N to it."""
    if len(node.users) != 1:
        return None
    u = next(iter(node.users))
    is_add = (_call(u, _ADD) and "alpha" not in u.kwargs) or (u.op == "call_method" and u.target == "add"
                                                             and "alpha" not in u.kwargs)
    if not is_add or len(u.args) != 2:
        return None
    other = u.args[1] if u.args[0] is node else u.args[0] if u.args[1] is node else None
    v = example_value(other)
    if (not isinstance(other, fx.Node) or other.op != "placeholder" or name_of(other) is None or v is None
            or v.dim() != 1 or (n_out is not None and v.shape[0] != n_out)):
        return None
    return other, u


def linear_form(node: fx.Node, name_of) -> LinearForm | None:
    """`node` as a linear layer, or None.  name_of(node) names a parameter placeholder (None for
    anything else); addmm and matmul count only when their weight operand is a 2-D parameter."""
    if is_linear(node):
        x, w, b = linear_args(node)
        if b is None and isinstance(w, fx.Node):
            ev = example_value(w)
            hit = _bias_add(node, int(ev.shape[0]) if ev is not None and ev.dim() == 2 else None, name_of)
            if hit is not None:
                return LinearForm(node, x, w, hit[0], hit[1])
        return LinearForm(node, x, w, b, node)
    if _call(node, _ADDMM) and len(node.args) == 3 and all(node.kwargs.get(k, 1) == 1 for k in ("beta", "alpha")):
        b, x, w = node.args
        op = _weight_operand(w, name_of)
        ev = example_value(b)
        if (op is None or not isinstance(b, fx.Node) or b.op != "placeholder" or name_of(b) is None
                or ev is None or ev.dim() != 1):
            return None
        return LinearForm(node, x, op[0], b, node, transposed=op[1], kind="addmm", views=op[2])
    if _call(node, _MATMUL) and len(node.args) == 2 and not node.kwargs:
        x, w = node.args
        op = _weight_operand(w, name_of)
        xv = example_value(x)
        if op is None or xv is None or xv.dim() < 1:
            return None
        form = LinearForm(node, x, op[0], None, node, transposed=op[1], kind="matmul", views=op[2])
        shape = form.weight_shape()
        if shape is None or xv.shape[-1] != shape[1]:
            return None
        hit = _bias_add(node, shape[0], name_of)
        if hit is not None:
            form = LinearForm(node, x, op[0], hit[0], hit[1], transposed=op[1], kind="matmul", views=op[2])
        return form
    return None


def form_producing(node, name_of) -> LinearForm | None:
    """The linear layer whose output `node` is (the call itself, or the bias add after a matmul)."""
    if not isinstance(node, fx.Node):
        return None
    form = linear_form(node, name_of)
    if form is not None and form.out is node:
        return form
    for a in node.args if _call(node, _ADD) or (node.op == "call_method" and node.target == "add") else ():
        form = linear_form(a, name_of) if isinstance(a, fx.Node) else None
        if form is not None and form.out is node:
            return form
    return None


def linear_forms(gm: fx.GraphModule, name_of) -> list[LinearForm]:
    """Every linear layer of the graph, in graph order."""
    forms = []
    for node in gm.graph.nodes:
        form = linear_form(node, name_of)
        if form is not None:
            forms.append(form)
    return forms


def layer_params(form: LinearForm, name_of) -> LayerParams | None:
    """The names of the parameters `form` reads (None when its weight is not a model parameter)."""
    w = name_of(form.weight)
    if w is None:
        return None
    return LayerParams(w, name_of(form.bias) if form.bias is not None else None, form.transposed)


def _reader(node: fx.Node) -> str:
    t = node.target
    if node.op == "call_function":
        return str(t) if isinstance(t, torch._ops.OpOverloadPacket) else getattr(t, "__name__", str(t))
    return f"{node.op} {t}"


_PASS_THROUGH = {"to", "contiguous", "view", "reshape", "float", "half", "bfloat16", "expand", "unsqueeze", "squeeze",
                 "permute", "transpose", "flatten", "unflatten"}


def other_weight_reads(gm: fx.GraphModule, forms: list[LinearForm], name_of) -> dict[str, str]:
    """Parameters of 2+ dimensions the graph reads other than as a linear layer's weight or an
    embedding table, by layer name (the parameter's name without '.weight'), with the reason."""
    as_weight = {(f.node, f.weight) for f in forms}
    views = {v for f in forms for v in f.views}
    out: dict[str, str] = {}
    for ph in gm.graph.nodes:
        fqn = name_of(ph) if ph.op == "placeholder" else None
        v = example_value(ph)
        if fqn is None or v is None or v.dim() < 2:
            continue
        readers, frontier = [], list(ph.users)
        while frontier:
            u = frontier.pop()
            if u in views or (u, ph) in as_weight or _call(u, _EMBEDDING):
                continue
            if _transpose_of(u) is not None or is_getitem(u) or (u.op == "call_method" and u.target in _PASS_THROUGH):
                frontier.extend(u.users)
            elif not (u.op == "call_method" and u.target in ("size", "dim")):
                readers.append(u)
        if not readers:
            continue
        what = sorted({_reader(r) for r in readers})
        shape = tuple(v.shape)
        if v.dim() == 3 and ("expert" in fqn or any("grouped_mm" in w or "bmm" in w for w in what)):
            why = (f"MoE experts: a {shape} parameter (one weight per expert) read by {', '.join(what)}, a "
                   "grouped matmul whose rows per expert the router picks at run time; fq_compile has no "
                   "grouped INT GEMM, so the experts stay in floating point")
        elif "invoke_subgraph" in what:
            why = (f"a {shape} parameter read by invoke_subgraph: inside a nested compile region "
                   "(torch.compiler.nested_compile_region), which fq_compile does not rewrite; compile without "
                   "that marking (e.g. on the decoder layer class's forward)")
        else:
            why = (f"a {shape} parameter read by {', '.join(what)}, not as a linear layer "
                   "(linear, addmm or x @ W.T) that fq_compile rewrites")
        out[layer_name(fqn)] = why
    return out


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

        weights = [f.weight for f in linear_forms(gm, rel.get) if f.weight in rel]
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


# ops that only move data (fold analysis and producer description walk through them)
MOVE_METHODS = {"view", "reshape", "contiguous", "transpose", "permute", "to", "float", "half", "bfloat16",
                "clone", "flatten", "unflatten"}
MOVE_FUNCS = {torch.reshape, torch.transpose, torch.permute, torch.clone, torch.flatten}
_COPYING = {"transpose", "permute", "contiguous", "clone", torch.transpose, torch.permute, torch.clone}
# producers Inductor cannot fuse a consumer into: GEMMs, attention, our own ops, submodules
_OPAQUE_FUNCS = {*LINEAR_TARGETS, torch.matmul, torch.bmm, operator.matmul,
                 torch.nn.functional.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}


def is_move(n: fx.Node) -> bool:
    if n.op == "call_method":
        return n.target in MOVE_METHODS
    if n.op == "call_function":
        if n.target in MOVE_FUNCS:
            return True
        if n.target is torch.nn.functional.dropout:
            return n.kwargs.get("training", n.args[2] if len(n.args) > 2 else True) is False
    return False


def _target_name(n: fx.Node) -> str:
    t = n.target
    if isinstance(t, str):
        return t
    if isinstance(t, torch._ops.OpOverload):
        return str(t.overloadpacket).replace("torch.ops.", "").replace("::", ".")
    return getattr(t, "__name__", str(t))


def describe_producer(x: fx.Node) -> tuple[str, bool]:
    """(what computes x, whether Inductor can fuse a consumer into it), walking back through ops
    that only move data.  Fusable: pointwise and normalization ops (their output is recomputed
    inside the consumer's kernel), and any transpose copy (e.g. of attention's output), which the
    consumer can read through instead.  Not fusable: graph inputs, GEMMs, attention, our fq ops."""
    n, copies = x, False
    while isinstance(n, fx.Node) and is_move(n):
        copies = copies or n.target in _COPYING
        n = n.args[0]
    if not isinstance(n, fx.Node) or n.op in ("placeholder", "get_attr"):
        what = "a graph input"
    elif n.op == "call_module":
        what = f"module {n.target}"
    else:
        what = _target_name(n)
        opaque = n.target in _OPAQUE_FUNCS or (isinstance(n.target, torch._ops.OpOverload)
                                                 and n.target.namespace == "fq")
        if not opaque:
            return what, True
    if copies:
        return f"transpose copy of {what}", True
    return what, False
