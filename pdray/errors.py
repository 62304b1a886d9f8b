"""The one exception type that reaches users as a message instead of a traceback."""


class PdrayError(Exception):
    """A problem with the user's input or environment, stated so they can fix it.

    The CLI and the jobs print its message as one paragraph and exit non-zero; any
    other exception is a bug in pdray and keeps its traceback.
    """
