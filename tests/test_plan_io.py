"""QuantPlan.save/load: round trip, and refusal of truncated, corrupt and foreign files."""

import json

import pytest
import torch
from safetensors.torch import save_file

import fq_compile
from fq_compile import Config, PlanFormatError, QuantPlan
from tests.conftest import VOCAB, batches, tiny_gpt2, tiny_llama, tiny_opt


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
        assert torch.equal(lq.weight_q, lp.weight_q) and lq.bits == lp.bits and lq.scale == lp.scale
    assert {lp.bits for lp in loaded.layers.values()} == {4, 8}      # both kinds survive the trip
    x = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        a = torch.compile(model, backend="flattenquant", options={"plan": plan, "inductor": False})(x).logits
        torch._dynamo.reset()
        b = torch.compile(model, backend="flattenquant", options={"plan": str(path), "inductor": False})(x).logits
    assert torch.equal(a, b)
    loaded.check_model(model)


def test_round_trip_keeps_transposed_layers_and_the_parameter_list(tmp_path):
    """GPT-2's Conv1D layers (weights stored [K, N]) survive the trip, and so does the list of the
    model's parameters that explain() counts its bytes from."""
    torch._dynamo.reset()
    model = tiny_gpt2(layers=1)
    plan = fq_compile.calibrate(model, batches(n=1), Config(level="O1"), progress=False)
    assert all(lp.transposed for lp in plan.layers.values())
    plan.save(tmp_path / "gpt2.fqplan")
    loaded = QuantPlan.load(tmp_path / "gpt2.fqplan")
    assert {n: lp.transposed for n, lp in loaded.layers.items()} == {n: True for n in plan.layers}
    assert loaded.parameters == plan.parameters == {n: list(p.shape) for n, p in model.named_parameters()}
    assert fq_compile.explain(loaded) == fq_compile.explain(plan)
    loaded.check_model(model)
    x = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        torch._dynamo.reset()
        a = torch.compile(model, backend="flattenquant", options={"plan": plan, "inductor": False})(x).logits
        torch._dynamo.reset()
        b = torch.compile(model, backend="flattenquant", options={"plan": loaded, "inductor": False})(x).logits
    assert torch.equal(a, b)


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
    meta["format_version"] = "1"
    meta["plan"] = json.dumps({"config": {}})
    broken = tmp_path / "broken.fqplan"
    save_file(tensors, broken, metadata=meta)
    with pytest.raises(PlanFormatError, match="malformed"):
        QuantPlan.load(broken)


def test_loaded_plan_refuses_another_model(saved):
    _, _, path = saved
    with pytest.raises(fq_compile.PlanMismatchError, match="another model"):
        QuantPlan.load(path).check_model(tiny_opt(layers=1))
