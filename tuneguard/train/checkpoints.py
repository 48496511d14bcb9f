"""Checkpoints: the adapter, optimizer, scheduler and RNG state, and the loop's own state, written last.

A checkpoint is complete once its ``train_state.json`` exists (``RunDir.checkpoint_list`` counts
only those), so a run killed while saving resumes from the one before.
"""

from __future__ import annotations

import contextlib
import pickle  # for its error type only: nothing is unpickled here
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, broadcast_object_list, load
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tuneguard.errors import TuneguardError
from tuneguard.io import atomic_dir, atomic_write_json
from tuneguard.progress import say
from tuneguard.recipe import Recipe
from tuneguard.rundir import TRAIN_STATE, RunDir, read_json

BEST = "best_adapter.safetensors"
WRITE_FAILED = ("unexpected pos", "file write failed")
"""torch.save's words for a write that did not complete (a full disk), which it raises as a RuntimeError."""
METHOD_STATE = "method_state.safetensors"
"""What an adapter method's per-step hook keeps (AdaLoRA's rank allocator), when it keeps anything."""


@dataclass
class TrainState:
    """Everything beyond model/optimizer/RNG that a resumed run needs to continue exactly."""

    step: int = 0
    tokens: int = 0
    best_val: float | None = None
    """The best value of ``train.early_stopping_metric`` so far (patience counts from it)."""
    evals_without_improvement: int = 0
    stopped_early: bool = False
    elapsed: float = 0.0
    step_seconds: float = 0.0
    """Time inside optimizer steps only (no loading, validation or checkpointing): the throughput base."""
    history: list[dict[str, Any]] = field(default_factory=list)
    """Every validation point logged so far (see tuneguard.train.selection)."""
    base: dict[str, Any] | None = None
    """The validation scorer on the base model (adapter disabled), measured once before the first step."""
    diverged: str | None = None
    """Why training diverged (see tuneguard.train.divergence), or None."""
    divergence: dict[str, Any] = field(default_factory=dict)
    """The divergence watch's history (best loss, steps at the uniform value, gradient norms) at the checkpoint."""
    processes: int = 0
    """How many processes trained (0 in a checkpoint from before it was kept): each one's share of the batches
    and the effective batch depend on it."""
    inputs: dict[str, str] = field(default_factory=dict)
    """What the run's inputs hashed to when it started, by recipe key (``model.source``: the backbone's fingerprint;
    ``data.train``, ``data.validation``, ``data.replay``: the files' contents); a resumed run must find the same."""


def trainable_names(loss_model: torch.nn.Module) -> set[str]:
    """The trainable parameters' names as a checkpoint's ``model.safetensors`` keys them: without DDP's ``module.``
    (the wrapper's names carry it, the state dict Accelerate saves does not)."""
    return {n.removeprefix("module.") for n, p in loss_model.named_parameters() if p.requires_grad}


def only_trainable_weights(accelerator: Accelerator, loss_model: torch.nn.Module) -> None:
    """Checkpoints hold the adapter, not the frozen backbone: megabytes instead of the whole model."""
    trainable = trainable_names(loss_model)

    def keep(models: list, weights: list[dict[str, torch.Tensor]], output_dir: str) -> None:
        for i, w in enumerate(weights):
            weights[i] = {k: v for k, v in w.items() if k.removeprefix("module.") in trainable}

    accelerator.register_save_state_pre_hook(keep)


