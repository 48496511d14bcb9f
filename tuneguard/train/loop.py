"""The training recipe, top to bottom: setup, one optimizer step, validate, checkpoint, finish.

``train`` is the whole loop; each named step below is a function of the :class:`Session` that
``setup`` builds. Every process runs the same code; Accelerate splits the work. Running it with an
evaluation and a report after it is :mod:`tuneguard.run`'s job.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedDataParallelKwargs, DistributedType, set_seed
from peft import PeftModel

from tuneguard.adapters.capabilities import lr_warning
from tuneguard.adapters.freezing import frozen_floor, layer_index, num_layers
from tuneguard.adapters.registry import MethodSpec, apply_adapter, count_parameters, method_spec
from tuneguard.adapters.state import frozen_checksum
from tuneguard.allocator import trim_heap
from tuneguard.backbones import Backbone, check_image_size, check_max_length, load_backbone, path_sha256
from tuneguard.data.prepare import Prepared, prepare_data
from tuneguard.errors import TuneguardError
from tuneguard.io import atomic_dir
from tuneguard.numerics import numerics_record, resolve_mixed_precision
from tuneguard.progress import TrainProgress, quiet_libraries, say
from tuneguard.provenance import git_commit, peak_memory, versions
from tuneguard.recipe import Recipe, dump_recipe, recipe_defaults
from tuneguard.rundir import FINISHED_HINT, Mode, RunDir
from tuneguard.train.batches import (
    eval_batches,
    masked_batches,
    planned_steps,
    step_windows,
    target_count,
    widest_batch,
)
from tuneguard.train.checkpoints import (
    TrainState,
    check_same_run,
    only_trainable_weights,
    read_train_state,
    refuse_unresumable,
    restore_checkpoint,
    save_checkpoint,
    trainable_names,
    use_new_lr,
)
from tuneguard.train.divergence import DivergenceWatch, NonFiniteStep, non_finite
from tuneguard.train.fastpath import prepare_for_training
from tuneguard.train.losses import CausalLMLoss, ClassificationLoss, release_kept
from tuneguard.train.selection import (
    forgetting_pct,
    metric_improves,
    metric_key,
    resolved_rule,
    select_point,
    selection_note,
    selection_record,
)

Scorer = Callable[[torch.nn.Module], dict[str, float]]
"""What a validation measures on the model beyond its loss (the task metric, the general-text loss), by
evaluation's scoring: train/ computes no metrics, so the caller hands it in (tuneguard.eval.validation)."""
ScorerFactory = Callable[[Recipe, Backbone, Prepared, Accelerator], Scorer | None]
"""Builds the run's :data:`Scorer` once the backbone and data are loaded; None when the recipe needs none."""


@dataclass
class TrainResult:
    """What training hands to evaluation: the run record (run.json) and the live objects it scored."""

    record: dict[str, Any]
    model: PeftModel
    backbone: Backbone
    data: Prepared
    accelerator: Accelerator
    checksum_at_load: float
    """The frozen weights' checksum right after loading: the guard that base = the same weights."""


@dataclass
class Session:
    """Everything ``setup`` builds and the steps share."""

    recipe: Recipe
    run_dir: RunDir
    accelerator: Accelerator
    backbone: Backbone
    data: Prepared
    method: MethodSpec
    model: PeftModel
    loss_model: torch.nn.Module
    params: list[torch.nn.Parameter]
    optimizer: Any
    scheduler: Any
    total_steps: int
    trainable: int
    total: int
    checksum_at_load: float
    scorer: Scorer | None = None
    keep_grads: bool = False
    """Gradient buffers live for the whole run, zeroed in place (:func:`keep_grad_buffers`)."""

    @property
    def pad_id(self) -> int | None:
        """None for an image backbone (images are not padded)."""
        return None if self.backbone.tokenizer is None else self.backbone.tokenizer.pad_token_id

    @property
    def lr(self) -> float:
        """``train.lr`` as the next optimizer step applies it (with layer-wise decay: the top layer's rate); read
        from the optimizer, which a resume with a changed rate sets (the scheduler's last rate is the old one)."""
        group = self.optimizer.param_groups[0]
        return group["lr"] / group.get("lr_scale", 1.0)

    def log(self, record: dict[str, Any]) -> None:
        """One metrics.jsonl line (main process) and the trackers (each process, as Accelerate wants)."""
        if self.accelerator.is_main_process:
            self.run_dir.append_metrics(record)
        self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])


