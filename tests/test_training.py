import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from lorastudy import store
from lorastudy.config import load_config
from lorastudy.sanity import run_sanity
from lorastudy.training import HParams, TrainingError, run_and_save, train_run
from tests.conftest import REPO


def _cfg(tiny_cfg, *sets):
    return load_config(REPO / "configs" / "tiny.yaml",
                       [f"data.source={tiny_cfg.data.source}", f"output_dir={tiny_cfg.output_dir}", *sets])


def test_loss_decreases_and_metrics_are_complete(tiny_cfg):
    hp = HParams.from_config(tiny_cfg, "full", {"epochs": 4, "lr": 2e-3})
    m = train_run(tiny_cfg, "sst2", "full", 0, hp)
    first, last = m["curve"][0]["train_loss"], min(c["train_loss"] for c in m["curve"])
    assert last < first
    for key in ("validation", "test", "curve", "best_step", "train_time_s", "tokens_per_s", "peak_memory_bytes",
                "trainable_params", "collapsed", "test_predictions", "majority_accuracy"):
        assert key in m
    assert len(m["test_predictions"]) == m["n_test"] == 48


def test_early_stopping_on_flat_validation_loss(tiny_cfg):
    cfg = _cfg(tiny_cfg, "train.evals_per_epoch=4", "train.patience=3")
    hp = HParams.from_config(cfg, "full", {"lr": 1e-30, "epochs": 5, "warmup_ratio": 0.0})  # weights never move
    m = train_run(cfg, "rte", "full", 0, hp)
    assert m["stopped_early"]
    assert len(m["curve"]) == 4  # the first evaluation is best; three more without improvement stop the run
    assert m["best_step"] == m["curve"][0]["step"]


def test_restored_checkpoint_is_the_best_one(tiny_cfg):
    hp = HParams.from_config(tiny_cfg, "full", {"lr": 3e-3, "epochs": 3})
    m = train_run(tiny_cfg, "mrpc", "full", 1, hp, keep_model=True)
    best = min(m["curve"], key=lambda c: c["val_loss"])
    assert m["best_step"] == best["step"]
    # re-evaluating the returned (restored) model on validation reproduces the best evaluation
    from lorastudy import data as D
    from lorastudy.training import predict, scores

    splits = D.splits_for(tiny_cfg, "mrpc")
    tok = m["_tokenizer"]
    enc = D.encode(tok, splits.validation, tiny_cfg.task("mrpc"), tiny_cfg.data)
    val = scores(predict(m["_model"], enc, tok.pad_token_id, "right", 16, m["_model"].device, None), enc.labels)
    assert val["loss"] == pytest.approx(best["val_loss"], rel=1e-5)


def test_lora_run_trains_adapter_and_head_only(tiny_cfg):
    hp = HParams.from_config(tiny_cfg, "lora")
    m = train_run(tiny_cfg, "rte", "lora", 0, hp)
    assert m["trainable_params"] < 0.1 * m["total_params"]


def test_same_seed_same_metrics_on_cpu(tiny_cfg):
    hp = HParams.from_config(tiny_cfg, "lora")
    a = train_run(tiny_cfg, "sst2", "lora", 7, hp)
    b = train_run(tiny_cfg, "sst2", "lora", 7, hp)
    assert a["curve"] == b["curve"] and a["test_predictions"] == b["test_predictions"]
    c = train_run(tiny_cfg, "sst2", "lora", 8, hp)
    assert c["curve"] != a["curve"]


