"""One PEFT config per adapter method, built from the recipe's ``adapter`` section."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from peft import (
    AdaLoraConfig,
    IA3Config,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    PeftConfig,
    PeftModel,
    PromptTuningConfig,
    TaskType,
    get_peft_model,
)
from transformers import PreTrainedModel

from tuneguard.adapters.freezing import layer_index
from tuneguard.errors import TuneguardError
from tuneguard.recipe import AdapterConfig
from tuneguard.weights import check_adapter

HEAD_NAMES = {"lm_head", "classifier", "score", "pooler", "embed_out"}
ATTENTION_HINTS = ("attn", "attention")
ATTENTION_LEAVES = {"q_proj", "k_proj", "v_proj", "o_proj", "query", "key", "value", "qkv_proj", "c_attn"}
FEEDFORWARD_OUT = ("down_proj", "fc2", "w2", "c_proj", "dense_4h_to_h")


def _is_linear(module: torch.nn.Module) -> bool:
    # bitsandbytes' Linear4bit / Linear8bitLt subclass nn.Linear.
    return isinstance(module, torch.nn.Linear)


def linear_module_names(model: PreTrainedModel) -> dict[str, str]:
    """Full name -> 'attention' | 'mlp' for every linear layer outside the output head and pooler."""
    kinds: dict[str, str] = {}
    for full, module in model.named_modules():
        parts = full.split(".")
        if not _is_linear(module) or HEAD_NAMES & set(parts):
            continue
        in_attention = any(h in p for p in parts[:-1] for h in ATTENTION_HINTS)
        kinds[full] = "attention" if in_attention or parts[-1] in ATTENTION_LEAVES else "mlp"
    return kinds


def resolve_targets(model: PreTrainedModel, target: str | list[str], layers: list[int] | None = None) -> list[str]:
    """Expand ``all-linear`` / ``attention`` / ``mlp`` or leaf names to full module names, keeping ``layers``.

    Full names, because leaf names are ambiguous (BERT has ``dense`` in attention, MLP and pooler);
    and the layer filter is applied here because PEFT skips ``layers_to_transform`` for exact names.
    """
    kinds = linear_module_names(model)
    if isinstance(target, str) and target in ("all-linear", "attention", "mlp"):
        names = [n for n, k in kinds.items() if target == "all-linear" or k == target]
    else:
        wanted = [target] if isinstance(target, str) else target
        missing = [t for t in wanted if not any(n == t or n.endswith(f".{t}") for n in kinds)]
        if missing:
            leaves = sorted({n.rsplit(".", 1)[-1] for n in kinds})
            raise TuneguardError(
                f"adapter.target_modules: no linear layer named {missing} in this model; "
                f"available: {leaves} or a preset (all-linear, attention, mlp)"
            )
        names = [n for n in kinds if any(n == t or n.endswith(f".{t}") for t in wanted)]
    if layers is not None:
        names = [n for n in names if layer_index(n) in set(layers)]
        if not names:
            raise TuneguardError(f"adapter.layers_to_transform: no targeted layer has an index in {layers}")
    return sorted(names)


def peft_config(cfg: AdapterConfig, model: PreTrainedModel, task_type: TaskType, total_steps: int) -> PeftConfig:
    if cfg.method == "prompt_tuning":
        return PromptTuningConfig(task_type=task_type, num_virtual_tokens=cfg.num_virtual_tokens)
    targets = resolve_targets(model, cfg.target_modules, cfg.layers_to_transform)
    if not targets:
        raise TuneguardError(f"adapter.target_modules: preset '{cfg.target_modules}' matches no layer in this model")
    common = dict(target_modules=targets, task_type=task_type)
    if cfg.method == "lora":
        init = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora"}[cfg.init]
        return LoraConfig(
            r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, use_rslora=cfg.use_rslora,
            use_dora=cfg.use_dora, init_lora_weights=init, **common,
        )
    if cfg.method == "ia3":
        kinds = linear_module_names(model)
        ff = [
            t for t in targets
            if kinds.get(t) == "mlp" and (t.endswith(FEEDFORWARD_OUT) or t.endswith("output.dense"))
        ]
        return IA3Config(feedforward_modules=ff, **common)
    if cfg.method == "loha":
        return LoHaConfig(r=cfg.r, alpha=cfg.alpha, module_dropout=cfg.dropout, **common)
    if cfg.method == "lokr":
        return LoKrConfig(r=cfg.r, alpha=cfg.alpha, module_dropout=cfg.dropout, **common)
    if cfg.method == "adalora":
        return AdaLoraConfig(
            init_r=max(cfg.r * 3 // 2, cfg.r + 1), target_r=cfg.r, lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout, total_step=max(total_steps, 10),
            tinit=max(total_steps // 10, 1), tfinal=max(total_steps // 5, 1), deltaT=1, **common,
        )
    raise TuneguardError(f"adapter.method: unknown method '{cfg.method}'")


def apply_adapter(
    model: PreTrainedModel, cfg: AdapterConfig, *, is_encoder: bool, total_steps: int
) -> PeftModel:
    """Wrap the frozen backbone with the recipe's adapter; only adapter (and new head) weights train."""
    task_type = TaskType.SEQ_CLS if is_encoder else TaskType.CAUSAL_LM
    config = peft_config(cfg, model, task_type, total_steps)
    try:
        peft_model = get_peft_model(model, config)
    except (ValueError, TypeError, NotImplementedError) as exc:
        raise TuneguardError(f"adapter.method '{cfg.method}' cannot be applied to this backbone: {exc}") from None
    for name, p in peft_model.named_parameters():
        if ".ranknum." in name:
            # AdaLoRA's rank count is a constant; PEFT's cast of adapter tensors to a bf16/fp16
            # backbone's dtype re-creates it as a trainable Parameter, and AdamW would then move it.
            p.requires_grad_(False)
    return peft_model


