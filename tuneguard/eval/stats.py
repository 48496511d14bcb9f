"""Paired statistics: tests, intervals that agree with them, margins, power and multiplicity.

Paired 0/1 outcomes (accuracy on the same items) get Tango's score interval for the difference
of paired proportions. At a difference of zero its score statistic is McNemar's, ``(won - lost)
/ sqrt(won + lost)``, so the interval excludes zero exactly when the McNemar score test rejects at
the same level: a verdict read off the interval and one read off the p-value are the same verdict.
Other metrics (perplexity, token F1) keep the paired bootstrap, which resamples items jointly.

Multiplicity: a suite of tasks is one family. Holm (family-wise error) or Benjamini-Hochberg (false
discovery rate) adjusts the p-values, and each interval is drawn at the level its test was
effectively run at (:func:`adjust`), so an adjusted verdict still never contradicts its interval.

Power: the minimum detectable regression and the items a decision needs come from the normal
approximation at the observed discordance (the share of items on which base and tuned disagree),
which is what the variance of a paired difference depends on.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from typing import Literal

import numpy as np
from scipy.optimize import brentq
from scipy.stats import norm

from tuneguard.eval.records import Aggregate, TaskResult

ALPHA = 0.05
POWER = 0.8
Correction = Literal["holm", "bh"]
_MAX_CELLS = 4_000_000
"""Resampled items held in memory at once (about 32 MB per float64 array), whatever n_boot is."""
_EDGE = 1e-9


def z_crit(alpha: float) -> float:
    """The two-sided critical value at level ``alpha``."""
    return float(norm.ppf(1 - alpha / 2))


def discordant(base: np.ndarray, tuned: np.ndarray) -> tuple[int, int]:
    """``(won, lost)``: items tuned got right and base wrong, and the other way round."""
    return int(np.sum((base == 0) & (tuned == 1))), int(np.sum((base == 1) & (tuned == 0)))


def mcnemar_p(won: int, lost: int) -> float:
    """Two-sided McNemar score test, the Tango statistic at a difference of zero."""
    return float(2 * norm.sf(abs(won - lost) / math.sqrt(won + lost))) if won + lost else 1.0


def tango_z(won: int, lost: int, n: int, d0: float) -> float:
    """Tango's score statistic for ``H0: p_tuned - p_base = d0``, with the restricted MLE of P(lost).

    It decreases in ``d0``, which is what lets :func:`tango_interval` invert it by root finding.
    """
    b = -won - lost + (2 * n - won + lost) * d0
    c = -lost * d0 * (1 - d0)
    q = (-b + math.sqrt(max(b * b - 8 * n * c, 0.0))) / (4 * n)
    var = n * (2 * q + d0 * (1 - d0))
    diff = won - lost - n * d0
    if var <= 0:
        return math.copysign(math.inf, diff) if diff else 0.0
    return diff / math.sqrt(var)


def score_interval(statistic: Callable[[float], float], est: float, alpha: float = ALPHA) -> tuple[float, float]:
    """Every difference ``d0`` in [-1, 1] a score test keeps at level ``1 - alpha``, found by root finding;
    ``statistic(d0)`` must decrease in ``d0``. The interval then excludes 0 exactly when the test rejects."""
    z = z_crit(alpha)

    def bound(target: float, lo: float, hi: float, edge: float) -> float:
        f = lambda d: statistic(d) - target  # noqa: E731
        if f(lo) * f(hi) > 0:
            return edge
        return float(brentq(f, lo, hi, xtol=1e-12))

    low = bound(z, -1 + _EDGE, est, -1.0) if est > -1 else -1.0
    high = bound(-z, est, 1 - _EDGE, 1.0) if est < 1 else 1.0
    return min(low, est), max(high, est)


def tango_interval(won: int, lost: int, n: int, alpha: float = ALPHA) -> tuple[float, float]:
    """Tango's score interval of ``p_tuned - p_base`` at level ``1 - alpha``: every d0 the test keeps."""
    return score_interval(lambda d: tango_z(won, lost, n, d), (won - lost) / n, alpha)


def aggregate_rows(
    values: np.ndarray, weights: np.ndarray | None, how: Aggregate, idx: np.ndarray
) -> np.ndarray:
    """:func:`records.aggregate` of ``values[row]`` for every row of ``idx``, in one numpy pass."""
    if how == "mean":
        return values[idx].mean(axis=1)
    total = weights[idx].sum(axis=1) if weights is not None else np.zeros(len(idx))
    nll = values[idx].sum(axis=1) / np.maximum(total, 1e-12)
    return np.exp(nll) if how == "perplexity" else nll / math.log(2)


