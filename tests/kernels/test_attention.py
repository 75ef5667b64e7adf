"""fq::attention: the reference's semantics (against an independent float64 oracle and against
itself under exact rewrites: GQA, masks, decode), the quantize ops, and the Triton kernel against the
reference (interpreter at small sizes on the CPU, full sizes on the GPU with `-m gpu`).

Every check draws fresh random inputs with the structure real attention has (a few large query/key
channels, a first "sink" key that draws attention), never zeros."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fq_compile.kernels import attention as A  # noqa: E402
from tests.conftest import need_triton_interpreter, run_guarded  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
DT = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}


# ----------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------

def make_qkv(b, hq, hkv, m, n, d, gen, dv=None):
    """Float Q/K/V [B, H, S, D] with outlier channels and a sink key."""
    dv = dv or d
    q = torch.randn(b, hq, m, d, generator=gen)
    k = torch.randn(b, hkv, n, d, generator=gen)
    v = torch.randn(b, hkv, n, dv, generator=gen)
    hot = torch.randperm(d, generator=gen)[:2]
    q[..., hot] *= 4.0
    k[..., hot] *= 3.0
    k[:, :, 0] *= 2.5
    return q, k, v


def quantize(q, k, v, qk_fmt, pv_fmt, per_head=True):
    """Static absmax scales (per head or per tensor) and the quantized tensors."""
    def scale(x, fmt):
        s = x.abs().amax(dim=(0, 2, 3)) / A.QMAX[fmt]
        return s if per_head else torch.full_like(s, float(s.max()))
    qs, ks, vs = scale(q, qk_fmt), scale(k, qk_fmt), scale(v, pv_fmt)
    qq = A.quantize_heads_reference(q, A.inverse_scale(qs), DT[qk_fmt])
    kq = A.quantize_heads_reference(k, A.inverse_scale(ks), DT[qk_fmt])
    vq = A.quantize_heads_reference(v, A.inverse_scale(vs), DT[pv_fmt])
    return (qq, kq, vq), (qs, ks, vs)


def oracle(qq, kq, vq, qs, ks, vs, mask, causal, sm_scale, p_fmt):
    """An independent float64 reading of the op for one kv block (kv_block >= N): dequantize, full-row
    softmax relative to the row max with the exact exp2, P quantized as the op says, normalised by
    the sum of the quantized P."""
    hq, m = qq.shape[1], qq.shape[2]
    hkv, n = kq.shape[1], kq.shape[2]
    rep = hq // hkv
    q = qq.double() * qs.double()[None, :, None, None]
    k = (kq.double() * ks.double()[None, :, None, None]).repeat_interleave(rep, 1)
    v = (vq.double() * vs.double()[None, :, None, None]).repeat_interleave(rep, 1)
    s = (q @ k.transpose(-1, -2)) * sm_scale
    if mask is not None and mask.dtype != torch.bool:
        s = s + mask.double()
    keep = torch.ones_like(s, dtype=torch.bool)
    if mask is not None and mask.dtype == torch.bool:
        keep = keep & mask
    if causal:
        keep = keep & torch.ones(m, n, dtype=torch.bool).tril()
    s = s.masked_fill(~keep, -math.inf)
    mx = s.amax(-1, keepdim=True)
    p = torch.exp(s - mx.clamp_min(-1e300)).nan_to_num(0.0)
    if p_fmt == "int8":
        p = torch.round(p * 127)
    elif p_fmt == "fp8":
        p = p.float().to(torch.float8_e4m3fn).double()
    den = p.sum(-1, keepdim=True)
    return torch.where(den > 0, (p @ v) / den, torch.zeros_like(den))


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


# ----------------------------------------------------------------------------------------------
# exp2q and the quantize ops
# ----------------------------------------------------------------------------------------------

def test_exp2q_is_exp2_to_1e4_and_exact_at_integers():
    x = -torch.rand(200_000, generator=torch.Generator().manual_seed(0)) * 126
    e = A.exp2q(x)
    r = torch.exp2(x.double())
    assert float(((e.double() - r) / r).abs().max()) < 9e-5
    ints = -torch.arange(0, 127, dtype=torch.float32)
    assert torch.equal(A.exp2q(ints), torch.exp2(ints))              # 2**-k exactly, exp2q(0) == 1
    assert A.exp2q(torch.tensor([-math.inf, -126.5, -1e30])).eq(0).all()
    grid = torch.linspace(-20, 0, 100_001)
    assert (A.exp2q(grid).diff() >= 0).all()                          # monotone (softmax keeps the order)


def test_quantize_heads_rounds_half_to_even_and_saturates():
    inv = torch.tensor([1.0, 0.5])
    x = torch.tensor([2.5, 3.5, -2.5, 200.0, -1e9, 0.49]).repeat(1, 2, 1, 1)   # [1, 2, 1, 6]
    q = torch.ops.fq.quantize_heads(x, inv, torch.int8)
    assert q.dtype == torch.int8
    assert q[0, 0, 0].tolist() == [2, 4, -2, 127, -127, 0]
    assert q[0, 1, 0].tolist() == [1, 2, -1, 100, -127, 0]           # 1.25, 1.75, -1.25 ... per-head scale
    f = torch.ops.fq.quantize_heads(x, inv, torch.float8_e4m3fn)
    assert f.dtype == torch.float8_e4m3fn and f.float()[0, 0, 0, 4] == -448.0
    back = torch.ops.fq.dequantize_heads(q, 1 / inv, torch.float32)
    assert torch.equal(back[0, 1, 0], q[0, 1, 0].float() * 2.0)
    with pytest.raises(ValueError, match="int8 or torch.float8_e4m3fn"):
        A.quantize_heads_reference(x, inv, torch.int16)


# ----------------------------------------------------------------------------------------------
# the reference
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("qk_fmt,pv_fmt", [("int8", "int8"), ("fp8", "fp8"), ("int8", "fp8")])
@pytest.mark.parametrize("kind", ["causal", "bool", "float", "none"])
def test_reference_matches_float64_oracle_in_one_block(qk_fmt, pv_fmt, kind):
    """kv_block >= N: the op is a plain quantized softmax, which the oracle computes independently in
    float64; they differ only by exp2q's 8.6e-5 and float32 rounding (a P may land one step apart)."""
    gen = torch.Generator().manual_seed(1)
    b, hq, hkv, m, n, d = 2, 6, 2, 24, 56, 32
    q, k, v = make_qkv(b, hq, hkv, m, n, d, gen)
    (qq, kq, vq), (qs, ks, vs) = quantize(q, k, v, qk_fmt, pv_fmt)
    mask = None
    if kind == "bool":
        mask = torch.rand(b, 1, m, n, generator=gen) > 0.3
        mask[..., 0] = True
    elif kind == "float":
        mask = torch.randn(b, 1, m, n, generator=gen).clamp_max(0.5)
    out = A.attention_reference(qq, kq, vq, qs, ks, vs, mask, kind == "causal", d ** -0.5, torch.float32, kv_block=64)
    ref = oracle(qq, kq, vq, qs, ks, vs, mask, kind == "causal", d ** -0.5, pv_fmt)
    assert out.shape == (b, hq, m, d) and torch.isfinite(out).all()
    assert rel(out, ref) < (2e-3 if pv_fmt == "int8" else 6e-3), rel(out, ref)
    # and the quantized attention is close to float attention (the formats are usable at all)
    fmask = None if mask is None else mask.double() if kind == "float" else mask
    fl = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=fmask,
                                                          is_causal=kind == "causal", enable_gqa=True, scale=d ** -0.5)
    assert rel(out, fl) < (0.04 if pv_fmt == "int8" else 0.12)


