"""The fused decode kernel of fq::flat_linear (kernels/triton/decode.py) against the reference
(flatten_quantize_reference, then quant_linear_reference), bit for bit.

CPU: through the Triton interpreter in a fresh subprocess (TRITON_INTERPRET is read at import), at
M in {1, 3, 16} (and 40: the 64-row bucket; 70: the fallback to flatten_quantize + GEMM), odd K,
INT8 and INT4, random per-channel scales, with and without bias, split and unsplit K.
GPU (`-m gpu`): the OPT-13B layer shapes at M = 1 (tuned tiling), every tiling candidate on small
shapes at M in {1, 3, 16, 64}, a CUDA graph replay.
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

from tests.kernels.test_triton import _make_map, _rand_q  # noqa: E402
from tests.conftest import need_triton_interpreter  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def _case(m, c, n, bits, pad, gen, device, x_dtype=torch.float32, bias=True, layout="c"):
    """Fresh random operands: a flatten map with hot channels (pad: K' padding multiple, 1 gives odd K'),
    activations with outliers and values past the calibrated range, weights, per-channel scales."""
    qmax = 127 if bits == 8 else 7
    extras = torch.zeros(c, dtype=torch.int64)
    hot = torch.randperm(c, generator=gen)[: max(1, c // 8)]
    extras[hot] = torch.randint(1, 4, (hot.numel(),), generator=gen)
    src, mult, lo, hi = _make_map(c, extras, pad, qmax, gen, mult_scale=qmax / 3.0)
    k = src.numel()
    x = torch.randn(m, c, generator=gen) * 1.5
    x[:, hot] *= 4.0
    x = x * torch.where(torch.rand(x.shape, generator=gen) < 0.02, 30.0, 1.0)
    if layout == "t":                                  # column-major storage: strided gather
        x = x.t().contiguous().t()
    x = x.to(x_dtype)
    w = _rand_q((n, k), qmax, gen, "cpu")
    if bits == 4:
        from fq_compile.kernels.packing import pack_int4
        w = pack_int4(w)
    scale = (torch.rand(n, generator=gen) * 1e-3 + 1e-4) * (1 + 9 * (torch.rand(n, generator=gen) < 0.1))
    b = torch.randn(n, generator=gen) * 0.5 if bias else None
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    if layout == "t" and device != "cpu":
        xd = x.t().contiguous().to(device).t()
    else:
        xd = to(x)
    return (x, src, mult, lo, hi, w, scale.float(), b), (xd, to(src), to(mult), to(lo), to(hi), to(w),
                                                          to(scale.float()), to(b))


ALL_OUT = (torch.float32, torch.bfloat16, torch.float16)


def row_multipliers(src: torch.Tensor, mult: torch.Tensor, c: int) -> torch.Tensor:
    """rmult for per-token scales over a test map: each channel's multiplier / (E_j + 1), E_j its
    extra positions (padding, mult 0, excluded)."""
    used = src.long()[mult != 0]
    return (mult[:c] / torch.bincount(used, minlength=c).float()).float()


class _Counted:
    """A Triton kernel's launches (`kernel[grid](...)`), counted."""

    def __init__(self, kernel):
        self.kernel, self.n = kernel, 0

    def __getitem__(self, grid):
        self.n += 1
        return self.kernel[grid]


