"""Guard rails checked before a before/after report is written.

Public tools have published "fine-tuned" numbers where the adapter silently was not applied; each
check here makes that impossible to miss: the report is refused when any of them fails.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from peft import PeftModel

from tuneguard.errors import TuneguardError

PROBE = "The capital of France is Paris. Water boils at 100 degrees Celsius at sea level."


@dataclass
class Guard:
    name: str
    passed: bool
    detail: str

    def to_dict(self) -> dict:
        return asdict(self)


def frozen_checksum(model: torch.nn.Module) -> float:
    """A cheap checksum of every weight that is not an adapter weight (quantized storage included).

    Summed in float64 a million elements at a time, so the embedding never gets a full float64 copy.
    """
    total = 0.0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if _is_adapter_param(name):
                continue
            data = p.data if p.dtype.is_floating_point else p.data.view(torch.uint8)
            for chunk in data.reshape(-1).split(1 << 20):
                wide = chunk.double()
                total += float(wide.sum()) + 1e-3 * float(wide.abs().sum())
    return total


def _is_adapter_param(name: str) -> bool:
    # AdaLoRA's ``ranknum`` is a frozen parameter, but the adapter's: the backbone had none at load.
    return any(k in name for k in ("lora_", "ia3_", "hada_", "lokr_", "ranknum", "prompt_encoder", "modules_to_save"))


def _probe_logits(model: PeftModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def adapter_changes_outputs(model: PeftModel, tokenizer) -> Guard:
    ids = torch.tensor([tokenizer(PROBE)["input_ids"]], device=next(model.parameters()).device)
    was_training = model.training
    model.eval()
    tuned = _probe_logits(model, ids)
    with model.disable_adapter():
        base = _probe_logits(model, ids)
    model.train(was_training)
    diff = float((tuned[..., -base.shape[-2] :, :] - base).abs().max())
    return Guard("adapter applied", diff > 1e-5, f"max |logit(tuned) - logit(base)| = {diff:.4g} on a probe sentence")


def adapter_weight_delta(model: PeftModel) -> Guard:
    """How far the adapter moved from a no-op: RMS weight deltas, or IA3 scales away from 1."""
    with torch.no_grad():
        ratios = _delta_ratios(model)
    ia3 = [p for n, p in model.named_parameters() if "ia3_" in n]
    ratios += [float((p.detach().float() - 1).abs().max()) for p in ia3]
    prompt = [p for n, p in model.named_parameters() if "prompt_encoder" in n]
    if not ratios and prompt:
        return Guard("adapter weights moved", True, "prompt tuning: checked through the outputs guard")
    if not ratios:
        return Guard("adapter weights moved", False, "no adapter weights found in the model")
    largest = max(ratios)
    return Guard("adapter weights moved", largest > 1e-7, f"largest RMS weight delta per layer = {largest:.3g}")


def _delta_weight(module: torch.nn.Module, adapter: str) -> torch.Tensor | None:
    """The layer's weight delta: ``get_delta_weight`` (LoRA, DoRA, LoHa, LoKr, AdaLoRA), or AdaLoRA's
    formula for its 4-bit and 8-bit layers, which do not define it."""
    if hasattr(module, "get_delta_weight"):
        return module.get_delta_weight(adapter)
    if hasattr(module, "lora_E"):
        m = module
        return m.lora_B[adapter] @ (m.lora_A[adapter] * m.lora_E[adapter]) * m.scaling[adapter] / (m.ranknum[adapter] + 1e-5)
    return None


def _delta_ratios(model: PeftModel) -> list[float]:
    """RMS of each adapted layer's weight delta."""
    ratios = []
    for module in model.modules():
        if getattr(module, "base_layer", None) is None or not getattr(module, "active_adapters", None):
            continue
        try:
            delta = _delta_weight(module, module.active_adapters[0])
        except (TypeError, RuntimeError, AttributeError, KeyError):
            continue
        if delta is not None:
            ratios.append(float(delta.float().norm()) / max(float(delta.numel()) ** 0.5, 1.0))
    return ratios


def run_guards(
    model: PeftModel, tokenizer, *, fingerprint: str, adapter_fingerprint: str | None, checksum_at_load: float,
    diverged: str | None = None,
) -> list[Guard]:
    """``diverged``: why training diverged (run.json), so an adapter that learned nothing is not reported."""
    guards = [
        adapter_changes_outputs(model, tokenizer),
        Guard("base = same weights, adapter disabled", abs(frozen_checksum(model) - checksum_at_load) <= 1e-6 * max(abs(checksum_at_load), 1.0),
              "frozen backbone weights unchanged since load; base is scored with disable_adapter() on them"),
        adapter_weight_delta(model),
        Guard("backbone fingerprint", adapter_fingerprint in (None, fingerprint),
              f"adapter trained on {adapter_fingerprint or 'unknown'}, evaluated on {fingerprint}"),
        Guard("training converged", diverged is None, f"training diverged: {diverged}" if diverged else
              "no non-finite loss, no loss stuck at a uniform guess, no gradient explosion"),
    ]
    return guards


def enforce(guards: list[Guard]) -> None:
    failed = [g for g in guards if not g.passed]
    if failed:
        raise TuneguardError("guard rail failed, no report written: " + "; ".join(f"{g.name}: {g.detail}" for g in failed))
