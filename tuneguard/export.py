"""Merge a trained adapter into its backbone and save a plain Hugging Face model.

The export carries what the run knew (a classifier's label names, a decoder's prompt template in a
model card) and is checked before it is called saved: finite tensors, it loads back, and a probe
forward of the reloaded model equals the adapter model's.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, PreTrainedModel

from tuneguard.adapters.registry import load_adapter, method_spec
from tuneguard.backbones import load_backbone, recipe_fingerprints
from tuneguard.data.examples import has_chat_template, label_index
from tuneguard.errors import TuneguardError
from tuneguard.eval.guards import PROBE, require_trained_backbone
from tuneguard.io import atomic_dir, atomic_write_json, atomic_write_text
from tuneguard.recipe import QuantizationConfig, Recipe
from tuneguard.rundir import adapter_fingerprint
from tuneguard.weights import check_weights_dir

MARKER = "tuneguard-export.json"
"""Written into every export: only a folder holding it may be replaced by a new export."""
TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2, "float16": 2e-2}
"""Largest |reloaded - adapter| probe logit, relative to the largest |logit|: merging rounds in the dtype."""


def export_merged(recipe: Recipe, adapter_dir: Path, out: Path, dtype: str = "float32") -> str | None:
    """Load the backbone unquantized, merge the adapter into it, and save weights + tokenizer; what the user must
    know of the export (a quantized run's scores differently), or None.

    Merging into 4-bit weights would round the adapter away, so the merge always happens on the
    full-precision backbone, which is what a user deploys.
    """
    if recipe.data.kind == "image_classification":
        raise TuneguardError("tuneguard export merges language backbones; for an image backbone, load the run's "
                             "adapter/ with PEFT (PeftModel.from_pretrained) on the same model.source")
    if not method_spec(recipe.adapter).mergeable:  # only prompt tuning: virtual tokens, no weight delta
        raise TuneguardError("prompt tuning adds virtual tokens and cannot be merged into the weights")
    if out.exists() and not (out / MARKER).exists():
        raise TuneguardError(f"{out} exists and is not a tuneguard export; choose another --out (nothing is replaced)")
    model_cfg = recipe.model.model_copy(update={"dtype": dtype})
    backbone = load_backbone(model_cfg, QuantizationConfig(method="none"), num_labels=recipe.data.num_labels)
    # after the load: a hub model's commit is known once it is in the cache
    require_trained_backbone(adapter_dir.parent, adapter_fingerprint(adapter_dir),
                             recipe_fingerprints(recipe.model, recipe.quantization))
    peft_model = load_adapter(backbone.model, adapter_dir).eval()
    ids = torch.tensor([backbone.tokenizer(PROBE)["input_ids"]])
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits.float()
        merged = peft_model.merge_and_unload()
    if backbone.is_encoder:
        _, verbalizers = label_index(recipe.data)
        merged.config.id2label = dict(enumerate(verbalizers))
        merged.config.label2id = {v: i for i, v in enumerate(verbalizers)}
    try:
        with torch.no_grad(), atomic_dir(out) as tmp:
            merged.save_pretrained(tmp, safe_serialization=True)
            backbone.tokenizer.save_pretrained(tmp)
            chat = not backbone.is_encoder and has_chat_template(backbone.tokenizer, recipe.data)
            atomic_write_text(tmp / "README.md", model_card(recipe, chat, encoder=backbone.is_encoder))
            verify_export(tmp, backbone.is_encoder, ids, expected, dtype)
            atomic_write_json(tmp / MARKER, {"recipe": recipe.output.name, "adapter": str(adapter_dir), "dtype": dtype})
    except OSError as exc:
        raise TuneguardError(f"{out}: cannot write the export ({exc.strerror or exc}); nothing saved") from None
    if recipe.quantization.method == "none":
        return None
    how = ("score it on your validation rows" if backbone.is_encoder
           else f"score it (tuneguard eval --model {out} for the general tasks)")
    seen = "on the bundled SmolLM2, nf4 and fp32 chose the same next token at only 47-85% of positions"
    return f"{QUANTIZED_EXPORT.format(method=recipe.quantization.method, dtype=dtype)} ({seen}): {how} before relying on the report"


def verify_export(folder: Path, is_encoder: bool, ids: torch.Tensor, expected: torch.Tensor, dtype: str) -> None:
    """Finite tensors, loads back, and the probe's logits match the adapter model's within the dtype's rounding."""
    check_weights_dir(folder, finite=True)
    cls = AutoModelForSequenceClassification if is_encoder else AutoModelForCausalLM
    try:
        reloaded: PreTrainedModel = cls.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()
    except (OSError, ValueError) as exc:
        raise TuneguardError(f"export check failed, nothing saved: the merged model does not load back ({exc})") from None
    with torch.no_grad():
        got = reloaded(input_ids=ids).logits.float()
    scale = max(float(expected.abs().max()), 1.0)
    diff = float((got - expected).abs().max()) / scale
    if got.shape != expected.shape or not diff <= TOLERANCE[dtype]:
        raise TuneguardError(f"export check failed, nothing saved: the merged model's probe logits differ from the "
                             f"adapter model's by {diff:.3g} of their scale (allowed {TOLERANCE[dtype]:g})")


QUANTIZED_EXPORT = ("the adapter was trained and evaluated on the {method} backbone; it is merged here into the "
                    "unquantized one ({dtype}), whose outputs can differ a lot from those the run's report scored")


def model_card(recipe: Recipe, chat_template: bool, encoder: bool = False) -> str:
    """What a user of the merged model needs to feed it as it was trained: a decoder's prompt (``chat_template``:
    training rendered rows with the tokenizer's template, which it does only where the tokenizer has one) and
    answers, a classifier's input template (its labels are config.json's ``id2label``)."""
    data = recipe.data
    what = "a sequence classifier" if encoder else "a language model"
    lines = [
        f"# {recipe.output.name}: {recipe.model.source} with a merged {recipe.adapter.method} adapter",
        "",
        f"Exported by tuneguard ({what}). Give it input as it was trained:",
        "",
        f"- task kind: `{data.kind}`",
    ]
    if not encoder:
        lines.append(f"- chat template: {'used (the tokenizer saved here carries it)' if chat_template else 'not used (plain text)'}")
    if recipe.quantization.method != "none":
        lines.append(f"- note: {QUANTIZED_EXPORT.format(method=recipe.quantization.method, dtype='these weights')}")
    if data.system_prompt and not encoder:
        lines.append(f"- system prompt: `{data.system_prompt}`")
    if data.kind == "instruction" and data.prompt_template is None:
        lines.append(f"- prompt: a row's `{data.prompt_field}` field as written (or its `{data.messages_field}`), "
                     f"answered with its `{data.response_field}`")
    elif data.kind != "text":
        lines += ["- input template (fields of a row go in as `{name}`):", "", "```", data.template, "```"]
    if data.kind == "classification":
        _, verbalizers = label_index(data)
        named = "Labels (config.json's id2label, in class order)" if encoder else "Answers (one per class, in class order)"
        lines += ["", f"{named}: " + ", ".join(f"`{v}`" for v in verbalizers)]
    return "\n".join(lines) + "\n"
