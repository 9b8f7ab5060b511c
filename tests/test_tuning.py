import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest
import yaml
from optuna.trial import TrialState

from lorastudy import tuning
from lorastudy.config import load_config
from tests.conftest import REPO

# A PostgreSQL server for the multi-machine path (.ci/run starts a throw-away one on loopback and exports this URL;
# locally, start one the same way to run those cases)
POSTGRES_URL = os.environ.get("LORASTUDY_TEST_POSTGRES_URL")


@pytest.fixture(params=["sqlite", "postgresql"])
def storage(request):
    """The Optuna storage URL of a test: None (the default SQLite file in the results dir), or a fresh database on
    the PostgreSQL server named by LORASTUDY_TEST_POSTGRES_URL (dropped afterwards; skipped without a server)."""
    if request.param == "sqlite":
        yield None
    else:
        yield request.getfixturevalue("postgres_storage")


@pytest.fixture
def postgres_storage():
    """A fresh database on the PostgreSQL server named by LORASTUDY_TEST_POSTGRES_URL, dropped afterwards."""
    if not POSTGRES_URL:
        pytest.skip("no PostgreSQL server: LORASTUDY_TEST_POSTGRES_URL is unset (.ci/run starts one)")
    import sqlalchemy as sa

    name = f"lorastudy_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield sa.make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as c:
            c.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _tiny(tiny_cfg, *sets):
    return load_config(REPO / "configs" / "tiny.yaml",
                       [f"data.source={tiny_cfg.data.source}", f"output_dir={tiny_cfg.output_dir}", "tasks=[rte]",
                        *sets])


def _states(cfg, task="rte", method="lora"):
    st = tuning.get_study(cfg, task, method)
    return [t.state for t in st.get_trials(deepcopy=False)], st


class _Untouchable:
    """Stands in for the test split during tuning: any use fails the test. (pytest.fail raises a BaseException, which
    the tuning loop's per-trial ``except Exception`` does not swallow.)"""

    def _touched(self, *a, **k):
        pytest.fail("the test split was touched during tuning")

    __getattr__ = __getitem__ = __len__ = __iter__ = _touched


def test_tune_outputs_and_best_roundtrip_into_train(tiny_cfg, monkeypatch):
    import dataclasses

    from lorastudy import data as D

    real = D.splits_for
    monkeypatch.setattr(D, "splits_for", lambda c, t: dataclasses.replace(real(c, t), test=_Untouchable()))
    cfg = _tiny(tiny_cfg, "methods=[lora]")
    res = tuning.tune(cfg)
    monkeypatch.undo()
    s = res["studies"][0]
    assert s["n_complete"] == 2 and s["pruning"] == "none"
    out = cfg.out / "phase1" / "rte_lora"
    for name in ("trials.csv", "trials.json", "best.yaml", "optimization_history.png"):
        assert (out / name).is_file(), name
    assert (cfg.out / "analysis" / "rte_lora_optimal.yaml").is_file()
    best = yaml.safe_load((out / "best.yaml").read_text())
    trials = json.loads((out / "trials.json").read_text())["trials"]
    assert best["value"] == max(t["value"] for t in trials if t["state"] == "COMPLETE")
    assert set(best["hparams"]) >= {"lr", "batch_size", "warmup_ratio", "weight_decay", "epochs", "lora_alpha"}
    # the test split is never touched during search (above: any use of it fails the test)
    assert all(t["state"] == "COMPLETE" and "error" not in t for t in trials)
    # best.yaml feeds `train`
    from typer.testing import CliRunner

    from lorastudy.cli import app

    r = CliRunner().invoke(app, ["train", str(REPO / "configs" / "tiny.yaml"), "--task", "rte", "--method", "lora",
                                 "--seed", "5", "--hparams", str(out / "best.yaml"), "--set",
                                 f"data.source={cfg.data.source}", "--set", f"output_dir={cfg.out}"])
    assert r.exit_code == 0, r.output
    m = json.loads((cfg.out / "phase2" / "rte" / "lora" / "seed5" / "metrics.json").read_text())
    for k, v in best["hparams"].items():
        assert m["hparams"][k] == v


