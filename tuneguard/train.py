"""The training recipe, top to bottom: setup, steps, validation, checkpoints, resume, outputs.

Run it as ``accelerate launch -m tuneguard.train RECIPE [a.b=value ...] [--resume | --overwrite]``
or in-process as ``tuneguard train RECIPE``. Every process runs this same script; Accelerate splits
the work.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from safetensors.torch import load_file, save_file

from tuneguard.adapters.freezing import frozen_floor
from tuneguard.adapters.methods import adalora_orthogonality, apply_adapter, count_parameters
from tuneguard.args import add_train_arguments, with_overrides
from tuneguard.backbones import Backbone, load_backbone
from tuneguard.data.packing import collate, collate_classification
from tuneguard.data.prepare import Prepared, prepare_data
from tuneguard.divergence import DivergenceWatch, non_finite
from tuneguard.errors import TuneguardError, guarded
from tuneguard.eval.guards import frozen_checksum
from tuneguard.fastpath import prepare_for_training
from tuneguard.io import append_jsonl, atomic_dir, atomic_write_json, atomic_write_text
from tuneguard.losses import CausalLMLoss, ClassificationLoss
from tuneguard.numerics import numerics_record, resolve_mixed_precision
from tuneguard.progress import TrainProgress, quiet_libraries
from tuneguard.recipe import Recipe, dump_recipe, load_recipe
from tuneguard.rundir import Mode, RunDir


@dataclass
class TrainState:
    """Everything beyond model/optimizer/RNG that a resumed run needs to continue exactly."""

    step: int = 0
    tokens: int = 0
    best_val: float | None = None
    evals_without_improvement: int = 0
    stopped_early: bool = False
    elapsed: float = 0.0
    step_seconds: float = 0.0
    """Time inside optimizer steps only (no loading, validation or checkpointing): the throughput base."""
    history: list[dict[str, Any]] = field(default_factory=list)
    diverged: str | None = None
    """Why training diverged (see tuneguard.divergence), or None."""


# ----------------------------------------------------------------------------------------- setup


def make_accelerator(recipe: Recipe, run_dir: Path) -> Accelerator:
    mp = resolve_mixed_precision(recipe.train.mixed_precision)
    freezing = recipe.adapter.freeze_layers_below > 0
    return Accelerator(
        cpu=not torch.cuda.is_available(),  # on CPU, Accelerate runs several processes (torchrun) only when told
        mixed_precision=mp,
        log_with=recipe.train.trackers or None,
        project_dir=str(run_dir),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=freezing)],
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


def planned_steps(recipe: Recipe, n_rows: int, n_processes: int) -> tuple[int, int]:
    """(optimizer steps in total, micro-batches per epoch per process); ``max_steps`` overrides epochs."""
    per_epoch = math.ceil(n_rows / (recipe.train.batch_size * n_processes))
    steps = recipe.train.max_steps or math.ceil(per_epoch * recipe.train.epochs / recipe.train.grad_accum)
    return steps, per_epoch


def epoch_batches(n_rows: int, batch_size: int, seed: int, epoch: int, rank: int, world: int) -> list[list[int]]:
    """This process's micro-batches of one epoch: a seeded shuffle, so a resumed run sees the same order."""
    order = list(range(n_rows))
    random.Random(seed * 1000 + epoch).shuffle(order)
    batches = [order[i : i + batch_size] for i in range(0, n_rows, batch_size)]
    while len(batches) % world:
        batches.append(batches[len(batches) % world - world])
    return batches[rank::world]


def micro_batches(data: Prepared, recipe: Recipe, rank: int, world: int, pad_id: int, start: int = 0):
    """An endless stream of collated micro-batches, starting at micro-batch number ``start``."""
    rows = data.train
    per_epoch = len(epoch_batches(len(rows), recipe.train.batch_size, 0, 0, rank, world))
    epoch, index = divmod(start, per_epoch)
    encoder = not hasattr(rows[0], "position_ids")
    while True:
        batches = epoch_batches(len(rows), recipe.train.batch_size, recipe.train.seed, epoch, rank, world)
        for idx in batches[index:]:
            chosen = [rows[i] for i in idx]
            batch = collate_classification(chosen, pad_id) if encoder else collate(chosen, pad_id)
            yield batch, sum(len(r.input_ids) for r in chosen)
        epoch, index = epoch + 1, 0


