"""Activation smooth + flatten (Eq. 3) + per-tensor quantize, as one op: `fq::flatten_quantize`.

The flattened activation is described per output position p by four constants computed at plan
time (the plan's channel map, see `fq_compile.planning.flatten.channel_map`):

    src[p]  which input channel feeds position p (extra channels repeat their source channel)
    mult[p] 1 / (smoothing scale of src[p] * activation scale): moves x into quantized units
    lo[p], hi[p]  the slice of |x| this position carries, in quantized units (lo an integer)

and the integer result is, with a = |x[..., src[p]]| * mult[p] (one float32 multiply):

    n    = rint(min(a, lo[p] + min(hi[p], qmax)))          the value rounded once, to an integer
    q[p] = sign(x[src[p]]) * max(n - lo[p], 0)             the integer's slice [lo, lo + qmax]

For a channel flattened into E extra channels, the extra positions carry slices [i*qmax, (i+1)*qmax]
(lo = i*qmax, hi = qmax: the paper's T, ..., T) and the original position carries the remainder
(lo = E*qmax, hi = inf: Eq. 3's X mod T), so the slices of a value add up to exactly its rounded
integer rint(a) (up to the saturation below): flattening adds no rounding of its own.  A value beyond
the calibrated range saturates the remainder at qmax (never wraps).  Unflattened channels have lo = 0,
hi = inf; padding positions have mult = 0.  Rounding is half-to-even (torch.round, CUDA rint).

Why round first, then slice: after the one multiply every step is integer arithmetic, so a kernel
(ours, or code Inductor generates when it fuses this op into the op producing x) cannot change the
result by contracting a multiply and a subtraction into an FMA: only a = |x| * mult must be
rounded as float32, and an absolute value sits between it and anything before it.

Two forms of the op:
  fq::flatten_quantize        opaque: our Triton kernel on CUDA, the reference on the CPU.
  fq::flatten_quantize_fused  the same integers as plain aten ops (`flatten_quantize_decomposed`,
                              registered CompositeImplicitAutograd), so that torch.compile traces
                              through it and Inductor fuses it into the kernel of the op producing x
                              (a LayerNorm, a ReLU, SiLU(gate) * up, a residual add, a transpose copy):
                              x is then never written and read back between the two.  Every position,
                              outlier slices included, is read from x where it lies, through an
                              indexed load inside the same kernel: no copy of x is materialised.
The dispatcher (kernels/dispatch.py `decide_quantize`) picks one per activation when a graph is
rewritten (passes/lower.py).

Per-token scales (`fq::flatten_quantize_rows`, Config.activation_scale="token"): the channel map stays
static (smoothing, T, E_j from calibration), but each row m gets its own threshold instead of T:

    r[m]   = max_c fl(|x[m, c]| * rmult[c])       rmult[c] = 1 / (s_c * (E_c + 1)): the largest slice
    inv[m] = fl(qmax / r[m])  (0 where r[m] = 0)  one correctly rounded division
    a      = fl(fl(|x[m, src[p]]| * mult[p]) * inv[m])     mult[p] = 1 / s_src[p] (0 on padding)

then the same rint / slice steps.  Every slice of every channel then holds at most qmax (up to the
rounding of a): a value beyond the calibrated range never saturates, it moves the row's scale.  The
op returns the integers and r [...] (float32); the GEMM's epilogue multiplies each row by r[m]
(int_gemm.py: `row_scale`) and each column by weight_scale[n] / qmax.  The division is the one step
a compiler could round differently: our kernels use a correctly rounded division (libdevice div_rn),
and the backend asks Inductor for the same (`eager_numerics.division_rounding`, backend.py).
The max is exact in any order, so r has the same bits wherever it is computed (Inductor's kernel, ours,
the decode op's own).
"""

from __future__ import annotations

import torch
from torch.library import custom_op

from fq_compile.kernels.packing import INT4_MAX, pack_int4
from fq_compile.kernels.registry import define_op

QMAX = {8: 127, 4: INT4_MAX}


