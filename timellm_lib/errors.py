"""The one exception family for bad input.

Every error a user can cause (a wrong config key, a missing file, a corrupt checkpoint, a
backbone that cannot be loaded offline) derives from :class:`WorkbenchError`, and its message
names the problem and the fix. The CLI prints such errors as one paragraph and exits with
code 2; anything else is a bug and keeps its traceback.
"""


class WorkbenchError(Exception):
    """Bad input; the message says what is wrong and how to fix it."""
