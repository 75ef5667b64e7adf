"""Flatten + quantize + INT8/INT4 linear as one op, for decode: `fq::flat_linear`.

    y = fq.int{bits}_linear(fq.flatten_quantize(x, src, mult, lo, hi, bits), wq, scale, bias, out_dtype)

exactly (the CPU reference is those two references composed); with per-token scales (rmult given)

    xq, r = fq.flatten_quantize_rows(x, src, mult, lo, hi, rmult, bits)
    y = fq.int{bits}_linear(xq, wq, scale, bias, out_dtype, row_scale=r)

Why one op: at decode sizes
(M <= DECODE_MAX_M rows, M = batch at one token per step) a linear layer only streams its weight,
and the activation is a vector of K values per row; the flatten + quantize is a per-element
operation on those values (gather x[src[p]], |x| * mult, round once, slice: flatten_quantize.py),
so the GEMM kernel can do it in its prologue, in registers, instead of a separate kernel writing
the quantized activation to memory and the GEMM reading it back (two launches and a round trip per
layer, per token).  Whether that wins is measured, not assumed: on CUDA, for M <= DECODE_MAX_M the
op runs whichever candidate the tuner timed fastest for the shape (kernels/triton/decode.py: the
fused weight-streaming kernel, the same kernel on an activation quantized once, with tensor-core or,
at M <= 4, CUDA-core products, and flatten_quantize + the GEMM), and flatten_quantize + the GEMM
above, so it is correct at every size.

The quantized activation may come in as operands too: `xq` (the integers) and, with per-token scales,
`r` (the row maxima), as flatten_quantize(_rows) returns them: both or neither.  The lowering computes both with the
fused quantize (Inductor's code for it, beside the LayerNorm or ReLU that makes x: once per input, q/k/v
share it), and the op's variants that multiply a quantized activation read them
instead of launching a quantize per call (on the H100 the per-call row maxima alone took 7 us a call,
2 ms of each OPT-13B decode step: benchmarks/results/decode-host-fq-O3-13b-2026-12-07-h100.md); the
fused variant reads x, as before.  The caller promises xq and r are x's: every path gives the same bits.

The op is opaque to Inductor (a plain custom op, not a triton_op): the choice between the two paths
is made at run time, not baked into compiled code with a guard, and the fused kernel's split-K
workspace can live outside the graph (see decode.py).  Inductor still fuses everything around it;
under CUDA graphs (decode with a static cache) the op's Python dispatch is not replayed.

The lowering (passes/lower.py) uses it for graphs whose linears see at most DECODE_MAX_M rows;
larger graphs keep one flatten_quantize per input shared by its linears (q/k/v), and the GEMM ops.
`FQ_DECODE_MAX_M=0` turns the fused op off in the lowering (for side-by-side measurements).
"""

from __future__ import annotations

import os

import torch
from torch.library import custom_op

from fq_compile.kernels.flatten_quantize import _check as _check_fq
from fq_compile.kernels.flatten_quantize import _check_rows, flatten_quantize_reference, flatten_quantize_rows_reference
from fq_compile.kernels.int_gemm import quant_linear_reference

DECODE_MAX_M = 64


def decode_max_m() -> int:
    """Rows up to which the lowering uses fq::flat_linear (FQ_DECODE_MAX_M overrides; 0: never)."""
    v = os.environ.get("FQ_DECODE_MAX_M", "").strip()
    if not v:
        return DECODE_MAX_M
    try:
        m = int(v)
    except ValueError:
        raise ValueError(f"FQ_DECODE_MAX_M={v!r} is not an integer") from None
    if not 0 <= m <= DECODE_MAX_M:
        raise ValueError(f"FQ_DECODE_MAX_M must lie in [0, {DECODE_MAX_M}], got {m}")
    return m


def flat_linear_reference(x, src, mult, lo, hi, bits: int, wq, scale, bias, out_dtype, rmult=None,
                          r=None, xq=None) -> torch.Tensor:
    """The definition: flatten_quantize(_rows)_reference, then quant_linear_reference; xq and r: x's
    integers and row maxima when the caller has them (the same bits either way)."""
    if xq is None and rmult is None:
        xq = flatten_quantize_reference(x, src, mult, lo, hi, bits)
    elif xq is None:
        xq, r = flatten_quantize_rows_reference(x, src, mult, lo, hi, rmult, bits)
    return quant_linear_reference(xq, wq, scale, bias, bits, out_dtype, row_scale=r)


