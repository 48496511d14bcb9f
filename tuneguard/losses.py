"""Training losses that return (summed loss, number of targets).

Summed, not averaged: the train loop divides by the targets of the whole accumulation window (and
of every process), so the gradient is the true per-token mean however the tokens fall in batches.

The causal-LM loss only projects hidden states to the vocabulary where there is a target, in
chunks, so the full fp32 ``batch x seq x vocab`` logits are never materialized (49k-entry vocabularies
make them the largest tensor of a small model's step).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft import PeftModel
from torch.utils.checkpoint import checkpoint

from tuneguard.data.examples import IGNORE

CHUNK = 1024


def _chunk_ce(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight).float()
    return F.cross_entropy(logits, targets, reduction="sum")


def chunked_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of cross-entropy over rows of ``hidden`` (N x d) against ``targets`` (N), chunk by chunk.

    Each chunk's logits are recomputed in backward (checkpointing), so at most one chunk of logits
    is alive at a time.
    """
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], CHUNK):
        h, t = hidden[start : start + CHUNK], targets[start : start + CHUNK]
        if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            total = total + checkpoint(_chunk_ce, h, weight, t, use_reentrant=False)
        else:
            total = total + _chunk_ce(h, weight, t)
    return total


def decoder_parts(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Linear] | None:
    """The transformer body and LM head inside a (PEFT-wrapped) causal LM; None for prompt learning.

    LoRA-family adapters are injected into the body's layers, so running the body directly keeps
    them active; prompt tuning prepends virtual tokens in PeftModel.forward and must go through it.
    """
    if isinstance(model, PeftModel):
        if model.active_peft_config.is_prompt_learning:
            return None
        model = model.get_base_model()
    body, head = getattr(model, "model", None), getattr(model, "lm_head", None)
    if not isinstance(body, torch.nn.Module) or not isinstance(head, torch.nn.Linear):
        return None
    return body, head


class CausalLMLoss(torch.nn.Module):
    """Wraps the model so the whole loss runs inside ``forward`` (and so inside DDP/FSDP's forward)."""

    def __init__(self, model: torch.nn.Module, fast: bool = True) -> None:
        super().__init__()
        self.model = model
        self.parts = decoder_parts(model) if fast else None

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        targets = labels[:, 1:]
        keep = targets != IGNORE
        n = keep.sum()
        if self.parts is None:
            # Prompt tuning: PeftModel prepends virtual tokens (rows are unpacked and right-padded,
            # so plain causal attention is exact) and returns their logits too; drop them.
            out = self.model(input_ids=input_ids, use_cache=False)
            logits = out.logits[:, -input_ids.shape[1] : -1][keep].float()
            return F.cross_entropy(logits, targets[keep], reduction="sum"), n
        body, head = self.parts
        hidden = body(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
        return chunked_lm_loss(hidden[:, :-1][keep], head.weight, targets[keep]), n


class ClassificationLoss(torch.nn.Module):
    """Sequence-classification head loss (encoders)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        n = torch.tensor(labels.numel(), device=labels.device)
        return F.cross_entropy(logits.float(), labels, reduction="sum"), n
