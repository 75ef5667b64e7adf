"""Kernels: one family per file.  Importing this package registers the `fq::` ops.

Each op has a CPU reference implementation that defines its integer semantics; GPU kernels plug
into the same op names (see CUDA_IMPL in each module)."""

from . import flatten_quantize, int_gemm, packing  # noqa: F401  (registers torch.ops.fq.*)
from .flatten_quantize import flatten_quantize_reference
from .int_gemm import int_matmul_reference, quant_linear_reference
from .packing import pack_int4, unpack_int4

try:  # Triton CUDA implementations fill the CUDA_IMPL registries; absent Triton, the references serve
    from . import triton_flatten_quantize, triton_gemm  # noqa: F401
except ImportError:  # pragma: no cover - CPU-only installs without triton
    pass

# Per-shape choice between the Triton and CUTLASS GEMMs (FQ_GEMM, backend option "gemm"); defines
# fq::cutlass_int_linear, whose extension is only built on first use on a Hopper GPU.
from . import gemm_dispatch  # noqa: E402,F401

__all__ = ["flatten_quantize_reference", "int_matmul_reference", "quant_linear_reference", "pack_int4", "unpack_int4"]
