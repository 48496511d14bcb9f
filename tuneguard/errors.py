"""One exception type for every user-facing failure, and ``guarded``, which turns it into one line and an exit code."""

from __future__ import annotations

import signal
import sys
import threading
import traceback
from collections.abc import Callable


class TuneguardError(Exception):
    """A problem with the user's input or environment: printed as one line, exit code 2."""

    exit_code = 2


class RegressionBudgetExceeded(TuneguardError):
    """A general task regressed by more than the allowed budget (exit code 1)."""

    exit_code = 1


LM_EVAL_EXTRA = "pip install 'tuneguard[lm-eval]'"


INTERNAL_ERROR = 70
"""The exit code of an error tuneguard did not foresee (BSD's EX_SOFTWARE): distinct from 1 (a regression) and 2."""


def require_lm_eval(what: str) -> None:
    """One line naming the optional extra when lm-evaluation-harness is not installed."""
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        raise TuneguardError(f"{what} needs lm-evaluation-harness, an optional extra: {LM_EVAL_EXTRA}")


class Terminated(BaseException):
    """SIGTERM or SIGHUP (what a scheduler, ``docker stop`` or a closed terminal sends), raised where the process is,
    so that, as for Ctrl-C, the run's lock is released and its temporary files removed on the way out."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _terminate(signum: int, frame: object) -> None:
    raise Terminated(signum)


def _traceback(debug: bool) -> None:
    """``--debug`` shows where the error came from; the exit code stays the error's (CI reads 1 as a regression)."""
    if debug:
        traceback.print_exc()


def guarded(action: Callable[[], int], debug: bool = False) -> int:
    """Run a verb; a user error becomes one line on stderr and a non-zero exit (traceback with --debug)."""
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(signum) is signal.SIG_DFL:  # nohup's SIG_IGN stays: such a run outlives its terminal
                signal.signal(signum, _terminate)
    try:
        return action()
    except TuneguardError as exc:
        _traceback(debug)
        print(f"tuneguard: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # the environment (a full disk, a vanished mount), not a verdict: exit 2 too
        _traceback(debug)
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"tuneguard: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return TuneguardError.exit_code
    except KeyboardInterrupt:
        print("tuneguard: interrupted", file=sys.stderr)
        return 130
    except Terminated as exc:
        print(f"tuneguard: terminated ({exc})", file=sys.stderr)
        return 128 + exc.signum
    except Exception as exc:  # a bug, or a library's refusal not yet put in words: never 1, which means a regression
        _traceback(debug)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"tuneguard: internal error: {type(exc).__name__}{': ' + first if first else ''} (rerun with --debug "
              "for the traceback, and report it)", file=sys.stderr)
        return INTERNAL_ERROR
