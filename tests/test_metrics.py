"""The metrics registry (issue 14 item 6): values against scikit-learn and by hand, the batched form used by the
baselines' bootstrap, task declarations, and a custom MCC task from headerless TSVs run end to end from a config."""

import json

import numpy as np
import pytest
import yaml
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from lorastudy import metrics as MT
from lorastudy.tasks import TaskSpec

Y = np.array([1, 1, 0, 0, 1, 0, 1, 1])
P = np.array([1, 0, 0, 1, 1, 0, 1, 0])  # tp 3, fn 2, fp 1, tn 2


def test_known_values():
    v = MT.compute(["accuracy", "f1", "mcc"], Y, P)
    assert v["accuracy"] == pytest.approx(5 / 8)
    assert v["f1"] == pytest.approx(2 * 3 / (2 * 3 + 1 + 2))  # 2tp / (2tp + fp + fn) = 6/9
    assert v["mcc"] == pytest.approx((3 * 2 - 1 * 2) / np.sqrt(4 * 5 * 3 * 4))  # (tp tn - fp fn) / sqrt(...)
    assert v == pytest.approx({"accuracy": accuracy_score(Y, P), "f1": f1_score(Y, P), "mcc": matthews_corrcoef(Y, P)})
    # a constant predictor: F1 0 when it never says positive, MCC 0 always (as scikit-learn)
    z = np.zeros_like(Y)
    assert MT.compute(["f1", "mcc"], Y, z) == {"f1": 0.0, "mcc": 0.0}


@pytest.mark.parametrize("k", [2, 3])
def test_batched_form_matches_sklearn_per_replicate(k):
    rng = np.random.default_rng(k)
    y = rng.integers(0, k, size=(40, 25))
    p = np.where(rng.random((40, 25)) < 0.6, y, rng.integers(0, k, size=(40, 25)))
    p[0] = 0  # constant predictions
    y[1] = 1  # constant labels
    names = ["accuracy", "mcc"] + (["f1"] if k == 2 else [])
    got = MT.compute_batched(names, y, p, k)
    for r in range(40):
        want = MT.compute(names, y[r], p[r])
        for n in names:
            assert got[n][r] == pytest.approx(want[n], abs=1e-12), (n, r)


def test_registry_and_task_declarations():
    with pytest.raises(MT.MetricError, match="unknown metric 'auc'.*known"):
        MT.get_metric("auc")
    with pytest.raises(ValueError, match="2-class"):
        TaskSpec(name="x", text_fields=["s"], label_names=["a", "b", "c"], metrics=["f1"])
    with pytest.raises(ValueError, match="primary_metric"):
        TaskSpec(name="x", text_fields=["s"], label_names=["a", "b"], metrics=["accuracy"], primary_metric="mcc")
    spec = TaskSpec(name="x", text_fields=["s"], label_names=["a", "b"], metrics=["accuracy", "mcc"],
                    primary_metric="mcc")
    assert spec.primary == "mcc"
    assert TaskSpec(name="x", text_fields=["s"], label_names=["a", "b"], metrics=["f1", "accuracy"]).primary == "f1"
    with pytest.raises(ValueError, match="column index"):
        TaskSpec(name="x", text_fields=["s"], label_names=["a", "b"], tsv_header=False, tsv_columns={"s": 3})
    # an extension point: a registered metric can be declared by a task
    name = "balanced_accuracy_test"
    if name not in MT.known_metrics():
        from sklearn.metrics import balanced_accuracy_score

        def from_confusion(c):
            return (np.diagonal(c, axis1=-2, axis2=-1) / c.sum(-1)).mean(-1)

        MT.register_metric(MT.Metric(name, "balanced accuracy", balanced_accuracy_score, from_confusion, 0, 1))
    assert TaskSpec(name="x", text_fields=["s"], label_names=["a", "b"], metrics=[name]).primary == name
    with pytest.raises(MT.MetricError, match="already"):
        MT.register_metric(MT.get_metric(name))


def test_scores_compute_the_declared_metrics():
    from lorastudy.training import scores

    logits = np.stack([1 - P, P], axis=1).astype(np.float32)
    s = scores(logits, Y, ["mcc"])
    assert set(s) == {"loss", "mcc"} and s["mcc"] == pytest.approx(matthews_corrcoef(Y, P))


