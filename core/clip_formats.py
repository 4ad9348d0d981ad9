"""OpenCLIP ViT-bigG/14 from the files users already have: each tower (text, vision) from its own source.

Sources, for either tower:

- a single `.safetensors` with transformers keys (`text_model.*` + `text_projection.weight`,
  `vision_model.*` + `visual_projection.weight`): ComfyUI's clip_g / clip_vision_g files;
- a single file with OpenCLIP keys (`visual.*`, `transformer.*`, `token_embedding.weight`, ...), one
  tower or both;
- a checkpoint holding a tower under a prefix, e.g. an SDXL checkpoint's text tower under
  `conditioner.embedders.1.model.` (only that tower's tensors are read, one by one);
- a transformers folder (`config.json` + `model.safetensors` / `model.fp16.safetensors` / shards with an
  index; `.bin` only through `torch.load(weights_only=True)`), a CLIPModel folder giving both towers;
- a diffusers pipeline folder (`model_index.json`) whose `text_encoder_2/`, `text_encoder/` or
  `image_encoder/` is a bigG tower (SDXL, the Kandinsky 2.2 prior);
- the OpenCLIP folder (`open_clip_config.json` + `open_clip_model.safetensors` / `.bin`).

Heads are not stored in the weights: a file without a config is bigG when its shapes say so (text width 1280
→ 20 heads, vision width 1664 → 16 heads of 104); other widths (tiny test models) take a JSON config from the
safetensors metadata key `config`, else head dim 64. Layer counts come from the keys.

Loading builds the open_clip model on the `meta` device and fills it one tensor at a time in the target
dtype and device, reading each tensor lazily (safetensors handles are reopened every few hundred MB so that
the file pages read so far leave the process), so a 3.7 GB fp16 file never becomes a second full copy.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch
from safetensors import safe_open

from .errors import ModelFileError
from .loading import CheckCache, read_json, resolve_dtype

log = logging.getLogger("lambda_eclipse")

CLIP_DOWNLOAD = "https://huggingface.co/laion/CLIP-ViT-bigG-14-laion2B-39B-b160k"
BIGG_TEXT_WIDTH = 1280
BIGG_VISION_WIDTH = 1664
BIGG_HEADS = {"text": {BIGG_TEXT_WIDTH: 20}, "vision": {BIGG_VISION_WIDTH: 16}}
SDXL_TEXT_PREFIX = "conditioner.embedders.1.model."
CONFIG_METADATA_KEY = "config"
SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
TORCH_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
OPENCLIP_CONFIG = "open_clip_config.json"
OPENCLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "open_clip_pytorch_model.safetensors")
DIFFUSERS_TOWERS = ("text_encoder_2", "text_encoder", "image_encoder")
REOPEN_BYTES = 32 << 20  # reopen safetensors handles after this much was read (their file pages leave the process)

NEEDED = (
    "λ-ECLIPSE needs OpenCLIP ViT-bigG/14: its text tower (SDXL's second text encoder: clip_g / text_encoder_2, "
    "or an SDXL checkpoint itself) and its vision tower (ComfyUI's clip_vision_g.safetensors), or the OpenCLIP "
    f"folder (open_clip_config.json + open_clip_model.safetensors) from {CLIP_DOWNLOAD}."
)
OTHER_WIDTHS = {
    "text": {
        512: "a CLIP ViT-B text encoder (width 512)",
        768: "the CLIP ViT-L/14 text encoder (clip_l, width 768: SD1.x, the first text encoder of SDXL, SD3, Flux)",
        1024: "the OpenCLIP ViT-H/14 text encoder (width 1024: SD2.x)",
    },
    "vision": {
        768: "a CLIP ViT-B image encoder (width 768)",
        1024: "the CLIP ViT-L/14 image encoder (clip_vision_l, width 1024)",
        1280: "the CLIP ViT-H/14 image encoder (clip_vision_h, width 1280: IP-Adapter for SD1.5, Wan)",
        1408: "a ViT-g/14 image encoder (width 1408)",
    },
}
_ST_DTYPES = {
    "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}
_BLOCK_OPENCLIP = (
    "ln_1.weight", "ln_1.bias", "attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight",
    "attn.out_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight",
    "mlp.c_proj.bias",
)
_BLOCK_HF = {
    "ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
}
_PLAIN_MODEL_CFG = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_scale"}
_PLAIN_VISION_CFG = {"image_size", "layers", "width", "head_width", "mlp_ratio", "patch_size", "patch_dropout"}
_PLAIN_TEXT_CFG = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio", "hf_tokenizer_name",
                   "tokenizer_kwargs", "tokenizer_mode"}


# ---------------------------------------------------------------------------------------------------------
# Public results
# ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ClipSourceInfo:
    """What `sniff_clip` found in a file or folder (from headers and configs only)."""

    towers: frozenset  # subset of {"text", "vision"}: the bigG(-like) towers it holds
    format: str  # transformers-file | openclip-file | sdxl-checkpoint | checkpoint | transformers-folder | openclip-folder | diffusers-folder
    text_width: int | None
    vision_width: int | None
    dtype: str | None  # storage dtype of the tower weights: fp16 / bf16 / fp32
    description: str


# ---------------------------------------------------------------------------------------------------------
# Tensor stores: names, shapes and dtypes from headers; tensors read lazily, one at a time
# ---------------------------------------------------------------------------------------------------------

@dataclass
class _Entry:
    file: Path
    dtype: torch.dtype | None
    shape: tuple


def _is_safetensors(path: Path) -> bool:
    return path.suffix.lower() in SAFETENSORS_SUFFIXES


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, tuple[torch.dtype | None, tuple]], dict[str, str]]:
    """({name: (dtype, shape)}, metadata) from a .safetensors header, without touching the tensor data."""
    path = Path(path)
    from .fsio import require_regular_file

    require_regular_file(path, "weight file", ModelFileError)
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                raise ValueError("the file is shorter than a header")
            (length,) = struct.unpack("<Q", head)
            if length < 2 or length > min(size - 8, 200_000_000):
                raise ValueError("the header length is not plausible")
            header = json.loads(handle.read(length))
        metadata = header.pop("__metadata__", None) or {}
        end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
        if 8 + length + end > size:
            raise ValueError(f"the file is {size} bytes but its header describes {8 + length + end}")
        entries = {k: (_ST_DTYPES.get(v["dtype"]), tuple(int(s) for s in v["shape"])) for k, v in header.items()}
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise ModelFileError(
            f"{path.name} is not a readable .safetensors file ({exc}). Re-download it; a partial download is the usual cause."
        ) from exc
    return entries, {str(k): str(v) for k, v in metadata.items()}


class _Store:
    """name → (file, dtype, shape) over one file or several shards; `reader()` reads tensors lazily."""

    def __init__(self, entries: dict[str, _Entry], metadata: dict[str, str] | None = None, tensors=None):
        self.entries = entries
        self.metadata = metadata or {}
        self._tensors = tensors  # in-memory tensors (a state dict given directly)
        self._torch_files: dict[Path, dict] = {}

    @classmethod
    def from_safetensors(cls, files: Iterable[Path], weight_map: dict[str, str] | None = None) -> "_Store":
        entries, metadata = {}, {}
        for file in files:
            header, meta = read_safetensors_header(file)
            metadata = metadata or meta
            for key, (dtype, shape) in header.items():
                if weight_map is None or weight_map.get(key) == file.name:
                    entries[key] = _Entry(file, dtype, shape)
        return cls(entries, metadata)

    @classmethod
    def from_torch(cls, files: Iterable[Path]) -> "_Store":
        store = cls({})
        for file in files:
            for key, tensor in store._load_torch(file).items():
                store.entries[key] = _Entry(file, tensor.dtype, tuple(tensor.shape))
        return store

    @classmethod
    def from_state_dict(cls, tensors: dict[str, torch.Tensor]) -> "_Store":
        entries = {k: _Entry(Path("<memory>"), v.dtype, tuple(v.shape)) for k, v in tensors.items()}
        return cls(entries, {}, tensors)

    def _load_torch(self, file: Path) -> dict:
        if file not in self._torch_files:
            from .loading import _unwrap_state_dict, load_plain_tensors

            obj = load_plain_tensors(file)
            state = _unwrap_state_dict(obj, file) if isinstance(obj, dict) else obj
            if not isinstance(state, dict):
                raise ModelFileError(f"{file.name} does not hold a dict of tensors; it cannot be used as weights.")
            self._torch_files[file] = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        return self._torch_files[file]

    def release(self):
        self._torch_files.clear()

    def keys(self):
        return self.entries.keys()

    def __contains__(self, key) -> bool:
        return key in self.entries

    def shape(self, key) -> tuple:
        return self.entries[key].shape

    def numel(self, key) -> int:
        return math.prod(self.entries[key].shape)

    @contextlib.contextmanager
    def reader(self):
        """A `get(key) → tensor` for one stretch of reading; safetensors handles close at the end."""
        with contextlib.ExitStack() as stack:
            handles: dict[Path, object] = {}

            def get(key: str) -> torch.Tensor:
                if self._tensors is not None:
                    return self._tensors[key]
                entry = self.entries[key]
                if not _is_safetensors(entry.file):
                    return self._load_torch(entry.file)[key]
                handle = handles.get(entry.file)
                if handle is None:
                    try:
                        handle = stack.enter_context(safe_open(str(entry.file), framework="pt", device="cpu"))
                    except Exception as exc:
                        raise ModelFileError(f"{entry.file.name} is not a readable .safetensors file ({exc}).") from exc
                    handles[entry.file] = handle
                return handle.get_tensor(key)

            yield get


# ---------------------------------------------------------------------------------------------------------
# Towers: found by their tensors, under any prefix
# ---------------------------------------------------------------------------------------------------------

@dataclass
class _Tower:
    kind: str  # "text" | "vision"
    naming: str  # "transformers" | "openclip"
    prefix: str
    width: int
    layers: int
    mlp: int
    embed: int | None  # projection output size (None: no projection in the file)
    context: int = 0
    vocab: int = 0
    patch: int = 0
    image_size: int = 0
    heads: int = 0
    act: str = "gelu"
    eps: float = 1e-5
    dtype: torch.dtype | None = None
    params: int = 0
    openclip_cfg: dict | None = None  # exact tower cfg from an open_clip config (OpenCLIP folder)

    def where(self) -> str:
        return f" under '{self.prefix}'" if self.prefix else ""


_ANCHORS = (
    ("text", "transformers", "text_model.final_layer_norm.weight"),
    ("vision", "transformers", "vision_model.post_layernorm.weight"),
    ("vision", "openclip", "visual.ln_post.weight"),
    ("text", "openclip", "ln_final.weight"),
)


def _layer_count(keys: Iterable[str], start: str) -> int:
    seen = set()
    for key in keys:
        if key.startswith(start):
            head = key[len(start):].split(".", 1)[0]
            if head.isdigit():
                seen.add(int(head))
    if seen and len(seen) != max(seen) + 1:
        raise ModelFileError(f"The layers under '{start}' are not numbered 0..{max(seen)} (some are missing): the file is incomplete.")
    return len(seen)


def _find_towers(store: _Store) -> list[_Tower]:
    """Every CLIP tower in the store, with its shapes (no config applied yet)."""
    keys = list(store.keys())
    found = []
    for key in keys:
        for kind, naming, anchor in _ANCHORS:
            if not key.endswith(anchor) or (key != anchor and not key[: -len(anchor)].endswith(".")):
                continue
            prefix = key[: -len(anchor)]
            if naming == "openclip" and kind == "text" and prefix + "token_embedding.weight" not in store:
                continue
            try:
                tower = _measure(store, keys, kind, naming, prefix)
            except KeyError:
                continue  # an anchor-like name without the rest of a tower
            if tower is not None:
                found.append(tower)
    return found


def _measure(store: _Store, keys: list[str], kind: str, naming: str, prefix: str) -> _Tower | None:
    shape = store.shape
    if naming == "transformers":
        base = prefix + ("text_model." if kind == "text" else "vision_model.")
        layers = _layer_count(keys, base + "encoder.layers.")
        if layers == 0:
            return None
        width = shape(base + ("final_layer_norm.weight" if kind == "text" else "post_layernorm.weight"))[0]
        mlp = shape(base + "encoder.layers.0.mlp.fc1.weight")[0]
        proj = prefix + ("text_projection.weight" if kind == "text" else "visual_projection.weight")
        embed = shape(proj)[0] if proj in store else None
        if kind == "text":
            vocab = shape(base + "embeddings.token_embedding.weight")[0]
            context = shape(base + "embeddings.position_embedding.weight")[0]
            tower = _Tower(kind, naming, prefix, width, layers, mlp, embed, context=context, vocab=vocab)
        else:
            patch = shape(base + "embeddings.patch_embedding.weight")[-1]
            positions = shape(base + "embeddings.position_embedding.weight")[0]
            tower = _Tower(kind, naming, prefix, width, layers, mlp, embed, patch=patch,
                           image_size=patch * math.isqrt(max(positions - 1, 0)))
        dtype_key = base + "encoder.layers.0.mlp.fc1.weight"
    else:
        base = prefix + ("" if kind == "text" else "visual.")
        if kind == "vision" and any(k.startswith(base + "trunk.") for k in keys):
            return None  # a timm image tower: not this architecture
        layers = _layer_count(keys, base + "transformer.resblocks.")
        if layers == 0:
            return None
        width = shape(base + ("ln_final.weight" if kind == "text" else "ln_post.weight"))[0]
        mlp = shape(base + "transformer.resblocks.0.mlp.c_fc.weight")[0]
        proj = base + ("text_projection" if kind == "text" else "proj")
        embed = shape(proj)[1] if proj in store and len(shape(proj)) == 2 else None
        if kind == "text":
            vocab = shape(base + "token_embedding.weight")[0]
            context = shape(base + "positional_embedding")[0]
            tower = _Tower(kind, naming, prefix, width, layers, mlp, embed, context=context, vocab=vocab)
        else:
            patch = shape(base + "conv1.weight")[-1]
            positions = shape(base + "positional_embedding")[0]
            tower = _Tower(kind, naming, prefix, width, layers, mlp, embed, patch=patch,
                           image_size=patch * math.isqrt(max(positions - 1, 0)))
        dtype_key = base + "transformer.resblocks.0.mlp.c_fc.weight"
    tower.dtype = store.entries[dtype_key].dtype
    return tower


def _hints(config: dict | None) -> dict[str, dict]:
    """{'text': {...}, 'vision': {...}} with heads / act / eps from a transformers or open_clip config."""
    out: dict[str, dict] = {}
    if not isinstance(config, dict):
        return out
    if "model_cfg" in config:
        config = config["model_cfg"]
    if "text_cfg" in config or "vision_cfg" in config:  # open_clip
        act = "quick_gelu" if config.get("quick_gelu") else "gelu"
        text, vision = config.get("text_cfg") or {}, config.get("vision_cfg") or {}
        if text:
            out["text"] = {"heads": text.get("heads", 8), "act": act, "openclip_cfg": text}
        if vision:
            width = vision.get("width", 768)
            out["vision"] = {"heads": width // vision.get("head_width", 64), "act": act, "openclip_cfg": vision}
        if "embed_dim" in config:
            out["embed_dim"] = {"value": config["embed_dim"]}
        return out

    def one(sub: dict) -> dict:
        hint = {}
        if sub.get("num_attention_heads"):
            hint["heads"] = int(sub["num_attention_heads"])
        if sub.get("hidden_act"):
            hint["act"] = str(sub["hidden_act"])
        if sub.get("layer_norm_eps"):
            hint["eps"] = float(sub["layer_norm_eps"])
        return hint

    if "text_config" in config or "vision_config" in config:
        for kind, name in (("text", "text_config"), ("vision", "vision_config")):
            if isinstance(config.get(name), dict):
                out[kind] = one(config[name])
        return out
    model_type = str(config.get("model_type", ""))
    if "vision" in model_type or "patch_size" in config:
        out["vision"] = one(config)
    elif "text" in model_type or "vocab_size" in config:
        out["text"] = one(config)
    return out


def _apply_hints(tower: _Tower, hints: dict[str, dict], what: str):
    hint = hints.get(tower.kind, {})
    heads = hint.get("heads") or BIGG_HEADS[tower.kind].get(tower.width)
    if not heads:
        if tower.width % 64:
            raise ModelFileError(
                f"{what}: a CLIP {tower.kind} tower of width {tower.width} with no config saying its number of attention "
                f"heads (put a JSON config in the safetensors metadata key '{CONFIG_METADATA_KEY}'). {NEEDED}"
            )
        heads = tower.width // 64
    if tower.width % heads:
        raise ModelFileError(f"{what}: {heads} attention heads do not divide the {tower.kind} width {tower.width}.")
    tower.heads = int(heads)
    act = str(hint.get("act", "gelu")).lower()
    if act not in ("gelu", "quick_gelu"):
        raise ModelFileError(f"{what}: activation '{act}' is not supported (CLIP uses gelu or quick_gelu).")
    tower.act = act
    tower.eps = float(hint.get("eps", 1e-5))
    tower.openclip_cfg = hint.get("openclip_cfg")


def _plan(tower: _Tower) -> list[tuple[str, tuple[str, ...], str]]:
    """(open_clip parameter name, source keys, op) for one tower; op is copy, cat (q,k,v) or t (transpose)."""
    p = tower.prefix
    out = []
    if tower.naming == "openclip":
        base = p + ("" if tower.kind == "text" else "visual.")
        for target in _targets(tower):
            local = target if tower.kind == "text" else target[len("visual."):]
            out.append((target, (base + local,), "copy"))
        return out
    if tower.kind == "text":
        b = p + "text_model."
        out += [
            ("token_embedding.weight", (b + "embeddings.token_embedding.weight",), "copy"),
            ("positional_embedding", (b + "embeddings.position_embedding.weight",), "copy"),
        ]
        blocks, tail = "transformer.resblocks.", [
            ("ln_final.weight", (b + "final_layer_norm.weight",), "copy"),
            ("ln_final.bias", (b + "final_layer_norm.bias",), "copy"),
            ("text_projection", (p + "text_projection.weight",), "t"),
        ]
    else:
        b = p + "vision_model."
        out += [
            ("visual.class_embedding", (b + "embeddings.class_embedding",), "copy"),
            ("visual.positional_embedding", (b + "embeddings.position_embedding.weight",), "copy"),
            ("visual.conv1.weight", (b + "embeddings.patch_embedding.weight",), "copy"),
            ("visual.ln_pre.weight", (b + "pre_layrnorm.weight",), "copy"),
            ("visual.ln_pre.bias", (b + "pre_layrnorm.bias",), "copy"),
        ]
        blocks, tail = "visual.transformer.resblocks.", [
            ("visual.ln_post.weight", (b + "post_layernorm.weight",), "copy"),
            ("visual.ln_post.bias", (b + "post_layernorm.bias",), "copy"),
            ("visual.proj", (p + "visual_projection.weight",), "t"),
        ]
    for i in range(tower.layers):
        src = f"{b}encoder.layers.{i}."
        for name in _BLOCK_OPENCLIP:
            target = f"{blocks}{i}.{name}"
            if name.startswith("attn.in_proj_"):
                leaf = name.rsplit("_", 1)[1]
                out.append((target, tuple(f"{src}self_attn.{x}_proj.{leaf}" for x in "qkv"), "cat"))
            else:
                module, leaf = name.rsplit(".", 1)
                out.append((target, (f"{src}{_BLOCK_HF[module]}.{leaf}",), "copy"))
    return out + tail


def _targets(tower: _Tower) -> list[str]:
    if tower.kind == "text":
        head = ["token_embedding.weight", "positional_embedding"]
        blocks = "transformer.resblocks."
        tail = ["ln_final.weight", "ln_final.bias", "text_projection"]
    else:
        head = ["visual.class_embedding", "visual.positional_embedding", "visual.conv1.weight",
                "visual.ln_pre.weight", "visual.ln_pre.bias"]
        blocks = "visual.transformer.resblocks."
        tail = ["visual.ln_post.weight", "visual.ln_post.bias", "visual.proj"]
    return head + [f"{blocks}{i}.{n}" for i in range(tower.layers) for n in _BLOCK_OPENCLIP] + tail


def _planned_shape(store: _Store, sources: tuple[str, ...], op: str) -> tuple:
    shapes = [store.shape(s) for s in sources]
    if op == "cat":
        return (sum(s[0] for s in shapes),) + tuple(shapes[0][1:])
    if op == "t":
        return tuple(reversed(shapes[0]))
    return shapes[0]


def _check_plan(store: _Store, tower: _Tower, what: str) -> int:
    """Every source tensor present; returns the tower's parameter count."""
    missing = [s for _, sources, _ in _plan(tower) for s in sources if s not in store]
    if missing:
        raise ModelFileError(
            f"{what}: the {tower.kind} tower{tower.where()} is incomplete ({len(missing)} tensors missing, e.g. "
            f"{', '.join(missing[:3])}). Re-download the file. {NEEDED}"
        )
    return sum(store.numel(s) for _, sources, _ in _plan(tower) for s in sources)


