"""The adapter-method registry: one ``MethodSpec`` per recipe ``adapter.method``, in ``METHODS``.

Each entry is what PEFT-style code keeps per method: the config builder, the capabilities, the names
of its parameters, its extra loss and per-step hook, and how to tell that it moved. Everything else
(training, guards, export, reports) asks the registry rather than testing method names.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from peft import (
    AdaLoraConfig,
    IA3Config,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    PeftConfig,
    PeftModel,
    PeftType,
    PromptTuningConfig,
    TaskType,
    get_peft_model,
)
from safetensors.torch import load_file
from transformers import PreTrainedModel

from tuneguard.adapters.capabilities import CAPABILITIES, Capabilities
from tuneguard.adapters.freezing import layer_index
from tuneguard.backbones import IMAGE_HEAD
from tuneguard.errors import TuneguardError
from tuneguard.recipe import AdapterConfig
from tuneguard.weights import check_adapter

HEAD_NAMES = {"lm_head", "classifier", "score", "pooler", "embed_out"}
ATTENTION_HINTS = ("attn", "attention")
ATTENTION_LEAVES = {"q_proj", "k_proj", "v_proj", "o_proj", "query", "key", "value", "qkv_proj", "c_attn"}
FEEDFORWARD_OUT = ("down_proj", "fc2", "w2", "c_proj", "dense_4h_to_h")


def _is_linear(module: torch.nn.Module) -> bool:
    """A linear layer, or a dense 2-D convolution (image backbones; PEFT's LoRA has a Conv2d layer, and a
    convolution is a linear map of its receptive field). Depthwise/grouped convolutions are left out."""
    # bitsandbytes' Linear4bit / Linear8bitLt subclass nn.Linear.
    return isinstance(module, torch.nn.Linear) or (isinstance(module, torch.nn.Conv2d) and module.groups == 1)


def linear_module_names(model: PreTrainedModel) -> dict[str, str]:
    """Full name -> 'attention' | 'mlp' for every linear (or dense conv) layer outside the output head and pooler."""
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
            regex = " (names match a module's name or its dotted ending, not a regular expression)" if any(
                ch in "".join(missing) for ch in "*[]()|^$\\+?") else ""
            raise TuneguardError(
                f"adapter.target_modules: no linear layer named {missing} in this model{regex}; "
                f"available: {leaves} or a preset (all-linear, attention, mlp)"
            )
        names = [n for n in kinds if any(n == t or n.endswith(f".{t}") for t in wanted)]
    if layers is not None:
        names = [n for n in names if layer_index(n) in set(layers)]
        if not names:
            raise TuneguardError(f"adapter.layers_to_transform: no targeted layer has an index in {layers}")
    return sorted(names)


def _targets(cfg: AdapterConfig, model: PreTrainedModel) -> list[str]:
    targets = resolve_targets(model, cfg.target_modules, cfg.layers_to_transform)
    if not targets:
        raise TuneguardError(f"adapter.target_modules: preset '{cfg.target_modules}' matches no layer in this model")
    return targets


def _lora_config(cfg: AdapterConfig, model: PreTrainedModel, task_type: TaskType, total_steps: int) -> PeftConfig:
    init = {"default": True, "gaussian": "gaussian"}[cfg.init]  # PiSSA/OLoRA: refused (AdapterConfig.method_problem)
    return LoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, use_rslora=cfg.use_rslora, use_dora=cfg.use_dora,
        init_lora_weights=init, target_modules=_targets(cfg, model), task_type=task_type,
    )


def _ia3_config(cfg: AdapterConfig, model: PreTrainedModel, task_type: TaskType, total_steps: int) -> PeftConfig:
    """IA3 scales a feed-forward layer's input, every other targeted layer's output: name the former."""
    targets, kinds = _targets(cfg, model), linear_module_names(model)
    ff = [t for t in targets if kinds.get(t) == "mlp" and (t.endswith(FEEDFORWARD_OUT) or t.endswith("output.dense"))]
    return IA3Config(feedforward_modules=ff, target_modules=targets, task_type=task_type)


def _loha_config(cfg: AdapterConfig, model: PreTrainedModel, task_type: TaskType, total_steps: int) -> PeftConfig:
    return LoHaConfig(
        r=cfg.r, alpha=cfg.alpha, module_dropout=cfg.dropout, target_modules=_targets(cfg, model), task_type=task_type
    )


def _lokr_config(cfg: AdapterConfig, model: PreTrainedModel, task_type: TaskType, total_steps: int) -> PeftConfig:
    return LoKrConfig(
        r=cfg.r, alpha=cfg.alpha, module_dropout=cfg.dropout, target_modules=_targets(cfg, model), task_type=task_type
    )


def _adalora_config(cfg: AdapterConfig, model: PreTrainedModel, task_type: TaskType, total_steps: int) -> PeftConfig:
    """Start at 1.5x the recipe's rank and prune to it, the schedule scaled to the run's length (a floor of 10 steps
    left runs under 10 short of the final allocation, above ``target_r``; PEFT needs 3: warm-up, prune, mask)."""
    return AdaLoraConfig(
        init_r=max(cfg.r * 3 // 2, cfg.r + 1), target_r=cfg.r, lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout, total_step=max(total_steps, 3),
        tinit=max(total_steps // 10, 1), tfinal=max(total_steps // 5, 1), deltaT=1,
        target_modules=_targets(cfg, model), task_type=task_type,
    )


def _prompt_tuning_config(
    cfg: AdapterConfig, model: PreTrainedModel, task_type: TaskType, total_steps: int
) -> PeftConfig:
    return PromptTuningConfig(task_type=task_type, num_virtual_tokens=cfg.num_virtual_tokens)


def _nothing(*_: object) -> None:
    """The hook of a method that needs nothing at that point (and adds no loss term)."""
    return None


def _no_state(_: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state of a method whose per-step hook keeps none."""
    return {}


