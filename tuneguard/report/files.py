"""report.json, report.md and a self-contained report.html in the run directory, written atomically.

``build_report`` gathers everything a report shows into one plain dict (which is what
report.json holds), so every format, the history and ``tuneguard report A B`` read the same data.
"""

from __future__ import annotations

import html
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tuneguard.eval.compare import Comparison, budget_violations, read_metrics, train_val_gap
from tuneguard.io import atomic_write_json, atomic_write_text
from tuneguard.report._format import html_block, html_page, md_block
from tuneguard.report.layout import report_blocks
from tuneguard.report.plots import before_after_png, loss_curves_png
from tuneguard.report.rundir import run_summary

SCHEMA = 1


def _task_metrics(eval_data: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """Every metric each task computed, base and tuned side by side."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for side in ("base", "tuned"):
        for r in eval_data.get(side) or []:
            if r.get("metrics"):
                out.setdefault(r["task"], {})[side] = r["metrics"]
    return out


def build_report(
    run_dir: Path, eval_data: dict[str, Any], comparisons: list[Comparison],
    original_comparisons: list[Comparison] | None = None,
) -> dict[str, Any]:
    """The report of one run as plain JSON data: summary, comparisons, guards, budget, loss curves."""
    run_dir = Path(run_dir)
    summary = run_summary(run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    limit = summary["max_regression"]
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
        "curves": {
            "train": [[r["step"], r["loss"]] for r in records if r.get("loss") is not None],
            "val": [[r["step"], r["val_loss"]] for r in records if r.get("val_loss") is not None],
        },
        "eval_seconds": eval_data.get("seconds"),
    }


def render_markdown(report: dict[str, Any]) -> str:
    head = f"# tuneguard report: {report['summary']['name']}\n\n_{report['created']}_\n"
    return "\n".join([head, *map(md_block, report_blocks(report))])


def render_html(report: dict[str, Any]) -> str:
    """The HTML page, plots inline as base64 PNG: one file to mail or archive, nothing fetched."""
    name = report["summary"]["name"]
    body = [f"<h1>tuneguard report: {html.escape(name)}</h1><p>{html.escape(report['created'])}</p>"]
    body += map(html_block, report_blocks(report))
    plots = [
        ("Before and after (error bar: 95% CI of the paired delta)",
         before_after_png(report["task"] + report["general"])),
        ("Cost of quantization", before_after_png(report.get("quantization") or [], ("original", "quantized"))),
        ("Training and validation loss", loss_curves_png(report["curves"])),
    ]
    for title, png in plots:
        if png:
            body.append(f'<h2>{html.escape(title)}</h2><img src="data:image/png;base64,{png}" alt="{html.escape(title)}">\n')
    return html_page(f"tuneguard report: {name}", "".join(body))


def write_reports(run_dir: Path, report: dict[str, Any]) -> list[Path]:
    """Write report.json, report.md and report.html into ``run_dir``; returns their paths."""
    run_dir = Path(run_dir)
    paths = [run_dir / "report.json", run_dir / "report.md", run_dir / "report.html"]
    atomic_write_json(paths[0], report)
    atomic_write_text(paths[1], render_markdown(report))
    atomic_write_text(paths[2], render_html(report))
    return paths
