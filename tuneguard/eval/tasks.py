"""Tasks are data plus a few declared fields, formatted like lm-evaluation-harness's tasks.

A task says what kind of scoring it needs and how each item becomes text; how each kind is scored
and which metrics it yields is declared once per kind (``kinds.py``: ``multiple_choice``,
``classification``, ``loglikelihood``, ``generation``, ``perplexity``). Built-in tasks read the subsets
vendored in ``eval/data`` (see its README for sources and licences) and are lm-eval's tasks of the same
names with lm-eval's default shots (zero, GSM8K five), checked item by item against lm-eval's own
definitions (``tests/test_lm_eval_agreement.py``); users add their own as a small YAML file plus data,
without code (:func:`load_task_yaml`).
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tuneguard.data.examples import ChoiceItem, format_prompt
from tuneguard.data.readers import read_rows
from tuneguard.errors import TuneguardError
from tuneguard.eval.records import Answer, AnswerFilter, Doc, SpecKind, Task
from tuneguard.io import read_yaml

DATA_DIR = Path(__file__).parent / "data"


def _kind_metrics(kind: str) -> tuple[str, ...]:
    """The metrics a kind yields, its default first (imported here: ``kinds.py`` pulls in torch for scoring)."""
    from tuneguard.eval.kinds import KINDS

    return KINDS[kind].metrics


def vendored_rows(name: str) -> list[dict[str, Any]]:
    """The rows of a vendored JSONL file in ``eval/data``, in order."""
    with (DATA_DIR / name).open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _arc(name: str) -> Callable[[], list[Doc]]:
    def load() -> list[Doc]:
        return [
            Doc(
                context=f"Question: {row['question']}\nAnswer:",
                choices=list(row["choices"]["text"]),
                # Some answer keys are digits ("1"-"4"): look the key up among the item's own labels.
                gold=row["choices"]["label"].index(row["answerKey"]),
            )
            for row in vendored_rows(name)
        ]

    return load


def hellaswag_parts(ctx: str) -> tuple[str, str, str]:
    """``(activity_label, ctx_a, ctx_b)`` of a vendored HellaSwag context ``"activity: ctx_a ctx_b"``.

    lm-evaluation-harness's query is ``activity_label + ": " + ctx_a + " " + ctx_b.capitalize()``, but
    the vendored text keeps ``ctx_b`` as the dataset has it: the lower-case start of the last sentence
    (ActivityNet items). It is recovered as the fragment after the last ". " when that fragment starts
    with a lower-case letter, as every vendored item does. Otherwise ``ctx_b`` is empty and the text is
    scored as it is: no ". " (one sentence, so ``ctx_a`` and ``ctx_b`` cannot be told apart), or a
    fragment that starts upper case (an empty ``ctx_b``, as WikiHow items mostly have; the end of
    ``ctx_a`` cannot be told from a capitalized ``ctx_b``). A ``ctx_b`` that itself holds ". ", or that
    follows a sentence ending in "?" or "!", is missed the same way.
    """
    label, _, body = ctx.partition(": ")
    cut = body.rfind(". ")
    if cut < 0 or not body[cut + 2 : cut + 3].islower():
        return label, body, ""
    return label, body[: cut + 1], body[cut + 2 :]


def _hellaswag() -> list[Doc]:
    docs = []
    for row in vendored_rows("hellaswag.jsonl"):
        # The vendored text is already pre-processed as lm-evaluation-harness does, except ctx_b's capital.
        label, ctx_a, ctx_b = hellaswag_parts(row["ctx"])
        context = f"{label}: {ctx_a} {ctx_b.capitalize()}" if ctx_b else row["ctx"]
        docs.append(Doc(context=context, choices=list(row["endings"]), gold=int(row["label"])))
    return docs


def _piqa() -> list[Doc]:
    return [
        Doc(context=f"Question: {row['goal']}\nAnswer:", choices=[row["sol1"], row["sol2"]], gold=int(row["label"]))
        for row in vendored_rows("piqa.jsonl")
    ]


def _winogrande() -> list[Doc]:
    docs = []
    for row in vendored_rows("winogrande.jsonl"):
        blank = row["sentence"].index("_")
        docs.append(
            Doc(
                contexts=[row["sentence"][:blank] + row["option1"], row["sentence"][:blank] + row["option2"]],
                choices=[row["sentence"][blank + 1 :].strip()],
                gold=int(row["answer"]) - 1,
            )
        )
    return docs


def _boolq() -> list[Doc]:
    return [
        Doc(
            context=f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:",
            choices=["no", "yes"],
            gold=int(str(row["label"]).lower() == "true"),
        )
        for row in vendored_rows("boolq.jsonl")
    ]


def _lambada() -> list[Doc]:
    docs = []
    for row in vendored_rows("lambada_openai.jsonl"):
        context, word = row["text"].rsplit(" ", 1)
        docs.append(Doc(context=context, choices=[word]))
    return docs


GSM8K_ANSWER = Answer(
    filters=(
        AnswerFilter("strict-match", r"#### (\-?[0-9\.\,]+)"),
        AnswerFilter("flexible-extract", r"(-?[$0-9.,]{2,})|(-?[0-9]+)", select=-1),
    ),
    ignore=(",", r"\$", "(?s).*#### ", r"\.$"),
    ignore_case=True,
)
"""lm-evaluation-harness's ``gsm8k`` filters (the final ``#### N``, or the last number) and exact-match rules."""


