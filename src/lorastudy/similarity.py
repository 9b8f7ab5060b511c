"""Representation similarity (pure functions, float64 inside, no I/O).

- Linear CKA, biased (Kornblith et al. 2019) and debiased, i.e. built on the unbiased HSIC estimator of Song et al.
  (2012), as used by Nguyen et al. (2021). With n of a few hundred and widths of 576-2048 the biased estimator is
  inflated (even independent data score high); the debiased one is near 0 there.
- Cosine similarity per example, raw or after z-scoring each dimension (a few massive-activation dimensions
  dominate raw cosine in LLMs).

No library ships a debiased CKA with a leave-one-out form, so these are written here; tests check them against a
plain Gram-matrix computation and known invariances.
"""

from __future__ import annotations

import numpy as np


class SimilarityError(ValueError):
    """Bad input: wrong shape, misaligned rows, NaN or inf."""


class UndefinedSimilarity(SimilarityError):
    """The measure is not estimable on these inputs (e.g. every row identical up to rounding, or a debiased
    self-HSIC of zero): it is undefined, never a number. Callers report it as such and leave it out of means."""


# Debiased self-HSIC below this fraction of the biased one (same centered Gram matrix, same normalisation) is zero up
# to rounding: measured at ~1e-16 for 40 rows of which 39 are identical (exactly 0 in exact arithmetic), against
# ~0.3 with two distinct rows, so the margin is wide on both sides.
REL_TOL = 1e-10


def _unit(a: np.ndarray) -> float:
    """Unit roundoff of the input's own precision (float16/32/64): differences below it are not in the data."""
    return float(np.finfo(a.dtype).eps) if np.issubdtype(a.dtype, np.floating) else float(np.finfo(np.float64).eps)


def _check(x, y=None, *, same_width: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    xs = [np.asarray(x)]
    if y is not None:
        xs.append(np.asarray(y))
    for a, name in zip(xs, "xy", strict=False):
        if a.ndim != 2:
            raise SimilarityError(f"{name} must be 2-D (n examples x p features), got shape {a.shape}")
        if a.shape[0] < 4:
            raise SimilarityError(f"{name} has {a.shape[0]} rows; need at least 4 examples")
        if not np.isfinite(a).all():
            raise SimilarityError(f"{name} contains NaN or inf")
    if y is not None:
        if xs[0].shape[0] != xs[1].shape[0]:
            raise SimilarityError(f"x and y must have the same rows (aligned examples): {xs[0].shape[0]} vs "
                                  f"{xs[1].shape[0]}")
        if same_width and xs[0].shape[1] != xs[1].shape[1]:
            raise SimilarityError(f"cosine needs the same width: {xs[0].shape[1]} vs {xs[1].shape[1]}")
    return xs[0], (xs[1] if y is not None else None)


def _center(x: np.ndarray) -> tuple[np.ndarray, bool]:
    """Column-centered float64 copy of ``x`` and whether it is zero up to the input's rounding (every row the same).

    Centering comes first, in float64, so that a large offset (x + 1e6) cancels exactly as far as the data allow
    and the Gram matrices see only the variation; the rounding test is relative to the input's own precision and
    magnitude (a float32 row that differs from the others only in its last bit is not variation)."""
    xa = np.asarray(x, dtype=np.float64)
    xc = xa - xa.mean(axis=0, keepdims=True)
    scale = float(np.abs(xa).max()) if xa.size else 0.0
    constant = not np.any(xc) or float(np.abs(xc).max()) <= 4 * xa.shape[0] * _unit(np.asarray(x)) * scale
    return xc, constant


def gram(x) -> np.ndarray:
    """Linear-kernel Gram matrix (n x n, float64) of column-centered ``x`` (n x p).

    Raises SimilarityError on bad input and UndefinedSimilarity when every row is identical (up to rounding)."""
    xa, _ = _check(x)
    xc, constant = _center(xa)
    if constant:
        raise UndefinedSimilarity("x has zero variance (all rows identical up to rounding); CKA is undefined")
    return xc @ xc.T


def _offdiag(k: np.ndarray) -> np.ndarray:
    k = k.copy()
    np.fill_diagonal(k, 0.0)
    return k


def linear_cka(x, y, debiased: bool = False) -> float:
    """Linear CKA between representations ``x`` (n x p1) and ``y`` (n x p2) of the same n examples (rows aligned).

    Biased: Kornblith et al. (2019), in [0, 1]. Debiased: unbiased HSIC (Song et al. 2012; Nguyen et al. 2021), in
    [-1, 1]; about 0 for unrelated data. Invariant to orthogonal transforms, isotropic scaling and translation (also
    for large offsets: centering is done first, in float64). Correct for widths larger than n (Gram form).

    Raises SimilarityError on bad input, UndefinedSimilarity when a self-HSIC is zero up to rounding: every row
    identical (both estimators), or a debiased self-HSIC of zero, e.g. 40 rows of which 39 are identical (the
    U-statistic needs two distinct pairs of rows)."""
    xa, ya = _check(x, y)
    if not debiased and max(xa.shape[1], ya.shape[1]) <= xa.shape[0]:
        # feature-space form, cheaper when the width is below n
        (xc, cx), (yc, cy) = _center(xa), _center(ya)
        if cx or cy:
            raise UndefinedSimilarity(f"{'x' if cx else 'y'} has zero variance (all rows identical up to "
                                      "rounding); CKA is undefined")
        num = np.linalg.norm(yc.T @ xc) ** 2
        return float(np.clip(num / (np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc)), 0.0, 1.0))
    return GramStats(xa).cka(GramStats(ya), debiased)