@pytest.mark.parametrize("p_fmt", ["int8", "fp8"])
def test_reference_blocks_follow_the_running_max(p_fmt):
    """Several kv blocks, a late key that raises the running max: P quantized against each block's
    running max errs no more than P quantized against the final max (the one-block oracle), both
    measured against unquantized P on the same Q/K/V; and the block size changes bits (it is part of
    the semantics, which is why the plan records it)."""
    gen = torch.Generator().manual_seed(2)
    q, k, v = make_qkv(1, 4, 4, 40, 200, 64, gen)
    k[:, :, 150] *= 4.0
    (qq, kq, vq), (qs, ks, vs) = quantize(q, k, v, "int8", p_fmt)
    exact_p = oracle(qq, kq, vq, qs, ks, vs, None, False, 0.125, None)
    one_block = rel(oracle(qq, kq, vq, qs, ks, vs, None, False, 0.125, p_fmt), exact_p)
    outs = {kb: A.attention_reference(qq, kq, vq, qs, ks, vs, None, False, 0.125, torch.float32, kb)
            for kb in (32, 128)}
    for kb, out in outs.items():
        assert rel(out, exact_p) < 1.2 * one_block, (kb, rel(out, exact_p), one_block)
    assert not torch.equal(outs[32], outs[128])


def test_reference_exact_identities():
    """Rewrites that must not change a bit: GQA vs repeated kv heads, causal vs the same bool mask vs a
    0/-inf float mask, a causal prefill row vs a decode step over its prefix, batch order."""
    gen = torch.Generator().manual_seed(3)
    b, hq, hkv, m, d = 2, 6, 2, 70, 64
    q, k, v = make_qkv(b, hq, hkv, m, m, d, gen)
    (qq, kq, vq), (qs, ks, vs) = quantize(q, k, v, "int8", "int8")
    sm = d ** -0.5
    causal = A.attention_reference(qq, kq, vq, qs, ks, vs, None, True, sm, torch.float32)
    rep = hq // hkv
    rk, rv = kq.repeat_interleave(rep, 1), vq.repeat_interleave(rep, 1)
    same = A.attention_reference(qq, rk, rv, qs, ks.repeat_interleave(rep), vs.repeat_interleave(rep), None, True, sm,
                                 torch.float32)
    assert torch.equal(causal, same)
    tril = torch.ones(m, m, dtype=torch.bool).tril()
    assert torch.equal(causal, A.attention_reference(qq, kq, vq, qs, ks, vs, tril, False, sm, torch.float32))
    fmask = torch.zeros(m, m).masked_fill(~tril, -math.inf)
    assert torch.equal(causal, A.attention_reference(qq, kq, vq, qs, ks, vs, fmask, False, sm, torch.float32))
    for i in (0, 5, 63, 64, 69):
        step = A.attention_reference(qq[:, :, i:i + 1], kq[:, :, :i + 1], vq[:, :, :i + 1], qs, ks, vs, None, False, sm,
                                     torch.float32)
        assert torch.equal(step[:, :, 0], causal[:, :, i]), i
    flip = A.attention_reference(qq.flip(0), kq.flip(0), vq.flip(0), qs, ks, vs, None, True, sm, torch.float32)
    assert torch.equal(flip, causal.flip(0))


