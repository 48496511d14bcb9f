"""The recipe: one YAML file describing a run, validated before anything heavy is loaded.

Errors name the YAML path (``adapter.r``), what was expected, and for unknown keys the closest
valid key, so a typo costs seconds rather than a failed run twenty minutes in.
"""

from __future__ import annotations

import difflib
import importlib.util
import string
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from tuneguard.adapters.capabilities import CAPABILITIES
from tuneguard.errors import TuneguardError, require_lm_eval
from tuneguard.io import read_yaml
from tuneguard.rundir import safe_name


def template_fields(template: str) -> list[str]:
    """The ``{name}`` s a prompt template reads, in order."""
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """``batch_size: true`` would pass as 1 (pydantic's lax mode reads a boolean as a number)."""
        if isinstance(value, bool) and info.field_name is not None:
            annotation = cls.model_fields[info.field_name].annotation
            kinds = set(get_args(annotation)) or {annotation}
            if bool not in kinds and kinds & {int, float}:
                raise ValueError(f"expected a number, got the boolean {str(value).lower()}")
        return value


class ModelConfig(Section):
    source: str = "bundled:smollm2-135m-instruct"
    """A local HF directory, a hub id, a ``.gguf`` file, or ``bundled:NAME``."""
    gguf_file: str | None = None
    """The GGUF file name inside ``source`` when ``source`` is a local directory."""
    revision: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    trust_remote_code: bool = False


class QuantizationConfig(Section):
    method: Literal["none", "nf4", "fp4", "int8"] = "none"
    double_quant: bool = True
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"

    @property
    def four_bit(self) -> bool:
        """nf4 or fp4: weights packed two to a byte, with a double quantization and a compute dtype of their own."""
        return self.method in ("nf4", "fp4")

    @model_validator(mode="after")
    def _four_bit_keys(self) -> QuantizationConfig:
        """double_quant and compute_dtype shape a 4-bit load; with int8 or none they were accepted and ignored."""
        if not self.four_bit and (not self.double_quant or self.compute_dtype != "auto"):
            key = "compute_dtype" if self.compute_dtype != "auto" else "double_quant"
            raise ValueError(f"quantization.{key} applies to 4-bit methods (nf4, fp4); method '{self.method}' has "
                             "none (drop it)")
        return self


class AdapterConfig(Section):
    method: Literal["lora", "ia3", "loha", "lokr", "adalora", "prompt_tuning"] = "lora"
    r: int = Field(16, ge=1)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: str | list[str] = "all-linear"
    """``all-linear``, ``attention``, ``mlp``, or explicit module names."""
    layers_to_transform: list[int] | None = None
    use_rslora: bool = False
    use_dora: bool = False
    init: Literal["default", "gaussian", "pissa", "olora"] = "default"
    num_virtual_tokens: int = Field(16, ge=1)
    """Prompt tuning only."""
    freeze_layers_below: int = Field(0, ge=0)
    """Keep the adapters of the lowest N layers frozen (layer-wise freezing)."""
    unfreeze_every: int = Field(0, ge=0)
    """Gradual unfreezing: every N steps, one more frozen layer (top-down) starts training."""

    def unused_keys(self) -> list[str]:
        """Keys the recipe sets that its method does not read (``adapter.r`` with IA3, ``adapter.target_modules``
        with prompt tuning): said at the start, not refused, so a recipe can switch methods by one override."""
        fields = type(self).model_fields  # a stored recipe.yaml sets every key: only a value off its default counts
        return [f"adapter.{k}" for k in sorted(self.model_fields_set - CAPABILITIES[self.method].keys - {"method"})
                if getattr(self, k) != fields[k].default]

    def method_problem(self) -> str | None:
        """Keys the method would ignore or cannot honour, which a run should not silently train without."""
        if self.init in ("pissa", "olora"):
            return (f"adapter.init '{self.init}' rewrites the frozen weights (W - B0 A0) when the adapter is built, so "
                    "'base' (the same weights, adapter disabled) could not be scored and every evaluation would be "
                    "refused; use default or gaussian")
        lora_only = {"adapter.use_rslora": self.use_rslora, "adapter.init": self.init != "default"}
        if self.method != "lora" and (used := [key for key, on in lora_only.items() if on]):
            return f"{used[0]} applies to adapter.method 'lora' only (this recipe trains '{self.method}')"
        if self.method == "prompt_tuning" and self.layers_to_transform is not None:
            return "adapter.layers_to_transform: prompt tuning adds virtual tokens, in no layer"
        if self.method == "adalora" and (self.freeze_layers_below or self.unfreeze_every):
            key = "adapter.freeze_layers_below" if self.freeze_layers_below else "adapter.unfreeze_every"
            return (f"{key}: AdaLoRA's rank budget updates and prunes every layer's singular values from their "
                    "gradients, so a frozen layer cannot stay frozen; use lora, or no layer-wise freezing")
        return None


