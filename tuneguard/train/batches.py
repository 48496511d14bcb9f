"""The order training sees its rows in: seeded per epoch, dealt across processes, resumable mid-epoch."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from typing import Any

import torch

from tuneguard.data.images import ImageExample
from tuneguard.data.packing import collate, collate_classification, padded_width
from tuneguard.data.prepare import Prepared
from tuneguard.recipe import Recipe


def planned_steps(recipe: Recipe, n_rows: int, n_processes: int) -> tuple[int, int]:
    """(optimizer steps in total, micro-batches per epoch per process); ``max_steps`` overrides epochs. An epoch's
    last step takes the micro-batches left (:func:`step_windows`), so epochs x its steps."""
    per_epoch = math.ceil(n_rows / (recipe.train.batch_size * n_processes))
    steps = recipe.train.max_steps or math.ceil(recipe.train.epochs * math.ceil(per_epoch / recipe.train.grad_accum))
    return steps, per_epoch


def epoch_batches(n_rows: int, batch_size: int, seed: int, epoch: int, rank: int, world: int) -> list[list[int]]:
    """This process's micro-batches of one epoch: a seeded shuffle, so a resumed run sees the same order."""
    order = list(range(n_rows))
    random.Random(seed * 1000 + epoch).shuffle(order)
    batches = [order[i : i + batch_size] for i in range(0, n_rows, batch_size)]
    while len(batches) % world:
        batches.append(batches[len(batches) % world - world])
    return batches[rank::world]


PAD_MULTIPLE = 64
"""Decoder batches are padded to a multiple of this many tokens. Batches of every width from the data's
lengths leave glibc's heap with freed blocks a little too small for the next, wider batch: with packed
rows of 297-512 tokens, ``recipes/sst2-qlora.yaml`` grew from 1.95 to 2.44 GB over 12 micro-batches,
and stayed at 2.09 GB with widths in steps of 64 (tokens/s unchanged within noise)."""


def _collate(rows: list[Any], pad_id: int | None, epoch: int | None = None) -> dict[str, torch.Tensor]:
    """Decoder rows carry position ids (packing); encoder rows are single examples with a label; images carry
    their pipeline, which augments them when ``epoch`` is given (training batches only)."""
    if isinstance(rows[0], ImageExample):
        return rows[0].pipeline.batch(rows, epoch)
    if hasattr(rows[0], "position_ids"):
        return collate(rows, pad_id, PAD_MULTIPLE)
    return collate_classification(rows, pad_id)


def widest_batch(rows: list[Any]) -> int | None:
    """Tokens per row in the widest batch :func:`_collate` builds from these rows (the longest row, a
    decoder's rounded up to :data:`PAD_MULTIPLE`); None for images."""
    longest = max((len(r.input_ids) for r in rows if hasattr(r, "input_ids")), default=None)
    if longest is None or not hasattr(rows[0], "position_ids"):
        return longest
    return padded_width(longest, PAD_MULTIPLE)


def masked_batches(rows: list[Any]) -> bool:
    """Whether decoder batches of these rows may carry restarting ``position_ids``, for which transformers builds a
    4-D attention mask: a row with several documents, or one narrower than the widest batch (it is padded
    unless every row of its batch has its width). False only when every batch is exactly full single documents."""
    width = widest_batch(rows)
    return any(hasattr(r, "position_ids") and (len(r.input_ids) != width or r.position_ids.count(0) > 1) for r in rows)


def _size(row: Any) -> int:
    """What a row counts for in ``tokens``: its tokens, or 1 for an image."""
    return 1 if isinstance(row, ImageExample) else len(row.input_ids)


def step_indices(n_rows: int, recipe: Recipe, rank: int, world: int,
                 start: int = 0) -> Iterator[tuple[int, list[list[int]]]]:
    """Each optimizer step's micro-batches of row indices, with their epoch, from step number ``start``: up to
    ``train.grad_accum`` micro-batches that never reach into the next epoch (an epoch's last step takes what is
    left), so ``train.epochs`` trains every row that many times."""
    accum = recipe.train.grad_accum
    per_epoch = len(epoch_batches(n_rows, recipe.train.batch_size, 0, 0, rank, world))
    steps_per_epoch = math.ceil(per_epoch / accum)
    epoch, window = divmod(start, steps_per_epoch)
    while True:
        batches = epoch_batches(n_rows, recipe.train.batch_size, recipe.train.seed, epoch, rank, world)
        for w in range(window, steps_per_epoch):
            yield epoch, batches[w * accum:(w + 1) * accum]
        epoch, window = epoch + 1, 0


def step_windows(data: Prepared, recipe: Recipe, rank: int, world: int, pad_id: int | None,
                 start: int = 0) -> Iterator[list[tuple[dict[str, torch.Tensor], int]]]:
    """An endless stream of optimizer steps (:func:`step_indices`), each its micro-batches collated, with their
    real tokens; the step's loss is the mean over its own targets."""
    rows = data.train
    for epoch, step in step_indices(len(rows), recipe, rank, world, start):
        chosen = [[rows[i] for i in idx] for idx in step]
        yield [(_collate(c, pad_id, epoch), sum(_size(r) for r in c)) for c in chosen]


def eval_batches(rows: list[Any], batch_size: int, pad_id: int | None) -> Iterator[dict[str, torch.Tensor]]:
    for i in range(0, len(rows), batch_size):
        yield _collate(rows[i : i + batch_size], pad_id)


def target_count(batch: dict[str, torch.Tensor]) -> int:
    """Predicted positions of a decoder batch (labels after the shift), or examples of a classifier batch."""
    return int((batch["labels"][:, 1:] != -100).sum()) if "position_ids" in batch else len(batch["labels"])
