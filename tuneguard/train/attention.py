"""Causal self-attention for training on CPU: queries in blocks, each against the keys up to its end, in fp32.

torch's CPU flash-attention kernel takes 27.5 ms for the forward and backward of one causal fp32 layer of
SmolLM2 (2 x 512 tokens, 9 query and 3 key/value heads; AVX2 kernels on a 2-core EPYC): about 35 GFLOP/s
where the model's projections run at 200. Here each block of 64 queries is two batched matmuls and one
fused softmax against only the keys it can see (blocks above the diagonal are never computed), the query
heads sharing a key/value head stacked into one matmul, so k and v are never repeated per head: 19.1 ms
for the same layer. Like flash attention it keeps only q, k and v for backward and recomputes a block's
probabilities there, so nothing ``seq x seq`` outlives a block.

Under bf16 autocast it takes q, k and v rounded to bf16 and returns bf16, as SDPA does, but its products and
softmax run in fp32 where SDPA's flash kernel rounds the probabilities to bf16 before multiplying them by v: a
layer's forward and backward in 28 ms against SDPA's 30 (Zen 4 EPYC with AVX512-BF16), output and gradients a
little closer to float64's (tests/test_attention.py), and what it keeps for backward is SDPA's bf16 q, k and v.

In packed rows (several documents, positions restarting) a block also starts at the first key any of its
queries may see: the keys of earlier documents are hidden from the whole block, so they are skipped rather
than multiplied and masked. One layer's attention on 2 x 512 rows ran 1.4x faster with documents of 64-256
tokens and 2.4x with 32-128, and a training step on rows of four 120-token documents 6% faster (paired,
fp32 with AVX2 kernels on a Zen 4 EPYC); under bf16 autocast, 2.3x and 16%. Rows of one document are not affected.

Registered with transformers' attention interface as :data:`NAME`, with SDPA's masks. Any call it does
not cover (no gradient wanted, not on CPU, float64, attention dropout, a KV cache, a mask that
lets a query see a later key or nothing at all, soft-capping, a position bias) goes to transformers'
own SDPA function, so switching a model to it changes nothing else: evaluation and generation run as
before.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from tuneguard.train.reuse import LastResult

NAME = "tuneguard_blocked"
BLOCK = 64
"""Queries per block: smaller blocks skip more of the causal triangle's empty half, larger ones run larger matmuls.
On 512 positions (AVX2 kernels) a layer's forward and backward took 19.3 ms at 32, 19.1 at 64, 23.2 at 128."""


