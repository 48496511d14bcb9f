"""The learning-rate range test (Smith 2017, "Cyclical Learning Rates for Training Neural Networks", section
3.3; fastai's ``lr_find``): ``tuneguard lr RECIPE``.

A fresh adapter on the recipe's backbone and training data trains with its learning rate grown exponentially
from ``start`` to ``end``, one optimizer step per rate, through the same ``setup`` and ``train_step`` as a run
(so the same batches, accumulation, clipping, layer-wise decay and method hooks). The test stops early once
the running loss passes ``DIVERGE_FACTOR`` times its lowest value, a step is not finite, or a run would call
it diverged (``train/divergence.py``: back at the uniform guess after learning, or an exploding gradient).
It writes nothing but its own folder: no adapter, no checkpoint, and no run directory's files are touched.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tuneguard.adapters.capabilities import CAPABILITIES
from tuneguard.errors import TuneguardError
from tuneguard.progress import TrainProgress, quiet_libraries
from tuneguard.recipe import Recipe, TrainConfig
from tuneguard.rundir import RECIPE, RunDir
from tuneguard.train.batches import step_windows
from tuneguard.train.checkpoints import TrainState
from tuneguard.train.divergence import NonFiniteStep
from tuneguard.train.loop import divergence_watch, setup, train_step

DIVERGE_FACTOR = 4.0
"""The test stops when the running loss exceeds this multiple of its lowest value (fastai's rule)."""
RUNNING_BETA = 0.8
"""Memory of the running loss the stop rule watches (an exponential average over about five steps)."""
MIN_STEPS = 8
"""Fewer steps cannot draw a curve."""
KEPT_TRAIN_KEYS = ("batch_size", "grad_accum", "weight_decay", "max_grad_norm", "optimizer", "mixed_precision",
                   "gradient_checkpointing", "seed", "deterministic", "layer_lr_decay")
"""What the test takes from the recipe's ``train`` section; the schedule, validation and checkpoints are its own."""
RULE = "minimum / 10"
"""How the suggestion is read off the curve: the rate at the smoothed loss's minimum, divided by 10 (Smith's and
fastai's rule of thumb: the minimum is already at the edge of instability)."""
CAVEATS = (
    "A short test: every rate trains for one step, after all the smaller ones, so each loss mixes the rate "
    "with how far training has come.",
    "Noisy: one batch per step. The curve is smoothed; another seed or batch order draws a different one.",
    "It depends on the batch size, gradient accumulation and schedule: a run with warmup and decay tolerates "
    "a different peak rate; test again after changing them.",
    "The suggestion is a starting point for train.lr, not an optimum: compare a few rates around it on "
    "validation results (the method's usual range is printed beside it).",
)


@dataclass
class LrRange:
    """One range test: the curve, why it ended, and the suggested ``train.lr``."""

    recipe: str
    method: str
    start: float
    end: float
    steps: int
    """Steps planned; ``lrs`` holds the ones taken."""
    lrs: list[float] = field(default_factory=list)
    """``train.lr`` at each step taken (with ``train.layer_lr_decay``, the top layer's rate)."""
    losses: list[float] = field(default_factory=list)
    smoothed: list[float] = field(default_factory=list)
    """The losses under a centred moving average (no lag, so the minimum sits at the rate that caused it)."""
    stopped: str | None = None
    """Why the test ended before ``end``, or None."""
    suggestion: float | None = None
    """None where the loss hardly fell (:data:`MIN_DROP`)."""
    rule: str = RULE
    min_loss_lr: float | None = None
    steepest_lr: float | None = None
    """Where the smoothed loss fell fastest per decade of rate (before its minimum): another common reading."""
    warnings: list[str] = field(default_factory=list)
    """Why this curve's suggestion deserves less trust than usual."""
    default_lr: float = 0.0
    usual_range: tuple[float, float] = (0.0, 0.0)
    batch_size: int = 0
    grad_accum: int = 0
    layer_lr_decay: float = 1.0
    seconds: float = 0.0
    caveats: list[str] = field(default_factory=lambda: list(CAVEATS))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


MIN_DROP = 0.01
"""The least fall of the smoothed loss (a share of where it started) for its minimum to suggest a rate."""
LR_JSON, LR_PNG = "lr_range.json", "lr_range.png"
"""What the test writes beside its recipe.yaml (``tuneguard.report.lr_range`` writes them)."""


def lr_folder(recipe: Recipe, out: str | Path | None = None) -> Path:
    """Where the test writes: ``out``, or ``NAME-lr/`` beside the recipe's run directory (``runs/NAME-lr/``).
    Never the run directory or a folder inside it: the test must not touch a run's recipe or training state."""
    run = recipe.run_dir()
    folder = Path(out) if out is not None else run.with_name(f"{run.name}-lr")
    if folder.resolve() == run.resolve() or run.resolve() in folder.resolve().parents:
        raise TuneguardError(f"--out {folder}: that is the recipe's run directory {run} (or inside it); the range "
                             "test writes beside runs, never into one")
    if blocked := next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None):
        raise TuneguardError(f"--out {folder}: {blocked} is a file, not a folder")
    held = sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) if folder.is_dir() else []
    if set(held) - {LR_JSON, LR_PNG, RECIPE}:  # a test that stopped early left its recipe.yaml alone
        raise TuneguardError(f"--out {folder}: holds {', '.join(held[:4])}{', ...' if len(held) > 4 else ''}, not "
                             "an earlier range test's output; the test writes into an empty folder or its own")
    return folder


