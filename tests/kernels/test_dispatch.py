"""The Triton/CUTLASS GEMM dispatcher, the CUTLASS op, and (GPU) the CUTLASS kernels themselves.

CPU: mode parsing (env and backend option), the measured table (nearest shape, device match,
broken files), the fallback when CUTLASS cannot be built (one warning, reference result), and
torch.compile(inductor) of fq::int8_linear / int4_linear when the dispatcher picks the CUTLASS op,
whose CPU kernel is the reference (the extension is never built here).  On the CPU every path ends in
the reference, so results are checked against `_expected`, an independent reading of the ops'
contract (int64 matmul of the unpacked integers, float32 epilogue), never against the reference.
GPU (`-m gpu`, Hopper only): every tile config x output dtype bit-exact against the CPU reference
on fuzzed shapes and layouts (int32 accumulators; fp32 epilogue and its bf16/fp16 casts), the INT4
unpack kernel, and the dispatch inside compiled code.
"""

from __future__ import annotations

import ctypes
import json
import warnings

import pytest
import torch

import fq_compile.kernels  # noqa: F401  (registers the ops and installs the dispatcher)
from fq_compile.kernels import dispatch as gd
from fq_compile.kernels import int_gemm
from fq_compile.kernels.cutlass import gemm as cg
from fq_compile.kernels.int_gemm import int_matmul_reference, quant_linear_reference
from fq_compile.kernels.packing import pack_int4, unpack_int4

HAS_CUDA = torch.cuda.is_available()
IS_HOPPER = HAS_CUDA and torch.cuda.get_device_capability() == (9, 0)
gpu = pytest.mark.gpu
needs_hopper = pytest.mark.skipif(not IS_HOPPER, reason="needs a Hopper (sm_90) GPU")


def channel_scale(value: float, w: torch.Tensor) -> torch.Tensor:
    """The GEMM ops' scale argument: float32 [N] (here every output channel the same)."""
    return torch.full((w.shape[0],), value, dtype=torch.float32, device=w.device)


@pytest.fixture(autouse=True)
def _clean(monkeypatch):
    monkeypatch.delenv("FQ_GEMM", raising=False)
    monkeypatch.delenv("FQ_GEMM_TABLE", raising=False)
    gd._warned.clear()
    yield
    gd._warned.clear()


def _rand_q(shape, qmax, gen, device="cpu"):
    """Random int8 in [-qmax, qmax], no all-zero rows."""
    q = torch.randint(-qmax, qmax + 1, shape, generator=gen, dtype=torch.int8)
    q[..., 0] = torch.randint(1, qmax + 1, q[..., 0].shape, generator=gen, dtype=torch.int8)
    return q.to(device)


def _expected(xq, wq, scale, bias, bits, out_dtype):
    """The GEMM ops' contract without their code: exact integer sums (int64 matmul of the integers,
    INT4 unpacked here by tests/oracle.py), times the float32 scale (a float or a [N] vector), plus
    the float32 bias, in float32; cast once."""
    from tests.oracle import unpack_nibbles

    a = unpack_nibbles(xq) if bits == 4 else xq.long()
    b = unpack_nibbles(wq) if bits == 4 else wq.long()
    acc = a.reshape(-1, a.shape[-1]).cpu() @ b.cpu().t()
    y = acc.float() * torch.as_tensor(scale, dtype=torch.float32)
    if bias is not None:
        y = y + bias.cpu().float()
    return y.to(out_dtype).reshape(*xq.shape[:-1], wq.shape[0])


def test_expected_is_exact_on_a_hand_case():
    x = torch.tensor([[1, -2, 3, 127]], dtype=torch.int8)
    w = torch.tensor([[2, 2, 2, 1], [-1, 0, 0, -128]], dtype=torch.int8)
    want = torch.tensor([[(2 - 4 + 6 + 127) * 0.5 + 1.0, (-1 - 127 * 128) * 0.5 - 1.0]])
    assert torch.equal(_expected(x, w, 0.5, torch.tensor([1.0, -1.0]), 8, torch.float32), want)
    x4, w4 = pack_int4(torch.tensor([[1, -2, 7, -7]], dtype=torch.int8)), pack_int4(w[:1].clamp(-7, 7))
    assert torch.equal(_expected(x4, w4, 1.0, None, 4, torch.float32), torch.tensor([[2.0 - 4 + 14 - 7]]))


