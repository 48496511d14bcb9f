"""``tuneguard cv``'s summary: each metric's mean ± spread across the folds, and one row per fold.

The folds are ordinary run directories; this reads them through :class:`RunDir` and renders the summary
with the blocks every report uses (terminal, cv.md), next to the data (cv.json).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tuneguard.io import atomic_write_json, atomic_write_text
from tuneguard.report.blocks import (
    DASH,
    Block,
    Cell,
    fmt_ci,
    fmt_delta,
    fmt_int,
    fmt_steps,
    fmt_value,
    fmt_verdict,
    md_block,
    verdict_class,
)
from tuneguard.report.layout import picked_among
from tuneguard.report.terminal import print_block
from tuneguard.rundir import RunDir

SCHEMA = 1
CV_JSON, CV_MD = "cv.json", "cv.md"
VAL_LOSS = "validation loss"
"""The metric name of a fold's final validation loss (run.json), which every data kind has."""
SPREAD_NOTE = (
    "± is the sample standard deviation across folds (n-1). The folds share most of their training rows, so "
    "their results are not independent: the spread shows how much the result moves with the data split; it is "
    "not a confidence interval of the mean. Each fold's own test and verdict are in its run's report"
)


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and not math.isnan(v)


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """Scalar metrics, per-class ones as ``f1_per_class[label]``; confusion matrices and label lists left out."""
    out: dict[str, float] = {}
    for name, value in metrics.items():
        if isinstance(value, dict):
            out.update({f"{name}[{label}]": v for label, v in value.items() if _number(v)})
        elif _number(value):
            out[name] = value
    return out


def _fold_values(report: dict[str, Any], record: dict[str, Any], own_label: str) -> list[dict[str, Any]]:
    """Every number of one fold as {task, metric, aggregate, base, tuned}: the recipe's task with all its metrics
    (named ``own_label``, the same in every fold), each general task's primary metric, the validation loss."""
    own = {c["task"] for c in report.get("task") or []}
    values = []
    for task, sides in (report.get("task_metrics") or {}).items():
        if task in own:
            base, tuned = _scalars(sides.get("base") or {}), _scalars(sides.get("tuned") or {})
            values += [{"task": own_label, "metric": m, "aggregate": "mean", "base": base.get(m), "tuned": tuned.get(m)}
                       for m in dict.fromkeys([*base, *tuned])]
    values += [{k: c.get(k) for k in ("task", "metric", "aggregate", "base", "tuned")}
               for c in report.get("general") or []]
    values.append({"task": own_label, "metric": VAL_LOSS, "aggregate": "loss", "base": None,
                   "tuned": record.get("final_val_loss")})
    return values


def _fold(index: int, run: RunDir, own_label: str) -> dict[str, Any]:
    record = run.record()
    report = run.read_report() if run.report_json.exists() else {}
    data = record.get("data") or {}
    return {
        "fold": index,
        "run_dir": str(run.path),
        "train_rows": data.get("train_rows"),
        "val_rows": data.get("val_rows"),
        "steps": record.get("steps"),
        "val_loss": record.get("final_val_loss"),
        "task": (report.get("task") or [None])[0],
        "planned_steps": record.get("planned_steps"),
        "stopped_early": record.get("stopped_early"),
        "picked_among": picked_among(record.get("selection")),
        "kept_step": (record.get("selection") or {}).get("step"),
        "budget_exceeded": (report.get("budget") or {}).get("exceeded") or [],
        "values": _fold_values(report, record, own_label),
    }


def _spread(values: Sequence[float | None]) -> dict[str, Any] | None:
    """Mean, sample standard deviation, min and max of the folds that have the value; None when none has."""
    got = [v for v in values if v is not None and _number(v)]
    if not got:
        return None
    return {"mean": statistics.fmean(got), "sd": statistics.stdev(got) if len(got) > 1 else None,
            "min": min(got), "max": max(got), "n": len(got), "values": list(values)}


