"""Decoder LoRAs (paper §3.3 / App. D concept fine-tuning): read one, apply it to a decoder at a strength.

File format: a .safetensors file in diffusers' PEFT key layout for a UNet, ``unet.<module path>.lora_A.weight``
([rank, in]) and ``unet.<module path>.lora_B.weight`` ([out, rank]), the layout `UNet2DConditionModel.load_lora_adapter(
file, prefix="unet")` reads. Older diffusers names (``.lora.down/.lora.up``, ``.lora_linear_layer.down/up``) and
keys without the ``unet.`` prefix are read too. The metadata keys ``rank`` and ``alpha`` give the scale alpha/rank
(absent: alpha = rank, scale 1, as diffusers assumes).

Applying never copies or modifies the UNet: `apply_decoder_lora` returns a *new* `KandinskyDecoder` that shares the
base UNet and MoVQ, and whose ``unet`` is a thin `LoRAUNet` wrapper. Only while that wrapper is called (during
`decode`) are forward hooks on the targeted Linear layers registered, adding ``strength · alpha/rank · B(A(x))`` to
their outputs; they are removed when the call returns (or raises). So the base decoder, and everyone else holding
it (ComfyUI's cache, other branches of a graph), keeps computing exactly the base model; strength 0 registers no
hook at all and gives the base decoder's pixels bit for bit.
"""

from __future__ import annotations

import contextlib
import json
import numbers
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from .decoder import KandinskyDecoder
from .errors import InputError, ModelFileError

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj")
FORMAT_TAG = "lambda_eclipse_decoder_lora"  # metadata key "format_tag" of the files the trainer writes

