"""The ``tuneguard`` command: thin verbs over the modules that do the work."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from tuneguard.args import (
    add_train_arguments,
    count,
    finite_float,
    positive_float,
    positive_int,
    with_overrides,
)
from tuneguard.errors import TuneguardError, guarded, require_lm_eval
from tuneguard.io import file_target

if TYPE_CHECKING:
    from tuneguard.recipe import LmEvalConfig, Recipe


def _train(args: argparse.Namespace) -> int:
    from tuneguard import run

    return run.run(args)


def _cv(args: argparse.Namespace) -> int:
    from tuneguard.cv import cross_validate

    return cross_validate(args)


def _select(args: argparse.Namespace) -> int:
    from tuneguard.select import select_backbones

    return select_backbones(args)


def _add_select_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("select", help="rank candidate backbones on the recipe's validation data (untuned, or after "
                       "a short fine-tune), with their general-suite score, footprint and speed")
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides (anywhere on the line)")
    p.add_argument("--candidates", nargs="+", required=True, metavar="SOURCE",
                   help="model sources: bundled:NAME, a local folder, a .gguf file or a hub id")
    p.add_argument("--steps", type=positive_int, help="also fine-tune each for N steps with the recipe's adapter")
    p.add_argument("--limit", type=positive_int, help="first N validation items (and items of each general task)")
    p.add_argument("--out", help="folder for select.json|md and the fine-tune runs (default <output root>/NAME-select)")
    p.set_defaults(func=_select)


def _export(args: argparse.Namespace) -> int:
    from tuneguard.export import export_merged
    from tuneguard.progress import quiet_libraries, say
    from tuneguard.recipe import load_recipe
    from tuneguard.rundir import RunDir

    quiet_libraries()  # transformers' load and shard-writing bars, PEFT's deprecation warning
    run = RunDir(Path(args.run))
    run.ensure_converged()
    recipe = load_recipe(run.recipe)
    out = Path(args.out) if args.out else run.merged
    note = export_merged(recipe, run.adapter, out, dtype=args.dtype)
    say(f"merged model saved to {out}")  # the result is the folder: standard output stays empty
    if note:
        say(f"note: {note}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    if args.model:
        from tuneguard.eval.stage import evaluate_base_model
        from tuneguard.progress import quiet_libraries
        from tuneguard.report.terminal import print_results

        if args.run:
            raise TuneguardError("give either a run directory or --model, not both")
        if args.with_original:
            raise TuneguardError("--with-original scores a run's unquantized backbone beside it; with --model, "
                                 "evaluate the model again with --quant none")
        if args.out:
            file_target(args.out)
        quiet_libraries()
        results = evaluate_base_model(args.model, args.tasks or ["general-small"], args.limit, args.quant or "none",
                                      args.batch_size or 8, _lm_eval_options(args))
        print_results(results)
        if args.out:
            from tuneguard.io import atomic_write_json

            atomic_write_json(args.out, [r.to_dict() for r in results])
        return 0
    if not args.run:
        raise TuneguardError("give a run directory to re-evaluate, or --model SOURCE to evaluate a base model")
    model_only = [flag for flag, value in (("--quant", args.quant), ("--batch-size", args.batch_size), ("--out", args.out),
                                           ("--num-fewshot", args.num_fewshot), ("--system-instruction",
                                           args.system_instruction), ("--apply-chat-template", args.apply_chat_template))
                  if value is not None]
    if model_only:
        from tuneguard.rundir import RunDir

        raise TuneguardError(f"{', '.join(model_only)} apply with --model; a run is scored as its recipe says "
                             f"(eval.batch_size, eval.lm_eval.* in {RunDir(Path(args.run)).recipe})")
    from tuneguard.run import reevaluate

    return reevaluate(Path(args.run), suites=args.tasks, limit=args.limit, with_original=args.with_original)


def _lm_eval_options(args: argparse.Namespace) -> LmEvalConfig:
    from tuneguard.recipe import LmEvalConfig

    return LmEvalConfig(num_fewshot=args.num_fewshot, apply_chat_template=args.apply_chat_template,
                        system_instruction=args.system_instruction)


def lm_eval_tasks(lm_eval_args: list[str]) -> list[str]:
    """The task names on lm-eval's command line: ``--tasks``/``-t`` (or ``--tasks=``), comma- or space-separated."""
    names: list[str] = []
    taking = False
    for arg in lm_eval_args:
        if arg.startswith("--tasks="):
            names += arg.split("=", 1)[1].split(",")
        elif arg in ("--tasks", "-t"):
            taking = True
            continue
        elif arg.startswith("-"):
            taking = False
        elif taking:
            names += arg.split(",")
    return [n for n in names if n]