def oracle_split(qq, kq, vq, qs, ks, vs, causal, sm_scale, span):
    """An independent float64 reading of split keys with one kv block per span: each span's P quantized
    to INT8 against that span's own max, the spans rescaled to the overall max, one normalisation."""
    hq, m, n = qq.shape[1], qq.shape[2], kq.shape[2]
    rep = hq // kq.shape[1]
    q = qq.double() * qs.double()[None, :, None, None]
    k = (kq.double() * ks.double()[None, :, None, None]).repeat_interleave(rep, 1)
    v = (vq.double() * vs.double()[None, :, None, None]).repeat_interleave(rep, 1)
    s = (q @ k.transpose(-1, -2)) * sm_scale
    if causal:
        s = s.masked_fill(~torch.ones(m, n, dtype=torch.bool).tril(), -math.inf)
    parts = []
    for j in range(0, n, span):
        sj = s[..., j:j + span]
        mj = sj.amax(-1, keepdim=True)
        p = torch.round(torch.exp(sj - mj.clamp_min(-1e300)).nan_to_num(0.0) * 127)
        parts.append((mj, p.sum(-1, keepdim=True), p @ v[:, :, j:j + span]))
    big = torch.stack([mj for mj, _, _ in parts]).amax(0)
    den = sum(torch.exp(mj - big).nan_to_num(0.0) * l for mj, l, _ in parts)
    num = sum(torch.exp(mj - big).nan_to_num(0.0) * a for mj, _, a in parts)
    return torch.where(den > 0, num / den, torch.zeros_like(den))


def test_split_span_deals_whole_blocks():
    assert A.split_span(2048, 64, 16) == 128 and A.split_span(2048, 64, 0) == 2048
    assert A.split_span(100, 16, 3) == 48            # 7 blocks -> spans of 3, 3, 1 blocks
    assert A.split_span(10, 16, 8) == 16 and A.split_span(0, 16, 8) == 0


@pytest.mark.parametrize("causal", [False, True])
def test_reference_split_keys_match_their_float64_oracle(causal):
    """kv_splits > 1: each span on its own, then combined; against an independent float64 reading of the
    same (one kv block per span), as close as the one-block reference is to its oracle; and the split
    is part of the semantics (its bits differ from one scan over all keys)."""
    gen = torch.Generator().manual_seed(6)
    b, hq, hkv, m, n, d = 2, 4, 2, 150 if causal else 1, 150, 64
    q, k, v = make_qkv(b, hq, hkv, m, n, d, gen)
    k[:, :, 120] *= 4.0                                   # a late key raises the max: spans disagree on it
    (qq, kq, vq), (qs, ks, vs) = quantize(q, k, v, "int8", "int8")
    span = A.split_span(n, 64, 3)                         # 3 blocks of 64 -> spans of 64 keys
    assert span == 64
    out = A.attention_reference(qq, kq, vq, qs, ks, vs, None, causal, d ** -0.5, torch.float32, 64, kv_splits=3)
    ref = oracle_split(qq, kq, vq, qs, ks, vs, causal, d ** -0.5, span)
    assert rel(out, ref) < 2e-3, rel(out, ref)
    whole = A.attention_reference(qq, kq, vq, qs, ks, vs, None, causal, d ** -0.5, torch.float32, 64)
    assert not torch.equal(out, whole)
    one = A.attention_reference(qq, kq, vq, qs, ks, vs, None, causal, d ** -0.5, torch.float32, 64, kv_splits=1)
    assert torch.equal(one, whole)
    # more spans than blocks: the empty ones add nothing, bit for bit (signed zeros included)
    many = A.attention_reference(qq, kq, vq, qs, ks, vs, None, causal, d ** -0.5, torch.float32, 64, kv_splits=5)
    assert torch.equal(many.view(torch.int32), out.view(torch.int32))
    short = A.attention_reference(qq[..., :1, :], kq[:, :, :40], vq[:, :, :40], qs, ks, vs, None, False, d ** -0.5,
                                  torch.float32, 64, kv_splits=4)        # one block: the split changes nothing
    assert torch.equal(short, A.attention_reference(qq[..., :1, :], kq[:, :, :40], vq[:, :, :40], qs, ks, vs, None,
                                                    False, d ** -0.5, torch.float32, 64))


def test_choose_kv_splits_fills_the_gpu_in_decode_only():
    assert A.choose_kv_splits(1, 8, 4, 2048, 64, 132) == 32          # 264 programs wanted, 32 kv blocks
    assert A.choose_kv_splits(1, 8, 4, 32768, 64, 132) == 33
    assert A.choose_kv_splits(16, 8, 4, 8192, 64, 132) == 3
    assert A.choose_kv_splits(64, 8, 4, 8192, 64, 132) == 0          # 512 programs fill 132 SMs
    assert A.choose_kv_splits(1, 8, 2048, 2048, 64, 132) == 0        # prefill
    assert A.choose_kv_splits(1, 8, 4, 64, 64, 132) == 0             # one kv block
    assert A.choose_kv_splits(1, 8, 4, 2048, 64, 0) == 0             # no GPU
    assert A.choose_kv_splits(1, 1, 8, 32768, 64, 132) == A.MAX_KV_SPLITS   # multi-query: capped


