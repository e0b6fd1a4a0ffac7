"""The errors a user can cause. Each message names what to fix; the CLI prints it as one line and exits 1."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A user-fixable configuration mistake; the message names the key."""


class DataError(ValueError):
    """A user's data cannot be trained on as it is; the message names the file (and line) to fix.
    `problem`: the data scanner's record of it (data/scan.py Problem: path, line, reason), if any."""

    def __init__(self, message: str, problem: Any = None):
        super().__init__(message)
        self.problem = problem
        self.path = problem.path if problem else None
        self.line = problem.line if problem else None


class CheckpointError(Exception):
    """A missing, partial or incompatible checkpoint; the message names the path."""


class WriteError(CheckpointError, OSError):
    """A file of a run, checkpoint or export could not be written (a full disk, a read-only file
    system, a file in the way); the message names the path and the cause. An OSError too, for
    callers that handle file-system errors as such."""


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient norm became inf/nan; the step was not applied. `stats`: its numbers."""

    def __init__(self, message: str, stats: dict[str, float] | None = None):
        super().__init__(message)
        self.stats = stats or {}
