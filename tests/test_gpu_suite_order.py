"""The GPU suite's order (tests/conftest.py): longest recorded test first, CUTLASS tests last."""

from types import SimpleNamespace

from tests.conftest import GPU_DURATIONS, UNKNOWN_GPU_TEST_S, gpu_order, recorded_durations


def _item(nodeid, *keywords):
    return SimpleNamespace(nodeid=nodeid, keywords={k: True for k in keywords})


def test_longest_first_cutlass_last_cpu_tests_in_place(tmp_path):
    log = tmp_path / "durations.txt"
    log.write_text("     5.0s call     passed   tests/a.py::test_gpu_short\n"
                   "   160.0s call     passed   tests/b.py::test_gpu_long\n"
                   "     0.1s setup    failed   tests/b.py::test_gpu_long\n"
                   "     2.0s call     passed   tests/kernels/test_dispatch.py::test_gpu_exact\n"
                   "garbage line\n")
    durations = recorded_durations(log)
    assert durations == {"tests/a.py::test_gpu_short": 5.0, "tests/b.py::test_gpu_long": 160.0,
                         "tests/kernels/test_dispatch.py::test_gpu_exact": 2.0}
    items = [_item("tests/a.py::test_cpu_one"), _item("tests/kernels/test_dispatch.py::test_gpu_exact", "gpu"),
             _item("tests/a.py::test_gpu_short", "gpu"), _item("tests/c.py::test_gpu_new", "gpu"),
             _item("tests/x.py::test_gpu_cutlass_marked", "gpu", "cutlass"),
             _item("tests/b.py::test_gpu_long", "gpu"), _item("tests/a.py::test_cpu_two")]
    order = [it.nodeid for it in gpu_order(items, durations)]
    assert order == ["tests/a.py::test_cpu_one", "tests/a.py::test_cpu_two",
                     "tests/b.py::test_gpu_long", "tests/c.py::test_gpu_new", "tests/a.py::test_gpu_short",
                     "tests/x.py::test_gpu_cutlass_marked", "tests/kernels/test_dispatch.py::test_gpu_exact"]
    assert 5.0 < UNKNOWN_GPU_TEST_S < 160.0


def test_the_committed_record_parses():
    durations = recorded_durations(GPU_DURATIONS)
    assert len(durations) > 50 and all(s >= 0 for s in durations.values())
    assert recorded_durations(GPU_DURATIONS.with_name("no-such-file.txt")) == {}
