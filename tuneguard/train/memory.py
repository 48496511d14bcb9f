"""Predict the peak memory of a training recipe before loading anything heavy.

Peak = the larger of loading (runtime + the mapped checkpoint file + the weights being built) and
training: runtime (imported libraries; CPU only) + frozen weights at their bit width (+ the mmapped
checkpoint file while it stays mapped: the fast path releases it) + adapter weights, gradients and
AdamW state + the activations kept for backward (per layer and token, from the config's shapes and
which tensors each layer saves; read off saved-tensor hooks on a LoRA step, and a test holds the fast
path's count to them) + what glibc's heap keeps around them on CPU + the largest transient at the loss
(one chunk of logits and the head in bf16).
Activations are sized by the widest batch the training data makes (its longest row, rounded up as
batches are), not by ``data.max_length``, and by whether they carry a 4-D attention mask (packed
or padded rows), which makes every layer keep more under SDPA (:func:`mask_bytes_per_token`; not
under the fast path's blocked attention on CPU). Encoders and image backbones are small and
each keeps other tensors, so they are not modelled: one training forward of a random-weight copy at
the recipe's batch shape is counted instead. The bench prints the prediction next to the measured
peak, and a test checks it against a measured run, so the model stays honest.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch

from tuneguard.recipe import Recipe
from tuneguard.train import attention
from tuneguard.train.losses import chunk_rows

MB = 2**20
ENV_BUDGET = "TUNEGUARD_MEMORY_BUDGET_MB"
TARGET_SHARE = 0.5
"""The default peak target, as a share of the usual way's predicted peak."""
RUNTIME_MB_CPU = 500.0
"""RSS of a process that has imported torch, transformers, peft, accelerate and bitsandbytes (CPU)."""
FRAGMENTATION = 1.75
"""The usual way's (and the probe's) peak RSS / live bytes for activations: glibc keeps freed transients
between long-lived tensors."""
HOLES = 0.7
"""The fast path on CPU: freed transients glibc keeps between the tensors a layer keeps, as a share of what the
layer would keep in the residual stream's width. The transients are made at that width (fp32 on a quantized
backbone) whatever the compute dtype, so a share of what is kept would undercount bf16; fitted to agnews-lora
at 768-3,072 tokens a micro-batch, the bench configuration, sst2-qlora and gsm8k-sft, in fp32 and bf16
(bench/README.md, "The estimator's fast-path model"), fp32 with the layers on oneDNN: on MKL, which the probe keeps
only where it is clearly faster, glibc left ~6% more (bench/README.md, "The layers' kernel and the peak")."""
RECOMPUTED_HOLES = 0.3
"""The same for a checkpointed layer, as a share of what it would keep in the compute dtype: its forward keeps
only its input, and leaves fewer holes, fewer still under bf16 (agnews-lora at 3,072 tokens a micro-batch with
12, 15 and 19 of 30 layers recomputed in fp32, 12 and 15 in bf16)."""
BITS = {"none": None, "nf4": 4, "fp4": 4, "int8": 8}
ADAM_BYTES = 16
"""Per trainable parameter: fp32 weight, gradient and AdamW's two moments."""


@dataclass
class ModelShape:
    """What the estimate needs from a decoder config."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    linear_params: int
    """Parameters of the decoder layers' linear projections (the ones that get quantized)."""
    other_params: int
    """Embeddings, norms, an untied head: kept in floating point."""

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        h = config.hidden_size
        f = getattr(config, "intermediate_size", None) or 4 * h
        heads = config.num_attention_heads
        kv = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or h // heads
        n = config.num_hidden_layers
        per_layer = 2 * h * heads * head_dim + 2 * h * kv * head_dim + 3 * h * f
        embed = config.vocab_size * h * (1 if getattr(config, "tie_word_embeddings", False) else 2)
        return cls(h, f, n, heads, kv, config.vocab_size, per_layer * n, embed + n * 2 * h + h)

    @property
    def kv_dim(self) -> int:
        return self.hidden * self.kv_heads // self.heads


@dataclass
class AdapterShape:
    trainable_params: int
    rank: int = 0
    per_layer: int = 0
    """Adapted linear layers per decoder layer."""
    dropout: float = 0.0
    fused: bool = False
    """LoRA layers the fast path fuses (plain LoRA / rsLoRA, not DoRA or other methods)."""


