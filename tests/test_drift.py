import numpy as np
import pytest

from lorastudy import drift as DR


def _reps(seed=0, n=60, d=16, L=5, full_noise=0.8, lora_noise=0.1):
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(L, n, d))
    runs = {}
    for m, noise in (("full", full_noise), ("lora", lora_noise)):
        for s in (1, 2, 3):
            runs[(m, s)] = base + noise * np.arange(L)[:, None, None] / L * rng.normal(size=(L, n, d))
    names = ["embeddings", *[f"layer{i}" for i in range(L - 2)], "final_norm"]
    return DR.TaskReps("t", names, base, runs)


def test_analysis_detects_more_drift_for_full():
    a = DR.analyze_task(_reps())
    s = DR.summarize_task(a, n_resamples=500, seed=0, min_reduction=0.2)
    c = s["comparison"]
    assert c["whole_model_drift"]["full"] > c["whole_model_drift"]["lora"]
    lo, hi = c["drift_reduction"]["ci95"]
    assert lo < c["drift_reduction"]["estimate"] < hi and lo > 0.5
    # 3 vs 3 seeds: exact enumeration, floor 0.1
    assert c["seed_level_test"]["exact"] and c["seed_level_test"]["min_p_value"] == pytest.approx(0.1)
    assert c["seed_level_test"]["p_value"] == pytest.approx(0.1)
    assert set(s["noise_floor"]) == {"full", "lora"}
    # the embeddings layer is untouched in this simulation: CKA 1
    assert s["profiles"]["lora"]["cka_debiased"]["mean"][0] == pytest.approx(1.0)


def test_no_difference_gives_no_support():
    a = DR.analyze_task(_reps(full_noise=0.5, lora_noise=0.5, seed=3))
    s = {"t": DR.summarize_task(a, n_resamples=500, seed=0, min_reduction=0.2)}
    h = DR.h1b(s, 0.2, 0.05)
    assert h["per_task"]["t"]["decision"] != "supported"
    assert h["overall"]["decision"] != "supported"


def test_h1a_bootstrap():
    rng = np.random.default_rng(0)
    n = 300
    correct = {"t": {("full", s): rng.random(n) < 0.85 for s in (1, 2, 3)}}
    correct["t"].update({("lora", s): rng.random(n) < 0.85 for s in (1, 2, 3)})
    h = DR.h1a(correct, 3.0, 2000, 0, 0.05)
    d = h["per_task"]["t"]
    assert d["ci95_points"][0] < d["estimate_points"] < d["ci95_points"][1]
    bad = {"t": {("full", s): rng.random(n) < 0.9 for s in (1, 2, 3)}}
    bad["t"].update({("lora", s): rng.random(n) < 0.6 for s in (1, 2, 3)})
    assert DR.h1a(bad, 3.0, 2000, 0, 0.05)["per_task"]["t"]["decision"] == "contradicted"
    # a task's CI and p do not depend on the other tasks of the study (a shard reports what the merge reports)
    both = DR.h1a({"a": bad["t"], "t": correct["t"]}, 3.0, 2000, 0, 0.05)["per_task"]["t"]
    assert both["ci95_points"] == d["ci95_points"] and both["p_one_sided"] == d["p_one_sided"]


def test_layer_groups():
    g = DR.layer_groups(["embeddings", *[f"layer{i}" for i in range(30)], "final_norm"])
    assert [len(g[k]) for k in ("early", "middle", "late")] == [10, 10, 10]