def load_adapter(model: PreTrainedModel | PeftModel, adapter_dir: Path, *, name: str = "default") -> PeftModel:
    """A saved adapter on ``model``, from safetensors only (a pickled ``adapter_model.bin`` is refused).

    On a ``PeftModel`` it is added beside the adapters already there, under ``name`` (``set_adapter`` switches).
    """
    if not (adapter_dir / "adapter_config.json").exists():
        raise TuneguardError(f"{adapter_dir}: no trained adapter (adapter_config.json missing)")
    if not (adapter_dir / "adapter_model.safetensors").exists():
        raise TuneguardError(f"{adapter_dir}: no adapter_model.safetensors (tuneguard does not unpickle weights)")
    check_adapter(adapter_dir)
    with warnings.catch_warnings():
        # AdaLoRA's saved rank_pattern is keyed by parameter, and PEFT warns that no *module* has those
        # names; it still prunes each layer to its saved rank (tests/test_train.py checks the reload).
        warnings.filterwarnings("ignore", message="The following rank_pattern keys did not match")
        if isinstance(model, PeftModel):
            model.load_adapter(str(adapter_dir), adapter_name=name)
            return model
        return PeftModel.from_pretrained(model, str(adapter_dir), adapter_name=name)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total), counting a 4-bit packed weight at its real element count."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if hasattr(p, "quant_state") and p.quant_state is not None:
            n = int(torch.Size(p.quant_state.shape).numel())
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def adalora_orthogonality(model: torch.nn.Module) -> torch.Tensor | None:
    """AdaLoRA's orthogonal regularizer (PEFT adds it only when its own forward computes the loss).

    tuneguard computes the loss itself, so the term is added here: the mean Frobenius distance of
    P Pᵀ (lora_A) and Qᵀ Q (lora_B) from the identity, times ``orth_reg_weight``.
    """
    config = getattr(model, "active_peft_config", None)
    if not isinstance(config, AdaLoraConfig) or config.orth_reg_weight == 0:
        return None
    terms = []
    for name, p in model.named_parameters():
        if p.requires_grad and ("lora_A" in name or "lora_B" in name):
            cov = p @ p.T if "lora_A" in name else p.T @ p
            terms.append(torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)))
    return config.orth_reg_weight * torch.stack(terms).mean() if terms else None


def _lora_classes() -> tuple[type, ...]:
    """PEFT's plain LoRA layers (AdaLoRA and the other subclasses compute something else)."""
    from peft.tuners.lora import layer

    classes: list[type] = [layer.Linear]
    try:
        from peft.tuners.lora.bnb import Linear4bit

        classes.append(Linear4bit)
    except ImportError:
        pass
    return tuple(classes)


def fusable_lora(layer: torch.nn.Module) -> bool:
    """A LoRA layer the training fast path can fuse: on a plain or 4-bit linear base, with vanilla adapters
    (no DoRA, bias or variant)."""
    if type(layer) not in _lora_classes():
        return False
    base = layer.get_base_layer()
    four_bit = hasattr(getattr(base, "weight", None), "quant_state")
    if not (four_bit or type(base) is torch.nn.Linear) or getattr(layer, "fan_in_fan_out", False):
        return False
    return not layer.lora_variant and not any(getattr(layer, "lora_bias", {}).values())
