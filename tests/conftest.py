"""Shared test helpers: the tiny models (tests/tiny_models.py), graph breaks, calibration data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Our Triton kernels take their first tiling candidate untimed (kernels/triton/tuning.py): tuning
# picks a tiling, never a result, and each candidate is tested explicitly; the tests that check the
# autotuned path set FQ_TUNE=1 themselves.  Child processes inherit it.
os.environ.setdefault("FQ_TUNE", "0")

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


INTERPRETER_MIN_TRITON = "3.7"


def need_triton_interpreter() -> None:
    """Skip unless Triton's CPU interpreter can run our kernels: before 3.7 it hands a kernel's scalar
    values (program ids, loop bounds) to Python's range() as 1-element numpy arrays, which numpy 2
    refuses (measured 2026-12-06 with numpy 2.4: under triton 3.6, the device's, every interpreter check fails
    that way; under 3.7, 3.8 and 3.9 they pass).  The compiled GPU kernels are not affected."""
    from packaging.version import Version

    triton = pytest.importorskip("triton")
    have = Version(triton.__version__.split("+")[0])
    if have < Version(INTERPRETER_MIN_TRITON):
        pytest.skip(f"Triton's interpreter needs triton >= {INTERPRETER_MIN_TRITON} with numpy 2 (have {have}): "
                    "it passes loop bounds to range() as 1-element arrays")


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


# Each GPU test's duration in the last full run of benchmarks/device/gpu_tests.sh (its
# gpu-tests-durations.txt, copied here with the run's record): the order below comes from it.
GPU_DURATIONS = Path(__file__).with_name("gpu_durations.txt")
UNKNOWN_GPU_TEST_S = 30.0       # a GPU test not in the file yet: ordered among the medium ones


def recorded_durations(path: Path = GPU_DURATIONS) -> dict[str, float]:
    """nodeid -> seconds of its call phase, from lines "  12.3s call     passed   nodeid"."""
    out = {}
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        parts = line.split()
        if len(parts) == 4 and parts[1] == "call" and parts[0].endswith("s"):
            try:
                out[parts[3]] = float(parts[0][:-1])
            except ValueError:
                continue
    return out


def gpu_order(items, durations: dict[str, float]):
    """The order pytest-xdist hands GPU tests out in (it deals them in collection order): longest
    recorded first, so that the slow whole-model tests start at once on separate workers instead
    of last (longest-processing-time-first scheduling: the wall time approaches sum / workers);
    tests that call CUTLASS kernels after all the others, since benchmarks/device/gpu_tests.sh
    builds their libraries in the background while the others run.  Other tests keep their order."""
    def key(it):
        if "gpu" not in it.keywords:
            return (0, 0.0)
        cutlass = "cutlass" in it.keywords or it.nodeid.startswith("tests/kernels/test_dispatch.py::test_gpu")
        return (2 if cutlass else 1, -durations.get(it.nodeid, UNKNOWN_GPU_TEST_S))
    return sorted(items, key=key)


def pytest_collection_modifyitems(config, items):
    items[:] = gpu_order(items, recorded_durations())


def pytest_runtest_logreport(report):
    """With FQ_TEST_LOG set, append each test's outcome and duration as it finishes (one line per
    phase that ran), so a run cut by its time limit still says what finished and how long it took."""
    path = os.environ.get("FQ_TEST_LOG")
    if not path or os.environ.get("PYTEST_XDIST_WORKER") or (report.when != "call" and report.passed):
        return
    with open(path, "a") as f:
        f.write(f"{report.duration:8.1f}s {report.when:8s} {report.outcome:8s} {report.nodeid}\n")
