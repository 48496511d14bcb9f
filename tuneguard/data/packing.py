"""Sequence packing and batching without cross-document attention.

Each packed row holds whole documents back to back; ``position_ids`` restart at 0 for every
document. With no ``attention_mask``, transformers derives a block-diagonal causal mask from
those position ids, so a token never attends to another document, exactly as if each document had
been run alone. The first token of each document is never a target (alone, it has no context).
Batch padding becomes one more "document" whose labels are ignored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tuneguard.data.examples import IGNORE, Example


@dataclass
class Packed:
    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]

    @property
    def n_targets(self) -> int:
        return sum(t != IGNORE for t in self.labels[1:])


def _as_document(ex: Example) -> tuple[list[int], list[int], list[int]]:
    labels = [IGNORE, *ex.labels[1:]]
    return ex.input_ids, labels, list(range(len(ex.input_ids)))


def pack(examples: list[Example], max_length: int, enabled: bool = True) -> list[Packed]:
    """Greedy packing in the given order: a row is closed when the next document would not fit."""
    rows: list[Packed] = []
    current = Packed([], [], [])
    for ex in examples:
        ids, labels, pos = _as_document(ex)
        if current.input_ids and (not enabled or len(current.input_ids) + len(ids) > max_length):
            rows.append(current)
            current = Packed([], [], [])
        current.input_ids += ids
        current.labels += labels
        current.position_ids += pos
    if current.input_ids:
        rows.append(current)
    return rows


def padded_width(longest: int, multiple: int) -> int:
    """``longest`` rounded up to a multiple of ``multiple``: how wide a batch with that longest row is built."""
    return -(-longest // multiple) * multiple


def collate(rows: list[Packed], pad_id: int, multiple: int = 1) -> dict[str, torch.Tensor]:
    """Right-pad rows to the longest, rounded up to ``multiple``; padding is its own segment (positions from 0,
    no targets) after every real token, so causal attention never lets a real token see it."""
    width = padded_width(max(len(r.input_ids) for r in rows), multiple)
    ids, labels, pos = [], [], []
    for r in rows:
        extra = width - len(r.input_ids)
        ids.append(r.input_ids + [pad_id] * extra)
        labels.append(r.labels + [IGNORE] * extra)
        pos.append(r.position_ids + list(range(extra)))
    return {
        "input_ids": torch.tensor(ids, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
        "position_ids": torch.tensor(pos, dtype=torch.long),
    }


def collate_classification(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Encoder batches: padded ids with an attention mask, and class labels."""
    width = max(len(e.input_ids) for e in examples)
    ids = [e.input_ids + [pad_id] * (width - len(e.input_ids)) for e in examples]
    mask = [[1] * len(e.input_ids) + [0] * (width - len(e.input_ids)) for e in examples]
    return {
        "input_ids": torch.tensor(ids, dtype=torch.long),
        "attention_mask": torch.tensor(mask, dtype=torch.long),
        "labels": torch.tensor([e.label for e in examples], dtype=torch.long),
    }
