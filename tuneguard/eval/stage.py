"""The evaluation stage of a run: guards, then base vs tuned on the task and the general suite.

"Base" and "tuned" are the same loaded (quantized) weights, scored with the adapter disabled and
enabled, so the comparison isolates what the adapter changed. This is where evaluation loads
models (a run's backbone and adapter, or a base model alone); writing and printing the results is
:mod:`tuneguard.run`'s.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from peft import PeftModel
from pydantic import ValidationError

from tuneguard.adapters.registry import load_adapter, method_spec
from tuneguard.adapters.state import frozen_checksum
from tuneguard.backbones import Backbone, dequantized, file_sha256, load_backbone
from tuneguard.data.prepare import Prepared, prepare_data
from tuneguard.errors import TuneguardError
from tuneguard.eval.cache import ScoreCache
from tuneguard.eval.guards import enforce, require_trained_backbone, run_guards
from tuneguard.eval.harness import evaluate_tasks, general_text_loss
from tuneguard.eval.records import Doc, Task, TaskResult
from tuneguard.eval.suites import get_tasks
from tuneguard.eval.tasks import classification_task_from_items
from tuneguard.eval.verdicts import Comparison, compare_quantization, compare_results
from tuneguard.progress import say
from tuneguard.recipe import LmEvalConfig, ModelConfig, QuantizationConfig, Recipe, load_recipe
from tuneguard.rundir import RunDir
from tuneguard.train.loop import TrainResult
from tuneguard.train.probe import fit_probe, swapped_head


def recipe_task(recipe: Recipe, data: Prepared, is_encoder: bool) -> Task | None:
    """The recipe's own validation data as a task (decoders: verbalized labels; encoders and images: the head)."""
    name = f"{recipe.output.name or 'task'} (validation)"
    if data.images is not None and data.images.examples:
        docs = [Doc(context=e.where, gold=e.label, ref=i) for i, e in enumerate(data.images.examples)]
        return Task(name, "image_classification", lambda: docs, "acc", labels=list(data.verbalizers),
                    external=data.images)
    if recipe.data.kind != "classification" or not data.val_items:
        return None
    if is_encoder:
        docs = [Doc(context=item.prompt, gold=item.gold) for item in data.val_items]
        return Task(name, "classification", lambda: docs, "acc", labels=list(data.verbalizers),
                    max_length=recipe.data.max_length)
    return classification_task_from_items(name, data.val_items, data.verbalizers)


def _score(model: torch.nn.Module, backbone: Backbone, tasks: list[Task], recipe: Recipe, adapter_id: str | None,
           accelerator: Any, limit: int | None, label: str,
           cache: ScoreCache | None = None) -> tuple[list[TaskResult], float | None]:
    results = evaluate_tasks(model, backbone.tokenizer, tasks, limit=limit, batch_size=recipe.eval.batch_size,
                             fingerprint=backbone.fingerprint, adapter_id=adapter_id, accelerator=accelerator,
                             label=label, cache=cache)
    loss = None if backbone.is_encoder else general_text_loss(model, backbone.tokenizer)
    return results, loss


@dataclass
class Evaluation:
    """Base vs tuned on the same loaded weights: eval.json's content and the verdicts drawn from it."""

    data: dict[str, Any]
    comparisons: list[Comparison]
    original: list[Comparison] | None
    """The unquantized backbone against the quantized base (``--with-original``), or None."""


