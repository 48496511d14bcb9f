"""One object per kind of task: how its items are scored and which metrics it yields.

As in lm-evaluation-harness, a :class:`~tuneguard.eval.tasks.Task` is data plus a declared ``kind``;
the kind is the only place that knows how to score it. Scoring and metrics are split on purpose:
:meth:`TaskKind.score` returns raw per-doc outcomes, which a distributed run gathers back into item
order, and :meth:`TaskKind.result` computes every metric once on the whole list, so a split run gives
exactly the single-process numbers (an lm-eval task is not split: see :attr:`TaskKind.splittable`).
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from transformers import PreTrainedTokenizerBase

from tuneguard.errors import TuneguardError
from tuneguard.eval.metrics import classification_metrics
from tuneguard.eval.metrics.functional import exact_match_score, token_f1_score
from tuneguard.eval.records import Aggregate, Doc, Task, Text, aggregate
from tuneguard.eval.scoring import (
    Score,
    encode_pair,
    encode_text,
    eval_mode,
    generate_until,
    head_logits,
    loglikelihood,
    max_model_length,
    model_device,
    prefix_token_id,
    rolling_loglikelihood,
)
from tuneguard.progress import Advance

__all__ = ["KINDS", "KindResult", "TaskKind", "has_classification_head"]


class KindResult(NamedTuple):
    """A task's metrics from its raw outcomes, and what the primary metric's value is aggregated from."""

    per_item: list[float]
    """The primary metric's per-item outcomes, paired base vs tuned by the comparison."""
    metrics: dict[str, Any]
    weights: list[float] | None
    how: Aggregate


class TaskKind(ABC):
    """What every kind declares: the metrics it yields, how to score items and how to turn scores into metrics."""

    metrics: tuple[str, ...]
    """The metrics a task of this kind may name as its primary one; the first is the default."""
    lower_is_better: frozenset[str] = frozenset()
    splittable: bool = True
    """Whether processes may score shares of the items: an item's outcome must not depend on which others a call
    scores."""

    def higher_is_better(self, task: Task) -> bool:
        """Which way a change in the task's primary metric is an improvement, for the base vs tuned verdicts."""
        return task.metric not in self.lower_is_better

    @abstractmethod
    def score(
        self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, task: Task, docs: Sequence[Doc],
        batch_size: int, advance: Advance | None = None,
    ) -> list[Any]:
        """Raw per-doc outcomes, in the order of ``docs``."""

    def setup(self, task: Task, tokenizer: PreTrainedTokenizerBase) -> str:
        """How the task was run, for the report, where the kind has options."""
        return ""

    @abstractmethod
    def result(
        self, task: Task, docs: Sequence[Doc], outcomes: Sequence[Any], tokenizer: PreTrainedTokenizerBase,
    ) -> KindResult:
        """Every metric of the task from all docs' outcomes (gathered from every process)."""


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
    return encode_text(tokenizer, context) or [prefix_token_id(tokenizer)]


def _option_loglikelihoods(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, task: Task, docs: Sequence[Doc], batch_size: int,
    advance: Advance | None = None,
) -> list[list[Score]]:
    """A :class:`Score` per option of each doc, all options of all docs batched together."""
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


