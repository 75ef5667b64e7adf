"""Attention in Dynamo graphs: find it, observe its Q/K/V at calibration, replace it with fq::attention.

transformers 5.x gives two forms (seen on Llama and OPT, with and without a KV cache):

    sdpa   scaled_dot_product_attention(q, k, v, attn_mask=None|mask, dropout_p, is_causal, scale, enable_gqa)
    eager  matmul(q, k.transpose(-2, -1)) [* scaling] [+ mask] -> softmax(-1, float32) [-> to] [-> dropout]
           -> matmul(p, v)                                          (attn_implementation="eager")

Grouped-query attention reaches SDPA either with enable_gqa (K/V with their kv heads) or through
transformers' repeat_kv (expand + reshape), which we undo so that the kernel reads each kv head once.
A K or V that comes out of the 8-bit KV cache (`fq.dequantize_heads`, runtime/kv_cache.py) is handed
to the kernel as the 8-bit tensor it dequantizes when its scale is the plan's.

Each site is named after the module that owns its query projection (the parent of Q's nearest
linear, e.g. model.layers.0.self_attn).  The rewrite is

    qq = fq.quantize_heads(q, 1/q_scale, int8|fp8)      (likewise k, v; Inductor fuses these into RoPE;
                                                         v is stored keys-contiguous: `_keys_contiguous`)
    o  = fq.attention(qq, kq, vq, q_scale, k_scale, v_scale, mask, causal, scale, kv_block, dtype, kv_splits)

kv_splits > 1 (split keys, flash-decoding) for a decode step on a GPU: one query row per head would
otherwise give the GPU batch x kv heads programs to run; the split is chosen from the graph's shapes and
the device's SM count (kernels/attention.py choose_kv_splits) and is part of the op's semantics.

Left as they are, with the reason in explain(): dropout in training, logit soft-capping (tanh
between the products), additive terms besides the mask (ALiBi, position bias: in the eager form;
by the module's configuration in either form, checked at calibration), sliding windows (by the
module's configuration), attention weights read elsewhere (output_attentions), 3-D bmm forms, and
anything else between the two products.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from fq_compile.kernels.attention import FORMATS, choose_kv_splits, inverse_scale
from fq_compile.kernels.dispatch import device_info, size_hint
from fq_compile.passes.lower import _const, _param_names
from fq_compile.passes.match import example_value, is_linear, layer_name, linear_args, placeholder_inputs
from fq_compile.passes.observe import AttentionObserver, AttentionStats, StatsStore
from fq_compile.plan import AttentionPlan, PlanMismatchError, QuantPlan
from fq_compile.runtime.state import device_tensor, state_of

F = torch.nn.functional
_SDPA = {torch._C._nn.scaled_dot_product_attention, F.scaled_dot_product_attention}
_MATMUL = {torch.matmul, operator.matmul}
_BMM = {torch.bmm, torch.baddbmm}
_SOFTMAX = {F.softmax, torch.softmax}
_MUL = {operator.mul, torch.mul}
_DIV = {operator.truediv, torch.div}
_ADD = {operator.add, torch.add}
_TANH = {torch.tanh, F.tanh}
_CASTS = {"to", "float", "half", "bfloat16", "type_as"}


@dataclass
class AttentionSite:
    node: fx.Node                        # the node that yields the attention output [B, Hq, M, Dv]
    form: str                            # "sdpa" | "eager"
    q: fx.Node | None = None
    k: fx.Node | None = None             # [B, Hkv, N, D]: repeat_kv undone
    v: fx.Node | None = None
    mask: fx.Node | None = None
    causal: bool = False
    scale: float | None = None           # None: 1/sqrt(D), as SDPA
    chain: list[fx.Node] = field(default_factory=list)   # eager: the nodes the op replaces
    name: str | None = None
    v_layer: str | None = None
    reason: str = ""                     # non-empty: left in floating point


@dataclass
class AttentionReport:
    site: str
    op: str
    reason: str = ""


# ------------------------------------------------------------------------------------------------
# matching
# ------------------------------------------------------------------------------------------------

def _fn(n, targets) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_function" and n.target in targets


def _method(n, *names) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_method" and n.target in names


def _arg(n: fx.Node, i: int, name: str, default=None):
    if len(n.args) > i:
        return n.args[i]
    return n.kwargs.get(name, default)


def _unrepeat(n):
    """x for transformers' repeat_kv(x) (x[:, :, None].expand(...).reshape(...)) or
    x.repeat_interleave(r, dim=1); else n."""
    if _method(n, "reshape") or _fn(n, {torch.reshape}):
        e = n.args[0]
        if _method(e, "expand"):
            g = e.args[0]
            idx = g.args[1] if _fn(g, {operator.getitem}) else None
            if isinstance(idx, tuple) and len(idx) == 5 and idx[2] is None:
                return g.args[0]
    if _method(n, "repeat_interleave") or _fn(n, {torch.repeat_interleave}):
        if _arg(n, 2, "dim") == 1:
            return n.args[0]
    return n


def _sdpa_site(node: fx.Node) -> AttentionSite:
    q, k, v = (_arg(node, i, nm) for i, nm in enumerate(("query", "key", "value")))
    site = AttentionSite(node, "sdpa", q=q, k=_unrepeat(k), v=_unrepeat(v), mask=_arg(node, 3, "attn_mask"),
                         causal=bool(_arg(node, 5, "is_causal", False)), scale=_arg(node, 6, "scale"))
    p = _arg(node, 4, "dropout_p", 0.0)
    if not isinstance(p, (int, float)) or p != 0:
        site.reason = f"dropout in training (dropout_p={p})"
    return site


def _continues_scores(n, depth: int = 8) -> bool:
    """Whether n is (a scaled/cast form of) a Q.K^T product: which side of `scores + mask` continues."""
    for _ in range(depth):
        if _fn(n, _MATMUL):
            return True
        if _fn(n, _MUL | _DIV | _ADD | _TANH) or _method(n, "mul", "div", "add", "tanh", *_CASTS):
            n = n.args[0]
            continue
        return False
    return False


def _eager_site(sm: fx.Node) -> AttentionSite | None:
    """The eager pattern around softmax node `sm`, or None when sm is not attention's softmax."""
    x = example_value(sm)
    dim = _arg(sm, 1, "dim")
    if x is None or x.dim() < 3 or dim not in (-1, x.dim() - 1):
        return None
    reason, scale, mask = "", 1.0, None
    chain = [sm]
    n = sm.args[0]
    while not _fn(n, _MATMUL):
        if not isinstance(n, fx.Node):
            return None
        if len(n.users) != 1:
            reason = reason or "the attention scores are read elsewhere"
        chain.append(n)
        if _fn(n, _TANH) or _method(n, "tanh"):
            reason = "attention logit soft-capping (tanh between the products)"
            n = n.args[0]
        elif _fn(n, _ADD) or _method(n, "add"):
            a, b = n.args[0], n.args[1]
            scores, other = (a, b) if _continues_scores(a) else (b, a)
            if not _continues_scores(scores):
                return None
            if mask is not None or not isinstance(other, fx.Node):
                reason = "an additive term besides the mask (ALiBi / position bias)"
            mask = other
            n = scores
        elif (_fn(n, _MUL) or _method(n, "mul")) and isinstance(n.args[1], (int, float)):
            scale *= float(n.args[1])
            n = n.args[0]
        elif (_fn(n, _MUL) or _method(n, "mul")) and isinstance(n.args[0], (int, float)):
            scale *= float(n.args[0])
            n = n.args[1]
        elif (_fn(n, _DIV) or _method(n, "div")) and isinstance(n.args[1], (int, float)):
            scale /= float(n.args[1])
            n = n.args[0]
        elif _method(n, *_CASTS):
            n = n.args[0]
        else:
            return None
    qk = n
    chain.append(qk)
    q, kt = qk.args[0], qk.args[1]
    # forward: softmax -> [cast] -> [dropout] -> matmul(., v)
    y = sm
    while True:
        users = list(y.users)
        if len(users) != 1:
            reason = reason or "the attention weights are read elsewhere (output_attentions?)"
            return AttentionSite(sm, "eager", reason=reason, q=q)
        u = users[0]
        if _method(u, *_CASTS):
            chain.append(u)
        elif _fn(u, {F.dropout}):
            p, training = _arg(u, 1, "p", 0.5), _arg(u, 2, "training", True)
            if training and p != 0:
                reason = reason or f"dropout in training (p={p})"
            chain.append(u)
        elif _fn(u, _MATMUL) and u.args[0] is y:
            pv = u
            break
        else:
            return None
        y = u
    chain.append(pv)
    site = AttentionSite(pv, "eager", q=q, mask=mask, scale=scale, chain=chain, reason=reason)
    k = None
    if _method(kt, "transpose") and {_norm_dim(d, 4) for d in kt.args[1:3]} == {2, 3}:
        k = kt.args[0]
        if len(kt.users) == 1:
            chain.append(kt)
    if k is None:
        site.reason = site.reason or "the key operand is not k.transpose(-2, -1)"
    site.k, site.v = _unrepeat(k) if k is not None else None, _unrepeat(pv.args[1])
    qv = example_value(q)
    if qv is None or qv.dim() != 4:
        site.reason = site.reason or "not 4-D [batch, heads, seq, dim] attention"
    return site


