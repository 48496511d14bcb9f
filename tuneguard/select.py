"""``tuneguard select RECIPE --candidates A B [--steps N] [--limit N]``: which backbone to fine-tune, measured.

Each candidate is the recipe with ``model.source`` replaced, loaded at the recipe's quantization and scored
untuned on the recipe's validation data (:func:`tuneguard.eval.stage.score_backbone`: a decoder zero-shot, an
encoder by a linear probe), a decoder also on ``eval.suites``. With ``--steps N`` it is then fine-tuned for N
steps with the recipe's adapter as an ordinary run into ``OUT/<recipe>-<candidate>/`` (trained and evaluated by
:func:`tuneguard.run.run`, so ``tuneguard eval``, ``report`` and ``gate`` work on it; a finished run of the same
recipe is reused). Every candidate is measured in a fresh process, so its peak RSS is its own and one that runs
out of memory leaves the others standing. Every candidate's recipe and source are checked before the first
model loads; a candidate that fails later gets its reason in the table. The ranking goes to ``OUT/select.json|md``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import re
import resource
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tuneguard.backbones import ENCODER_TYPES, is_image_config, load_config, resolve_source
from tuneguard.errors import TuneguardError
from tuneguard.eval.records import TaskResult
from tuneguard.eval.verdicts import compare_task
from tuneguard.progress import console, say
from tuneguard.recipe import Recipe, load_recipe, recipe_defaults
from tuneguard.report.select import print_select, write_select
from tuneguard.rundir import RunDir, recipe_changes


@dataclass
class Candidate:
    source: str
    recipe: Recipe
    """The recipe with this source: what it is scored with untuned (its ``eval.suites`` included)."""
    overrides: list[str]
    """The overrides of its fine-tune's run: the user's, the source, the run directory, the task only."""
    run_recipe: Recipe
    is_encoder: bool


def select_dir(recipe: Recipe) -> Path:
    """``<output root>/NAME-select/``, beside the recipe's own runs."""
    return Path(recipe.output.dir.format(name=f"{recipe.output.name}-select"))


def _slug(source: str) -> str:
    """A folder name for a candidate: the last part of its source, letters, digits, '.', '-' and '_' only."""
    tail = source.removeprefix("bundled:").rstrip("/").split("/")[-1]
    return re.sub(r"[^A-Za-z0-9._-]+", "-", tail).strip("-.") or "model"


def plan_candidates(args: argparse.Namespace) -> tuple[Recipe, Path, list[Candidate]]:
    """The recipe as given, the output folder and one validated recipe per candidate; refuses before loading."""
    base = load_recipe(args.recipe, args.overrides)
    if base.data.kind != "classification":
        raise TuneguardError(f"{args.recipe}: tuneguard select scores the recipe's validation data as a "
                             f"classification task; data.kind is '{base.data.kind}'")
    out = Path(args.out) if args.out else select_dir(base)
    if out.exists() and not out.is_dir():
        raise TuneguardError(f"--out: '{out}' is a file, not a folder")
    candidates: list[Candidate] = []
    resolved: dict[str, str] = {}
    taken: set[str] = set()
    for source in args.candidates:
        slug, n = _slug(source), 1
        while slug in taken:  # one folder per candidate, whatever the others are called
            n += 1
            slug = f"{_slug(source)}-{n}"
        taken.add(slug)
        own = [*args.overrides, f"model.source={json.dumps(source)}",
               f"output.dir={json.dumps(str(out / '{name}'))}", f"output.name={base.output.name}-{slug}"]
        overrides = [*own, "eval.task=true", "eval.suites=[]", *([f"train.max_steps={args.steps}"] if args.steps else []),
                     *([f"eval.limit={args.limit}"] if args.limit else [])]
        recipe = load_recipe(args.recipe, own)
        try:
            path, is_hub = resolve_source(recipe.model)
            config = load_config(path, recipe.model, is_hub)
        except TuneguardError as exc:
            raise TuneguardError(f"--candidates {source}: {exc}") from None
        where = path if is_hub else str(Path(path).resolve())
        if where in resolved:
            raise TuneguardError(f"--candidates {source}: the same model as {resolved[where]}; name each once")
        resolved[where] = source
        if is_image_config(config):
            raise TuneguardError(f"--candidates {source}: an image classifier; this recipe's data are text "
                                 "(data.kind classification)")
        candidates.append(Candidate(source, recipe, overrides, load_recipe(args.recipe, overrides),
                                    config.model_type in ENCODER_TYPES))
    return base, out, candidates


def _fine_tune(candidate: Candidate, args: argparse.Namespace) -> dict[str, Any]:
    """N steps of the recipe's adapter as an ordinary run (a finished run of the same recipe is reused); its
    tuned score and training speed."""
    from tuneguard.run import run

    run_dir = RunDir(candidate.run_recipe.run_dir())
    same = run_dir.recipe.exists() and not recipe_changes(
        run_dir.read_recipe(), candidate.run_recipe.model_dump(mode="json"), recipe_defaults())
    reused = same and run_dir.report_json.exists()
    if not reused:
        # eval.suites is empty in this run, so the regression budget (general tasks only) cannot fail it.
        run(argparse.Namespace(recipe=args.recipe, overrides=candidate.overrides, resume=False, resume_changed=[],
                               overwrite=bool(run_dir.contents()), no_eval=False))
    tuned = run_dir.read_eval()["tuned"][0]
    record = run_dir.record()
    return {"tuned": tuned["value"], "tuned_n": tuned["n"], "tuned_per_item": tuned["per_item"], "run": str(run_dir.path),
            "train_tokens_per_s": record.get("tokens_per_s"), "steps": record.get("steps"), "reused": reused,
            "selection": record.get("selection")}


