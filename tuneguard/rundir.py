"""A run directory: the names of its files, their writers and readers, and the lock that makes one run
its only writer. No other module spells a run directory's file names.

A run never deletes what it did not write: a new run refuses a directory that already holds one,
``--overwrite`` moves the old contents aside, and ``--resume`` refuses a recipe that changed since
the checkpoint it resumes (unless each changed key is named with ``--resume-changed``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import socket
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tuneguard.adapters.capabilities import reports_rank
from tuneguard.errors import TuneguardError
from tuneguard.io import append_jsonl, atomic_write_json, atomic_write_text, read_yaml, recover_partial_writes
from tuneguard.progress import say

Mode = Literal["new", "resume", "overwrite", "results"]
"""How a run is claimed: ``results`` is a finished run that eval or check writes into."""
FINISHED_HINT = ("evaluate it with tuneguard eval, train it longer with --resume-changed train.max_steps "
                 "train.max_steps=N, or start again with --overwrite (it is moved aside)")

RECIPE, RUN, METRICS = "recipe.yaml", "run.json", "metrics.jsonl"
CHECKPOINTS, LOCK, ADAPTER, EVAL = "checkpoints", ".tuneguard.lock", "adapter", "eval.json"
TRAIN_STATE, CHECKPOINT_RECIPE = "train_state.json", "recipe.json"
ADAPTER_META, MERGED, ADAPTER_WEIGHTS = "tuneguard.json", "merged", "adapter_model.safetensors"
SCORES, CHECKS = "scores", "checks"
REPORTS = ("report.json", "report.md", "report.html")
_HELD: dict[Path, int] = {}
"""Run directories this process holds, with the fd that holds each lock."""


def _os_error(path: Path, exc: OSError) -> TuneguardError:
    return TuneguardError(f"{path}: cannot write the run directory ({exc.strerror or exc}); "
                          "choose a writable output.dir")


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object a reader cannot do without: a missing or broken file is named, never a traceback."""
    _require(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise TuneguardError(f"{path}:{exc.lineno}: not valid JSON: {exc.msg}") from None
    except (OSError, ValueError) as exc:  # unreadable, or not UTF-8
        raise TuneguardError(f"{path}: unreadable ({exc})") from None
    if not isinstance(data, dict):
        raise TuneguardError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def adapter_fingerprint(folder: Path) -> str | None:
    """The backbone fingerprint an adapter folder was saved with (its ``tuneguard.json``); None without one."""
    meta = folder / ADAPTER_META
    return read_json(meta).get("fingerprint") if meta.exists() else None


def _require(path: Path) -> None:
    if not path.is_file():
        raise TuneguardError(f"{path}: file not found (is {path.parent} a finished run directory?)")


def recipe_changes(old: dict[str, Any], new: dict[str, Any], defaults: dict[str, Any] | None = None,
                   prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested recipe dicts.

    A key ``old`` lacks takes its value from ``defaults`` (``tuneguard.recipe.recipe_defaults``): a recipe
    stored before the key existed ran as its default does, so a run can be resumed across versions.
    """
    defaults = defaults or {}
    changed = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, defaults.get(key)), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            below = defaults.get(key)
            changed += recipe_changes(a, b, below if isinstance(below, dict) else None, f"{prefix}{key}.")
        elif a != b:
            changed.append(f"{prefix}{key}")
    return changed


def adapter_label(method: str | None, adapter: dict[str, Any]) -> str | None:
    """The method with what changes it (``lora+rslora``, ``lora+dora``, ``lora (gaussian init)``): runs of one
    method otherwise read alike in reports and the history."""
    if method is None:
        return None
    label = method + "".join(f"+{name}" for key, name in (("use_rslora", "rslora"), ("use_dora", "dora"))
                             if adapter.get(key))
    init = adapter.get("init")
    return f"{label} ({init} init)" if init not in (None, "default") else label


@dataclass
class RunDir:
    path: Path
    created: list[Path] = field(default_factory=list)
    """Folders this process made for the run (removed again if the run wrote nothing into them)."""

    @property
    def recipe(self) -> Path:
        return self.path / RECIPE

    @property
    def run_json(self) -> Path:
        return self.path / RUN

    @property
    def metrics(self) -> Path:
        return self.path / METRICS

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def lock_file(self) -> Path:
        return self.path / LOCK

    @property
    def adapter(self) -> Path:
        return self.path / ADAPTER

    @property
    def adapter_weights(self) -> Path:
        return self.adapter / ADAPTER_WEIGHTS

    @property
    def eval_json(self) -> Path:
        return self.path / EVAL

    @property
    def scores(self) -> Path:
        """Task results kept for re-evaluation, keyed by backbone, adapter and adapter state (eval/cache.py)."""
        return self.path / SCORES

    @property
    def merged(self) -> Path:
        """Where ``tuneguard export`` puts the merged model unless told elsewhere."""
        return self.path / MERGED

    @property
    def report_json(self) -> Path:
        return self.path / REPORTS[0]

    @property
    def report_paths(self) -> list[Path]:
        """report.json (the data), report.md and report.html (its renderings)."""
        return [self.path / name for name in REPORTS]

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step-{step}"

    def checkpoint_list(self) -> list[Path]:
        """Complete checkpoints (their train state was the last thing written), oldest first."""
        found = [p for p in self.checkpoints.glob("step-*") if (p / TRAIN_STATE).exists()]
        return sorted(found, key=checkpoint_step)

    def latest_checkpoint(self) -> Path | None:
        found = self.checkpoint_list()
        return found[-1] if found else None

    def finished_after(self, checkpoint: Path | None) -> bool:
        """Training finished (run.json) at or after ``checkpoint``: nothing is left to resume from it. A killed
        extension (``--resume-changed train.max_steps``) leaves checkpoints past the old run.json's steps."""
        steps = self.record().get("steps", 0)
        return self.run_json.exists() and (checkpoint is None or checkpoint_step(checkpoint) <= steps)

    def record(self) -> dict[str, Any]:
        """run.json, or {} for a run that has not finished training."""
        return read_json(self.run_json) if self.run_json.exists() else {}

    def write_record(self, record: dict[str, Any]) -> None:
        atomic_write_json(self.run_json, record)

    def write_recipe(self, text: str) -> None:
        atomic_write_text(self.recipe, text)

    # --------------------------------------------------------------------- a finished run, read
    # Strict readers for verbs that need the file (report, compare, gate): a missing one is named.

    def read_recipe(self) -> dict[str, Any]:
        """The resolved recipe as plain data (not re-validated: an old run must stay readable)."""
        _require(self.recipe)
        data = read_yaml(self.recipe) or {}
        if not isinstance(data, dict):
            raise TuneguardError(f"{self.recipe}: expected a mapping of recipe sections")
        return data

    def summary(self) -> dict[str, Any]:
        """What identifies the run and what it cost, from recipe.yaml and run.json."""
        recipe, run = self.read_recipe(), read_json(self.run_json)
        adapter = recipe.get("adapter") or {}
        method = adapter.get("method") or run.get("adapter_method")
        return {
            "name": run.get("recipe") or (recipe.get("output") or {}).get("name") or self.path.name,
            "run_dir": str(self.path.resolve()),
            "model": (recipe.get("model") or {}).get("source"),
            "fingerprint": run.get("fingerprint"),
            "quantization": run.get("quantization") or (recipe.get("quantization") or {}).get("method"),
            "adapter": adapter_label(method, adapter),
            "r": adapter.get("r") if reports_rank(method) else None,
            "max_regression": (recipe.get("eval") or {}).get("max_regression"),
            **{k: run.get(k) for k in (
                "seed", "steps", "planned_steps", "stopped_early", "tokens_trained", "wall_time_s", "tokens_per_s",
                "peak_memory_mb", "trainable_params", "total_params",
            )},
        }

    def read_report(self) -> dict[str, Any]:
        if self.run_json.exists() and not self.report_json.exists():
            raise TuneguardError(f"{self.path}: no {self.report_json.name} (trained with --no-eval?); evaluate the run "
                                 f"first: tuneguard eval {self.path}")
        return read_json(self.report_json)

    def write_adapter_meta(self, folder: Path, meta: dict[str, Any]) -> None:
        """tuneguard.json beside the adapter's weights, into ``folder`` while the adapter is built (atomic_dir)."""
        atomic_write_json(folder / ADAPTER_META, meta)

    def adapter_fingerprint(self) -> str | None:
        """The backbone fingerprint the adapter was trained on; None for an adapter saved without one."""
        return adapter_fingerprint(self.adapter)

    # -------------------------------------------------------------------- evaluation's files

    def write_eval(self, data: dict[str, Any]) -> None:
        atomic_write_json(self.eval_json, data)

    def read_eval(self) -> dict[str, Any]:
        """eval.json: base and tuned task results with per-item outcomes (``tuneguard check`` compares with them)."""
        return read_json(self.eval_json)

    @property
    def checks(self) -> Path:
        """``tuneguard check`` results, one ``check-YYYYmmdd-HHMMSS.json`` per check (UTC)."""
        return self.path / CHECKS

    def write_check(self, record: dict[str, Any]) -> Path:
        """A check's result, atomically, under a new name (a second check in the same second gets ``-2``)."""
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        path, n = self.checks / f"check-{stamp}.json", 1
        while path.exists():
            n += 1
            path = self.checks / f"check-{stamp}-{n}.json"
        atomic_write_json(path, record)
        return path

    def write_reports(self, report: dict[str, Any], markdown: str, html: str) -> list[Path]:
        """report.json and its two renderings, each atomically; returns their paths."""
        paths = self.report_paths
        atomic_write_json(paths[0], report)
        atomic_write_text(paths[1], markdown)
        atomic_write_text(paths[2], html)
        return paths

    # ------------------------------------------------------------------------- metrics.jsonl
    # One line per record, appended and flushed as training goes: a killed run keeps every whole line.

    def append_metrics(self, record: dict[str, Any]) -> None:
        append_jsonl(self.metrics, record)

    def _metric_lines(self) -> list[tuple[str, dict[str, Any]]]:
        """(line, record) for every whole record; a torn last line (a killed run) is skipped."""
        if not self.metrics.is_file():
            return []
        out = []
        for line in self.metrics.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                out.append((line, record))
        return out

    def read_metrics(self) -> list[dict[str, Any]]:
        """Every record of metrics.jsonl (none when there is no file)."""
        return [record for _, record in self._metric_lines()]

    def keep_metrics_through(self, step: int) -> None:
        """Drop records logged after ``step`` (a resumed run logs those steps again); the rest stay verbatim."""
        if self.metrics.exists():
            kept = [line for line, record in self._metric_lines() if record.get("step", 0) <= step]
            atomic_write_text(self.metrics, "".join(line + "\n" for line in kept))

    def last_metric(self, key: str) -> Any:
        values = [r[key] for r in self.read_metrics() if key in r]
        return values[-1] if values else None

    def contents(self) -> list[str]:
        """What the directory holds besides the lock (names, sorted)."""
        if not self.path.is_dir():
            return []
        return sorted(p.name for p in self.path.iterdir() if p.name != LOCK)

    # --------------------------------------------------------------------------------- the lock
    # An flock on the lock file, held while the run lives: the kernel drops it when the process dies
    # (kill -9 included), so a lock left by a dead run is stale by construction. The file names the
    # holder (pid, host, start) for the message; one left by a crash on another host is refused.

    def lock_owner(self) -> dict[str, Any]:
        try:
            data = json.loads(self.lock_file.read_text() or "{}")
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def held_here(self) -> bool:
        return self.path.resolve() in _HELD

    def _busy(self, owner: dict[str, Any]) -> TuneguardError:
        return TuneguardError(
            f"{self.path}: another run is writing into it (pid {owner.get('pid', '?')} on {owner.get('host', '?')}, "
            f"since {owner.get('started', '?')}); wait for it or choose another output.name"
        )

    def _foreign(self, owner: dict[str, Any]) -> TuneguardError:
        return TuneguardError(
            f"{self.path}: another run holds it (pid {owner.get('pid')} on host {owner.get('host')}, since "
            f"{owner.get('started')}); if that run is gone, delete {self.lock_file}"
        )

    def _not_ours(self, name: str, what: str = "a symbolic link") -> TuneguardError:
        return TuneguardError(f"{self.path / name}: is {what}; a run reads and writes only inside its own "
                              "directory, so it is refused: replace it with a plain file or folder")

    def refuse_links(self) -> None:
        """A run's own names must not lead elsewhere: through a linked ``checkpoints/`` a resumed run would write
        and prune another folder's files."""
        for name in (RECIPE, RUN, METRICS, CHECKPOINTS, ADAPTER, EVAL, SCORES, CHECKS, MERGED, *REPORTS):
            if (self.path / name).is_symlink():
                raise self._not_ours(name)

    def _locked_fd(self) -> int:
        """An fd holding the flock on the current lock file (not one a releasing run just unlinked)."""
        while True:
            try:  # never through a link: the holder's line would overwrite whatever file it points to
                fd = os.open(self.lock_file, os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW, 0o644)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise self._not_ours(LOCK) from None
                raise _os_error(self.path, exc) from None
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise self._not_ours(LOCK, "not a plain file")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise self._busy(self.lock_owner()) from None
            try:
                same = os.stat(self.lock_file).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return fd
            os.close(fd)

    def _take_lock(self) -> None:
        fd = self._locked_fd()
        owner = self.lock_owner()
        if owner.get("host") not in (None, socket.gethostname()):
            os.close(fd)
            raise self._foreign(owner)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(me).encode())
        _HELD[self.path.resolve()] = fd

    def ensure_idle(self) -> None:
        """Refuse while another run holds the directory (or a crashed one on another host left its lock)."""
        if self.held_here() or not self.lock_file.exists():
            return
        fd = self._locked_fd()
        os.close(fd)
        owner = self.lock_owner()
        if owner.get("host") not in (None, socket.gethostname()):
            raise self._foreign(owner)

    def ensure_finished(self, writable: bool) -> None:
        """For verbs that read a trained run (eval, export): refuse one that is still, or was never, finished;
        ``writable``: results go into it, so a read-only directory is refused before any model loads."""
        if not self.recipe.exists():
            raise TuneguardError(f"{self.path}: not a run directory (no {RECIPE})")
        self.refuse_links()
        self.ensure_idle()
        if not self.run_json.exists():
            raise TuneguardError(f"{self.path}: training did not finish (no {RUN}); continue it with "
                                 "tuneguard train RECIPE --resume")
        if writable and not os.access(self.path, os.W_OK):
            raise TuneguardError(f"{self.path}: not writable; results could not be saved")

    def ensure_converged(self, writable: bool = False) -> None:
        """:meth:`ensure_finished`, and refuse an adapter whose training diverged: it learned nothing worth exporting,
        comparing or checking (``tuneguard eval``'s guard rail refuses it in its report)."""
        self.ensure_finished(writable)
        if why := self.record().get("diverged"):
            raise TuneguardError(f"{self.path}: training diverged ({why}), so its adapter is refused; train again "
                                 "with a lower train.lr (--overwrite)")

    @contextlib.contextmanager
    def hold_results(self, converged: bool = False) -> Iterator[RunDir]:
        """For verbs that write a finished run's results (eval, check): held as training holds it, so two never
        write one run's eval.json and reports at once and a resumed training never starts under them.
        ``converged``: a diverged run is refused too (:meth:`ensure_converged`)."""
        (self.ensure_converged if converged else self.ensure_finished)(writable=True)
        with self.claim("results"):
            yield self

    def _make_dirs(self) -> None:
        missing = []
        for parent in [self.path, *self.path.parents]:
            if parent.exists():
                break
            missing.append(parent)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _os_error(self.path, exc) from None
        self.created = missing

    def _release(self) -> None:
        fd = _HELD.pop(self.path.resolve(), None)
        if fd is not None:
            self.lock_file.unlink(missing_ok=True)  # before closing, so a waiting run never takes a dead file
            os.close(fd)
        for folder in self.created:  # innermost first; only folders the run left empty
            with contextlib.suppress(OSError):
                folder.rmdir()

    # ------------------------------------------------------------------------------- claiming

    @contextlib.contextmanager
    def claim(self, mode: Mode) -> Iterator[RunDir]:
        """Hold the directory for a run's life: a second run into it is refused until this one ends."""
        if self.held_here():
            yield self
            return
        self._make_dirs()
        try:
            self._take_lock()
            self._prepare(mode)
            yield self
        finally:
            self._release()

    def _prepare(self, mode: Mode) -> None:
        held = self.contents()
        if mode != "overwrite":
            self.refuse_links()
        if mode == "results":
            self._recover_result_writes()
        elif mode == "overwrite" and held:
            self._move_aside(held)
        elif mode == "resume" and not held:
            raise TuneguardError(f"{self.path}: nothing to resume (no run there: is output.name right?); drop "
                                 "--resume to start a run")
        elif mode == "resume" and self.latest_checkpoint() is None and not self.unfinished_start(held):
            raise TuneguardError(
                f"{self.path}: no checkpoint to resume from (it holds {', '.join(held[:4])}); "
                "pass --overwrite to start again, moving the old contents aside"
            )
        elif mode == "resume":
            self._recover_training_writes()
        elif mode == "new" and held:
            what = (f"a finished run; {FINISHED_HINT}" if self.run_json.exists() else
                    "a run; pass --resume to continue it or --overwrite to move it aside and start again")
            raise TuneguardError(f"{self.path}: already holds {what} ({', '.join(held[:4])}"
                                 f"{', ...' if len(held) > 4 else ''})")

    def _recover_training_writes(self) -> None:
        """What a killed training save left (a checkpoint's or the adapter's temporary folder, a half-swapped
        adapter), never read and never pruned otherwise. Only names training writes, which nothing else writes
        while this run holds the directory (``eval`` and ``export`` take no lock)."""
        recover_partial_writes(self.path, lambda name: name in (RECIPE, RUN, METRICS, ADAPTER))
        recover_partial_writes(self.checkpoints, lambda name: re.fullmatch(r"step-\d+", name) is not None)

    def _recover_result_writes(self) -> None:
        """What a killed eval or check left: the temporary files of its results (nothing else writes them)."""
        recover_partial_writes(self.path, lambda name: name in (EVAL, *REPORTS))
        recover_partial_writes(self.scores, lambda name: name.endswith(".json"))
        recover_partial_writes(self.checks, lambda name: name.startswith("check-"))

    @staticmethod
    def unfinished_start(held: list[str]) -> bool:
        """Only what a run killed before its first checkpoint leaves: resuming it means starting it again."""
        return all(name in (RECIPE, METRICS, CHECKPOINTS) or (name.startswith(".") and name.endswith(".tmp"))
                   for name in held)

    def retire_evaluation(self, what: str = "the earlier adapter's evaluation") -> None:
        """Before a new adapter replaces the one eval.json and the reports describe (a resumed, extended run), or a
        re-evaluation drops tasks they hold: move them aside, so ``gate`` and ``report`` never pass a run on an
        earlier adapter's scores and no result is lost."""
        stale = [p.name for p in (self.eval_json, *self.report_paths) if p.exists()]
        if stale:
            self._move_aside(stale, what)

    def evaluated_tasks(self) -> dict[str, int]:
        """The tasks eval.json holds tuned results of, with their item counts (none without one)."""
        if not self.eval_json.exists():
            return {}
        return {r["task"]: r.get("n") or 0 for r in self.read_eval().get("tuned") or [] if isinstance(r, dict)}

    def _move_aside(self, names: list[str], what: str = "the previous contents") -> None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        aside = self.path.with_name(f"{self.path.name}.replaced-{stamp}")
        n = 1
        while aside.exists():
            n += 1
            aside = self.path.with_name(f"{self.path.name}.replaced-{stamp}-{n}")
        try:
            aside.mkdir()
            for name in names:
                os.replace(self.path / name, aside / name)
        except OSError as exc:
            raise _os_error(self.path, exc) from None
        say(f"tuneguard: moved {what} of {self.path} to {aside}")

    # ----------------------------------------------------------------------------- resuming

    def check_resume(self, checkpoint: Path, recipe_view: dict[str, Any], allowed: list[str],
                     defaults: dict[str, Any] | None = None) -> list[str]:
        """Refuse to resume with a training recipe other than the checkpoint's, unless every change is named
        (keys the checkpoint's recipe lacks count as their ``defaults``); the keys that changed (``allowed`` for a
        checkpoint from before recipes were stored with it)."""
        stored = checkpoint / CHECKPOINT_RECIPE
        if not stored.exists():
            return allowed
        changed = recipe_changes(json.loads(stored.read_text()), recipe_view, defaults)
        unnamed = [k for k in changed if k not in allowed]
        if unnamed:
            raise TuneguardError(
                f"{checkpoint}: the recipe changed since this checkpoint ({', '.join(unnamed)}); resuming would "
                f"mix two runs. Pass --resume-changed {','.join(unnamed)} to resume anyway, or --overwrite"
            )
        return changed

    def write_checkpoint_recipe(self, folder: Path, recipe_view: dict[str, Any]) -> None:
        atomic_write_json(folder / CHECKPOINT_RECIPE, recipe_view)


def checkpoint_step(folder: Path) -> int:
    """N of a ``step-N`` checkpoint folder."""
    return int(folder.name.split("-")[1])


def safe_name(name: str) -> str:
    """An output name is one path component: ``../x`` or ``a/b`` would write outside the output root."""
    if not name or name in (".", "..") or any(sep in name for sep in ("/", "\\", "\0")) or name.startswith("."):
        raise ValueError(f"{name!r} is not a plain folder name (one path component, not starting with '.'): "
                         "the run must stay inside the output root")
    return name
