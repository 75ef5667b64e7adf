"""Where a first call's seconds go (issue 23: what is compiled, tuned and built, and when).

The slow parts of a first call are named stages, timed process-wide:

    rewrite            our passes over one Dynamo graph (backend.py: attention + linear rewrite)
    Inductor compile   compile_fx of the rewritten graph (code generation, Triton compiles, its autotuning)
    decode tuning      timing every weight-streaming candidate for one (shape, bits, rows) key
                       (kernels/triton/decode.py; a disk-table hit costs nothing and is not counted)
    CUTLASS build      waiting for CUTLASS libraries to compile (kernels/cutlass/gemm.py)

Stages may nest (a CUTLASS build started while Inductor lowers a graph): each stage's seconds are its
own, a nested stage's time taken out of the one around it, so the stages add up to at most the wall
time of the call, and wall minus their sum is everything else (Dynamo tracing, Triton JIT of kernels
launched outside these stages, CUDA-graph capture, the run itself).  benchmarks/e2e.py and
benchmarks/device/decode_host.py print the table after a first generate():

    from fq_compile.kernels import stopwatch
    stopwatch.reset(); model.generate(...); print(stopwatch.table())
"""

from __future__ import annotations

import contextlib
import threading
import time

_lock = threading.Lock()
_totals: dict[str, list] = {}            # stage -> [own seconds, times entered]
_local = threading.local()               # this thread's stack of open stages: [name, child seconds]


@contextlib.contextmanager
def stage(name: str):
    """Time the block as `name` (its own seconds: nested stages' seconds are theirs)."""
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    frame = [name, 0.0]
    stack.append(frame)
    start = time.perf_counter()
    try:
        yield
    finally:
        elapsed = time.perf_counter() - start
        stack.pop()
        if stack:
            stack[-1][1] += elapsed
        with _lock:
            entry = _totals.setdefault(name, [0.0, 0])
            entry[0] += elapsed - frame[1]
            entry[1] += 1


def totals() -> dict[str, tuple[float, int]]:
    """{stage: (own seconds, times entered)} since the last reset()."""
    with _lock:
        return {k: (v[0], v[1]) for k, v in _totals.items()}


def reset() -> None:
    with _lock:
        _totals.clear()


def table(wall_s: float | None = None) -> str:
    """The stages as text lines, longest first; with the call's wall time, the remainder too."""
    rows = sorted(totals().items(), key=lambda kv: -kv[1][0])
    lines = [f"{name:<18} {sec:8.1f} s  ({n} x)" for name, (sec, n) in rows]
    if wall_s is not None:
        rest = wall_s - sum(sec for sec, _ in totals().values())
        lines.append(f"{'everything else':<18} {rest:8.1f} s  (Dynamo tracing, Triton JIT, graph capture, running)")
    return "\n".join(lines)
