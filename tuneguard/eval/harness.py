"""Run tasks on a model and turn the raw scores into :class:`TaskResult` records.

Scoring and metrics are split on purpose: each process scores its share of the items, the raw
per-item scores are gathered in the original order, and every metric is computed once on the
whole list, so a distributed run gives exactly the single-process numbers.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Sequence
from typing import Any

import torch
from pydantic import ValidationError
from transformers import PreTrainedTokenizerBase

from tuneguard.errors import TuneguardError
from tuneguard.eval.metrics import classification_metrics
from tuneguard.eval.metrics.functional import exact_match_score, token_f1_score
from tuneguard.eval.records import TaskResult, aggregate
from tuneguard.eval.scoring import (
    Score,
    classify,
    encode_pair,
    generate_until,
    loglikelihood,
    prefix_token_id,
    rolling_loglikelihood,
)
from tuneguard.eval.tasks import (
    Doc,
    Task,
    Text,
    classification_task_from_items,
    get_tasks,
    wikitext_detokenize,
    wikitext_text,
)
from tuneguard.progress import Advance, phase

__all__ = [
    "classification_task_from_items",
    "evaluate_tasks",
    "general_text_loss",
    "has_classification_head",
    "run_eval_cli",
    "score_docs",
    "task_result",
]


def has_classification_head(model: torch.nn.Module) -> bool:
    """Encoders fine-tuned with a head are scored by the head, not by verbalizer log-likelihoods."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return type(base).__name__.endswith("ForSequenceClassification")


def _encode(tokenizer: PreTrainedTokenizerBase, context: Text, continuation: Text, delimiter: str) -> tuple[list[int], list[int]]:
    if isinstance(context, str) and isinstance(continuation, str):
        return encode_pair(tokenizer, context, delimiter + continuation)
    if isinstance(context, list) and isinstance(continuation, list):
        return context, continuation
    raise TypeError("a context and its continuation must both be text or both be token ids")


def _context_ids(tokenizer: PreTrainedTokenizerBase, context: str) -> list[int]:
    return tokenizer(context, add_special_tokens=False)["input_ids"] or [prefix_token_id(tokenizer)]


