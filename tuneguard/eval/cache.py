"""Task scores kept between evaluations of a run, keyed so they cannot be handed to the wrong model.

Re-evaluating a run (another suite added, a report redone) should not score again what nothing
changed. A score is only reused when everything it depends on is the same: the backbone fingerprint
(weights and quantization), the adapter's file hash, whether the adapter was on, the compute dtypes,
the task (its items, kind and metric, and for an lm-eval task its whole configuration with shots and
chat settings) and the scoring code itself. lm-eval's own ``--use_cache`` keys a response by the
request alone (EleutherAI/lm-evaluation-harness#2715), which is why tuneguard's model refuses it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from tuneguard.eval.records import Doc, Task, TaskResult
from tuneguard.io import atomic_write_json
from tuneguard.rundir import read_json


@cache
def _code_hash() -> str:
    """The scoring code's own hash (metrics included): a change to how items are scored invalidates every entry."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _dtypes(model: torch.nn.Module) -> list[str]:
    """Parameter dtypes and 4-bit compute dtypes: the same weights scored in bf16 and fp32 differ."""
    found = {str(p.dtype) for p in model.parameters()}
    found |= {str(m.compute_dtype) for m in model.modules() if getattr(m, "compute_dtype", None) is not None}
    return sorted(found)


def task_config(task: Task) -> str:
    """How a task is scored, its name and items aside: kind, metric, options, and an lm-eval task's whole
    configuration (shots, chat template, system instruction). Two reports paired item by item must agree on it."""
    parts: list[object] = [task.kind, task.metric, task.delimiter, task.labels, task.until, task.max_new_tokens,
                           task.norm, task.answer, task.max_length]
    if task.external is not None:
        parts.append(task.external.config_hash())
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


def task_hash(task: Task, docs: list[Doc]) -> str:
    """The task as scored: its name, how it is scored and each item's content."""
    return hashlib.sha256(json.dumps([task.name, task_config(task), [d.hash() for d in docs]]).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ScoreCache:
    """One folder of results for one backbone and one adapter (a run's ``scores/``)."""

    root: Path
    fingerprint: str
    adapter_hash: str

    def key(self, model: torch.nn.Module, task: Task, docs: list[Doc], adapter_on: bool) -> str:
        payload = [self.fingerprint, self.adapter_hash, adapter_on, _dtypes(model), task_hash(task, docs), _code_hash()]
        return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:32]

    def get(self, key: str) -> TaskResult | None:
        path = self.root / f"{key}.json"
        return TaskResult.from_dict(read_json(path)) if path.is_file() else None

    def put(self, key: str, result: TaskResult) -> None:
        atomic_write_json(self.root / f"{key}.json", result.to_dict())