@pytest.mark.parametrize("workers,streams", [(2, 1), (1, 3)], ids=["2-processes", "3-threads-one-process"])
def test_concurrent_workers_one_sqlite_exact_trial_count(tiny_cfg, workers, streams, storage):
    """Processes, or threads of one process (the --streams path), share one study without over-counting, on SQLite
    and on PostgreSQL; no two of them propose the same point."""
    if storage and streams > 1:
        pytest.skip("threads of one process: PostgreSQL adds nothing to the 2-processes case")
    cfg = _tiny(tiny_cfg, "methods=[lora]", "search.n_trials=4", "search.max_steps=4",
                *([f"search.storage={storage}"] if storage else []))
    res = tuning.tune(cfg, workers=workers, streams=streams)
    assert not res["failures"], res["failures"]
    states, st = _states(cfg)
    complete = [t for t in st.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    assert len(complete) == 4
    assert len({t.number for t in complete}) == 4
    # any extra trial created by a race is marked surplus and never ran
    for t in st.get_trials(deepcopy=False):
        if t.state != TrialState.COMPLETE:
            assert t.user_attrs.get("surplus") or t.user_attrs.get("interrupted") or t.user_attrs.get("error")
    assert len({tuple(sorted(t.params.items())) for t in complete}) == 4  # four distinct points


def test_machines_starting_together_on_an_empty_storage_all_connect(tiny_cfg, storage):
    """Workers started at once on an empty database all create Optuna's schema (optuna/optuna#1092: on PostgreSQL
    all but one failed with a duplicate-key error): each gets a working storage."""

    cfg = _tiny(tiny_cfg, *([f"search.storage={storage}"] if storage else []))
    barrier, errors = threading.Barrier(4), []

    def connect():
        barrier.wait()
        try:
            tuning._storage(cfg)
        except Exception as e:  # noqa: BLE001 - collected for the assertion
            errors.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=connect) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors[0]
    assert tuning.get_study(cfg, "rte", "lora").get_trials() == []


def test_no_trial_is_asked_once_the_interrupt_clean_up_has_begun(tiny_cfg):
    """A fused group asks for trials from its own thread, which runs on while the main thread frees the running
    trials after SIGTERM; a trial it asked after that stayed RUNNING (CI: `...[fused_group]`). The clean-up now
    stops new asks first, and waits for one in progress: that trial is labelled, so the clean-up finds it."""
    from lorastudy import execution

    cfg = _tiny(tiny_cfg, "search.n_trials=3")
    study = tuning.get_study(cfg, "rte", "lora")
    try:
        in_ask, release, stopped = threading.Event(), threading.Event(), threading.Event()

        def slow_ask():  # an ask in progress when the signal comes
            with execution.new_work() as allowed:
                assert allowed
                in_ask.set()
                release.wait(10)

        t = threading.Thread(target=slow_ask)
        t.start()
        in_ask.wait(10)
        stopper = threading.Thread(target=lambda: (execution.stop_new_work(), stopped.set()))
        stopper.start()
        assert not stopped.wait(0.3)  # the clean-up waits for the ask in progress ...
        release.set()
        assert stopped.wait(10)  # ... then goes on
        t.join(10)
        stopper.join(10)
        assert tuning._ask_trial(study, cfg, "lora", 0) is None and study.get_trials() == []  # nothing new
        execution.allow_new_work()
        trial, _ = tuning._ask_trial(study, cfg, "lora", 0)
        assert trial.user_attrs["pid"] == os.getpid()
    finally:
        execution.allow_new_work()


def test_freeing_a_trial_that_finished_meanwhile_is_skipped(tiny_cfg):
    """The clean-up lists the RUNNING trials, then a fused group's thread tells one of them before the clean-up
    marks it: Optuna refused the update (UpdateFinishedTrialError) and the clean-up stopped there, leaving the
    rest RUNNING. Now that trial is skipped and the others are freed."""
    cfg = _tiny(tiny_cfg, "search.n_trials=3")
    study = tuning.get_study(cfg, "rte", "lora")
    a, b = study.ask(), study.ask()
    listed = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    study.tell(a, 0.5)  # told between the listing and the marking
    assert [tuning._mark_interrupted(study, t) for t in listed] == [False, True]
    assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE, TrialState.FAIL]
    assert study.get_trials()[1].user_attrs["interrupted"] and b.number == 1


