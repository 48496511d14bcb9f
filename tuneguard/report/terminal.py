"""The report in the terminal: rich tables with coloured verdicts, then one line per signal."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.cells import cell_len
from rich.console import Console
from rich.table import Table
from rich.text import Text

from tuneguard.eval.records import TaskResult
from tuneguard.report.blocks import (
    DASH,
    Block,
    Cell,
    cell_class,
    cell_text,
    fmt_adapter,
    fmt_delta,
    fmt_float,
    fmt_int,
    fmt_memory,
    fmt_value,
    fmt_verdict,
    verdict_class,
)
from tuneguard.report.layout import report_blocks

if TYPE_CHECKING:
    from tuneguard.data.preview import PreviewRow  # types only: rendering needs no tokenizer library
    from tuneguard.recipe import DataConfig

STYLES = {"improved": "green", "regressed": "red", "nochange": "dim", "noninferior": "blue",
          "inconclusive": "yellow", "pass": "green", "fail": "red"}
_NUMERIC = {"n", "before", "after", "Δ", "CI of Δ", "level", "p (adjusted)", "detectable", "margin", "precision", "recall",
            "F1"}
"""Columns right-aligned so digits line up; every other column reads left to right."""


def _text(cell: Cell) -> Text:
    return Text(cell_text(cell), style=STYLES.get(cell_class(cell), ""))


def _wide(console: Console) -> Console:
    """Tables are wide: going to a file or a pipe (a CI log), they are not wrapped at rich's 80 columns."""
    if console.is_terminal or os.environ.get("COLUMNS"):
        return console
    return Console(width=max(console.width, 200), file=console.file)


def print_block(block: Block, console: Console | None = None) -> None:
    """A table block as a rich table, a lines block as lines headed by the block's title; on standard output
    unless told otherwise (results go there, progress and notes to standard error)."""
    console = _wide(console or Console())
    if block.headers:
        # at least as wide as its title, which rich would otherwise wrap to the width of a narrow table
        table = Table(title=block.title, title_justify="left", title_style="bold", header_style="bold",
                      min_width=cell_len(block.title))
        for header in block.headers:
            table.add_column(header, justify="right" if header in _NUMERIC else "left")
        for row in block.rows:
            table.add_row(*map(_text, row))
        console.print(table)
    for line in block.lines:
        console.print(Text(f"{block.title}: ", style="bold") + _text(line))


def print_report(report: dict[str, Any], console: Console | None = None) -> None:
    """One header line for the run, the task and general-suite tables, then loss, gap, guards, budget."""
    console = console or Console()
    s = report["summary"]
    console.print(
        Text(s["name"], style="bold")
        + Text(f"  {s.get('model') or DASH} · {s.get('quantization') or DASH} · {fmt_adapter(s)} · "
               f"{fmt_float(s.get('tokens_per_s'))} tokens/s · peak {fmt_memory(s.get('peak_memory_mb'))}")
    )
    for block in report_blocks(report, detail=False):
        print_block(block, console)


def print_history(rows: list[dict[str, Any]], console: Console | None = None) -> None:
    """The rows of :func:`tuneguard.report.history.list_history` as one table, oldest first."""
    headers = ["time", "recipe", "adapter", "quantization", "task", "metric", "n", "before", "after", "Δ", "verdict"]
    table = [
        [r["created"], r["recipe"] or DASH, fmt_adapter({"adapter": r["adapter_method"], "r": r["adapter_r"]}),
         r["quantization"] or DASH, r["task"], r["metric"], fmt_int(r["n"]), fmt_value(r["base"], r["aggregate"]),
         fmt_value(r["tuned"], r["aggregate"]), fmt_delta(r), (fmt_verdict(r), verdict_class(r["verdict"]))]
        for r in rows
    ]
    print_block(Block("History", headers, table), console)


def print_results(results: list[TaskResult]) -> None:
    """Scores of one model alone (``tuneguard eval --model``): the primary metric, then the others."""
    rows = [
        [r.task, r.metric, fmt_value(r.value, r.aggregate), str(r.n), f"{r.seconds:.1f}",
         ", ".join(f"{k} {fmt_float(v, 3)}" for k, v in r.metrics.items()
                   if k != r.metric and isinstance(v, int | float) and not isinstance(v, bool))]
        for r in results
    ]
    print_block(Block("Scores", ["task", "metric", "value", "n", "seconds", "other metrics"], rows))


def print_augmentation_preview(rows: list[PreviewRow], cfg: DataConfig, seed: int) -> None:
    """``tuneguard data preview``: each training row's prompt beside its augmented copies, one line per copy."""
    title = (f"Training rows and their augmented copies (data.augment {', '.join(cfg.augment_ops)}; "
             f"augment_prob {cfg.augment_prob}; augment_copies {cfg.augment_copies}; seed {seed})")
    table: list[list[Cell]] = [
        [Path(r.where).name, r.original, op, text, r.answer] if k == 0 else ["", "", op, text, ""]
        for r in rows for k, (op, text) in enumerate(r.copies)
    ]
    print_block(Block(title, ["row", "original", "operation", "augmented", "answer"], table))