# ----------------------------------------------------------------------------------------- setup


def _mixed_precision(recipe: Recipe) -> str:
    """``auto`` by the numerics probe, which times matmuls; on CPU an image backbone's convolutions are another
    matter (a bf16-autocast backward step of the digits ResNet took 27x as long as fp32 on AVX-512), so there
    ``auto`` is fp32."""
    if recipe.train.mixed_precision == "auto" and recipe.data.kind == "image_classification" and not torch.cuda.is_available():
        return "no"
    return resolve_mixed_precision(recipe.train.mixed_precision)


def make_accelerator(recipe: Recipe, run_dir: Path) -> Accelerator:
    precision = _mixed_precision(recipe)
    state = AcceleratorState._shared_state
    if state.get("_mixed_precision", precision) != precision and not torch.distributed.is_initialized():
        # One process training twice (a notebook, a test session): Accelerate would keep the first choice.
        AcceleratorState._reset_state()
    return Accelerator(
        cpu=not torch.cuda.is_available(),  # on CPU, Accelerate runs several processes (torchrun) only when told
        mixed_precision=precision,
        log_with=recipe.train.trackers or None,
        project_dir=str(run_dir),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=recipe.adapter.freeze_layers_below > 0)],
        # The schedule counts optimizer steps of one process (``planned_steps``); Accelerate's default steps the
        # prepared scheduler once per process at each call, which ran N processes' warmup and decay N times faster.
        step_scheduler_with_optimizer=False,
    )


def param_groups(recipe: Recipe, model: torch.nn.Module) -> list[dict[str, Any]]:
    """The trainable parameters as optimizer groups, each with its ``lr_scale`` (of ``train.lr``).

    One group; with ``train.layer_lr_decay`` below 1, one per transformer layer, layer i of L scaled by
    decay**(L-1-i) (the top layer at the full rate), and one for parameters in no layer (a classifier head,
    virtual tokens) at the full rate. The scale stays in the optimizer's state, so a resume with a changed
    ``train.lr`` keeps the ratios (``use_new_lr``), and the schedule multiplies every group alike.
    """
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    decay = recipe.train.layer_lr_decay
    if decay == 1:
        return [{"params": [p for _, p in named], "lr_scale": 1.0}]
    depth = num_layers(model)
    layers: dict[int | None, list[torch.nn.Parameter]] = {}
    for name, p in named:
        layers.setdefault(layer_index(name), []).append(p)
    return [{"params": ps, "layer": i, "lr_scale": 1.0 if i is None else decay ** (depth - 1 - i)}
            for i, ps in sorted(layers.items(), key=lambda item: -1 if item[0] is None else item[0])]


def make_optimizer(recipe: Recipe, groups: list[dict[str, Any]], device: torch.device) -> torch.optim.Optimizer:
    """``adamw`` is torch's fused kernel on CPU and CUDA: one kernel a parameter where torch's CPU default loops
    ~10 ops over each (the bench's 420 LoRA tensors: 5.4 instead of 22 ms a step; the same update within
    fp32 rounding)."""
    t = recipe.train
    groups = [{**g, "lr": t.lr * g["lr_scale"]} for g in groups]
    if t.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=t.lr, weight_decay=t.weight_decay, fused=device.type in ("cpu", "cuda"))
    if device.type != "cuda":
        raise TuneguardError(f"train.optimizer '{t.optimizer}' needs a CUDA GPU (bitsandbytes); use 'adamw' on CPU")
    import bitsandbytes as bnb

    cls = bnb.optim.PagedAdamW8bit if t.optimizer == "paged_adamw_8bit" else bnb.optim.AdamW8bit
    return cls(groups, lr=t.lr, weight_decay=t.weight_decay)


