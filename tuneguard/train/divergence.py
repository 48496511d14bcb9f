"""Training that went wrong, caught within a step instead of saved as an adapter that looks trained.

A non-finite loss or gradient stops the run before the optimizer applies it. A loss pinned at the
uniform-distribution value (the model predicts nothing: ln of the number of classes it chooses
from) or past it, or a gradient norm far above its history is divergence: recorded in run.json, where the
evaluation's guard rails find it and refuse the adapter.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

from tuneguard.errors import TuneguardError

STUCK_STEPS = 5
"""Consecutive steps at the uniform value that count as stuck (not one noisy step)."""
STUCK_TOLERANCE = 0.01
"""Relative distance from the uniform value that counts as 'at' it."""
LEARNED_BELOW = 0.9
"""The loss must once have been this fraction of the uniform value: a model that never knew
anything (a random tiny test model) starts at the uniform value without having diverged."""
WORSE_THAN_UNIFORM = math.log(2)
"""A loss this far above the uniform value (half a uniform guess's probability on the right answer, on average)
counts as stuck too: a model that learned and then went past chance (a too-high rate: 2.4, then 60, then 14 with
a vocabulary's 10.8) is as broken as one pinned at it; a classifier near chance does not get there by noise."""
EXPLOSION_FACTOR = 1000.0
"""A gradient norm this many times the median of the steps before it is an explosion."""
MIN_HISTORY = 5


class NonFiniteStep(TuneguardError):
    """A step whose loss or gradient is not finite, stopped before the update (the range test ends there)."""


def non_finite(loss: float, grad_norm: float | None) -> str | None:
    """What is not finite at this step, if anything."""
    if not math.isfinite(loss):
        return f"the training loss is {loss}"
    if grad_norm is not None and not math.isfinite(grad_norm):
        return f"the gradient norm is {grad_norm}"
    return None


@dataclass
class DivergenceWatch:
    uniform_loss: float
    """ln(vocabulary size) for a decoder, ln(number of labels) for a classifier head."""
    best_loss: float = math.inf
    stuck: int = 0
    norms: list[float] = field(default_factory=list)

    def to_state(self) -> dict[str, Any]:
        """What a checkpoint keeps (JSON: an infinite best as None)."""
        best = self.best_loss if math.isfinite(self.best_loss) else None
        return {"best_loss": best, "stuck": self.stuck, "norms": list(self.norms)}

    @classmethod
    def from_state(cls, uniform_loss: float, state: dict[str, Any]) -> DivergenceWatch:
        best = state.get("best_loss")
        return cls(uniform_loss, math.inf if best is None else best, state.get("stuck", 0), list(state.get("norms", [])))

    def update(self, loss: float, grad_norm: float | None) -> str | None:
        """Why training diverged at this step, or None."""
        self.best_loss = min(self.best_loss, loss)
        at_uniform = abs(loss - self.uniform_loss) <= STUCK_TOLERANCE * self.uniform_loss
        self.stuck = self.stuck + 1 if at_uniform or loss >= self.uniform_loss + WORSE_THAN_UNIFORM else 0
        if self.stuck >= STUCK_STEPS and self.best_loss < LEARNED_BELOW * self.uniform_loss:
            return (f"the loss has been at or above the value of a uniform guess (ln {math.exp(self.uniform_loss):.0f}"
                    f" = {self.uniform_loss:.3f}) for {self.stuck} steps, now {loss:.3f}; it was {self.best_loss:.3f}")
        if grad_norm is None:
            return None
        if len(self.norms) >= MIN_HISTORY:
            median = statistics.median(self.norms)
            if median > 0 and grad_norm > EXPLOSION_FACTOR * median:
                return f"the gradient norm jumped to {grad_norm:.3g}, {grad_norm / median:.0f}x its median {median:.3g}"
        self.norms.append(grad_norm)
        return None
