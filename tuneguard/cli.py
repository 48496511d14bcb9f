"""The ``tuneguard`` command: thin verbs over the modules that do the work."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from tuneguard.errors import TuneguardError


def guarded(action: Callable[[], int], debug: bool = False) -> int:
    """Run a verb; a user error becomes one line on stderr and a non-zero exit (traceback with --debug)."""
    try:
        return action()
    except TuneguardError as exc:
        if debug:
            raise
        print(f"tuneguard: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("tuneguard: interrupted", file=sys.stderr)
        return 130


def _train(args: argparse.Namespace) -> int:
    from tuneguard import train

    return train.run(args)


def _export(args: argparse.Namespace) -> int:
    from tuneguard.adapters.export import export_merged
    from tuneguard.recipe import load_recipe

    run_dir = Path(args.run)
    if not (run_dir / "recipe.yaml").exists():
        raise TuneguardError(f"{run_dir}: not a run directory (no recipe.yaml)")
    recipe = load_recipe(run_dir / "recipe.yaml")
    out = Path(args.out) if args.out else run_dir / "merged"
    export_merged(recipe, run_dir / "adapter", out, dtype=args.dtype)
    print(f"merged model saved to {out}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    if args.model:
        from tuneguard.eval.harness import run_eval_cli
        from tuneguard.progress import console, quiet_libraries
        from tuneguard.report.terminal import print_results

        if args.run:
            raise TuneguardError("give either a run directory or --model, not both")
        quiet_libraries()
        results = run_eval_cli(args.model, args.tasks or ["general-small"], args.limit, args.quant, args.batch_size)
        print_results(results, console)
        if args.out:
            from tuneguard.io import atomic_write_json

            atomic_write_json(args.out, [r.to_dict() for r in results])
        return 0
    if not args.run:
        raise TuneguardError("give a run directory to re-evaluate, or --model SOURCE to evaluate a base model")
    from tuneguard.evaluation import reevaluate

    return reevaluate(Path(args.run), suites=args.tasks, limit=args.limit, with_original=args.with_original)


def _report(args: argparse.Namespace) -> int:
    from tuneguard.progress import console
    from tuneguard.report.compare_runs import compare_run_dirs, print_run_comparison

    comparison = compare_run_dirs([Path(r) for r in args.runs], Path(args.out) if args.out else None)
    print_run_comparison(comparison, console)
    return 0


def _history(args: argparse.Namespace) -> int:
    from tuneguard.progress import console
    from tuneguard.report.history import list_history
    from tuneguard.report.terminal import print_history

    print_history(list_history(task=args.task, recipe=args.recipe, last=args.last), console)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tuneguard", description="Fine-tune adapters on quantized backbones and prove what it cost.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="verb", required=True)

    p = sub.add_parser("train", help="train a recipe in-process (then evaluate it)")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    p.add_argument("--no-eval", action="store_true", help="skip the before/after evaluation")
    p.set_defaults(func=_train)

    p = sub.add_parser("export", help="merge a run's adapter into its backbone and save a plain HF model")
    p.add_argument("run", help="run directory")
    p.add_argument("--out", help="output folder (default RUN/merged)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.set_defaults(func=_export)

    p = sub.add_parser("eval", help="re-evaluate a run (base vs tuned), or evaluate a base model with --model")
    p.add_argument("run", nargs="?", help="run directory")
    p.add_argument("--model", help="evaluate this model source alone (e.g. bundled:smollm2-135m-instruct)")
    p.add_argument("--tasks", nargs="+", help="tasks, suites (general-small, general) or task YAML files")
    p.add_argument("--limit", type=int, help="first N items of each task, in the original order")
    p.add_argument("--quant", default="none", help="with --model: none, nf4, fp4 or int8")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--with-original", action="store_true", help="also score the unquantized backbone")
    p.add_argument("--out", help="with --model: write the results as JSON here")
    p.set_defaults(func=_eval)

    p = sub.add_parser("report", help="compare several runs side by side")
    p.add_argument("runs", nargs="+", help="run directories")
    p.add_argument("--out", help="also write comparison.md/html/json into this folder")
    p.set_defaults(func=_report)

    p = sub.add_parser("history", help="results of past runs, newest first")
    p.add_argument("--task")
    p.add_argument("--recipe")
    p.add_argument("--last", type=int, default=20)
    p.set_defaults(func=_history)

    from tuneguard.bench.cli import add_bench_parser

    add_bench_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return guarded(lambda: args.func(args), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