def lr_notes(recipe: Recipe, groups: list[dict[str, Any]], *, warn: bool = True) -> list[str]:
    """What the run's start says about its learning rate: far outside the method's usual range (unless
    ``warn`` is off: the range test sweeps far outside it on purpose), and the layer-wise decay's spread."""
    t = recipe.train
    notes = [f"warning: {w}"] if warn and (w := lr_warning(recipe.adapter.method, t.lr)) else []
    if t.layer_lr_decay < 1:
        layered = [g for g in groups if g.get("layer") is not None]
        if not layered:
            notes.append(f"note: train.layer_lr_decay={t.layer_lr_decay:g} has no effect: no trained adapter weight "
                         "sits in a transformer layer")
        else:
            low = layered[0]
            notes.append(f"note: train.layer_lr_decay={t.layer_lr_decay:g}: layer {low['layer']} trains at "
                         f"{t.lr * low['lr_scale']:.3g}, rising to {t.lr:g} at layer {layered[-1]['layer']}")
    return notes


def make_scheduler(recipe: Recipe, optimizer: torch.optim.Optimizer, total_steps: int,
                   lr_factor: Callable[[int], float] | None = None) -> torch.optim.lr_scheduler.LambdaLR:
    """The recipe's warmup and decay, as a factor on every group's lr; ``lr_factor`` replaces it (the range test)."""
    warmup = min(round(total_steps * recipe.train.warmup_ratio), total_steps - 1)  # the peak is reached, if once
    kind = recipe.train.scheduler

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(total_steps - warmup, 1)
        return max(0.0, 1 - progress) if kind == "linear" else 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor or factor)


def setup(recipe: Recipe, run_dir: RunDir, make_scorer: ScorerFactory | None = None, *,
          lr_factor: Callable[[int], float] | None = None) -> Session:
    """Backbone (frozen, maybe quantized) and data, then the adapter, optimizer and schedule (``lr_factor``
    in place of the recipe's schedule: the learning-rate range test)."""
    accelerator = make_accelerator(recipe, run_dir.path)
    set_seed(recipe.train.seed, deterministic=recipe.train.deterministic)
    backbone = load_backbone(recipe.model, recipe.quantization, num_labels=recipe.data.num_labels,
                             device=accelerator.device)
    check_image_size(backbone, recipe.data.image_size)
    check_max_length(backbone, recipe.data.max_length)
    checksum_at_load = frozen_checksum(backbone.model)
    method = method_spec(recipe.adapter)
    data = prepare_data(recipe.data, backbone.tokenizer, is_encoder=backbone.is_encoder, seed=recipe.train.seed,
                        packable=method.packable, image=backbone.image)
    total_steps, _ = planned_steps(recipe, len(data.train), accelerator.num_processes)
    scorer = make_scorer(recipe, backbone, data, accelerator) if make_scorer else None
    set_seed(recipe.train.seed)
    model = apply_adapter(backbone.model, recipe.adapter, is_encoder=backbone.is_encoder, total_steps=total_steps,
                          image=backbone.image is not None)
    if accelerator.is_main_process:  # only now that the inputs, the adapter's targets included, are known to be good
        run_dir.write_recipe(dump_recipe(recipe))
        for line in data_notes(data.stats):
            say(f"note: {line}")
    # The fast path is built and verified for decoders (on encoders it misbehaves); the bitsandbytes
    # fix that prepare_for_training always applies is needed by both.
    model = prepare_for_training(model, recipe, accelerator.device, enabled=False if backbone.is_encoder else None,
                                 seq=widest_batch(data.train), masked=masked_batches(data.train))
    if recipe.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    trainable, total = count_parameters(model)
    main = accelerator.is_local_main_process
    say(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)", main)
    loss_model = ClassificationLoss(model) if backbone.is_encoder else CausalLMLoss(model)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = param_groups(recipe, model)
    for line in lr_notes(recipe, groups, warn=lr_factor is None):
        say(line, main)
    if unused := recipe.adapter.unused_keys():
        say(f"note: {', '.join(unused)}: not read by adapter.method '{recipe.adapter.method}' (ignored)", main)
    if note := selection_note(recipe.train.select, recipe.train.early_stopping_patience):
        say(note, main)
    optimizer = make_optimizer(recipe, groups, accelerator.device)
    scheduler = make_scheduler(recipe, optimizer, total_steps, lr_factor)
    loss_model, optimizer, scheduler = accelerator.prepare(loss_model, optimizer, scheduler)
    only_trainable_weights(accelerator, loss_model)
    keep_grads = keep_grad_buffers(accelerator, params)
    if accelerator.is_main_process and recipe.train.trackers:
        accelerator.init_trackers(recipe.output.name or "tuneguard", config=_flat(recipe.model_dump(mode="json")))
    return Session(recipe, run_dir, accelerator, backbone, data, method, model, loss_model, params, optimizer,
                   scheduler, total_steps, trainable, total, checksum_at_load, scorer, keep_grads)


