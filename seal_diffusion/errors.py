"""The one error type users see: a single line naming the file or argument and what is wrong.

The CLI prints ``str(err)`` and exits 2 (``--debug`` adds the traceback); the UI shows the same line.
"""


class UserError(Exception):
    """Bad input, bad arguments or a bad file: reported as one clear line, exit code 2."""