@dataclass
class MemoryEstimate:
    """Predicted peak and its parts, in MB."""

    peak_mb: float
    parts: dict[str, float] = field(default_factory=dict)
    inputs: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def activation_bytes_per_token(
    shape: ModelShape, adapter: AdapterShape, *, quantized: bool, fastpath: bool, compute_bytes: int = 2,
    stream_bytes: int | None = None, blocked: bool = False,
) -> float:
    """Bytes one decoder layer keeps for backward, per token.

    The residual stream is fp32 on a quantized backbone (bitsandbytes casts outputs back to the
    input's dtype) and in the weights' dtype otherwise; matmuls and attention run in the compute
    dtype (``compute_bytes``: 2 under bf16, 4 in fp32, as the numerics probe chose). ``blocked``: the
    fast path's attention on CPU, which rebuilds its output in backward instead of keeping it.
    """
    h, f, kv, r, c = shape.hidden, shape.intermediate, shape.kv_dim, adapter.rank, compute_bytes
    stream = stream_bytes or (4 if quantized else c)
    norms = 2 * h * stream
    attention = c * ((1 if blocked else 2) * h + 2 * kv)  # q, k, v (and SDPA's output)
    mlp = 2 * f * c if fastpath else 3 * f * stream  # fast: gate and up; else the activation's input, output, up
    widths = [h] * max(adapter.per_layer - 1, 0) + [f] * min(adapter.per_layer, 1)
    if fastpath and adapter.fused:
        # One copy per distinct input, A x, and the int32 positions dropout zeroed (the MLP's input to down is
        # rebuilt in backward, not kept).
        adapters = c * 3 * h + c * r * adapter.per_layer + 4 * adapter.dropout * sum(widths)
    else:
        # PEFT: per layer, the fp32 dropout noise and the copy of the dropped input, and A x.
        adapters = sum((4 * w if adapter.dropout > 0 else 0) + c * w + c * r for w in widths)
    return norms + attention + mlp + adapters


def mask_bytes_per_token(shape: ModelShape, seq: int, compute_bytes: int) -> int:
    """What a layer keeps besides, per token, when batches carry a 4-D attention mask (position_ids that restart:
    packed documents, padding): transformers then repeats k and v to every head for SDPA, and each layer keeps
    its own copy of the mask (``seq`` values per token) in the compute dtype."""
    return compute_bytes * (2 * (shape.hidden - shape.kv_dim) + seq)