def check_decode(device: str, cases, seed: int, configs=(None,), out_dtypes=None):
    """Each case: (M, C, N, bits, pad, x dtype, bias, x layout), compared exactly with the reference
    in every output dtype (out_dtypes None), or in out_dtypes[i % len] for case i (on the GPU every
    dtype is a kernel compile); odd cases with per-token scales (rmult); the workspace is all zeros
    after every call (the kernel cleans up)."""
    from fq_compile.kernels import flat_linear_reference
    from fq_compile.kernels.flatten_quantize import (flatten_quantize_reference, flatten_quantize_rows_reference,
                                                     row_absmax)
    from fq_compile.kernels.triton import decode as td

    gen = torch.Generator().manual_seed(seed)
    for i, (m, c, n, bits, pad, x_dtype, bias, layout) in enumerate(cases):
        cfg = configs[i % len(configs)]
        ref_args, dev_args = _case(m, c, n, bits, pad, gen, device, x_dtype, bias, layout)
        k = ref_args[1].numel()
        rmult = row_multipliers(ref_args[1], ref_args[2], c) if i % 2 else None
        rmult_dev = None if rmult is None else rmult.to(device)
        dtypes = ALL_OUT if out_dtypes is None else (out_dtypes[i % len(out_dtypes)],)
        # x quantized and its row maxima as the lowering passes them (computed beside x's producer) when
        # (i + j) % 4 is 2 or 3, else nothing (the op quantizes itself)
        r_dev = None if rmult is None else row_absmax(dev_args[0], rmult_dev)
        if rmult is None:
            xq_dev = flatten_quantize_reference(*ref_args[:5], bits).to(device)
        else:
            xq_dev = flatten_quantize_rows_reference(*ref_args[:5], rmult, bits)[0].to(device)
        variant = cfg[0] if isinstance(cfg, tuple) else None
        for j, out_dtype in enumerate(dtypes):
            gxq = xq_dev if (i + j) % 4 in (2, 3) else None
            given = r_dev if gxq is not None else None
            launches = td.row_absmax_kernel = _Counted(td.row_absmax_kernel)
            try:
                y = td.flat_linear_cuda(*dev_args[:5], bits, *dev_args[5:], out_dtype, config=cfg, rmult=rmult_dev,
                                        r=given, xq=gxq)
            finally:
                td.row_absmax_kernel = launches.kernel
            if variant in ("prequant", "gemv", "dp4a"):     # their row maxima come with the quantized activation
                assert launches.n == 0, f"{variant}: {launches.n} extra row-maximum launches"
            ref = flat_linear_reference(*ref_args[:5], bits, *ref_args[5:], out_dtype, rmult)
            assert y.shape == ref.shape and y.dtype == out_dtype
            bad = (y.cpu() != ref).sum().item()
            if bad and out_dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
                # the interpreter casts float32 -> bfloat16 by truncation (the GPU rounds to nearest
                # even, as torch does): allow one bfloat16 ulp there, exactness on the GPU
                ulp = torch.finfo(torch.bfloat16).eps * ref.float().abs().clamp_min(1e-30)
                bad = ((y.cpu().float() - ref.float()).abs() > ulp).sum().item()
            assert bad == 0, (f"M={m} C={c} K'={k} N={n} int{bits} {x_dtype} {out_dtype} bias={bias} "
                              f"rows={rmult is not None} given: r {given is not None}, xq {gxq is not None}: "
                              f"{bad} mismatches")
            assert ref.abs().max() > 0
            if given is not None:                      # every variant uses the r it is given
                y2 = td.flat_linear_cuda(*dev_args[:5], bits, *dev_args[5:], out_dtype, config=cfg, rmult=rmult_dev,
                                         r=given * 2, xq=gxq)
                assert not torch.equal(y2.cpu(), y.cpu())
            if gxq is not None and variant is not None:  # xq is read by every variant but the fused one
                y2 = td.flat_linear_cuda(*dev_args[:5], bits, *dev_args[5:], out_dtype, config=cfg, rmult=rmult_dev,
                                         r=given, xq=torch.zeros_like(gxq))
                assert torch.equal(y2.cpu(), y.cpu()) == (variant == "fused"), variant
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:      # the workspace is keyed by an indexed device
            dev = torch.device("cuda", torch.cuda.current_device())
        if m <= td.DECODE_MAX_M:
            _, sums, counters = td._WORKSPACE[dev]
            assert not sums.any() and not counters.any(), "the workspace must be left all zeros"
        # leading dims are kept
        x3 = dev_args[0].reshape(1, m, c)
        y3 = td.flat_linear_cuda(x3, *dev_args[1:5], bits, *dev_args[5:], dtypes[-1], config=cfg, rmult=rmult_dev)
        assert y3.shape == (1, m, n)


# (M, C, N, bits, pad, x dtype, bias, x layout): K' odd for INT8 (pad 1), even for INT4 (pad 2);
# the interpreter tile is 16 outputs x 32 positions, one tile a split: K' > 32 splits, K' <= 32 does not
SMALL = [(1, 45, 40, 8, 1, torch.float32, True, "c"), (3, 61, 33, 8, 1, torch.bfloat16, False, "t"),
         (16, 39, 24, 8, 1, torch.float16, True, "c"), (3, 13, 20, 8, 1, torch.float32, True, "c"),
         (40, 29, 18, 8, 1, torch.float32, True, "c"), (70, 37, 17, 8, 1, torch.float32, True, "c"),
         (1, 45, 40, 4, 2, torch.float32, True, "c"), (3, 61, 33, 4, 2, torch.bfloat16, True, "t"),
         (16, 53, 24, 4, 2, torch.float16, False, "c"), (3, 11, 20, 4, 2, torch.float32, True, "c"),
         (40, 29, 18, 4, 2, torch.float32, True, "c"), (70, 37, 17, 4, 2, torch.float32, False, "c")]


