"""The one exception type that user-facing errors travel in.

Library code raises ``LnsgdError`` with a message that names the offending field,
file or value and what would be valid; the CLI turns it into one line on stderr
and a non-zero exit. Anything else that escapes is a bug and keeps its traceback.
"""


class LnsgdError(Exception):
    """Bad input or an unrecoverable run condition, explained for the user."""


class RunInterrupted(LnsgdError):
    """SIGINT/SIGTERM arrived; a checkpoint was written before stopping."""


class DivergedError(LnsgdError):
    """The training loss became non-finite."""