def test_reference_fully_masked_rows_are_zero():
    gen = torch.Generator().manual_seed(4)
    q, k, v = make_qkv(1, 2, 2, 8, 8, 16, gen)
    (qq, kq, vq), (qs, ks, vs) = quantize(q, k, v, "int8", "int8")
    mask = torch.ones(1, 1, 8, 8, dtype=torch.bool)
    mask[..., 3, :] = False
    out = A.attention_reference(qq, kq, vq, qs, ks, vs, mask, False, 0.25, torch.bfloat16)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    assert out[:, :, 3].eq(0).all() and out[:, :, 2].ne(0).any()


def test_op_runs_the_reference_on_cpu_and_checks_its_inputs():
    gen = torch.Generator().manual_seed(5)
    q, k, v = make_qkv(1, 4, 2, 9, 9, 32, gen)
    (qq, kq, vq), (qs, ks, vs) = quantize(q, k, v, "int8", "fp8")
    args = (qs, ks, vs, None, True, 0.2, 64, torch.float16)
    out = torch.ops.fq.attention(qq, kq, vq, *args)
    assert torch.equal(out, A.attention_reference(qq, kq, vq, qs, ks, vs, None, True, 0.2, torch.float16, 64))
    compiled = torch.compile(lambda *a: torch.ops.fq.attention(*a), backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(qq, kq, vq, *args), out)          # the fake kernel agrees on shape/dtype
    with pytest.raises(RuntimeError, match="not a multiple"):
        torch.ops.fq.attention(qq[:, :3], kq, vq, qs[:3], *args[1:])
    with pytest.raises(RuntimeError, match="both be int8 or both float8"):
        torch.ops.fq.attention(qq, kq.to(torch.float8_e4m3fn), vq, *args)
    with pytest.raises(RuntimeError, match="kv_block"):
        torch.ops.fq.attention(qq, kq, vq, qs, ks, vs, None, True, 0.2, 48, torch.float16)
    with pytest.raises(RuntimeError, match="kv_splits must lie"):
        torch.ops.fq.attention(qq, kq, vq, qs, ks, vs, None, True, 0.2, 64, torch.float16, -1)
    split = torch.ops.fq.attention(qq, kq, vq, *args, 2)
    assert torch.equal(split, A.attention_reference(qq, kq, vq, qs, ks, vs, None, True, 0.2, torch.float16, 64, 2))
    with pytest.raises(RuntimeError, match="k_scale must be float32"):
        torch.ops.fq.attention(qq, kq, vq, qs, ks[:1], vs, None, True, 0.2, 64, torch.float16)


# ----------------------------------------------------------------------------------------------
# the Triton kernel against the reference (interpreter on CPU, full size on GPU)
# ----------------------------------------------------------------------------------------------

def check_attention(device: str, cases, seed: int = 0, configs=None, progress: bool = False, hopper=None):
    """Kernel vs reference.  Case: (b, hq, hkv, m, n, d, qk_fmt, pv_fmt, kind, kv_block, out_dtype[, kv_splits]).
    All-INT8: bit-exact.  FP8 PV or QK: the reference sums products exactly before one rounding, the
    interpreter (numpy float32) and Hopper's FP8 tensor cores (about 14 accumulator bits, per the
    DeepSeek-V3 report) do not; a product sum differs by a few ulps (interpreter) or ~2**-14 relative
    (GPU), which moves a P across an e4m3 rounding edge now and then (one step is 6% of that P):
    relative error < 1e-6 (interpreter) / 5e-3 (GPU), against quantization errors of 2-5%.
    hopper: attention_cuda's switch (True: the Hopper prefill kernel, which raises where it does not apply);
    returns the Hopper layouts (attention_hopper.plan) of the cases, so a test can check what it covered."""
    from fq_compile.kernels.triton import attention_hopper
    from fq_compile.kernels.triton.attention import attention_cuda

    gen = torch.Generator().manual_seed(seed)
    layouts = []
    for i, case in enumerate(cases):
        b, hq, hkv, m, n, d, qk_fmt, pv_fmt, kind, kv_block, out_dtype, *rest = case
        splits = rest[0] if rest else 0
        cfg = configs[i % len(configs)] if configs else None
        if progress:
            print(f"case {case} tiling {cfg or 'autotuned'}", flush=True)
        q, k, v = make_qkv(b, hq, hkv, m, n, d, gen)
        (qq, kq, vq), (qs, ks, vs) = quantize(q, k, v, qk_fmt, pv_fmt, per_head=i % 2 == 0)
        mask = None
        if kind == "bool":
            mask = torch.rand(b, 1, m, n, generator=gen) > 0.2
            mask[0, 0, -1] = False                              # a fully masked row
        elif kind == "float":
            mask = (torch.randn(1, hq, m, n, generator=gen) * 2).to(torch.bfloat16)
        sm = d ** -0.5
        ref = A.attention_reference(qq, kq, vq, qs, ks, vs, mask, kind == "causal", sm, out_dtype, kv_block, splits)
        dev = [t.to(device) for t in (qq, kq, vq, qs, ks, vs)]
        if i % 3 == 1:       # V with keys contiguous (the layout the tensor cores want for PV), Q transposed storage
            dev[2] = dev[2].transpose(-1, -2).contiguous().transpose(-1, -2)
            dev[0] = dev[0].transpose(1, 2).contiguous().transpose(1, 2)
        dmask = None if mask is None else mask.to(device)
        if hopper:
            layouts.append(attention_hopper.plan(dev[0], dev[1], dev[2], dmask, splits, kv_block, force=True))
        out = attention_cuda(*dev, dmask, kind == "causal", sm, kv_block, out_dtype, kv_splits=splits, config=cfg,
                             hopper=hopper)
        assert out.shape == ref.shape and out.dtype == out_dtype
        out = out.cpu()
        if qk_fmt == pv_fmt == "int8":
            bad = (out != ref).sum().item()
            assert bad == 0, f"{case}: {bad} mismatches, max {(out.float() - ref.float()).abs().max().item()}"
        else:
            tol = 1e-6 if device == "cpu" and out_dtype == torch.float32 else 5e-3
            assert rel(out, ref) < tol, f"{case}: rel err {rel(out, ref)}"
        assert torch.isfinite(out.float()).all()
    return layouts


