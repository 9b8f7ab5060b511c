"""Experiment tracking: every tuning trial and phase-2 run as a tracked run of MLflow or Weights & Biases.

Off by default (``tracking.backend: none``). Backends are a registry (``register_backend``); each receives plain
``RunRecord``s built from what lorastudy already records (a trial's metrics, a run directory's ``metrics.json``), so
tracking never reaches into training. The libraries' own APIs do the logging (``MlflowClient.log_batch`` /
``log_artifacts``, ``wandb.init`` / ``run.log`` / ``wandb.Artifact``).

- MLflow: by default a local SQLite store and artifact folder under ``<output_dir>/tracking`` (no server; browse with
  ``mlflow ui --backend-store-uri sqlite:///<output_dir>/tracking/mlflow.db``). Experiment = the study; a parent run
  for the study, one per phase under it (``mlflow.parentRunId``), each trial and production run under its phase.
- W&B: offline by default, runs under ``<output_dir>/tracking/wandb`` (``wandb sync`` uploads them later). W&B has no
  nested runs: project = the study, group = the study, job type = the phase.

A tracking failure never loses results: the hooks run after a trial is stored or a run directory is written, catch
every error, say so once per process and append it to ``<output_dir>/tracking/errors.log``.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import re
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# what one evaluation point of a run's curve holds (training.train_run's ``curve``)
CURVE_KEYS = ("train_loss", "val_loss", "val_accuracy", "val_f1", "lr", "epoch")
# scalars of a run's metrics that are logged as final metrics (when present)
FINAL_KEYS = ("best_step", "steps", "train_time_s", "wall_time_s", "peak_memory_bytes", "tokens_per_s",
              "trainable_params", "total_params", "n_train", "n_validation", "n_test", "majority_accuracy")
PHASES = {"tune": "phase1", "train": "phase2"}


@dataclass
class RunRecord:
    """One tracked run, backend-neutral.

    ``phase``: ``tune`` (a phase-1 trial) or ``train`` (a phase-2 run); ``name`` e.g. ``rte/lora/trial3``;
    ``status``: ``FINISHED`` or ``FAILED``; ``params``: flat hyperparameters, task, method, seed (and trial);
    ``config``: the resolved study config; ``curve``: one dict per validation pass (``step`` plus ``CURVE_KEYS``);
    ``metrics``: final scalars (validation at the best checkpoint, test, wall time in s, peak memory in bytes);
    ``tags``: strings (code version, device, ...); ``artifacts``: name -> file or directory to upload."""

    phase: str
    name: str
    status: str
    params: dict[str, Any]
    config: dict[str, Any]
    curve: list[dict[str, float]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    artifacts: dict[str, Path] = field(default_factory=dict)
    wall_time_s: float | None = None


class Backend:
    """A tracking service. Subclasses log a ``RunRecord`` and a study's artifacts; calls are serialized per process.

    ``requires``: the module that must be importable (checked when the config is loaded)."""

    requires: str | None = None

    def __init__(self, cfg) -> None:
        self.cfg = cfg

    def log_run(self, rec: RunRecord) -> None:
        raise NotImplementedError

    def log_study(self, artifacts: dict[str, Path]) -> None:
        raise NotImplementedError


BACKENDS: dict[str, type[Backend]] = {}


def register_backend(name: str) -> Callable[[type[Backend]], type[Backend]]:
    """Class decorator: make a ``Backend`` subclass selectable as ``tracking.backend: <name>``."""

    def deco(cls: type[Backend]) -> type[Backend]:
        BACKENDS[name] = cls
        return cls

    return deco


def check_backend(name: str) -> None:
    """Raise ``ValueError`` (shown as a config error on ``tracking.backend``) for an unknown backend or one whose
    package is not installed."""
    if name not in BACKENDS:
        raise ValueError(f"unknown tracking backend {name!r}; known: {sorted(BACKENDS)}")
    mod = BACKENDS[name].requires
    if mod and importlib.util.find_spec(mod) is None:
        raise ValueError(f"tracking backend {name!r} needs the {mod} package: pip install 'lorastudy[tracking]'")


def tracking_dir(cfg) -> Path:
    """``<output_dir>/tracking``: the local MLflow store and artifacts, W&B's offline runs, errors.log."""
    return (cfg.out / "tracking").resolve()


def default_mlflow_uri(cfg) -> str:
    return f"sqlite:///{tracking_dir(cfg) / 'mlflow.db'}"


@register_backend("none")
class NoBackend(Backend):
    def log_run(self, rec: RunRecord) -> None:
        pass

    def log_study(self, artifacts: dict[str, Path]) -> None:
        pass


