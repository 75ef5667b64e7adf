"""Triton GEMMs for `fq::int8_linear` and `fq::int4_linear`, registered as their CUDA implementations.

    y = act(float32(xq @ wq.T, exact int32) * scale[n] + bias[n])  -> out_dtype   (scale: float32 [N])
    with per-token scales: float32(acc) * row[m] first, one more rounded multiply (int_gemm.py)

One kernel body serves both formats.  INT4 operands arrive packed two per byte (see packing.py) and
are unpacked in registers right after the load, so global memory and L2 only ever carry the packed
bytes (the point of INT4 on Hopper, which has no INT4 tensor cores); the unpacked tiles go to the
INT8 tensor cores (or, with FP8=True, to the FP8 e4m3 ones: int4 values are exact in e4m3 and every
partial sum stays below 2**24, so the float32 accumulator is still an exact integer).

Regimes, chosen on the host by M:
  * M <= 16 (decode): the GEMM only streams the weight.  Large weights are split along K until
    the grid covers the GPU several times over; partial int32 tiles are added atomically (exact,
    order-free) into a zeroed workspace and a second small kernel applies scale + bias.  Small
    weights (< 32 MB) run unsplit: the two extra launches would cost more than they save.
  * 16 < M <= 256: one output tile per program (grouped ordering for L2 reuse), epilogue fused,
    tile shapes autotuned per (M bucket, N, K) from Hopper-sized candidates.
  * M > 256: persistent programs fed by the TMA copy engine (one tuned tiling per format) when
    the operands have unit inner stride and 16-byte aligned rows; otherwise the autotuned pointer
    kernel (any strides).
The epilogue multiplies with an explicitly rounded mul (no FMA with the bias add), so float32
outputs match `quant_linear_reference` bit for bit; act "relu" (ACT=1) clamps at 0 before the cast
(OPT's fc1, whose only consumer is a ReLU).  When K is a multiple of 256 (every candidate BLOCK_K
divides it), the pointer kernel's loads need no K mask (EVEN_K).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from fq_compile.kernels.int_gemm import per_channel
from fq_compile.kernels.triton.tuning import tuning

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

if _INTERPRET:
    @triton.jit
    def _mul_rn(a, b):
        return a * b
else:
    from triton.language.extra import libdevice

    @triton.jit
    def _mul_rn(a, b):
        return libdevice.mul_rn(a, b)


# 32-bit register $2 of 4 bytes -> $0: their low nibbles, $1: their high nibbles, each sign-extended to a byte
# (a constexpr: a jitted function may read a global only as one)
NIBBLES_ASM = tl.constexpr("{ .reg .b32 t, s; "
                           "and.b32 t, $2, 0x0F0F0F0F; and.b32 s, $2, 0x08080808; mul.lo.u32 s, s, 30; "
                           "or.b32 $0, t, s; shr.u32 t, $2, 4; and.b32 t, t, 0x0F0F0F0F; and.b32 s, t, 0x08080808; "
                           "mul.lo.u32 s, s, 30; or.b32 $1, t, s; }")

if _INTERPRET:
    @triton.jit
    def _nibbles(p):
        """packed uint8 -> (low nibbles, high nibbles) as sign-extended int8, same shape."""
        b = p.to(tl.int8, bitcast=True)
        return (b << 4) >> 4, b >> 4
else:
    @triton.jit
    def _nibbles(p):
        """packed uint8 -> (low nibbles, high nibbles) as sign-extended int8, same shape: four
        bytes per 32-bit register at a time; a nibble with bit 3 set gets 0xF0 or-ed in (8 * 30)."""
        return tl.inline_asm_elementwise(asm=NIBBLES_ASM, constraints="=r,=r,r", args=[p], dtype=(tl.int8, tl.int8),
                                         is_pure=True, pack=4)


@triton.jit
def _epilogue(acc, c_ptr, bias_ptr, scale_ptr, row_ptr, offs_m, offs_n, M, N, stride_cm, stride_cn,
              HAS_BIAS: tl.constexpr, EPILOGUE: tl.constexpr, ACT: tl.constexpr, HAS_ROW: tl.constexpr):
    """EPILOGUE 0: store the int32 accumulator; 1: (row[m] if HAS_ROW) scale[n] (+bias[n]) (ReLU if
    ACT) and store c's dtype; 2: atomic add."""
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :] * stride_cn
    if EPILOGUE == 1:
        scale = tl.load(scale_ptr + offs_n, mask=offs_n < N, other=0.0)
        y = acc.to(tl.float32)
        if HAS_ROW:
            y = _mul_rn(y, tl.load(row_ptr + offs_m, mask=offs_m < M, other=0.0)[:, None])
        y = _mul_rn(y, scale[None, :])
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0)
            y = y + bias[None, :]
        if ACT == 1:
            y = tl.where(y < 0, 0.0, y)   # torch.relu: NaN stays NaN
        tl.store(ptrs, y.to(c_ptr.dtype.element_ty), mask=mask)
    elif EPILOGUE == 2:
        tl.atomic_add(ptrs, acc.to(tl.int32), mask=mask, sem="relaxed")
    else:
        tl.store(ptrs, acc.to(tl.int32), mask=mask)


