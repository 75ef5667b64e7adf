"""Triton kernel for `fq::flatten_quantize`: smooth + flatten (Eq. 3) + per-tensor quantize in one
pass over the activation, registered as the op's CUDA implementation.

One program owns BLOCK_P output positions for ROW_ITERS * BLOCK_M rows: it loads the four
per-position constants once and reuses them for every row.  Blocks made only of original channels
(src[p] = p) read x with vectorized contiguous loads; blocks holding extra channels gather
x[row, src[p]], and run next to the direct blocks of the same rows so the gather hits L2.  The
output is int8 (or two positions packed per byte for INT4).  The input is read through its strides
as [B, T, C], so transposed or sliced activations need no copy.  How close it comes to a copy's
bandwidth, and how it compares with Inductor compiling the reference's aten ops: benchmarks/results/
kernels-*.md and benchmarks/NOTES-kernels.md.

Per-token scales (`fq::flatten_quantize_rows`) take the row maxima first.  Two forms: two launches
(row_absmax_kernel over x, then flatten_quantize_kernel over x again: DRAM reads x twice), and one
launch (rows_resident_kernel: a program sweeps its own rows twice, the second sweep from L2), chosen
by FQ_ROWS_KERNEL until the device has timed both on whole models (benchmarks/kernel_bench.py --fusion
has the column); the same bits either way.

Bit-exactness with `flatten_quantize_reference`: |g| * mult is one explicitly rounded multiply
(mul_rn), rounding is libdevice rint (half to even), and everything after it is integer arithmetic
(the op's semantics round first, then slice).  The Triton interpreter has no libdevice, so under
TRITON_INTERPRET=1 the same operations are written with plain numpy-backed float32 arithmetic and
the 2**23 add/subtract trick, exact for the clamped range [0, 2**22).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from fq_compile.kernels.triton.tuning import tuning

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

if _INTERPRET:
    @triton.jit
    def _mul_rn(a, b):
        return a * b

    @triton.jit
    def _div_rn(a, b):
        return a / b          # numpy float32 division: correctly rounded

    @triton.jit
    def _rint_small(v):
        # v in [0, 2**22): adding 2**23 leaves no fraction bits, so the FPU rounds half to even
        return (v + 8388608.0) - 8388608.0
else:
    from triton.language.extra import libdevice

    @triton.jit
    def _mul_rn(a, b):
        return libdevice.mul_rn(a, b)

    @triton.jit
    def _div_rn(a, b):
        return libdevice.div_rn(a, b)

    @triton.jit
    def _rint_small(v):
        return libdevice.rint(v)


@triton.jit
def _slice(a, g, lo, hi_q):
    """a = |g| in quantized units; hi_q is min(hi, qmax).  n = rint(min(a, lo + hi_q)) then
    q = max(n - lo, 0) with g's sign, as the reference: clamping before rounding keeps the value
    finite and below 2**22 for the 2**23 trick, and the integer subtraction after it is exact."""
    n = _rint_small(tl.minimum(a, lo + hi_q))
    q = tl.maximum(n - lo, 0.0).to(tl.int32)
    return tl.where(g < 0, -q, q)


@triton.jit
def _quantize_vals(g, mult, lo, hi_q):
    """g float32 gathered activations (any shape), per-position constants broadcast to it."""
    return _slice(_mul_rn(tl.abs(g), mult), g, lo, hi_q)


@triton.jit
def _quantize_rows(g, mult, inv, lo, hi_q):
    """Per-token scales: the row's multiplier inv (broadcast to g) is a second rounded multiply."""
    return _slice(_mul_rn(_mul_rn(tl.abs(g), mult), inv), g, lo, hi_q)


@triton.jit
def _row_inverse(r, QMAX: tl.constexpr):
    """inv = fl(qmax / r), 0 where r is 0 (kernels/flatten_quantize.py `row_inverse`)."""
    return tl.where(r > 0, _div_rn(tl.full(r.shape, QMAX, tl.float32), tl.where(r > 0, r, 1.0)), 0.0)


