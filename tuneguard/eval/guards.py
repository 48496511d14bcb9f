"""Guard rails checked before a before/after report is written.

Public tools have published "fine-tuned" numbers where the adapter silently was not applied; each
check here makes that impossible to miss: the report is refused when any of them fails.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from peft import PeftModel

from tuneguard.adapters.registry import spec_of_model
from tuneguard.adapters.state import frozen_checksum
from tuneguard.errors import TuneguardError

PROBE = "The capital of France is Paris. Water boils at 100 degrees Celsius at sea level."


@dataclass
class Guard:
    name: str
    passed: bool
    detail: str

    def to_dict(self) -> dict:
        return asdict(self)


def _probe_logits(model: PeftModel, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits.float()


def _probe(model: PeftModel, tokenizer) -> tuple[dict[str, torch.Tensor], str]:
    """The probe input: a sentence, or for an image backbone (no tokenizer) a fixed seeded noise image."""
    device = next(model.parameters()).device
    if tokenizer is not None:
        return {"input_ids": torch.tensor([tokenizer(PROBE)["input_ids"]], device=device)}, "a probe sentence"
    config = model.get_base_model().config
    size = config.image_size if isinstance(getattr(config, "image_size", None), int) else 64
    shape = (1, getattr(config, "num_channels", 3), size, size)
    return {"pixel_values": torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device)}, "a probe image"


def adapter_changes_outputs(model: PeftModel, tokenizer) -> Guard:
    inputs, what = _probe(model, tokenizer)
    was_training = model.training
    model.eval()
    tuned = _probe_logits(model, inputs)
    with model.disable_adapter():
        base = _probe_logits(model, inputs)
    model.train(was_training)
    diff = float((tuned[..., -base.shape[-2] :, :] - base).abs().max())
    return Guard("adapter applied", diff > 1e-5, f"max |logit(tuned) - logit(base)| = {diff:.4g} on {what}")


def adapter_weight_delta(model: PeftModel) -> Guard:
    """How far the adapter moved from a no-op, measured as its method's registry entry says (RMS weight
    deltas, IA3 scales away from 1); a method that changes no layer weight is left to the outputs guard."""
    spec = spec_of_model(model)
    if spec is not None and spec.moved is None:
        return Guard("adapter weights moved", True, f"{spec.name.replace('_', ' ')}: checked through the outputs guard")
    moved = spec.moved(model) if spec is not None and spec.moved is not None else []
    if not moved:
        return Guard("adapter weights moved", False, "no adapter weights found in the model")
    largest = max(moved)
    return Guard("adapter weights moved", largest > 1e-7, f"largest RMS weight delta per layer = {largest:.3g}")


def fingerprint_guard(adapter_fingerprint: str | None, fingerprints: tuple[str, str]) -> Guard:
    """The adapter sits on the weights it was trained on: the backbone's fingerprint, or the one version 1 gave the
    same files (adapters saved before version 2 carry that); an adapter saved without one passes."""
    earlier = " (the first version's fingerprint of the same files)" if adapter_fingerprint == fingerprints[1] else ""
    return Guard("backbone fingerprint", adapter_fingerprint in (None, *fingerprints),
                 f"adapter trained on {adapter_fingerprint or 'unknown'}{earlier}, evaluated on {fingerprints[0]}")


def require_trained_backbone(where: Path, adapter_fingerprint: str | None, fingerprints: tuple[str, str]) -> None:
    """One line for a verb that puts a run's adapter on its backbone (eval, check, lm-eval, compare, export) when the
    recipe's model files or quantization are no longer those it was trained on."""
    if not fingerprint_guard(adapter_fingerprint, fingerprints).passed:
        raise TuneguardError(f"{where}: its adapter was trained on backbone {adapter_fingerprint}; the recipe's "
                             f"model.source and quantization now give {fingerprints[0]} (the model's files changed "
                             "since training?): put the files back, or train again")


def run_guards(
    model: PeftModel, tokenizer, *, fingerprints: tuple[str, str], adapter_fingerprint: str | None,
    checksum_at_load: float, diverged: str | None = None,
) -> list[Guard]:
    """``fingerprints``: the backbone's, and the one version 1 gave it (adapters saved before version 2 carry
    that); ``diverged``: why training diverged (run.json), so an adapter that learned nothing is not reported."""
    guards = [
        adapter_changes_outputs(model, tokenizer),
        Guard("base = same weights, adapter disabled", abs(frozen_checksum(model) - checksum_at_load) <= 1e-6 * max(abs(checksum_at_load), 1.0),
              "frozen backbone weights unchanged since load; base is scored with disable_adapter() on them"),
        adapter_weight_delta(model),
        fingerprint_guard(adapter_fingerprint, fingerprints),
        Guard("training converged", diverged is None, f"training diverged: {diverged}" if diverged else
              "no non-finite loss, no loss stuck at or past a uniform guess, no gradient explosion"),
    ]
    return guards


def enforce(guards: list[Guard]) -> None:
    failed = [g for g in guards if not g.passed]
    if failed:
        raise TuneguardError("guard rail failed, no report written: " + "; ".join(f"{g.name}: {g.detail}" for g in failed))