def _metrics(folds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (task, metric) any fold has: base, tuned and Δ (tuned − base, fold by fold) across the folds
    where both are defined (a row with one side only, the validation loss, across every fold that has it)."""
    by_fold = [{(v["task"], v["metric"]): v for v in f["values"]} for f in folds]
    keys = dict.fromkeys((v["task"], v["metric"], v["aggregate"]) for f in folds for v in f["values"])
    rows = []
    for task, metric, aggregate in keys:
        per_fold = [values.get((task, metric)) or {} for values in by_fold]
        both = [v.get("base") is not None and v.get("tuned") is not None for v in per_fold]
        paired = [v if ok else {} for v, ok in zip(per_fold, both, strict=True)] if any(both) else per_fold
        # before, after and Δ over the same folds (a per-class precision a fold's tuned model never predicts is
        # undefined there: before over 5 folds beside after over 2 made a Δ that was neither's difference)
        base, tuned = [v.get("base") for v in paired], [v.get("tuned") for v in paired]
        delta = [t - b if b is not None and t is not None else None for b, t in zip(base, tuned, strict=True)]
        rows.append({"task": task, "metric": metric, "aggregate": aggregate,
                     "base": _spread(base), "tuned": _spread(tuned), "delta": _spread(delta)})
    return rows


def summarize_folds(name: str, run_dirs: Sequence[Path], settings: dict[str, Any]) -> dict[str, Any]:
    """cv.json's content from the finished fold runs: ``settings`` (how the folds were made), one entry per
    fold, and every metric's spread."""
    folds = [_fold(i, RunDir(Path(p)), f"{name} (validation)") for i, p in enumerate(run_dirs)]
    return {
        "schema": SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "name": name,
        **settings,
        "folds": folds,
        "metrics": _metrics(folds),
        "budget_exceeded": [f"fold {f['fold']}: {task}" for f in folds for task in f["budget_exceeded"]],
    }


def _mean_sd(s: dict[str, Any] | None, how: str) -> str:
    if s is None:
        return DASH
    if s["sd"] is None:
        return fmt_value(s["mean"], how)
    sd = f"{100 * s['sd']:.1f} pp" if how == "mean" else f"{s['sd']:.3f}"
    return f"{fmt_value(s['mean'], how)} ± {sd}"


def _range(s: dict[str, Any] | None, how: str) -> str:
    return DASH if s is None else f"{fmt_value(s['min'], how)} … {fmt_value(s['max'], how)}"


def _delta(s: dict[str, Any] | None, how: str, base: dict[str, Any] | None) -> tuple[str, str]:
    """Δ as mean ± sd and as min … max, in the units of a report's Δ column."""
    if s is None:
        return DASH, DASH
    at = {"aggregate": how, "base": base["mean"] if base else None}
    mean = fmt_delta({**at, "delta": s["mean"]})
    sd = "" if s["sd"] is None else (f" ± {100 * s['sd']:.1f} pp" if how == "mean" else f" ± {s['sd']:.3f}")
    return f"{mean}{sd}", f"{fmt_delta({**at, 'delta': s['min']})} … {fmt_delta({**at, 'delta': s['max']})}"


def _metric_row(m: dict[str, Any]) -> list[Cell]:
    how = m["aggregate"]
    return [m["task"], m["metric"], _mean_sd(m["base"], how), _mean_sd(m["tuned"], how), _range(m["tuned"], how),
            *_delta(m["delta"], how, m["base"])]


def _fold_row(f: dict[str, Any]) -> list[Cell]:
    c = f["task"]
    scores: list[Cell] = [DASH] * 6
    if c:
        how = c.get("aggregate", "mean")
        scores = [c["metric"], fmt_value(c.get("base"), how), fmt_value(c.get("tuned"), how), fmt_delta(c), fmt_ci(c),
                  (fmt_verdict(c), verdict_class(c.get("verdict")))]
    loss = DASH if f["val_loss"] is None else f"{f['val_loss']:.4f}"
    kept = f.get("kept_step")
    steps = fmt_steps(f) + (f" (kept {kept})" if kept is not None and kept != f.get("steps") else "")
    return [str(f["fold"]), Path(f["run_dir"]).name, fmt_int(f["train_rows"]), fmt_int(f["val_rows"]),
            steps, *scores, loss]


def cv_blocks(cv: dict[str, Any]) -> list[Block]:
    """The summary across folds, the folds one by one, and how to read the spread."""
    how = f"{cv['k']} folds" + (", stratified by label" if cv.get("stratify") else "") + f", seed {cv['seed']}"
    return [
        Block(f"Cross-validation: {cv['name']} ({how}), mean ± sd across folds",
              ["task", "metric", "before", "after", "after min … max", "Δ", "Δ min … max"],
              [_metric_row(m) for m in cv["metrics"]]),
        Block("Folds (the recipe's task; each fold validates on its own rows)",
              ["fold", "run", "train rows", "validation rows", "steps", "metric", "before", "after", "Δ", "CI of Δ",
               "verdict", "validation loss"],
              [_fold_row(f) for f in cv["folds"]]),
        Block("How to read it", lines=[SPREAD_NOTE, *_picked_note(cv)]),
    ]


def _picked_note(cv: dict[str, Any]) -> list[Cell]:
    """The caveat where folds kept a step picked among their validations: the fold's validation rows chose it
    and then score it."""
    picked = [f"fold {f['fold']}: {f['picked_among']}" for f in cv["folds"] if f.get("picked_among")]
    if not picked:
        return []
    return [(f"train.select picked the kept step among several validations on each fold's own validation rows, which "
             f"then score it ({'; '.join(picked)} validations): {'its' if len(picked) == 1 else 'their'} task 'after', Δ "
             "and validation loss are optimistic by that choice, and so are the means across folds", "inconclusive")]


def render_cv_markdown(cv: dict[str, Any]) -> str:
    head = f"# tuneguard cross-validation: {cv['name']}\n\n_{cv['created']}_\n"
    return "\n".join([head, *map(md_block, cv_blocks(cv))])


def write_cv(folder: Path, cv: dict[str, Any]) -> list[Path]:
    """cv.json (the data) and cv.md (its rendering) into ``folder``, each atomically; returns their paths."""
    paths = [folder / CV_JSON, folder / CV_MD]
    atomic_write_json(paths[0], cv)
    atomic_write_text(paths[1], render_cv_markdown(cv))
    return paths


def print_cv(cv: dict[str, Any]) -> None:
    for block in cv_blocks(cv):
        print_block(block)
