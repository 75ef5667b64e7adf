"""fq::flatten_quantize_fused and fq::fp8_quantize_fused (the activation quantize as aten ops Inductor
fuses into its producer),
the choice between it and the opaque kernel, and the ReLU GEMM epilogue.

CPU: the decomposition bit-exact against `flatten_quantize_reference` eagerly (INT8/INT4, fp32/bf16/
fp16, strided inputs, every split of direct and gathered positions) and compiled by Inductor fused
into each producer the backend meets (LayerNorm, RMSNorm, ReLU, SiLU(gate) * up, a residual add, the
transpose copy after attention), with the backend's eager rounding of fused fp16/bf16 intermediates;
the producer analysis and the per-layer choices the backend records for tiny OPT / Llama graphs.
GPU (`-m gpu`): the same compiled checks on CUDA (Inductor's Triton code), bit-exact.
"""

from __future__ import annotations

import pytest
import torch

import fq_compile
from fq_compile.kernels import dispatch
from fq_compile.kernels.flatten_quantize import (
    direct_prefix,
    flatten_quantize_decomposed,
    flatten_quantize_reference,
    flatten_quantize_rows_reference,
)
from fq_compile.kernels.fp8 import fp8_quantize_reference
from fq_compile.kernels.packing import unpack_int4
from fq_compile.runtime.state import reports
from tests.conftest import batches, tiny_llama, tiny_opt
from tests.kernels.test_triton import _make_map

HAS_CUDA = torch.cuda.is_available()