def _rows(t: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Rows ``start:end`` of every head of a group, ``(batch*kv, groups, seq, dim)`` -> ``(batch*kv, groups*rows, dim)``."""
    return t[:, :, start:end].reshape(t.shape[0], -1, t.shape[-1])


@functools.cache
def _later(rows: int, device: torch.device) -> torch.Tensor:
    """Within a diagonal block, where a key comes after its query (the same few blocks in every layer and step)."""
    return torch.ones(rows, rows, dtype=torch.bool, device=device).triu_(1)


_BLOCKS: LastResult[list[tuple[int, int, int]]] = LastResult()


def _blocks(mask: torch.Tensor | None, seq: int) -> list[tuple[int, int, int]]:
    """``(start, end, first)`` of each block of queries: ``first`` is the first key any of them may see. Keys before it
    are hidden from the whole block (the earlier documents of a packed row), so they are neither multiplied nor masked:
    softmax gives them exactly 0 anyway. Computed once per mask (every layer gets the same tensor); ``first`` is 0
    for every block of a plain causal mask."""
    spans = [(start, min(start + BLOCK, seq)) for start in range(0, seq, BLOCK)]
    if mask is None:
        return [(start, end, 0) for start, end in spans]

    def first() -> list[tuple[int, int, int]]:
        visible = mask[:, 0].to(torch.uint8).argmax(-1)  # each query's first visible key (argmax: the first True)
        return [(start, end, int(visible[:, start:end].min())) for start, end in spans]

    return _BLOCKS(mask, seq, first)


def _scores(q: torch.Tensor, k: torch.Tensor, start: int, end: int, first: int, mask: torch.Tensor | None) -> torch.Tensor:
    """Softmax probabilities of the (pre-scaled) queries ``start:end`` against keys ``first:end``; ``mask``: SDPA's
    boolean mask (``(batch, 1, seq, seq)``, True where a query may attend), None for plain causal."""
    n, groups = q.shape[:2]
    rows, keys = end - start, end - first
    scores = torch.bmm(_rows(q, start, end), k[:, first:end].transpose(1, 2))
    if mask is None:
        scores.view(n, groups, rows, keys)[..., start - first :].masked_fill_(_later(rows, q.device), -math.inf)
    else:
        batch = mask.shape[0]
        hidden = mask[:, :, start:end, first:end].logical_not().unsqueeze(1)  # broadcast over kv heads and groups
        scores.view(batch, n // batch, groups, rows, keys).masked_fill_(hidden, -math.inf)
    return scores.softmax(-1)


def _grouped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, ...]:
    """fp32 copies (none for fp32 inputs, but the scaled queries): q as ``(batch*kv, groups, seq, dim)``, k and v as
    ``(batch*kv, seq, dim)``, so the query heads sharing a key/value head are one matmul."""
    batch, heads, seq, dim = q.shape
    n = batch * k.shape[1]
    return ((q.float() * scale).reshape(n, heads // k.shape[1], seq, dim), k.float().reshape(n, seq, dim),
            v.float().reshape(n, seq, dim))


class _BlockedCausalAttention(torch.autograd.Function):
    """softmax(q k^T * scale + mask) v over ``(batch, heads, seq, dim)`` q and ``(batch, kv_heads, seq, dim)`` k, v.

    Computed in fp32 whatever the inputs' dtype and returned in it, as ``(batch, seq, heads, dim)`` (the layout the
    attention module's output projection reads). Keeps only q, k and v as given for backward.
    """

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:  # type: ignore[override]
        batch, heads, seq, dim = q.shape
        ctx.save_for_backward(q, k, v, mask)  # the mask is the one tensor every layer gets
        ctx.scale = scale
        kv_heads = k.shape[1]
        groups = heads // kv_heads
        qs, kf, vf = _grouped(q, k, v, scale)
        out = q.new_empty(batch, seq, kv_heads, groups, dim)  # each block rounded into it once
        with torch.autocast(q.device.type, enabled=False):
            for start, end, first in _blocks(mask, seq):
                p = _scores(qs, kf, start, end, first, mask)
                block = torch.bmm(p, vf[:, first:end]).view(batch, kv_heads, groups, end - start, dim)
                out[:, start:end] = block.permute(0, 3, 1, 2, 4)
        return out.view(batch, seq, heads, dim)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q_in, k_in, v_in, mask = ctx.saved_tensors
        qs, k, v = _grouped(q_in, k_in, v_in, ctx.scale)
        n, groups, seq, dim = qs.shape
        batch = grad.shape[0]
        # (batch, seq, kv, groups, dim) -> (batch*kv, groups, seq, dim), like the queries
        grad = grad.float().reshape(batch, seq, n // batch, groups, dim).permute(0, 2, 3, 1, 4).reshape(n, groups, seq, dim)
        grad_q = torch.empty_like(qs, dtype=q_in.dtype)
        grad_k, grad_v = torch.zeros_like(k), torch.zeros_like(v)
        with torch.autocast(q_in.device.type, enabled=False):
            for start, end, first in _blocks(mask, seq):
                p = _scores(qs, k, start, end, first, mask)
                g, q = _rows(grad, start, end), _rows(qs, start, end)
                grad_v[:, first:end].baddbmm_(p.transpose(1, 2), g)
                grad_scores = torch._softmax_backward_data(torch.bmm(g, v[:, first:end].transpose(1, 2)), p, -1, p.dtype)
                grad_q[:, :, start:end] = torch.bmm(grad_scores, k[:, first:end]).mul_(ctx.scale).view(n, groups, end - start, dim)
                grad_k[:, first:end].baddbmm_(grad_scores.transpose(1, 2), q)
        shape = (batch, n // batch, seq, dim)
        return (grad_q.view(batch, -1, seq, dim), grad_k.view(shape).to(k_in.dtype),
                grad_v.view(shape).to(v_in.dtype), None, None)


_CHECKED_MASK: LastResult[bool] = LastResult()


def _usable(mask: torch.Tensor | None, seq: int) -> bool:
    """Whether this attention can apply an SDPA mask: ``(batch or 1, 1, seq, seq)`` booleans that never let a query
    see a later key and always let it see some key. Checked once per mask (every layer gets the same tensor)."""
    if mask is None:
        return True
    return _CHECKED_MASK(mask, seq, lambda: (
        mask.dtype == torch.bool and mask.dim() == 4 and mask.shape[1] == 1 and tuple(mask.shape[2:]) == (seq, seq)
        and not bool(mask.triu(1).any()) and bool(mask.any(-1).all())
    ))


FLOATS = (torch.float32, torch.bfloat16, torch.float16)
"""Input dtypes it computes in fp32 and returns in: not float64, which SDPA computes in float64."""


def covers(device_type: str) -> bool:
    """Whether training on ``device_type`` attends here rather than in SDPA: on CPU, in fp32 or under autocast (a GPU
    has SDPA's fused kernels). The memory estimator asks the same question."""
    return device_type == "cpu"


def blocked_attention_forward(
    module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
    is_causal: bool | None = None, **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature; SDPA's own function for every call outside this one's cases."""
    seq = query.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    covered = (
        (causal or attention_mask is not None) and torch.is_grad_enabled()
        and any(t.requires_grad for t in (query, key, value)) and query.dtype == key.dtype == value.dtype
        and query.dtype in FLOATS
        and covers(query.device.type)
        and dropout == 0 and seq > 1 and key.shape[2] == seq and query.shape[1] % key.shape[1] == 0
        and kwargs.get("softcap") is None and kwargs.get("position_bias") is None and not kwargs.get("output_attentions")
        and _usable(attention_mask, seq)
    )
    if not covered:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    device = query.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else query.dtype
    q, k, v = (t.to(dtype) for t in (query, key, value))  # what SDPA would be given under autocast
    return _BlockedCausalAttention.apply(q, k.contiguous(), v.contiguous(), attention_mask, scale), None


def use_blocked_attention(model: torch.nn.Module) -> bool:
    """Switch a model that attends with SDPA to :func:`blocked_attention_forward`; True where it did."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    ALL_ATTENTION_FUNCTIONS.register(NAME, blocked_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    config._attn_implementation = NAME
    return True
