"""The Triton/CUTLASS GEMM dispatcher, the CUTLASS op, and (GPU) the CUTLASS kernels themselves.

CPU: mode parsing (env and backend option), the measured table (nearest shape, architecture match,
broken files), the choice on fake device properties (H100 SXM / PCIe, H200, GH200, A100, L4), the
sm_90 rule against every committed measurement, the lazy parallel build (nvcc replaced by a stub),
the fallback when CUTLASS cannot be built (one warning, reference result), and
torch.compile(inductor) of fq::int8_linear / int4_linear when the dispatcher picks the CUTLASS op,
whose CPU kernel is the reference (the extension is never built here).  On the CPU every path ends in
the reference, so
results are checked against `_expected`, an independent reading of the ops' contract (int64 matmul of
the unpacked integers, float32 epilogue), never against the reference.
GPU (`-m gpu`, Hopper only): every tile config's int32 accumulator, and every output dtype of the
configs models run (rule + table), bit-exact against the CPU reference on fuzzed shapes and layouts,
the bf16 ReLU epilogue, the INT4 unpack kernel, and the dispatch inside compiled code.
"""

from __future__ import annotations

import ctypes
import functools
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


# fake device properties of the GPUs the choice must handle (name only reported, never decisive)
GB = 1 << 30
FAKE = {
    "H100 SXM": gd.DeviceInfo("NVIDIA H100 80GB HBM3", (9, 0), 132, 80 * GB),
    "H100 PCIe": gd.DeviceInfo("NVIDIA H100 PCIe", (9, 0), 114, 80 * GB),
    "H200": gd.DeviceInfo("NVIDIA H200", (9, 0), 132, 141 * GB),
    "GH200": gd.DeviceInfo("NVIDIA GH200 480GB", (9, 0), 132, 96 * GB),
    "A100": gd.DeviceInfo("NVIDIA A100-SXM4-80GB", (8, 0), 108, 80 * GB),
    "L4": gd.DeviceInfo("NVIDIA L4", (8, 9), 58, 24 * GB),
}
HOPPERS = ["H100 SXM", "H100 PCIe", "H200", "GH200"]


def _table(tmp_path, entries, device="Fake GPU", arch="sm_90"):
    """A table measured on `device`: format 2 (keyed by arch) unless arch is None (format 1)."""
    p = tmp_path / "gemm_table.json"
    body = {"format": 2, "arch": arch, "sm_count": 132} if arch else {"format": 1}
    p.write_text(json.dumps({**body, "device": device, "entries": entries}))
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
    assert t.device == "Fake GPU" and t.arch == "sm_90"
    assert t.lookup(8, 8000, 4096, 5120)["impl"] == "cutlass"   # nearer 16384 than 1 in log2
    assert t.lookup(8, 2, 4000, 5000)["impl"] == "triton"
    assert t.lookup(8, 16384, 36864, 11520)["config"] == "coop_128x256x128_c1x2"
    assert t.lookup(4, 1, 1, 1)["bits"] == 4
    t2 = gd.Table.from_json({"format": 2, "arch": "sm_90", "device": "x", "entries": ENTRIES[:1]})
    assert t2.lookup(4, 16, 16, 16) is None                      # nothing measured for INT4


def test_table_applies_by_architecture_not_name(tmp_path):
    """A format-2 table measured on an H100 serves every sm_90 part (H200 included) and nothing
    else; a format-1 table (by name) only its own GPU."""
    t = gd.load_table(_table(tmp_path, ENTRIES, device="NVIDIA H100 80GB HBM3"))
    assert [k for k, d in FAKE.items() if t.applies_to(d)] == HOPPERS
    assert not t.applies_to(gd.CPU)
    old = gd.Table.from_json({"format": 1, "device": "NVIDIA H100 80GB HBM3", "entries": ENTRIES})
    assert [k for k, d in FAKE.items() if old.applies_to(d)] == ["H100 SXM"]
    with pytest.raises(ValueError, match="without an 'arch'"):
        gd.Table.from_json({"format": 2, "device": "x", "entries": ENTRIES})


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
    assert t is not None and t.device and t.arch == "sm_90"
    for e in t.entries:
        assert e["impl"] in ("triton", "cutlass") and e.get("config", "") in ("", *cg.CONFIGS)