# -- MLflow ----------------------------------------------------------------------------------------------------------
@register_backend("mlflow")
class MlflowBackend(Backend):
    """MLflow through ``MlflowClient`` (explicit run ids: no global active run, safe beside other threads)."""

    requires = "mlflow"

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        from filelock import FileLock
        from mlflow import MlflowClient

        self.dir = tracking_dir(cfg)
        self.dir.mkdir(parents=True, exist_ok=True)
        # a tracking server chooses where artifacts go; a database store used directly (sqlite, postgresql, ...)
        # would put them under ./mlruns of whatever directory lorastudy runs in: keep them beside the results
        self.server = (cfg.tracking.mlflow_uri or "").startswith(("http://", "https://", "databricks"))
        # a 60 s busy timeout: worker processes write to one SQLite file at once (sqlite3's default is 5 s)
        self.uri = cfg.tracking.mlflow_uri or default_mlflow_uri(cfg) + "?timeout=60"
        self.client = MlflowClient(tracking_uri=self.uri)
        # one lock across this machine's processes: the first creates the tables, the experiment and the parent
        # runs; the others find them (their ids are kept in parents.json beside)
        self.lock = FileLock(str(self.dir / ".lock"))
        with self.lock:
            name = cfg.tracking.experiment or cfg.name
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                art = None if self.server else (self.dir / "mlartifacts").as_uri()
                self.experiment_id = self.client.create_experiment(name, artifact_location=art)
            else:
                self.experiment_id = exp.experiment_id
        self.study_run = self._parent("study", None)

    def _parent(self, key: str, parent: str | None) -> str:
        """The id of the parent run ``key`` (the study, or a phase under it), created once."""
        with self.lock:
            path = self.dir / "parents.json"
            ids = json.loads(path.read_text()) if path.is_file() else {}
            slot = f"{self.uri}|{self.experiment_id}|{key}"
            if slot in ids:
                try:
                    if self.client.get_run(ids[slot]).info.lifecycle_stage == "active":
                        return ids[slot]
                except Exception:  # deleted from the store: make a new one
                    pass
            tags = {"lorastudy.kind": "study" if parent is None else "phase", "lorastudy.study": self.cfg.name,
                    "lorastudy.config_hash": self.cfg.hash(), **_code_tags()}
            if parent is not None:
                tags.update({"mlflow.parentRunId": parent, "lorastudy.phase": key})
            run = self.client.create_run(self.experiment_id, tags=tags,
                                         run_name=self.cfg.name if parent is None else key)
            self.client.set_terminated(run.info.run_id)  # a container: children may still be added
            ids[slot] = run.info.run_id
            from lorastudy.store import atomic_write_json

            atomic_write_json(path, ids)
            return run.info.run_id

    def log_run(self, rec: RunRecord) -> None:
        from mlflow.entities import Metric, Param

        parent = self._parent(PHASES[rec.phase], self.study_run)
        end = int(time.time() * 1000)
        start = end - int(1000 * (rec.wall_time_s or 0.0))
        tags = {**rec.tags, "mlflow.parentRunId": parent, "lorastudy.phase": PHASES[rec.phase]}
        run = self.client.create_run(self.experiment_id, start_time=start, tags=tags, run_name=rec.name)
        rid = run.info.run_id
        metrics = [Metric(k, float(p[k]), end, int(p["step"])) for p in rec.curve for k in CURVE_KEYS if k in p]
        metrics += [Metric(k, float(v), end, 0) for k, v in rec.metrics.items()]
        params = [Param(k, str(v)) for k, v in rec.params.items()]
        self.client.log_batch(rid, metrics=metrics, params=params)  # the client splits it into allowed sizes
        self.client.log_dict(rid, rec.config, "config.yaml")
        for name, path in rec.artifacts.items():
            if path.is_dir():
                self.client.log_artifacts(rid, str(path), name)
            else:
                self.client.log_artifact(rid, str(path))
        self.client.set_terminated(rid, status=rec.status, end_time=end)

    def log_study(self, artifacts: dict[str, Path]) -> None:
        for name, path in artifacts.items():
            if path.is_dir():
                self.client.log_artifacts(self.study_run, str(path), name)
            else:
                self.client.log_artifact(self.study_run, str(path))


