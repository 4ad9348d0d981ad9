"""The trainer's optional packages (pyproject's `[train]` extra): a missing one is named, with how to install it.

ComfyUI's own Python usually has torch, diffusers and safetensors but not accelerate or peft; a raw
``ModuleNotFoundError`` deep in a command would not say that the fix is one pip line.
"""

from __future__ import annotations

import importlib

from .errors import MissingExtraError

#: pyproject.toml's [train] extra, as pip names the packages (import name → pip name).
TRAIN_EXTRA = {"accelerate": "accelerate", "peft": "peft", "tensorboard": "tensorboard", "yaml": "pyyaml"}

INSTALL_HINT = ('Install the trainer\'s extras: from a clone of the repository `pip install -e ".[train]"`; with '
                "ComfyUI's Python (the one that runs ComfyUI, e.g. python_embeded\\python.exe on the Windows portable "
                "build) `python -m pip install accelerate peft tensorboard pyyaml`.")


def require_extras(command: str, modules) -> None:
    """Import each of `modules` now; MissingExtraError naming every missing one (and how to install it)."""
    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            missing.append((TRAIN_EXTRA.get(name, name), exc))
    if missing:
        names = ", ".join(pip for pip, _ in missing)
        why = "; ".join(f"{type(exc).__name__}: {str(exc)[:120]}" for _, exc in missing)
        raise MissingExtraError(f"trainer {command} needs the Python package{'s' if len(missing) > 1 else ''} "
                                f"{names}, which {'are' if len(missing) > 1 else 'is'} not installed or cannot be "
                                f"imported ({why}). {INSTALL_HINT}")
