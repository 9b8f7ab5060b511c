"""Experiment tracking: a tiny study with each backend offline writes what a user queries back with the backend's
own tools (``mlflow.search_runs`` / ``MlflowClient``; ``wandb leet inspect`` on the offline run directories); a
tracking failure costs no result; the config section is validated."""

import json
import logging
import subprocess
import sys

import pytest
import yaml

from lorastudy import pipeline, store, tracking, tuning
from lorastudy.config import ConfigError, load_config
from tests.conftest import REPO

TINY = REPO / "configs" / "tiny.yaml"
# one task, LoRA, two short trials and one production run: every hook fires, in seconds
SMALL = ["tasks=[rte]", "methods=[lora]", "seeds=[42]", "search.n_trials=2", "search.max_steps=4",
         "train.max_steps=4"]


def _cfg(tiny_cfg, *sets):
    return load_config(TINY, [f"data.source={tiny_cfg.data.source}", f"output_dir={tiny_cfg.output_dir}", *SMALL,
                              *sets])


def _study(cfg) -> None:
    """Phase 1 (two trials as two threads of one process), phase 2, then the serving phase through `run` (which
    logs the study's artifacts at its end)."""
    tuning.tune(cfg, streams=2)
    assert not pipeline.train_all(cfg)["failures"]
    pipeline.run(cfg, only="serve")


def test_mlflow_offline_study_is_queryable(tiny_cfg):
    import mlflow
    from mlflow import MlflowClient

    cfg = _cfg(tiny_cfg, "tracking.backend=mlflow")
    _study(cfg)
    uri = f"sqlite:///{cfg.out.resolve() / 'tracking' / 'mlflow.db'}"  # the documented default store
    client = MlflowClient(tracking_uri=uri)
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["tiny"])
    kind = runs["tags.lorastudy.kind"]
    (study_id,) = runs.loc[kind == "study", "run_id"]
    phases = runs[kind == "phase"].set_index("tags.lorastudy.phase")
    assert set(phases.index) == {"phase1", "phase2"}
    assert (phases["tags.mlflow.parentRunId"] == study_id).all()

    # every trial, nested under phase 1, with the hyperparameters Optuna chose and its metrics
    trials = runs[kind == "trial"]
    exported = json.loads((cfg.out / "phase1" / "rte_lora" / "trials.json").read_text())["trials"]
    assert len(trials) == 2 == len(exported)
    assert (trials["tags.mlflow.parentRunId"] == phases.loc["phase1", "run_id"]).all()
    for t in exported:
        row = trials[trials["params.trial"] == str(t["number"])].iloc[0]
        assert row["status"] == "FINISHED" and row["params.seed"] == "42"
        for k, v in t["params"].items():
            assert float(row[f"params.{k}"]) == pytest.approx(v)
        assert row["metrics.best_val_accuracy"] == pytest.approx(t["value"])
        assert row["metrics.peak_memory_bytes"] == t["peak_memory_bytes"] and row["metrics.wall_time_s"] > 0
        code = store.code_version()
        assert row["tags.lorastudy.version"] == code["package"]
        if "git_commit" in code:  # a git checkout (CI's is)
            assert row["tags.mlflow.source.git.commit"] == code["git_commit"]
        assert len(client.get_metric_history(row["run_id"], "val_loss")) >= 1

    # the production run: curve per evaluation, final metrics, the adapter (and its model card) as artifacts
    assert (kind == "run").sum() == 1
    run = runs[kind == "run"].iloc[0]
    m = json.loads((store.run_dir(cfg.out, "rte", "lora", 42) / "metrics.json").read_text())
    assert run["tags.mlflow.parentRunId"] == phases.loc["phase2", "run_id"] and run["status"] == "FINISHED"
    hist = client.get_metric_history(run.run_id, "val_loss")
    assert [(h.step, h.value) for h in sorted(hist, key=lambda h: h.step)] == \
        [(p["step"], pytest.approx(p["val_loss"])) for p in m["curve"]]
    got = client.get_run(run.run_id).data
    assert got.metrics["test_accuracy"] == pytest.approx(m["test"]["accuracy"])
    assert got.params["lr"] == str(m["hparams"]["lr"]) and got.params["method"] == "lora"
    arts = {a.path for a in client.list_artifacts(run.run_id, "adapter")}
    assert {"adapter/adapter_model.safetensors", "adapter/adapter_config.json", "adapter/README.md"} <= arts
    (cfg.out / "dl").mkdir()
    local = client.download_artifacts(run.run_id, "config.yaml", str(cfg.out / "dl"))
    assert yaml.safe_load(open(local).read())["name"] == "tiny"

    # study-level results: the serving benchmark and the resolved config
    study_arts = {a.path for a in client.list_artifacts(study_id)}
    assert {"serving", "config.yaml"} <= study_arts
    assert "serving/benchmark_results.json" in {a.path for a in client.list_artifacts(study_id, "serving")}


def _inspect(run_dir, summary: bool):
    """wandb's own reader of an offline run's transaction log (`wandb leet inspect`)."""
    args = [sys.executable, "-m", "wandb", "leet", "inspect", "--json", *(["--summary"] if summary else []),
            str(run_dir)]
    r = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    if summary:
        return json.loads(r.stdout)
    return [json.loads(line) for line in r.stdout.splitlines() if line.strip()]


