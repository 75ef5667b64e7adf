"""Triton kernels for fq::flatten_quantize / fq::int8_linear / fq::int4_linear against the references.

CPU: the same checks run through the Triton interpreter at small shapes.  TRITON_INTERPRET is read
when the kernel modules are imported and the kernels launched, so each interpreter check runs in a
fresh subprocess (`python tests/test_triton_kernels.py <check>`) with the variable set before import.
GPU (`-m gpu`): full-size shapes in process, plus a check that Inductor inlines the kernels.

Every check draws fresh random inputs (never zeros), compares integers exactly and floats against a
float64 reference by relative norm.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.conftest import need_triton_interpreter  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")


# ----------------------------------------------------------------------------------------------
# shared checks (run in the interpreter subprocess on CPU, in process on CUDA)
# ----------------------------------------------------------------------------------------------

def channel_scale(value: float, w: torch.Tensor) -> torch.Tensor:
    """The GEMM ops' scale argument: float32 [N] (here every output channel the same)."""
    return torch.full((w.shape[0],), value, dtype=torch.float32, device=w.device)


def _rand_q(shape, qmax, gen, device):
    """Random int8 in [-qmax, qmax] with no all-zero rows (zeros hide unwritten outputs)."""
    q = torch.randint(-qmax, qmax + 1, shape, generator=gen, dtype=torch.int8)
    q[..., 0] = torch.randint(1, qmax + 1, q[..., 0].shape, generator=gen, dtype=torch.int8)
    return q.to(device)


def _layout(t: torch.Tensor, kind: str, gen) -> torch.Tensor:
    """Same values, another memory layout: 'c' contiguous, 'wide' row stride > width (a slice of a
    wider buffer), 't' column-major (transposed storage)."""
    if kind == "c":
        return t.contiguous()
    if kind == "wide":
        buf = torch.randint(-100, 100, (t.shape[0], t.shape[1] + 37), generator=gen).to(t.dtype).to(t.device)
        buf[:, 5:5 + t.shape[1]] = t
        return buf[:, 5:5 + t.shape[1]]
    if kind == "t":
        return t.t().contiguous().t()
    raise ValueError(kind)