def keep_grad_buffers(accelerator: Accelerator, params: list[torch.nn.Parameter]) -> bool:
    """Allocate the trainable weights' gradients now, before any activation, to be zeroed in place for the run.

    Made by each backward and freed by each ``zero_grad`` instead, hundreds of small gradient blocks land in
    the memory the activations just left, and the next micro-batch's activations cannot reuse the space
    around them: sst2-qlora in fp32 (4 micro-batches a step) peaked at 2,800 MB that way, 2,503 MB with
    the buffers kept (glibc's heap on CPU). A trainable weight that gets no gradient in a step is then
    stepped with a zero one instead of skipped; every adapter here gets one for each trainable weight
    (frozen layers are not trainable, and the unfreezing schedule's still-frozen ones are set to None).
    Not under FSDP or multi-GPU DDP, which own their gradient storage.
    """
    if accelerator.distributed_type not in {DistributedType.NO, DistributedType.MULTI_CPU}:
        return False
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    return True


def needs_scorer(recipe: Recipe) -> bool:
    """Whether validations measure more than the loss: a task metric, or forgetting."""
    return recipe.train.early_stopping_metric != "val_loss" or recipe.train.select == "task_within_forgetting"


def run_inputs(s: Session) -> dict[str, str]:
    """What ``TrainState.inputs`` keeps: the backbone's fingerprint and the contents of the recipe's data paths."""
    d = s.recipe.data
    found = {"model.source": s.backbone.fingerprint}
    for key, value in (("data.train", d.train), ("data.validation", d.validation), ("data.replay", d.replay)):
        if value and Path(value).exists():
            found[key] = path_sha256(Path(value))
    return found


def resume(s: Session, checkpoint: Path | None, resume_changed: list[str],
           changed: list[str]) -> tuple[TrainState, dict | None]:
    """The loop's state and best adapter from ``checkpoint``, or a fresh start (``resume_changed``: the keys the
    user named; ``changed``: those that did change since the checkpoint)."""
    processes, inputs = s.accelerator.num_processes, run_inputs(s)
    if checkpoint is None:
        return TrainState(processes=processes, inputs=inputs), None
    check_same_run(checkpoint, read_train_state(checkpoint), processes, inputs, resume_changed, changed,
                   s.total_steps)
    state, best, method_state = restore_checkpoint(s.accelerator, checkpoint, trainable_names(s.loss_model))
    if method_state:
        s.method.restore_step_state(s.model, method_state)
    state.processes, state.inputs = processes, inputs
    if s.accelerator.is_main_process:
        s.run_dir.keep_metrics_through(state.step)  # the resumed run logs the later steps again
    if "train.lr" in resume_changed:
        use_new_lr(s.scheduler, s.recipe.train.lr)
    if "train.early_stopping_patience" in resume_changed:  # stopped under the old patience; judge by the new one
        patience = s.recipe.train.early_stopping_patience
        state.stopped_early = patience is not None and state.evals_without_improvement >= patience
    say(f"resumed from {checkpoint.name}", s.accelerator.is_local_main_process)
    return state, best


# ------------------------------------------------------------------------------------------ steps


