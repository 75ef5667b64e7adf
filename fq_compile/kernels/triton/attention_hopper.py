"""Prefill `fq::attention` structured for Hopper (sm_90): the same bits as kernels/triton/attention.py's
kernel (both run attention_math's `_scores` and `_update`), laid out the way Triton's fused-attention
tutorial and FlashAttention-3 feed the wgmma tensor cores.

What differs from the generic kernel, and why:
  * K and V tiles arrive through tensor descriptors (tl.make_tensor_descriptor: the TMA copy engine
    moves whole tiles into shared memory, no per-thread address arithmetic or masks; the descriptor
    zero-fills keys past N, which the diagonal step masks to -inf as the generic kernel's masked
    loads do).  USE_DESC=False runs the same loop on plain masked loads: where a base or a stride is
    not 16-byte aligned (TMA's rule), and available to the interpreter for comparison.
  * V keys-contiguous ("V^T", v.stride(-2) == 1, as passes/attention.py stores it): the tile is read
    as [D, BLOCK_N] and transposed in registers, so P.V's B operand is K-major, the only layout 8-bit
    wgmma takes without a shuffle through shared memory (the layout measured fastest, 1.23 vs 1.76 ms
    on the H100 for the generic INT8 kernel).  V with channels contiguous takes the row descriptor.
  * The unmasked off-diagonal blocks run in `tl.range(..., warp_specialize=WS)`: with WS Triton splits
    the loop into a producer partition (the TMA loads) and consumer warps (dots and softmax), the
    FlashAttention-3 structure; the causal diagonal (and the ragged end) runs after it with the masks.
    WS is opt-in (FQ_ATTN_HOPPER=ws adds a warp-specialised candidate to the autotuner's): compiled for
    sm_90 with Triton 3.8 (this repository's CPU venv; the device has 3.6), the loop at num_warps 8
    compiles but gets no warp_specialize partitions (the same code as WS=False), and at num_warps 4
    the compile fails ("unsupported load type for producer commit").  Whether 3.6 on the device does
    better is unmeasured.
  * BLOCK_M 128 packed rows (two warpgroups at num_warps 8, one at 4); BLOCK_N stays the plan's kv_block
    (part of the semantics, never tuned).  The softmax scale is folded into c (score_scale), exp2 is
    the reference's polynomial (EXP_HW is not offered here: the exact path is the one that must pay).

What bounds it (an estimate, not a timing: benchmarks/attention_ptx.py on the sm_90 PTX of Triton 3.8):
the unmasked loop spends ~38 (INT8) / ~36 (FP8) PTX instructions per score on the exact softmax
(exp2q's rounded multiplies, P's rounding, the int32 -> float32 conversions, the rescale), which at
8 x 2048 x 32 heads (causal) is an issue-bound floor of ~0.65-0.7 ms on an H100, above cuDNN bf16's
measured 0.54 ms: the tensor-core structure alone cannot reach the issue's 1.2x under these semantics.

Where it runs: `plan` decides (sm_90, no mask, no split keys, prefill-sized tiles, D == DV in 32/64/128,
kv_block >= 32 (8-bit dots take K >= 32), K channels contiguous, V either way); FQ_ATTN_HOPPER=0 turns
it off, =1 (default) on, =ws on with the warp-specialised candidate too.  Everything else goes to the generic kernel.  Under TRITON_INTERPRET=1
(triton 3.8 here) the same code runs with no constexpr guard: the interpreter accepts warp_specialize
and runs the loop as a plain loop, and emulates the descriptors (checking TMA's alignment rules), so
the CPU tests run this kernel's math and its descriptor indexing, not its Hopper scheduling.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from fq_compile.kernels.attention import DECODE_ROWS
from fq_compile.kernels.triton.attention_math import (_hint, _key_bounds, _normalized, _packed_rows, _scores, _to_out,
                                                     _update)
from fq_compile.kernels.triton.tuning import tuning

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
HEAD_DIMS = (32, 64, 128)
ENV = "FQ_ATTN_HOPPER"


@triton.jit
def _load_k(src, j0, N, stride_kn, D: tl.constexpr, BLOCK_N: tl.constexpr, USE_DESC: tl.constexpr,
            BOUNDS: tl.constexpr):
    """K tile [BLOCK_N, D] of keys j0.. (src: descriptor, or the (b, g) base pointer).  if/else, not an early
    return: Triton compiles the code after a constexpr branch's return too (and a descriptor has no `+`)."""
    if USE_DESC:
        k = src.load([j0, 0])
    else:
        offs_n = j0 + tl.arange(0, BLOCK_N)
        ptrs = src + offs_n[:, None].to(tl.int64) * stride_kn + tl.arange(0, D)[None, :]
        if BOUNDS:
            k = tl.load(ptrs, mask=(offs_n < N)[:, None], other=0.0)
        else:
            k = tl.load(ptrs)
    return k


