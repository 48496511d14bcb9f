"""The adapter-method registry: one entry per recipe method, and what training, guards, export and the
recipe check ask of it agrees with what the tiny PEFT models actually hold."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest
import torch
from transformers import BertForSequenceClassification

from tuneguard.adapters.capabilities import CAPABILITIES, reports_rank
from tuneguard.adapters.registry import (
    METHODS,
    apply_adapter,
    is_adapter_param,
    method_spec,
    spec_of_model,
)
from tuneguard.errors import TuneguardError
from tuneguard.eval.guards import adapter_weight_delta
from tuneguard.export import export_merged
from tuneguard.recipe import AdapterConfig, validate

DATA = {"kind": "text", "train": "train.jsonl"}


def test_every_recipe_method_has_one_spec() -> None:
    recipe_methods = set(typing.get_args(AdapterConfig.model_fields["method"].annotation))
    assert recipe_methods == set(METHODS) == set(CAPABILITIES)
    for name, spec in METHODS.items():
        assert spec.name == name
        assert method_spec(AdapterConfig(method=name)) is spec
        assert spec.param_markers


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("encoder", [False, True], ids=["decoder", "encoder"])
def test_adapter_params_are_exactly_the_new_ones(method: str, encoder: bool, tiny_llama, tiny_bert_dir: Path) -> None:
    """``is_adapter_param`` (the frozen checksum's filter) names every parameter PEFT added and no backbone one."""
    model = BertForSequenceClassification.from_pretrained(tiny_bert_dir) if encoder else tiny_llama[0]
    backbone = {id(p) for p in model.parameters()}
    if encoder and not METHODS[method].classifier:  # refused: no base could be scored on it
        with pytest.raises(TuneguardError, match=f"adapter.method '{method}' adapts a language model"):
            apply_adapter(model, AdapterConfig(method=method, r=4), is_encoder=encoder, total_steps=10)
        return
    peft_model = apply_adapter(model, AdapterConfig(method=method, r=4), is_encoder=encoder, total_steps=10)
    spec = METHODS[method]
    assert peft_model.active_peft_config.peft_type == spec.peft_type
    assert spec_of_model(peft_model) is spec
    named = list(peft_model.named_parameters())
    assert any(p.requires_grad for _, p in named)
    assert all(is_adapter_param(n) for n, p in named if p.requires_grad)
    assert [n for n, p in named if is_adapter_param(n) == (id(p) in backbone)] == []
    own = [n for n, p in named if id(p) not in backbone and "modules_to_save" not in n]
    assert own and all(any(m in n for m in spec.param_markers) for n in own)


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("quant", ["none", "nf4", "fp4", "int8"])
@pytest.mark.parametrize("use_dora", [False, True])
def test_capabilities_agree_with_recipe_validation(method: str, quant: str, use_dora: bool) -> None:
    spec = METHODS[method]
    data = {"adapter": {"method": method, "use_dora": use_dora}, "quantization": {"method": quant}, "data": DATA}
    if use_dora and not spec.dora:
        with pytest.raises(TuneguardError, match="adapter.use_dora applies to method 'lora' only"):
            validate(data, "r.yaml")
    elif quant in ("nf4", "fp4") and not spec.four_bit:
        with pytest.raises(TuneguardError, match=f"adapter.method '{method}' does not work on a 4-bit backbone "
                                                 rf"\(quantization.method '{quant}'\); use int8 or none, or lora"):
            validate(data, "r.yaml")
    else:
        assert validate(data, "r.yaml").adapter.method == method


@pytest.mark.parametrize(("adapter", "refusal"), [
    ({"init": "pissa"}, "adapter.init 'pissa' rewrites the frozen weights"),
    ({"init": "olora"}, "adapter.init 'olora' rewrites the frozen weights"),
    ({"method": "ia3", "use_rslora": True}, "adapter.use_rslora applies to adapter.method 'lora' only"),
    ({"method": "loha", "init": "gaussian"}, "adapter.init applies to adapter.method 'lora' only"),
    ({"method": "prompt_tuning", "layers_to_transform": [0]}, "prompt tuning adds virtual tokens, in no layer"),
    ({"method": "adalora", "freeze_layers_below": 2}, "adapter.freeze_layers_below: AdaLoRA's rank budget"),
    ({"method": "adalora", "unfreeze_every": 5}, "adapter.unfreeze_every: AdaLoRA's rank budget"),
])
def test_keys_a_method_would_ignore_or_break_are_refused(adapter: dict, refusal: str) -> None:
    """Accepted and silently without effect (rsLoRA on IA3), or a run that can never be evaluated (PiSSA rewrites
    the frozen weights) or crashes at its first step (AdaLoRA prunes frozen layers from their missing gradients)."""
    with pytest.raises(TuneguardError, match=refusal.replace("(", r"\(")):
        validate({"adapter": adapter, "data": DATA}, "r.yaml")


def test_flags_per_method() -> None:
    """The few methods that are exceptions, so a changed flag is a visible decision."""
    assert {m for m, s in METHODS.items() if not s.four_bit} == {"loha", "lokr"}
    assert {m for m, s in METHODS.items() if not s.mergeable} == {"prompt_tuning"}
    assert {m for m, s in METHODS.items() if not s.packable} == {"prompt_tuning"}
    assert {m for m, s in METHODS.items() if not s.has_rank} == {"ia3", "prompt_tuning"}
    assert {m for m, s in METHODS.items() if s.dora} == {"lora"}
    assert not reports_rank("ia3") and reports_rank("lora") and reports_rank(None) and reports_rank("old-method")


@pytest.mark.parametrize("method", sorted(METHODS))
def test_weight_guard_sees_the_adapter_move(method: str, tiny_llama) -> None:
    """A fresh adapter is a no-op (the guard fails); once its weights move, the guard passes. Only AdaLoRA
    adds a loss term."""
    torch.manual_seed(0)
    model = apply_adapter(tiny_llama[0], AdapterConfig(method=method, r=4), is_encoder=False, total_steps=10)
    assert (METHODS[method].extra_loss(model) is None) == (method != "adalora")
    if METHODS[method].moved is None:
        guard = adapter_weight_delta(model)
        assert guard.passed and guard.detail == "prompt tuning: checked through the outputs guard"
        return
    assert not adapter_weight_delta(model).passed
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    assert adapter_weight_delta(model).passed


def test_adalora_loss_term_and_rank_budget(tiny_llama) -> None:
    spec = METHODS["adalora"]
    model = apply_adapter(tiny_llama[0], AdapterConfig(method="adalora", r=4), is_encoder=False, total_steps=10)
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".ranknum." in n)
    extra = spec.extra_loss(model)
    assert extra is not None and extra.ndim == 0 and float(extra.detach()) > 0
    (model(input_ids=torch.tensor([[5, 6, 7, 8]])).logits.float().mean() + extra).backward()
    spec.after_step(model, 1)
    assert model.base_model.rankallocator.ipt  # the budget read the gradients


def test_unmergeable_method_is_refused_before_loading(tmp_path: Path) -> None:
    recipe = validate({"adapter": {"method": "prompt_tuning"}, "data": DATA}, "r.yaml")
    assert not method_spec(recipe.adapter).mergeable
    with pytest.raises(TuneguardError, match="cannot be merged into the weights"):
        export_merged(recipe, tmp_path / "adapter", tmp_path / "out")
    assert not (tmp_path / "out").exists()
