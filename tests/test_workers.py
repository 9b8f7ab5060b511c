"""The worker pool: processes, and several runs per process as threads (the --streams path)."""

import pytest


def test_run_threads_reports_each_unit():
    """The --streams path: units run at once in threads; one failing unit does not hide the others' results."""
    from lorastudy.workers import default_streams, run_threads, run_units

    def fn(arg, device):
        if arg == "bad":
            raise ValueError("boom")
        return arg * 2

    res = run_threads([("a", 1), ("b", "bad"), ("c", 3)], None, fn)
    assert [(r.name, r.ok, r.value) for r in res] == [("a", True, 2), ("b", False, None), ("c", True, 6)]
    assert "boom" in res[1].error
    res = run_units([(f"u{i}", i) for i in range(5)], fn, workers=1, streams=2)
    assert sorted(r.value for r in res) == [0, 2, 4, 6, 8]
    assert default_streams(None) == 1 and default_streams(4) == 4  # CPU: one run per process unless asked
    assert default_streams(None, "cpu") == 1
    with pytest.raises(ValueError):
        default_streams(0)

