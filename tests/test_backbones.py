"""Backbones: sources, quantization on CPU, fingerprints, the GGUF cache, bf16 detection."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch

from tuneguard.backbones import fingerprint, load_backbone, resolve_source
from tuneguard.errors import TuneguardError
from tuneguard.recipe import ModelConfig, QuantizationConfig


@pytest.mark.parametrize("method", ["nf4", "fp4", "int8"])
def test_quantized_tiny_llama_runs_on_cpu(tiny_llama_dir: Path, method: str) -> None:
    backbone = load_backbone(ModelConfig(source=str(tiny_llama_dir)), QuantizationConfig(method=method))
    linear = backbone.model.model.layers[0].self_attn.q_proj
    assert type(linear).__name__ == ("Linear8bitLt" if method == "int8" else "Linear4bit")
    assert not any(p.requires_grad for p in backbone.model.parameters())
    with torch.no_grad():
        logits = backbone.model(torch.tensor([[5, 6, 7]])).logits
    assert torch.isfinite(logits).all()


def test_fingerprint_tracks_weights_and_quantization(tiny_llama_dir: Path, tmp_path: Path) -> None:
    none, nf4 = QuantizationConfig(method="none"), QuantizationConfig(method="nf4")
    a = fingerprint(str(tiny_llama_dir), False, None, none)
    assert a == fingerprint(str(tiny_llama_dir), False, None, none)
    assert a != fingerprint(str(tiny_llama_dir), False, None, nf4)
    # The compute dtype is the machine's choice, not the backbone's; double quantization changes the weights.
    assert fingerprint(str(tiny_llama_dir), False, None, QuantizationConfig(method="nf4", compute_dtype="float32")) \
        == fingerprint(str(tiny_llama_dir), False, None, nf4)
    assert fingerprint(str(tiny_llama_dir), False, None, QuantizationConfig(method="nf4", double_quant=False)) \
        != fingerprint(str(tiny_llama_dir), False, None, nf4)
    other = tmp_path / "copy"
    shutil.copytree(tiny_llama_dir, other)
    assert fingerprint(str(other), False, None, none) == a  # content, not location
    (other / "README.md").write_text("notes")
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "transformers_version": "9.9.9"}, indent=4))
    assert fingerprint(str(other), False, None, none) == a  # bookkeeping and a README are not the model
    (other / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))
    assert fingerprint(str(other), False, None, none) != a  # another architecture on the same weights
    (other / "config.json").write_text(json.dumps(config))
    (other / "tokenizer.json").write_text((other / "tokenizer.json").read_text().replace('"a"', '"A"', 1))
    assert fingerprint(str(other), False, None, none) != a  # another tokenizer
    shutil.copy(tiny_llama_dir / "tokenizer.json", other / "tokenizer.json")
    assert fingerprint(str(other), False, None, none) == a
    weights = other / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert fingerprint(str(other), False, None, none) != a


def test_a_data_folder_hashes_what_the_readers_read(tmp_path: Path) -> None:
    """A resumed run compares its data's hash: a Finder's ``.DS_Store`` beside the images is not other data."""
    from tuneguard.backbones import path_sha256

    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "a.png").write_bytes(b"pixels")
    before = path_sha256(tmp_path)
    (tmp_path / ".DS_Store").write_bytes(b"finder")
    (tmp_path / "cat" / "._a.png").write_bytes(b"sidecar")
    assert path_sha256(tmp_path) == before
    (tmp_path / "cat" / "a.png").write_bytes(b"other pixels")
    assert path_sha256(tmp_path) != before


def test_hub_fingerprint_is_the_resolved_commit(tiny_llama_dir: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A hub model is fingerprinted by its id and the commit its revision resolved to, not by its name alone (a new
    commit on main is another backbone), nor by which of the commit's files the cache happens to hold."""
    hub = tmp_path / "hub"
    repo = hub / "models--org--tiny"
    for commit in ("a" * 40, "b" * 40):
        shutil.copytree(tiny_llama_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    q = QuantizationConfig()
    (repo / "refs" / "main").write_text("a" * 40)
    first = fingerprint("org/tiny", True, None, q)
    assert first == fingerprint("org/tiny", True, "a" * 40, q)
    (repo / "snapshots" / ("a" * 40) / "consolidated.safetensors").write_bytes(b"a later full download")
    assert fingerprint("org/tiny", True, None, q) == first
    (repo / "refs" / "main").write_text("b" * 40)
    assert fingerprint("org/tiny", True, None, q) != first
    assert fingerprint("org/absent", True, None, q) != fingerprint("org/absent", True, "v2", q)


def test_encoder_gets_classification_head(tiny_bert_dir: Path) -> None:
    backbone = load_backbone(ModelConfig(source=str(tiny_bert_dir)), QuantizationConfig(), num_labels=3)
    assert backbone.is_encoder and backbone.model.config.num_labels == 3


def test_source_errors(tmp_path: Path) -> None:
    with pytest.raises(TuneguardError, match="directory not found"):
        resolve_source(ModelConfig(source="./missing"))
    with pytest.raises(TuneguardError, match="GGUF file not found"):
        resolve_source(ModelConfig(source=str(tmp_path / "m.gguf")))
    with pytest.raises(TuneguardError, match="without config.json"):
        resolve_source(ModelConfig(source=str(tmp_path)))
    with pytest.raises(TuneguardError, match="unknown bundled model 'nope'"):
        resolve_source(ModelConfig(source="bundled:nope"))
    assert resolve_source(ModelConfig(source="HuggingFaceTB/SmolLM2-135M")) == ("HuggingFaceTB/SmolLM2-135M", True)
    with pytest.raises(TuneguardError, match=r"model.gguf_file: m.gguf not found in"):
        resolve_source(ModelConfig(source=str(tmp_path), gguf_file="m.gguf"))  # a traceback before
    with pytest.raises(TuneguardError, match="model.gguf_file applies to a local folder"):
        resolve_source(ModelConfig(source="HuggingFaceTB/SmolLM2-135M-GGUF", gguf_file="m.gguf"))  # was ignored


def test_an_encoder_whose_config_does_not_fit_its_weights_is_refused(tiny_bert_dir: Path, tmp_path: Path) -> None:
    """ignore_mismatched_sizes (for a new head) re-initialised every layer that did not fit, silently."""
    import json
    import shutil

    odd = tmp_path / "odd-bert"
    shutil.copytree(tiny_bert_dir, odd)
    config = json.loads((odd / "config.json").read_text())
    config["intermediate_size"] = 48
    (odd / "config.json").write_text(json.dumps(config))
    with pytest.raises(TuneguardError, match=r"weights do not fit its config.json \(first: bert.encoder.layer.0."):
        load_backbone(ModelConfig(source=str(odd)), QuantizationConfig(), num_labels=3)
    (odd / "tokenizer.json").unlink()
    config["intermediate_size"] = json.loads((tiny_bert_dir / "config.json").read_text())["intermediate_size"]
    (odd / "config.json").write_text(json.dumps(config))
    with pytest.raises(TuneguardError, match=r"model.source: cannot load '.*odd-bert'"):  # no tokenizer: one line
        load_backbone(ModelConfig(source=str(odd)), QuantizationConfig(), num_labels=3)


def test_gguf_conversion_drives_tuneguards_progress_line_not_a_tqdm_bar() -> None:
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    from tuneguard.backbones import _gguf_bar

    library_bar = gguf_utils.tqdm
    seen: list[tuple[int, int]] = []
    with _gguf_bar(lambda done, total: seen.append((done, total))):
        assert list(gguf_utils.tqdm(["a", "b", "c"], desc="Converting and de-quantizing GGUF tensors...")) == ["a", "b", "c"]
    assert seen == [(1, 3), (2, 3), (3, 3)]
    assert gguf_utils.tqdm is library_bar


@pytest.mark.slow
def test_bundled_gguf_is_converted_once_and_cached() -> None:
    path, is_hub = resolve_source(ModelConfig(source="bundled:smollm2-135m-instruct"))
    assert not is_hub and (Path(path) / "model.safetensors").exists()
    stamp = (Path(path) / "model.safetensors").stat().st_mtime_ns
    again, _ = resolve_source(ModelConfig(source="bundled:smollm2-135m-instruct"))
    assert again == path and (Path(path) / "model.safetensors").stat().st_mtime_ns == stamp
    assert not list(Path(path).glob("*.bin"))  # safetensors only


def test_a_weights_file_changed_in_place_is_hashed_again_and_its_conversion_not_reused(tmp_path: Path) -> None:
    """``cp -p`` over a cached file keeps size and mtime: the hash memo and a cached GGUF conversion still notice."""
    import json
    import os

    from tuneguard.backbones import GGUF_SOURCE, _intact, file_sha256

    folder = tmp_path / "conversion"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    weights = folder / "model.safetensors"
    weights.write_bytes(b"a" * 64)
    before = file_sha256(weights)
    (folder / GGUF_SOURCE).write_text(json.dumps({"weights": {weights.name: before}}))
    assert _intact(folder)
    stat = weights.stat()
    weights.write_bytes(b"b" * 64)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert file_sha256(weights) != before
    assert not _intact(folder)
    (folder / GGUF_SOURCE).write_text(json.dumps({"gguf": "x.gguf"}))  # written before the hashes were kept
    assert not _intact(folder)


def test_no_compiled_kernel_is_fetched_from_the_hub(tiny_llama_dir: Path) -> None:
    """transformers 5 kernelizes every model it loads (hub kernels, fetched when online) and bitsandbytes asks the
    Hub for a compiled CPU kernel at import on AVX512-BF16 CPUs: after ``import tuneguard`` neither happens, in a
    fresh process as in one started by a tuneguard process (which inherits ``USE_HUB_KERNELS=NO``)."""
    code = ("import sys, tuneguard, peft, bitsandbytes\n"
            "assert sys.modules.get('kernels') is None, sys.modules.get('kernels')\n"
            "from transformers import AutoModelForCausalLM\n"
            f"print(AutoModelForCausalLM.from_pretrained({str(tiny_llama_dir)!r}).use_kernels)")
    for inherited in ({}, {"USE_HUB_KERNELS": "NO"}):
        env = {k: v for k, v in os.environ.items() if k != "USE_HUB_KERNELS"} | inherited
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
        assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr[-2000:]


def test_max_length_is_checked_against_the_positions_an_encoder_can_use() -> None:
    """RoBERTa declares 514 positions and counts them from its padding index + 1: 512 are usable."""
    from types import SimpleNamespace

    from tuneguard.backbones import check_max_length
    from tuneguard.errors import TuneguardError

    def backbone(model_type: str) -> SimpleNamespace:
        config = SimpleNamespace(model_type=model_type, max_position_embeddings=514, pad_token_id=1)
        return SimpleNamespace(image=None, model=SimpleNamespace(config=config))

    check_max_length(backbone("roberta"), 512)
    check_max_length(backbone("bert"), 514)
    with pytest.raises(TuneguardError, match=r"data.max_length=513 is past the backbone's 512 positions"):
        check_max_length(backbone("roberta"), 513)
