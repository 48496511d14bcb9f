"""lm-evaluation-harness's task library through tuneguard's engine, and tuneguard's model inside lm-eval.

Two directions, one scoring engine:

- :class:`TuneguardLM` answers lm-eval's three request types (``loglikelihood``,
  ``loglikelihood_rolling``, ``generate_until``) with :mod:`tuneguard.eval.scoring` (requests that share a
  context share one forward pass), with the adapter on or off on the same loaded weights.
  ``tuneguard.lm_eval_model`` registers it as lm-eval's model ``tuneguard``.
- :func:`lm_eval_tasks` turns ``lm_eval:NAME`` (a task, group or tag of lm-eval's library) or
  ``lm_eval:path/to/task.yaml`` into tuneguard tasks of kind ``lm_eval``. lm-eval builds the prompts,
  few-shot contexts, filters and per-document metrics; tuneguard pairs those per-document values
  base vs tuned like any native task's.

lm-eval is an optional extra (``tuneguard[lm-eval]``) and this module imports it: import it only
where it is needed (``tuneguard.errors.require_lm_eval`` says what to install when it is missing).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lm_eval
import torch
from lm_eval.api.model import LM
from transformers import PreTrainedTokenizerBase

from tuneguard.errors import TuneguardError
from tuneguard.eval.lm_eval_local import local_task_config, task_manager
from tuneguard.eval.records import Aggregate, Doc, Task, aggregate
from tuneguard.eval.scoring import (
    encode_pair,
    encode_text,
    generate_until,
    loglikelihood,
    max_model_length,
    prefix_token_id,
    rolling_loglikelihood,
)
from tuneguard.hub import use_hub
from tuneguard.io import cache_dir
from tuneguard.progress import Advance
from tuneguard.recipe import LmEvalConfig

PREFIX = "lm_eval:"
LOCAL_BUILDERS = {"json", "csv", "parquet", "text", "arrow", "pandas", "imagefolder", "audiofolder"}
"""``dataset_path`` values that read local files (datasets' packaged builders), not a hub repository."""
VENDORED = "@vendored"
"""``lm_eval:arc_easy@vendored``: lm-eval's definition over the subset tuneguard ships (no hub needed)."""
FEWSHOT_SEED = 1234
"""lm-eval's default ``fewshot_random_seed``, so the same few-shot examples are drawn as by its command line."""


def _switch(value: str) -> bool:
    """``adapter=on|off`` (true/false, 1/0, yes/no): anything else is refused, not read as off."""
    words = {"on": True, "true": True, "1": True, "yes": True, "off": False, "false": False, "0": False, "no": False}
    if str(value).lower() not in words:
        raise TuneguardError(f"--model_args adapter={value}: give on or off")
    return words[str(value).lower()]


class TuneguardLM(LM):
    """An lm-eval model backed by tuneguard's scoring engine, with the adapter on or off on the same weights.

    ``tuneguard.lm_eval_model`` registers a subclass as lm-eval's ``tuneguard`` model, which loads a run
    or a backbone from lm-eval's ``--model_args``.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, *, adapter: str | bool = "on",
                 batch_size: int | str | None = 8, advance: Advance | None = None) -> None:
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self.adapter = adapter if isinstance(adapter, bool) else _switch(adapter)
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8
        self.max_length = max_model_length(model, tokenizer)
        self.advance = advance

    @contextlib.contextmanager
    def _state(self) -> Iterator[None]:
        """The adapter as asked: ``disable_adapter()`` for off, which leaves the weights untouched."""
        if self.adapter or not hasattr(self.model, "disable_adapter"):
            yield
        else:
            with self.model.disable_adapter():
                yield

    def _encode(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        if not continuation:
            raise TuneguardError(f"lm-eval asked for the log-likelihood of an empty continuation after {context[-40:]!r}; "
                                 "the task's answer field is empty for some item")
        # An empty (or whitespace) context starts from the prefix token, unless the continuation begins with it.
        return encode_pair(self.tokenizer, context, continuation) if context.strip() else \
            encode_pair(self.tokenizer, "", context + continuation)

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        encoded = [self._encode(*r.args) for r in requests]
        with self._state():
            scores = loglikelihood(self.model, encoded, self.batch_size, max_length=self.max_length,
                                   advance=self.advance)
        return [(s.logprob, s.is_greedy) for s in scores]

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        # Windows of the model's full context, the first started from the prefix token, as lm-eval's HF model.
        with self._state():
            scores = rolling_loglikelihood(self.model, self.tokenizer, [r.args[0] for r in requests],
                                           batch_size=1, max_length=self.max_length, advance=self.advance)
        return [-s.nll for s in scores]

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        out: list[str] = [""] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(json.dumps(r.args[1], sort_keys=True, default=str), []).append(i)
        for members in groups.values():
            kwargs = dict(requests[members[0]].args[1])
            if kwargs.get("do_sample") or float(kwargs.get("temperature") or 0) > 0:
                raise TuneguardError("generate_until: tuneguard's model decodes greedily; the task asks for sampling "
                                     f"({ {k: kwargs[k] for k in ('do_sample', 'temperature') if k in kwargs} })")
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            eos = self.tokenizer.decode([self.tokenizer.eos_token_id]) if self.tokenizer.eos_token_id is not None else None
            if eos and eos not in until:
                until.append(eos)
            max_new = int(kwargs.get("max_gen_toks", 256))
            keep = max(self.max_length - max_new, 1)
            contexts = [encode_text(self.tokenizer, requests[i].args[0])[-keep:] or [prefix_token_id(self.tokenizer)]
                        for i in members]
            with self._state():
                texts = generate_until(self.model, self.tokenizer, contexts, until, max_new_tokens=max_new,
                                       batch_size=self.batch_size, advance=self.advance)
            for i, text in zip(members, texts, strict=True):
                out[i] = text
        return out

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.name_or_path).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tokenizer.chat_template if chat_template is not False else None

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """As lm-eval's HF model: a template that refuses a system turn (a task's description, the system
        instruction) gets the history without it."""
        from jinja2 import TemplateError

        def render(history: list[dict[str, str]]) -> str:
            return self.tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=add_generation_prompt,
                                                      continue_final_message=not add_generation_prompt)

        try:
            return render(chat_history)
        except TemplateError:
            if not any(m["role"] == "system" for m in chat_history):
                raise
            return render([m for m in chat_history if m["role"] != "system"])

    def set_cache_hook(self, cache_hook: Any) -> None:
        # lm-eval's --use_cache keys a response by the request alone, not by the model or adapter
        # (EleutherAI/lm-evaluation-harness#2715): one adapter would be handed another's scores.
        if getattr(cache_hook, "dbdict", None) is not None:
            raise TuneguardError("--use_cache: lm-eval's response cache ignores which model and adapter answered, so "
                                 "it could return another adapter's scores; run without it (tuneguard caches task "
                                 "results keyed by backbone, adapter and adapter state)")
        super().set_cache_hook(cache_hook)


@dataclass
class LmEvalTask:
    """What a tuneguard task of kind ``lm_eval`` carries: lm-eval's task object, how it is run, and how its
    per-document values become tuneguard's per-item outcomes."""

    task: Any
    options: LmEvalConfig
    metric_keys: list[str] = field(default_factory=list)
    """Metric keys (``metric`` or ``metric,filter``) tuneguard can aggregate and pair; lm-eval's first one first."""

    def chat(self, tokenizer: PreTrainedTokenizerBase) -> bool:
        """The chat template is applied when asked, or by default where the backbone has one (instruct models)."""
        if self.options.apply_chat_template is not None:
            return self.options.apply_chat_template
        return bool(getattr(tokenizer, "chat_template", None))

    def setup(self, tokenizer: PreTrainedTokenizerBase) -> str:
        """How the task was run, for the report: lm-eval's version, shots, chat template, system instruction."""
        shots = self.task.get_config("num_fewshot") or 0
        scored = " from the scored split" if shots and shots_from_scored_split(self.task) else ""
        parts = [f"lm-eval {lm_eval.__version__}", f"{shots}-shot{scored}"]
        if self.chat(tokenizer):
            parts.append("chat template" + (", multi-turn few-shot" if shots and self.options.fewshot_as_multiturn else ""))
        if self.options.system_instruction:
            parts.append(f"system: {self.options.system_instruction!r}")
        return " · ".join(parts)

    def higher_is_better(self, key: str) -> bool:
        """lm-eval's own declaration for the metric (a perplexity is better lower)."""
        return bool(self.task.higher_is_better()[_metric(key)])

    def config_hash(self) -> str:
        """What the task's scores depend on besides the model: its config, shots, chat settings, lm-eval's version."""
        payload = json.dumps([self.task.dump_config(), self.options.model_dump(), lm_eval.__version__], sort_keys=True,
                             default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def score(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, docs: Sequence[Doc], batch_size: int,
              advance: Advance | None = None) -> list[dict[str, Any]]:
        """lm-eval's per-document metric values for ``docs``, answered by :class:`TuneguardLM` (adapter as the caller set it)."""
        from lm_eval.evaluator import evaluate

        lm = TuneguardLM(model, tokenizer, adapter=True, batch_size=batch_size, advance=advance)
        name = self.task.task_name
        # lm-eval's shot sampler keeps one generator that moves on with every item: reset it, or the tuned model
        # (scored after the base on the same task object) would be shown other shots than the base was.
        self.task.set_fewshot_seed(seed=FEWSHOT_SEED)
        with _quiet():
            results = evaluate(
                lm, {"tasks": {name: self.task}, "groups": {}}, samples={name: [int(d.ref or 0) for d in docs]},
                bootstrap_iters=0, log_samples=True, system_instruction=self.options.system_instruction,
                apply_chat_template=self.chat(tokenizer), fewshot_as_multiturn=self.options.fewshot_as_multiturn,
            )
        by_doc: dict[int, dict[str, Any]] = {}
        for sample in (results or {}).get("samples", {}).get(name, []):
            values = by_doc.setdefault(int(sample["doc_id"]), {})
            for metric in sample["metrics"]:
                value = sample[metric]
                values[metric_key(metric, sample["filter"])] = list(value) if isinstance(value, tuple) else value
        return [by_doc[int(d.ref or 0)] for d in docs]

    def result(self, primary: str, outcomes: Sequence[dict[str, Any]]) -> tuple[list[float], dict[str, Any],
                                                                              list[float] | None, Aggregate]:
        """Every pairable metric from all documents' values; the primary one's per-item outcomes and aggregation."""
        metrics: dict[str, Any] = {}
        found: tuple[list[float], list[float] | None, Aggregate] | None = None
        for key in self.metric_keys:
            per_item, weights, kind = _per_item(_aggregation(self.task, key), [o[key] for o in outcomes])
            metrics[key] = aggregate(per_item, weights, kind)
            if key == primary:
                found = (per_item, weights, kind)
        if found is None:
            raise TuneguardError(f"{PREFIX}{self.task.task_name}: lm-eval returned no '{primary}' values")
        return found[0], metrics, found[1], found[2]


def _with_local_paths(path: Path) -> str | dict[str, Any]:
    """A task YAML whose ``data_files`` are relative is read relative to the YAML, not the working directory."""
    from lm_eval.tasks._yaml_loader import load_yaml

    raw = load_yaml(path, resolve_func=False, recursive=False)
    files = (raw.get("dataset_kwargs") or {}).get("data_files")
    if files is None:
        return str(path)

    def resolve(value: Any) -> Any:
        if isinstance(value, str):
            return value if Path(value).expanduser().is_absolute() else str((path.parent / value).resolve())
        if isinstance(value, list):
            return [resolve(v) for v in value]
        if isinstance(value, dict):
            return {k: resolve(v) for k, v in value.items()}
        return value

    config = load_yaml(path, resolve_func=True, recursive=True)
    config["dataset_kwargs"] = {**config["dataset_kwargs"], "data_files": resolve(files)}
    return config


def _hub_dataset(spec: str) -> tuple[str | None, Path | None]:
    """The hub dataset an lm-eval task (or the first task of a group) reads, and its YAML file."""
    entry = task_manager()._index.get(spec)
    if entry is None:
        return None, None
    cfg = entry.cfg or {}
    dataset = cfg.get("dataset_path")
    return (dataset if dataset and dataset not in LOCAL_BUILDERS and not Path(dataset).exists() else None,
            entry.yaml_path)


def load_error(spec: str, exc: Exception, verb: str = "eval") -> TuneguardError:
    """One line for a task lm-eval could not load; for a dataset on the Hub, how to point it at local files (said
    for ``tuneguard eval``'s ``lm_eval:`` names, or for lm-eval's own command line, ``verb`` "lm-eval")."""
    dataset, yaml_path = _hub_dataset(spec)
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if dataset is None and isinstance(exc, (ConnectionError, OSError)) and "Hub" in first:
        dataset = "its dataset"
    if dataset is not None:
        definition = f" (its definition: {yaml_path})" if yaml_path else ""
        from tuneguard.eval.tasks import TASKS

        name = "pass that YAML's path to --tasks" if verb == "lm-eval" else "name lm_eval:that.yaml"
        where = "tuneguard eval --model M --tasks " if verb == "lm-eval" else ""
        vendored = f"; or use {where}{PREFIX}{spec}{VENDORED}, its definition over tuneguard's vendored subset" \
            if spec in TASKS else ""
        return TuneguardError(
            f"{PREFIX}{spec}: {dataset} lives on the Hugging Face Hub, which could not be reached ({first}); point it "
            f"at local files with a task YAML that includes the task's YAML{definition} and sets dataset_path: json "
            f"and dataset_kwargs: {{data_files: {{test: FILE}}}} (relative to the YAML), then {name}{vendored}")
    return TuneguardError(f"{PREFIX}{spec}: lm-eval could not load the task: {first}")


def _vendored(spec: str) -> dict[str, Any]:
    """``NAME@vendored``: lm-eval's own config of NAME over tuneguard's vendored items (offline)."""
    from tuneguard.eval.tasks import TASKS

    name = spec.removesuffix(VENDORED)
    if name not in TASKS:
        raise TuneguardError(f"{PREFIX}{spec}: tuneguard vendors data for {', '.join(TASKS)} only")
    config = local_task_config(name, cache_dir() / "lm-eval-vendored" / name)
    return {**config, "task": spec}


def _load(spec: str) -> dict[str, Any]:
    """lm-eval's leaf tasks for a name (task, group or tag), ``NAME@vendored`` or a YAML path; one line if it cannot."""
    manager = task_manager()
    target: str | dict[str, Any] = spec
    if spec.endswith(VENDORED):
        target = _vendored(spec)
    elif spec.endswith((".yaml", ".yml")):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise TuneguardError(f"{PREFIX}{spec}: task file not found")
        target = _with_local_paths(path)
    elif spec not in manager._index:
        import difflib

        close = difflib.get_close_matches(spec, manager.all_tasks, n=1)
        hint = f"; did you mean '{PREFIX}{close[0]}'?" if close else ""
        raise TuneguardError(f"{PREFIX}{spec}: not a task, group or tag of lm-eval {lm_eval.__version__}{hint}")
    if not spec.endswith(VENDORED):
        use_hub()  # a task's dataset may live there
    try:
        return manager.load([target])["tasks"]
    except TuneguardError:
        raise
    except Exception as exc:  # datasets / hub / YAML errors: one line naming the task
        raise load_error(spec, exc) from None


def _configure(task: Any, options: LmEvalConfig) -> None:
    """``num_fewshot`` with lm-eval's semantics: a task that pins 0 shots keeps it; unset means 0.

    One change: where lm-eval falls back to the test split for shots, it is named as the few-shot split. lm-eval
    leaves the item being scored out of its own shots only when the few-shot split is named as the test split,
    so in its fallback an item could be shown with its own answer (the same shots otherwise)."""
    configured = task.get_config("num_fewshot")
    if options.num_fewshot is not None and configured != 0:
        task.set_config(key="num_fewshot", value=options.num_fewshot)
    elif configured is None:
        task.set_config(key="num_fewshot", value=0)
    fewshot = task.config.fewshot_config
    if task.get_config("num_fewshot") and fewshot.split is None and task.has_test_docs() and shots_from_scored_split(task):
        fewshot.split = task.config.test_split
    task.set_fewshot_seed(seed=FEWSHOT_SEED)


def shots_from_scored_split(task: Any) -> bool:
    """Whether lm-eval draws the task's few-shot examples from the split it scores: a few-shot split that is it, or,
    with no few-shot split or samples and no training split, its fallback to the validation split, else to the test
    split (logging a warning only), as for a ``NAME@vendored`` task (only the scored items are vendored) or a local
    YAML with one split."""
    config = task.config
    scored = config.test_split if task.has_test_docs() else config.validation_split
    fewshot = config.fewshot_config  # lm-eval's FewshotConfig; its split is the task's fewshot_split
    if fewshot.split is not None:
        return fewshot.split == scored
    if fewshot.samples is not None or task.has_training_docs():
        return False
    return (config.validation_split if task.has_validation_docs() else config.test_split) == scored


def _as_doc(task: Any, index: int, doc: dict[str, Any]) -> Doc:
    """An lm-eval document as a tuneguard Doc: its prompt, options and target (what the item hash covers)."""
    choices = task.doc_to_choice(doc) if task.OUTPUT_TYPE == "multiple_choice" else []
    target = task.doc_to_target(doc)
    return Doc(context=str(task.doc_to_text(doc)), choices=[str(c) for c in choices],
               gold=target if isinstance(target, int) else 0, target=str(target), ref=index)


def load_lm_eval(spec: str, options: LmEvalConfig) -> dict[str, Any]:
    """lm-eval's task objects for ``lm_eval:NAME`` or ``lm_eval:path.yaml``, shots and few-shot seed set."""
    tasks = _load(spec.removeprefix(PREFIX))
    for task in tasks.values():
        _configure(task, options)
    return tasks


def lm_eval_tasks(spec: str, options: LmEvalConfig) -> list[Task]:
    """``lm_eval:NAME`` or ``lm_eval:path.yaml`` as tuneguard tasks (a group gives one task per leaf task)."""
    out = []
    for name, task in load_lm_eval(spec, options).items():
        docs = [_as_doc(task, i, d) for i, d in enumerate(task.eval_docs)]
        keys = _pairable_metrics(task)
        if not keys:
            raise TuneguardError(f"{PREFIX}{name}: none of its metrics is a per-item mean or perplexity, so base and "
                                 "tuned cannot be paired item by item")
        external = LmEvalTask(task, options, keys)
        out.append(Task(f"{PREFIX}{name}", "lm_eval", lambda docs=docs: docs, keys[0], source=spec, external=external))
    return out


PERPLEXITY_AGGREGATIONS = {"perplexity", "weighted_perplexity", "bits_per_byte"}
"""lm-eval's aggregations over log-likelihoods (with their word or byte counts), which tuneguard pairs as NLLs."""


def metric_key(metric: str, flt: str) -> str:
    """lm-eval's ``metric,filter``, shortened to ``metric`` for its default filter ``none``."""
    return metric if flt == "none" else f"{metric},{flt}"


def _metric(key: str) -> str:
    """The metric of a ``metric`` or ``metric,filter`` key."""
    return key.split(",")[0]


def _aggregation(task: Any, key: str) -> str:
    """The name of lm-eval's aggregation for the key's metric (``mean``, ``perplexity``, ...)."""
    how = task.aggregation()[_metric(key)]
    return getattr(how, "__name__", str(how))


def _pairable_metrics(task: Any) -> list[str]:
    """Metric keys whose per-document values tuneguard can aggregate and pair (lm-eval's first one first)."""
    filters = [f.name for f in getattr(task, "_filters", [])] or ["none"]
    return [metric_key(metric, flt) for flt in filters for metric in task.aggregation()
            if _aggregation(task, metric) in {"mean", *PERPLEXITY_AGGREGATIONS}]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """lm-eval logs every step at INFO and draws a tqdm bar per task; tuneguard shows its own progress line."""
    import functools
    import logging
    from unittest import mock

    import lm_eval.api.task
    from tqdm import tqdm

    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with mock.patch.object(lm_eval.api.task, "tqdm", functools.partial(tqdm, disable=True)):
            yield
    finally:
        logger.setLevel(level)


def _per_item(how: str, values: list[Any]) -> tuple[list[float], list[float] | None, Aggregate]:
    """lm-eval's per-document values as tuneguard's per-item outcomes: a mean, or an NLL with its weight."""
    if how == "mean":
        return [float(v) for v in values], None, "mean"
    if how == "perplexity":  # a loglikelihood per document, one unit each
        return [-float(v) for v in values], [1.0] * len(values), "perplexity"
    # weighted_perplexity (word/byte perplexity) and bits_per_byte: (loglikelihood, words or bytes) per document
    per_item = [-float(v[0]) for v in values]
    weights = [float(v[1]) for v in values]
    return per_item, weights, "bits_per_byte" if how == "bits_per_byte" else "perplexity"
