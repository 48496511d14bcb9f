"""``tuneguard report A B C``: several runs side by side, one column per run, one row per task.

Each cell is the tuned value with its delta against that run's own base, coloured by its verdict;
the first rows say what each run was (adapter, rank, quantization) and what it cost.
"""

from __future__ import annotations

import hashlib
import html
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console

from tuneguard.errors import TuneguardError
from tuneguard.io import atomic_write_json, atomic_write_text
from tuneguard.report.blocks import (
    DASH,
    Block,
    Cell,
    fmt_delta,
    fmt_float,
    fmt_int,
    fmt_memory,
    fmt_steps,
    fmt_value,
    html_block,
    html_page,
    md_block,
    verdict_class,
)
from tuneguard.report.layout import picked_among
from tuneguard.report.plots import forest_png
from tuneguard.report.terminal import print_block
from tuneguard.rundir import RunDir

_CELL_KEYS = ("base", "tuned", "delta", "ci_low", "ci_high", "p_value", "verdict", "aggregate", "n", "higher_is_better",
              "margin", "test", "beyond_margin", "items_to_decide")


def compare_run_dirs(run_dirs: list[Path], out_dir: Path | None = None) -> dict[str, Any]:
    """Runs (from recipe.yaml, run.json, report.json) and the union of their tasks, cell by cell.

    With ``out_dir``, also writes comparison.json, comparison.md and comparison.html there and
    lists them under ``"files"``.
    """
    if not run_dirs:
        raise TuneguardError("give at least one run directory to report on")
    runs, reports = [], []
    for run_dir in map(Path, run_dirs):
        if not run_dir.is_dir():
            raise TuneguardError(f"{run_dir}: not a directory (expected a run directory)")
        directory = RunDir(run_dir)
        summary, report = directory.summary(), directory.read_report()
        runs.append(summary | {"general_text_loss": report.get("general_text_loss"), **_kept_facts(report)})
        reports.append(report)
    labels = [Path(r["run_dir"]).name for r in runs]
    if len(set(labels)) < len(labels):
        labels = [r["run_dir"] for r in runs]
    for run, label in zip(runs, labels, strict=True):
        run["label"] = label
    comparison: dict[str, Any] = {"runs": runs, "tasks": _task_rows(reports)}
    if out_dir is not None:
        comparison["files"] = [str(p) for p in _write(Path(out_dir), comparison)]
    return comparison