@triton.jit
def int_gemm_kernel(a_ptr, b_ptr, c_ptr, bias_ptr, scale_ptr, row_ptr, M, N, K, M_BUCKET, K_PER_SPLIT,
                    stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn,
                    HAS_BIAS: tl.constexpr, INT4: tl.constexpr, FP8: tl.constexpr, EPILOGUE: tl.constexpr,
                    ACT: tl.constexpr, EVEN_K: tl.constexpr, HAS_ROW: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """C[M, N] = A[M, K] @ B[N, K].T on the tensor cores.  K counts unpacked elements; for INT4 the
    strides are in packed bytes.  Grid: (tiles of C, K splits); split s covers K_PER_SPLIT elements."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # wrap out-of-range rows/cols onto valid ones: loads need no mask, the store masks them
    rows = tl.max_contiguous(tl.multiple_of(offs_m % M, BLOCK_M), BLOCK_M).to(tl.int64)
    cols = tl.max_contiguous(tl.multiple_of(offs_n % N, BLOCK_N), BLOCK_N).to(tl.int64)
    k_lo = pid_k * K_PER_SPLIT
    k_hi = tl.minimum(K, k_lo + K_PER_SPLIT)
    ACC: tl.constexpr = tl.float32 if FP8 else tl.int32
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    if INT4:
        # byte j of a row holds K elements 2j (low) and 2j+1 (high); the dot product does not care
        # about the order of K, so multiply the low nibbles of A with those of B, then the high
        # ones: no interleave, no transpose, the unpack stays elementwise in the load's layout.
        KB: tl.constexpr = BLOCK_K // 2
        kk = tl.arange(0, KB)
        for k in range(k_lo, k_hi, BLOCK_K):
            kp = k // 2 + kk
            if EVEN_K:
                pa = tl.load(a_ptr + rows[:, None] * stride_am + kp[None, :] * stride_ak)
                pb = tl.load(b_ptr + cols[None, :] * stride_bn + kp[:, None] * stride_bk)
            else:
                kmask = kp < K // 2
                pa = tl.load(a_ptr + rows[:, None] * stride_am + kp[None, :] * stride_ak, mask=kmask[None, :],
                             other=0)
                pb = tl.load(b_ptr + cols[None, :] * stride_bn + kp[:, None] * stride_bk, mask=kmask[:, None],
                             other=0)
            a_lo, a_hi = _nibbles(pa)
            b_lo, b_hi = _nibbles(pb)
            if FP8:
                a_lo = a_lo.to(tl.float16).to(tl.float8e4nv)
                a_hi = a_hi.to(tl.float16).to(tl.float8e4nv)
                b_lo = b_lo.to(tl.float16).to(tl.float8e4nv)
                b_hi = b_hi.to(tl.float16).to(tl.float8e4nv)
            acc = tl.dot(a_lo, b_lo, acc, out_dtype=ACC)
            acc = tl.dot(a_hi, b_hi, acc, out_dtype=ACC)
    else:
        kk = tl.arange(0, BLOCK_K)
        for k in range(k_lo, k_hi, BLOCK_K):
            ko = k + kk
            if EVEN_K:
                a = tl.load(a_ptr + rows[:, None] * stride_am + ko[None, :] * stride_ak)
                b = tl.load(b_ptr + cols[None, :] * stride_bn + ko[:, None] * stride_bk)
            else:
                kmask = ko < K
                a = tl.load(a_ptr + rows[:, None] * stride_am + ko[None, :] * stride_ak, mask=kmask[None, :], other=0)
                b = tl.load(b_ptr + cols[None, :] * stride_bn + ko[:, None] * stride_bk, mask=kmask[:, None], other=0)
            acc = tl.dot(a, b, acc, out_dtype=ACC)
    _epilogue(acc, c_ptr, bias_ptr, scale_ptr, row_ptr, offs_m, offs_n, M, N, stride_cm, stride_cn, HAS_BIAS,
              EPILOGUE, ACT, HAS_ROW)


@triton.jit
def int_gemm_tma_kernel(a_desc, b_desc, c_ptr, bias_ptr, scale_ptr, row_ptr, M, N, K, NUM_PROGS, stride_cm,
                        stride_cn, HAS_BIAS: tl.constexpr, INT4: tl.constexpr, EPILOGUE: tl.constexpr,
                        ACT: tl.constexpr, HAS_ROW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """Large-M GEMM: persistent programs walk the output tiles (grouped order) and stream A and B
    through the TMA engine (a_desc [M, K or K/2], b_desc [N, K or K/2], block [BLOCK_*, KB]); the
    copy engine zero-fills past K, so no masks.  Faster than the pointer kernel at large M
    (benchmarks/NOTES-kernels.md)."""
    start = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    group = GROUP_M * num_n
    KB: tl.constexpr = BLOCK_K // 2 if INT4 else BLOCK_K
    for tile in tl.range(start, num_m * num_n, NUM_PROGS, flatten=True):
        first_m = (tile // group) * GROUP_M
        size_m = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (tile % group) % size_m
        pid_n = (tile % group) // size_m
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for ki in range(k_tiles):
            a = a_desc.load([pid_m * BLOCK_M, ki * KB])
            b = b_desc.load([pid_n * BLOCK_N, ki * KB])
            if INT4:
                a_lo, a_hi = _nibbles(a)
                b_lo, b_hi = _nibbles(b)
                acc = tl.dot(a_lo, b_lo.T, acc, out_dtype=tl.int32)
                acc = tl.dot(a_hi, b_hi.T, acc, out_dtype=tl.int32)
            else:
                acc = tl.dot(a, b.T, acc, out_dtype=tl.int32)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        _epilogue(acc, c_ptr, bias_ptr, scale_ptr, row_ptr, offs_m, offs_n, M, N, stride_cm, stride_cn, HAS_BIAS,
                  EPILOGUE, ACT, HAS_ROW)


@triton.jit
def dequant_kernel(acc_ptr, bias_ptr, out_ptr, scale_ptr, row_ptr, M, N, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
                   HAS_ROW: tl.constexpr, BLOCK: tl.constexpr):
    """Split-K epilogue: out = int32 workspace (* row[m]) * scale[n] (+ bias[n]) (ReLU if ACT), both [M, N]
    contiguous."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M * N
    acc = tl.load(acc_ptr + offs, mask=mask, other=0)
    y = acc.to(tl.float32)
    if HAS_ROW:
        y = _mul_rn(y, tl.load(row_ptr + offs // N, mask=mask, other=0.0))
    y = _mul_rn(y, tl.load(scale_ptr + offs % N, mask=mask, other=0.0))
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + offs % N, mask=mask, other=0.0)
    if ACT == 1:
        y = tl.where(y < 0, 0.0, y)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def _cfg(bm, bn, bk, stages, warps, group=8):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group},
                         num_stages=stages, num_warps=warps)


