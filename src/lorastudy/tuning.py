"""Phase 1: an Optuna TPE study per task x method on the validation split (the test split is never touched).

Storage is any SQLAlchemy URL (default: a SQLite file in the results dir), so several processes or machines can
work on one study. Exactly ``n_trials`` trials complete:
- a worker asks for a trial only while fewer than ``n_trials`` are complete or running;
- two workers that ask at the same moment are ordered by trial number, and a surplus trial is marked FAIL with the
  user attribute ``surplus`` (never run, never counted);
- trials left RUNNING by a killed process on this host (dead pid) or with a stale heartbeat are marked FAIL on the
  next start and replaced.
No pruning is used (every trial trains to its end or to early stopping); outputs say so.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import hashlib
import json
import os
import socket
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import yaml
from optuna.trial import TrialState

from lorastudy import store, tracking
from lorastudy.execution import (
    allow_new_work,
    clear_interrupt,
    interrupt_requested,
    new_work,
    request_interrupt,
    sigterm_as_interrupt,
    stop_new_work,
)
from lorastudy.training import HParams, train_run

PRUNING = "none"
optuna.logging.set_verbosity(optuna.logging.WARNING)  # our progress view reports trials
# optuna warns that heartbeats are meant for Study.optimize; with ask/tell we record them ourselves (run_worker)
warnings.filterwarnings("ignore", message=".*[Hh]eartbeat.*")


def storage_url(cfg) -> str:
    if cfg.search.storage:
        return cfg.search.storage
    path = (cfg.out / "phase1" / "optuna.db").resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def _storage(cfg) -> optuna.storages.RDBStorage:
    url = storage_url(cfg)
    kw: dict[str, Any] = {}
    if url.startswith("sqlite"):
        kw["engine_kwargs"] = {"connect_args": {"timeout": 120}}
    import sqlalchemy.exc

    # Machines started together on an empty database all create Optuna's tables at once and all but one fail
    # (PostgreSQL: a duplicate enum type; SQLite: a duplicate alembic_version row; optuna/optuna#1092 says to run
    # the migration first). Once the first has committed the schema a retry finds it: retry instead.
    for attempt in range(6):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeat: "experimental"
                # heartbeats are recorded by run_worker at every validation pass (ask/tell has no heartbeat
                # thread); a trial silent for grace_period seconds belongs to a dead worker, on any machine, and
                # is failed and replaced
                return optuna.storages.RDBStorage(url, heartbeat_interval=60, grace_period=1800, **kw)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError, sqlalchemy.exc.OperationalError):
            if attempt == 5:
                raise
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


def search_key(cfg, task: str, method: str) -> str:
    """A short hash of what defines a trial's sample and objective: the method's search space, the per-trial step
    cap and training subset, and the task's primary metric (the objective). Not n_trials: raising it extends a
    study. Not the storage or the data path: machines sharing one storage must agree on the name."""
    spec = cfg.task(task)
    d = {"space": cfg.search.spaces[method].model_dump(mode="json"), "max_steps": cfg.search.max_steps,
         "train_subset": cfg.search.train_subset.get(task), "objective": spec.primary}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:8]


def study_name(cfg, task: str, method: str) -> str:
    """The Optuna study of (task, method) for this config's search, keyed by ``search_key``: a stored study whose
    search space (or objective) differs is never reused; changing the config back finds the old study again.
    Why a key and not a refusal: nothing is deleted, and several machines on one storage agree on the name with
    no coordination."""
    return f"{cfg.name}-{task}_{method}-{search_key(cfg, task, method)}"


def get_study(cfg, task: str, method: str, worker: int = 0) -> optuna.Study:
    # the sampler is re-seeded before every proposal (proposal_seed); this seed only matters to code that asks
    # without run_worker
    sampler = optuna.samplers.TPESampler(seed=cfg.search.seed + 1000 * worker)
    storage = _storage(cfg)
    _adopt_unkeyed(cfg, task, method, storage)
    return optuna.create_study(study_name=study_name(cfg, task, method), storage=storage, sampler=sampler,
                               direction="maximize", load_if_exists=True)


def space_distributions(cfg, method: str) -> dict:
    """The Optuna distributions ``suggest`` draws from for ``method`` under this config (name -> distribution)."""
    probe = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    trial = probe.ask()
    suggest(trial, cfg, method)
    return dict(probe.trials[0].distributions)


_ADOPT_CHECKED: set[tuple[str, str]] = set()


def _adopt_unkeyed(cfg, task: str, method: str, storage) -> None:
    """Studies stored before names carried the search key (``<name>-<task>_<method>``) are copied to the keyed name
    when every trial was drawn from the config's search space (same distributions), so a finished or half-done
    search (e.g. one carried between machines) goes on; one drawn from another space is left alone (a new study is
    searched). Checked once per process and study."""
    new, old = study_name(cfg, task, method), f"{cfg.name}-{task}_{method}"
    key = (storage_url(cfg), new)
    if key in _ADOPT_CHECKED:
        return
    _ADOPT_CHECKED.add(key)
    names = set(optuna.get_all_study_names(storage))
    if new in names or old not in names:
        return
    want = space_distributions(cfg, method)
    trials = optuna.load_study(study_name=old, storage=storage).get_trials(deepcopy=False)
    if not trials or not all(set(t.distributions) <= set(want) and all(d == want[k] for k, d in
                                                                        t.distributions.items()) for t in trials):
        return
    with contextlib.suppress(optuna.exceptions.DuplicatedStudyError):  # another worker adopted it first
        optuna.copy_study(from_study_name=old, from_storage=storage, to_storage=storage, to_study_name=new)


def suggest(trial: optuna.Trial, cfg, method: str) -> dict[str, Any]:
    sp = cfg.search.spaces[method]
    hp = {
        "lr": trial.suggest_float("lr", sp.lr.low, sp.lr.high, log=sp.lr.log),
        "batch_size": trial.suggest_categorical("batch_size", sp.batch_size),
        "warmup_ratio": trial.suggest_float("warmup_ratio", sp.warmup_ratio.low, sp.warmup_ratio.high),
        "weight_decay": trial.suggest_float("weight_decay", sp.weight_decay.low, sp.weight_decay.high),
        "epochs": trial.suggest_int("epochs", sp.epochs.low, sp.epochs.high),
    }
    if method == "lora":
        if sp.lora_alpha is not None:
            hp["lora_alpha"] = trial.suggest_int("lora_alpha", sp.lora_alpha.low, sp.lora_alpha.high)
        if sp.lora_dropout is not None:
            hp["lora_dropout"] = trial.suggest_float("lora_dropout", sp.lora_dropout.low, sp.lora_dropout.high)
    return hp


@functools.cache
def host_id() -> str:
    """This machine, for telling whether a trial's pid can be checked here: the hostname plus the boot id, since
    fresh cloud machines often share a hostname (every lent GPU machine here is called "vm") and reuse pids."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:8]
    except OSError:  # not Linux
        boot = ""
    return f"{socket.gethostname()}:{boot}" if boot else socket.gethostname()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _mark_interrupted(study: optuna.Study, trial) -> bool:
    """A RUNNING trial whose run will never finish: FAIL, flagged ``interrupted``, so it is replaced. False when the
    trial finished meanwhile (a fused group's thread may still tell its trials while an interrupt is cleaned up)."""
    try:
        study._storage.set_trial_user_attr(trial._trial_id, "interrupted", True)
        study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
        return False
    return True