def _task_rows(reports: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The union of the reports' tasks, one row per task and item set, a cell per report (None where it has none)."""
    tasks: dict[tuple[str, str], dict[str, Any]] = {}
    for i, report in enumerate(reports):
        for c in report.get("task", []) + report.get("general", []):
            row = tasks.setdefault((_row_key(c, report), c["metric"]), {
                "task": c["task"], "metric": c["metric"], "is_general": c.get("is_general", False),
                "cells": [None] * len(reports), "names": [],
            })
            row["cells"][i] = {k: c.get(k) for k in _CELL_KEYS}
            row["names"].append(c["task"])
    for row in tasks.values():
        names = list(dict.fromkeys(row.pop("names")))
        if len(names) > 1:  # one validation set under each run's own name
            row["task"] = f"own task (validation, the same {_own_items(row)} items)"
    labels = Counter((row["task"], row["metric"]) for row in tasks.values())
    for row in tasks.values():  # one task scored on different items (another --limit or suite): rows apart, said
        if labels[row["task"], row["metric"]] > 1:
            row["task"] = f"{row['task']} ({_own_items(row)} items)"
    return sorted(tasks.values(), key=lambda t: t["is_general"])


def _row_key(cell: dict[str, Any], report: dict[str, Any]) -> str:
    """A task by the items it scored: a general task by name and items (arc_easy on 80 items and on 250 are two
    rows), a recipe's own task (named after its run) by its items alone, so runs of one recipe under different
    names share a row, and different validation sets never do."""
    digest = next((hashlib.sha256(" ".join(sorted(items["item_hashes"])).encode()).hexdigest()
                   for items in report.get("items", []) if items["task"] == cell["task"]
                   and items["metric"] == cell["metric"] and items.get("item_hashes")), None)
    if cell.get("is_general", False):
        return f"{cell['task']}|{digest}"
    return f"items:{digest}" if digest else cell["task"]


def _own_items(row: dict[str, Any]) -> str:
    return next((str(c["n"]) for c in row["cells"] if c and c.get("n")), "")


def _text_loss(run: dict[str, Any]) -> str:
    """Forgetting at a glance: the tuned model's loss on general text, and its change from the base."""
    loss = run.get("general_text_loss")
    return DASH if not loss else f"{loss['tuned']:.3f} ({loss['tuned'] - loss['base']:+.3f})"


def _kept_facts(report: dict[str, Any]) -> dict[str, Any]:
    """The kept step, and what in this table a pick among validations makes optimistic: the run's own task row (its
    validation rows) and, under ``task_within_forgetting``, its general-text loss (half of that sample)."""
    selection = report.get("selection") or {}
    looks = picked_among(selection)
    optimistic = [*(["own task row"] if report.get("task") else []),
                  *(["general-text loss"] if selection.get("rule") == "task_within_forgetting" else [])]
    return {"kept_step": selection.get("step"), "picked_among": looks if optimistic else 0,
            "optimistic": optimistic if looks else []}


def _kept(run: dict[str, Any]) -> Cell:
    """The step whose adapter was kept; marked where it was picked among validations on rows this table scores."""
    step, looks = run.get("kept_step"), run.get("picked_among")
    if step is None:
        return DASH
    return (f"step {step}, the pick of {looks} validations", "inconclusive") if looks else f"step {step}"


def _picked_line(run: dict[str, Any]) -> Cell:
    what = " and ".join(run["optimistic"])
    verb = "is" if len(run["optimistic"]) == 1 else "are"
    return (f"{run['label']}: the adapter kept is the pick of {run['picked_among']} validations (train.select) on rows "
            f"this table scores again, so its {what} {verb} optimistic by that choice; compare such runs on rows none "
            "of them chose on", "inconclusive")


def _cell(cell: dict[str, Any] | None) -> Cell:
    if cell is None:
        return DASH
    return f"{fmt_value(cell['tuned'], cell['aggregate'])} ({fmt_delta(cell)})", verdict_class(cell["verdict"])


def comparison_block(comparison: dict[str, Any]) -> Block:
    runs = comparison["runs"]
    facts: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
        ("adapter", lambda r: r.get("adapter") or DASH),
        ("r", lambda r: DASH if r.get("r") is None else str(r["r"])),
        ("quantization", lambda r: r.get("quantization") or DASH),
        ("trainable params", lambda r: fmt_int(r.get("trainable_params"))),
        ("steps · tokens trained", lambda r: f"{fmt_steps(r)} · {fmt_int(r.get('tokens_trained'))}"),
        ("adapter kept", _kept),
        ("general-text loss (Δ vs base)", _text_loss),
        ("tokens/s", lambda r: fmt_float(r.get("tokens_per_s"))),
        ("peak memory", lambda r: fmt_memory(r.get("peak_memory_mb"))),
    ]
    rows: list[list[Cell]] = [[name, *map(fn, runs)] for name, fn in facts]
    for t in comparison["tasks"]:
        label = f"{t['task']} ({t['metric']})" + (" · general" if t["is_general"] else "")
        rows.append([label, *map(_cell, t["cells"])])
    lines: list[Cell] = ["a cell: the tuned value (its change against that run's own base); in HTML and the terminal "
                         "coloured by the verdict on that change: green improved, blue non-inferior, orange "
                         "inconclusive, red regressed"]
    lines += [_picked_line(r) for r in runs if r.get("picked_among")]
    return Block("Runs side by side (tuned value, Δ vs its base)", ["", *(r["label"] for r in runs)], rows, lines)


def comparison_png(comparison: dict[str, Any]) -> str | None:
    """One panel per task, one line per run: its change against its own base with the interval and margin."""
    labels = [r["label"] for r in comparison["runs"]]
    groups = [(f"{t['task']} ({t['metric']})" + (" · general" if t["is_general"] else ""),
               [cell | {"task": t["task"], "metric": t["metric"], "label": label}
                for label, cell in zip(labels, t["cells"], strict=True) if cell and "higher_is_better" in cell])
              for t in comparison["tasks"]]
    return forest_png(groups)


def _write(out_dir: Path, comparison: dict[str, Any]) -> list[Path]:
    block = comparison_block(comparison)
    title = f"tuneguard: {len(comparison['runs'])} runs compared"
    chart = comparison_png(comparison)
    img = (f'<h2>Each run against its own base</h2><img src="data:image/png;base64,{chart}" '
           'alt="change against base per task and run, with intervals">\n') if chart else ""
    paths = [out_dir / "comparison.json", out_dir / "comparison.md", out_dir / "comparison.html"]
    atomic_write_json(paths[0], comparison)
    atomic_write_text(paths[1], f"# {title}\n\n" + md_block(block))
    atomic_write_text(paths[2], html_page(title, f"<h1>{html.escape(title)}</h1>\n" + html_block(block) + img))
    return paths


def print_run_comparison(comparison: dict[str, Any], console: Console | None = None) -> None:
    print_block(comparison_block(comparison), console)