def _norm_dim(d, ndim):
    return d + ndim if isinstance(d, int) and d < 0 else d


def _linear_ancestor(n, name_of, limit: int = 64) -> str | None:
    """The layer name of the nearest linear upstream of n (breadth first, not through linears)."""
    seen, frontier = set(), [n]
    while frontier and len(seen) < limit:
        nxt = []
        for x in frontier:
            if not isinstance(x, fx.Node) or x in seen:
                continue
            seen.add(x)
            if is_linear(x):
                fqn = name_of(linear_args(x)[1])
                if fqn is not None:
                    return layer_name(fqn)
                continue
            nxt.extend(x.all_input_nodes)
        frontier = nxt
    return None


def find_attention(gm: fx.GraphModule, name_of) -> list[AttentionSite]:
    """Every attention site of the graph, named, with the reason where it cannot be quantized."""
    sites = []
    for node in gm.graph.nodes:
        if _fn(node, _SDPA):
            sites.append(_sdpa_site(node))
        elif _fn(node, _SOFTMAX) or _method(node, "softmax"):
            site = _eager_site(node)
            if site is not None:
                sites.append(site)
        elif _fn(node, _BMM) and any(_fn(u, _SOFTMAX) or _method(u, "softmax") for u in node.users):
            sites.append(AttentionSite(node, "bmm", reason="3-D bmm attention (heads folded into the batch)"))
    for site in sites:
        q_layer = _linear_ancestor(site.q, name_of) if site.q is not None else None
        if q_layer is not None:
            site.name = q_layer.rsplit(".", 1)[0] if "." in q_layer else q_layer
        elif not site.reason:
            site.reason = "no linear projection found upstream of Q"
        if site.v is not None:
            site.v_layer = _linear_ancestor(site.v, name_of)
        if not site.reason:
            site.reason = _shape_reason(site)
    return sites