# A worker labels the trial it creates with its host and pid at once; a trial still unlabelled this long after its
# start lost its worker between the two storage calls (killed there). Optuna's stale-trial check cannot see it: it
# never had a heartbeat. Across machines the clocks may differ, hence the longer grace for other runs' trials.
UNLABELLED_GRACE_S = 5.0
UNLABELLED_GRACE_ANY_S = 300.0


def _unlabelled(study: optuna.Study, older_than_s: float, since: datetime.datetime | None = None) -> list:
    """RUNNING trials without an owner (no pid), started more than ``older_than_s`` ago (and after ``since``)."""
    now = datetime.datetime.now()
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if "pid" not in t.user_attrs and t.datetime_start is not None
            and (since is None or t.datetime_start >= since)
            and (now - t.datetime_start).total_seconds() > older_than_s]


def fail_orphans(study: optuna.Study) -> int:
    """Mark RUNNING trials whose process (on this host) is gone, or that never got an owner, as FAIL, so they are
    replaced, not counted."""
    host = host_id()
    n = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.user_attrs.get("host") == host and not _pid_alive(int(t.user_attrs.get("pid", -1))):
            n += _mark_interrupted(study, t)
    for t in _unlabelled(study, UNLABELLED_GRACE_ANY_S):
        n += _mark_interrupted(study, t)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optuna.storages.fail_stale_trials(study)  # other machines: stale heartbeat
    return n