def _gsm8k_prompt(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def _gsm8k() -> list[Doc]:
    # lm-eval's gsm8k is 5-shot from the train split; here the same five (the split's first) precede every
    # question, as lm-eval's "first_n" sampler puts them, so each item's prompt is fixed (eval/data/README.md).
    shots = "".join(f"{_gsm8k_prompt(row['question'])} {row['answer']}\n\n" for row in vendored_rows("gsm8k_train.jsonl"))
    return [Doc(context=shots + _gsm8k_prompt(row["question"]), target=row["answer"]) for row in vendored_rows("gsm8k.jsonl")]


def wikitext_detokenize(text: str) -> str:
    """Undo WikiText's tokenisation (`` @-@ ``, spaced punctuation and brackets), the rules lm-evaluation-harness applies."""
    for old, new in (("s '", "s'"), (" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), (" : ", ": "), (" ; ", "; "),
                     (" . ", ". "), (" ! ", "! "), (" ? ", "? "), (" , ", ", ")):
        text = text.replace(old, new)
    text = re.sub(r"/' [0-9]/", r"/'[0-9]/", text)
    for open_, close in (("(", ")"), ("[", "]"), ("{", "}"), ('"', '"'), ("'", "'")):
        o, c = re.escape(open_), re.escape(close)
        text = re.sub(rf"{o}\s*([^{c}]*?)\s*{c}", rf"{open_}\1{close}", text)
    for old, new in (("= = = =", "===="), ("= = =", "==="), ("= =", "=="), (" \N{DEGREE SIGN} ", "\N{DEGREE SIGN}"),
                     (" \n", "\n"), ("\n ", "\n"), (" N ", " 1 "), (" 's", "'s")):
        text = text.replace(old, new)
    return text


def wikitext_pages(text: str) -> list[str]:
    """Split WikiText into articles at top-level ``= Title =`` headings (lm-evaluation-harness's document level)."""
    pages, lines = [], []
    for line in text.split("\n"):
        heading = line.replace("= = =", "===").replace("= =", "==").strip()
        if heading.startswith("= ") and heading.endswith(" ="):
            if "\n".join(lines).strip():
                pages.append("\n".join(lines))
            lines = []
        lines.append(line)
    if "\n".join(lines).strip():
        pages.append("\n".join(lines))
    return pages


def wikitext_text() -> str:
    """The vendored WikiText-2 sample (26 articles of the test split, tokenised v1; eval/data/README.md)."""
    return (DATA_DIR / "wikitext2.txt").read_text(encoding="utf-8")


def wikitext_articles() -> list[str]:
    """The vendored articles, shortest first: a suite's first n are the n cheapest to score, so general-small can
    take enough of them for its paired test to reach a verdict (it needs 9 under Holm) at 28% of the tokens."""
    return sorted(wikitext_pages(wikitext_text()), key=len)


def _wikitext() -> list[Doc]:
    return [Doc(text=wikitext_detokenize(page), raw=page) for page in wikitext_articles()]


def _builtin() -> dict[str, Task]:
    return {
        t.name: t
        for t in (
            Task("arc_easy", "multiple_choice", _arc("arc_easy.jsonl"), "acc_norm", source="arc_easy.jsonl"),
            Task("arc_challenge", "multiple_choice", _arc("arc_challenge.jsonl"), "acc_norm", source="arc_challenge.jsonl"),
            Task("hellaswag", "multiple_choice", _hellaswag, "acc_norm", source="hellaswag.jsonl"),
            Task("piqa", "multiple_choice", _piqa, "acc_norm", source="piqa.jsonl"),
            Task("winogrande", "multiple_choice", _winogrande, "acc", source="winogrande.jsonl"),
            Task("boolq", "multiple_choice", _boolq, "acc", source="boolq.jsonl", norm=False),
            Task("lambada_openai", "loglikelihood", _lambada, "acc", source="lambada_openai.jsonl"),
            Task("wikitext", "perplexity", _wikitext, "perplexity", source="wikitext2.txt"),
            Task("gsm8k", "generation", _gsm8k, "exact_match,strict-match", until=["Question:", "</s>", "<|im_end|>"],
                 max_new_tokens=256, answer=GSM8K_ANSWER, source="gsm8k.jsonl"),
        )
    }


TASKS = _builtin()
SUITES: dict[str, dict[str, int | None]] = {
    # Sized so base + tuned take about six minutes with SmolLM2-135M on a 2-core CPU (eval/data/README.md).
    # GSM8K generates up to 256 tokens after a 5-shot prompt (about 3 s an item there): 8 items, one
    # generation batch, say whether the fine-tune broke the worked-answer format, not a small regression.
    "general-small": {
        "arc_easy": 250, "arc_challenge": 250, "hellaswag": 250, "piqa": 250, "winogrande": 250, "boolq": 150,
        "lambada_openai": 250, "wikitext": 16, "gsm8k": 8,
    },
    # Every vendored item (GSM8K's 100 take about five minutes per model on that CPU).
    "general": dict.fromkeys(TASKS),
    # The quickstart's: knowledge, commonsense, coreference and language modelling in about three minutes
    # for base + tuned on a 2-core CPU without native bf16; too few items to rule out small regressions.
    "general-tiny": {"arc_easy": 80, "hellaswag": 80, "piqa": 80, "winogrande": 80, "lambada_openai": 80},
}


def classification_task_from_items(name: str, items: Sequence[ChoiceItem], verbalizers: Sequence[str]) -> Task:
    """A recipe's own validation items (already tokenized, chat template included) as a classification task."""
    docs = [Doc(context=list(it.context_ids), choices=[list(c) for c in it.choices], gold=it.gold) for it in items]
    return Task(name, "classification", lambda: docs, "acc", delimiter="", labels=list(verbalizers))


class TaskSpec(BaseModel):
    """A user task file: where the data is and how a row becomes a context, options and an answer."""

    model_config = ConfigDict(extra="forbid")

    name: str
    kind: SpecKind
    data: str
    """The data file (JSONL, CSV, TSV or Parquet), relative to the YAML file."""
    format: Literal["auto", "jsonl", "csv", "tsv", "parquet"] = "auto"
    context: str = ""
    """Template of the context, with the row's fields as ``{name}``."""
    choices: list[str] | None = None
    """Fixed options (classification labels, or the same options for every item)."""
    choices_field: str | None = None
    """The field holding each row's own list of options."""
    gold_field: str | None = None
    """The field with the right option: its index, or its text."""
    target_field: str | None = None
    """Generation: the reference answer; loglikelihood: the continuation to score."""
    text_field: str = "text"
    """Perplexity: the field with the text."""
    delimiter: str = " "
    metric: str | None = None
    until: list[str] = Field(default_factory=lambda: ["\n"])
    max_new_tokens: int = Field(32, ge=1)
    limit: int | None = Field(None, ge=1)

    @field_validator("choices", mode="before")
    @classmethod
    def _choices_as_written(cls, choices: Any) -> Any:
        if isinstance(choices, list) and any(isinstance(c, bool) for c in choices):
            raise ValueError(f"YAML read 'choices' {choices} as booleans; quote them (\"yes\", \"no\") to keep the words")
        return choices

    @model_validator(mode="after")
    def _check(self) -> TaskSpec:
        if self.kind in ("multiple_choice", "classification"):
            if (self.choices is None) == (self.choices_field is None):
                raise ValueError("give exactly one of 'choices' and 'choices_field'")
            if self.choices is not None and len(self.choices) < 2:
                raise ValueError("'choices' needs at least two options (one is always right)")
            if self.kind == "classification" and self.choices is None:
                raise ValueError("'choices' (the label verbalizers) is required for kind 'classification'")
            if not self.gold_field:
                raise ValueError(f"'gold_field' is required for kind '{self.kind}'")
        if self.kind in ("generation", "loglikelihood") and not self.target_field:
            raise ValueError(f"'target_field' is required for kind '{self.kind}'")
        allowed = _kind_metrics(self.kind)
        if self.metric is not None and self.metric not in allowed:
            raise ValueError(f"'metric' must be one of {', '.join(allowed)} for kind '{self.kind}', got '{self.metric}'")
        return self


def _spec_error(path: Path, exc: ValidationError) -> TuneguardError:
    err = exc.errors()[0]
    key = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        close = difflib.get_close_matches(key, list(TaskSpec.model_fields), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return TuneguardError(f"{path}: unknown key '{key}'{hint}")
    if err["type"] == "missing":
        return TuneguardError(f"{path}: missing required key '{key}'")
    if err["type"] == "value_error":
        return TuneguardError(f"{path}: {err['msg'].removeprefix('Value error, ')}")
    return TuneguardError(f"{path}: '{key}': {err['msg']} (got {err.get('input')!r})")


def _gold(value: Any, options: Sequence[str], where: str, key: str) -> int:
    """The option's text wins over reading the value as an index, so options "1", "2" work as labels."""
    text = str(value).strip()
    if text in options:
        return list(options).index(text)
    if isinstance(value, bool) or not re.fullmatch(r"-?\d+", text):
        raise TuneguardError(f"{where}: '{key}' value {value!r} is neither one of the options {list(options)} nor an index")
    index = int(text)
    if not 0 <= index < len(options):
        raise TuneguardError(f"{where}: '{key}' index {index} is out of range for {len(options)} options")
    return index


def _field(fields: dict[str, Any], key: str, where: str) -> Any:
    if key not in fields or fields[key] is None:
        raise TuneguardError(f"{where}: missing field '{key}'")
    return fields[key]


def _spec_doc(spec: TaskSpec, fields: dict[str, Any], where: str) -> Doc:
    try:
        context = format_prompt(spec.context, fields) if spec.context else ""
    except KeyError as exc:
        raise TuneguardError(f"{where}: 'context' uses field {exc} that the row lacks") from None
    if spec.kind in ("multiple_choice", "classification"):
        options = spec.choices
        if options is None:
            options = _field(fields, spec.choices_field or "", where)
            if not isinstance(options, list) or len(options) < 2:
                raise TuneguardError(f"{where}: '{spec.choices_field}' must be a list of at least two options")
            options = [str(o) for o in options]
        gold = _gold(_field(fields, spec.gold_field or "", where), options, where, spec.gold_field or "")
        return Doc(context=context, choices=list(options), gold=gold)
    if spec.kind == "loglikelihood":
        return Doc(context=context, choices=[str(_field(fields, spec.target_field or "", where))])
    if spec.kind == "generation":
        return Doc(context=context, target=str(_field(fields, spec.target_field or "", where)))
    text = str(_field(fields, spec.text_field, where))
    return Doc(text=text, raw=text)


def load_task_yaml(path: str | Path) -> Task:
    """A task from a YAML file; problems name the file and the key (or the data file and line)."""
    path = Path(path)
    if not path.is_file():
        raise TuneguardError(f"task file not found: {path}")
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise TuneguardError(f"{path}: a task file must be a YAML mapping, got {type(data).__name__}")
    try:
        spec = TaskSpec.model_validate(data)
    except ValidationError as exc:
        raise _spec_error(path, exc) from None
    data_path = Path(spec.data).expanduser()
    if not data_path.is_absolute():
        data_path = path.parent / data_path
    if not data_path.is_file():
        raise TuneguardError(f"{path}: 'data': file not found: {spec.data} (looked in {data_path.parent})")

    def load() -> list[Doc]:
        docs = []
        for row in read_rows(data_path, spec.format):
            if row.problem:
                raise TuneguardError(f"{row.where}: {row.problem}")
            docs.append(_spec_doc(spec, row.fields or {}, row.where))
        return docs

    return Task(
        spec.name, spec.kind, load, spec.metric or _kind_metrics(spec.kind)[0], delimiter=spec.delimiter,
        labels=list(spec.choices) if spec.kind == "classification" and spec.choices else None,
        until=list(spec.until), max_new_tokens=spec.max_new_tokens, limit=spec.limit, source=str(data_path),
    )
