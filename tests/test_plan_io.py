"""QuantPlan.save/load: round trip, and refusal of truncated, corrupt and foreign files."""

import json

import pytest
import torch
from safetensors.torch import save_file

import fq_compile
from fq_compile import Config, PlanFormatError, QuantPlan
from tests.conftest import VOCAB, batches, tiny_llama, tiny_opt


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch._dynamo.reset()
    model = tiny_llama(layers=1)
    plan = fq_compile.calibrate(model, batches(n=2), Config(level="O2", gamma=2.5), progress=False)
    path = tmp_path_factory.mktemp("plan") / "tiny.fqplan"
    plan.save(path)
    return model, plan, path


def test_round_trip_gives_the_same_model(saved):
    model, plan, path = saved
    loaded = QuantPlan.load(path)
    assert loaded.config == plan.config and loaded.model_hash == plan.model_hash
    assert set(loaded.layers) == set(plan.layers) and loaded.skipped == plan.skipped
    for name, lp in plan.layers.items():
        lq = loaded.layers[name]
        assert torch.equal(lq.weight_q, lp.weight_q) and lq.bits == lp.bits and torch.equal(lq.scale, lp.scale)
    assert {lp.bits for lp in loaded.layers.values()} == {4, 8}      # both kinds survive the trip
    x = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        a = torch.compile(model, backend="flattenquant", options={"plan": plan, "inductor": False})(x).logits
        torch._dynamo.reset()
        b = torch.compile(model, backend="flattenquant", options={"plan": str(path), "inductor": False})(x).logits
    assert torch.equal(a, b)
    loaded.check_model(model)


def test_truncated_file_is_refused(saved, tmp_path):
    _, _, path = saved
    data = path.read_bytes()
    bad = tmp_path / "cut.fqplan"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(PlanFormatError, match="truncated or corrupt"):
        QuantPlan.load(bad)


def test_flipped_tensor_byte_is_refused(saved, tmp_path):
    _, _, path = saved
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    bad = tmp_path / "flip.fqplan"
    bad.write_bytes(bytes(data))
    with pytest.raises(PlanFormatError, match="checksum"):
        QuantPlan.load(bad)


def test_foreign_and_garbage_files_are_refused(tmp_path):
    other = tmp_path / "model.safetensors"
    save_file({"w": torch.randn(3, 3)}, other, metadata={"format": "pt"})
    with pytest.raises(PlanFormatError, match="not an fq_compile plan"):
        QuantPlan.load(other)
    junk = tmp_path / "junk.fqplan"
    junk.write_bytes(b"\x00\x01 definitely not a plan" * 10)
    with pytest.raises(PlanFormatError):
        QuantPlan.load(junk)
    with pytest.raises(FileNotFoundError):
        QuantPlan.load(tmp_path / "missing.fqplan")


def test_other_version_is_refused(saved, tmp_path):
    _, _, path = saved
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta["format_version"] = "999"
    newer = tmp_path / "newer.fqplan"
    save_file(tensors, newer, metadata=meta)
    with pytest.raises(PlanFormatError, match="version 999"):
        QuantPlan.load(newer)
    meta["format_version"] = str(fq_compile.plan.FORMAT_VERSION)
    meta["plan"] = json.dumps({"config": {}})
    broken = tmp_path / "broken.fqplan"
    save_file(tensors, broken, metadata=meta)
    with pytest.raises(PlanFormatError, match="malformed"):
        QuantPlan.load(broken)


def test_loaded_plan_refuses_another_model(saved):
    _, _, path = saved
    with pytest.raises(fq_compile.PlanMismatchError, match="another model"):
        QuantPlan.load(path).check_model(tiny_opt(layers=1))


def test_formats_and_choices_survive_the_round_trip(tmp_path):
    """Per-layer formats (fp8 weights as e4m3, w4a8 packed), errors and reasons are in the file."""
    torch._dynamo.reset()
    model = tiny_llama(layers=1)
    plan = fq_compile.calibrate(model, batches(n=2), Config(level="auto", error_budget=50.0), progress=False)
    formats = {lp.format for lp in plan.layers.values()}
    assert formats & {"fp8", "w4a8"}, formats
    path = tmp_path / "auto.fqplan"
    plan.save(path)
    loaded = QuantPlan.load(path)
    for name, lp in plan.layers.items():
        lq = loaded.layers[name]
        assert (lq.format, lq.bits, lq.error, lq.errors, lq.why) == (lp.format, lp.bits, lp.error, lp.errors, lp.why)
        assert lq.weight_q.dtype == lp.weight_q.dtype and torch.equal(lq.weight_q.view(torch.uint8),
                                                                     lp.weight_q.view(torch.uint8))
    assert loaded.calibration["auto"] == plan.calibration["auto"]
    x = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        a = torch.compile(model, backend="flattenquant", options={"plan": plan, "inductor": False})(x).logits
        torch._dynamo.reset()
        b = torch.compile(model, backend="flattenquant", options={"plan": str(path), "inductor": False})(x).logits
    assert torch.equal(a, b)


def test_plans_from_before_per_layer_formats_are_refused_clearly(saved, tmp_path):
    _, _, path = saved
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta["format_version"] = "2"
    old = tmp_path / "old.fqplan"
    save_file(tensors, old, metadata=meta)
    with pytest.raises(PlanFormatError, match="version 2, from before per-layer formats.*recalibrate"):
        QuantPlan.load(old)
