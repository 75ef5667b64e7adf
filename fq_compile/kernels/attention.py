"""Quantized attention: `fq::attention`, and the head-wise quantize/dequantize ops that feed it.

    out = softmax(Q K^T * sm_scale + mask) V      Q, K in INT8 or FP8 e4m3; P and V in INT8 or FP8 e4m3

The paper runs attention's two batched products (Q.K^T and P.V) on the INT8 tensor cores; this op
does that in one flash-attention style pass (online softmax, no score matrix in memory).

Inputs (the layout scaled_dot_product_attention takes):
    q  [B, Hq, M, D]   int8 or float8_e4m3fn: round(Q / q_scale[h]) (see `quantize_heads`)
    k  [B, Hkv, N, D]  same dtype as q; Hq % Hkv == 0 (grouped-query attention: head h reads h // (Hq/Hkv))
    v  [B, Hkv, N, Dv] int8 or float8_e4m3fn; its dtype is also P's format
    q_scale [Hq], k_scale [Hkv], v_scale [Hkv]  float32 (a per-tensor plan passes equal values)
    mask  None, bool (True = attend) or an additive float mask, broadcastable to [B, Hq, M, N]
    causal  key j is visible to query i iff j <= i (top-left, as SDPA's is_causal)
    sm_scale  the softmax scale; kv_block  the key block of the online softmax (see below)

Semantics (what every kernel reproduces), per row i of head h (kv head g), all float32:

    c      = fl(fl(fl(q_scale[h] * k_scale[g]) * sm_scale) * LOG2E)                 (host, once)
    S_ij   = sum_d q[i,d] k[j,d]: exact int32 for INT8; for FP8 the exact sum rounded once to float32
    t_ij   = fl(S_ij * c) [+ fl(mask_ij * LOG2E)]; -inf where masked (bool mask, causal)
    for each block of kv_block keys, j0 = 0, kv_block, ...  (m = -inf, l = 0, acc = 0 to start):
        m'    = max(m, max_j t_ij);  u = (m' if m' > -inf else 0)
        alpha = exp2q(m - u);  p_ij = exp2q(t_ij - u)
        P_ij  = INT8: rint(fl(p_ij * 127))       FP8: e4m3(p_ij) (round to nearest even)
        l     = fl(fl(l * alpha) + sum_j P_ij)            (the block sum is exact in float32)
        acc   = fl(fl(acc * alpha) + sum_j P_ij v[j])     (INT8: exact int32; FP8: exact sum, rounded once)
        m     = m'
    out_i  = fl(acc * fl(v_scale[g] / l))   (0 where l = 0: a row with no visible key), cast to out_dtype

Split keys (flash-decoding; kv_splits > 1): the keys are cut into kv_splits spans of whole kv blocks
(`split_span`: ceil(ceil(N / kv_block) / kv_splits) blocks each; the last spans may be shorter or empty),
each span runs the loop above from m = -inf, l = 0, acc = 0 on its own (an empty span keeps those), and the
kv_splits partials (m_s, l_s, acc_s) are combined in span order:

    M = max_s m_s;  u = (M if M > -inf else 0);  a_s = exp2q(m_s - u)
    l = sum_s fl(l_s * a_s);  acc = sum_s fl(acc_s * a_s)       (each sum left to right, from 0)

then out as above.  One query row (a decode step) then spreads over kv_splits programs per kv head
instead of one, which a short batch needs to fill the GPU; P is quantized against each span's own
running max, so the bits depend on kv_splits (part of the semantics, like kv_block: the attention pass
sets it from the graph's shapes, passes/attention.py).

P's scale cancels between acc and l (both count P in the same units), so P needs no calibration:
relative to the running max it lies in [0, 1] by construction.  exp2q is a fixed polynomial:

    exp2q(x) = 0 for x < -126; else with n = floor(x), f = fl(x - n):
               fl(fl(fl(fl(fl(fl(C3 * f) + C2) * f) + C1) * f) + 1) * 2**n

(degree 3, max relative error 8.6e-5 against 2**x: 1% of an INT8 step of P).  It is built from
IEEE-rounded multiplies and adds only, so the CPU reference, the Triton interpreter and the GPU compute
the same bits, where each math library's exp2 differs in the last place; it also runs on the FMA
units rather than the special-function unit that limits flash attention at 8-bit tensor-core rates.
exp2q(0) = 1 exactly, so a block that does not raise the max leaves acc and l untouched.

What is exact, and what is not: with INT8 Q, K, P and V every step above is reproducible bit for bit
(integer products are exact; every float op is spelled out, with no fused multiply-add), and the
Triton kernel matches this reference exactly.  With FP8 operands the reference defines each product
sum as exact-then-rounded, while Hopper's FP8 tensor cores accumulate with fewer bits: GPU results
then agree within the tolerance the tests state, not bit for bit.  The result depends on kv_block (the
running max is updated once per block), so the plan records the block every kernel must use.
"""

