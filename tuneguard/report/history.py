"""An SQLite history of runs and their task results, so results can be followed over time.

The database lives at ``$TUNEGUARD_HOME/history.sqlite`` (default ``~/.cache/tuneguard``). One
row per run in ``runs``, one row per task result in ``results``, one row per ``tuneguard check`` in
``checks`` (created when missing, and a column newer than an older database added on first use). Recording the same run again
(same directory, same run.json facts) replaces its rows instead of duplicating them; a new
training run in the same directory is a new row.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import sqlite3
import sys
import time
from contextlib import closing
from pathlib import Path
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY,
    run_key TEXT UNIQUE NOT NULL,
    created TEXT NOT NULL,
    run_dir TEXT NOT NULL,
    recipe TEXT, model TEXT, fingerprint TEXT, quantization TEXT, adapter_method TEXT, adapter_r INTEGER,
    trainable_params INTEGER, tokens_per_s REAL, peak_memory_mb REAL
);
CREATE TABLE IF NOT EXISTS results (
    run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    task TEXT NOT NULL, metric TEXT NOT NULL, aggregate TEXT NOT NULL, is_general INTEGER NOT NULL,
    base REAL, tuned REAL, delta REAL, ci_low REAL, ci_high REAL, p_value REAL, verdict TEXT,
    p_adjusted REAL, margin REAL, beyond_margin INTEGER, items_to_decide INTEGER, n INTEGER,
    PRIMARY KEY (run_id, task)
);
CREATE INDEX IF NOT EXISTS results_task ON results(task);
CREATE TABLE IF NOT EXISTS checks (
    id INTEGER PRIMARY KEY,
    created TEXT NOT NULL, run_dir TEXT NOT NULL, recipe TEXT, task TEXT NOT NULL, metric TEXT,
    kind TEXT NOT NULL, data TEXT, n INTEGER, value REAL, value_low REAL, value_high REAL,
    delta REAL, ci_low REAL, ci_high REAL, p_value REAL, flagged INTEGER NOT NULL, path TEXT, trained_on INTEGER
);
CREATE INDEX IF NOT EXISTS checks_task ON checks(task);
"""
_CHECK_KEYS = ("created", "run_dir", "recipe", "task", "metric", "kind", "data", "n", "value", "value_low",
               "value_high", "delta", "ci_low", "ci_high", "p_value", "flagged", "path", "trained_on")
_RESULT_KEYS = ("task", "metric", "aggregate", "is_general", "base", "tuned", "delta", "ci_low", "ci_high",
                "p_value", "verdict", "p_adjusted", "margin", "beyond_margin", "items_to_decide", "n")
"""``n``: the items scored, so a trend that moves because a suite's items changed (general-small's WikiText went from
2 articles to 16 in session 37) says so beside the number."""


def history_path() -> Path:
    home = os.environ.get("TUNEGUARD_HOME")
    return (Path(home) if home else Path.home() / ".cache" / "tuneguard") / "history.sqlite"


def _open(db: Path) -> sqlite3.Connection:
    con = sqlite3.connect(db, timeout=30)
    try:
        con.row_factory = sqlite3.Row
        con.execute("PRAGMA journal_mode = WAL")  # readers never block a run that is recording
        con.execute("PRAGMA foreign_keys = ON")
        con.executescript(_SCHEMA)
        _add_missing_columns(con)
    except sqlite3.Error:
        con.close()
        raise
    return con


_ADDED_COLUMNS = {"checks": {"trained_on": "INTEGER"},
                  "results": {"p_adjusted": "REAL", "margin": "REAL", "beyond_margin": "INTEGER", "items_to_decide": "INTEGER",
                              "n": "INTEGER"}}
"""Columns newer than their table: added to a database an older tuneguard created (NULL in its older rows)."""


def _add_missing_columns(con: sqlite3.Connection) -> None:
    for table, columns in _ADDED_COLUMNS.items():
        present = {row["name"] for row in con.execute(f"PRAGMA table_info({table})")}
        for column, kind in columns.items():
            if column not in present:
                con.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")