def estimate(
    shape: ModelShape, adapter: AdapterShape, *, quant: str, batch: int, seq: int, fastpath: bool, masked: bool = True,
    checkpointed_layers: int = 0, device_type: str = "cpu", weights_file_mb: float = 0.0, compute_bytes: int = 2,
    weight_bytes: int = 2,
) -> MemoryEstimate:
    """Peak memory of one training process for these shapes and settings (dtypes as byte widths)."""
    bits = BITS[quant]
    quantized = bits is not None
    tokens = batch * seq
    float_bytes = 4 if quantized else weight_bytes  # quantized backbones keep their other weights in fp32
    weights = shape.linear_params * (bits / 8 * 1.016 if bits else float_bytes) + shape.other_params * float_bytes
    cpu = device_type == "cpu"
    blocked = fastpath and attention.covers(device_type)

    def kept_per_token(compute: int) -> float:
        return activation_bytes_per_token(shape, adapter, quantized=quantized, fastpath=fastpath, compute_bytes=compute,
                                          stream_bytes=float_bytes, blocked=blocked)

    per_token = kept_per_token(compute_bytes)
    if masked and not blocked:  # blocked attention keeps the one mask every layer shares
        per_token += mask_bytes_per_token(shape, seq, compute_bytes)
    heap = cpu and fastpath  # glibc's holes, counted per layer (the usual way: FRAGMENTATION, below)
    layer = per_token + (HOLES * kept_per_token(float_bytes) if heap else 0.0)
    recomputed = shape.hidden * float_bytes + (RECOMPUTED_HOLES * per_token if heap else 0.0)
    activations = tokens * ((shape.layers - checkpointed_layers) * layer + checkpointed_layers * recomputed)
    if checkpointed_layers == shape.layers:
        activations += tokens * layer  # the last layer recomputed, when nothing else is kept
    rows = min(tokens, chunk_rows(shape.vocab))
    head_copy = shape.vocab * shape.hidden * compute_bytes if compute_bytes != float_bytes else 0  # the head cast to compute
    logits = rows * shape.vocab * 8 + head_copy + tokens * shape.hidden * 4
    parts = {
        "runtime": RUNTIME_MB_CPU if cpu else 0.0,
        "weights": weights / MB,
        "weights_file_mapping": weights_file_mb if cpu and not fastpath else 0.0,
        "adapter_and_optimizer": adapter.trainable_params * ADAM_BYTES / MB,
        "activations": activations * (FRAGMENTATION if cpu and not fastpath else 1.0) / MB,
        "logits": logits / MB,
    }
    # Loading touches every page of the mapped checkpoint while the weights are quantized, and the fast
    # path then copies the float weights out of the mapping before it is dropped: on CPU that can be
    # the process's high-water mark when the batch is small.
    copied = shape.other_params * float_bytes if cpu and fastpath and quantized else 0.0
    load_mb = parts["runtime"] + (weights_file_mb if cpu else 0.0) + (weights + copied) / MB
    train_mb = sum(parts.values())
    inputs = {"quant": quant, "batch": batch, "seq": seq, "masked": masked, "fastpath": fastpath,
              "blocked_attention": blocked, "checkpointed_layers": checkpointed_layers,
              "compute_bytes": compute_bytes, "weight_bytes": weight_bytes,
              "trainable_params": adapter.trainable_params, "device": device_type,
              "load_peak_mb": round(load_mb, 1), "train_peak_mb": round(train_mb, 1),
              "peak_at": "loading" if load_mb > train_mb else "training"}
    return MemoryEstimate(round(max(train_mb, load_mb), 1), {k: round(v, 1) for k, v in parts.items()}, inputs)


def adapter_shape(model: torch.nn.Module) -> AdapterShape:
    """Rank, adapted layers per decoder layer, dropout and fusability of a PEFT model's adapter."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from tuneguard.adapters.registry import fusable_lora

    ranks: list[int] = []
    per_layer: dict[str, int] = {}
    dropout, fused = 0.0, False
    for name, module in model.named_modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        layer = name.split(".layers.")[-1].split(".")[0] if ".layers." in name else ""
        per_layer[layer] = per_layer.get(layer, 0) + 1
        ranks.extend(v for v in getattr(module, "r", {}).values() if isinstance(v, int))
        drops = [getattr(d, "p", 0.0) for d in getattr(module, "lora_dropout", {}).values()]
        dropout = max([dropout, *drops, *getattr(module, "module_dropout", {}).values()])
        fused = fused or fusable_lora(module)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return AdapterShape(trainable, max(ranks, default=0), max(per_layer.values(), default=0), dropout, fused)


def dtype_bytes(recipe: Recipe, device_type: str) -> tuple[int, int]:
    """(compute, weight) byte widths this recipe trains with here: bf16 autocast, the 4-bit compute dtype
    or the weights' dtype, each ``auto`` resolved by the numerics probe."""
    from tuneguard.numerics import resolve_dtype, resolve_mixed_precision

    weight = resolve_dtype(recipe.model.dtype, device_type, "model.dtype").itemsize
    if resolve_mixed_precision(recipe.train.mixed_precision, device_type) in {"bf16", "fp16"}:
        return 2, weight
    if recipe.quantization.four_bit:
        return resolve_dtype(recipe.quantization.compute_dtype, device_type, "quantization.compute_dtype").itemsize, weight
    return (4 if recipe.quantization.method == "int8" else weight), weight