def _shape_reason(site: AttentionSite) -> str:
    q, k, v = (example_value(x) for x in (site.q, site.k, site.v))
    if q is None or k is None or v is None:
        return "Q/K/V shapes unknown"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return "not 4-D [batch, heads, seq, dim] attention"
    if q.shape[1] % k.shape[1] or k.shape[1] != v.shape[1]:
        return f"heads do not group: {q.shape[1]} query heads, {k.shape[1]} key heads, {v.shape[1]} value heads"
    if q.shape[-1] != k.shape[-1]:
        return "Q and K head dims differ"
    m = example_value(site.mask)
    if site.mask is not None and (m is None or m.dim() > 4):
        return "mask shape not broadcastable to [batch, heads, q, k]"
    return ""


def variant_reason(module: torch.nn.Module | None, config, layer_idx: int | None) -> str:
    """Attention variants the op does not implement, read from the attention module and the model
    config (calibration only: the graph shows a sliding window or ALiBi as nothing but a mask)."""
    cfg = getattr(module, "config", None) or config
    if cfg is not None and hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    window = getattr(module, "sliding_window", None)
    types = getattr(cfg, "layer_types", None)
    if window is None and types is not None and layer_idx is not None and layer_idx < len(types):
        if "sliding" in str(types[layer_idx]):
            window = getattr(cfg, "sliding_window", None) or "?"
    if window is None and types is None and getattr(cfg, "sliding_window", None) and getattr(
            cfg, "use_sliding_window", True):
        window = cfg.sliding_window
    if window:
        return f"sliding-window attention (window {window})"
    if getattr(cfg, "attn_logit_softcapping", None):
        return f"attention logit soft-capping ({cfg.attn_logit_softcapping})"
    attn_cfg = getattr(cfg, "attn_config", None)
    if getattr(cfg, "alibi", False) or getattr(cfg, "model_type", "") == "bloom" or (
            isinstance(attn_cfg, dict) and attn_cfg.get("alibi")) or getattr(attn_cfg, "alibi", False) or \
            getattr(cfg, "position_embedding_type", "") == "alibi":
        return "ALiBi position bias"
    return ""


