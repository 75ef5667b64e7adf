"""fq_compile/kernels/stopwatch.py: each stage's own seconds, nested stages taken out of the one around
them, and the backend timing its rewrite and its Inductor call (the first-call table of issue 23)."""

import torch

from fq_compile.kernels import stopwatch


class _Clock:
    """A clock the test moves by hand (no wall-clock timing in unit tests)."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now


def test_nested_stages_count_their_own_time_once(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(stopwatch, "time", clock)
    stopwatch.reset()
    with stopwatch.stage("outer"):
        clock.now += 2.0
        with stopwatch.stage("inner"):
            clock.now += 5.0
        with stopwatch.stage("inner"):
            clock.now += 1.0
    clock.now += 0.5                                       # outside every stage
    got = stopwatch.totals()
    assert got == {"inner": (6.0, 2), "outer": (2.0, 1)}   # the inner 6 s are not the outer's
    assert stopwatch.table(clock.now).splitlines()[-1].split()[2] == "0.5"   # wall 8.5 - the stages' 8.0
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