def range_recipe(recipe: Recipe, start: float, steps: int) -> Recipe:
    """The recipe as the test trains it: its data, backbone, adapter and batch; a constant rate from ``start``
    (the test's factor grows it), ``steps`` steps, no validation, checkpoints or trackers."""
    kept = {key: getattr(recipe.train, key) for key in KEPT_TRAIN_KEYS}
    train = TrainConfig(**kept, lr=start, max_steps=steps, scheduler="constant", warmup_ratio=0.0)
    return recipe.model_copy(update={"train": train})


def check_range(start: float, end: float, steps: int) -> None:
    if not 0 < start < end:
        raise TuneguardError(f"--start {start:g} and --end {end:g}: need 0 < start < end")
    if steps < MIN_STEPS:
        raise TuneguardError(f"--steps {steps}: at least {MIN_STEPS} steps are needed to draw a curve")


def range_test(recipe: Recipe, out: Path, *, start: float = 1e-6, end: float = 1e-1, steps: int = 60) -> LrRange:
    """Train a fresh adapter for up to ``steps`` steps at rates from ``start`` to ``end``; the curve and a suggestion."""
    check_range(start, end, steps)
    started = time.time()
    quiet_libraries()
    test = range_recipe(recipe, start, steps)
    caps = CAPABILITIES[recipe.adapter.method]
    result = LrRange(recipe=str(recipe.output.name), method=recipe.adapter.method, start=start, end=end, steps=steps,
                     default_lr=caps.lr, usual_range=caps.lr_range, batch_size=test.train.batch_size,
                     grad_accum=test.train.grad_accum, layer_lr_decay=test.train.layer_lr_decay)

    def factor(step: int) -> float:
        return (end / start) ** (min(step, steps - 1) / (steps - 1))

    s = setup(test, RunDir(out), lr_factor=factor)
    acc = s.accelerator
    windows = step_windows(s.data, test, acc.process_index, acc.num_processes, s.pad_id)
    state, running, lowest, watch = TrainState(), 0.0, math.inf, divergence_watch(s)
    s.loss_model.train()
    with TrainProgress(steps, enabled=acc.is_main_process) as progress:
        for k in range(steps):
            lr = start * factor(k)
            micro, tokens = zip(*next(windows), strict=True)
            step_start = time.time()
            try:
                loss, grad_norm, step_tokens = train_step(s, state, micro, sum(tokens))
            except NonFiniteStep:
                result.stopped = f"step {k + 1} (lr {lr:.3g}): the loss or gradient is not finite"
                break
            state.step += 1
            result.lrs.append(lr)
            result.losses.append(loss)
            running = RUNNING_BETA * running + (1 - RUNNING_BETA) * loss
            smooth = running / (1 - RUNNING_BETA ** (k + 1))
            lowest = min(lowest, smooth)
            progress.update(k + 1, loss=loss, lr=lr, tokens_per_s=step_tokens / max(time.time() - step_start, 1e-9))
            if smooth > DIVERGE_FACTOR * lowest:
                result.stopped = (f"step {k + 1} (lr {lr:.3g}): the running loss {smooth:.4g} passed "
                                  f"{DIVERGE_FACTOR:g}x its lowest, {lowest:.4g}")
            elif diverged := watch.update(loss, grad_norm):
                result.stopped = f"step {k + 1} (lr {lr:.3g}): {diverged}"
            if result.stopped:
                break
    read_curve(result)
    result.seconds = round(time.time() - started, 1)
    return result


def centred_average(values: list[float], half: int) -> list[float]:
    """Each value averaged with ``half`` neighbours on either side (fewer at the ends)."""
    out = []
    for i in range(len(values)):
        window = values[max(0, i - half): i + half + 1]
        out.append(sum(window) / len(window))
    return out


def read_curve(result: LrRange) -> None:
    """Smooth the losses and read the suggestion off them (``RULE``), kept within [start, end]."""
    n = len(result.lrs)
    if n < 3:
        raise TuneguardError(f"the range test stopped after {n} step(s) ({result.stopped}); lower --start")
    result.smoothed = centred_average(result.losses, max(1, round(n / 20)))
    low = min(range(n), key=result.smoothed.__getitem__)
    result.min_loss_lr = result.lrs[low]
    result.suggestion = min(max(result.min_loss_lr / 10, result.start), result.end)
    clamped = result.suggestion != result.min_loss_lr / 10
    slopes = [(result.smoothed[i + 1] - result.smoothed[i]) / math.log10(result.lrs[i + 1] / result.lrs[i])
              for i in range(low)]
    result.steepest_lr = result.lrs[min(range(low), key=slopes.__getitem__)] if slopes else None
    drop = 1 - result.smoothed[low] / result.smoothed[0] if result.smoothed[0] else 0.0
    if drop < MIN_DROP:  # then where its minimum sits says nothing: no other reading of the curve is offered
        result.suggestion = None
        result.warnings.append(f"the smoothed loss fell by only {100 * max(drop, 0):.1f}% (from "
                               f"{result.smoothed[0]:.4g} to {result.smoothed[low]:.4g}): no rate here clearly trains, "
                               "so nothing is suggested; check the data, or widen the range")
    elif low < max(2, n // 10):  # one line for one advice, whether or not minimum / 10 fell below --start too
        below = f" (minimum / 10 = {result.min_loss_lr / 10:.3g} lies below --start)" if clamped else ""
        result.warnings.append(f"the loss hardly fell before rising: the suggestion sits at the range's start{below}; "
                               "try a lower --start")
        clamped = False
    elif low == n - 1 and result.stopped is None:
        result.warnings.append("the loss was still falling at --end: the minimum may lie higher; try a higher --end")
    if result.suggestion is not None and clamped:
        result.warnings.append(f"minimum / 10 ({result.min_loss_lr / 10:.3g}) lies below --start: the suggestion is "
                               f"--start itself; lower --start to read it")