# ------------------------------------------------------------------------------------------------
# calibration
# ------------------------------------------------------------------------------------------------

def insert_attention_observers(gm: fx.GraphModule, store: StatsStore, sites: list[AttentionSite],
                               describe=None) -> fx.GraphModule:
    """An observer of (q, k, v) before each supported site; describe(name) -> (layer_idx, reason)
    adds what only the module knows.  Unsupported sites are recorded in store.attention_unsupported."""
    for i, site in enumerate(sites):
        name = site.name or f"<{site.form} {site.node.name}>"
        layer_idx, reason = describe(name) if describe and site.name else (None, "")
        reason = site.reason or reason
        if reason:
            store.attention_unsupported.setdefault(name, reason)
            continue
        stats = store.attention.get(name)
        if stats is None:
            stats = store.attention[name] = AttentionStats(name, v_layer=site.v_layer, layer_idx=layer_idx)
        mod = f"fq_observer_attn_{len(store.graphs)}_{i}"
        gm.add_submodule(mod, AttentionObserver(stats))
        with gm.graph.inserting_before(site.node):           # q, k and v all exist by then
            gm.graph.call_module(mod, (site.q, site.k, site.v))
    gm.graph.lint()
    gm.recompile()
    return gm


# ------------------------------------------------------------------------------------------------
# the rewrite
# ------------------------------------------------------------------------------------------------

def _scale_const(gm, plan, ap: AttentionPlan, key: str, t: torch.Tensor, device) -> fx.Node:
    return _const(gm, f"fq_attn_{ap.name}_{key}", device_tensor(plan, f"attn.{ap.name}.{key}", t, device))


def _inverse(plan, ap: AttentionPlan, which: str) -> torch.Tensor:
    """1/scale, built once per plan tensor (so every graph shares one device copy)."""
    src = getattr(ap, f"{which}_scale")
    key = f"attn.{ap.name}.{which}_inv"
    cache = state_of(plan).constants
    if key not in cache or cache[key][0] is not src:
        cache[key] = (src, inverse_scale(src))
    return cache[key][1]


def _cached_8bit(node, scale: torch.Tensor, dtype: torch.dtype, runtime) -> fx.Node | None:
    """The 8-bit tensor behind `fq.dequantize_heads(xq, s, ...)` when s holds the plan's scale."""
    if not _fn(node, {torch.ops.fq.dequantize_heads, torch.ops.fq.dequantize_heads.default}):
        return None
    xq, s = node.args[0], node.args[1]
    while _method(s, "to", "contiguous", "float"):       # a scale moved to the device in the traced code
        s = s.args[0]
    xv, sv = example_value(xq), runtime.get(s)
    if xv is None or xv.dtype != dtype or not isinstance(sv, torch.Tensor):
        return None
    return xq if torch.equal(sv.detach().float().cpu(), scale.float()) else None


def rewrite_attention(gm: fx.GraphModule, example_inputs, plan: QuantPlan) -> list[AttentionReport]:
    """Replace the plan's attention sites in gm with fq::attention; returns what was done per site."""
    if not plan.attention and not plan.attention_skipped:
        return []
    runtime = placeholder_inputs(gm, example_inputs)
    sites = find_attention(gm, _param_names(gm, example_inputs, runtime, plan))
    out = []
    for site in sites:
        name = site.name or f"<{site.form} {site.node.name}>"
        ap = plan.attention.get(site.name) if site.name else None
        if site.reason or ap is None:
            why = site.reason or plan.attention_skipped.get(name, "not observed during calibration")
            out.append(AttentionReport(name, "attention (floating point)", why))
            continue
        _check_shapes(site, ap)
        _replace(gm, site, ap, plan, runtime)
        out.append(AttentionReport(name, f"fq.attention (Q.K^T {ap.qk_format}, P.V {ap.pv_format})"))
    gm.graph.lint()
    gm.recompile()
    return out


def _check_shapes(site: AttentionSite, ap: AttentionPlan) -> None:
    q, k, v = (example_value(x) for x in (site.q, site.k, site.v))
    got = (q.shape[1], k.shape[1], q.shape[-1], v.shape[-1])
    want = (ap.num_heads, ap.num_kv_heads, ap.head_dim, ap.v_head_dim)
    if tuple(int(x) for x in got) != want:
        raise PlanMismatchError(f"attention {ap.name}: the plan was made for (heads, kv heads, head dim, v dim) {want}, "
                                f"this graph has {tuple(int(x) for x in got)}")


