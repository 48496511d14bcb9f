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
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from peft import PeftModel

from tuneguard.adapters.freezing import frozen_floor, layer_index
from tuneguard.adapters.registry import MethodSpec, apply_adapter, count_parameters, method_spec
from tuneguard.adapters.state import frozen_checksum
from tuneguard.backbones import Backbone, load_backbone
from tuneguard.data.prepare import Prepared, prepare_data
from tuneguard.errors import TuneguardError
from tuneguard.io import atomic_dir
from tuneguard.numerics import numerics_record, resolve_mixed_precision
from tuneguard.progress import TrainProgress, quiet_libraries
from tuneguard.provenance import git_commit, peak_memory, versions
from tuneguard.recipe import Recipe, dump_recipe
from tuneguard.rundir import Mode, RunDir
from tuneguard.train.batches import eval_batches, micro_batches, planned_steps, target_count
from tuneguard.train.checkpoints import (
    TrainState,
    only_trainable_weights,
    restore_checkpoint,
    save_checkpoint,
    use_new_lr,
)
from tuneguard.train.divergence import DivergenceWatch, non_finite
from tuneguard.train.fastpath import prepare_for_training
from tuneguard.train.losses import CausalLMLoss, ClassificationLoss


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

    @property
    def pad_id(self) -> int:
        return self.backbone.tokenizer.pad_token_id

    def log(self, record: dict[str, Any]) -> None:
        """One metrics.jsonl line (main process) and the trackers (each process, as Accelerate wants)."""
        if self.accelerator.is_main_process:
            self.run_dir.append_metrics(record)
        self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])


# ----------------------------------------------------------------------------------------- setup


def make_accelerator(recipe: Recipe, run_dir: Path) -> Accelerator:
    return Accelerator(
        cpu=not torch.cuda.is_available(),  # on CPU, Accelerate runs several processes (torchrun) only when told
        mixed_precision=resolve_mixed_precision(recipe.train.mixed_precision),
        log_with=recipe.train.trackers or None,
        project_dir=str(run_dir),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=recipe.adapter.freeze_layers_below > 0)],
    )


def make_optimizer(recipe: Recipe, params: list[torch.nn.Parameter], device: torch.device) -> torch.optim.Optimizer:
    t = recipe.train
    if t.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    if device.type != "cuda":
        raise TuneguardError(f"train.optimizer '{t.optimizer}' needs a CUDA GPU (bitsandbytes); use 'adamw' on CPU")
    import bitsandbytes as bnb

    cls = bnb.optim.PagedAdamW8bit if t.optimizer == "paged_adamw_8bit" else bnb.optim.AdamW8bit
    return cls(params, lr=t.lr, weight_decay=t.weight_decay)


