"""INT8 and packed-INT4 linear layers: `fq::int8_linear`, `fq::int4_linear`.

    y[m, n] = act(float32(acc[m, n]) * scale[n] + bias[n])  -> out_dtype,   acc = xq @ wq.T exactly in int32
    y[m, n] = act(fl(float32(acc[m, n]) * row_scale[m]) * scale[n] + bias[n])     with per-token scales

xq is [..., K] (int8, or uint8 packed two per byte for INT4), wq is [N, K] in the same format
(nn.Linear's layout, K-major, which is what the INT8 tensor cores want for both operands).  scale is
a float32 vector [N]: the activation's per-tensor scale times each output channel's weight scale
(all equal for a per-tensor weight scale); a per-channel scale costs nothing in an integer GEMM,
since it is applied in the epilogue, while the activation side stays per tensor (what flattening is
for).  bias is float32 [N] or None.  The epilogue is one rounded float32 multiply, then the bias add
(never fused into an FMA), then act ("none", or "relu" where the GEMM's only consumer is a ReLU:
passes/epilogue.py folds it in, saving a pass over the output), then one cast.  The CPU reference
defines the result: every GPU kernel is tested bit-exactly against it.

row_scale (optional, float32, one value per row of xq: the shape of xq[..., 0]) is the activation's
per-token scale (kernels/flatten_quantize.py `flatten_quantize_rows`): then scale carries the weight
side alone and each row is multiplied by its own value first, one more rounded multiply.  Like the
per-channel weight scale, it costs an integer GEMM nothing but a vector load in the epilogue.
"""

from __future__ import annotations

import torch
from torch.library import custom_op

from fq_compile.kernels.packing import unpack_int4
from fq_compile.kernels.registry import define_op

F32_EXACT = 1 << 24      # float32 holds every integer of magnitude <= 2**24 exactly
F64_EXACT = 1 << 53
INT8_PRODUCT_MAX = 128 * 128   # |a * b| for int8 operands (-128 included)


def exact_float_chunk(k: int, product_max: int = INT8_PRODUCT_MAX) -> tuple[torch.dtype, int]:
    """How a float GEMM computes an exact integer product over K: (dtype, K per chunk).

    Integer operands are exact in float32, and so is every partial sum of a chunk of c products as
    long as c * product_max <= 2**24, whatever order the BLAS adds in (FMA included): each chunk's
    float32 result is then the exact integer.  Chunks of 1024 (int8) are summed in int32.  Only past
    2**53 / product_max chunks (never, for int8) would float64 be needed."""
    chunk = F32_EXACT // product_max
    if chunk >= 1 and _float32_matmul_is_ieee():
        return torch.float32, max(1, min(k, chunk))
    return torch.float64, k


def _float32_matmul_is_ieee() -> bool:
    """False when the user let float32 GEMMs run in reduced precision (TF32/bf16): then float64."""
    if torch.get_float32_matmul_precision() != "highest":
        return False
    mkldnn = getattr(torch.backends.mkldnn, "matmul", None)
    return getattr(mkldnn, "fp32_precision", "none") in ("none", "ieee")