def test_two_machines_share_one_postgresql_study(tiny_cfg, postgres_storage, tmp_path):
    """The README's multi-machine recipe: two `lorastudy tune` processes started together, each with its own
    results dir (two machines), on one PostgreSQL database: exactly n_trials complete, no point proposed twice, and
    both export the same best trial."""
    url = postgres_storage
    # trials long enough that both processes ask for their first one before either has finished one
    sets = ["tasks=[rte]", "methods=[lora]", "search.n_trials=4", "data.train_limit.rte=300", "search.max_steps=24",
            f"data.source={tiny_cfg.data.source}"]
    cmds = [[sys.executable, "-m", "lorastudy.cli", "tune", str(REPO / "configs" / "tiny.yaml"), "--storage", url,
             "--set", f"output_dir={tmp_path / f'machine{k}'}"] + [a for kv in sets for a in ("--set", kv)]
            for k in (1, 2)]
    procs = [subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for c in cmds]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]
    cfg = load_config(REPO / "configs" / "tiny.yaml", [*sets, f"search.storage={url}",
                                                        f"output_dir={tmp_path / 'machine1'}"])
    _, st = _states(cfg, "rte", "lora")
    complete = [t for t in st.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    assert len(complete) == 4 and len({t.number for t in complete}) == 4
    assert len({tuple(sorted(t.params.items())) for t in complete}) == 4, "two workers proposed the same point"
    best = [yaml.safe_load((tmp_path / f"machine{k}" / "phase1" / "rte_lora" / "best.yaml").read_text())
            for k in (1, 2)]
    assert best[0] == best[1]


def _long_tune(tiny_cfg, n_trials: int, extra: list[str] | None = None, storage: str | None = None):
    """A config and `lorastudy tune` command for full-FT RTE trials of a few seconds each (time to interrupt)."""
    long = [f"search.n_trials={n_trials}", "data.train_limit.rte=1500", "search.max_steps=300"]
    if storage:
        long.append(f"search.storage={storage}")
    cfg = _tiny(tiny_cfg, "methods=[full]", *long)
    cmd = [sys.executable, "-m", "lorastudy.cli", "tune", str(REPO / "configs" / "tiny.yaml"), *(extra or []),
           "--set", f"data.source={cfg.data.source}", "--set", f"output_dir={cfg.out}", "--set", "tasks=[rte]",
           "--set", "methods=[full]"] + [a for kv in long for a in ("--set", kv)]
    return cfg, cmd


def _wait_for(p, cfg, ready, poll: float, timeout: float = 240) -> None:
    """Poll the study's trial states until ``ready(states)``; the tune process must still be running."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        time.sleep(poll)
        try:
            states, _ = _states(cfg, "rte", "full")
        except Exception:
            continue
        if ready(states):
            return
        assert p.poll() is None, "tune finished before it could be interrupted"
    # a silent return here made the later assertions fail with a misleading message on a slow machine
    pytest.fail(f"the tune process did not reach the state to interrupt within {timeout:.0f} s")


def test_sigkill_mid_tune_then_rerun_finishes_only_missing_trials(tiny_cfg, storage):
    cfg, cmd = _long_tune(tiny_cfg, n_trials=3, storage=storage)
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # wait until one trial is complete and the next is running, then kill
    _wait_for(p, cfg, lambda states: states.count(TrialState.COMPLETE) >= 1 and TrialState.RUNNING in states,
              poll=1.0)
    time.sleep(0.5)  # inside the trial's training
    p.send_signal(signal.SIGKILL)
    p.wait()
    before, st = _states(cfg, "rte", "full")
    n_done = before.count(TrialState.COMPLETE)
    assert 1 <= n_done < 3 and TrialState.RUNNING in before
    done_numbers = {t.number for t in st.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ})
    assert r.returncode == 0, r.stderr[-2000:]
    after, st = _states(cfg, "rte", "full")
    trials = st.get_trials(deepcopy=False)
    assert after.count(TrialState.COMPLETE) == 3
    assert TrialState.RUNNING not in after
    interrupted = [t for t in trials if t.user_attrs.get("interrupted")]
    assert len(interrupted) == 1 and interrupted[0].state == TrialState.FAIL
    # the completed trials of the first run were kept, not redone
    assert done_numbers <= {t.number for t in trials if t.state == TrialState.COMPLETE}
    assert len(trials) == 4  # 3 complete + the interrupted one


@pytest.mark.parametrize("extra, group", [(["--streams", "2"], False), (["--workers", "2"], False),
                                          (["--workers", "2", "--streams", "2"], True),
                                          (["--set", "train.fuse=on", "--set", "train.fast_step=static"], False)],
                         ids=["threads", "processes", "processes_x_threads_group_signal", "fused_group"])
def test_sigterm_stops_parallel_tune_and_frees_its_trials(tiny_cfg, extra, group):
    """`timeout` / a scheduler's cancel, sent to the tune process alone or to its whole process group (what
    `timeout` does): a tune running trials in threads (--streams) and/or worker processes (--workers) exits promptly
    and leaves no RUNNING trial behind (they are marked failed, to be replaced by the next run on any machine, which
    cannot check another host's pids)."""
    cfg, cmd = _long_tune(tiny_cfg, n_trials=4, extra=extra)
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=group)
    _wait_for(p, cfg, lambda states: states.count(TrialState.RUNNING) >= 2, poll=0.5)
    t0 = time.time()
    if group:
        os.killpg(p.pid, signal.SIGTERM)
    else:
        p.send_signal(signal.SIGTERM)
    p.wait(timeout=60)
    assert time.time() - t0 < 30 and p.returncode != 0
    after, st = _states(cfg, "rte", "full")
    assert TrialState.RUNNING not in after
    failed = [t for t in st.get_trials(deepcopy=False) if t.state == TrialState.FAIL]
    assert len(failed) >= 2 and all(t.user_attrs.get("interrupted") for t in failed)


