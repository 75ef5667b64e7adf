"""Triton kernel for `fq::attention`: flash attention on the INT8 (or FP8) tensor cores, registered as
the op's CUDA implementation.  The semantics, and why they are bit-reproducible, are in
fq_compile/kernels/attention.py; this file follows them step for step.

One program owns BLOCK_M packed rows of one (batch, kv head): with grouped-query attention the
Hq/Hkv query heads that read a kv head are packed into the rows (row r is query position r // REP of
head g*REP + r % REP), so each K/V tile is loaded once for all of them, and a decode step (one query
position) still fills a 16-row tensor-core tile when REP > 1.  The program walks the keys in blocks of
kv_block (the semantic block: the running max moves once per block), in two phases: blocks visible to
every row of the tile run without bounds or causal checks, the rest (the causal diagonal, the ragged
end) with them; blocks past the tile's last causal position are skipped (they would change nothing).
Scores never leave registers.

QK^T: INT8 x INT8 -> int32 (or FP8 e4m3 -> float32) on the tensor cores, scaled once per element by c
(a per-row float32 vector computed on the host).  Softmax in float32 with the polynomial exp2 built
from explicitly rounded multiplies (`_mul_rn`, never contracted into an FMA).  PV: P rounded to INT8
(or converted to e4m3) and multiplied with V on the tensor cores.  Head dims up to 128 (64, 80, 96
and 128 among them); others are zero-padded to the next power of two in registers (exact: zeros add
nothing).  The reference defines every bit for INT8 operands; with FP8 the tensor cores' accumulation
differs (see the reference's docstring).

On sm_90 an unmasked, unsplit prefill with D == DV in 32/64/128 goes instead to the Hopper-structured
kernel of kernels/triton/attention_hopper.py (tensor descriptors, warp-specialised KV loop; the same
per-block math from attention_math.py, so the same bits); FQ_ATTN_HOPPER=0 keeps everything here.

EXP_HW=True (the launcher's `exp_hw`) swaps in the special-function unit's exp2 (MUFU ex2.approx):
not bit-exact against the reference, kept only so that benchmarks/attention.py can measure what the
exact polynomial costs.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch
import triton
import triton.language as tl

from fq_compile.kernels.attention import score_scale, split_span
from fq_compile.kernels.triton import attention_hopper
from fq_compile.kernels.triton.attention_math import (_LOG2E, _exp2q, _hint, _key_bounds, _mul_rn, _normalized,
                                                     _packed_rows, _scores, _to_out, _update)
from fq_compile.kernels.triton.tuning import tuning

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _block(acc, l_i, m_i, q, c, qpos, row_ok, k_base, v_base, mask_rows, j0, N,
           stride_kn, stride_kd, stride_vn, stride_vd, stride_mn,
           D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr,
           BOUNDS: tl.constexpr, CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, QK_INT8: tl.constexpr,
           PV_INT8: tl.constexpr, EXP_HW: tl.constexpr, PV_F16: tl.constexpr, QK_PROMOTE: tl.constexpr,
           BLOCK_M: tl.constexpr):
    """One kv block of the online softmax; BOUNDS: apply the key bound and the causal mask."""
    offs_n = j0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    n_ok = offs_n < N
    k_mask = offs_d[None, :] < D
    v_mask = offs_dv[None, :] < DV
    if BOUNDS:
        k_mask = k_mask & n_ok[:, None]
        v_mask = v_mask & n_ok[:, None]
    k = tl.load(k_base + offs_n[:, None].to(tl.int64) * stride_kn + offs_d[None, :] * stride_kd, mask=k_mask, other=0.0)
    t = _scores(q, k, c, QK_INT8, QK_PROMOTE)
    if MASK_KIND != 0:
        m_ptrs = mask_rows[:, None] + offs_n[None, :].to(tl.int64) * stride_mn
        m_ok = row_ok[:, None] & n_ok[None, :]
        if MASK_KIND == 1:
            keep = tl.load(m_ptrs, mask=m_ok, other=0)
            t = tl.where(keep != 0, t, float("-inf"))
        else:
            add = tl.load(m_ptrs, mask=m_ok, other=0.0).to(tl.float32)
            t = t + _mul_rn(add, _LOG2E)
    if BOUNDS:
        visible = n_ok[None, :]
        if CAUSAL:
            visible = visible & (offs_n[None, :] <= qpos[:, None])
        t = tl.where(visible, t, float("-inf"))
    v = tl.load(v_base + offs_n[:, None].to(tl.int64) * stride_vn + offs_dv[None, :] * stride_vd, mask=v_mask,
                other=0.0)
    return _update(acc, l_i, m_i, t, v, PV_INT8, EXP_HW, PV_F16, BLOCK_M)


@triton.jit
def attention_kernel(Q, K, V, C, VS, MASK, OUT, WM, WL, WACC,
                     stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
                     stride_vb, stride_vh, stride_vn, stride_vd, stride_mb, stride_mh, stride_mm, stride_mn,
                     stride_ob, stride_oh, stride_om, stride_od,
                     HKV, M, N, REP, M_BUCKET, N_BUCKET, SPAN, SPLITS,
                     D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,
                     QK_INT8: tl.constexpr, PV_INT8: tl.constexpr, EXP_HW: tl.constexpr,
                     PV_F16: tl.constexpr = 0, QK_PROMOTE: tl.constexpr = 0, SPLIT: tl.constexpr = False):
    """OUT[b, h, i, :] for BLOCK_M packed rows of kv head g (grid: row blocks, B * HKV[, SPLITS]).
    MASK_KIND: 0 none, 1 bool (nonzero = attend), 2 additive float.  SPLIT: this program scans keys
    [s * SPAN, (s + 1) * SPAN) only (s = program_id(2)) and writes its unnormalised (m, l, acc) to
    WM/WL [B, HQ, M, SPLITS] and WACC [B, HQ, M, SPLITS, DV] (contiguous) for `combine_kernel`."""
    pid_m = tl.program_id(0)
    b, g, row_ok, qpos, h = _packed_rows(pid_m, tl.program_id(1), HKV, M, REP, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_ptrs = (Q + b * stride_qb + h[:, None].to(tl.int64) * stride_qh + qpos[:, None].to(tl.int64) * stride_qm
              + offs_d[None, :] * stride_qd)
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    c = tl.load(C + h, mask=row_ok, other=0.0)
    k_base = K + b * stride_kb + g.to(tl.int64) * stride_kh
    v_base = V + b * stride_vb + g.to(tl.int64) * stride_vh
    mask_rows = MASK + b * stride_mb + h.to(tl.int64) * stride_mh + qpos.to(tl.int64) * stride_mm

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    hi, full = _key_bounds(pid_m, M, N, REP, BLOCK_M, BLOCK_N, CAUSAL)
    lo = 0
    if SPLIT:                   # this program's span of keys (SPAN: whole kv blocks)
        lo = tl.program_id(2) * SPAN
        hi = tl.minimum(hi, lo + SPAN)
        full = tl.maximum(lo, tl.minimum(full, lo + SPAN))
    for j0 in range(lo, full, BLOCK_N):
        acc, l_i, m_i = _block(acc, l_i, m_i, q, c, qpos, row_ok, k_base, v_base, mask_rows, j0, N,
                               stride_kn, stride_kd, stride_vn, stride_vd, stride_mn, D, DV, BLOCK_D, BLOCK_DV,
                               BLOCK_N, False, CAUSAL, MASK_KIND, QK_INT8, PV_INT8, EXP_HW, PV_F16, QK_PROMOTE, BLOCK_M)
    for j0 in range(full, hi, BLOCK_N):
        acc, l_i, m_i = _block(acc, l_i, m_i, q, c, qpos, row_ok, k_base, v_base, mask_rows, j0, N,
                               stride_kn, stride_kd, stride_vn, stride_vd, stride_mn, D, DV, BLOCK_D, BLOCK_DV,
                               BLOCK_N, True, CAUSAL, MASK_KIND, QK_INT8, PV_INT8, EXP_HW, PV_F16, QK_PROMOTE, BLOCK_M)

    if SPLIT:
        w = ((b * (HKV * REP) + h.to(tl.int64)) * M + qpos.to(tl.int64)) * SPLITS + tl.program_id(2)
        tl.store(WM + w, m_i, mask=row_ok)
        tl.store(WL + w, l_i, mask=row_ok)
        tl.store(WACC + w[:, None] * DV + offs_dv[None, :], acc, mask=row_ok[:, None] & (offs_dv[None, :] < DV))
    else:
        out = _normalized(acc, l_i, tl.load(VS + g) + tl.zeros([BLOCK_M], tl.float32))
        o_ptrs = (OUT + b * stride_ob + h[:, None].to(tl.int64) * stride_oh + qpos[:, None].to(tl.int64) * stride_om
                  + offs_dv[None, :] * stride_od)
        tl.store(o_ptrs, _to_out(out, OUT.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < DV))


@triton.jit
def combine_kernel(WM, WL, WACC, VS, OUT, ROWS, HQ, M, REP, SPLITS: tl.constexpr,
                   DV: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_R: tl.constexpr, EXP_HW: tl.constexpr):
    """OUT rows (contiguous [B, HQ, M, DV], row r = (b * HQ + h) * M + i) from the split partials, as the
    reference's _combine: the max over splits, then the rescaled sums in split order.  The split loops are
    unrolled (SPLITS is a compile-time constant), so the loads of every split are independent instructions
    the GPU can have in flight together, instead of one memory latency per split."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < ROWS
    rw = r.to(tl.int64) * SPLITS
    offs_dv = tl.arange(0, BLOCK_DV)
    dv_ok = r_ok[:, None] & (offs_dv[None, :] < DV)
    big = tl.full([BLOCK_R], float("-inf"), tl.float32)
    for s in tl.static_range(SPLITS):
        big = tl.maximum(big, tl.load(WM + rw + s, mask=r_ok, other=float("-inf")))
    u = tl.where(big == float("-inf"), 0.0, big)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_DV], tl.float32)
    for s in tl.static_range(SPLITS):
        a = _exp2q(tl.load(WM + rw + s, mask=r_ok, other=float("-inf")) - u, EXP_HW)
        l_i = l_i + _mul_rn(tl.load(WL + rw + s, mask=r_ok, other=0.0), a)
        part = tl.load(WACC + (rw + s)[:, None] * DV + offs_dv[None, :], mask=dv_ok, other=0.0)
        acc = acc + _mul_rn(part, a[:, None])
    g = ((r // M) % HQ) // REP
    out = _normalized(acc, l_i, tl.load(VS + g, mask=r_ok, other=1.0))
    tl.store(OUT + r.to(tl.int64)[:, None] * DV + offs_dv[None, :], _to_out(out, OUT.dtype.element_ty), mask=dv_ok)


def _cfg(bm, warps, stages):
    return triton.Config({"BLOCK_M": bm}, num_warps=warps, num_stages=stages)


# Prefill candidates (BLOCK_N is the plan's kv_block, part of the semantics, never tuned); decode
# (<= 16 packed rows) runs one 16-row tile per (batch, kv head) and streams K/V.  Few candidates on
# purpose: each is a separate Triton compile for every new set of compile-time constants (head dim,
# formats, mask kind), paid at the first prefill of a model.
# Probe switches (benchmarks/device/attention_probe.py), kernel constexprs: PV_F16 0 = FP8 P.V on the
# float16 tensor cores where BLOCK_M >= 64 (see _block), 1 = always, -1 = never; QK_PROMOTE > 0 hands
# FP8 Q.K^T partial sums to the float32 accumulator every QK_PROMOTE products (0: Triton's default, the
# whole head dim in the tensor cores' reduced-precision accumulator).
PV_F16 = 0
QK_PROMOTE = 32     # measured on the H100 (probe): FP8/FP8 relative error 3.8e-3 -> 2.1e-3
PREFILL_CONFIGS = [_cfg(128, 8, 3), _cfg(128, 4, 3), _cfg(64, 4, 3), _cfg(128, 8, 2)]
DECODE_CONFIG = _cfg(16, 4, 3)
INTERPRET_CONFIG = _cfg(16, 4, 1)
COMBINE_ROWS = 4        # rows per combine program: a batch-1 decode step (32 query heads) gets 8 programs


@functools.lru_cache(maxsize=None)
def _tuned(tune: bool = True):
    return triton.autotune(configs=PREFILL_CONFIGS if tune else PREFILL_CONFIGS[:1], key=["M_BUCKET", "N_BUCKET", "REP", "D", "BLOCK_N", "SPLIT",
                                                         "CAUSAL", "MASK_KIND", "QK_INT8", "PV_INT8"])(attention_kernel)


def _pow2(x: int, lo: int = 32) -> int:
    return max(lo, triton.next_power_of_2(x))


def _hopper_layout(q, k, v, mask, kv_splits, kv_block, exp_hw, config, hopper):
    """attention_hopper's layout constants where its kernel takes this call, else None.  hopper: None
    chooses (sm_90 and FQ_ATTN_HOPPER, and no forced generic tiling), False never, True insists (the
    device check skipped: tests and benchmark columns; a shape it cannot take raises)."""
    if hopper is False or exp_hw or (hopper is None and config is not None):
        return None
    layout = attention_hopper.plan(q, k, v, mask, kv_splits, kv_block, force=bool(hopper))
    if hopper and layout is None:
        raise ValueError(f"the Hopper prefill kernel does not take q {tuple(q.shape)} k {tuple(k.shape)} "
                         f"v {tuple(v.shape)} (strides {v.stride()}), mask {mask is not None}, kv_splits {kv_splits}, "
                         f"kv_block {kv_block}")
    return layout


_HOPPER_FAILED: list[str] = []


def _launch_hopper(q, k, v, c, vs, out, causal, kv_block, layout, buckets, pv_f16, qk_promote, config, insist) -> bool:
    """Run the Hopper kernel; True if it ran.  Chosen automatically (not insist), a failure to compile or
    launch it (a Triton that cannot warp-specialise this loop, say) warns once and leaves this process on
    the generic kernel, instead of failing the model's prefill; tests and benchmarks insist, so they fail."""
    if _HOPPER_FAILED and not insist:
        return False
    try:
        attention_hopper.launch(q, k, v, c, vs, out, causal, kv_block, layout, buckets, pv_f16=pv_f16,
                                qk_promote=qk_promote, config=config)
        return True
    except Exception as e:   # noqa: BLE001  (any compile/launch error: the generic kernel computes the same bits)
        if insist:
            raise
        _HOPPER_FAILED.append(f"{type(e).__name__}: {e}")
        warnings.warn(f"fq::attention: the Hopper prefill kernel failed ({_HOPPER_FAILED[0][:300]}); this process "
                      f"uses the generic kernel from now on (FQ_ATTN_HOPPER=0 skips the attempt)", RuntimeWarning)
        return False


def attention_cuda(q, k, v, q_scale, k_scale, v_scale, mask, causal, sm_scale, kv_block, out_dtype, *,
                   kv_splits: int = 0, exp_hw: bool = False, config: triton.Config | None = None,
                   pv_f16: int | None = None, qk_promote: int | None = None, hopper: bool | None = None):
    """Launch the kernel (the op's CUDA implementation).  kv_splits: the split-key semantics of
    kernels/attention.py (one program per span, then `combine_kernel`); exp_hw: the hardware exp2
    (benchmarks only, not exact); config: force one tiling (tests run each candidate without timing it);
    hopper: the Hopper prefill kernel (kernels/triton/attention_hopper.py; see _hopper_layout), the same
    bits by construction."""
    b, hq, m, d = q.shape
    hkv, n, dv = k.shape[1], k.shape[2], v.shape[-1]
    if d > 128 or dv > 128:
        raise ValueError(f"fq::attention's Triton kernel takes head dims up to 128, got {d} and {dv}")
    rep = hq // hkv
    out = torch.empty((b, hq, m, dv), dtype=out_dtype, device=q.device)
    if b == 0 or hq == 0 or m == 0:
        return out
    c = score_scale(q_scale, k_scale, sm_scale)
    vs = v_scale.float().contiguous()
    if mask is None:
        mask_arg, mask_kind, ms = q, 0, (0, 0, 0, 0)
    else:
        mask_arg = mask.expand(b, hq, m, n)
        mask_kind = 1 if mask.dtype == torch.bool else 2
        ms = mask_arg.stride()
    rows = m * rep
    splits = kv_splits if kv_splits > 1 else 1
    span = split_span(n, kv_block, kv_splits)
    if splits > 1:
        ws = torch.empty((2, b * hq * m * splits), dtype=torch.float32, device=q.device)
        wacc = torch.empty((b * hq * m * splits, dv), dtype=torch.float32, device=q.device)
        wm, wl = ws[0], ws[1]
    else:
        wm = wl = wacc = c
    pv_f16 = PV_F16 if pv_f16 is None else pv_f16
    qk_promote = QK_PROMOTE if qk_promote is None else qk_promote
    buckets = (min(triton.next_power_of_2(_hint(rows)), 16384), min(triton.next_power_of_2(max(_hint(n), 1)), 16384))
    layout = _hopper_layout(q, k, v, mask, kv_splits, kv_block, exp_hw, config, hopper)
    if layout is not None and _launch_hopper(q, k, v, c, vs, out, causal, kv_block, layout, buckets, pv_f16,
                                             qk_promote, config, insist=bool(hopper)):
        return out
    common = dict(D=d, DV=dv, BLOCK_D=_pow2(d), BLOCK_DV=_pow2(dv), BLOCK_N=kv_block, CAUSAL=bool(causal),
                  MASK_KIND=mask_kind, QK_INT8=q.dtype == torch.int8, PV_INT8=v.dtype == torch.int8, EXP_HW=exp_hw,
                  PV_F16=pv_f16, QK_PROMOTE=qk_promote)
    args = (q, k, v, c, vs, mask_arg, out, wm, wl, wacc, *q.stride(), *k.stride(), *v.stride(), *ms, *out.stride(),
            hkv, m, n, rep, *buckets, span, splits)
    common["SPLIT"] = splits > 1
    if config is None and (_INTERPRET or _hint(rows) <= 16):
        config = INTERPRET_CONFIG if _INTERPRET else DECODE_CONFIG
    if config is not None:
        bm = config.kwargs["BLOCK_M"]
        torch.library.wrap_triton(attention_kernel)[(triton.cdiv(rows, bm), b * hkv, splits)](
            *args, BLOCK_M=bm, num_warps=config.num_warps, num_stages=config.num_stages, **common)
    else:
        def grid(meta):
            return (triton.cdiv(rows, meta["BLOCK_M"]), b * hkv, splits)

        torch.library.wrap_triton(_tuned(tuning()))[grid](*args, **common)
    if splits > 1:
        total = b * hq * m
        torch.library.wrap_triton(combine_kernel)[(triton.cdiv(total, COMBINE_ROWS),)](
            wm, wl, wacc, vs, out, total, hq, m, rep, splits, DV=dv, BLOCK_DV=_pow2(dv), BLOCK_R=COMBINE_ROWS,
            EXP_HW=exp_hw, num_warps=4)
    return out