def _connect(db: Path | None) -> sqlite3.Connection:
    """The history database; a damaged one is moved aside (with a warning) and a new one started."""
    db = db or history_path()
    db.parent.mkdir(parents=True, exist_ok=True)
    try:
        return _open(db)
    except sqlite3.OperationalError:
        raise  # locked by another process, read-only: the caller's warning; it is not damaged
    except sqlite3.DatabaseError as exc:
        if not db.exists():
            raise
        aside = db.with_name(f"{db.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
        for suffix in ("", "-wal", "-shm"):
            if Path(f"{db}{suffix}").exists():
                os.replace(f"{db}{suffix}", f"{aside}{suffix}")
        print(f"tuneguard: warning: {db} is not a readable history database ({exc}); moved it to {aside} "
              "and started a new one", file=sys.stderr)
        return _open(db)


def record_run(run_dir: Path, report: dict[str, Any], *, db: Path | None = None) -> None:
    """Store one run and each of its task and general-suite comparisons; a history that cannot be written
    is a warning, never a failed run (the run's own files already hold every result)."""
    try:
        _record(run_dir, report, db)
    except (sqlite3.Error, OSError, OverflowError) as exc:  # OverflowError: a number past SQLite's integers
        print(f"tuneguard: warning: the run was not added to the history ({exc}); its results are in {run_dir}",
              file=sys.stderr)


def _record(run_dir: Path, report: dict[str, Any], db: Path | None) -> None:
    run_dir_text = str(Path(run_dir).resolve())
    s = {**report["summary"], "run_dir": run_dir_text}  # however the directory was spelled when it was evaluated
    key = hashlib.sha256(json.dumps([run_dir_text, s], sort_keys=True, default=str).encode()).hexdigest()
    facts = (run_dir_text, s.get("name"), s.get("model"), s.get("fingerprint"), s.get("quantization"), s.get("adapter"),
             s.get("r"), s.get("trainable_params"), s.get("tokens_per_s"), s.get("peak_memory_mb"))
    with closing(_connect(db)) as con, con:
        con.execute("DELETE FROM runs WHERE run_key = ?", (key,))
        # Rows keyed by another spelling of the directory (before the key took the resolved one): the same facts.
        con.execute("DELETE FROM runs WHERE run_dir = ? AND recipe IS ? AND model IS ? AND fingerprint IS ? AND "
                    "quantization IS ? AND adapter_method IS ? AND adapter_r IS ? AND trainable_params IS ? AND "
                    "tokens_per_s IS ? AND peak_memory_mb IS ?", facts)
        run_id = con.execute(
            "INSERT INTO runs (run_key, created, run_dir, recipe, model, fingerprint, quantization, adapter_method, "
            "adapter_r, trainable_params, tokens_per_s, peak_memory_mb) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (key, report["created"], *facts),
        ).lastrowid
        con.executemany(
            f"INSERT INTO results (run_id, {', '.join(_RESULT_KEYS)}) VALUES (?{', ?' * len(_RESULT_KEYS)})",
            [(run_id, *(c.get(k) for k in _RESULT_KEYS)) for c in report["task"] + report["general"]],
        )


_JOINED = "FROM results JOIN runs ON runs.id = results.run_id"
"""Each task result beside its run: what the history's queries select from."""


def list_history(
    *, task: str | None = None, recipe: str | None = None, last: int | None = None, db: Path | None = None
) -> list[dict[str, Any]]:
    """Task results joined with their run, oldest first; ``last`` keeps the most recent N runs that match."""
    matching, args = _matching(task, recipe)
    joined = _JOINED + matching
    if last is not None:
        matching += (" AND " if matching else " WHERE ") + (
            f"runs.id IN (SELECT runs.id {joined} GROUP BY runs.id ORDER BY MAX(runs.created) DESC, runs.id DESC LIMIT ?)")
        args = [*args, *args, last]
    sql = (
        "SELECT runs.created, runs.run_dir, runs.recipe, runs.model, runs.fingerprint, runs.quantization, "
        "runs.adapter_method, runs.adapter_r, runs.trainable_params, runs.tokens_per_s, runs.peak_memory_mb, "
        f"{', '.join('results.' + k for k in _RESULT_KEYS)} {_JOINED}{matching} ORDER BY runs.created, runs.id, results.rowid"
    )
    with closing(_connect(db)) as con:
        return [dict(row) | {"is_general": bool(row["is_general"])} for row in con.execute(sql, args)]


def _matching(task: str | None, recipe: str | None) -> tuple[str, list[str]]:
    """The WHERE clause (or "") of a ``--task``/``--recipe`` filter over results joined with runs, and its values."""
    where = [(f"{column} = ?", value) for column, value in (("results.task", task), ("runs.recipe", recipe))
             if value is not None]
    return (f" WHERE {' AND '.join(w for w, _ in where)}" if where else ""), [v for _, v in where]


def count_runs(*, task: str | None = None, recipe: str | None = None, db: Path | None = None) -> int:
    """How many runs the filter matches (``tuneguard history`` says when ``--last`` shows fewer)."""
    matching, args = _matching(task, recipe)
    with closing(_connect(db)) as con:
        return con.execute(f"SELECT COUNT(DISTINCT runs.id) {_JOINED}{matching}", args).fetchone()[0]


def unknown_filter(task: str | None, recipe: str | None, *, db: Path | None = None) -> str | None:
    """Why a ``--task``/``--recipe`` filter cannot match (a name no run or check has), with the closest known name;
    None when it can."""
    queries = {"task": ("SELECT task FROM results UNION SELECT task FROM checks", task),
               "recipe": ("SELECT recipe FROM runs UNION SELECT recipe FROM checks", recipe)}
    with closing(_connect(db)) as con:
        for what, (sql, value) in queries.items():
            if value is None:
                continue
            known = sorted(str(row[0]) for row in con.execute(sql) if row[0] is not None)
            if value not in known:
                close = difflib.get_close_matches(value, known, n=1, cutoff=0.5)
                hint = f"did you mean {close[0]!r}? " if close else ""
                return (f"--{what} {value!r}: no run or check in the history has it; {hint}"
                        f"{len(known)} known{': ' + ', '.join(known[:8]) if known else ''}{', ...' if len(known) > 8 else ''}")
    return None


def _check_row(check: dict[str, Any], path: Path) -> dict[str, Any]:
    """A check's headline numbers: its accuracy (with Wilson's interval) and its most significant test."""
    accuracy, drift = check.get("accuracy"), check.get("drift")
    tests = (accuracy or drift or {}).get("tests") or []
    lead = min(tests, key=lambda t: t["p_adjusted"], default={})
    return {
        "created": check["created"], "run_dir": check["run_dir"], "recipe": check.get("run"), "task": check["task"],
        "metric": accuracy["metric"] if accuracy else None, "kind": "accuracy" if accuracy else "drift",
        "data": check.get("data"), "n": check.get("rows"), "value": accuracy["fresh"] if accuracy else None,
        "value_low": accuracy["fresh_ci"][0] if accuracy else None,
        "value_high": accuracy["fresh_ci"][1] if accuracy else None,
        "delta": lead.get("delta"), "ci_low": lead.get("ci_low"), "ci_high": lead.get("ci_high"),
        "p_value": lead.get("p_adjusted"), "flagged": int(bool(check.get("flagged"))), "path": str(path),
        "trained_on": check.get("trained_on_rows"),
    }


def record_check(check: dict[str, Any], path: Path, *, db: Path | None = None) -> None:
    """Store one ``tuneguard check`` (its file is ``path``); a history that cannot be written is a warning."""
    row = _check_row(check, path)
    try:
        with closing(_connect(db)) as con, con:
            con.execute(f"INSERT INTO checks ({', '.join(_CHECK_KEYS)}) VALUES (?{', ?' * (len(_CHECK_KEYS) - 1)})",
                        [row[k] for k in _CHECK_KEYS])
    except (sqlite3.Error, OSError) as exc:
        print(f"tuneguard: warning: the check was not added to the history ({exc}); its result is in {path}",
              file=sys.stderr)


def list_checks(
    *, task: str | None = None, recipe: str | None = None, last: int | None = None, db: Path | None = None
) -> list[dict[str, Any]]:
    """Recorded checks, oldest first; ``last`` keeps the most recent N that match."""
    where, args = [], []
    for column, value in (("task", task), ("recipe", recipe)):
        if value is not None:
            where.append(f"{column} = ?")
            args.append(value)
    matching = f" WHERE {' AND '.join(where)}" if where else ""
    if last is not None:  # the most recent N checks that match
        matching += (" AND " if where else " WHERE ") + (
            f"id IN (SELECT id FROM checks{matching} ORDER BY created DESC, id DESC LIMIT ?)")
        args = [*args, *args, last]
    sql = f"SELECT {', '.join(_CHECK_KEYS)} FROM checks{matching} ORDER BY created, id"
    with closing(_connect(db)) as con:
        return [dict(row) | {"flagged": bool(row["flagged"])} for row in con.execute(sql, args)]
