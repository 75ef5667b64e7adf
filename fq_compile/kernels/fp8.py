"""FP8 (e4m3) linear layers: `fq::fp8_quantize`, `fq::fp8_linear`, `fq::w4a8_linear`.

`fq::fp8_quantize_fused` is the same quantize as plain aten ops (a multiply, a clamp, the cast), which
Inductor fuses into the activation's producer (a LayerNorm, ReLU, SiLU(gate) * up, ...), as naive FP8's
cast is: the activation is then never written in fp16 and read back.  The lowering emits it wherever
the flattened formats' quantize is fused (dispatch.decide_quantize); the opaque `fq::fp8_quantize`
(our Triton kernel on CUDA) where there is nothing to fuse with.  Both give the reference's bits.

The per-tensor static FP8 format (no flattening): activations scaled by one calibrated number and
rounded to e4m3; weights in e4m3 (`fp8_linear`) or int4 values packed two per byte (`w4a8_linear`:
W4A8, int4 values are exact e4m3 numbers, so both run on the FP8 tensor cores).

Activation (`fp8_quantize`), per element of x [..., C], with mult[c] = 1 / (smoothing scale of c *
activation scale) computed at plan time:

    a  = fl32(x * mult[c])                     one float32 multiply
    xq = e4m3(a)                               clamp to [-448, 448], then round to the nearest e4m3
                                               number, ties to even (subnormals: multiples of 2**-9)

Clamping before rounding saturates a value beyond the calibrated range at +-448 (never NaN: e4m3fn
has no infinity and its NaN would poison the sum); the sign of zero is kept.  NaN inputs are outside
the contract (calibration refuses them).

Linear, xq [..., K] e4m3, wq [N, K] (e4m3, or packed int4 [N, K/2]), scale float32 [N] (activation
scale times each output channel's weight scale), bias float32 [N] or None:

    acc[m, n] = fl32( sum_k xq[m, k] * wq[n, k] )          the exact sum, rounded once to float32
    y[m, n]   = fl32(acc * scale[n]) + bias[n]  -> out_dtype   (no FMA, as the integer GEMMs)

The reference computes the sum exactly in float64: a product of two e4m3 numbers is a multiple of
2**-18 below 448**2 < 2**17.7, so every partial sum of K <= 2**17 products is a multiple of 2**-18
below 2**35, which float64 holds exactly whatever the summation order.  The result is therefore
independent of the BLAS and of threads.  GPU kernels do not match it bit for bit: with float32
accumulation (float16 operands below sm_89) they agree within K * 2**-24 * sum_k |xq * wq|; on FP8
tensor cores (Hopper) the MMA keeps only about 14 bits of each partial sum and the float32
accumulator takes over every <= 128 products (cuBLAS with use_fast_accum=False, our Triton GEMM with
PROMOTE_K), about 1e-4 relative; the GPU tests check both.  The activation quantize is bit-exact on
every device.
"""

from __future__ import annotations

import torch
from torch.library import custom_op

from fq_compile.kernels.packing import unpack_int4
from fq_compile.kernels.registry import define_op

E4M3_MAX = 448.0
FP8_DTYPE = torch.float8_e4m3fn
MAX_K = 1 << 17          # float64 sums of e4m3 products stay exact up to here (module docstring)
FORMATS = ("fp8", "w4a8")   # the weight formats of this family: e4m3 [N, K] or packed int4 [N, K/2]


def round_e4m3(a: torch.Tensor) -> torch.Tensor:
    """float32 -> e4m3fn: clamp to +-448, then round to nearest, ties to even (torch's cast)."""
    return a.float().clamp(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE)


def fp8_quantize_reference(x: torch.Tensor, mult: torch.Tensor) -> torch.Tensor:
    """[..., C] float -> [..., C] float8_e4m3fn: e4m3(fl32(x * mult))."""
    return round_e4m3(x.float() * mult.float())


def weight_values(wq: torch.Tensor) -> torch.Tensor:
    """The weight operand's values as float64 [N, K]: e4m3 as is, packed int4 unpacked."""
    if wq.dtype == torch.uint8:
        return unpack_int4(wq).double()
    return wq.double()