def train_step(s: Session, state: TrainState, micro: tuple[dict[str, torch.Tensor], ...],
               tokens: int) -> tuple[float, float, int]:
    """One optimizer step over ``micro`` (gradient accumulation, ``tokens`` real tokens in it here);
    returns (loss, gradient norm, real tokens of the step on all processes).

    The loss is a sum over targets divided by the targets of the whole step on all processes, so
    every micro-batch and process weighs by what it holds; a non-finite loss or gradient stops the
    run before the update.
    """
    acc, t = s.accelerator, s.recipe.train
    counts = acc.reduce(torch.tensor([sum(target_count(b) for b in micro), tokens], device=acc.device), "sum")
    targets, step_tokens = max(int(counts[0]), 1), int(counts[1])
    step_loss = 0.0
    for i, batch in enumerate(micro):
        sync = nullcontext() if i == len(micro) - 1 else acc.no_sync(s.loss_model)
        with sync, acc.autocast():
            loss_sum, _ = s.loss_model(**{k: v.to(acc.device) for k, v in batch.items()})
            loss = loss_sum * acc.num_processes / targets
            if (extra := s.method.extra_loss(s.model)) is not None:
                loss = loss + extra / len(micro)
        acc.backward(loss)
        step_loss += float(loss_sum.detach()) / targets * acc.num_processes
        del loss, loss_sum  # held into the next micro-batch's forward, they kept ~250 MB of its graph alive (measured)
    floor = frozen_floor(state.step, s.recipe.adapter.freeze_layers_below, s.recipe.adapter.unfreeze_every)
    if floor > 0:
        _drop_frozen_grads(s.model, floor)
    # Clipping at infinity leaves the grads as they are and still measures their norm.
    grad_norm = float(acc.clip_grad_norm_(s.params, t.max_grad_norm or math.inf))
    step_loss = float(acc.reduce(torch.tensor(step_loss, device=acc.device), "mean"))
    # fp16's loss scaler makes some grads inf on purpose (it then skips the step): check the loss only.
    bad = non_finite(step_loss, None if acc.scaler is not None else grad_norm)
    if bad:
        raise_non_finite(bad, state.step + 1, s.run_dir, s.lr)
    s.optimizer.step()
    s.method.after_step(s.model, state.step)  # AdaLoRA's rank budget reads the grads
    s.scheduler.step()
    s.optimizer.zero_grad(set_to_none=not s.keep_grads)
    return step_loss, grad_norm, step_tokens


def validation_loss(s: Session) -> float | None:
    """Mean loss per target over this process's share of the validation rows, summed over processes.

    Kept from raising training's peak on CPU, where glibc's heap holds what training freed between the blocks
    that survive it: the free pages are handed back first, and there the batches are no larger than training's
    micro-batches (``eval.batch_size`` rows, 8 by default, make blocks several times the size of any training
    keeps, which that free memory cannot hold, so the heap grew by them and training went on to touch it all).
    gsm8k-sft, bf16, 12 steps validating every 5: peak 2,474 MB with the trim alone, 2,494 with small batches
    alone, 2,296 and 2,235 with both (2,272 validating only at the end, before either).
    """
    if not s.data.val:
        return None
    trim_heap()
    acc = s.accelerator
    s.loss_model.eval()
    total = torch.zeros(2, device=acc.device)
    rows = s.data.val[acc.process_index :: acc.num_processes]
    at_once = min(s.recipe.eval.batch_size, s.recipe.train.batch_size) if acc.device.type == "cpu" else s.recipe.eval.batch_size
    with torch.no_grad(), acc.autocast():
        for batch in eval_batches(rows, at_once, s.pad_id):
            loss, n = s.loss_model(**{k: v.to(acc.device) for k, v in batch.items()})
            total += torch.stack([loss.float().detach(), n.float()])
    s.loss_model.train()
    total = acc.reduce(total, "sum")
    return float(total[0] / total[1].clamp(min=1))


def measure_base(s: Session, state: TrainState, progress: TrainProgress) -> None:
    """The scorer on the base model (adapter disabled), once before the first step: forgetting's reference,
    and the task metric's starting point; logged as step 0."""
    if s.scorer is None or state.base is not None:
        return
    with s.model.disable_adapter():
        state.base = s.scorer(s.model)
    s.log({"step": 0, "base": True, **state.base})
    progress.note("base model: " + ", ".join(f"{k} {v:.4f}" for k, v in state.base.items()))


def validation_point(s: Session, state: TrainState) -> dict[str, Any] | None:
    """The validation loss and, with a scorer, the task metric and general-text loss (rounded as logged, so
    the choice made from them can be checked against metrics.jsonl); None without validation rows."""
    val = validation_loss(s)
    point: dict[str, Any] = {"step": state.step} | ({} if val is None else {"val_loss": round(val, 6)})
    if s.scorer is not None:
        point.update(s.scorer(s.model))
    if "general_loss" in point and state.base and "general_loss" in state.base:
        point["forgetting_pct"] = round(forgetting_pct(point["general_loss"], state.base["general_loss"]), 4)
    return point if len(point) > 1 else None


