"""Blocked causal attention computes what SDPA computes, keeps less, and leaves every other call to SDPA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from tuneguard.train import attention
from tuneguard.train.memory import ModelShape, mask_bytes_per_token

BATCH, HEADS, KV_HEADS, SEQ, DIM = 2, 6, 2, 150, 16  # 150: the last block of 64 is partial


class Module(torch.nn.Module):
    is_causal = True
    num_key_value_groups = HEADS // KV_HEADS


def inputs(seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(BATCH, HEADS, SEQ, DIM, generator=g).requires_grad_()
    k = torch.randn(BATCH, KV_HEADS, SEQ, DIM, generator=g).requires_grad_()
    v = torch.randn(BATCH, SEQ, KV_HEADS, DIM, generator=g).transpose(1, 2).detach().requires_grad_()  # as a projection's view
    grad = torch.randn(BATCH, SEQ, HEADS, DIM, generator=g)
    return q, k, v, grad


def packed_mask(lengths: list[list[int]]) -> torch.Tensor:
    """SDPA's boolean mask for rows of packed documents: causal within each document."""
    rows = []
    for row in lengths:
        doc = torch.cat([torch.full((n,), i) for i, n in enumerate(row)])
        rows.append((doc[:, None] == doc[None, :]) & torch.ones(SEQ, SEQ, dtype=torch.bool).tril())
    return torch.stack(rows)[:, None]


def run(fn, mask: torch.Tensor | None, **kw: object) -> tuple[torch.Tensor, list[torch.Tensor]]:
    q, k, v, grad = inputs()
    out, _ = fn(Module(), q, k, v, mask, scaling=0.3, **kw)
    out.backward(grad)
    return out.detach(), [t.grad for t in (q, k, v)]


SHORT_DOCUMENTS = packed_mask([[30, 40, 20, 60], [64, 64, 22]])


@pytest.mark.parametrize("mask", [None, packed_mask([[100, 50], [30, 60, 60]]), SHORT_DOCUMENTS, packed_mask([[150]])[:1],
                                  SHORT_DOCUMENTS[:1]], ids=["causal", "packed", "short documents", "broadcast", "broadcast short"])
def test_blocked_attention_matches_sdpa(mask: torch.Tensor | None, monkeypatch: pytest.MonkeyPatch) -> None:
    out_a, grads_a = run(sdpa_attention_forward, mask)
    monkeypatch.setattr(attention, "sdpa_attention_forward", None)  # the blocked path itself, not a hand-off
    out_b, grads_b = run(attention.blocked_attention_forward, mask)
    assert out_b.shape == out_a.shape == (BATCH, SEQ, HEADS, DIM)
    torch.testing.assert_close(out_b, out_a, rtol=0, atol=2e-6)
    for a, b in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=2e-5)


def relative_errors(fn, mask: torch.Tensor | None, dtype: torch.dtype, autocast: bool) -> list[float]:
    """Output and q, k, v gradients of ``fn`` on inputs in ``dtype``, against SDPA's in float64 (relative norms)."""
    def computed(fn, dtype: torch.dtype, autocast: bool) -> list[torch.Tensor]:
        q, k, v, grad = (t.detach().to(dtype).requires_grad_(t.requires_grad) for t in inputs())
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out, _ = fn(Module(), q, k, v, mask, scaling=0.3)
        assert out.dtype == (dtype if dtype == torch.float64 else torch.bfloat16)  # SDPA's under autocast and for bf16
        out.backward(grad.to(out.dtype))
        return [out.detach().double(), *(t.grad.double() for t in (q, k, v))]

    exact = computed(sdpa_attention_forward, torch.float64, False)
    return [float((a - b).norm() / b.norm()) for a, b in zip(computed(fn, dtype, autocast), exact, strict=True)]


