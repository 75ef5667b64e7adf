"""explain(): the short default view, the full per-layer table and the CSV / markdown export."""

import csv
import io
import re
import warnings

import pytest
import torch

import fq_compile
from fq_compile import Config
from fq_compile.explain import WIDTH, _table
from tests.conftest import ARCHITECTURES, VOCAB, batches, tiny_llama


def _flat(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(scope="module")
def moe():
    """A tiny Mixtral (MoE experts and lm_head kept in floating point, for two reasons), compiled and run once."""
    torch._dynamo.reset()
    model = ARCHITECTURES["mixtral"]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = fq_compile.calibrate(model, batches(n=2), Config(level="O1"), progress=False)
    fast = torch.compile(model, backend="flattenquant", options={"plan": plan, "inductor": False})
    with torch.no_grad():
        fast(torch.randint(0, VOCAB, (2, 40)))
    return plan, fast


def test_default_view_is_short_and_names_every_reason(moe):
    plan, fast = moe
    text = fq_compile.explain(fast)
    lines = text.splitlines()
    assert max(map(len, lines)) <= WIDTH, max(lines, key=len)
    assert len(plan.skipped) >= 3 and len(set(plan.skipped.values())) >= 2
    for why in plan.skipped.values():                 # each kept-in-fp layer's reason, wrapped or not
        assert _flat(why) in _flat(text)
    for section in ("per format:", "largest flatten ratio (5 of 10 layers with extra channels)",
                    "kept in floating point", "activation quantize", "GEMM (op: kernel (why)",
                    "explain(model, full=True)"):
        assert section in text
    # the five most flattened layers, in order; no full table by default
    order = sorted(plan.layers, key=lambda n: -plan.groups[plan.layers[n].group].flatten_ratio)
    shown = [n for n in plan.layers if n in text]
    assert set(order[:5]) <= set(shown) and len(shown) == 5
    # every distinct kernel choice named once, with the number of layers using it; q/k/v share one GEMM
    # (passes/siblings.py), which their line says
    assert text.count("fq.int8_linear: reference (CPU)") == 1 and "4 layers  fq.int8_linear: reference" in text
    assert "6 layers  fq.int8_linear [fused: q_proj+k_proj+v_proj]: reference (CPU" in text


def test_full_view_has_every_layer_and_a_legend_for_repeated_strings(moe):
    plan, fast = moe
    full = fq_compile.explain(fast, full=True)
    for name in plan.layers:
        assert name in full
    rows = [line for line in full.splitlines() if line.startswith("model.layers.")]
    assert len(rows) == len(plan.layers)
    for row in rows:                        # kernels by legend key, smoothing relative to the block
        assert re.search(r"\bQ[12] G[12]$", row.rstrip()), row
        assert "fused by Inductor" not in row and "norm:model." not in row
    assert "Q1" in full.split("activation quantize", 1)[1] and "G1" in full.split("GEMM (op:", 1)[1]
    assert "KL4/KL8" in full and "explain(model, full=True)" not in full
    assert fq_compile.explain(fast, top=2).count("model.layers.") < fq_compile.explain(fast).count("model.layers.")


def test_csv_and_markdown_export_the_per_layer_rows(moe):
    plan, fast = moe
    rows = list(csv.DictReader(io.StringIO(fq_compile.explain(fast, fmt="csv"))))
    assert [r["layer"] for r in rows] == list(plan.layers) + list(plan.skipped)
    q = rows[0]
    lp = plan.layers[q["layer"]]
    assert q["format"] == "int8" and int(q["out_features"]) == lp.out_features
    assert float(q["flatten_ratio"]) == pytest.approx(plan.groups[lp.group].flatten_ratio)
    assert q["activation_quantize"].startswith("fused by Inductor")
    # q_proj shares its GEMM with k_proj and v_proj (passes/siblings.py): its row says so
    assert q["gemm_kernel"] == "reference (CPU; one GEMM of N=128 with its siblings)"
    assert q["op"] == "fq.int8_linear [fused: q_proj+k_proj+v_proj]"
    assert all(r["kept_reason"] == plan.skipped[r["layer"]] for r in rows if r["format"] == "fp")
    md = fq_compile.explain(plan, fmt="markdown").splitlines()
    assert md[0].startswith("| layer") and len(md) == 2 + len(plan.layers) + len(plan.skipped)
    with pytest.raises(ValueError, match="fmt"):
        fq_compile.explain(plan, fmt="html")


def test_plan_not_compiled_yet_and_level_without_flattening():
    plan = fq_compile.calibrate(tiny_llama(layers=1), batches(n=1), Config(level="w8a8"), progress=False)
    text = fq_compile.explain(plan)
    assert max(map(len, text.splitlines())) <= WIDTH
    assert "kernels: not compiled yet" in text and "flattening: no layer has extra channels" in text
    assert "lm_head (256x64): kept in floating point by Config.skip" in text


def test_wide_cells_wrap_inside_their_column():
    rows = [["a.very.long.layer.name." * 3, "x" * 10, "word " * 40]]
    text = _table(rows, ["layer", "shape", "why"], flex=(2, 0))
    assert max(map(len, text.splitlines())) <= WIDTH and _flat(text).count("word") == 40