# -- Weights & Biases ------------------------------------------------------------------------------------------------
@register_backend("wandb")
class WandbBackend(Backend):
    """W&B runs, offline by default (``wandb sync <output_dir>/tracking/wandb/offline-run-*`` uploads them)."""

    requires = "wandb"

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        import wandb

        self.wandb = wandb
        self.dir = tracking_dir(cfg)
        self.dir.mkdir(parents=True, exist_ok=True)

    def _init(self, name: str, job_type: str, config: dict, tags: list[str]):
        t = self.cfg.tracking
        return self.wandb.init(
            project=t.experiment or self.cfg.name, entity=t.wandb_entity, group=self.cfg.name, job_type=job_type,
            name=name, config=config, tags=tags, dir=str(self.dir), mode=t.wandb_mode,
            reinit="create_new",  # several runs per process (one per trial)
            settings=self.wandb.Settings(console="off", x_disable_stats=True, silent=True),
        )

    def _artifact(self, name: str, kind: str, path: Path, metadata: dict | None = None):
        art = self.wandb.Artifact(re.sub(r"[^A-Za-z0-9_.-]+", "-", name), type=kind, metadata=metadata)
        # immutable: referenced in place (run directories never change once complete) instead of copied into
        # W&B's staging folder in the home directory; `wandb sync` reads them from the results dir
        if path.is_dir():
            art.add_dir(str(path), policy="immutable")
        else:
            art.add_file(str(path), policy="immutable")
        return art

    def log_run(self, rec: RunRecord) -> None:
        config = {**rec.params, "phase": PHASES[rec.phase], "study": self.cfg.name, "tags": rec.tags,
                  "config": rec.config}
        labels = [PHASES[rec.phase], *(str(rec.params[k]) for k in ("task", "method") if k in rec.params)]
        run = self._init(rec.name, PHASES[rec.phase], config, labels)
        try:
            for p in rec.curve:
                run.log({k: p[k] for k in CURVE_KEYS if k in p}, step=int(p["step"]))
            run.summary.update({**rec.metrics, "status": rec.status})
            for name, path in rec.artifacts.items():
                kind = "model" if name in ("adapter", "model", "base_model") else "run-files"
                run.log_artifact(self._artifact(f"{rec.name}-{name}", kind, path, {"run": rec.name, **rec.params}))
        finally:
            run.finish(exit_code=0 if rec.status == "FINISHED" else 1)

    def log_study(self, artifacts: dict[str, Path]) -> None:
        run = self._init(f"{self.cfg.name}-study", "study", {"study": self.cfg.name, "config_hash": self.cfg.hash()},
                         ["study"])
        try:
            for name, path in artifacts.items():
                run.log_artifact(self._artifact(f"{self.cfg.name}-{name}", "results", path))
        finally:
            run.finish()


# -- the hooks -------------------------------------------------------------------------------------------------------
_LOCK = threading.RLock()  # one tracking call at a time per process (runs of --streams share the process)
_INSTANCES: dict[tuple, Backend] = {}
_WARNED: set[str] = set()


def _backend(cfg) -> Backend:
    key = (cfg.tracking.backend, str(tracking_dir(cfg)), cfg.tracking.model_dump_json())
    if key not in _INSTANCES:
        _INSTANCES[key] = BACKENDS[cfg.tracking.backend](cfg)
    return _INSTANCES[key]


@contextmanager
def _guard(cfg, what: str) -> Iterator[None]:
    """Run a tracking call; any error is reported (once per process and backend) and swallowed."""
    try:
        with _LOCK:
            yield
    except Exception as e:  # noqa: BLE001 - tracking must never fail a run whose results are already stored
        msg = f"{type(e).__name__}: {e}"
        try:
            d = tracking_dir(cfg)
            d.mkdir(parents=True, exist_ok=True)
            with open(d / "errors.log", "a") as f:
                f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {cfg.tracking.backend} {what}: {msg}\n"
                        f"{traceback.format_exc(limit=4)}\n")
        except OSError:
            pass
        if cfg.tracking.backend not in _WARNED:
            _WARNED.add(cfg.tracking.backend)
            log.warning("tracking (%s) failed for %s: %s. Results are unaffected (every run directory and trial "
                        "is stored); further tracking errors of this process go only to %s", cfg.tracking.backend,
                        what, msg, tracking_dir(cfg) / "errors.log")


@functools.cache
def _code_version() -> dict[str, str]:
    from lorastudy.store import code_version

    return code_version()


def _code_tags(code: dict[str, str] | None = None) -> dict[str, str]:
    code = code if code is not None else _code_version()
    tags = {"lorastudy.version": str(code.get("package", ""))}
    if "git_commit" in code:
        tags["mlflow.source.git.commit"] = code["git_commit"]  # MLflow's own tag: shown in its UI
        tags["lorastudy.git_commit"] = code["git_commit"]
        tags["lorastudy.git_dirty"] = str(code.get("git_dirty", ""))
    return tags


