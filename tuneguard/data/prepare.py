"""The data stage of a run: read, split, validate, tokenize, mix in replay data, pack."""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from tuneguard.backbones import ImageSpec
from tuneguard.data.examples import (
    MAX_NAMED_PROBLEMS,
    ChoiceItem,
    Example,
    Problems,
    build_examples,
    label_index,
)
from tuneguard.data.folds import fold_split
from tuneguard.data.images import ImageExample, ImageItems, ImagePipeline, build_images, image_rows
from tuneguard.data.packing import Packed, pack
from tuneguard.data.readers import Row, read_rows
from tuneguard.errors import TuneguardError
from tuneguard.recipe import FORMATS, DataConfig, template_fields

# General text that none of the evaluation tasks measure (see replay/README.md).
BUNDLED_REPLAY = {"wiki": Path(__file__).resolve().parent / "replay" / "wiki_passages.jsonl"}


@dataclass
class Prepared:
    train: list[Packed] | list[Example] | list[ImageExample]
    """Packed rows for decoders; single examples (with class labels) for encoder classifiers; decoded images."""
    val: list[Packed] | list[Example] | list[ImageExample]
    val_items: list[ChoiceItem]
    """Classification: one scoring item per validation row (context + verbalized labels, and the prompt)."""
    val_examples: list[Example]
    verbalizers: list[str]
    stats: dict[str, Any] = field(default_factory=dict)
    images: ImageItems | None = None
    """Image classification: the validation images, for the recipe's own task."""


def split_rows(rows: list[Row], cfg: DataConfig, seed: int) -> tuple[list[Row], list[Row]]:
    """A seeded split of the training file when no validation file is given."""
    if cfg.validation:
        return rows, data_rows(cfg.validation, cfg)
    if cfg.val_fraction == 0:
        return rows, []
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(rows) * cfg.val_fraction))
    val_idx = set(order[:n_val])
    return [r for i, r in enumerate(rows) if i not in val_idx], [r for i, r in enumerate(rows) if i in val_idx]


def sample_rows(rows: list[Row], n: int | None, seed: int) -> list[Row]:
    """A seeded sample of ``n`` rows in file order (all of them when there are not more)."""
    if n is None or n >= len(rows):
        return rows
    return [rows[i] for i in sorted(random.Random(seed).sample(range(len(rows)), n))]


def data_rows(path: str, cfg: DataConfig) -> list[Row]:
    """The rows of a data file, or for images of a class-folder tree or a table of image paths."""
    if cfg.kind == "image_classification":
        return image_rows(path, cfg)
    return read_rows(path, cfg.format, header=cfg.header, columns=cfg.columns)


def read_split(cfg: DataConfig, seed: int) -> tuple[list[Row], list[Row]]:
    """The training and validation rows of a run, before tokenizing (cheap: ``tuneguard cv`` checks every fold
    with it before a model loads). Under ``data.folds`` the sample of ``max_train_samples`` is drawn before
    folding, so the folds cover the sample and each trains on (k-1)/k of it."""
    rows = data_rows(cfg.train, cfg)
    if cfg.folds is not None:
        return fold_split(sample_rows(rows, cfg.max_train_samples, seed), cfg, seed)
    train_rows, val_rows = split_rows(rows, cfg, seed)
    # A validation file's first N rows (lm-eval's --limit); rows held out of the training file are a seeded sample
    # of them, as file order there may be sorted by label.
    val_rows = val_rows[: cfg.max_val_samples] if cfg.validation else sample_rows(val_rows, cfg.max_val_samples, seed + 2)
    return sample_rows(train_rows, cfg.max_train_samples, seed), val_rows


def _input_fields(cfg: DataConfig) -> set[str] | None:
    """The fields a classification prompt reads (its template's ``{name}`` s, or the text field), so an ``id`` or
    ``source`` column in one file and not the other does not hide a repeated row; None: every field but the label."""
    if cfg.kind != "classification":
        return None
    return set(template_fields(cfg.template))  # the text field alone where no template is set


