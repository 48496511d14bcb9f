"""report.json, report.md and a self-contained report.html in the run directory, written atomically.

``build_report`` gathers everything a report shows into one plain dict (which is what
report.json holds), so every format, the history and ``tuneguard report A B`` read the same data.
"""

from __future__ import annotations

import html
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tuneguard.eval.verdicts import Comparison, budget_violations, train_val_gap
from tuneguard.report.blocks import html_block, html_page, md_block
from tuneguard.report.layout import PER_CLASS, confusion_matrices, report_blocks
from tuneguard.report.plots import confusion_png, forest_png, loss_curves_png, selection_png
from tuneguard.rundir import RunDir
from tuneguard.train.selection import metric_key

SCHEMA = 1


def _task_metrics(eval_data: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """Every metric each task computed, base and tuned side by side."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for side in ("base", "tuned"):
        for r in eval_data.get(side) or []:
            if r.get("metrics"):
                out.setdefault(r["task"], {})[side] = r["metrics"]
    return out


_ITEM_KEYS = ("task", "metric", "aggregate", "higher_is_better", "n", "per_item", "weights", "item_hashes", "config",
              "setup")


def _items(eval_data: dict[str, Any]) -> list[dict[str, Any]]:
    """The tuned side's per-item outcomes and item hashes: what ``tuneguard gate --baseline`` pairs a later run with."""
    return [{k: r.get(k) for k in _ITEM_KEYS} for r in eval_data.get("tuned") or []]


def build_report(
    run_dir: Path, eval_data: dict[str, Any], comparisons: list[Comparison],
    original_comparisons: list[Comparison] | None = None,
) -> dict[str, Any]:
    """The report of one run as plain JSON data: summary, comparisons, guards, budget, loss curves."""
    run = RunDir(Path(run_dir))
    summary = run.summary()
    records = run.read_metrics()
    limit = summary["max_regression"]
    selection = run.record().get("selection")
    return {
        "schema": SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "summary": summary,
        "task": [c.to_dict() for c in comparisons if not c.is_general],
        "general": [c.to_dict() for c in comparisons if c.is_general],
        "quantization": [c.to_dict() for c in original_comparisons] if original_comparisons else None,
        "general_text_loss": eval_data.get("general_text_loss"),
        "train_val_gap": train_val_gap(records) or eval_data.get("train_val_gap"),
        "guards": eval_data.get("guards") or [],
        "budget": None if limit is None else {
            "max_regression": limit, "exceeded": [c.task for c in budget_violations(comparisons, limit)],
        },
        "task_metrics": _task_metrics(eval_data),
        "setups": {r["task"]: r["setup"] for r in eval_data.get("tuned") or [] if r.get("setup")},
        "items": _items(eval_data),
        "curves": {
            "train": [[r["step"], r["loss"]] for r in records if r.get("loss") is not None],
            "val": [[r["step"], r["val_loss"]] for r in records if r.get("val_loss") is not None],
            **_selection_curves(records, selection),
        },
        "selection": selection,
        "eval_seconds": eval_data.get("seconds"),
        "baseline": _baseline(eval_data.get("baseline")),
    }


def _baseline(baseline: dict[str, Any] | None) -> dict[str, Any] | None:
    """An encoder's linear probe (its "before") and the untrained head's score, kept as chance level only."""
    if not baseline:
        return None
    chance = baseline.get("chance") or {}
    return {k: v for k, v in baseline.items() if k != "chance"} | {
        "chance": {k: chance.get(k) for k in ("task", "metric", "value", "n", "aggregate")}}


def _selection_curves(records: list[dict[str, Any]], selection: dict[str, Any] | None) -> dict[str, list[list[float]]]:
    """The task metric and the general-text perplexity rise (%) at each validation, the base model at step 0."""
    if not selection or selection.get("rule", "last") == "last":
        return {}
    key = metric_key(selection["metric"])
    forgetting = [[r["step"], 0.0] for r in records if r.get("base") and "general_loss" in r]
    forgetting += [[r["step"], r["forgetting_pct"]] for r in records if r.get("forgetting_pct") is not None]
    return {"task": [[r["step"], r[key]] for r in records if r.get(key) is not None], "forgetting": forgetting}


def render_markdown(report: dict[str, Any]) -> str:
    head = f"# tuneguard report: {report['summary']['name']}\n\n_{report['created']}_\n"
    return "\n".join([head, *map(md_block, report_blocks(report))])


def render_html(report: dict[str, Any]) -> str:
    """The HTML page, plots inline as base64 PNG: one file to mail or archive, nothing fetched."""
    name = report["summary"]["name"]
    body = [f"<h1>tuneguard report: {html.escape(name)}</h1><p>{html.escape(report['created'])}</p>"]
    body.append(_img("Change per task, with its interval and the accepted margin",
                     forest_png(_groups(report["task"] + report["general"]))))
    for block in report_blocks(report, confusion_tables=False):
        body.append(html_block(block))
        if block.title == PER_CLASS:
            body += [_img(f"Confusion matrix: {task}", confusion_png(labels, list(sides.items())))
                     for task, labels, sides in confusion_matrices(report)]
    body.append(_img("Cost of quantization (unquantized original → quantized base)",
                     forest_png(_groups(report.get("quantization") or []))))
    body.append(_img("Training and validation loss", loss_curves_png(report["curves"])))
    body.append(_img("Checkpoint choice: task metric and forgetting per validation",
                     selection_png(report["curves"], report.get("selection"))))
    return html_page(f"tuneguard report: {name}", "".join(body))


def _groups(rows: list[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]]]]:
    return [("the recipe's task", [c for c in rows if not c.get("is_general")]),
            ("general suite", [c for c in rows if c.get("is_general")])]


def _img(title: str, png: str | None) -> str:
    if not png:
        return ""
    return f'<h2>{html.escape(title)}</h2><img src="data:image/png;base64,{png}" alt="{html.escape(title)}">\n'


def write_reports(run_dir: Path, report: dict[str, Any]) -> list[Path]:
    """Write report.json, report.md and report.html into ``run_dir``; returns their paths."""
    return RunDir(Path(run_dir)).write_reports(report, render_markdown(report), render_html(report))