def fail_own_running(cfg, pairs: list[tuple[str, str]], pids: set[int] | None = None,
                     since: datetime.datetime | None = None) -> int:
    """Mark the RUNNING trials of this process (and of the worker processes ``pids`` it started) as FAIL
    (``interrupted``): called when the process is stopped (its workers ended), so that a rerun, on this machine or
    another, replaces them at once instead of waiting for their heartbeat. With ``since`` (when this run started),
    also trials created since then that never got their owner's label (a worker ended between creating and
    labelling one): after ``UNLABELLED_GRACE_S``, so that another machine's trial being created now is spared."""
    host, n = host_id(), 0
    pids = {os.getpid(), *(pids or ())}
    studies = [get_study(cfg, t, m) for t, m in pairs]
    for study in studies:
        for tr in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if tr.user_attrs.get("host") == host and tr.user_attrs.get("pid") in pids:
                n += _mark_interrupted(study, tr)
    if since is not None and any(_unlabelled(st, -1.0, since) for st in studies):
        time.sleep(UNLABELLED_GRACE_S)
        for study in studies:
            for tr in _unlabelled(study, UNLABELLED_GRACE_S, since):
                n += _mark_interrupted(study, tr)
    return n


def n_complete(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


# Flags of FAIL trials that say nothing about the search (never trained, or stopped from outside): not "finished"
NOT_FINISHED_FLAGS = ("interrupted", "surplus", "duplicate")
MAX_DUPLICATE_RETRIES = 20  # a space too small to avoid repeats (categorical only) still gets its trials


def proposal_seed(cfg, study: optuna.Study, trial, retries: int = 0) -> int:
    """The TPE seed for ``trial``'s proposal: from the search seed, the number of finished trials (complete, or
    failed by training: diverged), and the trial's rank among the RUNNING ones (by trial number).

    Why: the proposal then depends only on the history, so an interrupted and resumed search (one worker: rank 0)
    proposes what an uninterrupted one would have; and concurrent workers, in any process on any machine (every
    one of which used to seed from the same history, so all proposed the same point), get distinct ranks, since
    trial numbers are unique in the storage: two trials proposed from one history never share a seed."""
    finished = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL))
                if not any(t.user_attrs.get(f) for f in NOT_FINISHED_FLAGS)]
    running = sorted(t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
    rank = running.index(trial.number) if trial.number in running else 0
    if rank == 0 and retries == 0:
        return cfg.search.seed + len(finished)
    return int(np.random.SeedSequence([cfg.search.seed, len(finished), rank, retries]).generate_state(1)[0])


def _duplicate(study: optuna.Study, trial) -> bool:
    """Whether ``trial``'s parameters equal those of a complete or running trial."""
    mine = trial.params
    return any(t.number != trial.number and t.params == mine
               for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING)))