def bootstrap_deltas(base: TaskResult, tuned: TaskResult, *, n_boot: int, seed: int) -> np.ndarray:
    """``n_boot`` resampled values of ``tuned - base``; items are drawn jointly to keep the pairs.

    The generator is seeded from ``seed`` and the task name, so a task's draws do not depend on which
    other tasks were compared alongside it (how many it makes does: ``verdicts.resamples``).
    """
    b, t = np.asarray(base.per_item, float), np.asarray(tuned.per_item, float)
    wb = None if base.weights is None else np.asarray(base.weights, float)
    wt = None if tuned.weights is None else np.asarray(tuned.weights, float)
    rng = np.random.default_rng([seed, zlib.crc32(base.task.encode())])
    n = len(b)
    rows = max(1, _MAX_CELLS // n)
    out = np.empty(n_boot)
    for start in range(0, n_boot, rows):
        idx = rng.integers(0, n, size=(min(rows, n_boot - start), n))
        out[start : start + len(idx)] = aggregate_rows(t, wt, tuned.aggregate, idx) - aggregate_rows(
            b, wb, base.aggregate, idx
        )
    return out


def bootstrap_p(deltas: np.ndarray) -> float:
    """Two-sided p from the bootstrap distribution (the percentile interval inverted); +1 smoothing keeps it > 0."""
    k = len(deltas) + 1
    below, above = (np.sum(deltas <= 0) + 1) / k, (np.sum(deltas >= 0) + 1) / k
    return float(min(1.0, 2 * min(below, above)))


def percentile_interval(deltas: np.ndarray, alpha: float = ALPHA) -> tuple[float, float]:
    low, high = np.percentile(deltas, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(low), float(high)


def adjust(p_values: list[float], method: Correction, alpha: float = ALPHA) -> tuple[list[float], list[float]]:
    """Adjusted p-values and, per test, the level its interval must be drawn at to agree with them.

    Holm: the k-th smallest rejected p was tested at ``alpha / (m - k + 1)``; with r rejections
    every other test at ``alpha / (m - r)``. BH: rejected tests at ``alpha r / m`` (the
    Benjamini-Yekutieli FCR level), the others at ``alpha (r + 1) / m``. In both cases an
    interval excludes zero exactly when its adjusted p is below ``alpha``.
    """
    m = len(p_values)
    if m == 0:
        return [], []
    order = sorted(range(m), key=lambda i: p_values[i])
    ranked = [p_values[i] for i in order]
    if method == "holm":
        adj = np.maximum.accumulate([min(1.0, (m - k) * p) for k, p in enumerate(ranked)])
    else:
        adj = np.minimum.accumulate([min(1.0, m * p / (k + 1)) for k, p in enumerate(ranked)][::-1])[::-1]
    r = int(np.sum(adj < alpha))
    if method == "holm":
        levels = [alpha / (m - k) if k < r else alpha / (m - r) for k in range(m)]
    else:
        levels = [alpha * r / m if k < r else alpha * (r + 1) / m for k in range(m)]
    p_out, level_out = [0.0] * m, [0.0] * m
    for rank, i in enumerate(order):
        p_out[i], level_out[i] = float(adj[rank]), float(levels[rank])
    return p_out, level_out


def min_detectable(sd_item: float, n: int, alpha: float = ALPHA, power: float = POWER) -> float:
    """The smallest true difference a two-sided test at ``alpha`` finds with ``power``, in ``sd_item``'s units."""
    return (z_crit(alpha) + float(norm.ppf(power))) * sd_item / math.sqrt(n)


def items_needed(sd_item: float, distance: float, alpha: float = ALPHA, power: float = POWER) -> int | None:
    """Items for the interval's near end to clear a bound ``distance`` away from the true value, with ``power``.

    ``None`` when the distance is zero (no number of items decides it).
    """
    if distance <= 0:
        return None
    return max(1, math.ceil(((z_crit(alpha) + float(norm.ppf(power))) * sd_item / distance) ** 2))


def binary_sd(won: int, lost: int, n: int) -> float:
    """Per-item standard deviation of a paired 0/1 difference; at least one discordant item is assumed,
    since none observed does not mean none exist."""
    disc = max(won + lost, 1) / n
    return math.sqrt(max(disc - ((won - lost) / n) ** 2, disc / n))


def two_sample_z(x1: int, n1: int, x2: int, n2: int, d0: float = 0.0) -> float:
    """Farrington-Manning score statistic for ``H0: p1 - p2 = d0`` (two independent proportions).

    The variance uses the maximum-likelihood estimates restricted to ``H0`` (their closed form), so at ``d0 = 0``
    this is the pooled two-proportion z-test (Pearson's chi-square on the 2x2 table is its square); it decreases
    in ``d0``, which is what lets :func:`two_sample_interval` invert it, as :func:`tango_interval` does for pairs.
    """
    p1, p2 = x1 / n1, x2 / n2
    theta = n2 / n1
    a = 1 + theta
    b = -(1 + theta + p1 + theta * p2 + d0 * (theta + 2))
    c = d0 * d0 + d0 * (2 * p1 + theta + 1) + p1 + theta * p2
    d = -p1 * d0 * (1 + d0)
    v = b**3 / (3 * a) ** 3 - b * c / (6 * a * a) + d / (2 * a)
    u = math.copysign(math.sqrt(max(b * b / (3 * a) ** 2 - c / (3 * a), 0.0)), v)
    ratio = max(-1.0, min(1.0, v / u**3)) if u else 0.0
    r1 = min(max(2 * u * math.cos((math.pi + math.acos(ratio)) / 3) - b / (3 * a), 0.0), 1.0)
    r2 = min(max(r1 - d0, 0.0), 1.0)
    var = r1 * (1 - r1) / n1 + r2 * (1 - r2) / n2
    diff = p1 - p2 - d0
    if var <= 0:
        return math.copysign(math.inf, diff) if diff else 0.0
    return diff / math.sqrt(var)


def two_sample_interval(x1: int, n1: int, x2: int, n2: int, alpha: float = ALPHA) -> tuple[float, float]:
    """The score interval of ``p1 - p2`` at level ``1 - alpha``: every d0 :func:`two_sample_z` keeps, so it
    excludes zero exactly when the pooled z-test rejects at ``alpha`` (two-sided)."""
    return score_interval(lambda d: two_sample_z(x1, n1, x2, n2, d), x1 / n1 - x2 / n2, alpha)


def wilson_interval(k: int, n: int, alpha: float = ALPHA) -> tuple[float, float]:
    """Wilson's score interval of one proportion ``k / n`` (a score check's accuracy, drawn in the history)."""
    z = z_crit(alpha)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)
