"""RMSNorm for training: transformers' forward, op for op, with a backward of a few contiguous passes.

transformers' ``LlamaRMSNorm`` (and Mistral's, Qwen2's, ...) is ``weight * (x * rsqrt(mean(x^2) + eps))``
written as plain tensor ops, so autograd differentiates ``mean`` by expanding its gradient to the
input's shape with a zero stride and ``pow`` and the products read it from there: on CPU those
element-wise kernels then run without vectorizing. One norm of SmolLM2 (2 x 512 tokens, fp32, AVX2
kernels, 2-core EPYC) took 1.6-1.9 ms forward and backward, 0.9-1.2 ms here, and a step runs 61
of them. The forward is the same ops in the same order (bit-identical output); the input gradient
is ``rstd * (g w - x_hat * mean(g w x_hat))``, fp32 rounding in another order (within 3e-7 of
autograd's, tests/test_norms.py); the weight's gradient, where it is trained, is ``sum(g * x_hat)``.
"""

from __future__ import annotations

from typing import Any

import torch


def _normalize(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' RMSNorm forward (statistics in fp32) and the ``rstd`` it computed on the way."""
    h = x.to(torch.float32)
    rstd = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (h * rstd).to(x.dtype), rstd


class _RMSNorm(torch.autograd.Function):
    """:func:`_normalize` keeping ``x`` and ``rstd`` for backward (what autograd kept too)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:  # type: ignore[override]
        out, rstd = _normalize(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, rstd = ctx.saved_tensors
        x_hat = x.to(torch.float32) * rstd
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad * x_hat.to(x.dtype)).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_normed = (grad * weight).to(torch.float32)
            mean = (grad_normed * x_hat).mean(-1, keepdim=True)
            grad_x = grad_normed.sub_(x_hat.mul_(mean)).mul_(rstd).to(x.dtype)
        return grad_x, grad_weight, None


def rms_norm_forward(norm: torch.nn.Module, original: Any, x: torch.Tensor) -> torch.Tensor:
    """The norm's forward once :func:`tuneguard.train.fastpath.fuse_rms_norms` routes it here (``original``: its own)."""
    if not (torch.is_grad_enabled() and (x.requires_grad or norm.weight.requires_grad)):
        return original(x)  # evaluation and generation: transformers' own forward
    return _RMSNorm.apply(x, norm.weight, norm.variance_epsilon)


def is_rms_norm(module: torch.nn.Module) -> bool:
    """Whether the module computes exactly :func:`_normalize`, checked on a small input, not by name
    (Gemma's ``(1 + weight)`` norm and LayerNorm do not)."""
    weight = getattr(module, "weight", None)
    eps = getattr(module, "variance_epsilon", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or not isinstance(eps, float) or list(module.children()):
        return False
    x = torch.randn(2, 3, weight.shape[0], generator=torch.Generator().manual_seed(0)).to(weight.device, weight.dtype) * 3
    with torch.no_grad():
        try:
            return torch.equal(module(x), _normalize(x, weight, eps)[0])
        except (RuntimeError, TypeError, ValueError):
            return False
