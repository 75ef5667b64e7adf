"""The graph dump: what the compiler did to every linear layer, as text a person can read.

    explain(model)                       the short view: totals, one row per format, the layers that
                                         matter (largest flatten ratio / output error), the layers kept
                                         in floating point and why, one line per distinct kernel choice
    explain(model, full=True)            the same plus every layer's row (kernels named by legend keys)
    explain(model, fmt="csv")            the per-layer rows only, as CSV (fmt="markdown": a pipe table)

Every line of the text views fits in WIDTH characters (long cells wrap inside their column).
"""

from __future__ import annotations

import csv
import io
import math
import re
import textwrap

from tabulate import tabulate

from fq_compile.plan import QuantPlan
from fq_compile.runtime.state import reports
from fq_compile.runtime.tensor_parallel import local_views

WIDTH = 120    # the longest line of the text views
K_TILE = 128   # the GEMM kernels' K tile (int8 elements): what flattening costs the GEMM is counted in these
FORMATS = ("text", "csv", "markdown")


def _find_plan(obj) -> QuantPlan | None:
    """Dig the plan out of a torch.compile'd module: OptimizedModule -> dynamo context -> the
    backend wrapper that holds options={'plan': ...}.  Bounded search over known attribute names."""
    seen, frontier = set(), [obj]
    for _ in range(8):
        nxt = []
        for o in frontier:
            if o is None or id(o) in seen:
                continue
            seen.add(id(o))
            kw = getattr(o, "kwargs", None)
            if isinstance(kw, dict) and isinstance(kw.get("options"), dict):
                p = kw["options"].get("plan")
                if isinstance(p, QuantPlan):
                    return p
            for a in ("dynamo_ctx", "callback", "_torchdynamo_orig_backend", "_torchdynamo_orig_callable",
                      "_inner_convert", "compiler_fn", "_orig_backend"):
                nxt.append(getattr(o, a, None))
        frontier = nxt
    return None


# ------------------------------------------------------------------------------------------------
# layout helpers
# ------------------------------------------------------------------------------------------------

def _table(rows, headers=(), flex=(), fmt="simple", width=WIDTH, indent="") -> str:
    """tabulate, with the columns in `flex` (indices, shrunk first to last) wrapped so that every line
    fits in `width`.  Cells are strings (no number parsing: they stay as written)."""
    rows = [["" if c is None else str(c) for c in r] for r in rows]
    ncol = max([len(headers)] + [len(r) for r in rows]) if rows else len(headers)
    if not ncol:
        return ""
    nat = [0] * ncol
    for r in [list(headers)] + rows:
        for i, c in enumerate(r):
            nat[i] = max(nat[i], max((len(s) for s in c.splitlines()), default=0))
    room = width - len(indent) - 2 * (ncol - 1)
    widths = list(nat)
    for i in flex:
        excess = sum(widths) - room
        if excess <= 0:
            break
        floor = max(8, len(str(headers[i])) if i < len(headers) else 0)
        widths[i] = max(floor, widths[i] - excess)
    kw = {}
    if widths != nat:
        kw["maxcolwidths"] = [w if w != n else None for w, n in zip(widths, nat)]
    text = tabulate(rows, headers=list(headers), tablefmt=fmt, disable_numparse=True, **kw)
    return textwrap.indent(text, indent) if indent else text


def _lines(text: str, width=WIDTH, indent="", hang="    ") -> str:
    """One paragraph per input line, wrapped at `width`; continuation lines indented by `hang`."""
    return "\n".join(textwrap.fill(t, width, initial_indent=indent, subsequent_indent=indent + hang,
                                   break_on_hyphens=False, break_long_words=False) for t in text.splitlines())


def _pattern(name: str) -> str:
    """model.layers.7.mlp.down_proj -> model.layers.*.mlp.down_proj (to group repeated blocks)."""
    return re.sub(r"(?<=\.)\d+(?=\.|$)", "*", name)


def _grouped(names: list[str], what: str = "") -> str:
    """The name itself when one (with `what` in brackets), else the pattern and how many:
    'model.layers.*.x (30 layers, what)'."""
    if len(names) == 1:
        return names[0] + (f" ({what})" if what else "")
    pats = sorted(set(_pattern(n) for n in names))
    return ", ".join(pats) + f" ({len(names)}" + (f", {what})" if what else ")")


