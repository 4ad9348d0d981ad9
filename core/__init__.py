"""λ-ECLIPSE core library: plain PyTorch, open_clip and diffusers; no ComfyUI import anywhere here."""

from .errors import (  # noqa: F401
    Cancelled,
    InputError,
    InterleaveError,
    LambdaEclipseError,
    MissingModelsError,
    ModelFileError,
)

LOGGER_NAME = "lambda_eclipse"
