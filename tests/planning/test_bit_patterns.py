"""Bit-pattern limiting (fq_compile/planning/bit_patterns.py): promotion only, at most k patterns, whole
groups, the best choice (against brute force), off at 0."""

import itertools
import random

import pytest
import torch

from fq_compile.planning import bit_patterns
from fq_compile.planning.bit_patterns import block_patterns, count_patterns, limit_patterns

# one block: q/k/v read one activation group, o and down one each
POSITIONS = {"attn.q": "attn.qkv", "attn.k": "attn.qkv", "attn.v": "attn.qkv", "attn.o": "attn.o", "mlp.down": "mlp.down"}


def _model(blocks: int, int4: dict[int, set[str]], size=None):
    bits, sizes, groups = {}, {}, {}
    for b in range(blocks):
        for pos, grp in POSITIONS.items():
            name = f"model.layers.{b}.{pos}"
            bits[name] = 4 if pos in int4.get(b, ()) else 8
            sizes[name] = size(b, pos) if size else (4 if pos == "mlp.down" else 1)
            groups[name] = f"model.layers.{b}.{grp}"
    bits["lm_head"], sizes["lm_head"], groups["lm_head"] = 4, 100, "lm_head"     # outside the blocks
    return bits, sizes, groups


def _int4_size(bits, sizes):
    return sum(s for n, s in sizes.items() if bits[n] == 4 and n != "lm_head")


def _check_promotion_only(before, after, groups):
    for n in before:
        assert after[n] == before[n] or (before[n] == 4 and after[n] == 8), n
    by_group = {}
    for n in before:
        by_group.setdefault(groups[n], []).append(n)
    for members in by_group.values():           # a group is promoted whole or not at all
        promoted = [before[n] != after[n] for n in members]
        kept4 = [before[n] == 4 and after[n] == 4 for n in members]
        assert not (any(promoted) and any(kept4)), members


QKV = {"attn.q", "attn.k", "attn.v"}


def test_few_patterns_are_left_alone_and_zero_is_off():
    bits, sizes, groups = _model(4, {0: QKV, 1: QKV, 2: {"mlp.down"}, 3: {"mlp.down"}})
    assert count_patterns(bits) == 2
    for k in (0, 2, 3):
        new, rep = limit_patterns(bits, sizes, groups, k)
        assert new == bits and not rep.promoted and rep.patterns_after == 2
    new, rep = limit_patterns(bits, sizes, groups, 0)
    assert "off" in rep.summary()
    with pytest.raises(ValueError, match="integer >= 0"):
        limit_patterns(bits, sizes, groups, -1)


def test_one_pattern_keeps_what_every_block_shares():
    bits, sizes, groups = _model(3, {0: QKV | {"mlp.down"}, 1: {"mlp.down", "attn.o"},
                                     2: {"mlp.down", "attn.o"} | QKV})
    new, rep = limit_patterns(bits, sizes, groups, 1)
    assert rep.patterns_before == 3 and rep.patterns_after == count_patterns(new) == 1
    assert {n for n in bits if new[n] == 4} == {f"model.layers.{b}.mlp.down" for b in range(3)} | {"lm_head"}
    assert new["lm_head"] == 4                   # outside the blocks: untouched
    _check_promotion_only(bits, new, groups)
    assert rep.int4_size_after == 12 and rep.int4_size_before == 12 + 2 + 6
    assert rep.int4_layers_before == 11 and rep.int4_layers_after == 3
    assert "3 -> 1 over 3 blocks (k=1)" in rep.summary() and "8 layers promoted" in rep.summary()


def test_a_group_split_by_eq8_is_promoted_whole_or_kept():
    # block 0 has q and k in INT4 but v in INT8; block 1 all three: the shared pattern may not keep q, k alone
    bits, sizes, groups = _model(2, {0: {"attn.q", "attn.k"}, 1: QKV | {"mlp.down"}})
    new, rep = limit_patterns(bits, sizes, groups, 1)
    assert all(new[f"model.layers.{b}.attn.{p}"] == 8 for b in (0, 1) for p in "qkv")
    _check_promotion_only(bits, new, groups)


def test_all_int8_counts_towards_k():
    # no INT4 position is shared by the three blocks: one pattern means all INT8
    bits, sizes, groups = _model(3, {0: {"attn.o"}, 1: {"mlp.down"}, 2: QKV})
    new, rep = limit_patterns(bits, sizes, groups, 1)
    assert rep.patterns_after == 1 and rep.int4_layers_after == 0
    new, rep = limit_patterns(bits, sizes, groups, 2)
    assert rep.patterns_after == 2
    assert new["model.layers.1.mlp.down"] == 4 and rep.int4_size_after == 4     # the largest one kept


def _brute_force(bits, sizes, groups, k):
    """The most INT4 size over every way of promoting whole INT4 groups per block with <= k patterns."""
    blocks = sorted({int(n.split(".")[2]) for n in bits if n != "lm_head"})
    choices = []
    for b in blocks:
        units = {}
        for n in bits:
            if n.startswith(f"model.layers.{b}.") and bits[n] == 4:
                units.setdefault(groups[n], []).append(n)
        units = list(units.values())
        choices.append([[n for u, keep in zip(units, ks) if not keep for n in u]
                        for ks in itertools.product((False, True), repeat=len(units))])
    best = -1
    for pick in itertools.product(*choices):
        new = dict(bits)
        for promoted in pick:
            for n in promoted:
                new[n] = 8
        if count_patterns(new) <= k:
            best = max(best, _int4_size(new, sizes))
    return best


