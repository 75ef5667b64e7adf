"""Instructions per attention score in the Hopper prefill kernel's main loop, from its sm_90 PTX (CPU only).

    python benchmarks/attention_ptx.py [--warps 8] [--d 128] [--kv-block 64]

Why: the exact semantics (kernels/attention.py: exp2q from rounded multiplies, no FMA contraction, P
rounded to 8 bits) put tens of FP32/integer instructions on every score, and at 8-bit tensor-core rates
those, not the matrix products, bound the kernel.  This counts the PTX instructions of the unmasked KV
loop's body (the first block holding the most wgmma), divides by the scores one thread owns per iteration
(BLOCK_M * BLOCK_N / threads), and turns that into an issue-bound floor for a causal prefill:
scores * instructions / (SMs * 128 lanes * clock).  An estimate from PTX (ptxas may fuse or split
instructions), not a timing; the compile uses this venv's Triton, which may differ from the device's.
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fq_compile.kernels.triton.attention_hopper import compile_sm90  # noqa: E402


def loop_body(ptx: str) -> list[str]:
    """The instructions of the first PTX basic block with the most wgmma: the unmasked KV loop (the masked
    diagonal loop follows it, with as many wgmma and its mask selects on top)."""
    blocks, cur = [], []
    for ln in (x.strip() for x in ptx.splitlines()):
        if re.match(r"^\$L__BB\d+_\d+:", ln):
            blocks.append(cur)
            cur = []
        elif ln and not ln.startswith(("//", ".", "{", "}")):
            cur.append(ln)
    blocks.append(cur)
    most = max(sum("wgmma.mma_async" in x for x in b) for b in blocks)
    return next(b for b in blocks if sum("wgmma.mma_async" in x for x in b) == most)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--warps", type=int, default=8)
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--kv-block", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--sms", type=int, default=132)
    p.add_argument("--ghz", type=float, default=1.75, help="sustained SM clock assumed for the floor")
    a = p.parse_args(argv)
    scores = a.batch * a.heads * a.seq * a.seq / 2
    for fmt in ("int8", "fp8"):
        body = loop_body(compile_sm90(fmt, fmt, v_t=True, use_desc=True, warps=a.warps, d=a.d, kv_block=a.kv_block))
        ops = collections.Counter(x.lstrip("@!%p0123456789 ").split()[0].rstrip(";") for x in body)
        per = len(body) / (128 * a.kv_block / (a.warps * 32))
        floor_ms = scores * per / (a.sms * 128 * a.ghz * 1e9) * 1e3
        print(f"{fmt}/{fmt}: {len(body)} PTX instructions per loop iteration, {per:.1f} per score; issue-bound floor "
              f"at {a.batch} x {a.seq} ({a.heads} heads, causal): {floor_ms:.2f} ms")
        print("   most frequent: " + ", ".join(f"{k} {v}" for k, v in ops.most_common(12)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
