"""Whether a loss trajectory stays within the bf16 noise band of eager training (numpy only: the benchmark and
the results tables both use it).

The band is what the same math on other shapes does: eager on batches padded to the static width against eager
with dynamic padding. Two readings, per prefix of the first k steps:
- relative: max |levers - eager| / |eager| <= max(2 x the padded run's, 0.01) (the criterion of the trajectory
  tables since issue 20's first lever run);
- absolute: max |levers - eager| <= max(2 x the padded run's, 0.01). The relative reading divides by the loss, so a
  single step where eager's loss is small (0.06 at batch 1) can exceed the band while its absolute difference is a
  fraction of what the padded run shows elsewhere; the absolute reading does not have that singularity."""

from __future__ import annotations

import numpy as np

KS = (1, 5, 10, 20, 50, 100, 200)


def band(losses: dict[str, list[float]], ks: tuple[int, ...] = KS) -> dict:
    """``losses``: ``{"levers" | "fused": [...], "eager": [...], "eager_padded": [...]}`` (one loss per step, the
    same batches in the same order). Returns ``{"ks", "relative": {"candidate", "padded", "within"},
    "absolute": {...}, "argmax_relative": step index}`` over the prefixes ``ks`` no longer than the run, and the
    whole run."""
    e = np.asarray(losses["eager"], dtype=float)
    cand = np.asarray(losses["levers"] if "levers" in losses else losses["fused"], dtype=float)
    pad = np.asarray(losses["eager_padded"], dtype=float)
    ks = sorted({*(k for k in ks if k <= len(e)), len(e)})  # (the whole run too, whatever its length)
    out: dict = {"ks": ks}
    for name, f in (("relative", lambda v: np.abs(v - e) / np.maximum(np.abs(e), 1e-8)),
                    ("absolute", lambda v: np.abs(v - e))):
        c, p = f(cand), f(pad)
        cm = {k: float(c[:k].max()) for k in ks}
        pm = {k: float(p[:k].max()) for k in ks}
        out[name] = {"candidate": cm, "padded": pm, "within": all(cm[k] <= max(2 * pm[k], 0.01) for k in ks)}
        if name == "relative":
            out["argmax_relative"] = int(np.argmax(c))
    return out
