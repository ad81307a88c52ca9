"""The base class of errors a user can cause; the `xllava` command prints them as one line and exits 2."""


class UserError(ValueError):
    """Bad input from a user (a path, a file's content, a flag, a server's answer): the message names the
    file or setting and the problem, in one line."""