def test_progress_follows_trials_finished_by_other_processes(tiny_cfg):

    cfg = _tiny(tiny_cfg, "methods=[lora]")
    st = tuning.get_study(cfg, "rte", "lora")
    calls = []

    class Prog:
        def advance_rows(self, n, label=""):
            calls.append((n, label))

    done = threading.Event()
    th = threading.Thread(target=tuning._follow_trials, args=(cfg, [("rte", "lora")], Prog(), done, 0.05))
    th.start()
    time.sleep(0.3)
    for _ in range(2):  # as a worker process would: two trials complete
        st.tell(st.ask(), 0.5)
    deadline = time.time() + 10
    while sum(n for n, _ in calls) < 2 and time.time() < deadline:
        time.sleep(0.05)
    done.set()
    th.join()
    assert sum(n for n, _ in calls) == 2 and "rte/lora" in calls[-1][1]


def test_trial_created_but_never_labelled_is_freed(tiny_cfg, monkeypatch):
    """A worker killed between creating its trial and labelling it (host, pid) leaves an ownerless RUNNING trial
    without a heartbeat, which Optuna's stale check never frees: the interrupt cleanup frees those created since its
    run began (after a short grace), a later worker those older than the long grace; labelled trials of another
    live process stay RUNNING."""
    import datetime

    cfg = _tiny(tiny_cfg, "methods=[full]", "tasks=[rte]")
    st = tuning.get_study(cfg, "rte", "full")
    old = st.ask()  # ownerless, from before this "run"
    since = datetime.datetime.now()
    fresh = st.ask()  # ownerless, created during the run
    other = st.ask()
    other.set_user_attr("host", "elsewhere:1")
    other.set_user_attr("pid", 1)
    monkeypatch.setattr(tuning, "UNLABELLED_GRACE_S", 0.2)
    assert tuning.fail_own_running(cfg, [("rte", "full")], set(), since=since) == 1
    state = {t.number: t.state for t in st.get_trials(deepcopy=False)}
    assert state == {old.number: TrialState.RUNNING, fresh.number: TrialState.FAIL, other.number: TrialState.RUNNING}
    assert tuning.fail_orphans(st) == 0  # the old one is younger than the long grace
    monkeypatch.setattr(tuning, "UNLABELLED_GRACE_ANY_S", 0.0)
    assert tuning.fail_orphans(st) == 1
    state = {t.number: t.state for t in st.get_trials(deepcopy=False)}
    assert state[old.number] == TrialState.FAIL and state[other.number] == TrialState.RUNNING


