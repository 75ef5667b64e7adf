"""Issue 23: instructions per weight byte of each decode-kernel candidate, from its sm_90 machine code.

    python benchmarks/decode_sass.py [--out decode-sass.md]

No GPU needed: every candidate of kernels/triton/decode.py's weight-streaming kernel that reads a
pre-quantized activation (prequant, gemv, dp4a) is compiled ahead of time for sm_90 by Triton with its
own ptxas, as a launch specializes it (pointers and integers divisible by 16, M = 1), disassembled with
nvdisasm, and its K loop's body (the largest backward branch's span) counted: SASS instructions per thread
per iteration over the weight bytes a thread streams per iteration.  An H100 SM issues 4 warp
instructions a clock (128 thread instructions) and must take in ~13 weight bytes a clock for the whole
GPU to stream at ~3 TB/s, so a loop above ~10 instructions a byte cannot reach the copy bandwidth however
its loads behave: issue-bound.  Static counts (no stalls, no occupancy): a prediction to check against
`kernel_bench.py --decode` on the device, not a timing.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import git_rev  # noqa: E402

ISSUE_PER_CLOCK = 128            # thread instructions an SM issues per clock (4 schedulers x 32 lanes)
BYTES_PER_CLOCK = 3.0e12 / 132 / 1.755e9   # weight bytes an H100 SM takes in per clock at ~3 TB/s


def _nvdisasm() -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm")


def loop_body(cubin: bytes) -> list[str]:
    """The SASS mnemonics of the longest span that a backward branch closes (the K loop)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([_nvdisasm(), "-c", f.name], capture_output=True, text=True, check=True).stdout
    labels, instrs = {}, []
    for line in sass.splitlines():
        m = re.match(r"^(\.L_x_\d+):", line.strip())
        if m:
            labels[m.group(1)] = len(instrs)
        elif re.match(r"^\s+/\*[0-9a-f]+\*/", line):
            instrs.append(line)
    best: list[str] = []
    for i, line in enumerate(instrs):
        m = re.search(r"BRA\s+`\((\.L_x_\d+)\)", line)
        if m and labels.get(m.group(1), len(instrs)) <= i and i + 1 - labels[m.group(1)] > len(best):
            best = instrs[labels[m.group(1)]: i + 1]
    return [re.match(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?P\w+\s+)?([A-Z0-9_]+)", x).group(1) for x in best]


def rows(bits_list=(8, 4)) -> list[list]:
    from fq_compile.kernels.triton import decode as td

    out = []
    for bits in bits_list:
        for cand in td.candidates(bits):
            variant, cfg = cand
            if variant in ("fused", "gemm"):       # fused: the prologue gathers x (not a weight-stream count)
                continue
            ops = loop_body(td.compile_sm90(bits, variant, cfg).asm["cubin"])
            kw = cfg.kwargs
            per_thread = kw["BLOCK_N"] * kw["BLOCK_K"] * bits / 8 / (32 * cfg.num_warps)
            per_byte = len(ops) / per_thread
            top = ", ".join(f"{k} {v}" for k, v in collections.Counter(ops).most_common(5))
            bound = min(1.0, ISSUE_PER_CLOCK / per_byte / BYTES_PER_CLOCK)
            out.append([f"int{bits}", td.config_name(bits, cand), len(ops), f"{per_thread:.0f}", f"{per_byte:.2f}",
                        f"{bound:.0%}", top])
    return out


def main(argv=None) -> str:
    from tabulate import tabulate

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="write the markdown here too")
    args = ap.parse_args(argv)
    import triton
    import torch

    text = "\n".join([
        "# Decode kernels: instructions per weight byte from sm_90 SASS (issue 23)", "",
        f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, torch {torch.__version__}, "
        f"triton {triton.__version__} (its ptxas / nvdisasm), tree {git_rev()}, compiled on the CPU (no GPU)",
        f"command: python benchmarks/decode_sass.py {' '.join(argv if argv is not None else sys.argv[1:])}",
        "M = 1 (gemv / dp4a: BLOCK_M 1; the tl.dot candidates pad to 16), per-token scales, every argument divisible "
        "by 16; loop body: SASS instructions per thread in one K iteration; bytes: weight bytes a thread streams "
        "per iteration; issue cap: the share of ~3 TB/s an H100 could stream if issuing were the only limit "
        f"({ISSUE_PER_CLOCK} thread instructions a clock per SM, {BYTES_PER_CLOCK:.1f} bytes a clock per SM needed)",
        "",
        tabulate(rows(), headers=["bits", "candidate", "loop body", "bytes / thread", "instr / byte", "issue cap",
                                  "most frequent"], tablefmt="github", disable_numparse=True), ""])
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return text


if __name__ == "__main__":
    main()