SMALL = [(1, 4, 2, 20, 20, 16, "int8", "int8", "causal", 16, torch.float32),
         (2, 3, 3, 33, 70, 32, "int8", "int8", "none", 32, torch.float32),
         (1, 6, 2, 40, 40, 64, "int8", "int8", "causal", 64, torch.bfloat16),
         (1, 2, 1, 1, 90, 80, "int8", "int8", "bool", 32, torch.float32),     # decode, ragged head dim
         (1, 4, 2, 17, 50, 96, "int8", "int8", "float", 16, torch.float16),
         (1, 2, 2, 24, 24, 128, "int8", "int8", "causal", 16, torch.float32),
         (1, 2, 1, 24, 24, 16, "fp8", "fp8", "causal", 16, torch.float32),
         (1, 2, 1, 20, 100, 64, "int8", "fp8", "none", 32, torch.float32),
         (1, 2, 2, 20, 40, 32, "fp8", "int8", "bool", 16, torch.float32),
         # split keys (flash-decoding): decode steps, a ragged last span, a fully masked row, causal prefill
         (2, 4, 1, 1, 150, 64, "int8", "int8", "none", 16, torch.float32, 4),
         (1, 6, 2, 1, 77, 32, "int8", "int8", "bool", 16, torch.bfloat16, 3),
         (1, 2, 2, 30, 70, 16, "int8", "int8", "causal", 16, torch.float32, 3),
         (1, 4, 2, 1, 100, 64, "fp8", "fp8", "none", 16, torch.float32, 5),
         (1, 4, 1, 1, 40, 32, "int8", "int8", "none", 16, torch.float32, 6)]    # 3 blocks, 6 spans: 3 empty


def check_quantize_heads(device: str, seed: int = 0, shape=(2, 3, 37, 80)):
    """quantize_heads' Triton kernel (kernels/triton/heads.py) against the reference, bit for bit: bf16 and
    float32 inputs, a transposed layout (kept in the output), ties at half steps, saturation, and values
    in e4m3's subnormal range; INT8 and FP8.  The inputs are scaled so every rounding case occurs."""
    from fq_compile.kernels.triton.heads import applies, quantize_heads_cuda

    gen = torch.Generator().manual_seed(seed)
    b, h, s, d = shape
    x = torch.randn(b, h, s, d, generator=gen) * torch.logspace(-4, 1.5, d)
    x[0, 0, 0, :8] = torch.tensor([2.5, -2.5, 3.5, -0.5, 1e4, -1e4, 0.0, -0.0])   # ties, saturation, zeros
    inv = torch.rand(h, generator=gen) * 40 + 1
    inv[0] = 1.0                                                                 # the ties stay ties
    for dt, xdt, layout in ((torch.int8, torch.float32, "plain"), (torch.int8, torch.bfloat16, "bshd"),
                            (torch.float8_e4m3fn, torch.float32, "bshd"), (torch.float8_e4m3fn, torch.bfloat16, "plain")):
        xx = x.to(xdt)
        if layout == "bshd":                               # [B, S, H, D] storage, as a model's Q arrives
            xx = xx.transpose(1, 2).contiguous().transpose(1, 2)
        xd, invd = xx.to(device), inv.to(device)
        assert applies(xd, invd, dt)
        got = quantize_heads_cuda(xd, invd, dt).cpu()
        ref = A.quantize_heads_reference(xx, inv, dt)
        assert got.dtype == dt and got.shape == ref.shape and got.stride() == xx.stride(), (got.stride(), xx.stride())
        bad = (got.view(torch.int8) != ref.view(torch.int8)).sum().item()
        assert bad == 0, f"{dt} {xdt} {layout}: {bad} of {ref.numel()} bytes differ"
        assert got.view(torch.int8).float().abs().max() > 100               # saturation reached (not all zeros)


def _interp_main():
    assert os.environ.get("TRITON_INTERPRET") == "1"
    check_attention("cpu", SMALL, seed=11)
    print("attention: ok")


# The Hopper prefill kernel (kernels/triton/attention_hopper.py) at interpreter sizes: causal with M < N and
# M = N, no mask with a ragged last block, GQA, the three format pairs, head dims 32/64/128; every third
# case (i % 3 == 1) stores V keys-contiguous, with N a multiple of 16 (descriptors) or not (plain loads).
HOPPER_SMALL = [(1, 4, 2, 40, 40, 32, "int8", "int8", "causal", 32, torch.float32),
                (1, 4, 1, 24, 48, 64, "int8", "int8", "causal", 32, torch.bfloat16),
                (2, 2, 2, 33, 70, 32, "int8", "int8", "none", 32, torch.float32),
                (1, 2, 1, 20, 76, 32, "fp8", "fp8", "causal", 32, torch.float32),
                (1, 4, 2, 70, 70, 32, "int8", "int8", "causal", 32, torch.float32),
                (1, 2, 1, 24, 64, 128, "int8", "fp8", "none", 64, torch.float32)]