def test_sm90_rule_agrees_with_every_committed_measurement():
    """The rule a table-less sm_90 GPU gets is the committed H100 table's verdict: the same
    implementation wherever the two differed by more than the table's 2% margin (decode-size M=1,
    a 7% CUTLASS win, excepted: M <= 16 is the decode regime), and a tile config within 5% of the
    best measured one."""
    t = gd.load_table(gd.TABLE_PATH)
    if t is None:
        pytest.skip("no gemm_table.json committed")
    for e in t.entries:
        rule = gd.sm90_rule(e["bits"], e["m"], e["n"], e["k"], t.sm_count or 132)
        ms = e["ms"]
        close = abs(ms["triton"] - ms["cutlass"]) <= 0.02 * min(ms["triton"], ms["cutlass"])
        if e["m"] > 16 and not close:
            assert rule.impl == e["impl"], (e["bits"], e["m"], rule)
        if rule.impl == "cutlass":
            best = min(v for k, v in ms.items() if k.startswith("cutlass:"))
            assert ms[f"cutlass:{rule.config}"] <= 1.05 * best, (e["bits"], e["m"], rule.config)


@pytest.mark.parametrize("gpu_name", list(FAKE))
def test_choice_on_fake_devices(gpu_name, monkeypatch, tmp_path):
    """Every sm_90 part gets CUTLASS for prefill-sized INT8 GEMMs and Triton for decode, from the
    committed table (by architecture) or, without one, from the rule; sm_80 / sm_89 get Triton."""
    info = FAKE[gpu_name]
    bf = torch.bfloat16
    for table in (None, "none"):
        if table:
            monkeypatch.setenv("FQ_GEMM_TABLE", str(tmp_path / "absent.json"))
        big8 = gd.decide(8, 16384, 5120, 6400, bf, info)              # OPT-13B q/k/v at 8 x 2048
        big4 = gd.decide(4, 16384, 20480, 6400, bf, info)
        small = gd.decide(8, 16, 5120, 6400, bf, info)               # decode-sized
        if info.capability == (9, 0):
            assert big8.impl == big4.impl == "cutlass" and big8.config in cg.CONFIGS, (big8, big4)
            assert small.impl == "triton"
            assert ("table sm_90" in big8.why) == (table is None) and ("sm_90 rule" in big8.why) == bool(table)
        else:
            assert big8.impl == big4.impl == small.impl == "triton"
            assert info.arch in big8.why and "sm_90a" in big8.why
    assert gd.decide(8, 16384, 5120, 6400, bf, gd.CPU).impl == "reference"


def test_rule_config_scales_with_the_sm_count(monkeypatch, tmp_path):
    """128 tiles of 128x256 fill a 114-SM H100 PCIe but not a 132-SM H100 SXM: the rule picks the
    large tiles on the first and the 64x128 ones on the second."""
    monkeypatch.setenv("FQ_GEMM_TABLE", str(tmp_path / "absent.json"))
    pcie = gd.decide(8, 1024, 4096, 4096, torch.bfloat16, FAKE["H100 PCIe"])
    sxm = gd.decide(8, 1024, 4096, 4096, torch.bfloat16, FAKE["H100 SXM"])
    assert (pcie.config, sxm.config) == (cg.LARGE_CONFIG, cg.SMALL_CONFIG)


def test_forced_modes_on_fake_devices(monkeypatch):
    bf = torch.bfloat16
    monkeypatch.setenv("FQ_GEMM", "cutlass")
    assert gd.decide(8, 1, 4096, 5120, bf, FAKE["H200"]).impl == "cutlass"      # forced, even at decode
    assert gd.decide(8, 4096, 4096, 5120, bf, FAKE["A100"]).impl == "triton"    # cannot run there
    monkeypatch.setenv("FQ_GEMM", "triton")
    assert gd.decide(8, 16384, 4096, 5120, bf, FAKE["H200"]).impl == "triton"


