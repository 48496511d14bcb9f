"""``tuneguard cv RECIPE --folds K [--stratify] [--general]``: k-fold cross-validation, one ordinary run per fold.

Fold i is the recipe with ``data.folds=K data.fold=i`` and ``output.name=NAME-fold<i>``, trained and evaluated
by :func:`tuneguard.run.run` into an ordinary run directory: its recipe.yaml says which fold it is, so
``tuneguard eval``, ``report``, ``history`` and ``gate`` work on it. Folds run one after another in this
process. Every fold's recipe and rows are checked before the first model loads; a re-run skips finished
folds, evaluates a trained one and resumes a killed one. The summary goes to ``<output root>/NAME-cv/``.
"""

from __future__ import annotations

import argparse
import gc
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from rich.text import Text

from tuneguard.data.prepare import checked_overlap, read_split
from tuneguard.errors import RegressionBudgetExceeded, TuneguardError
from tuneguard.progress import console, say
from tuneguard.recipe import Recipe, load_recipe, recipe_defaults
from tuneguard.report.cv import print_cv, summarize_folds, write_cv
from tuneguard.run import reevaluate, run
from tuneguard.rundir import RunDir, recipe_changes

State = Literal["new", "resume", "evaluate", "done"]
_SAY = {"new": "training", "resume": "resuming", "evaluate": "trained; evaluating",
        "done": "finished; skipped"}


@dataclass
class Fold:
    index: int
    overrides: list[str]
    """The user's overrides, then the ones that make this fold (what ``tuneguard.run`` is given)."""
    recipe: Recipe
    rows: tuple[int, int] = (0, 0)
    """Training and validation rows, as the run will read them."""

    @property
    def run_dir(self) -> Path:
        return self.recipe.run_dir()


def _evaluates(recipe: Recipe) -> bool:
    """Whether a fold has anything to score: its own task (classification data, as ``eval.stage`` builds it) or
    general suites; otherwise it trains only, and its validation loss is what the folds are compared on."""
    return (recipe.eval.task and recipe.data.kind in ("classification", "image_classification")) or bool(recipe.eval.suites)


def plan_folds(args: argparse.Namespace) -> tuple[Recipe, list[Fold]]:
    """The recipe as given and one validated recipe per fold; refuses what cross-validation cannot run."""
    if args.folds < 2:
        raise TuneguardError(f"--folds {args.folds}: at least 2 (one fold would validate on the rows it trained on)")
    base = load_recipe(args.recipe, args.overrides)
    if base.data.folds is not None:
        raise TuneguardError(f"{args.recipe}: already selects fold {base.data.fold} of {base.data.folds} "
                             "(data.folds, data.fold); tuneguard cv sets these: give it the recipe without them")
    if "{name}" not in base.output.dir:
        raise TuneguardError(f"output.dir '{base.output.dir}' has no {{name}}: every fold would write into the "
                             "same run directory")
    name = base.output.name
    common = [f"data.folds={args.folds}", f"data.stratify={str(args.stratify).lower()}",
              *([] if args.general else ["eval.suites=[]"])]
    folds = []
    for i in range(args.folds):
        overrides = [*args.overrides, *common, f"data.fold={i}", f"output.name={name}-fold{i}"]
        folds.append(Fold(i, overrides, load_recipe(args.recipe, overrides)))
    return base, folds


def check_rows(fold: Fold) -> None:
    """Read and split the fold's rows as its run will (folds that fit the data and, stratified, every class;
    no validation row repeated in training), so a bad fold fails now rather than after the others trained."""
    try:
        train, val = read_split(fold.recipe.data, fold.recipe.train.seed)
        checked_overlap(train, val, fold.recipe.data)
    except TuneguardError as exc:
        raise TuneguardError(f"fold {fold.index}: {exc}") from None
    fold.rows = (len(train), len(val))


def fold_state(fold: Fold, overwrite: bool) -> State:
    """What the fold's run directory holds: nothing, a killed run, a trained run, or a finished one. A fold
    trained from another recipe, or one that diverged, is refused with what to do."""
    run_dir = RunDir(fold.run_dir)
    if overwrite or not run_dir.contents():
        return "new"
    if run_dir.recipe.exists():
        changed = recipe_changes(run_dir.read_recipe(), fold.recipe.model_dump(mode="json"), recipe_defaults())
        if changed:
            raise TuneguardError(f"{run_dir.path}: holds fold {fold.index} of another recipe (changed: "
                                 f"{', '.join(changed[:6])}); pass --overwrite to run every fold again (earlier "
                                 "runs are moved aside), or set output.name")
    record = run_dir.record()
    if record.get("diverged"):
        raise TuneguardError(f"{run_dir.path}: fold {fold.index} diverged ({record['diverged']}); change the recipe "
                             "(e.g. a lower train.lr) and pass --overwrite to run every fold again")
    if not record:
        return "resume"
    return "done" if run_dir.report_json.exists() or not _evaluates(fold.recipe) else "evaluate"


def run_fold(fold: Fold, state: State, args: argparse.Namespace) -> None:
    """Train and evaluate the fold as an ordinary run (or only evaluate it, or nothing when it is finished)."""
    if state == "done":
        return
    try:
        if state == "evaluate":
            reevaluate(fold.run_dir, suites=None, limit=None, with_original=False)
        else:
            run(argparse.Namespace(recipe=args.recipe, overrides=fold.overrides, resume=state == "resume",
                                   resume_changed=[], overwrite=args.overwrite, no_eval=not _evaluates(fold.recipe)))
    except RegressionBudgetExceeded as exc:  # its report records it, and the exit code says so at the end
        console.print(Text(f"fold {fold.index}: {exc}", style="red"), soft_wrap=True)
    gc.collect()  # the fold's model, before the next one loads


def cv_dir(recipe: Recipe) -> Path:
    """``<output root>/NAME-cv/``: beside the fold runs, named after the recipe."""
    return Path(recipe.output.dir.format(name=f"{recipe.output.name}-cv"))


def cross_validate(args: argparse.Namespace) -> int:
    """Every fold checked, then run (or skipped) in turn, then the summary; the exit code (1 = a fold's general
    task regressed beyond ``eval.max_regression``)."""
    base, folds = plan_folds(args)
    for fold in folds:
        check_rows(fold)
    states = [fold_state(fold, args.overwrite) for fold in folds]
    for fold, state in zip(folds, states, strict=True):
        console.print(Text(f"fold {fold.index} of {len(folds)}: {fold.rows[0]:,} training rows, {fold.rows[1]:,} "
                           f"validation rows, {fold.run_dir}: {_SAY[state]}"), soft_wrap=True)
    for fold, state in zip(folds, states, strict=True):
        if state != "done":
            console.rule(f"fold {fold.index} of {len(folds)}")
        run_fold(fold, state, args)
    settings = {"recipe": str(args.recipe), "overrides": args.overrides, "k": args.folds, "stratify": args.stratify,
                "seed": base.train.seed, "general": args.general}
    summary = summarize_folds(str(base.output.name), [fold.run_dir for fold in folds], settings)
    print_cv(summary)
    paths = write_cv(cv_dir(base), summary)
    say(f"cross-validation summary in {', '.join(map(str, paths))}")
    return 1 if summary["budget_exceeded"] else 0
