"""One exception type for every user-facing failure, so the CLI can print one clear line."""

from __future__ import annotations


class TuneguardError(Exception):
    """A problem with the user's input or environment: printed as one line, exit code 2."""

    exit_code = 2


class RegressionBudgetExceeded(TuneguardError):
    """A general task regressed by more than the allowed budget (exit code 1)."""

    exit_code = 1
