"""Kernels: the `fq::` ops, one family per file, and their GPU implementations.

    flatten_quantize.py   fq::flatten_quantize: the op schema and its CPU reference (integer semantics),
                          and fq::flatten_quantize_fused, the same integers as aten ops Inductor fuses
    attention.py          fq::attention (INT8/FP8 flash attention) and fq::quantize_heads / dequantize_heads
    int_gemm.py           fq::int8_linear / fq::int4_linear: schemas and CPU references
    fp8.py                fq::fp8_quantize / fq::fp8_linear / fq::w4a8_linear: the FP8 (e4m3) family
    flat_linear.py        fq::flat_linear: flatten_quantize + GEMM as one op, for decode (M <= 64 rows)
    packing.py            the INT4 storage format (two values per byte)
    triton/               Triton kernels for both families (CUDA); attention: the generic kernel, and on sm_90
                          the Hopper prefill kernel for the calls attention_hopper.plan takes (FQ_ATTN_HOPPER);
                          quantize_heads: one launch in eager mode (heads.py)
    cutlass/              CUTLASS sm_90a GEMMs (fq::cutlass_int_linear), built on first use
    dispatch.py           the kernel choices, by architecture and shape: Triton or CUTLASS GEMMs
                          (FQ_GEMM, the table, the sm_90 rule), fused or opaque quantize (FQ_QUANTIZE)

Importing this package defines the ops and registers the GPU implementations explicitly (below):
no module changes another's state on import.  Without Triton, the CPU references serve every device.
"""

from fq_compile.kernels import attention, flat_linear, flatten_quantize, fp8, int_gemm, packing  # noqa: F401
from fq_compile.kernels.cutlass import gemm as _cutlass_gemm  # noqa: F401  (defines fq::cutlass_int_linear)
from fq_compile.kernels.flat_linear import flat_linear_reference
from fq_compile.kernels.flatten_quantize import flatten_quantize_reference
from fq_compile.kernels.int_gemm import int_matmul_reference, quant_linear_reference
from fq_compile.kernels.packing import pack_int4, unpack_int4
from fq_compile.kernels.registry import HAS_TRITON


def _register_gpu_implementations() -> None:
    from fq_compile.kernels import dispatch

    int_gemm.register_selector(dispatch.select)
    if not HAS_TRITON:  # pragma: no cover - CPU-only installs without triton
        return
    from fq_compile.kernels.triton import decode as triton_decode
    from fq_compile.kernels.triton import flatten_quantize as triton_flatten_quantize
    from fq_compile.kernels.triton import fp8 as triton_fp8
    from fq_compile.kernels.triton import gemm as triton_gemm

    flatten_quantize.register_cuda_impl(triton_flatten_quantize.flatten_quantize_cuda,
                                        rows=triton_flatten_quantize.flatten_quantize_rows_cuda)
    _register_attention()
    int_gemm.register_cuda_impl("int8_linear", triton_gemm.int8_linear_cuda)
    int_gemm.register_cuda_impl("int4_linear", triton_gemm.int4_linear_cuda)
    fp8.register_cuda_impl("fp8_quantize", triton_fp8.fp8_quantize_cuda)
    fp8.register_cuda_impl("fp8_linear", triton_fp8.fp8_linear_cuda)
    fp8.register_cuda_impl("w4a8_linear", triton_fp8.w4a8_linear_cuda)
    flat_linear.register_cuda_impl(triton_decode.flat_linear_cuda, reserve=triton_decode.reserve)


def _register_attention() -> None:
    from fq_compile.kernels.triton import attention as triton_attention
    from fq_compile.kernels.triton import heads as triton_heads

    attention.register_cuda_impl(triton_attention.attention_cuda,
                                 quantize_heads=(triton_heads.applies, triton_heads.quantize_heads_cuda))


_register_gpu_implementations()

__all__ = ["flat_linear_reference", "flatten_quantize_reference", "int_matmul_reference", "quant_linear_reference",
           "pack_int4", "unpack_int4"]
