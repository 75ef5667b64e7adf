"""fq_compile/kernels/stopwatch.py: each stage's own seconds, nested stages taken out of the one around
them, and the backend timing its rewrite and its Inductor call (the first-call table of issue 23)."""

import time

import torch

from fq_compile.kernels import stopwatch


def test_nested_stages_count_their_own_time_once():
    stopwatch.reset()
    t = time.perf_counter()
    with stopwatch.stage("outer"):
        time.sleep(0.02)
        with stopwatch.stage("inner"):
            time.sleep(0.05)
        with stopwatch.stage("inner"):
            time.sleep(0.01)
    wall = time.perf_counter() - t
    got = stopwatch.totals()
    assert got["inner"][1] == 2 and got["outer"][1] == 1
    assert 0.06 <= got["inner"][0] < 0.06 + 0.05
    assert 0.02 <= got["outer"][0] < 0.02 + 0.05            # the inner 0.06 s are not the outer's
    assert sum(s for s, _ in got.values()) <= wall
    assert "everything else" in stopwatch.table(wall)
    stopwatch.reset()
    assert stopwatch.totals() == {}


def test_a_stage_that_raises_is_still_counted():
    stopwatch.reset()
    try:
        with stopwatch.stage("failing"):
            raise KeyError
    except KeyError:
        pass
    with stopwatch.stage("after"):
        pass
    assert set(stopwatch.totals()) == {"failing", "after"}       # the stack was unwound


def test_the_backend_times_its_rewrite_and_inductor():
    import fq_compile
    from fq_compile import Config
    from tests.conftest import batches, tiny_opt

    model = tiny_opt(layers=1)
    plan = fq_compile.calibrate(model, batches(n=1), Config(level="O1"), progress=False)
    torch._dynamo.reset()
    stopwatch.reset()
    with torch.no_grad():
        torch.compile(model, backend="flattenquant", options={"plan": plan})(batches(n=1)[0])
    got = stopwatch.totals()
    assert got["rewrite"][1] >= 1 and got["Inductor compile"][1] >= 1, got
