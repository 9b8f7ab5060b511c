"""Phase 0 baselines on the test split: majority class (of train) and random predictors (uniform, label prior),
scored by accuracy and the task's declared metrics (lorastudy.metrics) with bootstrap 95% CIs (examples resampled;
random predictions redrawn in each replicate)."""

from __future__ import annotations

import numpy as np

from lorastudy import data as D
from lorastudy import metrics as MT
from lorastudy import stats, store


def baselines_for(train_labels: np.ndarray, test_labels: np.ndarray, num_labels: int, n_resamples: int = 10000,
                  seed: int = 0, metrics: list[str] | None = None, primary: str = "accuracy") -> dict:
    """Baselines for labels ``train_labels`` [n_train] and ``test_labels`` [n]: per predictor, each metric (accuracy
    and ``metrics``) and its percentile 95% CI over ``n_resamples`` bootstrap replicates; ``primary`` names the
    metric the collapse rule and the report use."""
    names = list(dict.fromkeys(["accuracy", *(metrics or []), primary]))
    MT.check_metrics(names, num_labels)
    rng = np.random.default_rng(seed)
    y = np.asarray(test_labels)
    n = len(y)
    prior = np.bincount(train_labels, minlength=num_labels) / len(train_labels)
    majority = int(prior.argmax())
    boot = rng.integers(0, n, size=(n_resamples, n))
    yb = y[boot]
    out = {}
    predictors = {
        "majority": lambda size: np.full(size, majority),
        "random_uniform": lambda size: rng.integers(0, num_labels, size=size),
        "random_prior": lambda size: rng.choice(num_labels, size=size, p=prior),
    }
    for name, draw in predictors.items():
        point = MT.compute(names, y, draw(n))  # scikit-learn on one draw (the majority's exact value)
        reps = MT.compute_batched(names, yb, draw((n_resamples, n)), num_labels)
        out[name] = {}
        for m in names:
            out[name][m] = float(point[m] if name == "majority" else reps[m].mean())
            out[name][f"{m}_ci95"] = stats.percentile_ci(reps[m])
    out["majority"]["class"] = majority
    # expected accuracy of the random predictors, exactly: sum_c P(pred=c) P(label=c)
    test_freq = np.bincount(y, minlength=num_labels) / n
    out["random_uniform"]["expected_accuracy"] = float(test_freq.mean())
    out["random_prior"]["expected_accuracy"] = float((prior * test_freq).sum())
    return {"n_test": n, "n_resamples": n_resamples, "train_prior": prior.tolist(), "metrics": names,
            "primary": primary, **out}


def run_baselines(cfg) -> dict:
    path = cfg.out / "phase0" / "baselines.json"
    done = store.read_current(path, cfg)
    if done is not None:
        return done
    res = {}
    for task in cfg.tasks:
        s = D.splits_for(cfg, task)
        spec = cfg.task(task)
        res[task] = baselines_for(s.train["label"].to_numpy(), s.test["label"].to_numpy(), spec.num_labels,
                                  cfg.drift.n_resamples, cfg.drift.seed, spec.metrics, spec.primary)
    store.write_current(path, cfg, res)
    return res
