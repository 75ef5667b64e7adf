"""calibrate_many: one calibration run, several plans, each equal to what calibrate() gives its config alone."""

import dataclasses
import math

import pytest
import torch

import fq_compile
from fq_compile import Config
from fq_compile.planning.calibrate import calibrate_many
from tests.conftest import batches, tiny_llama


def assert_same(a, b, path="plan"):
    """Field by field: tensors bit for bit (dtype and shape too), containers in order, the rest by ==."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, path
        if a.element_size() == 1 and a.dtype.is_floating_point:       # FP8: compare the bytes
            a, b = a.view(torch.uint8), b.view(torch.uint8)
        assert torch.equal(a, b), path
    elif dataclasses.is_dataclass(a) and not isinstance(a, Config):
        assert type(a) is type(b), path
        for f in dataclasses.fields(a):
            assert_same(getattr(a, f.name), getattr(b, f.name), f"{path}.{f.name}")
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), f"{path}: keys {list(a)} != {list(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), path
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


CONFIGS = {
    "O1": Config(level="O1"),
    "fp8": Config(level="fp8"),
    "w8a8": Config(level="w8a8"),
    "O2": Config(level="O2"),                  # Eq. 8 reads the row samples
    "O3": Config(level="O3"),                  # GPTQ runs the batches again, per config
    "auto": Config(level="auto"),              # held-out maxima (fit_absmax): the others must not see a change
    "O1+attention": Config(level="O1", attention="int8"),
    # quantizes no linear: its skip, calib_samples and seed decide nothing, so they may differ
    "fp16+attention": Config(level="fp16", attention="fp8", attention_scales="head", skip=(), seed=3,
                             calib_samples=64),
    "fp16": Config(level="fp16"),              # runs nothing
}


def test_shared_calibration_gives_each_config_the_plan_calibrate_gives_it(make_model):
    model = make_model()
    model.config.use_cache = False        # OPT: o_proj's smoothing folds into v_proj's rows (attention's V / s)
    data = batches()
    alone = {}
    for name, config in CONFIGS.items():
        torch._dynamo.reset()
        alone[name] = fq_compile.calibrate(model, data, config, progress=False)
    torch._dynamo.reset()
    shared = calibrate_many(model, data, CONFIGS, progress=False)
    assert list(shared) == list(CONFIGS)
    for name, plan in shared.items():
        assert plan.config is CONFIGS[name]
        assert_same(plan, alone[name], name)
    # what the comparison covered: layers in every format, GPTQ, auto's held-out rows, attention
    assert {lp.format for lp in shared["fp8"].layers.values()} == {"fp8"}
    assert {lp.format for lp in shared["O1"].layers.values()} == {"int8"} and shared["O1"].skipped
    assert shared["O3"].calibration["gptq_blocks"] > 0 and shared["auto"].calibration["gptq_blocks"] > 0
    assert shared["auto"].calibration["auto"]["measured_on"].startswith("held-out")
    assert shared["O1+attention"].attention and shared["fp16+attention"].attention
    assert not shared["fp16+attention"].layers and shared["fp16+attention"].calibration["rows"] == 0
    assert not shared["fp16"].layers and not shared["fp16"].calibration
    assert shared["O1"].calibration["batches"] == len(data) and shared["O1"].calibration["rows"] > 0


@pytest.mark.parametrize("field, value", [("calib_samples", 256), ("seed", 1), ("skip", ())])
def test_configs_that_observe_differently_are_refused_before_any_run(field, value):
    model = tiny_llama(layers=1)

    def untouched():
        raise AssertionError("the batches were read")
        yield

    configs = {"O1": Config(level="O1"), "other": Config(level="w8a8", **{field: value})}
    with pytest.raises(ValueError, match=rf"Config\.{field} .*'O1'.*'other'"):
        calibrate_many(model, untouched(), configs, progress=False)


def test_lists_in_lists_out_and_bad_arguments():
    model = tiny_llama(layers=1)
    data = batches(n=2)
    plans = calibrate_many(model, data, [Config(level="w8a8"), Config(level="fp8")], progress=False)
    assert [p.config.level for p in plans] == ["w8a8", "fp8"] and all(p.layers for p in plans)
    assert calibrate_many(model, iter(()), [Config(level="fp16")])[0].layers == {}     # runs nothing
    with pytest.raises(TypeError, match=r"configs\[1\]"):
        calibrate_many(model, data, [Config(), "O1"])
    with pytest.raises(ValueError, match="at least one"):
        calibrate_many(model, data, {})
    with pytest.raises(fq_compile.CalibrationError, match="got no batches"):
        calibrate_many(model, [], [Config()], progress=False)
