"""passes/lower.py: what the rewrite emits for decode-sized graphs (the values are checked against the
fake-quant oracle in tests/test_backend.py, whose inputs are decode-sized too)."""

from __future__ import annotations

import re

import torch

import fq_compile
from fq_compile import Config
from fq_compile.runtime.state import reports
from tests.conftest import VOCAB, batches, tiny_llama, tiny_opt


def _decode_code(model, level: str) -> str:
    plan = fq_compile.calibrate(model, batches(n=1), Config(level=level), progress=False)
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend="flattenquant", options={"plan": plan, "inductor": False})(
            torch.randint(0, VOCAB, (1, 5)))
    return reports(plan)[0].code


def test_decode_row_maxima_once_per_input_and_bits_beside_the_producer():
    """With per-token scales (the default for flattened levels) every fq.flat_linear takes its row
    maxima from a fq.row_absmax_fused node (which Inductor fuses into the producer of x) instead of
    computing them itself: one node per (input, bits), shared by the layers reading that input (q/k/v,
    gate/up), read by the op through its `r` argument."""
    for make, level in ((tiny_opt, "O1"), (tiny_llama, "O1"), (tiny_opt, "O3")):
        code = _decode_code(make(layers=1), level)
        maxima = {m.group(1): (m.group(2), m.group(3)) for m in re.finditer(
            r"^ +(\w+) = torch\.ops\.fq\.row_absmax_fused\.default\((\w+), (\w+)\)", code, flags=re.M)}
        detached = dict(re.findall(r"^ +(\w+) = (\w+)\.detach\(\)", code, flags=re.M))
        calls = re.findall(r"torch\.ops\.fq\.flat_linear\.default\((\w+), .*?rmult = (\w+), r = (\w+)\)", code)
        n_linear = len(re.findall(r"torch\.ops\.fq\.flat_linear\.default\(", code))
        assert n_linear >= 6 and len(calls) == n_linear, (level, n_linear, len(calls))
        seen = set()
        for x, rmult, r in calls:
            assert detached.get(r) in maxima, (r, detached.get(r))
            assert maxima[detached[r]] == (x, rmult), "the row maxima are of the op's own input and multipliers"
            seen.add(detached[r])
        # one per (input, rmult): no group computes its maxima twice, none is left unused
        assert len(seen) == len(maxima) == len({(x, rm) for x, rm, _ in calls})
        assert len(maxima) < n_linear                 # q/k/v (and gate/up) share theirs
