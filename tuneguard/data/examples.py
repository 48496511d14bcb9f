"""Rows -> validated, tokenized training examples for the three task kinds.

* classification: the prompt, then the verbalized label as the answer (decoders), or the text and a
  label index (encoders with a classification head);
* instruction: prompt/response or chat ``messages``, rendered with the model's chat template, loss on
  the assistant's tokens only;
* text: plain causal LM on every token.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import jinja2
from transformers import PreTrainedTokenizerBase

from tuneguard.data.augment import augmented_copies
from tuneguard.data.readers import Row
from tuneguard.errors import TuneguardError
from tuneguard.recipe import DataConfig, template_fields

IGNORE = -100
MAX_NAMED_PROBLEMS = 3


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    """Same length as ``input_ids``; ``-100`` where no loss is taken."""
    label: int | None = None
    """Class index (classification only)."""
    truncated: bool = False
    augmented: bool = False
    """Built from an augmented copy of a training row (``data.augment``)."""


@dataclass
class ChoiceItem:
    """A classification item for scoring: the context and one continuation per label."""

    context_ids: list[int]
    choices: list[list[int]]
    gold: int
    where: str = ""
    prompt: str = ""
    """The formatted prompt text (encoders are scored from text by their classification head)."""


@dataclass
class Problems:
    total: int = 0
    named: list[str] = field(default_factory=list)
    hint: str = ""
    """Said after the rows named, where their problems share one cause."""
    copies_dropped: int = 0
    """Augmented copies that could not be built (their rows train as they are)."""

    def add(self, where: str, why: str) -> None:
        self.total += 1
        if len(self.named) < MAX_NAMED_PROBLEMS:
            self.named.append(f"{where}: {why}")

    def check(self, n_rows: int, max_fraction: float, what: str) -> None:
        if self.total == 0:
            return
        fraction = self.total / max(n_rows, 1)
        if self.total == n_rows or fraction > max_fraction:
            raise TuneguardError(
                f"{self.total} of {n_rows} {what} rows are bad ({fraction:.1%} > data.max_bad_fraction "
                f"{max_fraction:.1%}); first: " + "; ".join(self.named) + (f". {self.hint}" if self.hint else "")
            )


def label_index(cfg: DataConfig) -> tuple[dict[str, int], list[str]]:
    """Map every accepted raw label (index, name, dict key) to its class index; return the verbalizers."""
    labels, verbalizers = cfg.labels or [], cfg.classes
    if isinstance(labels, dict):
        mapping = {str(k): verbalizers.index(v) for k, v in labels.items()}
    else:
        mapping = {str(i): i for i in range(len(labels))}
    for i, v in enumerate(verbalizers):
        mapping.setdefault(v, i)
    return mapping, verbalizers


def _raw_label(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def class_index(fields: dict[str, Any], cfg: DataConfig, mapping: dict[str, int]) -> int:
    """The row's class index (``mapping`` from :func:`label_index`); ValueError naming what is wrong."""
    if cfg.label_field not in fields:
        raise ValueError(f"missing field '{cfg.label_field}'")
    raw = _raw_label(fields[cfg.label_field])
    if raw not in mapping:
        raise ValueError(f"label {raw!r} is not in the label set {sorted(mapping)}")
    return mapping[raw]


def format_prompt(template: str, fields: dict[str, Any]) -> str:
    missing = [n for n in template_fields(template) if n not in fields or fields[n] in (None, "")]
    if missing:
        raise KeyError(missing[0])
    return template.format(**{k: str(v).strip() if isinstance(v, str) else v for k, v in fields.items()})


def has_chat_template(tokenizer: PreTrainedTokenizerBase, cfg: DataConfig) -> bool:
    return cfg.use_chat_template and bool(getattr(tokenizer, "chat_template", None))


def chat_messages(cfg: DataConfig, user: str) -> list[dict[str, str]]:
    system = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
    return [*system, {"role": "user", "content": user}]


