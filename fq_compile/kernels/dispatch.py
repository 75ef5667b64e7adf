"""Which kernel serves `fq::int8_linear` / `fq::int4_linear` on a CUDA tensor: Triton or CUTLASS.

    FQ_GEMM=triton|cutlass|auto        process default (unset or empty: auto)
    torch.compile(..., backend="flattenquant", options={"plan": plan, "gemm": "cutlass"})

The backend option applies while that graph is compiled and takes precedence over FQ_GEMM there
(the choice is made when Inductor traces the ops' bodies, so it is baked into the compiled code;
with options={"inductor": False} the graph runs eagerly and FQ_GEMM decides at run time).  The
effective choice and the table's digest are added to torch.compiler's cache_key_tag while the
backend compiles, so compiled artifacts cached under one choice are not reused under another.
(A plain `torch.compile(backend="inductor")` of code calling the fq ops gets no such tag: its
AOTAutograd cache keys on the graph before the ops' bodies are traced, so wrap the compile in
`dispatch.use(None)` or clear the cache when switching FQ_GEMM between processes.)

  triton   always the Triton kernels (kernels/triton/gemm.py).
  cutlass  the CUTLASS kernels (kernels/cutlass/gemm.py) wherever they can take the shape; the tile config
           comes from the table when it has the shape, else cutlass.gemm.default_config.
  auto     the committed table `gemm_table.json`, measured on the device by
           `benchmarks/kernels.py --cutlass --write-table`: per bits, N, K and M, the faster
           implementation and the best CUTLASS tile config; an unmeasured shape takes the nearest
           measured one (log-distance over M, N, K).  The table is used only on a GPU of the name
           recorded in it; no table, an empty one, or another GPU means Triton.

CUTLASS is never required: without CUDA, nvcc, ninja, the nvidia-cutlass package, a Hopper GPU, or
when its build fails, the dispatcher warns once per process and uses Triton (the CPU reference on
CPU tensors).  Shapes the CUTLASS kernels cannot take (K % 16 != 0, unaligned rows) go to Triton
silently.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import json
import math
import os
import warnings
from pathlib import Path

import torch

CHOICES = ("triton", "cutlass", "auto")
ENV = "FQ_GEMM"
TABLE_PATH = Path(__file__).resolve().with_name("gemm_table.json")
TABLE_FORMAT = 1

_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("fq_gemm_override", default=None)
_warned: set[str] = set()


def parse_mode(value, source: str = ENV) -> str:
    """'triton' / 'cutlass' / 'auto' (case and spaces ignored; empty or None: auto)."""
    v = "" if value is None else str(value).strip().lower()
    if v == "":
        return "auto"
    if v not in CHOICES:
        raise ValueError(f"{source}={value!r} is not a GEMM choice; use one of {', '.join(CHOICES)}")
    return v


def current_mode() -> str:
    o = _override.get()
    return o if o is not None else parse_mode(os.environ.get(ENV), ENV)


@contextlib.contextmanager
def use(mode: str | None):
    """Within the block, `mode` (validated; None keeps FQ_GEMM's) is the choice, and torch.compile's
    cache key is tagged with it.  The flattenquant backend wraps its Inductor call in this."""
    m = parse_mode(mode, "options['gemm']") if mode is not None else None
    token = _override.set(m) if m is not None else None
    try:
        with _cache_tag(f"fq_gemm={m or current_mode()}:{table_digest()}"):
            yield m or current_mode()
    finally:
        if token is not None:
            _override.reset(token)


@contextlib.contextmanager
def _cache_tag(tag: str):
    cfg = getattr(torch.compiler, "config", None)
    if cfg is None or not hasattr(cfg, "cache_key_tag"):
        yield
        return
    old = cfg.cache_key_tag
    with cfg.patch(cache_key_tag=f"{old}|{tag}" if old else tag):
        yield


def _warn_once(key: str, msg: str):
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"fq_compile: {msg}", RuntimeWarning, stacklevel=4)


# ------------------------------------------------------------------------------------------------
# the measured table
# ------------------------------------------------------------------------------------------------

class Table:
    """Entries {bits, m, n, k, impl, config, ms: {...}} measured on one GPU (`device`)."""

    def __init__(self, device: str, entries: list[dict], meta: dict | None = None):
        self.device = device
        self.entries = entries
        self.meta = meta or {}
        self._by_bits: dict[int, list[dict]] = {}
        for e in entries:
            self._by_bits.setdefault(int(e["bits"]), []).append(e)

    @classmethod
    def from_json(cls, data: dict) -> Table:
        if data.get("format") != TABLE_FORMAT:
            raise ValueError(f"format {data.get('format')!r}, expected {TABLE_FORMAT}")
        entries = data.get("entries") or []
        for e in entries:
            for key in ("bits", "m", "n", "k", "impl"):
                if key not in e:
                    raise ValueError(f"entry without {key!r}: {e}")
            if e["impl"] not in ("triton", "cutlass"):
                raise ValueError(f"entry with impl {e['impl']!r}")
        return cls(str(data.get("device", "")), entries, {k: v for k, v in data.items() if k != "entries"})

    def lookup(self, bits: int, m: int, n: int, k: int) -> dict | None:
        """The entry of the nearest measured shape with the same bits (None: none measured)."""
        cands = self._by_bits.get(bits)
        if not cands:
            return None
        lm, ln, lk = math.log2(max(m, 1)), math.log2(max(n, 1)), math.log2(max(k, 1))
        return min(cands, key=lambda e: abs(math.log2(max(e["m"], 1)) - lm) + abs(math.log2(max(e["n"], 1)) - ln)
                   + abs(math.log2(max(e["k"], 1)) - lk))


@functools.lru_cache(maxsize=4)
def _load_table(path: str, mtime: float) -> Table | None:
    try:
        return Table.from_json(json.loads(Path(path).read_text()))
    except Exception as e:  # a broken table must not break inference
        _warn_once("table", f"ignoring the GEMM table {path}: {type(e).__name__}: {e}")
        return None


def load_table(path: Path | str | None = None) -> Table | None:
    """The committed table (or `path`), None when absent or unreadable."""
    p = Path(path) if path is not None else Path(os.environ.get("FQ_GEMM_TABLE", TABLE_PATH))
    try:
        mtime = p.stat().st_mtime
    except OSError:
        return None
    return _load_table(str(p), mtime)


def table_digest() -> str:
    p = Path(os.environ.get("FQ_GEMM_TABLE", TABLE_PATH))
    try:
        return hashlib.sha256(p.read_bytes()).hexdigest()[:12]
    except OSError:
        return "none"


# ------------------------------------------------------------------------------------------------
# the choice
# ------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _device_name_cached(index: int) -> str:
    return torch.cuda.get_device_name(index)


def _device_name(device: torch.device) -> str:
    """The CUDA device's name ('' for any other device: no table applies there)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return ""
    return _device_name_cached(device.index if device.index is not None else torch.cuda.current_device())


def _device_ok(t: torch.Tensor) -> bool:
    return t.is_cuda


def _hint(v) -> int | None:
    """A size as an int; symbolic sizes (dynamic shapes) by their hint, without adding a guard (the
    choice only affects speed: both implementations compute the same result)."""
    if isinstance(v, int):
        return v
    try:
        h = v.node.hint
        if h is not None:
            return int(h)
    except AttributeError:
        pass
    try:
        from torch.fx.experimental.symbolic_shapes import hint_int
        return int(hint_int(v))
    except Exception:
        return None


def _rows_tma_ok(t: torch.Tensor) -> bool:
    """Whether TMA can read t's rows (of int8) in place, without a copy: unit inner stride, 16-byte
    row stride and offset (PyTorch's allocations are at least 256-byte aligned, so the offset
    decides).  More than 2 dims: only contiguous tensors (their rows are K bytes apart)."""
    s_last, off = _hint(t.stride(-1)), _hint(t.storage_offset())
    if s_last is None or off is None or off % 16 or (s_last != 1 and _hint(t.shape[-1]) != 1):
        return False
    if t.dim() == 2:
        s0 = _hint(t.stride(0))
        return s0 is not None and s0 % 16 == 0
    return t.is_contiguous() and (_hint(t.shape[-1]) or 0) % 16 == 0


def _cutlass_ready(device: torch.device) -> bool:
    """Build/load the CUTLASS extension (first call: minutes); False (warned once) if it cannot."""
    from fq_compile.kernels.cutlass import gemm as cutlass_gemm
    try:
        reason = cutlass_gemm.unavailable_reason(device)
        if reason is not None:
            raise cutlass_gemm.CutlassUnavailable(reason)
        cutlass_gemm.load_library()
        return True
    except cutlass_gemm.CutlassUnavailable as e:
        _warn_once("cutlass", f"CUTLASS GEMMs unavailable, using Triton: {e}")
        return False


def choose(bits: int, xq: torch.Tensor, wq: torch.Tensor, out_dtype: torch.dtype) -> tuple[str, str]:
    """('triton', '') or ('cutlass', config or '' for the default) for these operands."""
    mode = current_mode()
    if mode == "triton" or not _device_ok(xq):
        return "triton", ""
    k = _hint(xq.shape[-1])
    n = _hint(wq.shape[0])
    m = 1
    for d in xq.shape[:-1]:
        h = _hint(d)
        m = None if (m is None or h is None) else m * h
    if None in (m, n, k) or m == 0:
        return "triton", ""
    if bits == 4:
        k *= 2
    from fq_compile.kernels.cutlass import gemm as cutlass_gemm
    if not cutlass_gemm.shape_supported(n, k, out_dtype):
        return "triton", ""
    if bits == 8 and not (_rows_tma_ok(xq) and _rows_tma_ok(wq)):
        return "triton", ""  # a copy would cost more than the kernel gains
    table = load_table()
    entry = None
    if table is not None and table.entries and table.device == _device_name(xq.device):
        entry = table.lookup(bits, m, n, k)
    if mode == "auto" and (entry is None or entry["impl"] != "cutlass"):
        return "triton", ""
    config = (entry or {}).get("config") or ""
    if config and config not in cutlass_gemm.CONFIGS:
        config = ""
    if not _cutlass_ready(xq.device):
        return "triton", ""
    return "cutlass", config


def select(name: str, xq: torch.Tensor, wq: torch.Tensor, out_dtype: torch.dtype):
    """int_gemm's hook: the CUTLASS implementation when `choose` picks it, else None (the
    registered Triton kernel, or the reference off CUDA)."""
    bits = 8 if name == "int8_linear" else 4
    impl, config = choose(bits, xq, wq, out_dtype)
    if impl != "cutlass":
        return None
    return functools.partial(_run_cutlass, bits=bits, config=config)


def _run_cutlass(xq, wq, scale, bias, out_dtype, *, bits, config):
    return torch.ops.fq.cutlass_int_linear(xq, wq, scale, bias, out_dtype, bits, config)

