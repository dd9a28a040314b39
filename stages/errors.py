"""The one exception type for bad input: the CLI turns it into exit code 2 and a one-paragraph message."""


class InputError(Exception):
    """A malformed config or input file. The message names the file and the field, line or row."""
