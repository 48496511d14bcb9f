"""lm-eval's model ``tuneguard``: a finished run or a backbone, loaded from lm-eval's ``--model_args``.

``tuneguard lm-eval --model tuneguard --model_args run=runs/x,adapter=off --tasks arc_easy`` is lm-eval's
own command line with this model available (lm-eval 0.4 has no plugin entry point for models, so
importing this module is what registers it; in Python: ``import tuneguard.lm_eval_model`` before
``lm_eval.simple_evaluate(model="tuneguard", ...)``).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import lm_eval.models  # noqa: F401  (lm-eval fills its registry lazily only while it is empty: fill it first)
from lm_eval.api.registry import register_model

from tuneguard.backbones import dequantized
from tuneguard.errors import TuneguardError
from tuneguard.eval.lm_eval_bridge import TuneguardLM
from tuneguard.eval.stage import load_run, load_scoring_backbone
from tuneguard.rundir import RunDir

LM_EVAL_EXTRAS = {"max_batch_size", "device"}
"""What lm-eval's command line passes to every model besides ``--model_args`` (batch_size is a named argument)."""


@register_model("tuneguard")
class TuneguardCommandLineLM(TuneguardLM):
    """``run=RUN_DIR`` (the run's backbone and adapter) or ``pretrained=SOURCE`` (any tuneguard model source,
    with ``quant=none|nf4|fp4|int8`` and ``dtype=auto|float32|bfloat16|float16``), plus ``adapter=on|off``."""

    def __init__(self, run: str | None = None, pretrained: str | None = None, quant: str = "none",
                 dtype: str = "auto", adapter: str = "on", batch_size: int | str | None = 8,
                 trust_remote_code: bool | str = False, **_lm_eval_extras: Any) -> None:
        unknown = sorted(set(_lm_eval_extras) - LM_EVAL_EXTRAS)
        if unknown:  # a misspelt adapter=off would score the adapter, silently
            raise TuneguardError(f"--model_args: unknown {', '.join(unknown)}; tuneguard's model takes run, pretrained, "
                                 "quant, dtype, adapter, batch_size and trust_remote_code")
        if (run is None) == (pretrained is None):
            raise TuneguardError("--model_args: give run=RUN_DIR (a finished run) or pretrained=SOURCE, not both")
        remote = str(trust_remote_code).lower() in ("true", "1", "yes", "on")
        if run is not None:
            if remote:  # a run loads as its recipe says (model.trust_remote_code)
                raise TuneguardError("--trust_remote_code: a run's backbone loads as its recipe's "
                                     "model.trust_remote_code says; it applies with pretrained=")
            RunDir(Path(run)).ensure_converged()
            _, trained = load_run(Path(run))
            model, tokenizer = trained.model, trained.backbone.tokenizer
        else:
            backbone = load_scoring_backbone(str(pretrained), quant, dtype, trust_remote_code=remote)
            model, tokenizer = backbone.model, backbone.tokenizer
        self._decoded = contextlib.ExitStack()
        self._decoded.enter_context(dequantized(model))  # held as long as lm-eval holds the model
        super().__init__(model, tokenizer, adapter=adapter, batch_size=batch_size)
