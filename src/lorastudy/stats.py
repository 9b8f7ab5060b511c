"""Statistics (pure: no I/O). Permutation tests that say when they are exact, bootstrap and jackknife CIs,
multiple-comparison corrections with the family named, effect sizes, paired tests.

scipy.stats does the permutation tests: with ``n_resamples`` at least the number of distinct relabelings it
enumerates them exactly (3 vs 3 seeds: 20 relabelings, so the smallest two-sided p is 2/20 = 0.1).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
from scipy import stats as ss

Alternative = Literal["two-sided", "less", "greater"]


@dataclass(frozen=True)
class TestResult:
    test: str
    statistic: float
    p_value: float
    n_permutations: int | None = None  # distinct relabelings (or resamples drawn when not exact)
    exact: bool | None = None
    min_p_value: float | None = None  # the floor a test of this design can reach
    alternative: str = "two-sided"

    def as_dict(self) -> dict:
        return asdict(self)


def _mean_diff(x, y, axis=-1):
    return np.mean(x, axis=axis) - np.mean(y, axis=axis)


def n_independent_relabelings(n_a: int, n_b: int) -> int:
    return math.comb(n_a + n_b, n_a)


def permutation_test_independent(a, b, alternative: Alternative = "two-sided", n_resamples: int = 10000,
                                 seed: int = 0) -> TestResult:
    """Difference of means between two independent groups (e.g. LoRA seeds vs full-FT seeds).

    Exact (all relabelings enumerated) when their number is at most ``n_resamples``; otherwise Monte Carlo with
    ``n_resamples`` draws, and the result says which."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 1 or len(b) < 1:
        raise ValueError("each group needs at least one value")
    n_perm = n_independent_relabelings(len(a), len(b))
    exact = n_perm <= n_resamples
    res = ss.permutation_test((a, b), _mean_diff, permutation_type="independent", alternative=alternative,
                              n_resamples=n_resamples, vectorized=True, rng=np.random.default_rng(seed))
    # smallest attainable p: the most extreme relabeling(s) alone; for two-sided the mirror counts as well
    min_p = (2 if alternative == "two-sided" else 1) / n_perm if exact else 1 / (n_resamples + 1)
    return TestResult("permutation (independent, difference of means)", float(res.statistic), float(res.pvalue),
                      n_perm if exact else n_resamples, exact, min(min_p, 1.0), alternative)


def permutation_test_paired(d, alternative: Alternative = "two-sided", n_resamples: int = 10000,
                            seed: int = 0) -> TestResult:
    """Sign-flip test of mean(d) = 0 for paired differences ``d`` (e.g. per probe example)."""
    d = np.asarray(d, float)
    if len(d) < 2:
        raise ValueError("need at least two paired differences")
    n_perm = 2 ** len(d) if len(d) < 63 else None
    exact = n_perm is not None and n_perm <= n_resamples

    def stat(x, axis=-1):
        return np.mean(x, axis=axis)

    res = ss.permutation_test((d,), stat, permutation_type="samples", alternative=alternative,
                              n_resamples=n_resamples, vectorized=True, rng=np.random.default_rng(seed))
    min_p = ((2 if alternative == "two-sided" else 1) / n_perm) if exact else 1 / (n_resamples + 1)
    return TestResult("paired sign-flip permutation (mean difference)", float(res.statistic), float(res.pvalue),
                      n_perm if exact else n_resamples, exact, min(min_p, 1.0), alternative)


def paired_t(a, b, alternative: Alternative = "two-sided") -> TestResult:
    r = ss.ttest_rel(np.asarray(a, float), np.asarray(b, float), alternative=alternative)
    return TestResult("paired t-test", float(r.statistic), float(r.pvalue), alternative=alternative)


def one_sample_t(d, popmean: float = 0.0, alternative: Alternative = "two-sided") -> TestResult:
    r = ss.ttest_1samp(np.asarray(d, float), popmean, alternative=alternative)
    return TestResult("one-sample t-test", float(r.statistic), float(r.pvalue), alternative=alternative)