def validate(s: Session, state: TrainState, best: dict | None, progress: TrainProgress) -> dict | None:
    """Log the validation point, keep the adapter ``train.select`` prefers so far, and stop early after
    ``patience`` evaluations without improvement of ``train.early_stopping_metric``; returns the kept adapter state."""
    point = validation_point(s, state)
    if point is None:
        return best
    s.log(point)
    state.history.append(point)
    progress.note(f"step {state.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in point.items() if k != "step"))
    t = s.recipe.train
    metric = t.early_stopping_metric
    value = point.get(metric_key(metric))
    if value is not None and metric_improves(value, state.best_val, metric):
        state.best_val, state.evals_without_improvement = value, 0
    elif value is not None:
        state.evals_without_improvement += 1
        if t.early_stopping_patience and state.evals_without_improvement >= t.early_stopping_patience:
            state.stopped_early = True
            progress.note(f"early stopping at step {state.step}: no {metric} improvement in "
                          f"{t.early_stopping_patience} evaluations")
    rule = resolved_rule(t.select, t.early_stopping_patience)
    if rule == "last":
        return best
    if select_point(state.history, rule, metric, t.forgetting_bound) is point:
        return trainable_state(s.model)
    return best


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone().contiguous() for n, p in model.named_parameters() if p.requires_grad}


# ------------------------------------------------------------------------------------------ train


def is_main_process() -> bool:
    """Rank 0 of a torchrun / accelerate launch job (or a single process), known before Accelerate starts."""
    return os.environ.get("RANK", "0") == "0"


def claim_run_dir(run_dir: Path, mode: Mode) -> AbstractContextManager:
    """The run directory's lock for this run's life, taken by the main process only."""
    return RunDir(run_dir).claim(mode) if is_main_process() else nullcontext()


def train(recipe: Recipe, run_dir: Path, resume: bool = False, *, overwrite: bool = False,
          resume_changed: list[str] | None = None, scorer: ScorerFactory | None = None) -> TrainResult:
    """Train the recipe's adapter into ``run_dir``; the record is also written as run.json.

    The directory is locked while training; a directory that holds another run is refused unless
    ``resume`` (same recipe, or the changed keys named in ``resume_changed``) or ``overwrite``. ``scorer``
    builds what validations measure beyond the loss (tuneguard.eval.validation.validation_scorer).
    """
    mode: Mode = "overwrite" if overwrite else "resume" if resume else "new"
    with claim_run_dir(run_dir, mode):
        return _train(recipe, RunDir(run_dir), resume, resume_changed or [], scorer)


