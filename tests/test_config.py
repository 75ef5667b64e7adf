import pytest

from fq_compile import Config, ConfigError


def test_paper_defaults():
    c = Config()
    assert (c.level, c.alpha, c.beta, c.gamma, c.pad_multiple) == ("O1", 0.5, None, 1.86, 32)
    assert c.threshold_beta == 3.0 and Config(level="O3").threshold_beta == 1.3     # the level's beta


@pytest.mark.parametrize("level,smoothing,flatten,mixed", [
    ("fp16", "none", False, False), ("w8a8", "none", False, False), ("smoothquant", "smoothquant", False, False),
    ("O1", "sigmoid", True, False), ("O2", "sigmoid", True, True), ("O3", "sigmoid", True, True)])
def test_levels_follow_table_2(level, smoothing, flatten, mixed):
    c = Config(level=level)
    assert (c.smoothing_method, c.flatten, c.mixed_bits) == (smoothing, flatten, mixed)
    assert c.quantize == (level != "fp16")
    assert c.gptq == (level == "O3")


def test_overrides():
    c = Config(level="O1", smoothing="none", beta=1.1)
    assert c.smoothing_method == "none" and c.beta == 1.1 and c.threshold_beta == 1.1
    assert Config(level="w8a8").weight_clip_method == "max" and Config(level="O3").weight_clip_method == "mse"
    assert Config(level="w8a8", weight_clip="mse").weight_clip_method == "mse"
    assert Config(level="O1", weight_clip="max").weight_clip_method == "max"
    # per-channel scales (the default): the row max at 8 bits, the MSE clip where INT4 layers exist
    assert Config().weight_scale == "channel" and Config(level="O1").weight_clip_method == "max"
    assert Config(level="O2").weight_clip_method == "mse" and Config(level="O3").weight_clip_method == "mse"
    assert Config(level="O1", weight_scale="tensor").weight_clip_method == "mse"
    assert Config(level="smoothquant", weight_scale="tensor").weight_clip_method == "max"


@pytest.mark.parametrize("kw,knob", [
    (dict(level="O4"), "level"), (dict(alpha=1.5), "alpha"), (dict(alpha=-0.1), "alpha"), (dict(beta=0), "beta"),
    (dict(gamma=-1.0), "gamma"), (dict(pad_multiple=7), "pad_multiple"), (dict(smoothing="foo"), "smoothing"),
    (dict(weight_clip="p99"), "weight_clip"), (dict(kl_method="exact"), "kl_method"), (dict(calib_samples=1), "calib_samples"), (dict(beta=float("inf")), "beta")])
def test_invalid_values_name_the_knob(kw, knob):
    with pytest.raises(ConfigError, match=knob):
        Config(**kw)


def test_dict_round_trip_and_unknown_knob():
    c = Config(level="O2", gamma=1.9, skip=("lm_head", "fc2"))
    assert Config.from_dict(c.to_dict()) == c
    with pytest.raises(ConfigError, match="bogus"):
        Config.from_dict({"bogus": 1})


def test_overrides_from_the_command_line():
    from fq_compile.tools.evaluate import parse_overrides

    kw = parse_overrides(["beta=1.1", "smoothing=none", "flatten_weights=true", "skip=[\"lm_head\", \"fc2\"]"])
    assert kw == {"beta": 1.1, "smoothing": "none", "flatten_weights": True, "skip": ["lm_head", "fc2"]}
    c = Config.from_dict(dict(kw, level="O2"))
    assert c.skip == ("lm_head", "fc2") and c.flatten_weights is True
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_overrides(["beta"])


def test_auto_budget_defaults_to_memory_and_follows_what_is_set():
    from fq_compile.config import DEFAULT_MEMORY_BUDGET

    assert Config(level="auto").auto_budget == ("memory", DEFAULT_MEMORY_BUDGET)
    assert Config(level="auto", error_budget=0.5).auto_budget == ("error", 0.5)
    assert Config(level="auto", memory_budget=0.3).auto_budget == ("memory", 0.3)
    # plans written before the default changed carry error_budget=1.0 and keep error mode; both set: memory wins
    assert Config(level="auto", error_budget=1.0, memory_budget=0.4).auto_budget == ("memory", 0.4)
    with pytest.raises(ConfigError, match="error_budget"):
        Config(level="auto", error_budget=0.0)
