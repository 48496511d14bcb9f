"""The paired statistics behind every verdict, checked on cases whose answer is known."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import norm

from tuneguard.errors import RegressionBudgetExceeded, TuneguardError
from tuneguard.eval.records import TaskResult, aggregate
from tuneguard.eval.stats import SignFlips, tango_interval, theta_to_delta
from tuneguard.eval.verdicts import (
    Comparison,
    check_budget,
    compare_quantization,
    compare_results,
    compare_task,
    train_val_gap,
)
from tuneguard.rundir import RunDir


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


def test_identical_outcomes_are_non_inferior(outcomes: np.ndarray) -> None:
    """No discordant item seen is not proof of none: the interval keeps a width set by n."""
    c = compare_task(acc("t", outcomes), acc("t", outcomes))
    assert (c.delta, c.p_value, c.won, c.lost) == (0.0, 1.0, 0, 0)
    assert -0.004 < c.ci_low < 0 < c.ci_high < 0.004
    assert c.verdict == "non-inferior" and not c.beyond_margin and c.items_to_decide is None
    assert c.test == "mcnemar"
    assert c.n == 1000
    few = compare_task(acc("t", outcomes[:20]), acc("t", outcomes[:20]))  # the interval still reaches past 2 pp
    assert few.verdict == "inconclusive" and few.items_to_decide is None  # no spread to plan items from


def test_no_detectable_change_past_what_an_accuracy_can_lose() -> None:
    """Five items, 2 of 5 right: a drop of 40 pp is all there is to lose, and a normal approximation's 100 pp is
    not detectable; the gate and the reports show a dash, not 'inf %'."""
    from tuneguard.report.blocks import fmt_points

    base, tuned = [1.0, 1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 1.0, 0.0, 0.0]
    c = compare_task(acc("t", base), acc("t", tuned))
    assert c.mdr == math.inf and c.to_dict()["mdr"] is None and fmt_points(c.mdr, "pp") == "–"
    many = compare_task(acc("t", base * 200), acc("t", tuned * 200))
    assert 0 < many.mdr < 40 and fmt_points(many.mdr, "pp") == f"{many.mdr:.1f} pp"


def test_a_change_at_the_margin_asks_for_no_item_count() -> None:
    """41 of 50 right, then 40: -2 pp, the margin itself, up to a float's rounding; no number of items decides it
    (it asked for 1.8e31, which then failed the history's write with exit 70)."""
    base = [1.0] * 41 + [0.0] * 9
    tuned = [1.0] * 40 + [0.0] * 10
    c = compare_task(acc("t", base), acc("t", tuned))
    assert c.verdict == "inconclusive" and c.items_to_decide is None


def test_many_discordant_pairs_one_way_is_significant_and_matches_mcnemar(outcomes: np.ndarray) -> None:
    tuned = flipped(outcomes, wins=40, losses=12)
    c = compare_task(acc("t", outcomes), acc("t", tuned), n_boot=2000)
    assert c.p_value == pytest.approx(2 * norm.sf(28 / math.sqrt(52)), rel=1e-12)
    assert c.p_value < 0.001
    assert (c.ci_low, c.ci_high) == tango_interval(40, 12, 1000)
    assert c.delta == pytest.approx(28 / 1000)
    assert 0 < c.ci_low < c.delta < c.ci_high
    assert c.verdict == "improved"


def test_few_discordant_pairs_is_not_significant(outcomes: np.ndarray) -> None:
    c = compare_task(acc("t", outcomes), acc("t", flipped(outcomes, wins=5, losses=3)))
    assert c.p_value == pytest.approx(2 * norm.sf(2 / math.sqrt(8)))
    assert c.ci_low <= 0 <= c.ci_high
    assert c.verdict == "non-inferior"


def test_margin_decides_between_non_inferior_inconclusive_and_beyond_margin(outcomes: np.ndarray) -> None:
    small = outcomes[:250]
    base = acc("t", small)
    unsure = compare_task(base, acc("t", flipped(small, wins=4, losses=10)))     # -2.4 pp, not significant
    assert unsure.verdict == "inconclusive" and unsure.ci_low < -0.02 < 0 < unsure.ci_high
    assert unsure.items_to_decide is not None and unsure.items_to_decide > 250
    assert unsure.with_margin(6.0).verdict == "non-inferior"
    assert 0 < unsure.mdr < 10
    far = compare_task(acc("t", outcomes), acc("t", flipped(outcomes, wins=2, losses=80)))   # -7.8 pp
    assert far.verdict == "regressed" and far.beyond_margin and far.ci_high < -0.02
    assert far.with_margin(7.0).beyond_margin is False and far.with_margin(7.0).verdict == "regressed"
    per_task = compare_results([acc("a", small), acc("b", small)],
                               [acc("a", flipped(small, 4, 10)), acc("b", flipped(small, 4, 10))],
                               general_tasks={"a", "b"}, margin={"a": 8.0, "default": 1.0})
    assert [(c.margin, c.verdict) for c in per_task] == [(8.0, "non-inferior"), (1.0, "inconclusive")]


def test_general_suite_is_corrected_as_one_family(outcomes: np.ndarray) -> None:
    """A 2.5 pp regression on 1000 items (p about 0.015) is significant alone, not among eight tasks."""
    tasks = [f"g{i}" for i in range(8)]
    tuned = flipped(outcomes, wins=40, losses=65)
    rows = compare_results([acc(t, outcomes) for t in tasks], [acc("g0", tuned)] + [acc(t, outcomes) for t in tasks[1:]],
                           general_tasks=set(tasks))
    alone = compare_task(acc("g0", outcomes), acc("g0", tuned))
    assert alone.verdict == "regressed" and alone.p_value < 0.05
    g0 = rows[0]
    assert (g0.correction, g0.p_value) == ("holm", alone.p_value)
    assert g0.p_adjusted == pytest.approx(min(1.0, 8 * alone.p_value)) and g0.alpha == pytest.approx(0.05 / 8)
    assert g0.verdict in ("inconclusive", "non-inferior") and g0.ci_low < alone.ci_low
    bh = compare_results([acc("g0", outcomes)], [acc("g0", tuned)], general_tasks={"g0"}, correction="bh")[0]
    assert bh.correction == "bh" and bh.verdict == "regressed"
    own = compare_results([acc("own", outcomes)], [acc("own", tuned)], general_tasks=set())[0]
    assert own.correction == "none" and own.alpha == 0.05


def test_verdict_respects_higher_is_better(outcomes: np.ndarray) -> None:
    """The same rise is an improvement for accuracy and a regression for an error rate."""
    tuned = flipped(outcomes, wins=60, losses=0)
    up = compare_task(acc("t", outcomes), acc("t", tuned))
    down = compare_task(acc("t", outcomes, higher_is_better=False), acc("t", tuned, higher_is_better=False))
    assert up.verdict == "improved" and down.verdict == "regressed"
    assert up.regression_points == pytest.approx(-6.0) and down.regression_points == pytest.approx(6.0)


def test_bootstrap_is_seeded_and_independent_of_task_order() -> None:
    rng = np.random.default_rng(0)
    nll, tokens = rng.gamma(2.0, 20.0, 300), rng.integers(10, 60, 300).astype(float)
    worse = nll * 1.01 + rng.normal(0, 1.0, 300)
    a = compare_results([ppl("a", nll, tokens), ppl("b", worse, tokens)], [ppl("a", worse, tokens), ppl("b", nll, tokens)],
                        general_tasks={"b"}, seed=3)
    b = compare_results([ppl("b", worse, tokens), ppl("a", nll, tokens)], [ppl("b", nll, tokens), ppl("a", worse, tokens)],
                        general_tasks={"b"}, seed=3)
    assert {c.task: c for c in a} == {c.task: c for c in b}
    assert [c.is_general for c in a] == [False, True]
    other_seed = compare_results([ppl("a", nll, tokens)], [ppl("a", worse, tokens)], general_tasks=set(), seed=4)[0]
    assert (other_seed.ci_low, other_seed.ci_high) != (a[0].ci_low, a[0].ci_high)


def test_quantization_cost_uses_the_tasks_the_original_was_scored_on(outcomes: np.ndarray) -> None:
    quantized = flipped(outcomes, wins=0, losses=30)
    [cost] = compare_quantization([acc("g", outcomes)], [acc("t", outcomes), acc("g", quantized)],
                                  general_tasks={"g"})
    assert (cost.task, cost.is_general, cost.verdict) == ("g", True, "regressed")
    assert cost.regression_points == pytest.approx(3.0)


def test_a_change_per_unit_weight_is_the_metrics_change() -> None:
    """The sign-flip test works on θ = Σd / Σw; mapped back, θ's estimate is exactly after - before."""
    rng = np.random.default_rng(0)
    nll, tokens = rng.gamma(2.0, 20.0, 50), rng.integers(5, 40, 50).astype(float)
    tuned = nll + rng.normal(0, 2.0, 50)
    for how in ("mean", "perplexity", "bits_per_byte"):
        weights = np.ones(50) if how == "mean" else tokens
        before, after = (aggregate(list(v), list(tokens), how) for v in (nll, tuned))
        theta = (tuned - nll).sum() / weights.sum()
        assert before + theta_to_delta(theta, how, before) == pytest.approx(after, rel=1e-12)


def test_perplexity_comparison_is_sane() -> None:
    rng = np.random.default_rng(0)
    nll, tokens = rng.gamma(2.0, 20.0, 800), rng.integers(10, 60, 800).astype(float)
    same = compare_task(ppl("wiki", nll, tokens), ppl("wiki", nll, tokens))
    assert (same.delta, same.p_value) == (0.0, 1.0) and same.ci_low == pytest.approx(0, abs=1e-9)
    assert same.ci_high == pytest.approx(0, abs=1e-9)
    assert same.test == "sign-flip" and same.verdict == "non-inferior"

    worse = compare_task(ppl("wiki", nll, tokens), ppl("wiki", nll * 1.03 + rng.normal(0, 0.5, 800), tokens))
    assert worse.base == pytest.approx(math.exp(nll.sum() / tokens.sum()))
    assert worse.delta > 0 and worse.ci_low < worse.delta < worse.ci_high
    assert worse.ci_low > 0 and worse.p_value < 0.01
    assert worse.verdict == "regressed"
    assert worse.regression_points == pytest.approx(100 * worse.delta / worse.base)

    noisy = compare_task(ppl("wiki", nll, tokens), ppl("wiki", nll + rng.normal(0, 3.0, 800), tokens))
    assert noisy.ci_low < 0 < noisy.ci_high and noisy.verdict in ("non-inferior", "inconclusive")
    worst, _ = noisy.gain_interval
    assert noisy.verdict == ("non-inferior" if worst >= -2.0 else "inconclusive")


def test_sign_flip_p_and_interval_agree() -> None:
    """Exact on few items (two that both got worse: p = 2/4, whatever the size), and the interval excludes 0
    exactly when p is at most its level, exact or drawn."""
    two = SignFlips.draw(np.array([5.0, 7.0]), np.array([100.0, 120.0]), 1000, [0])
    assert two.exact and two.p() == 0.5 and two.interval(0.05) == (-math.inf, math.inf)
    rng = np.random.default_rng(3)
    for n in (6, 9, 12, 40, 300):
        for shift in (0.0, 0.02, 0.05, 0.2):
            w = rng.integers(10, 60, n).astype(float)
            flips = SignFlips.draw(rng.normal(shift, 0.3, n) * w, w, 2000, [n])
            for level in (0.05, 0.01):
                low, high = flips.interval(level)
                assert low <= flips.estimate <= high
                assert (not low <= 0 <= high) == (flips.p() <= level), (n, shift, level)


def test_ten_thousand_resamples_of_a_thousand_items_are_fast(outcomes: np.ndarray) -> None:
    start = time.perf_counter()
    compare_task(acc("t", outcomes), acc("t", flipped(outcomes, 20, 5)), n_boot=10_000)
    assert time.perf_counter() - start < 2.0


def test_comparison_round_trips_through_json(outcomes: np.ndarray) -> None:
    c = compare_task(acc("t", outcomes), acc("t", flipped(outcomes, 20, 5)), is_general=True)
    assert Comparison.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    nan = Comparison("t", "acc", 0.5, 0.5, 0.0, math.nan, math.nan, math.nan, "none", "non-inferior", 0, True)
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
    small = _general(3, outcomes)            # -0.3 pp on 3 discordant pairs: not significant
    assert small.verdict == "non-inferior"
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
    run = RunDir(tmp_path)
    run.metrics.write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"step": 11, "lo')   # a torn last line
    records = run.read_metrics()
    assert len(records) == 12
    gap = train_val_gap(records, last_k=5)
    assert gap is not None
    assert gap["train_loss"] == pytest.approx(np.mean([1.4, 1.3, 1.2, 1.1, 1.0]))
    assert (gap["val_loss"], gap["step"], gap["best_val_loss"], gap["best_val_step"]) == (2.1, 10, 1.9, 5)
    assert gap["gap"] == pytest.approx(0.9) and gap["overfitting"] is True
    healthy = train_val_gap(lines[:10] + [{"step": 5, "val_loss": 1.6}, {"step": 10, "val_loss": 1.3}])
    assert healthy is not None and healthy["overfitting"] is False
    assert train_val_gap(lines[:10]) is None
    assert RunDir(tmp_path / "absent").read_metrics() == []


def test_compare_adapters_on_one_base(tmp_path: Path, tiny_llama_dir: Path) -> None:
    """Three tiny runs: the base is scored once, each adapter swapped in, every pair corrected as a family."""
    from tuneguard.cli import main as cli_main
    from tuneguard.recipe import load_recipe
    from tuneguard.train.loop import train

    from .test_train import make_run

    dirs = []
    for name, adapter in (("lora", {}), ("lora-r2", {"r": 2}), ("ia3", {"method": "ia3", "target_modules": "mlp"})):
        path = make_run(tmp_path / name, tiny_llama_dir, adapter=adapter, output={"name": name},
                        train={"max_steps": 2}, eval={"task": True, "suites": ["arc_easy"], "limit": 6})
        recipe = load_recipe(path)
        train(recipe, recipe.run_dir(path))
        dirs.append(str(recipe.run_dir(path)))
    out = tmp_path / "cmp"
    assert cli_main(["compare", *dirs, "--out", str(out)]) == 0
    result = json.loads((out / "compare.json").read_text())
    assert [r["label"] for r in result["runs"]] == ["lora", "lora-r2", "ia3"]
    assert result["families"] == {"task vs base": 3, "general vs base": 3, "adapter vs adapter": 6}
    vs_base = {(c["adapter"], c["task"]): c for c in result["vs_base"]}
    assert set(vs_base) == {(a, t) for a in ("lora", "lora-r2", "ia3") for t in ("lora (validation)", "arc_easy")}
    bases = {c["base"] for c in result["vs_base"] if c["task"] == "arc_easy"}
    assert len(bases) == 1                                    # one base, scored once, for every adapter
    assert all(c["correction"] == "holm" and c["alpha"] <= 0.05 for c in result["vs_base"])
    assert {(c["a"], c["b"]) for c in result["between"]} == {("lora", "lora-r2"), ("lora", "ia3"), ("lora-r2", "ia3")}
    assert any(p["pareto"] for p in result["points"])
    page = (out / "compare.html").read_text()
    assert page.index("<img") < page.index("<table") and "https://" not in page
    assert "Adapter against adapter" in (out / "compare.md").read_text()
    assert cli_main(["compare", dirs[0], "--out", str(out)]) == 2
    meta = Path(dirs[1]) / "adapter" / "tuneguard.json"  # an adapter trained on other weights: refused, not scored
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "fingerprint": "0123456789abcdef"}))
    assert cli_main(["compare", *dirs, "--out", str(tmp_path / "cmp2")]) == 2
    assert not (tmp_path / "cmp2").exists()


