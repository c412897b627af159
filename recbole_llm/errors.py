"""The one kind of error a user can fix: :class:`UsageError`.

A bad setting, an unknown name, a missing or damaged file the user pointed at, data that cannot support the
protocol: each raises a subclass of :class:`UsageError` (mixed with the built-in type it always was, so
``except ValueError`` / ``except FileNotFoundError`` callers keep working) whose message names the key or file and
the fix. The command line prints exactly these as one ``error:`` line with exit status 2. Every other exception is
a bug, in recbole_llm or below it, and surfaces with its traceback (exit 1): a ``KeyError`` deep inside RecBole is
never dressed up as the user's mistake.
"""

from __future__ import annotations


class UsageError(Exception):
    """An input the user can fix; the message says which and how."""


class InputFileError(UsageError, ValueError):
    """A file the user named (or a file inside a dataset) that is missing, damaged or lacks what is needed."""
