"""User-facing errors.

Every mistake a user can make (unknown model, malformed option, corrupt data file,
a directory that is not a run) raises :class:`NestError` with one sentence that
names the bad value and what would be valid.  The command line prints that
sentence and exits with status 2; it never shows a traceback for these.
"""


class NestError(Exception):
    """A problem with the user's input, described in one sentence."""
