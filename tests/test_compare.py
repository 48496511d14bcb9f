"""The paired statistics behind every verdict, checked on cases whose answer is known."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import binomtest

from tuneguard.errors import RegressionBudgetExceeded, TuneguardError
from tuneguard.eval.compare import (
    Comparison,
    aggregate_rows,
    bootstrap_p,
    check_budget,
    compare_quantization,
    compare_results,
    compare_task,
    read_metrics,
    train_val_gap,
)
from tuneguard.eval.records import TaskResult, aggregate


def acc(task: str, outcomes: list[float] | np.ndarray, *, higher_is_better: bool = True) -> TaskResult:
    items = [float(x) for x in outcomes]
    return TaskResult(task, "acc", sum(items) / len(items), higher_is_better, len(items), items)


def ppl(task: str, nll: np.ndarray, tokens: np.ndarray) -> TaskResult:
    return TaskResult(task, "perplexity", aggregate(list(nll), list(tokens), "perplexity"), False, len(nll),
                      [float(x) for x in nll], [float(x) for x in tokens], "perplexity")


def flipped(outcomes: np.ndarray, wins: int, losses: int, seed: int = 0) -> np.ndarray:
    """A copy of 0/1 outcomes with ``wins`` items turned 0->1 and ``losses`` items turned 1->0."""
    rng = np.random.default_rng(seed)
    out = outcomes.copy()
    out[rng.choice(np.flatnonzero(outcomes == 0), wins, replace=False)] = 1
    out[rng.choice(np.flatnonzero(outcomes == 1), losses, replace=False)] = 0
    return out


@pytest.fixture()
def outcomes() -> np.ndarray:
    return (np.random.default_rng(1).random(1000) < 0.6).astype(float)


def test_identical_outcomes_mean_no_change(outcomes: np.ndarray) -> None:
    c = compare_task(acc("t", outcomes), acc("t", outcomes))
    assert (c.delta, c.ci_low, c.ci_high, c.p_value) == (0.0, 0.0, 0.0, 1.0)
    assert c.verdict == "no significant change"
    assert c.test == "mcnemar-exact"
    assert c.n == 1000


def test_many_discordant_pairs_one_way_is_significant_and_matches_binomtest(outcomes: np.ndarray) -> None:
    tuned = flipped(outcomes, wins=40, losses=12)
    c = compare_task(acc("t", outcomes), acc("t", tuned), n_boot=2000)
    assert c.p_value == pytest.approx(binomtest(40, 52, 0.5, alternative="two-sided").pvalue, rel=1e-12)
    assert c.p_value < 0.001
    assert c.delta == pytest.approx(28 / 1000)
    assert 0 < c.ci_low < c.delta < c.ci_high
    assert c.verdict == "improved"


def test_few_discordant_pairs_is_not_significant(outcomes: np.ndarray) -> None:
    c = compare_task(acc("t", outcomes), acc("t", flipped(outcomes, wins=5, losses=3)))
    assert c.p_value == pytest.approx(binomtest(5, 8, 0.5).pvalue)
    assert c.ci_low <= 0 <= c.ci_high
    assert c.verdict == "no significant change"


def test_verdict_respects_higher_is_better(outcomes: np.ndarray) -> None:
    """The same rise is an improvement for accuracy and a regression for an error rate."""
    tuned = flipped(outcomes, wins=60, losses=0)
    up = compare_task(acc("t", outcomes), acc("t", tuned))
    down = compare_task(acc("t", outcomes, higher_is_better=False), acc("t", tuned, higher_is_better=False))
    assert up.verdict == "improved" and down.verdict == "regressed"
    assert up.regression_points == pytest.approx(-6.0) and down.regression_points == pytest.approx(6.0)


def test_bootstrap_is_seeded_and_independent_of_task_order(outcomes: np.ndarray) -> None:
    tuned = flipped(outcomes, wins=30, losses=10)
    a = compare_results([acc("a", outcomes), acc("b", tuned)], [acc("a", tuned), acc("b", outcomes)],
                        general_tasks={"b"}, seed=3)
    b = compare_results([acc("b", tuned), acc("a", outcomes)], [acc("b", outcomes), acc("a", tuned)],
                        general_tasks={"b"}, seed=3)
    assert {c.task: c for c in a} == {c.task: c for c in b}
    assert [c.is_general for c in a] == [False, True]
    other_seed = compare_results([acc("a", outcomes)], [acc("a", tuned)], general_tasks=set(), seed=4)[0]
    assert (other_seed.ci_low, other_seed.ci_high) != (a[0].ci_low, a[0].ci_high)


def test_quantization_cost_uses_the_tasks_the_original_was_scored_on(outcomes: np.ndarray) -> None:
    quantized = flipped(outcomes, wins=0, losses=30)
    [cost] = compare_quantization([acc("g", outcomes)], [acc("t", outcomes), acc("g", quantized)],
                                  general_tasks={"g"})
    assert (cost.task, cost.is_general, cost.verdict) == ("g", True, "regressed")
    assert cost.regression_points == pytest.approx(3.0)


def test_vectorised_resampling_equals_records_aggregate() -> None:
    rng = np.random.default_rng(0)
    nll, tokens = rng.gamma(2.0, 20.0, 50), rng.integers(5, 40, 50).astype(float)
    idx = rng.integers(0, 50, size=(4, 50))
    for how in ("mean", "perplexity", "bits_per_byte"):
        got = aggregate_rows(nll, tokens, how, idx)
        want = [aggregate(list(nll[row]), list(tokens[row]), how) for row in idx]
        np.testing.assert_allclose(got, want, rtol=1e-12)


def test_perplexity_bootstrap_is_sane() -> None:
    rng = np.random.default_rng(0)
    nll, tokens = rng.gamma(2.0, 20.0, 800), rng.integers(10, 60, 800).astype(float)
    same = compare_task(ppl("wiki", nll, tokens), ppl("wiki", nll, tokens))
    assert (same.delta, same.ci_low, same.ci_high, same.p_value) == (0.0, 0.0, 0.0, 1.0)
    assert same.test == "paired-bootstrap" and same.verdict == "no significant change"

    worse = compare_task(ppl("wiki", nll, tokens), ppl("wiki", nll * 1.03 + rng.normal(0, 0.5, 800), tokens))
    assert worse.base == pytest.approx(math.exp(nll.sum() / tokens.sum()))
    assert worse.delta > 0 and worse.ci_low < worse.delta < worse.ci_high
    assert worse.ci_low > 0 and worse.p_value < 0.01
    assert worse.verdict == "regressed"
    assert worse.regression_points == pytest.approx(100 * worse.delta / worse.base)

    noisy = compare_task(ppl("wiki", nll, tokens), ppl("wiki", nll + rng.normal(0, 3.0, 800), tokens))
    assert noisy.ci_low < 0 < noisy.ci_high and noisy.verdict == "no significant change"


def test_bootstrap_p_matches_the_interval() -> None:
    assert bootstrap_p(np.zeros(100)) == 1.0
    assert bootstrap_p(np.full(999, 0.1)) == pytest.approx(2 / 1000)
    assert 0.4 < bootstrap_p(np.random.default_rng(0).normal(0, 1, 4000)) <= 1.0


def test_ten_thousand_resamples_of_a_thousand_items_are_fast(outcomes: np.ndarray) -> None:
    start = time.perf_counter()
    compare_task(acc("t", outcomes), acc("t", flipped(outcomes, 20, 5)), n_boot=10_000)
    assert time.perf_counter() - start < 2.0


def test_comparison_round_trips_through_json(outcomes: np.ndarray) -> None:
    c = compare_task(acc("t", outcomes), acc("t", flipped(outcomes, 20, 5)), is_general=True)
    assert Comparison.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    nan = Comparison("t", "acc", 0.5, 0.5, 0.0, math.nan, math.nan, math.nan, "none", "no significant change",
                     0, True)
    assert nan.to_dict()["ci_low"] is None
    assert math.isnan(Comparison.from_dict(nan.to_dict()).p_value)


def test_mismatched_inputs_are_errors(outcomes: np.ndarray) -> None:
    with pytest.raises(TuneguardError, match="one side only.*b"):
        compare_results([acc("a", outcomes), acc("b", outcomes)], [acc("a", outcomes)], general_tasks=set())
    with pytest.raises(TuneguardError, match="task 'a'.*1000.*999"):
        compare_task(acc("a", outcomes), acc("a", outcomes[:-1]))
    no_weights = TaskResult("w", "perplexity", 3.0, False, 2, [1.0, 2.0], None, "perplexity")
    with pytest.raises(TuneguardError, match="needs per-item weights"):
        compare_task(no_weights, no_weights)


def _general(delta_items: int, outcomes: np.ndarray, *, general: bool = True) -> Comparison:
    tuned = flipped(outcomes, wins=0, losses=delta_items) if delta_items > 0 else outcomes
    return compare_task(acc("g", outcomes), acc("g", tuned), is_general=general)


def test_budget_raises_only_on_significant_regressions_beyond_it(outcomes: np.ndarray) -> None:
    big = _general(50, outcomes)            # -5 pp, significant
    assert big.verdict == "regressed" and big.regression_points == pytest.approx(5.0)
    with pytest.raises(RegressionBudgetExceeded, match="g acc") as err:
        check_budget([big], max_regression=2.0)
    assert err.value.exit_code == 1
    check_budget([big], max_regression=6.0)                          # within budget
    check_budget([big], max_regression=None)                         # no budget
    check_budget([_general(50, outcomes, general=False)], 2.0)       # the fine-tuning task itself
    small = _general(4, outcomes)            # -0.4 pp on 4 discordant pairs: not significant
    assert small.verdict == "no significant change"
    check_budget([small], max_regression=0.1)


def test_budget_for_perplexity_is_relative_percent() -> None:
    rng = np.random.default_rng(0)
    nll, tokens = rng.gamma(2.0, 20.0, 800), rng.integers(10, 60, 800).astype(float)
    worse = compare_task(ppl("wiki", nll, tokens), ppl("wiki", nll * 1.05, tokens), is_general=True)
    assert worse.verdict == "regressed" and worse.points_unit == "%"
    rel = 100 * (worse.tuned - worse.base) / worse.base
    check_budget([worse], max_regression=rel + 0.01)
    with pytest.raises(RegressionBudgetExceeded, match="wiki perplexity"):
        check_budget([worse], max_regression=rel - 0.01)


def test_train_val_gap(tmp_path: Path) -> None:
    lines = [{"step": s, "loss": 2.0 - 0.1 * s} for s in range(1, 11)]
    lines += [{"step": 5, "val_loss": 1.9}, {"step": 10, "val_loss": 2.1}]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"step": 11, "lo')   # a torn last line
    records = read_metrics(path)
    assert len(records) == 12
    gap = train_val_gap(records, last_k=5)
    assert gap is not None
    assert gap["train_loss"] == pytest.approx(np.mean([1.4, 1.3, 1.2, 1.1, 1.0]))
    assert (gap["val_loss"], gap["step"], gap["best_val_loss"], gap["best_val_step"]) == (2.1, 10, 1.9, 5)
    assert gap["gap"] == pytest.approx(0.9) and gap["overfitting"] is True
    healthy = train_val_gap(lines[:10] + [{"step": 5, "val_loss": 1.6}, {"step": 10, "val_loss": 1.3}])
    assert healthy is not None and healthy["overfitting"] is False
    assert train_val_gap(lines[:10]) is None
    assert read_metrics(tmp_path / "absent.jsonl") == []