def _lm_eval(lm_eval_args: list[str]) -> int:
    """lm-eval's own command line, with tuneguard's model registered (lm-eval has no plugin entry point)."""
    require_lm_eval("tuneguard lm-eval")
    from lm_eval.__main__ import cli_evaluate

    import tuneguard.lm_eval_model  # noqa: F401  (registers --model tuneguard)

    named = lm_eval_tasks(lm_eval_args)
    vendored = [t for t in named if t.endswith("@vendored")]
    if vendored:
        raise TuneguardError(f"--tasks {vendored[0]}: @vendored names are tuneguard's (tuneguard eval --model M "
                             f"--tasks lm_eval:{vendored[0]}); lm-eval's command line takes its task names or a YAML path")
    from tuneguard.hub import use_hub

    use_hub()  # its tasks' datasets (and an hf model) may live there
    sys.argv = ["lm_eval", *lm_eval_args]
    try:
        cli_evaluate()
    except OSError as exc:  # datasets' "Couldn't reach ... on the Hub": say what to do offline, as eval does
        if "Hub" not in str(exc):
            raise
        from tuneguard.eval.lm_eval_bridge import load_error

        raise load_error(named[0] if named else "the task", exc, verb="lm-eval") from None
    return 0


def _report(args: argparse.Namespace) -> int:
    from tuneguard.report.side_by_side import compare_run_dirs, print_run_comparison

    comparison = compare_run_dirs([Path(r) for r in args.runs], Path(args.out) if args.out else None)
    print_run_comparison(comparison)
    return 0


def _history(args: argparse.Namespace) -> int:
    from tuneguard.progress import say
    from tuneguard.report.history import count_runs, list_checks, list_history, unknown_filter
    from tuneguard.report.terminal import print_history

    results = list_history(task=args.task, recipe=args.recipe, last=args.last)
    checks = list_checks(task=args.task, recipe=args.recipe, last=args.last)
    if not results and not checks and (problem := unknown_filter(args.task, args.recipe)):
        raise TuneguardError(problem)
    if args.plot:
        from tuneguard.io import atomic_write_bytes
        from tuneguard.report.monitor import trend_png

        if not results and not checks:
            raise TuneguardError(f"--plot: nothing to plot: the history has no runs or checks"
                                 f"{f' of task {args.task!r}' if args.task else ''}")
        png, drawn, total = trend_png(results, checks)
        atomic_write_bytes(args.plot, png)
        say(f"trend of {len(results)} run results and {len(checks)} checks drawn to {args.plot} (the newest "
            f"{args.last} runs and checks at most; --last N)")
        if len(drawn) < total:
            say(f"{len(drawn)} of {total} tasks drawn ({', '.join(drawn)}); choose one with --task")
        return 0
    if results or not checks:
        print_history(results)
        shown, total = len({r["run_dir"] + r["created"] for r in results}), count_runs(task=args.task, recipe=args.recipe)
        if shown < total:
            say(f"the newest {shown} of {total} runs; --last N shows more")
    if checks:
        from tuneguard.report.monitor import print_checks

        print_checks(checks)
    return 0


