"""What each adapter method can do, as plain data with no imports.

The recipe validates with it before torch or PEFT load, and the run-directory reader leaves ``r``
blank with it, so both stay out of import cycles with ``tuneguard.adapters.registry`` (which builds
on this table and adds the code that applies each method).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Capabilities:
    four_bit: bool = True
    """False where PEFT builds the deltas from the weight's shape, which 4-bit packing flattens (LoHa, LoKr)."""
    mergeable: bool = True
    """False where the adapter is not a weight delta (prompt tuning adds virtual tokens): no merged export."""
    packable: bool = True
    """False where examples must not be packed into one sequence (virtual tokens go in front of each example)."""
    has_rank: bool = True
    """False where ``adapter.r`` means nothing, so reports leave it blank."""
    dora: bool = False
    """Whether ``adapter.use_dora`` applies."""


CAPABILITIES: dict[str, Capabilities] = {
    "lora": Capabilities(dora=True),
    "ia3": Capabilities(has_rank=False),
    "loha": Capabilities(four_bit=False),
    "lokr": Capabilities(four_bit=False),
    "adalora": Capabilities(),
    "prompt_tuning": Capabilities(mergeable=False, packable=False, has_rank=False),
}
"""One entry per recipe ``adapter.method``."""


def reports_rank(method: str | None) -> bool:
    """Whether a report shows ``adapter.r`` for ``method`` (an old run's unknown method keeps it)."""
    caps = CAPABILITIES.get(method or "")
    return caps is None or caps.has_rank
