"""Quantized attention (issue 14): the kernel against PyTorch's SDPA backends, and model accuracy.

    python benchmarks/attention.py kernel   [--seqs 512,...,8192] [--batches 1,8,32] [--out FILE.md]   (CUDA)
    python benchmarks/attention.py accuracy [--base O1] [--ppl-tokens 8192] [--out FILE.md]        (CPU or CUDA)

One device call (<= 5 minutes; each part rewrites its table after every row, so a part cut short by
its `timeout` keeps the rows it finished; the accuracy part needs the GGUF in .gguf/ and WikiText-2
in .data/, as benchmarks/device/accuracy.sh):

    timeout 150 python benchmarks/attention.py kernel --seqs 512,2048,8192 --batches 1,8 --decode-batches 1,64 \
        --no-flex --out $OUT/attention-kernel.md > $OUT/attention-kernel.log 2>&1;
    timeout 140 python benchmarks/attention.py accuracy --model .gguf/SmolLM2-135M-Instruct.Q4_1.gguf \
        --data-dir .data --rows "INT8 QK, INT8 PV, per tensor;INT8 QK, INT8 PV, per head;FP8 QK, FP8 PV, per head" \
        --out $OUT/attention-accuracy.md > $OUT/attention-accuracy.log 2>&1; tail -n 30 $OUT/attention-*.log

kernel: fq::attention's Triton kernels (INT8 and FP8 variants, kernel alone on pre-quantized Q/K/V, and
"+quant": with the Q/K/V quantization as separate launches, which the model fuses into RoPE; see
_our_variant) against
scaled_dot_product_attention in bf16 with each backend forced (flash, cuDNN, memory-efficient; GQA
through enable_gqa where the backend takes it, else K/V repeated beforehand) and FlexAttention
compiled, causal prefill at each (batch, seq); then decode (one query, --decode-context tokens of context)
at several batch sizes, with and without split keys (kv_splits as the attention pass picks it).  All measured side by side in one run with triton.testing.do_bench (median ms);
ratios are best SDPA / ours.  Two diagnostics: the hardware exp2 (EXP_HW, not bit-exact) and V stored
keys-contiguous, so the cost of the exact polynomial and of V's layout are measured, not guessed.
Columns "int8/int8", "fp8/fp8", ... are the generic kernel (forced, on every GPU); on sm_90 the columns
"int8/int8 hopper V^T" and "fp8/fp8 hopper V^T" are kernels/triton/attention_hopper.py (forced; the op
picks it itself on sm_90 for such calls), each with its "+quant".  "+quant" quantizes with
quantize_heads' one-launch Triton kernel (kernels/triton/heads.py); "int8/int8 (aten quantize) +quant"
times the same with the five aten kernels it replaced, so the fix is measured against its baseline in
the same run.  Each "+quant" is also timed replayed from a CUDA graph ("+quant (CUDA graph)": device time
only): do_bench's "+quant" includes the host's launches between the four calls, which on the H100 of
2026-12-07 may be most of the 0.77 ms (INT8) / 1.3 ms (FP8) that "+quant" added over the kernel alone.

accuracy: WikiText-2 perplexity of a model (default SmolLM2-135M) at --base (default O1) without and
with quantized attention: INT8 / FP8 / mixed, per-tensor / per-head scales.  One calibration observes
everything; the attention variants are re-planned from its statistics (planning/attention.replan_attention),
so every row shares the same linear plan and only attention changes.  The 8-bit KV cache stores exactly
the values the attention op quantizes (runtime/kv_cache.py), so these rows are also the 8-bit-cache rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.provenance import git_rev  # noqa: E402
from fq_compile import Config  # noqa: E402
from fq_compile.kernels import attention as A  # noqa: E402


def _header(args, device) -> str:
    cpu = f"CPU ({platform.processor() or platform.machine()})"
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu
    try:
        import triton
        tv = triton.__version__
    except ImportError:
        tv = "-"
    return (f"device: {dev}; date: {datetime.date.today()}; torch {torch.__version__}; triton {tv}; git {git_rev()}\n"
            f"command: python benchmarks/attention.py {shlex.join(args.argv)}\n")


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


# ------------------------------------------------------------------------------------------------
# kernel
# ------------------------------------------------------------------------------------------------

def _quantized(q, k, v, qk_fmt, pv_fmt):
    """Static per-tensor scales from the tensors' maxima (what calibration gives) and 8-bit Q/K/V."""
    def sc(x, fmt, h):
        return torch.full((h,), float(x.abs().amax()) / A.QMAX[fmt], device=x.device)
    qs, ks, vs = sc(q, qk_fmt, q.shape[1]), sc(k, qk_fmt, k.shape[1]), sc(v, pv_fmt, v.shape[1])
    inv = [A.inverse_scale(s) for s in (qs, ks, vs)]
    qq = torch.ops.fq.quantize_heads(q, inv[0], A.FORMATS[qk_fmt])
    kq = torch.ops.fq.quantize_heads(k, inv[1], A.FORMATS[qk_fmt])
    vq = torch.ops.fq.quantize_heads(v, inv[2], A.FORMATS[pv_fmt])
    return (qq, kq, vq), (qs, ks, vs), inv


