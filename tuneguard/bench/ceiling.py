"""The speed ceiling of a LoRA training step: its FLOPs per token over this machine's measured matmul rate.

A ratio against the plain Trainer says nothing when both runners sit near what the hardware can do.
So the bench times the model's own matmul shapes, in the dtype the numerics probe chose, and
divides: ``ceiling tokens/s = effective FLOP/s / FLOPs per token``. FLOPs per token of a step on a
frozen base: the forward (every linear, attention's two products, the LM head on every position),
a backward of the same size for the input gradients (attention's with four products), LoRA's own
weight gradients, and the forward of any layer recomputed by activation checkpointing (a test checks
the count against torch's FLOP counter on a real step). Dequantizing 4-bit weights is not a FLOP:
the gap between a runner and the ceiling is where such work (and the framework's) goes.
"""

from __future__ import annotations

from typing import Any

import torch

from tuneguard.numerics import linear_gflops

# Matmuls time the same on any values: a few short windows per shape, the best one kept (two shared cores
# are easily disturbed, and a ceiling measured low would flatter every runner's share of it). The shapes are
# timed in ROUNDS interleaved passes: on a shared 2-core host a slow spell lasts seconds, longer than one
# shape's windows (two passes a few seconds apart read 142 and 115 GFLOP/s; one shape 126 and 75).
SECONDS_PER_WINDOW = 0.1
WINDOWS = 5
ROUNDS = 3


def attention_flops_per_token(config: Any, seq: int) -> float:
    """One layer's causal attention forward per token: QK^T and AV, each position attending to half the sequence
    on average (its backward is twice this: four products)."""
    heads = config.num_attention_heads
    q = heads * (getattr(config, "head_dim", None) or config.hidden_size // heads)
    return 2 * 2 * q * (seq + 1) / 2


def step_flops_per_token(config: Any, *, seq: int, r: int, checkpointed: int = 0) -> dict[str, float]:
    """FLOPs per trained token of one optimizer step with LoRA on every linear layer, by part (causal
    attention over ``seq`` positions)."""
    h, f, n = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    kv = (getattr(config, "num_key_value_heads", None) or heads) * head_dim
    q = heads * head_dim
    linear = 2 * (h * q + 2 * h * kv + q * h + 3 * h * f)  # q, k, v, o, gate, up, down
    attention = attention_flops_per_token(config, seq)
    lora = 2 * r * (7 * h + 2 * q + 2 * kv + 3 * f)  # A x and B (A x) of the seven layers: r x (in + out) each
    layer_forward = linear + attention + lora
    head = 2 * h * config.vocab_size
    parts = {
        "forward": n * layer_forward + head,
        "input_gradients": n * (layer_forward + attention) + head,  # attention's backward: four products, not two
        "lora_weight_gradients": n * lora,
        "recompute": checkpointed * layer_forward,
    }
    return {**parts, "total": sum(parts.values())}


def effective_gflops(config: Any, tokens: int, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
    """GFLOP/s of the step's big matmuls at their real shapes, through the kernel tuneguard's layers use
    (:func:`tuneguard.numerics.linear`), weighted by how many FLOPs each carries: the layers' products and the
    LM head's, a chunk of positions at a time as the chunked loss runs it (forward and input gradient); each
    shape's best of :data:`ROUNDS` interleaved passes."""
    from tuneguard.train.losses import chunk_rows

    h, f, n, vocab = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    kv = (getattr(config, "num_key_value_heads", None) or heads) * head_dim
    rows = min(chunk_rows(vocab), tokens)
    shapes = {  # (m, k, n): how often the shape runs in one step's forward (and so in its input gradient)
        (tokens, h, heads * head_dim): 2 * n, (tokens, h, kv): 2 * n, (tokens, h, f): 2 * n, (tokens, f, h): n,
        (rows, h, vocab): tokens / rows, (rows, vocab, h): tokens / rows,
    }
    flops = {(m, k, n): 2 * m * k * n * count for (m, k, n), count in shapes.items()}
    rates = dict.fromkeys(flops, 0.0)
    for _ in range(ROUNDS):
        for shape in flops:
            rates[shape] = max(rates[shape], linear_gflops(*shape, dtype, device, SECONDS_PER_WINDOW, WINDOWS))
    seconds = sum(flops[s] / (rates[s] * 1e9) for s in flops)
    return {"gflops": round(sum(flops.values()) / seconds / 1e9, 2),
            "shapes": {"x".join(map(str, s)): round(rates[s], 2) for s in flops}}


def training_ceiling(spec: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """The ceiling tokens/s of the bench's training configuration on this machine, with its inputs."""
    from tuneguard.backbones import load_config, resolve_source
    from tuneguard.recipe import ModelConfig

    model = ModelConfig(source=spec["model"])
    source, is_hub = resolve_source(model)
    config = load_config(source, model, is_hub)
    tokens = spec["batch"] * spec["seq"]
    flops = step_flops_per_token(config, seq=spec["seq"], r=spec["r"])
    rate = effective_gflops(config, tokens, dtype, torch.device(spec.get("device", "cpu")))
    return {"dtype": str(dtype).removeprefix("torch."), "flops_per_token": round(flops["total"]),
            "flops_parts": {k: round(v) for k, v in flops.items()}, **rate,
            "tokens_per_s": round(rate["gflops"] * 1e9 / flops["total"], 1)}