def _table(tmp_path, entries, device="Fake GPU"):
    p = tmp_path / "gemm_table.json"
    p.write_text(json.dumps({"format": 1, "device": device, "entries": entries}))
    return p


# ------------------------------------------------------------------------------------------------
# modes
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value,mode", [(None, "auto"), ("", "auto"), ("triton", "triton"), (" CUTLASS ", "cutlass"),
                                        ("Auto", "auto")])
def test_parse_mode(value, mode):
    assert gd.parse_mode(value) == mode


def test_bad_env_value_names_the_choices(monkeypatch):
    monkeypatch.setenv("FQ_GEMM", "cublas")
    with pytest.raises(ValueError, match=r"FQ_GEMM='cublas'.*triton, cutlass, auto"):
        gd.current_mode()
    with pytest.raises(ValueError, match="options\\['gemm'\\]='fast'"):
        with gd.use("fast"):
            pass


def test_option_overrides_env_inside_block_only(monkeypatch):
    monkeypatch.setenv("FQ_GEMM", "triton")
    assert gd.current_mode() == "triton"
    with gd.use("cutlass") as m:
        assert m == "cutlass" and gd.current_mode() == "cutlass"
        with gd.use(None):
            assert gd.current_mode() == "cutlass"  # None keeps what is in force
        tag = getattr(torch.compiler.config, "cache_key_tag", "fq_gemm=cutlass")
        assert "fq_gemm=cutlass" in tag  # compiled artifacts are keyed by the choice
    assert gd.current_mode() == "triton"
    assert "fq_gemm" not in getattr(torch.compiler.config, "cache_key_tag", "")


def test_backend_knows_the_option():
    from fq_compile import backend
    assert "gemm" in backend._KNOWN_OPTIONS


# ------------------------------------------------------------------------------------------------
# the table
# ------------------------------------------------------------------------------------------------

ENTRIES = [
    {"bits": 8, "m": 16384, "n": 4096, "k": 5120, "impl": "cutlass", "config": "coop_128x256x128_c1x2"},
    {"bits": 8, "m": 1, "n": 4096, "k": 5120, "impl": "triton", "config": "pp_64x128x128_c1x1"},
    {"bits": 4, "m": 16384, "n": 4096, "k": 5120, "impl": "triton", "config": "coop_128x128x128_c2x1"},
]


def test_table_nearest_shape(tmp_path):
    t = gd.load_table(_table(tmp_path, ENTRIES))
    assert t.device == "Fake GPU"
    assert t.lookup(8, 8000, 4096, 5120)["impl"] == "cutlass"   # nearer 16384 than 1 in log2
    assert t.lookup(8, 2, 4000, 5000)["impl"] == "triton"
    assert t.lookup(8, 16384, 36864, 11520)["config"] == "coop_128x256x128_c1x2"
    assert t.lookup(4, 1, 1, 1)["bits"] == 4
    t2 = gd.Table.from_json({"format": 1, "device": "x", "entries": ENTRIES[:1]})
    assert t2.lookup(4, 16, 16, 16) is None                      # nothing measured for INT4


def test_absent_or_broken_table(tmp_path):
    assert gd.load_table(tmp_path / "missing.json") is None
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": 1, "device": "x", "entries": [{"bits": 8, "m": 1, "impl": "cutlass"}]}))
    with pytest.warns(RuntimeWarning, match="ignoring the GEMM table"):
        assert gd.load_table(bad) is None
    worse = tmp_path / "worse.json"
    worse.write_text("{not json")
    assert gd.load_table(worse) is None  # warned once per process only


def test_shipped_table_if_any_is_valid():
    """The committed table (absent until measured on the device) parses and names known configs."""
    t = gd.load_table(gd.TABLE_PATH)
    if not gd.TABLE_PATH.exists():
        pytest.skip("no gemm_table.json committed yet")
    assert t is not None and t.device
    for e in t.entries:
        assert e["impl"] in ("triton", "cutlass") and e.get("config", "") in ("", *cg.CONFIGS)


# ------------------------------------------------------------------------------------------------
# choice and fallback (CPU tensors made to look eligible)
# ------------------------------------------------------------------------------------------------