def test_changed_search_space_is_never_silently_reused(tiny_cfg):
    """Was: after changing the LoRA lr range and re-running tuning, the old study's trials were reused and best.yaml
    kept an lr outside the new range; `tune` told the user to pass --force, which it did not have."""
    from typer.testing import CliRunner

    from lorastudy.cli import app

    base = ["--set", f"data.source={tiny_cfg.data.source}", "--set", f"output_dir={tiny_cfg.output_dir}",
            "--set", "tasks=[rte]", "--set", "methods=[lora]", "--set", "search.n_trials=1", "--set",
            "search.max_steps=2"]
    tiny = str(REPO / "configs" / "tiny.yaml")
    assert CliRunner().invoke(app, ["tune", tiny, *base]).exit_code == 0
    cfg = _tiny(tiny_cfg, "methods=[lora]", "search.n_trials=1", "search.max_steps=2")
    best_yaml = cfg.out / "phase1" / "rte_lora" / "best.yaml"
    old = yaml.safe_load(best_yaml.read_text())
    new_space = ["--set", "search.spaces.lora.lr.low=0.02", "--set", "search.spaces.lora.lr.high=0.03"]
    r = CliRunner().invoke(app, ["tune", tiny, *base, *new_space])
    assert r.exit_code == 2 and "--force" in r.output  # another config in this results dir
    r = CliRunner().invoke(app, ["tune", tiny, *base, *new_space, "--force"])
    assert r.exit_code == 0, r.output
    new = yaml.safe_load(best_yaml.read_text())
    assert 0.02 <= new["hparams"]["lr"] <= 0.03 and new["study"] != old["study"]
    # the old study is kept in the storage, untouched; its best.yaml is gone, so the old config must tune again
    # (finding its study) before its best hyperparameters are used
    assert tuning.n_complete(tuning.get_study(cfg, "rte", "lora")) == 1
    assert not tuning.is_done(cfg, "rte", "lora")
    with pytest.raises(tuning.store.StoreError, match="run the tuning phase"):
        tuning.best_hparams(cfg, "rte", "lora")


def test_a_second_worker_proposes_another_point_than_a_running_trial(tiny_cfg):
    """Deterministic form of two processes on one storage: another process (same worker index, same config) has
    a trial running, proposed from the empty history; this worker, from the same history, must propose another
    point (it used to reseed from the same history with the same seed and propose the very same point)."""
    import optuna

    cfg = _tiny(tiny_cfg, "methods=[lora]", "search.n_trials=2", "search.max_steps=2")
    st = tuning.get_study(cfg, "rte", "lora")
    st.sampler = optuna.samplers.TPESampler(seed=cfg.search.seed)  # what that process seeded its first trial with
    other = st.ask()
    other.set_user_attr("host", tuning.host_id())
    other.set_user_attr("pid", os.getpid())  # alive: not an orphan
    tuning.suggest(other, cfg, "lora")
    assert tuning.run_worker(cfg, "rte", "lora", worker=0, wait=False) == 1
    trials = {t.number: t for t in tuning.get_study(cfg, "rte", "lora").get_trials(deepcopy=False)}
    mine = [t for n, t in trials.items() if n != other.number and t.state == TrialState.COMPLETE]
    assert len(mine) == 1 and mine[0].params != trials[other.number].params


def test_two_tune_processes_on_one_sqlite_storage_never_propose_the_same_point(tiny_cfg):
    """The documented multi-machine path: separate `lorastudy tune` processes (each worker 0) on one storage."""
    cfg = _tiny(tiny_cfg, "methods=[lora]", "search.n_trials=4", "search.max_steps=4")
    cmd = [sys.executable, "-m", "lorastudy.cli", "tune", str(REPO / "configs" / "tiny.yaml"), "--set",
           f"data.source={cfg.data.source}", "--set", f"output_dir={cfg.out}", "--set", "tasks=[rte]", "--set",
           "methods=[lora]", "--set", "search.n_trials=4", "--set", "search.max_steps=4"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]
    _, st = _states(cfg)
    complete = [t for t in st.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    assert len(complete) == 4
    params = [tuple(sorted(t.params.items())) for t in complete]
    assert len(set(params)) == 4, params


def test_a_study_stored_before_keyed_names_is_adopted_only_if_drawn_from_the_configs_space(tiny_cfg):
    import optuna

    cfg = _tiny(tiny_cfg, "methods=[lora]")
    other = _tiny(tiny_cfg, "methods=[lora]", "search.spaces.lora.lr.low=0.02", "search.spaces.lora.lr.high=0.03")
    storage = tuning._storage(cfg)
    for c, task in ((cfg, "rte"), (other, "mrpc")):  # one unkeyed study per task, drawn from c's space
        legacy = optuna.create_study(study_name=f"{cfg.name}-{task}_lora", storage=storage, direction="maximize")
        t = legacy.ask()
        tuning.suggest(t, c, "lora")
        legacy.tell(t, 0.5)
    assert tuning.n_complete(tuning.get_study(cfg, "rte", "lora")) == 1  # same space: the search goes on
    assert tuning.n_complete(tuning.get_study(cfg, "mrpc", "lora")) == 0  # another space: searched anew
    assert tuning.n_complete(tuning.get_study(other, "mrpc", "lora")) == 1
