"""What each adapter method can do, and the learning rate it usually trains at, as plain data with no imports.

The recipe validates with it before torch or PEFT load, and the run-directory reader leaves ``r``
blank with it, so both stay out of import cycles with ``tuneguard.adapters.registry`` (which builds
on this table and adds the code that applies each method).
"""

from __future__ import annotations

from dataclasses import dataclass

LAYERED = frozenset({"target_modules", "layers_to_transform", "freeze_layers_below", "unfreeze_every"})
RANKED = LAYERED | {"r", "alpha", "dropout"}


@dataclass(frozen=True)
class Capabilities:
    keys: frozenset[str] = RANKED
    """The ``adapter`` keys the method reads, beyond ``method`` (a recipe setting another is told it is unused)."""
    four_bit: bool = True
    """False where PEFT builds the deltas from the weight's shape, which 4-bit packing flattens (LoHa, LoKr)."""
    mergeable: bool = True
    """False where the adapter is not a weight delta (prompt tuning adds virtual tokens): no merged export."""
    packable: bool = True
    """False where examples must not be packed into one sequence (virtual tokens go in front of each example)."""
    classifier: bool = True
    """False where it cannot sit on a classifier with its own head (an encoder or image backbone): PEFT's
    ``disable_adapter`` for prompt tuning swaps a generation hook a classifier lacks, so no base could be scored."""
    lr: float = 2e-4
    """The ``train.lr`` (AdamW) a recipe that gives none trains at: published practice for the method."""
    lr_range: tuple[float, float] = (1e-4, 5e-4)
    """The usual range of published rates; a recipe more than ``LR_WARN_FACTOR`` outside it gets a warning."""

    @property
    def has_rank(self) -> bool:
        """Whether ``adapter.r`` means something; reports leave it blank where not."""
        return "r" in self.keys

    @property
    def dora(self) -> bool:
        """Whether ``adapter.use_dora`` applies."""
        return "use_dora" in self.keys


# Learning rates (README "Learning rate" has the table):
# - LoRA (DoRA, rsLoRA alike): Hu et al. 2021 (LoRA) train GPT-2 at 2e-4 and RoBERTa at 4e-4 to 5e-4; Dettmers
#   et al. 2023 (QLoRA) use 2e-4 up to 13B parameters and 1e-4 above; Schulman et al. 2025 ("LoRA Without
#   Regret", Thinking Machines) find LoRA's best rate about 10x full fine-tuning's (1e-5 to 5e-5).
# - IA3: Liu et al. 2022 (T-Few) train the scales at 3e-3; they start at 1 and need large steps.
# - LoHa, LoKr: Yeh et al. 2024 (LyCORIS) compare them with LoRA under the same hyperparameters and publish no
#   rate of their own, so they start at LoRA's; the range reaches higher (smaller effective updates).
# - AdaLoRA: Zhang et al. 2023 train DeBERTaV3 on GLUE at 5e-4 to about 1e-3; its singular values start at
#   zero and its budget prunes early, so LoRA's 2e-4 barely moves it in a short run (README, adapter table).
# - Prompt tuning: Lester et al. 2021 use 0.3 (Adafactor); PEFT's causal-LM prompt-tuning guide uses 3e-2
#   (AdamW): virtual-token embeddings move far from where they start.
CAPABILITIES: dict[str, Capabilities] = {
    "lora": Capabilities(keys=RANKED | {"use_rslora", "use_dora", "init"}),
    "ia3": Capabilities(keys=LAYERED, lr=3e-3, lr_range=(1e-3, 1e-2)),
    "loha": Capabilities(four_bit=False, lr_range=(1e-4, 1e-3)),
    "lokr": Capabilities(four_bit=False, lr_range=(1e-4, 1e-3)),
    "adalora": Capabilities(lr=5e-4, lr_range=(2e-4, 2e-3)),
    "prompt_tuning": Capabilities(keys=frozenset({"num_virtual_tokens"}), mergeable=False, packable=False,
                                  classifier=False, lr=3e-2, lr_range=(1e-2, 3e-1)),
}
"""One entry per recipe ``adapter.method``."""

LR_WARN_FACTOR = 10.0
"""How far outside a method's usual range ``train.lr`` may go before the run starts with a warning."""


def lr_warning(method: str, lr: float) -> str | None:
    """One line when ``lr`` is far outside the method's usual range (a typo, or another method's rate, such as
    IA3's on LoRA); None inside it. A warning, not an error: a range test may well point there."""
    caps = CAPABILITIES[method]
    low, high = caps.lr_range
    if low / LR_WARN_FACTOR <= lr <= high * LR_WARN_FACTOR:
        return None
    way = "above" if lr > high else "below"
    return (f"train.lr={lr:g} is more than {LR_WARN_FACTOR:g}x {way} the usual range for adapter.method "
            f"'{method}' ({low:g} to {high:g}; its default is {caps.lr:g}); `tuneguard lr RECIPE` measures one")


def reports_rank(method: str | None) -> bool:
    """Whether a report shows ``adapter.r`` for ``method`` (an old run's unknown method keeps it)."""
    caps = CAPABILITIES.get(method or "")
    return caps is None or caps.has_rank