# the dp4a variant's cases: K' a multiple of 16 (INT8) / 32 (INT4) (the pad), M <= 4; K' > 32 splits in the
# interpreter
DP4A_CASES = {bits: [(1, 45, 40, bits, pad, torch.float32, True, "c"), (3, 61, 33, bits, pad, torch.bfloat16, False, "t"),
                     (2, 13, 20, bits, pad, torch.float16, True, "c"), (4, 29, 18, bits, pad, torch.float32, True, "c")]
              for bits, pad in ((8, 16), (4, 32))}


def _interp_main(which: str):
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from fq_compile.kernels.triton import decode as td

    bits = {"decode8": 8, "decode4": 4}[which]
    # every variant, with and without per-token scales (case i: variant i % 3, per-token scales if i odd),
    # then the gemv variant on the cases it takes (M <= GEMV_MAX_M), again with and without
    cases = [c for c in SMALL if c[3] == bits]
    check_decode("cpu", cases, seed=11 + bits,
                 configs=[(v, None if v == "gemm" else td.INTERPRET_CONFIG) for v in td.VARIANTS
                          if v not in ("gemv", "dp4a")])
    check_decode("cpu", [c for c in cases if c[0] <= td.GEMV_MAX_M], seed=13 + bits,
                 configs=[("gemv", td.INTERPRET_CONFIG)])
    # dp4a: 32-bit words, K' a multiple of 16 (INT8) / 32 (INT4), M <= GEMV_MAX_M
    check_decode("cpu", DP4A_CASES[bits], seed=17 + bits, configs=[("dp4a", td.INTERPRET_CONFIG)])
    with pytest.raises(ValueError, match=f"multiple of {128 // bits}"):
        dev_args = next(a for seed in range(50)              # a map whose K' is not a multiple of 128 / bits
                        for _, a in [_case(1, 20, 16, bits, 2, torch.Generator().manual_seed(seed), "cpu")]
                        if a[1].numel() % (128 // bits))
        td.flat_linear_cuda(*dev_args[:5], bits, *dev_args[5:], torch.float32, config=("dp4a", td.INTERPRET_CONFIG))
    # the tuner's dp4a choice meets an activation that does not start on 16 bytes: it runs the prequant kernel
    # (forced, dp4a refuses it)
    ref_args, dev_args = _case(2, 45, 40, bits, 128 // bits, torch.Generator().manual_seed(3), "cpu")
    from fq_compile.kernels import flat_linear_reference
    from fq_compile.kernels.flatten_quantize import flatten_quantize_reference
    xq = flatten_quantize_reference(*ref_args[:5], bits)
    shifted = torch.empty(xq.numel() + 4, dtype=xq.dtype)[4:].view(xq.shape)
    shifted.copy_(xq)
    ref = flat_linear_reference(*ref_args[:5], bits, *ref_args[5:], torch.float32, None)
    with pytest.raises(ValueError, match="16 bytes"):
        td.flat_linear_cuda(*dev_args[:5], bits, *dev_args[5:], torch.float32, xq=shifted,
                            config=("dp4a", td.INTERPRET_CONFIG))
    chose = td._choose
    td._choose = lambda *a, **k: ("dp4a", td.INTERPRET_CONFIG)
    try:
        assert torch.equal(td.flat_linear_cuda(*dev_args[:5], bits, *dev_args[5:], torch.float32, xq=shifted), ref)
    finally:
        td._choose = chose
    with pytest.raises(ValueError, match="gemv variant takes at most"):
        _, dev_args = _case(8, 20, 16, bits, 2, torch.Generator().manual_seed(0), "cpu")
        td.flat_linear_cuda(*dev_args[:5], bits, *dev_args[5:], torch.float32, config=("gemv", td.INTERPRET_CONFIG))
    print(f"{which}: ok")


@pytest.mark.parametrize("which", ["decode8", "decode4"])
def test_interpreter(which):
    need_triton_interpreter()
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, __file__, which], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]


def test_op_reference_is_the_two_references_composed():
    """fq::flat_linear on the CPU equals flatten_quantize then the GEMM op, bit for bit."""
    import fq_compile.kernels  # noqa: F401

    gen = torch.Generator().manual_seed(5)
    for bits in (8, 4):
        (x, src, mult, lo, hi, w, scale, b), _ = _case(5, 37, 23, bits, 1 if bits == 8 else 2, gen, "cpu")
        y = torch.ops.fq.flat_linear(x, src, mult, lo, hi, bits, w, scale, b, torch.float32)
        gemm = torch.ops.fq.int4_linear if bits == 4 else torch.ops.fq.int8_linear
        two = gemm(torch.ops.fq.flatten_quantize(x, src, mult, lo, hi, bits), w, scale, b, torch.float32)
        assert torch.equal(y, two)
    with pytest.raises(Exception, match="weight must be"):
        torch.ops.fq.flat_linear(x, src, mult, lo, hi, 8, w, scale, b, torch.float32)   # INT4 weight as INT8


def test_quantized_operands_given_or_not_give_the_same_bits():
    """fq::flat_linear given x quantized (`xq`, and `r`, the row maxima, with per-token scales), as the
    lowering passes them, or computing them itself: the same bits; the operands it is given are used (the
    CPU op multiplies xq by r); r without rmult or without xq, xq without r under per-token scales, or
    operands of the wrong shape or dtype are refused."""
    import fq_compile.kernels  # noqa: F401
    from fq_compile.kernels.flatten_quantize import flatten_quantize_reference, row_absmax

    gen = torch.Generator().manual_seed(9)
    for bits in (8, 4):
        (x, src, mult, lo, hi, w, scale, b), _ = _case(6, 41, 19, bits, 1 if bits == 8 else 2, gen, "cpu")
        x3 = x.reshape(2, 3, 41)
        args = (x3, src, mult, lo, hi, bits, w, scale, b, torch.float32)
        for rmult in (None, row_multipliers(src, mult, 41)):
            own = torch.ops.fq.flat_linear(*args, rmult)
            assert own.abs().max() > 0
            if rmult is None:
                xq, r = torch.ops.fq.flatten_quantize(x3, src, mult, lo, hi, bits), None
            else:
                xq, r = torch.ops.fq.flatten_quantize_rows(x3, src, mult, lo, hi, rmult, bits)
                assert torch.equal(r, row_absmax(x3, rmult)) and r.shape == (2, 3)
                assert not torch.equal(torch.ops.fq.flat_linear(*args, rmult, r * 2, xq), own)
            assert torch.equal(torch.ops.fq.flat_linear(*args, rmult, r, xq), own)
            assert not torch.equal(torch.ops.fq.flat_linear(*args, rmult, r, torch.zeros_like(xq)), own)
    with pytest.raises(Exception, match="comes with xq, under per-token scales"):
        torch.ops.fq.flat_linear(*args, None, r, xq)
    with pytest.raises(Exception, match="comes with xq, under per-token scales"):
        torch.ops.fq.flat_linear(*args, rmult, r)
    with pytest.raises(Exception, match="r must be float32"):
        torch.ops.fq.flat_linear(*args, rmult, r.reshape(-1), xq)
    with pytest.raises(Exception, match="r must be float32"):
        torch.ops.fq.flat_linear(*args, rmult, r.double(), xq)
    with pytest.raises(Exception, match="xq needs its row maxima"):
        torch.ops.fq.flat_linear(*args, rmult, None, xq)
    with pytest.raises(Exception, match="xq must be"):
        torch.ops.fq.flat_linear(*args, rmult, r, xq[..., :-1])
    with pytest.raises(Exception, match="xq must be"):
        torch.ops.fq.flat_linear(*args, None, None, flatten_quantize_reference(x3, src, mult, lo, hi, bits).float())


# -- GPU ---------------------------------------------------------------------------------------------
# Few and quick (each distinct tiling, row bucket, dtype or bias flag is a Triton compile, and the
# reference runs on the CPU): the OPT-13B shapes once, at M = 1, with the tuned tiling; every tiling
# candidate on small shapes.

# OPT-13B: hidden 5120, ffn 20480; K' = K * 1.25 rounded to 32 (the paper's flatten share)
OPT13B = [(5120, 5120), (5120, 20480), (20480, 5120)]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("bits", [8, 4])
def test_gpu_opt13b_shapes(bits):
    """Batch-1 decode on the OPT-13B layer shapes, fp16 in and out, the tiling the tuner picks."""
    cases = [(1, c, n, bits, 32, torch.float16, True, "c") for c, n in OPT13B]
    check_decode("cuda", cases, seed=20 + bits, out_dtypes=(torch.float16,))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("bits", [8, 4])
def test_gpu_every_tiling(bits):
    """Each candidate the tuner times (variant and tiling) once, on small shapes (N = 200: a partial
    last N tile): K' ~ 3300 splits K under every tiling, K' ~ 250 does not; rows 3 / 16 / 64 / 1,
    every input and output dtype, with and without bias, a column-major input, per-token scales in
    every other case."""
    from fq_compile.kernels.triton import decode as td

    cands = td.candidates(bits)
    pad = 1 if bits == 8 else 2
    shapes = [(3, 2600, 200, bits, pad, torch.float16, True, "c"), (16, 200, 200, bits, pad, torch.bfloat16, False, "t"),
              (64, 2600, 200, bits, pad, torch.float32, True, "c"), (1, 200, 200, bits, pad, torch.float16, True, "c"),
              (1, 2600, 200, bits, pad, torch.float16, False, "c")]
    few = [sh for sh in shapes if sh[0] <= td.GEMV_MAX_M]         # the gemv variant takes M <= 4
    words = [sh[:4] + (128 // bits,) + sh[5:] for sh in few]        # dp4a: also K' a multiple of 128 / bits
    pools = [{"gemv": few, "dp4a": words}.get(c[0], shapes) for c in cands]
    cases = [pool[i % len(pool)] for i, pool in enumerate(pools)]
    check_decode("cuda", cases, seed=30 + bits, configs=cands,
                 out_dtypes=(torch.float16, torch.float32, torch.bfloat16, torch.float16, torch.float16))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("bits", [8, 4])
def test_gpu_cuda_graph_replays(bits):
    """Captured once, replayed on new activations: each replay equals the reference (the split-K
    workspace is left zero by every call, so replays do not see each other's sums)."""
    import fq_compile.kernels  # noqa: F401
    from fq_compile.kernels import flat_linear_reference

    gen = torch.Generator().manual_seed(40 + bits)
    ref_args, dev_args = _case(1, 2048, 256, bits, 32, gen, "cuda", torch.float16)
    x, rest = dev_args[0].clone(), dev_args[1:]
    op = torch.ops.fq.flat_linear
    op(x, *rest[:4], bits, *rest[4:], torch.float16)            # tunes and reserves outside the capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = op(x, *rest[:4], bits, *rest[4:], torch.float16)
    for i in range(3):
        new = (torch.randn(x.shape, generator=gen) * (1 + i)).to(torch.float16)
        x.copy_(new.cuda())
        g.replay()
        ref = flat_linear_reference(new, *ref_args[1:5], bits, *ref_args[5:], torch.float16)
        assert torch.equal(y.cpu(), ref), f"replay {i}"


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_gpu_every_candidate_times_in_a_cuda_graph():
    """The tuner times each candidate replayed from a CUDA graph (decode.replay_ms): every variant,
    with and without per-token scales, must capture (a candidate that failed would be timed as
    infinite and never chosen, silently)."""
    import math

    from fq_compile.kernels.triton import decode as td

    gen = torch.Generator().manual_seed(50)
    for bits in (8, 4):
        ref_args, dev_args = _case(1, 600, 256, bits, 32, gen, "cuda", torch.float16)
        rmult = row_multipliers(ref_args[1], ref_args[2], 600).cuda()
        for rows in (None, rmult):
            for cand in td.candidates(bits):
                t = td.replay_ms(lambda: td.flat_linear_cuda(*dev_args[:5], bits, *dev_args[5:], torch.float16,
                                                             rmult=rows, config=cand), "cuda")
                assert math.isfinite(t) and t >= 0, (bits, rows is not None, cand)


def test_dp4a_variant_compiles_for_sm90():
    """The dp4a variant's inline PTX, assembled for sm_90 by Triton's own ptxas (no GPU needed): the products
    run as dp4a on the CUDA cores, no tensor-core instruction, and the weight loads are 16-byte vectors.  Its
    numbers: the interpreter test (the same integers through shifts) and test_gpu_every_tiling on a GPU."""
    from fq_compile.kernels.triton import decode as td

    if td._INTERPRET:
        pytest.skip("the inline-assembly form is compiled only without TRITON_INTERPRET")
    for bits in (8, 4):
        # as Triton specializes a launch: every pointer and integer argument divisible by 16 (the 13B shapes' are)
        out = td.compile_sm90(bits, "dp4a", td.DP4A_CONFIGS[bits][0])
        ptx = out.asm["ptx"]
        assert "dp4a.s32.s32" in ptx and "mma" not in ptx and out.asm.get("cubin"), bits
        assert ("dp4a.u32.s32" in ptx) == (bits == 4)          # INT4: the offset nibbles, unsigned
        assert "ld.global.v4.b32" in ptx, bits                  # the weight words come 16 bytes a load (the hints)


def test_choice_follows_the_measured_times(monkeypatch, tmp_path):
    """The tuner takes the fastest candidate it timed, per (shape, row bucket, kind of scales), keeps
    it on disk, and a later process reads it back without timing; during a CUDA graph capture (or
    with FQ_TUNE=0) it takes the first candidate and remembers nothing."""
    from fq_compile.kernels.triton import decode as td

    monkeypatch.setenv("FQ_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("FQ_TUNE", "1")
    monkeypatch.setattr(td, "_INTERPRET", False)
    monkeypatch.setattr(td, "_BEST", {})
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Test GPU")
    capturing = [False]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    cands = td.candidates(4)
    assert [v for v, _ in cands] == ["fused", "fused", "prequant", "prequant", "gemm", "gemv", "gemv", "dp4a", "dp4a",
                                     "dp4a"]
    assert [c for v, c in cands if v == "fused"] == [td.CONFIGS[4][i] for i in td.FUSED_TILINGS]
    # measured times: per-token the pre-quantized variant is fastest, static the gemm
    times = {False: [5.0, 4.0, 4.5, 8.0, 3.0, 3.5, 9.0, 3.2, 6.0, 3.1],
             True: [9.0, 9.5, 2.0, 2.5, 4.0, 3.0, 2.2, 2.1, 7.0, 2.05]}
    timed = []

    def fake_time(fn, device):
        return fn()

    def run_for(rows):
        def run(variant, cfg):
            i = cands.index((variant, cfg))
            timed.append((rows, i))
            return times[rows][i]
        return run

    monkeypatch.setattr(td, "replay_ms", fake_time)
    dev = torch.device("cuda", 0)
    assert td._choose(4, 5120, 24896, 16, False, dev, run_for(False)) == cands[4]
    assert td._choose(4, 5120, 24896, 16, True, dev, run_for(True)) == cands[2]
    assert len(timed) == 2 * len(cands)
    monkeypatch.setattr(td, "_BEST", {})                 # a new process: from the disk table, nothing timed
    assert td._choose(4, 5120, 24896, 16, True, dev, run_for(True)) == cands[2]
    assert td._choose(4, 5120, 24896, 16, False, dev, run_for(False)) == cands[4]
    assert len(timed) == 2 * len(cands)
    # with the quantized activation given (the lowering's case) the pre-quantized variants launch no
    # quantize: a choice of its own, timed apart
    assert td._choose(4, 5120, 24896, 16, True, dev, run_for(True), True) == cands[2]
    assert len(timed) == 3 * len(cands) and len(td._BEST) == 3
    capturing[0] = True                                  # an untuned shape during a capture: no timing
    assert td._choose(4, 5120, 4096, 16, False, dev, run_for(False)) == cands[0]
    assert len(timed) == 3 * len(cands) and len(td._BEST) == 3


def test_each_row_bucket_is_tuned_apart(monkeypatch):
    """M = 1 and M = 16 share the kernel's BLOCK_M (16) but not the tuned choice: on the H100 the best
    candidate differs between them, and a shared bucket ran M = 16 with M = 1's choice."""
    from fq_compile.kernels.triton import decode as td

    seen = []

    class Chosen(Exception):
        pass

    def fake_choose(bits, n, k, bucket, rows, device, run, given=False):
        seen.append(bucket)
        raise Chosen

    monkeypatch.setattr(td, "_choose", fake_choose)
    k, n = 64, 32
    src, mult, lo, hi = torch.arange(k, dtype=torch.int32), torch.ones(k), torch.zeros(k), torch.full((k,), 1e9)
    wq = torch.zeros(n, k, dtype=torch.int8)
    for m in (1, 2, 9, 16, 17, 64):
        with pytest.raises(Chosen):
            td.flat_linear_cuda(torch.randn(m, k), src, mult, lo, hi, 8, wq, torch.ones(n), None, torch.float32)
    assert seen == [1, 2, 16, 16, 32, 64]
    assert [td.tune_rows(m) for m in (1, 3, 16)] == [1, 4, 16]


if __name__ == "__main__":
    _interp_main(sys.argv[1])
