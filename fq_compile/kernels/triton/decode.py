"""Weight-streaming decode kernel for `fq::flat_linear` (M <= 64 rows): flatten + quantize fused
into the prologue, dequantize + bias into the epilogue, INT8 or packed INT4 weights.

    y[m, n] = float32(sum_p w[n, p] * q[m, p]) * scale[n] + bias[n]
    q[m, p] = the flatten_quantize integer of x[m, src[p]] (flatten_quantize.py)

With per-token scales (rmult given) the prologue multiplies by fl(qmax / r[m]) as well, and the
epilogue by r[m] before scale[n], r[m] being each row's maximum (flatten_quantize.py): the caller's
(`r`: the lowering has Inductor compute it, with the quantized activation `xq`, beside the kernel
that produces x), or, without it, written by one more small kernel first (row_absmax_kernel: one program
over the whole row, 7 us a call on the H100 at K = 20480).  Given `xq`, the variants on a quantized
activation read it instead of launching flatten_quantize.

At decode sizes the product is a matrix-vector product per row: every weight byte is read once and
used M times, so the kernel's speed is the speed at which it streams the weight.  Layout of the work:

  * swapped operands: each program owns BLOCK_N output channels (the MMA's M side, 64-128 wide)
    and all M rows (the MMA's N side, padded to 16/32/64), so the tensor cores stay busy at M = 1
    and the activation tile is small;
  * split-K: the grid is (N tiles, K splits), enough programs to keep every SM streaming; each
    program walks SPLIT_BLOCKS tiles of BLOCK_K weight columns;
  * prologue: for its K tile a program loads the four per-position constants (src, mult, lo, hi:
    shared by all programs, so they come from L2), gathers x[m, src[p]] for its rows and quantizes
    them in registers with exactly flatten_quantize's integer steps (one rounded multiply, rint,
    integer slice); INT4 positions 2j / 2j+1 meet the low / high nibbles of weight byte j, which are
    unpacked in registers (`_nibbles`) and multiplied separately (the dot product does not care
    about the order of K), so only packed bytes cross memory;
  * epilogue: with one split, scale[n] * acc (an explicitly rounded multiply) + bias[n], cast, store.
    With several, each program adds its int32 partial tile into a workspace with integer atomics
    (exact, order-free), then takes a ticket on its N tile's counter; the program that draws the
    last ticket reads the total back while zeroing it (atomic exchange), resets the counter and
    writes the output: no second kernel and no memset.  The workspace is therefore all zeros
    between calls; it is allocated once per device (`reserve`, which the lowering calls at compile
    time, never inside a CUDA graph capture) and shared by every layer, so calls must not run
    concurrently on two streams.

Which way a call runs is measured, not assumed: per (GPU, bits, N, K, row bucket (`tune_rows`: the
power of two >= M), static or per-token scales, quantized activation given or not) the tuner times
nine candidates on first use, each replayed from a CUDA graph with L2 flushed before every call, as a
decode step runs it (`replay_ms`; well under a second a shape; never inside a CUDA graph capture): the
fused kernel in two tilings (`FUSED_TILINGS`), the same kernel on the quantized activation (two tilings;
no prologue work, which every N tile otherwise repeats), the prefill GEMM op on it, and for M <= 4 the
pre-quantized activation times the weights on the CUDA cores (the same kernel without tl.dot, two tilings,
and its dp4a form over 32-bit words, two tilings; a larger M times them as never fitting).  The choice is kept in memory and in `decode_tune.json` under
$FQ_CACHE_DIR (or ~/.cache/fq_compile), so later processes never re-time.
Under TRITON_INTERPRET=1 one small configuration runs, so CPU tests cover the split and unsplit
epilogues bit for bit.
"""

from __future__ import annotations

import functools
import json
import os

import torch
import triton
import triton.language as tl

from fq_compile.kernels.triton.flatten_quantize import (_quantize_rows, _quantize_vals, _row_inverse,
                                                       flatten_quantize_cuda, flatten_quantize_rows_cuda,
                                                       row_absmax_kernel)
from fq_compile.kernels.triton.gemm import NIBBLES_ASM, _mul_rn, _nibbles
from fq_compile.kernels import stopwatch
from fq_compile.kernels.triton.tuning import tuning

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DECODE_MAX_M = 64


