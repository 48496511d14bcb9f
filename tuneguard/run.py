"""One recipe, start to finish: train, then evaluate base vs tuned, then report.

``accelerate launch -m tuneguard.run RECIPE [a.b=value ...] [--resume | --overwrite | --no-eval]``, or
in-process as ``tuneguard train RECIPE``. Every process runs this; the run directory stays locked
from the start of training to the end of the report.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tuneguard.args import add_train_arguments, with_overrides
from tuneguard.errors import TuneguardError, guarded
from tuneguard.eval.stage import Evaluation, load_run, score_run
from tuneguard.eval.validation import validation_scorer
from tuneguard.eval.verdicts import check_budget
from tuneguard.progress import quiet_libraries, say
from tuneguard.recipe import Recipe, load_recipe
from tuneguard.report.files import build_report, write_reports
from tuneguard.report.history import record_run
from tuneguard.report.terminal import print_report
from tuneguard.rundir import RunDir
from tuneguard.train.loop import TrainResult, claim_run_dir, train


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tuneguard.run", description=__doc__.splitlines()[0])
    add_train_arguments(parser)
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    args, extra = parser.parse_known_args(argv)
    return with_overrides(parser, args, extra)


def run(args: argparse.Namespace) -> int:
    """Train (or resume) the recipe, then evaluate it unless ``--no-eval``; the exit code (1 = regression budget)."""
    if args.resume and args.overwrite:
        raise TuneguardError("give --resume or --overwrite, not both")
    recipe = load_recipe(args.recipe, args.overrides)
    run_dir = recipe.run_dir(Path(args.recipe))
    resume = args.resume or bool(args.resume_changed)
    with claim_run_dir(run_dir, "overwrite" if args.overwrite else "resume" if resume else "new"):
        result = train(recipe, run_dir, resume=resume, resume_changed=args.resume_changed, scorer=validation_scorer)
        try:
            if args.no_eval or not (recipe.eval.task or recipe.eval.suites):
                return 0
            return evaluate(recipe, run_dir, result)
        finally:
            result.accelerator.end_training()  # closes trackers and the process group, after evaluation


def evaluate(recipe: Recipe, run_dir: Path, trained: TrainResult, *, suites: list[str] | None = None,
             limit: int | None = None, with_original: bool = False) -> int:
    """Score base vs tuned and report it; the exit code (1 = a general task regressed beyond the budget)."""
    evaluation = score_run(recipe, run_dir, trained, suites=suites, limit=limit, with_original=with_original)
    return 0 if evaluation is None else report(recipe, run_dir, evaluation)


def report(recipe: Recipe, run_dir: Path, evaluation: Evaluation) -> int:
    """eval.json, report.json|md|html, the terminal table and the history; then the regression budget. An earlier
    evaluation holding tasks this one lacks, or more of their items (``tuneguard eval RUN --tasks X``, ``--limit``),
    is moved aside, not overwritten."""
    run = RunDir(run_dir)
    scored = {r["task"]: r["n"] for r in evaluation.data["tuned"]}
    lost = [f"{t} ({n} items)" for t, n in run.evaluated_tasks().items() if scored.get(t, 0) < n]
    if lost:
        run.retire_evaluation(f"the earlier evaluation (it held more of {', '.join(lost)})")
    run.write_eval(evaluation.data)
    built = build_report(run_dir, evaluation.data, evaluation.comparisons, evaluation.original)
    write_reports(run_dir, built)
    print_report(built)
    record_run(run_dir, built)
    say(f"evaluation took {evaluation.data['seconds']:.0f} s; reports in {run_dir}/report.{{md,html,json}}")
    check_budget(evaluation.comparisons, recipe.eval.max_regression)
    return 0


def reevaluate(run_dir: Path, *, suites: list[str] | None, limit: int | None, with_original: bool) -> int:
    """``tuneguard eval RUN``: reload the backbone and the saved adapter, and evaluate again."""
    quiet_libraries()
    with RunDir(run_dir).hold_results():
        recipe, trained = load_run(run_dir)
        return evaluate(recipe, run_dir, trained, suites=suites, limit=limit, with_original=with_original)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return guarded(lambda: run(args), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
