"""biounet's errors: one small hierarchy that the command line turns into one line each.

Every error that biounet raises on purpose is a :class:`BiounetError`, and its message names
the file or argument and what is wrong with it. The subclasses also derive from the
built-in exception a caller would expect, so ``except ValueError`` keeps working:

* :class:`InputError` (a :class:`ValueError`): a bad argument, image, label file, model
  folder, configuration or option, found before any work is done or any file is written;
* :class:`TrainingError` (a :class:`RuntimeError`): training stopped on its own (a
  non-finite loss or weights); the message says which checkpoint is kept.

The library never prints or exits; :mod:`biounet.cli` writes ``biounet <command>: <message>``
and exits with status 2 for a :class:`BiounetError` (or ``OSError``).
"""

from __future__ import annotations


class BiounetError(Exception):
    """An expected failure, with a message for the person who ran biounet.

    ``option`` names the argument of the library function the message is about (e.g.
    ``"resume"``), so that the command line can point to its own flag for it; the message
    itself speaks the library's language, never a flag's.
    """

    def __init__(self, message: str, *, option: str | None = None) -> None:
        super().__init__(message)
        self.option = option


class InputError(BiounetError, ValueError):
    """A bad argument, file or configuration: the message names it and says what is wrong."""


class TrainingError(BiounetError, RuntimeError):
    """Training stopped (non-finite loss or weights); the message says which checkpoint is kept."""