def _ask_trial(study: optuna.Study, cfg, method: str, worker: int):
    """The next trial of ``study`` for this worker, labelled with this host and pid, with its hyperparameter
    overrides: ``(trial, hp_overrides)``, or None while ``n_trials`` trials are complete or running. A trial
    created by a race between workers beyond the first ``n_trials`` is marked ``surplus`` and never runs. None,
    asking nothing, once an interrupt's clean-up has begun (``execution.stop_new_work``).

    Why not Optuna's MaxTrialsCallback: it stops ``Study.optimize`` once n trials are complete, but parallel workers
    (and fused groups asking for many trials at once) would overshoot; this count at ask time keeps it exact. Nor
    RetryFailedTrialCallback: it re-enqueues a failed trial's parameters, which the reseeded sampler below proposes
    again anyway with one worker; heartbeats (``fail_stale_trials``) are Optuna's own."""
    with new_work() as allowed:  # (an interrupt's clean-up waits for an ask in progress: see there)
        return _ask_trial_locked(study, cfg, method) if allowed else None


def _ask_trial_locked(study: optuna.Study, cfg, method: str):
    target = cfg.search.n_trials
    retries = 0
    live_states = (TrialState.COMPLETE, TrialState.RUNNING)
    while n_complete(study) < target:
        live = len(study.get_trials(deepcopy=False, states=live_states))
        if live >= target:
            return None
        trial = study.ask()
        trial.set_user_attr("host", host_id())  # label at once: an unlabelled trial is only freed after a grace
        trial.set_user_attr("pid", os.getpid())
        first = sorted(t.number for t in study.get_trials(deepcopy=False, states=live_states))[:target]
        if trial.number not in first:
            trial.set_user_attr("surplus", True)
            study.tell(trial, state=TrialState.FAIL)
            continue
        # TPE samples at suggest time, so seeding here (after ask: the trial's number is known) decides the proposal
        study.sampler = optuna.samplers.TPESampler(seed=proposal_seed(cfg, study, trial, retries))
        hp_over = suggest(trial, cfg, method)
        if retries < MAX_DUPLICATE_RETRIES and _duplicate(study, trial):
            # safety net behind the seeding: never train a point that another trial has or is training
            trial.set_user_attr("duplicate", True)
            study.tell(trial, state=TrialState.FAIL)
            retries += 1
            continue
        retries = 0
        if cfg.search.max_steps:
            hp_over["max_steps"] = cfg.search.max_steps
        return trial, hp_over
    return None


def _heartbeat(study: optuna.Study, trial) -> functools.partial:
    beat = functools.partial(study._storage.record_heartbeat, trial._trial_id)
    beat()
    return beat


def _tell_trial(cfg, task: str, method: str, study: optuna.Study, trial, m: dict, t0: float) -> float:
    """Record a finished trial (validation loss and metrics, steps, times, memory as user attributes), tell Optuna
    its validation score on the task's primary metric (maximized) and track it (``tracking.backend``); returns the
    score."""
    objective = cfg.task(task).primary
    val = m["validation"]
    for k, v in val.items():  # loss and the task's declared metrics
        trial.set_user_attr(f"val_{k}", v)
    trial.set_user_attr("best_step", m["best_step"])
    trial.set_user_attr("steps", m["steps"])
    trial.set_user_attr("train_time_s", m["train_time_s"])
    trial.set_user_attr("peak_memory_bytes", m["peak_memory_bytes"])
    trial.set_user_attr("step_mode", m["step_mode"])  # fused-* when the trial trained in a fused group
    trial.set_user_attr("seconds", time.perf_counter() - t0)
    study.tell(trial, val[objective])
    tracking.log_trial(cfg, task, method, trial.number, m)  # after the trial is stored; never raises
    return val[objective]


