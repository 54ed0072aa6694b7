"""The one exception type users see: a sentence that names the problem, printed without a traceback."""


class MergeError(Exception):
    """A problem with the user's input or environment, stated as one clear sentence."""


class WriteError(MergeError):
    """The place a write was to go cannot take it: a file in the way, a read-only or full disk."""