# Candidates: BLOCK_K is in unpacked elements (an INT4 stage holds half the bytes, so INT4 can afford
# deeper K tiles for the same shared memory).
LARGE_CONFIGS = {
    8: [_cfg(128, 256, 128, 3, 8), _cfg(256, 128, 128, 3, 8), _cfg(256, 128, 128, 4, 8),
        _cfg(128, 256, 128, 4, 8), _cfg(128, 128, 256, 3, 8), _cfg(128, 128, 128, 4, 8)],
    4: [_cfg(128, 256, 128, 3, 8), _cfg(256, 128, 128, 3, 8), _cfg(128, 128, 128, 4, 8),
        _cfg(128, 256, 256, 3, 8), _cfg(128, 128, 256, 4, 8), _cfg(256, 128, 256, 3, 8)],
}
MID_CONFIGS = {
    8: [_cfg(64, 128, 128, 4, 4), _cfg(64, 256, 128, 3, 8), _cfg(128, 128, 128, 4, 8),
        _cfg(64, 64, 256, 4, 4), _cfg(128, 64, 128, 4, 4)],
    4: [_cfg(64, 128, 256, 4, 4), _cfg(64, 256, 128, 3, 8), _cfg(128, 128, 128, 4, 8),
        _cfg(64, 64, 256, 4, 4), _cfg(128, 64, 256, 4, 4)],
}
INTERPRET_CONFIG = [_cfg(16, 32, 64, 1, 4, group=2)]


