"""The CPU reference ops: integer semantics against independent float64 computations."""

import pytest
import torch

import fq_compile  # noqa: F401  (registers the ops)
from fq_compile.kernels import (
    flatten_quantize_reference,
    int_matmul_reference,
    pack_int4,
    unpack_int4,
)
from fq_compile.planning.flatten import channel_map


def _float64_flatten_quantize(x, e, smooth, t, qmax):
    """Eq. 3 + per-tensor quantization, element by element in float64 (independent of the op)."""
    xs = x.double() / smooth.double()
    cols = []
    c = x.shape[-1]
    extra_cols = []
    for j in range(c):
        a, sgn = xs[..., j].abs() / t, torch.sign(xs[..., j])
        for i in range(int(e[j])):
            extra_cols.append(sgn * (a - i).clamp(0, 1) * qmax)
        cols.append(sgn * (a - int(e[j])).clamp_min(0) * qmax)
    v = torch.stack(cols + extra_cols, -1)
    return torch.round(v).clamp(-qmax, qmax)


@pytest.mark.parametrize("bits,dtype", [(8, torch.float32), (8, torch.bfloat16), (4, torch.float16), (4, torch.float32)])
def test_flatten_quantize_matches_float64_eq3(bits, dtype):
    g = torch.Generator().manual_seed(bits)
    c = 24
    x = (torch.randn(3, 50, c, generator=g) * torch.linspace(0.2, 6.0, c)).to(dtype)
    smooth = torch.rand(c, generator=g) + 0.5
    m = (x.float() / smooth).abs().amax((0, 1))
    t = float(m.mean())
    e = torch.floor(m / t).long()
    cm = channel_map(e, None, pad_multiple=8)
    qmax = 127 if bits == 8 else 7
    mult = torch.where(cm.active, (1.0 / smooth.double())[cm.src.long()] * qmax / t, torch.zeros(cm.size, dtype=torch.float64)).float()
    lo = cm.lo * qmax
    hi = torch.where(cm.hi.isinf(), cm.hi, cm.hi * qmax)
    q = flatten_quantize_reference(x, cm.src, mult, lo, hi, bits)
    if bits == 4:
        assert q.dtype == torch.uint8 and q.shape[-1] == cm.size // 2
        q = unpack_int4(q)
    want = _float64_flatten_quantize(x, e, smooth, t, qmax)
    n = want.shape[-1]
    assert bool((q[..., n:] == 0).all())                     # padding stays zero
    diff = (q[..., :n].double() - want).abs()
    assert float(diff.max()) <= 1                             # float32 vs float64 rounding at ties
    assert float((diff > 0).double().mean()) < 2e-3
    assert bool((q != 0).any())


@pytest.mark.parametrize("bits,dtype", [(8, torch.float32), (8, torch.bfloat16), (4, torch.float16)])
def test_flatten_quantize_is_the_formula_step_by_step(bits, dtype):
    """The in-place CPU implementation gives the integers of the formula written one tensor per step
    (the module docstring's definition), on fuzzed tables: level edges, signs, zeros, beyond-range values."""
    g = torch.Generator().manual_seed(bits + 3)
    qmax = 127 if bits == 8 else 7
    for _ in range(20):
        c, kp = int(torch.randint(1, 40, (1,), generator=g)), 2 * int(torch.randint(1, 40, (1,), generator=g))
        x = (torch.randn(2, 33, c, generator=g) * 4).to(dtype)
        x[0, :3] = 0.0
        x[0, 3] = -0.0
        x[1, :4] = (torch.randint(-3 * qmax, 3 * qmax, (4, c), generator=g) + 0.5).to(dtype)   # ties
        src = torch.randint(0, c, (kp,), generator=g).to(torch.int32)
        mult = torch.rand(kp, generator=g) * 60 * (torch.rand(kp, generator=g) > 0.1)
        mult = torch.where(torch.rand(kp, generator=g) > 0.7, torch.ones(kp), mult)
        lo = qmax * torch.randint(0, 3, (kp,), generator=g).float()
        hi = torch.where(torch.rand(kp, generator=g) > 0.5, torch.tensor(float("inf")), torch.tensor(float(qmax)))
        gx = x.index_select(-1, src.long()).float()
        a = gx.abs() * mult
        n = torch.round(torch.minimum(a, lo + hi.clamp_max(float(qmax))))
        q = (n - lo).clamp_min(0.0)
        want = torch.where(gx < 0, -q, q).to(torch.int8)
        got = flatten_quantize_reference(x, src, mult, lo, hi, bits)
        assert torch.equal(unpack_int4(got) if bits == 4 else got, want)


