"""The one exception type the CLI turns into a one-line message and exit code 2."""


class InputError(Exception):
    """Bad user input: a missing or corrupt file, inconsistent shards, an impossible layout.

    The message names the file or option and the problem, in one line, without a traceback.
    """