# ---------------------------------------------------------------------------------------------------------
# What a file is when it is not a bigG tower
# ---------------------------------------------------------------------------------------------------------

def _tower_name(tower: _Tower) -> str:
    other = OTHER_WIDTHS[tower.kind].get(tower.width)
    if other:
        return other
    return f"a CLIP {tower.kind} tower of width {tower.width}"


def _what_is(name: str, store: _Store, towers: list[_Tower]) -> str:
    keys = list(store.keys())
    has = lambda *parts: any(any(p in "." + k for p in parts) for k in keys)  # noqa: E731
    starts = lambda *parts: any(k.startswith(parts) for k in keys)  # noqa: E731
    text_towers = [t for t in towers if t.kind == "text"]
    if starts("cond_stage_model.transformer.") and text_towers:
        return f"{name} is an SD1.x checkpoint: its text encoder is {_tower_name(text_towers[0])}, not ViT-bigG/14."
    if starts("cond_stage_model.model.") and text_towers:
        return f"{name} is an SD2.x checkpoint: its text encoder is {_tower_name(text_towers[0])}, not ViT-bigG/14."
    if towers:
        projectionless = [t for t in towers if t.embed is None and t.width in (BIGG_TEXT_WIDTH, BIGG_VISION_WIDTH)]
        if projectionless:
            t = projectionless[0]
            what = "CLIPTextModel" if t.kind == "text" else "CLIPVisionModel"
            return (f"{name} holds a bigG {t.kind} tower{t.where()} without its projection ({what} without projection); "
                    f"λ-ECLIPSE needs the projected embedding (a ...WithProjection model, e.g. SDXL's text_encoder_2).")
        found = "; ".join(f"{_tower_name(t)}{t.where()}" for t in towers)
        return f"{name} holds {found}: not OpenCLIP ViT-bigG/14."
    if has(".text_model.", ".vision_model.", ".visual.", ".token_embedding.weight"):
        return (f"{name} holds CLIP-like tensors but no complete tower (a partial download, or a model of another "
                f"layout).")
    if has(".encoder.block.", ".shared.weight", ".decoder.block."):
        return f"{name} is a T5 text encoder (t5xxl: SD3, Flux), not a CLIP."
    if has(".embedding_control.", ".proj_to_clip_embeddings."):
        return f"{name} is the λ-ECLIPSE prior, not a CLIP: load it with the prior loader."
    if has(".time_embedding.") and has(".proj_in.") and has(".prd_embedding", ".embedding_proj."):
        return f"{name} is a diffusion prior (e.g. the Kandinsky 2.2 prior transformer), not a CLIP."
    if has(".model.diffusion_model.", ".input_blocks.", ".down_blocks.", ".double_blocks.", ".joint_blocks."):
        return f"{name} is a UNet / diffusion model, not a CLIP."
    if has(".first_stage_model.", ".encoder.down.", ".decoder.up.", ".quant_conv.", ".quantize.", ".encoder.down_blocks."):
        return f"{name} is a VAE / MoVQ image autoencoder, not a CLIP."
    if has(".model.layers.", ".embed_tokens."):
        return f"{name} is a language-model text encoder (Llama/Qwen/Gemma-like), not a CLIP."
    return f"{name} is not a CLIP (no text_model.* / vision_model.* / visual.* / token_embedding tensors)."


