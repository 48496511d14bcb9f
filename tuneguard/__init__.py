"""tuneguard: parameter-efficient fine-tuning on quantized backbones, with honest before/after evaluation."""

__version__ = "0.1.0"

import logging as _logging

# bitsandbytes warns at import time that an optional hub-hosted CPU kernel is missing; its built-in
# path is what runs here, so the warning is noise for every tuneguard command.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