def cohens_d(a, b) -> float:
    """Independent groups, pooled standard deviation (nan when both groups have no spread)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    na, nb = len(a), len(b)
    if na < 2 or nb < 2:
        return float("nan")
    sp = math.sqrt(((na - 1) * a.var(ddof=1) + (nb - 1) * b.var(ddof=1)) / (na + nb - 2))
    return float((a.mean() - b.mean()) / sp) if sp > 0 else float("nan")


def cohens_dz(d) -> float:
    """Paired effect size: mean difference over the standard deviation of differences."""
    d = np.asarray(d, float)
    sd = d.std(ddof=1) if len(d) > 1 else 0.0
    return float(d.mean() / sd) if sd > 0 else float("nan")


def bootstrap_ci(data, statistic, n_resamples: int = 10000, confidence: float = 0.95, seed: int = 0,
                 paired: bool = True, method: str = "percentile") -> tuple[float, float]:
    """Bootstrap CI with scipy. ``data``: a tuple of arrays; ``paired`` resamples their rows together.
    ``statistic`` must accept ``axis`` (vectorized)."""
    res = ss.bootstrap(tuple(np.asarray(x, float) for x in data), statistic, n_resamples=n_resamples,
                       confidence_level=confidence, paired=paired, vectorized=True, method=method,
                       rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def percentile_ci(samples, confidence: float = 0.95) -> tuple[float, float]:
    q = (1 - confidence) / 2
    lo, hi = np.quantile(np.asarray(samples, float), [q, 1 - q])
    return float(lo), float(hi)


def jackknife(theta_full: float, theta_loo, confidence: float = 0.95) -> dict:
    """Delete-one jackknife: bias-corrected estimate, standard error and a t-based CI from leave-one-out values.

    Used for CKA-based quantities: debiased HSIC is a U-statistic, and bootstrap resamples with replacement put
    duplicate rows into it (a duplicate pair looks perfectly similar), which biases it; the jackknife has no
    duplicates and its leave-one-out values have a closed form (similarity.hsic_unbiased_loo)."""
    loo = np.asarray(theta_loo, float)
    n = len(loo)
    mean_loo = loo.mean()
    se = math.sqrt((n - 1) / n * ((loo - mean_loo) ** 2).sum())
    pseudo = n * theta_full - (n - 1) * loo
    est = float(pseudo.mean())
    t = ss.t.ppf(0.5 + confidence / 2, n - 1)
    return {"estimate": float(theta_full), "bias_corrected": est, "se": float(se),
            "ci": (float(theta_full - t * se), float(theta_full + t * se)), "pseudo_values": pseudo}


def correct(pvalues, method: Literal["bonferroni", "holm"], family: str, alpha: float = 0.05) -> dict:
    """Multiple-comparison correction over a named family of tests (statsmodels)."""
    from statsmodels.stats.multitest import multipletests  # lazy: heavy import, only the analyses need it

    p = np.asarray(pvalues, float)
    if p.size == 0:
        return {"method": method, "family": family, "m": 0, "adjusted": [], "reject": []}
    reject, adj, _, _ = multipletests(p, alpha=alpha, method=method)
    return {"method": method, "family": family, "m": int(p.size), "alpha": alpha,
            "adjusted": [float(x) for x in adj], "reject": [bool(x) for x in reject]}


def mean_std(x) -> tuple[float, float]:
    x = np.asarray(x, float)
    return float(x.mean()), float(x.std(ddof=1)) if len(x) > 1 else 0.0


def paired_ratio_bootstrap(x_units, y_units, n_resamples: int = 2000, confidence: float = 0.95,
                           seed: int = 0) -> dict:
    """``mean(x) / mean(y) - 1`` (e.g. a latency overhead) with a percentile bootstrap over *paired units*.

    ``x_units[r]`` and ``y_units[r]`` are the means of unit r of each condition, where a unit is a block of
    consecutive observations measured side by side with its partner (timing repeats interleaved in time). Resampling
    whole units instead of single observations keeps the dependence inside a block (the block bootstrap of Künsch
    1989, with the repeats as blocks): consecutive latencies share the machine's state (clocks, caches, other load),
    so treating them as independent draws makes the CI far too narrow. Pairing the units cancels drift that affects
    both conditions of a repeat alike. scipy.stats.bootstrap does the resampling.

    Returns {"estimate", "ci": (low, high), "distribution": ndarray[n_resamples], "n_units"}. Raises ValueError for
    fewer than 2 units, unequal lengths or a non-positive mean of ``y``."""
    x, y = np.asarray(x_units, float), np.asarray(y_units, float)
    if x.shape != y.shape or x.ndim != 1 or len(x) < 2:
        raise ValueError(f"need two equal-length 1-D arrays of at least 2 paired units, got {x.shape} and {y.shape}")
    if y.mean() <= 0:
        raise ValueError("the reference condition's mean must be positive")

    def ratio(a, b, axis=-1):
        return np.mean(a, axis=axis) / np.mean(b, axis=axis) - 1

    res = ss.bootstrap((x, y), ratio, n_resamples=n_resamples, confidence_level=confidence, paired=True,
                       vectorized=True, method="percentile", rng=np.random.default_rng(seed))
    ci = (float(res.confidence_interval.low), float(res.confidence_interval.high))
    return {"estimate": float(ratio(x, y)), "ci": ci, "distribution": np.asarray(res.bootstrap_distribution, float),
            "n_units": len(x)}


def bootstrap_p_value(distribution, null_value: float, alternative: Literal["less", "greater"]) -> float:
    """One-sided bootstrap p-value of H0 against ``alternative`` (e.g. "less": H1 says the quantity is below
    ``null_value``): the share of bootstrap replicates on the null side, with the +1 correction of Davison & Hinkley
    (1997, eq. 4.11) so that p is never 0."""
    d = np.asarray(distribution, float)
    on_null_side = np.sum(d >= null_value) if alternative == "less" else np.sum(d <= null_value)
    return float((on_null_side + 1) / (len(d) + 1))
