"""A floor under the bench's fp32 training step: what no exact implementation on these kernels can beat.

The bench's configuration (SmolLM2-135M nf4, LoRA r16 on every linear, dropout 0.05, 2 x 512 tokens): the
step's matmuls other than attention's at the ceiling's measured rate (``tuneguard/bench/ceiling.py``), plus
the work it cannot skip, each part timed alone (best of 5) with the cheapest kernel at hand: attention
forward and backward (the better of the blocked kernel and SDPA), nf4 decoding of every weight twice, RMSNorm,
RoPE, the gated MLP's middle, residual adds, dropout (positions and masked copies), the loss's softmax and
its gradient, AdamW. Their sum against the ceiling's step is the largest share of the ceiling reachable.

    python bench/floor.py      # the AVX2 rows: ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python bench/floor.py
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from tuneguard.backbones import decoded_absmax, dequantize_4bit
from tuneguard.bench import reference
from tuneguard.bench.ceiling import attention_flops_per_token, effective_gflops, step_flops_per_token
from tuneguard.train.attention import _BlockedCausalAttention
from tuneguard.train.fastpath import drop_positions
from tuneguard.train.norms import _RMSNorm

BATCH, SEQ, RANK, DROPOUT, LOSS_ROWS = 2, 512, 16, 0.05, 160


def best(fn: Callable[[], object], repeats: int = 5) -> float:
    """Seconds of the fastest of ``repeats`` calls, after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def floor_parts(model: torch.nn.Module) -> dict[str, float]:
    """Seconds per step of each non-matmul part, timed alone on the model's shapes."""
    cfg = model.config
    n, h, f, tokens = cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, BATCH * SEQ
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    dim = getattr(cfg, "head_dim", None) or h // heads
    layer = model.model.layers[0]
    linears = [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
               layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj]
    scales = [decoded_absmax(lin.weight) for lin in linears]
    q, k, v = (torch.randn(BATCH, c, SEQ, dim, requires_grad=True) for c in (heads, kv, kv))

    out_grad = torch.randn(BATCH, SEQ, heads, dim)

    def blocked() -> None:  # gradients returned, not summed into .grad: only the step's own work is timed
        torch.autograd.grad(_BlockedCausalAttention.apply(q, k, v, None, dim**-0.5), (q, k, v), out_grad)

    def sdpa() -> None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        torch.autograd.grad(out, (q, k, v), out_grad.transpose(1, 2))

    x, weight = torch.randn(tokens, h, requires_grad=True), torch.ones(h)
    cos, sin = torch.randn(BATCH, SEQ, dim), torch.randn(BATCH, SEQ, dim)

    rope_grads = (torch.randn_like(q), torch.randn_like(k))

    def rope() -> None:
        torch.autograd.grad(apply_rotary_pos_emb(q, k, cos, sin), (q, k), rope_grads)

    gate, up, grad = torch.randn(tokens, f), torch.randn(tokens, f), torch.randn(tokens, f)

    def gated() -> None:  # act(gate) * up, and its two input gradients
        act = F.silu(gate)
        _ = act * up
        sig = torch.sigmoid(gate)
        _ = grad * act, (grad * up).mul_(sig * (1 + gate * (1 - sig)))

    inputs = {w: torch.randn(tokens, w) for w in (h, f)}

    def dropout(width: int) -> None:  # positions, the masked input in forward and again for A's gradient
        positions = drop_positions(tokens * width, DROPOUT, 1)
        for _ in range(2):
            inputs[width].clone().view(-1).index_fill_(0, positions, 0)

    logits, targets = torch.randn(LOSS_ROWS, cfg.vocab_size), torch.randint(0, cfg.vocab_size, (LOSS_ROWS,))

    def loss() -> None:  # max-shifted softmax and its gradient, in place in a chunk of fp32 logits
        e = (logits - logits.amax(-1, keepdim=True)).exp_()
        e.div_(e.sum(-1, keepdim=True))[torch.arange(LOSS_ROWS), targets] -= 1

    lora = n * sum(RANK * (lin.in_features + lin.out_features) for lin in linears)  # the trainable weights
    params = torch.nn.Parameter(torch.randn(lora))
    params.grad = torch.randn_like(params)
    optimizer = torch.optim.AdamW([params], lr=1e-4, fused=True)
    a, b = torch.randn(tokens, h), torch.randn(tokens, h)
    return {
        "attention, forward and backward (the better of blocked and SDPA)": n * min(best(blocked), best(sdpa)),
        "nf4 decoding, every weight twice": 2 * n * best(lambda: [dequantize_4bit(lin.weight, torch.float32, s)
                                                                   for lin, s in zip(linears, scales, strict=True)]),
        "RMSNorm forward and backward": (2 * n + 1) * best(lambda: torch.autograd.grad(_RMSNorm.apply(x, weight, 1e-5), x, a)),
        "RoPE forward and backward": n * best(rope),
        "gated MLP middle, forward and backward": n * best(gated),
        "residual adds and gradient sums": 4 * n * best(lambda: a + b),
        "dropout: positions, masked copies": n * (6 * best(lambda: dropout(h)) + best(lambda: dropout(f))),
        "loss: softmax and its gradient": tokens / LOSS_ROWS * best(loss),
        "AdamW": best(optimizer.step),
    }


def main() -> None:
    spec = {**reference.TRAIN_DEFAULTS, "kind": "train", "runner": "trainer", "model": "bundled:smollm2-135m-instruct",
            "quant": "nf4", "adapter": "lora", "seq": SEQ, "batch": BATCH, "steps": 1, "warmup": 0, "r": RANK,
            "alpha": 2 * RANK, "dropout": DROPOUT, "threads": None, "device": "cpu", "workdir": tempfile.mkdtemp()}
    recipe, _ = reference.bench_recipe(spec)
    model, _, _ = reference._reference_model(spec, recipe, kbit_prepare=False)
    cfg, tokens = model.config, BATCH * SEQ
    rate = effective_gflops(cfg, tokens, torch.float32, torch.device("cpu"))["gflops"] * 1e9
    flops = step_flops_per_token(cfg, seq=SEQ, r=RANK)["total"] * tokens
    attention_flops = cfg.num_hidden_layers * 3 * attention_flops_per_token(cfg, SEQ) * tokens  # forward, backward
    parts = floor_parts(model)
    ceiling, matmuls = flops / rate, (flops - attention_flops) / rate
    floor = matmuls + sum(parts.values())
    print(f"ceiling: {rate / 1e9:.1f} GFLOP/s, a {ceiling:.3f} s step ({tokens / ceiling:.1f} tokens/s)")
    print(f"{'matmuls but attention, at that rate':70s} {matmuls * 1000:8.1f} ms")
    for name, seconds in parts.items():
        print(f"{name:70s} {seconds * 1000:8.1f} ms")
    print(f"floor: a {floor:.3f} s step = {tokens / floor:.1f} tokens/s = {ceiling / floor:.1%} of the ceiling")


if __name__ == "__main__":
    main()