def test_values_beyond_calibrated_range_saturate_not_wrap():
    cm = channel_map(torch.tensor([2]), None, pad_multiple=4)   # T = 1, qmax 127
    mult = torch.where(cm.active, torch.full((4,), 127.0), torch.zeros(4))
    lo = cm.lo * 127
    hi = torch.where(cm.hi.isinf(), cm.hi, cm.hi * 127)
    x = torch.tensor([[10.0], [-10.0], [2.5], [-0.25]])
    q = flatten_quantize_reference(x, cm.src, mult, lo, hi, 8)
    assert q.tolist() == [[127, 127, 127, 0], [-127, -127, -127, 0], [64, 127, 127, 0], [0, -32, 0, 0]]


def test_int4_pack_round_trip_all_values():
    q = torch.arange(-8, 8, dtype=torch.int8).repeat(3, 2)
    p = pack_int4(q)
    assert p.dtype == torch.uint8 and p.shape == (3, 16)
    assert torch.equal(unpack_int4(p), q)
    assert int(p[0, 0]) == ((-7 & 0xF) << 4) | (-8 & 0xF)


@pytest.mark.parametrize("m,k,n", [(1, 32, 7), (5, 96, 33), (64, 160, 48), (3, 1023, 5), (2, 1024, 9),
                                   (7, 1025, 4), (4, 2049, 3), (1, 5000, 2), (0, 16, 4), (3, 0, 4)])
def test_int_matmul_is_exact(m, k, n):
    """The CPU path runs float32 GEMMs over K chunks: bit-identical to the int64 definition on fuzzed
    shapes around the chunk boundary, with random values and with the worst case (every product
    +16384, which overflows float32's exact range after 1024 terms)."""
    g = torch.Generator().manual_seed(m * 7919 + k)
    a = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    b = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    for x, y in ((a, b), (torch.full_like(a, -128), torch.full_like(b, -128))):
        got = int_matmul_reference(x, y)
        assert got.dtype == torch.int32 and got.shape == (m, n)
        assert torch.equal(got.long(), x.long() @ y.long().T)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("m,k,n", [(32, 64, 48), (17, 4096, 520), (5, 96, 33), (1, 5000, 2), (40, 40, 24)])
def test_gpu_int_matmul_is_exact(m, k, n):
    """The CUDA branch: torch._int_mm on the weight's column-major view (no copy), its row-major copy where
    that is refused, float64 where _int_mm refuses the shape (M <= 16, K or N not multiples of 8): every
    path equals the int64 definition, also for a strided (sliced) weight."""
    g = torch.Generator().manual_seed(m * 31 + k)
    a = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    b = torch.randint(-128, 128, (2 * n, k), generator=g, dtype=torch.int8)
    for w in (b[:n], b[::2]):
        got = int_matmul_reference(a.cuda(), w.cuda())
        assert got.dtype == torch.int32 and got.shape == (m, n)
        assert torch.equal(got.cpu().long(), a.long() @ w.long().T)


def test_int_matmul_falls_back_to_float64_under_reduced_float32_precision():
    from fq_compile.kernels.int_gemm import exact_float_chunk

    assert exact_float_chunk(4096) == (torch.float32, 1024)
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")      # a user allowing bf16/TF32 GEMMs
        assert exact_float_chunk(4096) == (torch.float64, 4096)
        a = torch.full((2, 3000), 127, dtype=torch.int8)
        assert torch.equal(int_matmul_reference(a, a).long(), a.long() @ a.long().T)
    finally:
        torch.set_float32_matmul_precision(old)


@pytest.mark.parametrize("bits", [8, 4])
def test_quant_linear_ops_against_float64(bits):
    g = torch.Generator().manual_seed(bits)
    qmax = 127 if bits == 8 else 7
    xq = torch.randint(-qmax, qmax + 1, (40, 64), generator=g, dtype=torch.int8)
    xq_t = xq.T.contiguous().T                       # non-contiguous view of the same values
    wq = torch.randint(-qmax, qmax + 1, (24, 64), generator=g, dtype=torch.int8)
    bias = torch.randn(24, generator=g)
    scale = torch.rand(24, generator=g) * 0.02 + 1e-3             # one per output channel
    want = (xq.double() @ wq.double().T) * scale.double() + bias.double()
    if bits == 4:
        xin, win, op = pack_int4(xq), pack_int4(wq), torch.ops.fq.int4_linear
    else:
        xin, win, op = xq_t, wq, torch.ops.fq.int8_linear
    for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)):
        y = op(xin, win, scale, bias, dtype)
        assert y.dtype == dtype and y.shape == (40, 24)
        assert float((y.double() - want).norm() / want.norm()) < tol
    y3 = op(xin.reshape(4, 10, -1), win, scale, None, torch.float32)
    assert y3.shape == (4, 10, 24)
    with pytest.raises(Exception, match="scale must be float32"):
        op(xin, win, scale[:5], bias, torch.float32)