@pytest.mark.parametrize("seed", range(12))
def test_best_against_brute_force(seed):
    rng = random.Random(seed)
    n_blocks = rng.choice([3, 4, 5])
    int4 = {b: {p for p in POSITIONS if rng.random() < 0.5} for b in range(n_blocks)}
    sz = {(b, p): rng.randint(1, 9) for b in range(n_blocks) for p in POSITIONS}
    bits, sizes, groups = _model(n_blocks, int4, size=lambda b, p: sz[(b, p)])
    for k in (1, 2, 3):
        new, rep = limit_patterns(bits, sizes, groups, k)
        assert rep.exact
        assert count_patterns(new) <= k and rep.patterns_after == count_patterns(new)
        _check_promotion_only(bits, new, groups)
        assert _int4_size(new, sizes) == rep.int4_size_after == _brute_force(bits, sizes, groups, k)


def test_greedy_fallback_stays_within_k(monkeypatch):
    monkeypatch.setattr(bit_patterns, "MAX_SETS", 1)      # force greedy + swaps
    rng = random.Random(3)
    int4 = {b: {p for p in POSITIONS if rng.random() < 0.5} for b in range(8)}
    bits, sizes, groups = _model(8, int4)
    for k in (1, 2, 3):
        new, rep = limit_patterns(bits, sizes, groups, k)
        assert not rep.exact and "greedy" in rep.summary()
        assert count_patterns(new) <= k
        _check_promotion_only(bits, new, groups)


def test_patterns_read_positions_not_names():
    bits, _, _ = _model(2, {0: {"attn.o"}, 1: {"attn.o"}})
    pats = block_patterns(bits)
    assert pats[0] == pats[1] and "model.layers.#.attn.o" in pats[0][1]


@pytest.fixture(scope="module")
def o3_plans():
    import fq_compile
    from fq_compile import Config
    from tests.conftest import batches, tiny_llama

    model = tiny_llama(layers=6)
    off = fq_compile.calibrate(model, batches(n=2), Config(level="O3", bits_patterns=0), progress=False)
    two = fq_compile.calibrate(model, batches(n=2), Config(level="O3", bits_patterns=2), progress=False)
    return off, two


def test_planner_limits_patterns_before_quantizing(o3_plans):
    import fq_compile

    off, two = o3_plans
    bits_off = {n: lp.bits for n, lp in off.layers.items()}
    bits_two = {n: lp.bits for n, lp in two.layers.items()}
    assert count_patterns(bits_off) > 2                          # premise: Eq. 8 gives more than two
    assert count_patterns(bits_two) <= 2
    gamma = off.config.gamma
    for n, lp in off.layers.items():                             # off: Eq. 8's bits, as they were
        assert (lp.kl_ratio < gamma) == (lp.bits == 4), n
    promoted = [n for n in off.layers if bits_off[n] == 4 and bits_two[n] == 8]
    assert promoted
    for n, lp in two.layers.items():
        assert bits_two[n] == bits_off[n] or n in promoted       # promotion only
        assert lp.kl_ratio == pytest.approx(off.layers[n].kl_ratio)
    groups = {n: lp.group for n, lp in two.layers.items()}
    _check_promotion_only(bits_off, bits_two, groups)
    for n in promoted:                                           # real INT8 weights, GPTQ'd at 8 bits
        lp, g = two.layers[n], two.groups[two.layers[n].group]
        assert lp.format == "int8" and lp.weight_q.dtype == torch.int8
        assert tuple(lp.weight_q.shape) == (lp.out_features, g.flat_features)      # not packed
        assert int(lp.weight_q.abs().max()) > 7                  # beyond the INT4 grid
        assert "promoted to INT8" in lp.why
    assert two.calibration["gptq_blocks"] > 0
    note = two.calibration["bits_patterns"]
    assert f"{count_patterns(bits_off)} -> {count_patterns(bits_two)} over 6 blocks (k=2)" in note
    assert f"{len(promoted)} layer" in note
    shown = " ".join(fq_compile.explain(two).split())            # explain() wraps long cells
    assert "bit patterns (INT4/INT8 per block)" in shown and "(k=2); INT4 layers" in shown
    assert "(no limit)" in off.calibration["bits_patterns"]


def test_limited_plan_saves_and_loads(o3_plans, tmp_path):
    from fq_compile import QuantPlan

    _, two = o3_plans
    two.save(tmp_path / "p.fqplan")
    loaded = QuantPlan.load(tmp_path / "p.fqplan")
    assert {n: lp.bits for n, lp in loaded.layers.items()} == {n: lp.bits for n, lp in two.layers.items()}
    assert loaded.calibration["bits_patterns"] == two.calibration["bits_patterns"]
    assert loaded.config.bits_patterns == 2


def test_config_knob_is_validated():
    from fq_compile import Config, ConfigError
    from fq_compile.config import BITS_PATTERNS

    assert Config().bits_patterns == BITS_PATTERNS and Config(bits_patterns=0).bits_patterns == 0
    assert Config.from_dict(Config(bits_patterns=3).to_dict()).bits_patterns == 3
    for bad in (-1, 1.5, True, "2", None):
        with pytest.raises(ConfigError, match="bits_patterns"):
            Config(bits_patterns=bad)
