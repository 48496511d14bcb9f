"""Files: atomic writes (a reader or a resumed run never sees a half-written file or folder) and the cache."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
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
    """The process's umask, read without setting it (``os.umask`` can only swap, which races other threads)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_target(path: str | Path) -> Path:
    """A path a file can be written to, refused in one line naming it (checked before the work that fills it):
    a folder there made the error name a temporary file instead."""
    path = Path(path)
    if path.is_dir():
        raise TuneguardError(f"{path}: is a folder; name the file to write")
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = file_target(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; the file gets the mode open() would give it
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync(path.parent)
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
        for file in tmp.rglob("*"):  # safetensors writes its files 0600 whatever the umask
            if file.is_file() and not file.is_symlink():
                os.chmod(file, 0o666 & ~_umask())
                _fsync(file)  # what libraries wrote is on disk before the rename makes it the folder
        old = None
        if path.exists() or path.is_symlink():
            old = path.with_name(f".{path.name}.old")
            _remove(old)
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync(path.parent)  # and the rename itself
        if old is not None:
            _remove(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync(path: Path) -> None:
    """Flush a file, or a folder's entries, to disk: after a power cut a renamed folder could hold empty files."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    """A folder with what it holds, or a link alone (never what it points to); nothing if it is gone."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def recover_partial_writes(folder: Path, owned: Callable[[str], bool]) -> None:
    """Undo what a process killed inside :func:`atomic_write_bytes` or :func:`atomic_dir` left in ``folder`` for the
    names ``owned`` says are the caller's: their temporary siblings go, and a folder caught between its two renames
    gets its previous version back. Only for names no other process can be writing at the time."""
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        name = entry.name
        if name.startswith(".") and name.endswith(".old") and owned(name[1:-4]) and entry.is_dir():
            target = folder / name[1:-4]
            if target.exists():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                os.replace(entry, target)
        elif name.startswith(".") and name.endswith(".tmp") and owned(name[1:].rsplit(".", 2)[0]):
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
    """Checks keys as the document is composed, before merge keys (``<<``) are expanded: a merged key that a
    mapping overrides is not a duplicate, two keys written in one mapping are."""

    def compose_mapping_node(self, anchor: str | None) -> yaml.MappingNode:
        node = super().compose_mapping_node(anchor)
        seen: set[tuple[str, str]] = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = (key_node.tag, key_node.value)
            if key in seen:
                raise yaml.composer.ComposerError(None, None, f"duplicate key '{key_node.value}'", key_node.start_mark)
            seen.add(key)
        return node


def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    """Append one line and flush it: metrics survive a killed run up to the last whole line."""
    with Path(path).open("a") as fh:
        fh.write(json.dumps(record, default=str) + "\n")
        fh.flush()