def flatten_quantize_reference(x: torch.Tensor, src: torch.Tensor, mult: torch.Tensor, lo: torch.Tensor,
                               hi: torch.Tensor, bits: int, inv: torch.Tensor | None = None) -> torch.Tensor:
    """The integer semantics every kernel reproduces: [..., C] float -> [..., K'] int8 (bits=8) or
    [..., K'/2] packed uint8 (bits=4).  inv: the per-row multipliers of per-token scales ([M] float32,
    `row_inverse`), applied as a second rounded multiply; None for the static per-tensor scale.

    The module docstring's formula, one float32 operation at a time (each rounded, no FMA), written
    in place on one buffer: it is also the CPU implementation, and allocating a tensor per step
    costs the CPU more than the arithmetic."""
    qmax = QMAX[bits]
    rows = x.reshape(-1, x.shape[-1])                  # a 2-D gather is the fast one
    g = rows.index_select(1, src.to(torch.int64)).float()
    a = g.abs().mul_(mult)                             # the one float32 multiply (static scale)
    if inv is not None:
        a.mul_(inv.reshape(-1, 1))                     # per-token: the row's multiplier, rounded again
    torch.minimum(a, lo + hi.clamp_max(float(qmax)), out=a)
    q = a.round_().sub_(lo).clamp_min_(0.0).copysign_(g).to(torch.int8)   # sign(x) * slice; -0 -> 0
    q = q.view(*x.shape[:-1], q.shape[-1])
    return pack_int4(q) if bits == 4 else q


def row_absmax(x: torch.Tensor, rmult: torch.Tensor) -> torch.Tensor:
    """r [...] = max over the last dim of fl(|x| * rmult) in float32 (the row's largest slice)."""
    return (x.float().abs() * rmult.float()).amax(dim=-1)


def row_inverse(r: torch.Tensor, bits: int) -> torch.Tensor:
    """inv = fl(qmax / r), 0 where r is 0 (an all-zero row quantizes to zeros).  A tensor divided by
    a tensor: `qmax / r` with a Python number would be computed as reciprocal(r) * qmax, two
    roundings, where the kernels divide once."""
    return torch.where(r > 0, torch.full_like(r, float(QMAX[bits])) / r, torch.zeros_like(r))


def flatten_quantize_rows_reference(x: torch.Tensor, src: torch.Tensor, mult: torch.Tensor, lo: torch.Tensor,
                                    hi: torch.Tensor, rmult: torch.Tensor, bits: int):
    """Per-token scales (module docstring): (the integers as `flatten_quantize_reference`, r [...])."""
    r = row_absmax(x, rmult)
    return flatten_quantize_reference(x, src, mult, lo, hi, bits, inv=row_inverse(r, bits)), r


