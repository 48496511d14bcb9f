"""``tuneguard compare RUN1 RUN2 ...``: N adapters against one base, the backbone loaded and the base scored once.

The base is scored once on the bare backbone. The adapters are then loaded side by side into one
PEFT model and switched with ``set_adapter`` (one group per PEFT type, since PEFT cannot mix LoRA and
IA3 in one model; a group is unloaded, never merged, before the next), so every adapter is scored
on the very weights the base was scored on.
Each adapter is compared with the base and with every other adapter, item by item; each kind of
comparison (general suite against the base, own task against the base, adapter against adapter) is
one family, corrected for the number of pairs in it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from tuneguard.adapters.registry import load_adapter, method_spec
from tuneguard.backbones import load_backbone
from tuneguard.data.prepare import prepare_data
from tuneguard.errors import TuneguardError
from tuneguard.eval.guards import require_trained_backbone
from tuneguard.eval.harness import evaluate_tasks
from tuneguard.eval.records import Task, TaskResult
from tuneguard.eval.stage import recipe_task
from tuneguard.eval.suites import get_tasks
from tuneguard.eval.verdicts import Comparison, compare_pairs
from tuneguard.progress import say
from tuneguard.recipe import Recipe, load_recipe
from tuneguard.rundir import RunDir


def _load_runs(run_dirs: list[Path]) -> list[tuple[str, Path, Recipe]]:
    """Label, directory and recipe of each run; all must share one backbone and its quantization."""
    if len(run_dirs) < 2:
        raise TuneguardError("give at least two run directories to compare")
    twice = next((d for i, d in enumerate(run_dirs) if d.resolve() in {e.resolve() for e in run_dirs[:i]}), None)
    if twice is not None:
        raise TuneguardError(f"{twice}: named twice; each adapter is compared once (a copy would enlarge every family)")
    runs = []
    for d in run_dirs:
        run = RunDir(d)
        run.ensure_converged()
        runs.append((d, load_recipe(run.recipe)))
    labels = [d.name for d, _ in runs]
    if len(set(labels)) < len(labels):
        labels = [str(d) for d, _ in runs]
    first = runs[0][1]
    for d, recipe in runs[1:]:
        if (recipe.model, recipe.quantization) != (first.model, first.quantization):
            raise TuneguardError(f"{d}: trained on another backbone or quantization than {runs[0][0]}; "
                                 "compare runs of one backbone only")
    return [(label, d, recipe) for label, (d, recipe) in zip(labels, runs, strict=True)]


def _by_peft_type(runs: list[tuple[str, Path, Recipe]]) -> list[list[tuple[str, Path, Recipe]]]:
    """Runs grouped by the PEFT type their method saves (LoRA, DoRA and rsLoRA share one), in first-seen order."""
    groups: dict[str, list[tuple[str, Path, Recipe]]] = {}
    for run in runs:
        groups.setdefault(method_spec(run[2].adapter).peft_type, []).append(run)
    return list(groups.values())


def _own_tasks(runs: list[tuple[str, Path, Recipe]], tokenizer: Any, limit: int | None) -> dict[str, Task | None]:
    """Each run's own validation task; runs whose validation items are the same share one task."""
    by_items: dict[tuple[str, ...], Task] = {}
    items_of: dict[str, tuple[str, ...]] = {}
    out: dict[str, Task | None] = {}
    for label, _, recipe in runs:
        task = None
        if recipe.eval.task:
            data = prepare_data(recipe.data, tokenizer, is_encoder=False, seed=recipe.train.seed,
                                packable=method_spec(recipe.adapter).packable)
            task = recipe_task(recipe, data, is_encoder=False)
        if task is not None:
            items = tuple(d.hash() for d in task.docs(limit))
            task = by_items.setdefault(items, task)
            if items_of.setdefault(task.name, items) != items:  # results are keyed by task name
                raise TuneguardError(f"{label}: its task '{task.name}' has other items than another run's task of "
                                     "that name; give the runs distinct output.name to compare them")
        out[label] = task
    return out