def test_wandb_offline_study_is_in_its_run_directories(tiny_cfg):
    cfg = _cfg(tiny_cfg, "tracking.backend=wandb")
    _study(cfg)
    runs = sorted((cfg.out / "tracking" / "wandb").glob("offline-run-*"))
    by_name = {}
    for d in runs:
        s = _inspect(d, summary=True)
        by_name[s["name"]] = (d, s)
    assert set(by_name) == {"rte/lora/trial0", "rte/lora/trial1", "rte/lora/seed42", "tiny-study"}
    exported = json.loads((cfg.out / "phase1" / "rte_lora" / "trials.json").read_text())["trials"]
    for t in exported:
        d, s = by_name[f"rte/lora/trial{t['number']}"]
        assert s["state"] == "finished" and s["config"]["phase"] == "phase1" and s["config"]["seed"] == 42
        for k, v in t["params"].items():
            assert s["config"][k] == pytest.approx(v)
        assert s["summary"]["best_val_accuracy"] == pytest.approx(t["value"])
        assert s["summary"]["peak_memory_bytes"] == t["peak_memory_bytes"] and s["summary"]["wall_time_s"] > 0
        assert s["config"]["config"]["name"] == "tiny" and s["config"]["tags"]["lorastudy.version"]

    d, s = by_name["rte/lora/seed42"]
    m = json.loads((store.run_dir(cfg.out, "rte", "lora", 42) / "metrics.json").read_text())
    assert s["summary"]["test_accuracy"] == pytest.approx(m["test"]["accuracy"])
    records = _inspect(d, summary=False)
    curve = [(r["history"]["step"]["num"], r["history"]["item"]["val_loss"]) for r in records
             if r["type"] == "history"]
    assert [(int(a), b) for a, b in curve] == [(p["step"], pytest.approx(p["val_loss"])) for p in m["curve"]]
    arts = [r["artifact"] for r in records if r["type"] == "artifact"]
    files = {(a["type"], c["path"]) for a in arts for c in a["manifest"]["contents"]}
    assert {("model", "adapter_model.safetensors"), ("model", "README.md"), ("run-files", "metrics.json")} <= files
    study = [r["artifact"] for r in _inspect(by_name["tiny-study"][0], summary=False) if r["type"] == "artifact"]
    assert any(c["path"] == "benchmark_results.json" for a in study for c in a["manifest"]["contents"])


def test_a_tracking_failure_keeps_every_result_and_is_reported_once(tiny_cfg, caplog):
    """An MLflow store that cannot be opened (its "directory" is a file): both runs are complete on disk, one
    warning, and the log file holds each failure."""
    tiny_cfg.out.mkdir(parents=True)
    (tiny_cfg.out / "a-file").write_text("not a directory")
    bad = tiny_cfg.out / "a-file" / "mlflow.db"
    cfg = _cfg(tiny_cfg, "tracking.backend=mlflow", f"tracking.mlflow_uri=sqlite:///{bad}", "seeds=[42, 7]",
               "train.max_steps=2")
    tracking._WARNED.clear()
    with caplog.at_level(logging.WARNING, logger="lorastudy.tracking"):
        res = pipeline.train_all(cfg)
    assert sorted(res["trained"]) == ["rte/lora/seed42", "rte/lora/seed7"] and not res["failures"]
    for seed in (42, 7):
        assert store.is_complete(store.run_dir(cfg.out, "rte", "lora", seed))
    warned = [r for r in caplog.records if r.name == "lorastudy.tracking"]
    assert len(warned) == 1 and "Results are unaffected" in warned[0].getMessage()
    errors = (cfg.out / "tracking" / "errors.log").read_text()
    assert errors.count("mlflow run rte/lora/seed") == 2


def test_tracking_config_is_validated(tiny_cfg, monkeypatch):
    with pytest.raises(ConfigError, match="tracking.backend.*unknown tracking backend 'neptune'"):
        _cfg(tiny_cfg, "tracking.backend=neptune")

    class NeedsMissing(tracking.Backend):
        requires = "no_such_module_for_lorastudy"

    monkeypatch.setitem(tracking.BACKENDS, "other", NeedsMissing)
    with pytest.raises(ConfigError, match=r"pip install 'lorastudy\[tracking\]'"):
        _cfg(tiny_cfg, "tracking.backend=other")
    with pytest.raises(ConfigError, match="tracking.mlflow_uri"):
        _cfg(tiny_cfg, "tracking.mlflow_uri=results/mlflow.db")
    with pytest.raises(ConfigError, match="tracking.wandb_mode"):
        _cfg(tiny_cfg, "tracking.wandb_mode=sometimes")
    cfg = _cfg(tiny_cfg, "tracking.log_full_models=true")
    assert cfg.tracking.backend == "none" and cfg.hash() == _cfg(tiny_cfg, "tracking.backend=mlflow").hash()
    tracking.log_trial(cfg, "rte", "lora", 0, {"validation": {"accuracy": 1.0}})  # off: does nothing
    assert not (cfg.out / "tracking").exists()
