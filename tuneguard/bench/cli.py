"""The ``tuneguard bench`` verbs."""

from __future__ import annotations

import argparse


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    sub.add_parser("bench", help="measure memory and speed against the usual Trainer + PEFT way")
