"""Files: atomic writes (a reader or a resumed run never sees a half-written file or folder) and the cache."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Hashable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from tuneguard.errors import TuneguardError


def cache_dir() -> Path:
    """``$TUNEGUARD_CACHE`` (default ``~/.cache/tuneguard``): dequantized GGUF files, hashes, the dtype probe."""
    return Path(os.environ.get("TUNEGUARD_CACHE", Path.home() / ".cache" / "tuneguard"))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; the file gets the mode open() would give it
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``path`` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # as for a file: the mode mkdir() would give it
        yield tmp
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def recover_partial_writes(folder: Path) -> None:
    """Undo what a process killed inside :func:`atomic_write_bytes` or :func:`atomic_dir` left in ``folder``: its
    temporary siblings go, and a folder caught between its two renames gets its previous version back. Only while
    nothing else can be writing there (a run directory's lock)."""
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        if not entry.name.startswith("."):
            continue
        if entry.name.endswith(".old") and entry.is_dir():
            target = folder / entry.name[1:-4]
            if target.exists():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                os.replace(entry, target)
        elif entry.name.endswith(".tmp"):
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


def read_yaml(path: Path) -> Any:
    """A YAML file's data; malformed YAML, or a key given twice in one mapping (PyYAML would keep the last one
    silently), is one line naming the file, line and column."""
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise TuneguardError(f"{path}{where}: malformed YAML: {problem}") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):
                continue  # the base class names that problem
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key '{key}'", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    """Append one line and flush it: metrics survive a killed run up to the last whole line."""
    with Path(path).open("a") as fh:
        fh.write(json.dumps(record, default=str) + "\n")
        fh.flush()