def _kv_splits(qv: torch.Tensor, kv: torch.Tensor, ap: AttentionPlan) -> int:
    """Split keys (flash-decoding) for a decode-sized attention on a GPU (kernels/attention.py's
    choose_kv_splits from the graph's shapes -- a dynamic size by its example value -- and the device's
    SM count, 0 on the CPU); part of the op's semantics, fixed in the graph."""
    def hint(x):
        return size_hint(x) or 1

    rep = ap.num_heads // ap.num_kv_heads
    return choose_kv_splits(hint(qv.shape[0]), ap.num_kv_heads, hint(qv.shape[2]) * rep, hint(kv.shape[2]),
                            ap.kv_block, device_info(qv.device).sm_count)


def _keys_contiguous(g: fx.Graph, vq: fx.Node) -> fx.Node:
    """V [B, H, N, D] quantized in the graph, stored keys-contiguous (stride 1 along N; the values and
    the shape unchanged).  In P.V, V is the operand whose reduction runs over the keys, and the 8-bit
    tensor-core instructions (wgmma, mma.sync) take 8-bit operands only reduction-contiguous ("K-major"),
    so a D-contiguous V is transposed tile by tile inside the kernel; stored this way it is read as it
    lies.  Inductor writes the layout in the quantize's own kernel (a permuted store), so it costs no
    pass of its own.  Measured on the kernel alone (H100, 8 x 2048, 32/8 heads, D 128, INT8/INT8):
    1.770 -> 1.228 ms (results/attention-decode-2026-12-07-h100.md, "V^T").  A V read from the 8-bit
    KV cache keeps the cache's layout."""
    t = g.call_method("transpose", (vq, -1, -2))
    return g.call_method("transpose", (g.call_method("contiguous", (t,)), -1, -2))


def _replace(gm: fx.GraphModule, site: AttentionSite, ap: AttentionPlan, plan: QuantPlan, runtime) -> None:
    qv = example_value(site.q)
    device = qv.device
    dqk, dpv = FORMATS[ap.qk_format], FORMATS[ap.pv_format]
    scale = site.scale if site.scale is not None else 1.0 / math.sqrt(qv.shape[-1])
    out_dtype = example_value(site.node).dtype
    splits = _kv_splits(qv, example_value(site.k), ap)
    g = gm.graph
    with g.inserting_before(site.node):
        consts = {w: _scale_const(gm, plan, ap, f"{w}s", getattr(ap, f"{w}_scale"), device) for w in "qkv"}
        inv = {w: _scale_const(gm, plan, ap, f"{w}i", _inverse(plan, ap, w), device) for w in "qkv"}
        quant = {}
        for w, node, dt in (("q", site.q, dqk), ("k", site.k, dqk), ("v", site.v, dpv)):
            cached = _cached_8bit(node, getattr(ap, f"{w}_scale"), dt, runtime) if w != "q" else None
            quant[w] = cached if cached is not None else g.call_function(
                torch.ops.fq.quantize_heads.default, (node, inv[w], dt))
            if w == "v" and cached is None:
                quant[w] = _keys_contiguous(g, quant[w])
        new = g.call_function(torch.ops.fq.attention.default,
                              (quant["q"], quant["k"], quant["v"], consts["q"], consts["k"], consts["v"], site.mask,
                               site.causal, float(scale), ap.kv_block, out_dtype, splits))
    new.meta.update(site.node.meta)
    if site.form == "sdpa":
        old_kv = [_arg(site.node, 1, "key"), _arg(site.node, 2, "value")]
    else:
        old_kv = [site.node.args[1]] + [n.args[0] for n in site.chain if _method(n, "transpose")]
    site.node.replace_all_uses_with(new)
    dead = {site.node, *site.chain}
    while dead:                 # the replaced nodes, users first
        free = [n for n in dead if not n.users]
        if not free:
            break
        for n in free:
            g.erase_node(n)
            dead.discard(n)
    for n in old_kv + [site.k, site.v]:
        _erase_unused_reads(g, n)


_PURE_READS = {operator.getitem, torch.ops.fq.dequantize_heads, torch.ops.fq.dequantize_heads.default, torch.reshape}


def _erase_unused_reads(g: fx.Graph, n) -> None:
    """Erase the repeat_kv / dequantize nodes the rewrite left without readers (upstream, one input at a time)."""
    while isinstance(n, fx.Node) and not n.users and (_fn(n, _PURE_READS) or _method(n, "expand", "reshape")):
        src = n.args[0]
        g.erase_node(n)
        n = src
