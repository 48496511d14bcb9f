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
from tuneguard.eval.verdicts import Comparison, compare_pairs, compare_results, compare_task, resamples


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


def counted(task: str, won: int, lost: int, n: int = 200) -> tuple[TaskResult, TaskResult]:
    """Base and tuned 0/1 outcomes with exactly ``won`` items only tuned gets right and ``lost`` only base does."""
    base, tuned = np.zeros(n), np.zeros(n)
    tuned[:won] = 1
    base[won : won + lost] = 1
    both = slice(won + lost, won + lost + (n - won - lost) // 2)
    base[both] = tuned[both] = 1
    return acc(task, base), acc(task, tuned)


def perplexity(task: str, nll: np.ndarray, tokens: np.ndarray) -> TaskResult:
    return TaskResult(task, "perplexity", float(np.exp(nll.sum() / tokens.sum())), False, len(nll), list(nll),
                      list(tokens), "perplexity")


def test_undecided_rows_count_the_items_to_the_margin() -> None:
    """The distance is from the observed change to the margin, on either side of it (what the gate decides on): a
    change near the margin needs very many items, one far past it few; a significant regression whose interval
    straddles the margin gets a count too."""
    def row(won: int, lost: int):  # noqa: ANN202
        return compare_task(*counted("t", won, lost), margin=2.0)

    past_near, within_near, past_far = row(10, 15), row(10, 13), row(30, 40)
    assert [r.verdict for r in (past_near, within_near, past_far)] == ["inconclusive"] * 3
    assert [r.regression_points for r in (past_near, within_near, past_far)] == pytest.approx([2.5, 1.5, 5.0])
    assert past_near.items_to_decide > 10 * past_far.items_to_decide
    assert 0.5 < past_near.items_to_decide / within_near.items_to_decide < 2
    straddling = row(10, 24)
    worst, best = straddling.gain_interval
    assert straddling.verdict == "regressed" and worst < -2 < best < 0 and not straddling.beyond_margin
    assert straddling.items_to_decide and row(0, 40).items_to_decide is None  # that one is beyond the margin


def test_a_large_family_can_still_call_a_perplexity_regression() -> None:
    """Random sign patterns give p at least 1 / (B + 1); a family of 27 at 1,000 draws would adjust even a 65%
    perplexity regression to p > 0.05 under Holm. Each test draws enough for its family's levels."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(50, 200, 80).astype(float)
    nll = tokens * rng.normal(3.0, 0.3, 80)
    pairs = [counted(f"t{i}", 3, 3) for i in range(26)]
    pairs.append((perplexity("wikitext", nll, tokens), perplexity("wikitext", nll + tokens * math.log(1.65), tokens)))
    rows = compare_pairs(pairs, ["general"] * 27, general_tasks={b.task for b, _ in pairs}, n_boot=1000)
    assert resamples(1000, 27) == 10_800 and resamples(1000, 1) == 1000
    assert rows[-1].regression_points == pytest.approx(65.0)
    assert rows[-1].p_adjusted < 0.05 and rows[-1].verdict == "regressed" and rows[-1].beyond_margin
    assert all(r.verdict == "non-inferior" or r.verdict == "inconclusive" for r in rows[:-1])


@pytest.mark.parametrize("n", [1, 2, 3, 5, 10, 30])
def test_few_perplexity_items_unchanged_are_rarely_called_significant(n: int) -> None:
    """general-small scored two WikiText pages before session 37: the bootstrap it used called half of such unchanged pairs
    significant (both pages moved one way). The sign-flip test holds its 5% at any n, and on fewer than six items
    (smallest p 2 / 2^n > 0.05) calls nothing, with an interval unbounded on both sides."""
    rng = np.random.default_rng(n)
    called = 0
    for _ in range(400):
        tokens = rng.integers(1000, 5000, n).astype(float)
        base, tuned = (tokens * 2.5 + rng.normal(0, 20, n) for _ in range(2))
        row = compare_task(perplexity("wikitext", base, tokens), perplexity("wikitext", tuned, tokens))
        called += row.verdict in ("improved", "regressed")
        if n < 6:
            assert row.verdict == "inconclusive" and row.ci_high == math.inf
            assert Comparison.from_dict(row.to_dict()) == row  # stored as null, read back as unbounded
            assert row.mdr == math.inf and row.to_dict()["mdr"] is None  # no change is detectable on so few
            assert row.items_to_decide is None if n == 1 else row.items_to_decide >= 6  # one item: no spread
    assert called / 400 <= (0.0 if n < 6 else 0.07)


def test_a_non_finite_outcome_is_inconclusive_and_valid_json() -> None:
    """An overflowed log-likelihood is no evidence either way: not non-inferior (its NaN interval end used to sort
    into the 'best' slot), no test, valid JSON; the rest of its family is judged as before."""
    import json

    rng = np.random.default_rng(1)
    tokens = rng.integers(50, 200, 60).astype(float)
    nll = tokens * rng.normal(3.0, 0.3, 60)
    broken = nll.copy()
    broken[5] = math.inf
    row = compare_task(perplexity("wikitext", nll, tokens), perplexity("wikitext", broken, tokens))
    assert row.verdict == "inconclusive" and row.items_to_decide is None and math.isnan(row.p_value)
    data = row.to_dict()
    json.dumps(data, allow_nan=False)
    assert data["tuned"] is None and data["p_value"] is None
    rows = compare_pairs([(perplexity("wikitext", nll, tokens), perplexity("wikitext", broken, tokens)),
                          counted("arc", 0, 30)], ["general", "general"], general_tasks={"wikitext", "arc"})
    assert [r.verdict for r in rows] == ["inconclusive", "regressed"] and rows[1].beyond_margin