@pytest.fixture
def eligible(monkeypatch):
    """Treat CPU tensors as if on a GPU named 'Fake GPU' with a working CUTLASS build."""
    monkeypatch.setattr(gd, "_device_ok", lambda t: True)
    monkeypatch.setattr(gd, "_device_name", lambda d: "Fake GPU")
    monkeypatch.setattr(gd, "_cutlass_ready", lambda d: True)


def _ops(m, n, k, bits, gen):
    qmax = 127 if bits == 8 else 7
    x, w = _rand_q((m, k), qmax, gen), _rand_q((n, k), qmax, gen)
    return (x, w) if bits == 8 else (pack_int4(x), pack_int4(w))


def test_choose(eligible, monkeypatch, tmp_path):
    gen = torch.Generator().manual_seed(0)
    x, w = _ops(64, 256, 512, 8, gen)
    bf = torch.bfloat16
    assert gd.choose(8, x, w, bf) == ("triton", "")                         # auto, no table
    monkeypatch.setenv("FQ_GEMM_TABLE", str(_table(tmp_path, ENTRIES)))
    assert gd.choose(8, x, w, bf) == ("triton", "")                         # nearest is M=1: triton
    xl, _ = _ops(8192, 256, 512, 8, gen)
    assert gd.choose(8, xl, w, bf) == ("cutlass", "coop_128x256x128_c1x2")
    monkeypatch.setattr(gd, "_device_name", lambda d: "Other GPU")
    assert gd.choose(8, xl, w, bf) == ("triton", "")                        # table of another GPU
    monkeypatch.setenv("FQ_GEMM", "cutlass")
    assert gd.choose(8, x, w, bf) == ("cutlass", "")                        # default config
    monkeypatch.setattr(gd, "_device_name", lambda d: "Fake GPU")
    assert gd.choose(8, x, w, bf) == ("cutlass", "pp_64x128x128_c1x1")     # config from the table
    x4, w4 = _ops(64, 256, 512, 4, gen)
    assert gd.choose(4, x4, w4, bf)[0] == "cutlass"
    # shapes / layouts the kernels cannot take stay on Triton
    xo, wo = _ops(64, 256, 200, 8, gen)
    assert gd.choose(8, xo, wo, bf) == ("triton", "")                       # K % 16
    assert gd.choose(8, x, w[:252], bf) == ("triton", "")                   # N * 2 bytes % 16
    assert gd.choose(8, x, w[:252], torch.float32) == ("cutlass", "pp_64x128x128_c1x1")
    wide = torch.zeros(256, 512 + 40, dtype=torch.int8)[:, 8:8 + 512]
    assert gd.choose(8, x, wide, bf) == ("triton", "")                      # rows not 16-byte aligned
    assert gd.choose(8, x, w.t().contiguous().t(), bf) == ("triton", "")    # not K-major
    monkeypatch.setenv("FQ_GEMM", "triton")
    assert gd.choose(8, xl, w, bf) == ("triton", "")


def test_fallback_warns_once_and_matches_reference(monkeypatch):
    """FQ_GEMM=cutlass where CUTLASS cannot run: one warning, Triton/reference results."""
    monkeypatch.setenv("FQ_GEMM", "cutlass")
    monkeypatch.setattr(gd, "_device_ok", lambda t: True)
    monkeypatch.setattr(cg, "unavailable_reason", lambda device=None: "no CUDA device (test)")
    gen = torch.Generator().manual_seed(1)
    x, w = _ops(32, 64, 128, 8, gen)
    bias = torch.randn(64, generator=gen)
    with pytest.warns(RuntimeWarning, match="CUTLASS GEMMs unavailable, using Triton: no CUDA device") as rec:
        y1 = torch.ops.fq.int8_linear(x, w, channel_scale(0.01, w), bias, torch.float32)
        y2 = torch.ops.fq.int8_linear(x, w, channel_scale(0.01, w), bias, torch.float32)
    assert sum("CUTLASS" in str(r.message) for r in rec) == 1
    ref = _expected(x, w, 0.01, bias, 8, torch.float32)
    assert torch.equal(y1, ref) and torch.equal(y2, ref)


