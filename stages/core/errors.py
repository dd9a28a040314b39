"""What ends a stage with an exit code of its own: bad input (2, with a one-paragraph message) and a damaged
artifact in the store (3: the pipeline computes it again).
"""

EXIT_INPUT_ERROR = 2
EXIT_DAMAGED_ARTIFACT = 3
EXIT_LAUNCHER_GONE = 4  # the stage stopped itself: the process that launched it had died
# How the `rlhf` command's message for them begins: the launcher finds it there among several processes' output.
ERROR_PREFIX = "error: "


class InputError(Exception):
    """A malformed config or input file. The message names the file and the field, line or row."""


class DamagedArtifact(Exception):
    """An artifact in the store failed verification: it was set aside, and the stage that made it must run
    again. Not an input error (the user's files are fine) and not worth retrying the same stage on."""


class MissingInput(InputError):
    """A stage's upstream artifact is not in the store: not produced yet, or set aside as damaged."""


class SeveralMethods(InputError):
    """A stage was asked to run a config that lists several RL methods: each runs from its own config."""
