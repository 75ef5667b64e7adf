"""The FP8 family (fq::fp8_quantize, fq::fp8_linear, fq::w4a8_linear) against a float64 fake-quant
oracle written independently of the ops (e4m3 rounding from frexp, exact sums in float64), and the
Triton kernels against the references through the interpreter (fresh subprocess, as test_triton.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fq_compile  # noqa: F401  (registers the ops)
from fq_compile.kernels.fp8 import FP8_DTYPE, fp8_linear_reference, fp8_quantize_reference
from fq_compile.kernels.packing import pack_int4, unpack_int4

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.conftest import need_triton_interpreter  # noqa: E402
HAS_CUDA = torch.cuda.is_available()


def oracle_e4m3(a64: torch.Tensor) -> torch.Tensor:
    """e4m3fn rounding in float64 from first principles: clamp to 448, quantum 2**(e-3) for a value
    in [2**e, 2**(e+1)) (e >= -6), 2**-9 below 2**-6, nearest with ties to even."""
    a = a64.double().clamp(-448.0, 448.0)
    _, e = torch.frexp(a.abs())                       # |a| = m * 2**e, m in [0.5, 1)
    quantum = torch.pow(2.0, (e - 1 - 3).clamp_min(-9).double())
    return torch.round(a / quantum) * quantum         # torch.round: half to even


def oracle_linear(x, mult, w_values, scale, bias):
    """float64 fake quant: activation e4m3(fl32(x * mult)), exact float64 sums, float32 epilogue."""
    a = (x.double() * mult.double()).float().double()   # the op's one float32 multiply, exactly
    xq = oracle_e4m3(a)
    acc = (xq.reshape(-1, xq.shape[-1]) @ w_values.double().t()).float()
    y = acc * scale
    return xq, (y + bias if bias is not None else y)


def _inputs(gen, m, k, n, *, wide=False):
    x = torch.randn(m, k, generator=gen) * torch.linspace(0.05, 3.0, k)
    x[torch.rand(m, k, generator=gen) < 0.02] *= 40.0          # beyond the calibrated range: saturates
    x[0, :4] = torch.tensor([0.0, -0.0, 1e-6, -1e-6])          # zeros, signed, and underflow
    mult = (torch.rand(k, generator=gen) + 0.5) * (448.0 / 6.0)
    if wide:
        mult *= 1e-3                                            # most values in the subnormal range
    return x, mult.float()


@pytest.mark.parametrize("wide", [False, True])
def test_fp8_quantize_matches_the_float64_oracle_bit_for_bit(wide):
    gen = torch.Generator().manual_seed(int(wide))
    x, mult = _inputs(gen, 64, 96, 8, wide=wide)
    q = fp8_quantize_reference(x, mult)
    assert q.dtype == FP8_DTYPE and q.shape == x.shape
    want = oracle_e4m3((x.double() * mult.double()).float().double())
    assert torch.equal(q.double(), want)
    assert torch.equal(torch.signbit(q.float()), torch.signbit(want.float()))   # -0 stays -0
    if wide:   # subnormals (below 2**-6) are there and are not all zero
        assert bool(((q.float().abs() < 2.0**-6) & (q.float() != 0)).any())
    else:      # saturation is reached
        assert float(q.float().abs().max()) == 448.0 and bool((q.float() == 0).any())
    # the exact halfway cases between e4m3 neighbours round to the even mantissa
    ties = torch.tensor([17.0, 19.0, 1.0625, 1.1875, 2.0**-10, 3 * 2.0**-10, 464.0, -17.0])
    assert fp8_quantize_reference(ties, torch.ones(8)).float().tolist() == [16.0, 20.0, 1.0, 1.25, 0.0,
                                                                            2.0**-8, 448.0, -16.0]


@pytest.mark.parametrize("fmt", ["fp8", "w4a8"])
def test_fp8_linear_matches_the_float64_oracle(fmt):
    gen = torch.Generator().manual_seed(7 if fmt == "fp8" else 8)
    m, k, n = 37, 160, 48
    x, mult = _inputs(gen, m, k, n)
    if fmt == "fp8":
        w = (torch.randn(n, k, generator=gen) * 40.0).clamp(-448, 448).to(FP8_DTYPE)
        wq, w_values = w, w.double()
        op = torch.ops.fq.fp8_linear
    else:
        q = torch.randint(-7, 8, (n, k), generator=gen, dtype=torch.int8)
        wq, w_values = pack_int4(q), q.double()
        op = torch.ops.fq.w4a8_linear
    scale = (torch.rand(n, generator=gen) * 1e-3 + 1e-5).float()
    bias = torch.randn(n, generator=gen).float()
    xq = torch.ops.fq.fp8_quantize(x, mult)
    y = op(xq, wq, scale, bias, torch.float32)
    want_xq, want_y = oracle_linear(x, mult, w_values, scale, bias)
    assert torch.equal(xq.double(), want_xq)
    assert torch.equal(y, want_y), f"{fmt}: max diff {(y - want_y).abs().max()}"   # exact sums: bit for bit
    # leading dims kept, other output dtypes are one cast of the float32 result
    y3 = op(xq.reshape(1, m, k), wq, scale, None, torch.bfloat16)
    assert y3.shape == (1, m, n) and torch.equal(y3[0], (want_y - bias).to(torch.bfloat16))
    # against the unquantized product: fake quant is close, not equal (the test can see an error)
    exact = (x.double() * mult.double()).clamp(-448, 448) @ w_values.t() * scale.double()
    rel = float((y.double() - bias.double() - exact).norm() / exact.norm())
    assert 1e-4 < rel < 0.2


def test_fp8_linear_refuses_bad_operands():
    x = torch.randn(4, 32).to(FP8_DTYPE)
    w = torch.randn(8, 32).to(FP8_DTYPE)
    s = torch.ones(8)
    with pytest.raises(RuntimeError, match="float8_e4m3fn activations"):
        torch.ops.fq.fp8_linear(x.float(), w, s, None, torch.float32)
    with pytest.raises(RuntimeError, match="K mismatch"):
        torch.ops.fq.fp8_linear(x, w[:, :16], s, None, torch.float32)
    with pytest.raises(RuntimeError, match="scale must be float32"):
        torch.ops.fq.fp8_linear(x, w, s[:4], None, torch.float32)
    with pytest.raises(RuntimeError, match="torch.uint8 weights"):
        torch.ops.fq.w4a8_linear(x, w, s, None, torch.float32)


# ----------------------------------------------------------------------------------------------
# Triton kernels (interpreter on CPU; real kernels under -m gpu)
# ----------------------------------------------------------------------------------------------

# Hopper's FP8 tensor-core MMA keeps about 14 bits in its accumulator (DeepSeek-V3 report, section
# 3.3.2: the aligned products are truncated), so no FP8-core path meets float32 accumulation: each MMA
# step may lose 2**-13 of its partial sum.  cuBLAS (use_fast_accum=False) and our Triton GEMM
# (kernels/triton/fp8.py: PROMOTE_K) hand the partial sum to a float32 accumulator after at most 128
# products, so the errors are those of <= 128-product sums with random signs: norm-wise
# 2**-13 * sqrt(128) ~ 1.4e-3 relative (cuBLAS measured 1.7e-4 on the H200 at K=4096; without the
# promotion the error grows with K instead).  Paths with float32 accumulation keep 1e-5.
FP8_CORE_ACC_TOL = 2.0**-13 * 128**0.5
OUT_TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}   # the output rounding


def _rel(y, ref):
    return float((y.double() - ref.double()).norm() / ref.double().norm())


def check_triton(device: str, shapes, seed: int = 0, dot_fp8=None) -> list[str]:
    """fp8_quantize bit for bit; both GEMMs against the reference: within the float32 accumulation bound
    where the sums are float32 (products are exact on every path; the order of the sums is the
    kernel's), within FP8_CORE_ACC_TOL on FP8 tensor cores; on CUDA every FQ_FP8_GEMM choice and output
    dtype.  Returns every failure (all shapes, choices and dtypes are checked before anything is raised)."""
    from fq_compile.kernels.triton import fp8 as tf

    fails = []
    gen = torch.Generator().manual_seed(seed)
    for m, n, k in shapes:
        x, mult = _inputs(gen, m, k, n, wide=(m % 2 == 1))
        xs = x[:, :k] if m % 3 else torch.cat([x, x], 1)[:, ::2]     # a strided input too
        ref_q = fp8_quantize_reference(xs, mult)
        q = tf.fp8_quantize_cuda(xs.to(device), mult.to(device))
        if q.dtype != FP8_DTYPE or not torch.equal(q.cpu().view(torch.uint8), ref_q.view(torch.uint8)):
            fails.append(f"fp8_quantize {(m, k)}: {(q.cpu().view(torch.uint8) != ref_q.view(torch.uint8)).sum()} "
                         "mismatches")
        xq = ref_q.to(device)
        scale = (torch.rand(n, generator=gen) * 1e-3 + 1e-5).to(device)
        bias = torch.randn(n, generator=gen).to(device)
        w8 = (torch.randn(n, k, generator=gen) * 30).to(FP8_DTYPE).to(device)
        w4 = pack_int4(torch.randint(-7, 8, (n, k), generator=gen, dtype=torch.int8)).to(device)
        fp8_cores = tf.has_fp8_cores(xq.device) if dot_fp8 is None else (dot_fp8 and device == "cuda")
        for int4_w, w in ((False, w8), (True, w4)):
            what = f"fp8 gemm int4_w={int4_w} dot_fp8={dot_fp8} {(m, n, k)}"
            ref = fp8_linear_reference(xq.cpu(), w.cpu(), scale.cpu(), bias.cpu(), torch.float32)
            y = tf.fp8_gemm_triton(xq, w, scale, bias, torch.float32, int4_w=int4_w, dot_fp8=dot_fp8).cpu()
            if fp8_cores:
                if not _rel(y, ref) < FP8_CORE_ACC_TOL:
                    fails.append(f"{what}: rel err {_rel(y, ref):.3g} >= {FP8_CORE_ACC_TOL:.3g} (FP8 cores)")
                continue
            wv = unpack_int4(w.cpu()).double() if int4_w else w.cpu().double()
            absprod = xq.cpu().double().abs() @ wv.abs().t()
            # float32 accumulation (K * u * sum|p|), the reference's own rounding and the epilogue's
            bound = (k * 2.0**-24 + 2.0**-23) * absprod * scale.cpu().double() + 1e-6
            err = (y.double() - ref.double()).abs()
            if not (bool((err <= bound).all()) and float(err.max()) < 1e-3 * float(ref.abs().max())):
                fails.append(f"{what}: beyond the float32 bound by {float((err / bound).max()):.3g}x")
        if device == "cuda":      # every FQ_FP8_GEMM choice (cuBLAS row-wise / float32 + epilogue, Triton)
            ref = fp8_linear_reference(xq.cpu(), w8.cpu(), scale.cpu(), bias.cpu(), torch.float32)
            for choice in ("auto", "scaled_mm", "triton"):
                os.environ["FQ_FP8_GEMM"] = choice
                try:
                    for out_dtype, out_tol in OUT_TOL.items():
                        tol = max(out_tol, FP8_CORE_ACC_TOL) if tf.has_fp8_cores(xq.device) else out_tol
                        y = tf.fp8_linear_cuda(xq, w8, scale, bias, out_dtype)
                        if y.dtype != out_dtype or y.shape != (m, n):
                            fails.append(f"fp8_linear {choice} {out_dtype} {(m, n, k)}: {y.dtype} {tuple(y.shape)}")
                        elif not _rel(y.cpu(), ref) < tol:
                            fails.append(f"fp8_linear {choice} {out_dtype} {(m, n, k)}: rel err "
                                         f"{_rel(y.cpu(), ref):.3g} >= {tol:.3g}")
                finally:
                    os.environ.pop("FQ_FP8_GEMM", None)
    return fails


SMALL = [(1, 40, 64), (5, 70, 96), (33, 50, 128), (18, 64, 30)]


def _interp_main(which: str):
    assert os.environ.get("TRITON_INTERPRET") == "1"
    if which == "fp8":
        fails = check_triton("cpu", SMALL, seed=1, dot_fp8=True) + check_triton("cpu", SMALL[:2], seed=2, dot_fp8=False)
        assert not fails, "\n".join(fails)
    else:
        raise SystemExit(f"unknown check {which}")
    print(f"{which}: ok")


def test_interpreter():
    need_triton_interpreter()
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, __file__, "fp8"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]


def test_import_registers_fp8_kernels():
    pytest.importorskip("triton")
    from fq_compile.kernels import fp8
    assert {"fp8_quantize", "fp8_linear", "w4a8_linear"} <= set(fp8.CUDA_IMPL)


def test_fp8_gemm_choice(monkeypatch):
    """auto: cuBLAS row-wise into bfloat16 always, into float16 only on a CUDA device whose torch takes it
    (never off CUDA, never for float32), else the Triton GEMM; FQ_FP8_GEMM overrides; a bad value is an error."""
    pytest.importorskip("triton")
    from fq_compile.kernels.triton import fp8 as tf

    monkeypatch.delenv("FQ_FP8_GEMM", raising=False)
    cpu = torch.device("cpu")
    assert tf.fp8_gemm_choice(torch.bfloat16, cpu) == "scaled_mm_rowwise"
    assert tf.fp8_gemm_choice(torch.float16, cpu) == "triton"
    assert tf.fp8_gemm_choice(torch.float16) == "triton"
    assert tf.fp8_gemm_choice(torch.float32, cpu) == "triton"
    monkeypatch.setattr(tf, "_rowwise_ok", lambda dtype, device: dtype == torch.float16)
    assert tf.fp8_gemm_choice(torch.float16, torch.device("cuda", 0)) == "scaled_mm_rowwise"
    monkeypatch.setattr(tf, "_rowwise_ok", lambda dtype, device: False)
    assert tf.fp8_gemm_choice(torch.float16, torch.device("cuda", 0)) == "triton"
    for choice in ("scaled_mm", "triton"):
        monkeypatch.setenv("FQ_FP8_GEMM", choice)
        assert tf.fp8_gemm_choice(torch.float16, cpu) == choice
    monkeypatch.setenv("FQ_FP8_GEMM", "cublas")
    with pytest.raises(ValueError, match="FQ_FP8_GEMM"):
        tf.fp8_gemm_choice(torch.float16, cpu)


GPU_SHAPES = [(1, 4096, 4096), (16, 5120, 1024), (300, 1000, 4128), (2048, 4096, 5120), (7, 2900, 3000)]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=[f"{m}x{n}x{k}" for m, n, k in GPU_SHAPES])
def test_gpu_fp8_kernels(shape):
    fails = check_triton("cuda", [shape], seed=3)
    assert not fails, "\n".join(fails)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_gpu_fp8_gemm_without_fp8_cores():
    """The float16 operand path (GPUs below sm_89; e4m3 decoded from the bits) on the real compiler,
    float32 accumulation: within the float32 bound."""
    fails = check_triton("cuda", [(5, 200, 300), (130, 256, 512)], seed=4, dot_fp8=False)
    assert not fails, "\n".join(fails)


if __name__ == "__main__":
    _interp_main(sys.argv[1])
