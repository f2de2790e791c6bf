"""The one exception a user should ever see: a sentence that says what is wrong and how to fix it."""


class UserError(Exception):
    """Bad input or environment. train.py prints the message (no traceback) and exits non-zero."""

    exit_code = 1