def test_divergence_stops_with_clear_error_and_marks_failed(tiny_cfg, tmp_path):
    hp = HParams.from_config(tiny_cfg, "full", {"lr": 1e30, "warmup_ratio": 0.0})
    with pytest.raises(TrainingError, match="non-finite"):
        run_and_save(tiny_cfg, "rte", "full", 0, hp, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    failed = json.loads((tmp_path / f"run.{store.FAILED}").read_text())
    assert "non-finite" in failed["error"]


def test_run_dir_layout(tiny_cfg, tmp_path):
    hp = HParams.from_config(tiny_cfg, "lora")
    run_and_save(tiny_cfg, "rte", "lora", 0, hp, tmp_path / "run")
    names = {p.name for p in (tmp_path / "run").iterdir()}
    assert {"adapter", "metrics.json", "config.yaml", "code_version.json", "COMPLETE"} <= names
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


def test_killed_run_restarts_cleanly(tiny_cfg, tmp_path):
    run = tmp_path / "results" / "phase2" / "rte" / "full" / "seed3"
    cmd = [sys.executable, "-m", "lorastudy.cli", "train", str(REPO / "configs" / "tiny.yaml"), "--task", "rte",
           "--method", "full", "--seed", "3", "--set", f"data.source={tiny_cfg.data.source}",
           "--set", f"output_dir={tmp_path / 'results'}", "--set", "train.patience=100000",
           "--set", "hp.epochs=5000"]  # long enough to be killed mid-training
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and "training rte" not in (p.stdout.readline() or ""):
        pass
    time.sleep(3)  # inside the training loop
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not store.is_complete(run) and not run.exists()  # nothing that looks finished
    cmd[-1] = "hp.epochs=1"
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert store.is_complete(run) and json.loads((run / "metrics.json").read_text())["steps"] > 0


def test_sanity_passes_on_tiny(tiny_cfg):
    res = run_sanity(tiny_cfg)
    assert len(res) == 6 and all(r["passed"] for r in res), [(r["task"], r["method"], r["final_loss"]) for r in res]


def test_sanity_failure_names_task_and_method(tiny_cfg):
    from typer.testing import CliRunner

    from lorastudy.cli import app

    r = CliRunner().invoke(app, ["sanity", str(REPO / "configs" / "tiny.yaml"), "--set",
                                 f"data.source={tiny_cfg.data.source}", "--set",
                                 f"output_dir={tiny_cfg.output_dir}", "--set", "sanity.max_steps=1",
                                 "--set", "tasks=[rte]", "--set", "methods=[lora]"])
    assert r.exit_code == 1
    assert "rte/lora" in r.output


def test_baselines_majority_and_random():
    from lorastudy.baselines import baselines_for

    train = np.array([0] * 30 + [1] * 70)
    test = np.array([0] * 40 + [1] * 60)
    b = baselines_for(train, test, 2, n_resamples=2000, seed=0)
    assert b["majority"]["class"] == 1 and b["majority"]["accuracy"] == pytest.approx(0.6)
    lo, hi = b["majority"]["accuracy_ci95"]
    assert lo < 0.6 < hi
    assert b["random_uniform"]["expected_accuracy"] == pytest.approx(0.5)
    assert b["random_prior"]["expected_accuracy"] == pytest.approx(0.3 * 0.4 + 0.7 * 0.6)
    assert b["random_prior"]["accuracy"] == pytest.approx(0.54, abs=0.01)


@pytest.mark.slow
def test_real_model_learns_sst2_on_cpu(glue_dir, tmp_path):
    """SmolLM2-135M, LoRA, a few hundred real SST-2 examples: clearly above the majority class."""
    cfg = load_config(REPO / "configs" / "quick.yaml", [f"data.source={glue_dir}", f"output_dir={tmp_path}",
                                                       "data.max_length=64", "data.test_limit.sst2=160",
                                                       "data.train_limit.sst2=2000"])
    # 60 steps of 16: robust to the dropout masks (measured here: test accuracy 0.669 / 0.650 with LoRA dropout
    # 0.05 / 0.1 vs 0.506 majority, test loss 0.583 / 0.589); 40 steps of 8 learned or not depending on the masks
    hp = HParams.from_config(cfg, "lora", {"max_steps": 60, "lr": 1e-3, "batch_size": 16, "warmup_ratio": 0.1})
    m = train_run(cfg, "sst2", "lora", 42, hp)
    assert m["test"]["accuracy"] >= m["majority_accuracy"] + 0.10, m["test"]
    assert m["test"]["loss"] < 0.65, m["test"]  # below ln 2: better than a coin, not only on the argmax


def test_static_shape_buckets_compute_the_same_thing(tiny_cfg):
    """Padding every batch to a fixed bucket width (the static shapes a CUDA graph needs) changes no result."""
    hp = HParams.from_config(tiny_cfg, "full", {"epochs": 2, "lr": 2e-3})
    dyn = train_run(tiny_cfg, "rte", "full", 0, hp)
    cfg = _cfg(tiny_cfg, "train.shape_buckets=[32, 48, 64]")
    stat = train_run(cfg, "rte", "full", 0, hp)
    assert dyn["test_predictions"] == stat["test_predictions"]
    for a, b in zip(dyn["curve"], stat["curve"], strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-4)
    from lorastudy.data import bucket_width

    assert bucket_width(33, [32, 48, 64]) == 48 and bucket_width(70, [32, 64]) is None
    assert bucket_width(5, None) is None


def test_data_order_and_early_stopping_state_roundtrip():
    """A run's data order and early-stopping state are plain data: restored mid-epoch, the batches and decisions
    continue exactly as without the interruption (what mid-run checkpoints build on)."""
    from lorastudy.training import DataOrder, EarlyStopping

    lengths = np.random.default_rng(0).integers(3, 40, size=23)
    ref = DataOrder(lengths, 4, seed=5, group_by_length=True)
    want = [ref.next().tolist() for _ in range(15)]  # crosses two epoch boundaries (6 batches each)
    a = DataOrder(lengths, 4, seed=5, group_by_length=True)
    got = [a.next().tolist() for _ in range(8)]
    b = DataOrder(lengths, 4, seed=0, group_by_length=True)
    b.load_state_dict(a.state_dict())
    got += [b.next().tolist() for _ in range(7)]
    assert got == want
    stop = EarlyStopping(2)
    for step, loss in ((1, 0.5), (2, 0.6)):
        stop.update(step, {"loss": loss})
    again = EarlyStopping(2)
    again.load_state_dict(stop.state_dict())
    assert not again.update(3, {"loss": 0.7}) and again.should_stop and again.best_step == 1