def _refuse(name: str, store: _Store, towers: list[_Tower]) -> ModelFileError:
    return ModelFileError(f"{_what_is(name, store, towers)} {NEEDED}")


def _select(towers: list[_Tower], kind: str) -> _Tower | None:
    """The bigG(-like) tower of this kind: known other CLIPs and towers without projection are left out."""
    usable = [t for t in towers if t.kind == kind and t.embed is not None and t.width not in OTHER_WIDTHS[kind]]
    bigg = [t for t in usable if t.width == (BIGG_TEXT_WIDTH if kind == "text" else BIGG_VISION_WIDTH)]
    pick = bigg or usable
    if len(pick) > 1:
        log.info("Several CLIP %s towers in one file (%s); using the first.", kind, ", ".join(repr(t.prefix) for t in pick))
    return pick[0] if pick else None


# ---------------------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------------------

@dataclass
class ClipSource:
    """One file or folder resolved to its towers; `store` reads the tensors (nothing is read before loading)."""

    path: Path
    format: str
    towers: dict[str, _Tower]
    store: _Store | None
    description: str
    preprocess: dict = field(default_factory=dict)  # image_size / mean / std when the source says so
    tokenizer: str | None = None  # open_clip tokenizer name (None: the bundled bigG tokenizer)
    model_cfg: dict | None = None  # an open_clip model_cfg that is not plain CLIP (loaded by open_clip itself)
    parts: dict[str, "ClipSource"] = field(default_factory=dict)  # diffusers folder: tower → sub-folder source

    def for_tower(self, kind: str) -> "ClipSource":
        return self.parts.get(kind, self)

    def dtype_name(self) -> str | None:
        dtypes = [t.dtype for t in self.towers.values() if t.dtype is not None]
        return _DTYPE_NAMES.get(dtypes[0], str(dtypes[0]).replace("torch.", "")) if dtypes else None


