"""The one exception type for user mistakes.

A ``UserError`` is shown to the user as a single line (no traceback) and the CLI exits with code 2.
Its message names the file or field that is wrong and says how to fix it.
"""


class UserError(Exception):
    """A mistake in the user's input, config or environment that the user can fix."""

    def __init__(self, message: str):
        # Keep the message on one line so the CLI can print it as-is.
        super().__init__(" ".join(str(message).split()))
