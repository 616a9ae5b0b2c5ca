"""Entry points: each parses flags and calls one library function.

:func:`config_flag` defines the ``--config`` flag they share: a config file
(``configs/<stage>.py[:<preset>]``) loaded by ``jaxalign.config.load_config_file``,
with ``--config.<key>=<value>`` overrides (ml_collections' config flags: values typed
like the default, unknown keys are errors, the config is locked).

:func:`run` runs an entry point's ``main`` under absl: a user's mistake (a bad flag,
config key, record, checkpoint or model directory) ends with one line on stderr,
``error: <message>``, and exit status 2; the traceback is printed too with
``--verbosity=1`` (or more) or ``JAXALIGN_TRACEBACK=1`` in the environment.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from absl import app, flags, logging
from ml_collections import config_flags

from jaxalign.config import load_config_file

TRACEBACK_ENV = "JAXALIGN_TRACEBACK"
USAGE_EXIT = 2
# Errors a wrong flag, config, record, checkpoint or directory raises; anything else
# (a bug) keeps Python's traceback. KeyError/AttributeError/TypeError count only when
# a ConfigDict raised them (a key the config lacks, a value of the wrong type).
_USER_ERRORS = (ValueError, OSError, app.UsageError, flags.Error)
_CONFIG_ERRORS = (KeyError, AttributeError, TypeError)
_CONFIG_MODULE = "ml_collections"


def start(argv: list[str], *, quiet: bool = True) -> None:
    """Refuses stray positional arguments; with ``quiet``, library INFO logs (Orbax, XLA),
    which drown the progress lines, are off unless ``--verbosity`` is given."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if quiet and not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)


class _ConfigFileParser(flags.ArgumentParser):
    """Loads ``--config`` with the library's loader; a bad file or preset is a flag error."""

    def parse(self, argument: str):
        try:
            return load_config_file(argument)
        except FileNotFoundError as e:  # absl reports ValueErrors as flag errors
            raise ValueError(str(e)) from None

    def flag_type(self) -> str:
        return "config object"


def config_flag(help_string: str, default: str | None = None,
                name: str = "config") -> flags.FlagHolder:
    """Defines ``--<name>=<file>[:<arg>]`` and its ``--<name>.<key>=<value>`` overrides.

    Args:
      help_string: the flag's help.
      default: the config file used when the flag is not given.
      name: the flag's name.
    """
    holder = config_flags.DEFINE_config_file(name, None, help_string, lock_config=True)
    flags.FLAGS[name].parser = _ConfigFileParser()
    if default is not None:
        flags.FLAGS.set_default(name, default)
    return holder


# -- errors a person can read ---------------------------------------------------------------


def _chain(error: BaseException) -> list[BaseException]:
    """``error`` and the exceptions it was raised from or while handling, outermost first.

    A ``raise ... from None`` ends the chain (the library hid the inner error on purpose).
    """
    out: list[BaseException] = []
    while error is not None and all(error is not seen for seen in out):
        out.append(error)
        error = error.__cause__ if error.__cause__ is not None else (
            None if error.__suppress_context__ else error.__context__)
    return out


def _raised_in(error: BaseException, module: str) -> bool:
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_globals.get("__name__", "").startswith(module)


def _is_project_error(error: BaseException) -> bool:
    return type(error).__module__.split(".")[0] == "jaxalign"


def _is_user_error(error: BaseException) -> bool:
    return (isinstance(error, _USER_ERRORS) or _is_project_error(error)
            or (isinstance(error, _CONFIG_ERRORS) and _raised_in(error, _CONFIG_MODULE)))


def user_error(error: BaseException) -> BaseException | None:
    """The exception whose message the user should read, or None for a bug.

    A wrapper around one of jaxalign's own errors (say a data worker's error re-raised
    by the loader's machinery) gives way to the outermost jaxalign error in its chain.
    """
    if not isinstance(error, Exception):
        return None
    chain = _chain(error)
    if _is_project_error(error):
        return error
    inner = next((e for e in chain[1:] if _is_project_error(e)), None)
    if inner is not None:
        return inner
    return error if _is_user_error(error) else None


def error_message(error: BaseException) -> str:
    """``error``'s message on one line (a KeyError's quotes dropped, lines joined by ``;``)."""
    text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return "; ".join(lines) or type(error).__name__


def wants_traceback() -> bool:
    """``--verbosity`` >= 1 or ``JAXALIGN_TRACEBACK`` set to something other than 0."""
    if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
        return True
    verbosity = flags.FLAGS["verbosity"]
    return verbosity.present and flags.FLAGS.is_parsed() and verbosity.value >= 1


def fail(message: str, error: BaseException | None = None) -> NoReturn:
    """Prints ``error: <message>`` (after the traceback, if asked for) and exits with 2."""
    if error is not None and wants_traceback():
        traceback.print_exception(error)
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()
    sys.exit(USAGE_EXIT)


def _config_key_message(error: BaseException, argv: Sequence[str]) -> str:
    """An override naming a key the config lacks: which flag, and ml_collections' hint."""
    text: Any = error
    while isinstance(text, BaseException):  # AttributeError(KeyError("'key'\nDid you mean"))
        text = text.args[0] if text.args else ""
    key, *hint = [line.strip() for line in text.splitlines() if line.strip()]
    key = key.strip("'\"")
    for arg in argv[1:]:
        name = arg.split("=", 1)[0]
        if name.startswith("--") and "." in name and key in name.split(".")[1:]:
            prefix = f"flag {arg}: "
            break
    else:
        prefix = ""
    return f"{prefix}the config has no key {key!r}" + (f" ({' '.join(hint)})" if hint else "")


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a bad flag or config override as one ``error:`` line."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        fail(error_message(e), e)
    except _CONFIG_ERRORS as e:  # --config.<key>=<value> with a key the config lacks
        if not _raised_in(e, _CONFIG_MODULE):
            raise
        fail(_config_key_message(e, argv), e)


def run(main: Callable[[list[str]], Any]) -> None:
    """``absl.app.run(main)`` where a user's mistake ends as one ``error:`` line, exit 2.

    Args:
      main: the entry point's ``main(argv)``.
    """
    def guarded(argv: list[str]) -> Any:
        try:
            return main(argv)
        except Exception as e:  # noqa: BLE001 -- sorted into the user's and bugs just below
            shown = user_error(e)
            if shown is None:
                raise
            fail(error_message(shown), e)

    app.run(guarded, flags_parser=parse_flags)
