"""Block alignment (fq_compile/planning/align.py): one K' per block position, padding that changes no value,
plans that save and load with it, and the knob's validation."""

import pytest
import torch

import fq_compile
from fq_compile import Config, ConfigError, QuantPlan
from fq_compile.planning.align import align_groups, pad_channel_map, position_of
from fq_compile.planning.flatten import channel_map, flatten_values, flatten_weight
from tests.conftest import batches, tiny_llama


def test_position_replaces_the_first_layer_index_only():
    assert position_of("model.layers.3.mlp.down_proj") == "model.layers.#.mlp.down_proj"
    assert position_of("model.layers.12.self_attn.q_proj+k_proj+v_proj") == "model.layers.#.self_attn.q_proj+k_proj+v_proj"
    assert position_of("model.layers.2.experts.7.w1") == "model.layers.#.experts.7.w1"
    assert position_of("lm_head") is None


def test_padding_adds_zero_columns_and_keeps_the_product():
    gen = torch.Generator().manual_seed(0)
    extra = torch.randint(0, 3, (24,), generator=gen)
    cmap = channel_map(extra, None, 8)
    wide = pad_channel_map(cmap, cmap.size + 16)
    assert wide.size == cmap.size + 16 and not wide.active[cmap.size:].any()
    x = torch.randn(5, 24, generator=gen) * 3
    w = torch.randn(7, 24, generator=gen)
    xf, wf = flatten_values(x, wide, 1.0), flatten_weight(w, wide)
    assert torch.equal(xf[:, cmap.size:], torch.zeros(5, 16)) and torch.equal(wf[:, cmap.size:], torch.zeros(7, 16))
    assert torch.equal(xf[:, : cmap.size], flatten_values(x, cmap, 1.0))
    torch.testing.assert_close(xf @ wf.T, x @ w.T, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="cannot pad"):
        pad_channel_map(cmap, cmap.size - 8)


@pytest.fixture(scope="module")
def plans():
    model = tiny_llama(layers=3)
    unaligned = fq_compile.calibrate(model, batches(n=2), Config(level="O1", align_blocks=False), progress=False)
    aligned = fq_compile.calibrate(model, batches(n=2), Config(level="O1"), progress=False)
    return unaligned, aligned


def test_each_position_gets_its_largest_width(plans):
    unaligned, aligned = plans
    widths: dict[str, set[int]] = {}
    for name, g in aligned.groups.items():
        widths.setdefault(position_of(name), set()).add(g.flat_features)
    assert all(len(w) == 1 for w in widths.values()), widths
    before = {name: g.flat_features for name, g in unaligned.groups.items()}
    assert any(len({before[n] for n in aligned.groups if position_of(n) == p}) > 1 for p in widths)  # premise
    for name, g in aligned.groups.items():
        same = [before[n] for n in aligned.groups if position_of(n) == position_of(name)]
        assert g.flat_features == max(same)
        torch.testing.assert_close(g.cmap.src[: before[name]], unaligned.groups[name].cmap.src, rtol=0, atol=0)
    added = sum(g.flat_features for g in aligned.groups.values()) - sum(before.values())
    assert f"+{100 * added / sum(before.values()):.1f}% flattened columns" in aligned.calibration["align"]
    assert "padded to one K' each" in fq_compile.explain(aligned)          # explain() shows it
    assert "off (Config.align_blocks=False)" in fq_compile.explain(unaligned)


def test_aligned_weights_are_the_unaligned_ones_and_zero_columns(plans):
    unaligned, aligned = plans
    for name, lp in aligned.layers.items():
        lu = unaligned.layers[name]
        k = lu.weight_q.shape[1]
        assert torch.equal(lp.weight_q[:, :k], lu.weight_q) and not lp.weight_q[:, k:].any()
        torch.testing.assert_close(lp.weight_scale, lu.weight_scale, rtol=0, atol=0)


def test_aligned_plan_saves_and_loads(plans, tmp_path):
    _, aligned = plans
    aligned.save(tmp_path / "a.fqplan")
    loaded = QuantPlan.load(tmp_path / "a.fqplan")
    assert {n: g.flat_features for n, g in loaded.groups.items()} == {n: g.flat_features for n, g in aligned.groups.items()}


def test_align_groups_leaves_single_and_unnumbered_groups_alone(plans):
    import dataclasses

    unaligned, _ = plans
    widest = max(unaligned.groups.values(), key=lambda g: g.flat_features)
    narrow = min(unaligned.groups.values(), key=lambda g: g.flat_features)
    assert widest.flat_features > narrow.flat_features
    groups = {"head": dataclasses.replace(widest, name="head"),           # outside the numbered blocks
              "stem": dataclasses.replace(narrow, name="stem"),
              "model.layers.0.mlp.down_proj": dataclasses.replace(narrow, name="model.layers.0.mlp.down_proj")}
    report = align_groups(groups)
    assert {n: g.flat_features for n, g in groups.items()} == {"head": widest.flat_features, "stem": narrow.flat_features,
                                                               "model.layers.0.mlp.down_proj": narrow.flat_features}
    assert report.summary() == "block alignment: no repeated groups" and report.overhead == 0.0


def test_knob_must_be_a_bool():
    with pytest.raises(ConfigError, match="align_blocks"):
        Config(align_blocks="yes")
