"""ComfyUI node declarations (classic API). Filled in by the node-pack work."""

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