def test_unavailable_here_is_a_reason_not_a_crash():
    if IS_HOPPER:
        pytest.skip("CUTLASS may be available on this machine")
    assert isinstance(cg.unavailable_reason(), str)
    with pytest.raises(cg.CutlassUnavailable):
        cg.load_library()
    with pytest.raises(cg.CutlassUnavailable):  # remembered, not retried
        cg.load_library()


def test_missing_cutlass_package(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "cutlass_library" else real(name, *a))
    with pytest.raises(cg.CutlassUnavailable, match="nvidia-cutlass package is not installed"):
        cg.cutlass_include_dirs()


def test_sources_and_abi():
    """One generated instance per (config, output dtype), all registered under distinct names; the
    ctypes struct matches the C layout (4 pointers, 3 int64, 3 x 4 bytes, the scale pointer, 2 x 4 bytes,
    2 pointers)."""
    srcs = {(c, dt): cg.instance_source(c, dt) for c, dt in cg.instances()}
    assert len(srcs) == len(cg.CONFIGS) * 4
    for (c, dt), s in srcs.items():
        assert f'FQ_SM90_INSTANCE("{c}"' in s and cg.OUT_TYPES[dt][0] in s
    assert ctypes.sizeof(cg._Params) == 104
    assert cg._Params.stream.offset == 96 and cg._Params.scale.offset == 72
    assert all((cg.CSRC / f).exists() for f in (*cg.HEADERS, cg.API_SOURCE))
    assert cg.default_config(1, 4096, 4096) in cg.CONFIGS and cg.default_config(16384, 4096, 5120) in cg.CONFIGS


def test_cutlass_op_on_cpu_is_the_reference():
    gen = torch.Generator().manual_seed(2)
    for bits in (8, 4):
        x, w = _ops(9, 48, 96, bits, gen)
        bias = torch.randn(48, generator=gen)
        y = torch.ops.fq.cutlass_int_linear(x.reshape(3, 3, -1), w, channel_scale(0.02, w), bias, torch.bfloat16,
                                            bits, "")
        assert y.shape == (3, 3, 48)
        assert torch.equal(y.reshape(9, 48), _expected(x, w, 0.02, bias, bits, torch.bfloat16))


# ------------------------------------------------------------------------------------------------
# torch.compile: the dispatcher's choice inside fq::int8_linear's traced body
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["cutlass", "auto", "triton"])
def test_inductor_compiles_either_choice(eligible, monkeypatch, tmp_path, mode):
    from torch._inductor.utils import run_and_get_code

    monkeypatch.setenv("FQ_GEMM", mode)
    monkeypatch.setenv("FQ_GEMM_TABLE", str(_table(tmp_path, [
        {"bits": b, "m": 64, "n": 96, "k": 256, "impl": "cutlass", "config": "pp_64x128x128_c1x1"} for b in (8, 4)])))
    gen = torch.Generator().manual_seed(3)
    x8, w8 = _ops(64, 96, 256, 8, gen)
    x4, w4 = _ops(64, 96, 256, 4, gen)
    bias = torch.randn(96, generator=gen)

    def f(a8, a4):
        y8 = torch.ops.fq.int8_linear(a8, w8, channel_scale(0.003, w8), bias, torch.float32)
        y4 = torch.ops.fq.int4_linear(a4, w4, channel_scale(0.05, w4), None, torch.float32)
        return torch.relu(y8) + y4

    torch._dynamo.reset()
    # gd.use tags the compile caches with the choice, as the flattenquant backend does (a plain
    # inductor compile could otherwise reuse an artifact cached under another FQ_GEMM)
    with gd.use(None):
        out, codes = run_and_get_code(torch.compile(f, backend="inductor", fullgraph=True), x8, x4)
    code = "\n".join(codes)
    ref = torch.relu(_expected(x8, w8, 0.003, bias, 8, torch.float32)) + _expected(x4, w4, 0.05, None, 4, torch.float32)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    if mode == "triton":
        assert "cutlass_int_linear" not in code and "int8_linear_reference" in code
    else:
        assert code.count("cutlass_int_linear") >= 2 and "linear_reference" not in code


