"""Phase 0 baselines on the test split: majority class (of train) and random predictors (uniform, label prior),
accuracy and F1 with bootstrap 95% CIs (examples resampled; random predictions redrawn in each replicate)."""

from __future__ import annotations

import numpy as np

from lorastudy import data as D
from lorastudy import stats, store


def _acc_f1(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise accuracy and F1 (positive class 1) for (R, n) arrays."""
    acc = (y == p).mean(-1)
    tp = ((p == 1) & (y == 1)).sum(-1)
    fp = ((p == 1) & (y != 1)).sum(-1)
    fn = ((p != 1) & (y == 1)).sum(-1)
    f1 = np.where(tp > 0, 2 * tp / np.maximum(2 * tp + fp + fn, 1), 0.0)
    return acc, f1


def baselines_for(train_labels: np.ndarray, test_labels: np.ndarray, num_labels: int, n_resamples: int = 10000,
                  seed: int = 0) -> dict:
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
        point_pred = draw((1, n))
        acc_pt, f1_pt = _acc_f1(y[None], point_pred)
        acc_b, f1_b = _acc_f1(yb, draw((n_resamples, n)))
        out[name] = {
            "accuracy": float(acc_b.mean() if name != "majority" else acc_pt[0]),
            "accuracy_ci95": stats.percentile_ci(acc_b),
            "f1": float(f1_b.mean() if name != "majority" else f1_pt[0]),
            "f1_ci95": stats.percentile_ci(f1_b),
        }
    out["majority"]["class"] = majority
    # expected accuracy of the random predictors, exactly: sum_c P(pred=c) P(label=c)
    test_freq = np.bincount(y, minlength=num_labels) / n
    out["random_uniform"]["expected_accuracy"] = float(test_freq.mean())
    out["random_prior"]["expected_accuracy"] = float((prior * test_freq).sum())
    return {"n_test": n, "n_resamples": n_resamples, "train_prior": prior.tolist(), **out}


def run_baselines(cfg) -> dict:
    path = cfg.out / "phase0" / "baselines.json"
    done = store.read_current(path, cfg)
    if done is not None:
        return done
    res = {}
    for task in cfg.tasks:
        s = D.splits_for(cfg, task)
        res[task] = baselines_for(s.train["label"].to_numpy(), s.test["label"].to_numpy(), cfg.task(task).num_labels,
                                  cfg.drift.n_resamples, cfg.drift.seed)
    store.write_current(path, cfg, res)
    return res
