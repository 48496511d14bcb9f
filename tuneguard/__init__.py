"""tuneguard: parameter-efficient fine-tuning on quantized backbones, with honest before/after evaluation."""

__version__ = "0.1.0"

import logging as _logging
import os as _os
import sys as _sys

OPENMP_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "1000"}
"""How torch's idle OpenMP threads wait, read once when torch loads (so set here, before it; a value already in
the environment wins). libgomp's default spins ~3 ms before sleeping: with another busy process on a 2-core CPU
that cost up to 8x. Sleeping at once (passive) costs a futex wake-up per parallel op: 7-17% of a fp32 LoRA step's
time on 2 cores, alone. A ~20 us spin (libgomp's ``GOMP_SPINCOUNT``; other OpenMP runtimes read the policy)
bridges the gaps between consecutive ops and gives up before a competing process loses much."""

OPENMP_SET = [k for k in OPENMP_DEFAULTS if k not in _os.environ] if _os.environ.get("TUNEGUARD_OPENMP") != "library" else []
"""The variables tuneguard set (not the user); ``TUNEGUARD_OPENMP=library`` leaves the runtime's own defaults, as the
bench's reference runs (plain Trainer, TRL, lm-eval) get them."""
_os.environ.update({k: OPENMP_DEFAULTS[k] for k in OPENMP_SET})

_os.environ.setdefault("USE_HUB_KERNELS", "NO")
HUB_KERNELS_OFF = _os.environ["USE_HUB_KERNELS"].lower() not in ("true", "1", "y", "yes", "on")  # transformers' reading
"""Compiled kernels from the Hugging Face Hub stay off unless you set ``USE_HUB_KERNELS`` yourself. transformers 5
"kernelizes" every model it loads by default (on CUDA: Liger's RMSNorm and others, downloaded when online), and
bitsandbytes, on a CPU with AVX512-BF16, asks the Hub for its own at import (``kernels.get_kernel``): native code
no recipe asked for, fetched at run time. Off, transformers keeps its own layers (its documented switch), and with
the ``kernels`` library hidden bitsandbytes takes the built-in CPU path every other CPU runs, after a warning that
the level below silences."""
if HUB_KERNELS_OFF and "bitsandbytes" not in _sys.modules:
    _sys.modules.setdefault("kernels", None)
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