def score_run(recipe: Recipe, run_dir: Path, trained: TrainResult, *, suites: list[str] | None = None,
              limit: int | None = None, with_original: bool = False) -> Evaluation | None:
    """Guards, then base and tuned on the recipe's task and the general suite, then the verdicts.

    Every process scores its share of the items; the main process gets the Evaluation, the others None.
    """
    started = time.time()
    model, backbone, accelerator = trained.model, trained.backbone, trained.accelerator
    main_process = accelerator is None or accelerator.is_main_process
    run = RunDir(run_dir)
    model.eval()
    guards = run_guards(model, backbone.tokenizer, fingerprints=(backbone.fingerprint, backbone.first_fingerprint),
                        adapter_fingerprint=run.adapter_fingerprint(), diverged=run.record().get("diverged"),
                        checksum_at_load=trained.checksum_at_load)
    enforce(guards)

    general = get_tasks(suites if suites is not None else recipe.eval.suites, recipe.eval.lm_eval)
    own = recipe_task(recipe, trained.data, backbone.is_encoder) if recipe.eval.task else None
    tasks = ([own] if own else []) + ([] if backbone.is_encoder else general)
    if not tasks:
        raise TuneguardError("nothing to evaluate: set eval.task or eval.suites in the recipe")
    limit = limit or recipe.eval.limit
    cache = ScoreCache(run.scores, backbone.fingerprint, file_sha256(run.adapter_weights))
    with dequantized(model) as held:
        if held and main_process:
            say(f"4-bit weights decoded once for evaluation ({held / 2**20:.0f} MB)")
        with model.disable_adapter():
            base, base_loss = _score(model, backbone, tasks, recipe, None, accelerator, limit, "base", cache)
        tuned, tuned_loss = _score(model, backbone, tasks, recipe, str(run.adapter), accelerator, limit, "tuned", cache)
        probe = (linear_probe(model, backbone, own, trained.data, recipe, limit)
                 if own and backbone.is_encoder and recipe.eval.encoder_baseline == "linear_probe" and main_process
                 else None)
    original = _score_original(recipe, general, accelerator, limit) if with_original and general else None
    if not main_process:
        return None

    general_names = {t.name for t in general}
    chance = None
    if probe is not None:  # the probe is "before"; the untrained head is only chance level
        chance, base = base[0], [probe[0], *base[1:]]
    data = {
        "base": [r.to_dict() for r in base],
        "tuned": [r.to_dict() for r in tuned],
        "original": [r.to_dict() for r in original] if original else None,
        "general_text_loss": {"base": base_loss, "tuned": tuned_loss} if base_loss is not None else None,
        "guards": [g.to_dict() for g in guards],
        "seconds": round(time.time() - started, 1),
    }
    if probe is not None and chance is not None:
        data["baseline"] = probe[1] | {"chance": chance.to_dict()}
    margin, correction = recipe.eval.margin, recipe.eval.correction
    comparisons = compare_results(base, tuned, general_tasks=general_names, n_boot=recipe.eval.bootstrap,
                                  seed=recipe.train.seed, margin=margin, correction=correction)
    original_cmp = (compare_quantization(original, base, general_tasks=general_names, n_boot=recipe.eval.bootstrap,
                                         margin=margin, correction=correction) if original else None)
    return Evaluation(data, comparisons, original_cmp)


def linear_probe(model: torch.nn.Module, backbone: Backbone, task: Task, data: Prepared, recipe: Recipe,
                 limit: int | None) -> tuple[TaskResult, dict[str, Any]]:
    """An encoder's honest "before": its head trained alone on the frozen backbone (:mod:`tuneguard.train.probe`),
    scored by the same engine on the same items as base and tuned, so the pairs compare tuned with the probe."""
    pad_id = None if backbone.tokenizer is None else backbone.tokenizer.pad_token_id  # None: an image backbone
    probe = fit_probe(model, data.train, recipe, pad_id)
    disabled = model.disable_adapter() if isinstance(model, PeftModel) else nullcontext()
    with swapped_head(model, probe.head), disabled:
        result = evaluate_tasks(model, backbone.tokenizer, [task], limit=limit, batch_size=recipe.eval.batch_size,
                                fingerprint=backbone.fingerprint, label="linear probe")[0]
    return result, probe.describe()


@dataclass
class BackboneScore:
    """A backbone before any fine-tune (``tuneguard select``): the recipe's task, the general suite, its size."""

    task: TaskResult
    how: str
    """``zero-shot`` (a decoder's verbalized labels) or ``linear probe`` (an encoder's new head, trained alone)."""
    probe: dict[str, Any] | None
    general: list[TaskResult]
    footprint_bytes: int
    """Parameters and buffers as loaded, at the recipe's quantization."""
    rows: list[str]
    """``file:line`` of each item scored: what pairs candidates whose tokenizers make different items of a row."""


