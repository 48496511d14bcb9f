"""The live displays (training, each long phase of loading and evaluation) and the silencing of noisy logs."""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)
"""Everything that is not a result (progress, notes, warnings) goes here, so standard output holds only results."""


def say(text: str, main: bool = True) -> None:
    """A note for the user, not a result: on standard error, as written (no rich markup or emoji codes: a path may
    hold ``[x]`` or ``:x:``), never wrapped; only where ``main`` (of several processes, one says it)."""
    if main:
        console.print(text, markup=False, emoji=False, highlight=False, soft_wrap=True)


def quiet_libraries() -> None:
    """Hide load reports, per-tensor progress bars and known-harmless warnings; keep our own output."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    for name in ("bitsandbytes", "peft", "accelerate", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # bitsandbytes looks for an optional hub-hosted CPU kernel and falls back to its built-in path.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore", message=".*kernels-community.*")
    warnings.filterwarnings("ignore", category=UserWarning, module="peft")
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


class TrainProgress:
    """A progress bar with loss, learning rate, tokens/s and ETA (main process only)."""

    def __init__(self, total: int, start: int = 0, enabled: bool = True) -> None:
        self.enabled = enabled
        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[tps]} tok/s"),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
            console=console, disable=not enabled, transient=False,
        )
        self.task = self.progress.add_task("train", total=total, completed=start, loss="-", lr="-", tps="-")

    def __enter__(self) -> TrainProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.progress.__exit__(exc_type, exc, tb)

    def update(self, step: int, *, loss: float, lr: float, tokens_per_s: float) -> None:
        self.progress.update(self.task, completed=step, loss=f"{loss:.4f}", lr=f"{lr:.2e}", tps=f"{tokens_per_s:.0f}")

    def log(self, record: dict) -> None:
        """Logged steps as plain lines when the output is not a terminal (files, CI), where no bar shows."""
        if self.enabled and not self.progress.console.is_terminal:
            self.progress.console.print("  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))

    def note(self, text: str) -> None:
        if self.enabled:
            self.progress.console.print(text)


Advance = Callable[[int, int], None]
"""``advance(done, total)``: a scoring loop's position in its own units (rows, batches)."""


@contextmanager
def phase(label: str, items: int | None = None, *, unit: str = "items", enabled: bool = True) -> Iterator[Advance]:
    """A live line for one long phase (items/s and ETA when ``items`` is known, a spinner otherwise),
    then one log line naming what ran and how long it took.

    The yielded ``advance(done, total)`` maps the loop's own units onto ``items``, so a loop over
    packed rows or batches still shows items.
    """
    columns = [SpinnerColumn(), TextColumn("{task.description}")]
    if items:  # the time taken is in the closing line; an 80-column terminal has no room for it here
        columns += [BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"), TextColumn("eta"),
                    TimeRemainingColumn()]
    else:
        columns.append(TimeElapsedColumn())
    start = time.perf_counter()
    # Live only on a terminal: in logs (CI, nohup) the closing line below says it all.
    bar = Progress(*columns, console=console, transient=True, disable=not (enabled and console.is_terminal))
    task = bar.add_task(label, total=items or None, rate="")

    def advance(done: int, total: int) -> None:
        completed = (items or 0) * done / max(total, 1)
        rate = completed / max(time.perf_counter() - start, 1e-9)
        bar.update(task, completed=completed, rate=f"{rate:.1f} {unit}/s")

    with bar:
        yield advance
    if enabled:
        seconds = time.perf_counter() - start
        rate = f" ({items / max(seconds, 1e-9):.1f} {unit}/s)" if items else ""
        console.print(f"{label}: {f'{items} {unit} in ' if items else ''}{seconds:.1f} s{rate}", soft_wrap=True)