def _file_source(path: Path) -> ClipSource:
    if _is_safetensors(path):
        store = _Store.from_safetensors([path])
    elif path.suffix.lower() in TORCH_SUFFIXES:
        store = _Store.from_torch([path])
    else:
        raise ModelFileError(
            f"{path.name}: unsupported file type '{path.suffix or '(none)'}'. Use a .safetensors file "
            f"(or .bin/.pt/.ckpt plain weights). {NEEDED}"
        )
    config = None
    raw = store.metadata.get(CONFIG_METADATA_KEY)
    if raw:
        try:
            config = json.loads(raw)
        except json.JSONDecodeError:
            config = None
    return _source_from_store(path, store, _hints(config), folder_format=None)


def _source_from_store(path: Path, store: _Store, hints: dict, folder_format: str | None) -> ClipSource:
    found = _find_towers(store)
    towers = {}
    for kind in ("text", "vision"):
        tower = _select(found, kind)
        if tower is not None:
            _apply_hints(tower, hints, path.name)
            tower.params = _check_plan(store, tower, path.name)
            towers[kind] = tower
    if not towers:
        raise _refuse(path.name, store, found)
    embed = hints.get("embed_dim", {}).get("value")
    if embed is not None and any(t.embed != embed for t in towers.values()):
        raise ModelFileError(f"{path.name}: the projections do not match the config's embed_dim {embed}.")
    naming = {t.naming for t in towers.values()}
    prefixes = {t.prefix for t in towers.values()}
    if folder_format:
        fmt = folder_format
    elif prefixes == {""}:
        fmt = "openclip-file" if naming == {"openclip"} else "transformers-file"
    else:
        fmt = "sdxl-checkpoint" if any(p.startswith("conditioner.embedders.") for p in prefixes) else "checkpoint"
    source = ClipSource(path, fmt, towers, store, "")
    source.description = _describe(source)
    return source