def _interp_hopper_main():
    import triton

    assert os.environ.get("TRITON_INTERPRET") == "1"
    # the interpreter's 16-row tile, and a 32-row one with warp_specialize asked for (the interpreter runs
    # the loop as a loop): the causal diagonal then spans several kv blocks of a tile
    cfgs = [triton.Config({"BLOCK_M": 16, "WS": False}, num_warps=4, num_stages=1),
            triton.Config({"BLOCK_M": 32, "WS": True}, num_warps=4, num_stages=1)]
    layouts = check_attention("cpu", HOPPER_SMALL, seed=12, configs=cfgs, hopper=True)
    seen = {(lay["USE_DESC"], lay["V_T"]) for lay in layouts}
    assert {(True, False), (True, True), (False, True)} <= seen, seen
    _check_hopper_fallback()
    print("attention hopper: ok")


def _check_hopper_fallback():
    """A Hopper kernel chosen automatically that fails to compile or launch warns once and leaves the process
    on the generic kernel (same bits); one the caller insists on raises."""
    import warnings

    from fq_compile.kernels.triton import attention as TA
    from fq_compile.kernels.triton import attention_hopper as H

    gen = torch.Generator().manual_seed(13)
    (qq, kq, vq), (qs, ks, vs) = quantize(*make_qkv(1, 4, 2, 24, 24, 32, gen), "int8", "int8")
    args = (qq, kq, vq, qs, ks, vs, None, True, 32 ** -0.5, 32, torch.float32)
    ref = A.attention_reference(*args[:9], torch.float32, 32)
    calls = []

    def broken(*a, **kw):
        calls.append(1)
        raise RuntimeError("cannot warp-specialise this loop")

    saved = H.plan, H.launch
    H.plan, H.launch = (lambda *a, **kw: dict(USE_DESC=True, V_T=False)), broken
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert torch.equal(TA.attention_cuda(*args), ref)
            assert torch.equal(TA.attention_cuda(*args), ref)
        assert calls == [1] and sum("Hopper prefill kernel failed" in str(w.message) for w in caught) == 1
        with pytest.raises(RuntimeError, match="warp-specialise"):
            TA.attention_cuda(*args, hopper=True)
    finally:
        H.plan, H.launch = saved
        TA._HOPPER_FAILED.clear()


def _interp_quantize_main():
    assert os.environ.get("TRITON_INTERPRET") == "1"
    check_quantize_heads("cpu")
    print("quantize_heads: ok")


def test_interpreter_matches_reference():
    need_triton_interpreter()
    run_guarded([__file__], 600, env=dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES=""))


def test_interpreter_quantize_heads_matches_reference():
    need_triton_interpreter()
    run_guarded([__file__, "interp-quantize"], 300, env=dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES=""))


def test_interpreter_hopper_kernel_matches_reference():
    """The Hopper prefill kernel's math and descriptor indexing under the interpreter (not its scheduling:
    warp specialisation and TMA run on the GPU only): INT8 bit-exact, FP8 within check_attention's bound."""
    need_triton_interpreter()
    run_guarded([__file__, "interp-hopper"], 600, env=dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES=""))


def test_hopper_plan_takes_prefill_shapes_only():
    """Where the Hopper kernel applies (plan with force=True: the shape rules alone), and its layout."""
    pytest.importorskip("triton")
    from fq_compile.kernels.triton.attention_hopper import plan

    def qkv(m, n, d=128, dv=None, v_t=True, b=1):
        q = torch.zeros(b, 32, m, d, dtype=torch.int8)
        k = torch.zeros(b, 8, n, d, dtype=torch.int8)
        v = torch.zeros(b, 8, n, dv or d, dtype=torch.int8)
        if v_t:
            v = v.transpose(-1, -2).contiguous().transpose(-1, -2)
        return q, k, v

    assert plan(*qkv(2048, 2048), None, 0, force=True) == dict(USE_DESC=True, V_T=True)
    assert plan(*qkv(2048, 2048, v_t=False), None, 0, force=True) == dict(USE_DESC=True, V_T=False)
    assert plan(*qkv(100, 100), None, 0, force=True) == dict(USE_DESC=False, V_T=True)   # V^T rows of 100 bytes
    q, k, v = qkv(64, 64, v_t=False)
    assert plan(q, k[:, :, 1:], v[:, :, 1:], None, 0, force=True)["USE_DESC"] is True          # offset 128 bytes
    shifted = torch.zeros(k.numel() + 8, dtype=torch.int8)[8:].view(k.shape)
    assert plan(q, shifted, v, None, 0, force=True)["USE_DESC"] is False                          # base offset 8
    assert plan(*qkv(64, 64), torch.ones(64, 64, dtype=torch.bool), 0, force=True) is None       # a mask
    assert plan(*qkv(64, 64), None, 4, force=True) is None                                        # split keys
    assert plan(*qkv(4, 2048), None, 0, force=True) is None                                       # decode-sized
    assert plan(*qkv(64, 64, d=80), None, 0, force=True) is None                                  # head dim 80
    assert plan(*qkv(64, 64, dv=64), None, 0, force=True) is None                                 # D != DV
    assert plan(*qkv(64, 64), None, 0, 16, force=True) is None                  # kv_block 16: INT8 P.V needs K >= 32
    q, k, v = qkv(64, 64)
    assert plan(q, k.transpose(-1, -2).contiguous().transpose(-1, -2), v, None, 0, force=True) is None
    assert plan(q, k, v, None, 0) is None or torch.cuda.is_available()                            # CPU: never chosen


