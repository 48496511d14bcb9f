"""Merge a trained adapter into its backbone and save a plain Hugging Face model."""

from __future__ import annotations

from pathlib import Path

import torch

from tuneguard.adapters.methods import load_adapter
from tuneguard.backbones import load_backbone
from tuneguard.errors import TuneguardError
from tuneguard.io import atomic_dir
from tuneguard.recipe import QuantizationConfig, Recipe


def export_merged(recipe: Recipe, adapter_dir: Path, out: Path, dtype: str = "float32") -> Path:
    """Load the backbone unquantized, merge the adapter into it, and save weights + tokenizer.

    Merging into 4-bit weights would round the adapter away, so the merge always happens on the
    full-precision backbone, which is what a user deploys.
    """
    model_cfg = recipe.model.model_copy(update={"dtype": dtype})
    backbone = load_backbone(model_cfg, QuantizationConfig(method="none"), num_labels=_num_labels(recipe))
    peft_model = load_adapter(backbone.model, adapter_dir)
    if recipe.adapter.method == "prompt_tuning":
        raise TuneguardError("prompt tuning adds virtual tokens and cannot be merged into the weights")
    merged = peft_model.merge_and_unload()
    with torch.no_grad(), atomic_dir(out) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        backbone.tokenizer.save_pretrained(tmp)
    return out


def _num_labels(recipe: Recipe) -> int | None:
    return len(recipe.data.labels) if recipe.data.labels else None