def hsic_unbiased_loo(k: np.ndarray, l: np.ndarray) -> np.ndarray:  # noqa: E741
    """Unbiased HSIC (Song et al. 2012, eq. 5) with example i left out, for every i, in O(n^2) total (closed form).

    With K~, L~ the zero-diagonal Grams, r = row sums, p = row sums of K~*L~, removing i changes
    sum(K~*L~) by -2 p_i, sum(K~) by -2 rK_i, and sum_k (rK_k)(rL_k) to
    sum_k rK_k rL_k - (K~ rL)_i - (L~ rK)_i + p_i - rK_i rL_i."""
    n = k.shape[0]
    m = n - 1
    if m < 4:
        raise SimilarityError("need at least 5 examples for leave-one-out HSIC")
    kt, lt = _offdiag(k), _offdiag(l)
    rk, rl = kt.sum(1), lt.sum(1)
    p = np.einsum("ij,ij->i", kt, lt)
    t1 = p.sum() - 2 * p
    sk = rk.sum() - 2 * rk
    sl = rl.sum() - 2 * rl
    t3 = float(rk @ rl) - kt @ rl - lt @ rk + p - rk * rl
    return (t1 + sk * sl / ((m - 1) * (m - 2)) - 2.0 / (m - 2) * t3) / (m * (m - 3))


class GramStats:
    """A Gram matrix with what every CKA against it needs, computed once: the zero-diagonal matrix, its row sums,
    its diagonal, and its self-HSIC terms (biased and unbiased, and unbiased leave-one-out). Many models are
    compared with one base model per layer, so this saves recomputing the base terms for each of them.

    Degenerate inputs are not refused here: ``undefined_biased`` / ``undefined_debiased`` say why an estimator is
    not estimable (None when it is), and ``cka`` raises UndefinedSimilarity for them."""

    def __init__(self, x):
        xa, _ = _check(x)
        xc, constant = _center(xa)
        self.k = xc @ xc.T
        self.n = self.k.shape[0]
        self.diag = np.diag(self.k).copy()
        self.kt = _offdiag(self.k)
        self.r = self.kt.sum(1)
        self.s = float(self.r.sum())
        self.self_b = self.hsic_b(self)
        self.self_u = self.hsic_u(self)
        self._self_loo = None
        self.undefined_biased = "all rows identical up to rounding" if constant else None
        # the unbiased self-HSIC is a squared norm (of the U-centered Gram matrix; Szekely & Rizzo 2014), so it is
        # >= 0 in exact arithmetic; zero means fewer than two distinct pairs of rows, and rounding then gives a tiny
        # value of either sign (debiased CKA of -1.0 or NaN before this check)
        self.undefined_debiased = self.undefined_biased or (
            "debiased self-HSIC is zero up to rounding (too few distinct rows, e.g. all but one identical)"
            if self.self_u <= REL_TOL * self.self_b / (self.n * (self.n - 3)) else None)

    def hsic_b(self, o: GramStats) -> float:
        return float(np.einsum("ij,ij->", self.kt, o.kt) + self.diag @ o.diag)

    def hsic_u(self, o: GramStats) -> float:
        n = self.n
        t1 = float(np.einsum("ij,ij->", self.kt, o.kt))
        return (t1 + self.s * o.s / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * float(self.r @ o.r)) / (n * (n - 3))

    def cka(self, o: GramStats, debiased: bool) -> float:
        """CKA against ``o`` (same rows): in [-1, 1] debiased, [0, 1] biased (rounding clipped).

        Raises UndefinedSimilarity when either side's self-HSIC is zero up to rounding."""
        why = [f"{side}: {w}" for side, w in (("x", self._undef(debiased)), ("y", o._undef(debiased))) if w]
        if why:
            raise UndefinedSimilarity(f"{'debiased' if debiased else 'biased'} CKA undefined ({'; '.join(why)})")
        if debiased:
            return float(np.clip(self.hsic_u(o) / np.sqrt(self.self_u * o.self_u), -1.0, 1.0))
        return float(np.clip(self.hsic_b(o) / np.sqrt(self.self_b * o.self_b), 0.0, 1.0))

    def _undef(self, debiased: bool) -> str | None:
        return self.undefined_debiased if debiased else self.undefined_biased

    @property
    def self_loo(self) -> np.ndarray:
        if self._self_loo is None:
            self._self_loo = hsic_unbiased_loo(self.k, self.k)
        return self._self_loo

    def _loo_defined(self) -> np.ndarray:
        m = self.n - 1
        return (self.self_loo > REL_TOL * self.self_b / (m * (m - 3))) & (self.undefined_debiased is None)

    def cka_debiased_loo(self, o: GramStats) -> np.ndarray:
        """Debiased CKA with example i left out, for every i ([n], in [-1, 1]); NaN marks a leave-one-out value
        that is not estimable (a self-HSIC zero up to rounding once row i is gone): callers must treat it as
        undefined, never average it."""
        ok = self._loo_defined() & o._loo_defined()
        with np.errstate(invalid="ignore", divide="ignore"):
            v = hsic_unbiased_loo(self.k, o.k) / np.sqrt(self.self_loo * o.self_loo)
        return np.where(ok, np.clip(v, -1.0, 1.0), np.nan)


