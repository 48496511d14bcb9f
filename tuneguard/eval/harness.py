"""Run tasks on a model and turn the raw outcomes into :class:`TaskResult` records.

How each kind of task is scored and which metrics it yields lives in ``kinds.py``; this module deals
the items out to the processes, gathers the outcomes back in item order, and builds the records.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from tuneguard.errors import TuneguardError
from tuneguard.eval.cache import ScoreCache, task_config
from tuneguard.eval.kinds import KINDS, TaskKind
from tuneguard.eval.records import Doc, Task, TaskResult, aggregate
from tuneguard.eval.scoring import loglikelihood
from tuneguard.eval.suites import get_tasks
from tuneguard.eval.tasks import wikitext_detokenize, wikitext_text
from tuneguard.progress import phase, say

__all__ = ["evaluate_tasks", "general_text_loss", "task_result"]


def task_result(
    task: Task, docs: Sequence[Doc], outcomes: Sequence[Any], tokenizer: PreTrainedTokenizerBase, *,
    seconds: float = 0.0, fingerprint: str = "", adapter_id: str | None = None,
) -> TaskResult:
    """Every metric of a task from the raw per-doc outcomes, and the primary metric's per-item outcomes."""
    kind = KINDS[task.kind]
    per_item, metrics, weights, how = kind.result(task, docs, outcomes, tokenizer)
    value = aggregate(per_item, weights, how)
    metrics[task.metric] = value
    return TaskResult(
        task=task.name, metric=task.metric, value=value, higher_is_better=kind.higher_is_better(task),
        n=len(docs), per_item=per_item, weights=weights, aggregate=how, metrics=metrics, fingerprint=fingerprint,
        adapter=adapter_id, seconds=seconds, item_hashes=[d.hash() for d in docs], setup=kind.setup(task, tokenizer),
        config=task_config(task),
    )


def share(kind: TaskKind, n: int, rank: int, world: int) -> list[int]:
    """The items process ``rank`` of ``world`` scores: dealt round-robin, or all to the first where the kind
    cannot be split."""
    return list(range(rank, n, world)) if kind.splittable else list(range(n)) if rank == 0 else []


def _gather(accelerator: Any, local: list[tuple[int, Any]]) -> list[Any]:
    """All processes' ``(index, outcome)`` pairs, back in item order."""
    if accelerator is not None and accelerator.num_processes > 1:
        # Not gather_for_metrics: right after a training loop it may still "drop the remainder" of the
        # last training dataloader and silently cut items off.
        from accelerate.utils import gather_object

        local = gather_object(local)
    return [outcome for _, outcome in sorted(local, key=lambda pair: pair[0])]


def evaluate_tasks(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    tasks: Sequence[Task | str],
    *,
    limit: int | None = None,
    batch_size: int = 8,
    fingerprint: str = "",
    adapter_id: str | None = None,
    accelerator: Any = None,
    label: str = "",
    cache: ScoreCache | None = None,
    show: bool = True,
) -> list[TaskResult]:
    """Score tasks (objects, names, suites or YAML paths) on the first ``limit`` items of each.

    Each task shows a live line (items/s, ETA) and logs its time, prefixed by ``label`` ("base", "tuned"),
    unless ``show`` is off (a validation inside training, under the training's own progress bar).

    With a ``cache``, a task already scored on this backbone, adapter and adapter state (on when
    ``adapter_id`` is given) is taken from it instead of scored again.

    With an ``accelerate.Accelerator`` of several processes, items are dealt round-robin (which
    balances long and short items), and the scores are gathered before any metric is computed; a kind that
    cannot be split (lm-eval's, whose shots depend on the items scored before) is scored whole by the first.
    """
    resolved = [t for item in tasks for t in ([item] if isinstance(item, Task) else get_tasks([item]))]
    rank = accelerator.process_index if accelerator is not None else 0
    world = accelerator.num_processes if accelerator is not None else 1
    results = []
    for task in resolved:
        docs = task.docs(limit)
        if not docs:
            raise TuneguardError(f"task '{task.name}' has no items to score")
        key = cache.key(model, task, docs, adapter_id is not None) if cache is not None else None
        kept = cache.get(key) if cache is not None and key is not None else None
        name = f"{label} · {task.name}" if label else task.name
        if kept is not None:
            if rank == 0 and show:
                say(f"{name}: {len(docs)} items, scored before on this backbone and adapter (scores/)")
            results.append(kept)
            continue
        kind = KINDS[task.kind]
        mine = share(kind, len(docs), rank, world)
        start = time.perf_counter()
        with phase(name, len(mine), enabled=show and rank == 0) as advance:
            local = kind.score(model, tokenizer, task, [docs[i] for i in mine], batch_size, advance) if mine else []
        outcomes = _gather(accelerator, list(zip(mine, local, strict=True)))
        results.append(
            task_result(
                task, docs, outcomes, tokenizer, seconds=time.perf_counter() - start, fingerprint=fingerprint,
                adapter_id=adapter_id,
            )
        )
        if cache is not None and key is not None and rank == 0:
            cache.put(key, results[-1])
    return results


def general_text_loss(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, *, n_tokens: int = 2048, window: int = 512,
    batch_size: int = 4,
) -> float:
    """Mean next-token cross-entropy on a fixed WikiText sample: a cheap, always-on regression signal.

    The sample is cut into disjoint windows; in each, every token after the first is predicted from
    the ones before it (labels shifted by one), and the loss is averaged over all predicted tokens.
    """
    ids = tokenizer(wikitext_detokenize(wikitext_text()), add_special_tokens=False)["input_ids"][:n_tokens]
    chunks = [ids[i : i + window] for i in range(0, len(ids), window)]
    requests = [(c[:1], c[1:]) for c in chunks if len(c) > 1]
    scores = loglikelihood(model, requests, batch_size, max_length=window)
    return -sum(s.logprob for s in scores) / sum(s.n_tokens for s in scores)