def _relative(target: str, layer: str) -> str:
    """A parameter or layer name relative to the block both live in: the smoothing column's names.
    'model.layers.0.input_layernorm.weight' seen from 'model.layers.0.self_attn.q_proj' -> 'input_layernorm'."""
    parts, mine = target.split("."), layer.split(".")
    if parts[-1] in ("weight", "bias"):
        parts = parts[:-1]
    i = 0
    while i < min(len(parts), len(mine)) - 1 and parts[i] == mine[i]:
        i += 1
    return ".".join(parts[i:])


def _smoothing(where: str, layer: str) -> str:
    """'norm:<fqn>[,<fqn>]' / 'rows:<layer>' / 'op' with the names made relative to the layer."""
    kind, _, names = where.partition(":")
    if not names:
        return where
    rel = list(dict.fromkeys(_relative(n, layer) for n in names.split(",")))
    return f"{kind}:{','.join(rel)}"


def _k_overhead(c: int, kp: int) -> str:
    """K' over the original K, in elements and in GEMM K tiles (what the GEMM time follows)."""
    tiles, base = -(-kp // K_TILE), -(-c // K_TILE)
    return f"+{100 * (kp / c - 1):.1f}% ({tiles}/{base} tiles)"


# ------------------------------------------------------------------------------------------------
# what the views are made of
# ------------------------------------------------------------------------------------------------

class _Legend:
    """Distinct strings named once: key -> (text, layers using it), keys numbered in order of first use."""

    def __init__(self, prefix: str):
        self.prefix, self.keys, self.layers = prefix, {}, {}

    def key(self, text: str, layer: str) -> str:
        k = self.keys.setdefault(text, f"{self.prefix}{len(self.keys) + 1}")
        self.layers.setdefault(k, {})[layer] = None
        return k

    def items(self):
        return [(k, text, list(self.layers[k])) for text, k in self.keys.items()]


def _collect(plan: QuantPlan):
    """Per-layer records (raw values and display strings) and the kernel legends, from the plan and
    the reports of every graph compiled with it."""
    forms: dict[str, list] = {}
    for rep in reports(plan):
        for lr in rep.layers:
            if lr.layer in plan.layers:
                forms.setdefault(lr.layer, []).append(lr)
    views = local_views(plan)     # tensor parallelism: the shapes this rank runs (runtime/tensor_parallel.py)
    quant, gemm, notes = _Legend("Q"), _Legend("G"), _Legend("n")
    records = []
    for name, lp in plan.layers.items():
        g = plan.groups[lp.group]
        shard = None
        if name in views:
            shard, lp, g = views[name]
        seen = forms.get(name, [])
        where = seen[-1].smoothing if seen else g.fold
        keys, ops, smooth_notes = [], [], []
        for lr in seen:
            op = lr.op + (f" +{lr.act}" if lr.act != "none" else "") + (f" [fused: {lr.fused}]" if lr.fused else "")
            ops.append(op)
            label = f"{lr.quantize}, {lr.scales} scale" if lr.scales else lr.quantize
            q = f"{label} ({lr.quantize_why})" if lr.quantize_why else (label or "-")
            gm = f"{op}: {lr.gemm}" + (f" ({lr.gemm_why})" if lr.gemm_why else "")
            pair = f"{quant.key(q, name)} {gemm.key(gm, name)}"
            if pair not in keys:
                keys.append(pair)
            if lr.reason:
                smooth_notes.append(notes.key(lr.reason, name))
        rel = _smoothing(where, name)
        if lp.rows_folded_from:
            where += f"; rows carry s of {lp.rows_folded_from.rsplit('.', 1)[-1]}"
            rel += f", rows<-{_relative(lp.rows_folded_from, name)}"
        if smooth_notes:
            rel += " [" + ",".join(dict.fromkeys(smooth_notes)) + "]"
        flat = lp.flattened
        records.append(dict(
            layer=name, format=lp.format, out_features=lp.out_features, in_features=lp.in_features,
            flat_features=g.flat_features if flat else lp.in_features, bits=lp.bits,
            threshold=g.threshold if flat else None,
            extra_channels=int(g.extra.sum() + g.weight_dup.sum()) if flat else None,
            flatten_ratio=g.flatten_ratio if flat else None,
            k_overhead=(g.flat_features / lp.in_features - 1) if flat else None,
            kl_ratio=lp.kl_ratio, out_error=lp.error, weight_bytes=lp.weight_bytes,
            smoothing=where, op=" + ".join(dict.fromkeys(ops)) if seen else "(not compiled yet)",
            activation_quantize="; ".join(dict.fromkeys(
                f"{lr.quantize} ({lr.quantize_why})" if lr.quantize_why else lr.quantize for lr in seen)) or "-",
            gemm_kernel="; ".join(dict.fromkeys(
                f"{lr.gemm} ({lr.gemm_why})" if lr.gemm_why else lr.gemm for lr in seen)) or "-",
            shard=f"{shard.describe()} of {shard.full[0]}x{shard.full[1]}" if shard else "",
            kept_reason="",
            # display strings
            _shape=f"{lp.out_features}x{lp.in_features}->" + (f"{g.flat_features}" if flat else
                                                               f"{lp.in_features} (not flattened)"),
            _T=f"{g.threshold:.4g}" if flat else "-",
            _flatten=f"{100 * g.flatten_ratio:.1f}%" if flat else "-",
            _kover=_k_overhead(lp.in_features, g.flat_features) if flat else "-",
            _err="-" if lp.error is None else f"{lp.error:.2e}",
            _smooth=rel, _kernels=", ".join(keys) or "(not compiled yet)"))
    for name, why in plan.skipped.items():
        shape = plan.parameters.get(name + ".weight", plan.parameters.get(name))
        records.append(dict(
            layer=name, format="fp", out_features=None, in_features=None, flat_features=None, bits=None,
            threshold=None, extra_channels=None, flatten_ratio=None, k_overhead=None, kl_ratio=None,
            out_error=None, weight_bytes=None, smoothing="-", op="linear (floating point)",
            activation_quantize="-", gemm_kernel="-", shard="", kept_reason=why,
            _shape="x".join(map(str, shape)) if shape else "-"))
    return records, views, (quant, gemm, notes)


def weight_bytes(plan: QuantPlan) -> dict | None:
    """The model's weight bytes before and after quantization, over every parameter (floating-point
    values at 2 bytes): {"before", "after", "quantized" (the quantized layers' weights, scales and
    biases), "kept" (every parameter left in floating point), "kept_linear" (the part of it in linear
    layers kept in floating point)}.  None for plans without the model's parameter list (synthetic or
    older files)."""
    if not plan.parameters:
        return None
    quantized = sum(lp.weight_bytes + (0 if lp.bias is None else lp.bias.numel() * 4) for lp in plan.layers.values())
    replaced = set()
    for name, lp in plan.layers.items():
        replaced.add(name + ".weight" if name + ".weight" in plan.parameters else name)
        if lp.bias is not None:
            replaced.add(name + ".bias")
    numel = {k: math.prod(v) for k, v in plan.parameters.items()}
    kept = 2 * sum(v for k, v in numel.items() if k not in replaced)
    return dict(before=2 * sum(numel.values()), after=quantized + kept, quantized=quantized, kept=kept,
                kept_linear=2 * sum(numel.get(s + ".weight", numel.get(s, 0)) for s in plan.skipped))


def _activation_scales(plan: QuantPlan) -> str:
    """How the flattened layers' activations are scaled: per token (each row at run time) or per tensor."""
    kinds = {}
    for lp in plan.layers.values():
        if lp.flattened:
            k = plan.groups[lp.group].activation_scale
            kinds[k] = kinds.get(k, 0) + 1
    names = {"token": "per token (static channel map, each row's own scale)", "tensor": "per tensor (static)"}
    return ", ".join(f"{names[k]}: {n} layers" for k, n in sorted(kinds.items(), reverse=True)) or "-"


def _byte_rows(plan: QuantPlan) -> list[list[str]]:
    """Weight bytes before and after (`weight_bytes`): what the quantized layers became, and what stayed
    in floating point (layers kept, MoE experts, embeddings, norms).  Plans without the model's parameter
    list report the quantized layers only, and say so."""
    mib = 2 ** 20
    wb = weight_bytes(plan)
    if wb is None:
        before = sum(lp.in_features * lp.out_features * 2 for lp in plan.layers.values())
        after = sum(lp.weight_bytes for lp in plan.layers.values())
        return [["weight bytes, fp16 -> quantized (quantized layers only)", f"{before / mib:.2f} MiB -> "
                 f"{after / mib:.2f} MiB" + (f" ({before / after:.2f}x smaller)" if after else "")]]
    before, after, quantized, kept, kept_linear = (wb[k] for k in ("before", "after", "quantized", "kept",
                                                                    "kept_linear"))
    return [
        ["model weight bytes, fp16 -> after", f"{before / mib:.2f} MiB -> {after / mib:.2f} MiB" + (
            "" if not after else f" ({before / after:.2f}x smaller)" if after <= before else
            f" ({after / before:.2f}x larger)")],
        ["after: quantized layers", f"{quantized / mib:.2f} MiB"],
        ["after: kept in floating point", f"{kept / mib:.2f} MiB ({100 * kept / before:.1f}% of the model's weights; "
                                          f"{kept_linear / mib:.2f} MiB of it in linear layers kept in floating "
                                          "point, the rest embeddings, norms, ...)" if before else "-"],
    ]


def _totals(plan: QuantPlan, views) -> list[list[str]]:
    n = len(plan.layers)
    n4 = sum(lp.bits == 4 for lp in plan.layers.values())
    flat = [plan.groups[lp.group].flatten_ratio for lp in plan.layers.values() if lp.flattened]
    macs = sum(lp.out_features * lp.in_features for lp in plan.layers.values())
    macs_flat = sum(lp.out_features * (plan.groups[lp.group].flat_features if lp.flattened else lp.in_features)
                    for lp in plan.layers.values())
    params = sum(lp.in_features * lp.out_features for lp in plan.layers.values())
    params4 = sum(lp.in_features * lp.out_features for lp in plan.layers.values() if lp.bits == 4)
    counts = {}
    for lp in plan.layers.values():
        counts[lp.format] = counts.get(lp.format, 0) + 1
    totals = [
        ["level", plan.config.level],
        ["weight scales", f"per {'output channel' if plan.config.weight_granularity == 'channel' else 'tensor'}"],
        ["activation scales (INT8/INT4 layers)", _activation_scales(plan)],
        ["quantized linear layers", f"{n} of {n + len(plan.skipped)} ({len(plan.skipped)} kept in floating point)"],
        ["formats", ", ".join(f"{f} {c}" for f, c in sorted(counts.items())) or "-"],
        ["INT4 share of layers / of weights", f"{100 * n4 / n:.1f}% / {100 * params4 / params:.1f}%" if n else "-"],
        ["average flatten ratio (flattened layers)", f"{100 * sum(flat) / len(flat):.1f}%" if flat else "-"],
        ["GEMM work added by K' (weighted by N*K)", f"+{100 * (macs_flat / macs - 1):.1f}%" if macs else "-"],
        ["block alignment",
         plan.calibration.get("align", "off (Config.align_budget=0)").removeprefix("block alignment: ")],
        *([["bit patterns (INT4/INT8 per block)",
            plan.calibration["bits_patterns"].removeprefix("bit patterns: ")]] if "bits_patterns" in plan.calibration
          else []),
        *_byte_rows(plan),
        ["graphs compiled", str(len(reports(plan)))],
        *_region_rows(plan),
    ]
    if views:
        here = sum(lp.weight_bytes for lp in plan.layers.values() if lp.name not in views)
        here += sum(v[1].weight_bytes for v in views.values())
        ranks = sorted({(s.index, s.count) for s, _, _ in views.values() if s.dim is not None})
        where = ", ".join(f"{i}/{n}" for i, n in ranks)
        styles = {}
        for s, _, _ in views.values():
            styles[s.describe()] = styles.get(s.describe(), 0) + 1
        totals.append(["tensor parallel (this rank)", f"{len(views)} layers sharded, rank {where} ("
                       + ", ".join(f"{k} of the full weight: {c}" for k, c in styles.items())
                       + f"); quantized weight bytes here {here / 2**20:.2f} MiB"])
    auto = plan.calibration.get("auto")
    if auto:
        mode, value = plan.config.auto_budget
        budget = (f"memory budget {value:g}x fp16 bytes" if mode == "memory" else
                  f"error budget {value:g}x naive FP8 per layer"
                  + (f", {len(auto['over_budget'])} layers over it (no format within)" if auto.get("over_budget") else ""))
        totals += [["auto", f"target {auto['target']}, {budget}; summed output error {auto['error']:.3g} "
                            f"(naive FP8 {auto['naive_fp8_error']:.3g}); linear time x{auto['time']:.3f} of bf16"]]
    return totals


def _format_rows(plan: QuantPlan, views) -> list[list[str]]:
    """One row per layer format: layers, share of the linear weights, bytes, flattening and what it adds."""
    mib = 2 ** 20
    per = {}
    for name, lp in plan.layers.items():
        g = plan.groups[lp.group]
        if name in views:
            _, lp, g = views[name]
        per.setdefault(lp.format, []).append((lp, g))
    skipped = {s: math.prod(plan.parameters.get(s + ".weight", plan.parameters.get(s, [0]))) for s in plan.skipped}
    total = sum(lp.in_features * lp.out_features for v in per.values() for lp, _ in v) + sum(skipped.values())
    rows = []
    for f, items in sorted(per.items()):
        params = sum(lp.in_features * lp.out_features for lp, _ in items)
        flat = [g.flatten_ratio for lp, g in items if lp.flattened]
        macs_flat = sum(lp.out_features * (g.flat_features if lp.flattened else lp.in_features) for lp, g in items)
        after = sum(lp.weight_bytes for lp, _ in items)
        rows.append([f, str(len(items)), f"{100 * params / total:.1f}%" if total else "-",
                     f"{2 * params / mib:.2f} -> {after / mib:.2f}",
                     f"{100 * sum(flat) / len(flat):.1f}%" if flat else "-",
                     f"+{100 * (macs_flat / params - 1):.1f}%" if params else "-"])
    if plan.skipped:
        params = sum(skipped.values())
        rows.append(["fp (kept)", str(len(plan.skipped)), f"{100 * params / total:.1f}%" if total else "-",
                     f"{2 * params / mib:.2f} -> {2 * params / mib:.2f}" if params else "-", "-", "-"])
    return rows


def _kept(records) -> str:
    """Layers kept in floating point, one paragraph per reason and shape (repeated blocks named once)."""
    groups = {}
    for r in records:
        if r["format"] == "fp":
            groups.setdefault((r["kept_reason"], r["_shape"], _pattern(r["layer"])), []).append(r["layer"])
    return "\n".join(_lines(f"{_grouped(names, '' if shape == '-' else shape)}: {why}", indent="  ")
                     for (why, shape, _), names in groups.items())


def _legend_lines(legend: _Legend, title: str) -> str:
    items = legend.items()
    if not items:
        return ""
    body = "\n".join(_lines(f"{k:<4}{len(layers):>4} layers  {text}", indent="  ", hang=" " * 18)
                     for k, text, layers in items)
    return f"{title}\n{body}"


def _region_rows(plan: QuantPlan) -> list[list[str]]:
    """How regional compilation (passes/regions.py) went, once per distinct outcome over the graphs."""
    seen: dict[str, list[int]] = {}
    for rep in reports(plan):
        if rep.regions:
            seen.setdefault(rep.regions.removeprefix("regional compilation: "), []).append(rep.index)
    return [["regional compilation" + (f" (graph{'s' if len(ix) > 1 else ''} {', '.join(map(str, ix))})"
                                       if len(seen) > 1 else ""), what] for what, ix in seen.items()]


# Issue 25: until the quantized attention kernels beat PyTorch's SDPA, say so wherever a plan quantizes attention.
ATTENTION_SPEED_NOTE = ("note: quantized attention is slower than PyTorch's SDPA on Hopper in prefill (H100, "
                        "2026-12-07: 0.31x INT8, 0.50x FP8 at 8 x 2048) and in short-context batch-1 decode (0.33x at "
                        "2k); faster where decode reads many KV bytes (batch 16-64 at 2k-32k: 1.25-1.88x) (issue 25)")


def _attention(plan: QuantPlan, full: bool) -> str:
    """Attention sites (passes/attention.py): formats, scales, and the op or why it stays in float.
    The short view groups quantized sites of one kind and names each reason for floating point once."""
    seen = {}
    for rep in reports(plan):
        for ar in getattr(rep, "attention", ()):
            seen[ar.site] = ar
    rows, fp = [], {}
    for name, ap in plan.attention.items():
        ar = seen.get(name)
        op = (ar.op + (f": {ar.reason}" if ar.reason else "")) if ar else "(not compiled yet)"
        rows.append([name, f"{ap.num_heads}/{ap.num_kv_heads} x {ap.head_dim}", ap.qk_format, ap.pv_format,
                     " / ".join(f"{float(getattr(ap, w + '_scale').max()):.3g}" for w in "qkv"), op])
    for name, ar in seen.items():
        if name not in plan.attention:
            fp.setdefault((f"{ar.op}: {ar.reason}", _pattern(name)), []).append(name)
            rows.append([name, "-", "fp", "fp", "-", f"{ar.op}: {ar.reason}"])
    for name, why in plan.attention_skipped.items():
        if name not in seen:
            fp.setdefault((f"attention (floating point): {why}", _pattern(name)), []).append(name)
            rows.append([name, "-", "fp", "fp", "-", f"attention (floating point): {why}"])
    if not rows:
        return ""
    headers = ["attention", "heads/kv x dim", "Q.K^T", "P.V", "max scale q / k / v", "op"]
    note = [_lines(ATTENTION_SPEED_NOTE)] if plan.attention else []
    if full:
        return "\n".join([_table(rows, headers, flex=(5, 0))] + note)
    kinds = {}
    for r in rows:
        if r[2] != "fp" or r[1] != "-":
            kinds.setdefault((r[1], r[2], r[3], r[5]), []).append(r[0])
    out = [f"attention sites: {len(rows) - sum(map(len, fp.values()))} quantized, "
           f"{sum(map(len, fp.values()))} in floating point"]
    if kinds:
        out.append(_table([[_grouped(n), *k] for k, n in kinds.items()],
                          ["quantized sites", "heads/kv x dim", "Q.K^T", "P.V", "op"], flex=(4, 0), indent="  "))
    if fp:
        out.append("  kept in floating point:\n"
                   + "\n".join(_lines(f"{_grouped(n)}: {why}", indent="    ") for (why, _), n in fp.items()))
    return "\n".join(out + note)


# ------------------------------------------------------------------------------------------------
# the views
# ------------------------------------------------------------------------------------------------

_CSV_FIELDS = ["layer", "format", "out_features", "in_features", "flat_features", "bits", "threshold",
               "extra_channels", "flatten_ratio", "k_overhead", "kl_ratio", "out_error", "weight_bytes",
               "smoothing", "op", "activation_quantize", "gemm_kernel", "shard", "kept_reason"]


def _export(records, fmt: str) -> str:
    """The per-layer rows with every string in full (no legend): CSV (raw numbers) or a markdown table."""
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, _CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        for r in records:
            w.writerow({k: ("" if r[k] is None else r[k]) for k in _CSV_FIELDS})
        return buf.getvalue()
    headers = ["layer", "format", "NxC->K'", "bits", "T", "extra ch", "flatten", "K' overhead", "KL4/KL8", "out err",
               "smoothing folded into", "op", "activation quantize", "GEMM kernel", "shard", "kept in fp because"]
    rows = [[r["layer"], r["format"], r["_shape"], r["bits"] or "-", r.get("_T", "-"),
             "-" if r["extra_channels"] is None else r["extra_channels"], r.get("_flatten", "-"),
             r.get("_kover", "-"), "-" if r["kl_ratio"] is None else f"{r['kl_ratio']:.3g}", r.get("_err", "-"),
             r["smoothing"], r["op"], r["activation_quantize"], r["gemm_kernel"], r["shard"] or "-",
             r["kept_reason"] or "-"] for r in records]
    rows = [[str(c).replace("|", "\\|") for c in row] for row in rows]
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True) + "\n"