def _check(args: argparse.Namespace) -> int:
    from tuneguard.check import check

    return check(Path(args.run), Path(args.data), args.alpha, args.allow_overlap, args.limit)


def _gate(args: argparse.Namespace) -> int:
    from tuneguard.report.gate import run_gate

    return run_gate(args.report, baseline=args.baseline, margin=args.margin, require_power=args.require_power,
                    junit=args.junit, markdown=args.markdown)


def _plan(args: argparse.Namespace) -> int:
    from tuneguard.report.gate import run_plan

    return run_plan(args.tasks, args.margin, discordance=args.discordance, pilot=args.pilot, power=args.power)


def _compare(args: argparse.Namespace) -> int:
    from tuneguard.eval.compare_adapters import score_runs
    from tuneguard.progress import quiet_libraries, say
    from tuneguard.report.compare_adapters import print_compare, write_compare

    quiet_libraries()
    result = score_runs([Path(r) for r in args.runs], tasks=args.tasks, limit=args.limit)
    print_compare(result)
    paths = write_compare(result, Path(args.out))
    say(f"written: {', '.join(map(str, paths))}")
    return 0


def _lr(args: argparse.Namespace) -> int:
    from tuneguard.progress import say
    from tuneguard.recipe import load_recipe
    from tuneguard.report.lr_range import print_lr_range, write_lr_range
    from tuneguard.train.lr_range import lr_folder, range_test

    recipe = load_recipe(args.recipe, args.overrides)
    folder = lr_folder(recipe, args.out)
    result = range_test(recipe, folder, start=args.start, end=args.end, steps=args.steps).to_dict()
    print_lr_range(result)
    say(f"written: {', '.join(map(str, write_lr_range(folder, result)))}")
    return 0


def _add_lr_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("lr", help="learning-rate range test: loss against a growing rate, and a suggested train.lr")
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides (anywhere on the line)")
    p.add_argument("--start", type=positive_float, default=1e-6, help="first learning rate (default 1e-6)")
    p.add_argument("--end", type=positive_float, default=1e-1, help="last learning rate (default 1e-1)")
    p.add_argument("--steps", type=positive_int, default=60, help="optimizer steps, one per rate (default 60)")
    p.add_argument("--out", help="output folder (default: NAME-lr beside the run directory, e.g. runs/NAME-lr)")
    p.set_defaults(func=_lr)


def _add_cv_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cv", help="k-fold cross-validation: one adapter per fold, the mean and spread of every metric")
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides (anywhere on the line)")
    p.add_argument("--folds", type=positive_int, default=5, help="number of folds, at least 2 (default 5)")
    p.add_argument("--stratify", action="store_true", help="keep each label's share in every fold (classification)")
    p.add_argument("--general", action="store_true",
                   help="also score eval.suites on every fold (default: the recipe's own task only)")
    p.add_argument("--overwrite", action="store_true", help="run every fold again, moving earlier fold runs aside")
    p.set_defaults(func=_cv)


def _data_preview(args: argparse.Namespace) -> int:
    from tuneguard.data.preview import augmentation_preview
    from tuneguard.recipe import load_recipe
    from tuneguard.report.terminal import print_augmentation_preview

    recipe = load_recipe(args.recipe, args.overrides)
    seed = recipe.train.seed if args.seed is None else args.seed
    if recipe.data.kind == "image_classification":
        return _image_preview(args, recipe, seed)
    if given := [flag for flag, value in (("--out", args.out), ("--epochs", args.epochs)) if value is not None]:
        raise TuneguardError(f"{', '.join(given)}: for image recipes (a PNG grid); data.kind "
                             f"'{recipe.data.kind}' prints its copies here")
    print_augmentation_preview(augmentation_preview(recipe.data, seed, args.n), recipe.data, seed)
    return 0