def test_backend_option_routes_the_gemms(eligible, monkeypatch):
    """options={'gemm': ...} decides while the flattenquant backend compiles, over FQ_GEMM; both
    choices give the oracle's logits (tests/oracle.py), a bad value fails."""
    from torch._inductor.utils import run_and_get_code

    import fq_compile
    from tests.conftest import batches, tiny_opt
    from tests.oracle import assert_matches, fake_quantized

    monkeypatch.setenv("FQ_GEMM", "triton")
    model = tiny_opt().eval()
    plan = fq_compile.calibrate(model, batches(2), fq_compile.Config(level="O1"), progress=False)
    x = batches(1, seed=5)[0]
    logits = {}
    for gemm in ("cutlass", "triton"):
        torch._dynamo.reset()
        with torch.no_grad():
            out, codes = run_and_get_code(torch.compile(model, backend="flattenquant",
                                                        options={"plan": plan, "gemm": gemm}), x)
        logits[gemm] = out.logits
        assert ("cutlass_int_linear" in "\n".join(codes)) == (gemm == "cutlass"), gemm
    with torch.no_grad(), fake_quantized(model, plan):
        expected = model(x).logits
    for gemm, out in logits.items():
        assert_matches(out, expected, what=f"gemm={gemm}: ")
    torch._dynamo.reset()
    with pytest.raises(Exception, match="not a GEMM choice"):
        torch.compile(model, backend="flattenquant", options={"plan": plan, "gemm": "fastest"})(x)


# ------------------------------------------------------------------------------------------------
# GPU: the kernels (build on first use, ~2-4 minutes on 16 cores; cached)
# ------------------------------------------------------------------------------------------------

def _layout(t: torch.Tensor, kind: str, gen) -> torch.Tensor:
    """'c' contiguous; 'wide16' a 16-byte aligned slice of a wider buffer (read in place);
    'wide' an unaligned slice and 't' column-major (both copied by the wrapper)."""
    if kind == "c":
        return t.contiguous()
    if kind in ("wide", "wide16"):
        off, extra = (16, 48) if kind == "wide16" else (5, 37)
        buf = torch.randint(-100, 100, (t.shape[0], t.shape[1] + extra), generator=gen).to(t.dtype).to(t.device)
        buf[:, off:off + t.shape[1]] = t
        return buf[:, off:off + t.shape[1]]
    if kind == "t":
        return t.t().contiguous().t()
    raise ValueError(kind)


# (M, N, K, A layout, W layout): K % 16 == 0 (the kernels' constraint; others go to Triton)
FULL = [(2048, 4096, 5120, "c", "c"), (1, 4096, 5120, "c", "c"), (16, 5120, 20480, "wide16", "c"),
        (300, 1000, 4128, "wide", "t"), (4096, 1536, 1056, "t", "c"), (7, 2904, 3008, "c", "wide16"),
        (65536, 256, 1024, "c", "c"), (129, 4096, 4096, "c", "c"), (1000, 3000, 2048, "c", "wide"),
        (5000, 4104, 4160, "c", "c")]
OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_cutlass(shape, bits, config, seed, out_dtypes=OUT_DTYPES):
    gen = torch.Generator().manual_seed(seed)
    m, n, k, la, lw = shape
    qmax = 127 if bits == 8 else 7
    a, w = _rand_q((m, k), qmax, gen), _rand_q((n, k), qmax, gen)
    acc_ref = int_matmul_reference(a, w)
    A, W = (pack_int4(a), pack_int4(w)) if bits == 4 else (a, w)
    A, W = _layout(A.cuda(), la, gen), _layout(W.cuda(), lw, gen)
    acc = cg.cutlass_int_linear(A, W, 1.0, None, torch.float32, bits, config=config, raw_int32=True)
    assert acc.dtype == torch.int32 and acc.shape == (m, n)
    bad = (acc.cpu() != acc_ref).sum().item()
    assert bad == 0, f"int{bits} {config} {shape}: {bad} int32 mismatches"
    scale = (torch.rand(n, generator=gen) * 1e-3 + 1e-4) * (1 + 9 * (torch.rand(n, generator=gen) < 0.1))
    bias = torch.randn(n, generator=gen) * 0.5
    for dt in out_dtypes:
        y = cg.cutlass_int_linear(A, W, scale.cuda(), bias.cuda(), dt, bits, config=config)
        ref = quant_linear_reference(A.cpu(), W.cpu(), scale, bias, bits, dt)
        assert y.dtype == dt and torch.isfinite(y).all()
        diff = (y.cpu() != ref).sum().item()
        assert diff == 0, f"int{bits} {config} {shape} {dt}: {diff} outputs differ from the reference"
    y0 = cg.cutlass_int_linear(A.contiguous().reshape(1, m, -1), W, scale.cuda(), None, torch.float32, bits,
                               config=config)
    assert y0.shape == (1, m, n) and torch.equal(y0[0].cpu(), acc_ref.float() * scale)


