"""What per-token activation scales cost (issue 22/24): each kernel with and without them, side by side.

    python benchmarks/token_scales.py [--out FILE.md]          (CUDA; about a minute)

On the OPT-13B shapes (hidden 5120, ffn 20480, the paper's 21.5% flattened channels, K' padded to 32):
  * the activation quantize fused by Inductor into a LayerNorm (8 x 2048 rows): per tensor vs per
    token (the row maxima are one more reduction in the same kernel);
  * the INT8 GEMM at M = 16384 (CUTLASS and Triton) with the per-channel epilogue vs row x channel;
  * the decode op fq::flat_linear at M = 1 (INT8 and INT4 weights), static vs per-token (one more
    small kernel for the row maxima).
Median times from triton.testing.do_bench; the ratio column is per-token / per-tensor.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.provenance import git_rev  # noqa: E402


def _map(c: int, share: float, gen):
    """A channel map with round(share * c) extra positions over random channels (E_j in 1..3)."""
    from fq_compile.planning.flatten import channel_map

    extra = torch.zeros(c, dtype=torch.int64)
    left = round(share * c)
    while left > 0:
        j = int(torch.randint(0, c, (1,), generator=gen))
        e = min(left, int(torch.randint(1, 4, (1,), generator=gen)))
        extra[j] += e
        left -= e
    cm = channel_map(extra, None, 32)
    return cm, extra


def _constants(c: int, bits: int, gen, device):
    cm, extra = _map(c, 0.215, gen)
    qmax = 127 if bits == 8 else 7
    inv_s = torch.rand(c, generator=gen) + 0.5
    mult_t = (inv_s[cm.src.long()] * qmax / 4.0).float()
    mult_r = inv_s[cm.src.long()].float()
    mult_t[~cm.active] = 0
    mult_r[~cm.active] = 0
    lo = (cm.lo * qmax).float()
    hi = torch.where(cm.hi.isinf(), cm.hi, cm.hi * qmax).float()
    rmult = (inv_s / (extra.float() + 1)).float()
    to = lambda t: t.to(device)  # noqa: E731
    return cm, to(cm.src), to(mult_t), to(mult_r), to(lo), to(hi), to(rmult)


def main(argv=None) -> str:
    import triton
    from triton.testing import do_bench

    import fq_compile.kernels  # noqa: F401
    from fq_compile.backend import _inductor_settings, persistent_reductions
    from fq_compile.kernels import dispatch
    from fq_compile.kernels.packing import pack_int4

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(0)
    rows = []

    def bench(fn):
        fn()
        torch.cuda.synchronize()
        return do_bench(fn, warmup=25, rep=100, return_mode="median")

    def row(what, static_fn, token_fn):
        a, b = bench(static_fn), bench(token_fn)
        rows.append([what, f"{a * 1e3:.1f}", f"{b * 1e3:.1f}", f"{b / a:.3f}"])
        print(rows[-1], flush=True)

    # 1. the fused quantize after a LayerNorm, 8 x 2048 x 5120 bf16
    c = 5120
    cm, src, mult_t, mult_r, lo, hi, rmult = _constants(c, 8, gen, dev)
    x = torch.randn(8, 2048, c, device=dev, dtype=torch.bfloat16)
    w = torch.randn(c, device=dev, dtype=torch.bfloat16)
    b = torch.randn(c, device=dev, dtype=torch.bfloat16)

    def q_static(x):
        h = torch.nn.functional.layer_norm(x, (c,), w, b)
        return torch.ops.fq.flatten_quantize_fused(h, src, mult_t, lo, hi, 8, 0)

    def q_token(x):
        h = torch.nn.functional.layer_norm(x, (c,), w, b)
        return torch.ops.fq.flatten_quantize_rows_fused(h, src, mult_r, lo, hi, rmult, 8, 0)

    with _inductor_settings():
        fs, ft = torch.compile(q_static, fullgraph=True), torch.compile(q_token, fullgraph=True)
        row(f"LayerNorm + fused quantize, 16384 x {c} -> K' {cm.size} (Inductor)", lambda: fs(x), lambda: ft(x))
    torch._dynamo.reset()
    with _inductor_settings(), persistent_reductions(8192):
        ps, pt = torch.compile(q_static, fullgraph=True), torch.compile(q_token, fullgraph=True)
        ps(x), pt(x)            # compiled here, under the handler
    row("the same, persistent reductions up to 8192 (one read of each row)", lambda: ps(x), lambda: pt(x))
    xq = q_static(x).reshape(-1, cm.size)
    r = torch.rand(xq.shape[0], device=dev) + 0.5

    # 2. the INT8 GEMM, M = 16384, N = 5120, K' (bf16 out)
    wq = torch.randint(-127, 128, (5120, cm.size), device=dev, dtype=torch.int8)
    scale = torch.rand(5120, device=dev) * 1e-3
    for mode in ("cutlass", "triton"):
        with dispatch.use(mode):
            row(f"int8_linear {mode}, 16384 x 5120 x {cm.size}, bf16",
                lambda: torch.ops.fq.int8_linear(xq, wq, scale, None, torch.bfloat16),
                lambda: torch.ops.fq.int8_linear(xq, wq, scale, None, torch.bfloat16, row_scale=r))

    # 3. decode, M = 1: fc2-shaped (K = 20480 -> N = 5120), INT8 and INT4 weights
    for bits in (8, 4):
        cm2, src2, mt2, mr2, lo2, hi2, rm2 = _constants(20480, bits, gen, dev)
        wq2 = torch.randint(-7 if bits == 4 else -127, 8 if bits == 4 else 128, (5120, cm2.size), device=dev,
                            dtype=torch.int8)
        if bits == 4:
            wq2 = pack_int4(wq2)
        s2 = torch.rand(5120, device=dev) * 1e-3
        x1 = torch.randn(1, 20480, device=dev, dtype=torch.float16)
        row(f"flat_linear INT{bits} decode, 1 x 5120 x {cm2.size}",
            lambda: torch.ops.fq.flat_linear(x1, src2, mt2, lo2, hi2, bits, wq2, s2, None, torch.float16),
            lambda: torch.ops.fq.flat_linear(x1, src2, mr2, lo2, hi2, bits, wq2, s2, None, torch.float16, rm2))

    head = (f"# Per-token activation scales: cost per kernel\n\n{torch.cuda.get_device_name()}, torch {torch.__version__}, "
            f"triton {triton.__version__}, {datetime.date.today()}, tree {git_rev()}\n"
            f"Command: `python benchmarks/token_scales.py`\n\n")
    text = head + tabulate(rows, headers=["kernel", "per tensor (us)", "per token (us)", "ratio"], tablefmt="github")
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return text


if __name__ == "__main__":
    main()