def _degenerate_first_layer(seed=0, n=40, d=16, L=4, full_lora_same=False):
    """The embeddings layer's probe rows are all but one identical (every probe sentence but one ends with the same
    token); LoRA runs are the base rescaled and shifted (no drift at all); full FT runs add noise."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(L, n, d)).astype(np.float32)
    base[0] = base[0, :1]
    base[0, -1] = rng.normal(size=d)
    runs = {("lora", 1): 2 * base, ("lora", 2): base + np.float32(1e3)}
    if full_lora_same:
        runs.update({("full", 1): 3 * base, ("full", 2): base - np.float32(7)})
    else:
        runs.update({("full", s): base + 0.8 * rng.normal(size=base.shape).astype(np.float32) for s in (1, 2)})
    names = ["embeddings", *[f"layer{i}" for i in range(L - 2)], "final_norm"]
    return DR.TaskReps("t", names, base, runs)


def test_rescaled_or_shifted_base_has_zero_drift_and_a_degenerate_layer_is_undefined():
    """Was: layer CKA 10.8 and 16.1, whole-model drift -4.9 and -7.6, and the layer not listed as undefined."""
    import json

    s = DR.summarize_task(DR.analyze_task(_degenerate_first_layer()), n_resamples=200, seed=0, min_reduction=0.2)
    assert s["undefined_layers"] == ["embeddings"] and s["n_layers_excluded"] == 1 and s["n_layers_used"] == 3
    assert "debiased self-HSIC is zero" in json.dumps(s["undefined"]["cka_debiased"]["embeddings"])
    for r in s["per_run"]:
        assert np.isnan(r["cka_debiased"][0])  # internally NaN; null in the artifact (below)
        assert all(-1 <= v <= 1 for v in r["cka_debiased"][1:])
        assert 0 <= r["cka_biased"][0] <= 1  # the biased estimator is defined there (one distinct row)
        if r["method"] == "lora":
            assert r["whole_model_drift"] == pytest.approx(0.0, abs=1e-5)
            assert r["drift"][1:] == pytest.approx([0.0] * 3, abs=1e-5)
    assert s["comparison"]["drift_reduction"]["estimate"] == pytest.approx(1.0, abs=1e-4)
    out = json.loads(json.dumps(DR.json_safe(DR._strip_private(s)), allow_nan=False))
    assert out["per_run"][0]["cka_debiased"][0] is None
    assert out["profiles"]["lora"]["drift"]["mean"][0] is None


def test_no_drift_anywhere_gives_an_undefined_reduction_not_nan():
    import json

    summaries = {"t": DR.summarize_task(DR.analyze_task(_degenerate_first_layer(full_lora_same=True)),
                                        n_resamples=200, seed=0, min_reduction=0.2)}
    assert "comparison" not in summaries["t"] and "no drift" in summaries["t"]["comparison_undefined"]
    for p in summaries["t"]["profiles"].values():
        assert p["whole_model_drift"]["mean"] == pytest.approx(0.0, abs=1e-5)
    h = DR.h1b(summaries, 0.2, 0.05)
    assert h["per_task"] == {} and h["overall"] is None and "t" in h["not_estimable"]
    json.dumps(DR.json_safe(DR._strip_private({"s": summaries, "h": h})), allow_nan=False)


def test_unsound_runs_names_failed_and_collapsed_runs(tmp_path):
    """The drift figures say "no verdict" for the tasks the report withholds: this is where they learn which."""
    import json as _json

    from lorastudy import store
    from lorastudy.config import load_config

    cfg = load_config(None, [f"output_dir={tmp_path}", "tasks=[sst2, mrpc]", "seeds=[1, 2]"])
    failed = store.run_dir(cfg.out, "sst2", "lora", 2)
    failed.parent.mkdir(parents=True)
    (failed.parent / f"{failed.name}.{store.FAILED}").write_text("{}")
    for s, collapsed in ((1, True), (2, False)):
        rd = store.run_dir(cfg.out, "mrpc", "full", s)
        rd.mkdir(parents=True)
        (rd / "metrics.json").write_text(_json.dumps({  # (the fields the report's walk over the runs reads)
            "collapsed": collapsed, "test": {"accuracy": 0.5}, "validation": {"accuracy": 0.5},
            "majority_accuracy": 0.6, "best_step": 1, "steps": 1, "train_time_s": 1.0, "trainable_params": 1,
            "hparams": {}}))
        (rd / store.COMPLETE).write_text("ok")
    # a failed retry beside a complete run (`train --force`): the report reads the complete run, and so do these
    (rd.parent / f"{rd.name}.{store.FAILED}").write_text("{}")
    assert DR.unsound_runs(cfg, ["sst2", "mrpc"]) == {"sst2": ["lora/seed2 failed"], "mrpc": ["full/seed1 collapsed"]}
