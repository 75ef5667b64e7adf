"""Synthetic plans (fq_compile/tools/synthetic.py) under Config.bits_patterns: the requested INT4 share of
layers and of weights, in no more per-block bit patterns than the limit."""

import pytest

from fq_compile.config import BITS_PATTERNS
from fq_compile.planning.bit_patterns import count_patterns
from fq_compile.tools.synthetic import PAPER_TABLE4, synthetic_plan


def _shares(plan, model):
    params = dict(model.named_parameters())
    n4 = sum(lp.bits == 4 for lp in plan.layers.values())
    total = sum(params[l + ".weight"].numel() for l in plan.layers)
    int4 = sum(params[l + ".weight"].numel() for l, lp in plan.layers.items() if lp.bits == 4)
    return n4 / len(plan.layers), int4 / total


@pytest.fixture(scope="module", params=["opt", "llama"])
def model40(request):
    from tests.conftest import tiny_llama, tiny_opt

    return (tiny_opt if request.param == "opt" else tiny_llama)(layers=40, hidden=64, outliers=False)


@pytest.mark.parametrize("limit", [None, 2, 6])
def test_shares_kept_within_the_pattern_limit(model40, limit):
    share, ratio = PAPER_TABLE4["13b"]
    plan = synthetic_plan(model40, "O3", flatten_ratio=ratio, int4_share=share, progress=False, bits_patterns=limit)
    k = BITS_PATTERNS if limit is None else limit
    assert plan.config.bits_patterns == k
    bits = {n: lp.bits for n, lp in plan.layers.items()}
    assert 1 < count_patterns(bits) <= k
    layers, weights = _shares(plan, model40)
    assert abs(layers - share) <= 1 / 40 and abs(weights - share) <= 1 / 40
    for g in plan.groups.values():
        assert len({plan.layers[l].bits for l in g.layers}) == 1          # q/k/v never mix bits
    assert f"{count_patterns(bits)} over 40 blocks" in plan.calibration["bits_patterns"]


def test_zero_keeps_a_phase_per_position(model40):
    plan = synthetic_plan(model40, "O3", flatten_ratio=0.215, int4_share=0.45, progress=False, bits_patterns=0)
    bits = {n: lp.bits for n, lp in plan.layers.items()}
    assert count_patterns(bits) > BITS_PATTERNS                            # what the limit is for
    layers, weights = _shares(plan, model40)
    assert abs(layers - 0.45) <= 1 / 40 and abs(weights - 0.45) <= 1 / 40


def test_one_pattern_is_all_or_nothing(model40):
    for share, expect in ((0.45, 8), (0.6, 4)):
        plan = synthetic_plan(model40, "O3", flatten_ratio=0.2, int4_share=share, progress=False, bits_patterns=1)
        assert {lp.bits for lp in plan.layers.values()} == {expect}
