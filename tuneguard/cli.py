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

    from tuneguard.bench.cli import add_bench_parser

    add_bench_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return guarded(lambda: args.func(args), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