def _zscore_pooled(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Z-score each dimension with statistics pooled over x and y (float64): a shift of y relative to x still shows,
    while no single massive-activation dimension dominates. Dimensions constant up to rounding are dropped."""
    unit = max(_unit(x), _unit(y))
    both = np.concatenate([np.asarray(x, np.float64), np.asarray(y, np.float64)], axis=0)
    mu = both.mean(0)
    dev = both - mu
    sd = np.sqrt((dev ** 2).mean(0))
    keep = np.abs(dev).max(0) > 4 * both.shape[0] * unit * np.abs(both).max(0)
    if not keep.any():
        raise UndefinedSimilarity("every dimension is constant over x and y; standardized cosine is undefined")
    return dev[: len(x), keep] / sd[keep], dev[len(x):, keep] / sd[keep]


def cosine_per_example(x, y, standardize: bool = False) -> np.ndarray:
    """Cosine similarity of each row of x (n x p) with the same row of y (n x p): [n] values in [-1, 1].

    NaN marks a row where cosine is undefined (a zero-norm row of x or y, up to rounding; after standardizing, a
    row equal to the pooled mean): callers must report it as undefined and leave it out of means. Raises
    SimilarityError on bad input and UndefinedSimilarity when no row is defined (or, standardized, every
    dimension is constant)."""
    xa, ya = _check(x, y, same_width=True)
    unit = max(_unit(xa), _unit(ya))
    xa, ya = np.asarray(xa, np.float64), np.asarray(ya, np.float64)
    if standardize:
        xa, ya = _zscore_pooled(xa, ya)
    nx, ny = np.linalg.norm(xa, axis=1), np.linalg.norm(ya, axis=1)
    tiny = 4 * np.sqrt(xa.shape[1]) * unit * max(float(np.abs(xa).max()), float(np.abs(ya).max()))
    ok = (nx > tiny) & (ny > tiny)
    if not ok.any():
        raise UndefinedSimilarity("every row of x or y has zero norm; cosine is undefined")
    with np.errstate(invalid="ignore", divide="ignore"):
        v = np.einsum("ij,ij->i", xa, ya) / (nx * ny)
    return np.where(ok, np.clip(v, -1.0, 1.0), np.nan)


def cosine_similarity(x, y, standardize: bool = False) -> float:
    """Mean over rows (x, y: n x p) of the per-example cosine similarity, in [-1, 1].

    Raises UndefinedSimilarity when any row is undefined (zero norm), naming the rows: a mean over fewer rows than
    given would hide them; ``cosine_per_example`` gives the per-row values and NaN where undefined."""
    v = cosine_per_example(x, y, standardize)
    bad = np.flatnonzero(np.isnan(v))
    if bad.size:
        raise UndefinedSimilarity(f"zero-norm row(s) {bad[:5].tolist()}{' ...' if bad.size > 5 else ''}: cosine "
                                  f"undefined for {bad.size} of {len(v)} rows")
    return float(v.mean())