def test_compare_keeps_same_named_tasks_apart_and_takes_any_folder_name(tmp_path: Path, tiny_llama_dir: Path,
                                                                        capsys: pytest.CaptureFixture) -> None:
    """Two runs named alike (``output.name`` defaults to the recipe file's name) validate on other items: their
    results were keyed by the task's name, so one run's base scores stood in for the other's. A "." in a run's folder
    name is not a PEFT adapter name."""
    from tuneguard.cli import main as cli_main
    from tuneguard.recipe import load_recipe
    from tuneguard.train.loop import train

    from .test_train import make_run

    def run(folder: str, name: str, seed: int) -> str:
        path = make_run(tmp_path / folder, tiny_llama_dir, output={"name": name}, train={"max_steps": 2, "seed": seed},
                        eval={"task": True, "suites": [], "limit": 6})
        recipe = load_recipe(path)
        train(recipe, recipe.run_dir(path))
        return str(recipe.run_dir(path))

    a, b, dotted = run("a", "x", 1), run("b", "x", 7), run("c", "lora-v1.5", 1)
    assert cli_main(["compare", a, b, "--out", str(tmp_path / "same")]) == 2
    assert "its task 'x (validation)' has other items than another run's task of that name" in capsys.readouterr().err
    assert cli_main(["compare", a, dotted, "--out", str(tmp_path / "cmp")]) == 0
    result = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert [r["label"] for r in result["runs"]] == ["x", "lora-v1.5"]


