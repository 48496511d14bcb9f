"""Command-line argument types shared by the verbs, so each refuses bad values the same way."""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable


def _whole(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"must be at least {least}, got {value}")
    return value


def positive_int(text: str) -> int:
    """An integer of at least 1: ``--limit 0`` or ``-1`` would silently mean 'all' or 'all but one'."""
    return _whole(text, 1)


def count(text: str) -> int:
    """A whole number of at least 0 (``--num-fewshot 0``)."""
    return _whole(text, 0)


def _number(text: str, ok: Callable[[float], bool], must: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"must be {must}, got {text}")
    return value


def finite_float(text: str) -> float:
    """Any finite number (a margin of ``nan`` or ``inf`` would judge nothing)."""
    return _number(text, math.isfinite, "a finite number")


def positive_float(text: str) -> float:
    """A number above 0 (``1e-4``): a learning rate of 0 or below trains nothing."""
    return _number(text, lambda v: math.isfinite(v) and v > 0, "a finite number above 0")


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of a training run, shared by ``tuneguard train`` and ``python -m tuneguard.run``."""
    parser.add_argument("recipe", help="recipe YAML file")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides (anywhere on the line)")
    parser.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    parser.add_argument("--resume-changed", metavar="KEYS", type=lambda s: [k for k in s.split(",") if k],
                        default=[], help="resume although these recipe keys changed (comma-separated; implies --resume)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start again in a run directory that holds a run, moving its contents aside")
    parser.add_argument("--no-eval", action="store_true", help="skip the before/after evaluation")


def with_overrides(parser: argparse.ArgumentParser, args: argparse.Namespace, extra: list[str]) -> argparse.Namespace:
    """Overrides anywhere on the line, also before the recipe or after a flag (``--n 5 data.augment=swap R``,
    ``R --no-eval train.lr=5e-3``): argparse takes the first word for the recipe, so the recipe is the one word
    that is not ``section.key=value``; anything else is an error."""
    unknown = [w for w in extra if w.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    words = [args.recipe, *args.overrides, *extra]
    recipes = [w for w in words if not re.fullmatch(r"[A-Za-z_][\w.]*=.*", w, re.DOTALL)]
    if len(recipes) != 1:
        parser.error(f"expected one recipe file and section.key=value overrides, got {' '.join(words)}")
    args.recipe, args.overrides = recipes[0], [w for w in words if w != recipes[0]]
    return args
