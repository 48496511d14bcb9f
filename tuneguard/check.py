"""``tuneguard check RUN --data FILE [--alpha A] [--limit N]``: a trained adapter scored again on new data, over time.

Labelled rows: the tuned model's accuracy on them against the run's stored validation outcomes (eval.json),
flagging a significant drop. Unlabelled rows (no label field): a drift check of the tuned model's predicted
labels and confidence against the validation set's. The statistics are :mod:`tuneguard.eval.monitor`'s; this
module loads the run, scores, writes ``RUN/checks/check-<UTC time>.json``, prints and records the check in the
history. Exit code 1 when a drop or drift is flagged, as the gate's "1 = regressed".
"""

from __future__ import annotations

import dataclasses
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tuneguard.backbones import dequantized
from tuneguard.data.examples import MAX_NAMED_PROBLEMS
from tuneguard.data.prepare import overlapping_rows, read_split
from tuneguard.data.readers import Row
from tuneguard.errors import TuneguardError
from tuneguard.eval.harness import evaluate_tasks
from tuneguard.eval.monitor import (
    accuracy_check,
    check_items,
    choice_probabilities,
    drift_check,
    read_check_rows,
)
from tuneguard.eval.records import TaskResult
from tuneguard.eval.stage import load_run, recipe_task
from tuneguard.progress import console, quiet_libraries, say
from tuneguard.recipe import DataConfig, load_recipe
from tuneguard.report.history import record_check
from tuneguard.report.monitor import print_check
from tuneguard.rundir import RunDir

SCHEMA = 1


def _stored_result(run: RunDir, task: str) -> TaskResult:
    """The tuned result of the run's own task, as eval.json keeps it."""
    for result in run.read_eval().get("tuned") or []:
        if result.get("task") == task:
            return TaskResult.from_dict(result)
    raise TuneguardError(f"{run.eval_json}: no tuned result of '{task}' to compare with; re-evaluate the run "
                         f"(tuneguard eval {run.path}) with eval.task true")


def _trained_on(rows: list[Row], cfg: DataConfig, seed: int, allowed: bool, data: Path) -> int:
    """How many of the check's rows the run trained on (same inputs after normalizing); refused unless allowed:
    a model is more often right, and surer, on rows it learned, so they hide a drop and fake drift."""
    train, _ = read_split(cfg, seed)
    seen = overlapping_rows(train, rows, cfg)
    if seen and not allowed:
        raise TuneguardError(
            f"{data}: {len(seen)} of {len(rows)} rows also occur in the run's training rows (same text after normalizing "
            f"case, spacing and punctuation), so the check would measure memory; first: "
            f"{'; '.join(seen[:MAX_NAMED_PROBLEMS])}. Remove them, or pass --allow-overlap")
    return len(seen)


def check(run_dir: Path, data: Path, alpha: float = 0.05, allow_overlap: bool = False, limit: int | None = None) -> int:
    """Score the run's tuned model on ``data``, compare, write, print and record; 1 when flagged, else 0.
    ``allow_overlap`` (or the run's ``data.allow_overlap``): rows the run trained on are scored too. ``limit``: the
    file's first N rows only (a quick look at a large file; the tests' power falls with N)."""
    if not 0 < alpha < 0.5:
        raise TuneguardError(f"--alpha must be between 0 and 0.5 (one-sided tests); got {alpha}")
    quiet_libraries()
    with RunDir(run_dir).hold_results(converged=True) as run:
        return _check(run, data, alpha, allow_overlap, limit)


def _check(run: RunDir, data: Path, alpha: float, allow_overlap: bool, limit: int | None) -> int:
    started = time.time()
    run_dir = run.path
    recipe = load_recipe(run.recipe)
    if recipe.data.kind != "classification" or not recipe.eval.task:
        raise TuneguardError(f"{run_dir}: tuneguard check scores the recipe's own classification task "
                             f"(data.kind classification, eval.task true); this run has data.kind {recipe.data.kind}"
                             f"{'' if recipe.eval.task else ' and eval.task false'}")
    rows, labelled = read_check_rows(data, recipe.data)
    rows = rows[:limit]
    trained_on = _trained_on(rows, recipe.data, recipe.train.seed, allow_overlap or recipe.data.allow_overlap, data)
    if labelled and not run.eval_json.exists():
        raise TuneguardError(f"{run_dir}: no stored result to compare with (no eval.json); evaluate the run first: "
                             f"tuneguard eval {run_dir}")
    recipe, trained = load_run(run_dir)
    backbone, model = trained.backbone, trained.model
    items = check_items(rows, labelled, recipe.data, backbone.tokenizer, is_encoder=backbone.is_encoder)
    validation = recipe_task(recipe, trained.data, backbone.is_encoder)
    if validation is None:
        raise TuneguardError(f"{run_dir}: the recipe has no validation rows to compare with")
    stored = _stored_result(run, validation.name) if labelled else None
    fresh = recipe_task(recipe, dataclasses.replace(trained.data, val_items=items), backbone.is_encoder)
    assert fresh is not None  # items is never empty: read_rows refuses an empty file
    fresh = dataclasses.replace(fresh, name=f"{validation.name}: {data.name}")
    model.eval()
    batch = recipe.eval.batch_size
    with dequantized(model):
        if stored is not None:
            scored = evaluate_tasks(model, backbone.tokenizer, [fresh], batch_size=batch,
                                    fingerprint=backbone.fingerprint, adapter_id=str(run.adapter), label="tuned")[0]
            result: dict[str, Any] = {"accuracy": accuracy_check(stored, scored, alpha), "drift": None}
        else:
            reference = choice_probabilities(model, backbone.tokenizer, validation,
                                             validation.docs(recipe.eval.limit), batch, "tuned")
            new = choice_probabilities(model, backbone.tokenizer, fresh, fresh.docs(), batch, "tuned")
            result = {"accuracy": None, "drift": drift_check(reference, new, validation.labels or [], alpha)}
    record = {
        "schema": SCHEMA, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "run": recipe.output.name, "run_dir": str(run.path.resolve()), "data": str(data), "rows": len(items),
        "labelled": labelled, "limit": limit, "trained_on_rows": trained_on, "alpha": alpha, "task": validation.name, **result,
        "flagged": (result["accuracy"] or result["drift"])["flagged"], "seconds": round(time.time() - started, 1),
    }
    path = run.write_check(record)
    print_check(record)
    if trained_on:
        console.print(f"[yellow]{trained_on} of the {len(items)} rows were training rows of this run (overlap allowed): "
                      "the model can read better, and surer, on them than on new rows[/yellow]", soft_wrap=True)
    record_check(record, path)
    say(f"check written to {path}")
    return 1 if record["flagged"] else 0
