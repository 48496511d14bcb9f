"""Base vs tuned, task by task, with paired statistics and a margin, so a verdict is never read off noise.

Both models are scored on the same items in the same order, so every comparison is paired
(:mod:`tuneguard.eval.stats` holds the tests and intervals). A verdict answers "did this cost more
than I accept?": ``margin`` is the regression a user accepts, in budget points, and each task is

- ``improved``: significantly better;
- ``regressed``: significantly worse, and ``beyond_margin`` when the whole interval lies past the margin;
- ``non-inferior``: not significant, and the interval's worst end is within the margin;
- ``inconclusive``: not significant, but the interval reaches past the margin; ``items_to_decide``
  says how many items would settle it with 80% power.

The general suite is one family, corrected by Holm or Benjamini-Hochberg; the recipe's own task
is its own family. ``compare_quantization`` runs the same comparison from the unquantized
original to the quantized base, so the cost of quantization shows apart from fine-tuning's.

Budget points: for mean metrics (accuracy, F1, exact match; all in [0, 1]) a point is a
percentage point, ``100 * delta``; for perplexity-like metrics (``perplexity``, ``bits_per_byte``)
it is the relative change in percent, ``100 * delta / base``, because their scale depends on the
tokenizer and the text, so only relative changes are comparable across tasks.
"""

from __future__ import annotations

import math
import zlib
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import numpy as np

from tuneguard.errors import RegressionBudgetExceeded, TuneguardError
from tuneguard.eval import stats
from tuneguard.eval.records import Aggregate, TaskResult, aggregate
from tuneguard.eval.stats import ALPHA, Correction