def test_only_the_instances_a_dtype_needs_are_built():
    """First use builds the configs the rule and the committed table can pick, for one dtype and
    epilogue: two libraries, not every config x dtype."""
    need = gd.cutlass_instances(torch.bfloat16, ("none",), FAKE["H200"])
    assert {c for c, _, _ in need} == set(cg.RULE_CONFIGS) and len(need) == 2
    assert all(dt == torch.bfloat16 and a == "none" for _, dt, a in need)
    assert len(gd.cutlass_instances(torch.float16, ("none", "relu"))) == 4
    assert len(cg.instances()) > 20


# ------------------------------------------------------------------------------------------------
# choice and fallback (CPU tensors made to look eligible)
# ------------------------------------------------------------------------------------------------

@pytest.fixture
def eligible(monkeypatch):
    """Treat CPU tensors as if on an H100 with a working CUTLASS build."""
    monkeypatch.setattr(gd, "_device_ok", lambda t: True)
    monkeypatch.setattr(gd, "device_info", lambda d: FAKE["H100 SXM"])
    monkeypatch.setattr(gd, "_cutlass_ready", lambda d, dt, act="none": True)


def _ops(m, n, k, bits, gen):
    qmax = 127 if bits == 8 else 7
    x, w = _rand_q((m, k), qmax, gen), _rand_q((n, k), qmax, gen)
    return (x, w) if bits == 8 else (pack_int4(x), pack_int4(w))


def test_choose(eligible, monkeypatch, tmp_path):
    gen = torch.Generator().manual_seed(0)
    x, w = _ops(64, 256, 512, 8, gen)
    xl, _ = _ops(8192, 256, 512, 8, gen)
    bf = torch.bfloat16

    def c(*a):
        r = gd.choose(*a)
        return r.impl, r.config

    monkeypatch.setenv("FQ_GEMM_TABLE", str(tmp_path / "absent.json"))
    assert c(8, x, w, bf) == ("triton", "")                                  # the sm_90 rule: M < 256
    assert c(8, xl, w, bf) == ("cutlass", cg.SMALL_CONFIG)                   # 64 tiles of 128x256 < 132 SMs
    monkeypatch.setenv("FQ_GEMM_TABLE", str(_table(tmp_path, ENTRIES)))
    assert c(8, x, w, bf) == ("triton", "")                                  # nearest is M=1: triton
    assert c(8, xl, w, bf) == ("cutlass", "coop_128x256x128_c1x2")
    monkeypatch.setattr(gd, "device_info", lambda d: FAKE["L4"])
    assert c(8, xl, w, bf) == ("triton", "")                                 # not sm_90
    monkeypatch.setattr(gd, "device_info", lambda d: FAKE["H200"])
    monkeypatch.setenv("FQ_GEMM", "cutlass")
    assert c(8, x, w, bf) == ("cutlass", "pp_64x128x128_c1x1")               # config from the table
    monkeypatch.setenv("FQ_GEMM_TABLE", str(tmp_path / "absent.json"))
    assert c(8, x, w, bf) == ("cutlass", cg.SMALL_CONFIG)                    # the rule's config
    monkeypatch.setenv("FQ_GEMM_TABLE", str(_table(tmp_path, ENTRIES)))
    x4, w4 = _ops(64, 256, 512, 4, gen)
    assert c(4, x4, w4, bf)[0] == "cutlass"
    # shapes / layouts the kernels cannot take stay on Triton
    xo, wo = _ops(64, 256, 200, 8, gen)
    assert c(8, xo, wo, bf) == ("triton", "")                                # K % 16
    assert c(8, x, w[:252], bf) == ("triton", "")                            # N * 2 bytes % 16
    assert c(8, x, w[:252], torch.float32) == ("cutlass", "pp_64x128x128_c1x1")
    wide = torch.zeros(256, 512 + 40, dtype=torch.int8)[:, 8:8 + 512]
    assert c(8, x, wide, bf) == ("triton", "")                               # rows not 16-byte aligned
    assert c(8, x, w.t().contiguous().t(), bf) == ("triton", "")             # not K-major
    monkeypatch.setenv("FQ_GEMM", "triton")
    assert c(8, xl, w, bf) == ("triton", "")


