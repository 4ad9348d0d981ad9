"""Exception types of the library. Every message says what was wrong and what to do.

ComfyUI reports a node's failure as ``type(ex).__module__ + "." + type(ex).__qualname__``. For a
custom node the module is wherever the pack happens to be imported from (an install path, or
``lambda_eclipse.core.errors`` when pip-installed), so every class here, and every subclass defined
elsewhere in the pack, reports the short, stable name ``lambda_eclipse.<ClassName>`` instead.
The real module is kept in ``__real_module__`` and pickling goes through it, so instances still
pickle, copy and print as before.
"""

from __future__ import annotations

import importlib

PUBLIC_MODULE = "lambda_eclipse"


def _rebuild(module: str, qualname: str, args: tuple, state: dict | None):
    """Unpickle an error: find its class through its real module (the public name is only for display)."""
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    exc = obj(*args)
    if state:
        exc.__dict__.update(state)
    return exc


class LambdaEclipseError(Exception):
    """Base class: anything the user can fix by changing an input, a file or a setting."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.__real_module__ = cls.__dict__.get("__real_module__", cls.__module__)
        cls.__module__ = PUBLIC_MODULE

    def __reduce__(self):
        cls = type(self)
        return _rebuild, (cls.__real_module__, cls.__qualname__, self.args, dict(self.__dict__) or None)


LambdaEclipseError.__real_module__ = __name__
LambdaEclipseError.__module__ = PUBLIC_MODULE


class ModelFileError(LambdaEclipseError):
    """A weight file or folder is missing, unreadable, unsafe, or is not the model that was asked for."""


class MissingModelsError(ModelFileError):
    """One or more of the required weight files were not found where they were looked for."""


class InterleaveError(LambdaEclipseError):
    """A subject word cannot be placed in the prompt (absent, empty, overlapping, or cut off)."""


class InputError(LambdaEclipseError):
    """An image, mask, embedding or numeric setting is not usable as given."""


class ImageFileError(InputError):
    """An image or mask file is missing, empty, damaged, too large, or not an image."""


class OutputPathError(InputError):
    """Where the result should be written is unusable: bad extension, a folder, not writable, or already there."""


class DeviceError(InputError):
    """The device asked for (cuda, cuda:N, mps, …) does not exist or is not visible to torch."""


class NonFiniteError(LambdaEclipseError):
    """A model, a LoRA or a run produced NaN or infinity: the result would be a black or broken picture."""


class Cancelled(LambdaEclipseError):
    """The user stopped a run (raised by a progress callback)."""


def public_name(exc_or_class) -> str:
    """The name ComfyUI shows for an exception (module + '.' + qualname), e.g. 'lambda_eclipse.InputError'."""
    cls = exc_or_class if isinstance(exc_or_class, type) else type(exc_or_class)
    return f"{cls.__module__}.{cls.__qualname__}"