def _train(recipe: Recipe, run_dir: RunDir, resume_run: bool, resume_changed: list[str],
           make_scorer: ScorerFactory | None) -> TrainResult:
    if make_scorer is None and needs_scorer(recipe):
        raise TuneguardError("train.early_stopping_metric / train.select 'task_within_forgetting' score the task at "
                             "each validation, which this command does not run: use `tuneguard train` (or override "
                             "train.early_stopping_metric=val_loss train.select=null to measure training alone)")
    started = time.time()
    quiet_libraries()
    checkpoint = run_dir.latest_checkpoint() if resume_run else None
    changed = resume_changed
    if checkpoint is not None:
        changed = run_dir.check_resume(checkpoint, recipe.training_view(), resume_changed, recipe_defaults())
        refuse_unresumable(resume_changed)
    if resume_run and not changed and run_dir.finished_after(checkpoint):
        raise TuneguardError(f"{run_dir.path}: training already finished, nothing to resume; {FINISHED_HINT}")
    if resume_run and checkpoint is None and is_main_process():
        say(f"no checkpoint in {run_dir.checkpoints}; starting from scratch")
        run_dir.metrics.unlink(missing_ok=True)  # the killed start's lines; this run logs them again
    s = setup(recipe, run_dir, make_scorer)
    state, best = resume(s, checkpoint, resume_changed, changed)
    t = recipe.train
    steps = step_windows(s.data, recipe, s.accelerator.process_index, s.accelerator.num_processes, s.pad_id,
                         start=state.step)
    progress = TrainProgress(s.total_steps, start=state.step, enabled=s.accelerator.is_main_process)
    watch = divergence_watch(s, state.divergence)
    window_tokens, window_seconds = 0, 0.0  # training steps only: a validation or a save is not training speed
    s.loss_model.train()
    with progress:
        measure_base(s, state, progress)
        while state.step < s.total_steps and not state.stopped_early:
            step_start = time.time()
            micro, real_tokens = zip(*next(steps), strict=True)
            lr = s.lr  # the rate this step trains at (the scheduler moves on inside train_step)
            loss, grad_norm, step_tokens = train_step(s, state, micro, sum(real_tokens))
            state.step += 1
            state.diverged = watch.update(loss, grad_norm)
            step_seconds = time.time() - step_start
            state.step_seconds += step_seconds
            state.tokens += step_tokens
            window_tokens, window_seconds = window_tokens + step_tokens, window_seconds + step_seconds
            rate = window_tokens / max(window_seconds, 1e-9)
            progress.update(state.step, loss=loss, lr=lr, tokens_per_s=rate)
            if state.step % t.log_every == 0 or state.step == s.total_steps:
                record = {"step": state.step, "loss": round(loss, 6), "lr": lr,
                          "tokens": state.tokens, "tokens_per_s": round(rate, 2)}
                s.log(record)
                progress.log(record)
                window_tokens, window_seconds = 0, 0.0
            if t.eval_every and state.step % t.eval_every == 0:
                best = validate(s, state, best, progress)
            if state.diverged:
                progress.note(f"step {state.step}: training diverged: {state.diverged}")
                break
            if t.save_every and state.step % t.save_every == 0 and state.step < s.total_steps:
                state.elapsed += time.time() - started
                started = time.time()
                state.divergence = watch.to_state()
                save_checkpoint(s.accelerator, run_dir, state, best, recipe, s.method.step_state(s.model))
    state.elapsed += time.time() - started
    return finish(s, state, best)


# ----------------------------------------------------------------------------------------- finish


def finish(s: Session, state: TrainState, best: dict | None) -> TrainResult:
    """Restore the adapter ``train.select`` kept, write adapter/ and run.json; a diverged run fails after."""
    recipe, acc = s.recipe, s.accelerator
    restored = best is not None and resolved_rule(recipe.train.select, recipe.train.early_stopping_patience) != "last"
    if restored:
        named = dict(s.model.named_parameters())
        with torch.no_grad():
            for name, value in best.items():
                named[name].copy_(value)
    started = time.time()
    final_val = validation_loss(s)
    release_kept()
    # The last step's own validation, unless it was already logged; a restored adapter's is an earlier step's.
    if final_val is not None and not restored and not (recipe.train.eval_every and state.step % recipe.train.eval_every == 0):
        s.log({"step": state.step, "val_loss": round(final_val, 6)})
    state.elapsed += time.time() - started
    record = run_record(s, state, final_val)
    acc.wait_for_everyone()
    if acc.is_main_process:
        s.run_dir.retire_evaluation()
        with atomic_dir(s.run_dir.adapter) as tmp:
            acc.unwrap_model(s.loss_model).model.save_pretrained(str(tmp))
            if s.backbone.tokenizer is not None:
                s.backbone.tokenizer.save_pretrained(str(tmp))
            s.run_dir.write_adapter_meta(tmp, {"fingerprint": s.backbone.fingerprint, "recipe": recipe.output.name})
        s.run_dir.write_record(record)
        for key, what in (("truncated_train", "training"), ("truncated_val", "validation")):
            if s.data.stats.get(key):
                say(f"note: {s.data.stats[key]} {what} examples were truncated to "
                    f"data.max_length={recipe.data.max_length}")
        say(f"adapter saved to {s.run_dir.adapter}  ({record['tokens_per_s']} tokens/s, "
            f"peak {record['peak_memory_mb']:.0f} MB)")
    acc.wait_for_everyone()  # every process evaluates from the files just written (run.json, the adapter's hash)
    if state.diverged:
        raise TuneguardError(f"training diverged at step {state.step}: {state.diverged}; run.json records it and "
                             "evaluation refuses this adapter (lower train.lr, or raise train.warmup_ratio)")
    return TrainResult(record, acc.unwrap_model(s.loss_model).model, s.backbone, s.data, acc, s.checksum_at_load)