def _fail_trial(cfg, task: str, method: str, study: optuna.Study, trial, e: BaseException) -> None:
    """A failed trial (diverged, OOM) is recorded with its error (and tracked) and replaced."""
    trial.set_user_attr("error", f"{type(e).__name__}: {e}")
    study.tell(trial, state=TrialState.FAIL)
    tracking.log_trial(cfg, task, method, trial.number, hparams=trial.params, error=f"{type(e).__name__}: {e}")


def run_worker(cfg, task: str, method: str, worker: int = 0, on_trial=None, stop=None, wait: bool = True,
               ctx=None) -> int:
    """Work on one study until ``n_trials`` trials are complete. Returns trials this worker completed.

    ``wait=False``: return as soon as the missing trials are all running elsewhere (the worker can then help
    another study) instead of waiting for them in case one fails. ``ctx``: where runs train
    (``execution.Context``)."""
    study = get_study(cfg, task, method, worker)
    fail_orphans(study)
    target = cfg.search.n_trials
    done_here = 0
    while n_complete(study) < target:
        if stop is not None and stop():
            break
        if interrupt_requested():  # a signal came while a trial trained, which then finished (or had just ended)
            raise KeyboardInterrupt("tune worker: interrupted between trials")  # neither ask nor wait for another
        got = _ask_trial(study, cfg, method, worker)
        if got is None:
            if not wait:
                break
            time.sleep(1.0)  # the rest are running elsewhere; wait in case one fails
            fail_orphans(study)
            continue
        trial, hp_over = got
        t0 = time.perf_counter()
        beat = _heartbeat(study, trial)
        try:
            hp = HParams.from_config(cfg, method, hp_over)
            m = train_run(cfg, task, method, cfg.search.seed, hp, train_subset=cfg.search.train_subset.get(task),
                          evaluate_test=False, on_eval=lambda *_, beat=beat: beat(), ctx=ctx)
        except Exception as e:  # a failed trial (diverged, OOM) is recorded and replaced
            _fail_trial(cfg, task, method, study, trial, e)
            continue
        acc = _tell_trial(cfg, task, method, study, trial, m, t0)
        done_here += 1
        if on_trial is not None:
            on_trial(task, method, trial.number, acc)
    return done_here


class TrialSource:
    """Trials of the studies ``pairs`` (one method), round robin over them, as jobs of a fused group
    (fused.RunJob): a freed slot takes the next trial (continuous batching). Optuna sees ordinary trials: asked
    and labelled as by ``run_worker``, a heartbeat at every evaluation, told the validation accuracy or failed with
    the error. ``next()`` gives None once every study has all its missing trials complete or running."""

    def __init__(self, cfg, pairs: list[tuple[str, str]], worker: int = 0, stop=None, on_trial=None,
                 ctx=None) -> None:
        self.cfg, self.pairs, self.worker, self.stop, self.on_trial = cfg, list(pairs), worker, stop, on_trial
        self.studies = {p: get_study(cfg, *p, worker) for p in self.pairs}
        for st in self.studies.values():
            fail_orphans(st)
        self.k = 0
        self.idle_until = 0.0

    # while every study is full, the group asks again at most this often (a query per step would slow its steps)
    RECHECK_S = 5.0

    def next(self):
        from lorastudy.fused import RunJob

        if (self.stop is not None and self.stop()) or time.monotonic() < self.idle_until:
            return None
        for _ in range(len(self.pairs)):
            task, method = self.pairs[self.k % len(self.pairs)]
            self.k += 1
            study = self.studies[(task, method)]
            got = _ask_trial(study, self.cfg, method, self.worker)
            if got is None:
                continue
            trial, hp_over = got
            t0 = time.perf_counter()
            beat = _heartbeat(study, trial)
            try:
                hp = HParams.from_config(self.cfg, method, hp_over)
            except ValueError as e:
                _fail_trial(self.cfg, task, method, study, trial, e)
                continue

            def done(m, study=study, trial=trial, t0=t0, task=task, method=method):
                acc = _tell_trial(self.cfg, task, method, study, trial, m, t0)
                if self.on_trial is not None:
                    self.on_trial(task, method, trial.number, acc)

            return RunJob(f"{task}/{method} trial {trial.number}", task, method, self.cfg.search.seed, hp,
                          train_subset=self.cfg.search.train_subset.get(task), evaluate_test=False,
                          on_eval=lambda *_, beat=beat: beat(), on_done=done,
                          on_fail=lambda e, study=study, trial=trial, task=task, method=method:
                          _fail_trial(self.cfg, task, method, study, trial, e))
        self.idle_until = time.monotonic() + self.RECHECK_S
        return None


