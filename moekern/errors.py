"""The one exception type for mistakes a user can fix; the CLI prints its message without a traceback."""


class MoekernError(Exception):
    """Bad input: the message says what was wrong and what to do instead."""
