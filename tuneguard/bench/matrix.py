"""One recipe, every adapter method, on the same 4-bit backbone: one table and one HTML page.

Each method is a full ``tuneguard train`` (training, then the before/after evaluation the recipe
asks for) in its own process, so peak memory and tokens/s are that method's alone. The row takes
the task metric and the general-suite regression from the run's report.json, and memory, speed
and sizes from its run.json.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from tuneguard.bench.measure import dir_size_mb, environment
from tuneguard.bench.reference import ADAPTERS
from tuneguard.errors import TuneguardError
from tuneguard.io import atomic_write_json, atomic_write_text
from tuneguard.rundir import RunDir, read_json


def adapter_overrides(adapter: str) -> list[str]:
    """``adapter.*`` overrides that turn a recipe's adapter into ``adapter`` (keeping its r, alpha, targets)."""
    if adapter not in ADAPTERS:
        raise TuneguardError(f"bench matrix --adapter: unknown '{adapter}'; choose from {sorted(ADAPTERS)}")
    section = {"use_dora": False, "use_rslora": False, **ADAPTERS[adapter]}
    return [f"adapter.{k}={json.dumps(v)}" for k, v in section.items()]


def regression_points(c: dict[str, Any]) -> float:
    """How much worse tuned is than base: accuracy points, or percent for perplexity-like metrics."""
    worse = -c["delta"] if c["higher_is_better"] else c["delta"]
    return 100.0 * worse if c.get("aggregate", "mean") == "mean" else 100.0 * worse / max(abs(c["base"]), 1e-12)


def matrix_row(adapter: str, run_dir: Path) -> dict[str, Any]:
    """The matrix row of one finished run directory."""
    directory = RunDir(run_dir)
    run = directory.record()
    row: dict[str, Any] = {
        "adapter": adapter, "run_dir": str(run_dir), "peak_memory_mb": run.get("peak_memory_mb"),
        "tokens_per_s": run.get("tokens_per_s"), "trainable_params": run.get("trainable_params"),
        "adapter_mb": dir_size_mb(directory.adapter), "final_val_loss": run.get("final_val_loss"),
        "final_train_loss": run.get("final_train_loss"),
    }
    if not directory.report_json.exists():
        row["note"] = f"no {directory.report_json.name} (the recipe asks for no evaluation): training metrics only"
        return row
    report = read_json(directory.report_json)
    if report.get("task"):
        task = report["task"][0]
        row.update(task=task["task"], task_metric=task["metric"], task_before=task["base"], task_after=task["tuned"],
                   task_delta=task["delta"])
    general = [c for c in report.get("general") or [] if c.get("delta") is not None]
    if general:
        worst = max(general, key=regression_points)
        row.update(general_worst_task=worst["task"], general_worst_delta=worst["delta"],
                   general_worst_points=round(regression_points(worst), 2))
    return row


def run_matrix(recipe: Path, adapters: list[str], overrides: list[str], out: Path, *, timeout: float = 3600) -> dict[str, Any]:
    """Train and evaluate ``recipe`` once per adapter method; write matrix.json and matrix.html into ``out``."""
    from tuneguard.recipe import load_recipe

    base = load_recipe(recipe, overrides)  # fail on a bad recipe before any run starts
    rows = []
    for adapter in adapters:
        run_dir = out / adapter
        cmd = [sys.executable, "-m", "tuneguard.cli", "train", str(recipe), *overrides, *adapter_overrides(adapter),
               f"output.dir={out}/{{name}}", f"output.name={adapter}", "--overwrite"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            rows.append({"adapter": adapter, "error": f"timed out after {timeout:.0f} s"})
            continue
        lines = (proc.stderr or proc.stdout).strip().splitlines() or [""]
        error = f"exit {proc.returncode}: {lines[-1].strip()[:300]}"
        if not RunDir(run_dir).run_json.exists():
            rows.append({"adapter": adapter, "error": error})
            continue
        row = matrix_row(adapter, run_dir)
        if proc.returncode not in (0, 1):  # 1: the recipe's regression budget was exceeded, still a result
            row["error"] = error  # trained, then failed (e.g. a guard rail): training numbers only
        rows.append(row)
    notes = [f"backbone: {base.model.source}, quantization {base.quantization.method}; one fresh process per method",
             "Δ task: tuned - base on the recipe's validation data; worst general task: the general-suite task that "
             "lost the most (accuracy points, or % of perplexity; negative = improved)"]
    matrix = {"recipe": str(recipe), "overrides": overrides, "rows": rows, "notes": notes, "environment": environment()}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "matrix.json", matrix)
    atomic_write_text(out / "matrix.html", matrix_html(matrix))
    return matrix


def matrix_html(matrix: dict[str, Any]) -> str:
    from tuneguard.bench.tables import matrix_block
    from tuneguard.report.blocks import html_block, html_page

    env = matrix["environment"]
    head = (f"<h1>Adapter methods: {matrix['recipe']}</h1><p>torch {env['versions'].get('torch')}, "
            f"peft {env['versions'].get('peft')}, {env['threads']} threads, commit {env.get('git_commit') or '?'}</p>")
    return html_page(f"tuneguard matrix: {matrix['recipe']}", head + html_block(matrix_block(matrix)))