def encode_chat(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
    if isinstance(out, dict) or hasattr(out, "input_ids"):
        out = out["input_ids"]
    return list(out)


def encode_context(tokenizer: PreTrainedTokenizerBase, cfg: DataConfig, prompt: str) -> list[int]:
    """The tokens a model sees before it answers: chat-rendered when the model has a template."""
    if has_chat_template(tokenizer, cfg):
        return encode_chat(tokenizer, chat_messages(cfg, prompt), generation_prompt=True)
    prefix = f"{cfg.system_prompt}\n\n" if cfg.system_prompt else ""
    return tokenizer(prefix + prompt + "\n", add_special_tokens=True)["input_ids"]


def answer_end(tokenizer: PreTrainedTokenizerBase, cfg: DataConfig) -> list[int]:
    """Tokens that close an answer, so a tuned model learns to stop."""
    if has_chat_template(tokenizer, cfg):
        probe = encode_chat(tokenizer, [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], False)
        head = encode_chat(tokenizer, [{"role": "user", "content": "x"}], True)
        tail = probe[len(head):]
        y = tokenizer("y", add_special_tokens=False)["input_ids"]
        return tail[len(y):] if tail[: len(y)] == y else [tokenizer.eos_token_id]
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def _truncate(ids: list[int], labels: list[int], max_length: int) -> tuple[list[int], list[int], bool]:
    if len(ids) <= max_length:
        return ids, labels, False
    return ids[:max_length], labels[:max_length], True


def classification_example(
    row: Row, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, mapping: dict[str, int],
    verbalizers: list[str], is_encoder: bool, end: list[int],
) -> tuple[Example, ChoiceItem]:
    fields = row.fields or {}
    label = class_index(fields, cfg, mapping)
    prompt = format_prompt(cfg.template, fields)
    if is_encoder:
        ids = tokenizer(prompt, truncation=True, max_length=cfg.max_length)["input_ids"]
        full = len(tokenizer(prompt)["input_ids"]) if len(ids) == cfg.max_length else len(ids)
        example = Example(ids, [IGNORE] * len(ids), label, truncated=full > cfg.max_length)
        return example, ChoiceItem(ids, [], label, row.where, prompt)
    context = encode_context(tokenizer, cfg, prompt)
    choices = [tokenizer(v, add_special_tokens=False)["input_ids"] for v in verbalizers]
    answer = choices[label] + end
    room = cfg.max_length - max(len(c) for c in choices) - len(end)
    if room < 4:
        raise ValueError(f"data.max_length={cfg.max_length} leaves no room for the prompt before the answer")
    cut = len(context) > room
    context = context[-room:]  # keep the end: the question and the assistant turn's opening
    ids = context + answer
    labels = [IGNORE] * len(context) + answer
    return Example(ids, labels, label, cut), ChoiceItem(context, choices, label, row.where, prompt)


def instruction_messages(row: Row, cfg: DataConfig) -> list[dict[str, str]]:
    fields = row.fields or {}
    if cfg.messages_field in fields:
        messages = fields[cfg.messages_field]
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
            raise ValueError(f"'{cfg.messages_field}' must be a list of {{role, content}} objects")
        for turn, m in enumerate(messages, 1):
            if not isinstance(m["role"], str) or not isinstance(m["content"], str):
                raise ValueError(f"'{cfg.messages_field}' turn {turn}: role and content must be text (content "
                                 f"{type(m['content']).__name__}; content parts and tool calls are not supported)")
        if not any(m["role"] == "assistant" for m in messages):
            raise ValueError(f"'{cfg.messages_field}' has no assistant turn to learn from")
        if cfg.system_prompt and not any(m["role"] == "system" for m in messages):
            messages = [{"role": "system", "content": cfg.system_prompt}, *messages]
        return messages
    if cfg.response_field not in fields or not str(fields[cfg.response_field]).strip():
        raise ValueError(f"missing field '{cfg.response_field}'")
    if cfg.prompt_template is None:  # the prompt field as written (never the text field: Alpaca's holds the answer)
        if cfg.prompt_field not in fields or not str(fields[cfg.prompt_field]).strip():
            raise ValueError(f"missing field '{cfg.prompt_field}' (data.prompt_field; or set data.prompt_template, "
                             f"or give the row a '{cfg.messages_field}' list)")
        prompt = str(fields[cfg.prompt_field]).strip()
    else:
        prompt = format_prompt(cfg.template, fields)
    return [*chat_messages(cfg, prompt), {"role": "assistant", "content": str(fields[cfg.response_field]).strip()}]


def instruction_example(row: Row, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, end: list[int]) -> Example:
    messages = instruction_messages(row, cfg)
    if not has_chat_template(tokenizer, cfg):
        # Plain text: the last assistant turn is the answer, everything before it the prompt (turns after it: none).
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        prompt = "\n".join(m["content"] for m in messages[:last])
        context = encode_context(tokenizer, cfg, prompt) if not cfg.system_prompt else tokenizer(prompt + "\n")["input_ids"]
        answer = tokenizer(messages[last]["content"], add_special_tokens=False)["input_ids"] + end
        ids, labels = context + answer, [IGNORE] * len(context) + answer
    else:
        # Each assistant turn is learned; everything else (system, user, template markup) is context.
        ids, labels = [], []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            head = encode_chat(tokenizer, messages[:i], generation_prompt=True)
            full = encode_chat(tokenizer, messages[: i + 1], generation_prompt=False)
            if full[: len(head)] != head or head[: len(ids)] != ids:
                raise ValueError("the chat template does not render turns as prefixes of each other")
            labels += [IGNORE] * (len(head) - len(ids)) + full[len(head):]
            ids = full
    ids, labels, cut = _truncate(ids, labels, cfg.max_length)
    if all(t == IGNORE for t in labels):
        raise ValueError(f"the prompt fills data.max_length={cfg.max_length}, leaving no response to learn")
    return Example(ids, labels, truncated=cut)


def text_examples(row: Row, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase) -> list[Example]:
    """Long texts are cut into ``max_length`` windows, not truncated: every token is trained on (each window's first
    token only as context, as it has none before it)."""
    fields = row.fields or {}
    text = fields.get(cfg.text_field)
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"missing or empty field '{cfg.text_field}'")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if tokenizer.bos_token_id is not None and getattr(tokenizer, "add_bos_token", False):
        ids = [tokenizer.bos_token_id, *ids]
    return [Example(ids[i : i + cfg.max_length], ids[i : i + cfg.max_length]) for i in range(0, len(ids), cfg.max_length)]


