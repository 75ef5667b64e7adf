"""CUDA implementations of the FP8 family (`fq::fp8_quantize`, `fq::fp8_linear`, `fq::w4a8_linear`).

fp8_quantize: one Triton pass over x: a = x * mult[c] (one rounded multiply), then the e4m3 rounding
written out in float32/integer arithmetic (clamp to +-448; normal range: keep 3 mantissa bits of the
float32, ties to even, on the bits; below 2**-6: rint to multiples of 2**-9), so the result is bit
for bit the reference's on any device, the Triton interpreter included (whose own float32 -> fp8
cast neither rounds ties to even nor rounds subnormals); the byte is then assembled from the float32
bits (_e4m3_byte), so no e4m3 type is needed and the kernel compiles below sm_89 too.

fp8_linear: `torch._scaled_mm` (cuBLAS FP8) where the GPU has FP8 tensor cores (compute capability
>= 8.9), the shape suits it (K, N multiples of 16) and its epilogue can apply the per-channel scale
(row-wise scaling into bfloat16, or into float16 where this torch takes it); else the Triton GEMM
below, whose epilogue is the integer GEMMs' (FQ_FP8_GEMM overrides the choice: fp8_gemm_choice).

w4a8_linear: the Triton GEMM, whose weight tiles arrive packed two int4 per byte and are unpacked in
registers onto the FP8 tensor cores (int4 values are exact in e4m3): the weight bytes are halved
again, the multiply rate is FP8's.  Packed byte j holds K elements 2j and 2j+1, so the activation
tile is read as its even and its odd columns, multiplied with the low and the high nibbles.  Without
FP8 tensor cores (below sm_89, where Triton has no e4m3 type at all) both operands go through float16
built from the bits (every e4m3 and int4 value is exact there, products too), same float32
accumulation.  On FP8 tensor cores the sums are not float32 ones: see PROMOTE_K.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from fq_compile.kernels.int_gemm import per_channel
from fq_compile.kernels.triton.gemm import _epilogue, _mul_rn, _nibbles
from fq_compile.kernels.triton.tuning import tuning

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

if _INTERPRET:
    @triton.jit
    def _rint_sub(m):
        # m in [0, 2**-6): adding 1.5 * 2**14 leaves a quantum of 2**-9, rounded half to even
        return (m + 24576.0) - 24576.0
else:
    from triton.language.extra import libdevice

    @triton.jit
    def _rint_sub(m):
        return libdevice.rint(m * 512.0) * 0.001953125


@triton.jit
def _round_e4m3(a):
    """float32 -> the nearest e4m3 value (as float32), clamped to +-448, ties to even, sign kept."""
    bits = a.to(tl.int32, bitcast=True)
    sign = bits & -2147483648                       # 0x80000000
    m = tl.minimum(tl.abs(a), 448.0)
    mb = m.to(tl.int32, bitcast=True)
    lsb = (mb >> 20) & 1
    normal = ((mb + 0x7FFFF + lsb) & -1048576).to(tl.float32, bitcast=True)   # keep 3 of 23 mantissa bits
    r = tl.where(m < 0.015625, _rint_sub(m), normal)
    return (r.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def _e4m3_byte(r):
    """An exact e4m3 value (float32) -> its byte, from the float32 bits (no e4m3 type needed, so it
    compiles below sm_89 too): exponent rebiased 127 -> 7 and the top 3 mantissa bits; below 2**-6
    the byte is the multiple of 2**-9."""
    bits = r.to(tl.int32, bitcast=True)
    m = tl.abs(r)
    normal = ((((bits >> 23) & 0xFF) - 120) << 3) | ((bits >> 20) & 7)
    mag = tl.where(m < 0.015625, (m * 512.0).to(tl.int32), normal)
    return (((bits >> 24) & 0x80) | mag).to(tl.uint8)


@triton.jit
def fp8_quantize_kernel(x_ptr, mult_ptr, out_ptr, M, C, stride_xm, stride_xc,
                        BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """x [M, C] (any strides) -> out [M, C] e4m3 bytes (contiguous)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows[:, None] < M) & (cols[None, :] < C)
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xm + cols[None, :] * stride_xc, mask=mask, other=0.0)
    mult = tl.load(mult_ptr + cols, mask=cols < C, other=0.0)
    r = _round_e4m3(_mul_rn(x.to(tl.float32), mult[None, :]))
    tl.store(out_ptr + rows[:, None].to(tl.int64) * C + cols[None, :], _e4m3_byte(r), mask=mask)