def test_hopper_kernel_compiles_to_wgmma_and_tma_for_sm90():
    """Compiled for sm_90 on the CPU (with this venv's Triton, not necessarily the device's): both dots on
    wgmma, K and V through the bulk tensor copy (TMA) where descriptors are on, none where they are off."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the interpreter does not compile")
    pytest.importorskip("triton.backends.nvidia")
    from fq_compile.kernels.triton.attention_hopper import compile_sm90
    ptx = compile_sm90("int8", "int8", v_t=True, use_desc=True, warps=8)
    assert "wgmma.mma_async" in ptx and ".s8.s8" in ptx and "cp.async.bulk.tensor" in ptx
    ptx = compile_sm90("fp8", "fp8", v_t=False, use_desc=False, warps=4, d=64)
    assert "wgmma.mma_async" in ptx and ".e4m3.e4m3" in ptx and "cp.async.bulk.tensor" not in ptx


def test_hopper_env_switch(monkeypatch):
    pytest.importorskip("triton")
    from fq_compile.kernels.triton import attention_hopper as H
    monkeypatch.setenv(H.ENV, "1")
    assert H.configs() and not any(c.kwargs["WS"] for c in H.configs())
    monkeypatch.setenv(H.ENV, "ws")
    assert any(c.kwargs["WS"] for c in H.configs()) and all(c.kwargs["BLOCK_M"] == 128 for c in H.configs())
    monkeypatch.setenv(H.ENV, "yes")
    with pytest.raises(ValueError, match="must be 0, 1 or ws"):
        H.mode()


def test_gpu_implementation_registered():
    pytest.importorskip("triton")
    assert "attention" in A.CUDA_IMPL


# GPU cases.  Each distinct set of compile-time constants (head dim, mask kind, formats, causal) is a
# fresh Triton compile, and the reference runs on the CPU, so the list is short: full sizes only where
# the size is the point (a SmolLM2-135M prefill, autotuned; a decode step over a 2048-token context),
# and every other feature (head dims 80/96/128, masks, FP8 and mixed formats, strided layouts) at a few
# hundred tokens, each case forced to one of the autotuner's candidate tilings in turn, so that every
# candidate is checked once whichever the autotuner picks.
GPU_AUTOTUNED = [(1, 9, 3, 2048, 2048, 64, "int8", "int8", "causal", 64, torch.bfloat16),   # SmolLM2-135M prefill
                 (8, 32, 8, 1, 2048, 128, "int8", "int8", "none", 64, torch.bfloat16),   # decode (fixed tile)
                 (1, 32, 8, 1, 8192, 128, "int8", "int8", "bool", 64, torch.bfloat16, 16),  # split-key decode
                 (2, 32, 8, 1, 3000, 128, "fp8", "fp8", "none", 64, torch.bfloat16, 16),
                 (4, 9, 3, 1, 700, 64, "int8", "int8", "bool", 64, torch.bfloat16)]      # decode, padded batch
GPU_TILINGS = [(2, 12, 4, 300, 400, 80, "int8", "int8", "none", 64, torch.bfloat16),
               (1, 8, 8, 257, 257, 96, "int8", "int8", "bool", 64, torch.bfloat16),
               (2, 8, 2, 200, 200, 128, "int8", "int8", "float", 128, torch.float32),
               (1, 8, 2, 384, 384, 128, "fp8", "fp8", "causal", 64, torch.bfloat16),
               (1, 8, 2, 300, 300, 64, "int8", "fp8", "causal", 64, torch.bfloat16),
               (1, 4, 4, 333, 333, 128, "fp8", "int8", "none", 64, torch.float32)]
GPU_TIMEOUT_S = 300
# The Hopper prefill kernel (forced, hopper=True, so a case it cannot take fails instead of falling back):
# the benchmark's shape per batch element (32/8 heads, D 128, causal, V keys-contiguous: i % 3 == 1) and
# FP8 autotuned over its candidates; then each candidate forced at least once
# on smaller cases (channels-contiguous V, keys-contiguous V with N = 257: plain loads, ragged ends).
HOPPER_GPU_AUTOTUNED = [(1, 8, 2, 1000, 1000, 64, "int8", "int8", "none", 64, torch.bfloat16),
                        (2, 32, 8, 2048, 2048, 128, "int8", "int8", "causal", 64, torch.bfloat16),
                        (1, 32, 8, 1024, 1024, 128, "fp8", "fp8", "causal", 64, torch.bfloat16),
                        (1, 4, 2, 200, 200, 128, "int8", "fp8", "none", 64, torch.float32),
                        (1, 32, 8, 1024, 1024, 128, "fp8", "fp8", "causal", 64, torch.bfloat16)]
HOPPER_GPU_TILINGS = [(1, 8, 2, 1000, 1000, 64, "int8", "int8", "none", 64, torch.bfloat16),
                      (1, 16, 4, 257, 257, 128, "int8", "int8", "causal", 64, torch.bfloat16),
                      (1, 8, 8, 300, 320, 128, "int8", "fp8", "causal", 64, torch.float32),
                      (1, 8, 2, 500, 512, 32, "fp8", "int8", "none", 128, torch.bfloat16)]


GPU_GROUPS = ("autotuned", "tilings-0", "tilings-1", "hopper-autotuned", "hopper-tilings")   # one child each


def _gpu_main(group: str):
    from fq_compile.kernels.triton.attention import PREFILL_CONFIGS
    assert torch.cuda.is_available()
    os.environ["FQ_TUNE"] = "1"     # the autotuned launch as models run it
    if group == "hopper-autotuned":
        _gpu_hopper_selected()
        layouts = check_attention("cuda", HOPPER_GPU_AUTOTUNED, seed=23, progress=True, hopper=True)
        assert [lay["V_T"] for lay in layouts] == [False, True, False, False, True] and all(lay["USE_DESC"] for lay in layouts)
    elif group == "hopper-tilings":
        from fq_compile.kernels.triton.attention_hopper import configs      # + the WS one under FQ_ATTN_HOPPER=ws
        check_attention("cuda", HOPPER_GPU_TILINGS, seed=24, configs=configs(), progress=True, hopper=True)
    elif group == "autotuned":
        check_attention("cuda", GPU_AUTOTUNED, seed=21, progress=True)
    else:
        half = int(group.rsplit("-", 1)[1])      # every other case: the forced tilings' compiles are the time
        check_attention("cuda", GPU_TILINGS[half::2], seed=22 + half, configs=PREFILL_CONFIGS, progress=True)
    print(f"attention gpu {group}: ok")


def _gpu_hopper_selected():
    """On an sm_90 device with FQ_ATTN_HOPPER unset, the op's own launch (no switch) takes the Hopper kernel
    at the benchmark's prefill shape, and not for a masked call or a decode step."""
    from fq_compile.kernels.triton import attention_hopper as H
    if torch.cuda.get_device_capability() != (9, 0) or os.environ.get(H.ENV, "1") == "0":
        print("not sm_90 (or FQ_ATTN_HOPPER=0): the automatic choice is not checked here")
        return
    q = torch.zeros(8, 32, 2048, 128, dtype=torch.int8, device="cuda")
    k = torch.zeros(8, 8, 2048, 128, dtype=torch.int8, device="cuda")
    v = k.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert H.plan(q, k, v, None, 0) == dict(USE_DESC=True, V_T=True)
    assert H.plan(q, k, v, torch.ones(2048, 2048, dtype=torch.bool, device="cuda"), 0) is None
    assert H.plan(q[:, :, :1], k, v, None, 16) is None