@triton.jit
def _row_offsets(row0, M, T, stride_xb, stride_xt, BLOCK_M: tl.constexpr):
    """BLOCK_M rows from row0 of x [B, T, C] (row m = b*T + t): (rows, in range, as int64, x offsets)."""
    rows = row0 + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    return rows, row_ok, rows64, (rows64 // T) * stride_xb + (rows64 % T) * stride_xt


@triton.jit
def _row_maxima(x_ptr, rmult_ptr, x_row, row_ok, C, stride_xc, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """r = max_c fl(|x[row, c]| * rmult[c]) over the rows at x offsets x_row (the max is exact in any order)."""
    r = tl.zeros([BLOCK_M], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        c_ok = cols < C
        x = tl.load(x_ptr + x_row[:, None] + cols[None, :].to(tl.int64) * stride_xc,
                    mask=row_ok[:, None] & c_ok[None, :], other=0.0)
        rm = tl.load(rmult_ptr + cols, mask=c_ok, other=0.0)
        r = tl.maximum(r, tl.max(_mul_rn(tl.abs(x.to(tl.float32)), rm[None, :]), 1))
    return r


@triton.jit
def row_absmax_kernel(x_ptr, rmult_ptr, r_ptr, M, T, C, stride_xb, stride_xt, stride_xc,
                      BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """r[m] = max_c fl(|x[m, c]| * rmult[c]) for BLOCK_M rows of x [B, T, C] (rows m = b*T + t): the
    per-token scales' first pass."""
    rows, row_ok, _, x_row = _row_offsets(tl.program_id(0) * BLOCK_M, M, T, stride_xb, stride_xt, BLOCK_M)
    tl.store(r_ptr + rows, _row_maxima(x_ptr, rmult_ptr, x_row, row_ok, C, stride_xc, BLOCK_M, BLOCK_C), mask=row_ok)


def _fq_configs():
    if _INTERPRET:  # the interpreter cannot time candidates
        return [triton.Config({"BLOCK_M": 2, "BLOCK_P": 32, "ROW_ITERS": 2}, num_warps=4)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_P": bp, "ROW_ITERS": it}, num_warps=w)
            for bm, bp, it, w in ((1, 2048, 16, 8), (2, 1024, 8, 4), (1, 1024, 16, 4), (2, 2048, 16, 8), (1, 512, 8, 4),
                                  (1, 128, 1, 4), (1, 256, 4, 4))]  # the last two: decode (M <= 16) needs programs


@triton.jit
def _positions(src_ptr, mult_ptr, lo_ptr, hi_ptr, cols, col_ok, BITS: tl.constexpr):
    """The output columns' flattened positions (INT4: 2j and 2j+1 as a trailing axis of size 2, split
    into the two nibbles) and their per-position constants; all_direct: every position reads its own
    channel (src[p] = p), so x can be read with contiguous loads."""
    if BITS == 8:
        pos = cols
        pos_ok = col_ok
    else:
        pos = cols[:, None] * 2 + tl.arange(0, 2)[None, :]
        pos_ok = col_ok[:, None]
    src = tl.load(src_ptr + pos, mask=pos_ok, other=0)
    mult = tl.load(mult_ptr + pos, mask=pos_ok, other=0.0)[None]
    lo = tl.load(lo_ptr + pos, mask=pos_ok, other=0.0)[None]
    hi_q = tl.minimum(tl.load(hi_ptr + pos, mask=pos_ok, other=0.0), 127.0 if BITS == 8 else 7.0)[None]
    all_direct = tl.min(tl.where((src == pos) | ~pos_ok, 1, 0)) == 1
    return pos, pos_ok, src, mult, lo, hi_q, all_direct


@triton.jit
def _quantize_block(x_ptr, out_ptr, x_row, rows64, row_ok, inv, offs, pos_ok, mult, lo, hi_q, cols, col_ok,
                    stride_om, BITS: tl.constexpr, HAS_ROW: tl.constexpr):
    """One block of output positions (x read at the per-position offsets offs) for the rows at x
    offsets x_row; HAS_ROW: with the rows' per-token multipliers inv."""
    if BITS == 8:
        g = tl.load(x_ptr + x_row[:, None] + offs[None], mask=row_ok[:, None] & pos_ok[None], other=0.0)
    else:
        g = tl.load(x_ptr + x_row[:, None, None] + offs[None], mask=row_ok[:, None, None] & pos_ok[None], other=0.0)
    if HAS_ROW:
        if BITS == 8:
            q = _quantize_rows(g.to(tl.float32), mult, inv[:, None], lo, hi_q)
        else:
            q = _quantize_rows(g.to(tl.float32), mult, inv[:, None, None], lo, hi_q)
    else:
        q = _quantize_vals(g.to(tl.float32), mult, lo, hi_q)
    out_ptrs = out_ptr + rows64[:, None] * stride_om + cols[None, :]
    out_mask = row_ok[:, None] & col_ok[None, :]
    if BITS == 8:
        tl.store(out_ptrs, q.to(tl.int8), mask=out_mask)
    else:
        q_lo, q_hi = tl.split(q)
        tl.store(out_ptrs, ((q_lo & 0xF) | ((q_hi & 0xF) << 4)).to(tl.uint8), mask=out_mask)


@triton.jit
def _rows(x_ptr, out_ptr, r_ptr, offs, ld_ok, mult, lo, hi_q, cols, col_ok, row0, M, T, stride_xb, stride_xt,
          stride_om, BITS: tl.constexpr, BLOCK_M: tl.constexpr, ROW_ITERS: tl.constexpr, HAS_ROW: tl.constexpr):
    """Quantize ROW_ITERS * BLOCK_M rows from row0 at the given per-position x offsets (HAS_ROW: with
    the per-token scales r_ptr holds)."""
    for it in range(ROW_ITERS):
        rows, row_ok, rows64, x_row = _row_offsets(row0 + it * BLOCK_M, M, T, stride_xb, stride_xt, BLOCK_M)
        inv = tl.zeros([BLOCK_M], tl.float32)      # unused without HAS_ROW
        if HAS_ROW:
            inv = _row_inverse(tl.load(r_ptr + rows, mask=row_ok, other=0.0), 127.0 if BITS == 8 else 7.0)
        _quantize_block(x_ptr, out_ptr, x_row, rows64, row_ok, inv, offs, ld_ok, mult, lo, hi_q, cols, col_ok,
                        stride_om, BITS, HAS_ROW)


@triton.jit
def flatten_quantize_kernel(x_ptr, src_ptr, mult_ptr, lo_ptr, hi_ptr, out_ptr, r_ptr,
                            M, T, C, P, M_BUCKET, stride_xb, stride_xt, stride_xc, stride_om,
                            BITS: tl.constexpr, X_CONTIG: tl.constexpr, HAS_ROW: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_P: tl.constexpr, ROW_ITERS: tl.constexpr):
    """x [B, T, C] (rows m = b*T + t) -> out [M, P] int8 (BITS=8) or [M, P] uint8 packed (BITS=4,
    P = K'/2, byte j holds positions 2j (low nibble) and 2j+1 (high nibble)).

    A program owns BLOCK_P output bytes for ROW_ITERS * BLOCK_M rows: the per-position constants
    are loaded once and reused for every row.  A block made only of original channels (src[p] = p;
    a flatten map puts them first, so most blocks) reads x with plain contiguous loads, which
    vectorize; other blocks gather through src.  Each branch runs its own row loop, so no tensor
    has to be carried across the branch in two layouts (that cost registers and occupancy)."""
    # column blocks of one row group run side by side, so a gather block finds its rows in L2 (read
    # there by the direct blocks) instead of a second DRAM pass
    num_p = tl.cdiv(P, BLOCK_P)
    pid_p = tl.program_id(0) % num_p
    pid_m = tl.program_id(0) // num_p
    cols = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    col_ok = cols < P
    pos, pos_ok, src, mult, lo, hi_q, all_direct = _positions(src_ptr, mult_ptr, lo_ptr, hi_ptr, cols, col_ok, BITS)
    row0 = pid_m * (ROW_ITERS * BLOCK_M)
    if all_direct:
        if X_CONTIG:
            offs = pos
        else:
            offs = pos * stride_xc
        _rows(x_ptr, out_ptr, r_ptr, offs, pos_ok, mult, lo, hi_q, cols, col_ok, row0, M, T, stride_xb, stride_xt,
              stride_om, BITS, BLOCK_M, ROW_ITERS, HAS_ROW)
    else:
        _rows(x_ptr, out_ptr, r_ptr, src * stride_xc, pos_ok, mult, lo, hi_q, cols, col_ok, row0, M, T, stride_xb,
              stride_xt, stride_om, BITS, BLOCK_M, ROW_ITERS, HAS_ROW)


@triton.jit
def rows_resident_kernel(x_ptr, src_ptr, mult_ptr, lo_ptr, hi_ptr, rmult_ptr, out_ptr, r_ptr,
                         M, T, C, P, M_BUCKET, stride_xb, stride_xt, stride_xc, stride_om,
                         BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """Per-token scales in one launch: a program owns BLOCK_M whole rows of x [B, T, C] and sweeps
    them twice, first for the row maxima r (from DRAM), then for the quantize (from L2, where the
    rows just were), so DRAM sees x once where the two-launch path (row_absmax_kernel, then
    flatten_quantize_kernel) reads it twice.  Same arithmetic as the two-launch path, so the same
    bits.  Blocks of original channels (src[p] = p) load contiguously; others gather."""
    rows, row_ok, rows64, x_row = _row_offsets(tl.program_id(0) * BLOCK_M, M, T, stride_xb, stride_xt, BLOCK_M)
    r = _row_maxima(x_ptr, rmult_ptr, x_row, row_ok, C, stride_xc, BLOCK_M, BLOCK_C)
    tl.store(r_ptr + rows, r, mask=row_ok)
    inv = _row_inverse(r, 127.0 if BITS == 8 else 7.0)
    for p0 in range(0, P, BLOCK_P):
        cols = p0 + tl.arange(0, BLOCK_P)
        col_ok = cols < P
        pos, pos_ok, src, mult, lo, hi_q, all_direct = _positions(src_ptr, mult_ptr, lo_ptr, hi_ptr, cols, col_ok,
                                                                   BITS)
        if all_direct:
            _quantize_block(x_ptr, out_ptr, x_row, rows64, row_ok, inv, pos.to(tl.int64) * stride_xc, pos_ok,
                            mult, lo, hi_q, cols, col_ok, stride_om, BITS, True)
        else:
            _quantize_block(x_ptr, out_ptr, x_row, rows64, row_ok, inv, src.to(tl.int64) * stride_xc, pos_ok,
                            mult, lo, hi_q, cols, col_ok, stride_om, BITS, True)


def _resident_configs():
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": 2, "BLOCK_C": 32, "BLOCK_P": 32}, num_warps=4)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_C": bc, "BLOCK_P": bp}, num_warps=w)
            for bm, bc, bp, w in ((1, 2048, 2048, 8), (1, 1024, 1024, 4), (2, 1024, 1024, 8), (4, 512, 512, 8),
                                  (1, 4096, 4096, 16))]


@functools.lru_cache(maxsize=None)
def _tuned_resident(tune: bool = True):
    configs = _resident_configs()
    return triton.autotune(configs=configs if tune else configs[:1], key=["M_BUCKET", "C", "P"])(rows_resident_kernel)


ROWS_ENV = "FQ_ROWS_KERNEL"     # the per-token quantize on CUDA: "two-pass" (default) | "resident"


@functools.lru_cache(maxsize=None)
def rows_kernel() -> str:
    """Which per-token quantize launches: "two-pass" (row_absmax_kernel then flatten_quantize_kernel,
    the default until the device has timed both; benchmarks/kernel_bench.py --fusion) or "resident"
    (rows_resident_kernel: one launch, x read once from DRAM).  Read once per process, not per call."""
    v = os.environ.get(ROWS_ENV, "").strip().lower() or "two-pass"
    if v not in ("two-pass", "resident"):
        raise ValueError(f"{ROWS_ENV}={v!r} must be 'two-pass' or 'resident'")
    return v


@functools.lru_cache(maxsize=None)
def _tuned(tune: bool = True):
    configs = _fq_configs()
    return triton.autotune(configs=configs if tune else configs[:1], key=["M_BUCKET", "P"])(flatten_quantize_kernel)


def _as_btc(x: torch.Tensor):
    """View x as [B, T, C] through strides (no copy unless > 3 dims that don't collapse)."""
    if x.dim() == 1:
        x = x.unsqueeze(0)
    if x.dim() == 2:
        x = x.unsqueeze(0)
    elif x.dim() > 3:
        x = x.reshape(-1, x.shape[-2], x.shape[-1])
    return x


def flatten_quantize_cuda(x, src, mult, lo, hi, bits):
    """CUDA implementation of fq::flatten_quantize (see module docstring)."""
    return _launch(x, src, mult, lo, hi, None, bits)[0]


def flatten_quantize_rows_cuda(x, src, mult, lo, hi, rmult, bits, resident: bool | None = None):
    """CUDA implementation of fq::flatten_quantize_rows: the row maxima first (one pass over x), then
    the quantize with each row's multiplier; returns (integers, r).  resident: one launch that keeps
    each row on chip between the two sweeps (rows_resident_kernel); None: as FQ_ROWS_KERNEL says."""
    if resident is None:
        resident = rows_kernel() == "resident"
    return _launch(x, src, mult, lo, hi, rmult, bits, resident)


def _launch(x, src, mult, lo, hi, rmult, bits, resident=False):
    k = src.shape[0]
    p = k // 2 if bits == 4 else k
    out_dtype = torch.uint8 if bits == 4 else torch.int8
    x3 = _as_btc(x)
    b, t, c = x3.shape
    if x3.stride(2) * c >= 2**31:  # per-position offsets are int32 in the kernel
        x3 = x3.contiguous()
    m = b * t
    out = torch.empty((*x.shape[:-1], p), dtype=out_dtype, device=x.device)
    r = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device) if rmult is not None else None
    if m == 0 or p == 0:
        if r is not None:
            r.zero_()
        return out, r
    m_bucket = min(triton.next_power_of_2(m), 4096)
    if r is not None and resident:
        def rgrid(meta):
            return (triton.cdiv(m, meta["BLOCK_M"]),)

        torch.library.wrap_triton(_tuned_resident(tuning()))[rgrid](
            x3, src, mult, lo, hi, rmult, out, r, m, t, c, p, m_bucket,
            x3.stride(0), x3.stride(1), x3.stride(2), p, BITS=bits)
        return out, r
    if r is not None:
        bm, bc = (2, 32) if _INTERPRET else (4, 512)
        torch.library.wrap_triton(row_absmax_kernel)[(triton.cdiv(m, bm),)](
            x3, rmult, r, m, t, c, x3.stride(0), x3.stride(1), x3.stride(2), BLOCK_M=bm, BLOCK_C=bc, num_warps=4)

    def grid(meta):
        return (triton.cdiv(p, meta["BLOCK_P"]) * triton.cdiv(m, meta["BLOCK_M"] * meta["ROW_ITERS"]),)

    torch.library.wrap_triton(_tuned(tuning()))[grid](
        x3, src, mult, lo, hi, out, r if r is not None else mult, m, t, c, p, m_bucket,
        x3.stride(0), x3.stride(1), x3.stride(2), p, BITS=bits, X_CONTIG=x3.stride(2) == 1, HAS_ROW=r is not None)
    return out, r