def fp8_quantize_cuda(x: torch.Tensor, mult: torch.Tensor) -> torch.Tensor:
    c = x.shape[-1]
    x2 = x.reshape(-1, c)
    m = x2.shape[0]
    out = torch.empty((m, c), dtype=torch.float8_e4m3fn, device=x.device)
    if m and c:
        bm, bc = (4, 32) if _INTERPRET else (16, 256)
        grid = (triton.cdiv(m, bm), triton.cdiv(c, bc))
        torch.library.wrap_triton(fp8_quantize_kernel)[grid](
            x2, mult, out.view(torch.uint8), m, c, x2.stride(0), x2.stride(1), BLOCK_M=bm, BLOCK_C=bc,
            num_warps=4)
    return out.reshape(x.shape)


@triton.jit
def _e4m3_operand(u8, DOT_FP8: tl.constexpr):
    """e4m3 bytes -> the dot operand: float8e4nv on FP8 tensor cores; else float16 built from the bits
    (Triton has no e4m3 type below sm_89): the sign and the 7 other bits moved up by 7 give a float16
    of value x * 2**-8 for every e4m3 x, subnormals included; times 256 is exact."""
    if DOT_FP8:
        v = u8.to(tl.float8e4nv, bitcast=True)
    else:
        b = u8.to(tl.int16)
        h = ((b & 0x80) << 8) | ((b & 0x7F) << 7)
        v = (h.to(tl.float16, bitcast=True) * 256.0).to(tl.float16)
    return v


