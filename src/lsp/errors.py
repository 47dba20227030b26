"""Bad input is reported, not crashed on: every entry point (`python -m lsp.<train|select|
evaluate|ifeval|report>`, each `pipelines/` stage) runs under `exit_on_input_error`, which prints
one line `error: <what, naming the key or file>` to stderr and exits with status 2.

Input errors are the project's own (each names what was wrong: a config key, a model spec, a
file and line) plus the standard library's for a missing or unreadable file and malformed
JSON / YAML. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import json
import sys


class InputError(ValueError):
    """Bad input (a config value, a model spec, a file): the message names what was wrong.
    The project's input errors derive from it (lsp.config.ConfigError, ...)."""


class InputFileError(InputError):
    """A file the user gave is malformed: the message names the file and the line."""


def input_errors() -> tuple[type[BaseException], ...]:
    from omegaconf.errors import OmegaConfBaseException
    from yaml import YAMLError

    return (InputError, FileNotFoundError, IsADirectoryError, NotADirectoryError,
            PermissionError, json.JSONDecodeError, YAMLError, OmegaConfBaseException)


def exit_on_input_error(fn):
    """Decorate an entry point: input errors -> `error: ...` on stderr, exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except input_errors() as err:
            print(f"error: {describe(err)}", file=sys.stderr)
            sys.exit(2)

    return wrapper


def describe(err: BaseException) -> str:
    if isinstance(err, json.JSONDecodeError):
        return f"malformed JSON ({err.msg} at line {err.lineno}, column {err.colno})"
    if isinstance(err, OSError) and err.filename:
        return f"{err.strerror}: {err.filename}"
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return "; ".join(lines) or type(err).__name__
