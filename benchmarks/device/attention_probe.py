"""Where FP8 attention goes wrong on Hopper (issue 21/25): the attention kernel against its reference
for every (QK, PV) format pair, V layout (head dim contiguous / keys contiguous), tiling and P.V path
(e4m3 tensor cores / float16 tensor cores on the same e4m3 values), plus bare `tl.dot` probes that
isolate the FP8 operand cases (B row-major or column-major, A loaded or converted in registers).

    python benchmarks/device/attention_probe.py          (CUDA; prints one table, ~1 minute)
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import triton
import triton.language as tl
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from fq_compile.kernels import attention as A  # noqa: E402
from fq_compile.kernels.triton import attention as TA  # noqa: E402
from tests.kernels.test_attention import make_qkv, quantize, rel  # noqa: E402


@triton.jit
def _dot_probe(a_ptr, b_ptr, c_ptr, sa0, sa1, sb0, sb1, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
               A_CONVERT: tl.constexpr):
    m = tl.arange(0, BM)
    n = tl.arange(0, BN)
    k = tl.arange(0, BK)
    a = tl.load(a_ptr + m[:, None] * sa0 + k[None, :] * sa1)
    if A_CONVERT:                      # a arrives as float32 holding e4m3 values: convert in registers
        a = a.to(tl.float8e4nv)
    b = tl.load(b_ptr + k[:, None] * sb0 + n[None, :] * sb1)
    c = tl.dot(a, b, out_dtype=tl.float32)
    tl.store(c_ptr + m[:, None] * BN + n[None, :], c)


def dot_rows():
    rows = []
    g = torch.Generator().manual_seed(0)
    for bm, bn, bk in ((64, 128, 64), (128, 128, 64), (16, 128, 64)):
        a8 = (torch.rand(bm, bk, generator=g)).to(torch.float8_e4m3fn)
        b8 = (torch.randn(bk, bn, generator=g)).to(torch.float8_e4m3fn)
        want = a8.double() @ b8.double()
        for b_layout in ("row", "col"):
            b_dev = b8.cuda() if b_layout == "row" else b8.t().contiguous().cuda().t()
            for a_conv in (False, True):
                a_dev = a8.float().cuda() if a_conv else a8.cuda()
                c = torch.empty(bm, bn, device="cuda")
                _dot_probe[(1,)](a_dev, b_dev, c, *a_dev.stride(), *b_dev.stride(), BM=bm, BN=bn, BK=bk,
                                 A_CONVERT=a_conv, num_warps=4)
                rows.append([f"dot {bm}x{bn}x{bk}", f"B {b_layout}-major", "A converted" if a_conv else "A loaded",
                             f"{rel(c.cpu(), want):.2e}"])
    return rows


def attention_rows():
    """The kernel against its reference (float32 output) per format pair and V layout, for the decode
    tile (16 rows, mma.sync) and two prefill tiles (wgmma); FP8 P.V on the e4m3 tensor cores (pv -1),
    on the float16 ones (pv 1) and as shipped (pv 0: float16 for BLOCK_M >= 64); FP8 Q.K^T with
    Triton's default accumulation and with a promotion every 32 products."""
    rows = []
    g = torch.Generator().manual_seed(1)
    b, hq, hkv, m, n, d = 1, 8, 2, 256, 256, 128
    for qk, pv in (("int8", "int8"), ("fp8", "fp8"), ("int8", "fp8"), ("fp8", "int8")):
        q, k, v = make_qkv(b, hq, hkv, m, n, d, g)
        (qq, kq, vq), (qs, ks, vs) = quantize(q, k, v, qk, pv)
        ref = A.attention_reference(qq, kq, vq, qs, ks, vs, None, True, d ** -0.5, torch.float32, 64)
        dev = [t.cuda() for t in (qq, kq, vq, qs, ks, vs)]
        for v_layout in ("d-contig", "keys-contig"):
            vd = dev[2] if v_layout == "d-contig" else dev[2].transpose(-1, -2).contiguous().transpose(-1, -2)
            for cfg_name, cfg in (("decode16", TA.DECODE_CONFIG), ("prefill0", TA.PREFILL_CONFIGS[0]),
                                  ("prefill2", TA.PREFILL_CONFIGS[2])):
                for pv_mode in ((-1, 0, 1) if pv == "fp8" else (0,)):
                    for promote in ((0, 32) if qk == "fp8" else (0,)):
                        try:
                            out = TA.attention_cuda(dev[0], dev[1], vd, *dev[3:], None, True, d ** -0.5, 64,
                                                    torch.float32, config=cfg, pv_f16=pv_mode, qk_promote=promote)
                            torch.cuda.synchronize()
                            err = f"{rel(out.cpu(), ref):.2e}"
                        except Exception as e:  # noqa: BLE001 - a probe reports every failure
                            err = f"{type(e).__name__}: {str(e)[:80]}"
                        rows.append([f"attn {qk}/{pv}", v_layout, f"{cfg_name} pv{pv_mode} promote{promote}", err])
                        print(rows[-1], flush=True)
    return rows


if __name__ == "__main__":
    print(torch.cuda.get_device_name(), "triton", triton.__version__, flush=True)
    rows = dot_rows()
    print(tabulate(rows, headers=["probe", "B / V layout", "variant", "rel err vs exact"]), flush=True)
    rows += attention_rows()
    print(tabulate(rows, headers=["probe", "B / V layout", "variant", "rel err vs exact"]))
