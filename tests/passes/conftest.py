"""Fixtures shared by the pass tests."""

import pytest


@pytest.fixture
def recorded(monkeypatch):
    """compile_fx replaced by a recorder: the graphs it gets, run as they are (eager FX)."""
    import torch._inductor.compile_fx as cfx

    graphs = []

    def record(gm, example_inputs, config_patches=None):
        graphs.append(gm)
        return gm.forward

    monkeypatch.setattr(cfx, "compile_fx", record)
    return graphs