def _out_shape(x, src, bits):
    k = src.shape[0]
    return (*x.shape[:-1], k // 2 if bits == 4 else k), (torch.uint8 if bits == 4 else torch.int8)


def _check(x, src, mult, lo, hi, bits):
    torch._check(bits in (4, 8), lambda: f"flatten_quantize: bits must be 4 or 8, got {bits}")
    torch._check(src.dim() == 1 and mult.shape == src.shape and lo.shape == src.shape and hi.shape == src.shape,
                 lambda: "flatten_quantize: src/mult/lo/hi must be 1-D of equal length")
    torch._check(bits == 8 or src.shape[0] % 2 == 0, lambda: "flatten_quantize: INT4 needs an even channel count")


def _check_rows(x, rmult):
    torch._check(rmult.dim() == 1 and rmult.shape[0] == x.shape[-1] and rmult.dtype == torch.float32,
                 lambda: f"flatten_quantize_rows: rmult must be float32 [C={x.shape[-1]}], got {rmult.dtype} "
                         f"{tuple(rmult.shape)}")


@custom_op("fq::flatten_quantize_reference", mutates_args=())
def _flatten_quantize_ref_op(x: torch.Tensor, src: torch.Tensor, mult: torch.Tensor, lo: torch.Tensor,
                             hi: torch.Tensor, bits: int) -> torch.Tensor:
    _check(x, src, mult, lo, hi, bits)
    return flatten_quantize_reference(x, src, mult, lo, hi, bits)


@_flatten_quantize_ref_op.register_fake
def _(x, src, mult, lo, hi, bits):
    _check(x, src, mult, lo, hi, bits)
    shape, dtype = _out_shape(x, src, bits)
    return x.new_empty(shape, dtype=dtype)


@custom_op("fq::flatten_quantize_rows_reference", mutates_args=())
def _flatten_quantize_rows_ref_op(x: torch.Tensor, src: torch.Tensor, mult: torch.Tensor, lo: torch.Tensor,
                                  hi: torch.Tensor, rmult: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    _check(x, src, mult, lo, hi, bits)
    _check_rows(x, rmult)
    return flatten_quantize_rows_reference(x, src, mult, lo, hi, rmult, bits)


def _rows_fake(x, src, bits):
    shape, dtype = _out_shape(x, src, bits)
    return x.new_empty(shape, dtype=dtype), x.new_empty(x.shape[:-1], dtype=torch.float32)


@_flatten_quantize_rows_ref_op.register_fake
def _(x, src, mult, lo, hi, rmult, bits):
    _check(x, src, mult, lo, hi, bits)
    _check_rows(x, rmult)
    return _rows_fake(x, src, bits)


# The GPU kernel registry: callables that launch the CUDA implementations through
# torch.library.wrap_triton (register_cuda_impl, called by fq_compile/kernels/__init__.py):
# "flatten_quantize" (x, src, mult, lo, hi, bits) -> Tensor and
# "flatten_quantize_rows" (x, src, mult, lo, hi, rmult, bits) -> (Tensor, Tensor).
CUDA_IMPL = {}


def register_cuda_impl(fn, rows=None) -> None:
    CUDA_IMPL["flatten_quantize"] = fn
    if rows is not None:
        CUDA_IMPL["flatten_quantize_rows"] = rows


def direct_prefix(src: torch.Tensor, bits: int) -> int:
    """How many leading positions read their own channel (src[p] == p), even for INT4 (whose bytes
    pair positions 2j, 2j+1): the slice `flatten_quantize_decomposed` reads without a gather."""
    s = src.to(torch.int64).cpu()
    same = s == torch.arange(s.numel())
    bad = torch.nonzero(~same)
    n = int(bad[0]) if bad.numel() else s.numel()
    return n - n % 2 if bits == 4 else n


def _quantize_slice(g: torch.Tensor, mult: torch.Tensor, lo: torch.Tensor, cap: torch.Tensor,
                    inv: torch.Tensor | None = None) -> torch.Tensor:
    """The op's integer semantics on gathered values g (any float dtype) as float32 integers; inv:
    per-token multipliers over g's leading dims (None: static scale)."""
    g = g.float()
    a = g.abs() * mult
    if inv is not None:
        a = a * inv.unsqueeze(-1)
    n = torch.round(torch.minimum(a, cap))
    q = (n - lo).clamp_min(0.0)
    return torch.where(g < 0, -q, q)


def flatten_quantize_decomposed(x: torch.Tensor, src: torch.Tensor, mult: torch.Tensor, lo: torch.Tensor,
                                hi: torch.Tensor, bits: int, direct: int, inv: torch.Tensor | None = None) -> torch.Tensor:
    """`flatten_quantize_reference`'s integers, written for Inductor to fuse (module docstring).

    direct = 0 (what the backend emits) reads every position through the channel map with one
    indexed load, so x has one consumer and Inductor computes x's producer inside this kernel and
    never writes x out (with two consumers it writes out a producer that reads more than four inputs,
    such as a LayerNorm: `torch._inductor.config.realize_reads_threshold`).  direct > 0 reads the
    positions [0, direct), which must have src[p] == p (`direct_prefix`), as a plain slice (vector
    loads) and concatenates the gathered rest: a variant for benchmarks/kernel_bench.py --fusion.
    INT4 packs each byte from its positions 2j and 2j + 1, read separately (no int8 intermediate).
    inv: per-token multipliers (`flatten_quantize_rows_decomposed`)."""
    qmax = QMAX[bits]
    k = src.shape[0]
    torch._check(0 <= direct <= k and (bits == 8 or (k % 2 == 0 and direct % 2 == 0)),
                 lambda: f"flatten_quantize_fused: bad direct={direct} for {k} positions, INT{bits}")
    cap = lo + hi.clamp_max(float(qmax))
    lead = (None,) * (x.dim() - 1)

    def part(first: int, stop: int, step: int) -> torch.Tensor:
        """Positions first, first + step, ... < stop, quantized (float32 integers)."""
        sl = slice(first, stop, step)
        if stop <= direct:
            g = x[..., sl]
        else:
            g = torch.ops.aten._unsafe_index(x, [*lead, src[sl].to(torch.int64)])
        return _quantize_slice(g, mult[sl], lo[sl], cap[sl], inv)

    parts = []
    for a, b in ((0, direct), (direct, k)):
        if b > a:       # each part cast before any cat: a realized cat then holds int8, not float32
            if bits == 8:
                parts.append(part(a, b, 1).to(torch.int8))
            else:
                low = part(a, b, 2).to(torch.int32) & 0xF
                high = part(a + 1, b, 2).to(torch.int32) & 0xF
                parts.append((low | (high << 4)).to(torch.uint8))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


def flatten_quantize_rows_decomposed(x: torch.Tensor, src: torch.Tensor, mult: torch.Tensor, lo: torch.Tensor,
                                     hi: torch.Tensor, rmult: torch.Tensor, bits: int, direct: int):
    """`flatten_quantize_rows_reference` as aten ops for Inductor: the row maximum is a reduction over
    the same x the quantize reads, which Inductor fuses into one kernel with x's producer."""
    r = row_absmax(x, rmult)
    return flatten_quantize_decomposed(x, src, mult, lo, hi, bits, direct, inv=row_inverse(r, bits)), r


_lib = torch.library.Library("fq", "FRAGMENT")
_lib.define("flatten_quantize_fused(Tensor x, Tensor src, Tensor mult, Tensor lo, Tensor hi, int bits, int direct) "
            "-> Tensor")
_lib.impl("flatten_quantize_fused", flatten_quantize_decomposed, "CompositeImplicitAutograd")
_lib.define("flatten_quantize_rows_fused(Tensor x, Tensor src, Tensor mult, Tensor lo, Tensor hi, Tensor rmult, "
            "int bits, int direct) -> (Tensor, Tensor)")
_lib.impl("flatten_quantize_rows_fused", flatten_quantize_rows_decomposed, "CompositeImplicitAutograd")


@define_op("fq::flatten_quantize", mutates_args=())
def flatten_quantize(x: torch.Tensor, src: torch.Tensor, mult: torch.Tensor, lo: torch.Tensor,
                     hi: torch.Tensor, bits: int) -> torch.Tensor:
    """Smooth + flatten + quantize one activation tensor (see the module docstring)."""
    impl = CUDA_IMPL.get("flatten_quantize")
    if impl is not None and x.is_cuda:
        return impl(x, src, mult, lo, hi, bits)
    return torch.ops.fq.flatten_quantize_reference(x, src, mult, lo, hi, bits)


@flatten_quantize.register_fake
def _(x, src, mult, lo, hi, bits):
    _check(x, src, mult, lo, hi, bits)
    shape, dtype = _out_shape(x, src, bits)
    return x.new_empty(shape, dtype=dtype)


@define_op("fq::flatten_quantize_rows", mutates_args=())
def flatten_quantize_rows(x: torch.Tensor, src: torch.Tensor, mult: torch.Tensor, lo: torch.Tensor,
                          hi: torch.Tensor, rmult: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Smooth + flatten + quantize with per-token scales: (integers, r) (see the module docstring)."""
    impl = CUDA_IMPL.get("flatten_quantize_rows")
    if impl is not None and x.is_cuda:
        return impl(x, src, mult, lo, hi, rmult, bits)
    return torch.ops.fq.flatten_quantize_rows_reference(x, src, mult, lo, hi, rmult, bits)


@flatten_quantize_rows.register_fake
def _(x, src, mult, lo, hi, rmult, bits):
    _check(x, src, mult, lo, hi, bits)
    _check_rows(x, rmult)
    return _rows_fake(x, src, bits)
