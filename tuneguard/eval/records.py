"""The records every part of evaluation exchanges: what a task scored, and how two runs compare.

Per-item outcomes travel with every score so that base and tuned can be compared pair by pair.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Aggregate = Literal["mean", "perplexity", "bits_per_byte"]


@dataclass
class TaskResult:
    task: str
    metric: str
    """The primary metric, e.g. ``acc``, ``acc_norm``, ``f1_macro``, ``exact_match``, ``perplexity``."""
    value: float
    higher_is_better: bool
    n: int
    per_item: list[float]
    """Per-item outcome of the primary metric: 0/1 correctness, a per-item score, or a summed NLL."""
    weights: list[float] | None = None
    """For perplexity-like metrics: tokens (or bytes) behind each per-item NLL."""
    aggregate: Aggregate = "mean"
    metrics: dict[str, Any] = field(default_factory=dict)
    """Every metric the task computed (the primary one included), for the report."""
    fingerprint: str = ""
    adapter: str | None = None
    """Adapter id (its folder) or None for the base model."""
    seconds: float = 0.0
    item_hashes: list[str] | None = None
    """A content hash per item, in order: what pairs a later run with this one item by item."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TaskResult:
        return cls(**data)


def aggregate(per_item: list[float], weights: list[float] | None, how: Aggregate) -> float:
    """The metric value from per-item outcomes; the bootstrap resamples items and calls this."""
    if how == "mean":
        return sum(per_item) / max(len(per_item), 1)
    total = sum(weights or [])
    nll = sum(per_item) / max(total, 1e-12)
    return math.exp(nll) if how == "perplexity" else nll / math.log(2)