AUGMENT_OPS = ("synonym", "insert", "swap", "delete", "char_noise")
"""EDA's synonym replacement, random insertion, random swap and random deletion, then typo-like letter noise
(``tuneguard/data/augment.py`` implements them; named here so a recipe is checked before anything loads)."""
AUGMENT_ALIASES = {"word_dropout": "delete"}
"""Names from before EDA's operations: ``word_dropout`` dropped each word with ``augment_prob``, as ``delete`` does."""
IMAGE_AUGMENT_OPS = ("rotate", "scale", "hflip", "vflip", "color")
"""Image augmentation of training images (``tuneguard/data/image_augment.py``): a random rotation, zoom, horizontal
and vertical flip, and brightness/contrast change, each drawn per image and epoch."""


def class_names(labels: list[str] | dict[str, str] | None) -> list[str]:
    """``data.labels``' names in class-index order, each once (a mapping may give several raw labels one name,
    ``{1: negative, 2: negative, 4: positive, 5: positive}``: two classes)."""
    return list(dict.fromkeys(labels.values() if isinstance(labels, dict) else labels or []))


FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet"}
"""The data formats a file's suffix names (``data.format: auto``)."""


class DataConfig(Section):
    kind: Literal["classification", "instruction", "text", "image_classification"] = "classification"
    train: str
    validation: str | None = None
    val_fraction: float = Field(0.1, ge=0, lt=1)
    """When ``validation`` is not given, this fraction of ``train`` is split off with ``seed``."""
    format: Literal["auto", "jsonl", "csv", "tsv", "parquet"] = "auto"
    header: bool = True
    """CSV/TSV: whether the first line names the columns; without one, ``columns`` must name them."""
    columns: list[str] | None = None
    """CSV/TSV column names, in order (replaces the header line when ``header`` is true)."""
    text_field: str = "text"
    label_field: str = "label"
    labels: list[str] | dict[str, str] | None = None
    """Classification label set. A list maps index -> verbalizer; a dict maps raw label -> verbalizer."""
    prompt_template: str | None = None
    """Classification/instruction prompt. Fields of the row go in as ``{name}``; default ``{<text_field>}``."""
    prompt_field: str = "prompt"
    response_field: str = "response"
    messages_field: str = "messages"
    system_prompt: str | None = None
    use_chat_template: bool = True
    max_length: int = Field(512, ge=8)
    pack: bool = True
    max_train_samples: int | None = Field(None, ge=1)
    max_val_samples: int | None = Field(None, ge=1)
    max_bad_fraction: float = Field(0.0, ge=0, le=1)
    allow_overlap: bool = False
    """Accept validation rows whose normalized inputs also occur in the training rows (and let ``tuneguard check``
    score such rows of a finished run)."""
    augment: str | list[str] = "none"
    """``none``, or operations on training rows' text (one drawn per augmented copy): see ``AUGMENT_OPS``."""
    augment_prob: float = Field(0.1, gt=0, le=1)
    """EDA's alpha: the share of a text's words an operation changes (``delete``: each word's chance)."""
    augment_copies: int = Field(1, ge=1, le=32)
    """Augmented copies per training row, kept beside the original (EDA's n_aug; its paper tried up to 32)."""
    replay: str | None = None
    """A text/JSONL file (or ``bundled:wiki``) of general text mixed into training to keep generalization."""
    replay_fraction: float = Field(0.0, ge=0, lt=1)
    folds: int | None = Field(None, ge=2)
    """Cross-validation (set by ``tuneguard cv``): ``train`` is split into this many seeded folds."""
    fold: int | None = Field(None, ge=0)
    """The fold this run validates on (0 to folds-1); the other folds train."""
    stratify: bool = False
    """Folds keep each label's share of the rows (classification)."""
    image_field: str = "image"
    """image_classification tables: the column holding each image's path (relative to the table)."""
    image_size: int = Field(32, ge=8, le=1024)
    """image_classification: every image is resized to this many pixels square (the backbone's input)."""
    image_augment: list[str] = []
    """image_classification: transforms applied to training images, drawn anew each epoch (``IMAGE_AUGMENT_OPS``)."""
    image_rotate_degrees: float = Field(15.0, gt=0, le=180)
    """``rotate``: the angle is drawn uniformly from [-degrees, +degrees]."""
    image_scale: tuple[float, float] = (0.85, 1.15)
    """``scale``: the zoom factor is drawn uniformly from [low, high] (above 1 zooms in)."""
    image_color: float = Field(0.2, gt=0, lt=1)
    """``color``: brightness and contrast factors are each drawn uniformly from [1 - color, 1 + color]."""

    @field_validator("augment")
    @classmethod
    def _known_augment_ops(cls, augment: str | list[str]) -> str | list[str]:
        for op in [augment] if isinstance(augment, str) else augment:
            if op not in AUGMENT_OPS and op not in AUGMENT_ALIASES and not (op == "none" and isinstance(augment, str)):
                close = difflib.get_close_matches(op, [*AUGMENT_OPS, *AUGMENT_ALIASES], n=1)
                hint = f"did you mean '{close[0]}'? " if close else ""
                raise ValueError(f"unknown operation '{op}'; {hint}choose 'none' alone, or one operation or a list of: "
                                 f"{', '.join(AUGMENT_OPS)} ({', '.join(f'{a} = {b}' for a, b in AUGMENT_ALIASES.items())})")
        return augment

    @field_validator("image_augment")
    @classmethod
    def _known_image_ops(cls, ops: list[str]) -> list[str]:
        for op in ops:
            if op not in IMAGE_AUGMENT_OPS:
                close = difflib.get_close_matches(op, IMAGE_AUGMENT_OPS, n=1)
                hint = f"did you mean '{close[0]}'? " if close else ""
                raise ValueError(f"unknown image transform '{op}'; {hint}choose from {', '.join(IMAGE_AUGMENT_OPS)}")
        return ops

    @field_validator("labels", mode="before")
    @classmethod
    def _labels_as_text(cls, labels: Any) -> Any:
        """Raw labels and names are text: ``{0: negative, 1: positive}`` (YAML's integer keys) means what it reads, and
        ``1.0`` reads as ``1``, as a data row's label does. YAML's booleans (``yes``, ``no``, ``on``...) are refused:
        their words would be lost."""
        def text(x: Any) -> Any:
            if isinstance(x, bool):
                raise ValueError(f"YAML read a label as the boolean {x}; quote it (\"yes\", \"no\") to keep the word")
            if isinstance(x, float) and x.is_integer():
                return str(int(x))
            return str(x) if isinstance(x, int | float) else x

        if isinstance(labels, dict):
            return {text(k): text(v) for k, v in labels.items()}
        return [text(v) for v in labels] if isinstance(labels, list) else labels

    @field_validator("labels")
    @classmethod
    def _labels_unambiguous(cls, labels: list[str] | dict[str, str] | None) -> list[str] | dict[str, str] | None:
        """A row's label may be a class's raw label (its index for a list) or its name; one that is both, for two
        classes, would be read silently as one of them (star ratings listed as ["1", ..., "5"])."""
        if isinstance(labels, list) and len(set(labels)) < len(labels):
            twice = next(name for name in labels if labels.count(name) > 1)
            raise ValueError(f"{twice!r} names two classes; list each class once (a mapping may give several raw "
                             f"labels one name: {{1: negative, 2: negative, 4: positive, 5: positive}})")
        classes = class_names(labels)
        # the class each raw label stands for: a mapping's keys, or a list's indices
        raw = {k: classes.index(v) for k, v in labels.items()} if isinstance(labels, dict) else {
            str(i): i for i in range(len(classes))}
        for i, name in enumerate(classes):
            if name in raw and raw[name] != i:
                form = "mapping's keys" if isinstance(labels, dict) else "list's indices"
                raise ValueError(
                    f"{name!r}, the name of class {i}, is also the raw label of class {raw[name]} (the "
                    f"{form}), so a row labelled {name!r} could mean either; map raw labels to distinct names, "
                    f"e.g. {{'{name}': 'label {name}'}}")
        return labels

    @field_validator("prompt_template")
    @classmethod
    def _template_names_fields(cls, template: str | None) -> str | None:
        """Every ``{...}`` names a row field; ``{}``, ``{0}`` or ``{a.b}`` would fail on every row (a literal brace
        is written twice)."""
        if template is None:
            return None
        try:
            parts = list(string.Formatter().parse(template))
        except ValueError as exc:
            raise ValueError(f"{exc} in {template!r}; write a literal brace twice ('{{{{' or '}}}}')") from None
        for _, name, _, _ in parts:
            if name is not None and (not name.strip() or name.isdigit() or "." in name or "[" in name):
                raise ValueError(f"{{{name}}} in {template!r} is not a field name: each {{...}} names a field of the "
                                 "rows, e.g. {sentence}; write a literal brace twice ('{{' or '}}')")
        return template

    @field_validator("image_scale")
    @classmethod
    def _scale_range(cls, scale: tuple[float, float]) -> tuple[float, float]:
        if not 0 < scale[0] <= scale[1] <= 4:
            raise ValueError(f"a range [low, high] with 0 < low <= high <= 4, got {list(scale)}")
        return scale

    def image_problem(self) -> str | None:
        """Why the image keys and the data kind do not go together, or None."""
        if self.kind != "image_classification":
            return "data.image_augment applies to data.kind 'image_classification'" if self.image_augment else None
        if not self.labels:
            return "data.labels is required when data.kind is 'image_classification' (class folder names or labels)"
        if self.augment_ops:
            return "data.augment is text augmentation; for images use data.image_augment (rotate, scale, hflip, ...)"
        return None

    def unused_problem(self) -> str | None:
        """Keys this data never reads (accepted silently before, as if they applied)."""
        if self.kind in ("text", "image_classification"):
            for key in ("prompt_template", "system_prompt"):
                if getattr(self, key) is not None:
                    return f"data.{key} shapes prompts; data.kind '{self.kind}' has none (drop it)"
        table = self.format if self.format != "auto" else FORMATS.get(Path(self.train).suffix.lower(), "")
        if self.columns and table in ("jsonl", "parquet"):
            return f"data.columns names CSV/TSV columns; a {table.upper()} file names its own fields (drop it)"
        return None

    def replay_problem(self) -> str | None:
        """data.replay and data.replay_fraction go together (either alone replayed nothing, silently); text only."""
        if self.replay and self.replay_fraction == 0:
            return (f"data.replay ({self.replay}) needs data.replay_fraction, its share of the training mix (e.g. 0.1); "
                    "at 0 nothing is replayed")
        if self.replay_fraction and not self.replay:
            return "data.replay_fraction needs data.replay, the text to mix in (e.g. bundled:wiki)"
        if self.replay and self.kind == "image_classification":
            return "data.replay mixes text into a language model's training; image classifiers take none"
        return None

    def augment_problem(self) -> str | None:
        """Text augmentation edits ``text_field``; where the rows' prompt does not read it, every copy would equal its
        original (the row silently weighted 1 + copies times)."""
        if not self.augment_ops or self.kind not in ("classification", "instruction"):
            return None
        as_written = self.kind == "instruction" and self.prompt_template is None  # the prompt field (or messages)
        reads = set() if as_written else set(template_fields(self.template))
        if self.text_field in reads:
            return None
        prompt = f"the prompt field '{self.prompt_field}' as written" if as_written else repr(self.template)
        return (f"data.augment edits data.text_field ('{self.text_field}'), which the rows' prompt ({prompt}) does not "
                "read, so each copy would equal its original; name the field to augment in data.text_field"
                + (" and read it in data.prompt_template" if as_written else ""))

    @property
    def augment_ops(self) -> list[str]:
        """The operations in effect, aliases resolved; empty when augmentation is off."""
        ops = [self.augment] if isinstance(self.augment, str) else self.augment
        return [AUGMENT_ALIASES.get(op, op) for op in ops if op != "none"]

    @property
    def classes(self) -> list[str]:
        """The class names in class-index order (:func:`class_names` of ``data.labels``)."""
        return class_names(self.labels)

    @property
    def num_labels(self) -> int | None:
        """The classifier head's size, or None for a language model (no labels)."""
        return len(self.classes) or None

    @property
    def template(self) -> str:
        """The prompt template in effect: the user's, or the text field alone."""
        return self.prompt_template if self.prompt_template is not None else "{" + self.text_field + "}"

    def fold_problem(self) -> str | None:
        """Why the cross-validation keys do not go together, or None."""
        if (self.folds is None) != (self.fold is None):
            return "data.folds and data.fold go together: the number of folds and the one this run validates on"
        if self.folds is None or self.fold is None:
            return "data.stratify applies to cross-validation folds (data.folds, data.fold)" if self.stratify else None
        if self.fold >= self.folds:
            return f"data.fold must be below data.folds={self.folds} (folds count from 0), got {self.fold}"
        if self.stratify and self.kind not in ("classification", "image_classification"):
            return f"data.stratify needs labels: data.kind is '{self.kind}', not a classification"
        unused = [f"data.{key}" for key in ("validation", "max_val_samples") if getattr(self, key) is not None]
        if unused:
            return (f"data.folds: each fold validates on its own rows of data.train, so {' and '.join(unused)} would "
                    f"go unused; remove {'them' if len(unused) > 1 else 'it'} (override: "
                    f"{' '.join(f'{key}=null' for key in unused)})")
        return None


