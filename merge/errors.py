"""The one exception type users see: a sentence that names the problem, printed without a traceback."""


class MergeError(Exception):
    """A problem with the user's input or environment, stated as one clear sentence."""


class WriteError(MergeError):
    """The place a write was to go cannot take it: a file in the way, a read-only or full disk."""


def printable(text: str) -> str:
    """``text`` safe to print on a terminal: every character that is not printable (escape sequences, other
    control characters, bidirectional overrides) written as ``repr`` writes it (``\\x1b``, ``\\u202e``)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