def eval_batches(rows: list, recipe: Recipe, pad_id: int):
    encoder = rows and not hasattr(rows[0], "position_ids")
    size = recipe.eval.batch_size
    for i in range(0, len(rows), size):
        chunk = rows[i : i + size]
        yield collate_classification(chunk, pad_id) if encoder else collate(chunk, pad_id)


# ----------------------------------------------------------------------------------- checkpoints


def only_trainable_weights(accelerator: Accelerator, loss_model: torch.nn.Module) -> None:
    """Checkpoints hold the adapter, not the frozen backbone: megabytes instead of the whole model."""
    trainable = {n for n, p in loss_model.named_parameters() if p.requires_grad}

    def keep(models: list, weights: list[dict[str, torch.Tensor]], output_dir: str) -> None:
        for i, w in enumerate(weights):
            weights[i] = {k: v for k, v in w.items() if k in trainable or k.removeprefix("module.") in trainable}

    accelerator.register_save_state_pre_hook(keep)


def save_checkpoint(accelerator: Accelerator, run_dir: Path, state: TrainState, best: dict | None,
                    recipe: Recipe) -> None:
    """Adapter, optimizer and RNG state, the train state written last (it marks the checkpoint complete)."""
    rd = RunDir(run_dir)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with atomic_dir(rd.checkpoint(state.step)) as tmp:
            accelerator.save_state(str(tmp))
            if best is not None:
                save_file(best, str(tmp / "best_adapter.safetensors"))
            rd.write_checkpoint_recipe(tmp, recipe.training_view())
            atomic_write_json(tmp / "train_state.json", state.__dict__)
        for path in rd.checkpoint_list()[: -recipe.train.keep_checkpoints]:
            shutil.rmtree(path, ignore_errors=True)
    accelerator.wait_for_everyone()


def use_new_lr(scheduler: Any, lr: float) -> None:
    """The restored optimizer and scheduler carry the checkpoint's lr; a resume that changed it gets the new one."""
    inner: torch.optim.lr_scheduler.LambdaLR = scheduler.scheduler  # inside Accelerate's wrapper
    inner.base_lrs = [lr] * len(inner.base_lrs)
    for group, factor in zip(inner.optimizer.param_groups, inner.lr_lambdas, strict=True):
        group["initial_lr"] = lr
        group["lr"] = lr * factor(inner.last_epoch)


def restore_checkpoint(accelerator: Accelerator, path: Path, run_dir: Path) -> tuple[TrainState, dict | None]:
    accelerator.load_state(str(path), strict=False)
    state = TrainState(**json.loads((path / "train_state.json").read_text()))
    best = load_file(str(path / "best_adapter.safetensors")) if (path / "best_adapter.safetensors").exists() else None
    if accelerator.is_main_process:
        # Drop metrics logged after the checkpoint: the resumed run logs those steps again.
        metrics = run_dir / "metrics.jsonl"
        if metrics.exists():
            kept = [ln for ln in metrics.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= state.step]
            atomic_write_text(metrics, "".join(ln + "\n" for ln in kept))
    return state, best