def save_checkpoint(accelerator: Accelerator, run_dir: RunDir, state: TrainState, best: dict | None,
                    recipe: Recipe, method_state: dict[str, torch.Tensor]) -> None:
    """Adapter, optimizer and RNG state, the train state written last (it marks the checkpoint complete).

    Every process saves into the main process's temporary folder: the main one writes the adapter and the
    optimizer, each its own random state (``random_states_N.pkl``), without which a resumed process draws other
    dropout masks than the uninterrupted run."""
    accelerator.wait_for_everyone()
    main = accelerator.is_main_process
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(atomic_dir(run_dir.checkpoint(state.step))) if main else None
        tmp = broadcast_object_list([tmp])[0]
        try:
            accelerator.save_state(str(tmp))
        except RuntimeError as exc:
            if not any(words in str(exc) for words in WRITE_FAILED):
                raise
            free = shutil.disk_usage(tmp).free / 2**20
            raise TuneguardError(f"{run_dir.checkpoint(state.step)}: could not be written ({_first_line(exc)}); "
                                 f"{free:.0f} MB free on its disk; the checkpoints before it are kept") from None
        accelerator.wait_for_everyone()  # every process's file is in before the folder is renamed
        if main:
            if best is not None:
                save_file(best, str(tmp / BEST))
            if method_state:
                save_file(method_state, str(tmp / METHOD_STATE))
            run_dir.write_checkpoint_recipe(tmp, recipe.training_view())
            atomic_write_json(tmp / TRAIN_STATE, asdict(state))
    if main:
        for path in run_dir.checkpoint_list()[: -recipe.train.keep_checkpoints]:
            shutil.rmtree(path, ignore_errors=True)
    accelerator.wait_for_everyone()


def read_train_state(path: Path) -> TrainState:
    """A checkpoint's loop state, read alone (the resume checks run on it before anything is restored)."""
    return TrainState(**read_json(path / TRAIN_STATE))


def restore_checkpoint(accelerator: Accelerator, path: Path,
                       trainable: set[str]) -> tuple[TrainState, dict | None, dict[str, torch.Tensor]]:
    """The loop's state, the best adapter so far (or None) and the method's own state ({} if it keeps none)."""
    check_checkpoint(path, accelerator.process_index, trainable,
                     sharded=accelerator.distributed_type == DistributedType.FSDP)
    try:
        accelerator.load_state(str(path), strict=False)
    except Exception as exc:  # a damaged or foreign file: one line, not Accelerate's traceback
        raise TuneguardError(f"{path}: cannot be restored ({_first_line(exc)}); {_INSTEAD}") from None
    state = read_train_state(path)
    best = load_file(str(path / BEST)) if (path / BEST).exists() else None
    method_state = load_file(str(path / METHOD_STATE)) if (path / METHOD_STATE).exists() else {}
    return state, best, method_state


_INSTEAD = "delete this checkpoint to resume from the one before, or start again with --overwrite"


def check_checkpoint(path: Path, process_index: int, trainable: set[str], sharded: bool = False) -> None:
    """What ``save_checkpoint`` writes, before Accelerate reads it: the adapter as safetensors (Accelerate would
    fall back to a pickled ``pytorch_model.bin``), and this process's RNG state, which must load (Accelerate ignores
    one that does not, and the resumed run would silently draw other dropout masks and batches), every trained
    weight (``trainable``, as :func:`trainable_names` gives them) in the adapter's state. A checkpoint
    written before every process saved its own holds process 0's only: the others resume with a warning.
    ``sharded``: FSDP writes its own sharded format instead."""
    if not sharded and not (path / "model.safetensors").is_file():
        raise TuneguardError(f"{path}: no model.safetensors (tuneguard writes the adapter's state only as "
                             f"safetensors and never loads a pickled model file); {_INSTEAD}")
    if not sharded:  # Accelerate loads it with strict=False: a weight it lacks would silently restart untrained
        with safe_open(str(path / "model.safetensors"), "pt") as saved:
            missing = sorted(trainable - set(saved.keys()))
        if missing:
            raise TuneguardError(f"{path}: model.safetensors lacks {len(missing)} of the adapter's {len(trainable)} "
                                 f"trained weights (first: {missing[0]}; a multi-process checkpoint of an earlier "
                                 f"tuneguard held none), so they would restart untrained; {_INSTEAD}")
    rng = path / f"random_states_{process_index}.pkl"
    if process_index and not rng.exists():
        say(f"warning: {path} holds no random state of process {process_index} (an earlier tuneguard saved process "
            "0's only): it resumes with a fresh one, so its dropout masks differ from an uninterrupted run's")
        return
    try:
        states = load(rng)  # Accelerate's own reader, weights_only: nothing in it is executed
        missing = [k for k in ("random_state", "numpy_random_seed", "torch_manual_seed") if k not in states]
    except Exception as exc:
        missing = [_first_line(exc)]
    if missing:
        raise TuneguardError(f"{rng}: the random state cannot be restored ({', '.join(missing)}), so the resumed "
                             f"run would not continue exactly; {_INSTEAD}")


