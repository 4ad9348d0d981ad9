"""Exception types of the library. Every message says what was wrong and what to do."""


class LambdaEclipseError(Exception):
    """Base class: anything the user can fix by changing an input, a file or a setting."""


class ModelFileError(LambdaEclipseError):
    """A weight file or folder is missing, unreadable, unsafe, or is not the model that was asked for."""


class MissingModelsError(ModelFileError):
    """One or more of the required weight files were not found where they were looked for."""


class InterleaveError(LambdaEclipseError):
    """A subject word cannot be placed in the prompt (absent, empty, overlapping, or cut off)."""


class InputError(LambdaEclipseError):
    """An image, mask, embedding or numeric setting is not usable as given."""


class Cancelled(LambdaEclipseError):
    """The user stopped a run (raised by a progress callback)."""