def _check(x, src, mult, lo, hi, bits, wq, scale, rmult=None, r=None, xq=None):
    _check_fq(x, src, mult, lo, hi, bits)
    if rmult is not None:
        _check_rows(x, rmult)
    dt = torch.uint8 if bits == 4 else torch.int8
    k = src.shape[0] // 2 if bits == 4 else src.shape[0]
    torch._check(r is None or (rmult is not None and xq is not None),
                 lambda: "flat_linear: r (the row maxima) comes with xq, under per-token scales (rmult)")
    torch._check(r is None or (r.dtype == torch.float32 and r.shape == x.shape[:-1]),
                 lambda: f"flat_linear: r must be float32 {tuple(x.shape[:-1])} (x's rows), got "
                         f"{r.dtype} {tuple(r.shape)}")
    if xq is not None:
        torch._check(xq.dtype == dt and xq.shape == (*x.shape[:-1], k),
                     lambda: f"flat_linear: xq must be {dt} {(*x.shape[:-1], k)} (x quantized), got {xq.dtype} "
                             f"{tuple(xq.shape)}")
        torch._check(rmult is None or r is not None,
                     lambda: "flat_linear: with per-token scales, xq needs its row maxima r")
    torch._check(wq.dtype == dt and wq.dim() == 2 and wq.shape[1] == k,
                 lambda: f"flat_linear: weight must be {dt} [N, {k}], got {wq.dtype} {tuple(wq.shape)}")
    torch._check(scale.dtype == torch.float32 and scale.dim() == 1 and scale.shape[0] == wq.shape[0],
                 lambda: f"flat_linear: scale must be float32 [N={wq.shape[0]}], got {scale.dtype} "
                         f"{tuple(scale.shape)}")


# The GPU implementation: (x, src, mult, lo, hi, bits, wq, scale, bias, out_dtype, rmult) -> Tensor, and a
# hook that reserves the fused kernel's workspace for weights of N outputs on a device before any
# CUDA graph capture (register_cuda_impl, called by fq_compile/kernels/__init__.py).
CUDA_IMPL = {}


def register_cuda_impl(fn, reserve=None) -> None:
    CUDA_IMPL["flat_linear"] = fn
    if reserve is not None:
        CUDA_IMPL["reserve"] = reserve


def reserve(device, n: int) -> None:
    """Make the fused kernel's workspace ready for N outputs on `device` (no-op off CUDA).  The
    lowering calls it at compile time: allocating inside a CUDA graph capture is not allowed."""
    fn = CUDA_IMPL.get("reserve")
    if fn is not None and torch.device(device).type == "cuda":
        fn(torch.device(device), n)


@custom_op("fq::flat_linear", mutates_args=())
def flat_linear(x: torch.Tensor, src: torch.Tensor, mult: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                bits: int, wq: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                out_dtype: torch.dtype, rmult: torch.Tensor | None = None,
                r: torch.Tensor | None = None, xq: torch.Tensor | None = None) -> torch.Tensor:
    """Smooth + flatten + quantize x and multiply by the quantized weight (module docstring);
    rmult: per-token scales (kernels/flatten_quantize.py), None: the static scale; xq, r: x quantized
    and its row maxima, if the caller computed them (the lowering does, fused into x's producer)."""
    _check(x, src, mult, lo, hi, bits, wq, scale, rmult, r, xq)
    impl = CUDA_IMPL.get("flat_linear")
    if impl is not None and x.is_cuda:
        return impl(x, src, mult, lo, hi, bits, wq, scale, bias, out_dtype, rmult=rmult, r=r, xq=xq)
    return flat_linear_reference(x, src, mult, lo, hi, bits, wq, scale, bias, out_dtype, rmult, r, xq)


@flat_linear.register_fake
def _(x, src, mult, lo, hi, bits, wq, scale, bias, out_dtype, rmult=None, r=None, xq=None):
    _check(x, src, mult, lo, hi, bits, wq, scale, rmult, r, xq)
    return x.new_empty((*x.shape[:-1], wq.shape[0]), dtype=out_dtype)
