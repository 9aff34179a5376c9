"""Errors that reach the user as a message, not a traceback.

A `UserError` is a problem with what the user gave or with the environment (a config field, a
file, a dataset, a checkpoint, a store), not a bug. It is raised where the fact is known, and its
message is one line that names the field or file and says what to do. The `mmpt` command
(train/cli.py) is the one place that prints it: from rank 0 only, as
`mmpt COMMAND: error: MESSAGE`, exit status 2; the traceback only with MMPT_DEBUG=1. Any other
exception is a bug and keeps its traceback.

The error classes of the layers (StoreError, ShardError, ResumeError, ...) derive from UserError;
`ConfigError` is defined here, since loading a config (train/config.py) and checking its rules
(train/config_checks.py) both raise it. `MissingInput` and `InvalidInput` are for facts no layer
class covers, and keep the builtin type callers already catch. This module imports nothing, so
every layer can use it.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input or environment; the message is one line naming the file or field and the fix."""


class MissingInput(UserError, FileNotFoundError):
    """A file, directory or checkpoint the user pointed at does not exist (or is the wrong kind)."""


class InvalidInput(UserError, ValueError):
    """A file or checkpoint exists but does not fit (another model size, another tokenizer...)."""


class ConfigError(UserError, ValueError):
    """A config value is missing, unknown or invalid; the message names the field."""
