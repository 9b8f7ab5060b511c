"""Verdicts that respect their evidence: H1b's noise-floor rule (drift.py) and the report's evidence assessment
(report/evidence.py). Pure functions on synthetic representations and dicts: fast."""

import numpy as np
import pytest

from lorastudy import drift as DR
from lorastudy.config import load_config
from lorastudy.report import evidence as EV
from tests.conftest import REPO


def _reps(consistent: bool, seed=0, n=80, d=16, L=5):
    """Representations of 3 seeds per method. consistent: each method moves the base the same way for every seed
    (plus a little seed noise), so two seeds agree with each other more than with the base; otherwise every seed
    moves in its own random direction (seed-vs-seed distance about twice the drift)."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(L, n, d))
    depth = np.arange(L)[:, None, None] / L
    runs = {}
    for m, size in (("full", 0.9), ("lora", 0.15)):
        shift = rng.normal(size=(L, n, d))
        for s in (1, 2, 3):
            noise = rng.normal(size=(L, n, d))
            move = (shift + 0.15 * noise) if consistent else noise
            runs[(m, s)] = base + size * depth * move
    names = ["embeddings", *[f"layer{i}" for i in range(L - 2)], "final_norm"]
    return DR.TaskReps("t", names, base, runs)


def _h1b(consistent: bool) -> dict:
    s = {"t": DR.summarize_task(DR.analyze_task(_reps(consistent)), n_resamples=200, seed=0, min_reduction=0.2)}
    return DR.h1b(s, 0.2, 0.05)


def test_h1b_decides_when_drift_is_above_the_seed_noise_floor():
    h = _h1b(consistent=True)
    d = h["per_task"]["t"]
    assert d["noise"]["full"]["within_floor"] is False and d["noise"]["full"]["drift"] > d["noise"]["full"]["floor"]
    assert d["rule_decision"] == "supported" and d["decision"] == "supported"
    assert h["overall"]["decision"] == "supported"


def test_h1b_draws_nothing_from_drift_within_the_seed_noise_floor():
    """The jackknife test alone says 'supported' (LoRA's drift is far smaller), but two full-FT seeds disagree
    more than either does with the base: the drift is indistinguishable from seed noise, so no decision."""
    h = _h1b(consistent=False)
    d = h["per_task"]["t"]
    assert d["rule_decision"] == "supported" and d["p_holm"] < 1e-6
    assert d["noise"]["full"]["within_floor"] is True
    assert d["decision"] == DR.WITHIN_NOISE
    assert h["overall"]["decision"] == DR.WITHIN_NOISE and h["overall"]["tasks_within_noise"] == ["t"]
    assert "seed-vs-seed noise floor" in h["decision_rule"]


def test_noise_check_without_a_floor_is_undecided():
    rng = np.random.default_rng(1)
    base = rng.normal(size=(3, 40, 8))
    one_seed = DR.TaskReps("t", ["embeddings", "layer0", "final_norm"], base,
                           {("full", 1): base + rng.normal(size=base.shape)})
    n = DR.noise_check(DR.summarize_task(DR.analyze_task(one_seed), 200, 0, 0.2))
    assert n["full"]["floor"] is None and n["full"]["within_floor"] is None and n["full"]["drift"] > 0


# -- protocol size -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["quick", "tiny"])
def test_presets_below_the_protocol_are_smoke_sized(name):
    short = EV.protocol_shortfalls(load_config(REPO / "configs" / f"{name}.yaml"))
    assert any("seed" in s for s in short) and any("trial" in s for s in short)


@pytest.mark.parametrize("name", ["paper", "smollm2"])
def test_protocol_presets_are_protocol_size(name):
    assert EV.protocol_shortfalls(load_config(REPO / "configs" / f"{name}.yaml")) == []


@pytest.mark.parametrize("override, words", [
    ("search.n_trials=14", "14 tuning trial"), ("seeds=[1, 2]", "2 seed"), ("train.max_steps=500", "500 optimizer"),
    ("search.max_steps=50", "tuning trials capped"), ("data.test_limit={rte: 100}", "test rows capped"),
    ("data.train_limit={sst2: 100}", "training rows capped"), ("data.probe_size=200", "probe set"),
    ("search.train_subset={sst2: 1000}", "sst2 1000"), ("model.source=tiny-random-llama", "random-weight"),
])
def test_each_shortfall_is_named(override, words):
    cfg = load_config(REPO / "configs" / "smollm2.yaml", [override])
    short = EV.protocol_shortfalls(cfg)
    assert len(short) == 1 and words in short[0], short


# -- the report's assessment ---------------------------------------------------------------------------------------
def _hyp(decision="supported", within=False, estimate=0.5):
    noise = {"full": {"drift": 0.01, "floor": 0.02 if within else 0.005, "within_floor": within},
             "lora": {"drift": 0.002, "floor": 0.001, "within_floor": False}}
    h1b = {"estimate": estimate, "decision": decision, "noise": noise}
    return {"H1a": {"per_task": {"rte": {"decision": "supported"}}},
            "H1b": {"per_task": {"rte": h1b}, "overall": {"decision": decision, "noise": noise,
                                                          "tasks_within_noise": ["rte"] if within else []}}}


def _drift(primary=0.5, secondary=0.4, per_seed_lora=(0.001, 0.005, 0.002)):
    prof = {"full": {"whole_model_drift": {"per_seed": [0.01, 0.011, 0.012]}},
            "lora": {"whole_model_drift": {"per_seed": list(per_seed_lora)}}}
    return {"tasks": {"rte": {"profiles": prof}},
            "secondary": {"rte": {"drift_reduction": {"estimate": secondary}}}}


def _runs(collapsed=()):
    return [{"task": "rte", "method": m, "seed": s, "failed": False, "collapsed": (m, s) in collapsed}
            for m in ("full", "lora") for s in (1, 2, 3)]


@pytest.fixture
def protocol_cfg():
    return load_config(REPO / "configs" / "smollm2.yaml", ["tasks=[rte]"])


def test_sound_evidence_gives_a_recommendation(protocol_cfg):
    ev = EV.assess(protocol_cfg, _runs(), _drift(), _hyp(), None)
    assert ev["smoke"] == [] and ev["h1b"]["rte"]["decision"] == "supported" and ev["h1b"]["rte"]["recommend"]
    assert ev["h1b"]["rte"]["spread"]["lora"]["ratio"] == pytest.approx(5.0)  # 0.005 / 0.001
    assert not ev["h1b"]["rte"]["pooling_disagrees"] and ev["any_recommendation"]


def test_collapsed_runs_withhold_the_verdict(protocol_cfg):
    ev = EV.assess(protocol_cfg, _runs(collapsed=[("lora", 2)]), _drift(), _hyp(), None)
    for v in (ev["h1a"]["rte"], ev["h1b"]["rte"], ev["h1b_overall"]):
        assert v["decision"] == EV.NO_VERDICT and v["rule_decision"] == "supported" and not v["recommend"]
        assert "collapsed" in v["withheld"]
    assert ev["tasks"]["rte"]["collapsed"] == ["lora/seed2"] and not ev["any_recommendation"]


def test_drift_within_noise_gives_no_recommendation(protocol_cfg):
    ev = EV.assess(protocol_cfg, _runs(), _drift(), _hyp(decision=DR.WITHIN_NOISE, within=True), None)
    v = ev["h1b"]["rte"]
    assert v["within_noise"] and not v["recommend"] and v["decision"] == DR.WITHIN_NOISE
    assert not ev["h1b_overall"]["recommend"]


def test_pooling_sign_disagreement_is_flagged(protocol_cfg):
    ev = EV.assess(protocol_cfg, _runs(), _drift(secondary=-1.18), _hyp(estimate=0.56), None)
    assert ev["h1b"]["rte"]["pooling_disagrees"] and ev["h1b"]["rte"]["secondary_reduction"] == -1.18


def test_smoke_study_draws_no_recommendation():
    cfg = load_config(REPO / "configs" / "quick.yaml", ["tasks=[rte]"])
    ev = EV.assess(cfg, _runs(), _drift(), _hyp(), {"H2": {"decision": "supported"}})
    assert ev["smoke"] and ev["h1b"]["rte"]["decision"] == "supported" and ev["h1b"]["rte"]["smoke"]
    assert not ev["any_recommendation"] and not ev["h2"]["recommend"]