# ------------------------------------------------------------------------------------------ steps


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def validation_loss(accelerator: Accelerator, loss_model: torch.nn.Module, data: Prepared, recipe: Recipe, pad_id: int) -> float | None:
    if not data.val:
        return None
    loss_model.eval()
    total = torch.zeros(2, device=accelerator.device)
    rows = data.val[accelerator.process_index :: accelerator.num_processes]
    with torch.no_grad(), accelerator.autocast():
        for batch in eval_batches(rows, recipe, pad_id):
            loss, n = loss_model(**{k: v.to(accelerator.device) for k, v in batch.items()})
            total += torch.stack([loss.float().detach(), n.float()])
    loss_model.train()
    total = accelerator.reduce(total, "sum")
    return float(total[0] / total[1].clamp(min=1))


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def versions() -> dict[str, str]:
    import accelerate
    import peft
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "peft": peft.__version__, "accelerate": accelerate.__version__}
    try:
        import bitsandbytes

        out["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        pass
    return out


# ------------------------------------------------------------------------------------------ train


def is_main_process() -> bool:
    """Rank 0 of a torchrun / accelerate launch job (or a single process), known before Accelerate starts."""
    return os.environ.get("RANK", "0") == "0"


def claim_run_dir(run_dir: Path, mode: Mode) -> AbstractContextManager:
    """The run directory's lock for this run's life, taken by the main process only."""
    return RunDir(run_dir).claim(mode) if is_main_process() else nullcontext()


def train(recipe: Recipe, run_dir: Path, resume: bool = False, *, overwrite: bool = False,
          resume_changed: list[str] | None = None) -> dict[str, Any]:
    """Train the recipe's adapter into ``run_dir``; returns the run record (also written as run.json).

    The directory is locked while training; a directory that holds another run is refused unless
    ``resume`` (same recipe, or the changed keys named in ``resume_changed``) or ``overwrite``.
    """
    mode: Mode = "overwrite" if overwrite else "resume" if resume else "new"
    with claim_run_dir(run_dir, mode):
        return _train(recipe, run_dir, resume, resume_changed or [])


def _train(recipe: Recipe, run_dir: Path, resume: bool, resume_changed: list[str]) -> dict[str, Any]:
    started = time.time()
    quiet_libraries()
    checkpoint = RunDir(run_dir).latest_checkpoint() if resume else None
    if checkpoint is not None:
        RunDir(run_dir).check_resume(checkpoint, recipe.training_view(), resume_changed)
    accelerator = make_accelerator(recipe, run_dir)
    set_seed(recipe.train.seed, deterministic=recipe.train.deterministic)
    if resume and checkpoint is None:
        accelerator.print(f"no checkpoint in {run_dir / 'checkpoints'}; starting from scratch")
        if accelerator.is_main_process:
            RunDir(run_dir).metrics.unlink(missing_ok=True)  # the killed start's lines; this run logs them again

    # 1. Backbone (frozen, maybe quantized) and data.
    labels = recipe.data.labels
    backbone: Backbone = load_backbone(
        recipe.model, recipe.quantization, num_labels=len(labels) if labels else None, device=accelerator.device
    )
    checksum_at_load = frozen_checksum(backbone.model)
    data = prepare_data(recipe.data, backbone.tokenizer, is_encoder=backbone.is_encoder, seed=recipe.train.seed,
                        packable=recipe.adapter.method != "prompt_tuning")
    total_steps, _ = planned_steps(recipe, len(data.train), accelerator.num_processes)
    if accelerator.is_main_process:  # only now that the inputs are known to be good
        atomic_write_text(run_dir / "recipe.yaml", dump_recipe(recipe))
        for line in data_notes(data.stats):
            accelerator.print(f"note: {line}")

    # 2. Adapter.
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
    named_trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    only_trainable_weights(accelerator, loss_model)

    # 3. Resume.
    state, best = TrainState(), None
    if checkpoint is not None:
        state, best = restore_checkpoint(accelerator, checkpoint, run_dir)
        if "train.lr" in resume_changed:
            use_new_lr(scheduler, recipe.train.lr)
        accelerator.print(f"resumed from {checkpoint.name}")
    if accelerator.is_main_process and recipe.train.trackers:
        accelerator.init_trackers(recipe.output.name or "tuneguard", config=_flat(recipe.model_dump(mode="json")))

    # 4. Steps.
    pad_id = backbone.tokenizer.pad_token_id
    stream = micro_batches(data, recipe, accelerator.process_index, accelerator.num_processes, pad_id,
                           start=state.step * recipe.train.grad_accum)
    progress = TrainProgress(total_steps, start=state.step, enabled=accelerator.is_main_process)
    window_tokens, window_start = 0, time.time()
    watch = DivergenceWatch(uniform_loss(backbone.model.config, backbone.is_encoder))
    loss_model.train()
    with progress:
        while state.step < total_steps and not state.stopped_early:
            step_start = time.time()
            floor = frozen_floor(state.step, recipe.adapter.freeze_layers_below, recipe.adapter.unfreeze_every)
            micro, real_tokens = zip(*(next(stream) for _ in range(recipe.train.grad_accum)), strict=True)
            local = sum(int((b["labels"][:, 1:] != -100).sum()) if "position_ids" in b else len(b["labels"]) for b in micro)
            counts = accelerator.reduce(torch.tensor([local, sum(real_tokens)], device=accelerator.device), "sum")
            global_targets, step_tokens = int(counts[0]), int(counts[1])
            step_loss = 0.0
            for i, batch in enumerate(micro):
                sync = nullcontext() if i == len(micro) - 1 else accelerator.no_sync(loss_model)
                with sync, accelerator.autocast():
                    loss_sum, _ = loss_model(**{k: v.to(accelerator.device) for k, v in batch.items()})
                    loss = loss_sum * accelerator.num_processes / max(global_targets, 1)
                    if (regularizer := adalora_orthogonality(model)) is not None:
                        loss = loss + regularizer / len(micro)
                accelerator.backward(loss)
                step_loss += float(loss_sum.detach()) / max(global_targets, 1) * accelerator.num_processes
            if floor > 0:
                _drop_frozen_grads(named_trainable, floor)
            # Clipping at infinity leaves the grads as they are and still measures their norm.
            grad_norm = float(accelerator.clip_grad_norm_(params, recipe.train.max_grad_norm or math.inf))
            step_loss = float(accelerator.reduce(torch.tensor(step_loss, device=accelerator.device), "mean"))
            # fp16's loss scaler makes some grads inf on purpose (it then skips the step): check the loss only.
            bad = non_finite(step_loss, None if accelerator.scaler is not None else grad_norm)
            if bad:
                raise_non_finite(bad, state.step + 1, run_dir, scheduler.get_last_lr()[0])
            optimizer.step()
            if recipe.adapter.method == "adalora":
                model.base_model.update_and_allocate(state.step)  # AdaLoRA's rank budget reads the grads
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.diverged = watch.update(step_loss, grad_norm)
            state.step_seconds += time.time() - step_start
            state.tokens += step_tokens
            window_tokens += step_tokens
            progress.update(state.step, loss=step_loss, lr=scheduler.get_last_lr()[0],
                            tokens_per_s=window_tokens / max(time.time() - window_start, 1e-9))

            if state.step % recipe.train.log_every == 0 or state.step == total_steps:
                record = {"step": state.step, "loss": round(step_loss, 6), "lr": scheduler.get_last_lr()[0],
                          "tokens": state.tokens, "tokens_per_s": round(window_tokens / max(time.time() - window_start, 1e-9), 2)}
                _log(accelerator, run_dir, record)
                progress.log(record)
                window_tokens, window_start = 0, time.time()

            if recipe.train.eval_every and state.step % recipe.train.eval_every == 0:
                val = validation_loss(accelerator, loss_model, data, recipe, pad_id)
                if val is not None:
                    _log(accelerator, run_dir, {"step": state.step, "val_loss": round(val, 6)})
                    progress.note(f"step {state.step}: val_loss {val:.4f}")
                    if state.best_val is None or val < state.best_val - 1e-4:
                        state.best_val, state.evals_without_improvement = val, 0
                        best = trainable_state(model)
                    else:
                        state.evals_without_improvement += 1
                        patience = recipe.train.early_stopping_patience
                        if patience and state.evals_without_improvement >= patience:
                            state.stopped_early = True
                            progress.note(f"early stopping at step {state.step}: no val_loss improvement in {patience} evaluations")

            if state.diverged:
                progress.note(f"step {state.step}: training diverged: {state.diverged}")
                break
            if recipe.train.save_every and state.step % recipe.train.save_every == 0 and state.step < total_steps:
                state.elapsed += time.time() - started
                started = time.time()
                save_checkpoint(accelerator, run_dir, state, best, recipe)

    # 5. Outputs.
    if best is not None and recipe.train.early_stopping_patience:
        with torch.no_grad():
            for name, value in best.items():
                named_trainable[name].copy_(value)
    final_val = validation_loss(accelerator, loss_model, data, recipe, pad_id)
    if final_val is not None and not (recipe.train.eval_every and state.step % recipe.train.eval_every == 0):
        _log(accelerator, run_dir, {"step": state.step, "val_loss": round(final_val, 6)})
    state.elapsed += time.time() - started
    record = {
        "recipe": recipe.output.name,
        "fingerprint": backbone.fingerprint,
        "backbone_path": backbone.path,
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
        "peak_memory_mb": round(peak_memory_mb(accelerator.device), 1),
        "trainable_params": trainable,
        "total_params": total,
        "final_train_loss": _last(run_dir, "loss"),
        "final_val_loss": final_val,
        "data": data.stats,
        "num_processes": accelerator.num_processes,
        "device": str(accelerator.device),
        "mixed_precision": accelerator.mixed_precision,
        "numerics": numerics_record(accelerator.device),
        "threads": torch.get_num_threads(),
        "versions": versions(),
        "git_commit": git_commit(),
        "command": " ".join(sys.argv),
    }
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with atomic_dir(run_dir / "adapter") as tmp:
            accelerator.unwrap_model(loss_model).model.save_pretrained(str(tmp))
            backbone.tokenizer.save_pretrained(str(tmp))
            atomic_write_json(tmp / "tuneguard.json", {"fingerprint": backbone.fingerprint, "recipe": recipe.output.name})
        atomic_write_json(run_dir / "run.json", record)
        if data.stats["truncated_train"]:
            accelerator.print(f"note: {data.stats['truncated_train']} training examples were truncated to data.max_length={recipe.data.max_length}")
        accelerator.print(f"adapter saved to {run_dir / 'adapter'}  ({record['tokens_per_s']} tokens/s, peak {record['peak_memory_mb']:.0f} MB)")
    if state.diverged:
        raise TuneguardError(f"training diverged at step {state.step}: {state.diverged}; run.json records it and "
                             "evaluation refuses this adapter (lower train.lr, or raise train.warmup_ratio)")
    return {"record": record, "model": accelerator.unwrap_model(loss_model).model, "backbone": backbone, "data": data,
            "accelerator": accelerator, "checksum_at_load": checksum_at_load}


def uniform_loss(config: Any, is_encoder: bool) -> float:
    """The loss of a uniform guess: over the labels for a classifier head, else over the vocabulary."""
    return math.log(max(config.num_labels if is_encoder else config.vocab_size, 2))


def raise_non_finite(what: str, step: int, run_dir: Path, lr: float) -> None:
    checkpoint = RunDir(run_dir).latest_checkpoint()
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


def _drop_frozen_grads(named: dict[str, torch.nn.Parameter], floor: int) -> None:
    from tuneguard.adapters.freezing import layer_index

    for name, p in named.items():
        idx = layer_index(name)
        if idx is not None and idx < floor:
            p.grad = None


def _log(accelerator: Accelerator, run_dir: Path, record: dict[str, Any]) -> None:
    if accelerator.is_main_process:
        append_jsonl(run_dir / "metrics.jsonl", record)
    accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])


