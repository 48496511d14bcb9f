"""The sections of a single-run report, laid out once for the terminal, markdown and HTML alike."""

from __future__ import annotations

from typing import Any

from tuneguard.report._format import (
    COMPARISON_HEADERS,
    DASH,
    Block,
    Cell,
    comparison_row,
    missing,
    summary_rows,
)


def _text_loss(loss: dict[str, Any]) -> str:
    base, tuned = loss.get("base"), loss.get("tuned")
    text = f"base {_plain(base)} → tuned {_plain(tuned)}"
    return text if missing(base) or missing(tuned) else f"{text} ({tuned - base:+.4g})"


def _gap(gap: dict[str, Any]) -> Cell:
    """The gap as :func:`tuneguard.eval.compare.train_val_gap` describes it; any other shape as key-value pairs."""
    if "best_val_loss" not in gap:
        return ", ".join(f"{k} {_plain(v)}" for k, v in gap.items())
    text = (
        f"at step {gap['step']}: validation loss {gap['val_loss']:.4f} vs train loss {gap['train_loss']:.4f} "
        f"(mean of the last logs): gap {gap['gap']:+.4f} ({100 * gap['relative_gap']:+.1f}%); "
        f"best validation loss {gap['best_val_loss']:.4f} at step {gap['best_val_step']}"
    )
    if gap.get("overfitting"):
        return (text + " — validation loss is rising above its best: likely overfitting", "fail")
    return text


def _budget(budget: dict[str, Any]) -> Cell:
    limit = budget["max_regression"]
    if budget["exceeded"]:
        return (f"exceeded (max {limit:g} points) by: {', '.join(budget['exceeded'])}", "fail")
    return (f"no general task regressed significantly by more than {limit:g} points "
            "(percentage points for accuracies, relative % for perplexity)", "pass")


def _metric_rows(task_metrics: dict[str, dict[str, dict[str, Any]]]) -> list[list[Cell]]:
    rows: list[list[Cell]] = []
    for task, sides in task_metrics.items():
        base, tuned = sides.get("base") or {}, sides.get("tuned") or {}
        for name in dict.fromkeys([*base, *tuned]):
            rows.append([task, name, _plain(base.get(name)), _plain(tuned.get(name))])
    return rows


def _plain(v: Any) -> str:
    if missing(v):
        return DASH
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def report_blocks(report: dict[str, Any], *, detail: bool = True) -> list[Block]:
    """Sections in reading order; ``detail`` adds the run summary and every secondary metric (files only)."""
    summary = report["summary"]
    blocks = []
    if detail:
        blocks.append(Block("Run", ["", summary["name"]], [list(r) for r in summary_rows(summary)]))
    for key, title in (
        ("task", "Task"),
        ("general", "General suite"),
        ("quantization", "Cost of quantization (unquantized original → quantized base)"),
    ):
        if report.get(key):
            blocks.append(Block(title, COMPARISON_HEADERS, [comparison_row(c) for c in report[key]]))
    if report.get("general_text_loss"):
        blocks.append(Block("General-text loss", lines=[_text_loss(report["general_text_loss"])]))
    if report.get("train_val_gap"):
        blocks.append(Block("Train vs validation", lines=[_gap(report["train_val_gap"])]))
    if report.get("guards"):
        blocks.append(Block("Guards", lines=[
            (f"{'PASS' if g['passed'] else 'FAIL'} {g['name']}: {g.get('detail') or ''}".rstrip(": "),
             "pass" if g["passed"] else "fail")
            for g in report["guards"]
        ]))
    if report.get("budget"):
        blocks.append(Block("Regression budget", lines=[_budget(report["budget"])]))
    if detail and report.get("task_metrics"):
        blocks.append(Block("All metrics", ["task", "metric", "before", "after"], _metric_rows(report["task_metrics"])))
    return blocks