def _describe(source: ClipSource) -> str:
    parts = []
    for kind, t in source.towers.items():
        bigg = t.width == (BIGG_TEXT_WIDTH if kind == "text" else BIGG_VISION_WIDTH)
        name = "ViT-bigG/14" if bigg else f"CLIP (width {t.width})"
        dtype = _DTYPE_NAMES.get(t.dtype, str(t.dtype).replace("torch.", ""))
        params = f", {_count(t.params)} parameters" if t.params else ""
        parts.append(f"{name} {kind} tower{t.where()} ({t.naming} keys, {dtype}{params})")
    what = {"sdxl-checkpoint": "SDXL checkpoint", "checkpoint": "checkpoint", "transformers-folder": "transformers folder",
            "openclip-folder": "OpenCLIP folder", "diffusers-folder": "diffusers folder"}.get(source.format, "file")
    text = f"{source.path.name}: {what} with the " + " and the ".join(parts)
    if source.format in ("sdxl-checkpoint", "checkpoint"):
        text += "; its other tensors are not read"
    return text


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def _hf_weight_files(folder: Path, prefer_half: bool) -> tuple[list[Path], dict | None] | None:
    """The weight files of a transformers folder: (files, weight_map or None). .safetensors before .bin; the
    fp16 variant first when the target is half precision, the full-precision one first otherwise."""
    full_st, half_st = ["model.safetensors", "model.safetensors.index.json"], [
        "model.fp16.safetensors", "model.safetensors.index.fp16.json", "model.fp16.safetensors.index.json"]
    full_bin, half_bin = ["pytorch_model.bin", "pytorch_model.bin.index.json"], [
        "pytorch_model.fp16.bin", "pytorch_model.bin.index.fp16.json"]
    order = (half_st + full_st + half_bin + full_bin) if prefer_half else (full_st + half_st + full_bin + half_bin)
    for name in order:
        candidate = folder / name
        if not candidate.is_file():
            continue
        if not name.endswith(".json"):
            return [candidate], None
        weight_map = read_json(candidate).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelFileError(f"{candidate} has no weight_map; the shard index is damaged.")
        files = [folder / f for f in dict.fromkeys(weight_map.values())]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise ModelFileError(f"{folder}: the shards {', '.join(absent)} named in {name} are missing. Download them too.")
        return files, weight_map
    return None