@gpu
@needs_cuda
@pytest.mark.parametrize("group", GPU_GROUPS)
def test_gpu_kernel_matches_reference(group):
    """The kernel against the reference on the GPU, in a child process under a time limit (a hung
    kernel fails the test, with the last case started, instead of stalling the run); the autotuned
    full-size cases and each half of the forced tilings in its own child (the longest GPU test as one)."""
    run_guarded([__file__, "gpu", group], GPU_TIMEOUT_S)


def _gpu_inductor_main():
    """torch.compile(inductor) of quantize_heads + fq.attention at a small prefill (autotuned tiling; V
    stored keys-contiguous, as passes/attention.py emits it):
    our Triton kernel in the generated code (on sm_90 the Hopper prefill kernel, with its device-side
    tensor descriptors), no fallback to the reference op; same result as eager (where quantize_heads
    is one Triton launch, kernels/triton/heads.py: the same bits as Inductor's fused aten ops)."""
    from torch._inductor.utils import run_and_get_code

    gen = torch.Generator().manual_seed(31)
    q, k, v = (t.cuda().to(torch.bfloat16) for t in make_qkv(2, 8, 2, 96, 96, 128, gen))
    inv = {n: torch.full((h,), 20.0, device="cuda") for n, h in (("q", 8), ("k", 2), ("v", 2))}

    def f(q, k, v):
        qq = torch.ops.fq.quantize_heads(q, inv["q"], torch.int8)
        kq = torch.ops.fq.quantize_heads(k, inv["k"], torch.int8)
        vq = torch.ops.fq.quantize_heads(v, inv["v"], torch.int8)
        vq = vq.transpose(-1, -2).contiguous().transpose(-1, -2)        # keys-contiguous, as the pass emits it
        return torch.ops.fq.attention(qq, kq, vq, 1 / inv["q"], 1 / inv["k"], 1 / inv["v"], None, True, 128 ** -0.5, 64,
                                      torch.bfloat16)

    print("compiling", flush=True)
    out, codes = run_and_get_code(torch.compile(f, backend="inductor", fullgraph=True), q, k, v)
    code = "\n".join(codes)
    from fq_compile.kernels.triton import attention_hopper
    hopper = torch.cuda.get_device_capability() == (9, 0) and attention_hopper.mode() != "0"
    kernel = "hopper_prefill_kernel" if hopper else "attention_kernel"      # sm_90 takes the Hopper prefill
    assert kernel in code and "attention_reference" not in code, code[-3000:]
    assert torch.equal(out, f(q, k, v))
    print("attention inductor gpu: ok")


@gpu
@needs_cuda
def test_gpu_inductor_inlines_attention_kernel():
    run_guarded([__file__, "gpu-inductor"], GPU_TIMEOUT_S)


if __name__ == "__main__":
    mode = sys.argv[1] if sys.argv[1:] else ""
    if mode == "gpu":
        _gpu_main(sys.argv[2])
    else:
        {"gpu-inductor": _gpu_inductor_main, "interp-quantize": _interp_quantize_main,
         "interp-hopper": _interp_hopper_main}.get(mode, _interp_main)()
