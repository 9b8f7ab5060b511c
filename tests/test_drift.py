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


def test_layer_groups():
    g = DR.layer_groups(["embeddings", *[f"layer{i}" for i in range(30)], "final_norm"])
    assert [len(g[k]) for k in ("early", "middle", "late")] == [10, 10, 10]
