import numpy as np
import pytest

from lorastudy import similarity as S


def _rng(seed=0):
    return np.random.default_rng(seed)


def _plain_gram_cka(x, y, debiased):
    """Reference: explicit centering matrix H and the textbook formulas."""
    n = x.shape[0]
    k, l_ = x @ x.T, y @ y.T
    if not debiased:
        h = np.eye(n) - np.ones((n, n)) / n
        hsic = lambda a, b: np.trace(a @ h @ b @ h)  # noqa: E731
    else:
        def hsic(a, b):
            a, b = a.copy(), b.copy()
            np.fill_diagonal(a, 0)
            np.fill_diagonal(b, 0)
            one = np.ones(n)
            return (np.trace(a @ b) + (one @ a @ one) * (one @ b @ one) / ((n - 1) * (n - 2))
                    - 2 / (n - 2) * one @ a @ b @ one) / (n * (n - 3))
    return hsic(k, l_) / np.sqrt(hsic(k, k) * hsic(l_, l_))


@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize("n,p1,p2", [(50, 8, 12), (30, 80, 60)])  # width below and above n
def test_matches_plain_gram_computation(debiased, n, p1, p2):
    rng = _rng(n + p1)
    x = rng.normal(size=(n, p1))
    y = x[:, :min(p1, p2)] @ rng.normal(size=(min(p1, p2), p2)) + rng.normal(size=(n, p2))
    assert S.linear_cka(x, y, debiased) == pytest.approx(_plain_gram_cka(x, y, debiased), rel=1e-9)


@pytest.mark.parametrize("debiased", [False, True])
def test_invariances(debiased):
    rng = _rng(1)
    x = rng.normal(size=(60, 20))
    y = np.tanh(x @ rng.normal(size=(20, 30))) + 0.3 * rng.normal(size=(60, 30))
    base = S.linear_cka(x, y, debiased)
    q, _ = np.linalg.qr(rng.normal(size=(30, 30)))
    assert S.linear_cka(x, y @ q, debiased) == pytest.approx(base, rel=1e-9)  # orthogonal transform
    assert S.linear_cka(x, 7.5 * y, debiased) == pytest.approx(base, rel=1e-9)  # isotropic scaling
    assert S.linear_cka(x + 3.0, y - 11.0, debiased) == pytest.approx(base, rel=1e-9)  # translation
    assert S.linear_cka(y, x, debiased) == pytest.approx(base, rel=1e-12)  # symmetry
    assert S.linear_cka(x, x, debiased) == pytest.approx(1.0, abs=1e-12)  # self-similarity


def test_not_invariant_to_anisotropic_scaling():
    rng = _rng(2)
    x = rng.normal(size=(60, 10))
    scale = np.ones(10)
    scale[0] = 50
    assert S.linear_cka(x, x * scale) < 0.9


def test_debiased_near_zero_for_independent_wide_data_while_biased_is_inflated():
    rng = _rng(3)
    vals_b, vals_d = [], []
    for _ in range(5):
        x, y = rng.normal(size=(100, 500)), rng.normal(size=(100, 500))  # width > n
        vals_b.append(S.linear_cka(x, y))
        vals_d.append(S.linear_cka(x, y, debiased=True))
    assert np.mean(vals_b) > 0.5
    assert abs(np.mean(vals_d)) < 0.03


def test_leave_one_out_closed_form_matches_brute_force():
    rng = _rng(4)
    x = rng.normal(size=(25, 7))
    y = x @ rng.normal(size=(7, 9)) + rng.normal(size=(25, 9))
    loo = S.GramStats(x).cka_debiased_loo(S.GramStats(y))
    for i in range(25):
        keep = np.delete(np.arange(25), i)
        assert loo[i] == pytest.approx(S.linear_cka(x[keep], y[keep], debiased=True), rel=1e-9)


def test_cosine():
    rng = _rng(5)
    x = rng.normal(size=(40, 16))
    assert S.cosine_similarity(x, x) == pytest.approx(1.0)
    assert S.cosine_similarity(x, -x) == pytest.approx(-1.0)
    assert S.cosine_similarity(x, x, standardize=True) == pytest.approx(1.0)
    # one massive dimension dominates raw cosine; standardizing removes that
    y = rng.normal(size=(40, 16))
    x[:, 0] += 100
    y[:, 0] += 100
    assert S.cosine_similarity(x, y) > 0.99
    assert abs(S.cosine_similarity(x, y, standardize=True)) < 0.2


@pytest.mark.parametrize(
    "x,y,msg",
    [
        (np.ones((3, 4)), np.ones((3, 4)), "at least 4"),
        (np.random.default_rng(0).normal(size=(6, 4)), np.random.default_rng(1).normal(size=(5, 4)), "same rows"),
        (np.ones((6, 4)), np.random.default_rng(1).normal(size=(6, 4)), "zero variance"),
        (np.full((6, 4), np.nan), np.ones((6, 4)), "NaN"),
        (np.ones(6), np.ones(6), "2-D"),
    ],
)
def test_clear_errors(x, y, msg):
    with pytest.raises(S.SimilarityError, match=msg):
        S.linear_cka(x, y)


def test_cosine_errors():
    with pytest.raises(S.SimilarityError, match="same width"):
        S.cosine_similarity(np.ones((5, 3)), np.ones((5, 4)))
    z = np.random.default_rng(0).normal(size=(5, 3))
    z[2] = 0
    with pytest.raises(S.SimilarityError, match="zero-norm"):
        S.cosine_similarity(z, z)


def test_gram_form_matches_feature_form_for_biased_cka():
    rng = _rng(9)
    x, y = rng.normal(size=(30, 12)), rng.normal(size=(30, 20))
    y[:, :12] += x
    assert S.GramStats(x).cka(S.GramStats(y), debiased=False) == pytest.approx(S.linear_cka(x, y), rel=1e-10)