def _hf_folder_source(folder: Path, prefer_half: bool) -> ClipSource:
    config = read_json(folder / "config.json")
    weights = _hf_weight_files(folder, prefer_half)
    if weights is None:
        raise ModelFileError(
            f"{folder} has a config.json but no weights (model.safetensors, model.fp16.safetensors, a sharded "
            f"model.safetensors.index.json, or pytorch_model.bin). Download them into the folder."
        )
    files, weight_map = weights
    if _is_safetensors(files[0]):
        store = _Store.from_safetensors(files, weight_map)
    else:
        store = _Store.from_torch(files)
    source = _source_from_store(folder, store, _hints(config), folder_format="transformers-folder")
    pre = folder / "preprocessor_config.json"
    if pre.is_file():
        source.preprocess = _hf_preprocess(read_json(pre))
    return source


def _hf_preprocess(cfg: dict) -> dict:
    out = {}
    size = cfg.get("crop_size", cfg.get("size"))
    if isinstance(size, dict):
        size = size.get("height", size.get("shortest_edge"))
    if isinstance(size, int):
        out["image_size"] = size
    if isinstance(cfg.get("image_mean"), list) and isinstance(cfg.get("image_std"), list):
        out["mean"], out["std"] = tuple(cfg["image_mean"]), tuple(cfg["image_std"])
    return out


def _openclip_folder_source(folder: Path) -> ClipSource:
    config_path = folder / OPENCLIP_CONFIG
    weights = next((folder / n for n in OPENCLIP_WEIGHTS if (folder / n).is_file()), None)
    if weights is None:
        raise ModelFileError(
            f"No CLIP weights in {folder}: expected {' or '.join(OPENCLIP_WEIGHTS)} (and {OPENCLIP_CONFIG}). "
            f"Download them from {CLIP_DOWNLOAD}."
        )
    preprocess, hints, tokenizer = {}, {}, None
    if config_path.is_file():
        config = read_json(config_path)
        if "model_cfg" not in config:
            raise ModelFileError(f"{config_path} has no 'model_cfg'; it is not an open_clip config.")
        cfg = config["model_cfg"]
        tokenizer = "local-dir:" + str(folder)
        pre = config.get("preprocess_cfg", {}) or {}
        size = pre.get("size", (cfg.get("vision_cfg") or {}).get("image_size", 224))
        preprocess = {"image_size": int(size[0] if isinstance(size, (list, tuple)) else size)}
        if "mean" in pre:
            preprocess["mean"] = tuple(pre["mean"])
        if "std" in pre:
            preprocess["std"] = tuple(pre["std"])
        plain = (set(cfg) <= _PLAIN_MODEL_CFG and set(cfg.get("vision_cfg") or {}) <= _PLAIN_VISION_CFG
                 and set(cfg.get("text_cfg") or {}) <= _PLAIN_TEXT_CFG)
        if not plain:
            # Not a plain CLIP (hf text tower, timm trunk, CoCa...): open_clip builds and loads it itself.
            return ClipSource(folder, "openclip-folder", {}, None, f"{folder.name}: OpenCLIP folder (open_clip's own loader)",
                              preprocess, tokenizer, model_cfg=cfg)
        hints = _hints(config)
    store = _Store.from_safetensors([weights]) if _is_safetensors(weights) else _Store.from_torch([weights])
    source = _source_from_store(folder, store, hints, folder_format="openclip-folder")
    source.preprocess, source.tokenizer = preprocess, tokenizer
    return source


def _diffusers_folder_source(folder: Path, prefer_half: bool) -> ClipSource:
    parts: dict[str, ClipSource] = {}
    seen = []
    for sub in DIFFUSERS_TOWERS:
        if not (folder / sub / "config.json").is_file():
            continue
        try:
            source = _hf_folder_source(folder / sub, prefer_half)
        except ModelFileError as exc:
            seen.append(f"{sub}/: {exc}")
            continue
        for kind in source.towers:
            parts.setdefault(kind, source)
    if not parts:
        inside = " ".join(seen) or "no text_encoder/, text_encoder_2/ or image_encoder/ with a config.json"
        raise ModelFileError(f"{folder.name} is a diffusers folder without a bigG text or image encoder ({inside}). {NEEDED}")
    towers = {kind: src.towers[kind] for kind, src in parts.items()}
    desc = f"{folder.name}: diffusers folder with " + " and ".join(
        f"the {kind} tower in {src.path.name}/ ({src.dtype_name()})" for kind, src in parts.items())
    return ClipSource(folder, "diffusers-folder", towers, None, desc, parts=parts)