DEFAULT_MARGIN = 2.0
Margin = float | Mapping[str, float]
"""Points a user accepts losing: one number for every task, or per task (``default`` for the rest)."""


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
    """Interval of ``delta`` at level ``1 - alpha``: Tango's score interval for 0/1 outcomes, else the inverted
    sign-flip test's (infinite on a side the test cannot bound with so few items; None in report.json)."""
    p_value: float
    test: str
    """``mcnemar`` (score test) for 0/1 outcomes, else ``sign-flip-exact`` (every sign pattern) or ``sign-flip``
    (random patterns); ``paired-bootstrap`` in reports written before session 34."""
    verdict: str
    """``improved``, ``non-inferior``, ``regressed`` or ``inconclusive`` (reports written before margins:
    ``no significant change``)."""
    n: int
    higher_is_better: bool
    is_general: bool = False
    aggregate: Aggregate = "mean"
    p_adjusted: float | None = None
    """``p_value`` adjusted for the family (the general suite) by ``correction``."""
    alpha: float = ALPHA
    """The level the interval is drawn at: below 0.05 when a correction spreads the error over a family."""
    correction: str = "none"
    margin: float | None = None
    """Accepted regression in budget points."""
    beyond_margin: bool = False
    mdr: float | None = None
    """Minimum detectable regression in budget points (80% power at ``alpha``, observed discordance)."""
    items_to_decide: int | None = None
    won: int | None = None
    lost: int | None = None
    """0/1 outcomes: items tuned got right and base wrong, and the other way round."""
    sd_item: float | None = None
    """Per-item standard deviation of the paired difference, in budget points (what power depends on)."""

    @property
    def regression_points(self) -> float:
        """How much worse tuned is than base in budget points (see the module doc); negative = better."""
        return -self._gain(self.delta)

    @property
    def points_unit(self) -> str:
        return "pp" if self.aggregate == "mean" else "%"

    @property
    def gain_interval(self) -> tuple[float, float]:
        """The interval as improvement in budget points, worst end first."""
        ends = sorted((self._gain(self.ci_low), self._gain(self.ci_high)))
        return ends[0], ends[1]

    def _gain(self, x: float) -> float:
        scale = 100.0 if self.aggregate == "mean" else 100.0 / max(abs(self.base), 1e-12)
        return scale * x if self.higher_is_better else -scale * x

    def with_margin(self, margin: float) -> Comparison:
        """The verdict under another margin; significance (the test) is what it was."""
        return replace(self, margin=margin, **_judge(self, margin, self.verdict in ("improved", "regressed")))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types; a NaN or infinity (from such an outcome upstream) becomes None so report.json stays
        valid JSON."""
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Comparison:
        known = {f.name for f in fields(cls)}
        nullable = {"p_adjusted", "margin", "mdr", "items_to_decide", "won", "lost", "sd_item"}
        # its detectable change is None, too, only where it could detect none
        unbounded = {"ci_low": -math.inf, "ci_high": math.inf, "mdr": math.inf} if open_ended(data) else {}
        return cls(**{k: (unbounded[k] if v is None and k in unbounded else math.nan if v is None and k not in nullable
                          else v) for k, v in data.items() if k in known})


def open_ended(row: Mapping[str, Any]) -> bool:
    """A stored comparison (report.json) whose missing interval end means unbounded: a sign-flip test that ran (it has
    a p) leaves an end None only where it could not bound it; any other None is a value not measured."""
    return str(row.get("test", "")).startswith("sign-flip") and row.get("p_value") is not None


def _judge(c: Comparison, margin: float, significant: bool) -> dict[str, Any]:
    """Verdict, beyond-margin flag and items to decide, from the interval in budget points.

    Undecided rows (an interval across the margin: inconclusive, or regressed but not shown beyond it) get the
    items that would put the interval on one side of the margin, as ``tuneguard gate`` decides: the distance
    is from the observed change to the margin, so a change close to the margin needs very many."""
    worst, best = c.gain_interval
    if math.isnan(worst) or math.isnan(best):  # a non-finite outcome upstream: nothing can be judged
        return {"verdict": "inconclusive", "beyond_margin": False, "items_to_decide": None}
    if significant and worst > 0:
        return {"verdict": "improved", "beyond_margin": False, "items_to_decide": None}
    never_differ = c.won == 0 and c.lost == 0  # 0/1 outcomes alike on every item: no spread to plan from
    needed = None if never_differ or not c.sd_item else stats.items_needed(c.sd_item, abs(margin - c.regression_points),
                                                                            c.alpha)
    if needed is not None and c.test.startswith("sign-flip"):  # it cannot reject on fewer
        needed = max(needed, stats.sign_flip_min_items(c.alpha))
    if significant and best < 0:
        decided = best < -margin or worst >= -margin
        return {"verdict": "regressed", "beyond_margin": best < -margin, "items_to_decide": None if decided else needed}
    if worst >= -margin:
        return {"verdict": "non-inferior", "beyond_margin": False, "items_to_decide": None}
    return {"verdict": "inconclusive", "beyond_margin": False, "items_to_decide": needed}


def margin_for(margin: Margin, task: str) -> float:
    if isinstance(margin, Mapping):
        return float(margin.get(task, margin.get("default", DEFAULT_MARGIN)))
    return float(margin)


@dataclass
class _Evidence:
    """What one task's pair of results says before a family's correction sets its level."""

    base: TaskResult
    before: float
    after: float
    p: float
    test: str
    won: int | None = None
    lost: int | None = None
    flips: stats.SignFlips | None = None
    """Outcomes other than 0/1: the sign-flip test (None when an outcome is not finite: nothing is tested)."""

    def interval(self, alpha: float) -> tuple[float, float]:
        if self.won is not None:
            return stats.tango_interval(self.won, self.lost or 0, len(self.base.per_item), alpha)
        if self.flips is None:
            return math.nan, math.nan
        low, high = self.flips.interval(alpha)
        return self._delta(low), self._delta(high)

    def _delta(self, theta: float) -> float:
        """An end the test cannot bound stays infinite (a perplexity's would read as falling to 0)."""
        return theta if math.isinf(theta) else stats.theta_to_delta(theta, self.base.aggregate, self.before)

    def sd_item(self) -> float:
        """In the metric's units."""
        if self.won is not None:
            return stats.binary_sd(self.won, self.lost or 0, len(self.base.per_item))
        if self.flips is None:
            return math.nan
        # the metric's change per unit of θ at the estimate: 1 for a mean, 1/ln 2 in bits, ``after`` for perplexity
        slope = {"mean": 1.0, "bits_per_byte": 1 / math.log(2)}.get(self.base.aggregate, self.after)
        return slope * self.flips.sd_item()


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
    if base.aggregate != "mean" and list(base.weights or []) != list(tuned.weights or []):
        raise TuneguardError(f"{where}: base and tuned weigh the items differently (tokens or bytes per item); "
                             "a paired comparison needs the same items, tokenized alike")


def resamples(n_boot: int, family_size: int, alpha: float = ALPHA) -> int:
    """Random sign patterns for a test in a family of ``family_size``: at least ``n_boot``, and enough that the
    smallest p they can give, 1 / (B + 1), is a twentieth of the smallest level the family's correction tests at
    (``alpha / family_size``). With fewer, a family of 27 (three adapters on the general suite) could never call
    even a 65% perplexity regression significant at 1,000 draws."""
    return max(n_boot, math.ceil(20 * family_size / alpha))


def _finite(*values: Sequence[float] | None) -> bool:
    return all(np.isfinite(np.asarray(v, float)).all() for v in values if v is not None)


def _evidence(base: TaskResult, tuned: TaskResult, *, n_boot: int, seed: int) -> _Evidence:
    _check_pair(base, tuned)
    before = aggregate(base.per_item, base.weights, base.aggregate)
    after = aggregate(tuned.per_item, tuned.weights, tuned.aggregate)
    if not _finite(base.per_item, tuned.per_item, base.weights, tuned.weights):  # overflow upstream: no test
        return _Evidence(base, before, after, math.nan, "none: non-finite outcomes")
    if base.aggregate == "mean" and _is_binary(base.per_item) and _is_binary(tuned.per_item):
        won, lost = stats.discordant(np.asarray(base.per_item), np.asarray(tuned.per_item))
        return _Evidence(base, before, after, stats.mcnemar_p(won, lost), "mcnemar", won=won, lost=lost)
    # seeded by the task too, so a task's draws do not depend on which other tasks were compared alongside it
    flips = stats.SignFlips.draw(*stats.paired_differences(base, tuned), n_boot, [seed, zlib.crc32(base.task.encode())])
    return _Evidence(base, before, after, flips.p(), "sign-flip-exact" if flips.exact else "sign-flip", flips=flips)


def _finish(ev: _Evidence, *, is_general: bool, level: float, p_adjusted: float, correction: str, margin: float,
            alpha: float) -> Comparison:
    """The comparison at the level its family's correction assigned, judged against ``margin``."""
    low, high = ev.interval(level)
    b = ev.base
    c = Comparison(
        task=b.task, metric=b.metric, base=ev.before, tuned=ev.after, delta=ev.after - ev.before, ci_low=low,
        ci_high=high, p_value=float(ev.p), test=ev.test, verdict="inconclusive", n=len(b.per_item),
        higher_is_better=b.higher_is_better, is_general=is_general, aggregate=b.aggregate, p_adjusted=p_adjusted,
        alpha=level, correction=correction, margin=margin, won=ev.won, lost=ev.lost,
    )
    c.sd_item = abs(c._gain(ev.sd_item()))
    powerless = ev.flips is not None and ev.flips.exact and c.n < stats.sign_flip_min_items(level)
    detectable = stats.min_detectable(c.sd_item, c.n, level)
    # A 0/1 outcome cannot fall by more than it stands at (100.2 pp read as detectable at n = 5): none is.
    largest = 100 * (c.base if c.higher_is_better else 1 - c.base) if ev.won is not None else math.inf
    c.mdr = math.inf if powerless or detectable >= largest else detectable  # inf: no change is detectable
    significant = p_adjusted < alpha and not low <= 0 <= high
    return replace(c, **_judge(c, margin, significant))


def compare_task(
    base: TaskResult, tuned: TaskResult, *, is_general: bool = False, n_boot: int = 1000, seed: int = 0,
    alpha: float = ALPHA, margin: float = DEFAULT_MARGIN,
) -> Comparison:
    """One task as a family of its own: values, delta, interval, paired test and a verdict."""
    ev = _evidence(base, tuned, n_boot=resamples(n_boot, 1, alpha), seed=seed)
    return _finish(ev, is_general=is_general, level=alpha, p_adjusted=ev.p, correction="none", margin=margin,
                   alpha=alpha)


def compare_pairs(
    pairs: Sequence[tuple[TaskResult, TaskResult]], families: Sequence[str | None], *, general_tasks: set[str],
    n_boot: int = 1000, seed: int = 0, alpha: float = ALPHA, margin: Margin = DEFAULT_MARGIN,
    correction: Correction = "holm",
) -> list[Comparison]:
    """``(before, after)`` pairs; those sharing a family name are corrected together, ``None`` stands alone."""
    sizes = Counter(f for f in families if f is not None)
    evidence = [_evidence(b, t, n_boot=resamples(n_boot, sizes.get(f, 1), alpha), seed=seed)
                for (b, t), f in zip(pairs, families, strict=True)]
    corrected: dict[int, tuple[float, float]] = {}
    for family in sizes:
        members = [i for i, f in enumerate(families) if f == family]
        # a test that could not run (non-finite outcomes) counts as one that did not reject
        p_adj, levels = stats.adjust([1.0 if math.isnan(evidence[i].p) else evidence[i].p for i in members],
                                     correction, alpha)
        corrected.update(zip(members, zip(p_adj, levels, strict=True), strict=True))
    out = []
    for i, ev in enumerate(evidence):
        p, level = corrected.get(i, (ev.p, alpha))
        p = math.nan if math.isnan(ev.p) else p  # no test ran: no adjusted p either
        out.append(_finish(ev, is_general=ev.base.task in general_tasks, level=level, p_adjusted=p,
                           correction=correction if i in corrected else "none",
                           margin=margin_for(margin, ev.base.task), alpha=alpha))
    return out


def compare_results(
    base: list[TaskResult], tuned: list[TaskResult], *, general_tasks: set[str], n_boot: int = 1000,
    seed: int = 0, alpha: float = ALPHA, margin: Margin = DEFAULT_MARGIN, correction: Correction = "holm",
) -> list[Comparison]:
    """Every task scored on both sides, in the order of ``base``; the general tasks corrected as one family.

    A task scored on one side only is an error, not a silent omission.
    """
    by_task = {r.task: r for r in tuned}
    one_sided = sorted(set(by_task) ^ {r.task for r in base})
    if one_sided:
        raise TuneguardError(f"tasks scored on one side only, cannot compare: {', '.join(one_sided)}")
    return compare_pairs([(b, by_task[b.task]) for b in base],
                         ["general" if b.task in general_tasks else None for b in base], general_tasks=general_tasks,
                         n_boot=n_boot, seed=seed, alpha=alpha, margin=margin, correction=correction)


def compare_quantization(
    original: list[TaskResult], base: list[TaskResult], *, general_tasks: set[str], n_boot: int = 1000,
    seed: int = 0, alpha: float = ALPHA, margin: Margin = DEFAULT_MARGIN, correction: Correction = "holm",
) -> list[Comparison]:
    """The cost of quantization: the unquantized original ("before") against the quantized base
    ("after"), on the tasks the original was scored on (it is often scored on fewer)."""
    scored = {r.task for r in original}
    return compare_results(original, [r for r in base if r.task in scored], general_tasks=general_tasks,
                           n_boot=n_boot, seed=seed, alpha=alpha, margin=margin, correction=correction)


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
