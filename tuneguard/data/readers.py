"""Read JSONL / CSV / TSV / Parquet rows, each tagged with ``file:line`` so problems can be named."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneguard.errors import TuneguardError
from tuneguard.recipe import FORMATS


@dataclass
class Row:
    where: str
    """``file:line`` (1-based, as an editor shows it)."""
    fields: dict[str, Any] | None
    problem: str | None = None


def detect_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise TuneguardError(f"{path}: cannot tell the format from '.{suffix[1:]}'; set data.format (jsonl, csv, tsv, parquet)")
    return FORMATS[suffix]


def _read_jsonl(path: Path) -> list[Row]:
    rows = []
    with path.open(encoding="utf-8-sig", errors="strict") as fh:  # -sig: a byte-order mark (Excel, Notepad) is not text
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                rows.append(Row(where, None, f"invalid JSON ({exc.msg} at column {exc.colno})"))
                continue
            if not isinstance(value, dict):
                rows.append(Row(where, None, f"expected a JSON object, got {type(value).__name__}"))
                continue
            rows.append(Row(where, value))
    return rows


def _read_delimited(path: Path, delimiter: str, header_line: bool, columns: list[str] | None) -> list[Row]:
    """``columns`` name the fields (replacing a header line); without a header line they are required."""
    rows = []
    with path.open(encoding="utf-8-sig", newline="") as fh:
        # TSV files such as GLUE's have no quoting; CSV files are quoted.
        quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
        reader = csv.reader(fh, delimiter=delimiter, quoting=quoting)
        first = next(reader, None) if header_line else None
        header = columns or first
        if header is None:
            return []
        for record in reader:
            where = f"{path}:{reader.line_num}"
            if not any(cell.strip() for cell in record):
                continue
            if len(record) != len(header):
                rows.append(Row(where, None, f"expected {len(header)} columns {header}, got {len(record)}"))
                continue
            rows.append(Row(where, dict(zip(header, record, strict=True))))
    return rows


def _read_parquet(path: Path) -> list[Row]:
    """Read with pyarrow directly: ``datasets`` would also write an Arrow copy into its own cache, outside the
    run's directories."""
    import pyarrow.parquet as pq

    return [Row(f"{path}:row {i + 1}", r) for i, r in enumerate(pq.read_table(path).to_pylist())]


def read_rows(path: str | Path, fmt: str = "auto", *, header: bool = True, columns: list[str] | None = None) -> list[Row]:
    """All rows of a data file in order; unreadable rows carry a ``problem`` instead of fields."""
    path = Path(path)
    if path.is_dir():
        raise TuneguardError(f"{path} is a directory; name a JSONL, CSV, TSV or Parquet file")
    if not path.is_file():
        raise TuneguardError(f"data file not found: {path}")
    kind = detect_format(path, fmt)
    try:
        if kind == "jsonl":
            rows = _read_jsonl(path)
        elif kind in ("csv", "tsv"):
            rows = _read_delimited(path, "\t" if kind == "tsv" else ",", header, columns)
        else:
            rows = _read_parquet(path)
    except UnicodeDecodeError as exc:
        raise TuneguardError(f"{path}: not valid UTF-8 text (byte {exc.start})") from None
    except csv.Error as exc:
        raise TuneguardError(f"{path}: unreadable {kind.upper()}: {exc}") from None
    except (OSError, ValueError) as exc:  # pyarrow's errors on a file that is not Parquet derive from these
        raise TuneguardError(f"{path}: unreadable {kind}: {exc}") from None
    if not rows:
        raise TuneguardError(f"{path}: the dataset is empty")
    return rows
