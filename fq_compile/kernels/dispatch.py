"""Which kernels serve the fq ops on a CUDA tensor: Triton or CUTLASS for the GEMMs
(`fq::int8_linear` / `fq::int4_linear`), our Triton kernel or Inductor's fused code for the
activation quantize (`fq::flatten_quantize`).

    FQ_GEMM=triton|cutlass|auto        process default (unset or empty: auto)
    torch.compile(..., backend="flattenquant", options={"plan": plan, "gemm": "cutlass"})
    FQ_QUANTIZE=kernel|fused|auto      the activation quantize (unset or empty: auto)

The backend option applies while that graph is compiled and takes precedence over FQ_GEMM there
(the choice is made when Inductor traces the ops' bodies, so it is baked into the compiled code;
with options={"inductor": False} the graph runs eagerly and FQ_GEMM decides at run time).  The
effective choice, the rule's version and the table's digest are added to torch.compiler's
cache_key_tag while the backend compiles, so compiled artifacts cached under one choice are not
reused under another.  (A plain `torch.compile(backend="inductor")` of code calling the fq ops gets
no such tag: wrap the compile in `dispatch.use(None)` or clear the cache when switching FQ_GEMM.)

GEMMs, `auto` (the default), decided by architecture and shape, never by the GPU's name:
  * CPU tensors: the reference.
  * a GPU other than sm_90 (A100 sm_80, L4 / L40S / RTX 4090 sm_89, ...): Triton (the CUTLASS
    kernels are sm_90a code).
  * sm_90 (H100 SXM / PCIe / NVL, H800, H200, GH200, ...): the measured table `gemm_table.json`
    (`benchmarks/kernel_bench.py --cutlass --write-table`: per bits, N, K' and M, the faster implementation
    and the best CUTLASS tile config), keyed by architecture, so a table measured on one sm_90 part
    serves every sm_90 part (the ranking of kernels is a property of the SM; the SM count only moves
    the tile config, which `default_config` scales by it); an unmeasured shape takes the nearest
    measured one (log-distance over M, N, K').  Without a table for sm_90, the sm_90 rule derived from
    the committed H100 measurements (`sm90_rule`, tested against every table entry): CUTLASS for INT8
    from M >= 256 and for INT4 from M >= 4096 (it unpacks INT4 into an INT8 copy first), Triton below.
  * `cutlass` forces CUTLASS wherever it can take the shape (config from the table or the rule);
    `triton` forces Triton.
CUTLASS is never required: without CUDA, nvcc, the nvidia-cutlass package, a Hopper GPU, or when its
build fails, the dispatcher warns once per process and uses Triton.  Shapes the CUTLASS kernels
cannot take (K % 16 != 0, unaligned rows) go to Triton.  Every layer's choice and the reason are
recorded when its graph is rewritten (passes/lower.py) and listed by `explain()`.

Activation quantize, `auto`: where the quantized activation has a producer Inductor can fuse with
(LayerNorm/RMSNorm, ReLU, SiLU(gate) * up, a residual add, the copy that makes attention's output
contiguous), the op is emitted as `fq::flatten_quantize_fused`, whose body is plain aten gather +
pointwise ops (kernels/flatten_quantize.py) that Inductor fuses into that producer's kernel: the
activation is not written and read back in between.  Where there is nothing to fuse with (a graph
input, an opaque op's output), our Triton kernel (CUDA) or the reference (CPU) runs.
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
from dataclasses import dataclass
from pathlib import Path

import torch

CHOICES = ("triton", "cutlass", "auto")
ENV = "FQ_GEMM"
QUANTIZE_CHOICES = ("kernel", "fused", "auto")
QUANTIZE_ENV = "FQ_QUANTIZE"
READ_ENV = "FQ_QUANTIZE_READ"   # how a fused quantize reads its input: gather (default) | slice
TABLE_PATH = Path(__file__).resolve().with_name("gemm_table.json")
TABLE_FORMAT = 2          # 2: keyed by architecture (arch "sm_90", sm_count); 1 (still read): by GPU name
RULE_VERSION = "sm90-r1"  # bump when sm90_rule changes (part of the compile cache tag)

# the measured sm_90 rule (benchmarks/results/kernels-cutlass-2026-11-23-h100.md): from which M
# CUTLASS is faster than Triton; tests/kernels/test_dispatch.py checks it against the committed table
SM90_CUTLASS_MIN_M = {8: 256, 4: 4096}

_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("fq_gemm_override", default=None)
_warned: set[str] = set()


def parse_mode(value, source: str = ENV, choices=CHOICES) -> str:
    """'triton' / 'cutlass' / 'auto' (case and spaces ignored; empty or None: auto)."""
    v = "" if value is None else str(value).strip().lower()
    if v == "":
        return "auto"
    if v not in choices:
        what = "a GEMM choice" if choices is CHOICES else "a quantize choice"
        raise ValueError(f"{source}={value!r} is not {what}; use one of {', '.join(choices)}")
    return v


def current_mode() -> str:
    o = _override.get()
    return o if o is not None else parse_mode(os.environ.get(ENV), ENV)


def quantize_mode() -> str:
    return parse_mode(os.environ.get(QUANTIZE_ENV), QUANTIZE_ENV, QUANTIZE_CHOICES)


@contextlib.contextmanager
def use(mode: str | None):
    """Within the block, `mode` (validated; None keeps FQ_GEMM's) is the choice, and torch.compile's
    cache key is tagged with it.  The flattenquant backend wraps its rewrite and Inductor call in this."""
    m = parse_mode(mode, "options['gemm']") if mode is not None else None
    token = _override.set(m) if m is not None else None
    try:
        with _cache_tag(f"fq_gemm={m or current_mode()}:{RULE_VERSION}:{table_digest()}:{_traced_sources_digest()}"):
            yield m or current_mode()
    finally:
        if token is not None:
            _override.reset(token)


@functools.lru_cache(maxsize=1)
def _traced_sources_digest() -> str:
    """The sources whose Python bodies torch.compile traces into our graphs (the fused quantize's
    decomposition, the GEMM ops' dispatch): AOTAutograd's cache keys on the graph before they are
    traced, so without this a changed fq_compile could reuse code compiled from the old bodies."""
    h = hashlib.sha256()
    here = Path(__file__).resolve().parent
    for name in ("flatten_quantize.py", "int_gemm.py", "dispatch.py"):
        h.update((here / name).read_bytes())
    return h.hexdigest()[:12]


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
# the device, as the choice sees it
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DeviceInfo:
    """What the kernel choice depends on: the architecture (compute capability) and the SM count;
    the name is only reported."""

    name: str
    capability: tuple[int, int]
    sm_count: int
    memory_bytes: int = 0

    @property
    def is_cuda(self) -> bool:
        return self.capability != (0, 0)

    @property
    def arch(self) -> str:
        return f"sm_{self.capability[0]}{self.capability[1]}" if self.is_cuda else "cpu"

    def describe(self) -> str:
        return f"{self.name} ({self.arch}, {self.sm_count} SMs)" if self.is_cuda else "CPU"


CPU = DeviceInfo("cpu", (0, 0), 0)


@functools.lru_cache(maxsize=None)
def _cuda_info(index: int) -> DeviceInfo:
    p = torch.cuda.get_device_properties(index)
    return DeviceInfo(p.name, (p.major, p.minor), p.multi_processor_count, int(getattr(p, "total_memory", 0)))


def device_info(device) -> DeviceInfo:
    """The DeviceInfo of a torch device (CPU for anything but CUDA)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return CPU
    return _cuda_info(device.index if device.index is not None else torch.cuda.current_device())


def _device_ok(t: torch.Tensor) -> bool:
    return t.is_cuda


# ------------------------------------------------------------------------------------------------
# the measured table
# ------------------------------------------------------------------------------------------------

class Table:
    """Entries {bits, m, n, k, impl, config, ms: {...}} measured on one GPU (`device`, of
    architecture `arch` with `sm_count` SMs: format 2; format 1 tables name only the GPU)."""

    def __init__(self, device: str, entries: list[dict], meta: dict | None = None, arch: str | None = None,
                 sm_count: int | None = None):
        self.device = device
        self.entries = entries
        self.meta = meta or {}
        self.arch = arch
        self.sm_count = sm_count
        self._by_bits: dict[int, list[dict]] = {}
        for e in entries:
            self._by_bits.setdefault(int(e["bits"]), []).append(e)

    @classmethod
    def from_json(cls, data: dict) -> Table:
        fmt = data.get("format")
        if fmt not in (1, TABLE_FORMAT):
            raise ValueError(f"format {fmt!r}, expected {TABLE_FORMAT}")
        if fmt == TABLE_FORMAT and not str(data.get("arch", "")).startswith("sm_"):
            raise ValueError(f"format {fmt} table without an 'arch' such as 'sm_90'")
        entries = data.get("entries") or []
        for e in entries:
            for key in ("bits", "m", "n", "k", "impl"):
                if key not in e:
                    raise ValueError(f"entry without {key!r}: {e}")
            if e["impl"] not in ("triton", "cutlass"):
                raise ValueError(f"entry with impl {e['impl']!r}")
        meta = {k: v for k, v in data.items() if k != "entries"}
        return cls(str(data.get("device", "")), entries, meta, arch=data.get("arch") if fmt == TABLE_FORMAT else None,
                   sm_count=data.get("sm_count"))

    def applies_to(self, info: DeviceInfo) -> bool:
        """Format 2: any GPU of the same architecture.  Format 1: the GPU of that exact name."""
        if not info.is_cuda or not self.entries:
            return False
        return self.arch == info.arch if self.arch else self.device == info.name

    def lookup(self, bits: int, m: int, n: int, k: int) -> dict | None:
        """The entry of the nearest measured shape with the same bits (None: none measured)."""
        cands = self._by_bits.get(bits)
        if not cands:
            return None
        lm, ln, lk = math.log2(max(m, 1)), math.log2(max(n, 1)), math.log2(max(k, 1))
        return min(cands, key=lambda e: abs(math.log2(max(e["m"], 1)) - lm) + abs(math.log2(max(e["n"], 1)) - ln)
                   + abs(math.log2(max(e["k"], 1)) - lk))

    def configs(self) -> set[str]:
        return {e.get("config") for e in self.entries if e["impl"] == "cutlass" and e.get("config")}


@functools.lru_cache(maxsize=4)
def _load_table(path: str, mtime: float) -> Table | None:
    try:
        return Table.from_json(json.loads(Path(path).read_text()))
    except Exception as e:  # a broken table must not break inference
        _warn_once("table", f"ignoring the GEMM table {path}: {type(e).__name__}: {e}")
        return None


def load_table(path: Path | str | None = None) -> Table | None:
    """The committed table (or `path`, or $FQ_GEMM_TABLE), None when absent or unreadable."""
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
# the GEMM choice
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Choice:
    """A kernel choice and why it was made (explain() prints both)."""

    impl: str          # "triton" | "cutlass" | "reference" (GEMMs); "fused" | "kernel" | "reference" (quantize)
    config: str = ""
    why: str = ""

    def label(self) -> str:
        names = {"triton": "Triton", "cutlass": "CUTLASS", "reference": "reference",
                 "fused": "fused by Inductor", "kernel": "Triton kernel"}
        if self.impl == "fused":
            return names["fused"] + (", originals as a slice" if self.config == "slice" else "")
        return names.get(self.impl, self.impl) + (f" {self.config}" if self.config else "")


def sm90_rule(bits: int, m: int, n: int, k: int, sm_count: int = 132) -> Choice:
    """The measured sm_90 rule for a GPU whose architecture has no table: CUTLASS from
    SM90_CUTLASS_MIN_M rows on (INT8 256, INT4 4096; the H100 table: INT8 M=256 12.8 us CUTLASS vs
    18.0 Triton, M=16 14.5 vs 11.5; INT4 M=4096 145 vs 178, M=256 a tie), its tile config by
    `default_config` (which scales with the SM count)."""
    from fq_compile.kernels.cutlass import gemm as cutlass_gemm

    lim = SM90_CUTLASS_MIN_M[bits]
    if m >= lim:
        cfg = cutlass_gemm.default_config(m, n, k, sm_count)
        return Choice("cutlass", cfg, f"sm_90 rule: INT{bits}, M={m} >= {lim}")
    return Choice("triton", "", f"sm_90 rule: INT{bits}, M={m} < {lim}")


def _table_choice(table: Table, bits: int, m: int, n: int, k: int) -> Choice | None:
    e = table.lookup(bits, m, n, k)
    if e is None:
        return None
    where = f"M={e['m']} N={e['n']} K'={e['k']}"
    exact = (e["m"], e["n"], e["k"]) == (m, n, k)
    ms = e.get("ms") or {}
    times = ""
    if ms.get("triton") and ms.get("cutlass"):
        times = f", {1e3 * ms['triton']:.0f} vs {1e3 * ms['cutlass']:.0f} us"
    src = f"table {table.arch or table.device}: {'this shape' if exact else 'nearest ' + where}{times}"
    return Choice(e["impl"], e.get("config") or "", src)   # the best CUTLASS config, even where Triton won


def decide(bits: int, m: int, n: int, k: int, out_dtype: torch.dtype, info: DeviceInfo,
           mode: str | None = None, layout_ok: bool = True) -> Choice:
    """The GEMM kernel for an [m, k] x [n, k] problem (k unpacked) on the device `info`, and why.
    Pure (no build): whether CUTLASS can actually be built is `cutlass_gemm.unavailable_reason`'s
    business; `choose` checks it and falls back to Triton with a warning."""
    from fq_compile.kernels.cutlass import gemm as cutlass_gemm

    mode = mode or current_mode()
    if not info.is_cuda:
        return Choice("reference", "", "CPU")
    if mode == "triton":
        return Choice("triton", "", "forced (FQ_GEMM / options['gemm'])")
    if info.capability != (9, 0):
        return Choice("triton", "", f"{info.arch}: the CUTLASS kernels are sm_90a (Hopper) code")
    if not cutlass_gemm.shape_supported(n, k, out_dtype):
        return Choice("triton", "", f"shape N={n}, K'={k} ({out_dtype}) not supported by the CUTLASS kernels")
    if not layout_ok:
        return Choice("triton", "", "operands not readable in place by TMA (a copy would cost more)")
    table = load_table()
    picked = None
    if table is not None and table.applies_to(info):
        picked = _table_choice(table, bits, m, n, k)
    if picked is None:
        picked = sm90_rule(bits, m, n, k, info.sm_count)
    config = picked.config if picked.config in cutlass_gemm.CONFIGS else ""
    if mode == "cutlass":
        config = config or cutlass_gemm.default_config(m, n, k, info.sm_count)
        return Choice("cutlass", config, "forced (FQ_GEMM / options['gemm'])")
    if picked.impl != "cutlass":
        return Choice(picked.impl, "", picked.why)
    return Choice("cutlass", config or cutlass_gemm.default_config(m, n, k, info.sm_count), picked.why)


def cutlass_instances(out_dtype: torch.dtype, acts=("none",), info: DeviceInfo | None = None) -> list[tuple]:
    """The CUTLASS instances [(config, out_dtype, act)] `decide` can pick on this device for one
    output dtype: the rule's configs and the table's (the build on first use makes just these)."""
    from fq_compile.kernels.cutlass import gemm as cutlass_gemm

    configs = set(cutlass_gemm.RULE_CONFIGS)
    table = load_table()
    if table is not None and (info is None or table.applies_to(info)):
        configs |= {c for c in table.configs() if c in cutlass_gemm.CONFIGS}
    return [(c, out_dtype, a) for c in sorted(configs) for a in dict.fromkeys(acts)]


def size_hint(v) -> int | None:
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
    s_last, off = size_hint(t.stride(-1)), size_hint(t.storage_offset())
    if s_last is None or off is None or off % 16 or (s_last != 1 and size_hint(t.shape[-1]) != 1):
        return False
    if t.dim() == 2:
        s0 = size_hint(t.stride(0))
        return s0 is not None and s0 % 16 == 0
    return t.is_contiguous() and (size_hint(t.shape[-1]) or 0) % 16 == 0


def _cutlass_ready(device: torch.device, out_dtype: torch.dtype, act: str = "none") -> bool:
    """Build/load the CUTLASS instances this dtype can need (first call: about a minute, in
    parallel); False (warned once) if they cannot be."""
    from fq_compile.kernels.cutlass import gemm as cutlass_gemm
    try:
        reason = cutlass_gemm.unavailable_reason(device)
        if reason is not None:
            raise cutlass_gemm.CutlassUnavailable(reason)
        cutlass_gemm.ensure(cutlass_instances(out_dtype, (act,), device_info(device)))
        return True
    except cutlass_gemm.CutlassUnavailable as e:
        slow = " (on a Hopper GPU, prefill then runs slower than it could, possibly slower than fp16: " \
               "install nvidia-cutlass and a CUDA toolkit with nvcc)" if _is_hopper(device) else ""
        _warn_once("cutlass", f"CUTLASS GEMMs unavailable, using Triton: {e}{slow}")
        return False


def _is_hopper(device) -> bool:
    try:
        return device_info(device).capability == (9, 0)
    except Exception:
        return False


def prefetch_cutlass(device, pairs) -> None:
    """Start building, in the background, the CUTLASS instances for (out_dtype, act) pairs that a
    graph about to be compiled will use; the trace-time `choose` then waits only for what is left.
    Silent when CUTLASS cannot be built here (`choose` warns)."""
    from fq_compile.kernels.cutlass import gemm as cutlass_gemm

    info = device_info(device)
    if info.capability != (9, 0) or cutlass_gemm.unavailable_reason(device) is not None:
        return
    items = [i for dt, act in dict.fromkeys(pairs) for i in cutlass_instances(dt, (act,), info)]
    try:
        cutlass_gemm.prefetch(items)
    except cutlass_gemm.CutlassUnavailable:
        pass


def choose(bits: int, xq: torch.Tensor, wq: torch.Tensor, out_dtype: torch.dtype, act: str = "none") -> Choice:
    """The kernel for these operands (decide() on their shapes and device, then the build check)."""
    if current_mode() == "triton" or not _device_ok(xq):
        return Choice("triton", "", "forced" if current_mode() == "triton" else "not a CUDA tensor")
    k = size_hint(xq.shape[-1])
    n = size_hint(wq.shape[0])
    m = 1
    for d in xq.shape[:-1]:
        h = size_hint(d)
        m = None if (m is None or h is None) else m * h
    if None in (m, n, k) or m == 0:
        return Choice("triton", "", "unknown or empty shape")
    if bits == 4:
        k *= 2
    layout_ok = bits == 4 or (_rows_tma_ok(xq) and _rows_tma_ok(wq))
    info = device_info(xq.device)
    c = decide(bits, m, n, k, out_dtype, info, layout_ok=layout_ok)
    if c.impl == "cutlass" and not all(isinstance(d, int) for d in xq.shape[:-1]):
        # dynamic rows: the implementation is chosen at the hint, the tile config at every call
        c = Choice("cutlass", "", c.why + f" (at the hint M={m}; tile config per call)")
    if current_mode() == "cutlass" and c.impl != "cutlass" and info.capability != (9, 0):
        _warn_once("cutlass-arch", f"{ENV}=cutlass ignored on {info.describe()}: {c.why}; using Triton")
    if c.impl == "cutlass" and not _cutlass_ready(xq.device, out_dtype, act):
        return Choice("triton", "", "CUTLASS unavailable")
    return c if c.impl in ("triton", "cutlass") else Choice("triton", "", c.why)


def select(name: str, xq: torch.Tensor, wq: torch.Tensor, out_dtype: torch.dtype, act: str = "none"):
    """int_gemm's hook: the CUTLASS implementation when `choose` picks it, else None (the
    registered Triton kernel, or the reference off CUDA)."""
    bits = 8 if name == "int8_linear" else 4
    c = choose(bits, xq, wq, out_dtype, act)
    if c.impl != "cutlass":
        return None
    return functools.partial(_run_cutlass, bits=bits, config=c.config, act=act)


@functools.lru_cache(maxsize=4096)
def runtime_config(bits: int, m: int, n: int, k: int, out_dtype: torch.dtype, index: int) -> str:
    """The CUTLASS tile config for a call whose rows were not known when it was compiled (dynamic
    shapes): the table's (or the rule's) config at this M."""
    return decide(bits, m, n, k, out_dtype, _cuda_info(index), mode="cutlass").config


def _run_cutlass(xq, wq, scale, bias, out_dtype, *, bits, config, act="none", row_scale=None):
    return torch.ops.fq.cutlass_int_linear(xq, wq, scale, bias, out_dtype, bits, config, act, row_scale)


# ------------------------------------------------------------------------------------------------
# the activation quantize
# ------------------------------------------------------------------------------------------------

def decide_quantize(info: DeviceInfo, producer: str, fusable: bool, mode: str | None = None) -> Choice:
    """How to quantize an activation whose producer is `producer` (a short description from
    passes/lower.py) that Inductor can (`fusable`) or cannot fuse with: 'fused' (the aten
    decomposition, fused into the producer's kernel) or 'kernel' (our Triton kernel on CUDA, the
    reference op on the CPU)."""
    mode = mode or quantize_mode()
    kernel = "kernel" if info.is_cuda else "reference"
    if mode == "kernel":
        return Choice(kernel, "", f"{QUANTIZE_ENV}=kernel")
    if mode == "fused":
        return Choice("fused", gather_mode(producer), f"{QUANTIZE_ENV}=fused, into {producer}")
    if fusable:
        return Choice("fused", gather_mode(producer), f"into {producer}")
    return Choice(kernel, "", f"nothing to fuse with: {producer}")


def gather_mode(producer: str) -> str:
    """How the fused quantize reads its input (`flatten_quantize_decomposed`'s `direct`): "gather",
    every position through the channel map, so the producer has one consumer and is never written
    out, for every producer.  Measured on the CPU's Inductor code: reading the original channels as a
    slice beside the gather makes two consumers, and Inductor then writes out a LayerNorm's output
    (it reads more than `realize_reads_threshold` inputs) and concatenates the parts with a copy.
    benchmarks/kernel_bench.py --fusion times both forms on the GPU; FQ_QUANTIZE_READ=slice turns
    the slice form on for every producer (to time whole models with it, benchmarks/e2e.py)."""
    v = parse_mode(os.environ.get(READ_ENV), READ_ENV, ("auto", "gather", "slice"))
    return "gather" if v == "auto" else v
