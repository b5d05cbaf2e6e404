"""Errors that reach the user as one clear line instead of a traceback."""


class InputError(Exception):
    """Bad user input: the message names the file or parameter, the problem and the fix."""


class NotSupportedError(InputError):
    """A recognised parameter whose behaviour is not built yet."""