def make_scheduler(recipe: Recipe, optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = round(total_steps * recipe.train.warmup_ratio)
    kind = recipe.train.scheduler

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(total_steps - warmup, 1)
        return max(0.0, 1 - progress) if kind == "linear" else 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def setup(recipe: Recipe, run_dir: RunDir) -> Session:
    """Backbone (frozen, maybe quantized) and data, then the adapter, optimizer and schedule."""
    accelerator = make_accelerator(recipe, run_dir.path)
    set_seed(recipe.train.seed, deterministic=recipe.train.deterministic)
    labels = recipe.data.labels
    backbone = load_backbone(recipe.model, recipe.quantization, num_labels=len(labels) if labels else None,
                             device=accelerator.device)
    checksum_at_load = frozen_checksum(backbone.model)
    method = method_spec(recipe.adapter)
    data = prepare_data(recipe.data, backbone.tokenizer, is_encoder=backbone.is_encoder, seed=recipe.train.seed,
                        packable=method.packable)
    total_steps, _ = planned_steps(recipe, len(data.train), accelerator.num_processes)
    if accelerator.is_main_process:  # only now that the inputs are known to be good
        run_dir.write_recipe(dump_recipe(recipe))
        for line in data_notes(data.stats):
            accelerator.print(f"note: {line}")

    set_seed(recipe.train.seed)
    model = apply_adapter(backbone.model, recipe.adapter, is_encoder=backbone.is_encoder, total_steps=total_steps)
    # The fast path is built and verified for decoders (on encoders it misbehaves); the bitsandbytes
    # fix that prepare_for_training always applies is needed by both.
    model = prepare_for_training(model, recipe, accelerator.device, enabled=False if backbone.is_encoder else None)
    if recipe.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    trainable, total = count_parameters(model)
    accelerator.print(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)")
    loss_model = ClassificationLoss(model) if backbone.is_encoder else CausalLMLoss(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(recipe, params, accelerator.device)
    scheduler = make_scheduler(recipe, optimizer, total_steps)
    loss_model, optimizer, scheduler = accelerator.prepare(loss_model, optimizer, scheduler)
    only_trainable_weights(accelerator, loss_model)
    if accelerator.is_main_process and recipe.train.trackers:
        accelerator.init_trackers(recipe.output.name or "tuneguard", config=_flat(recipe.model_dump(mode="json")))
    return Session(recipe, run_dir, accelerator, backbone, data, method, model, loss_model, params, optimizer,
                   scheduler, total_steps, trainable, total, checksum_at_load)


def resume(s: Session, checkpoint: Path | None, resume_changed: list[str]) -> tuple[TrainState, dict | None]:
    """The loop's state and best adapter from ``checkpoint``, or a fresh start."""
    if checkpoint is None:
        return TrainState(), None
    state, best = restore_checkpoint(s.accelerator, checkpoint, s.run_dir)
    if "train.lr" in resume_changed:
        use_new_lr(s.scheduler, s.recipe.train.lr)
    s.accelerator.print(f"resumed from {checkpoint.name}")
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
    floor = frozen_floor(state.step, s.recipe.adapter.freeze_layers_below, s.recipe.adapter.unfreeze_every)
    if floor > 0:
        _drop_frozen_grads(s.model, floor)
    # Clipping at infinity leaves the grads as they are and still measures their norm.
    grad_norm = float(acc.clip_grad_norm_(s.params, t.max_grad_norm or math.inf))
    step_loss = float(acc.reduce(torch.tensor(step_loss, device=acc.device), "mean"))
    # fp16's loss scaler makes some grads inf on purpose (it then skips the step): check the loss only.
    bad = non_finite(step_loss, None if acc.scaler is not None else grad_norm)
    if bad:
        raise_non_finite(bad, state.step + 1, s.run_dir, s.scheduler.get_last_lr()[0])
    s.optimizer.step()
    s.method.after_step(s.model, state.step)  # AdaLoRA's rank budget reads the grads
    s.scheduler.step()
    s.optimizer.zero_grad(set_to_none=True)
    return step_loss, grad_norm, step_tokens


def validation_loss(s: Session) -> float | None:
    """Mean loss per target over this process's share of the validation rows, summed over processes."""
    if not s.data.val:
        return None
    acc = s.accelerator
    s.loss_model.eval()
    total = torch.zeros(2, device=acc.device)
    rows = s.data.val[acc.process_index :: acc.num_processes]
    with torch.no_grad(), acc.autocast():
        for batch in eval_batches(rows, s.recipe.eval.batch_size, s.pad_id):
            loss, n = s.loss_model(**{k: v.to(acc.device) for k, v in batch.items()})
            total += torch.stack([loss.float().detach(), n.float()])
    s.loss_model.train()
    total = acc.reduce(total, "sum")
    return float(total[0] / total[1].clamp(min=1))


def validate(s: Session, state: TrainState, best: dict | None, progress: TrainProgress) -> dict | None:
    """Log the validation loss, keep the best adapter so far, and stop early after ``patience`` evaluations
    without improvement; returns the best adapter state."""
    val = validation_loss(s)
    if val is None:
        return best
    s.log({"step": state.step, "val_loss": round(val, 6)})
    progress.note(f"step {state.step}: val_loss {val:.4f}")
    if state.best_val is None or val < state.best_val - 1e-4:
        state.best_val, state.evals_without_improvement = val, 0
        return trainable_state(s.model)
    state.evals_without_improvement += 1
    patience = s.recipe.train.early_stopping_patience
    if patience and state.evals_without_improvement >= patience:
        state.stopped_early = True
        progress.note(f"early stopping at step {state.step}: no val_loss improvement in {patience} evaluations")
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
          resume_changed: list[str] | None = None) -> TrainResult:
    """Train the recipe's adapter into ``run_dir``; the record is also written as run.json.

    The directory is locked while training; a directory that holds another run is refused unless
    ``resume`` (same recipe, or the changed keys named in ``resume_changed``) or ``overwrite``.
    """
    mode: Mode = "overwrite" if overwrite else "resume" if resume else "new"
    with claim_run_dir(run_dir, mode):
        return _train(recipe, RunDir(run_dir), resume, resume_changed or [])


def _train(recipe: Recipe, run_dir: RunDir, resume_run: bool, resume_changed: list[str]) -> TrainResult:
    started = time.time()
    quiet_libraries()
    checkpoint = run_dir.latest_checkpoint() if resume_run else None
    if checkpoint is not None:
        run_dir.check_resume(checkpoint, recipe.training_view(), resume_changed)
    elif resume_run and is_main_process():
        print(f"no checkpoint in {run_dir.checkpoints}; starting from scratch")
        run_dir.metrics.unlink(missing_ok=True)  # the killed start's lines; this run logs them again
    s = setup(recipe, run_dir)
    state, best = resume(s, checkpoint, resume_changed)
    t = recipe.train
    stream = micro_batches(s.data, recipe, s.accelerator.process_index, s.accelerator.num_processes, s.pad_id,
                           start=state.step * t.grad_accum)
    progress = TrainProgress(s.total_steps, start=state.step, enabled=s.accelerator.is_main_process)
    watch = DivergenceWatch(uniform_loss(s.backbone.model.config, s.backbone.is_encoder))
    window_tokens, window_start = 0, time.time()
    s.loss_model.train()
    with progress:
        while state.step < s.total_steps and not state.stopped_early:
            step_start = time.time()
            micro, real_tokens = zip(*(next(stream) for _ in range(t.grad_accum)), strict=True)
            loss, grad_norm, step_tokens = train_step(s, state, micro, sum(real_tokens))
            state.step += 1
            state.diverged = watch.update(loss, grad_norm)
            state.step_seconds += time.time() - step_start
            state.tokens += step_tokens
            window_tokens += step_tokens
            rate = window_tokens / max(time.time() - window_start, 1e-9)
            progress.update(state.step, loss=loss, lr=s.scheduler.get_last_lr()[0], tokens_per_s=rate)
            if state.step % t.log_every == 0 or state.step == s.total_steps:
                record = {"step": state.step, "loss": round(loss, 6), "lr": s.scheduler.get_last_lr()[0],
                          "tokens": state.tokens, "tokens_per_s": round(rate, 2)}
                s.log(record)
                progress.log(record)
                window_tokens, window_start = 0, time.time()
            if t.eval_every and state.step % t.eval_every == 0:
                best = validate(s, state, best, progress)
            if state.diverged:
                progress.note(f"step {state.step}: training diverged: {state.diverged}")
                break
            if t.save_every and state.step % t.save_every == 0 and state.step < s.total_steps:
                state.elapsed += time.time() - started
                started = time.time()
                save_checkpoint(s.accelerator, run_dir, state, best, recipe)
    state.elapsed += time.time() - started
    return finish(s, state, best)


# ----------------------------------------------------------------------------------------- finish


def finish(s: Session, state: TrainState, best: dict | None) -> TrainResult:
    """Restore the best adapter (early stopping), write adapter/ and run.json; a diverged run fails after."""
    recipe, acc = s.recipe, s.accelerator
    if best is not None and recipe.train.early_stopping_patience:
        named = dict(s.model.named_parameters())
        with torch.no_grad():
            for name, value in best.items():
                named[name].copy_(value)
    started = time.time()
    final_val = validation_loss(s)
    if final_val is not None and not (recipe.train.eval_every and state.step % recipe.train.eval_every == 0):
        s.log({"step": state.step, "val_loss": round(final_val, 6)})
    state.elapsed += time.time() - started
    record = run_record(s, state, final_val)
    acc.wait_for_everyone()
    if acc.is_main_process:
        with atomic_dir(s.run_dir.adapter) as tmp:
            acc.unwrap_model(s.loss_model).model.save_pretrained(str(tmp))
            s.backbone.tokenizer.save_pretrained(str(tmp))
            s.run_dir.write_adapter_meta(tmp, {"fingerprint": s.backbone.fingerprint, "recipe": recipe.output.name})
        s.run_dir.write_record(record)
        if s.data.stats["truncated_train"]:
            acc.print(f"note: {s.data.stats['truncated_train']} training examples were truncated to "
                      f"data.max_length={recipe.data.max_length}")
        acc.print(f"adapter saved to {s.run_dir.adapter}  ({record['tokens_per_s']} tokens/s, "
                  f"peak {record['peak_memory_mb']:.0f} MB)")
    acc.wait_for_everyone()  # every process evaluates from the files just written (run.json, the adapter's hash)
    if state.diverged:
        raise TuneguardError(f"training diverged at step {state.step}: {state.diverged}; run.json records it and "
                             "evaluation refuses this adapter (lower train.lr, or raise train.warmup_ratio)")
    return TrainResult(record, acc.unwrap_model(s.loss_model).model, s.backbone, s.data, acc, s.checksum_at_load)


def run_record(s: Session, state: TrainState, final_val: float | None) -> dict[str, Any]:
    """run.json: what was trained, how long it took, and where the numbers came from."""
    recipe, acc = s.recipe, s.accelerator
    return {
        "recipe": recipe.output.name,
        "fingerprint": s.backbone.fingerprint,
        "backbone_path": s.backbone.path,
        "adapter_method": recipe.adapter.method,
        "quantization": recipe.quantization.method,
        "seed": recipe.train.seed,
        "steps": state.step,
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


def uniform_loss(config: Any, is_encoder: bool) -> float:
    """The loss of a uniform guess: over the labels for a classifier head, else over the vocabulary."""
    return math.log(max(config.num_labels if is_encoder else config.vocab_size, 2))


def raise_non_finite(what: str, step: int, run_dir: RunDir, lr: float) -> None:
    checkpoint = run_dir.latest_checkpoint()
    last = f"the last checkpoint is {checkpoint}" if checkpoint else "there is no checkpoint (train.save_every)"
    raise TuneguardError(f"step {step}: {what} (lr {lr:g}); stopped before the update, adapter/ not written, "
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