def _record(cfg, phase: str, name: str, metrics: dict[str, Any] | None, params: dict[str, Any],
            code: dict[str, str] | None = None) -> RunRecord:
    """A RunRecord from a run's metrics (training.train_run's dict / metrics.json); ``None``: a failed run."""
    m = metrics or {}
    final: dict[str, float] = {f"best_val_{k}": v for k, v in (m.get("validation") or {}).items()}
    final.update({f"test_{k}": v for k, v in (m.get("test") or {}).items()})
    final.update({k: m[k] for k in FINAL_KEYS if isinstance(m.get(k), int | float)})
    if "collapsed" in m:
        final["collapsed"] = float(bool(m["collapsed"]))
    tags = {**_code_tags(code), "lorastudy.kind": "trial" if phase == "tune" else "run", "lorastudy.study": cfg.name,
            "lorastudy.config_hash": cfg.hash()}
    tags.update({f"lorastudy.{k}": str(m[k]) for k in ("device", "precision", "step_mode", "peak_memory_scope")
                 if k in m})
    suggested = params.pop("hparams", None) or {}
    hp = m.get("hparams") or suggested  # a failed run has only what was asked for
    params = {**params, **hp, "model_source": cfg.model.source, "config_hash": cfg.hash()}
    return RunRecord(phase, name, "FINISHED" if metrics is not None else "FAILED", params, cfg.resolved(),
                     curve=list(m.get("curve") or []), metrics=final, tags=tags, wall_time_s=m.get("wall_time_s"))


def enabled(cfg) -> bool:
    return cfg.tracking.backend != "none"


def log_trial(cfg, task: str, method: str, number: int, metrics: dict[str, Any] | None = None, *,
              hparams: dict[str, Any] | None = None, error: str | None = None) -> None:
    """Log phase-1 trial ``number`` of ``task``/``method``: ``metrics`` as returned by ``training.train_run``
    (hyperparameters, curve, validation metrics, wall time, peak memory), or ``None`` with the suggested
    ``hparams`` and the ``error`` of a failed trial. Never raises."""
    if not enabled(cfg):
        return
    with _guard(cfg, f"trial {task}/{method}/{number}"):
        params: dict[str, Any] = {"task": task, "method": method, "seed": cfg.search.seed, "trial": number,
                                  "hparams": dict(hparams or {})}
        rec = _record(cfg, "tune", f"{task}/{method}/trial{number}", metrics, params)
        if error:
            rec.tags["lorastudy.error"] = error[:5000]
        _backend(cfg).log_run(rec)


def log_run_dir(cfg, task: str, method: str, seed: int) -> None:
    """Log phase-2 run ``task``/``method``/``seed`` from its run directory: ``metrics.json`` (curve, validation and
    test metrics, wall time, peak memory), ``config.yaml``, ``code_version.json``, and as artifacts the LoRA adapter
    (always; with the tiny model's ``base_model``) or the full model (``tracking.log_full_models``). A failed run
    (``FAILED.json`` beside) is logged as failed, an interrupted one (neither) not at all. Never raises."""
    if not enabled(cfg):
        return
    from lorastudy import store

    rd = store.run_dir(cfg.out, task, method, seed)
    with _guard(cfg, f"run {task}/{method}/seed{seed}"):
        params = {"task": task, "method": method, "seed": seed}
        name = f"{task}/{method}/seed{seed}"
        if store.is_complete(rd):
            m = store.read_json(rd / "metrics.json")
            code = store.read_json(rd / "code_version.json") if (rd / "code_version.json").is_file() else None
            rec = _record(cfg, "train", name, m, params, code)
            rec.artifacts = {n: rd / n for n in ("metrics.json", "config.yaml", "code_version.json")
                             if (rd / n).is_file()}
            models = ["adapter", "base_model"] if method == "lora" else (["model"] if cfg.tracking.log_full_models
                                                                         else [])
            rec.artifacts.update({n: rd / n for n in models if (rd / n).is_dir()})
        else:
            failed = store.failed_marker(rd)
            if not failed.is_file():
                return  # interrupted: nothing was stored, nothing to log
            info = store.read_json(failed)
            rec = _record(cfg, "train", name, None, {**params, "hparams": info.get("hparams") or {}})
            rec.tags["lorastudy.error"] = str(info.get("error", "no run directory"))[:5000]
        _backend(cfg).log_run(rec)


def study_artifacts(cfg) -> dict[str, Path]:
    """The study-level results that exist: drift analysis, serving benchmark, report, config and run summary."""
    out = cfg.out
    cand = {"drift": out / "phase4" / "drift", "serving": out / "phase4" / "deployment",
            "ANALYSIS_REPORT.md": out / "ANALYSIS_REPORT.md", "ANALYSIS_REPORT.html": out / "ANALYSIS_REPORT.html",
            "config.yaml": out / "config.yaml", "run_summary.json": out / "run_summary.json"}
    return {k: p for k, p in cand.items() if p.exists()}


def log_study_artifacts(cfg) -> None:
    """Log the drift and serving results and the report as artifacts of the study run. Never raises."""
    if not enabled(cfg):
        return
    with _guard(cfg, "study artifacts"):
        arts = study_artifacts(cfg)
        if arts:
            _backend(cfg).log_study(arts)
