"""The graph dump: what the compiler did to every linear layer, as a table a person can read."""

from __future__ import annotations

import math

from tabulate import tabulate

from fq_compile.plan import QuantPlan
from fq_compile.runtime.state import reports
from fq_compile.runtime.tensor_parallel import local_views


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


def _byte_rows(plan: QuantPlan) -> list[list[str]]:
    """Weight bytes before and after, over every parameter of the model (at 2 bytes per value in
    floating point): what the quantized layers became, and what stayed in floating point (layers
    kept, MoE experts, embeddings, norms).  Plans without the model's parameter list (synthetic or
    older files) report the quantized layers only, and say so."""
    mib = 2 ** 20
    quantized = sum(lp.weight_bytes + (0 if lp.bias is None else lp.bias.numel() * 4) for lp in plan.layers.values())
    if not plan.parameters:
        before = sum(lp.in_features * lp.out_features * 2 for lp in plan.layers.values())
        after = sum(lp.weight_bytes for lp in plan.layers.values())
        return [["weight bytes, fp16 -> quantized (quantized layers only)", f"{before / mib:.2f} MiB -> "
                 f"{after / mib:.2f} MiB" + (f" ({before / after:.2f}x smaller)" if after else "")]]
    replaced = set()
    for name, lp in plan.layers.items():
        replaced.add(name + ".weight" if name + ".weight" in plan.parameters else name)
        if lp.bias is not None:
            replaced.add(name + ".bias")
    numel = {k: math.prod(v) for k, v in plan.parameters.items()}
    before = 2 * sum(numel.values())
    kept = 2 * sum(v for k, v in numel.items() if k not in replaced)
    kept_linear = 2 * sum(numel.get(s + ".weight", numel.get(s, 0)) for s in plan.skipped)
    after = quantized + kept
    return [
        ["model weight bytes, fp16 -> after", f"{before / mib:.2f} MiB -> {after / mib:.2f} MiB"
                                              + (f" ({before / after:.2f}x smaller)" if after else "")],
        ["after: quantized layers", f"{quantized / mib:.2f} MiB"],
        ["after: kept in floating point", f"{kept / mib:.2f} MiB ({100 * kept / before:.1f}% of the model's weights: "
                                          f"{kept_linear / mib:.2f} MiB in the layers listed 'fp' above, the rest in "
                                          "embeddings, norms and other parameters)" if before else "-"],
    ]


K_TILE = 128   # the GEMM kernels' K tile (int8 elements): what flattening costs the GEMM is counted in these