def fp8_matmul_reference(xq: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
    """The exact sum of products, rounded once to float32: xq [M, K] e4m3, wq [N, K] e4m3 or packed."""
    return (xq.double() @ weight_values(wq).t()).float()


def fp8_linear_reference(xq: torch.Tensor, wq: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                         out_dtype: torch.dtype) -> torch.Tensor:
    lead = xq.shape[:-1]
    acc = fp8_matmul_reference(xq.reshape(-1, xq.shape[-1]), wq)
    y = acc * scale.float()
    if bias is not None:
        y = y + bias.float()
    n = wq.shape[0]
    return y.to(out_dtype).reshape(*lead, n)


def _check_linear(xq, wq, scale, fmt):
    torch._check(xq.dtype == FP8_DTYPE, lambda: f"{fmt}_linear expects float8_e4m3fn activations, got {xq.dtype}")
    want = FP8_DTYPE if fmt == "fp8" else torch.uint8
    torch._check(wq.dtype == want, lambda: f"{fmt}_linear expects {want} weights, got {wq.dtype}")
    k = wq.shape[1] * (2 if fmt == "w4a8" else 1)
    torch._check(wq.dim() == 2 and xq.shape[-1] == k,
                 lambda: f"{fmt}_linear: K mismatch, x {tuple(xq.shape)} vs w {tuple(wq.shape)}")
    torch._check(k <= MAX_K, lambda: f"{fmt}_linear: K={k} exceeds {MAX_K}, where the exact reference sum holds")
    torch._check(scale.dtype == torch.float32 and scale.dim() == 1 and scale.shape[0] == wq.shape[0],
                 lambda: f"{fmt}_linear: scale must be float32 [N={wq.shape[0]}], "
                         f"got {scale.dtype} {tuple(scale.shape)}")


def _check_quantize(x, mult):
    torch._check(mult.dim() == 1 and mult.shape[0] == x.shape[-1],
                 lambda: f"fp8_quantize: mult must be [C={x.shape[-1]}], got {tuple(mult.shape)}")


@custom_op("fq::fp8_quantize_reference", mutates_args=())
def _fp8_quantize_ref_op(x: torch.Tensor, mult: torch.Tensor) -> torch.Tensor:
    _check_quantize(x, mult)
    return fp8_quantize_reference(x, mult)


@custom_op("fq::fp8_linear_reference", mutates_args=())
def _fp8_linear_ref_op(xq: torch.Tensor, wq: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                       out_dtype: torch.dtype) -> torch.Tensor:
    _check_linear(xq, wq, scale, "fp8")
    return fp8_linear_reference(xq, wq, scale, bias, out_dtype)


@custom_op("fq::w4a8_linear_reference", mutates_args=())
def _w4a8_linear_ref_op(xq: torch.Tensor, wq: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                        out_dtype: torch.dtype) -> torch.Tensor:
    _check_linear(xq, wq, scale, "w4a8")
    return fp8_linear_reference(xq, wq, scale, bias, out_dtype)


# GPU implementations, keyed "fp8_quantize", "fp8_linear", "w4a8_linear" (register_cuda_impl, called
# by fq_compile/kernels/__init__.py); without one, the opaque reference op serves every device.
CUDA_IMPL = {}


def register_cuda_impl(name: str, fn) -> None:
    if name not in ("fp8_quantize", "fp8_linear", "w4a8_linear"):
        raise ValueError(f"unknown FP8 op {name!r}")
    CUDA_IMPL[name] = fn


@define_op("fq::fp8_quantize", mutates_args=())
def fp8_quantize(x: torch.Tensor, mult: torch.Tensor) -> torch.Tensor:
    """Scale (+ smooth) and round one activation tensor to e4m3 (module docstring)."""
    impl = CUDA_IMPL.get("fp8_quantize")
    if impl is not None and x.is_cuda:
        return impl(x, mult)
    return torch.ops.fq.fp8_quantize_reference(x, mult)


@define_op("fq::fp8_linear", mutates_args=())
def fp8_linear(xq: torch.Tensor, wq: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
               out_dtype: torch.dtype) -> torch.Tensor:
    """e4m3 x e4m3 GEMM with the per-channel dequantize(+bias) epilogue (module docstring)."""
    impl = CUDA_IMPL.get("fp8_linear")
    if impl is not None and xq.is_cuda:
        return impl(xq, wq, scale, bias, out_dtype)
    return torch.ops.fq.fp8_linear_reference(xq, wq, scale, bias, out_dtype)


@define_op("fq::w4a8_linear", mutates_args=())
def w4a8_linear(xq: torch.Tensor, wq: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                out_dtype: torch.dtype) -> torch.Tensor:
    """e4m3 activations x packed int4 weights (unpacked to e4m3 in registers), same epilogue."""
    impl = CUDA_IMPL.get("w4a8_linear")
    if impl is not None and xq.is_cuda:
        return impl(xq, wq, scale, bias, out_dtype)
    return torch.ops.fq.w4a8_linear_reference(xq, wq, scale, bias, out_dtype)


def _fp8_quantize_decomposed(x: torch.Tensor, mult: torch.Tensor) -> torch.Tensor:
    _check_quantize(x, mult)
    return fp8_quantize_reference(x, mult)


_lib = torch.library.Library("fq", "FRAGMENT")
_lib.define("fp8_quantize_fused(Tensor x, Tensor mult) -> Tensor")
_lib.impl("fp8_quantize_fused", _fp8_quantize_decomposed, "CompositeImplicitAutograd")

for _op in (_fp8_quantize_ref_op, fp8_quantize):
    @_op.register_fake
    def _(x, mult):
        _check_quantize(x, mult)
        return x.new_empty(x.shape, dtype=FP8_DTYPE)

for _op, _fmt in ((_fp8_linear_ref_op, "fp8"), (_w4a8_linear_ref_op, "w4a8"), (fp8_linear, "fp8"),
                  (w4a8_linear, "w4a8")):
    def _register(op=_op, fmt=_fmt):
        @op.register_fake
        def _(xq, wq, scale, bias, out_dtype):
            _check_linear(xq, wq, scale, fmt)
            return xq.new_empty((*xq.shape[:-1], wq.shape[0]), dtype=out_dtype)
    _register()