@triton.jit
def _load_v(src, j0, N, stride_vn, stride_vd, D: tl.constexpr, BLOCK_N: tl.constexpr, USE_DESC: tl.constexpr,
            V_T: tl.constexpr, BOUNDS: tl.constexpr):
    """V tile [BLOCK_N, D]; V_T: read from keys-contiguous storage as [D, BLOCK_N], transposed in registers."""
    if USE_DESC:
        if V_T:
            v = tl.trans(src.load([0, j0]))
        else:
            v = src.load([j0, 0])
    else:
        offs_n = j0 + tl.arange(0, BLOCK_N)
        ptrs = src + offs_n[:, None].to(tl.int64) * stride_vn + tl.arange(0, D)[None, :].to(tl.int64) * stride_vd
        if BOUNDS:
            v = tl.load(ptrs, mask=(offs_n < N)[:, None], other=0.0)
        else:
            v = tl.load(ptrs)
    return v


@triton.jit
def _step(acc, l_i, m_i, q, c, qpos, k_src, v_src, j0, N, stride_kn, stride_vn, stride_vd,
          D: tl.constexpr, BLOCK_N: tl.constexpr, USE_DESC: tl.constexpr, V_T: tl.constexpr, BOUNDS: tl.constexpr,
          CAUSAL: tl.constexpr, QK_INT8: tl.constexpr, PV_INT8: tl.constexpr, PV_F16: tl.constexpr,
          QK_PROMOTE: tl.constexpr, BLOCK_M: tl.constexpr):
    """One kv block, as the generic kernel's `_block` without a mask tensor; BOUNDS: key bound and causal mask."""
    k = _load_k(k_src, j0, N, stride_kn, D, BLOCK_N, USE_DESC, BOUNDS)
    t = _scores(q, k, c, QK_INT8, QK_PROMOTE)
    if BOUNDS:
        offs_n = j0 + tl.arange(0, BLOCK_N)
        visible = (offs_n < N)[None, :]
        if CAUSAL:
            visible = visible & (offs_n[None, :] <= qpos[:, None])
        t = tl.where(visible, t, float("-inf"))
    v = _load_v(v_src, j0, N, stride_vn, stride_vd, D, BLOCK_N, USE_DESC, V_T, BOUNDS)
    return _update(acc, l_i, m_i, t, v, PV_INT8, False, PV_F16, BLOCK_M)


@triton.jit
def hopper_prefill_kernel(Q, K, V, C, VS, OUT,
                          stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn,
                          stride_vb, stride_vh, stride_vn, stride_vd, stride_ob, stride_oh, stride_om, stride_od,
                          HKV, M, N, REP, M_BUCKET, N_BUCKET,
                          D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                          QK_INT8: tl.constexpr, PV_INT8: tl.constexpr, USE_DESC: tl.constexpr, V_T: tl.constexpr,
                          WS: tl.constexpr, PV_F16: tl.constexpr = 0, QK_PROMOTE: tl.constexpr = 0):
    """OUT[b, h, i, :] for BLOCK_M packed rows of kv head g (grid: row blocks, B * HKV); rows packed as the
    generic kernel packs them (row r: position r // REP of head g * REP + r % REP).  K's channels are
    contiguous (stride 1, not passed); V_T: V's keys are (stride_vn == 1)."""
    pid_m = tl.program_id(0)
    b, g, row_ok, qpos, h = _packed_rows(pid_m, tl.program_id(1), HKV, M, REP, BLOCK_M)
    offs_d = tl.arange(0, D)
    q = tl.load(Q + b * stride_qb + h[:, None].to(tl.int64) * stride_qh + qpos[:, None].to(tl.int64) * stride_qm
                + offs_d[None, :] * stride_qd, mask=row_ok[:, None], other=0.0)
    c = tl.load(C + h, mask=row_ok, other=0.0)
    k_src = K + b * stride_kb + g.to(tl.int64) * stride_kh
    v_src = V + b * stride_vb + g.to(tl.int64) * stride_vh
    if USE_DESC:
        k_src = tl.make_tensor_descriptor(k_src, shape=[N, D], strides=[stride_kn, 1], block_shape=[BLOCK_N, D])
        if V_T:
            v_src = tl.make_tensor_descriptor(v_src, shape=[D, N], strides=[stride_vd, 1], block_shape=[D, BLOCK_N])
        else:
            v_src = tl.make_tensor_descriptor(v_src, shape=[N, D], strides=[stride_vn, 1], block_shape=[BLOCK_N, D])

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    hi, full = _key_bounds(pid_m, M, N, REP, BLOCK_M, BLOCK_N, CAUSAL)
    # off the diagonal: every row sees every key of the block (no masks; the producer/consumer loop)
    for j0 in tl.range(0, full, BLOCK_N, warp_specialize=WS):
        acc, l_i, m_i = _step(acc, l_i, m_i, q, c, qpos, k_src, v_src, j0, N, stride_kn, stride_vn, stride_vd,
                              D, BLOCK_N, USE_DESC, V_T, False, CAUSAL, QK_INT8, PV_INT8, PV_F16, QK_PROMOTE, BLOCK_M)
    # the causal diagonal and the ragged end: at most ceil(BLOCK_M / REP / BLOCK_N) + 1 blocks
    for j0 in range(full, hi, BLOCK_N):
        acc, l_i, m_i = _step(acc, l_i, m_i, q, c, qpos, k_src, v_src, j0, N, stride_kn, stride_vn, stride_vd,
                              D, BLOCK_N, USE_DESC, V_T, True, CAUSAL, QK_INT8, PV_INT8, PV_F16, QK_PROMOTE, BLOCK_M)

    out = _normalized(acc, l_i, tl.load(VS + g) + tl.zeros([BLOCK_M], tl.float32))
    o_ptrs = (OUT + b * stride_ob + h[:, None].to(tl.int64) * stride_oh + qpos[:, None].to(tl.int64) * stride_om
              + offs_d[None, :] * stride_od)
    tl.store(o_ptrs, _to_out(out, OUT.dtype.element_ty), mask=row_ok[:, None])