# EVEN_K for the autotuned launches is decided on the host for every candidate at once: K a multiple
# of the largest candidate BLOCK_K (a multiple of every other), so no config reads past K unmasked.
MAX_BLOCK_K = 256


@functools.lru_cache(maxsize=None)
def _tuned(regime: str, bits: int, tune: bool):
    """An autotuned view of the kernel for one regime and format (separate caches per regime);
    tune=False (FQ_TUNE=0): the first candidate only."""
    if _INTERPRET:
        configs = INTERPRET_CONFIG
    else:
        configs = (LARGE_CONFIGS if regime == "large" else MID_CONFIGS)[bits]
    return triton.autotune(configs=configs if tune else configs[:1], key=["M_BUCKET", "N", "K"])(int_gemm_kernel)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def decode_config(m: int, n: int, k: int, bits: int, sms: int):
    """Split-K GEMV-style tiling for M <= 16: (BLOCK_N, BLOCK_K, split, k_per_split, warps, stages).

    The weight is the whole cost.  Below ~32 MB of weight the zeroed workspace and the extra epilogue
    launch cost more than split-K gains (no split, BLOCK_N=32); above, BLOCK_N=64 and K split until ~8
    programs per SM (2 for INT8 at M > 1).  Why these thresholds: benchmarks/NOTES-kernels.md."""
    block_k = (256 if bits == 8 else 512) // (4 if _INTERPRET else 1)  # 256 weight bytes a row a stage
    weight_bytes = n * k // (2 if bits == 4 else 1)
    k_blocks = triton.cdiv(k, block_k)
    if weight_bytes < (32 << 20) and not _INTERPRET:
        return 32, block_k, 1, k_blocks * block_k, 4, 4
    block_n = 32 if _INTERPRET else 64
    per_sm = 8 if (bits == 4 or m == 1) else 2
    split = max(1, min(triton.cdiv(per_sm * sms, triton.cdiv(n, block_n)), k_blocks // 2 or 1))
    k_per = triton.cdiv(k_blocks, split) * block_k
    return block_n, block_k, triton.cdiv(k, k_per), k_per, 4, 4


FP8_INT4 = False  # INT4 on FP8 e4m3 tensor cores instead of INT8 ones (kept False: see NOTES-kernels.md)
# TMA persistent kernel for M > 256, one tile shape per format (BLOCK_M, BLOCK_N, BLOCK_K, stages,
# warps); None keeps that format on the autotuned pointer kernel.
TMA_CONFIG = {8: (256, 128, 128, 4, 8), 4: (256, 128, 256, 3, 8)}
TMA_MIN_M = 257


def _tma_ok(t: torch.Tensor) -> bool:
    """The copy engine wants a unit inner stride and 16-byte aligned rows (1-byte elements)."""
    return t.dim() == 2 and t.stride(1) == 1 and t.stride(0) % 16 == 0 and t.storage_offset() % 16 == 0


def _traced(t: torch.Tensor) -> bool:
    """True while Inductor traces this op's body (fake/functional tensors).  Host-side TMA
    descriptors hold their tensor, and Inductor (torch 2.11) then keeps that fake tensor as a graph
    constant, which its FX-graph cache cannot hash ("tolist() ... unallocated storage" at M > 256).
    Traced calls therefore take the pointer kernel; eager calls keep TMA."""
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(t) or torch._is_functional_tensor(t)


def _launch_tma(a, wq, out, bias_arg, scale, row_arg, m, n, k, bits, cfg, has_bias, epilogue, act, has_row):
    from triton.tools.tensor_descriptor import TensorDescriptor
    bm, bn, bk, stages, warps = cfg
    if out.element_size() > 2 and bits == 8:
        stages = min(stages, 3)  # a 4-byte output tile's layout change needs the smem of one stage
    kb = bk // 2 if bits == 4 else bk
    a_desc = TensorDescriptor.from_tensor(a, [bm, kb])
    b_desc = TensorDescriptor.from_tensor(wq, [bn, kb])
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    progs = min(tiles, _sm_count(a.device.index or 0) if a.is_cuda else 4)
    torch.library.wrap_triton(int_gemm_tma_kernel)[(progs,)](
        a_desc, b_desc, out, bias_arg, scale, row_arg, m, n, k, progs, out.stride(0), out.stride(1),
        HAS_BIAS=has_bias, INT4=bits == 4, EPILOGUE=epilogue, ACT=act, HAS_ROW=has_row, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8,
        num_warps=warps, num_stages=stages)


def int_linear_cuda(xq, wq, scale, bias, out_dtype, bits, *, fp8=None, raw_int32=False, config=None, act="none",
                    row_scale=None):
    """Launch the GEMM; scale is a float32 [N] vector (or a number: every channel the same); row_scale
    the per-token scales (float32, one per row of xq) or None;
    raw_int32=True returns the exact int32 accumulator (for tests); config (a triton.Config) forces the
    pointer kernel with that tiling for M > 16 (tests cover each candidate without timing it);
    act "relu" applies ReLU in the epilogue."""
    if act not in ("none", "relu"):
        raise ValueError(f"unknown epilogue activation {act!r}")
    fp8 = FP8_INT4 if fp8 is None else fp8
    fp8 = bool(fp8) and bits == 4
    lead = xq.shape[:-1]
    a = xq.reshape(-1, xq.shape[-1])
    m, kp = a.shape
    n = wq.shape[0]
    k = kp * 2 if bits == 4 else kp
    out = torch.empty((m, n), dtype=torch.int32 if raw_int32 else out_dtype, device=xq.device)
    if m == 0 or n == 0:
        return out.reshape(*lead, n)
    has_bias = bias is not None and not raw_int32
    bias_arg = bias.float().contiguous() if has_bias else out
    scale = per_channel(scale, n, xq.device).contiguous()
    has_row = row_scale is not None and not raw_int32
    row_arg = row_scale.reshape(-1).float().contiguous() if has_row else scale
    m_bucket = min(triton.next_power_of_2(m), 8192)
    relu = 1 if act == "relu" and not raw_int32 else 0
    common = dict(HAS_BIAS=has_bias, INT4=bits == 4, FP8=fp8, ACT=relu, HAS_ROW=has_row)
    if k == 0:  # empty reduction: the result is the bias (or zero)
        out.fill_(0)
        if has_bias:
            y = out.float() * scale + bias_arg
            out.copy_((torch.relu(y) if relu else y).to(out.dtype))
        return out.reshape(*lead, n)

    if m <= 16:
        sms = _sm_count(xq.device.index or 0) if xq.is_cuda else 4
        bn, bk, split, k_per, warps, stages = decode_config(m, n, k, bits, sms)
        if split > 1:
            ws = torch.zeros((m, n), dtype=torch.int32, device=xq.device)
            target, epi = ws, 2
        else:
            target, epi = out, 0 if raw_int32 else 1
        grid = (triton.cdiv(n, bn), split)
        torch.library.wrap_triton(int_gemm_kernel)[grid](
            a, wq, target, bias_arg, scale, row_arg, m, n, k, 16, k_per,
            a.stride(0), a.stride(1), wq.stride(0), wq.stride(1), target.stride(0), target.stride(1),
            EPILOGUE=epi, EVEN_K=k % bk == 0 and k_per % bk == 0, BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=1,
            num_warps=warps, num_stages=stages, **common)
        if split > 1:
            if raw_int32:
                return ws.reshape(*lead, n)
            block = 1024
            torch.library.wrap_triton(dequant_kernel)[(triton.cdiv(m * n, block),)](
                ws, bias_arg, out, scale, row_arg, m, n, HAS_BIAS=has_bias, ACT=relu, HAS_ROW=has_row, BLOCK=block)
        return out.reshape(*lead, n)

    tma_cfg = TMA_CONFIG.get(bits)
    if (config is None and not fp8 and tma_cfg is not None and m >= TMA_MIN_M and _tma_ok(a) and _tma_ok(wq)
            and kp >= 16 and not _traced(a)):
        if _INTERPRET:
            tma_cfg = (32, 32, 64, 1, 4)
        _launch_tma(a, wq, out, bias_arg, scale, row_arg, m, n, k, bits, tma_cfg, has_bias, 0 if raw_int32 else 1,
                    relu, has_row)
        return out.reshape(*lead, n)

    kernel = _tuned("mid" if m <= 256 else "large", bits, tuning())
    launch_meta = {}
    even_k = k % (INTERPRET_CONFIG[0].kwargs["BLOCK_K"] if _INTERPRET else MAX_BLOCK_K) == 0
    if config is not None:
        kernel, launch_meta = int_gemm_kernel, dict(config.kwargs, num_warps=config.num_warps,
                                                    num_stages=config.num_stages)
        even_k = k % config.kwargs["BLOCK_K"] == 0

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), 1)

    torch.library.wrap_triton(kernel)[grid](
        a, wq, out, bias_arg, scale, row_arg, m, n, k, m_bucket, k,
        a.stride(0), a.stride(1), wq.stride(0), wq.stride(1), out.stride(0), out.stride(1),
        EPILOGUE=0 if raw_int32 else 1, EVEN_K=even_k, **common, **launch_meta)
    return out.reshape(*lead, n)


def int8_linear_cuda(xq, wq, scale, bias, out_dtype, act="none", row_scale=None):
    return int_linear_cuda(xq, wq, scale, bias, out_dtype, 8, act=act, row_scale=row_scale)


def int4_linear_cuda(xq, wq, scale, bias, out_dtype, act="none", row_scale=None):
    return int_linear_cuda(xq, wq, scale, bias, out_dtype, 4, act=act, row_scale=row_scale)

