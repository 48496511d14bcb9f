"""The training RMSNorm computes transformers' forward bit for bit and autograd's gradients within fp32 rounding."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from tuneguard.train.fastpath import fuse_rms_norms
from tuneguard.train.norms import is_rms_norm


def grads(norm: torch.nn.Module, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, ...]:
    x = x.detach().clone().requires_grad_()
    norm.zero_grad(set_to_none=True)
    out = norm(x)
    out.backward(g)
    return out.detach(), x.grad, norm.weight.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("train_weight", [False, True])
def test_same_forward_and_close_gradients(dtype: torch.dtype, train_weight: bool) -> None:
    torch.manual_seed(0)
    plain = LlamaRMSNorm(96, eps=1e-5).to(dtype)
    with torch.no_grad():
        plain.weight.copy_(torch.randn(96))
    plain.weight.requires_grad_(train_weight)
    fused = LlamaRMSNorm(96, eps=1e-5).to(dtype)
    fused.load_state_dict(plain.state_dict())
    fused.weight.requires_grad_(train_weight)
    assert fuse_rms_norms(fused) == 1
    x, g = (torch.randn(2, 7, 96) * 3).to(dtype), torch.randn(2, 7, 96).to(dtype)
    out_a, gx_a, gw_a = grads(plain, x, g)
    out_b, gx_b, gw_b = grads(fused, x, g)
    assert torch.equal(out_a, out_b)
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2  # bf16: one rounding of the gradient either way
    assert float((gx_a.float() - gx_b.float()).norm() / gx_a.float().norm()) < tolerance
    if train_weight:
        assert float((gw_a.float() - gw_b.float()).norm() / gw_a.float().norm()) < tolerance
    else:
        assert gw_a is None and gw_b is None
    # Against fp64, the rewritten backward is as close as autograd's.
    x64 = x.double().requires_grad_()
    w64 = plain.weight.detach().double()
    (w64 * (x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5))).backward(g.double())
    err = lambda gx: float((gx.double() - x64.grad).abs().max())  # noqa: E731
    assert err(gx_b) <= 2 * err(gx_a) + 1e-6


def test_no_gradient_runs_transformers_own_forward() -> None:
    norm = LlamaRMSNorm(32)
    fuse_rms_norms(norm)
    with torch.no_grad():
        out = norm(torch.randn(1, 4, 32))
    assert out.grad_fn is None
    with torch.enable_grad():
        out = norm(torch.randn(1, 4, 32, requires_grad=True))
    assert type(out.grad_fn).__name__ == "_RMSNormBackward"


def test_only_norms_that_compute_the_same_forward() -> None:
    class OnePlus(LlamaRMSNorm):  # Gemma's norm scales by (1 + weight)
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) / self.weight * (1 + self.weight)

    odd = OnePlus(32)
    with torch.no_grad():
        odd.weight.uniform_(0.5, 1.5)
    assert not is_rms_norm(odd)
    assert not is_rms_norm(torch.nn.LayerNorm(32))
    assert is_rms_norm(LlamaRMSNorm(32))


def test_every_norm_of_a_llama(tiny_llama_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    layers = model.config.num_hidden_layers
    assert fuse_rms_norms(model) == 2 * layers + 1  # two per layer and the final one
    assert fuse_rms_norms(model) == 0  # once