def argmax(values: Sequence[float]) -> int:
    """First index of the maximum, as numpy's argmax (lm-evaluation-harness breaks ties this way)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def _best(options: Sequence[Score]) -> int:
    return argmax([s.logprob for s in options])


def _hits(predictions: Sequence[int], docs: Sequence[Doc]) -> list[float]:
    return [float(p == d.gold) for p, d in zip(predictions, docs, strict=True)]


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _chars(tokenizer: PreTrainedTokenizerBase, choice: Text) -> int:
    return len(choice) if isinstance(choice, str) else len(tokenizer.decode(choice))


class _OptionKind(TaskKind):
    """Kinds scored by the log-likelihood of each option after the context."""

    by_head = False
    """A model with a classification head predicts the class itself (text classification only)."""

    def score(
        self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, task: Task, docs: Sequence[Doc],
        batch_size: int, advance: Advance | None = None,
    ) -> list[Any]:
        if not has_classification_head(model):
            return _option_loglikelihoods(model, tokenizer, task, docs, batch_size, advance)
        if not self.by_head or not all(isinstance(d.context, str) for d in docs):
            raise TuneguardError(f"task '{task.name}': a model with a classification head can only score text classification tasks")
        texts = [str(d.context) for d in docs]
        return head_logits(model, tokenizer, texts, batch_size=batch_size, max_length=task.max_length,
                           advance=advance).argmax(-1).tolist()


class MultipleChoice(_OptionKind):
    """Each choice scored after the context; ``acc`` and length-normalised ``acc_norm``."""

    metrics = ("acc", "acc_norm")

    def result(
        self, task: Task, docs: Sequence[Doc], outcomes: Sequence[Any], tokenizer: PreTrainedTokenizerBase,
    ) -> KindResult:
        per_item = _hits([_best(o) for o in outcomes], docs)
        metrics: dict[str, Any] = {"acc": _mean(per_item)}
        # Partial evaluation (one context per option, one shared continuation) has nothing to normalise.
        if (task.norm or task.metric == "acc_norm") and all(d.contexts is None for d in docs):
            norm = _hits([
                argmax([s.logprob / max(_chars(tokenizer, c), 1) for s, c in zip(o, d.choices, strict=True)])
                for o, d in zip(outcomes, docs, strict=True)
            ], docs)
            metrics["acc_norm"] = _mean(norm)
            if task.metric == "acc_norm":
                per_item = norm
        return KindResult(per_item, metrics, None, "mean")


class Classification(_OptionKind):
    """A fixed set of verbalized labels (or a classification head); adds precision/recall/F1/confusion."""

    metrics = ("acc",)
    by_head = True

    def result(
        self, task: Task, docs: Sequence[Doc], outcomes: Sequence[Any], tokenizer: PreTrainedTokenizerBase,
    ) -> KindResult:
        predictions = [o if isinstance(o, int) else _best(o) for o in outcomes]
        per_item = _hits(predictions, docs)
        metrics: dict[str, Any] = {"acc": _mean(per_item)}
        metrics.update(classification_metrics(predictions, [d.gold for d in docs], task.labels or []))
        return KindResult(per_item, metrics, None, "mean")


class ImageClassification(Classification):
    """A recipe's validation images (``Task.external``: :class:`~tuneguard.data.images.ImageItems`), each scored
    by the image classifier's head, never augmented; the metrics are text classification's."""

    def score(
        self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase | None, task: Task, docs: Sequence[Doc],
        batch_size: int, advance: Advance | None = None,
    ) -> list[Any]:
        examples = task.external.examples
        device = model_device(model)
        preds: list[int] = []
        with eval_mode(model):
            for start in range(0, len(docs), batch_size):
                rows = [examples[d.ref] for d in docs[start : start + batch_size]]
                pixels = rows[0].pipeline.batch(rows)["pixel_values"].to(device)
                preds += model(pixel_values=pixels).logits.argmax(dim=-1).tolist()
                if advance:
                    advance(start + len(rows), len(docs))
        return preds


class Loglikelihood(_OptionKind):
    """One target continuation; ``acc`` = it is the greedy continuation (LAMBADA), plus its perplexity."""

    metrics = ("acc",)

    def result(
        self, task: Task, docs: Sequence[Doc], outcomes: Sequence[Any], tokenizer: PreTrainedTokenizerBase,
    ) -> KindResult:
        per_item = [float(o[0].is_greedy) for o in outcomes]
        logprobs = [o[0].logprob for o in outcomes]
        metrics = {"acc": _mean(per_item), "perplexity": math.exp(-_mean(logprobs)) if logprobs else math.nan}
        return KindResult(per_item, metrics, None, "mean")


class Generation(TaskKind):
    """Greedy generation until a stop string; ``exact_match`` and ``token_f1`` against the reference.

    A task that declares an :class:`~tuneguard.eval.records.Answer` is scored as lm-evaluation-harness
    scores it instead: ``exact_match,<filter>`` of each filter's extracted answer.
    """

    metrics = ("exact_match", "token_f1")

    def score(
        self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, task: Task, docs: Sequence[Doc],
        batch_size: int, advance: Advance | None = None,
    ) -> list[Any]:
        # Contexts keep their last tokens so that the generation fits the model, as lm-evaluation-harness cuts them.
        keep = max(max_model_length(model, tokenizer) - task.max_new_tokens, 1)
        contexts = [
            (d.context if isinstance(d.context, list) else _context_ids(tokenizer, d.context))[-keep:] for d in docs
        ]
        return generate_until(
            model, tokenizer, contexts, task.until, max_new_tokens=task.max_new_tokens, batch_size=batch_size,
            advance=advance,
        )

    def result(
        self, task: Task, docs: Sequence[Doc], outcomes: Sequence[Any], tokenizer: PreTrainedTokenizerBase,
    ) -> KindResult:
        if task.answer is not None:
            answer = task.answer
            per_metric = {
                f"exact_match,{f.name}": [
                    exact_match_score(f.extract(o), d.target, ignore_case=answer.ignore_case,
                                      regexes_to_ignore=answer.ignore, strip=False)
                    for o, d in zip(outcomes, docs, strict=True)
                ]
                for f in answer.filters
            }
            return KindResult(per_metric[task.metric], {k: _mean(v) for k, v in per_metric.items()}, None, "mean")
        em = [exact_match_score(o, d.target) for o, d in zip(outcomes, docs, strict=True)]
        f1 = [token_f1_score(o, d.target) for o, d in zip(outcomes, docs, strict=True)]
        per_item = em if task.metric == "exact_match" else f1
        return KindResult(per_item, {"exact_match": _mean(em), "token_f1": _mean(f1)}, None, "mean")


class Perplexity(TaskKind):
    """Rolling log-likelihood of whole texts; token/word/byte perplexity and bits per byte."""

    metrics = ("perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte")
    lower_is_better = frozenset(metrics)

    def score(
        self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, task: Task, docs: Sequence[Doc],
        batch_size: int, advance: Advance | None = None,
    ) -> list[Any]:
        # Rows are windows of the model's full context (8,192 tokens for SmolLM2), as lm-evaluation-harness
        # cuts them, every position scored: one window per batch (a long row is no faster batched on CPU),
        # and the scorer projects it to the vocabulary a chunk of positions at a time.
        return rolling_loglikelihood(model, tokenizer, [d.text for d in docs], batch_size=max(1, batch_size // 8),
                                     advance=advance)

    def result(
        self, task: Task, docs: Sequence[Doc], outcomes: Sequence[Any], tokenizer: PreTrainedTokenizerBase,
    ) -> KindResult:
        nll = [o.nll for o in outcomes]
        # Words and bytes are counted on the raw text, as lm-evaluation-harness does (before detokenizing).
        raw = [d.raw if d.raw is not None else d.text for d in docs]
        units = {
            "tokens": [float(o.n_tokens) for o in outcomes],
            "words": [float(len(re.split(r"\s+", text))) for text in raw],
            "bytes": [float(len(text.encode("utf-8"))) for text in raw],
        }
        metrics: dict[str, Any] = {
            "perplexity": aggregate(nll, units["tokens"], "perplexity"),
            "word_perplexity": aggregate(nll, units["words"], "perplexity"),
            "byte_perplexity": aggregate(nll, units["bytes"], "perplexity"),
            "bits_per_byte": aggregate(nll, units["bytes"], "bits_per_byte"),
            "tokens": int(sum(units["tokens"])),
        }
        weights = {"perplexity": units["tokens"], "word_perplexity": units["words"]}.get(task.metric, units["bytes"])
        how: Aggregate = "bits_per_byte" if task.metric == "bits_per_byte" else "perplexity"
        return KindResult(nll, metrics, weights, how)


class LmEval(TaskKind):
    """A task of lm-evaluation-harness's library: lm-eval builds the requests, filters and per-document metrics,
    tuneguard's engine answers the requests (``lm_eval_bridge``), and the per-document values are paired."""

    metrics = ()
    splittable = False  # lm-eval's shot sampler moves on with each document it builds: a share gets other shots

    def higher_is_better(self, task: Task) -> bool:
        """As the lm-eval task declares it for its metric."""
        return task.external.higher_is_better(task.metric)

    def score(
        self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, task: Task, docs: Sequence[Doc],
        batch_size: int, advance: Advance | None = None,
    ) -> list[Any]:
        return task.external.score(model, tokenizer, docs, batch_size, advance)

    def setup(self, task: Task, tokenizer: PreTrainedTokenizerBase) -> str:
        return task.external.setup(tokenizer)

    def result(
        self, task: Task, docs: Sequence[Doc], outcomes: Sequence[Any], tokenizer: PreTrainedTokenizerBase,
    ) -> KindResult:
        return KindResult(*task.external.result(task.metric, outcomes))


KINDS: dict[str, TaskKind] = {
    "multiple_choice": MultipleChoice(),
    "classification": Classification(),
    "image_classification": ImageClassification(),
    "loglikelihood": Loglikelihood(),
    "generation": Generation(),
    "perplexity": Perplexity(),
    "lm_eval": LmEval(),
}