def score_runs(run_dirs: list[Path], *, tasks: list[str] | None = None, limit: int | None = None) -> dict[str, Any]:
    """Score the base once and every run's adapter on the same items; compare them all."""
    runs = _load_runs(run_dirs)
    first = runs[0][2]
    backbone = load_backbone(first.model, first.quantization)
    if backbone.is_encoder:
        raise TuneguardError("tuneguard compare scores decoder backbones (encoders carry a head per run)")
    for _, d, _ in runs:
        require_trained_backbone(d, RunDir(d).adapter_fingerprint(), (backbone.fingerprint, backbone.first_fingerprint))
    general = get_tasks(tasks if tasks is not None else first.eval.suites, first.eval.lm_eval)
    own = _own_tasks(runs, backbone.tokenizer, limit or first.eval.limit)
    shared = list({id(t): t for t in own.values() if t is not None}.values())
    if not general and not shared:
        raise TuneguardError("nothing to compare: give --tasks, or runs whose recipes set eval.task or eval.suites")

    def score(model: Any, task_list: list[Task], adapter: str | None) -> dict[str, TaskResult]:
        say(f"scoring {adapter or 'the base'} on {len(task_list)} tasks")
        results = evaluate_tasks(model.eval(), backbone.tokenizer, task_list, limit=limit or first.eval.limit,
                                 batch_size=first.eval.batch_size, fingerprint=backbone.fingerprint, adapter_id=adapter)
        return {r.task: r for r in results}

    base = score(backbone.model, general + shared, None)
    tuned: dict[str, dict[str, TaskResult]] = {}
    model: Any = backbone.model
    groups = _by_peft_type(runs)
    peft_name = {label: f"run{i}" for i, (label, _, _) in enumerate(runs)}  # a folder name may hold a "."
    for i, group in enumerate(groups):
        # PEFT holds adapters of one type per model: load a group, score it, unload (nothing is merged).
        for label, d, _ in group:
            model = load_adapter(model, RunDir(d).adapter, name=peft_name[label])
        for label, _, _ in group:
            model.set_adapter(peft_name[label])
            tuned[label] = score(model, general + ([own[label]] if own[label] else []), label)
        if i < len(groups) - 1:
            model = _without_adapters(model, first)
    return compare_scored(runs, base, tuned, {t.name for t in general})


def _without_adapters(model: Any, recipe: Recipe) -> Any:
    """The bare backbone again: PEFT's ``unload`` where it can (it refuses IA3 on 4-bit weights, and prompt
    tuning has none), else a fresh load of the same weights (the base scores stay those of the first)."""
    try:
        return model.unload()
    except (ValueError, AttributeError):
        return load_backbone(recipe.model, recipe.quantization).model


def compare_scored(runs: list[tuple[str, Path, Recipe]], base: dict[str, TaskResult],
                   tuned: dict[str, dict[str, TaskResult]], general: set[str]) -> dict[str, Any]:
    """Every adapter against the base and against each other, each kind of pair one corrected family."""
    first = runs[0][2]
    labels = [label for label, _, _ in runs]
    pairs, families, who = [], [], []
    for label in labels:
        for task, result in tuned[label].items():
            pairs.append((base[task], result))
            families.append("general vs base" if task in general else "task vs base")
            who.append(("base", label))
    for i, a in enumerate(labels):
        for b in labels[i + 1:]:
            for task in [t for t in tuned[a] if t in tuned[b]]:
                pairs.append((tuned[a][task], tuned[b][task]))
                families.append("adapter vs adapter")
                who.append((a, b))
    rows = compare_pairs(pairs, families, general_tasks=general, n_boot=first.eval.bootstrap, seed=first.train.seed,
                         margin=first.eval.margin, correction=first.eval.correction)
    vs_base = [{"adapter": b, **c.to_dict()} for (a, b), c in zip(who, rows, strict=True) if a == "base"]
    between = [{"a": a, "b": b, **c.to_dict()} for (a, b), c in zip(who, rows, strict=True) if a != "base"]
    return {
        "runs": [{"label": label, **RunDir(d).summary()} for label, d, _ in runs],
        "correction": first.eval.correction,
        "families": {f: families.count(f) for f in dict.fromkeys(families)},
        "vs_base": vs_base, "between": between, "points": trade_offs(labels, rows, who),
    }


def _ends(interval: tuple[float, float]) -> list[float | None]:
    """An interval as JSON has it: an end a test could not bound (too few items) is None, not Infinity."""
    return [v if math.isfinite(v) else None for v in interval]


def trade_offs(labels: list[str], rows: list[Comparison], who: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """Per adapter: the task gain and the worst general regression (with intervals), and whether it is
    on the Pareto front (no other adapter gains at least as much and forgets at most as much)."""
    points = []
    for label in labels:
        mine = [c for (a, b), c in zip(who, rows, strict=True) if a == "base" and b == label]
        task = next((c for c in mine if not c.is_general), None)
        general = [c for c in mine if c.is_general]
        worst = max(general, key=lambda c: c.regression_points, default=None)
        point: dict[str, Any] = {"adapter": label, "task": task.task if task else None}
        if task:
            point.update(gain=-task.regression_points, gain_interval=_ends(task.gain_interval))
        if worst:
            lo, hi = worst.gain_interval
            point.update(worst_task=worst.task, forgetting=worst.regression_points, forgetting_interval=_ends((-hi, -lo)),
                         mean_forgetting=sum(c.regression_points for c in general) / len(general))
        points.append(point)
    for p in points:
        p["pareto"] = "gain" in p and "forgetting" in p and not any(
            q is not p and "gain" in q and "forgetting" in q and q["gain"] >= p["gain"]
            and q["forgetting"] <= p["forgetting"] and (q["gain"], q["forgetting"]) != (p["gain"], p["forgetting"])
            for q in points)
    return points