def _image_preview(args: argparse.Namespace, recipe: Recipe, seed: int) -> int:
    from tuneguard.backbones import image_input
    from tuneguard.data.preview import image_augmentation_preview
    from tuneguard.progress import say
    from tuneguard.report.image_grid import write_image_grid

    out = Path(args.out or f"{Path(args.recipe).stem}-augment-preview.png")
    if out.is_dir() or out.suffix.lower() != ".png":
        raise TuneguardError(f"--out {out}: name the PNG file to write (a path ending in .png)")
    epochs = args.epochs or 4
    rows = image_augmentation_preview(recipe.data, image_input(recipe.model), seed, args.n, epochs)
    write_image_grid(out, rows, f"data.image_augment {', '.join(recipe.data.image_augment)}; seed {seed}")
    say(f"{out}: {len(rows)} training images, each beside its copies in epochs 0-{epochs - 1}")
    return 0


def _add_data_parser(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="inspect a recipe's training data").add_subparsers(dest="data_verb", required=True)
    p = data.add_parser("preview", help="training rows beside their augmented copies (data.augment; for images "
                             "a PNG grid, data.image_augment); loads no model")
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides (anywhere on the line)")
    p.add_argument("--n", type=positive_int, default=10, help="training rows to show (default 10)")
    p.add_argument("--seed", type=int, help="the seed to augment with (default: the recipe's train.seed)")
    p.add_argument("--out", help="images: the PNG grid to write (default RECIPE-augment-preview.png here)")
    p.add_argument("--epochs", type=positive_int, help="images: augmented copies shown, one per epoch (default 4)")
    p.set_defaults(func=_data_preview)


