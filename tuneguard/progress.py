"""The live training display (rich) and the silencing of noisy third-party logs."""

from __future__ import annotations

import logging
import os
import warnings
from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)


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