def test_margin_and_correction_are_recipe_keys() -> None:
    from pydantic import ValidationError

    from tuneguard.recipe import EvalConfig

    assert (EvalConfig().margin, EvalConfig().correction) == (2.0, "holm")
    assert EvalConfig(margin={"arc_easy": 1, "default": 3}, correction="bh").margin == {"arc_easy": 1.0, "default": 3.0}
    with pytest.raises(ValidationError, match="eval.margin must be >= 0"):
        EvalConfig(margin={"arc_easy": -1})
    with pytest.raises(ValidationError, match="holm"):
        EvalConfig(correction="bonferroni")


def test_compare_ia3_before_lora_on_4_bit(tmp_path: Path, tiny_llama_dir: Path) -> None:
    """PEFT refuses to unload IA3 from 4-bit weights; the next group then starts from a fresh load of the
    same weights, so the scores do not depend on the order the runs are given in."""
    from tuneguard.cli import main as cli_main
    from tuneguard.recipe import load_recipe
    from tuneguard.train.loop import train

    from .test_train import make_run

    dirs = []
    for name, adapter in (("ia3", {"method": "ia3", "target_modules": "mlp"}), ("lora", {})):
        path = make_run(tmp_path / name, tiny_llama_dir, adapter=adapter, output={"name": name},
                        quantization={"method": "nf4"}, train={"max_steps": 2, "lr": 1e-2},
                        eval={"task": False, "suites": ["arc_easy"], "limit": 8})
        recipe = load_recipe(path)
        train(recipe, recipe.run_dir(path))
        dirs.append(str(recipe.run_dir(path)))
    outcomes = []
    for order, out in ((dirs, tmp_path / "a"), (dirs[::-1], tmp_path / "b")):
        assert cli_main(["compare", *order, "--out", str(out)]) == 0
        result = json.loads((out / "compare.json").read_text())
        outcomes.append({c["adapter"]: (c["base"], c["tuned"]) for c in result["vs_base"]})
    assert outcomes[0] == outcomes[1] and set(outcomes[0]) == {"ia3", "lora"}


def test_an_unbounded_forgetting_interval_is_null_in_json_and_drawn_open(outcomes: np.ndarray) -> None:
    """Two WikiText pages (general-small's before session 37) can bound nothing: compare.json held -Infinity/Infinity (invalid JSON)
    and the chart drew that adapter's forgetting as if exact."""
    from tuneguard.eval.compare_adapters import trade_offs
    from tuneguard.report.plots import gain_forgetting_png

    tokens = np.array([3000.0, 4200.0])
    rows = [compare_task(acc("own", outcomes), acc("own", flipped(outcomes, 30, 5))),
            compare_task(ppl("wikitext", tokens * 2.5, tokens), ppl("wikitext", tokens * 2.6, tokens), is_general=True)]
    [point] = trade_offs(["lora"], rows, [("base", "lora")] * 2)
    assert point["worst_task"] == "wikitext" and point["forgetting_interval"] == [None, None]
    json.dumps(point, allow_nan=False)
    assert gain_forgetting_png([point])