@triton.jit
def fp8_gemm_kernel(a_ptr, b_ptr, c_ptr, bias_ptr, scale_ptr, M, N, K, M_BUCKET,
                    stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn,
                    HAS_BIAS: tl.constexpr, INT4_W: tl.constexpr, DOT_FP8: tl.constexpr, PROMOTE_K: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """C[M, N] = A[M, K] @ B[N, K].T, A e4m3 bytes, B e4m3 bytes or packed int4 ([N, K/2], strides in
    bytes); float32 accumulation; epilogue scale[n] (+ bias[n]) as the integer GEMMs."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = (offs_m % M).to(tl.int64)
    cols = (offs_n % N).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    DT: tl.constexpr = tl.float8e4nv if DOT_FP8 else tl.float16
    if INT4_W:
        KB: tl.constexpr = BLOCK_K // 2
        NC_I4: tl.constexpr = KB if KB < PROMOTE_K else PROMOTE_K
        kk = tl.arange(0, KB)
        for k in range(0, K, BLOCK_K):
            kp = k // 2 + kk
            kmask = kp < K // 2
            a_even = tl.load(a_ptr + rows[:, None] * stride_am + (2 * kp)[None, :] * stride_ak,
                             mask=kmask[None, :], other=0)
            a_odd = tl.load(a_ptr + rows[:, None] * stride_am + (2 * kp + 1)[None, :] * stride_ak,
                            mask=kmask[None, :], other=0)
            pb = tl.load(b_ptr + cols[None, :] * stride_bn + kp[:, None] * stride_bk, mask=kmask[:, None], other=0)
            b_lo, b_hi = _nibbles(pb)
            a_even = _e4m3_operand(a_even, DOT_FP8)
            a_odd = _e4m3_operand(a_odd, DOT_FP8)
            acc = tl.dot(a_even, b_lo.to(tl.float16).to(DT), acc, out_dtype=tl.float32, max_num_imprecise_acc=NC_I4)
            acc = tl.dot(a_odd, b_hi.to(tl.float16).to(DT), acc, out_dtype=tl.float32, max_num_imprecise_acc=NC_I4)
    else:
        NC: tl.constexpr = BLOCK_K if BLOCK_K < PROMOTE_K else PROMOTE_K
        kk = tl.arange(0, BLOCK_K)
        for k in range(0, K, BLOCK_K):
            ko = k + kk
            kmask = ko < K
            a = tl.load(a_ptr + rows[:, None] * stride_am + ko[None, :] * stride_ak, mask=kmask[None, :], other=0)
            b = tl.load(b_ptr + cols[None, :] * stride_bn + ko[:, None] * stride_bk, mask=kmask[:, None], other=0)
            a = _e4m3_operand(a, DOT_FP8)
            b = _e4m3_operand(b, DOT_FP8)
            acc = tl.dot(a, b, acc, out_dtype=tl.float32, max_num_imprecise_acc=NC)
    _epilogue(acc, c_ptr, bias_ptr, scale_ptr, scale_ptr, offs_m, offs_n, M, N, stride_cm, stride_cn, HAS_BIAS, 1, 0,
              False)


# Hopper's FP8 MMA adds into its accumulator with reduced precision (about 14 bits kept: DeepSeek-V3
# report, section 3.3.2), and Triton on sm_90 leaves the whole K loop there by default
# (max_num_imprecise_acc = 2**30).  Every tl.dot above hands its partial sum to the float32
# accumulator after at most PROMOTE_K products, as cuBLAS does with use_fast_accum=False and as the
# report recommends (128).  Only wgmma (sm_90, BLOCK_M >= 64) is affected; smaller tiles go through
# float16 mma.sync with float32 accumulation.
PROMOTE_K = 128


def _cfg(bm, bn, bk, stages, warps, group=8):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group},
                         num_stages=stages, num_warps=warps)


CONFIGS = [_cfg(128, 128, 128, 4, 8), _cfg(128, 256, 128, 3, 8), _cfg(64, 128, 128, 4, 4),
           _cfg(16, 64, 256, 4, 4), _cfg(16, 128, 128, 4, 4), _cfg(64, 64, 256, 4, 4)]
INTERPRET_CONFIG = [_cfg(16, 32, 64, 1, 4, group=2)]


@functools.lru_cache(maxsize=None)
def _tuned(tune: bool = True):
    configs = INTERPRET_CONFIG if _INTERPRET else CONFIGS
    return triton.autotune(configs=configs if tune else configs[:1],
                           key=["M_BUCKET", "N", "K", "INT4_W"])(fp8_gemm_kernel)


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def has_fp8_cores(device: torch.device) -> bool:
    """FP8 tensor cores: compute capability 8.9 (Ada) and up; False off CUDA (the interpreter)."""
    return device.type == "cuda" and _capability(device.index or 0) >= (8, 9)


def fp8_gemm_triton(xq, wq, scale, bias, out_dtype, *, int4_w: bool, dot_fp8: bool | None = None):
    """The Triton GEMM for both weight formats (see the module docstring)."""
    lead = xq.shape[:-1]
    a = xq.reshape(-1, xq.shape[-1]).view(torch.uint8)
    m, k = a.shape
    n = wq.shape[0]
    out = torch.empty((m, n), dtype=out_dtype, device=xq.device)
    if m == 0 or n == 0:
        return out.reshape(*lead, n)
    scale = per_channel(scale, n, xq.device).contiguous()
    has_bias = bias is not None
    bias_arg = bias.float().contiguous() if has_bias else out
    if k == 0:
        out.copy_((torch.zeros_like(out, dtype=torch.float32) * scale + (bias_arg if has_bias else 0)).to(out_dtype))
        return out.reshape(*lead, n)
    b = wq if int4_w else wq.view(torch.uint8)
    dot_fp8 = has_fp8_cores(xq.device) if dot_fp8 is None else dot_fp8

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    torch.library.wrap_triton(_tuned(tuning()))[grid](
        a, b, out, bias_arg, scale, m, n, k, min(triton.next_power_of_2(m), 8192),
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
        HAS_BIAS=has_bias, INT4_W=int4_w, DOT_FP8=dot_fp8, PROMOTE_K=PROMOTE_K)
    return out.reshape(*lead, n)


def _scaled_mm_ok(xq, wq) -> bool:
    k, n = wq.shape[1], wq.shape[0]
    return hasattr(torch, "_scaled_mm") and has_fp8_cores(xq.device) and k % 16 == 0 and n % 16 == 0


_ROWWISE: dict[tuple[torch.dtype, int], bool] = {}


def _rowwise_ok(out_dtype: torch.dtype, device: torch.device) -> bool:
    """Whether this torch's `_scaled_mm` takes row-wise scales into `out_dtype` on `device` (torch 2.11
    takes float16 and bfloat16 on an H100; earlier releases bfloat16 only): one 16 x 16 x 16 call, once
    per dtype and GPU.  Never asked inside a CUDA-graph capture (the graph's uncaptured warm-up has asked
    by then); there the answer is no, not remembered."""
    key = (out_dtype, device.index if device.index is not None else torch.cuda.current_device())
    if key not in _ROWWISE:
        if torch.cuda.is_current_stream_capturing():
            return False
        a = torch.zeros((16, 16), device=device).to(torch.float8_e4m3fn)
        ones = torch.ones((16, 1), device=device)
        try:
            torch._scaled_mm(a, a.t(), scale_a=ones, scale_b=ones.reshape(1, 16), out_dtype=out_dtype)
            _ROWWISE[key] = True
        except (RuntimeError, ValueError, NotImplementedError):
            _ROWWISE[key] = False
    return _ROWWISE[key]


def fp8_gemm_choice(out_dtype: torch.dtype, device: torch.device | None = None) -> str:
    """FQ_FP8_GEMM = auto (default) | scaled_mm | triton.  auto: cuBLAS with row-wise scales (the
    per-channel scale fused in its epilogue) for a float16 or bfloat16 output where this torch takes
    it (_rowwise_ok), else the Triton GEMM (its epilogue fused too); scaled_mm: cuBLAS into
    float32, then scale and bias as one element-wise pass.  On an H100 (2026-12-07, OPT-13B prefill
    shapes, M = 2048 and 16384, results/fp8-gemm-2026-12-07-h100-970198a.md) cuBLAS row-wise into float16
    ran 0.85-1.00x naive per-tensor FP8's GEMM time, the Triton GEMM 0.53-0.58x, cuBLAS + pass 0.50-0.84x."""
    choice = os.environ.get("FQ_FP8_GEMM", "auto")
    if choice not in ("auto", "scaled_mm", "triton"):
        raise ValueError(f"FQ_FP8_GEMM={choice!r} must be auto, scaled_mm or triton")
    if choice == "auto":
        rowwise = out_dtype == torch.bfloat16 or (out_dtype == torch.float16 and device is not None
                                                  and device.type == "cuda" and _rowwise_ok(out_dtype, device))
        return "scaled_mm_rowwise" if rowwise else "triton"
    return choice