def trial_record(t: optuna.trial.FrozenTrial) -> dict:
    """One trial as plain data: number, state, value, params, start/end (ISO), duration and every user attribute
    (``user_attrs``: metrics, steps, error, interrupted/surplus flags, host and pid)."""
    start, end = t.datetime_start, t.datetime_complete
    return {"number": t.number, "state": t.state.name, "value": t.value, "params": t.params,
            "start": str(start), "end": str(end),
            "duration_s": (end - start).total_seconds() if start and end else None, "user_attrs": t.user_attrs}


def export(cfg, task: str, method: str) -> dict:
    """Trials table (CSV + JSON), best.yaml (+ analysis/<task>_<method>_optimal.yaml), plots."""
    study = get_study(cfg, task, method)
    out = cfg.out / "phase1" / f"{task}_{method}"
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get("surplus"):
            continue
        r = trial_record(t)
        ua = r.pop("user_attrs")
        del r["start"], r["end"]
        rows.append({**r, **{k: v for k, v in ua.items() if k not in ("host", "pid")}})
    store.atomic_write_json(out / "trials.json", {"study": study.study_name, "pruning": PRUNING, "trials": rows})
    # the CSV is Optuna's own table (params_*, user_attrs_*), without surplus trials and the owner labels
    flat = study.trials_dataframe()
    if "user_attrs_surplus" in flat:
        flat = flat[flat["user_attrs_surplus"].isna()]
    flat = flat.drop(columns=[c for c in ("user_attrs_host", "user_attrs_pid", "user_attrs_surplus") if c in flat])
    store.atomic_write_text(out / "trials.csv", flat.to_csv(index=False))
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    res = {"task": task, "method": method, "n_complete": len(complete), "n_trials_target": cfg.search.n_trials,
           "pruning": PRUNING, "study": study.study_name}
    if complete:
        best = max(complete, key=lambda t: (t.value, -t.number))
        hp = dict(best.params)
        objective = cfg.task(task).primary
        val_metrics = {k[4:]: v for k, v in best.user_attrs.items() if k.startswith("val_") and k != "val_loss"}
        best_doc = {"task": task, "method": method, "study": study.study_name,
                    "objective": f"validation {objective} (best checkpoint by val loss)",
                    "value": best.value, "trial": best.number, "val_metrics": val_metrics,
                    "seed": cfg.search.seed, "train_subset": cfg.search.train_subset.get(task),
                    "pruning": PRUNING, "hparams": hp}
        text = yaml.safe_dump(best_doc, sort_keys=False)
        store.atomic_write_text(out / "best.yaml", text)
        store.atomic_write_text(cfg.out / "analysis" / f"{task}_{method}_optimal.yaml", text)
        res.update(objective=objective, best_value=best.value, best_trial=best.number, best_hparams=hp,
                   best_val_metrics=val_metrics, best_val_f1=val_metrics.get("f1"))
        _plots(study, out)
    return res