def _last(run_dir: Path, key: str) -> float | None:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return None
    values = [r[key] for r in map(json.loads, path.read_text().splitlines()) if key in r]
    return values[-1] if values else None


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, int | float | str | bool) else json.dumps(v)
    return out


# ------------------------------------------------------------------------------------ entry point


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tuneguard.train", description=__doc__.splitlines()[0])
    add_train_arguments(parser)
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    args, extra = parser.parse_known_args(argv)
    return with_overrides(parser, args, extra)


def run(args: argparse.Namespace) -> int:
    if args.resume and args.overwrite:
        raise TuneguardError("give --resume or --overwrite, not both")
    recipe = load_recipe(args.recipe, args.overrides)
    run_dir = recipe.run_dir(Path(args.recipe))
    resume = args.resume or bool(args.resume_changed)
    with claim_run_dir(run_dir, "overwrite" if args.overwrite else "resume" if resume else "new"):
        result = train(recipe, run_dir, resume=resume, resume_changed=args.resume_changed)
        try:
            if not args.no_eval and (recipe.eval.task or recipe.eval.suites):
                from tuneguard.evaluation import evaluate_after_training

                return evaluate_after_training(recipe, run_dir, result)
            return 0
        finally:
            result["accelerator"].end_training()  # closes trackers and the process group, after evaluation


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return guarded(lambda: run(args), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
