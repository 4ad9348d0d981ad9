"""ComfyUI node declarations (classic V1 API): one module per feature, one adapter (comfy.py) to ComfyUI."""

import logging

from . import canny, decode, interpolate, loaders, lora, prompt, regions, sample, sdxl, subjects
from .comfy import in_comfyui, register_model_folder

_log = logging.getLogger("lambda_eclipse")

_MODULES = (loaders, lora, subjects, prompt, canny, sample, interpolate, regions, decode, sdxl)

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
for _module in _MODULES:
    for _node_id, (_cls, _display) in _module.NODES.items():
        NODE_CLASS_MAPPINGS[_node_id] = _cls
        NODE_DISPLAY_NAME_MAPPINGS[_node_id] = _display


def _setup_comfyui():
    """Inside ComfyUI only: register models/lambda_eclipse and copy the example images. Never raises."""
    if not in_comfyui():
        return
    try:
        register_model_folder()
    except Exception as exc:
        _log.warning("could not register the lambda_eclipse model folder: %s", exc)
    from .assets import install_assets

    install_assets()


_setup_comfyui()
