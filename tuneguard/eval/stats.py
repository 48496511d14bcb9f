"""Paired statistics: tests, intervals that agree with them, margins, power and multiplicity.

Paired 0/1 outcomes (accuracy on the same items) get Tango's score interval for the difference
of paired proportions. At a difference of zero its score statistic is McNemar's, ``(won - lost)
/ sqrt(won + lost)``, so the interval excludes zero exactly when the McNemar score test rejects at
the same level: a verdict read off the interval and one read off the p-value are the same verdict.
Other metrics (perplexity, token F1) get a paired sign-flip (randomization) test and the interval that
inverts it: exact up to 16 items, with seeded random sign patterns beyond.

Multiplicity: a suite of tasks is one family. Holm (family-wise error) or Benjamini-Hochberg (false
discovery rate) adjusts the p-values, and each interval is drawn at the level its test was
effectively run at (:func:`adjust`), so an adjusted verdict still never contradicts its interval.

Power: the minimum detectable regression and the items a decision needs come from the normal
approximation at the observed discordance (the share of items on which base and tuned disagree),
which is what the variance of a paired difference depends on.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy.optimize import brentq
from scipy.stats import norm

from tuneguard.eval.records import Aggregate, TaskResult

ALPHA = 0.05
POWER = 0.8
Correction = Literal["holm", "bh"]
_MAX_CELLS = 4_000_000
"""Signs held in memory at once (about 32 MB of float64), whatever the number of random patterns."""
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


def tango_variance(won: float, lost: float, n: float, d0: float) -> float:
    """The variance of ``won - lost`` under ``H0: p_tuned - p_base = d0``, at the restricted MLE of P(lost)."""
    b = -won - lost + (2 * n - won + lost) * d0
    c = -lost * d0 * (1 - d0)
    q = (-b + math.sqrt(max(b * b - 8 * n * c, 0.0))) / (4 * n)
    return n * (2 * q + d0 * (1 - d0))


def tango_z(won: int, lost: int, n: int, d0: float) -> float:
    """Tango's score statistic for ``H0: p_tuned - p_base = d0``, with the restricted MLE of P(lost).

    It decreases in ``d0``, which is what lets :func:`tango_interval` invert it by root finding.
    """
    var = tango_variance(won, lost, n, d0)
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


EXACT_UP_TO = 16
"""Items up to which the sign-flip test enumerates every sign pattern (2^16 = 65,536): its p is then exact."""


def sign_flip_min_items(level: float) -> int:
    """The fewest items on which the sign-flip test can reject at ``level``: its smallest p is 2 / 2^n."""
    return math.ceil(math.log2(2 / level))


def paired_differences(base: TaskResult, tuned: TaskResult) -> tuple[np.ndarray, np.ndarray]:
    """``(d, w)``: each item's ``tuned - base`` outcome and its weight (1 for a mean; tokens or bytes for a
    perplexity-like metric, which both sides share). The metric's change is a function of ``θ = Σd / Σw``."""
    d = np.asarray(tuned.per_item, float) - np.asarray(base.per_item, float)
    w = np.ones_like(d) if base.aggregate == "mean" else np.asarray(base.weights, float)
    return d, w


def theta_to_delta(theta: float, how: Aggregate, before: float) -> float:
    """The change of the metric's value at a difference ``θ`` per unit weight: itself for a mean, in bits for
    bits per byte, and ``before · (e^θ - 1)`` for a perplexity (``after = before · e^θ``)."""
    if how == "mean":
        return theta
    if how == "bits_per_byte":
        return theta / math.log(2)
    return before * math.expm1(theta) if theta < 700 else math.inf