def test_flatten_quantize_rounds_once_then_slices():
    """The op rounds the value once and slices the integer: a value's slices add up to rint(a)
    exactly (ties included: half to even on the whole value, not per slice), saturating at the
    calibrated range."""
    qmax = 127
    # one channel flattened into 2 extra slices: positions [remainder (lo=2q), slice 0 (lo=0), slice 1 (lo=q)]
    src = torch.tensor([0, 0, 0], dtype=torch.int32)
    lo = torch.tensor([2.0 * qmax, 0.0, float(qmax)])
    hi = torch.tensor([float("inf"), float(qmax), float(qmax)])
    mult = torch.ones(3)
    for a in (0.0, 0.5, 1.5, 126.5, 127.5, 128.5, 253.5, 254.5, 300.25, 380.5, 381.0, 381.5, 1e9):
        x = torch.tensor([[a], [-a]])
        q = flatten_quantize_reference(x, src, mult, lo, hi, 8).long()
        want = min(round(a), 3 * qmax)                 # Python rounds half to even too
        assert int(q[0].sum()) == want and int(q[1].sum()) == -want, (a, q.tolist())
        assert bool((q[0] >= 0).all() and (q[0] <= qmax).all())


def test_cpu_int8_path_is_exact_where_chosen(monkeypatch):
    """Both CPU paths (oneDNN int8 where the CPU has VNNI/AMX, float32 chunks elsewhere) give the
    int64 definition's integers; the choice follows the CPU's int8 dot instructions."""
    from fq_compile.kernels import int_gemm

    g = torch.Generator().manual_seed(11)
    a = torch.randint(-128, 128, (9, 1040), generator=g, dtype=torch.int8)
    b = torch.randint(-128, 128, (17, 1040), generator=g, dtype=torch.int8)
    want = a.long() @ b.long().T
    b_cols = b.t().contiguous().t()              # the same weights stored column-major, and every other row
    for has_dot in (False, True):
        monkeypatch.setattr(int_gemm, "_INT8_DOT", has_dot)
        assert int_gemm.cpu_gemm_path(1040) == ("int_mm" if has_dot else "float")
        assert torch.equal(int_matmul_reference(a, b).long(), want)
        assert torch.equal(int_matmul_reference(a, b_cols).long(), want)
        assert torch.equal(int_matmul_reference(a[:1], b[::2]).long(), want[:1, ::2])
    assert int_gemm.cpu_gemm_path(1041) == "float"          # K not a multiple of 8: float chunks


@pytest.mark.parametrize("k", [96, 1024, 1040, 2100])
def test_quant_linear_epilogue_is_the_int32_definition(k, monkeypatch):
    """The CPU epilogue, which skips the int32 round trip when one float32 GEMM is exact, gives the
    definition's bits: (int32 acc -> float32) * scale[n] + bias, cast once, on both sides of the chunk
    size and on both CPU paths (oneDNN int8, float32 chunks)."""
    from fq_compile.kernels import int_gemm

    g = torch.Generator().manual_seed(k)
    for has_dot in (False, True):
        monkeypatch.setattr(int_gemm, "_INT8_DOT", has_dot)
        for bits, qmax in ((8, 127), (4, 7)):
            xq = torch.randint(-qmax - 1, qmax + 1, (3, 7, k), generator=g, dtype=torch.int8)
            wq = torch.randint(-qmax - 1, qmax + 1, (32, k), generator=g, dtype=torch.int8)
            bias = torch.randn(32, generator=g)
            scale = torch.rand(32, generator=g) * 3e-4 + 1e-5
            acc = (xq.reshape(-1, k).long() @ wq.long().T).to(torch.int32)
            xin, win = (pack_int4(xq), pack_int4(wq)) if bits == 4 else (xq, wq)
            for dtype in (torch.float32, torch.bfloat16):
                for b in (bias, None):
                    want = acc.float() * scale
                    want = (want + b if b is not None else want).to(dtype).reshape(3, 7, 32)
                    got = int_gemm.quant_linear_reference(xin, win, scale, b, bits, dtype)
                    assert torch.equal(got, want), (has_dot, bits, dtype, b is None)
