"""Layer-wise freezing and gradual unfreezing of adapter weights.

Lower layers hold the most general features; training only the top adapters first (and unfreezing
downwards over time) is a cheap guard against forgetting (ULMFiT's gradual unfreezing).
"""

from __future__ import annotations

import re

import torch

_LAYER = re.compile(r"\.(?:layers|layer|h|blocks)\.(\d+)\.")


def layer_index(name: str) -> int | None:
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


def num_layers(model: torch.nn.Module) -> int:
    indices = [i for n, _ in model.named_parameters() if (i := layer_index(n)) is not None]
    return max(indices) + 1 if indices else 0


def frozen_floor(step: int, freeze_below: int, unfreeze_every: int) -> int:
    """Layers with index < the returned value keep their adapters frozen at this step."""
    if unfreeze_every <= 0:
        return freeze_below
    return max(freeze_below - step // unfreeze_every, 0)


def set_trainable_layers(trainable: dict[str, torch.nn.Parameter], floor: int) -> int:
    """Freeze the adapter weights of layers below ``floor``; return how many tensors train."""
    count = 0
    for name, p in trainable.items():
        idx = layer_index(name)
        p.requires_grad_(idx is None or idx >= floor)
        count += p.requires_grad
    return count
