"""Make plain PyTorch models offloadable by ComfyUI: swap their layers for `comfy.ops` classes in place.

ComfyUI streams or partially loads only layers that have `comfy_cast_weights` (the `comfy.ops` classes); every
other parameter is loaded whole. `make_offloadable` re-classes, after construction, each plain
`torch.nn.Linear` / `Conv2d` / `GroupNorm` / `LayerNorm` / `Embedding` to the matching class of an ops namespace
(`comfy.ops.disable_weight_init`, `manual_cast`, ...). No tensor is copied: `module.__class__ = ops.Linear`.
That is safe because in ComfyUI 0.3.64 and 0.33.0 those classes are direct subclasses of the torch ones whose
`forward` falls back to the torch `forward` unless `comfy_cast_weights` (a class attribute) or a weight function
is set, and whose cast path reads only the torch attributes (`weight`, `bias`, `eps`, `padding_idx`, ...) and
class-level defaults; their extra `__init__` state in 0.33 (`weight_comfy_model_dtype`, lazy weights) is only set
on the aimdo lazy-loading path and read with `getattr(..., None)`; the one attribute their `reset_parameters`
adds, `Embedding.bias = None`, is set here.

Left alone (they stay plain, so ComfyUI loads them whole):
- subclasses of those types (open_clip's casting `LayerNorm`, `NonDynamicallyQuantizableLinear`): their forward
  differs from the torch one, or their weights are read directly;
- everything inside an `nn.MultiheadAttention` (open_clip's attention calls `F.multi_head_attention_forward` with
  `in_proj_weight` and `out_proj.weight` directly, never `out_proj.forward`) and inside a `VectorQuantizer`
  (MoVQ's codebook is read as `embedding.weight`);
- bare parameters (open_clip's `positional_embedding`, `text_projection`, `class_embedding`, `proj`);
- the modules named in `keep`.

This module imports no ComfyUI: the caller passes the ops namespace (see `nodes/comfy.py`).
"""

from __future__ import annotations

import torch

SWAPPABLE = ("Linear", "Conv2d", "GroupNorm", "LayerNorm", "Embedding")
_TORCH = {name: getattr(torch.nn, name) for name in SWAPPABLE}
# Parents whose forward reads their children's weights directly instead of calling the children.
_DIRECT_WEIGHT_PARENTS = (torch.nn.MultiheadAttention,)
_DIRECT_WEIGHT_PARENT_NAMES = ("VectorQuantizer", "EMAVectorQuantizer", "GumbelQuantizer")


def ops_compatible(ops) -> bool:
    """True when every swappable class of `ops` is a subclass of the torch class (comfy.ops' are)."""
    for name, base in _TORCH.items():
        cls = getattr(ops, name, None)
        if not (isinstance(cls, type) and issubclass(cls, base)):
            return False
    return True


def _skipped_ids(module: torch.nn.Module, keep) -> set[int]:
    skipped = {id(m) for m in keep or ()}
    for m in module.modules():
        if isinstance(m, _DIRECT_WEIGHT_PARENTS) or type(m).__name__ in _DIRECT_WEIGHT_PARENT_NAMES:
            skipped.update(id(child) for child in m.modules())
    return skipped


def make_offloadable(module: torch.nn.Module, ops, keep=()) -> list[tuple[torch.nn.Module, type]]:
    """Re-class the eligible layers of `module` to `ops`' classes; returns [(layer, old class)] for `restore`.

    All or nothing: on any error the layers already swapped are restored and the error is raised again.
    """
    if not ops_compatible(ops):
        raise TypeError(f"{ops!r} lacks comfy.ops-style subclasses of torch.nn.{', torch.nn.'.join(SWAPPABLE)}")
    skipped = _skipped_ids(module, keep)
    swapped: list[tuple[torch.nn.Module, type]] = []
    try:
        for m in module.modules():
            if id(m) in skipped:
                continue
            for name, base in _TORCH.items():
                # exact type: subclasses may have their own forward; no weight (a non-affine norm): nothing to cast
                if type(m) is base and getattr(m, "weight", None) is not None:
                    m.__class__ = getattr(ops, name)
                    swapped.append((m, base))
                    if base is torch.nn.Embedding and "bias" not in m.__dict__:
                        m.bias = None  # what comfy.ops.Embedding's reset_parameters sets; its cast reads `bias`
                    break
    except BaseException:
        restore(swapped)
        raise
    return swapped


def restore(swapped: list[tuple[torch.nn.Module, type]]) -> None:
    """Undo `make_offloadable`."""
    for m, cls in reversed(swapped):
        m.__class__ = cls
        for attr in ("comfy_cast_weights", "weight_function", "bias_function", "prev_comfy_cast_weights"):
            m.__dict__.pop(attr, None)
        if cls is torch.nn.Embedding:
            m.__dict__.pop("bias", None)


def is_offloadable_layer(m: torch.nn.Module) -> bool:
    return hasattr(m, "comfy_cast_weights")


def resident_bytes(module: torch.nn.Module) -> int:
    """Bytes of the tensors ComfyUI cannot offload: parameters and buffers owned by non-ops modules."""
    total = 0
    seen: set[int] = set()
    for m in module.modules():
        if is_offloadable_layer(m):
            continue
        for t in list(m._parameters.values()) + list(m._buffers.values()):
            if t is not None and id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total


def move_resident(module: torch.nn.Module, device: torch.device) -> int:
    """Move the tensors of non-ops modules that are not on `device` there; returns the bytes moved.

    ComfyUI's legacy patcher, when it loads a model partially, leaves on the offload device the direct parameters
    of non-leaf modules (e.g. open_clip's `positional_embedding`, MultiheadAttention's `in_proj_weight`), buffers,
    and non-ops modules that did not fit; nothing casts those at run time. Its full unload (`model.to(offload)`)
    brings them back.
    """
    device = torch.device(device)
    moved = 0
    with torch.no_grad():
        for m in module.modules():
            if is_offloadable_layer(m):
                continue
            for name, p in list(m._parameters.items()):
                if p is not None and p.device != device:
                    m._parameters[name] = torch.nn.Parameter(p.data.to(device), requires_grad=p.requires_grad)
                    moved += p.numel() * p.element_size()
            for name, b in list(m._buffers.items()):
                if b is not None and b.device != device:
                    m._buffers[name] = b.to(device)
                    moved += b.numel() * b.element_size()
    return moved