def _freeze_ranknum(model: PeftModel) -> None:
    """AdaLoRA's rank count is a constant; PEFT's cast of adapter tensors to a bf16/fp16 backbone's
    dtype re-creates it as a trainable Parameter, and AdamW would then move it."""
    for name, p in model.named_parameters():
        if ".ranknum." in name:
            p.requires_grad_(False)


def _adalora_orthogonality(model: torch.nn.Module) -> torch.Tensor | None:
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


def _adalora_allocate(model: torch.nn.Module, step: int) -> None:
    """AdaLoRA's rank budget: after each optimizer step, it reads the grads and prunes singular values."""
    model.base_model.update_and_allocate(step)


ALLOCATOR_AVERAGES = ("ipt", "exp_avg_ipt", "exp_avg_unc")


def _adalora_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The rank allocator's importance averages and the rank pattern so far: neither parameters nor optimizer
    state, so a checkpoint without them resumes to other ranks than the uninterrupted run keeps."""
    base = model.base_model
    state = {f"{kind}/{n}": t.detach().contiguous() for kind in ALLOCATOR_AVERAGES
             for n, t in getattr(base.rankallocator, kind).items()}
    pattern = base.peft_config[base.trainable_adapter_name].rank_pattern or {}
    return state | {f"rank_pattern/{n}": torch.tensor(mask, dtype=torch.bool) for n, mask in pattern.items()}


def _adalora_restore(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    base = model.base_model
    device = next(p.device for p in model.parameters() if p.requires_grad)  # read from disk to the CPU
    for kind in ALLOCATOR_AVERAGES:
        setattr(base.rankallocator, kind,
                {k.split("/", 1)[1]: t.to(device) for k, t in state.items() if k.startswith(f"{kind}/")})
    pattern = {k.split("/", 1)[1]: t.tolist() for k, t in state.items() if k.startswith("rank_pattern/")}
    base.peft_config[base.trainable_adapter_name].rank_pattern = pattern or None


def _delta_weight(module: torch.nn.Module, adapter: str) -> torch.Tensor | None:
    """``get_delta_weight``: LoRA (DoRA's is its LoRA part), LoHa, LoKr."""
    return module.get_delta_weight(adapter) if hasattr(module, "get_delta_weight") else None


def _svd_delta_weight(module: torch.nn.Module, adapter: str) -> torch.Tensor | None:
    """AdaLoRA's delta, by its formula on the 4-bit and 8-bit layers, which do not define ``get_delta_weight``."""
    if hasattr(module, "get_delta_weight"):
        return module.get_delta_weight(adapter)
    if hasattr(module, "lora_E"):
        m = module
        return m.lora_B[adapter] @ (m.lora_A[adapter] * m.lora_E[adapter]) * m.scaling[adapter] / (m.ranknum[adapter] + 1e-5)
    return None


def _layer_deltas(
    model: torch.nn.Module, delta: Callable[[torch.nn.Module, str], torch.Tensor | None]
) -> list[float]:
    """RMS of each adapted layer's weight delta."""
    ratios = []
    with torch.no_grad():
        for module in model.modules():
            if getattr(module, "base_layer", None) is None or not getattr(module, "active_adapters", None):
                continue
            try:
                d = delta(module, module.active_adapters[0])
            except (TypeError, RuntimeError, AttributeError, KeyError):
                continue
            if d is not None:
                ratios.append(float(d.float().norm()) / max(float(d.numel()) ** 0.5, 1.0))
    return ratios


def _ia3_scales(model: torch.nn.Module) -> list[float]:
    """IA3 learns scales that start at 1: how far each moved from 1."""
    with torch.no_grad():
        return [float((p.detach().float() - 1).abs().max()) for n, p in model.named_parameters() if "ia3_" in n]


ConfigBuilder = Callable[[AdapterConfig, PreTrainedModel, TaskType, int], PeftConfig]


@dataclass(frozen=True, kw_only=True)
class MethodSpec(Capabilities):
    """One adapter method: its capabilities (``capabilities.py``) plus the code that applies and checks it."""

    name: str
    """The recipe's ``adapter.method``."""
    peft_type: PeftType
    """What PEFT records in a saved or loaded adapter's config, to find the method of a model."""
    build_config: ConfigBuilder
    """(adapter section, backbone, task type, total optimizer steps) -> the PEFT config."""
    param_markers: tuple[str, ...]
    """Substrings that name its parameters, so the frozen-backbone checksum skips them."""
    moved: Callable[[torch.nn.Module], list[float]] | None = partial(_layer_deltas, delta=_delta_weight)
    """How far each adapted layer moved from a no-op; None where no layer weight changes (prompt tuning),
    which the outputs guard checks instead."""
    after_apply: Callable[[PeftModel], None] = _nothing
    """Fix-ups on the freshly wrapped model, before the optimizer sees its parameters."""
    extra_loss: Callable[[torch.nn.Module], torch.Tensor | None] = _nothing
    """A term added to the training loss (None: nothing to add)."""
    after_step: Callable[[torch.nn.Module, int], None] = _nothing
    """Called with the step count after each optimizer step."""
    step_state: Callable[[torch.nn.Module], dict[str, torch.Tensor]] = _no_state
    """What its per-step hook keeps beyond parameters and optimizer state, for a checkpoint ({}: nothing)."""
    restore_step_state: Callable[[torch.nn.Module, dict[str, torch.Tensor]], None] = _nothing
    """Puts ``step_state``'s tensors back into a resumed model."""


def _spec(name: str, **parts: Any) -> MethodSpec:
    return MethodSpec(name=name, **asdict(CAPABILITIES[name]), **parts)


METHODS: dict[str, MethodSpec] = {
    "lora": _spec("lora", peft_type=PeftType.LORA, build_config=_lora_config, param_markers=("lora_",)),
    "ia3": _spec("ia3", peft_type=PeftType.IA3, build_config=_ia3_config, param_markers=("ia3_",), moved=_ia3_scales),
    "loha": _spec("loha", peft_type=PeftType.LOHA, build_config=_loha_config, param_markers=("hada_",)),
    "lokr": _spec("lokr", peft_type=PeftType.LOKR, build_config=_lokr_config, param_markers=("lokr_",)),
    "adalora": _spec(
        # ``ranknum`` is a frozen parameter, but the adapter's: the backbone had none at load.
        "adalora", peft_type=PeftType.ADALORA, build_config=_adalora_config, param_markers=("lora_", "ranknum"),
        moved=partial(_layer_deltas, delta=_svd_delta_weight), after_apply=_freeze_ranknum,
        extra_loss=_adalora_orthogonality, after_step=_adalora_allocate, step_state=_adalora_state,
        restore_step_state=_adalora_restore,
    ),
    "prompt_tuning": _spec(
        "prompt_tuning", peft_type=PeftType.PROMPT_TUNING, build_config=_prompt_tuning_config,
        param_markers=("prompt_encoder",), moved=None,
    ),
}
"""One entry per recipe ``adapter.method`` (the keys of ``CAPABILITIES``)."""

ADAPTER_MARKERS: tuple[str, ...] = (
    *dict.fromkeys(m for s in METHODS.values() for m in s.param_markers), "modules_to_save",
)
"""Every method's parameter markers, plus PEFT's trained copy of a new head."""


def is_adapter_param(name: str) -> bool:
    """Whether a parameter of a PEFT model is the adapter's (or its trained head's), not the backbone's."""
    return any(k in name for k in ADAPTER_MARKERS)


def method_spec(cfg: AdapterConfig) -> MethodSpec:
    """The registry entry of the recipe's adapter method."""
    try:
        return METHODS[cfg.method]
    except KeyError:
        raise TuneguardError(f"adapter.method: unknown method '{cfg.method}'") from None


def spec_of_model(model: torch.nn.Module) -> MethodSpec | None:
    """The registry entry of a PEFT model's active adapter (None: no adapter, or one tuneguard does not train)."""
    peft_type = getattr(getattr(model, "active_peft_config", None), "peft_type", None)
    return next((s for s in METHODS.values() if s.peft_type == peft_type), None)


def peft_config(cfg: AdapterConfig, model: PreTrainedModel, task_type: TaskType, total_steps: int) -> PeftConfig:
    """The PEFT config of the recipe's adapter section, by its method's builder."""
    return method_spec(cfg).build_config(cfg, model, task_type, total_steps)


def apply_adapter(
    model: PreTrainedModel, cfg: AdapterConfig, *, is_encoder: bool, total_steps: int, image: bool = False
) -> PeftModel:
    """Wrap the frozen backbone with the recipe's adapter; only adapter (and new head) weights train."""
    spec = method_spec(cfg)
    if is_encoder and not spec.classifier:
        others = ", ".join(name for name, caps in CAPABILITIES.items() if caps.classifier)
        raise TuneguardError(f"adapter.method '{cfg.method}' adapts a language model (a decoder); this backbone is a "
                             f"classifier with its own head: use one of {others}")
    # PEFT has no image task type: an image classifier's new head is named as trained and saved with the adapter.
    task_type = None if image else TaskType.SEQ_CLS if is_encoder else TaskType.CAUSAL_LM
    config = spec.build_config(cfg, model, task_type, total_steps)
    if image:
        config.modules_to_save = [IMAGE_HEAD]
    try:
        peft_model = get_peft_model(model, config)
    except (ValueError, TypeError, NotImplementedError) as exc:
        raise TuneguardError(f"adapter.method '{cfg.method}' cannot be applied to this backbone: {exc}") from None
    spec.after_apply(peft_model)
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
        else:
            model = PeftModel.from_pretrained(model, str(adapter_dir), adapter_name=name)
    if model.peft_config[name].peft_type == PeftType.ADALORA:
        _exact_adalora(model, adapter_dir, name)
    return model


def _exact_adalora(model: PeftModel, adapter_dir: Path, name: str) -> None:
    """PEFT rebuilds AdaLoRA's layers at their saved ranks in the base layer's dtype (bf16 compute) before it loads
    the weights, so the saved fp32 values arrive rounded (0.2%, logits off by up to 0.7); they are copied in
    again now that the layers are fp32 again. Keys as PEFT saves them, with the adapter's name added."""
    saved = load_file(str(adapter_dir / "adapter_model.safetensors"))
    names = set(model.state_dict())
    layers = {f"{key}.{name}": value for key, value in saved.items() if f"{key}.{name}" in names}
    lost = [key for key in saved if "lora_" in key and f"{key}.{name}" not in names]
    if lost:  # a head (modules_to_save) is keyed otherwise and was never rebuilt: PEFT's load stands for it
        raise TuneguardError(f"{adapter_dir}: AdaLoRA weights that match no layer: {lost[:3]}")
    model.load_state_dict(layers, strict=False)


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