def measure(candidate: Candidate, args: argparse.Namespace) -> dict[str, Any]:
    """One candidate, untuned and (with ``--steps``) fine-tuned; runs in the candidate's own process."""
    from tuneguard.eval.stage import score_backbone
    from tuneguard.progress import quiet_libraries

    quiet_libraries()
    scored = score_backbone(candidate.recipe, args.limit)
    task = scored.task
    row: dict[str, Any] = {
        "how": scored.how, "metric": task.metric, "score": task.value, "n": task.n, "score_per_item": task.per_item,
        "rows": scored.rows, "probe": scored.probe,
        "general": {r.task: {"metric": r.metric, "value": r.value, "aggregate": r.aggregate} for r in scored.general},
        "footprint_mb": round(scored.footprint_bytes / 2**20, 1),
        "items_per_s": round(task.n / max(task.seconds, 1e-9), 2),
    }
    del scored
    row["peak_rss_scoring_mb"] = _peak_rss_mb()
    if args.steps:
        try:
            row.update(_fine_tune(candidate, args))
        except TuneguardError as exc:
            row["tune_error"] = str(exc)
    return row


def _peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _child(candidate: Candidate, args: argparse.Namespace, queue: Any) -> None:
    """A candidate's process: its measurements, or the one line that says why there are none."""
    try:
        queue.put(measure(candidate, args) | {"peak_rss_mb": _peak_rss_mb()})
    except TuneguardError as exc:
        queue.put({"error": str(exc), "peak_rss_mb": _peak_rss_mb()})
    except Exception as exc:  # reported in the table; the other candidates go on
        queue.put({"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()})


def measure_apart(candidate: Candidate, args: argparse.Namespace) -> dict[str, Any]:
    """:func:`measure` in a fresh (spawned) process: its peak RSS is the candidate's own, and a crash is a row."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(candidate, args, queue))
    process.start()
    row = None
    while row is None and (process.is_alive() or not queue.empty()):
        try:
            row = queue.get(timeout=1.0)
        except Exception:  # queue.Empty: still measuring
            continue
    process.join()
    if row is None:
        row = {"error": f"its process ended with exit code {process.exitcode} (out of memory?)"}
    return {"source": candidate.source, "kind": "encoder" if candidate.is_encoder else "decoder"} | row


def rank(name: str, rows: list[dict[str, Any]], settings: dict[str, Any]) -> dict[str, Any]:
    """Rows best first by the ranking score (after the fine-tune with ``--steps``, else untuned; failed rows last),
    each after the first with its paired difference from the leader on the same items (Tango interval, McNemar p)."""
    key = "tuned" if settings.get("steps") else "score"
    ranked = sorted(rows, key=lambda r: (r.get(key) is None, -(r.get(key) or 0.0)))
    leader = ranked[0] if ranked and ranked[0].get(key) is not None else None
    for i, row in enumerate(ranked, 1):
        row["rank"] = i if row.get(key) is not None else None
        row["versus_leader"] = _versus(leader, row, key) if leader is not None and row is not leader else None
    return {"schema": 1, "name": name, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "ranked_by": key, "settings": settings, "candidates": ranked}


def _versus(leader: dict[str, Any], row: dict[str, Any], key: str) -> dict[str, Any] | None:
    """The row minus the leader, paired item by item; None where they did not score the same validation rows
    (each tokenizer makes its own items of a row, so rows, not item hashes, are what pairs them)."""
    outcomes = f"{key}_per_item"
    mine, theirs = row.get(outcomes), leader.get(outcomes)
    if not mine or not theirs or row.get("rows") != leader.get("rows") or len(mine) != len(theirs):
        return None
    leader_result, row_result = (TaskResult(key, "acc", sum(v) / len(v), True, len(v), v) for v in (theirs, mine))
    c = compare_task(leader_result, row_result)
    return {"delta": c.delta, "ci_low": c.ci_low, "ci_high": c.ci_high, "p_value": c.p_value, "n": c.n}


def select_backbones(args: argparse.Namespace) -> int:
    """Every candidate checked, then measured in turn, then ranked into one table and ``select.json|md``."""
    base, out, candidates = plan_candidates(args)
    rows = []
    plain = argparse.Namespace(recipe=args.recipe, steps=args.steps, limit=args.limit)  # what a child needs
    for i, candidate in enumerate(candidates, 1):
        console.rule(f"candidate {i} of {len(candidates)}: {candidate.source} "
                     f"({'encoder' if candidate.is_encoder else 'decoder'})")
        rows.append(measure_apart(candidate, plain))
    settings = {"recipe": str(args.recipe), "overrides": args.overrides, "candidates": args.candidates,
                "steps": args.steps, "limit": args.limit, "quantization": base.quantization.method,
                "adapter": base.adapter.method, "suites": base.eval.suites, "seed": base.train.seed}
    summary = rank(str(base.output.name), rows, settings)
    print_select(summary)
    paths = write_select(out, summary)
    say(f"backbone ranking in {', '.join(map(str, paths))}")
    if all("error" in r for r in rows):
        raise TuneguardError("no candidate could be measured; the reasons are in the table")
    return 0