def _add_monitoring_parsers(sub: argparse._SubParsersAction) -> None:
    """``history`` (results and checks over time) and ``check`` (a trained run on new data)."""
    p = sub.add_parser("history", help="results of past runs and checks over time, oldest first (--last N: the newest N)")
    p.add_argument("--task")
    p.add_argument("--recipe")
    p.add_argument("--last", type=positive_int, default=20, help="the newest N runs and checks (default 20)")
    p.add_argument("--plot", metavar="OUT.png", help="draw each task's metric over time (runs and checks) to a PNG")
    p.set_defaults(func=_history)

    p = sub.add_parser("check", help="score a trained run on new data: exit 1 on a significant drop (labelled rows) "
                       "or drift of its predictions (unlabelled rows)")
    p.add_argument("run", help="run directory")
    p.add_argument("--data", required=True, help="JSONL/CSV/TSV/Parquet rows with the recipe's fields; without the "
                   "label field: a drift check")
    p.add_argument("--alpha", type=float, default=0.05, help="significance level of the one-sided tests (default 0.05)")
    p.add_argument("--allow-overlap", action="store_true", help="score rows the run trained on too (refused by default: "
                   "they hide a drop and fake drift; also allowed where the run's recipe sets data.allow_overlap)")
    p.add_argument("--limit", type=positive_int, help="the data file's first N rows only")
    p.set_defaults(func=_check)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tuneguard", description="Fine-tune adapters on quantized backbones and prove what it cost.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="verb", required=True)

    p = sub.add_parser("train", help="train a recipe in-process (then evaluate it)")
    add_train_arguments(p)
    p.set_defaults(func=_train)

    for add_verb in (_add_cv_parser, _add_lr_parser, _add_data_parser, _add_select_parser):
        add_verb(sub)

    p = sub.add_parser("export", help="merge a run's adapter into its backbone and save a plain HF model")
    p.add_argument("run", help="run directory")
    p.add_argument("--out", help="output folder (default RUN/merged)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.set_defaults(func=_export)

    p = sub.add_parser("eval", help="re-evaluate a run (base vs tuned), or evaluate a base model with --model")
    p.add_argument("run", nargs="?", help="run directory")
    p.add_argument("--model", help="evaluate this model source alone (e.g. bundled:smollm2-135m-instruct)")
    p.add_argument("--tasks", nargs="+", help="tasks, suites (general-small, general) or task YAML files")
    p.add_argument("--limit", type=positive_int,
                   help="first N items of each task, in the original order (WikiText: shortest first)")
    p.add_argument("--quant", help="with --model: none (default), nf4, fp4 or int8")
    p.add_argument("--batch-size", type=positive_int, help="with --model: rows scored at once (default 8)")
    p.add_argument("--with-original", action="store_true", help="with a run: also score the unquantized backbone")
    p.add_argument("--out", help="with --model: write the results as JSON here")
    p.add_argument("--num-fewshot", type=count, help="with --model, lm_eval: tasks: shots (default: each task's own)")
    p.add_argument("--apply-chat-template", action=argparse.BooleanOptionalAction,
                   help="with --model, lm_eval: tasks: wrap prompts in the chat template (default: where the model "
                        "has one)")
    p.add_argument("--system-instruction", help="with --model, lm_eval: tasks: a system message before every prompt")
    p.set_defaults(func=_eval)

    # Handled before parsing (main): everything after the verb is lm-eval's own command line.
    sub.add_parser("lm-eval", help="lm-evaluation-harness's command line with --model tuneguard available, e.g. "
                   "--model tuneguard --model_args run=runs/x,adapter=off --tasks arc_easy", add_help=False)

    p = sub.add_parser("report", help="compare several runs side by side")
    p.add_argument("runs", nargs="+", help="run directories")
    p.add_argument("--out", help="also write comparison.md/html/json into this folder")
    p.set_defaults(func=_report)

    _add_monitoring_parsers(sub)

    p = sub.add_parser("gate", help="a CI gate on a report: exit 0 pass, 1 regressed beyond the margin, 3 undecided")
    p.add_argument("report", help="report.json, or the run directory holding it")
    p.add_argument("--baseline", help="an earlier report.json: compare tuned outcomes item by item (same items)")
    p.add_argument("--margin", type=finite_float, help="accepted regression in points (default: the report's)")
    p.add_argument("--junit", help="write JUnit XML here (one test case per task)")
    p.add_argument("--markdown", help="write a pull-request summary here")
    p.add_argument("--require-power", action="store_true", help="exit 3 when a task is inconclusive")
    p.set_defaults(func=_gate)

    p = sub.add_parser("compare", help="several runs' adapters on one base: the backbone loaded and the base scored once")
    p.add_argument("runs", nargs="+", help="run directories trained on the same backbone")
    p.add_argument("--tasks", nargs="+", help="general tasks or suites (default: the first run's eval.suites)")
    p.add_argument("--limit", type=positive_int, help="first N items of each task")
    p.add_argument("--out", default="compare", help="folder for compare.json/md/html (default ./compare)")
    p.set_defaults(func=_compare)

    p = sub.add_parser("plan", help="items each task needs to show non-inferiority with 80%% power")
    p.add_argument("--margin", type=finite_float, default=2.0, help="accepted regression in points (default 2)")
    p.add_argument("--tasks", nargs="+", help="tasks or suites (default: the pilot's general suite)")
    spread = p.add_mutually_exclusive_group()
    spread.add_argument("--discordance", type=float, help="share of items base and tuned are expected to disagree on")
    spread.add_argument("--pilot", help="a report.json (or run directory) whose observed spread to plan from")
    p.add_argument("--power", type=float, default=0.8)
    p.set_defaults(func=_plan)

    from tuneguard.bench.cli import add_bench_parser

    add_bench_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = argv[:1] == ["--debug"]
    if argv[debug:debug + 1] == ["lm-eval"]:  # lm-eval's own arguments follow, untouched
        return guarded(lambda: _lm_eval(argv[debug + 1:]), debug=debug)
    debug = "--debug" in argv  # before or after the verb
    parser = build_parser()
    args, extra = parser.parse_known_args([a for a in argv if a != "--debug"])
    if hasattr(args, "overrides"):  # every verb that takes section.key=value overrides
        args = with_overrides(parser, args, extra)
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return guarded(lambda: args.func(args), debug=debug)


if __name__ == "__main__":
    sys.exit(main())
