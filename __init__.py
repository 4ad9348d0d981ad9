"""λ-ECLIPSE for ComfyUI.

ComfyUI imports this file by path from custom_nodes/; installed with pip it is the package
`lambda_eclipse`. Importing must never fail because ComfyUI is absent, so the node
declarations are plain classes and anything ComfyUI-specific is reached lazily.
"""

import logging

__version__ = "0.1.0"

_log = logging.getLogger("lambda_eclipse")

try:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: F401
except ImportError as exc:  # pragma: no cover - only when the nodes package is broken or absent
    _log.error("λ-ECLIPSE nodes could not be loaded: %s", exc)
    NODE_CLASS_MAPPINGS = {}
    NODE_DISPLAY_NAME_MAPPINGS = {}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "__version__"]