def open_source(path: str | os.PathLike, prefer_half: bool = False) -> ClipSource:
    """Resolve a file or folder to its bigG towers (headers and configs only; no tensor data is read)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelFileError(f"CLIP not found: {path}. {NEEDED}")
    if path.is_dir():
        if (path / OPENCLIP_CONFIG).is_file() or any((path / n).is_file() for n in OPENCLIP_WEIGHTS):
            return _openclip_folder_source(path)
        if (path / "config.json").is_file():
            return _hf_folder_source(path, prefer_half)
        if (path / "model_index.json").is_file():
            return _diffusers_folder_source(path, prefer_half)
        raise ModelFileError(
            f"No CLIP weights in {path}: expected a transformers folder (config.json + model.safetensors) or an OpenCLIP "
            f"folder ({OPENCLIP_CONFIG} + {' or '.join(OPENCLIP_WEIGHTS)}). {NEEDED}"
        )
    return _file_source(path)


# ---------------------------------------------------------------------------------------------------------
# sniff_clip: header-only, cached by file signature
# ---------------------------------------------------------------------------------------------------------

_SNIFF_CACHE = CheckCache()


def _signature(path: Path) -> tuple:
    resolved = path.resolve()
    st = resolved.stat()
    sig = [str(resolved), st.st_mtime_ns, st.st_size]
    if resolved.is_dir():
        for sub in ("", *DIFFUSERS_TOWERS):
            folder = resolved / sub
            if folder.is_dir():
                for entry in sorted(os.scandir(folder), key=lambda e: e.name):
                    if entry.is_file():
                        est = entry.stat()
                        sig.append((sub, entry.name, est.st_mtime_ns, est.st_size))
    return tuple(sig)


def sniff_clip(path: str | os.PathLike) -> ClipSourceInfo:
    """What bigG towers a file or folder holds, from headers and configs only (fast; cached by file signature).

    Raises ModelFileError saying what the file is (t5xxl, clip_l, a UNet, ...) and what is needed instead when it
    holds no tower of a bigG-like CLIP.
    """
    path = Path(path).expanduser()
    try:
        key = _signature(path)
    except OSError as exc:
        raise ModelFileError(f"CLIP not found: {path} ({exc.strerror or exc}). {NEEDED}") from exc
    return _SNIFF_CACHE.get(key, lambda: _sniff(path))


def _sniff(path: Path) -> ClipSourceInfo:
    source = open_source(path)
    if source.model_cfg is not None:  # an exotic OpenCLIP folder: trust its config
        cfg = source.model_cfg
        return ClipSourceInfo(frozenset({"text", "vision"}), source.format, (cfg.get("text_cfg") or {}).get("width"),
                              (cfg.get("vision_cfg") or {}).get("width"), None, source.description)
    if source.store is not None:
        source.store.release()
    text, vision = source.towers.get("text"), source.towers.get("vision")
    return ClipSourceInfo(
        towers=frozenset(source.towers),
        format=source.format,
        text_width=text.width if text else None,
        vision_width=vision.width if vision else None,
        dtype=source.dtype_name(),
        description=source.description,
    )


def clear_sniff_cache():
    _SNIFF_CACHE.clear()


# ---------------------------------------------------------------------------------------------------------
# Building the model on meta and filling it one tensor at a time
# ---------------------------------------------------------------------------------------------------------

_PLACEHOLDER = {
    "text": {"context_length": 2, "vocab_size": 2, "width": 64, "heads": 1, "layers": 1},
    "vision": {"image_size": 14, "patch_size": 14, "width": 64, "head_width": 64, "layers": 1},
}


def _tower_cfg(tower: _Tower) -> dict:
    if tower.openclip_cfg:
        return dict(tower.openclip_cfg)
    ratio = (tower.mlp + 0.5) / tower.width  # int(width * ratio) == mlp exactly
    if tower.kind == "text":
        return {"context_length": tower.context, "vocab_size": tower.vocab, "width": tower.width,
                "heads": tower.heads, "layers": tower.layers, "mlp_ratio": ratio}
    return {"image_size": tower.image_size, "patch_size": tower.patch, "width": tower.width,
            "head_width": tower.width // tower.heads, "layers": tower.layers, "mlp_ratio": ratio}


def _set_tensor(model: torch.nn.Module, name: str, tensor: torch.Tensor):
    owner, _, leaf = name.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    if leaf in module._parameters:
        module._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=False)
    elif leaf in module._buffers:
        module._buffers[leaf] = tensor
    else:
        raise ModelFileError(f"open_clip's model has no tensor '{name}'; this open_clip version is not supported.")


def _shares_memory(out: torch.Tensor, sources: list[torch.Tensor]) -> bool:
    ptr = out.untyped_storage().data_ptr()
    return any(s.device == out.device and s.untyped_storage().data_ptr() == ptr for s in sources)


def _fill(model, source: ClipSource, tower: _Tower, device: torch.device, dtype: torch.dtype) -> int:
    """Read the tower's tensors one by one into `model` (already on meta). Returns the bytes written."""
    store = source.store
    plan = _plan(tower)
    expected = {n for n, _ in model.named_parameters() if (n.startswith("visual.") == (tower.kind == "vision"))
                and n not in ("logit_scale", "logit_bias")}
    if expected != {t for t, _, _ in plan}:
        raise ModelFileError(
            f"{source.path.name}: open_clip's model does not have the {tower.kind} tower's parameters "
            f"(differences: {sorted(expected ^ {t for t, _, _ in plan})[:4]}). This open_clip version is not supported."
        )
    written = 0
    stack = contextlib.ExitStack()
    get, since_open = None, 0
    try:
        for target, keys, op in plan:
            if get is None or since_open > REOPEN_BYTES:
                stack.close()
                get, since_open = stack.enter_context(store.reader()), 0
            parts = [get(k) for k in keys]
            since_open += sum(p.numel() * p.element_size() for p in parts)
            if op == "cat":
                out = torch.cat([p.to(device=device, dtype=dtype) for p in parts])
            elif op == "t":
                out = parts[0].to(device=device, dtype=dtype).t()
            else:
                out = parts[0].to(device=device, dtype=dtype)
            out = out.contiguous()
            if _shares_memory(out, parts):
                out = out.clone()  # never keep a view of the file's pages
            want = tuple(model.get_parameter(target).shape)
            if tuple(out.shape) != want:
                raise ModelFileError(
                    f"{source.path.name}: {keys[0]} gives {target} the shape {tuple(out.shape)}, the model expects {want}. "
                    f"The file does not match its config. {NEEDED}"
                )
            _set_tensor(model, target, out)
            written += out.numel() * out.element_size()
            del parts, out
    finally:
        stack.close()
        store.release()
    return written


