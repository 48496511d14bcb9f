"""Base vs tuned, task by task, with paired statistics, so a verdict is never read off noise.

Both models are scored on the same items in the same order, so every comparison is paired: the
bootstrap resamples items jointly (one index draw serves base and tuned) and recomputes each
metric the way :func:`tuneguard.eval.records.aggregate` does, which keeps the confidence interval
honest for means and for token-weighted perplexity alike. ``compare_quantization`` runs the same
comparison from the unquantized original to the quantized base, so the cost of quantization shows
apart from the effect of fine-tuning.

Regression budget points: for mean metrics (accuracy, F1, exact match; all in [0, 1]) a point is a
percentage point, ``100 * delta``; for perplexity-like metrics (``perplexity``, ``bits_per_byte``)
it is the relative change in percent, ``100 * delta / base``, because their scale depends on the
tokenizer and the text, so only relative changes are comparable across tasks.
"""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
from scipy.stats import binomtest

from tuneguard.errors import RegressionBudgetExceeded, TuneguardError
from tuneguard.eval.records import Aggregate, TaskResult, aggregate

Verdict = Literal["improved", "regressed", "no significant change"]
ALPHA = 0.05
_MAX_CELLS = 4_000_000
"""Resampled items held in memory at once (about 32 MB per float64 array), whatever n_boot is."""


