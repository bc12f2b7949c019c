"""Uncertainty for headline numbers: bootstrap intervals clustered by relation, paired tests.

Everything statistical goes through ``scipy.stats``:

* :func:`cluster_interval` resamples whole clusters (PARAREL relations) with replacement and
  recomputes the statistic on each resample (``scipy.stats.bootstrap``, percentile method):
  facts of one relation share templates and objects, so they are not independent draws.
* :func:`paired_test` compares two measurements of the same units (facts): the Wilcoxon
  signed-rank test and the sign test (``scipy.stats.binomtest`` on the signs), both two-sided.
  A report states an order only when the paired test supports it (:func:`order_verdict`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence

import numpy as np

from kn_plugin.errors import KnowledgeNeuronError

LEVEL = 0.95
N_RESAMPLES = 2000
ALPHA = 0.05


def jaccard(a, b, both_empty: float | None = 1.0) -> float | None:
    """|A & B| / |A u B| of two neuron sets given as (layer, index) pairs (lists or tuples);
    ``both_empty`` when neither holds a neuron (1.0: the same set; None: nothing to compare)."""
    sa, sb = {(x[0], x[1]) for x in a}, {(x[0], x[1]) for x in b}
    if not sa and not sb:
        return both_empty
    return len(sa & sb) / len(sa | sb)


def cluster_interval(units: Sequence, clusters: Sequence[Hashable], statistic: Callable[[list], float | None],
                     n_resamples: int = N_RESAMPLES, seed: int = 0, level: float = LEVEL) -> dict:
    """``{"value", "low", "high", "n", "clusters"}``: ``statistic(units)`` with a bootstrap
    interval that resamples whole clusters. ``statistic`` takes a list of units (a resample
    may hold a cluster several times) and returns a number or None (undefined). With fewer
    than two clusters, or a statistic that does not vary, the interval is None/degenerate."""
    if len(units) != len(clusters):
        raise KnowledgeNeuronError("one cluster label per unit")
    units = list(units)
    value = statistic(units) if units else None
    names = sorted(set(clusters), key=str)
    out = {"value": value, "low": None, "high": None, "n": len(units), "clusters": len(names)}
    if value is None or len(names) < 2:
        return out
    members = {c: [u for u, k in zip(units, clusters) if k == c] for c in names}
    from scipy.stats import bootstrap

    def stat(idx):
        picked = [u for i in idx for u in members[names[int(i)]]]
        v = statistic(picked)
        return np.nan if v is None else float(v)

    res = bootstrap((np.arange(len(names)),), stat, vectorized=False, n_resamples=n_resamples,
                    confidence_level=level, method="percentile", random_state=np.random.default_rng(seed))
    low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
    if not (math.isnan(low) or math.isnan(high)):
        out["low"], out["high"] = low, high
    return out


def paired_test(a: Sequence[float], b: Sequence[float]) -> dict:
    """Two-sided paired tests of ``a`` against ``b`` (same units, same order): Wilcoxon
    signed-rank and sign test p-values, the median difference ``a - b`` and how many units
    have ``a > b`` / ``a < b`` (ties dropped)."""
    if len(a) != len(b):
        raise KnowledgeNeuronError("paired samples need the same units")
    diff = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    diff = diff[np.isfinite(diff)]
    pos, neg = int((diff > 0).sum()), int((diff < 0).sum())
    out = {"n": int(len(diff)), "greater": pos, "less": neg,
           "median_diff": float(np.median(diff)) if len(diff) else None, "wilcoxon_p": None, "sign_p": None}
    if pos + neg == 0:
        return out
    from scipy.stats import binomtest, wilcoxon

    out["sign_p"] = float(binomtest(pos, pos + neg, 0.5).pvalue)
    if pos + neg >= 2:
        out["wilcoxon_p"] = float(wilcoxon(diff[diff != 0]).pvalue)
    return out


def order_verdict(test: dict, claimed: str, alpha: float = ALPHA) -> str:
    """``claimed`` is ``"greater"`` (a > b) or ``"less"``: "holds" when both paired tests
    reject equality at ``alpha`` in the claimed direction, "does not hold" when they reject it
    in the other, else "cannot tell"."""
    if claimed not in ("greater", "less"):
        raise KnowledgeNeuronError(f"claimed must be 'greater' or 'less', got {claimed!r}")
    ps = [test["wilcoxon_p"], test["sign_p"]]
    if any(p is None for p in ps) or max(ps) >= alpha:
        return "cannot tell"
    other = "less" if claimed == "greater" else "greater"
    return "holds" if test[claimed] > test[other] else "does not hold"


def sign_verdict(interval: dict, claimed: str) -> str:
    """Whether an interval lies on the claimed side of zero (``"negative"``/``"positive"``)."""
    low, high = interval.get("low"), interval.get("high")
    if low is None or high is None:
        return "cannot tell"
    if claimed == "negative":
        return "holds" if high < 0 else "does not hold" if low > 0 else "cannot tell"
    return "holds" if low > 0 else "does not hold" if high < 0 else "cannot tell"
