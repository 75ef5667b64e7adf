"""Whether our Triton kernels time their tiling candidates: `FQ_TUNE` (default 1).

    FQ_TUNE=1   every autotuned kernel times its candidates once per shape key (the default)
    FQ_TUNE=0   every kernel takes its first candidate untimed

Tuning picks a tiling, never a result: every candidate computes the same bits (the tests run each
one explicitly).  FQ_TUNE=0 exists for the test suite (tests/conftest.py sets it), where timing five
tilings of every shape of a tiny model would cost more compile time than the rest of the test, and
for quick runs where speed does not matter.  Read at each launch, so a test can turn it back on."""

from __future__ import annotations

import os


def tuning() -> bool:
    v = os.environ.get("FQ_TUNE", "1").strip()
    if v not in ("0", "1"):
        raise ValueError(f"FQ_TUNE={v!r} must be 0 or 1")
    return v == "1"