def _case(c: int, bits: int, gen, lead=(3, 5), dtype=torch.float32, hot_every=12):
    """A flatten map with outlier channels and an x that exercises every branch (flattened channels
    with outliers, values 30x beyond the calibrated range, negatives, zeros)."""
    qmax = 127 if bits == 8 else 7
    extras = torch.zeros(c, dtype=torch.int64)
    hot = torch.randperm(c, generator=gen)[: max(1, c // hot_every)]
    extras[hot] = torch.randint(1, 4, (hot.numel(),), generator=gen)
    src, mult, lo, hi = _make_map(c, extras, 32, qmax, gen, mult_scale=qmax / 3.0)
    x = torch.randn(*lead, c, generator=gen) * 1.5
    x[..., hot] *= 4.0
    x = x * torch.where(torch.rand(x.shape, generator=gen) < 0.01, 30.0, 1.0)
    x[..., 0] = 0.0
    return x.to(dtype), (src, mult, lo, hi)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_decomposition_matches_reference(bits, dtype):
    gen = torch.Generator().manual_seed(bits + 7 * (dtype == torch.bfloat16))
    x, (src, mult, lo, hi) = _case(72, bits, gen, dtype=dtype)
    ref = flatten_quantize_reference(x, src, mult, lo, hi, bits)
    full = direct_prefix(src, bits)
    assert full == 72                                   # the channel map puts the originals first
    for direct in sorted({0, 2, full // 2 * 2, full}):  # every split of slice / gather is exact
        out = torch.ops.fq.flatten_quantize_fused(x, src, mult, lo, hi, bits, direct)
        assert out.dtype == ref.dtype and torch.equal(out, ref), direct
    xt = x.transpose(0, 1).contiguous().transpose(0, 1)  # strided input
    assert torch.equal(flatten_quantize_decomposed(xt, src, mult, lo, hi, bits, full), ref)
    q = ref if bits == 8 else unpack_int4(ref)
    assert (q.abs() == (127 if bits == 8 else 7)).any() and (q != 0).any()


def test_direct_prefix_and_bad_direct():
    src = torch.tensor([0, 1, 2, 5, 4, 5, 1], dtype=torch.int32)
    assert direct_prefix(src, 8) == 3 and direct_prefix(src, 4) == 2
    assert direct_prefix(torch.arange(6, dtype=torch.int32), 8) == 6
    x = torch.randn(2, 6)
    with pytest.raises(RuntimeError, match="bad direct"):
        flatten_quantize_decomposed(x, src[:6], torch.ones(6), torch.zeros(6), torch.ones(6), 4, 3)


def _producers(c: int, gen, device: str = "cpu"):
    """The producers the backend meets in OPT / Llama blocks, as functions of (x, r, g) on `device`:
    each returns the activation that is quantized."""
    ln_w, ln_b = torch.randn(c, generator=gen) * 0.5 + 1, torch.randn(c, generator=gen) * 0.1
    rms_w = torch.randn(c, generator=gen) * 0.5 + 1
    ln_w, ln_b, rms_w = (t.to(device) for t in (ln_w, ln_b, rms_w))     # a CPU weight fails on CUDA

    def rms(x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return rms_w.to(x.dtype) * h.to(x.dtype)

    return {
        "layer_norm": lambda x, r, g: torch.nn.functional.layer_norm(x, (c,), ln_w.to(x.dtype), ln_b.to(x.dtype)),
        "rms_norm": lambda x, r, g: rms(x),
        "relu": lambda x, r, g: torch.relu(x),
        "silu_mul": lambda x, r, g: torch.nn.functional.silu(g) * x,
        "residual_add": lambda x, r, g: x + r,
        "transpose_copy": lambda x, r, g: x.transpose(0, 1).reshape(x.shape),
    }


def _check_compiled(device: str, dtype: torch.dtype, bits: int, seed: int):
    """Every producer + the fused quantize in one compiled function: each quantized result equals
    the reference applied to the producer's output the same compiled code returns; the same for the
    per-token quantize (its row maxima and correctly rounded division fused in as well) and the e4m3
    quantize of the FP8 formats (with saturation)."""
    from torch._inductor.utils import run_and_get_code

    gen = torch.Generator().manual_seed(seed)
    c = 96
    x, consts = _case(c, bits, gen, lead=(4, 6), dtype=dtype)
    r, g = (torch.randn(4, 6, c, generator=gen).to(dtype) for _ in range(2))
    src, mult, lo, hi = (t.to(device) for t in consts)
    rmult_cpu = (consts[1][:c] / (torch.bincount(consts[0].long()[consts[1] != 0], minlength=c).float())).float()
    rmult = rmult_cpu.to(device)
    full = direct_prefix(consts[0], bits)
    prods = _producers(c, gen, device)
    m8_cpu = torch.rand(c, generator=gen) * 300          # e4m3 multipliers: some products saturate at 448
    m8 = m8_cpu.to(device)

    def f(x, r, g):
        outs = {}
        for name, p in prods.items():
            a = p(x, r, g)
            direct = full if name == "relu" else 0     # the backend's gather, and the slice variant once
            outs[name] = (a, torch.ops.fq.flatten_quantize_fused(a, src, mult, lo, hi, bits, direct),
                          torch.ops.fq.flatten_quantize_rows_fused(a, src, mult, lo, hi, rmult, bits, direct),
                          torch.ops.fq.fp8_quantize_fused(a, m8))
        return outs

    torch._dynamo.reset()
    # as the flattenquant backend compiles: eager rounding, and the cache tag of the traced sources
    from fq_compile.backend import _inductor_settings

    with _inductor_settings(), dispatch.use(None):
        outs, code = run_and_get_code(torch.compile(f, fullgraph=True), *(t.to(device) for t in (x, r, g)))
    src_code = "\n".join(code)
    assert "flatten_quantize_kernel" not in src_code and "_reference" not in src_code   # all Inductor's code
    for name, (a, q, (qr, rows), q8) in outs.items():
        ref8 = fp8_quantize_reference(a.cpu(), m8_cpu).view(torch.uint8)
        bad = (q8.cpu().view(torch.uint8) != ref8).sum().item()
        assert bad == 0, f"{name} {dtype} e4m3: {bad} of {ref8.numel()} differ"
        ref = flatten_quantize_reference(a.cpu(), *consts, bits)
        bad = (q.cpu() != ref).sum().item()
        assert bad == 0, f"{name} {dtype} INT{bits}: {bad} of {ref.numel()} differ"
        ref, ref_rows = flatten_quantize_rows_reference(a.cpu(), *consts, rmult_cpu, bits)
        assert torch.equal(rows.cpu(), ref_rows), f"{name} {dtype} INT{bits}: per-token row maxima differ"
        bad = (qr.cpu() != ref).sum().item()
        assert bad == 0, f"{name} {dtype} INT{bits} per-token: {bad} of {ref.numel()} differ"


@pytest.mark.parametrize("dtype,bits", [(torch.bfloat16, 8), (torch.float32, 4)])
def test_fused_into_producers_under_inductor_cpu(dtype, bits):
    _check_compiled("cpu", dtype, bits, seed=11 + bits)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype,bits", [(torch.bfloat16, 8), (torch.float16, 4)])   # each dtype, each width
def test_gpu_fused_into_producers(dtype, bits):
    _check_compiled("cuda", dtype, bits, seed=21 + bits)


# ------------------------------------------------------------------------------------------------
# the backend's choices, recorded per layer
# ------------------------------------------------------------------------------------------------

def _compiled_reports(model, plan, x, **env):
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(model, backend="flattenquant", options={"plan": plan, "inductor": False})(x).logits
    return out, {lr.layer.split(".layers.0.", 1)[1]: lr for rep in reports(plan) for lr in rep.layers
                 if ".layers.0." in lr.layer}


def test_backend_fuses_every_quantize_with_a_producer(monkeypatch):
    monkeypatch.delenv("FQ_QUANTIZE", raising=False)
    monkeypatch.setenv("FQ_DECODE_MAX_M", "0")      # prefill's quantize (a decode-sized x goes to fq.flat_linear)
    opt = tiny_opt()
    plan = fq_compile.calibrate(opt, batches(2), fq_compile.Config(level="O1"), progress=False)
    x = batches(1, seed=3)[0]
    fused_out, rep = _compiled_reports(opt, plan, x)
    producers = {k.rsplit(".", 1)[-1]: lr.quantize_why for k, lr in rep.items()}
    assert producers["q_proj"] == "into layer_norm" and producers["fc1"] == "into layer_norm"
    assert producers["fc2"] == "into relu"
    assert producers["out_proj"].startswith("into transpose copy of scaled_dot_product_attention")
    assert all(lr.quantize.startswith("fused by Inductor") and lr.act == "none" for lr in rep.values())
    assert rep["fc2"].quantize == "fused by Inductor"      # every position gathered (one consumer of x)
    assert all(lr.gemm == "reference" for lr in rep.values())       # CPU tensors
    text = fq_compile.explain(plan, full=True)
    assert "fused by Inductor, per token scale (into relu)" in text and "K' overhead" in text and "tiles)" in text

    # the opaque kernel instead: fc1's ReLU moves into its GEMM epilogue; the same logits
    monkeypatch.setenv("FQ_QUANTIZE", "kernel")
    plan2 = fq_compile.QuantPlan(plan.config, plan.model_type, plan.model_hash, plan.groups, plan.layers,
                                 plan.skipped, plan.calibration)
    kernel_out, rep2 = _compiled_reports(opt, plan2, x)
    assert all(lr.quantize == "reference" for lr in rep2.values())
    assert rep2["self_attn.q_proj"].quantize_why == "FQ_QUANTIZE=kernel"
    assert rep2["fc1"].act == "relu" and rep2["fc2"].act == "none"
    assert torch.equal(kernel_out, fused_out)

    # FQ_QUANTIZE_READ=slice: the original channels read as a slice beside the gather; the same logits
    monkeypatch.delenv("FQ_QUANTIZE")
    monkeypatch.setenv("FQ_QUANTIZE_READ", "slice")
    plan3 = fq_compile.QuantPlan(plan.config, plan.model_type, plan.model_hash, plan.groups, plan.layers,
                                 plan.skipped, plan.calibration)
    slice_out, rep3 = _compiled_reports(opt, plan3, x)
    assert all(lr.quantize == "fused by Inductor, originals as a slice" for lr in rep3.values())
    assert torch.equal(slice_out, fused_out)
    monkeypatch.setenv("FQ_QUANTIZE_READ", "sideways")
    with pytest.raises(ValueError, match="FQ_QUANTIZE_READ='sideways'"):
        dispatch.gather_mode("relu")


def _fresh(plan):
    """The same plan without its compile reports (each compile appends its own)."""
    return fq_compile.QuantPlan(plan.config, plan.model_type, plan.model_hash, plan.groups, plan.layers,
                                plan.skipped, plan.calibration)


def _inductor_logits(model, plan, x):
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    with torch.no_grad():
        out, code = run_and_get_code(lambda: torch.compile(model, backend="flattenquant", options={"plan": plan})(x).logits)
    return out, "\n".join(code)


def test_fp8_quantize_fused_into_its_producer(monkeypatch):
    """FP8-format layers (level fp8): the e4m3 quantize is emitted as fq.fp8_quantize_fused (aten ops)
    where the producer fuses, as the flattened formats' quantize is, and as the opaque op with
    FQ_QUANTIZE=kernel; the same logits bit for bit, without Inductor and through it, and through
    Inductor no call of the opaque op is left."""
    monkeypatch.delenv("FQ_QUANTIZE", raising=False)
    monkeypatch.setenv("FQ_DECODE_MAX_M", "0")
    opt = tiny_opt()
    plan = fq_compile.calibrate(opt, batches(2), fq_compile.Config(level="fp8"), progress=False)
    assert {lp.format for lp in plan.layers.values()} == {"fp8"}
    x = batches(1, seed=3)[0]
    fused_out, rep = _compiled_reports(opt, plan, x)
    assert all(lr.quantize == "fused by Inductor" for lr in rep.values()), [lr.quantize for lr in rep.values()]
    assert rep["fc2"].quantize_why == "per-tensor e4m3, not flattened (into relu)"
    assert rep["self_attn.q_proj"].quantize_why == "per-tensor e4m3, not flattened (into layer_norm)"
    fused_ind, code = _inductor_logits(opt, _fresh(plan), x)
    assert "ops.fq.fp8_quantize" not in code      # no call of the opaque op (or its reference): fused code

    monkeypatch.setenv("FQ_QUANTIZE", "kernel")
    kernel_out, rep2 = _compiled_reports(opt, _fresh(plan), x)
    assert all(lr.quantize == "reference" and lr.quantize_why.endswith("(FQ_QUANTIZE=kernel)") for lr in rep2.values())
    assert torch.equal(kernel_out, fused_out)
    kernel_ind, code2 = _inductor_logits(opt, _fresh(plan), x)
    assert "ops.fq.fp8_quantize" in code2
    assert torch.equal(kernel_ind, fused_ind)


def test_llama_gated_mlp_and_rms_norm(monkeypatch):
    monkeypatch.setenv("FQ_DECODE_MAX_M", "0")      # prefill's quantize (a decode-sized x goes to fq.flat_linear)
    llama = tiny_llama()
    plan = fq_compile.calibrate(llama, batches(2), fq_compile.Config(level="O1"), progress=False)
    _, rep = _compiled_reports(llama, plan, batches(1, seed=4)[0])
    why = {k.rsplit(".", 1)[-1]: lr.quantize_why for k, lr in rep.items()}
    assert why["down_proj"] == "into mul" and why["gate_proj"] == "into mul"   # SiLU(gate) * up; RMSNorm
    assert why["q_proj"] == "into mul"


def test_describe_producer_on_a_graph():
    from fq_compile.passes.match import describe_producer

    def f(x, w):
        a = torch.nn.functional.linear(x, w)
        return a, torch.relu(a), a.view(-1), x.transpose(0, 1).contiguous()

    gm = torch.fx.symbolic_trace(f)
    nodes = {n.name: n for n in gm.graph.nodes}
    assert describe_producer(nodes["x"]) == ("a graph input", False)
    assert describe_producer(nodes["linear"]) == ("linear", False)
    assert describe_producer(nodes["relu"]) == ("relu", True)
    assert describe_producer(nodes["view"]) == ("linear", False)
    assert describe_producer(nodes["contiguous"]) == ("transpose copy of a graph input", True)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_gpu_backend_fuses_and_picks_by_architecture(monkeypatch):
    """A tiny OPT on the GPU with default settings: every activation quantize is fused into its
    producer (no quantize kernel of ours in Inductor's code), every prefill-sized GEMM runs CUTLASS on
    an sm_90 GPU and Triton elsewhere, as the reports say; logits within quantization noise of the eager
    path (same integer ops; Inductor's float ops around them differ in rounding)."""
    from torch._inductor.utils import run_and_get_code

    monkeypatch.delenv("FQ_GEMM", raising=False)
    monkeypatch.delenv("FQ_QUANTIZE", raising=False)
    model = tiny_opt(hidden=256).to("cuda", torch.bfloat16)
    plan = fq_compile.calibrate(model, [b.cuda() for b in batches(2)], fq_compile.Config(level="O1"), progress=False)
    x = torch.randint(0, 256, (4, 128), device="cuda")
    torch._dynamo.reset()
    keep = {"plan": plan, "free_weights": False}    # else CUDA releases the weights the 2nd compile reads
    with torch.no_grad():
        out, code = run_and_get_code(lambda: torch.compile(model, backend="flattenquant", options=keep)(x).logits)
        torch._dynamo.reset()
        eager = torch.compile(model, backend="flattenquant", options={**keep, "inductor": False})(x).logits
    src = "\n".join(code)
    layers = [lr for rep in reports(plan) for lr in rep.layers if lr.op.startswith("fq.")]
    assert layers and all(lr.quantize.startswith("fused by Inductor") for lr in layers)
    assert "flatten_quantize_kernel" not in src and "_reference" not in src
    hopper = torch.cuda.get_device_capability() == (9, 0)
    assert all(lr.gemm.startswith("CUTLASS" if hopper else "Triton") for lr in layers), [lr.gemm for lr in layers]
    assert ("cutlass_int_linear" in src) == hopper
    assert float((out.float() - eager.float()).norm() / eager.float().norm()) < 0.05