def explain(obj, full: bool = False, top: int = 5, fmt: str = "text") -> str:
    """What the compiler did to every linear layer.  `obj` is a QuantPlan or a module compiled with
    backend='flattenquant'.

    The default view is short: the totals, one row per format, the `top` layers with the largest
    flatten ratio (with their K' overhead and output error) and, where errors were measured (level
    auto), with the largest output error, every layer kept in floating point with the reason, and one
    line per distinct activation-quantize and GEMM choice with its reason and how many layers use it.
    `full=True` adds every layer's row (format, bits, T, extra channels, flatten ratio, K' overhead,
    KL4/KL8, output error, where smoothing went, and the legend keys of its kernels) and, at level
    auto, every layer's reason.  `fmt="csv"` or `"markdown"` returns the per-layer rows alone with
    every string in full, to export."""
    plan = obj if isinstance(obj, QuantPlan) else _find_plan(obj)
    if plan is None:
        raise TypeError("explain() takes a QuantPlan or a model compiled with torch.compile(..., "
                        "backend='flattenquant', options={'plan': plan})")
    if fmt not in FORMATS:
        raise ValueError(f"explain(fmt={fmt!r}): one of {', '.join(FORMATS)}")
    records, views, (quant, gemm, notes) = _collect(plan)
    if fmt != "text":
        return _export(records, fmt)
    out = [f"fq_compile plan for {plan.model_type}", _table(_totals(plan, views), fmt="plain", flex=(1,))]
    fmts = _format_rows(plan, views)
    if fmts:
        out.append("per format:\n" + _table(fmts, ["format", "layers", "of linear weights", "MiB fp16 -> after",
                                                   "avg flatten ratio", "GEMM work added by K'"], indent="  "))
    quantized = [r for r in records if r["format"] != "fp"]
    if full and quantized:
        rows = [[r["layer"], r["format"], r["_shape"], r["bits"], r["_T"], r["extra_channels"] or "-",
                 r["_flatten"], r["_kover"], "-" if r["kl_ratio"] is None else f"{r['kl_ratio']:.3g}", r["_err"],
                 r["_smooth"], r["_kernels"]] + ([r["shard"] or "-"] if views else []) for r in quantized]
        headers = ["layer", "format", "NxC->K'", "bits", "T", "extra ch", "flatten", "K' overhead", "KL4/KL8",
                   "out err", "smoothing", "kernels"] + (["tensor-parallel shard"] if views else [])
        out.append(f"every quantized layer ({len(quantized)}; kernels: the legends below):\n"
                   + tabulate(rows, headers=headers, tablefmt="simple", disable_numparse=True))
        out.append(_lines("smoothing: where the layer's smoothing scales went, names relative to the layer's block; "
                   "norm:X folded into norm X's weight, rows:X into layer X's output rows, op: applied in the "
                   "quantize op; rows<-X: this layer's rows also carry X's smoothing"
                   + ("; [nK]: a note below" if notes.keys else ""), hang=""))
    elif quantized:
        flat = sorted((r for r in quantized if r["flatten_ratio"]),
                      key=lambda r: (-r["flatten_ratio"], -r["k_overhead"]))
        head = ["layer", "format", "NxC->K'", "T", "flatten", "K' overhead", "out err"]
        if flat:
            out.append(f"largest flatten ratio ({min(top, len(flat))} of {len(flat)} layers with extra channels):\n"
                       + _table([[r["layer"], r["format"], r["_shape"], r["_T"], r["_flatten"], r["_kover"], r["_err"]]
                                 for r in flat[:top]], head, flex=(0, 2), indent="  "))
        else:
            out.append("flattening: no layer has extra channels")
        err = sorted((r for r in quantized if r["out_error"] is not None), key=lambda r: -r["out_error"])
        if err:
            out.append(f"largest output error ({min(top, len(err))} of {len(err)} layers, relative MSE on "
                       "calibration rows):\n"
                       + _table([[r["layer"], r["format"], r["_shape"], r["_T"], r["_flatten"], r["_kover"], r["_err"]]
                                 for r in err[:top]], head, flex=(0, 2), indent="  "))
        else:
            out.append("per-layer output error: measured at level auto only")
    if plan.skipped:
        out.append(f"linear layers kept in floating point ({len(plan.skipped)}; shape, why):\n{_kept(records)}")
    q = _legend_lines(quant, "activation quantize (one line per distinct choice, with why):")
    g = _legend_lines(gemm, "GEMM (op: kernel (why), one line per distinct choice):")
    if q or g:
        out += [x for x in (q, g) if x]
    elif quantized:
        out.append("kernels: not compiled yet (explain() of the compiled model lists each choice and why)")
    if full and notes.keys:
        out.append(_legend_lines(notes, "notes:"))
    whys = [(name, lp) for name, lp in plan.layers.items() if lp.why]
    if whys:
        if not full:
            whys = sorted(whys, key=lambda t: -(t[1].error or 0))[:top]
        text = "\n".join(_lines(f"{name}: {lp.why}; candidates' errors: "
                                + ", ".join(f"{f} {e:.2e}" for f, e in (lp.errors or {}).items()), indent="  ")
                         for name, lp in whys)
        scope = "every layer" if full else f"the {len(whys)} layers with the largest output error"
        out.append(f"why each format ({scope}; candidates' output errors on calibration rows):\n{text}")
    att = _attention(plan, full)
    if att:
        out.append(att)
    if not full:
        out.append("every layer: explain(model, full=True); per-layer rows as CSV / markdown: "
                   "explain(model, fmt='csv' | 'markdown')")
    return "\n\n".join(out)
