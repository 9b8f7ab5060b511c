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


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="stream priorities need a CUDA device")
def test_run_threads_gives_the_urgent_units_high_priority_streams():
    """``urgent`` units run on high-priority streams, the others on normal ones (train_step.py --phase2-urgent)."""
    import torch

    from lorastudy.execution import run_threads

    res = run_threads([(f"u{i}", i) for i in range(3)], None, lambda arg, ctx: torch.cuda.current_stream().priority,
                      urgent=1)
    prio = [r.value for r in res]
    assert prio[0] < 0 and prio[1] == prio[2] == 0, prio



def _lose_an_interrupt(handler) -> None:
    """Run the signal handler inside a finalizer, where Python prints its KeyboardInterrupt as "Exception ignored"
    and drops it (seen in CI: a weakref callback of SQLAlchemy's caught the SIGTERM of a tune worker)."""
    import gc
    import signal

    class Finalized:
        def __del__(self):
            handler(signal.SIGTERM, None)

    Finalized()
    gc.collect()


def test_a_lost_signal_interrupt_still_stops_tune_workers_and_the_pool(tmp_path, glue_dir):
    """The worker then went on with its trials (or waited for others' forever) and the tune outlived its
    SIGTERM by the pool's 30 s join. The handler records the request before raising; the loops check it."""
    import signal

    from lorastudy import tuning
    from lorastudy.config import load_config
    from lorastudy.execution import checkpoint_on_signal, interrupt_requested, run_units, sigterm_as_interrupt
    from tests.conftest import REPO

    cfg = load_config(REPO / "configs" / "tiny.yaml", [f"data.source={glue_dir}", f"output_dir={tmp_path / 'r'}",
                                                       "tasks=[rte]", "methods=[lora]"])
    for context in (checkpoint_on_signal, sigterm_as_interrupt):
        with context():
            _lose_an_interrupt(signal.getsignal(signal.SIGTERM))
            assert interrupt_requested()
            with pytest.raises(KeyboardInterrupt):  # neither asks for a trial nor waits for one
                tuning.run_worker(cfg, "rte", "lora", 0)
            with pytest.raises(KeyboardInterrupt):  # the process pool starts no worker
                run_units([("a", 1), ("b", 2)], _double, workers=2)
        assert not interrupt_requested()  # cleared when the context ends
    assert tuning.n_complete(tuning.get_study(cfg, "rte", "lora")) == 0


def _double(arg, ctx):
    return 2 * arg