def _sdpa_variants(q, k, v, causal):
    """name -> callable for each SDPA backend that accepts these inputs (GQA natively or repeated)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    rep = q.shape[1] // k.shape[1]
    kr, vr = (k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)) if rep > 1 else (k, v)
    out = {}
    for name, be in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                     ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        for gqa in ((True, False) if rep > 1 else (False,)):
            kk, vv = (k, v) if gqa else (kr, vr)

            def fn(be=be, kk=kk, vv=vv, gqa=gqa):
                with sdpa_kernel(be):
                    return torch.nn.functional.scaled_dot_product_attention(q, kk, vv, is_causal=causal, enable_gqa=gqa)
            try:
                fn()
                torch.cuda.synchronize()
            except RuntimeError:
                continue
            out[name + ("" if gqa or rep == 1 else " (kv repeated)")] = fn
            break
    return out


def _flex(q, k, v, causal):
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    m, n = q.shape[2], k.shape[2]
    mask = create_block_mask(lambda b, h, i, j: j <= i, None, None, m, n, device=q.device) if causal else None
    compiled = torch.compile(flex_attention)
    fn = (lambda: compiled(q, k, v, block_mask=mask, enable_gqa=q.shape[1] != k.shape[1]))
    try:
        fn()
        torch.cuda.synchronize()
    except Exception as e:   # noqa: BLE001  (an alternative that does not run is reported, not fatal)
        print(f"  flex_attention unavailable: {type(e).__name__}: {str(e)[:100]}", flush=True)
        return None
    return fn


def _bench(fn) -> float:
    from triton.testing import do_bench
    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def _bench_graph(fn) -> float:
    """Device time of fn replayed from a CUDA graph (median ms): a decode step runs so inside a model
    (CUDA graphs), where the Python launch cost that do_bench would time (~0.3 ms here) is not paid."""
    from triton.testing import do_bench_cudagraph
    return float(do_bench_cudagraph(fn, rep=100, return_mode="median"))


def _rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _our_variant(q, k, v, d, qk_fmt, pv_fmt, opt):
    """(label, kernel alone, kernel with the Q/K/V quantize, first output) for one of our prefill columns.
    opt: exp_hw (the hardware exp2), v_keys_contiguous (V stored keys-contiguous, "V^T"), hopper (the
    Hopper prefill kernel forced; every other column forces the generic kernel, so a column means the
    same kernel on every GPU), aten_quant (only "+quant", with the composite's five aten kernels that
    quantize_heads ran as before kernels/triton/heads.py: the fix measured beside its baseline).
    "+quant" times quantize_heads of q, k and v (one Triton launch each on CUDA), V's transpose to
    keys-contiguous where the column stores it so (a copy of the 8-bit V; Inductor folds it into the
    quantize's store), and the kernel: what an eager caller pays, an upper bound on a compiled model's
    cost (where Inductor fuses the quantize with RoPE)."""
    from fq_compile.kernels.triton.attention import attention_cuda

    (qq, kq, vq), (qs, ks, vs), inv = _quantized(q, k, v, qk_fmt, pv_fmt)
    v_t = opt.get("v_keys_contiguous", False)
    exp_hw, hopper = opt.get("exp_hw", False), opt.get("hopper", False)
    label = (f"{qk_fmt}/{pv_fmt}" + (" hopper" if hopper else "") + (" hw-exp2" if exp_hw else "") +
             (" V^T" if v_t else ""))
    dq, dv = A.FORMATS[qk_fmt], A.FORMATS[pv_fmt]

    def keys_contiguous(x):
        return x.transpose(-1, -2).contiguous().transpose(-1, -2) if v_t else x

    def attend(qq, kq, vq):
        return attention_cuda(qq, kq, vq, qs, ks, vs, None, True, d ** -0.5, A.KV_BLOCK, torch.bfloat16,
                              exp_hw=exp_hw, hopper=hopper)

    def with_quant():
        return attend(torch.ops.fq.quantize_heads(q, inv[0], dq), torch.ops.fq.quantize_heads(k, inv[1], dq),
                      keys_contiguous(torch.ops.fq.quantize_heads(v, inv[2], dv)))

    if opt.get("aten_quant"):
        def aten_quant():
            return attend(A.quantize_heads_reference(q, inv[0], dq), A.quantize_heads_reference(k, inv[1], dq),
                          A.quantize_heads_reference(v, inv[2], dv))
        return label + " (aten quantize)", None, aten_quant, None
    vq = keys_contiguous(vq)

    def run():
        return attend(qq, kq, vq)
    out = run()                                   # autotunes outside the timing
    return label, run, (with_quant if not exp_hw and (not v_t or hopper) else None), out


def _kernel_report(args, device, rows, dec_rows) -> str:
    """The kernel tables so far (written after every measured shape, so a run cut short keeps them)."""
    h, hkv = args.heads, args.kv_heads
    text = _header(args, device)
    text += (f"heads {h}, kv heads {hkv}, causal prefill; kv_block {A.KV_BLOCK}; median ms of triton.testing.do_bench; "
             f"ratio = best SDPA ms / ms (> 1: faster than the best SDPA backend)\n\n## Prefill\n\n")
    labels = [lb for lb in rows[0]["times"] if not lb.startswith("sdpa") and not lb.startswith("flex")] if rows else []
    table = []
    for r in rows:
        sd = " / ".join(f"{n[5:]} {t:.3f}" for n, t in r["times"].items() if n.startswith("sdpa"))
        fl = r["times"].get("flex (compiled)")
        table.append([r["d"], r["batch"], r["seq"], sd, f"{fl:.3f}" if fl else "-"] +
                     [f"{r['times'][lb]:.3f} ({r['ratio'][lb]:.2f}x, {r['tflops'][lb]:.0f} TF)" for lb in labels])
    text += tabulate(table, ["D", "batch", "seq", "SDPA bf16 ms: flash / cudnn / efficient", "flex ms"] +
                     [f"ours {lb}" for lb in labels], tablefmt="github")
    text += "\n\nrelative error vs bf16 SDPA on these random inputs (per-tensor scales): " + ", ".join(
        f"{lb} {max(r['errs'][lb] for r in rows):.3g}" for lb in rows[0]["errs"]) if rows else ""
    if dec_rows:
        text += ("\n\n## Decode (one query; K/V read from an 8-bit cache vs bf16; device time of CUDA-graph replays, "
                 "triton.testing.do_bench_cudagraph, as a decode step runs in a model)\n\n")
        dl = list(dict.fromkeys(lb for r in dec_rows for lb in r["times"] if not lb.startswith("sdpa")))
        text += tabulate([[r["d"], r["batch"], r["context"], r.get("splits", 0),
                           " / ".join(f"{n[5:]} {t:.3f}" for n, t in r["times"].items() if n.startswith("sdpa"))] +
                          [f"{r['times'][lb]:.3f} ({r['ratio'][lb]:.2f}x, {r['gbps'][lb]:.0f} GB/s)"
                           if lb in r["times"] else "-" for lb in dl]
                          for r in dec_rows],
                         ["D", "batch", "context", "kv_splits (the pass's choice)", "SDPA bf16 ms"] +
                         [f"ours {lb}" for lb in dl], tablefmt="github")
    if args.out:
        Path(args.out).write_text(text + "\n")
        Path(args.out).with_suffix(".json").write_text(json.dumps(dict(prefill=rows, decode=dec_rows), indent=1))
    return text


def kernel_main(args) -> str:
    from fq_compile.kernels.triton.attention import attention_cuda

    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    h, hkv = args.heads, args.kv_heads
    ours = [("int8", "int8", {}), ("fp8", "fp8", {}), ("int8", "fp8", {}), ("int8", "int8", {"exp_hw": True}),
            ("int8", "int8", {"v_keys_contiguous": True}), ("int8", "int8", {"aten_quant": True})]
    if torch.cuda.get_device_capability(device) == (9, 0):     # the Hopper prefill kernel, forced (sm_90 only)
        ours += [(f, f, {"hopper": True, "v_keys_contiguous": True}) for f in ("int8", "fp8")]
    rows, dec_rows = [], []
    for d in _ints(args.head_dims):
        shapes = [(b, s) for s in _ints(args.seqs) for b in _ints(args.batches) if b * s <= args.max_tokens]
        for b, s in shapes:
            q = torch.randn(b, h, s, d, device=device, dtype=torch.bfloat16, generator=gen)
            k = torch.randn(b, hkv, s, d, device=device, dtype=torch.bfloat16, generator=gen)
            v = torch.randn(b, hkv, s, d, device=device, dtype=torch.bfloat16, generator=gen)
            flops = 4 * b * h * s * s * d / 2             # causal: half the score matrix
            times = {}
            ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=hkv != h)
            for name, fn in _sdpa_variants(q, k, v, True).items():
                times["sdpa " + name] = _bench(fn)
            flex = _flex(q, k, v, True) if args.flex else None
            if flex is not None:
                times["flex (compiled)"] = _bench(flex)
            best_name = min((n for n in times if n.startswith("sdpa")), key=times.get, default=None)
            errs = {}
            for qk_fmt, pv_fmt, opt in ours:
                label, run, with_quant, out = _our_variant(q, k, v, d, qk_fmt, pv_fmt, opt)
                if out is not None:
                    errs[label] = _rel(out, ref)
                    times[label] = _bench(run)
                if with_quant is not None:
                    times[label + " +quant"] = _bench(with_quant)
                    try:   # the same calls' device time: do_bench also times the host's launches between them
                        times[label + " +quant (CUDA graph)"] = _bench_graph(with_quant)
                    except Exception as e:  # a call that cannot be captured: no column rather than no table
                        print(f"    {label} +quant (CUDA graph): {type(e).__name__}: {str(e).splitlines()[0][:100]}")
            best = times[best_name] if best_name else float("nan")
            rows.append(dict(d=d, batch=b, seq=s, best_sdpa=best_name, times=times, errs=errs,
                             tflops={n: flops / t / 1e9 for n, t in times.items()},
                             ratio={n: best / t for n, t in times.items()}))
            print(f"D={d} B={b} S={s}: " + ", ".join(f"{n} {t:.3f}" for n, t in times.items()), flush=True)
            _kernel_report(args, device, rows, dec_rows)
            del q, k, v, ref
            torch.cuda.empty_cache()
        # decode: one query against a context of args.decode_context tokens (int8 cache vs bf16)
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        for b, n in [(b, n) for n in _ints(args.decode_context) for b in _ints(args.decode_batches)]:
            if b * n > args.max_tokens * 4:
                continue
            q = torch.randn(b, h, 1, d, device=device, dtype=torch.bfloat16, generator=gen)
            k = torch.randn(b, hkv, n, d, device=device, dtype=torch.bfloat16, generator=gen)
            v = torch.randn(b, hkv, n, d, device=device, dtype=torch.bfloat16, generator=gen)
            times = {"sdpa " + nm: _bench_graph(fn) for nm, fn in _sdpa_variants(q, k, v, False).items()}
            best_name = min(times, key=times.get)
            for qk_fmt, pv_fmt in (("int8", "int8"), ("fp8", "fp8")):
                (qq, kq, vq), (qs, ks, vs), _ = _quantized(q, k, v, qk_fmt, pv_fmt)

                splits = A.choose_kv_splits(b, hkv, h // hkv, n, A.KV_BLOCK, sms)   # what the attention pass picks
                tried = [(f"{qk_fmt}/{pv_fmt}", 0), (f"{qk_fmt}/{pv_fmt} split", splits)]
                if qk_fmt == "int8":            # other split counts, to check the pass's rule against
                    tried += [(f"int8/int8 split={x}", x) for x in _ints(args.decode_splits)
                              if x not in (0, splits) and x <= A.MAX_KV_SPLITS]
                for label, ks_ in tried:
                    if ks_ == 0 and "split" in label:
                        continue

                    def run(qq=qq, kq=kq, vq=vq, qs=qs, ks=ks, vs=vs, ks_=ks_):
                        return attention_cuda(qq, kq, vq, qs, ks, vs, None, False, d ** -0.5, A.KV_BLOCK,
                                              torch.bfloat16, kv_splits=ks_)
                    run()
                    times[label] = _bench_graph(run)
            kv_bytes = {"bf16": 2 * b * hkv * n * d * 2, "8-bit": 2 * b * hkv * n * d}
            dec_rows.append(dict(d=d, batch=b, context=n, best_sdpa=best_name, times=times, splits=splits,
                                 ratio={nm: times[best_name] / t for nm, t in times.items()},
                                 gbps={nm: (kv_bytes["bf16"] if nm.startswith("sdpa") else kv_bytes["8-bit"]) / t / 1e6
                                       for nm, t in times.items()}))
            print(f"decode D={d} B={b} ctx={n}: " + ", ".join(f"{nm} {t:.3f}" for nm, t in times.items()), flush=True)
            _kernel_report(args, device, rows, dec_rows)
            del q, k, v

    return _kernel_report(args, device, rows, dec_rows)


# ------------------------------------------------------------------------------------------------
# accuracy
# ------------------------------------------------------------------------------------------------

ACCURACY_ROWS = [  # (label, Config overrides for replan_attention)
    ("INT8 QK, INT8 PV, per tensor", dict(attention="int8", attention_pv=None, attention_scales="tensor")),
    ("INT8 QK, INT8 PV, per head", dict(attention="int8", attention_pv=None, attention_scales="head")),
    ("FP8 QK, FP8 PV, per tensor", dict(attention="fp8", attention_pv=None, attention_scales="tensor")),
    ("FP8 QK, FP8 PV, per head", dict(attention="fp8", attention_pv=None, attention_scales="head")),
    ("INT8 QK, FP8 PV, per tensor", dict(attention="int8", attention_pv="fp8", attention_scales="tensor")),
    ("INT8 QK, FP8 PV, per head", dict(attention="int8", attention_pv="fp8", attention_scales="head")),
    ("FP8 QK, INT8 PV, per head", dict(attention="fp8", attention_pv="int8", attention_scales="head")),
]


def accuracy_main(args) -> str:
    import fq_compile
    from fq_compile.planning.attention import replan_attention
    from fq_compile.tools.data import calibration_batches, wikitext_test
    from fq_compile.tools.evaluate import perplexity
    from fq_compile.tools.models import load_model

    device = torch.device(args.device)
    lm = load_model(args.model, dtype=getattr(torch, args.dtype), device=device)
    model, tok = lm.model, lm.tokenizer
    model.set_attn_implementation(args.attn_implementation)
    calib = calibration_batches(tok, n=args.calib_batches, seqlen=args.calib_seqlen, data_dir=args.data_dir)
    ids = tok(wikitext_test(args.data_dir), return_tensors="pt").input_ids[0]
    max_tokens = args.ppl_tokens or None
    rows = [r for r in ACCURACY_ROWS if not args.rows or any(s.strip() in r[0] for s in args.rows.split(";"))]
    results: dict[str, dict] = {}
    text = ""

    def ppl(m):
        with torch.no_grad():
            return perplexity(m, ids, args.ppl_seqlen, max_tokens, progress=False, device=device)

    def write():
        nonlocal text
        fp = results.get("fp", {}).get("ppl")
        base = results.get(args.base, {}).get("ppl")
        table = [[k, f"{v['ppl']:.3f}", "-" if fp is None else f"{100 * (v['ppl'] / fp - 1):+.2f}%",
                  "-" if base is None or k in ("fp", args.base) else f"{100 * (v['ppl'] / base - 1):+.2f}%",
                  f"{v['seconds']:.0f}"] for k, v in results.items()]
        w = next(iter(results.values()))["windows"] if results else "?"
        text = (_header(args, device) +
                f"model: {lm.name}; dtype {args.dtype}; attention implementation: {args.attn_implementation}; "
                f"{'Inductor' if args.inductor else 'no Inductor (the fq ops and their references)'}\n"
                f"calibration: {args.calib_batches} windows of {args.calib_seqlen} tokens (WikiText-2 validation); "
                f"perplexity: {'first ' + str(max_tokens) + ' test tokens' if max_tokens else 'the whole test split'}"
                f" ({w} windows of {args.ppl_seqlen})\n"
                f"kv_block {A.KV_BLOCK}; target (issue 25): attention costs <= +0.3% PPL on top of {args.base}\n\n")
        text += tabulate(table, ["configuration", "PPL", "vs fp", f"vs {args.base}", "seconds"], tablefmt="github")
        if args.out:
            Path(args.out).write_text(text + "\n")
            Path(args.out).with_suffix(".json").write_text(json.dumps(dict(model=lm.name, runs=results), indent=1))
        return text

    if not args.no_fp:
        t = time.time()
        r = ppl(model)
        results["fp"] = dict(ppl=r.ppl, windows=r.windows, seconds=time.time() - t)
        print(f"fp: {r.ppl:.3f}", flush=True)
        write()
    t = time.time()
    torch._dynamo.reset()
    plan = fq_compile.calibrate(model, calib, Config(level=args.base, attention="int8"), progress=False)
    calib_s = time.time() - t
    linear_only = dataclasses.replace(plan, attention={}, attention_skipped={},
                                      config=Config.from_dict({**plan.config.to_dict(), "attention": "fp"}))
    variants = [(args.base, linear_only, None)]
    variants += [(f"{args.base} + {label}", replan_attention(plan, **kw), None) for label, kw in rows]
    if not args.rows or any("cache" in s for s in args.rows.split(";")):
        # the 8-bit KV cache alone: K and V stored in 8 bits (fq_compile.kv_cache, the plan's scales), attention
        # itself in floating point over their dequantized values, the linear layers as the base plan
        variants += [(f"{args.base} + 8-bit KV cache alone (INT8, per {kw['attention_scales']})", linear_only,
                      replan_attention(plan, **kw)) for label, kw in ACCURACY_ROWS if label.startswith("INT8 QK, INT8 PV")]
    for label, p, cache_plan in variants:
        t = time.time()
        torch._dynamo.reset()
        fast = torch.compile(model, backend="flattenquant", options={"plan": p, "inductor": args.inductor,
                                                                    "free_weights": False})
        if cache_plan is not None:
            def fast(x, use_cache=False, compiled=fast, cache_plan=cache_plan):   # a fresh cache per window
                return compiled(x, past_key_values=fq_compile.kv_cache(cache_plan, model), use_cache=True)
        r = ppl(fast)
        seconds = time.time() - t + (calib_s if label == args.base else 0)
        results[label] = dict(ppl=r.ppl, windows=r.windows, seconds=seconds,
                              config={k: v for k, v in p.config.to_dict().items() if k.startswith("attention")})
        print(f"{label}: {r.ppl:.3f} ({time.time() - t:.0f} s)", flush=True)
        write()
    if plan.attention_skipped:
        text += "\n\nleft in floating point: " + "; ".join(f"{k}: {v}" for k, v in plan.attention_skipped.items())
    return write() if not plan.attention_skipped else text


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mode", required=True)
    k = sub.add_parser("kernel", help="kernel timing against SDPA (CUDA)")
    k.add_argument("--seqs", default="512,1024,2048,4096,8192")
    k.add_argument("--batches", default="1,8,32")
    k.add_argument("--max-tokens", type=int, default=131072, help="skip (batch, seq) with batch * seq above this")
    k.add_argument("--heads", type=int, default=32)
    k.add_argument("--kv-heads", type=int, default=8)
    k.add_argument("--head-dims", default="128")
    k.add_argument("--decode-batches", default="1,16,64")
    k.add_argument("--decode-context", default="2048", help="context lengths of the decode rows, comma-separated")
    k.add_argument("--decode-splits", default="",
                   help="also time INT8 decode at these kv_splits (comma-separated), beside the pass's choice")
    k.add_argument("--no-flex", dest="flex", action="store_false", help="skip FlexAttention (its compile takes time)")
    k.add_argument("--out", default=None)
    a = sub.add_parser("accuracy", help="WikiText-2 perplexity with quantized attention")
    a.add_argument("--model", default="smollm2-135m")
    a.add_argument("--base", default="O1", help="the linear layers' level")
    a.add_argument("--data-dir", default=None)
    a.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    a.add_argument("--attn-implementation", default="sdpa", choices=["sdpa", "eager"])
    a.add_argument("--calib-batches", type=int, default=16)
    a.add_argument("--calib-seqlen", type=int, default=512)
    a.add_argument("--ppl-seqlen", type=int, default=2048)
    a.add_argument("--ppl-tokens", type=int, default=4 * 2048, help="limit the test tokens (0: the whole split)")
    a.add_argument("--rows", default="", help="';'-separated substrings of the rows to run (default: all)")
    a.add_argument("--inductor", action="store_true", help="compile with Inductor (default: the ops without it)")
    a.add_argument("--no-fp", action="store_true")
    a.add_argument("--out", default=None)
    args = p.parse_args(argv)
    args.argv = argv
    text = kernel_main(args) if args.mode == "kernel" else accuracy_main(args)
    print("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