def fp8_linear_cuda(xq, wq, scale, bias, out_dtype):
    """cuBLAS FP8 or the Triton GEMM (fp8_gemm_choice; the Triton GEMM wherever cuBLAS does not apply)."""
    if not _scaled_mm_ok(xq, wq):
        return fp8_gemm_triton(xq, wq, scale, bias, out_dtype, int4_w=False)
    choice = fp8_gemm_choice(out_dtype, xq.device)
    if choice == "triton":
        return fp8_gemm_triton(xq, wq, scale, bias, out_dtype, int4_w=False)
    lead = xq.shape[:-1]
    a = xq.reshape(-1, xq.shape[-1])
    if not a.is_contiguous():
        a = a.contiguous()
    n = wq.shape[0]
    if choice == "scaled_mm_rowwise":
        ones = torch.ones((a.shape[0], 1), dtype=torch.float32, device=xq.device)
        col = per_channel(scale, n, xq.device)
        col = (col.expand(n) if col.numel() == 1 else col).reshape(1, n).contiguous()
        y = torch._scaled_mm(a, wq.t(), scale_a=ones, scale_b=col, out_dtype=out_dtype)
        if bias is not None:
            y = y + bias.to(out_dtype)
        return y.reshape(*lead, n)
    one = torch.ones((), dtype=torch.float32, device=xq.device)
    acc = torch._scaled_mm(a, wq.t(), scale_a=one, scale_b=one, out_dtype=torch.float32, use_fast_accum=False)
    y = acc * scale.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype).reshape(*lead, n)


def w4a8_linear_cuda(xq, wq, scale, bias, out_dtype):
    return fp8_gemm_triton(xq, wq, scale, bias, out_dtype, int4_w=True)
