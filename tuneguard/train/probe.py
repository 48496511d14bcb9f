"""A linear probe: an encoder's classifier head trained alone on the frozen backbone.

An encoder fine-tune starts from a freshly initialised head, so the backbone with the adapter
disabled is a random classifier: chance level, which no user would ship. What a user would otherwise
do is train that same head alone on the frozen backbone, on the same rows, for the same steps, batch
and schedule; that is the honest "before". The backbone is frozen, so what the head receives for a row
is fixed: it is computed once (dropout off, adapter disabled) and the head is fitted on it, which is
exact and takes seconds where a second training run would take minutes.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from peft import PeftModel

from tuneguard.backbones import ENCODER_HEADS
from tuneguard.data.examples import Example
from tuneguard.errors import TuneguardError
from tuneguard.recipe import Recipe
from tuneguard.train.batches import eval_batches, planned_steps, step_indices
from tuneguard.train.loop import make_scheduler

PROBE_LR = 1e-3
"""A usual learning rate for a linear head on standardized features. The probe gets the larger of it and the
recipe's ``train.lr``: a recipe's lr is chosen for an adapter (2e-4 is common for LoRA), at which a head
alone is still far from fitted after the same steps, and an under-trained baseline flatters the adapter."""


@dataclass
class Probe:
    """The fitted head and how it was trained (eval.json's ``baseline``)."""

    head: torch.nn.Module
    steps: int
    batch_size: int
    lr: float
    train_rows: int
    final_loss: float
    seconds: float

    def describe(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "head"} | {"kind": "linear_probe"}


class Standardized(torch.nn.Module):
    """A head behind a fixed standardization of its input (the training rows' mean and spread per feature).

    Usual practice for a linear probe, and what lets one learning rate fit every backbone: all-MiniLM-L6-v2's
    pooled features are about 0.05 in size, so on them as they are a head at lr 1e-3 is still at chance after
    500 steps (64-68% standardized, 49-55% raw, on the quickstart's SST-2 reviews; three seeds each).
    """

    def __init__(self, head: torch.nn.Module, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.head = head
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head((x - self.mean.to(x.dtype)) / self.std.to(x.dtype))


def head_slot(model: torch.nn.Module) -> tuple[torch.nn.Module, str]:
    """(parent, attribute) of the frozen head: PEFT's untouched original under its trained copy, or the head itself."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    for name in ENCODER_HEADS:
        module = getattr(base, name, None)
        if isinstance(module, torch.nn.Module):
            return (module, "original_module") if hasattr(module, "original_module") else (base, name)
    raise TuneguardError(f"linear probe: {type(base).__name__} has no classifier head ({', '.join(ENCODER_HEADS)})")


def frozen_head(model: torch.nn.Module) -> torch.nn.Module:
    parent, name = head_slot(model)
    return getattr(parent, name)


@contextmanager
def swapped_head(model: torch.nn.Module, head: torch.nn.Module) -> Iterator[None]:
    """Score the backbone (adapter disabled) through ``head`` instead of its frozen random one."""
    parent, name = head_slot(model)
    original = getattr(parent, name)
    setattr(parent, name, head)
    try:
        yield
    finally:
        setattr(parent, name, original)


def head_inputs(model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> torch.Tensor:
    """What the frozen head receives for each row, adapter disabled and dropout off, in fp32.

    Heads that take the whole sequence (RoBERTa's, ELECTRA's) read its first token only; that is
    checked on every batch, so only that token is kept.
    """
    head = frozen_head(model)
    device = next(model.parameters()).device
    captured: list[torch.Tensor] = []

    def keep(module: torch.nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
        x = args[0]
        if x.dim() == 3:
            if not torch.allclose(module.forward(x[:, :1]), output, rtol=1e-4, atol=1e-5):  # forward: no hook
                raise TuneguardError("linear probe: this encoder's head reads more than the first token")
            x = x[:, :1]
        captured.append(x.detach().float().cpu())

    handle = head.register_forward_hook(keep)
    was_training = model.training
    model.eval()
    disabled = model.disable_adapter() if isinstance(model, PeftModel) else nullcontext()
    try:
        with torch.no_grad(), disabled:
            for batch in batches:
                model(**{k: v.to(device) for k, v in batch.items() if k != "labels"})  # text or pixel inputs
    finally:
        handle.remove()
        model.train(was_training)
    return torch.cat(captured)


def fit_probe(model: torch.nn.Module, rows: list[Example], recipe: Recipe, pad_id: int | None, *,
              feature_batch: int = 32) -> Probe:
    """A fresh copy of the model's head (initialised under the seed, behind :class:`Standardized`), trained alone
    on the frozen features of ``rows`` with the recipe's budget: its planned steps, batch,
    accumulation, schedule and weight decay, the rows in the order training would see them, at
    ``max(train.lr, PROBE_LR)``."""
    started = time.time()
    rows = [r for r in rows if r.label is not None]  # replay text has no class
    if not rows:
        raise TuneguardError("linear probe: no labelled training rows")
    features = head_inputs(model, eval_batches(rows, feature_batch, pad_id))  # never augmented
    labels = torch.tensor([r.label for r in rows])
    t = recipe.train
    total = planned_steps(recipe, len(rows), 1)[0]
    fresh = copy.deepcopy(frozen_head(model)).float()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(t.seed)
        for module in fresh.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    # Per input feature: a hidden unit of a pooled text vector, a channel of an image backbone's pooled map.
    head = Standardized(fresh, features.mean(0), features.std(0, correction=0).clamp(min=1e-6))
    head.eval().requires_grad_(True)  # eval: dropout off, as the features were taken
    lr = max(t.lr, PROBE_LR)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=t.weight_decay)
    scheduler = make_scheduler(recipe, optimizer, total)
    steps = step_indices(len(rows), recipe, 0, 1)  # training's own order and windows
    loss = torch.tensor(math.nan)
    for _ in range(total):
        idx = torch.tensor([i for micro in next(steps)[1] for i in micro])
        loss = F.cross_entropy(head(features[idx]).float(), labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if t.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(head.parameters(), t.max_grad_norm)
        optimizer.step()
        scheduler.step()
    head.requires_grad_(False)
    like = next(frozen_head(model).parameters())
    return Probe(head.to(device=like.device, dtype=like.dtype), total, t.batch_size * t.grad_accum, lr, len(rows),
                 round(float(loss.detach()), 6), round(time.time() - started, 2))

