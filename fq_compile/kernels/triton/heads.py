"""CUDA implementation of `fq::quantize_heads` in eager mode: one Triton pass over a [B, H, S, D] tensor.

Why: the op's composite definition (kernels/attention.py) is five aten kernels in eager mode (to
float32, multiply, round, clamp, cast), each reading and writing the whole tensor in float32: at
8 x 2048 tokens with 32 + 8 + 8 heads of 128 that is ~2.5 GB of traffic and measured 1.1-1.5 ms on an
H100 (benchmarks/results/attention-kernel-2026-12-07-h100.md), where reading bf16 and writing 8 bits
once is ~0.3 GB.  Under torch.compile the composite still decomposes (Inductor fuses it with the
rotary embedding that produces Q and K), so this kernel serves eager callers: the benchmark's
"+quant" columns, an un-compiled model's KV cache.

Bits: the reference's, step for step: a = fl(float32(x) * inv[h]) (one rounded multiply, never an
FMA), INT8: rint half to even of a clamped to +-127 (clamping first changes nothing, the bounds are
integers); FP8: kernels/triton/fp8.py's e4m3 rounding (clamp to +-448, ties to even, subnormals
included), assembled into the byte from the float32 bits, exact in the interpreter too.  NaN inputs
are not defined here (the reference's cast of NaN to int8 is not defined either).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from fq_compile.kernels.triton.fp8 import _e4m3_byte, _round_e4m3
from fq_compile.kernels.triton.flatten_quantize import _rint_small
from fq_compile.kernels.triton.gemm import _mul_rn

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def quantize_heads_kernel(X, INV, OUT, ROWS, H, S, D, sxb, sxh, sxs, sxd, sob, soh, sos, sod,
                          TO_INT8: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """BLOCK_R rows (b, h, s) x BLOCK_D channels of X [B, H, S, D] (any strides) -> OUT (its own strides)."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    r_ok = r < ROWS
    ok = r_ok[:, None] & (d[None, :] < D)
    s = (r % S).to(tl.int64)
    h = (r // S) % H
    b = (r // S // H).to(tl.int64)
    x = tl.load(X + (b * sxb + h.to(tl.int64) * sxh + s * sxs)[:, None] + d[None, :] * sxd, mask=ok, other=0.0)
    inv = tl.load(INV + h, mask=r_ok, other=0.0)
    a = _mul_rn(x.to(tl.float32), inv[:, None])
    o_ptrs = OUT + (b * sob + h.to(tl.int64) * soh + s * sos)[:, None] + d[None, :] * sod
    if TO_INT8:
        m = _rint_small(tl.minimum(tl.abs(a), 127.0))
        tl.store(o_ptrs, tl.where(a < 0, -m, m).to(tl.int8), mask=ok)
    else:
        tl.store(o_ptrs, _e4m3_byte(_round_e4m3(a)), mask=ok)


def applies(x: torch.Tensor, inv_scale: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether quantize_heads_cuda takes this call: a 4-d tensor, float32 scales on its device, and no
    autograd to record (the kernel has no backward; the composite does)."""
    return (x.dim() == 4 and dtype in (torch.int8, torch.float8_e4m3fn) and inv_scale.dim() == 1
            and inv_scale.numel() == x.shape[1] and inv_scale.device == x.device
            and not (x.requires_grad and torch.is_grad_enabled()))


def quantize_heads_cuda(x: torch.Tensor, inv_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """quantize_heads_reference's bits in one launch; the output keeps x's memory layout (as the
    composite's elementwise ops do), so a transposed Q stays transposed."""
    b, h, s, d = x.shape
    out = torch.empty_like(x, dtype=dtype)
    rows = b * h * s
    if rows == 0 or d == 0:
        return out
    inv = inv_scale.float().contiguous()
    o = out.view(torch.uint8) if dtype == torch.float8_e4m3fn else out
    br, bd = (4, 32) if _INTERPRET else (32, min(128, triton.next_power_of_2(d)))
    grid = (triton.cdiv(rows, br), triton.cdiv(d, bd))
    torch.library.wrap_triton(quantize_heads_kernel)[grid](
        x, inv, o, rows, h, s, d, *x.stride(), *out.stride(), TO_INT8=dtype == torch.int8, BLOCK_R=br,
        BLOCK_D=bd, num_warps=4)
    return out
