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
        torch.compile(model, backend="flattenquant", options={"plan": plan, "inductor": False,
                                                              "fuse_siblings": False})(torch.randint(0, VOCAB, (1, 5)))
    return reports(plan)[0].code


def test_decode_op_reads_the_groups_quantize():
    """In a decode-sized graph every fq.flat_linear gets x and x's quantize as operands: `xq` (and, with
    per-token scales, the default for flattened levels, `r`) from the group's quantize node, the one a
    larger graph's GEMMs read, made once per (input, bits) and shared by the layers reading that input
    (q/k/v, gate/up) and fused by Inductor into x's producer: no quantize is launched per call.  Siblings
    unfused here, so that they are separate GEMMs (tests/passes/test_siblings.py: one GEMM for them)."""
    for make, level in ((tiny_opt, "O1"), (tiny_llama, "O1"), (tiny_opt, "O3")):
        code = _decode_code(make(layers=1), level)
        quantize = {m.group(1): (m.group(2), m.group(3)) for m in re.finditer(
            r"^ +(\w+) = torch\.ops\.fq\.(flatten_quantize\w*)\.default\((\w+), ", code, flags=re.M)}
        item = {m.group(1): (m.group(2), int(m.group(3)))
                for m in re.finditer(r"^ +(\w+) = (\w+)\[(\d)\]", code, flags=re.M)}
        detached = dict(re.findall(r"^ +(\w+) = (\w+)\.detach\(\)", code, flags=re.M))
        calls = re.findall(r"torch\.ops\.fq\.flat_linear\.default\((\w+), .*?rmult = (\w+), r = (\w+), xq = (\w+)\)",
                           code)
        n_linear = len(re.findall(r"torch\.ops\.fq\.flat_linear\.default\(", code))
        assert n_linear >= 6 and len(calls) == n_linear, (level, n_linear, len(calls))
        used = set()
        for x, _rmult, r, xq in calls:
            node, index = item[xq]
            assert index == 0 and quantize[node] == ("flatten_quantize_rows_fused", x), (xq, quantize.get(node))
            assert item[detached[r]] == (node, 1), "r is the same quantize's row maxima"
            used.add(node)
        assert used == set(quantize), "no quantize is left unused"
        assert len(used) < n_linear                  # q/k/v (and gate/up) share theirs


def test_decode_op_static_scales_read_the_groups_quantize():
    """Per-tensor scales (activation_scale="tensor"): `xq` only, from the group's fused quantize (siblings
    unfused: one call per layer)."""
    model = tiny_opt(layers=1)
    plan = fq_compile.calibrate(model, batches(n=1), Config(level="O1", activation_scale="tensor"), progress=False)
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend="flattenquant", options={"plan": plan, "inductor": False,
                                                              "fuse_siblings": False})(
            torch.randint(0, VOCAB, (1, 5)))
    code = reports(plan)[0].code
    calls = re.findall(r"torch\.ops\.fq\.flat_linear\.default\((\w+), [^\n]*?xq = (\w+)\)", code)
    assert len(calls) == 6 and "rmult =" not in code
    for x, xq in calls:
        assert re.search(rf"^ +{xq} = torch\.ops\.fq\.flatten_quantize_fused\.default\({x}, ", code, flags=re.M)