def test_baselines_use_the_declared_metrics():
    from lorastudy.baselines import baselines_for

    train = np.array([0] * 30 + [1] * 70)
    test = np.array([0] * 40 + [1] * 60)
    b = baselines_for(train, test, 2, n_resamples=500, seed=0, metrics=["mcc", "f1"], primary="mcc")
    assert b["primary"] == "mcc" and b["metrics"] == ["accuracy", "mcc", "f1"]
    assert b["majority"]["mcc"] == 0.0 and b["majority"]["f1"] == pytest.approx(2 * 60 / (2 * 60 + 40))
    assert b["random_uniform"]["mcc_ci95"][0] < 0 < b["random_uniform"]["mcc_ci95"][1]


def _write_headerless(df, path):
    """CoLA's layout: source, label, original-label mark, sentence; no header."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"src{i}\t{lab}\t\t{txt.strip()}" for i, (lab, txt) in enumerate(zip(df["label"], df["sentence"],
                                                                                   strict=True))]
    path.write_text("\n".join(lines) + "\n")


def test_custom_mcc_task_from_headerless_tsvs_runs_from_a_config(glue_dir, tmp_path):
    """A CoLA-like single-sentence task scored by MCC, declared in the config only, from headerless TSVs made of real
    SST-2 rows: tuning maximizes validation MCC, runs report MCC (= scikit-learn's on their predictions), the
    collapse flag uses the majority-class MCC, baselines and the report show it."""
    import pandas as pd
    from typer.testing import CliRunner

    from lorastudy.cli import app
    from tests.conftest import REPO

    src = pd.read_parquet(glue_dir / "sst2" / "train.parquet")
    data = tmp_path / "data"
    _write_headerless(src.iloc[:160], data / "acceptability" / "train.tsv")
    _write_headerless(src.iloc[160:200], data / "acceptability" / "dev.tsv")
    cfg = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    cfg.update(name="mcc", output_dir=str(tmp_path / "results"), tasks=["acceptability"], methods=["lora"],
               seeds=[42], custom_tasks={"acceptability": {
                   "name": "acceptability", "text_fields": ["sentence"], "label_names": ["unacceptable", "acceptable"],
                   "metrics": ["mcc", "accuracy"], "tsv_header": False, "tsv_columns": {"sentence": 3, "label": 1}}})
    cfg["data"].update(source=str(data), train_limit={}, test_limit={})
    cfg["search"].update(n_trials=2, max_steps=4)
    cfg["train"].update(max_steps=8)
    path = tmp_path / "mcc.yaml"
    path.write_text(yaml.safe_dump(cfg))
    for phase in ("baselines", "tune", "train", "report"):
        r = CliRunner().invoke(app, ["run", str(path), "--only", phase])
        assert r.exit_code == 0, (phase, r.output)
    out = tmp_path / "results"
    m = json.loads((out / "phase2/acceptability/lora/seed42/metrics.json").read_text())
    assert set(m["test"]) == {"loss", "mcc", "accuracy"} and m["primary_metric"] == "mcc"
    assert m["test"]["mcc"] == pytest.approx(matthews_corrcoef(m["test_labels"], m["test_predictions"]))
    assert m["majority_baseline"] == {"mcc": 0.0} and m["collapsed"] == (m["test"]["mcc"] <= 0.0)
    assert m["n_test"] == 40 and m["n_train"] + m["n_validation"] == 160
    trials = json.loads((out / "phase1/acceptability_lora/trials.json").read_text())["trials"]
    done = [t for t in trials if t["state"] == "COMPLETE"]
    assert len(done) == 2 and all(t["value"] == t["val_mcc"] for t in done)
    best = yaml.safe_load((out / "phase1/acceptability_lora/best.yaml").read_text())
    assert best["objective"].startswith("validation mcc") and best["value"] == max(t["value"] for t in done)
    b = json.loads((out / "phase0/baselines.json").read_text())["results"]["acceptability"]
    assert b["primary"] == "mcc" and b["majority"]["mcc"] == 0.0
    rep = (out / "ANALYSIS_REPORT.md").read_text()
    assert f"mcc {m['test']['mcc']:.3f}" in rep and "| mcc 0.000 |" in rep
