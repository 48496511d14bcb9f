"""The records every part of evaluation exchanges: the items and tasks scored, and what a task scored.

Per-item outcomes travel with every score so that base and tuned can be compared pair by pair.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Aggregate = Literal["mean", "perplexity", "bits_per_byte"]
SpecKind = Literal["multiple_choice", "classification", "loglikelihood", "generation", "perplexity"]
"""The kinds a user task YAML may declare."""
Kind = Literal[SpecKind, "lm_eval", "image_classification"]
"""Also ``lm_eval``: a task of lm-evaluation-harness's library, scored through its own definition; and
``image_classification``: a recipe's validation images, scored by the image classifier's head."""
Text = str | list[int]


@dataclass
class Doc:
    """One item, formatted for the scorer (text, or token ids when it comes from a recipe's own data)."""

    context: Text = ""
    choices: list[Text] = field(default_factory=list)
    """Continuations scored after ``context``; the single target for ``loglikelihood`` tasks."""
    gold: int = 0
    contexts: list[Text] | None = None
    """Partial evaluation (WinoGrande): one context per option, each scored on the one continuation in ``choices``."""
    target: str = ""
    """Generation: the reference answer."""
    text: str = ""
    """Perplexity: the text that is scored."""
    raw: str | None = None
    """Perplexity: the text words and bytes are counted on (lm-evaluation-harness counts before detokenizing)."""
    ref: int | None = None
    """lm-eval tasks: the document's index in lm-eval's evaluation split."""

    def pairs(self) -> list[tuple[Text, Text]]:
        """(context, continuation) per option."""
        if self.contexts is not None:
            return [(c, self.choices[0]) for c in self.contexts]
        return [(self.context, c) for c in self.choices]

    def hash(self) -> str:
        """A short content hash, so two reports can be checked to have scored the same items."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class AnswerFilter:
    """lm-evaluation-harness's ``regex`` filter then ``take_first``: the part of a generation that is scored."""

    name: str
    pattern: str
    select: int = 0
    """Which match is the answer: 0 the first, -1 the last (lm-eval's ``group_select``)."""
    fallback: str = "[invalid]"

    def extract(self, text: str) -> str:
        """The chosen match (its first non-empty group when the pattern has groups), stripped; else the fallback."""
        matches = re.findall(self.pattern, text)
        if not matches:
            return self.fallback
        match = matches[self.select]
        if isinstance(match, tuple):
            match = next((m for m in match if m), self.fallback)
        return match.strip()


@dataclass(frozen=True)
class Answer:
    """How a generation task scores its outputs as lm-eval does: each filter's answer, exact-matched to the reference."""

    filters: tuple[AnswerFilter, ...]
    """Each yields ``exact_match,<name>`` (lm-eval's name for a filtered metric); list lm-eval's first filter first."""
    ignore: tuple[str, ...] = ()
    """Regexes removed from answer and reference before comparing (lm-eval's ``regexes_to_ignore``)."""
    ignore_case: bool = False


@dataclass
class Task:
    name: str
    kind: Kind
    load: Callable[[], list[Doc]]
    """All items, in the source's original order (WikiText's articles: shortest first, ``tasks.wikitext_articles``)."""
    metric: str
    """The primary metric, whose per-item outcomes go into the result."""
    delimiter: str = " "
    """Put between a text context and each text continuation (lm-evaluation-harness's ``target_delimiter``)."""
    labels: list[str] | None = None
    """Classification: the label names, in class-index order."""
    until: list[str] = field(default_factory=lambda: ["\n"])
    max_new_tokens: int = 32
    answer: Answer | None = None
    """Generation: exact match of extracted answers (lm-eval's filters); without it, of the whole output."""
    limit: int | None = None
    """Items a suite takes from this task by default (the first ones)."""
    norm: bool = True
    """Also report ``acc_norm`` (multiple choice); off where the options are fixed words such as no/yes."""
    max_length: int = 512
    """A classification head's input is cut to this many tokens: a recipe's own task sets training's data.max_length."""
    source: str = ""
    external: Any = None
    """lm-eval tasks: lm-eval's task object and run options (``lm_eval_bridge.LmEvalTask``)."""

    def docs(self, limit: int | None = None) -> list[Doc]:
        """The first ``limit`` items (and at most the suite's own limit) in :attr:`load`'s order."""
        docs = self.load()
        caps = [n for n in (limit, self.limit) if n is not None]
        return docs[: min(caps)] if caps else docs


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
    setup: str = ""
    """How the task was run where it has options (lm-eval tasks: version, shots, chat template)."""
    config: str = ""
    """A hash of how the task was scored, its items aside (``cache.task_config``); empty in older results."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TaskResult:
        return cls(**data)


def aggregate(per_item: list[float], weights: list[float] | None, how: Aggregate) -> float:
    """The metric value from per-item outcomes (the verdicts' tests work on the same per-item terms)."""
    if how == "mean":
        return sum(per_item) / max(len(per_item), 1)
    total = sum(weights or [])
    nll = sum(per_item) / max(total, 1e-12)
    return math.exp(nll) if how == "perplexity" else nll / math.log(2)