def normalized_key(row: Row, cfg: DataConfig) -> str | None:
    """A hash of the row's inputs (what the prompt reads; every field but the label for other kinds) with case,
    spacing and punctuation removed; for an image, of its resolved path (an ``id`` column must not hide it)."""
    if row.fields is None:
        return None
    if cfg.kind == "image_classification":  # the image itself: its file, however the path is spelled
        image = row.fields.get(cfg.image_field)
        return hashlib.sha1(str(Path(image).resolve()).encode()).hexdigest() if isinstance(image, str) else None
    inputs = _input_fields(cfg)
    parts = [str(v) for k, v in sorted(row.fields.items())
             if (k in inputs if inputs is not None else k != cfg.label_field) and v is not None]
    text = re.sub(r"[\W_]+", " ", " ".join(parts).lower()).strip()
    return hashlib.sha1(text.encode()).hexdigest() if text else None


def overlapping_rows(train: list[Row], val: list[Row], cfg: DataConfig) -> list[str]:
    """``where`` of each validation row whose normalized inputs also occur in training."""
    seen = {normalized_key(r, cfg) for r in train} - {None}
    return [r.where for r in val if normalized_key(r, cfg) in seen]


def checked_overlap(train: list[Row], val: list[Row], cfg: DataConfig) -> list[str]:
    """:func:`overlapping_rows`, refused unless ``data.allow_overlap``: validation would measure memory."""
    overlap = overlapping_rows(train, val, cfg)
    if overlap and not cfg.allow_overlap:
        raise TuneguardError(
            f"{len(overlap)} of {len(val)} validation rows also occur in the training rows (same text after "
            f"normalizing case, spacing and punctuation), so validation would measure memory; first: "
            f"{'; '.join(overlap[:MAX_NAMED_PROBLEMS])}. Remove them, or set data.allow_overlap: true"
        )
    return overlap


def replay_rows(cfg: DataConfig, n_train: int, seed: int) -> list[Row]:
    """General text mixed into training (``replay_fraction`` of the mix) to keep what the model knew."""
    if not cfg.replay or cfg.replay_fraction == 0:
        return []
    source = cfg.replay
    if source.startswith("bundled:"):
        name = source.removeprefix("bundled:")
        if name not in BUNDLED_REPLAY:
            raise TuneguardError(f"data.replay: unknown bundled replay set '{name}'; choose {sorted(BUNDLED_REPLAY)}")
        source = str(BUNDLED_REPLAY[name])
    path = Path(source)
    if path.suffix.lower() in FORMATS:  # a table with a 'text' column; any other file is text, a passage per line
        table = read_rows(path)
        if bad := next((r for r in table if r.problem), None):
            raise TuneguardError(f"data.replay: {bad.where}: {bad.problem} (a replay table is read whole: JSON Lines, "
                                 "one object per line, or CSV, TSV, Parquet)")
        rows = [r for r in table if r.fields and str(r.fields.get("text", "")).strip()]
    else:  # plain text, one passage per line
        try:
            lines = path.read_text(encoding="utf-8-sig").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise TuneguardError(f"data.replay: {path}: unreadable as UTF-8 text ({exc})") from None
        rows = [Row(f"{path}:{i}", {"text": line}) for i, line in enumerate(lines, 1) if line.strip()]
    if not rows:
        raise TuneguardError(f"data.replay: {path} holds no text to replay (plain text: one passage per line; "
                             "a table: a 'text' column)")
    want = round(n_train * cfg.replay_fraction / (1 - cfg.replay_fraction))
    rng = random.Random(seed + 1)
    return [rows[rng.randrange(len(rows))] for _ in range(want)]


def prepare_images(cfg: DataConfig, spec: ImageSpec, seed: int) -> Prepared:
    """Image classification: decoded training and validation images (augmented later, per training batch)."""
    train_rows, val_rows = read_split(cfg, seed)
    bad_train, bad_val = Problems(), Problems()
    pipeline = ImagePipeline(spec, cfg, seed)
    train = build_images(train_rows, cfg, pipeline, "training", bad_train)
    val = build_images(val_rows, cfg, pipeline, "validation", bad_val)
    overlap = checked_overlap(train_rows, val_rows, cfg)
    random.Random(seed + 3).shuffle(train)
    stats = {
        "train_rows": len(train_rows), "val_rows": len(val_rows), "train_examples": len(train),
        "image_size": cfg.image_size, "image_augment": list(cfg.image_augment),
        "bad_train_rows": bad_train.total, "bad_val_rows": bad_val.total,
        "bad_rows_named": bad_train.named + bad_val.named, "overlap_val_rows": len(overlap),
    }
    return Prepared(train, val, [], [], label_index(cfg)[1], stats, ImageItems(val))


