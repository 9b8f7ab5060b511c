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


# -- degenerate representations (issue 14 item 2) ----------------------------------------------------------------
def _all_but_one_identical(seed=0, n=40, d=16):
    """What the embedding layer's last-token vectors look like when all probe sentences but one end with the same
    token: 39 identical rows and one other."""
    rng = _rng(seed)
    x = np.tile(rng.normal(size=(1, d)), (n, 1))
    x[-1] = rng.normal(size=d)
    return x


def test_debiased_cka_of_all_but_one_identical_rows_is_undefined_not_a_number():
    """Was: debiased linear_cka(x, x) = -1.0, (x, 2x+1) = -0.52..-0.77, against random data NaN with a warning."""
    x = _all_but_one_identical()
    other = _rng(1).normal(size=x.shape)
    for y in (x, 2 * x + 1, other):
        with pytest.raises(S.UndefinedSimilarity, match="debiased"):
            S.linear_cka(x, y, debiased=True)
        with pytest.raises(S.UndefinedSimilarity):
            S.linear_cka(y, x, debiased=True)
    # the biased estimator has a non-zero self-HSIC here (one distinct row): defined, and 1 for x vs 2x + 1
    assert S.linear_cka(x, x) == pytest.approx(1.0)
    assert S.linear_cka(x, 2 * x + 1) == pytest.approx(1.0)
    assert 0.0 <= S.linear_cka(x, other) <= 1.0


def _shapes():
    rng = _rng(7)
    x = rng.normal(size=(40, 16))
    const_cols = x.copy()
    const_cols[:, :5] = 3.0
    zero_rows = x.copy()
    zero_rows[[3, 17]] = 0.0
    return {"all_but_one_identical": _all_but_one_identical(), "constant_columns": const_cols,
            "all_columns_constant": np.full((40, 16), 2.5), "zero_rows": zero_rows,
            "all_rows_zero": np.zeros((40, 16)), "offset_1e6": x + 1e6}


MEASURES = {
    "cka_biased": (lambda x, y: S.linear_cka(x, y), (0.0, 1.0)),
    "cka_debiased": (lambda x, y: S.linear_cka(x, y, debiased=True), (-1.0, 1.0)),
    "cka_biased_gram": (lambda x, y: S.GramStats(x).cka(S.GramStats(y), False), (0.0, 1.0)),
    "cosine_raw": (lambda x, y: S.cosine_similarity(x, y), (-1.0, 1.0)),
    "cosine_std": (lambda x, y: S.cosine_similarity(x, y, standardize=True), (-1.0, 1.0)),
}


@pytest.mark.parametrize("measure", sorted(MEASURES))
@pytest.mark.parametrize("shape", sorted(_shapes()))
def test_every_measure_on_degenerate_shapes_is_in_range_or_undefined(measure, shape):
    """Every measure, against itself, an affine copy and unrelated data: a number in its range, or
    UndefinedSimilarity; never NaN, never a numpy warning, never out of range."""
    import warnings

    fn, (lo, hi) = MEASURES[measure]
    x = _shapes()[shape]
    partners = {"self": x, "affine": 2 * x + 1, "random": _rng(11).normal(size=x.shape)}
    for name, y in partners.items():
        for a, b in ((x, y), (y, x)):
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                try:
                    v = fn(a, b)
                except S.UndefinedSimilarity:
                    continue
            assert np.isfinite(v) and lo <= v <= hi, (name, v)


def test_which_degenerate_shapes_are_undefined():
    sh = _shapes()
    for name in ("all_columns_constant", "all_rows_zero"):  # every row identical: nothing is estimable but raw cosine
        for debiased in (False, True):
            with pytest.raises(S.UndefinedSimilarity):
                S.linear_cka(sh[name], _rng(0).normal(size=(40, 16)), debiased)
        with pytest.raises(S.UndefinedSimilarity):
            S.cosine_similarity(sh[name], sh[name], standardize=True)
    # pooled standardization keeps a shift between the two visible: constant x vs x + 1 is defined (-1)
    assert S.cosine_similarity(sh["all_columns_constant"], sh["all_columns_constant"] + 1, True) == pytest.approx(-1)
    with pytest.raises(S.UndefinedSimilarity):
        S.cosine_similarity(sh["all_rows_zero"], sh["all_rows_zero"] + 1)
    assert S.cosine_similarity(sh["all_columns_constant"], sh["all_columns_constant"]) == pytest.approx(1.0)
    # a zero row has no direction: undefined for that row only, and the scalar mean refuses to hide it
    z = sh["zero_rows"]
    per = S.cosine_per_example(z, z + 0.1)
    assert np.isnan(per[[3, 17]]).all() and np.isfinite(np.delete(per, [3, 17])).all()
    with pytest.raises(S.UndefinedSimilarity, match=r"\[3, 17\]"):
        S.cosine_similarity(z, z + 0.1)
    assert S.linear_cka(z, z, debiased=True) == pytest.approx(1.0)  # a row at the origin is just a point


def test_constant_columns_change_nothing_but_raw_cosine():
    rng = _rng(12)
    x, y = rng.normal(size=(50, 10)), rng.normal(size=(50, 10))
    y[:, :4] += x[:, :4]
    xc, yc = np.hstack([x, np.full((50, 3), 7.0)]), np.hstack([y, np.full((50, 3), -2.0)])
    for debiased in (False, True):
        assert S.linear_cka(xc, yc, debiased) == pytest.approx(S.linear_cka(x, y, debiased), rel=1e-9)
    xs, ys = np.hstack([x, np.full((50, 3), 7.0)]), np.hstack([y, np.full((50, 3), 7.0)])
    assert S.cosine_similarity(xs, ys, standardize=True) == pytest.approx(
        S.cosine_similarity(x, y, standardize=True), rel=1e-9)


@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize("offset", [1e6, -3e7])
def test_invariances_hold_for_large_offsets(debiased, offset):
    """x + 1e6 was refused as 'zero variance' (the test compared the centered norm with the raw one)."""
    rng = _rng(13)
    x = rng.normal(size=(60, 20))
    y = np.tanh(x @ rng.normal(size=(20, 30))) + 0.3 * rng.normal(size=(60, 30))
    base = S.linear_cka(x, y, debiased)
    q, _ = np.linalg.qr(rng.normal(size=(30, 30)))
    assert S.linear_cka(x + offset, y, debiased) == pytest.approx(base, rel=1e-6)
    assert S.linear_cka(x, (y + offset) @ q, debiased) == pytest.approx(base, rel=1e-6)
    assert S.linear_cka(3.5 * x + offset, y - offset, debiased) == pytest.approx(base, rel=1e-6)
    assert S.linear_cka(x + offset, x + offset, debiased) == pytest.approx(1.0, abs=1e-9)


def test_leave_one_out_marks_non_estimable_values():
    """Two distinct rows among 38 identical ones: the full-sample debiased CKA is defined, but leaving out either
    distinct row leaves a zero self-HSIC, so those two leave-one-out values are undefined (NaN), not -1 or NaN by
    accident."""
    rng = _rng(14)
    x = np.tile(rng.normal(size=(1, 8)), (40, 1))
    x[-2:] = rng.normal(size=(2, 8))
    g = S.GramStats(x)
    assert g.undefined_debiased is None
    loo = g.cka_debiased_loo(S.GramStats(2 * x + 1))
    assert np.isnan(loo[-2:]).all() and np.allclose(loo[:-2], 1.0)