def score_docs(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, task: Task, docs: Sequence[Doc], batch_size: int,
    advance: Advance | None = None,
) -> list[Any]:
    """Raw per-doc scores: a list of :class:`Score` per option, a predicted class, a generation, or a rolling NLL."""
    if task.kind == "perplexity":
        # Rows are windows of up to 2048 tokens whose every position is scored: one window per batch
        # keeps the (float32) logits at 2048 x vocab, and a 2048-token row is no faster batched on CPU.
        return rolling_loglikelihood(model, tokenizer, [d.text for d in docs], batch_size=max(1, batch_size // 8),
                                     advance=advance)
    if task.kind == "generation":
        contexts = [d.context if isinstance(d.context, list) else _context_ids(tokenizer, d.context) for d in docs]
        return generate_until(
            model, tokenizer, contexts, task.until, max_new_tokens=task.max_new_tokens, batch_size=batch_size,
            advance=advance,
        )
    if has_classification_head(model):
        if task.kind != "classification" or not all(isinstance(d.context, str) for d in docs):
            raise TuneguardError(f"task '{task.name}': a model with a classification head can only score text classification tasks")
        return classify(model, tokenizer, [str(d.context) for d in docs], batch_size=batch_size, advance=advance)
    requests, owner = [], []
    for i, doc in enumerate(docs):
        for context, continuation in doc.pairs():
            requests.append(_encode(tokenizer, context, continuation, task.delimiter))
            owner.append(i)
    scores = loglikelihood(model, requests, batch_size, advance=advance)
    per_doc: list[list[Score]] = [[] for _ in docs]
    for i, score in zip(owner, scores, strict=True):
        per_doc[i].append(score)
    return per_doc


def _argmax(values: Sequence[float]) -> int:
    """First index of the maximum, as numpy's argmax (lm-evaluation-harness breaks ties this way)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def _chars(tokenizer: PreTrainedTokenizerBase, choice: Text) -> int:
    return len(choice) if isinstance(choice, str) else len(tokenizer.decode(choice))


def task_result(
    task: Task, docs: Sequence[Doc], outcomes: Sequence[Any], tokenizer: PreTrainedTokenizerBase, *,
    seconds: float = 0.0, fingerprint: str = "", adapter_id: str | None = None,
) -> TaskResult:
    """Every metric of a task from the raw per-doc scores, and the primary metric's per-item outcomes."""
    weights: list[float] | None = None
    how = "mean"
    if task.kind == "perplexity":
        nll = [o.nll for o in outcomes]
        units = {
            "tokens": [float(o.n_tokens) for o in outcomes],
            "words": [float(len(re.split(r"\s+", d.raw if d.raw is not None else d.text))) for d in docs],
            "bytes": [float(len((d.raw if d.raw is not None else d.text).encode("utf-8"))) for d in docs],
        }
        metrics = {
            "perplexity": aggregate(nll, units["tokens"], "perplexity"),
            "word_perplexity": aggregate(nll, units["words"], "perplexity"),
            "byte_perplexity": aggregate(nll, units["bytes"], "perplexity"),
            "bits_per_byte": aggregate(nll, units["bytes"], "bits_per_byte"),
            "tokens": int(sum(units["tokens"])),
        }
        weights = {"perplexity": units["tokens"], "word_perplexity": units["words"]}.get(task.metric, units["bytes"])
        how = "bits_per_byte" if task.metric == "bits_per_byte" else "perplexity"
        per_item = nll
    elif task.kind == "generation":
        em = [exact_match_score(o, d.target) for o, d in zip(outcomes, docs, strict=True)]
        f1 = [token_f1_score(o, d.target) for o, d in zip(outcomes, docs, strict=True)]
        per_item = em if task.metric == "exact_match" else f1
        metrics = {"exact_match": _mean(em), "token_f1": _mean(f1)}
    elif task.kind == "loglikelihood":
        per_item = [float(o[0].is_greedy) for o in outcomes]
        logprobs = [o[0].logprob for o in outcomes]
        metrics = {"acc": _mean(per_item), "perplexity": math.exp(-_mean(logprobs)) if logprobs else math.nan}
    else:
        preds = [o if isinstance(o, int) else _argmax([s.logprob for s in o]) for o in outcomes]
        per_item = [float(p == d.gold) for p, d in zip(preds, docs, strict=True)]
        metrics = {"acc": _mean(per_item)}
        if task.kind == "classification":
            metrics.update(classification_metrics(preds, [d.gold for d in docs], task.labels or []))
        elif (task.norm or task.metric == "acc_norm") and all(d.contexts is None for d in docs):
            norm = [
                float(_argmax([s.logprob / max(_chars(tokenizer, c), 1) for s, c in zip(o, d.choices, strict=True)]) == d.gold)
                for o, d in zip(outcomes, docs, strict=True)
            ]
            metrics["acc_norm"] = _mean(norm)
            if task.metric == "acc_norm":
                per_item = norm
    value = aggregate(per_item, weights, how)  # type: ignore[arg-type]
    metrics[task.metric] = value
    return TaskResult(
        task=task.name, metric=task.metric, value=value, higher_is_better=task.higher_is_better, n=len(docs),
        per_item=per_item, weights=weights, aggregate=how, metrics=metrics,  # type: ignore[arg-type]
        fingerprint=fingerprint, adapter=adapter_id, seconds=seconds, item_hashes=[d.hash() for d in docs],
    )


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


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
) -> list[TaskResult]:
    """Score tasks (objects, names, suites or YAML paths) on the first ``limit`` items of each.

    Each task shows a live line (items/s, ETA) and logs its time, prefixed by ``label`` ("base", "tuned").

    With an ``accelerate.Accelerator`` of several processes, items are dealt round-robin (which
    balances long and short items), and the scores are gathered before any metric is computed.
    """
    resolved = [t for item in tasks for t in ([item] if isinstance(item, Task) else get_tasks([item]))]
    rank = accelerator.process_index if accelerator is not None else 0
    world = accelerator.num_processes if accelerator is not None else 1
    results = []
    for task in resolved:
        docs = task.docs(limit)
        if not docs:
            raise TuneguardError(f"task '{task.name}' has no items to score")
        mine = list(range(rank, len(docs), world))
        start = time.perf_counter()
        name = f"{label} · {task.name}" if label else task.name
        with phase(name, len(mine), enabled=rank == 0) as advance:
            local = score_docs(model, tokenizer, task, [docs[i] for i in mine], batch_size, advance)
        outcomes = _gather(accelerator, list(zip(mine, local, strict=True)))
        results.append(
            task_result(
                task, docs, outcomes, tokenizer, seconds=time.perf_counter() - start, fingerprint=fingerprint,
                adapter_id=adapter_id,
            )
        )
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


def run_eval_cli(model_source: str, tasks: list[str], limit: int | None, quant: str, batch_size: int) -> list[TaskResult]:
    """``tuneguard eval``: load a backbone (no adapter) and score tasks or suites on it."""
    from tuneguard.backbones import dequantized, load_backbone
    from tuneguard.recipe import ModelConfig, QuantizationConfig

    resolved = get_tasks(tasks)
    try:
        quantization = QuantizationConfig(method=quant)  # type: ignore[arg-type]
    except ValidationError:
        raise TuneguardError(f"--quant must be one of none, nf4, fp4, int8; got '{quant}'") from None
    backbone = load_backbone(ModelConfig(source=model_source), quantization)
    if backbone.is_encoder:
        raise TuneguardError(f"'{model_source}' is an encoder: general tasks need a causal language model")
    with dequantized(backbone.model):
        return evaluate_tasks(
            backbone.model, backbone.tokenizer, resolved, limit=limit, batch_size=batch_size,
            fingerprint=backbone.fingerprint,
        )
