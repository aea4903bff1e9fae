"""The two ways a command fails: exit 1 (``PatchError``) or exit 2 (``UsageError``)."""


class PatchError(Exception):
    """A failure the message explains: exit 1."""


class UsageError(Exception):
    """A bad command line: exit 2."""
