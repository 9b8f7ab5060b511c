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
    pass


def _check(x, y=None, *, same_width: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    xs = [np.asarray(x, dtype=np.float64)]
    if y is not None:
        xs.append(np.asarray(y, dtype=np.float64))
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


def _center(x: np.ndarray, name: str) -> np.ndarray:
    xc = x - x.mean(axis=0, keepdims=True)
    # relative tolerance: rows equal up to float32 noise (e.g. the last token of every SST-2 sentence is the same
    # trailing space, so its embedding is identical across examples) count as constant
    if np.linalg.norm(xc) <= 1e-5 * np.linalg.norm(x) or not np.any(xc):
        raise SimilarityError(f"{name} has zero variance (all rows identical); CKA is undefined")
    return xc


def gram(x) -> np.ndarray:
    """Linear-kernel Gram matrix of column-centered ``x`` (float64)."""
    xa, _ = _check(x)
    xc = _center(xa, "x")
    return xc @ xc.T


def _offdiag(k: np.ndarray) -> np.ndarray:
    k = k.copy()
    np.fill_diagonal(k, 0.0)
    return k


def linear_cka(x, y, debiased: bool = False) -> float:
    """Linear CKA between representations ``x`` (n x p1) and ``y`` (n x p2) of the same n examples (rows aligned).

    Biased: Kornblith et al. (2019). Debiased: unbiased HSIC (Song et al. 2012; Nguyen et al. 2021); it can be
    slightly negative for unrelated data. Invariant to orthogonal transforms, isotropic scaling and translation.
    Correct for widths larger than n (the Gram form is used there)."""
    xa, ya = _check(x, y)
    if not debiased and max(xa.shape[1], ya.shape[1]) <= xa.shape[0]:
        # feature-space form, cheaper when the width is below n
        xc, yc = _center(xa, "x"), _center(ya, "y")
        num = np.linalg.norm(yc.T @ xc) ** 2
        return float(num / (np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc)))
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
    compared with one base model per layer, so this saves recomputing the base terms for each of them."""

    def __init__(self, x):
        self.k = gram(x)
        self.n = self.k.shape[0]
        self.diag = np.diag(self.k).copy()
        self.kt = _offdiag(self.k)
        self.r = self.kt.sum(1)
        self.s = float(self.r.sum())
        self.self_b = self.hsic_b(self)
        self.self_u = self.hsic_u(self)
        self._self_loo = None

    def hsic_b(self, o: GramStats) -> float:
        return float(np.einsum("ij,ij->", self.kt, o.kt) + self.diag @ o.diag)

    def hsic_u(self, o: GramStats) -> float:
        n = self.n
        t1 = float(np.einsum("ij,ij->", self.kt, o.kt))
        return (t1 + self.s * o.s / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * float(self.r @ o.r)) / (n * (n - 3))

    def cka(self, o: GramStats, debiased: bool) -> float:
        if debiased:
            return float(self.hsic_u(o) / np.sqrt(self.self_u * o.self_u))
        return float(self.hsic_b(o) / np.sqrt(self.self_b * o.self_b))

    @property
    def self_loo(self) -> np.ndarray:
        if self._self_loo is None:
            self._self_loo = hsic_unbiased_loo(self.k, self.k)
        return self._self_loo

    def cka_debiased_loo(self, o: GramStats) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return hsic_unbiased_loo(self.k, o.k) / np.sqrt(self.self_loo * o.self_loo)


def _zscore_pooled(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Z-score each dimension with statistics pooled over x and y: a shift of y relative to x still shows, while
    no single massive-activation dimension dominates. Constant dimensions are dropped."""
    both = np.concatenate([x, y], axis=0)
    mu, sd = both.mean(0), both.std(0)
    keep = sd > 1e-12 * max(1.0, float(np.abs(both).max()))
    if not keep.any():
        raise SimilarityError("every dimension has zero variance; standardized cosine is undefined")
    return (x[:, keep] - mu[keep]) / sd[keep], (y[:, keep] - mu[keep]) / sd[keep]


def cosine_per_example(x, y, standardize: bool = False) -> np.ndarray:
    """Cosine similarity of each row of x with the same row of y (same width)."""
    xa, ya = _check(x, y, same_width=True)
    if standardize:
        xa, ya = _zscore_pooled(xa, ya)
    nx, ny = np.linalg.norm(xa, axis=1), np.linalg.norm(ya, axis=1)
    if np.any(nx == 0) or np.any(ny == 0):
        bad = np.flatnonzero((nx == 0) | (ny == 0))[:5].tolist()
        raise SimilarityError(f"zero-norm row(s) {bad}: cosine undefined")
    return np.einsum("ij,ij->i", xa, ya) / (nx * ny)


def cosine_similarity(x, y, standardize: bool = False) -> float:
    """Mean over rows of the per-example cosine similarity."""
    return float(cosine_per_example(x, y, standardize).mean())
