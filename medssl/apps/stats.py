"""Paired statistics for comparing two variants case by case (``medssl benchmark``'s verdicts).

Two variants trained on the same folds are evaluated on the same test cases, so their difference is
judged per case: the mean of the per-case differences, a percentile bootstrap confidence interval of
that mean (resampling cases), how many cases each variant wins, and a plain verdict.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

VERDICTS = ("better", "worse", "no detectable difference")


def paired_bootstrap(differences: Sequence[float], num_resamples: int = 10000, confidence: float = 0.95,
                     seed: int = 0) -> dict:
    """Mean of ``differences`` (variant minus baseline, one per case; NaNs dropped) with a percentile
    bootstrap ``confidence`` interval over cases, the counts of cases better / worse, and the verdict:
    ``better`` if the whole interval is above 0, ``worse`` if below, else ``no detectable difference``.
    Vectorised: all resamples are drawn as one ``(num_resamples, n)`` index array; seeded, so a report is
    reproducible."""
    d = np.asarray(differences, dtype=np.float64)
    d = d[np.isfinite(d)]
    n = int(d.size)
    if n == 0:
        return {"n": 0, "mean": None, "ci": [None, None], "better": 0, "worse": 0, "verdict": "no data"}
    means = d[np.random.default_rng(seed).integers(0, n, size=(num_resamples, n))].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    lo, hi = (float(v) for v in np.quantile(means, [alpha, 1.0 - alpha]))
    verdict = VERDICTS[0] if lo > 0 else VERDICTS[1] if hi < 0 else VERDICTS[2]
    return {"n": n, "mean": round(float(d.mean()), 6), "ci": [round(lo, 6), round(hi, 6)],
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