from __future__ import annotations

import math

import torch
from torch.library import custom_op

from fq_compile.kernels.int_gemm import exact_float_chunk
from fq_compile.kernels.registry import define_op

FORMATS = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
QMAX = {"int8": 127.0, "fp8": 448.0}
LOG2E = 1.4426950408889634
EXP2_C = (0.6951163411140442, 0.22764700651168823, 0.07706519961357117)  # C1, C2, C3: float32 values
KV_BLOCK = 64
KV_BLOCKS = (16, 32, 64, 128)
P_QMAX = 127.0
MAX_KV_SPLITS = 64      # the Triton combine kernel unrolls one step per split
DECODE_ROWS = 16        # packed query rows per kv head that one decode tile holds (kernels/triton/attention.py)


# The GPU kernels, registered by fq_compile/kernels/__init__.py: "attention" (kernels/triton/attention.py)
# and "quantize_heads" ((applies, impl), kernels/triton/heads.py).
CUDA_IMPL = {}


def register_cuda_impl(fn, quantize_heads=None) -> None:
    CUDA_IMPL["attention"] = fn
    if quantize_heads is not None:
        CUDA_IMPL["quantize_heads"] = quantize_heads


def format_of(dtype: torch.dtype) -> str:
    for name, dt in FORMATS.items():
        if dt == dtype:
            return name
    raise ValueError(f"quantized attention operands must be int8 or float8_e4m3fn, got {dtype}")


# ------------------------------------------------------------------------------------------------
# quantize / dequantize, head by head
# ------------------------------------------------------------------------------------------------

def inverse_scale(scale: torch.Tensor) -> torch.Tensor:
    """1 / scale in float32: the multiplier `quantize_heads` takes (one definition, so the graph,
    the KV cache and the tests quantize with the same bits)."""
    return torch.reciprocal(scale.detach().float())


