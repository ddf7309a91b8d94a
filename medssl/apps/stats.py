"""Paired statistics for comparing two variants case by case (``medssl benchmark``'s verdicts).

Two variants trained on the same folds are evaluated on the same test cases, so their difference is
judged per case: the mean of the per-case differences, a percentile bootstrap confidence interval of
that mean (resampling cases), how many cases each variant wins, and a plain verdict.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

VERDICTS = ("better", "worse", "no detectable difference")


def bootstrap_ci(values: Sequence[float], num_resamples: int = 10000, confidence: float = 0.95,
                 seed: int = 0) -> tuple[np.ndarray, list]:
    """The finite ``values`` (NaNs and infinities dropped) and the percentile bootstrap ``confidence``
    interval of their mean, ``[lo, hi]`` (``[None, None]`` without values). Vectorised: all resamples are
    drawn as one ``(num_resamples, n)`` index array; seeded, so a report is reproducible."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return v, [None, None]
    means = v[np.random.default_rng(seed).integers(0, v.size, size=(num_resamples, v.size))].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    return v, [round(float(q), 6) for q in np.quantile(means, [alpha, 1.0 - alpha])]


def paired_bootstrap(differences: Sequence[float], num_resamples: int = 10000, confidence: float = 0.95,
                     seed: int = 0) -> dict:
    """Mean of ``differences`` (variant minus baseline, one per case; NaNs dropped) with its
    :func:`bootstrap_ci` over cases, the counts of cases better / worse, and the verdict: ``better`` if the
    whole interval is above 0, ``worse`` if below, else ``no detectable difference``."""
    d, (lo, hi) = bootstrap_ci(differences, num_resamples, confidence, seed)
    if d.size == 0:
        return {"n": 0, "mean": None, "ci": [None, None], "better": 0, "worse": 0, "verdict": "no data"}
    verdict = VERDICTS[0] if lo > 0 else VERDICTS[1] if hi < 0 else VERDICTS[2]
    return {"n": int(d.size), "mean": round(float(d.mean()), 6), "ci": [lo, hi],
            "better": int((d > 0).sum()), "worse": int((d < 0).sum()), "verdict": verdict}


def paired_differences(variant: Mapping[str, float], baseline: Mapping[str, float]) -> list[float]:
    """``variant[k] - baseline[k]`` for every key (e.g. ``"fold/case"``) both have with a finite value,
    in sorted key order. A key only one side has is an error: paired comparisons need the same cases."""
    missing = sorted(set(variant) ^ set(baseline))
    if missing:
        raise ValueError(f"unpaired cases {missing[:5]}: both variants must be evaluated on the same cases")
    out = []
    for k in sorted(variant):
        a, b = variant[k], baseline[k]
        if a is not None and b is not None and np.isfinite(a) and np.isfinite(b):
            out.append(float(a) - float(b))
    return out