@dataclass(frozen=True)
class SignFlips:
    """A paired randomization test of ``H0: the items' d_i - θ w_i are symmetric about 0``: under it every sign
    pattern of those terms is as likely, so ``|Σ s_i (d_i - θ w_i)|`` over the patterns s is the statistic's null
    distribution. It assumes no large n (the bootstrap it replaces called half of the no-change pairs of two
    items significant), its smallest p is 2 / 2^n, and inverted in θ it gives the interval that agrees with it."""

    d: np.ndarray
    w: np.ndarray
    flipped_d: np.ndarray
    """``Σ s_i d_i`` for each pattern s."""
    flipped_w: np.ndarray
    exact: bool
    """Every pattern (n up to :data:`EXACT_UP_TO`), else seeded random ones."""

    @classmethod
    def draw(cls, d: np.ndarray, w: np.ndarray, draws: int, seed: list[int]) -> SignFlips:
        n = len(d)
        if n <= EXACT_UP_TO:
            signs = 1.0 - 2.0 * ((np.arange(2**n)[:, None] >> np.arange(n)) & 1)
            return cls(d, w, signs @ d, signs @ w, True)
        rng = np.random.default_rng(seed)
        flipped_d, flipped_w = np.empty(draws), np.empty(draws)
        rows = max(1, _MAX_CELLS // n)
        for start in range(0, draws, rows):
            signs = rng.choice([-1.0, 1.0], size=(min(rows, draws - start), n))
            flipped_d[start : start + len(signs)], flipped_w[start : start + len(signs)] = signs @ d, signs @ w
        return cls(d, w, flipped_d, flipped_w, False)

    @property
    def estimate(self) -> float:
        return float(self.d.sum() / max(self.w.sum(), 1e-300))

    def p(self, theta: float = 0.0) -> float:
        """Two-sided p of ``H0`` at ``θ``: the share of patterns whose statistic is at least the observed one (random
        patterns: with the observed pattern counted once more, so p > 0)."""
        observed = abs(self.d.sum() - theta * self.w.sum())
        tolerance = 1e-9 * (np.abs(self.d).sum() + abs(theta) * self.w.sum()) + 1e-300
        hits = int(np.sum(np.abs(self.flipped_d - theta * self.flipped_w) >= observed - tolerance))
        return hits / len(self.flipped_d) if self.exact else (hits + 1) / (len(self.flipped_d) + 1)

    def interval(self, alpha: float = ALPHA) -> tuple[float, float]:
        """Every θ the test keeps at level ``1 - alpha``, by bisection from the estimate outwards. Past the largest
        (or smallest) ``d_i / w_i`` all terms share one sign and p stops falling: if it is still above ``alpha``
        there, that side is unbounded (infinite), as it is for a test on too few items to reject at this level."""
        est = self.estimate
        ratios = self.d[self.w > 0] / self.w[self.w > 0]
        reach = float(ratios.max() - ratios.min()) + abs(est) + 1e-12
        ends = []
        for far, unbounded in ((float(ratios.min()) - reach, -math.inf), (float(ratios.max()) + reach, math.inf)):
            if self.p(far) > alpha:
                ends.append(unbounded)
                continue
            kept, rejected = est, far
            for _ in range(100):
                middle = (kept + rejected) / 2
                if middle in (kept, rejected):
                    break
                kept, rejected = (middle, rejected) if self.p(middle) > alpha else (kept, middle)
            ends.append(kept)
        return ends[0], ends[1]

    def sd_item(self) -> float:
        """Per-item standard deviation of the paired difference in θ's units (what power depends on)."""
        n = len(self.d)
        return float(np.std(n * (self.d - self.estimate * self.w) / max(self.w.sum(), 1e-300)))


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

    ``None`` when the distance is zero (no number of items decides it; a change a float's rounding away from the
    margin counts as at it, where 10^31 items were asked for), or past :data:`MAX_ITEMS`.
    """
    if distance <= 1e-9:
        return None
    return _count(((z_crit(alpha) + float(norm.ppf(power))) * sd_item / distance) ** 2)


def _count(items: float) -> int | None:
    """A planned number of items, at least one; None past :data:`MAX_ITEMS`."""
    needed = max(1, math.ceil(items))
    return needed if needed <= MAX_ITEMS else None


MAX_ITEMS = 10**9
"""More items than any benchmark has: a count past it says nothing a plain "inconclusive" does not."""


def binary_items_needed(discordance: float, margin: float, alpha: float = ALPHA, power: float = POWER) -> int | None:
    """Items a 0/1 task whose base and tuned disagree on ``discordance`` of them needs for Tango's interval to show
    non-inferiority at ``margin`` (a fraction) with ``power`` when nothing changed. The test's variance is the
    restricted one at the margin (larger than the spread at no change, which promised 80% and gave 67% where the
    margin is near the discordance): n = ((z_a/2 sd_0 + z_b sd_1) / margin)^2; None past :data:`MAX_ITEMS`."""
    if margin >= 1:  # no 0/1 outcome can fall by the whole scale: any item shows it
        return 1
    # per item: won = lost = discordance / 2 of one item, the test's variance at the margin
    sd0, sd1 = math.sqrt(tango_variance(discordance / 2, discordance / 2, 1, -margin)), math.sqrt(discordance)
    return _count(((z_crit(alpha) * sd0 + float(norm.ppf(power)) * sd1) / margin) ** 2)


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
