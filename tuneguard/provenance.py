"""Where a number came from: library versions, the git commit, and the process's peak memory.

run.json and the bench's records both carry these, so a result can be traced to the code and the
machine that made it (the device and dtype choice are :func:`tuneguard.numerics.numerics_record`).
"""

from __future__ import annotations

import contextlib
import platform
import resource
import subprocess
from pathlib import Path

import torch


def versions() -> dict[str, str]:
    """Python and the libraries a result depends on (bitsandbytes and trl where installed)."""
    import accelerate
    import peft
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "peft": peft.__version__, "accelerate": accelerate.__version__}
    for optional in ("bitsandbytes", "trl"):
        with contextlib.suppress(ImportError):
            out[optional] = __import__(optional).__version__
    return out


def git_commit() -> str | None:
    """The commit of the tuneguard checkout in use, or None outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def peak_memory(device: torch.device | str) -> dict[str, float]:
    """This process's peak so far (MB): RSS on CPU; allocated and reserved bytes on CUDA."""
    if torch.device(device).type == "cuda":
        return {"peak_memory_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1),
                "peak_reserved_mb": round(torch.cuda.max_memory_reserved() / 2**20, 1)}
    return {"peak_memory_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