def _full_cases():
    cases, names = [], list(cg.CONFIGS)
    for bits in (8, 4):
        for i, shape in enumerate(FULL):
            cfg = names[(i + bits) % len(names)]
            cases.append(pytest.param(bits, shape, cfg, id=f"int{bits}-{shape[0]}x{shape[1]}x{shape[2]}-{cfg}"))
    return cases


@gpu
@needs_hopper
@pytest.mark.parametrize("bits,shape,config", _full_cases())
def test_gpu_cutlass_exact(bits, shape, config):
    i = FULL.index(shape)
    dts = [(torch.float32, torch.bfloat16), (torch.float32, torch.float16)][i % 2]
    check_cutlass(shape, bits, config, seed=100 + 3 * i + bits, out_dtypes=dts)


@gpu
@needs_hopper
@pytest.mark.parametrize("config", list(cg.CONFIGS))
def test_gpu_every_instance(config):
    """Every config with every output dtype (all built instances) on an odd-sized shape."""
    check_cutlass((777, 1288, 2320, "c", "c"), 8, config, seed=7)


@gpu
@needs_hopper
def test_gpu_unpack_int4():
    gen = torch.Generator().manual_seed(8)
    for rows, k, lay in ((1, 32, "c"), (300, 4128, "c"), (77, 1000, "wide"), (64, 96, "t"), (5, 6, "c")):
        q = _rand_q((rows, k), 7, gen)
        p = _layout(pack_int4(q).cuda(), lay, gen)
        u = cg.unpack_int4_cuda(p)
        assert u.is_contiguous() and torch.equal(u.cpu(), unpack_int4(p.cpu())) and torch.equal(u.cpu(), q)


@gpu
@needs_hopper
def test_gpu_compiled_dispatch(monkeypatch):
    """FQ_GEMM=cutlass: compiled code calls the CUTLASS op for the aligned GEMM and Triton for one
    with K % 16 != 0; results equal the reference."""
    from torch._inductor.utils import run_and_get_code

    monkeypatch.setenv("FQ_GEMM", "cutlass")
    gen = torch.Generator().manual_seed(9)
    w8 = _rand_q((384, 512), 127, gen).cuda()
    w_odd = _rand_q((384, 200), 127, gen).cuda()
    bias = torch.randn(384, generator=gen).cuda()

    def f(a, b):
        return (torch.ops.fq.int8_linear(a, w8, channel_scale(1e-3, w8), bias, torch.bfloat16).float()
                + torch.ops.fq.int8_linear(b, w_odd, channel_scale(1e-3, w_odd), None, torch.bfloat16).float())

    a, b = _rand_q((256, 512), 127, gen).cuda(), _rand_q((256, 200), 127, gen).cuda()
    torch._dynamo.reset()
    with gd.use(None):
        out, codes = run_and_get_code(torch.compile(f, backend="inductor", fullgraph=True), a, b)
    code = "\n".join(codes)
    assert "cutlass_int_linear" in code and "int_gemm_kernel" in code
    ref = (quant_linear_reference(a.cpu(), w8.cpu(), 1e-3, bias.cpu(), 8, torch.bfloat16).float()
           + quant_linear_reference(b.cpu(), w_odd.cpu(), 1e-3, None, 8, torch.bfloat16).float())
    assert torch.equal(out.cpu(), ref)


def test_int_gemm_hook_installed():
    assert int_gemm.SELECT is gd.select
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gen = torch.Generator().manual_seed(4)
        x, w = _ops(8, 16, 32, 8, gen)
        assert torch.equal(torch.ops.fq.int8_linear(x, w, channel_scale(0.5, w), None, torch.float32),
                           _expected(x, w, 0.5, None, 8, torch.float32))
