"""Weight files checked before use, so a damaged file is one line naming it, not a traceback or NaNs.

safetensors: the header must parse and the tensors it lists must fit the file exactly (a truncated
or overwritten file fails here); small files (adapters, exports) are also read back and must be
finite. GGUF: the magic bytes and a parse of the tensor table.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors import safe_open

from tuneguard.errors import TuneguardError

MAX_HEADER = 100 * 2**20
"""safetensors caps its JSON header at 100 MB; a larger length field means the file is not one."""


def _damaged(path: Path, why: str) -> TuneguardError:
    return TuneguardError(f"{path}: damaged weight file ({why}); restore or re-create it")


def check_safetensors(path: Path, finite: bool = False) -> None:
    """Header and sizes; with ``finite``, every floating-point tensor too (it reads the whole file)."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise _damaged(path, f"{size} bytes, shorter than a safetensors header")
        (n,) = struct.unpack("<Q", raw)
        if n > min(MAX_HEADER, size - 8):
            raise _damaged(path, "the header length is larger than the file")
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, ValueError):
            raise _damaged(path, "the header is not valid JSON") from None
    if not isinstance(header, dict):
        raise _damaged(path, "the header is not a JSON object")
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)
            and isinstance(v.get("data_offsets"), list) and len(v["data_offsets"]) == 2]
    if len(ends) != len([k for k in header if k != "__metadata__"]):
        raise _damaged(path, "a tensor entry has no data offsets")
    if max(ends, default=0) != size - 8 - n:
        raise _damaged(path, f"{size} bytes, but its header describes {8 + n + max(ends, default=0)}")
    if finite:
        check_finite(path)


def check_finite(path: Path) -> None:
    try:
        with safe_open(str(path), framework="pt") as fh:
            for name in fh.keys():  # noqa: SIM118 (safe_open is not a mapping)
                tensor = fh.get_tensor(name)
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    raise _damaged(path, f"tensor '{name}' holds NaN or infinite values")
    except TuneguardError:
        raise
    except Exception as exc:  # safetensors' own error type is not importable across versions
        raise _damaged(path, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None


def check_weights_dir(folder: Path, finite: bool = False) -> None:
    for path in sorted(folder.glob("*.safetensors")):
        check_safetensors(path, finite=finite)


def check_adapter(folder: Path) -> None:
    """A saved adapter: its config parses and its weights are whole and finite."""
    config = folder / "adapter_config.json"
    try:
        json.loads(config.read_text())
    except (OSError, ValueError) as exc:
        raise TuneguardError(f"{config}: unreadable adapter config ({exc})") from None
    check_safetensors(folder / "adapter_model.safetensors", finite=True)


def check_gguf(path: Path) -> int:
    """The GGUF magic and a parse of its tensor table (random bytes or a truncated file fail here); how many
    tensors it holds."""
    with path.open("rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise _damaged(path, f"it does not start with the GGUF magic bytes (got {magic!r})")
    from gguf import GGUFReader

    try:
        return len(GGUFReader(str(path)).tensors)
    except Exception as exc:  # the reader raises ValueError, struct.error, IndexError, ... on bad files
        raise _damaged(path, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'unparsable'}") from None
