"""tuneguard: parameter-efficient fine-tuning on quantized backbones, with honest before/after evaluation."""

__version__ = "0.1.0"

import logging as _logging
import os as _os

# Idle OpenMP threads spin by default; with any other busy process on a small CPU that slows torch
# several-fold (measured 8x on 2 cores). Passive waiting costs nothing measurable when alone.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# bitsandbytes warns at import time that an optional hub-hosted CPU kernel is missing; its built-in
# path is what runs here, so the warning is noise for every tuneguard command.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