def _first_line(exc: Exception) -> str:
    if isinstance(exc, pickle.UnpicklingError):  # torch's own advice (weights_only=False) would run its code
        return "it holds objects other than tensors and plain values, which tuneguard never unpickles"
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"


FINGERPRINTED = ("model.source", "model.gguf_file", "model.revision", "quantization.method", "quantization.double_quant")
"""Recipe keys whose change makes another backbone fingerprint (``backbones.fingerprint``)."""


def check_same_run(path: Path, state: TrainState, processes: int, inputs: dict[str, str], named: list[str],
                   changed: list[str], total_steps: int) -> None:
    """What the recipe check cannot see: the process count, the contents behind the recipe's paths (another
    model or data under the same names: refused unless ``named`` with --resume-changed), and a checkpoint past the
    run's (changed) last step. A ``changed`` key of :data:`FINGERPRINTED` accepts the other fingerprint it makes."""
    if state.processes and state.processes != processes:
        raise TuneguardError(f"{path}: saved by {state.processes} processes, resumed with {processes}: the effective "
                             f"batch and each process's share of the rows would change; resume with {state.processes} "
                             f"(torchrun --nproc_per_node {state.processes}), or start again with --overwrite")
    accepted = set(named) | ({"model.source"} if set(changed) & set(FINGERPRINTED) else set())
    other = [key for key, digest in state.inputs.items() if inputs.get(key) != digest and key not in accepted]
    if other:
        raise TuneguardError(f"{path}: the contents of {', '.join(other)} changed since this checkpoint (same recipe, "
                             f"other files); resuming would mix two runs. Put them back, pass --resume-changed "
                             f"{','.join(other)} to resume anyway, or --overwrite")
    if state.step > total_steps:
        raise TuneguardError(f"{path}: step {state.step} is past the run's {total_steps} steps; delete the "
                             f"checkpoints past step {total_steps} to resume from an earlier one, or start again "
                             "with --overwrite")


def use_new_lr(scheduler: Any, lr: float) -> None:
    """The restored optimizer and scheduler carry the checkpoint's lr; a resume that changed it gets the new one.

    Each group keeps its ``lr_scale`` (layer-wise decay, restored with the optimizer's state), so the layers'
    ratios stay as the run started them.
    """
    inner: torch.optim.lr_scheduler.LambdaLR = scheduler.scheduler  # inside Accelerate's wrapper
    groups = inner.optimizer.param_groups
    inner.base_lrs = [lr * group.get("lr_scale", 1.0) for group in groups]
    for group, base, factor in zip(groups, inner.base_lrs, inner.lr_lambdas, strict=True):
        group["initial_lr"] = base
        group["lr"] = base * factor(inner.last_epoch)


_KEPT = "the kept adapter and the best value so far were chosen by the old rule"
_POSITION = "the data position is counted in optimizer steps of the old batch, so rows would be skipped or repeated"
NOT_RESUMABLE = {
    "train.layer_lr_decay": "the optimizer keeps its state in one group per layer, set by the decay",
    "train.batch_size": _POSITION, "train.grad_accum": _POSITION,
    "train.early_stopping_metric": _KEPT, "train.select": _KEPT, "train.forgetting_bound": _KEPT,
}
"""Recipe keys ``--resume-changed`` cannot accept, and why."""


def refuse_unresumable(resume_changed: list[str]) -> None:
    """Before anything loads: a named change that a restored optimizer cannot take is one line, not a traceback."""
    for key in resume_changed:
        if key in NOT_RESUMABLE:
            raise TuneguardError(f"--resume-changed {key}: cannot resume with it changed ({NOT_RESUMABLE[key]}); "
                                 "start again with --overwrite")
