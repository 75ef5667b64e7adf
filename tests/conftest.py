"""Shared test helpers: the tiny models (tests/tiny_models.py), graph breaks, calibration data."""

from __future__ import annotations

from pathlib import Path

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


def run_guarded(argv: list[str], timeout: float, env: dict | None = None) -> str:
    """Run a check in a fresh Python process (GPU checks, the Triton interpreter) and fail with its
    output when it fails or runs past `timeout` seconds.  A hung GPU kernel cannot be interrupted
    inside the test process; in a child it is killed, and the child's progress lines (printed and
    flushed as it goes) say which step hung.  Returns the child's stdout."""
    import os
    import subprocess
    import sys

    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    try:
        r = subprocess.run([sys.executable, *argv], env=env, capture_output=True, text=True, timeout=timeout, cwd=root)
    except subprocess.TimeoutExpired as e:
        def text(x):
            return (x.decode(errors="replace") if isinstance(x, bytes) else x or "")
        pytest.fail(f"{' '.join(argv)}: no result after {timeout:.0f} s (hung or far too slow); its output so far:\n"
                    f"{text(e.stdout)[-3000:]}\n{text(e.stderr)[-3000:]}")
    assert r.returncode == 0, f"{' '.join(argv)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    return r.stdout