class TrainConfig(Section):
    lr: float | None = Field(None, gt=0)
    """Peak learning rate; unset: the adapter method's usual one (``adapters/capabilities.py``), filled in by
    :class:`Recipe`, so a loaded recipe always holds the rate it trains at."""
    layer_lr_decay: float = Field(1.0, gt=0, le=1)
    """Layer-wise learning-rate decay: adapter weights in layer i of L train at lr * decay**(L-1-i), the top
    layer at lr; weights in no layer (a classifier head, virtual tokens) at lr. 1 is off."""
    epochs: float = Field(1, gt=0)
    max_steps: int | None = Field(None, ge=1)
    batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1)
    scheduler: Literal["linear", "cosine", "constant"] = "cosine"
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit"] = "adamw"
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    gradient_checkpointing: bool = False
    seed: int = Field(42, ge=0, le=2**32 - 1)
    deterministic: bool = False
    log_every: int = Field(5, ge=1)
    eval_every: int | None = Field(None, ge=1)
    early_stopping_patience: int | None = Field(None, ge=1)
    early_stopping_metric: Literal["val_loss", "accuracy", "f1_macro", "precision_macro", "recall_macro"] = "val_loss"
    """What each validation judges: the validation loss (lower is better), or the task metric scored on the
    validation rows as the final evaluation scores them (classification only; higher is better). Patience and
    ``select`` use it."""
    select: Literal["last", "best_task", "task_within_forgetting"] | None = None
    """Which adapter the run keeps: the ``last`` step's; the validation with the ``best_task`` metric; or
    ``task_within_forgetting``: the best task metric among validations whose general-text perplexity rose at most
    ``forgetting_bound`` percent over the base model. Unset: ``best_task`` with ``early_stopping_patience``, else
    ``last``."""
    forgetting_bound: float | None = Field(None, ge=0)
    """``task_within_forgetting``: the general-text perplexity rise allowed over the base model, in percent
    (``2.0``: at most 2% higher, i.e. a loss at most ln(1.02) = 0.0198 nats per token higher)."""
    save_every: int | None = Field(None, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    trackers: list[Literal["tensorboard", "wandb", "mlflow"]] = []

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _no_is_no(cls, value: Any) -> Any:
        """YAML reads a bare ``no`` (``train.mixed_precision=no``, as in Accelerate's configs) as false."""
        return "no" if value is False else value

    @field_validator("trackers")
    @classmethod
    def _trackers_installed(cls, trackers: list[str]) -> list[str]:
        # Accelerate only warns about a missing tracker and then logs nothing; a run should not start so.
        missing = [t for t in trackers if importlib.util.find_spec(t) is None]
        if missing:
            raise ValueError(f"tracker {missing} is not installed (pip install {' '.join(missing)})")
        return trackers

    def selection_problem(self, data: DataConfig) -> str | None:
        """Why the early-stopping and checkpoint-choice keys do not go together, or None."""
        metric, rule = self.early_stopping_metric, self.select
        if metric != "val_loss" and data.kind not in ("classification", "image_classification"):
            return (f"train.early_stopping_metric '{metric}' needs labels: data.kind is '{data.kind}', not "
                    "'classification' or 'image_classification' (use 'val_loss')")
        judged = rule in ("best_task", "task_within_forgetting")
        key = f"train.select '{rule}'" if judged else f"train.early_stopping_metric '{metric}'"
        if (metric != "val_loss" or judged) and data.validation is None and data.val_fraction == 0:
            return f"{key} needs validation rows: set data.validation or data.val_fraction"
        if (metric != "val_loss" or judged) and self.eval_every is None:
            return f"{key} is judged at each validation: set train.eval_every"
        if rule == "task_within_forgetting" and self.forgetting_bound is None:
            return "train.select 'task_within_forgetting' needs train.forgetting_bound (percent of general-text perplexity)"
        if rule != "task_within_forgetting" and self.forgetting_bound is not None:
            return "train.forgetting_bound applies to train.select 'task_within_forgetting' only"
        return None


class LmEvalConfig(Section):
    """How ``lm_eval:`` suites are run, with lm-evaluation-harness's semantics."""

    num_fewshot: int | None = Field(None, ge=0)
    """Shots for every lm-eval task (a task whose YAML pins 0 keeps 0); unset: the task's own default."""
    apply_chat_template: bool | None = None
    """Wrap prompts in the backbone's chat template; unset: on where the backbone has one (instruct models),
    which is what lm-eval recommends when it sees an instruct model run without it."""
    fewshot_as_multiturn: bool = True
    """With the chat template, few-shot examples as alternating user/assistant turns (lm-eval's default)."""
    system_instruction: str | None = None


class EvalConfig(Section):
    task: bool = True
    """Score the recipe's own validation data (base and tuned)."""
    suites: list[str] = []
    """General suites or task names run on base and tuned, e.g. ``general-small``; ``lm_eval:NAME`` or
    ``lm_eval:path/to/task.yaml`` for lm-evaluation-harness tasks (the ``tuneguard[lm-eval]`` extra)."""
    lm_eval: LmEvalConfig = LmEvalConfig()
    limit: int | None = Field(None, ge=1)
    max_regression: float | None = None
    margin: float | dict[str, float] = 2.0
    """Regression accepted, in points: one for all tasks, or per task name (``default`` for the others)."""
    correction: Literal["holm", "bh"] = "holm"
    """Multiplicity across the general suite: Holm (family-wise error) or Benjamini-Hochberg (FDR)."""
    batch_size: int = Field(8, ge=1)
    bootstrap: int = Field(1000, ge=100)
    """Random sign patterns drawn, at least, by a sign-flip test on more than 16 items (outcomes other than 0/1);
    the name is kept from the paired bootstrap it replaced, so older recipes keep working."""
    encoder_baseline: Literal["linear_probe", "random_head"] = "linear_probe"
    """Encoders (a new classifier head): what "before" is on the recipe's task. ``linear_probe``: the same head
    trained alone on the frozen backbone (same rows, steps, batch and schedule), with the untrained head shown
    as chance level; ``random_head``: the untrained head itself."""

    @field_validator("suites")
    @classmethod
    def _lm_eval_installed(cls, suites: list[str]) -> list[str]:
        wanted = [s for s in suites if s.startswith("lm_eval:")]
        if wanted:
            try:
                require_lm_eval(f"'{wanted[0]}'")
            except TuneguardError as exc:
                raise ValueError(str(exc)) from None
        return suites

    @field_validator("margin")
    @classmethod
    def _margin_not_negative(cls, margin: float | dict[str, float]) -> float | dict[str, float]:
        values = margin.values() if isinstance(margin, dict) else [margin]
        if any(v < 0 for v in values):
            raise ValueError("eval.margin must be >= 0 points")
        return margin


class OutputConfig(Section):
    dir: str = "runs/{name}"
    """Relative to the current directory (data paths are relative to the recipe file)."""
    name: str | None = None

    @field_validator("dir")
    @classmethod
    def _only_name_placeholder(cls, folder: str) -> str:
        try:
            folder.format(name="x")
        except (KeyError, IndexError, ValueError):
            raise ValueError(f"{folder!r} may contain only the placeholder {{name}}") from None
        return folder

    @field_validator("name")
    @classmethod
    def _one_component(cls, name: str | None) -> str | None:
        return None if name is None else safe_name(name)


class Recipe(Section):
    model: ModelConfig = ModelConfig()
    quantization: QuantizationConfig = QuantizationConfig()
    adapter: AdapterConfig = AdapterConfig()
    data: DataConfig
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    output: OutputConfig = OutputConfig()

    @model_validator(mode="after")
    def _method_default_lr(self) -> Recipe:
        """The one place an unset ``train.lr`` becomes the method's default (recipe.yaml then records it)."""
        if self.train.lr is None:
            self.train.lr = CAPABILITIES[self.adapter.method].lr
        return self

    @model_validator(mode="after")
    def _check_combinations(self) -> Recipe:
        caps = CAPABILITIES[self.adapter.method]
        if self.adapter.use_dora and not caps.dora:
            takes = " or ".join(f"'{m}'" for m, c in CAPABILITIES.items() if c.dora)
            raise ValueError(f"adapter.use_dora applies to method {takes} only")
        if problem := self.adapter.method_problem():
            raise ValueError(problem)
        if not caps.four_bit and self.quantization.four_bit:
            raise ValueError(
                f"adapter.method '{self.adapter.method}' does not work on a 4-bit backbone "
                f"(quantization.method '{self.quantization.method}'); use int8 or none, or lora"
            )
        if not self.data.header and not self.data.columns:
            raise ValueError("data.header: false needs data.columns to name the columns")
        if self.data.kind == "classification" and not self.data.labels:
            raise ValueError("data.labels is required when data.kind is 'classification'")
        if problem := (self.data.fold_problem() or self.data.augment_problem() or self.data.replay_problem()
                       or self.data.unused_problem()):
            raise ValueError(problem)
        if problem := self.train.selection_problem(self.data):
            raise ValueError(problem)
        if problem := self.data.image_problem() or self._image_backbone_problem():
            raise ValueError(problem)
        return self

    def _image_backbone_problem(self) -> str | None:
        """What an image backbone cannot do: general suites score language models; no 4-bit convolutions."""
        if self.data.kind != "image_classification":
            return None
        if self.eval.suites:
            return ("eval.suites: general suites score language models; an image backbone is evaluated on the "
                    "recipe's own validation images only (eval.suites=[])")
        if self.quantization.method != "none":
            return "quantization.method: image backbones are not quantized (bitsandbytes has no convolution layers); use none"
        if self.adapter.method != "lora":
            return "adapter.method: image backbones take 'lora' (on their linear and convolution layers)"
        if self.model.dtype not in ("auto", "float32"):
            return ("model.dtype: image backbones load in float32, the pixels' dtype (train.mixed_precision "
                    "still autocasts); use auto or float32")
        by_layer = {"train.layer_lr_decay": self.train.layer_lr_decay != 1,
                    "adapter.freeze_layers_below": self.adapter.freeze_layers_below > 0,
                    "adapter.unfreeze_every": self.adapter.unfreeze_every > 0,
                    "adapter.layers_to_transform": self.adapter.layers_to_transform is not None}
        if used := [key for key, on in by_layer.items() if on]:
            return (f"{used[0]}: layer-wise settings count transformer layers; an image backbone's stages number "
                    "their blocks each from 0, so there is no single layer depth to apply it to")
        return None

    def run_dir(self, recipe_path: Path | None = None) -> Path:
        name = self.output.name or (recipe_path.stem if recipe_path else "run")
        return Path(self.output.dir.format(name=safe_name(name)))

    def training_view(self) -> dict[str, Any]:
        """What decides the trained weights: everything but ``eval`` and ``output`` (checked on resume)."""
        return self.model_dump(mode="json", exclude={"eval", "output"})


# Names other fine-tuning tools use for our keys, so a migrating user gets the right suggestion.
ALIASES = {
    "rank": "r", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "learning_rate": "lr",
    "num_epochs": "epochs", "num_train_epochs": "epochs", "micro_batch_size": "batch_size",
    "per_device_train_batch_size": "batch_size", "gradient_accumulation_steps": "grad_accum",
    "sequence_len": "max_length", "max_seq_length": "max_length", "lr_scheduler": "scheduler",
    "lora_target_modules": "target_modules", "base_model": "source", "model_name_or_path": "source",
    "layer_decay": "layer_lr_decay",
}


def _field_names(model: type[BaseModel]) -> list[str]:
    return list(model.model_fields)


def _section_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model that owns the key at ``loc`` (to suggest the closest valid key)."""
    model: type[BaseModel] = Recipe
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        ann = field.annotation if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    return model


def _describe(err: dict[str, Any], origin: str) -> str:
    loc = tuple(err["loc"])
    path = ".".join(str(p) for p in loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        section = _section_at(loc)
        hint = ""
        if section is not None:
            names = _field_names(section)
            alias = ALIASES.get(str(loc[-1]))
            close = [alias] if alias in names else difflib.get_close_matches(str(loc[-1]), names, n=1, cutoff=0.5)
            if close:
                hint = f"; did you mean '{'.'.join([*map(str, loc[:-1]), close[0]])}'?"
        return f"{origin}: unknown key '{path}'{hint}"
    if err["type"] == "missing":
        return f"{origin}: missing required key '{path}'"
    if err["type"] == "value_error":
        where = f"'{path}': " if loc else ""  # a field's own check names it; a cross-section check names both
        return f"{origin}: {where}{err['msg'].removeprefix('Value error, ')}"
    return f"{origin}: '{path}': {err['msg']} (got {err.get('input')!r})"


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], value), the value parsed as YAML so ``1e-4`` is a float."""
    if "=" not in text:
        raise TuneguardError(f"override '{text}' is not of the form section.key=value")
    key, _, raw = text.partition("=")
    if not key.strip():
        raise TuneguardError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            nxt = node.setdefault(k, {})
            if not isinstance(nxt, dict):
                raise TuneguardError(f"override '{text}': '{k}' is not a section")
            node = nxt
        node[keys[-1]] = value
    return data


def resolve_paths(recipe: Recipe, base: Path) -> Recipe:
    """Data paths in a recipe are relative to the recipe file; make them absolute and check them. A
    ``model.source`` folder beside the recipe is taken from there too (else the current directory, or the hub)."""
    source = Path(recipe.model.source).expanduser()
    if not source.is_absolute() and (base / source).is_dir():
        recipe.model.source = str((base / source).resolve())
    for attr in ("train", "validation", "replay"):
        value = getattr(recipe.data, attr)
        if value is None or value.startswith("bundled:"):
            continue
        path = Path(value).expanduser()
        if not path.is_absolute():
            candidates = [base / path, Path.cwd() / path]
            path = next((c for c in candidates if c.exists()), candidates[0])
        if not path.exists():
            raise TuneguardError(f"data.{attr}: file not found: {value} (looked in {path.parent})")
        if path.is_dir() and not (recipe.data.kind == "image_classification" and attr != "replay"):
            raise TuneguardError(f"data.{attr}: {path} is a directory; name a JSONL, CSV, TSV or Parquet file")
        setattr(recipe.data, attr, str(path.resolve()))
    return recipe


def validate(data: Any, origin: str) -> Recipe:
    if not isinstance(data, dict):
        raise TuneguardError(f"{origin}: a recipe must be a YAML mapping of sections, got {type(data).__name__}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        errors = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")  # a misspelt key explains a missing one
        first = _describe(errors[0], origin)
        more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
        raise TuneguardError(first + more) from None


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override, validate and resolve a recipe file."""
    path = Path(path)
    if not path.is_file():
        raise TuneguardError(f"recipe not found: {path}")
    data = read_yaml(path) or {}
    if isinstance(data, dict):
        data = apply_overrides(data, overrides or [])
    recipe = validate(data, str(path))
    if recipe.output.name is None:
        try:
            recipe.output.name = path.stem
        except ValidationError:
            raise TuneguardError(f"{path}: the file name cannot name a run folder; set output.name") from None
    return resolve_paths(recipe, path.parent)


def recipe_defaults() -> dict[str, Any]:
    """Every key at its default: what a recipe written before a key existed ran with (resume, reused runs)."""
    return Recipe.model_construct(data=DataConfig.model_construct(train="")).model_dump(mode="json")


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
