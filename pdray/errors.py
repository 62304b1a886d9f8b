"""The one exception type that reaches users as a message instead of a traceback, and
the one way strings from users become Enums."""

from enum import Enum
from typing import TypeVar

E = TypeVar("E", bound=Enum)


class PdrayError(Exception):
    """A problem with the user's input or environment, stated so they can fix it.

    The CLI and the jobs print its message as one paragraph and exit non-zero; any
    other exception is a bug in pdray and keeps its traceback.
    """


def parse_choice(kind: type[E], value, what: str) -> E:
    """``kind(value)``, or a PdrayError that names the bad value and the choices."""
    try:
        return kind(value)
    except ValueError:
        raise PdrayError(f"Unknown {what} {value!r}: choose one of "
                         f"{', '.join(k.value for k in kind)}.") from None
