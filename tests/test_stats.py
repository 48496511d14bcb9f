"""The statistics behind verdicts, checked by seeded simulation at known differences (a few seconds)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tuneguard.eval.records import TaskResult
from tuneguard.eval.stats import (
    adjust,
    items_needed,
    mcnemar_p,
    min_detectable,
    tango_interval,
    tango_z,
    z_crit,
)
from tuneguard.eval.verdicts import compare_results, compare_task


def acc(task: str, outcomes: np.ndarray) -> TaskResult:
    items = [float(x) for x in outcomes]
    return TaskResult(task, "acc", sum(items) / len(items), True, len(items), items)


def paired(rng: np.random.Generator, n: int, p_won: float, p_lost: float, p_base: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Base and tuned 0/1 outcomes with known discordant-cell probabilities."""
    u = rng.random(n)
    base = (rng.random(n) < p_base).astype(float)
    tuned = base.copy()
    # Condition the flips on base's value so P(won) and P(lost) come out as asked.
    tuned[(base == 0) & (u < p_won / (1 - p_base))] = 1
    tuned[(base == 1) & (u < p_lost / p_base)] = 0
    return base, tuned


@pytest.mark.parametrize("n,p_won,p_lost", [
    (250, 0.05, 0.05), (250, 0.03, 0.08), (150, 0.12, 0.03), (500, 0.01, 0.05), (100, 0.02, 0.02),
])
def test_interval_covers_the_true_difference(n: int, p_won: float, p_lost: float) -> None:
    rng = np.random.default_rng([n, int(1000 * p_won), int(1000 * p_lost)])
    true = p_won - p_lost
    counts = rng.multinomial(n, [p_won, p_lost, 1 - p_won - p_lost], size=2000)
    covered = [lo <= true <= hi for lo, hi in (tango_interval(int(w), int(lo_), n) for w, lo_, _ in counts)]
    assert np.mean(covered) >= 0.94


def test_no_change_is_rarely_called_regressed() -> None:
    rng = np.random.default_rng(7)
    verdicts = [compare_task(*map(lambda o: acc("t", o), paired(rng, 250, 0.06, 0.06))).verdict for _ in range(2000)]
    assert np.mean([v == "regressed" for v in verdicts]) <= 0.05
    assert np.mean([v == "improved" for v in verdicts]) <= 0.05


@pytest.mark.parametrize("correction", ["holm", "bh"])
def test_family_wise_error_across_a_suite_under_the_null(correction: str) -> None:
    """Nine unchanged tasks: any significant verdict is a false one, in at most 5% of suites."""
    rng = np.random.default_rng(11)
    tasks = [f"task{i}" for i in range(9)]
    false_suites = uncorrected = 0
    for _ in range(600):
        pairs = [paired(rng, 200, 0.08, 0.08) for _ in tasks]
        rows = compare_results([acc(t, b) for t, (b, _) in zip(tasks, pairs, strict=True)],
                               [acc(t, u) for t, (_, u) in zip(tasks, pairs, strict=True)],
                               general_tasks=set(tasks), correction=correction)  # type: ignore[arg-type]
        false_suites += any(c.verdict in ("improved", "regressed") for c in rows)
        uncorrected += any(c.p_value < 0.05 for c in rows)
    assert false_suites / 600 <= 0.05
    assert uncorrected / 600 > 0.2  # the family really is big enough to need the correction


def test_interval_excludes_zero_exactly_when_the_test_rejects() -> None:
    for n in (20, 100, 250):
        for won in range(0, 15):
            for lost in range(0, 15):
                if won + lost > n:
                    continue
                for alpha in (0.05, 0.01, 0.05 / 8):
                    lo, hi = tango_interval(won, lost, n, alpha)
                    assert (not lo <= 0 <= hi) == (mcnemar_p(won, lost) < alpha), (n, won, lost, alpha)
                    assert lo <= (won - lost) / n <= hi


def test_tango_statistic_is_mcnemar_at_zero() -> None:
    assert tango_z(30, 12, 400, 0.0) == pytest.approx((30 - 12) / math.sqrt(42))
    assert tango_z(30, 12, 400, -0.1) > tango_z(30, 12, 400, 0.0) > tango_z(30, 12, 400, 0.1)
    lo, hi = tango_interval(0, 0, 1000)
    assert lo < 0 < hi and hi == pytest.approx(z_crit(0.05) ** 2 / (1000 + z_crit(0.05) ** 2), rel=1e-3)


def test_adjust_holm_and_bh() -> None:
    p = [0.01, 0.04, 0.03, 0.2]
    holm, holm_levels = adjust(p, "holm")
    assert holm == pytest.approx([0.04, 0.09, 0.09, 0.2])
    assert holm_levels == pytest.approx([0.0125, 0.05 / 3, 0.05 / 3, 0.05 / 3])
    bh, bh_levels = adjust(p, "bh")
    assert bh == pytest.approx([0.04, 0.04 * 4 / 3, 0.04 * 4 / 3, 0.2])
    assert bh_levels == pytest.approx([0.0125, 0.025, 0.025, 0.025])
    assert adjust([], "holm") == ([], [])
    for method in ("holm", "bh"):
        adj, levels = adjust(p, method)  # type: ignore[arg-type]
        assert [a < 0.05 for a in adj] == [x < level for x, level in zip(p, levels, strict=True)]


def test_power_at_the_minimum_detectable_regression_is_eighty_percent() -> None:
    rng = np.random.default_rng(5)
    n, disc = 400, 0.12
    sd = math.sqrt(disc)
    mdr = min_detectable(sd, n)
    p_won, p_lost = (disc - mdr) / 2, (disc + mdr) / 2
    counts = rng.multinomial(n, [p_won, p_lost, 1 - disc], size=3000)
    power = np.mean([mcnemar_p(int(w), int(lo)) < 0.05 and w < lo for w, lo, _ in counts])
    assert 0.75 <= power <= 0.85
    assert items_needed(sd, mdr) == pytest.approx(n, rel=0.01)
    assert items_needed(sd, 0.0) is None
