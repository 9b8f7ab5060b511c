"""Classification metrics by name: a registry on scikit-learn (pure: no I/O).

A task declares the metrics it is scored by (``TaskSpec.metrics``) and its primary metric (``TaskSpec.primary``),
which drives tuning's objective, the collapse flag and the report. Built in: ``accuracy``, ``f1`` (binary, positive
class 1; GLUE's MRPC/QQP F1) and ``mcc`` (Matthews correlation; GLUE's CoLA). Others are added with
``register_metric``.

Each metric has two forms: ``score(y_true, y_pred)``, scikit-learn's own function, used for every reported value;
and ``from_confusion(counts)``, the same quantity from confusion-matrix counts of many prediction vectors at once.
Why the second: the baselines bootstrap thousands of replicates, and scikit-learn takes one vector per call (1-4 ms
each on this project's CPU, minutes per task); tests check both forms against scikit-learn.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


class MetricError(ValueError):
    """An unknown metric name, or a metric that does not fit the task (e.g. binary F1 with three labels)."""


@dataclass(frozen=True)
class Metric:
    """``score(y_true [n], y_pred [n]) -> float`` (scikit-learn) and ``from_confusion(counts [..., K, K]) -> [...]``
    (rows: true class, columns: predicted class); ``low``/``high``: the range; ``binary_only``: needs 2 labels."""

    name: str
    label: str
    score: Callable[[np.ndarray, np.ndarray], float]
    from_confusion: Callable[[np.ndarray], np.ndarray]
    low: float
    high: float
    binary_only: bool = False


_REGISTRY: dict[str, Metric] = {}


def register_metric(metric: Metric) -> Metric:
    """Add a metric to the registry (names are unique); returns it."""
    if metric.name in _REGISTRY:
        raise MetricError(f"metric {metric.name!r} is already registered")
    _REGISTRY[metric.name] = metric
    return metric


def get_metric(name: str) -> Metric:
    """The registered metric ``name``; MetricError naming the known ones otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise MetricError(f"unknown metric {name!r}; known: {sorted(_REGISTRY)}") from None


def known_metrics() -> list[str]:
    return sorted(_REGISTRY)


def check_metrics(names: list[str], num_labels: int) -> None:
    """MetricError unless every name is registered and fits a task of ``num_labels`` classes."""
    for n in names:
        m = get_metric(n)
        if m.binary_only and num_labels != 2:
            raise MetricError(f"metric {n!r} ({m.label}) needs a 2-class task, not {num_labels} classes")


def compute(names: list[str], y_true, y_pred) -> dict[str, float]:
    """{name: value} for the named metrics of predictions ``y_pred`` [n] against labels ``y_true`` [n]."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    return {n: float(get_metric(n).score(y_true, y_pred)) for n in names}


def confusion_counts(y_true, y_pred, num_labels: int) -> np.ndarray:
    """Confusion counts [..., K, K] (rows true, columns predicted) of label/prediction arrays [..., n] (the leading
    axes: e.g. bootstrap replicates), by one bincount."""
    y_true, y_pred = np.broadcast_arrays(np.asarray(y_true), np.asarray(y_pred))
    lead = y_true.shape[:-1]
    k = num_labels
    flat = (y_true * k + y_pred).reshape(-1, y_true.shape[-1])
    offs = np.arange(flat.shape[0])[:, None] * k * k
    counts = np.bincount((flat + offs).ravel(), minlength=flat.shape[0] * k * k)
    return counts.reshape(*lead, k, k)


def compute_batched(names: list[str], y_true, y_pred, num_labels: int) -> dict[str, np.ndarray]:
    """{name: values [...]} for label/prediction arrays [..., n] (many replicates at once, same values as
    ``compute`` per replicate)."""
    c = confusion_counts(y_true, y_pred, num_labels).astype(np.float64)
    return {n: get_metric(n).from_confusion(c) for n in names}


# -- built-in metrics ------------------------------------------------------------------------------------------------
def _accuracy(y, p) -> float:
    from sklearn.metrics import accuracy_score

    return accuracy_score(y, p)


def _f1(y, p) -> float:
    from sklearn.metrics import f1_score

    return f1_score(y, p, average="binary", pos_label=1, zero_division=0.0)


def _mcc(y, p) -> float:
    from sklearn.metrics import matthews_corrcoef

    return matthews_corrcoef(y, p)


def _acc_c(c: np.ndarray) -> np.ndarray:
    return np.trace(c, axis1=-2, axis2=-1) / c.sum((-2, -1))


def _f1_c(c: np.ndarray) -> np.ndarray:
    # as scikit-learn with zero_division=0: 0 when there is no positive label or prediction
    tp, fp, fn = c[..., 1, 1], c[..., 0, 1], c[..., 1, 0]
    den = 2 * tp + fp + fn
    return np.where(den > 0, 2 * tp / np.where(den > 0, den, 1), 0.0)


def _mcc_c(c: np.ndarray) -> np.ndarray:
    # the multiclass form scikit-learn uses (Gorodkin 2004); 0 when either marginal is constant, as scikit-learn
    t, p = c.sum(-1), c.sum(-2)
    correct, s = np.trace(c, axis1=-2, axis2=-1), c.sum((-2, -1))
    cov_ytyp = correct * s - (t * p).sum(-1)
    cov_ypyp = s**2 - (p * p).sum(-1)
    cov_ytyt = s**2 - (t * t).sum(-1)
    den = cov_ytyt * cov_ypyp
    return np.where(den > 0, cov_ytyp / np.sqrt(np.where(den > 0, den, 1)), 0.0)


ACCURACY = register_metric(Metric("accuracy", "accuracy", _accuracy, _acc_c, 0.0, 1.0))
F1 = register_metric(Metric("f1", "F1 (positive class)", _f1, _f1_c, 0.0, 1.0, binary_only=True))
MCC = register_metric(Metric("mcc", "MCC", _mcc, _mcc_c, -1.0, 1.0))
