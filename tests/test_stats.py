import itertools

import numpy as np
import pytest

from lorastudy import stats as T


def _brute_independent_p(a, b):
    pooled = np.concatenate([a, b])
    obs = abs(np.mean(a) - np.mean(b))
    hits = total = 0
    for idx in itertools.combinations(range(len(pooled)), len(a)):
        mask = np.zeros(len(pooled), bool)
        mask[list(idx)] = True
        d = abs(pooled[mask].mean() - pooled[~mask].mean())
        hits += d >= obs - 1e-12
        total += 1
    return hits / total, total


@pytest.mark.parametrize("seed", range(5))
def test_exact_permutation_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=3), rng.normal(0.5, size=3)
    r = T.permutation_test_independent(a, b)
    p, total = _brute_independent_p(a, b)
    assert r.exact and r.n_permutations == total == 20
    assert r.p_value == pytest.approx(p)
    assert r.min_p_value == pytest.approx(0.1)


def test_three_vs_three_floor_is_point_one():
    r = T.permutation_test_independent([10, 11, 12], [0, 1, 2])
    assert r.p_value == pytest.approx(0.1) and r.min_p_value == pytest.approx(0.1)


def test_monte_carlo_when_too_many_relabelings():
    rng = np.random.default_rng(0)
    r = T.permutation_test_independent(rng.normal(size=30), rng.normal(size=30), n_resamples=2000)
    assert not r.exact and r.n_permutations == 2000


def test_paired_sign_flip_exact_small():
    d = np.array([0.3, 0.5, 0.2, 0.4])
    r = T.permutation_test_paired(d)
    assert r.exact and r.n_permutations == 16
    assert r.p_value == pytest.approx(2 / 16)


def test_bootstrap_ci_coverage_on_simulated_data():
    rng = np.random.default_rng(1)
    hits = 0
    trials = 200
    for i in range(trials):
        x = rng.normal(2.0, 1.0, size=40)
        lo, hi = T.bootstrap_ci((x,), np.mean, n_resamples=1000, seed=i)
        hits += lo <= 2.0 <= hi
    assert 0.88 <= hits / trials <= 0.99  # nominal 0.95; percentile bootstrap at n=40 is a little short


def test_jackknife_mean_equals_classical_se():
    rng = np.random.default_rng(2)
    x = rng.normal(size=50)
    loo = np.array([np.delete(x, i).mean() for i in range(50)])
    j = T.jackknife(x.mean(), loo)
    assert j["se"] == pytest.approx(x.std(ddof=1) / np.sqrt(50))
    assert j["bias_corrected"] == pytest.approx(x.mean())


def test_corrections_name_the_family():
    c = T.correct([0.01, 0.04, 0.03], "holm", family="H1b per task")
    assert c["family"] == "H1b per task" and c["m"] == 3
    assert c["adjusted"] == pytest.approx([0.03, 0.06, 0.06])
    b = T.correct([0.01, 0.04], "bonferroni", family="f")
    assert b["adjusted"] == pytest.approx([0.02, 0.08])


def test_effect_sizes_and_t():
    assert T.cohens_d([1, 2, 3], [1, 2, 3]) == 0
    assert T.cohens_d([2, 3, 4], [1, 2, 3]) == pytest.approx(1.0)
    assert T.cohens_dz([1, 2, 3]) == pytest.approx(2.0)
    r = T.paired_t([1, 2, 3, 4], [0, 1, 2, 4])
    assert 0 < r.p_value < 1
