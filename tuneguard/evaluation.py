"""The evaluation stage of a run: guards, base vs tuned on the task and the general suite, report.

"Base" and "tuned" are the same loaded (quantized) weights, scored with the adapter disabled and
enabled, so the comparison isolates what the adapter changed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel

from tuneguard.adapters.methods import load_adapter
from tuneguard.backbones import Backbone, dequantized, load_backbone
from tuneguard.data.prepare import Prepared, prepare_data
from tuneguard.errors import TuneguardError
from tuneguard.eval.compare import check_budget, compare_quantization, compare_results
from tuneguard.eval.guards import enforce, frozen_checksum, run_guards
from tuneguard.eval.harness import evaluate_tasks, general_text_loss
from tuneguard.eval.records import TaskResult
from tuneguard.eval.tasks import Doc, Task, classification_task_from_items, get_tasks
from tuneguard.io import atomic_write_json
from tuneguard.progress import console, quiet_libraries
from tuneguard.recipe import QuantizationConfig, Recipe, load_recipe
from tuneguard.report.files import build_report, write_reports
from tuneguard.report.history import record_run
from tuneguard.report.terminal import print_report
from tuneguard.rundir import RunDir


def recipe_task(recipe: Recipe, data: Prepared, is_encoder: bool) -> Task | None:
    """The recipe's own validation data as a task (decoders: verbalized labels; encoders: the head)."""
    name = f"{recipe.output.name or 'task'} (validation)"
    if recipe.data.kind != "classification" or not data.val_items:
        return None
    if is_encoder:
        docs = [Doc(context=item.prompt, gold=item.gold) for item in data.val_items]
        return Task(name, "classification", lambda: docs, "acc", labels=list(data.verbalizers))
    return classification_task_from_items(name, data.val_items, data.verbalizers)


def _score(model: torch.nn.Module, backbone: Backbone, tasks: list[Task], recipe: Recipe, adapter_id: str | None,
           accelerator: Any, limit: int | None, label: str) -> tuple[list[TaskResult], float | None]:
    results = evaluate_tasks(model, backbone.tokenizer, tasks, limit=limit, batch_size=recipe.eval.batch_size,
                             fingerprint=backbone.fingerprint, adapter_id=adapter_id, accelerator=accelerator,
                             label=label)
    loss = None if backbone.is_encoder else general_text_loss(model, backbone.tokenizer)
    return results, loss


def evaluate_run(
    recipe: Recipe, run_dir: Path, model: PeftModel, backbone: Backbone, data: Prepared, *, checksum_at_load: float,
    accelerator: Any = None, suites: list[str] | None = None, limit: int | None = None, with_original: bool = False,
) -> int:
    """Score base and tuned, write eval.json and the reports, print the table; exit code (1 = budget exceeded)."""
    started = time.time()
    main_process = accelerator is None or accelerator.is_main_process
    adapter_meta = run_dir / "adapter" / "tuneguard.json"
    adapter_fp = json.loads(adapter_meta.read_text()).get("fingerprint") if adapter_meta.exists() else None
    model.eval()
    guards = run_guards(model, backbone.tokenizer, fingerprint=backbone.fingerprint, adapter_fingerprint=adapter_fp,
                        diverged=RunDir(run_dir).record().get("diverged"),
                        checksum_at_load=checksum_at_load)
    enforce(guards)

    general = get_tasks(suites if suites is not None else recipe.eval.suites)
    own = recipe_task(recipe, data, backbone.is_encoder) if recipe.eval.task else None
    tasks = ([own] if own else []) + ([] if backbone.is_encoder else general)
    if not tasks:
        raise TuneguardError("nothing to evaluate: set eval.task or eval.suites in the recipe")
    limit = limit or recipe.eval.limit
    with dequantized(model) as held:
        if held and main_process:
            console.print(f"4-bit weights decoded once for evaluation ({held / 2**20:.0f} MB)")
        with model.disable_adapter():
            base, base_loss = _score(model, backbone, tasks, recipe, None, accelerator, limit, "base")
        tuned, tuned_loss = _score(model, backbone, tasks, recipe, str(run_dir / "adapter"), accelerator, limit, "tuned")
    original = _score_original(recipe, general, accelerator, limit) if with_original and general else None
    if not main_process:
        return 0

    general_names = {t.name for t in general}
    eval_data = {
        "base": [r.to_dict() for r in base],
        "tuned": [r.to_dict() for r in tuned],
        "original": [r.to_dict() for r in original] if original else None,
        "general_text_loss": {"base": base_loss, "tuned": tuned_loss} if base_loss is not None else None,
        "guards": [g.to_dict() for g in guards],
        "seconds": round(time.time() - started, 1),
    }
    atomic_write_json(run_dir / "eval.json", eval_data)
    margin, correction = recipe.eval.margin, recipe.eval.correction
    comparisons = compare_results(base, tuned, general_tasks=general_names, n_boot=recipe.eval.bootstrap,
                                  seed=recipe.train.seed, margin=margin, correction=correction)
    original_cmp = (compare_quantization(original, base, general_tasks=general_names, n_boot=recipe.eval.bootstrap,
                                         margin=margin, correction=correction) if original else None)
    report = build_report(run_dir, eval_data, comparisons, original_cmp)
    write_reports(run_dir, report)
    print_report(report, console)
    record_run(run_dir, report)
    console.print(f"evaluation took {eval_data['seconds']:.0f} s; reports in {run_dir}/report.{{md,html,json}}")
    check_budget(comparisons, recipe.eval.max_regression)
    return 0


def _score_original(recipe: Recipe, tasks: list[Task], accelerator: Any, limit: int | None) -> list[TaskResult]:
    """The unquantized backbone on the general tasks, so quantization's own cost shows separately."""
    backbone = load_backbone(recipe.model, QuantizationConfig(method="none"))
    results, _ = _score(backbone.model, backbone, tasks, recipe, None, accelerator, limit, "original")
    del backbone
    return results


def evaluate_after_training(recipe: Recipe, run_dir: Path, result: dict[str, Any]) -> int:
    return evaluate_run(recipe, run_dir, result["model"], result["backbone"], result["data"],
                        checksum_at_load=result["checksum_at_load"], accelerator=result["accelerator"])


def reevaluate(run_dir: Path, *, suites: list[str] | None, limit: int | None, with_original: bool) -> int:
    """``tuneguard eval RUN``: reload the backbone and the saved adapter, and evaluate again."""
    quiet_libraries()
    RunDir(run_dir).ensure_finished(writable=True)
    recipe = load_recipe(run_dir / "recipe.yaml")
    labels = recipe.data.labels
    backbone = load_backbone(recipe.model, recipe.quantization, num_labels=len(labels) if labels else None)
    checksum = frozen_checksum(backbone.model)
    model = load_adapter(backbone.model, run_dir / "adapter")
    data = prepare_data(recipe.data, backbone.tokenizer, is_encoder=backbone.is_encoder, seed=recipe.train.seed,
                        packable=recipe.adapter.method != "prompt_tuning")
    from accelerate import Accelerator

    # Under torchrun / accelerate launch with several processes, items are split and gathered.
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    model.to(accelerator.device)
    return evaluate_run(recipe, run_dir, model, backbone, data, checksum_at_load=checksum, accelerator=accelerator,
                        suites=suites, limit=limit, with_original=with_original)