@dataclass
class Comparison:
    task: str
    metric: str
    base: float
    tuned: float
    delta: float
    """``tuned - base`` in the metric's own units."""
    ci_low: float
    ci_high: float
    """95% paired bootstrap percentile interval of ``delta``."""
    p_value: float
    test: str
    """``mcnemar-exact`` for 0/1 outcomes, else ``paired-bootstrap``."""
    verdict: Verdict
    n: int
    higher_is_better: bool
    is_general: bool = False
    aggregate: Aggregate = "mean"

    @property
    def regression_points(self) -> float:
        """How much worse tuned is than base in budget points (see the module doc); negative = better."""
        worse = -self.delta if self.higher_is_better else self.delta
        if self.aggregate == "mean":
            return 100.0 * worse
        return 100.0 * worse / max(abs(self.base), 1e-12)

    @property
    def points_unit(self) -> str:
        return "pp" if self.aggregate == "mean" else "%"

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types; a NaN (from a NaN outcome upstream) becomes None so report.json stays valid JSON."""
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Comparison:
        known = {f.name for f in fields(cls)}
        return cls(**{k: (math.nan if v is None else v) for k, v in data.items() if k in known})


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

    The generator is seeded from ``seed`` and the task name, so a task's interval does not
    depend on which other tasks were compared alongside it.
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


def mcnemar_exact(base: np.ndarray, tuned: np.ndarray) -> float:
    """Two-sided exact McNemar p: a fair-coin binomial test on the discordant pairs only."""
    lost = int(np.sum((base == 1) & (tuned == 0)))
    won = int(np.sum((base == 0) & (tuned == 1)))
    return binomtest(won, lost + won, 0.5).pvalue if lost + won else 1.0


def bootstrap_p(deltas: np.ndarray) -> float:
    """Two-sided p from the bootstrap distribution (the percentile interval inverted); +1 smoothing keeps it > 0."""
    k = len(deltas) + 1
    below, above = (np.sum(deltas <= 0) + 1) / k, (np.sum(deltas >= 0) + 1) / k
    return float(min(1.0, 2 * min(below, above)))


def _is_binary(values: list[float]) -> bool:
    return bool(np.isin(np.asarray(values, float), (0.0, 1.0)).all())


def _check_pair(base: TaskResult, tuned: TaskResult) -> None:
    where = f"task '{base.task}'"
    if base.metric != tuned.metric or base.aggregate != tuned.aggregate:
        raise TuneguardError(
            f"{where}: base scored '{base.metric}' ({base.aggregate}) but tuned '{tuned.metric}' ({tuned.aggregate})"
        )
    if not base.per_item or len(base.per_item) != len(tuned.per_item):
        raise TuneguardError(
            f"{where}: base has {len(base.per_item)} per-item outcomes and tuned {len(tuned.per_item)}; "
            "a paired comparison needs the same non-empty list of items on both sides"
        )
    if base.aggregate != "mean" and (base.weights is None or tuned.weights is None):
        raise TuneguardError(f"{where}: {base.aggregate} needs per-item weights (tokens or bytes)")


def compare_task(
    base: TaskResult, tuned: TaskResult, *, is_general: bool = False, n_boot: int = 1000, seed: int = 0,
    alpha: float = ALPHA,
) -> Comparison:
    """One task: values, delta, 95% CI, paired test and a verdict.

    A change is significant only when the test rejects at ``alpha`` *and* the interval excludes
    zero, so a verdict never contradicts the interval printed next to it.
    """
    _check_pair(base, tuned)
    before = aggregate(base.per_item, base.weights, base.aggregate)
    after = aggregate(tuned.per_item, tuned.weights, tuned.aggregate)
    deltas = bootstrap_deltas(base, tuned, n_boot=n_boot, seed=seed)
    low, high = (float(x) for x in np.percentile(deltas, [100 * alpha / 2, 100 * (1 - alpha / 2)]))
    if base.aggregate == "mean" and _is_binary(base.per_item) and _is_binary(tuned.per_item):
        test = "mcnemar-exact"
        p = mcnemar_exact(np.asarray(base.per_item), np.asarray(tuned.per_item))
    else:
        test, p = "paired-bootstrap", bootstrap_p(deltas)
    delta = after - before
    verdict: Verdict = "no significant change"
    if p < alpha and not low <= 0 <= high:
        verdict = "improved" if (delta > 0) == base.higher_is_better else "regressed"
    return Comparison(
        task=base.task, metric=base.metric, base=before, tuned=after, delta=delta, ci_low=low, ci_high=high,
        p_value=float(p), test=test, verdict=verdict, n=len(base.per_item),
        higher_is_better=base.higher_is_better, is_general=is_general, aggregate=base.aggregate,
    )


def compare_results(
    base: list[TaskResult], tuned: list[TaskResult], *, general_tasks: set[str], n_boot: int = 1000,
    seed: int = 0, alpha: float = ALPHA,
) -> list[Comparison]:
    """Every task scored on both sides, in the order of ``base``.

    A task scored on one side only is an error, not a silent omission.
    """
    by_task = {r.task: r for r in tuned}
    one_sided = sorted(set(by_task) ^ {r.task for r in base})
    if one_sided:
        raise TuneguardError(f"tasks scored on one side only, cannot compare: {', '.join(one_sided)}")
    return [
        compare_task(b, by_task[b.task], is_general=b.task in general_tasks, n_boot=n_boot, seed=seed, alpha=alpha)
        for b in base
    ]


def compare_quantization(
    original: list[TaskResult], base: list[TaskResult], *, general_tasks: set[str], n_boot: int = 1000,
    seed: int = 0, alpha: float = ALPHA,
) -> list[Comparison]:
    """The cost of quantization: the unquantized original ("before") against the quantized base
    ("after"), on the tasks the original was scored on (it is often scored on fewer)."""
    scored = {r.task for r in original}
    return compare_results(original, [r for r in base if r.task in scored], general_tasks=general_tasks,
                           n_boot=n_boot, seed=seed, alpha=alpha)


def budget_violations(comparisons: list[Comparison], max_regression: float) -> list[Comparison]:
    """General tasks that regressed significantly by more than ``max_regression`` points."""
    return [
        c for c in comparisons
        if c.is_general and c.verdict == "regressed" and c.regression_points > max_regression
    ]


def check_budget(comparisons: list[Comparison], max_regression: float | None) -> None:
    """Raise :class:`RegressionBudgetExceeded` (exit code 1) on a violation; ``None`` means no budget."""
    if max_regression is None:
        return
    bad = budget_violations(comparisons, max_regression)
    if bad:
        detail = "; ".join(
            f"{c.task} {c.metric} {c.base:.4g} -> {c.tuned:.4g} ({c.regression_points:.1f} {c.points_unit} worse, "
            f"p={c.p_value:.2g})"
            for c in bad
        )
        raise RegressionBudgetExceeded(f"general tasks regressed beyond the budget of {max_regression:g} points: {detail}")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl; a torn last line (a killed run) is skipped, and a run that
    logged nothing (no file) has no records."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            out.append(record)
    return out


def train_val_gap(records: list[dict[str, Any]], *, last_k: int = 5, threshold: float = 0.1) -> dict[str, Any] | None:
    """An overfitting signal: the last ``val_loss`` against the mean of the last ``last_k`` train losses.

    ``overfitting`` is set when validation loss exceeds train loss by more than ``threshold``
    (relative) *and* sits above its own best, i.e. the gap is wide and still opening. ``None``
    when the run logged no validation loss.
    """
    train = [r["loss"] for r in records if r.get("loss") is not None]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    if not train or not val:
        return None
    train_loss = float(np.mean(train[-last_k:]))
    step, val_loss = val[-1]
    best_step, best_val = min(val, key=lambda sv: sv[1])
    rel = (val_loss - train_loss) / max(abs(train_loss), 1e-12)
    return {
        "step": step, "train_loss": train_loss, "val_loss": val_loss, "gap": val_loss - train_loss,
        "relative_gap": rel, "best_val_loss": best_val, "best_val_step": best_step,
        "overfitting": bool(rel > threshold and val_loss > best_val),
    }