def check_gemm(device: str, shapes, bits: int, fp8: bool, seed: int = 0, configs=None,
               out_dtypes=(torch.float32, torch.bfloat16, torch.float16)):
    """Exact int32 accumulation and float epilogue of the Triton GEMM against the references.
    configs: tile configs to force, one per shape in turn (None: the autotuner picks)."""
    from fq_compile.kernels import int_matmul_reference, quant_linear_reference
    from fq_compile.kernels.packing import pack_int4
    from fq_compile.kernels.triton import gemm as tg

    gen = torch.Generator().manual_seed(seed)
    qmax = 127 if bits == 8 else 7
    for i, (m, n, k, la, lw) in enumerate(shapes):
        cfg = dict(fp8=fp8, config=configs[i % len(configs)] if configs else None)
        a = _rand_q((m, k), qmax, gen, device)
        w = _rand_q((n, k), qmax, gen, device)
        acc_ref = int_matmul_reference(a, w)
        A, W = (pack_int4(a), pack_int4(w)) if bits == 4 else (a, w)
        A, W = _layout(A, la, gen), _layout(W, lw, gen)
        acc = tg.int_linear_cuda(A, W, 1.0, None, torch.float32, bits, raw_int32=True, **cfg)
        assert acc.dtype == torch.int32 and acc.shape == (m, n)
        bad = (acc != acc_ref).sum().item()
        assert bad == 0, f"int{bits} fp8={fp8} {(m, n, k, la, lw)}: {bad} int32 mismatches"
        # per output channel scales (a per-tensor plan passes equal values): fresh random values
        scale = (torch.rand(n, generator=gen) * 1e-3 + 1e-4) * (1 + 9 * (torch.rand(n, generator=gen) < 0.1))
        scale = scale.to(device)
        bias = (torch.randn(n, generator=gen) * 0.5).to(device)
        y64 = acc_ref.double() * scale.double() + bias.double()
        tols = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}
        for out_dtype in out_dtypes:
            tol = tols[out_dtype]
            y = tg.int_linear_cuda(A, W, scale, bias, out_dtype, bits, **cfg)
            assert y.dtype == out_dtype and torch.isfinite(y).all()
            err = ((y.double() - y64).norm() / y64.norm()).item()
            assert err < tol, f"int{bits} {(m, n, k)} {out_dtype}: rel err {err}"
            if out_dtype == torch.float32:  # the epilogue matches the reference's float32 ops
                ref = quant_linear_reference(A, W, scale, bias, bits, out_dtype)
                assert torch.equal(y, ref), f"int{bits} {(m, n, k)}: fp32 epilogue differs from reference"
            # the ReLU epilogue (ReLU before the cast = after it: rounding is monotone, keeps 0)
            yr = tg.int_linear_cuda(A, W, scale, bias, out_dtype, bits, act="relu", **cfg)
            assert torch.equal(yr, torch.relu(y)) and (yr == 0).any() and (yr > 0).any(), \
                f"int{bits} {(m, n, k)} {out_dtype}: ReLU epilogue differs"
            if out_dtype == torch.float32:
                assert torch.equal(yr, quant_linear_reference(A, W, scale, bias, bits, out_dtype, act="relu"))
        # per-token scales (a row vector beside the column one): bit-exact against the reference, every
        # output dtype, the ReLU epilogue, rows of very different magnitudes
        row = torch.rand(m, generator=gen) * 1.75 + 0.25     # 8x apart at most: fp16 outputs stay finite
        row = row.to(device)
        for out_dtype in out_dtypes:
            for act in ("none", "relu"):
                y = tg.int_linear_cuda(A, W, scale, bias, out_dtype, bits, act=act, row_scale=row, **cfg)
                ref = quant_linear_reference(A, W, scale, bias, bits, out_dtype, act, row_scale=row)
                if out_dtype != torch.float32 and device == "cpu":   # the interpreter truncates to 16 bits
                    ref = quant_linear_reference(A, W, scale, bias, bits, torch.float32, act, row_scale=row)
                    y = y.float()
                    err = (y - ref).abs() - ref.abs() * 2 ** -7
                    assert (err <= 1e-6).all(), f"int{bits} {(m, n, k)} {out_dtype} {float(err.max())}"
                    continue
                bad = (y != ref).sum().item()
                assert bad == 0, f"int{bits} {(m, n, k)} {out_dtype} {act} row scales: {bad} outputs differ"
        # leading dims of x are kept
        A3 = A.contiguous().reshape(1, m, -1)
        y3 = tg.int_linear_cuda(A3, W, scale, None, torch.float32, bits, **cfg)
        assert y3.shape == (1, m, n) and torch.equal(y3[0], (acc_ref.float() * scale))
        # a number is every channel the same
        y1 = tg.int_linear_cuda(A, W, 0.00123, None, torch.float32, bits, **cfg)
        assert torch.equal(y1, acc_ref.float() * 0.00123)


def _make_map(c: int, extras: torch.Tensor, pad_multiple: int, qmax: int, gen, mult_scale: float):
    """Per-position constants as the op docstring defines them: originals first (lo = E*qmax,
    hi = inf), then E extra slices of each flattened channel (lo = i*qmax, hi = qmax), then padding
    (mult = 0)."""
    inf = float("inf")
    src = [torch.arange(c)]
    lo = [extras.float() * qmax]
    hi = [torch.full((c,), inf)]
    for j in torch.nonzero(extras).flatten().tolist():
        e = int(extras[j])
        src.append(torch.full((e,), j))
        lo.append(torch.arange(e).float() * qmax)
        hi.append(torch.full((e,), float(qmax)))
    n = sum(t.numel() for t in src)
    pad = (-n) % pad_multiple
    src.append(torch.zeros(pad, dtype=torch.int64))
    lo.append(torch.zeros(pad))
    hi.append(torch.zeros(pad))
    src, lo, hi = torch.cat(src).to(torch.int32), torch.cat(lo), torch.cat(hi)
    chan_mult = (torch.rand(c, generator=gen) + 0.5) * mult_scale
    mult = chan_mult[src.long()].clone()
    mult[n:] = 0.0
    return src, mult.float(), lo.float(), hi.float()