_SUFFIXES = (  # (down/A suffix, up/B suffix) of the key layouts read
    (".lora_A.weight", ".lora_B.weight"),
    (".lora.down.weight", ".lora.up.weight"),
    (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"),
)


@dataclass(eq=False)
class DecoderLoRA:
    """A decoder LoRA read into memory: {module path: (A [rank, in], B [out, rank])}, float32 on the CPU."""

    path: str
    layers: dict[str, tuple[torch.Tensor, torch.Tensor]]
    alpha: float
    rank: int
    metadata: dict[str, str] = field(default_factory=dict)
    _cast: dict = field(default_factory=dict, repr=False)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def weights_for(self, device, dtype) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The layers on `device` in `dtype` (cached: one copy per device/dtype, a few MB at rank 4)."""
        key = (str(device), dtype)
        if key not in self._cast:
            self._cast.clear()  # keep at most one copy besides the CPU float32 one
            self._cast[key] = {m: (a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype))
                               for m, (a, b) in self.layers.items()}
        return self._cast[key]


# -- reading -----------------------------------------------------------------------------------------------

def _describe_foreign(keys: list[str]) -> str:
    """What a set of keys that are no decoder LoRA looks like, for the error message."""
    sample = ", ".join(keys[:3])
    if any(k.startswith(("lora_unet_", "lora_te")) for k in keys):
        return f"a kohya-style Stable Diffusion / SDXL LoRA (keys such as {sample})"
    if any(k.startswith(("transformer.", "lora_transformer", "diffusion_model.")) for k in keys):
        return f"a LoRA for a transformer / other diffusion model (keys such as {sample})"
    if any(k.startswith(("text_encoder", "te_")) for k in keys) and not any(k.startswith("unet.") for k in keys):
        return f"a text-encoder LoRA (keys such as {sample})"
    if any("transformer_blocks" in k or "attn1" in k or "attn2" in k for k in keys):
        return f"a LoRA for a Stable Diffusion style UNet (it targets attn1/attn2 transformer blocks: {sample})"
    if not any("lora" in k.lower() for k in keys):
        return f"not a LoRA at all ({len(keys)} tensors such as {sample})"
    return f"a LoRA for another model (keys such as {sample})"


def _split_keys(tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], list[str]]:
    pairs: dict[str, list] = {}
    other = []
    for key, value in tensors.items():
        for down, up in _SUFFIXES:
            for suffix, slot in ((down, 0), (up, 1)):
                if key.endswith(suffix):
                    module = key[: -len(suffix)]
                    module = module[len("unet."):] if module.startswith("unet.") else module
                    pairs.setdefault(module, [None, None])[slot] = value
                    break
            else:
                continue
            break
        else:
            other.append(key)
    layers = {m: (a, b) for m, (a, b) in pairs.items() if a is not None and b is not None}
    other += [m for m, (a, b) in pairs.items() if a is None or b is None]
    return layers, other


def load_decoder_lora(path: str | os.PathLike) -> DecoderLoRA:
    """Read a decoder LoRA file (see the module docstring); ModelFileError for a file that is none."""
    from safetensors import safe_open

    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelFileError(f"Decoder LoRA {path} does not exist (or is not a file).")
    if path.suffix.lower() not in (".safetensors", ".sft"):
        raise ModelFileError(f"{path.name}: decoder LoRAs are read from .safetensors files only.")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    except Exception as exc:
        raise ModelFileError(f"{path.name} is not a readable .safetensors file ({str(exc)[:200]}).") from exc
    if not tensors:
        raise ModelFileError(f"{path.name} holds no tensors: it is not a LoRA.")
    layers, other = _split_keys(tensors)
    keys = sorted(tensors)
    if not layers or other:
        raise ModelFileError(
            f"{path.name} is not a Kandinsky 2.2 decoder LoRA: it looks like {_describe_foreign(sorted(other) or keys)}. "
            "A decoder LoRA (from `python -m lambda_eclipse.trainer finetune-decoder`) holds unet.<module>.lora_A/"
            "lora_B.weight pairs for the decoder UNet's attention projections."
        )
    ranks = set()
    for module, (a, b) in layers.items():
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise ModelFileError(
                f"{path.name}: {module} has LoRA matrices of shapes {list(a.shape)} and {list(b.shape)}, which do not "
                "form a rank-r update (A [r, in], B [out, r])."
            )
        ranks.add(int(a.shape[0]))
    rank = int(metadata.get("rank", max(ranks)))
    try:
        alpha = float(metadata.get("alpha", rank))
    except ValueError as exc:
        raise ModelFileError(f"{path.name}: metadata alpha {metadata.get('alpha')!r} is not a number.") from exc
    if len(ranks) > 1:  # per-layer ranks: keep each layer's own alpha/rank by folding it into B
        layers = {m: (a.float(), b.float() * (rank / a.shape[0])) for m, (a, b) in layers.items()}
    layers = {m: (a.float().contiguous(), b.float().contiguous()) for m, (a, b) in layers.items()}
    return DecoderLoRA(str(path), layers, alpha, rank, metadata)


def looks_like_decoder_lora(path: str | os.PathLike) -> bool:
    """Cheap header check (keys only) for menus: a LoRA whose layers include the decoder UNet's add_k/v projections
    or that the trainer wrote."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            if (handle.metadata() or {}).get("format_tag") == FORMAT_TAG:
                return True
            keys = list(handle.keys())
    except Exception:
        return False
    layers, other = _split_keys(dict.fromkeys(keys, torch.empty(0)))  # shapes are not read here
    return bool(layers) and not other and any(m.endswith(("add_k_proj", "add_v_proj")) for m in layers)


def check_lora_fits(lora: DecoderLoRA, unet) -> None:
    """ModelFileError unless every LoRA layer names a Linear of `unet` with matching shapes."""
    modules = dict(unet.named_modules())
    name = Path(lora.path).name
    missing = [m for m in lora.layers if m not in modules]
    if missing:
        raise ModelFileError(
            f"{name} does not fit this Kandinsky 2.2 decoder UNet: {len(missing)} of its {len(lora.layers)} layers "
            f"name modules the UNet does not have (e.g. {', '.join(missing[:3])}); it looks like "
            f"{_describe_foreign(['unet.' + m + '.lora_A.weight' for m in missing])}. Use a LoRA trained with "
            "`python -m lambda_eclipse.trainer finetune-decoder` on this decoder."
        )
    for module_name, (a, b) in lora.layers.items():
        module = modules[module_name]
        if not isinstance(module, torch.nn.Linear):
            raise ModelFileError(f"{name}: {module_name} is a {type(module).__name__} in this UNet, not a Linear layer.")
        if a.shape[1] != module.in_features or b.shape[0] != module.out_features:
            raise ModelFileError(
                f"{name} was trained for a UNet of another size: {module_name} is {module.in_features}→"
                f"{module.out_features} here but {a.shape[1]}→{b.shape[0]} in the LoRA (base decoder of the LoRA: "
                f"{lora.metadata.get('base_decoder', 'not recorded')})."
            )


# -- applying -------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def lora_active(unet, loras: Iterable[tuple[DecoderLoRA, float]]):
    """Within the block, `unet`'s targeted Linear layers add strength·alpha/rank·B(A(x)); restored on exit."""
    modules = dict(unet.named_modules())
    handles = []
    try:
        for lora, strength in loras:
            if strength == 0:
                continue
            scale = float(strength) * lora.scale
            for module_name in lora.layers:
                module = modules[module_name]
                handles.append(module.register_forward_hook(_make_hook(lora, module_name, scale)))
        yield unet
    finally:
        for handle in handles:
            handle.remove()


def _make_hook(lora: DecoderLoRA, module_name: str, scale: float):
    def hook(module, args, output):
        x = args[0]
        a, b = lora.weights_for(module.weight.device, x.dtype)[module_name]
        return output + scale * torch.nn.functional.linear(torch.nn.functional.linear(x, a), b)

    return hook


class LoRAUNet:
    """The base UNet with LoRAs on while it is called; every attribute (config, dtype, device, to…) is the base's."""

    def __init__(self, base, loras: tuple[tuple[DecoderLoRA, float], ...]):
        object.__setattr__(self, "base", base)
        object.__setattr__(self, "loras", tuple(loras))

    def __call__(self, *args, **kwargs):
        with lora_active(self.base, self.loras):
            return self.base(*args, **kwargs)

    forward = __call__

    def __getattr__(self, name: str) -> Any:
        return getattr(self.base, name)

    def __repr__(self) -> str:
        parts = ", ".join(f"{Path(l.path).name}@{s:g}" for l, s in self.loras)
        return f"LoRAUNet({type(self.base).__name__}, {parts})"


def base_decoder(decoder: KandinskyDecoder) -> KandinskyDecoder:
    """The decoder without any applied LoRA (the same objects; nothing is copied)."""
    if isinstance(decoder.unet, LoRAUNet):
        return replace(decoder, unet=decoder.unet.base, source=decoder.source.split(" + LoRA ")[0])
    return decoder


remove_decoder_lora = base_decoder


def decoder_loras(decoder: KandinskyDecoder) -> tuple[tuple[DecoderLoRA, float], ...]:
    return decoder.unet.loras if isinstance(decoder.unet, LoRAUNet) else ()


def _check_strength(strength) -> float:
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not torch.isfinite(torch.tensor(float(strength))):
        raise InputError(f"LoRA strength must be a finite number (0 = off, 1 = as trained); got {strength!r}.")
    return float(strength)


def apply_decoder_lora(decoder: KandinskyDecoder, lora: str | os.PathLike | DecoderLoRA, strength: float = 1.0
                       ) -> KandinskyDecoder:
    """A new decoder that decodes with `lora` (a file or a loaded `DecoderLoRA`) at `strength`, sharing (never
    copying, never changing) `decoder`'s UNet and MoVQ. Chainable: applying to a LoRA decoder adds another LoRA.
    `decoder` itself keeps decoding as before. `remove_decoder_lora(result)` gives the base decoder back."""
    strength = _check_strength(strength)
    if not isinstance(lora, DecoderLoRA):
        lora = load_decoder_lora(lora)
    base = base_decoder(decoder)
    check_lora_fits(lora, base.unet)
    loras = decoder_loras(decoder) + ((lora, strength),)
    label = ", ".join(f"{Path(l.path).name}@{s:g}" for l, s in loras)
    return replace(base, unet=LoRAUNet(base.unet, loras), source=f"{base.source} + LoRA {label}")


def lora_metadata(**values) -> dict[str, str]:
    """Safetensors metadata (str → str) for a decoder LoRA file; lists/dicts as JSON."""
    out = {"format": "pt", "format_tag": FORMAT_TAG}
    for key, value in values.items():
        out[key] = value if isinstance(value, str) else json.dumps(value, sort_keys=True, ensure_ascii=False)
    return out