def prepare_data(
    cfg: DataConfig, tokenizer: PreTrainedTokenizerBase | None, *, is_encoder: bool, seed: int, packable: bool = True,
    image: ImageSpec | None = None,
) -> Prepared:
    """``packable=False`` for adapters that prepend tokens to a row (prompt tuning): one document per row.
    ``image``: the backbone is an image classifier (what its input must look like)."""
    if (image is not None) != (cfg.kind == "image_classification"):
        raise TuneguardError(f"data.kind '{cfg.kind}' does not fit this backbone: "
                             + ("it is an image classifier" if image is not None else
                                "image data needs an image classifier (ResNet, ConvNeXt, ViT, ...)"))
    if image is not None:
        return prepare_images(cfg, image, seed)
    assert tokenizer is not None
    if is_encoder and cfg.kind != "classification":
        raise TuneguardError(f"data.kind '{cfg.kind}' needs a decoder; encoders train classification only")
    if is_encoder and cfg.replay:
        raise TuneguardError("data.replay mixes general text into a language model's training; an encoder's "
                             "classification head has no use for it (drop data.replay and data.replay_fraction)")
    if is_encoder and cfg.system_prompt is not None:
        raise TuneguardError("data.system_prompt goes before a chat model's prompt; an encoder reads the prompt "
                             "template alone (drop it, or put its words in data.prompt_template)")
    train_rows, val_rows = read_split(cfg, seed)
    bad_train, bad_val = Problems(), Problems()
    train_ex, _ = build_examples(train_rows, cfg, tokenizer, is_encoder=is_encoder, what="training", augment_seed=seed,
                                 problems=bad_train)
    val_ex, val_items = build_examples(val_rows, cfg, tokenizer, is_encoder=is_encoder, what="validation",
                                       problems=bad_val)
    if not train_ex:
        raise TuneguardError(f"{cfg.train}: no usable training examples")
    overlap = checked_overlap(train_rows, val_rows, cfg)
    replay = replay_rows(cfg, len(train_ex), seed)
    if replay:
        text_cfg = cfg.model_copy(update={"kind": "text", "text_field": "text"})
        replay_ex, _ = build_examples(replay, text_cfg, tokenizer, is_encoder=False, what="replay")
        train_ex = train_ex + replay_ex
    random.Random(seed + 3).shuffle(train_ex)  # rows were read in file order so problems are named in order
    stats = {
        "train_rows": len(train_rows),
        "val_rows": len(val_rows),
        "replay_examples": len(replay),
        "train_examples": len(train_ex),
        "augmented_examples": sum(e.augmented for e in train_ex),
        "augmented_dropped": bad_train.copies_dropped,
        "truncated_train": sum(e.truncated for e in train_ex),
        "truncated_val": sum(e.truncated for e in val_ex),
        "train_target_tokens": sum(sum(t != -100 for t in e.labels[1:]) for e in train_ex),
        "bad_train_rows": bad_train.total,
        "bad_val_rows": bad_val.total,
        "bad_rows_named": bad_train.named + bad_val.named,
        "overlap_val_rows": len(overlap),
    }
    _, verbalizers = label_index(cfg)
    if is_encoder:
        return Prepared(train_ex, val_ex, val_items, val_ex, verbalizers, stats)
    train_packed = pack(train_ex, cfg.max_length, cfg.pack and packable)
    val_packed = pack(val_ex, cfg.max_length, cfg.pack and packable)
    stats["train_rows_packed"] = len(train_packed)
    return Prepared(train_packed, val_packed, val_items, val_ex, verbalizers, stats)