def cpu_has_int8_dot() -> bool:
    """Whether this CPU has int8 dot-product instructions (AVX512-VNNI / AVX-VNNI / AMX), with which
    oneDNN's int8 GEMM behind torch._int_mm beats float32 GEMMs."""
    cpu = getattr(torch, "cpu", None)
    probes = ("_is_vnni_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, p, lambda: False)()) for p in probes)


_INT8_DOT = cpu_has_int8_dot()


def cpu_gemm_path(k: int) -> str:
    """The CPU's exact integer GEMM: "int_mm" (torch._int_mm, oneDNN int8) where the CPU has int8 dot
    instructions, else "float" (float32 GEMMs over exact K chunks, `exact_float_chunk`).  Measured
    (512x576 @ 576x1536): on a 2-core AVX2 machine torch._int_mm took 345 ms and the float chunks
    8 ms; on the 16-core AMX/VNNI host of the H200, 1.5 ms and 3.1 ms."""
    return "int_mm" if _INT8_DOT and k % 8 == 0 else "float"


def int_matmul_reference(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """Exact int32 a @ b_t.T for integer a [M, K], b_t [N, K] (int8, or unpacked int4 values).

    On CUDA: torch._int_mm.  On the CPU: `cpu_gemm_path` picks torch._int_mm where the CPU has int8
    dot instructions, otherwise float32 GEMMs over K chunks that are exact by construction: without
    VNNI/AMX, torch._int_mm has no fast kernel while the float BLAS is what the CPU is built for."""
    if a.is_cuda:
        (m, k), n = a.shape, b_t.shape[0]
        if m > 16 and k > 0 and k % 8 == 0 and n > 0 and n % 8 == 0:   # the shapes _int_mm takes on CUDA
            a = a.contiguous()
            for b in (b_t.contiguous().t(), b_t.t().contiguous()):   # column-major view first: no weight copy
                try:
                    return torch._int_mm(a, b)
                except RuntimeError:   # a layout this torch's cuBLAS path refuses: the row-major copy
                    continue
        return (a.double() @ b_t.double().t()).to(torch.int32)   # exact, never TF32
    return _cpu_int_matmul(a, b_t).to(torch.int32)


def _cpu_int_matmul(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """`int_matmul_reference` on the CPU, before the cast: a float32 tensor when K fits one exact
    chunk (its values are the int32 result's, exactly), else the int32 sum of the chunks."""
    m, k = a.shape
    if a.dtype == torch.int8 and b_t.dtype == torch.int8 and m and cpu_gemm_path(k) == "int_mm":
        try:     # b_t's transpose as a column-major view: oneDNN takes it as it is (a copy of the weight per
            return torch._int_mm(a.contiguous(), b_t.contiguous().t())   # call cost 11x the GEMM at M = 12)
        except RuntimeError:
            pass
    if m == 0 or k == 0 or b_t.shape[0] == 0:
        return torch.zeros((m, b_t.shape[0]), dtype=torch.int32, device=a.device)
    dtype, chunk = exact_float_chunk(k)
    af, bf = a.to(dtype), b_t.to(dtype)
    if dtype == torch.float32 and chunk >= k:
        return af @ bf.t()
    out = None
    for k0 in range(0, k, chunk):
        part = (af[:, k0:k0 + chunk] @ bf[:, k0:k0 + chunk].t()).to(torch.int32)
        out = part if out is None else out.add_(part)
    return out


ACTS = ("none", "relu")


def quant_linear_reference(xq: torch.Tensor, wq: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                           bits: int, out_dtype: torch.dtype, act: str = "none",
                           row_scale: torch.Tensor | None = None) -> torch.Tensor:
    if bits == 4:
        xq, wq = unpack_int4(xq), unpack_int4(wq)
    lead = xq.shape[:-1]
    x2 = xq.reshape(-1, xq.shape[-1])
    # on the CPU a one-chunk float32 product already holds the exact int32 result's values: no round trip
    acc = int_matmul_reference(x2, wq) if xq.is_cuda else _cpu_int_matmul(x2, wq)
    y = acc if acc.dtype == torch.float32 else acc.float()
    if row_scale is not None:
        y = y.mul_(row_scale.reshape(-1, 1).float())
    y = y.mul_(scale.float() if isinstance(scale, torch.Tensor) else scale)
    if bias is not None:
        y = y.add_(bias.float())
    if act == "relu":
        y = torch.relu_(y)
    return y.to(out_dtype).reshape(*lead, wq.shape[0])


def check_row_scale(xq, row_scale, what: str) -> None:
    """row_scale: None, or float32 with one value per row of xq (the shape of xq[..., 0])."""
    if row_scale is None:
        return
    torch._check(row_scale.dtype == torch.float32 and row_scale.shape == xq.shape[:-1],
                 lambda: f"{what}: row_scale must be float32 of shape {tuple(xq.shape[:-1])} (one value per row), "
                         f"got {row_scale.dtype} {tuple(row_scale.shape)}")


def _check(xq, wq, scale, bits, act="none", row_scale=None):
    check_row_scale(xq, row_scale, f"int{bits}_linear")
    torch._check(act in ACTS, lambda: f"int{bits}_linear: act must be one of {ACTS}, got {act!r}")
    dt = torch.uint8 if bits == 4 else torch.int8
    torch._check(xq.dtype == dt and wq.dtype == dt,
                 lambda: f"int{bits}_linear expects {dt} operands, got {xq.dtype} and {wq.dtype}")
    torch._check(wq.dim() == 2 and xq.shape[-1] == wq.shape[1],
                 lambda: f"int{bits}_linear: K mismatch, x {tuple(xq.shape)} vs w {tuple(wq.shape)}")
    torch._check(scale.dtype == torch.float32 and scale.dim() == 1 and scale.shape[0] == wq.shape[0],
                 lambda: f"int{bits}_linear: scale must be float32 [N={wq.shape[0]}], got {scale.dtype} "
                         f"{tuple(scale.shape)}")


def per_channel(scale, n: int, device=None) -> torch.Tensor:
    """A float32 [n] scale vector from a number (every channel the same) or a vector."""
    if isinstance(scale, torch.Tensor):
        return scale.to(device=device if device is not None else scale.device, dtype=torch.float32).reshape(-1)
    return torch.full((n,), float(scale), dtype=torch.float32, device=device)


def _fake(xq, wq, bias, out_dtype):
    return xq.new_empty((*xq.shape[:-1], wq.shape[0]), dtype=out_dtype)


@custom_op("fq::int8_linear_reference", mutates_args=())
def _int8_ref_op(xq: torch.Tensor, wq: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                 out_dtype: torch.dtype, act: str = "none", row_scale: torch.Tensor | None = None) -> torch.Tensor:
    _check(xq, wq, scale, 8, act, row_scale)
    return quant_linear_reference(xq, wq, scale, bias, 8, out_dtype, act, row_scale)


@custom_op("fq::int4_linear_reference", mutates_args=())
def _int4_ref_op(xq: torch.Tensor, wq: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                 out_dtype: torch.dtype, act: str = "none", row_scale: torch.Tensor | None = None) -> torch.Tensor:
    _check(xq, wq, scale, 4, act, row_scale)
    return quant_linear_reference(xq, wq, scale, bias, 4, out_dtype, act, row_scale)


# GPU implementations, keyed "int8_linear" / "int4_linear" (register_cuda_impl, called by
# fq_compile/kernels/__init__.py), and the per-call chooser between them and other implementations
# (register_selector: kernels/dispatch.py's `select`): (name, xq, wq, out_dtype, act) -> an
# implementation (the CUTLASS op) or None for the registered kernel.  Implementations are called as
# impl(xq, wq, scale, bias, out_dtype, act=act, row_scale=row_scale).
CUDA_IMPL = {}
SELECT = None


def register_cuda_impl(name: str, fn) -> None:
    if name not in ("int8_linear", "int4_linear"):
        raise ValueError(f"unknown GEMM op {name!r}")
    CUDA_IMPL[name] = fn


def register_selector(fn) -> None:
    global SELECT
    SELECT = fn


def _dispatch(name, xq, wq, scale, bias, out_dtype, act, row_scale):
    """The implementation SELECT picks, else the registered GPU kernel on CUDA tensors, else the
    opaque reference op."""
    impl = SELECT(name, xq, wq, out_dtype, act) if SELECT is not None else None
    if impl is None and xq.is_cuda:
        impl = CUDA_IMPL.get(name)
    if impl is not None:
        return impl(xq, wq, scale, bias, out_dtype, act=act, row_scale=row_scale)
    return getattr(torch.ops.fq, name + "_reference")(xq, wq, scale, bias, out_dtype, act, row_scale)


@define_op("fq::int8_linear", mutates_args=())
def int8_linear(xq: torch.Tensor, wq: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                out_dtype: torch.dtype, act: str = "none", row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """INT8 GEMM with the per-channel (and per-row) dequantize(+bias)(+ReLU) epilogue (module docstring)."""
    return _dispatch("int8_linear", xq, wq, scale, bias, out_dtype, act, row_scale)


@define_op("fq::int4_linear", mutates_args=())
def int4_linear(xq: torch.Tensor, wq: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                out_dtype: torch.dtype, act: str = "none", row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Packed-INT4 GEMM (unpacked onto INT8/FP8 tensor cores on Hopper), same epilogue."""
    return _dispatch("int4_linear", xq, wq, scale, bias, out_dtype, act, row_scale)


for _op, _bits in ((_int8_ref_op, 8), (_int4_ref_op, 4), (int8_linear, 8), (int4_linear, 4)):
    def _register(op=_op, bits=_bits):
        @op.register_fake
        def _(xq, wq, scale, bias, out_dtype, act="none", row_scale=None):
            _check(xq, wq, scale, bits, act, row_scale)
            return _fake(xq, wq, bias, out_dtype)
    _register()
