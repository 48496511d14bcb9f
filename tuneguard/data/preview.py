"""Training rows beside their augmented copies, as a run would build them, without loading a model or tokenizer.

The rows come from the same split and sample as training (:func:`read_split`) and the copies from the same seeded
function (:func:`augmented_copies`), so what ``tuneguard data preview`` shows is what a run with that seed trains on.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import Any

import torch

from tuneguard.backbones import ImageSpec
from tuneguard.data.augment import Copy, augmented_copies
from tuneguard.data.examples import Problems, class_index, format_prompt, instruction_messages, label_index
from tuneguard.data.images import ImagePipeline, build_images
from tuneguard.data.prepare import read_split
from tuneguard.data.readers import Row
from tuneguard.errors import TuneguardError
from tuneguard.recipe import DataConfig


@dataclass(frozen=True)
class PreviewRow:
    where: str
    answer: str
    """What the model learns to say: the verbalized label or the response (empty for plain text)."""
    original: str
    copies: list[tuple[str, str]]
    """(operation, text) of each augmented copy, in the prompt's form."""


def rendered(fields: dict[str, Any], cfg: DataConfig) -> tuple[str, str]:
    """(prompt, answer) as text: the prompt template filled in; the chat template's markup, which augmentation never
    touches, is left out. ValueError or KeyError for a row training would count as bad."""
    if cfg.kind == "classification":
        mapping, verbalizers = label_index(cfg)
        return format_prompt(cfg.template, fields), verbalizers[class_index(fields, cfg, mapping)]
    if cfg.kind == "instruction":
        messages = instruction_messages(Row("", fields), cfg)
        return "\n".join(m["content"] for m in messages[:-1]), messages[-1]["content"]
    return str(fields.get(cfg.text_field, "")), ""


def _preview_row(row: Row, copies: list[Copy], cfg: DataConfig) -> PreviewRow | None:
    try:
        prompt, answer = rendered(row.fields or {}, cfg)
        texts = [(c.op, rendered(c.fields, cfg)[0]) for c in copies]
    except (KeyError, ValueError):
        return None
    return PreviewRow(row.where, answer, prompt, texts)


def augmentation_preview(cfg: DataConfig, seed: int, n: int) -> list[PreviewRow]:
    """The first ``n`` training rows (in file order) that get augmented copies, with those copies."""
    if not cfg.augment_ops:
        raise TuneguardError("data.augment is 'none': training rows are used as they are; set it to preview copies, "
                             "e.g. data.augment=[synonym,insert,swap,delete]")
    train_rows, _ = read_split(cfg, seed)
    out: list[PreviewRow] = []
    for index, row in enumerate(train_rows):
        if len(out) == n:
            break
        copies = [] if row.problem else augmented_copies(row.fields or {}, cfg, seed, index)
        shown = _preview_row(row, copies, cfg) if copies else None
        out.extend([shown] if shown else [])
    if not out:
        raise TuneguardError(f"data.text_field: no usable training row has text in the field '{cfg.text_field}', the "
                             "one augmentation changes")
    return out


@dataclass(frozen=True)
class ImagePreview:
    where: str
    answer: str
    images: torch.Tensor
    """(1 + epochs, C, H, W) in [0, 1]: the image as validation sees it, then as each training epoch sees it."""


def _class_turns(rows: list[Row], cfg: DataConfig) -> list[int]:
    """Row indices taking each class in turn (file order within a class): a folder sorted by class would otherwise
    show its first class alone. Rows without a readable label come last."""
    mapping, _ = label_index(cfg)
    by_class: dict[int, list[int]] = {}
    unlabelled = []
    for i, row in enumerate(rows):
        try:
            by_class.setdefault(class_index(row.fields or {}, cfg, mapping), []).append(i)
        except (KeyError, ValueError):
            unlabelled.append(i)
    turns = [i for group in itertools.zip_longest(*by_class.values()) for i in group if i is not None]
    return turns + unlabelled


def image_augmentation_preview(cfg: DataConfig, spec: ImageSpec, seed: int, n: int, epochs: int) -> list[ImagePreview]:
    """``n`` usable training images, taken from each class in turn, beside their augmented copies in epochs 0 to
    ``epochs`` - 1, drawn by the pipeline training uses (so with this seed, exactly what training sees)."""
    if not cfg.image_augment:
        raise TuneguardError("data.image_augment is empty: training images are used as they are; set it to preview "
                             "copies, e.g. data.image_augment=[rotate,scale,color]")
    train_rows, _ = read_split(cfg, seed)
    lenient = cfg.model_copy(update={"max_bad_fraction": 1.0})  # a preview shows the good rows, training counts bad ones
    pipeline = ImagePipeline(spec, cfg, seed)
    examples = [dataclasses.replace(e, index=i) for i in _class_turns(train_rows, cfg)[: n * 4]
                for e in build_images([train_rows[i]], lenient, pipeline, "training", Problems())][:n]
    if not examples:
        raise TuneguardError(f"{cfg.train}: none of the first training rows has a readable image")
    _, verbalizers = label_index(cfg)
    unscaled = ImagePipeline(ImageSpec(spec.channels, (0.0,) * spec.channels, (1.0,) * spec.channels), cfg, seed)
    return [ImagePreview(e.where, verbalizers[e.label], torch.cat(
        [unscaled.batch([e])["pixel_values"], *(unscaled.batch([e], epoch)["pixel_values"] for epoch in range(epochs))]))
        for e in examples]
