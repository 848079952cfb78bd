"""Exceptions the command line turns into one-line messages."""


class SynthMorphError(Exception):
    """A problem with user input: the message names the file and the problem."""


class InputError(SynthMorphError):
    """An input file is missing, unreadable or unusable."""


class ChoiceError(SynthMorphError, ValueError):
    """A value outside its fixed set (a mode, an extent, a similarity)."""


class WeightsError(SynthMorphError):
    """Model weights are missing or do not fit the architecture."""


#: exit codes of ``synthmorph-bids`` by kind of refusal (2 is argparse's usage error)
BIDS_EXIT = {
    "not_bids": 3,
    "no_participants": 4,
    "missing_participant": 5,
    "no_anatomy": 6,
    "output_inside_input": 7,
    "unwritable_output": 8,
    "bad_filter": 9,
    "workflow_failed": 10,
    "bad_template": 11,
    "no_weights": 12,
    "some_skipped": 13,  # the others were processed
}


class BIDSAppError(SynthMorphError):
    """A refusal of ``synthmorph-bids``: one line for the user, and the exit code that
    names its kind (a key of :data:`BIDS_EXIT`)."""

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind
        self.code = BIDS_EXIT[kind]


class DataWarning(UserWarning):
    """Something about the data the user should know (the command line prints one line)."""