def estimate_model(
    model: torch.nn.Module, recipe: Recipe, *, fastpath: bool, checkpointed_layers: int = 0,
    device_type: str | None = None, weights_file_mb: float = 0.0, seq: int | None = None, masked: bool = True,
) -> MemoryEstimate:
    """The estimate for an adapter model built from ``recipe`` (real or on the meta device); ``seq``: the longest
    row training will see (batches are padded to their longest row), ``data.max_length`` when not known;
    ``masked``: whether batches carry an attention mask (see :func:`tuneguard.train.batches.masked_batches`)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    device = device_type or next(model.parameters()).device.type
    if device == "meta":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    compute, weight = dtype_bytes(recipe, device)
    return estimate(
        ModelShape.from_config(base.config), adapter_shape(model), quant=recipe.quantization.method,
        batch=recipe.train.batch_size, seq=seq or recipe.data.max_length, fastpath=fastpath, masked=masked,
        checkpointed_layers=checkpointed_layers, device_type=device, weights_file_mb=weights_file_mb,
        compute_bytes=compute, weight_bytes=weight,
    )


def estimate_recipe(recipe: Recipe, *, fastpath: bool = True, checkpointed_layers: int | None = None,
                    seq: int | None = None, masked: bool = True) -> MemoryEstimate:
    """The estimate from the recipe and its data, before any weights are loaded.

    Decoders: the config is read and the adapter built on the meta device. Encoders and image backbones
    (small, and each architecture keeps other tensors) are built for real with random weights and run one
    training forward at the recipe's batch shape (:func:`estimate_by_probe`). ``seq``: the longest
    training row; None reads the training data, and whether its batches carry a mask with it (else
    ``masked`` says). ``checkpointed_layers`` None: as training will run it, i.e. every layer under
    ``train.gradient_checkpointing``, else the fast path's plan for the memory budget (none without it).
    """
    from transformers import AutoModelForCausalLM

    from tuneguard.adapters.registry import apply_adapter
    from tuneguard.backbones import ENCODER_TYPES, is_image_config, load_config, resolve_source

    source, is_hub = resolve_source(recipe.model)
    config = load_config(source, recipe.model, is_hub)
    image = is_image_config(config)
    encoder = config.model_type in ENCODER_TYPES
    if seq is None and not image:
        seq, masked = training_seq(recipe, source, is_encoder=encoder)
    if encoder or image:
        return estimate_by_probe(recipe, config, seq, image=image)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model = apply_adapter(model, recipe.adapter, is_encoder=False, total_steps=100)
    if checkpointed_layers is None:
        checkpointed_layers = planned_checkpoints(model, recipe, fastpath, seq, masked)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return estimate_model(model, recipe, fastpath=fastpath, checkpointed_layers=checkpointed_layers, device_type=device,
                          weights_file_mb=checkpoint_file_mb(recipe), seq=seq, masked=masked)


def training_seq(recipe: Recipe, source: str, *, is_encoder: bool) -> tuple[int, bool]:
    """The longest row of the recipe's training data as training will tokenize it (tokenizer only), and whether
    its batches carry an attention mask."""
    from transformers import AutoTokenizer

    from tuneguard.adapters.registry import method_spec
    from tuneguard.data.prepare import prepare_data
    from tuneguard.train.batches import masked_batches, widest_batch

    tokenizer = AutoTokenizer.from_pretrained(source, revision=recipe.model.revision,
                                              trust_remote_code=recipe.model.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    data = prepare_data(recipe.data, tokenizer, is_encoder=is_encoder, seed=recipe.train.seed,
                        packable=method_spec(recipe.adapter).packable)
    return widest_batch(data.train) or recipe.data.max_length, masked_batches(data.train)


def estimate_by_probe(recipe: Recipe, config: Any, seq: int | None, *, image: bool) -> MemoryEstimate:
    """Encoders and image backbones: one training forward of the adapter model, random weights, batch of
    ``train.batch_size`` x ``seq`` tokens (or images of ``data.image_size``), counting every tensor autograd
    keeps for backward (saved-tensor hooks, each storage once, the weights left out)."""
    import torch.nn.functional as F
    from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification

    from tuneguard.adapters.registry import apply_adapter
    from tuneguard.numerics import resolve_dtype

    config.num_labels = len(recipe.data.classes) or 2
    quant = recipe.quantization.method
    dtype = torch.float32 if quant != "none" else resolve_dtype(recipe.model.dtype, torch.device("cpu"), "model.dtype")
    torch.manual_seed(0)
    model = (AutoModelForImageClassification if image else AutoModelForSequenceClassification).from_config(config, dtype=dtype)
    model.requires_grad_(False)
    bits = BITS[quant]
    quantized = {id(m.weight) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "classifier" not in n}
    frozen = sum(p.numel() * (bits / 8 * 1.016 if bits and id(p) in quantized else p.element_size())
                 for p in model.parameters())
    model = apply_adapter(model, recipe.adapter, is_encoder=True, total_steps=100, image=image).train()
    batch = recipe.train.batch_size
    if image:
        inputs = {"pixel_values": torch.zeros(batch, config.num_channels, recipe.data.image_size, recipe.data.image_size,
                                              dtype=dtype)}
    else:
        seq = seq or recipe.data.max_length
        inputs = {"input_ids": torch.ones(batch, seq, dtype=torch.long), "attention_mask": torch.ones(batch, seq, dtype=torch.long)}
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def keep(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        logits = model(**inputs).logits
        F.cross_entropy(logits.float(), torch.zeros(batch, dtype=torch.long), reduction="sum")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    cpu = not torch.cuda.is_available()
    parts = {
        "runtime": RUNTIME_MB_CPU if cpu else 0.0,
        "weights": frozen / MB,
        "weights_file_mapping": 0.0,
        "adapter_and_optimizer": trainable * ADAM_BYTES / MB,
        "activations": sum(kept.values()) * (FRAGMENTATION if cpu else 1.0) / MB,
        "logits": 0.0,
    }
    inputs_record = {"quant": quant, "batch": batch, "seq": seq, "fastpath": False, "checkpointed_layers": 0,
                     "trainable_params": trainable, "device": "cpu" if cpu else "cuda", "probe": "image" if image else "encoder",
                     "train_peak_mb": round(sum(parts.values()), 1), "peak_at": "training"}
    return MemoryEstimate(round(sum(parts.values()), 1), {k: round(v, 1) for k, v in parts.items()}, inputs_record)


def checkpoint_file_mb(recipe: Recipe) -> float:
    """The local safetensors a quantized backbone is built from: mapped, and resident, while it loads (and for
    the whole run the usual way); 0 for a hub id (the estimate cannot see its files) or an unquantized one."""
    from tuneguard.backbones import resolve_source

    source, is_hub = resolve_source(recipe.model)
    if recipe.quantization.method == "none" or is_hub:
        return 0.0
    return sum(p.stat().st_size for p in Path(source).glob("*.safetensors")) / MB


def planned_checkpoints(model: torch.nn.Module, recipe: Recipe, fastpath: bool, seq: int | None = None,
                        masked: bool = True) -> int:
    """Decoder layers training will recompute: all with gradient checkpointing, else the fast path's plan."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if recipe.train.gradient_checkpointing:
        return base.config.num_hidden_layers
    return checkpoint_plan(model, recipe, memory_budget_mb(model, recipe, seq, masked), seq, masked) if fastpath else 0