def build_clip_model(text: ClipSource | None, vision: ClipSource | None, device="cpu", dtype="fp32"):
    """open_clip.CLIP with the text tower of `text` and the vision tower of `vision` (either may be None:
    that tower is then absent, `model.visual` / `model.transformer` is None). Returns (model, weight bytes)."""
    import open_clip

    dtype = resolve_dtype(dtype)
    device = torch.device(device)
    t = text.for_tower("text").towers["text"] if text is not None else None
    v = vision.for_tower("vision").towers["vision"] if vision is not None else None
    if t is None and v is None:
        raise ModelFileError(f"No CLIP tower to load. {NEEDED}")
    if t is not None and v is not None:
        if t.embed != v.embed:
            raise ModelFileError(
                f"The text tower ({text.path.name}) projects to {t.embed} values but the vision tower ({vision.path.name}) "
                f"to {v.embed}: they are not the same CLIP. {NEEDED}"
            )
        if t.act != v.act:
            raise ModelFileError(f"The text tower uses {t.act} but the vision tower {v.act}: not the same CLIP. {NEEDED}")
    embed = (t or v).embed
    act = (t or v).act
    text_cfg = _tower_cfg(t) if t else dict(_PLACEHOLDER["text"])
    vision_cfg = _tower_cfg(v) if v else dict(_PLACEHOLDER["vision"])
    with torch.device("meta"):
        model = open_clip.CLIP(embed_dim=embed, vision_cfg=vision_cfg, text_cfg=text_cfg, quick_gelu=act == "quick_gelu")
    if v is None:
        model.visual = None
    if t is None:
        for name in ("transformer", "token_embedding", "ln_final"):
            setattr(model, name, None)
        model.positional_embedding = None
        model.text_projection = None
        model.attn_mask = None
    written = 0
    if t is not None:
        written += _fill(model, text.for_tower("text"), t, device, dtype)
        ctx = model.positional_embedding.shape[0]
        model.attn_mask = torch.full((ctx, ctx), float("-inf"), device=device).triu_(1).to(dtype)
        _set_eps([model.transformer, model.ln_final], t.eps)
    if v is not None:
        written += _fill(model, vision.for_tower("vision"), v, device, dtype)
        _set_eps([model.visual], v.eps)
    model.logit_scale = torch.nn.Parameter(torch.full((), math.log(1 / 0.07), device=device, dtype=dtype), requires_grad=False)
    left = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if left:
        raise ModelFileError(f"CLIP tensors were not filled: {left[:4]} (a bug; please report it).")
    model.embed_dim = embed
    return model.eval().requires_grad_(False), written


def _set_eps(modules, eps: float):
    if eps == 1e-5:
        return
    for root in modules:
        for module in root.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.eps = eps


# ---------------------------------------------------------------------------------------------------------
# The inverse map (open_clip → transformers names): for writing test files, benchmarks and conversions
# ---------------------------------------------------------------------------------------------------------

def openclip_to_transformers(state_dict: dict[str, torch.Tensor], towers: Iterable[str] = ("text", "vision")) -> dict[str, torch.Tensor]:
    """transformers-key tensors (text_model.* + text_projection.weight, vision_model.* + visual_projection.weight)
    of the chosen towers of an open_clip state dict: q/k/v split from in_proj, projections transposed."""
    store = _Store.from_state_dict(state_dict)
    found = [t for t in _find_towers(store) if t.naming == "openclip"]
    out: dict[str, torch.Tensor] = {}
    for kind in towers:
        tower = next((t for t in found if t.kind == kind), None)
        if tower is None:
            raise ModelFileError(f"The state dict has no open_clip {kind} tower.")
        own = {target: sources[0] for target, sources, _ in _plan(tower)}
        hf = _Tower(kind, "transformers", "", tower.width, tower.layers, tower.mlp, tower.embed)
        for target, sources, op in _plan(hf):
            tensor = state_dict[own[target]]
            if op == "cat":
                for key, piece in zip(sources, tensor.chunk(3, dim=0)):
                    out[key] = piece.contiguous().clone()
            elif op == "t":
                out[sources[0]] = tensor.t().contiguous().clone()
            else:
                out[sources[0]] = tensor.contiguous().clone()
    return out


def transformers_config(tower: str, state_dict: dict[str, torch.Tensor], heads: int, act: str = "gelu") -> dict:
    """A transformers CLIPTextConfig / CLIPVisionConfig-like dict for a transformers-key tower (for metadata)."""
    store = _Store.from_state_dict(state_dict)
    t = next(x for x in _find_towers(store) if x.kind == tower and x.naming == "transformers")
    common = {"hidden_size": t.width, "intermediate_size": t.mlp, "num_attention_heads": heads,
              "num_hidden_layers": t.layers, "projection_dim": t.embed, "hidden_act": act, "layer_norm_eps": 1e-5}
    if tower == "text":
        return {"model_type": "clip_text_model", "architectures": ["CLIPTextModelWithProjection"], **common,
                "vocab_size": t.vocab, "max_position_embeddings": t.context,
                "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 0}
    return {"model_type": "clip_vision_model", "architectures": ["CLIPVisionModelWithProjection"], **common,
            "image_size": t.image_size, "patch_size": t.patch, "num_channels": 3}
