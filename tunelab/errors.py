"""One exception type for mistakes a user can fix.

Raise ``TunelabError`` with a message that names the file / line / key at fault and says how to fix it.
The CLI prints the message (no traceback) and exits with status 2.
"""


class TunelabError(Exception):
    """A user-facing error: bad config, bad data, missing files, impossible settings."""