def score_backbone(recipe: Recipe, limit: int | None) -> BackboneScore:
    """The recipe's backbone at its quantization, untuned: a decoder zero-shot on the recipe's validation task and
    on ``eval.suites``; an encoder by a linear probe, since a new head has no zero-shot meaning (and an encoder
    no general suite: it has no language-model head)."""
    backbone = load_backbone(recipe.model, recipe.quantization, num_labels=recipe.data.num_labels)
    model = backbone.model
    data = prepare_data(recipe.data, backbone.tokenizer, is_encoder=backbone.is_encoder, seed=recipe.train.seed)
    task = recipe_task(recipe, data, backbone.is_encoder)
    if task is None:
        raise TuneguardError(f"{recipe.data.validation or recipe.data.train}: no validation rows to score "
                             "(data.validation, data.val_fraction)")
    rows = [item.where for item in data.val_items[:limit]]
    with dequantized(model):
        if backbone.is_encoder:
            result, probe = linear_probe(model, backbone, task, data, recipe, limit)
            return BackboneScore(result, "linear probe", probe, [], model.get_memory_footprint(), rows)
        scored = evaluate_tasks(model, backbone.tokenizer, [task, *get_tasks(recipe.eval.suites, recipe.eval.lm_eval)],
                                limit=limit, batch_size=recipe.eval.batch_size, fingerprint=backbone.fingerprint,
                                label="zero-shot")
    return BackboneScore(scored[0], "zero-shot", None, scored[1:], model.get_memory_footprint(), rows)


def _score_original(recipe: Recipe, tasks: list[Task], accelerator: Any, limit: int | None) -> list[TaskResult]:
    """The unquantized backbone on the general tasks, so quantization's own cost shows separately."""
    backbone = load_backbone(recipe.model, QuantizationConfig(method="none"))
    results, _ = _score(backbone.model, backbone, tasks, recipe, None, accelerator, limit, "original")
    del backbone
    return results


def load_run(run_dir: Path) -> tuple[Recipe, TrainResult]:
    """A finished run's recipe, and its backbone with the saved adapter: what training would have handed over."""
    run = RunDir(run_dir)
    recipe = load_recipe(run.recipe)
    set_seed(recipe.train.seed)  # a classifier's fresh head (its "base") is drawn as training drew it
    backbone = load_backbone(recipe.model, recipe.quantization, num_labels=recipe.data.num_labels)
    require_trained_backbone(run_dir, run.adapter_fingerprint(), (backbone.fingerprint, backbone.first_fingerprint))
    checksum = frozen_checksum(backbone.model)
    model = load_adapter(backbone.model, run.adapter)
    data = prepare_data(recipe.data, backbone.tokenizer, is_encoder=backbone.is_encoder, seed=recipe.train.seed,
                        packable=method_spec(recipe.adapter).packable, image=backbone.image)
    # Under torchrun / accelerate launch with several processes, items are split and gathered.
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    model.to(accelerator.device)
    return recipe, TrainResult(run.record(), model, backbone, data, accelerator, checksum)


def load_scoring_backbone(model_source: str, quant: str, dtype: str = "auto", trust_remote_code: bool = False) -> Backbone:
    """A bare causal LM to score general tasks on (``tuneguard eval --model``, lm-eval's ``pretrained=``, whose
    ``--trust_remote_code`` is passed on)."""
    try:
        quantization = QuantizationConfig(method=quant)  # type: ignore[arg-type]
    except ValidationError:
        raise TuneguardError(f"--quant must be one of none, nf4, fp4, int8; got '{quant}'") from None
    try:
        model = ModelConfig(source=model_source, dtype=dtype, trust_remote_code=trust_remote_code)  # type: ignore[arg-type]
    except ValidationError:
        raise TuneguardError(f"dtype must be one of auto, float32, bfloat16, float16; got '{dtype}'") from None
    backbone = load_backbone(model, quantization)
    if backbone.is_encoder:
        raise TuneguardError(f"'{model_source}' is an encoder: general tasks need a causal language model")
    return backbone


def evaluate_base_model(model_source: str, tasks: list[str], limit: int | None, quant: str,
                        batch_size: int, lm_eval: LmEvalConfig | None = None) -> list[TaskResult]:
    """``tuneguard eval --model``: load a backbone (no adapter) and score tasks or suites on it."""
    resolved = get_tasks(tasks, lm_eval)
    backbone = load_scoring_backbone(model_source, quant)
    with dequantized(backbone.model):
        return evaluate_tasks(
            backbone.model, backbone.tokenizer, resolved, limit=limit, batch_size=batch_size,
            fingerprint=backbone.fingerprint,
        )