def memory_budget_mb(model: torch.nn.Module, recipe: Recipe, seq: int | None = None, masked: bool = True) -> float:
    """``TUNEGUARD_MEMORY_BUDGET_MB``, else the default target: half the predicted peak of the usual way
    (PEFT's layers, no fast path, no checkpointing) but not below the fast path's loading peak, or this
    process's memory plus what is free if less."""
    value = os.environ.get(ENV_BUDGET)
    if value:
        return float(value)
    file_mb = checkpoint_file_mb(recipe)
    usual = estimate_model(model, recipe, fastpath=False, weights_file_mb=file_mb, seq=seq, masked=masked).peak_mb
    # Checkpoints cannot lower the loading peak: a training peak below it would cost recomputation for nothing.
    loading = estimate_model(model, recipe, fastpath=True, weights_file_mb=file_mb, seq=seq, masked=masked).inputs["load_peak_mb"]
    at_hand = (psutil.Process().memory_info().rss + psutil.virtual_memory().available) / MB
    return min(max(TARGET_SHARE * usual, loading), at_hand)


def checkpoint_plan(model: torch.nn.Module, recipe: Recipe, budget_mb: float, seq: int | None = None,
                    masked: bool = True) -> int:
    """The fewest decoder layers to checkpoint for the fast path's predicted peak to fit ``budget_mb``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    n_layers = base.config.num_hidden_layers
    for k in range(n_layers + 1):  # checkpoints lower the training peak, never the loading one
        estimate_k = estimate_model(model, recipe, fastpath=True, checkpointed_layers=k, seq=seq, masked=masked)
        if estimate_k.inputs["train_peak_mb"] <= budget_mb:
            return k
    return n_layers