def run_record(s: Session, state: TrainState, final_val: float | None) -> dict[str, Any]:
    """run.json: what was trained, how long it took, where the numbers came from, and which validation's
    adapter was kept."""
    recipe, acc, t = s.recipe, s.accelerator, s.recipe.train
    rule = resolved_rule(t.select, t.early_stopping_patience)
    return {
        "recipe": recipe.output.name,
        "fingerprint": s.backbone.fingerprint,
        "backbone_path": s.backbone.path,
        "adapter_method": recipe.adapter.method,
        "quantization": recipe.quantization.method,
        "seed": recipe.train.seed,
        "lr": recipe.train.lr,
        "steps": state.step,
        "planned_steps": s.total_steps,
        "stopped_early": state.stopped_early,
        "diverged": state.diverged,
        "tokens_trained": state.tokens,
        "wall_time_s": round(state.elapsed, 2),
        "train_seconds": round(state.step_seconds, 2),
        "tokens_per_s": round(state.tokens / max(state.step_seconds, 1e-9), 2),
        "peak_memory_mb": peak_memory(acc.device)["peak_memory_mb"],
        "trainable_params": s.trainable,
        "total_params": s.total,
        "final_train_loss": s.run_dir.last_metric("loss"),
        "final_val_loss": final_val,
        "selection": selection_record(state.history, select_point(state.history, rule, t.early_stopping_metric,
                                                                  t.forgetting_bound),
                                      rule, t.early_stopping_metric, t.forgetting_bound, state.step)
        | {"base": state.base},
        "data": s.data.stats,
        "num_processes": acc.num_processes,
        "device": str(acc.device),
        "mixed_precision": acc.mixed_precision,
        "numerics": numerics_record(acc.device),
        "threads": torch.get_num_threads(),
        "versions": versions(),
        "git_commit": git_commit(),
        "command": " ".join(sys.argv),
    }


# ---------------------------------------------------------------------------------------- helpers


def divergence_watch(s: Session, saved: dict[str, Any] | None = None) -> DivergenceWatch:
    """The run's divergence rules (a loss back at the uniform guess, an exploding gradient), fresh or as a
    checkpoint left them (a resumed run judges its steps against the whole run's history)."""
    return DivergenceWatch.from_state(uniform_loss(s.backbone.model.config, s.backbone.is_encoder), saved or {})


def uniform_loss(config: Any, is_encoder: bool) -> float:
    """The loss of a uniform guess: over the labels for a classifier head, else over the vocabulary."""
    return math.log(max(config.num_labels if is_encoder else config.vocab_size, 2))


def raise_non_finite(what: str, step: int, run_dir: RunDir, lr: float) -> None:
    checkpoint = run_dir.latest_checkpoint()
    last = f"the last checkpoint is {checkpoint}" if checkpoint else "there is no checkpoint (train.save_every)"
    raise NonFiniteStep(f"step {step}: {what} (lr {lr:g}); stopped before the update, adapter/ not written, "
                         f"{last}. Lower train.lr or check the data")


def data_notes(stats: dict[str, Any]) -> list[str]:
    """What the data stage dropped or accepted, for the log (run.json keeps the counts)."""
    notes = []
    bad = stats.get("bad_train_rows", 0) + stats.get("bad_val_rows", 0)
    if bad:
        notes.append(f"{bad} bad rows skipped ({stats['bad_train_rows']} training, {stats['bad_val_rows']} validation; "
                     "data.max_bad_fraction); first: " + "; ".join(stats["bad_rows_named"]))
    if stats.get("overlap_val_rows"):
        notes.append(f"{stats['overlap_val_rows']} validation rows also occur in training (data.allow_overlap)")
    if stats.get("augmented_dropped"):
        notes.append(f"{stats['augmented_dropped']} augmented copies dropped (each could not be built as its row was, "
                     "e.g. an insert past data.max_length); their rows train as they are")
    return notes


def _drop_frozen_grads(model: torch.nn.Module, floor: int) -> None:
    """Layers below the unfreezing floor keep their adapter weights as they are this step."""
    for name, p in model.named_parameters():
        idx = layer_index(name) if p.requires_grad else None
        if idx is not None and idx < floor:
            p.grad = None


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, int | float | str | bool) else json.dumps(v)
    return out