def _plots(study: optuna.Study, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import warnings

    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna marks its matplotlib backend experimental
        ax = ovm.plot_optimization_history(study)
        ax.figure.savefig(out / "optimization_history.png", dpi=150, bbox_inches="tight")
        plt.close(ax.figure)
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        values = {t.value for t in complete}
        if len(complete) >= 2 and len(values) > 1:
            try:
                ax = ovm.plot_param_importances(study)
                ax.figure.savefig(out / "param_importances.png", dpi=150, bbox_inches="tight")
                plt.close(ax.figure)
            except (RuntimeError, ValueError, ZeroDivisionError):
                pass  # importance undefined (e.g. constant objective); the history plot still stands


def _best_doc(cfg, task: str, method: str) -> dict | None:
    """best.yaml of (task, method), or None when missing; StoreError when it belongs to another search (its
    study's space or objective differs from the config's: tuning must run again before it is used)."""
    p = cfg.out / "phase1" / f"{task}_{method}" / "best.yaml"
    if not p.is_file():
        return None
    try:
        doc = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise store.StoreError(f"{p}: corrupted YAML ({e}); delete it and run `lorastudy tune` again") from e
    want = study_name(cfg, task, method)
    if doc.get("study", want) != want:  # (best.yaml files written before studies were keyed carry no study name)
        raise store.StoreError(
            f"{p} is the best of study {doc['study']!r}, searched over another space or objective than the "
            f"config's (study {want!r}); run the tuning phase first (`lorastudy tune CONFIG` or `lorastudy run "
            "CONFIG --only tune`)")
    return doc


def best_hparams(cfg, task: str, method: str) -> dict | None:
    doc = _best_doc(cfg, task, method)
    return None if doc is None else doc.get("hparams")


def is_done(cfg, task: str, method: str) -> bool:
    try:
        if _best_doc(cfg, task, method) is None:
            return False
    except store.StoreError:  # the best of another search: tune this one
        return False
    try:
        return n_complete(get_study(cfg, task, method)) >= cfg.search.n_trials
    except Exception:
        return False


def _tune_unit(arg, ctx):
    """One worker loop over all unfinished studies: it starts at its own study (worker k at study k mod S), helps
    the others when its study has every missing trial running, then waits on each until it is complete."""
    cfg, pairs, worker, stop, on_trial = arg
    order = pairs[worker % len(pairs):] + pairs[: worker % len(pairs)]
    done = 0
    for wait in (False, True):
        for t, m in order:
            done += run_worker(cfg, t, m, worker, on_trial=on_trial, stop=stop, wait=wait, ctx=ctx)
    return done


def tune(cfg, tasks: list[str] | None = None, methods: list[str] | None = None, workers: int = 1,
         progress=None, stop=None, streams: int = 1) -> dict:
    """Run (or finish) the studies with ``workers`` processes x ``streams`` threads each, then export every
    study."""

    pairs = [(t, m) for t in (tasks or cfg.tasks) for m in (methods or cfg.methods)]
    todo = [(t, m) for t, m in pairs if not is_done(cfg, t, m)]
    missing = sum(max(0, cfg.search.n_trials - n_complete(get_study(cfg, t, m))) for t, m in todo)
    if progress is not None:
        progress.set_total(missing)
    failures: list[dict] = []
    workers_pids: set[int] = set()  # worker processes started (their trials are ours to free on an interrupt)
    started = datetime.datetime.now()
    allow_new_work()  # (a stale stop or request of an earlier, interrupted command in this process)
    clear_interrupt()
    try:
        with sigterm_as_interrupt():
            _tune_todo(cfg, todo, workers, streams, progress, stop, failures, workers_pids.add)
    except KeyboardInterrupt:
        # the pool has ended the worker processes; their trials and this process's threads' are freed, after this
        # process's own threads (a fused group's) can no longer ask for a new one
        request_interrupt()  # this process's fused groups stop at their next step (sigterm_as_interrupt cleared it)
        stop_new_work()
        n = fail_own_running(cfg, todo, workers_pids, since=started)
        print(f"tune: interrupted; {n} running trial(s) marked failed, to be replaced on the next run", flush=True)
        raise
    summary = [export(cfg, t, m) for t, m in pairs]
    _write_summary(cfg, summary, failures)
    return {"studies": summary, "failures": failures}


def _trial_logger(progress):
    if progress is None:
        return None
    return lambda task, method, number, acc: progress.advance_rows(
        1, f"{task}/{method} trial {number}: objective (validation) {acc:.4f}")


def _tune_todo(cfg, todo, workers: int, streams: int, progress, stop, failures: list, on_start) -> None:
    from lorastudy import execution
    from lorastudy.execution import run_units

    if todo and execution.fuse_enabled(cfg):
        # fused groups (fused.py): one per method in each worker process, a freed slot takes the next trial
        here = workers <= 1 and execution.visible_gpus() <= 1
        done = threading.Event()
        if progress is not None and not here:
            threading.Thread(target=_follow_trials, args=(cfg, todo, progress, done), daemon=True).start()
        try:
            for r in execution.tune_fused(cfg, todo, workers=workers, stop=stop, on_start=on_start,
                                          on_trial=_trial_logger(progress) if here else None,
                                          log=getattr(progress, "print", print) if progress is not None else print):
                if not r.ok:
                    failures.append({"unit": r.name, "error": r.error})
        finally:
            done.set()
    elif workers <= 1 and streams <= 1:
        for t, m in todo:
            if stop is not None and stop():
                break
            if progress is not None:
                progress.start(f"{t}/{m}")
            run_worker(cfg, t, m, 0, on_trial=_trial_logger(progress), stop=stop)
            if progress is not None:
                progress.end(f"{t}/{m}")
    elif todo:
        # workers x streams loops at once; each moves on to other studies when its own needs no more hands, so
        # no slot idles while any study has trials left to start
        here = streams > 1 and workers <= 1  # threads of this process: the stop check and progress can be shared
        advance = _trial_logger(progress) if here else None
        units = [(f"worker{w}", (cfg, todo, w, stop if here else None, advance)) for w in range(workers * streams)]
        done = threading.Event()
        if progress is not None and not here:  # trials finish in other processes: follow them in the database
            threading.Thread(target=_follow_trials, args=(cfg, todo, progress, done), daemon=True).start()
        try:
            for r in run_units(units, _tune_unit, workers, progress=None, stop=stop, streams=streams,
                               on_start=on_start):
                if not r.ok:
                    failures.append({"unit": r.name, "error": r.error})
        finally:
            done.set()


def _follow_trials(cfg, todo, progress, done: threading.Event, every_s: float = 5.0) -> None:
    """Advance ``progress`` as the studies' complete-trial counts grow (trials run in worker processes)."""
    def count() -> dict:
        return {(t, m): n_complete(get_study(cfg, t, m)) for t, m in todo}

    seen = count()
    while not done.wait(every_s):
        try:
            now = count()
        except Exception:  # a busy database: try again at the next tick
            continue
        for key, n in now.items():
            if n > seen[key]:
                progress.advance_rows(n - seen[key], f"{key[0]}/{key[1]}: {n}/{cfg.search.n_trials} trials complete")
        seen = now


def _write_summary(cfg, summary: list[dict], failures: list[dict]) -> None:
    import pandas as pd

    out = cfg.out / "phase1"
    store.atomic_write_json(out / "summary.json", {"pruning": PRUNING, "studies": summary, "failures": failures})
    rows = [{"task": s["task"], "method": s["method"], "complete": s["n_complete"], "target": s["n_trials_target"],
             "objective": s.get("objective"), "best_value": s.get("best_value"),
             **{f"best_val_{k}": v for k, v in (s.get("best_val_metrics") or {}).items()},
             "best_trial": s.get("best_trial"), **{f"best_{k}": v for k, v in (s.get("best_hparams") or {}).items()}}
            for s in summary]
    store.atomic_write_text(out / "summary.csv", pd.DataFrame(rows).to_csv(index=False))