@pytest.mark.parametrize("mask", [None, SHORT_DOCUMENTS], ids=["causal", "short documents"])
@pytest.mark.parametrize("autocast", [True, False], ids=["bf16 autocast", "bf16 inputs"])
def test_in_bf16_it_is_as_accurate_as_sdpa(mask: torch.Tensor | None, autocast: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under bf16 it takes q, k, v rounded to bf16 and returns bf16, as SDPA does; its products and softmax run in fp32
    where SDPA's flash kernel rounds the probabilities to bf16: output and gradients no further from float64's."""
    dtype = torch.float32 if autocast else torch.bfloat16
    sdpa = relative_errors(sdpa_attention_forward, mask, dtype, autocast)
    monkeypatch.setattr(attention, "sdpa_attention_forward", None)  # the blocked path itself, not a hand-off
    blocked = relative_errors(attention.blocked_attention_forward, mask, dtype, autocast)
    assert max(sdpa) < 2e-2  # bf16's rounding, not a broken reference
    assert all(b <= 1.2 * a for a, b in zip(sdpa, blocked, strict=True)), (sdpa, blocked)


def test_blocks_skip_the_keys_of_earlier_documents() -> None:
    """Each block of 64 queries starts at the first key any of its queries sees, in every row of the batch."""
    assert attention._blocks(None, SEQ) == [(0, 64, 0), (64, 128, 0), (128, 150, 0)]
    assert attention._blocks(packed_mask([[150]])[:1], SEQ) == [(0, 64, 0), (64, 128, 0), (128, 150, 0)]
    # row 0's documents start at 0, 30, 70, 90; row 1's at 0, 64, 128: queries 64-127 see back to 30, 128-149 to 90
    assert attention._blocks(SHORT_DOCUMENTS, SEQ) == [(0, 64, 0), (64, 128, 30), (128, 150, 90)]


def bidirectional() -> torch.Tensor:
    return torch.ones(BATCH, 1, SEQ, SEQ, dtype=torch.bool)


def empty_row() -> torch.Tensor:
    mask = packed_mask([[150], [150]])
    mask[1, 0, 7] = False
    return mask


CASES = {  # (mask, keyword arguments, grad enabled, dtype)
    "no gradient": (None, {}, False, torch.float32),
    "float64": (None, {}, True, torch.float64),
    "dropout": (None, {"dropout": 0.1}, True, torch.float32),
    "a bidirectional mask": (bidirectional(), {}, True, torch.float32),
    "a query that sees nothing": (empty_row(), {}, True, torch.float32),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_other_call_goes_to_sdpa(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Outside its cases the blocked function is SDPA's own, bit for bit; inside them it never calls SDPA."""
    mask, kw, grad, dtype = CASES[case]
    calls: list[str] = []
    monkeypatch.setattr(attention, "sdpa_attention_forward", lambda *a, **k: calls.append(case) or sdpa_attention_forward(*a, **k))
    outputs = []
    for fn in (sdpa_attention_forward, attention.blocked_attention_forward):
        q, k, v, _ = (t.detach().to(dtype).requires_grad_() for t in inputs())
        torch.manual_seed(0)
        with torch.set_grad_enabled(grad):
            outputs.append(fn(Module(), q, k, v, mask, scaling=0.3, **kw)[0].detach())
    assert calls == [case]  # the blocked function handed the call on
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=0, equal_nan=True)
    run(attention.blocked_attention_forward, packed_mask([[100, 50], [150]]))
    assert calls == [case]  # and took a call it covers itself


def test_a_model_switched_to_it_trains_the_same_and_keeps_less(tiny_llama_dir: Path) -> None:
    """Loss and LoRA gradients as under SDPA; it keeps what SDPA keeps but the log-sum-exp (not in the estimate),
    and packed rows make it keep only the one mask all layers share, not SDPA's per-layer copies."""

    def lora(blocked: bool) -> torch.nn.Module:
        model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
        torch.manual_seed(0)
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
        if blocked:
            assert attention.use_blocked_attention(model)
        return model

    ids = torch.randint(3, 300, (2, 32), generator=torch.Generator().manual_seed(0))
    one_document = torch.arange(32).expand(2, 32)
    two_documents = torch.cat([torch.arange(20), torch.arange(12)]).expand(2, 32)

    def step(model: torch.nn.Module, position_ids: torch.Tensor) -> tuple[float, list[torch.Tensor], int]:
        storages: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        model.zero_grad(set_to_none=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(input_ids=ids, position_ids=position_ids, labels=ids, use_cache=False).loss
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        return float(loss.detach()), grads, sum(storages.values())

    sdpa, blocked = lora(False), lora(True)
    assert blocked.config._attn_implementation == attention.NAME and sdpa.config._attn_implementation == "sdpa"
    assert "tuneguard" not in blocked.config.to_json_string()  # a saved config still says nothing of it
    shape = ModelShape.from_config(sdpa.config)
    kept = {}
    for name, model in (("sdpa", sdpa), ("blocked", blocked)):
        for docs, position_ids in (("one", one_document), ("two", two_documents)):
            kept[name, docs] = step(model, position_ids)
    for docs in ("one", "two"):
        assert kept["blocked", docs][0] == pytest.approx(kept["sdpa", docs][0], rel=1e-6)
        for a, b in zip(kept["sdpa", docs][1], kept["blocked", docs][1], strict=True):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    tokens, layers = ids.numel(), shape.layers
    assert kept["sdpa", "one"][2] - kept["blocked", "one"][2] == tokens * layers * 4 * shape.heads  # SDPA's fp32 log-sum-exp
    assert kept["sdpa", "two"][2] - kept["sdpa", "one"][2] == tokens * layers * mask_bytes_per_token(shape, 32, 4)
    assert kept["blocked", "two"][2] - kept["blocked", "one"][2] == ids.shape[0] * 32 * 32  # the one boolean mask
