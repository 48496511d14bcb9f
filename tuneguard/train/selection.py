"""Which validation's adapter a run keeps, and why: pure rules over the validation points it logged.

A point is one metrics.jsonl line of a validation (``step``, ``val_loss``, ``val_<metric>``,
``general_loss``, ``forgetting_pct``). :func:`select_point` applies the rule to the points so far: the
loop keeps a validation's adapter when that validation is the one chosen (so it holds one adapter copy,
and the kept point is derived from the logged history, resume included), and a test checks the same
rule over metrics.jsonl against the adapter saved.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

Rule = Literal["last", "best_task", "task_within_forgetting"]
MIN_DELTA = 1e-4
"""A change smaller than this is no improvement (patience and selection alike)."""


def metric_key(metric: str) -> str:
    """The metrics.jsonl key of an early-stopping metric: ``val_loss``, or ``val_f1_macro`` and the like."""
    return metric if metric == "val_loss" else f"val_{metric}"


def higher_is_better(metric: str) -> bool:
    return metric != "val_loss"


def resolved_rule(select: Rule | None, patience: int | None) -> Rule:
    """An unset ``train.select`` keeps what early stopping always kept: the best validation with patience."""
    return select or ("best_task" if patience else "last")


def selection_note(select: Rule | None, patience: int | None) -> str | None:
    """What a run's start says when ``last`` is asked for with early stopping: it keeps the stopping step's
    adapter, ``patience`` validations past the best one, which is rarely what early stopping is for."""
    if select == "last" and patience:
        return (f"note: train.select 'last' with train.early_stopping_patience {patience}: if early stopping triggers, "
                f"the adapter kept is the one it stopped at, {patience} validation(s) after the best ('best_task' keeps "
                "the best)")
    return None


def forgetting_pct(loss: float, base_loss: float) -> float:
    """How much higher the general-text perplexity is than the base model's, in percent."""
    return 100.0 * math.expm1(loss - base_loss)


def metric_improves(value: float, best: float | None, metric: str) -> bool:
    """``value`` beats ``best`` by more than :data:`MIN_DELTA`, in the metric's direction (patience)."""
    if best is None:
        return True
    return value > best + MIN_DELTA if higher_is_better(metric) else value < best - MIN_DELTA


def selection_key(point: dict[str, Any], rule: Rule, metric: str, bound: float | None) -> tuple[int, float] | None:
    """Larger is better: ``(1, task score)`` for a point the rule accepts; under ``task_within_forgetting``
    a point past the bound gets ``(0, -forgetting)``, so when every point forgot too much the one that
    forgot least is kept. None for a point without the numbers the rule needs."""
    value = point.get(metric_key(metric))
    if value is None:
        return None
    score = value if higher_is_better(metric) else -value
    if rule != "task_within_forgetting":
        return (1, score)
    forgetting = point.get("forgetting_pct")
    if forgetting is None or bound is None:
        return None
    return (1, score) if forgetting <= bound else (0, -forgetting)


def improves(new: tuple[int, float] | None, old: tuple[int, float] | None) -> bool:
    """Whether a point with key ``new`` replaces the one kept with ``old`` (ties keep the earlier)."""
    if new is None:
        return False
    if old is None:
        return True
    if new[0] != old[0]:
        return new[0] > old[0]
    return new[1] > old[1] + MIN_DELTA


def select_point(points: Sequence[dict[str, Any]], rule: Rule, metric: str,
                 bound: float | None) -> dict[str, Any] | None:
    """The point ``rule`` keeps among ``points`` (in step order), as the loop keeps it; None for ``last``."""
    if rule == "last":
        return None
    kept: dict[str, Any] | None = None
    for point in points:
        if improves(selection_key(point, rule, metric, bound), kept and selection_key(kept, rule, metric, bound)):
            kept = point
    return kept


def selection_record(points: Sequence[dict[str, Any]], kept: dict[str, Any] | None, rule: Rule, metric: str,
                     bound: float | None, last_step: int) -> dict[str, Any]:
    """run.json's ``selection``: the rule, the step whose adapter was kept, and why, in one sentence."""
    key = metric_key(metric)
    record: dict[str, Any] = {"rule": rule, "metric": metric, "forgetting_bound": bound, "validations": len(points)}
    if kept is None:
        why = "the last step's adapter (train.select 'last')" if rule == "last" else "no validation scored it"
        best = select_point(points, "best_task", metric, None) if rule == "last" else None
        if best is not None and best["step"] != last_step:
            why += f"; the best of the {len(points)} validations during training was step {best['step']} ({metric} {best[key]:.4g})"
        return {**record, "step": last_step, "reason": why}
    value = f"{metric} {kept[key]:.4g}"
    if rule == "best_task":
        why = f"best {value} of {len(points)} validations"
    else:
        within = [p for p in points if p.get("forgetting_pct") is not None and p["forgetting_pct"] <= bound]
        if kept["forgetting_pct"] <= bound:
            why = (f"best {value} among the {len(within)} of {len(points)} validations whose general-text "
                   f"perplexity rose at most {bound:g}% (this one: {kept['forgetting_pct']:+.2f}%)")
        else:
            why = (f"no validation kept general-text perplexity within +{bound:g}%; kept the one that forgot least "
                   f"({kept['forgetting_pct']:+.2f}%, {value})")
    return {**record, "step": kept["step"], key: kept[key], "forgetting_pct": kept.get("forgetting_pct"),
            "reason": f"step {kept['step']}: {why}"}
