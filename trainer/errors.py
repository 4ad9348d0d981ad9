"""Error types of the trainer: every one is a user error (a file, a folder or a setting to fix).

All derive from `core.errors.LambdaEclipseError`, which the command line turns into one line,
``error: <message>``, and exit status 2, without a traceback. Where a type used to be a built-in
exception (ValueError, FileNotFoundError) it still is one, so older `except` clauses keep working.
"""

from __future__ import annotations

from ..core.errors import LambdaEclipseError


class TrainerError(LambdaEclipseError):
    """Base class of the trainer's user errors."""


class ConfigError(TrainerError, ValueError):
    """A setting is out of range, inconsistent with another, or does not fit the data."""


class DataError(TrainerError, ValueError):
    """A manifest, COCO file or feature folder is missing or unusable."""


class CheckpointError(TrainerError, FileNotFoundError):
    """A checkpoint, run folder or exported prior is missing or unreadable."""


class ResumeError(TrainerError):
    """Resuming would change settings of the checkpoint's run (see TRAINING.md, Troubleshooting)."""


class ExtractError(TrainerError):
    """An extraction cannot go on (a different dataset in --out, an unfinished shard)."""


class TrainingDivergedError(TrainerError):
    """The loss or the weights became non-finite (NaN/inf): the run stops before such weights are saved."""


class MissingExtraError(TrainerError, ImportError):
    """A package of the trainer's extras (accelerate, peft, tensorboard, pyyaml) is not installed."""
