"""Exceptions the command line turns into one-line messages."""


class SynthMorphError(Exception):
    """A problem with user input: the message names the file and the problem."""


class InputError(SynthMorphError):
    """An input file is missing, unreadable or unusable."""


class WeightsError(SynthMorphError):
    """Model weights are missing or do not fit the architecture."""


class DataWarning(UserWarning):
    """Something about the data the user should know (the command line prints one line)."""
