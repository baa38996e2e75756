"""The errors deit-lt raises for bad input, one type per kind of failure, and the exit code each tool returns.

Every tool prints such an error as one line (`error: <message>`) on stderr, without a traceback, and exits with its
code; a traceback is only ever a bug. README.md lists the codes.
"""
from __future__ import annotations

__all__ = ['DeitLTError', 'ConfigError', 'DatasetError', 'CheckpointError', 'TrainingError', 'NonFiniteLossError',
           'PreemptedError']


class DeitLTError(Exception):
    """Base class: input or a situation the user can fix; the message says what is wrong and what to do."""
    exit_code = 1


class ConfigError(DeitLTError, ValueError):
    """A config file, override or command-line argument that does not fit the schema, settings that cannot work
    together, or an optional package a setting needs that is not installed."""
    exit_code = 2


class DatasetError(DeitLTError, ValueError):
    """Data that is missing, unreadable or does not fit the settings (class counts, list files, images)."""
    exit_code = 3


class CheckpointError(DeitLTError, RuntimeError):
    """A checkpoint or model file that is missing, truncated, corrupt or does not fit the model or the data."""
    exit_code = 4


class TrainingError(DeitLTError, RuntimeError):
    """Training cannot go on (the last good checkpoint is kept)."""
    exit_code = 5


class NonFiniteLossError(TrainingError):
    """The training loss became NaN or infinite."""


class PreemptedError(TrainingError):
    """A signal (SIGTERM / SIGINT / SIGUSR1 from a scheduler or the user) stopped the run after a resumable
    checkpoint; `runtime.resume=auto` continues it exactly. The exit code (75, EX_TEMPFAIL) tells a job script to
    requeue."""
    exit_code = 75
