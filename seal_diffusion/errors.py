"""The one error type users see: a single line naming the file or argument and what is wrong.

The CLI prints ``str(err)`` and exits 2 (``--debug`` adds the traceback); the UI shows the same line.
"""


class UserError(Exception):
    """Bad input, bad arguments or a bad file: reported as one clear line, exit code 2."""


def os_error_line(exc: OSError) -> str:
    """One line for a file-system error (read-only folder, a parent that is a file, disk full…): path and reason."""
    where = exc.filename if exc.filename is not None else ""
    reason = exc.strerror or (str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    return f"{where}: cannot write or read here ({reason})" if where else f"file system error ({reason})"
