"""What a validation inside training measures beyond its loss: the task metric and the general-text loss.

Training judges its checkpoints on these (``train.early_stopping_metric``, ``train.select``), but
train/ computes no metrics and may not import eval/; :mod:`tuneguard.run` hands
:func:`validation_scorer` to the loop, which calls it once the backbone and data are loaded.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from tuneguard.backbones import Backbone
from tuneguard.data.prepare import Prepared
from tuneguard.errors import TuneguardError
from tuneguard.eval.harness import evaluate_tasks, general_text_loss
from tuneguard.eval.stage import recipe_task
from tuneguard.recipe import Recipe

GENERAL_TOKENS = 1024
"""Tokens of the WikiText sample scored at each validation: the first half of the final evaluation's 2,048
(one or two forward passes), enough to see forgetting grow, cheap enough to run every ``eval_every``."""
METRICS = {"accuracy": "acc"}
"""``train.early_stopping_metric`` names whose classification metric is called otherwise."""


def validation_scorer(recipe: Recipe, backbone: Backbone, data: Prepared,
                     accelerator: Any) -> Callable[[torch.nn.Module], dict[str, float]] | None:
    """The recipe's scorer: the task metric on every validation row (``data.max_val_samples`` caps them) when
    ``train.early_stopping_metric`` names one, the general-text loss under ``task_within_forgetting``; None
    when the validation loss alone decides."""
    t = recipe.train
    metric = t.early_stopping_metric
    general = t.select == "task_within_forgetting"
    if general and backbone.is_encoder:
        raise TuneguardError(f"train.select 'task_within_forgetting' measures forgetting on general text, which an "
                             f"encoder classifier cannot score ({recipe.model.source}); use 'best_task'")
    task = None
    if metric != "val_loss":
        task = recipe_task(recipe, data, backbone.is_encoder)
        if task is None:
            raise TuneguardError(f"train.early_stopping_metric '{metric}': the data has no validation rows to score")
    if task is None and not general:
        return None
    name = METRICS.get(metric, metric)

    def scorer(model: torch.nn.Module) -> dict[str, float]:
        out: dict[str, float] = {}
        if task is not None:
            (result,) = evaluate_tasks(model, backbone.tokenizer, [task], batch_size=recipe.eval.batch_size,
                                       accelerator=accelerator, show=False)
            out[f"val_{metric}"] = round(float(result.metrics[name]), 6)
        if general:
            out["general_loss"] = round(general_text_loss(model, backbone.tokenizer, n_tokens=GENERAL_TOKENS), 6)
        return out

    return scorer