def _cfg(warps: int, stages: int, ws: bool) -> triton.Config:
    return triton.Config({"BLOCK_M": 128, "WS": ws}, num_warps=warps, num_stages=stages)


# Candidates: the tutorial's Hopper shapes at BLOCK_M 128 (each one a compile at a model's first prefill;
# the GPU tests run each explicitly).  Unmeasured: which wins.  WS_CONFIGS: only with FQ_ATTN_HOPPER=ws
# (see the module docstring; num_warps 4 with WS failed to compile, so it is not offered).
HOPPER_CONFIGS = [_cfg(8, 3, False), _cfg(4, 3, False)]
WS_CONFIGS = [_cfg(8, 3, True)]
INTERPRET_CONFIG = triton.Config({"BLOCK_M": 16, "WS": False}, num_warps=4, num_stages=1)


def mode() -> str:
    """FQ_ATTN_HOPPER: "0" off, "1" on (default), "ws" on with the warp-specialised candidate too."""
    v = os.environ.get(ENV, "1").strip().lower()
    if v not in ("0", "1", "ws"):
        raise ValueError(f"{ENV}={v!r} must be 0, 1 or ws")
    return v


def configs() -> list[triton.Config]:
    return HOPPER_CONFIGS + (WS_CONFIGS if mode() == "ws" else [])


def _aligned(t: torch.Tensor, dims) -> bool:
    """TMA's rule for a descriptor over t's (b, g) slabs: base and the named strides 16-byte aligned.  The
    base from the storage offset (torch's allocators align storages to 512 bytes), which a traced tensor
    has too (a FakeTensor has no data pointer).  A symbolic offset or stride (a dynamic sequence length
    under Inductor) is not aligned: USE_DESC is compiled in, and a later call's length may break the rule."""
    vals = [t.storage_offset()] + [t.stride(i) for i in dims]
    if any(isinstance(x, torch.SymInt) for x in vals):
        return False
    return all((int(x) * t.element_size()) % 16 == 0 for x in vals)