# The "dp4a" variant (pre-quantized activation, M <= GEMV_MAX_M; INT8: words of 4 int8, one dp4a each, `_word_dot8`;
# INT4 as follows): 32-bit words of 8 nibbles, weight
# and activation paired position by position (byte i of a word holds positions 2i, low nibble, and 2i + 1), so
# one word of each gives 8 products, summed by two dp4a instructions on the CUDA cores: no tensor-core operand
# layout to convert the weight tile into (the tl.dot path converts two nibble tiles per K tile, which on the
# H100 cost INT4 1.42x INT8's time per weight byte).  A weight nibble w (two's complement) is used as
# u = w + 8 = (its 4 bits) ^ 8, unsigned, so unpacking a word's 8 nibbles is an and-xor and a shift-and-xor
# (no sign extension): sum(w x) = sum(u x) - 8 sum(x), and sum(x) over a K tile does not depend on the output
# channel, so each program subtracts it once per tile and row (`_word_sum`).  The activation's words are
# split into their even and odd positions (sign-extended int8) once per K tile (`_split_words`).  The
# interpreter has no inline assembly: there `_split_words` passes the word through and `_word_dot` /
# `_word_sum` take the 8 nibbles apart with shifts (the same integers).
if _INTERPRET:
    @triton.jit
    def _split_words(x):
        return x, x

    @triton.jit
    def _word_dot(w, xe, xo):
        acc = tl.zeros_like(w)
        for i in tl.static_range(8):
            acc += (((w >> (4 * i)) & 15) ^ 8) * ((xe << (28 - 4 * i)) >> 28)
        return acc

    @triton.jit
    def _word_sum(xe, xo):
        acc = tl.zeros_like(xe)
        for i in tl.static_range(8):
            acc += (xe << (28 - 4 * i)) >> 28
        return acc

    @triton.jit
    def _word_dot8(w, x):
        acc = tl.zeros_like(w)
        for i in tl.static_range(4):
            acc += ((w << (24 - 8 * i)) >> 24) * ((x << (24 - 8 * i)) >> 24)
        return acc