def _k_overhead(c: int, kp: int) -> str:
    """K' over the original K, in elements and in GEMM K tiles (what the GEMM time follows)."""
    tiles, base = -(-kp // K_TILE), -(-c // K_TILE)
    return f"+{100 * (kp / c - 1):.1f}% ({tiles}/{base} tiles)"


def explain(obj) -> str:
    """A table of every layer (format, bits, T, extra channels, flatten ratio, K' overhead, output error,
    where smoothing went, the op used, and once compiled how its activation is quantized and which GEMM
    kernel runs, and why), the totals, and for level auto why each layer got its format.
    `obj` is a QuantPlan or a module compiled with backend='flattenquant'."""
    plan = obj if isinstance(obj, QuantPlan) else _find_plan(obj)
    if plan is None:
        raise TypeError("explain() takes a QuantPlan or a model compiled with torch.compile(..., "
                        "backend='flattenquant', options={'plan': plan})")
    used, ops = {}, {}
    for rep in reports(plan):
        for lr in rep.layers:
            used[lr.layer] = lr
            ops.setdefault(lr.layer, {})[lr.op] = None     # every form the layer was compiled to, in order
    views = local_views(plan)     # tensor parallelism: the shapes this rank runs (runtime/tensor_parallel.py)
    rows = []
    for name, lp in plan.layers.items():
        g = plan.groups[lp.group]
        shard = None
        if name in views:
            shard, lp, g = views[name]
        lr = used.get(name)
        op = " + ".join(ops[name]) if lr else "(not compiled yet)"
        where = lr.smoothing if lr else g.fold
        if lp.rows_folded_from:
            where += f"; rows carry s of {lp.rows_folded_from.rsplit('.', 1)[-1]}"
        if lr is not None and lr.act != "none":
            op += f" +{lr.act}"
        quantize = f"{lr.quantize} ({lr.quantize_why})" if lr and lr.quantize else "-"
        gemm = f"{lr.gemm} ({lr.gemm_why})" if lr and lr.gemm else "-"
        k = f"{g.flat_features}" if lp.flattened else f"{lp.in_features} (not flattened)"
        rows.append([name, lp.format, f"{lp.out_features}x{lp.in_features}->{k}", lp.bits,
                     f"{g.threshold:.4g}" if lp.flattened else "-",
                     int(g.extra.sum() + g.weight_dup.sum()) if lp.flattened else "-",
                     f"{100 * g.flatten_ratio:.1f}%" if lp.flattened else "-",
                     _k_overhead(lp.in_features, g.flat_features) if lp.flattened else "-",
                     "-" if lp.kl_ratio is None else f"{lp.kl_ratio:.3g}",
                     "-" if lp.error is None else f"{lp.error:.2e}", where, op, quantize, gemm]
                    + ([f"{shard.describe()} of {shard.full[0]}x{shard.full[1]}" if shard else "-"] if views else []))
    for name, why in plan.skipped.items():
        shape = plan.parameters.get(name + ".weight", plan.parameters.get(name))
        rows.append([name, "fp", "x".join(map(str, shape)) if shape else "-", "-", "-", "-", "-", "-", "-", "-",
                     "-", f"linear (floating point): {why}", "-", "-"] + (["-"] if views else []))
    headers = ["layer", "format", "NxC->K'", "bits", "T", "extra ch", "flatten", "K' overhead", "KL4/KL8", "out err",
               "smoothing folded into", "op", "activation quantize", "GEMM kernel"]
    headers += ["tensor-parallel shard (rank/ranks)"] if views else []
    table = tabulate(rows, headers=headers, tablefmt="simple")
    n = len(plan.layers)
    n4 = sum(lp.bits == 4 for lp in plan.layers.values())
    flat = [plan.groups[lp.group].flatten_ratio for lp in plan.layers.values() if lp.flattened]
    macs = sum(lp.out_features * lp.in_features for lp in plan.layers.values())
    macs_flat = sum(lp.out_features * (plan.groups[lp.group].flat_features if lp.flattened else lp.in_features)
                    for lp in plan.layers.values())
    before = sum(lp.in_features * lp.out_features * 2 for lp in plan.layers.values())
    params4 = sum(lp.in_features * lp.out_features for lp in plan.layers.values() if lp.bits == 4)
    counts = {}
    for lp in plan.layers.values():
        counts[lp.format] = counts.get(lp.format, 0) + 1
    totals = [
        ["level", plan.config.level],
        ["weight scales", f"per {'output channel' if plan.config.weight_granularity == 'channel' else 'tensor'}"],
        ["quantized linear layers", f"{n} of {n + len(plan.skipped)} ({len(plan.skipped)} kept in floating point)"],
        ["formats", ", ".join(f"{f} {c}" for f, c in sorted(counts.items())) or "-"],
        ["INT4 share of layers / of weights",
         f"{100 * n4 / n:.1f}% / {100 * params4 / (before / 2):.1f}%" if n else "-"],
        ["average flatten ratio (flattened layers)", f"{100 * sum(flat) / len(flat):.1f}%" if flat else "-"],
        ["GEMM work added by K' (weighted by N*K)", f"+{100 * (macs_flat / macs - 1):.1f}%" if macs else "-"],
        *_byte_rows(plan),
        ["graphs compiled", len(reports(plan))],
    ]
    if views:
        here = sum(lp.weight_bytes for lp in plan.layers.values() if lp.name not in views)
        here += sum(v[1].weight_bytes for v in views.values())
        ranks = sorted({(s.index, s.count) for s, _, _ in views.values() if s.dim is not None})
        where = ", ".join(f"{i}/{n}" for i, n in ranks)
        totals.append(["tensor parallel (this rank)", f"{len(views)} layers sharded, rank {where}; quantized weight "
                       f"bytes here {here / 2**20:.2f} MiB (shapes above are this rank's)"])
    auto = plan.calibration.get("auto")
    if auto:
        budget = (f"memory budget {plan.config.memory_budget:g}x fp16 bytes" if auto["mode"] == "memory" else
                  f"error budget {plan.config.error_budget:g}x naive FP8 ({auto['budget']:.3g} summed)")
        totals += [["auto", f"target {auto['target']}, {budget}; summed output error {auto['error']:.3g} "
                            f"(naive FP8 {auto['naive_fp8_error']:.3g}); linear time x{auto['time']:.3f} of bf16"]]
    text = f"fq_compile plan for {plan.model_type}\n{table}\n\n{tabulate(totals, tablefmt='plain')}"
    whys = [[name, lp.why, ", ".join(f"{f} {e:.2e}" for f, e in (lp.errors or {}).items())]
            for name, lp in plan.layers.items() if lp.why]
    if whys:
        text += "\n\nwhy each format (candidates' output errors on calibration rows):\n"
        text += tabulate(whys, headers=["layer", "why", "errors"], tablefmt="simple")
    att = _attention_table(plan)
    return text + ("\n\n" + att if att else "")


def _attention_table(plan: QuantPlan) -> str:
    """Attention sites (passes/attention.py): formats, scales, and the op or why it stays in float."""
    seen = {}
    for rep in reports(plan):
        for ar in getattr(rep, "attention", ()):
            seen[ar.site] = ar
    rows = []
    for name, ap in plan.attention.items():
        ar = seen.get(name)
        op = (ar.op + (f": {ar.reason}" if ar.reason else "")) if ar else "(not compiled yet)"
        rows.append([name, f"{ap.num_heads}/{ap.num_kv_heads} x {ap.head_dim}", ap.qk_format, ap.pv_format,
                     " / ".join(f"{float(getattr(ap, w + '_scale').max()):.3g}" for w in "qkv"), op])
    for name, ar in seen.items():
        if name not in plan.attention:
            rows.append([name, "-", "fp", "fp", "-", f"{ar.op}: {ar.reason}"])
    for name, why in plan.attention_skipped.items():
        if name not in seen:
            rows.append([name, "-", "fp", "fp", "-", f"attention (floating point): {why}"])
    if not rows:
        return ""
    return tabulate(rows, headers=["attention", "heads/kv x dim", "Q.K^T", "P.V", "max scale q / k / v", "op"],
                    tablefmt="simple")