def plan(q, k, v, mask, splits: int, kv_block: int = 64, force: bool = False) -> dict | None:
    """The Hopper kernel's layout constants for this call (USE_DESC, V_T), or None where it does not apply
    (then the generic kernel runs).  force: skip the device and FQ_ATTN_HOPPER checks (tests, benchmark
    columns), never the shape checks."""
    if not force and (_INTERPRET or mode() == "0" or not q.is_cuda or torch.cuda.get_device_capability(q.device) != (9, 0)):
        return None
    d, dv = q.shape[-1], v.shape[-1]
    rows = _hint(q.shape[2]) * (q.shape[1] // k.shape[1])
    if mask is not None or splits > 1 or kv_block < 32 or rows <= DECODE_ROWS or d != dv or d not in HEAD_DIMS or _hint(k.stride(-1)) != 1:
        return None
    if _hint(v.stride(-2)) == 1 and _hint(v.shape[-2]) > 1:
        v_t = True
    elif _hint(v.stride(-1)) == 1:
        v_t = False
    else:
        return None
    use_desc = _aligned(k, (0, 1, 2)) and _aligned(v, (0, 1, 3) if v_t else (0, 1, 2))
    return dict(USE_DESC=use_desc, V_T=v_t)


def _torch_alloc(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


@functools.lru_cache(maxsize=1)
def _ensure_allocator() -> None:
    """Device-side tensor descriptors need global scratch, which Triton takes from its allocator: set
    one (torch's caching allocator) unless the process already has one."""
    try:
        from triton.runtime import _allocator
        if not isinstance(_allocator._allocator.get(), _allocator.NullAllocator):
            return
    except (ImportError, AttributeError):
        pass
    triton.set_allocator(_torch_alloc)


@functools.lru_cache(maxsize=None)
def _tuned(ws: bool, tune: bool):
    cfgs = HOPPER_CONFIGS + (WS_CONFIGS if ws else [])
    return triton.autotune(configs=cfgs if tune else cfgs[:1], key=["M_BUCKET", "N_BUCKET", "REP", "D", "BLOCK_N", "CAUSAL",
                                                     "QK_INT8", "PV_INT8", "USE_DESC", "V_T"])(hopper_prefill_kernel)


def launch(q, k, v, c, vs, out, causal: bool, kv_block: int, layout: dict, buckets, *, pv_f16: int, qk_promote: int,
           config: triton.Config | None = None) -> None:
    """Run the kernel into out (c, vs: the generic launcher's score scale and v scales; buckets: its
    (M_BUCKET, N_BUCKET) autotune keys).  config: force one tiling; else autotuned over `configs()`
    (the first only under FQ_TUNE=0), the interpreter's small tile under TRITON_INTERPRET=1."""
    b, hq, m, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    rep = hq // hkv
    if layout["USE_DESC"] and not _INTERPRET:
        _ensure_allocator()
    args = (q, k, v, c, vs, out, *q.stride(), *k.stride()[:3], *v.stride(), *out.stride(), hkv, m, n, rep, *buckets)
    common = dict(D=d, BLOCK_N=kv_block, CAUSAL=bool(causal), QK_INT8=q.dtype == torch.int8,
                  PV_INT8=v.dtype == torch.int8, PV_F16=pv_f16, QK_PROMOTE=qk_promote, **layout)
    if config is None and _INTERPRET:
        config = INTERPRET_CONFIG
    if config is not None:
        bm = config.kwargs["BLOCK_M"]
        ws = bool(config.kwargs.get("WS", False))
        torch.library.wrap_triton(hopper_prefill_kernel)[(triton.cdiv(m * rep, bm), b * hkv)](
            *args, BLOCK_M=bm, WS=ws, num_warps=config.num_warps, num_stages=config.num_stages, **common)
        return

    def grid(meta):
        return (triton.cdiv(m * rep, meta["BLOCK_M"]), b * hkv)

    torch.library.wrap_triton(_tuned(mode() == "ws", tuning()))[grid](*args, **common)


def compile_sm90(qk_fmt: str, pv_fmt: str, v_t: bool, use_desc: bool, warps: int, d: int = 128, kv_block: int = 64,
                 ws: bool = False, causal: bool = True) -> str:
    """The kernel compiled ahead of time for sm_90 with Triton's own ptxas (no GPU needed): its PTX, for
    tests/kernels/test_attention.py (wgmma, TMA) and benchmarks/attention_ptx.py (instructions per score)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    ptr = {"int8": "*i8", "fp8": "*fp8e4nv"}
    sig = {"Q": ptr[qk_fmt], "K": ptr[qk_fmt], "V": ptr[pv_fmt], "C": "*fp32", "VS": "*fp32", "OUT": "*bf16"}
    sig.update({n: "i32" for n in hopper_prefill_kernel.arg_names[6:27]})
    cx = dict(D=d, BLOCK_M=128, BLOCK_N=kv_block, CAUSAL=causal, QK_INT8=qk_fmt == "int8", PV_INT8=pv_fmt == "int8",
              USE_DESC=use_desc, V_T=v_t, WS=ws, PV_F16=0, QK_PROMOTE=0 if qk_fmt == "int8" else 32)
    sig.update({n: "constexpr" for n in cx})
    src = ASTSource(fn=hopper_prefill_kernel, signature=sig, constexprs=cx)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=3)).asm["ptx"]
