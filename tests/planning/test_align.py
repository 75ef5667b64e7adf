"""Block alignment (fq_compile/planning/align.py): the fewest sets of widths within the budget, padding that
changes no value, plans that save and load with it, and the knob's validation."""

import pytest
import torch

import fq_compile
from fq_compile import Config, ConfigError, QuantPlan
from fq_compile.plan import GroupPlan
from fq_compile.planning.align import _runs, align_groups, position_of
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
    wide = cmap.padded_to(cmap.size + 16)
    assert wide.size == cmap.size + 16 and not wide.active[cmap.size:].any()
    x = torch.randn(5, 24, generator=gen) * 3
    w = torch.randn(7, 24, generator=gen)
    xf, wf = flatten_values(x, wide, 1.0), flatten_weight(w, wide)
    assert torch.equal(xf[:, cmap.size:], torch.zeros(5, 16)) and torch.equal(wf[:, cmap.size:], torch.zeros(7, 16))
    assert torch.equal(xf[:, : cmap.size], flatten_values(x, cmap, 1.0))
    torch.testing.assert_close(xf @ wf.T, x @ w.T, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="cannot pad"):
        cmap.padded_to(cmap.size - 8)


@pytest.fixture(scope="module")
def plans():
    model = tiny_llama(layers=3)
    unaligned = fq_compile.calibrate(model, batches(n=2), Config(level="O1", align_budget=0.0), progress=False)
    aligned = fq_compile.calibrate(model, batches(n=2), Config(level="O1", align_budget=100.0), progress=False)
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
    assert "3 blocks padded to 1 set of K'" in aligned.calibration["align"]
    assert "3 blocks padded to 1 set of K'" in fq_compile.explain(aligned)          # explain() shows it
    assert "off (Config.align_budget=0)" in fq_compile.explain(unaligned)


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


def _group(name: str, extra_total: int, c: int = 32) -> GroupPlan:
    extra = torch.zeros(c, dtype=torch.int64)
    extra[0] = extra_total
    return GroupPlan(name=name, layers=[name], in_features=c, threshold=1.0, smooth=torch.ones(c), fold="op",
                     extra=extra, weight_dup=torch.zeros_like(extra), act_max=(extra + 1).float(), pad_multiple=32,
                     cmap=channel_map(extra, None, 32))


@pytest.mark.parametrize("budget,sets", [(0.0, 3), (0.05, 3), (0.2, 2), (100.0, 1)])
def test_fewest_sets_within_the_budget(budget, sets):
    """Blocks of widths 32, 32, 64, 64, 64, 256 (+ a group outside the blocks): no padding keeps the three
    widths; padding the 32s to 64 costs 64/512 = 12.5% of the blocks' multiply-adds, so 20% allows two
    sets; one set pads everything to 256."""
    extras = [0, 0, 1, 20, 32, 200]
    groups = {f"m.layers.{i}.fc": _group(f"m.layers.{i}.fc", e) for i, e in enumerate(extras)}
    groups["head"] = _group("head", 300)
    rows = {n: 10 for n in groups}
    before = {n: g.flat_features for n, g in groups.items()}
    assert [before[f"m.layers.{i}.fc"] for i in range(6)] == [32, 32, 64, 64, 64, 256]
    report = align_groups(groups, rows, budget)
    widths = [groups[f"m.layers.{i}.fc"].flat_features for i in range(6)]
    assert report.blocks == 6 and report.widths == sets == len(set(widths)), (report, widths)
    assert groups["head"].flat_features == before["head"]
    assert all(w >= before[f"m.layers.{i}.fc"] for i, w in enumerate(widths))
    assert report.overhead <= budget + 1e-12
    assert report.macs_before == 10 * sum(before[f"m.layers.{i}.fc"] for i in range(6))
    assert report.macs_after == 10 * sum(widths)


def test_runs_are_optimal_for_their_count():
    """_runs against brute force over every cut of 5 blocks, on random padding costs."""
    import itertools

    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        n = 5
        costs = [[0] * n for _ in range(n)]
        for i in range(n):
            for j in range(i + 1, n):
                costs[i][j] = costs[i][j - 1] + int(torch.randint(0, 10, (1,), generator=gen))
        budget = int(torch.randint(0, 25, (1,), generator=gen))
        best = None
        for k in range(1, n + 1):
            for cuts in itertools.combinations(range(1, n), k - 1):
                bounds = [0, *cuts, n]
                c = sum(costs[a][b - 1] for a, b in zip(bounds, bounds[1:]))
                if c <= budget and (best is None or (k, c) < best):
                    best = (k, c)
        runs = _runs(costs, budget)
        assert (len(runs), sum(costs[i][j] for i, j in runs)) == best
        assert runs[0][0] == 0 and runs[-1][1] == n - 1 and all(a[1] + 1 == b[0] for a, b in zip(runs, runs[1:]))


def test_no_repeated_blocks_no_alignment():
    groups = {"head": _group("head", 3), "model.layers.0.fc": _group("model.layers.0.fc", 40)}
    report = align_groups(groups, {n: 1 for n in groups}, 100.0)
    assert report.summary() == "block alignment: no repeated blocks" and report.overhead == 0.0
    assert groups["model.layers.0.fc"].flat_features == 96


def test_knob_is_checked():
    for bad in (-0.1, float("nan"), "2%"):
        with pytest.raises(ConfigError, match="align_budget"):
            Config(align_budget=bad)
