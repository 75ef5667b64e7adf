"""Shared test helpers: the tiny models (tests/tiny_models.py), graph breaks, calibration data."""

from __future__ import annotations

import pytest
import torch

from tests.tiny_models import (  # noqa: F401  (re-exported for the tests)
    ARCHITECTURES,
    OUTLIER_CHANNELS,
    OUTLIER_GAINS,
    VOCAB,
    plant_outliers,
    tiny_gpt2,
    tiny_llama,
    tiny_opt,
    tiny_phi3,
    tiny_qwen2,
)


def break_graph_inside(module: torch.nn.Module) -> None:
    """Make Dynamo break the graph at the start of `module`'s forward, so the module runs as its own
    frame (whose parameters Dynamo names relative to the module)."""
    orig = module.forward

    def with_break(*a, **k):
        torch._dynamo.graph_break()
        return orig(*a, **k)

    module.forward = with_break


def batches(n: int = 4, batch: int = 2, seq: int = 32, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (batch, seq), generator=g) for _ in range(n)]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test starts with empty Dynamo caches, so recompile limits never leak between tests."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(params=["opt", "llama"])
def model_kind(request):
    return request.param


@pytest.fixture
def make_model(model_kind):
    return tiny_opt if model_kind == "opt" else tiny_llama