def _heads_view(s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return s.reshape(1, -1, *([1] * (x.dim() - 2)))


def quantize_heads_reference(x: torch.Tensor, inv_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, H, ...] float -> int8 rint(x * inv_scale[h]) clamped to +-127, or float8_e4m3fn of
    x * inv_scale[h] clamped to +-448 (round to nearest even)."""
    xs = x.float() * _heads_view(inv_scale.float(), x)
    if dtype == torch.int8:
        return torch.round(xs).clamp(-QMAX["int8"], QMAX["int8"]).to(torch.int8)
    if dtype == torch.float8_e4m3fn:
        return xs.clamp(-QMAX["fp8"], QMAX["fp8"]).to(torch.float8_e4m3fn)
    raise ValueError(f"quantize_heads: dtype must be torch.int8 or torch.float8_e4m3fn, got {dtype}")


def dequantize_heads_reference(xq: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (xq.float() * _heads_view(scale.float(), xq)).to(dtype)


def _quantize_heads(x: torch.Tensor, inv_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The composite's body: on a plain CUDA tensor (eager mode) one Triton launch with the reference's
    bits (kernels/triton/heads.py: the five aten kernels below cost ~10x the bytes they must move);
    anything else, a traced tensor (FakeTensor, FunctionalTensor) above all, gets the aten ops, so
    AOTAutograd still decomposes the op and Inductor fuses it with its neighbours."""
    impl = CUDA_IMPL.get("quantize_heads")
    if impl is not None and type(x) is torch.Tensor and x.is_cuda and impl[0](x, inv_scale, dtype):
        return impl[1](x, inv_scale, dtype)
    return quantize_heads_reference(x, inv_scale, dtype)


# Composite (decomposed into aten ops by AOTAutograd, so Inductor fuses them with their neighbours, e.g.
# the rotary embedding that produces Q and K), yet one node in a Dynamo graph: the attention pass
# recognises a KV-cache read (`dequantize_heads`) and hands the 8-bit tensor to the kernel directly.
_LIB = torch.library.Library("fq", "FRAGMENT")
_LIB.define("quantize_heads(Tensor x, Tensor inv_scale, ScalarType dtype) -> Tensor")
_LIB.define("dequantize_heads(Tensor xq, Tensor scale, ScalarType dtype) -> Tensor")
_LIB.impl("quantize_heads", _quantize_heads, "CompositeImplicitAutograd")
_LIB.impl("dequantize_heads", dequantize_heads_reference, "CompositeImplicitAutograd")


# ------------------------------------------------------------------------------------------------
# the reference
# ------------------------------------------------------------------------------------------------

def exp2q(x: torch.Tensor) -> torch.Tensor:
    """The polynomial exp2 of the module docstring (float32 in, float32 out; x <= 0 in use)."""
    x = x.float()
    xc = x.clamp_min(-126.0)
    n = torch.floor(xc)
    f = xc - n
    c1, c2, c3 = (torch.tensor(c, dtype=torch.float32) for c in EXP2_C)
    p = f * c3 + c2
    p = p * f + c1
    p = p * f + 1.0
    two_n = ((n.to(torch.int32) + 127) << 23).view(torch.float32)
    return torch.where(x < -126.0, torch.zeros_like(p), p * two_n)


def score_scale(q_scale: torch.Tensor, k_scale: torch.Tensor, sm_scale: float) -> torch.Tensor:
    """c [Hq] of the module docstring: the float32 factor from integer scores to log2 units."""
    rep = q_scale.numel() // k_scale.numel()
    ks = k_scale.float().repeat_interleave(rep)
    c = q_scale.float() * ks
    c = c * torch.tensor(sm_scale, dtype=torch.float32)
    return c * torch.tensor(LOG2E, dtype=torch.float32)


def _exact_products(a: torch.Tensor, b: torch.Tensor, integer: bool) -> torch.Tensor:
    """a @ b (last two dims) with every sum exact before one rounding to float32: integer operands
    through a float32 GEMM that is exact by construction (int_gemm.exact_float_chunk), FP8 operands
    in float64 (their products span < 40 bits)."""
    if integer and a.device.type == "cpu":
        dtype, chunk = exact_float_chunk(a.shape[-1])
        if dtype == torch.float32 and chunk >= a.shape[-1]:
            return a.float() @ b.float()
    return (a.double() @ b.double()).float()


def split_span(n, kv_block: int, kv_splits: int):
    """Keys per span of the module docstring: ceil(ceil(N / kv_block) / kv_splits) whole kv blocks
    (N where kv_splits <= 1).  Works on a symbolic N (no branch on it)."""
    if kv_splits <= 1:
        return n
    blocks = (n + kv_block - 1) // kv_block
    return kv_block * ((blocks + kv_splits - 1) // kv_splits)


def choose_kv_splits(batch: int, kv_heads: int, rows: int, n: int, kv_block: int, sm_count: int) -> int:
    """kv_splits for a launch of `batch` x `kv_heads` programs of `rows` packed query rows over n keys:
    split (flash-decoding) only a decode-sized tile (rows <= DECODE_ROWS), into enough spans that the
    launch has about two programs per SM, at most one span per kv block and MAX_KV_SPLITS; 0: no split
    (prefill, a grid that fills the GPU, a context of one block, no SM count: the CPU)."""
    if rows > DECODE_ROWS or sm_count <= 0:
        return 0
    want = -(-2 * sm_count // max(1, batch * kv_heads))
    splits = min(want, -(-n // kv_block), MAX_KV_SPLITS)
    return splits if splits > 1 else 0


def attention_reference(q, k, v, q_scale, k_scale, v_scale, mask, causal: bool, sm_scale: float,
                        out_dtype: torch.dtype, kv_block: int = KV_BLOCK, kv_splits: int = 0) -> torch.Tensor:
    """The semantics of the module docstring, block by block (span by span where kv_splits > 1)."""
    b, hq, m, _ = q.shape
    hkv, n = k.shape[1], k.shape[2]
    rep = hq // hkv
    ops = dict(qf=q.float(), kf=k.float().repeat_interleave(rep, dim=1), vf=v.float().repeat_interleave(rep, dim=1),
               c=score_scale(q_scale, k_scale, sm_scale).to(q.device)[None, :, None, None],
               mask=None if mask is None else mask.expand(b, hq, m, n), causal=causal, kv_block=kv_block,
               qk_int=q.dtype == torch.int8, pv_int=v.dtype == torch.int8)
    if kv_splits <= 1:
        mx, den, acc = _scan(**ops, j_lo=0, j_hi=n)
    else:
        span = split_span(n, kv_block, kv_splits)
        mx, den, acc = _combine([_scan(**ops, j_lo=min(n, j * span), j_hi=min(n, (j + 1) * span))
                                 for j in range(kv_splits)])
    vs = v_scale.float().to(q.device).repeat_interleave(rep)[None, :, None]
    r = vs / torch.where(den > 0, den, torch.ones_like(den))
    out = torch.where(den[..., None] > 0, acc * r[..., None], torch.zeros_like(acc))
    return out.to(out_dtype)


def _combine(parts):
    """Split partials (m_s, l_s, acc_s) -> (M, l, acc): u = M (0 where M = -inf), a_s = exp2q(m_s - u),
    l = sum_s fl(l_s * a_s), acc = sum_s fl(acc_s * a_s), summed in split order."""
    big = parts[0][0]
    for m_s, _, _ in parts[1:]:
        big = torch.maximum(big, m_s)
    u = torch.where(big == -math.inf, torch.zeros_like(big), big)
    den = torch.zeros_like(parts[0][1])
    acc = torch.zeros_like(parts[0][2])
    for m_s, l_s, acc_s in parts:
        a = exp2q(m_s - u)
        den = den + l_s * a
        acc = acc + acc_s * a[..., None]
    return big, den, acc


def _scan(qf, kf, vf, c, mask, causal: bool, kv_block: int, qk_int: bool, pv_int: bool, j_lo: int, j_hi: int):
    """The online softmax over keys [j_lo, j_hi), blocks of kv_block from j_lo: (m, l, acc) unnormalised.
    qf/kf/vf: Q, K, V as float32, K and V repeated to the query heads; c: score_scale [1, Hq, 1, 1];
    mask: None or expanded to [B, Hq, M, N]."""
    b, hq, m, _ = qf.shape
    dv = vf.shape[-1]
    dev = qf.device
    rows = torch.arange(m, device=dev)[:, None]
    mx = torch.full((b, hq, m), -math.inf, device=dev)
    den = torch.zeros((b, hq, m), device=dev)
    acc = torch.zeros((b, hq, m, dv), device=dev)
    neg_inf = torch.tensor(-math.inf, device=dev)
    log2e = torch.tensor(LOG2E, dtype=torch.float32, device=dev)
    for j0 in range(j_lo, j_hi, kv_block):
        j1 = min(j_hi, j0 + kv_block)
        # causal: rows before j0 see none of this block, which leaves them exactly as they are
        # (max unchanged, alpha = exp2q(0) = 1, nothing added): skip them
        r0 = min(j0, m) if causal else 0
        if r0 == m:
            break
        s = _exact_products(qf[:, :, r0:], kf[:, :, j0:j1].transpose(-1, -2), qk_int)
        t = s * c
        visible = None
        if mask is not None:
            mb = mask[:, :, r0:, j0:j1]
            if mb.dtype == torch.bool:
                visible = mb
            else:
                t = t + mb.float() * log2e
        if causal:
            cv = torch.arange(j0, j1, device=dev)[None, :] <= rows[r0:]
            visible = cv if visible is None else visible & cv
        if visible is not None:
            t = torch.where(visible, t, neg_inf)
        m_old = mx[:, :, r0:]
        m_new = torch.maximum(m_old, t.amax(-1))
        u = torch.where(m_new == -math.inf, torch.zeros_like(m_new), m_new)
        alpha = exp2q(m_old - u)
        p = exp2q(t - u[..., None])
        if pv_int:
            pq = torch.round(p * torch.tensor(P_QMAX, dtype=torch.float32))
        else:
            pq = p.to(torch.float8_e4m3fn).float()
        den[:, :, r0:] = den[:, :, r0:] * alpha + pq.sum(-1)
        acc[:, :, r0:] = acc[:, :, r0:] * alpha[..., None] + _exact_products(pq, vf[:, :, j0:j1], pv_int)
        mx[:, :, r0:] = m_new
    return mx, den, acc


# ------------------------------------------------------------------------------------------------
# the op
# ------------------------------------------------------------------------------------------------

def _check(q, k, v, q_scale, k_scale, v_scale, mask, kv_block, kv_splits=0):
    torch._check(q.dim() == 4 and k.dim() == 4 and v.dim() == 4,
                 lambda: f"fq::attention wants [B, H, S, D] tensors, got q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    torch._check(q.dtype in (torch.int8, torch.float8_e4m3fn) and k.dtype == q.dtype,
                 lambda: f"fq::attention: q and k must both be int8 or both float8_e4m3fn, got {q.dtype}, {k.dtype}")
    torch._check(v.dtype in (torch.int8, torch.float8_e4m3fn),
                 lambda: f"fq::attention: v must be int8 or float8_e4m3fn, got {v.dtype}")
    torch._check(q.shape[0] == k.shape[0] == v.shape[0], lambda: "fq::attention: batch sizes differ")
    torch._check(q.shape[-1] == k.shape[-1],
                 lambda: f"fq::attention: head dims differ, q {q.shape[-1]} k {k.shape[-1]}")
    torch._check(k.shape[1] == v.shape[1] and k.shape[2] == v.shape[2],
                 lambda: f"fq::attention: k {tuple(k.shape)} and v {tuple(v.shape)} disagree on heads or length")
    torch._check(q.shape[1] % k.shape[1] == 0,
                 lambda: f"fq::attention: {q.shape[1]} query heads is not a multiple of {k.shape[1]} kv heads")
    for name, s, h in (("q_scale", q_scale, q.shape[1]), ("k_scale", k_scale, k.shape[1]),
                       ("v_scale", v_scale, k.shape[1])):
        torch._check(s.dim() == 1 and s.shape[0] == h and s.dtype == torch.float32,
                     lambda name=name, s=s, h=h: f"fq::attention: {name} must be float32 [{h}], "
                                                 f"got {s.dtype} {tuple(s.shape)}")
    if mask is not None:
        torch._check(mask.dim() <= 4, lambda: f"fq::attention: mask has {mask.dim()} dims")
    torch._check(kv_block in KV_BLOCKS, lambda: f"fq::attention: kv_block must be one of {KV_BLOCKS}, got {kv_block}")
    torch._check(0 <= kv_splits <= MAX_KV_SPLITS,
                 lambda: f"fq::attention: kv_splits must lie in [0, {MAX_KV_SPLITS}], got {kv_splits}")


def _fake(q, v, out_dtype):
    return q.new_empty((q.shape[0], q.shape[1], q.shape[2], v.shape[-1]), dtype=out_dtype)


@custom_op("fq::attention_reference", mutates_args=())
def _attention_ref_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_scale: torch.Tensor,
                      k_scale: torch.Tensor, v_scale: torch.Tensor, mask: torch.Tensor | None, causal: bool,
                      sm_scale: float, kv_block: int, out_dtype: torch.dtype, kv_splits: int = 0) -> torch.Tensor:
    _check(q, k, v, q_scale, k_scale, v_scale, mask, kv_block, kv_splits)
    return attention_reference(q, k, v, q_scale, k_scale, v_scale, mask, causal, sm_scale, out_dtype, kv_block,
                               kv_splits)


@define_op("fq::attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_scale: torch.Tensor, k_scale: torch.Tensor,
              v_scale: torch.Tensor, mask: torch.Tensor | None, causal: bool, sm_scale: float, kv_block: int,
              out_dtype: torch.dtype, kv_splits: int = 0) -> torch.Tensor:
    """Quantized attention (see the module docstring)."""
    impl = CUDA_IMPL.get("attention")
    if impl is not None and q.is_cuda:
        return impl(q, k, v, q_scale, k_scale, v_scale, mask, causal, sm_scale, kv_block, out_dtype, kv_splits=kv_splits)
    return torch.ops.fq.attention_reference(q, k, v, q_scale, k_scale, v_scale, mask, causal, sm_scale, kv_block,
                                            out_dtype, kv_splits)


for _op in (_attention_ref_op, attention):
    def _register(op=_op):
        @op.register_fake
        def _(q, k, v, q_scale, k_scale, v_scale, mask, causal, sm_scale, kv_block, out_dtype, kv_splits=0):
            _check(q, k, v, q_scale, k_scale, v_scale, mask, kv_block, kv_splits)
            return _fake(q, v, out_dtype)
    _register()
