"""Entry points: each parses flags and calls one library function.

:func:`config_flag` defines the ``--config`` flag they share: a config file
(``configs/<stage>.py[:<preset>]``) loaded by ``jaxalign.config.load_config_file``,
with ``--config.<key>=<value>`` overrides (ml_collections' config flags: values typed
like the default, unknown keys are errors, the config is locked).
"""

from __future__ import annotations

from absl import app, flags, logging
from ml_collections import config_flags

from jaxalign.config import load_config_file


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