else:
    @triton.jit
    def _split_words(x):
        """int32 words of 8 nibbles -> (4 sign-extended int8 of the even positions, of the odd), as int32."""
        return tl.inline_asm_elementwise(asm=NIBBLES_ASM, constraints="=r,=r,r", args=[x], dtype=(tl.int32, tl.int32),
                                         is_pure=True, pack=1)

    @triton.jit
    def _word_dot(w, xe, xo):
        """sum over a word's 8 positions of (weight nibble + 8) x activation: two dp4a (unsigned x signed)."""
        return tl.inline_asm_elementwise(
            asm="{ .reg .b32 t; "
                "and.b32 t, $1, 0x0F0F0F0F; xor.b32 t, t, 0x08080808; dp4a.u32.s32 $0, t, $2, 0; "
                "shr.u32 t, $1, 4; and.b32 t, t, 0x0F0F0F0F; xor.b32 t, t, 0x08080808; dp4a.u32.s32 $0, t, $3, $0; }",
            constraints="=r,r,r,r", args=[w, xe, xo], dtype=tl.int32, is_pure=True, pack=1)

    @triton.jit
    def _word_sum(xe, xo):
        """sum of a word's 8 activations (split words): two dp4a against ones."""
        return tl.inline_asm_elementwise(
            asm="{ .reg .b32 o; mov.b32 o, 0x01010101; dp4a.s32.s32 $0, $1, o, 0; dp4a.s32.s32 $0, $2, o, $0; }",
            constraints="=r,r,r", args=[xe, xo], dtype=tl.int32, is_pure=True, pack=1)

    @triton.jit
    def _word_dot8(w, x):
        """sum of the 4 products of two words of int8: one dp4a."""
        return tl.inline_asm_elementwise(asm="dp4a.s32.s32 $0, $1, $2, 0;", constraints="=r,r,r", args=[w, x],
                                         dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _quantized_rows(x_ptr, pos, pos_ok, rows, row_ok, src_ptr, mult_ptr, lo_ptr, hi_ptr, stride_xm, stride_xc,
                    inv, QMAX: tl.constexpr, HAS_ROW: tl.constexpr):
    """q[p, m] (int8, [len(pos), BLOCK_M]) for flattened positions `pos` and rows `rows` (HAS_ROW: with
    the rows' per-token multipliers inv [BLOCK_M])."""
    src = tl.load(src_ptr + pos, mask=pos_ok, other=0)
    mult = tl.load(mult_ptr + pos, mask=pos_ok, other=0.0)
    lo = tl.load(lo_ptr + pos, mask=pos_ok, other=0.0)
    hi_q = tl.minimum(tl.load(hi_ptr + pos, mask=pos_ok, other=0.0), QMAX)
    g = tl.load(x_ptr + rows[None, :].to(tl.int64) * stride_xm + src[:, None].to(tl.int64) * stride_xc,
                mask=pos_ok[:, None] & row_ok[None, :], other=0.0)
    if HAS_ROW:
        q = _quantize_rows(g.to(tl.float32), mult[:, None], inv[None, :], lo[:, None], hi_q[:, None])
    else:
        q = _quantize_vals(g.to(tl.float32), mult[:, None], lo[:, None], hi_q[:, None])
    return q.to(tl.int8)


@triton.jit
def flat_linear_decode_kernel(x_ptr, src_ptr, mult_ptr, lo_ptr, hi_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr,
                              ws_ptr, cnt_ptr, r_ptr, M, N, K, stride_xm, stride_xc, stride_wn, stride_wk,
                              stride_om, stride_on,
                              BITS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ROW: tl.constexpr, PREQ: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                              SPLIT_BLOCKS: tl.constexpr, DOT: tl.constexpr = True, DP4A: tl.constexpr = False):
    """out[M, N] = flat_linear(x[M, C]) for one (N tile, K split); K counts flattened positions
    (w has K or K/2 bytes a row); module docstring for the scheme.  PREQ: x is already the quantized
    activation (flatten_quantize's int8 [M, K] or packed uint8 [M, K/2]; src/mult/lo/hi unused) and
    r, with HAS_ROW, its row scales.  DOT=False (the "gemv" variant, BLOCK_M <= GEMV_MAX_M): the
    products on the CUDA cores, broadcast and summed over K, instead of tl.dot (no tensor-core operand
    layout to convert the weight tile into; the integer sums are exact in any order, so the same bits).
    DP4A (PREQ, BLOCK_M <= GEMV_MAX_M, K a multiple of 16 (INT8) or 32 (INT4), rows of x and w at multiples
    of 16 bytes): 32-bit words and dp4a instead (`_word_dot8`, `_word_dot`), one row of x at a time."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    splits = tl.num_programs(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    cols = tl.max_contiguous(tl.multiple_of(offs_n % N, BLOCK_N), BLOCK_N).to(tl.int64)  # loads need no mask
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < M
    QMAX: tl.constexpr = 127.0 if BITS == 8 else 7.0
    r = tl.load(r_ptr + rows, mask=row_ok, other=0.0)         # per-token scales (unused without HAS_ROW)
    inv = r
    if HAS_ROW and not PREQ:
        inv = _row_inverse(r, QMAX)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.int32)
    k_lo = pid_k * (SPLIT_BLOCKS * BLOCK_K)
    k_hi = tl.minimum(K, k_lo + SPLIT_BLOCKS * BLOCK_K)
    if DP4A:
        PER_WORD: tl.constexpr = 32 // BITS          # positions a 32-bit word holds
        KW: tl.constexpr = BLOCK_K // PER_WORD
        ww = tl.arange(0, KW)
        w32 = w_ptr.to(tl.pointer_type(tl.int32))
        x32 = x_ptr.to(tl.pointer_type(tl.int32))
        # the caller guarantees K % (4 PER_WORD) == 0 and row strides of 16 bytes: told to the compiler, the
        # loads and their masks go 16 bytes at a time
        words = tl.multiple_of(K // PER_WORD, 4)
        w_row = tl.multiple_of(stride_wn // 4, 4)
        x_row = tl.multiple_of(stride_xm // 4, 4)
        for k in range(k_lo, k_hi, BLOCK_K):
            j = tl.max_contiguous(tl.multiple_of(k // PER_WORD + ww, KW), KW)   # word j: positions PER_WORD j ..
            j_ok = j < words
            w = tl.load(w32 + cols[:, None] * w_row + j[None, :], mask=j_ok[None, :], other=0)
            for m in tl.static_range(BLOCK_M):
                # row m's mask as a tensor comparison: triton 3.9's interpreter refuses a mask built from
                # a scalar bool (m < M) and a tensor; the compiler folds the zeros
                xw = tl.load(x32 + m * x_row + j, mask=j_ok & (tl.zeros_like(j) + m < M), other=0)
                if BITS == 8:
                    part = tl.sum(_word_dot8(w, xw[None, :]), axis=1)
                else:
                    xe, xo = _split_words(xw)
                    part = (tl.sum(_word_dot(w, xe[None, :], xo[None, :]), axis=1)
                            - 8 * tl.sum(_word_sum(xe, xo), axis=0))
                acc += tl.where(rows[None, :] == m, part[:, None], 0)
    elif BITS == 8:
        kk = tl.arange(0, BLOCK_K)
        for k in range(k_lo, k_hi, BLOCK_K):
            pos = k + kk
            pos_ok = pos < K
            if PREQ:
                q = tl.load(x_ptr + rows[None, :] * stride_xm + pos[:, None] * stride_xc,
                            mask=pos_ok[:, None] & row_ok[None, :], other=0)
            else:
                q = _quantized_rows(x_ptr, pos, pos_ok, rows, row_ok, src_ptr, mult_ptr, lo_ptr, hi_ptr,
                                    stride_xm, stride_xc, inv, QMAX, HAS_ROW)
            w = tl.load(w_ptr + cols[:, None] * stride_wn + pos[None, :] * stride_wk, mask=pos_ok[None, :], other=0)
            acc = _mac(acc, w, q, DOT)
    else:
        KB: tl.constexpr = BLOCK_K // 2
        jj = tl.arange(0, KB)
        for k in range(k_lo, k_hi, BLOCK_K):
            j = k // 2 + jj                       # weight bytes; byte j holds positions 2j (low), 2j+1 (high)
            j_ok = j < K // 2
            if PREQ:                              # packed activation bytes: the same nibble pairs
                q_lo, q_hi = _nibbles(tl.load(x_ptr + rows[None, :] * stride_xm + j[:, None] * stride_xc,
                                              mask=j_ok[:, None] & row_ok[None, :], other=0))
            else:
                q_lo = _quantized_rows(x_ptr, 2 * j, j_ok, rows, row_ok, src_ptr, mult_ptr, lo_ptr, hi_ptr,
                                       stride_xm, stride_xc, inv, QMAX, HAS_ROW)
                q_hi = _quantized_rows(x_ptr, 2 * j + 1, j_ok, rows, row_ok, src_ptr, mult_ptr, lo_ptr, hi_ptr,
                                       stride_xm, stride_xc, inv, QMAX, HAS_ROW)
            pw = tl.load(w_ptr + cols[:, None] * stride_wn + j[None, :] * stride_wk, mask=j_ok[None, :], other=0)
            w_lo, w_hi = _nibbles(pw)
            acc = _mac(_mac(acc, w_lo, q_lo, DOT), w_hi, q_hi, DOT)

    mask = n_ok[:, None] & row_ok[None, :]
    if splits > 1:
        ws = ws_ptr + rows[None, :] * N + offs_n[:, None]
        tl.atomic_add(ws, acc, mask=mask, sem="relaxed")
        ticket = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel")
        if ticket == splits - 1:                  # every other split's partial is in: finish the tile
            acc = tl.atomic_xchg(ws, tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.int32), mask=mask, sem="relaxed")
            tl.atomic_xchg(cnt_ptr + pid_n, 0, sem="relaxed")
            _store(acc, out_ptr, scale_ptr, bias_ptr, r, offs_n, n_ok, rows, mask, stride_om, stride_on, HAS_BIAS,
                   HAS_ROW)
    else:
        _store(acc, out_ptr, scale_ptr, bias_ptr, r, offs_n, n_ok, rows, mask, stride_om, stride_on, HAS_BIAS, HAS_ROW)


@triton.jit
def _mac(acc, w, q, DOT: tl.constexpr):
    """acc [BLOCK_N, BLOCK_M] += w [BLOCK_N, k] @ q [k, BLOCK_M] in int32: tensor cores (DOT) or CUDA cores."""
    if DOT:
        acc = tl.dot(w, q, acc, out_dtype=tl.int32)
    else:
        acc += tl.sum(w.to(tl.int32)[:, :, None] * q.to(tl.int32)[None, :, :], axis=1)
    return acc


@triton.jit
def _store(acc, out_ptr, scale_ptr, bias_ptr, r, offs_n, n_ok, rows, mask, stride_om, stride_on,
           HAS_BIAS: tl.constexpr, HAS_ROW: tl.constexpr):
    """The GEMM ops' epilogue on the transposed tile: rounded float32 multiplies (the row's per-token
    scale first, with HAS_ROW), then the bias add."""
    scale = tl.load(scale_ptr + offs_n, mask=n_ok, other=0.0)
    y = acc.to(tl.float32)
    if HAS_ROW:
        y = _mul_rn(y, r[None, :])
    y = _mul_rn(y, scale[:, None])
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0)[:, None]
    ptrs = out_ptr + rows[None, :].to(tl.int64) * stride_om + offs_n[:, None] * stride_on
    tl.store(ptrs, y.to(out_ptr.dtype.element_ty), mask=mask)


def _cfg(bn, bk, split_blocks, warps, stages):
    return triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_BLOCKS": split_blocks}, num_warps=warps,
                         num_stages=stages)


# BLOCK_K counts flattened positions (an INT4 tile holds half the bytes).  Four tilings: split depth
# (programs in flight vs atomic traffic) and N width (prologue work per weight byte).
CONFIGS = {
    8: [_cfg(128, 128, 4, 4, 4), _cfg(128, 128, 8, 4, 4), _cfg(64, 256, 4, 4, 4), _cfg(128, 256, 8, 8, 3)],
    4: [_cfg(128, 256, 4, 4, 4), _cfg(128, 256, 8, 4, 4), _cfg(64, 512, 4, 4, 4), _cfg(128, 512, 4, 8, 3)],
}
INTERPRET_CONFIG = _cfg(16, 32, 1, 4, 1)

# How a call runs (the tuner times each candidate per shape and row bucket, on the device):
#   "fused"    flatten + quantize in the weight-streaming kernel's prologue (every N tile redoes it);
#   "prequant" flatten_quantize(_rows) once into the integer activation, then the same weight-streaming
#              kernel reading it (one more launch; no prologue work, half the activation bytes at INT4);
#   "gemm"     flatten_quantize(_rows), then the prefill GEMM op (fq::int8/int4_linear): tiles of 64+
#              rows, which can win at M = 16-64.
#   "gemv"     as "prequant", with the products on the CUDA cores instead of tl.dot (DOT=False: no
#              tensor-core operand layout for the weight tile), for M <= GEMV_MAX_M only.
#   "dp4a"     as "gemv" with 32-bit words and dp4a (kernel docstring), for M <= GEMV_MAX_M and K a multiple
#              of 16 (INT8) / 32 (INT4).
VARIANTS = ("fused", "prequant", "gemm", "gemv", "dp4a")
# Which tilings of CONFIGS each variant is timed with: every candidate is a Triton compile and a timing
# on first use (the first generate()'s "decode tuning": 18.7 of its 94.7 s at OPT-13B O3 on the H100).
# Of the 4 fused tilings only 1 and 3 were ever fastest in the H100 measurements (13B shapes, M = 1/16/64,
# results/kernels-decode-2026-12-06-h100.md: fused1 for qkv INT8, fused3 for the FFN INT8 at M = 1;
# prequant or the GEMM everywhere else), and the pre-quantized variants only win more now that the lowering
# hands them the quantized activation; the prequant tilings: the other two add compiles that rarely win
# without a prologue.
FUSED_TILINGS = (1, 3)
PREQUANT_TILINGS = (0, 3)
GEMV_MAX_M = 4                    # the gemv tile holds BLOCK_N x BLOCK_K x rows int32 products in registers
GEMV_CONFIGS = {
    8: [_cfg(64, 256, 8, 4, 3), _cfg(32, 512, 4, 4, 3)],
    4: [_cfg(64, 512, 8, 4, 3), _cfg(32, 1024, 4, 4, 3)],
}


# BLOCK_K counts positions (4 or 8 a word): 64 x 512 (INT8) / 1024 (INT4) is 64 rows x 128 words, 64 int32
# registers a thread at 4 warps.  INT4's third tiling: more, smaller programs for a small weight.  At OPT-13B's
# 5120 x 6400 (the out projection) both others launch 160 programs for 132 SMs, and the kernel ran at 49% of copy
# bandwidth there (11.3 us for 16 MB; 77-78% on fc1/fc2 with 560-640 programs: results/kernels-decode-2026-12-07-
# h100-970198a.md); 32 x 1024 over 2 tiles a program launches 640.  Whether it wins is the tuner's to measure.
DP4A_CONFIGS = {8: [_cfg(64, 512, 4, 4, 3), _cfg(32, 1024, 4, 4, 3)],
                4: [_cfg(64, 1024, 4, 4, 3), _cfg(32, 2048, 4, 4, 3), _cfg(32, 1024, 2, 4, 3)]}


def candidates(bits: int) -> list[tuple[str, triton.Config | None]]:
    """Every (variant, tiling) the tuner times, in a fixed order (the disk table stores indices)."""
    return ([("fused", CONFIGS[bits][i]) for i in FUSED_TILINGS] + [("prequant", CONFIGS[bits][i]) for i in PREQUANT_TILINGS]
            + [("gemm", None)] + [("gemv", c) for c in GEMV_CONFIGS[bits]]
            + [("dp4a", c) for c in DP4A_CONFIGS.get(bits, [])])


def config_name(bits: int, cand) -> str:
    """fusedI / prequantI (tiling I of CONFIGS[bits]), gemvI (of GEMV_CONFIGS), dp4aI (of DP4A_CONFIGS), gemm."""
    variant, cfg = cand
    if variant == "gemm":
        return "gemm"
    table = {"gemv": GEMV_CONFIGS, "dp4a": DP4A_CONFIGS}.get(variant, CONFIGS)[bits]
    return f"{variant}{table.index(cfg)}"


# ------------------------------------------------------------------------------------------------
# bounded autotuning: the candidates above timed once per (GPU, bits, N, K, row bucket, scales)
# ------------------------------------------------------------------------------------------------

_BEST: dict[tuple, int] = {}
TUNE_FILE = "decode_tune.json"


def _tune_path():
    from fq_compile.kernels.cutlass.gemm import cache_root

    return cache_root() / TUNE_FILE


def _load_tuned() -> dict:
    try:
        return json.loads(_tune_path().read_text())
    except (OSError, ValueError):
        return {}


def _save_tuned(key: str, index: int) -> None:
    """Merge one choice into the on-disk table (best effort: a read-only cache only costs re-tuning)."""
    try:
        path = _tune_path()
        data = _load_tuned()
        data[key] = index
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        tmp.replace(path)
    except OSError:
        pass


def replay_ms(fn, device, reps: int = 8, rounds: int = 5) -> float:
    """GPU milliseconds of one fn() as decode runs it: replayed from a CUDA graph (static-cache decode
    replays its steps; timed eagerly, a candidate of two or three small launches would pay the host's
    launch time, which a replay does not: on the H100, eager timing picked candidates 0.79-0.96x as
    fast as the best replayed one), with L2 flushed before each call (in a decode step every other
    layer's weights pass through L2 between two calls of a layer; without the flush a weight that
    fits in L2 would be timed at L2 speed).  The flush's own time, replayed alone, is subtracted."""
    device = torch.device(device)
    flush = torch.empty(2 * torch.cuda.get_device_properties(device).L2_cache_size, dtype=torch.int8, device=device)
    fn()                                    # compiles, and tunes what fn calls, outside the capture
    torch.cuda.synchronize(device)

    def graph(body):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(reps):
                flush.zero_()
                body()
        return g

    def median_ms(g):
        g.replay()
        times = []
        for _ in range(rounds):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            g.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return sorted(times)[rounds // 2]

    both, alone = graph(fn), graph(lambda: None)
    return max(0.0, median_ms(both) - median_ms(alone)) / reps


def _choose(bits: int, n: int, k: int, bucket: int, rows: bool, device: torch.device, run, given: bool = False):
    """The fastest (variant, tiling) for this shape, row bucket, kind of scales (rows: per-token) and
    whether the caller passed the quantized activation (given: the pre-quantized variants then launch
    no quantize, so the ranking differs):
    from memory, from the disk table (shared by processes: a second process never re-times), else
    timed now (every candidate, replay_ms), except during a CUDA graph capture, where nothing may
    synchronize: then the first candidate, not remembered."""
    cands = candidates(bits)
    if _INTERPRET:
        return "fused", INTERPRET_CONFIG
    name = torch.cuda.get_device_name(device)
    key = (name, bits, n, k, bucket, rows, given)
    if key in _BEST:
        return cands[_BEST[key]]
    skey = (f"{name}|{triton.__version__}|int{bits}|n{n}|k{k}|rows{bucket}|{'token' if rows else 'tensor'}"
            f"{'|xq given' if given else ''}|{len(cands)} candidates")
    disk = _load_tuned().get(skey)
    if isinstance(disk, int) and 0 <= disk < len(cands):
        _BEST[key] = disk
        return cands[disk]
    if torch.cuda.is_current_stream_capturing() or not tuning():
        return cands[0]
    times = []
    with stopwatch.stage("decode tuning"):
        for cand in cands:
            try:
                times.append(replay_ms(lambda cand=cand: run(*cand), device))
            except Exception:  # a candidate that does not fit this GPU (shared memory): never chosen
                times.append(float("inf"))
    best = min(range(len(cands)), key=times.__getitem__)
    _BEST[key] = best
    _save_tuned(skey, best)
    return cands[best]


# ------------------------------------------------------------------------------------------------
# the workspace: int32 [DECODE_MAX_M, N] sums + int32 tile counters, all zero between calls
# ------------------------------------------------------------------------------------------------

_WORKSPACE: dict = {}
MIN_BLOCK_N = 16


def reserve(device: torch.device, n: int) -> None:
    """Allocate (or grow) the device's workspace for N outputs; outside CUDA graph capture only."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    have = _WORKSPACE.get(device)
    if have is not None and have[0] >= n:
        return
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(f"fq::flat_linear needs its workspace for N={n} on {device}, and a CUDA graph is being "
                           "captured: call fq_compile.kernels.flat_linear.reserve(device, N) before capturing "
                           "(the flattenquant backend does this when it compiles)")
    n = max(n, have[0] if have else 0)
    sums = torch.zeros(DECODE_MAX_M * n, dtype=torch.int32, device=device)
    counters = torch.zeros(triton.cdiv(n, MIN_BLOCK_N), dtype=torch.int32, device=device)
    _WORKSPACE[device] = (n, sums, counters)


def _workspace(device: torch.device, n: int):
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    reserve(device, n)
    return _WORKSPACE[device][1:]


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _unfused(x, src, mult, lo, hi, rmult, bits):
    """flatten_quantize(_rows) on the device: (integer activation, row scales or None)."""
    if rmult is None:
        return flatten_quantize_cuda(x, src, mult, lo, hi, bits), None
    return flatten_quantize_rows_cuda(x, src, mult, lo, hi, rmult, bits)


def _gemm(x, src, mult, lo, hi, bits, wq, scale, bias, out_dtype, rmult, r=None, xq=None):
    """flatten_quantize(_rows) + the GEMM op; xq, r: x quantized by the caller (then no quantize)."""
    op = torch.ops.fq.int4_linear if bits == 4 else torch.ops.fq.int8_linear
    if xq is None:
        xq, r = _unfused(x, src, mult, lo, hi, rmult, bits)
    return op(xq, wq, scale, bias, out_dtype) if r is None else op(xq, wq, scale, bias, out_dtype, row_scale=r)


def tune_rows(m: int) -> int:
    """The row bucket a choice is tuned and remembered for: the power of two >= M.  Finer than the
    kernel's BLOCK_M (at least 16, for tl.dot): on the H100 the best candidate at M = 1 and at M = 16
    differ (fc1 INT8: fused3 at M = 1, the GEMM at M = 16, 1.7x faster there), and one bucket for
    both ran M = 16 with M = 1's choice (benchmarks/results/kernels-decode-2026-12-06-h100.md)."""
    return triton.next_power_of_2(max(m, 1))


def compile_sm90(bits: int, variant: str, cfg: triton.Config, block_m: int = 1):
    """The weight-streaming kernel as `variant` (not "gemm") with tiling `cfg` would run it with a
    pre-quantized activation ("fused": quantizing in its prologue) and per-token scales, compiled ahead of
    time for sm_90 with Triton's own ptxas (no GPU needed), specialized as a launch with every pointer and
    integer divisible by 16 is: Triton's CompiledKernel (.asm["ptx"], ["cubin"]), for tests and
    benchmarks/decode_sass.py.  block_m: the rows of the gemv / dp4a forms (the tl.dot forms pad to 16)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = flat_linear_decode_kernel
    floats = ("mult_ptr", "lo_ptr", "hi_ptr", "scale_ptr", "bias_ptr", "r_ptr")
    sig = {n: "*i8" if n in ("x_ptr", "w_ptr") else "*fp32" if n in floats else "*i32" for n in kernel.arg_names[:12]}
    sig.update({"x_ptr": "*fp16" if variant == "fused" else "*i8", "out_ptr": "*fp16"})
    sig.update({n: "i32" for n in kernel.arg_names[12:21]})
    cx = dict(BITS=bits, HAS_BIAS=True, HAS_ROW=True, PREQ=variant != "fused", DOT=variant != "gemv",
              DP4A=variant == "dp4a", BLOCK_M=block_m if variant in ("gemv", "dp4a") else 16, **cfg.kwargs)
    sig.update({n: "constexpr" for n in cx})
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(21)}
    return triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=cx, attrs=attrs),
                          target=GPUTarget("cuda", 90, 32), options=dict(num_warps=cfg.num_warps,
                                                                         num_stages=cfg.num_stages))


def _word_aligned(*ts: torch.Tensor) -> bool:
    return all(t.stride(-1) == 1 and t.stride(0) % 16 == 0 and t.data_ptr() % 16 == 0 for t in ts)


def flat_linear_cuda(x, src, mult, lo, hi, bits, wq, scale, bias, out_dtype, *, rmult=None, r=None, xq=None,
                     config=None):
    """fq::flat_linear on CUDA (and, under TRITON_INTERPRET=1, on the CPU): for M <= DECODE_MAX_M
    rows the fastest measured of the weight-streaming kernel (fused or on a pre-quantized activation)
    and flatten_quantize + the GEMM op; above, the latter.  rmult: per-token scales; xq, r: x quantized
    and its row maxima (both or neither) if the caller computed them (else small kernels compute them
    here).  config forces
    one candidate: a (variant, triton.Config or None) pair, or a triton.Config for the fused variant
    (tests cover each candidate without timing it)."""
    lead = x.shape[:-1]
    n = wq.shape[0]
    m = 1
    for d in lead:
        m *= d
    if m > DECODE_MAX_M:
        return _gemm(x, src, mult, lo, hi, bits, wq, scale, bias, out_dtype, rmult, r, xq)
    x2 = x.reshape(m, x.shape[-1])
    r2 = None if r is None else r.reshape(m).contiguous()
    xq2 = None if xq is None else xq.reshape(m, xq.shape[-1])
    k = src.shape[0]
    if m == 0 or n == 0:
        return torch.empty((*lead, n), dtype=out_dtype, device=x.device)
    sums, counters = _workspace(x.device, n)
    has_bias = bias is not None
    bias_arg = bias if has_bias else scale
    row_bucket = max(16, triton.next_power_of_2(m))

    def run(variant, cfg):
        if variant == "gemm":
            return _gemm(x2, src, mult, lo, hi, bits, wq, scale, bias, out_dtype, rmult, r2, xq2)
        if variant in ("gemv", "dp4a") and m > GEMV_MAX_M:
            raise ValueError(f"flat_linear: the {variant} variant takes at most {GEMV_MAX_M} rows, got {m}")
        if variant == "dp4a" and k % (128 // bits):
            raise ValueError(f"flat_linear: the dp4a variant takes K' a multiple of {128 // bits} at int{bits}, "
                             f"got K'={k}")
        out = torch.empty((m, n), dtype=out_dtype, device=x.device)
        a = x2
        r = scale                   # a float32 pointer the kernel never reads without HAS_ROW
        if variant in ("prequant", "gemv", "dp4a"):
            a, rq = (xq2, r2) if xq2 is not None else _unfused(x2, src, mult, lo, hi, rmult, bits)
            r = r if rq is None else rq
            if variant == "dp4a" and not _word_aligned(a, wq):
                raise ValueError("flat_linear: the dp4a variant reads 16-byte vectors of words: rows of the packed "
                                 "activation and weight must be contiguous and start at multiples of 16 bytes")
        elif r2 is not None:
            r = r2
        elif rmult is not None:
            r = torch.empty(m, dtype=torch.float32, device=x.device)
            row_absmax_kernel[(triton.cdiv(m, 2),)](x2, rmult, r, m, 1, x2.shape[1], x2.stride(0), 0, x2.stride(1),
                                                  BLOCK_M=2, BLOCK_C=32 if _INTERPRET else 1024, num_warps=4)
        meta = cfg.kwargs
        grid = (triton.cdiv(n, meta["BLOCK_N"]), max(1, triton.cdiv(k, meta["SPLIT_BLOCKS"] * meta["BLOCK_K"])))
        flat_linear_decode_kernel[grid](
            a, src, mult, lo, hi, wq, scale, bias_arg, out, sums, counters, r, m, n, k,
            a.stride(0), a.stride(1), wq.stride(0), wq.stride(1), out.stride(0), out.stride(1),
            BITS=bits, HAS_BIAS=has_bias, HAS_ROW=rmult is not None, PREQ=variant != "fused", DOT=variant != "gemv",
            DP4A=variant == "dp4a", BLOCK_M=tune_rows(m) if variant in ("gemv", "dp4a") else row_bucket,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **meta)
        return out

    if config is None:
        config = _choose(bits, n, k, tune_rows(m), rmult is not None, x.device, run, xq is not None)
        if config[0] == "dp4a" and xq2 is not None and not _word_aligned(xq2):
            # tuned on an aligned activation; this call's starts elsewhere: the same products through tl.dot
            config = ("prequant", CONFIGS[bits][PREQUANT_TILINGS[0]])
    elif isinstance(config, triton.Config):
        config = ("fused", config)
    if config[0] not in VARIANTS:
        raise ValueError(f"flat_linear: unknown variant {config[0]!r}; expected one of {VARIANTS}")
    return run(*config).reshape(*lead, n)
