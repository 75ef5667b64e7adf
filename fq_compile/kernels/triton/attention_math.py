"""The per-block math of `fq::attention`'s Triton kernels (kernels/triton/attention.py, the generic one, and
kernels/triton/attention_hopper.py, the Hopper prefill), in one place so that both compute the
reference's bits by construction: the scores (`_scores`) and one online-softmax step (`_update`), with
the rounding helpers they need.  Why each step is written as it is: fq_compile/kernels/attention.py
and kernels/triton/attention.py's docstrings.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from fq_compile.kernels.attention import EXP2_C, LOG2E, P_QMAX
# the explicitly rounded float ops, one definition for every kernel (interpreter and GPU forms)
from fq_compile.kernels.triton.flatten_quantize import _div_rn, _mul_rn, _rint_small  # noqa: F401

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

_C1: tl.constexpr = tl.constexpr(EXP2_C[0])
_C2: tl.constexpr = tl.constexpr(EXP2_C[1])
_C3: tl.constexpr = tl.constexpr(EXP2_C[2])
_LOG2E: tl.constexpr = tl.constexpr(LOG2E)
_PQ: tl.constexpr = tl.constexpr(P_QMAX)

if _INTERPRET:
    @triton.jit
    def _to_e4m3(p):
        """p in [0, 1] -> e4m3, rounded to nearest even.  The interpreter's float -> fp8 conversion
        mis-rounds (triton 3.9: 0.497 -> 0.25) but converts grid values exactly, so round onto the
        e4m3 grid first: steps of 2**(e - 3) in binade e, 2**-9 below 2**-6 (subnormals)."""
        e = tl.maximum(((p.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6) - 3
        step = ((e + 127) << 23).to(tl.float32, bitcast=True)
        inv = ((127 - e) << 23).to(tl.float32, bitcast=True)
        return (_rint_small(p * inv) * step).to(tl.float8e4nv)

    @triton.jit
    def _to_out(x, dtype: tl.constexpr):
        """The interpreter casts float32 -> bfloat16 by truncation (the GPU rounds to nearest even):
        round the bits first, then the cast is exact."""
        if dtype == tl.bfloat16:
            b = x.to(tl.uint32, bitcast=True)
            x = ((b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        return x.to(dtype)
else:
    @triton.jit
    def _to_e4m3(p):
        return p.to(tl.float8e4nv)   # cvt.rn.satfinite: round to nearest even

    @triton.jit
    def _to_out(x, dtype: tl.constexpr):
        return x.to(dtype)           # round to nearest even


@triton.jit
def _packed_rows(pid_m, pid_bh, HKV, M, REP, BLOCK_M: tl.constexpr):
    """The BLOCK_M packed rows of program (pid_m, pid_bh) over kv head g of batch b: row r is query position
    r // REP of query head g * REP + r % REP, so the REP heads sharing a key head share its key tiles.
    Returns (b, g, row_ok, qpos, h)."""
    b = (pid_bh // HKV).to(tl.int64)
    g = pid_bh % HKV
    r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = r < M * REP
    qpos = tl.where(row_ok, r // REP, 0)
    return b, g, row_ok, qpos, g * REP + r % REP


@triton.jit
def _normalized(acc, l_i, vs):
    """The softmax's division and V's scale: acc * fl(vs / l) per row (explicitly rounded), and 0 for a row
    that saw no key (l = 0)."""
    ratio = _div_rn(vs, tl.where(l_i > 0, l_i, 1.0))
    return tl.where(l_i[:, None] > 0, _mul_rn(acc, ratio[:, None]), 0.0)


@triton.jit
def _key_bounds(pid_m, M, N, REP, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """(hi, full) for query tile pid_m (BLOCK_M packed rows, REP query heads per key head): the keys any
    of its rows sees end at hi; below `full` (a multiple of BLOCK_N) every row sees every key, so those
    blocks need no causal mask."""
    if CAUSAL:
        q_lo = (pid_m * BLOCK_M) // REP
        q_hi = tl.minimum((pid_m * BLOCK_M + BLOCK_M - 1) // REP, M - 1)
        hi = tl.minimum(N, q_hi + 1)
        full = (tl.minimum(N, q_lo + 1) // BLOCK_N) * BLOCK_N
    else:
        hi = N
        full = (N // BLOCK_N) * BLOCK_N
    return hi, full


@triton.jit
def _exp2q(x, EXP_HW: tl.constexpr):
    """exp2q of the reference (0 below -126; -inf -> 0), or the hardware exp2 when EXP_HW."""
    if EXP_HW:
        return tl.exp2(x)
    xc = tl.maximum(x, -126.0)
    n = tl.floor(xc)
    f = xc - n
    p = _mul_rn(f, _C3) + _C2
    p = _mul_rn(p, f) + _C1
    p = _mul_rn(p, f) + 1.0
    two_n = ((n.to(tl.int32) + 127) << 23).to(tl.float32, bitcast=True)
    return tl.where(x < -126.0, 0.0, _mul_rn(p, two_n))


@triton.jit
def _scores(q, k, c, QK_INT8: tl.constexpr, QK_PROMOTE: tl.constexpr):
    """t = fl(S * c) for one kv block: S = Q.K^T (k: [BLOCK_N, D]) on the tensor cores, exact int32 for INT8."""
    if QK_INT8:
        s = tl.dot(q, tl.trans(k), out_dtype=tl.int32).to(tl.float32)
    elif QK_PROMOTE > 0:
        s = tl.dot(q, tl.trans(k), out_dtype=tl.float32, max_num_imprecise_acc=QK_PROMOTE)
    else:
        s = tl.dot(q, tl.trans(k), out_dtype=tl.float32)
    return _mul_rn(s, c[:, None])


@triton.jit
def _update(acc, l_i, m_i, t, v, PV_INT8: tl.constexpr, EXP_HW: tl.constexpr, PV_F16: tl.constexpr,
            BLOCK_M: tl.constexpr):
    """One online-softmax step over a kv block of (masked) scores t and values v [BLOCK_N, DV]."""
    m_new = tl.maximum(m_i, tl.max(t, 1))
    u = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = _exp2q(m_i - u, EXP_HW)
    p = _exp2q(t - u[:, None], EXP_HW)
    if PV_INT8:
        pq = _rint_small(_mul_rn(p, _PQ))
        l_blk = tl.sum(pq, 1)                      # integers <= 127 * 128: exact in any order
        pv = tl.dot(pq.to(tl.int8), v, out_dtype=tl.int32).to(tl.float32)
    else:
        p8 = _to_e4m3(p)
        l_blk = tl.sum(p8.to(tl.float32), 1)       # multiples of 2**-9 below 128: exact in any order
        if PV_F16 == 1 or (PV_F16 == 0 and BLOCK_M >= 64):
            # e4m3 values are exact in float16, and so are their products in the float32 sum: the
            # same P.V on the float16 tensor cores.  Why not the e4m3 ones: with P in registers
            # straight from the QK^T accumulator, Triton 3.6's wgmma path (BLOCK_M >= 64) computes a
            # wrong P.V (relative error ~0.7; benchmarks/device/attention_probe.py), while the
            # 16-row mma.sync tile and e4m3 operands loaded from memory are right.
            pv = tl.dot(p8.to(tl.float16), v.to(tl.float16), out_dtype=tl.float32)
        else:
            pv = tl.dot(p8, v, out_dtype=tl.float32)
    l_i = _mul_rn(l_i, alpha) + l_blk
    acc = _mul_rn(acc, alpha[:, None]) + pv
    return acc, l_i, m_new


def _hint(x) -> int:
    """A concrete size for a tuning decision (regime, autotune bucket).  Under Inductor a dynamic size
    is a SymInt: take its example value without a guard (power-of-two arithmetic on it would build a
    symbolic expression and a guard per bucket); the choice only picks a tiling, never the result."""
    if isinstance(x, torch.SymInt):
        hint = x.node.hint
        return int(hint) if hint is not None else 4096
    return int(x)
