"""CUTLASS sm_90a GEMMs for `fq::int8_linear` / `fq::int4_linear`, as the op `fq::cutlass_int_linear`.

    y = act(float32(xq @ wq.T, exact int32) * scale[n] + bias[n])  -> out_dtype   (int_gemm.py's semantics)

Why this form:
  * CUTLASS as users get it: the C++ headers of the `nvidia-cutlass` pip package (optional extra
    `fq-compile[cutlass]`), compiled by nvcc on the first call that needs them and cached on disk
    (`$FQ_CACHE_DIR` or `~/.cache/fq_compile`, one folder per hash of sources + flags + torch/CUDA/
    CUTLASS versions).  The C++ API gives us CUTLASS 3.x's Hopper kernels as written and tuned by
    NVIDIA (TMA loads, wgmma, warp-specialised producer/consumer warpgroups, cooperative and ping-pong
    schedules, clusters with TMA multicast) and an epilogue visitor tree for our exact epilogue.
  * One shared library per instance (tile config x output dtype x epilogue), built lazily: the first
    use builds only the instances the dispatcher can pick for that output dtype (kernels/dispatch.py
    `cutlass_instances`: two tile configs on Hopper), all at once in parallel (one nvcc per instance,
    `--split-compile` over the spare cores), with a progress bar on stderr; an instance needed later
    (a forced config, a benchmark) is built then.  An instance costs ~1 CPU-minute of nvcc (CUTLASS's
    templates), so building the 2-4 a model needs takes about as long as one, where building all 36
    took minutes.  The backend starts the build in the background as soon as it has rewritten a graph
    that will call CUTLASS (`prefetch`), so it overlaps Inductor's own compile.
  * The .cu files include no torch header (a C ABI called through ctypes: raw pointers, sizes, the
    current cudaStream_t), so they compile with nvcc alone; `python -m fq_compile.kernels.cutlass.gemm
    --nvcc-check` compiles them without a GPU.
  * Epilogue: D = cast(act(__fadd_rn(__fmul_rn(float(acc), scale[col]), bias[col]))): mul then add, each
    rounded (no FMA), so float32 outputs equal `quant_linear_reference` bit for bit and bf16/fp16 outputs
    are that float32 value rounded to nearest even, as the reference's final cast.  act is the identity
    or ReLU (for a GEMM whose only consumer is a ReLU, OPT's fc1; passes/epilogue.py).
  * INT4 (packed two per byte, low nibble first): Hopper has no INT4 tensor cores, so a small CUDA
    kernel unpacks both operands into int8 scratch buffers and the INT8 GEMM runs on them.  Cost
    against the Triton kernel (which unpacks in registers, so only packed bytes cross HBM/L2): for
    each operand of R rows, R*K/2 bytes read + R*K written by the unpack, then R*K read by the GEMM
    instead of R*K/2: 2.5*R*K extra bytes, plus one launch per operand.  At decode sizes the weight
    traffic is ~5x the Triton kernel's, so CUTLASS INT4 only pays off (if at all) at large M, where
    the GEMM is compute bound and the weight unpack is amortised; the dispatcher decides per shape.

Which implementation runs is decided by kernels/dispatch.py; this module only builds and launches.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from torch.library import custom_op

from fq_compile.kernels import stopwatch

CSRC = Path(__file__).resolve().parent / "csrc"
HEADERS = ("fq_cutlass.h", "fq_sm90_gemm.cuh")
API_SOURCE = "fq_cutlass_api.cu"

# name -> ((tile M, N, K), (cluster M, N), schedule).  K tile = 128 int8 = one 128-byte swizzle row.
CONFIGS = {
    "coop_128x128x128_c2x1": ((128, 128, 128), (2, 1), "Cooperative"),
    "coop_128x256x128_c2x1": ((128, 256, 128), (2, 1), "Cooperative"),
    "coop_128x256x128_c1x2": ((128, 256, 128), (1, 2), "Cooperative"),
    "coop_256x128x128_c1x2": ((256, 128, 128), (1, 2), "Cooperative"),
    "pp_64x128x128_c1x1": ((64, 128, 128), (1, 1), "PingPong"),
    "pp_128x128x128_c1x2": ((128, 128, 128), (1, 2), "PingPong"),
}
K_TILE = 128  # every config's K tile (int8 elements)
# out dtype -> (C++ element type, FqOutDtype code); int32 = the raw accumulator (exactness tests)
OUT_TYPES = {
    torch.int32: ("int32_t", 0),
    torch.float32: ("float", 1),
    torch.bfloat16: ("cutlass::bfloat16_t", 2),
    torch.float16: ("cutlass::half_t", 3),
}
ACTS = ("none", "relu")  # epilogue activations (int32 outputs take "none" only)
NVCC_FLAGS = [
    "-gencode=arch=compute_90a,code=sm_90a",  # wgmma / setmaxnreg need the 'a' target
    "-std=c++17", "--expt-relaxed-constexpr", "-DNDEBUG",
    "-O1",  # host code only (a launcher; device code is optimised by cicc/ptxas whatever -O says)
    # torch's default nvcc flags disable the half/bfloat16 operators that CUTLASS's headers use
    "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-U__CUDA_NO_HALF2_OPERATORS__",
]
MIN_ALIGN = 16  # bytes: TMA wants 16-byte aligned base addresses and row strides


class CutlassUnavailable(RuntimeError):
    """The CUTLASS kernels cannot be used in this process (reason in the message)."""


# ------------------------------------------------------------------------------------------------
# instances and sources
# ------------------------------------------------------------------------------------------------

def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def instance_key(config: str, out_dtype: torch.dtype, act: str = "none") -> str:
    """'config:dtype:act', the name an instance library reports (fq_instance_name)."""
    if config not in CONFIGS:
        raise ValueError(f"unknown CUTLASS config {config!r}; known: {sorted(CONFIGS)}")
    if out_dtype not in OUT_TYPES:
        raise ValueError(f"CUTLASS GEMMs have no {out_dtype} output")
    if act not in ACTS or (act != "none" and out_dtype == torch.int32):
        raise ValueError(f"unknown epilogue activation {act!r} for {out_dtype}; known: {ACTS}")
    return f"{config}:{_dtype_name(out_dtype)}:{act}"


def instance_source(config: str, out_dtype: torch.dtype, act: str = "none") -> str:
    (tm, tn, tk), (cm, cn), sched = CONFIGS[config]
    elem = OUT_TYPES[out_dtype][0]
    key = instance_key(config, out_dtype, act)
    return (f'// generated by fq_compile/kernels/cutlass/gemm.py: {key}\n'
            f'#include "fq_sm90_gemm.cuh"\n'
            f'using FqTile = cute::Shape<cute::Int<{tm}>, cute::Int<{tn}>, cute::Int<{tk}>>;\n'
            f'using FqCluster = cute::Shape<cute::Int<{cm}>, cute::Int<{cn}>, cute::_1>;\n'
            f'FQ_SM90_INSTANCE(FqTile, FqCluster, fq::{sched}, {elem}, {"true" if act == "relu" else "false"})\n'
            f'extern "C" const char* fq_instance_name() {{ return "{key}"; }}\n')


def instances():
    """Every (config, out dtype, act) instance there is (`--build --all`, the GPU tests)."""
    return [(c, dt, a) for c in CONFIGS for dt in OUT_TYPES for a in ACTS if not (dt == torch.int32 and a != "none")]


def _instance_filename(config: str, out_dtype: torch.dtype, act: str = "none") -> str:
    return f"gemm_{config}_{_dtype_name(out_dtype)}{'' if act == 'none' else '_' + act}.cu"


def cutlass_include_dirs() -> list[Path]:
    """The CUTLASS/CuTe headers shipped inside the nvidia-cutlass wheel (found without importing it:
    its Python package needs cuda-python, the headers need nothing)."""
    spec = importlib.util.find_spec("cutlass_library")
    if spec is None or not spec.submodule_search_locations:
        raise CutlassUnavailable("the nvidia-cutlass package is not installed (pip install 'fq-compile[cutlass]')")
    root = Path(list(spec.submodule_search_locations)[0]) / "source"
    dirs = [root / "include", root / "tools" / "util" / "include"]
    if not (dirs[0] / "cutlass" / "cutlass.h").exists() or not (dirs[1] / "cutlass" / "util").exists():
        raise CutlassUnavailable(f"nvidia-cutlass is installed but its C++ headers are missing under {root}")
    return dirs


def _cutlass_version() -> str:
    try:
        from importlib.metadata import version
        return version("nvidia-cutlass")
    except Exception:  # pragma: no cover - metadata missing
        return "unknown"


def _build_key() -> str:
    """Hash of what the libraries depend on: the sources (every generated instance's too, so editing a
    config's tiles never loads a stale library of that name), flags, versions."""
    h = hashlib.sha256()
    for name in (*HEADERS, API_SOURCE):
        h.update((CSRC / name).read_bytes())
    for item in instances():
        h.update(instance_source(*item).encode())
    h.update(" ".join(NVCC_FLAGS).encode())
    h.update(f"torch={torch.__version__} cuda={torch.version.cuda} cutlass={_cutlass_version()}".encode())
    return h.hexdigest()[:16]


def cache_root() -> Path:
    env = os.environ.get("FQ_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "fq_compile"


def build_dir() -> Path:
    return cache_root() / f"cutlass-{_build_key()}"


def _cuda_home() -> str | None:
    """The CUDA toolkit torch's extension builder uses, else the one whose nvcc is on PATH."""
    from torch.utils import cpp_extension
    if cpp_extension.CUDA_HOME:
        return cpp_extension.CUDA_HOME
    nvcc = shutil.which("nvcc")
    return str(Path(nvcc).resolve().parents[1]) if nvcc else None


def _nvcc() -> str | None:
    home = _cuda_home()
    cand = Path(home) / "bin" / "nvcc" if home else None
    if cand is not None and cand.exists():
        return str(cand)
    return shutil.which("nvcc")


def unavailable_reason(device: torch.device | int | None = None) -> str | None:
    """Why the CUTLASS kernels cannot run here (None: they can, after a build).  Cheap; no build."""
    if _build_error is not None:
        return _build_error
    if torch.version.cuda is None:
        return "this torch build has no CUDA"
    if not torch.cuda.is_available():
        return "no CUDA device"
    cap = torch.cuda.get_device_capability(device)
    if cap != (9, 0):
        return f"the CUTLASS kernels are built for sm_90a (Hopper); this GPU is sm_{cap[0]}{cap[1]}"
    if _nvcc() is None:
        return "nvcc not found (set CUDA_HOME)"
    try:
        cutlass_include_dirs()
    except CutlassUnavailable as e:
        return str(e)
    return None


def _write(path: Path, text: str) -> Path:
    """Write text unless the file already holds it (keeps mtimes, and concurrent writers harmless)."""
    if not path.exists() or path.read_text() != text:
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return path


def write_sources(dest: Path, items=None) -> list[Path]:
    """The API source (copied) and one generated .cu per instance (all, or `items`), in dest."""
    dest.mkdir(parents=True, exist_ok=True)
    out = [_write(dest / API_SOURCE, (CSRC / API_SOURCE).read_text())]
    for c, dt, a in (instances() if items is None else items):
        out.append(_write(dest / _instance_filename(c, dt, a), instance_source(c, dt, a)))
    return out


# ------------------------------------------------------------------------------------------------
# build (one shared library per instance, in parallel) and load
# ------------------------------------------------------------------------------------------------

_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_futures: dict[str, Future] = {}     # instance key (or "api") -> future of its ctypes library
_build_error: str | None = None      # set when the toolchain cannot build at all (never retried)
_jobs_running = 0


def _nvcc_command(src: Path, out: Path, split: int) -> list[str]:
    incs = [f"-I{p}" for p in [CSRC, *cutlass_include_dirs()]]
    cmd = [_nvcc(), "-shared", "-o", str(out), str(src), *incs, *NVCC_FLAGS, "-Xcompiler", "-fPIC",
           "-cudart", "shared"]
    home = _cuda_home()
    if home:
        lib = Path(home) / "lib64"
        cmd += [f"-L{lib}", f"-Xlinker=-rpath,{lib}"]
    if split > 1:
        cmd.append(f"--split-compile={split}")
    return cmd


def _compile(name: str, src: Path, so: Path, split: int) -> Path:
    """nvcc one source into a shared library (written under a temporary name, then renamed, so
    concurrent processes never load a half-written file)."""
    tmp = so.with_name(f"{so.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    cmd = _nvcc_command(src, tmp, split)
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        tmp.unlink(missing_ok=True)
        log = so.with_suffix(".log")
        log.write_text(" ".join(cmd) + "\n\n" + r.stdout + r.stderr)
        first = next((ln for ln in (r.stderr or r.stdout).splitlines() if "error" in ln), r.stderr.strip()[:300])
        raise RuntimeError(f"nvcc failed for {name}: {first.strip()[:300]} (full log: {log})")
    os.replace(tmp, so)
    return so


def _load_instance(so: Path, key: str) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(so))
    lib.fq_instance_name.restype = ctypes.c_char_p
    lib.fq_instance_workspace.restype = ctypes.c_longlong
    lib.fq_instance_workspace.argtypes = [ctypes.POINTER(_Params)]
    lib.fq_instance_run.restype = ctypes.c_int
    lib.fq_instance_run.argtypes = [ctypes.POINTER(_Params), ctypes.c_char_p, ctypes.c_int]
    got = lib.fq_instance_name().decode()
    if got != key:
        raise RuntimeError(f"{so} is instance {got!r}, expected {key!r}")
    return lib


def _load_api(so: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(so))
    lib.fq_unpack_int4.restype = ctypes.c_int
    lib.fq_unpack_int4.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                   ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int]
    return lib


@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive lock on `path` shared by every process (fcntl.flock), so that processes needing
    the same instance at once (pytest-xdist workers, one process per GPU) build it once: the others
    wait, then load the library the first one wrote.  No lock where fcntl is missing."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _build_one(key: str, d: Path, split: int) -> ctypes.CDLL:
    global _jobs_running
    so = _so_path(d, key)
    if not so.exists():
        with _file_lock(so.with_name(so.name + ".lock")):
            if not so.exists():       # another process may have built it while we waited
                src = d / "src" / (API_SOURCE if key == "api" else _instance_filename(*_parse_key(key)))
                with _lock:
                    _jobs_running += 1
                try:
                    _compile(key, src, so, split)
                finally:
                    with _lock:
                        _jobs_running -= 1
    return _load_api(so) if key == "api" else _load_instance(so, key)


def _check_toolchain():
    global _build_error
    if _build_error is not None:
        raise CutlassUnavailable(_build_error)
    reason = unavailable_reason()
    if reason is not None:
        _build_error = reason
        raise CutlassUnavailable(reason)


def prefetch(items) -> list[Future]:
    """Start building (in background threads) the instances `items` [(config, out_dtype, act)] and
    the API library, those not built or building yet; returns their futures.  Raises
    CutlassUnavailable at once when the toolchain is missing."""
    global _pool
    _check_toolchain()
    keys = ["api"] + [instance_key(c, dt, a) for c, dt, a in items]
    d = build_dir()
    with _lock:
        todo = [k for k in dict.fromkeys(keys) if k not in _futures]
        if todo:
            pending = [k for k in todo if not _so_path(d, k).exists()]
            if pending:
                write_sources(d / "src", [_parse_key(k) for k in pending if k != "api"])
            cores = os.cpu_count() or 1
            if _pool is None:
                _pool = ThreadPoolExecutor(max_workers=max(2, cores), thread_name_prefix="fq-cutlass-build")
            split = max(1, cores // max(1, len(pending) + _jobs_running))
            for k in todo:
                _futures[k] = _pool.submit(_build_one, k, d, split)
            if pending:
                print(f"fq_compile: building {len(pending)} CUTLASS kernel librar{'y' if len(pending) == 1 else 'ies'} "
                      f"(first use; about a minute with {cores} cores) in {d}", file=sys.stderr, flush=True)
        return [_futures[k] for k in dict.fromkeys(keys)]


def _so_path(d: Path, key: str) -> Path:
    if key == "api":
        return d / "fq_cutlass_api.so"
    c, dt, a = _parse_key(key)
    return d / f"{Path(_instance_filename(c, dt, a)).stem}.so"


def _parse_key(key: str):
    config, dt, act = key.split(":")
    return config, getattr(torch, dt), act


def ensure(items) -> dict[str, ctypes.CDLL]:
    """Build (in parallel, progress on stderr) and load the listed instances and the API library;
    returns {key: library}.  Raises CutlassUnavailable with the reason when they cannot be built."""
    futures = prefetch(items)
    keys = ["api"] + [instance_key(c, dt, a) for c, dt, a in items]
    waiting = [f for f in futures if not f.done()]
    if waiting:
        from concurrent.futures import as_completed

        from tqdm.auto import tqdm
        t0 = time.monotonic()
        with tqdm(total=len(futures), initial=len(futures) - len(waiting), desc="fq_compile: CUTLASS build",
                  unit="lib", file=sys.stderr, dynamic_ncols=True) as bar, stopwatch.stage("CUTLASS build"):
            for _ in as_completed(waiting):
                bar.update(1)
        print(f"fq_compile: CUTLASS kernels ready after {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
    out = {}
    for k, f in zip(keys, futures):
        try:
            out[k] = f.result()
        except Exception as e:  # compiler errors, missing libraries: remembered (the future stays failed)
            first = str(e).strip().splitlines()[0][:400] if str(e).strip() else type(e).__name__
            raise CutlassUnavailable(f"building the CUTLASS kernels failed: {first}") from e
    return out


def load_library(items=None) -> ctypes.CDLL:
    """Build (first use) and load the API library and the instances `items` (None: every instance,
    as the GPU tests and the kernel benchmark want); returns the API library.  Raises
    CutlassUnavailable with the reason."""
    return ensure(instances() if items is None else items)["api"]


def _instance(config: str, out_dtype: torch.dtype, act: str) -> ctypes.CDLL:
    key = instance_key(config, out_dtype, act)
    f = _futures.get(key)
    if f is not None and f.done() and f.exception() is None:
        return f.result()
    return ensure([(config, out_dtype, act)])[key]


def _api() -> ctypes.CDLL:
    f = _futures.get("api")
    if f is not None and f.done() and f.exception() is None:
        return f.result()
    return ensure([])["api"]


class _Params(ctypes.Structure):
    """Mirror of FqGemmParams in csrc/fq_cutlass.h (same order, natural C alignment)."""
    _fields_ = [("a", ctypes.c_void_p), ("b", ctypes.c_void_p), ("d", ctypes.c_void_p), ("bias", ctypes.c_void_p),
                ("lda", ctypes.c_int64), ("ldb", ctypes.c_int64), ("ldd", ctypes.c_int64),
                ("m", ctypes.c_int), ("n", ctypes.c_int), ("k", ctypes.c_int), ("scale", ctypes.c_void_p),
                ("out_dtype", ctypes.c_int), ("sm_count", ctypes.c_int),
                ("workspace", ctypes.c_void_p), ("stream", ctypes.c_void_p), ("row_scale", ctypes.c_void_p)]


def nvcc_check(jobs: int = 2, only: list[str] | None = None, out_dir: Path | None = None) -> list[str]:
    """Compile every instance (or those whose file name contains one of `only`) with nvcc -c, no GPU
    needed; returns the failures (empty: all compiled).  Used before spending GPU time."""
    nvcc = _nvcc()
    if nvcc is None:
        raise CutlassUnavailable("nvcc not found")
    d = Path(out_dir) if out_dir else cache_root() / "nvcc-check"
    sources = write_sources(d)
    if only:
        sources = [s for s in sources if any(o in s.name for o in only)]
    incs = [f"-I{p}" for p in [CSRC, *cutlass_include_dirs()]]
    flags = NVCC_FLAGS + ["--compiler-options", "-fPIC"]
    failures = []

    def one(src: Path):
        t0 = time.time()
        r = subprocess.run([nvcc, "-c", str(src), "-o", str(src.with_suffix(".o")), *incs, *flags],
                           capture_output=True, text=True)
        msg = f"{src.name}: {'ok' if r.returncode == 0 else 'FAILED'} in {time.time() - t0:.0f}s"
        print(msg, flush=True)
        if r.returncode != 0:
            failures.append(f"{msg}\n{r.stderr[-4000:]}")

    with ThreadPoolExecutor(max(1, jobs)) as ex:
        list(ex.map(one, sources))
    return failures


# ------------------------------------------------------------------------------------------------
# launch
# ------------------------------------------------------------------------------------------------

def _aligned(t: torch.Tensor) -> bool:
    """Rows of 1-byte elements that TMA can read in place: unit inner stride, 16-byte aligned base and
    row stride."""
    return (t.dim() == 2 and (t.stride(1) == 1 or t.shape[1] <= 1) and t.stride(0) % MIN_ALIGN == 0
            and t.data_ptr() % MIN_ALIGN == 0)


def _k_major(t: torch.Tensor) -> torch.Tensor:
    return t if _aligned(t) else t.contiguous()


def shape_supported(n: int, k: int, out_dtype: torch.dtype) -> bool:
    """CUTLASS kernel constraints on the (unpacked) K and on N: 16-byte vectors of int8 along K, of
    the output along N."""
    if out_dtype not in OUT_TYPES or n <= 0 or k <= 0:
        return False
    esize = torch.empty((), dtype=out_dtype).element_size()
    return k % 16 == 0 and (n * esize) % MIN_ALIGN == 0


# The two configs the measured sm_90 rule uses (benchmarks/results/kernels-cutlass-2026-11-23-h100.md,
# gemm_table.json): 128x256 cooperative tiles were fastest once they fill every SM (M >= 4096 at
# N = 4096: 124.6 us vs 132.5 for 128x128), 64x128 ping-pong below (M = 256: 12.8 us vs 17.1).
LARGE_CONFIG = "coop_128x256x128_c2x1"
SMALL_CONFIG = "pp_64x128x128_c1x1"
RULE_CONFIGS = (SMALL_CONFIG, LARGE_CONFIG)


def default_config(m: int, n: int, k: int, sm_count: int = 132) -> str:
    """The tile config for a shape no measurement names: 128x256 cooperative tiles when there are at
    least as many of them as SMs, else 64x128 ping-pong tiles (4x as many tiles, so the GPU fills)."""
    if -(-m // 128) * -(-n // 256) >= max(1, sm_count):
        return LARGE_CONFIG
    return SMALL_CONFIG


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def unpack_int4_cuda(packed: torch.Tensor) -> torch.Tensor:
    """[R, K/2] packed uint8 (any row stride, unit inner stride) -> [R, K] int8 contiguous, on the GPU
    (same result as packing.unpack_int4)."""
    lib = _api()
    if packed.dim() != 2:
        raise ValueError(f"unpack_int4_cuda expects a 2-D tensor, got shape {tuple(packed.shape)}")
    if packed.stride(1) != 1 and packed.shape[1] > 1:
        packed = packed.contiguous()
    rows, kb = packed.shape
    out = torch.empty((rows, 2 * kb), dtype=torch.int8, device=packed.device)
    if rows == 0 or kb == 0:
        return out
    err = ctypes.create_string_buffer(512)
    with torch.cuda.device(packed.device):
        stream = torch.cuda.current_stream(packed.device).cuda_stream
        rc = lib.fq_unpack_int4(packed.data_ptr(), packed.stride(0), out.data_ptr(), rows, kb, stream, err, 512)
    if rc != 0:
        raise RuntimeError(f"fq_unpack_int4 failed: {err.value.decode(errors='replace')}")
    return out


def cutlass_int_linear(xq: torch.Tensor, wq: torch.Tensor, scale, bias: torch.Tensor | None,
                       out_dtype: torch.dtype, bits: int, *, config: str | None = None,
                       raw_int32: bool = False, act: str = "none", row_scale: torch.Tensor | None = None
                       ) -> torch.Tensor:
    """Run the CUTLASS GEMM on CUDA tensors (scale: float32 [N], or a number for every channel;
    row_scale: float32, one per row of xq, or None: kernels/int_gemm.py's per-token epilogue).
    raw_int32=True returns the exact int32 accumulator; act "relu" applies ReLU in the epilogue;
    config names a CONFIGS entry (None: the dispatcher's choice for this shape, `runtime_config`).
    Operands that TMA cannot read in place are copied first (the dispatcher only sends aligned ones);
    shapes the kernel cannot take (K % 16, N not a multiple of a 16-byte output vector) raise ValueError."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if act not in ACTS:
        raise ValueError(f"unknown epilogue activation {act!r}; known: {ACTS}")
    lead = xq.shape[:-1]
    a = xq.reshape(-1, xq.shape[-1])
    if bits == 4:
        a8, b8 = unpack_int4_cuda(a), unpack_int4_cuda(wq)
    else:
        a8, b8 = _k_major(a), _k_major(wq)
    m, k = a8.shape
    n = b8.shape[0]
    dt = torch.int32 if raw_int32 else out_dtype
    if dt not in OUT_TYPES:
        raise ValueError(f"cutlass_int_linear: unsupported out_dtype {out_dtype}")
    if raw_int32:
        act = "none"
    out = torch.empty((m, n), dtype=dt, device=xq.device)
    if m == 0 or n == 0:
        return out.reshape(*lead, n)
    has_bias = bias is not None and not raw_int32
    from fq_compile.kernels.int_gemm import per_channel

    scale = per_channel(scale, n, xq.device).contiguous()
    if scale.data_ptr() % MIN_ALIGN:
        scale = scale.clone()
    rows = None
    if row_scale is not None and not raw_int32:
        rows = row_scale.reshape(-1).float().contiguous()
        if rows.data_ptr() % MIN_ALIGN:
            rows = rows.clone()
    if k == 0:  # empty reduction: the result is the bias (or zero)
        y = torch.zeros((m, n), dtype=torch.float32, device=xq.device)
        if has_bias:
            y = y * scale + bias.float()
        if act == "relu":
            y = torch.relu(y)
        return out.copy_(y.to(dt)).reshape(*lead, n)
    if not shape_supported(n, k, dt):
        raise ValueError(f"cutlass_int_linear: shape N={n}, K={k}, {dt} not supported (needs K % 16 == 0 and "
                         f"16-byte output rows)")
    dev = xq.device.index if xq.device.index is not None else torch.cuda.current_device()
    if not config:
        from fq_compile.kernels import dispatch
        config = dispatch.runtime_config(bits, m, n, k, dt, dev)
    lib = _instance(config, dt, act)
    bias_arg = None
    if has_bias:
        bias_arg = bias.float().contiguous()
        if bias_arg.data_ptr() % MIN_ALIGN:
            bias_arg = bias_arg.clone()
    p = _Params(a=a8.data_ptr(), b=b8.data_ptr(), d=out.data_ptr(), bias=bias_arg.data_ptr() if has_bias else None,
                lda=a8.stride(0), ldb=b8.stride(0), ldd=out.stride(0), m=m, n=n, k=k, scale=scale.data_ptr(),
                out_dtype=OUT_TYPES[dt][1], sm_count=_sm_count(dev), workspace=None, stream=None,
                row_scale=rows.data_ptr() if rows is not None else None)
    err = ctypes.create_string_buffer(1024)
    with torch.cuda.device(dev):
        p.stream = torch.cuda.current_stream(dev).cuda_stream
        ws_bytes = lib.fq_instance_workspace(ctypes.byref(p))
        ws = None
        if ws_bytes > 0:
            ws = torch.empty(ws_bytes, dtype=torch.uint8, device=xq.device)
            p.workspace = ws.data_ptr()
        rc = lib.fq_instance_run(ctypes.byref(p), err, len(err))
    if rc != 0:
        raise RuntimeError(f"CUTLASS GEMM {config} ({m}x{n}x{k}, {dt}, act={act}) failed: "
                           f"{err.value.decode(errors='replace')}")
    return out.reshape(*lead, n)


# ------------------------------------------------------------------------------------------------
# the op: an opaque custom op, so Inductor calls it as an extern kernel from fq::int8_linear's body
# ------------------------------------------------------------------------------------------------

def _define_op():
    @custom_op("fq::cutlass_int_linear", mutates_args=())
    def cutlass_int_linear_op(xq: torch.Tensor, wq: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                              out_dtype: torch.dtype, bits: int, config: str, act: str = "none",
                              row_scale: torch.Tensor | None = None) -> torch.Tensor:
        """The CUTLASS GEMM (config "": chosen per call, for graphs compiled with dynamic rows).  On
        other devices the op computes the same result with the CPU reference (its semantics; used by
        the CPU tests of the dispatch path)."""
        if not xq.is_cuda:
            from fq_compile.kernels.int_gemm import quant_linear_reference
            return quant_linear_reference(xq, wq, scale, bias, bits, out_dtype, act, row_scale)
        return cutlass_int_linear(xq, wq, scale, bias, out_dtype, bits, config=config or None, act=act,
                                  row_scale=row_scale)

    @cutlass_int_linear_op.register_fake
    def _(xq, wq, scale, bias, out_dtype, bits, config, act="none", row_scale=None):
        return xq.new_empty((*xq.shape[:-1], wq.shape[0]), dtype=out_dtype)

    return cutlass_int_linear_op


if __name__ != "__main__":  # `python -m` runs a second copy of this file; the package's copy defines the op
    cutlass_int_linear_op = _define_op()


def _parse_dtypes(text: str) -> list[torch.dtype]:
    names = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
             "fp32": torch.float32, "float32": torch.float32, "int32": torch.int32}
    try:
        return [names[t.strip()] for t in text.split(",") if t.strip()]
    except KeyError as e:
        raise SystemExit(f"unknown dtype {e}; use {', '.join(names)}") from None


def main(argv=None):
    ap = argparse.ArgumentParser(description="Build or compile-check the CUTLASS kernels.")
    ap.add_argument("--nvcc-check", action="store_true", help="nvcc -c every instance (no GPU needed)")
    ap.add_argument("--only", default=None, help="comma-separated substrings of instance file names")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--build", action="store_true",
                    help="build and load what a model of --dtypes needs on first use (needs a Hopper GPU)")
    ap.add_argument("--dtypes", default="bf16,fp16", help="output dtypes to build for (with --build)")
    ap.add_argument("--all", action="store_true", help="with --build: every instance (the GPU tests use them)")
    args = ap.parse_args(argv)
    if args.nvcc_check:
        fails = nvcc_check(args.jobs, args.only.split(",") if args.only else None)
        for f in fails:
            print(f, file=sys.stderr)
        return 1 if fails else 0
    if args.build:
        from fq_compile.kernels import dispatch

        t0 = time.time()
        items = instances() if args.all else [i for dt in _parse_dtypes(args.dtypes)
                                              for i in dispatch.cutlass_instances(dt)]
        ensure(items)
        print(f"built/loaded {len(items)} instances in {time.time() - t0:.0f}s: {build_dir()}")
        return 0
    ap.print_help()
    return 2


if __name__ == "__main__":
    from fq_compile.kernels.cutlass import (
        gemm as _package_copy,  # one copy of the module state
    )
    sys.exit(_package_copy.main())