def check_flatten_quantize(device: str, cases, seed: int = 0):
    """Bit-exact Triton activation kernel vs flatten_quantize_reference, incl. values beyond the
    calibrated range (saturation) and non-contiguous inputs."""
    from fq_compile.kernels import flatten_quantize_reference, unpack_int4
    from fq_compile.kernels.flatten_quantize import flatten_quantize_rows_reference
    from fq_compile.kernels.triton import flatten_quantize as tf

    gen = torch.Generator().manual_seed(seed)
    for (lead, c, bits, dtype, layout) in cases:
        qmax = 127 if bits == 8 else 7
        extras = torch.zeros(c, dtype=torch.int64)
        hot = torch.randperm(c, generator=gen)[: max(1, c // 16)]
        extras[hot] = torch.randint(1, 4, (hot.numel(),), generator=gen)
        src, mult, lo, hi = _make_map(c, extras, 32, qmax, gen, mult_scale=qmax / 3.0)
        x = torch.randn(*lead, c, generator=gen) * 1.5
        x[..., hot] *= 4.0                                   # flattened channels carry outliers
        x = x * torch.where(torch.rand(x.shape, generator=gen) < 0.01, 30.0, 1.0)  # beyond range
        x = x.to(dtype)
        if layout == "t" and x.dim() == 3:                   # [T, B, C] storage seen as [B, T, C]
            x = x.transpose(0, 1).contiguous().transpose(0, 1)
        elif layout == "wide":
            buf = torch.randn(*lead, c + 24, generator=gen).to(dtype)
            buf[..., 8:8 + c] = x
            x = buf[..., 8:8 + c]
        dev = [t.to(device) for t in (src, mult, lo, hi)]
        xd = x.to(device) if layout == "c" else _same_layout_to(x, device)
        out = tf.flatten_quantize_cuda(xd, *dev, bits)
        ref = flatten_quantize_reference(x, src, mult, lo, hi, bits)
        assert out.shape == ref.shape and out.dtype == ref.dtype
        bad = (out.cpu() != ref).sum().item()
        assert bad == 0, f"flatten_quantize {(lead, c, bits, dtype, layout)}: {bad} mismatches"
        q = ref if bits == 8 else unpack_int4(ref)
        assert (q.abs() == qmax).any() and (q != 0).any(), "test inputs should saturate somewhere"
        # per-token scales: the same map with each row's own threshold (rmult = 1 / (s (E + 1)), with
        # the channel's multiplier standing in for 1 / s); an all-zero row gives r = 0 and zeros
        rmult = (mult[:c] / (extras.float() + 1)).float()      # positions [0, C) are the channels themselves
        pmult = mult
        x0 = x.clone()
        x0[(0,) * (x0.dim() - 1)] = 0                        # the first row all zeros
        for i, xr in enumerate((x, x0)):
            xd = xr.to(device) if layout == "c" else _same_layout_to(xr, device)
            ref, rr = flatten_quantize_rows_reference(xr, src, pmult, lo, hi, rmult, bits)
            for resident in (False, True):      # two launches, and the one-launch row-resident kernel
                out, r = tf.flatten_quantize_rows_cuda(xd, dev[0], pmult.to(device), dev[2], dev[3],
                                                       rmult.to(device), bits, resident=resident)
                case = (lead, c, bits, dtype, layout, "resident" if resident else "two-pass")
                assert r.shape == rr.shape and torch.equal(r.cpu(), rr), f"row maxima differ {case}"
                bad = (out.cpu() != ref).sum().item()
                assert bad == 0, f"flatten_quantize_rows {case}: {bad} mismatches"
            q = ref if bits == 8 else unpack_int4(ref)
            q = q.reshape(-1, q.shape[-1])
            peak = q.abs().amax(-1)
            assert (peak == qmax)[i:].all() and (peak[:i] == 0).all(), f"each row's largest slice is qmax: {peak}"


def _same_layout_to(x: torch.Tensor, device: str) -> torch.Tensor:
    """Copy a strided CPU tensor to device keeping its strides (as_strided over the storage)."""
    base = torch.empty(x.untyped_storage().nbytes() // x.element_size(), dtype=x.dtype)
    base.copy_(torch.as_strided(x, (base.numel(),), (1,), 0))
    return torch.as_strided(base.to(device), x.shape, x.stride(), x.storage_offset())


# shapes: (M, N, K, A layout, W layout); K odd / not a multiple of the tile on purpose
SMALL_GEMM = [(1, 40, 96, "c", "c"), (5, 70, 300, "wide", "c"), (3, 33, 1000, "c", "t"),
              (33, 50, 128, "t", "c"), (70, 33, 62, "wide", "wide"), (17, 64, 160, "c", "c"),
              (300, 72, 224, "c", "c"), (270, 40, 96, "t", "c")]   # M > 256: TMA kernel, pointer kernel
SMALL_GEMM_INT8_ODD = [(2, 24, 45, "c", "c"), (40, 20, 77, "wide", "c")]
SMALL_FQ = [((1,), 40, 8, torch.float32, "c"), ((3, 7), 72, 8, torch.bfloat16, "t"),
            ((5,), 50, 8, torch.float16, "wide"), ((2, 9), 40, 4, torch.bfloat16, "t"),
            ((1,), 64, 4, torch.float32, "c"), ((11,), 36, 4, torch.float16, "wide")]


def _interp_main(which: str):
    assert os.environ.get("TRITON_INTERPRET") == "1"
    if which == "gemm8":
        check_gemm("cpu", SMALL_GEMM + SMALL_GEMM_INT8_ODD, 8, False, seed=1)
    elif which == "gemm4":
        check_gemm("cpu", SMALL_GEMM, 4, False, seed=2)
        check_gemm("cpu", SMALL_GEMM[:3], 4, True, seed=3)
    elif which == "fq":
        check_flatten_quantize("cpu", SMALL_FQ, seed=4)
    else:
        raise SystemExit(f"unknown check {which}")
    print(f"{which}: ok")


# ----------------------------------------------------------------------------------------------
# CPU: interpreter, one fresh process per check
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["gemm8", "gemm4", "fq"])
def test_interpreter(which):
    need_triton_interpreter()
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               CUDA_VISIBLE_DEVICES="")
    r = subprocess.run([sys.executable, __file__, which], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]


def test_import_registers_without_cuda():
    """Importing the kernels package fills the CUDA registries without needing a GPU."""
    pytest.importorskip("triton")
    import fq_compile.kernels  # noqa: F401
    from fq_compile.kernels import flatten_quantize, int_gemm
    assert "flatten_quantize" in flatten_quantize.CUDA_IMPL
    assert {"int8_linear", "int4_linear"} <= set(int_gemm.CUDA_IMPL)


# ----------------------------------------------------------------------------------------------
# GPU: full size
# ----------------------------------------------------------------------------------------------

FULL_GEMM = [(2048, 4096, 5120, "c", "c"), (1, 4096, 5120, "c", "c"), (16, 5120, 20480, "c", "c"),
             (300, 1000, 4128, "wide", "t"), (4096, 1536, 1056, "t", "c"), (7, 2900, 3000, "c", "wide"),
             (65536, 256, 1024, "c", "c"), (129, 4096, 4096, "c", "c"), (1000, 3000, 2050, "c", "c"),
             (5000, 4100, 4160, "c", "c")]
VARIANTS = [(8, False), (4, False), (4, True)]


def _full_cases():
    """(bits, fp8, shape, forced config): every autotune candidate of the shape's regime is run on
    some full-size shape, without paying for autotuning each one (tests don't time)."""
    from fq_compile.kernels.triton import gemm as tg
    cases = []
    for bits, fp8 in VARIANTS:
        for i, shape in enumerate(FULL_GEMM):
            m = shape[0]
            pool = None if m <= 16 else (tg.MID_CONFIGS if m <= 256 else tg.LARGE_CONFIGS)[bits]
            cfg = None if pool is None else pool[(i + bits) % len(pool)]
            if m > 256 and i % 2 == 0:
                cfg = None  # the TMA kernel (or the autotuned pointer kernel where TMA is off)
            cases.append(pytest.param(bits, fp8, shape, cfg, id=f"int{bits}{'fp8' if fp8 else ''}-{shape[0]}x{shape[1]}x{shape[2]}"))
    return cases


@gpu
@needs_cuda
@pytest.mark.parametrize("bits,fp8,shape,cfg", _full_cases() if HAS_CUDA else [])
def test_gpu_gemm_full(bits, fp8, shape, cfg):
    i = FULL_GEMM.index(shape)
    dts = [(torch.float32, torch.bfloat16), (torch.float32, torch.float16)][i % 2]
    check_gemm("cuda", [shape], bits, fp8, seed=10 + 3 * i + bits + fp8, configs=[cfg] if cfg else None,
               out_dtypes=dts)


@gpu
@needs_cuda
@pytest.mark.parametrize("bits,fp8", VARIANTS)
def test_gpu_gemm_autotuned(bits, fp8, monkeypatch):
    """The autotuned path end to end (as the ops run it) on two shapes."""
    monkeypatch.setenv("FQ_TUNE", "1")
    check_gemm("cuda", [(4096, 4096, 5120, "c", "c"), (200, 3072, 2048, "c", "c")], bits, fp8, seed=40 + bits + fp8,
               out_dtypes=(torch.bfloat16,))


@gpu
@needs_cuda
def test_gpu_flatten_quantize_full():
    cases = [((8, 1024), 4096, 8, torch.bfloat16, "c"), ((2048,), 4096, 8, torch.float16, "wide"),
             ((4, 512), 5120, 4, torch.bfloat16, "t"), ((1,), 4096, 4, torch.float32, "c"),
             ((16,), 7168, 8, torch.float32, "c"), ((65536,), 1024, 8, torch.bfloat16, "c")]
    check_flatten_quantize("cuda", cases, seed=20)


@gpu
@needs_cuda
def test_gpu_inductor_inlines_kernels():
    """torch.compile(inductor) of flatten_quantize + int8/int4_linear calls our Triton kernels from
    the generated code, with no fallback to the reference ops."""
    from torch._inductor.utils import run_and_get_code

    import fq_compile.kernels  # noqa: F401
    from fq_compile.kernels.packing import pack_int4

    gen = torch.Generator().manual_seed(30)
    c, n, m = 256, 192, 64
    src, mult, lo, hi = (t.cuda() for t in _make_map(c, torch.zeros(c, dtype=torch.int64), 32, 127, gen, 40.0))
    w8 = _rand_q((n, src.numel()), 127, gen, "cuda")
    w4 = pack_int4(_rand_q((n, src.numel()), 7, gen, "cpu")).cuda()
    bias = torch.randn(n, generator=gen).cuda()
    mult4 = mult * (7 / 127)

    def f(x):
        y8 = torch.ops.fq.int8_linear(torch.ops.fq.flatten_quantize(x, src, mult, lo, hi, 8), w8,
                                      channel_scale(1e-3, w8), bias,
                                      torch.bfloat16)
        y4 = torch.ops.fq.int4_linear(torch.ops.fq.flatten_quantize(x, src, mult4, lo * 7 / 127, hi, 4), w4,
                                      channel_scale(1e-2, w4),
                                      None, torch.bfloat16)
        return torch.relu(y8) + y4

    x = torch.randn(m, c, generator=gen).to(torch.bfloat16).cuda()
    torch._dynamo.reset()
    compiled = torch.compile(f, backend="inductor", fullgraph=True)
    out, codes = run_and_get_code(compiled, x)
    code = "\n".join(codes)
    assert "flatten_quantize_kernel" in code and "int_gemm_kernel" in code
    for ref in ("int8_linear_reference", "int4_linear_reference", "flatten_quantize_reference"):
        assert ref not in code, f"compiled code falls back to {ref}"
    torch.testing.assert_close(out.float(), f(x).float(), rtol=1e-2, atol=1e-2)  # bf16 add fused


if __name__ == "__main__":
    _interp_main(sys.argv[1])


def test_traced_calls_avoid_host_tma_descriptors():
    """Inductor traces the GEMM op's body with fake tensors; a host TMA descriptor would then hold
    a fake tensor as a graph constant that Inductor's FX cache cannot hash (seen on the H100), so
    traced calls must take the pointer kernel.  _traced() is what tells the two apart."""
    pytest.importorskip("triton")
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fq_compile.kernels.triton.gemm import _traced

    assert not _traced(torch.ones(4, 4, dtype=torch.int8))
    with FakeTensorMode():
        assert _traced(torch.ones(4, 4, dtype=torch.int8))
