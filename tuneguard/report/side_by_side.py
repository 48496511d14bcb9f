"""``tuneguard report A B C``: several runs side by side, one column per run, one row per task.

Each cell is the tuned value with its delta against that run's own base, coloured by its verdict;
the first rows say what each run was (adapter, rank, quantization) and what it cost.
"""

from __future__ import annotations

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
    fmt_value,
    html_block,
    html_page,
    md_block,
    verdict_class,
)
from tuneguard.report.terminal import print_block
from tuneguard.rundir import RunDir

_CELL_KEYS = ("base", "tuned", "delta", "ci_low", "ci_high", "p_value", "verdict", "aggregate")


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
        runs.append(directory.summary())
        reports.append(directory.read_report())
    labels = [Path(r["run_dir"]).name for r in runs]
    if len(set(labels)) < len(labels):
        labels = [r["run_dir"] for r in runs]
    for run, label in zip(runs, labels, strict=True):
        run["label"] = label
    tasks: dict[tuple[str, str], dict[str, Any]] = {}
    for i, report in enumerate(reports):
        for c in report.get("task", []) + report.get("general", []):
            row = tasks.setdefault((c["task"], c["metric"]), {
                "task": c["task"], "metric": c["metric"], "is_general": c.get("is_general", False),
                "cells": [None] * len(reports),
            })
            row["cells"][i] = {k: c.get(k) for k in _CELL_KEYS}
    comparison: dict[str, Any] = {
        "runs": runs, "tasks": sorted(tasks.values(), key=lambda t: t["is_general"]),
    }
    if out_dir is not None:
        comparison["files"] = [str(p) for p in _write(Path(out_dir), comparison)]
    return comparison


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
        ("tokens/s", lambda r: fmt_float(r.get("tokens_per_s"))),
        ("peak memory", lambda r: fmt_memory(r.get("peak_memory_mb"))),
    ]
    rows: list[list[Cell]] = [[name, *map(fn, runs)] for name, fn in facts]
    for t in comparison["tasks"]:
        label = f"{t['task']} ({t['metric']})" + (" · general" if t["is_general"] else "")
        rows.append([label, *map(_cell, t["cells"])])
    return Block("Runs side by side (tuned value, Δ vs its base)", ["", *(r["label"] for r in runs)], rows)


def _write(out_dir: Path, comparison: dict[str, Any]) -> list[Path]:
    block = comparison_block(comparison)
    paths = [out_dir / "comparison.json", out_dir / "comparison.md", out_dir / "comparison.html"]
    atomic_write_json(paths[0], comparison)
    atomic_write_text(paths[1], f"# tuneguard: {len(comparison['runs'])} runs compared\n\n" + md_block(block))
    atomic_write_text(paths[2], html_page("tuneguard: runs compared", "<h1>tuneguard: runs compared</h1>\n" + html_block(block)))
    return paths


def print_run_comparison(comparison: dict[str, Any], console: Console | None = None) -> None:
    print_block(comparison_block(comparison), console or Console())