def test_lazy_parallel_build(monkeypatch, tmp_path, capsys):
    """ensure() compiles only the requested instances (plus the small API library), all at once in
    parallel threads, each once per process and once on disk, with a progress line; a failed build
    is remembered and reported as CutlassUnavailable (nvcc replaced by a stub that writes files)."""
    import threading
    import time

    monkeypatch.setenv("FQ_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cg, "unavailable_reason", lambda device=None: None)
    for name, value in (("_futures", {}), ("_pool", None), ("_build_error", None), ("_jobs_running", 0)):
        monkeypatch.setattr(cg, name, value)
    state = {"now": 0, "peak": 0, "built": []}
    lock = threading.Lock()

    def fake_compile(name, src, so, split):
        assert src.exists() and split >= 1
        with lock:
            state["now"] += 1
            state["peak"] = max(state["peak"], state["now"])
            state["built"].append(name)
        time.sleep(0.3)
        with lock:
            state["now"] -= 1
        if "coop_128x128x128_c2x1" in name:
            raise RuntimeError("nvcc failed for it: error: stub")
        so.write_text(name)
        return so

    monkeypatch.setattr(cg, "_compile", fake_compile)
    monkeypatch.setattr(cg, "_load_instance", lambda so, key: ("lib", key))
    monkeypatch.setattr(cg, "_load_api", lambda so: ("api",))
    want = gd.cutlass_instances(torch.float16, ("none", "relu"))
    libs = cg.ensure(want)
    assert sorted(state["built"]) == sorted(["api"] + [cg.instance_key(*i) for i in want])
    assert state["peak"] >= 2                                               # in parallel
    assert "building 5 CUTLASS kernel libraries" in capsys.readouterr().err
    assert libs[cg.instance_key(*want[0])] == ("lib", cg.instance_key(*want[0]))
    cg.ensure(want)                                                         # loaded: nothing rebuilt
    assert len(state["built"]) == 5
    monkeypatch.setattr(cg, "_futures", {})                                  # a new process: files reused
    cg.ensure(want[:1])
    assert len(state["built"]) == 5
    bad = [("coop_128x128x128_c2x1", torch.float16, "none")]
    for _ in range(2):
        with pytest.raises(cg.CutlassUnavailable, match="nvcc failed"):
            cg.ensure(bad)
    assert len(state["built"]) == 6                                         # the failure is remembered


def test_concurrent_builders_compile_an_instance_once(monkeypatch, tmp_path):
    """Two builders of the same instance at once (as two processes, e.g. pytest-xdist workers: each
    its own open file, so the flock is contended as between processes) compile it once; the second
    waits and loads the library the first wrote."""
    import threading
    import time

    monkeypatch.setenv("FQ_CACHE_DIR", str(tmp_path))
    d = cg.build_dir()
    item = (cg.SMALL_CONFIG, torch.bfloat16, "none")
    cg.write_sources(d / "src", [item])
    key, built = cg.instance_key(*item), []

    def fake_compile(name, src, so, split):
        built.append(name)
        time.sleep(0.5)
        so.write_text(name)
        return so

    monkeypatch.setattr(cg, "_compile", fake_compile)
    monkeypatch.setattr(cg, "_load_instance", lambda so, k: so.read_text())
    got = []
    threads = [threading.Thread(target=lambda: got.append(cg._build_one(key, d, 1))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert built == [key] and got == [key, key]


def test_fallback_warns_once_and_matches_reference(monkeypatch):
    """FQ_GEMM=cutlass where CUTLASS cannot run: one warning, Triton/reference results."""
    monkeypatch.setenv("FQ_GEMM", "cutlass")
    monkeypatch.setattr(gd, "_device_ok", lambda t: True)
    monkeypatch.setattr(gd, "device_info", lambda d: FAKE["H200"])
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
    3 pointers: workspace, stream, row_scale)."""
    srcs = {(c, dt, a): cg.instance_source(c, dt, a) for c, dt, a in cg.instances()}
    assert len(srcs) == len(cg.CONFIGS) * (4 + 3)                  # 4 dtypes, ReLU for the 3 float ones
    for (c, dt, a), s in srcs.items():
        assert f'return "{cg.instance_key(c, dt, a)}"' in s and cg.OUT_TYPES[dt][0] in s
        assert ("true)" in s) == (a == "relu")
    assert len({cg._instance_filename(*i) for i in cg.instances()}) == len(srcs)
    assert ctypes.sizeof(cg._Params) == 112
    assert cg._Params.stream.offset == 96 and cg._Params.scale.offset == 72 and cg._Params.row_scale.offset == 104
    assert all((cg.CSRC / f).exists() for f in (*cg.HEADERS, cg.API_SOURCE))
    assert cg.default_config(1, 4096, 4096) == cg.SMALL_CONFIG
    assert cg.default_config(16384, 4096, 5120) == cg.LARGE_CONFIG


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
    monkeypatch.setenv("FQ_DECODE_MAX_M", "0")      # the prefill path's GEMMs (a decode-sized x fuses otherwise)
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
# GPU: the kernels (15 libraries built on first use, one parallel round of ~1-1.5 min on 16 cores,
# once for all xdist workers; then cached under FQ_CACHE_DIR)
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


# the configs a model can run without forcing one (rule + committed table): every output dtype and
# the bf16 ReLU epilogue, so their bf16/fp16 libraries are the very ones a model builds on first use
# (reused from the cache); the other configs (benchmarks, forced configs) with the raw int32
# accumulator only: their exact main loop (the epilogue is the same template).  14 instances + the API
# library: one parallel round on 16 cores, where every config x dtype (30) took two.
MODEL_CONFIGS = tuple(sorted({c for c, _, _ in gd.cutlass_instances(torch.bfloat16)}))


def _built_dtypes(config: str) -> tuple:
    return (torch.int32, *OUT_DTYPES) if config in MODEL_CONFIGS else (torch.int32,)


@functools.lru_cache(maxsize=None)
def _build_test_instances() -> None:
    """The instances the GPU tests call, built once, in parallel (file-locked: one build for all
    xdist workers)."""
    items = [(c, dt, "none") for c in cg.CONFIGS for dt in _built_dtypes(c)]
    items += [(c, torch.bfloat16, "relu") for c in MODEL_CONFIGS]
    cg.ensure(items)


def check_cutlass(shape, bits, config, seed, out_dtypes=OUT_DTYPES):
    _build_test_instances()
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
    row = torch.rand(m, generator=gen) * 1.75 + 0.25      # per-token scales, 8x apart at most
    for dt in (dt for dt in out_dtypes if dt in _built_dtypes(config)):
        y = cg.cutlass_int_linear(A, W, scale.cuda(), bias.cuda(), dt, bits, config=config)
        ref = quant_linear_reference(A.cpu(), W.cpu(), scale, bias, bits, dt)
        assert y.dtype == dt and torch.isfinite(y).all()
        diff = (y.cpu() != ref).sum().item()
        assert diff == 0, f"int{bits} {config} {shape} {dt}: {diff} outputs differ from the reference"
        y = cg.cutlass_int_linear(A, W, scale.cuda(), bias.cuda(), dt, bits, config=config, row_scale=row.cuda())
        ref = quant_linear_reference(A.cpu(), W.cpu(), scale, bias, bits, dt, row_scale=row)
        diff = (y.cpu() != ref).sum().item()
        assert diff == 0, f"int{bits} {config} {shape} {dt} row scales: {diff} outputs differ from the reference"
    if torch.float32 in _built_dtypes(config):
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
    """Every config with every output dtype built for it (`_built_dtypes`) on an odd-sized shape."""
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


@gpu
@needs_hopper
@pytest.mark.parametrize("config", MODEL_CONFIGS)
def test_gpu_relu_epilogue(config):
    """The ReLU epilogue instances (bf16, as a bf16 model builds them): ReLU of the plain epilogue's
    output, and exactly the reference's act='relu'."""
    _build_test_instances()
    gen = torch.Generator().manual_seed(10)
    m, n, k = 1000, 1288, 2320
    a, w = _rand_q((m, k), 127, gen), _rand_q((n, k), 127, gen)
    scale = torch.rand(n, generator=gen) * 1e-3 + 1e-4
    bias = torch.randn(n, generator=gen) * 0.5
    A, W, S, B = a.cuda(), w.cuda(), scale.cuda(), bias.cuda()
    y = cg.cutlass_int_linear(A, W, S, B, torch.bfloat16, 8, config=config)
    yr = cg.cutlass_int_linear(A, W, S, B, torch.bfloat16, 8, config=config, act="relu")
    assert torch.equal(yr, torch.relu(y)) and (yr == 0).any() and (yr > 0).any()
    assert torch.equal(yr.cpu(), quant_linear_reference(a, w, scale, bias, 8, torch.bfloat16, act="relu"))
    row = torch.rand(m, generator=gen) * 1.75 + 0.25
    yr = cg.cutlass_int_linear(A, W, S, B, torch.bfloat16, 8, config=config, act="relu", row_scale=row.cuda())
    assert torch.equal(yr.cpu(), quant_linear_reference(a, w, scale, bias, 8, torch.bfloat16, act="relu",
                                                        row_scale=row))


@gpu
@needs_hopper
def test_gpu_auto_picks_cutlass_for_prefill_without_env(monkeypatch):
    """No FQ_GEMM: on this Hopper GPU (whatever its name) a prefill-sized INT8 GEMM compiles to the
    CUTLASS op and a decode-sized one (M = 16) to Triton."""
    from torch._inductor.utils import run_and_get_code

    monkeypatch.delenv("FQ_GEMM", raising=False)
    gen = torch.Generator().manual_seed(11)
    w = _rand_q((1024, 2048), 127, gen).cuda()
    s = channel_scale(1e-3, w)
    for m, want in ((4096, "cutlass_int_linear"), (16, "int_gemm_kernel")):
        a = _rand_q((m, 2048), 127, gen).cuda()
        torch._dynamo.reset()
        with gd.use(None):
            out, codes = run_and_get_code(torch.compile(lambda x: torch.ops.fq.int8_linear(x, w, s, None,
                                                                                           torch.bfloat16)), a)
        assert want in "\n".join(codes), (m, gd.decide(8, m, 1024, 2048, torch.bfloat16, gd.device_info(a.device)))
        assert torch.equal(out.cpu(), quant_linear_reference(a.cpu(), w.cpu(), 1e-3, None, 8, torch.bfloat16))


def test_dynamic_rows_leave_the_tile_config_to_each_call(eligible, monkeypatch):
    """Compiled with symbolic rows, the implementation is chosen at the hint and the CUTLASS tile
    config at every call (config ''), from the same table or rule."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    gen = torch.Generator().manual_seed(12)
    x, w = _ops(8192, 256, 512, 8, gen)
    with FakeTensorMode(shape_env=ShapeEnv()) as mode:
        ctx = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC, DimDynamic.STATIC])
        fx, fw = mode.from_tensor(x, symbolic_context=ctx), mode.from_tensor(w)
        assert isinstance(fx.shape[0], torch.SymInt)
        c = gd.choose(8, fx, fw, torch.bfloat16)
    assert c.impl == "cutlass" and c.config == "" and "tile config per call" in c.why
    monkeypatch.setattr(gd, "_cuda_info", lambda index: FAKE["H200"])
    gd.runtime_config.cache_clear()
    assert gd.runtime_config(8, 512, 5120, 6272, torch.bfloat16, 0) == cg.SMALL_CONFIG
    assert gd.runtime_config(8, 65536, 5120, 6272, torch.bfloat16, 0) in cg.CONFIGS
    gd.runtime_config.cache_clear()