def _row_examples(
    row: Row, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, mapping: dict[str, int], verbalizers: list[str],
    is_encoder: bool, end: list[int],
) -> tuple[list[Example], ChoiceItem | None]:
    if cfg.kind == "classification":
        ex, item = classification_example(row, cfg, tokenizer, mapping, verbalizers, is_encoder, end)
        return [ex], item
    if cfg.kind == "instruction":
        return [instruction_example(row, cfg, tokenizer, end)], None
    return text_examples(row, cfg, tokenizer), None


def build_examples(
    rows: list[Row], cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, *, is_encoder: bool,
    what: str, augment_seed: int | None = None, problems: Problems | None = None,
) -> tuple[list[Example], list[ChoiceItem]]:
    """Validate and tokenize rows; bad rows are counted (into ``problems``) and named, and fail past the
    allowed fraction. With ``augment_seed`` (training rows only), each good row's augmented copies follow it."""
    problems = problems if problems is not None else Problems()
    examples: list[Example] = []
    items: list[ChoiceItem] = []
    mapping, verbalizers = label_index(cfg)
    end = answer_end(tokenizer, cfg)
    for index, row in enumerate(rows):
        if row.problem:
            problems.add(row.where, row.problem)
            continue
        try:
            built, item = _row_examples(row, cfg, tokenizer, mapping, verbalizers, is_encoder, end)
        except KeyError as exc:
            problems.add(row.where, f"missing field {exc}")
        except ValueError as exc:
            problems.add(row.where, str(exc))
        except jinja2.TemplateError as exc:  # the tokenizer's chat template refused the turns (roles, order)
            problems.add(row.where, f"the chat template refused the messages: {exc}")
        else:
            examples.extend(built)
            items.extend([item] if item else [])
            copies = [] if augment_seed is None else augmented_copies(row.fields or {}, cfg, augment_seed, index)
            for copy in copies:  # a copy that cannot be built (an insert past data.max_length) is dropped, not the row
                try:
                    made, _ = _row_examples(Row(row.where, copy.fields), cfg, tokenizer, mapping, verbalizers,
                                            is_encoder, end)
                except (KeyError, ValueError, jinja2.TemplateError):
                    problems.copies_dropped += 1
                    continue
                examples.extend(dataclasses.replace(ex, augmented=True) for ex in made)
    if rows and problems.total == len(rows) and all(": missing field" in n for n in problems.named):
        found = next((sorted(r.fields) for r in rows if r.fields), [])
        problems.hint = (f"The rows' fields are {found}: name them in the recipe (data.text_field, data.label_field, "
                         "...), or, for a CSV/TSV whose first line is data, set data.header: false and data.columns")
    problems.check(len(rows), cfg.max_bad_fraction, what)
    return examples, items
