"""Loading the Kandinsky 2.2 decoder: its diffusers folder, or one UNet file + one MoVQ file.

Single files are what ComfyUI users keep in models/diffusion_models (or models/unet) and models/vae. Their
configs are the published ones shipped in core/configs/, unless the file carries its own JSON config in the
safetensors metadata key `config`. Models are built with empty (meta) weights and the tensors are read one
by one, straight in the target dtype, so loading never holds a second copy of the weights.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from .decoder import DECODER_URL, KandinskyDecoder, _scheduler_from_config
from .errors import InputError, MissingModelsError, ModelFileError, NonFiniteError
from .loading import read_json, resolve_dtype, save_file_atomic

log = logging.getLogger("lambda_eclipse")

CONFIG_DIR = Path(__file__).resolve().parent / "configs" / "kandinsky-2-2-decoder"
_CONFIG_FILES = {"unet": "unet_config.json", "movq": "movq_config.json", "scheduler": "scheduler_config.json"}
EXPECTED_FILES = (
    "model_index.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "movq/config.json",
    "movq/diffusion_pytorch_model.safetensors",
    "scheduler/scheduler_config.json",
)
SUBFOLDERS = ("unet", "movq", "scheduler")
# model_index.json classes whose unet/movq/scheduler are the text-to-image decoder.
DECODER_PIPELINES = {
    "KandinskyV22Pipeline",
    "KandinskyV22Img2ImgPipeline",
    "KandinskyV22CombinedPipeline",
    "KandinskyV22Img2ImgCombinedPipeline",
}
METADATA_CONFIG = "config"
METADATA_SCHEDULER = "scheduler_config"
_WEIGHT_STEM = "diffusion_pytorch_model"
_MAX_HEADER = 100 * 1024 * 1024
# Reopen the file after this much was read, so the memory-mapped pages already copied leave the resident set.
_REOPEN_BYTES = 64 * 1024 * 1024

UNET_FILE = f"unet/diffusion_pytorch_model.safetensors (or .fp16.safetensors) of {DECODER_URL}"
MOVQ_FILE = f"movq/diffusion_pytorch_model.safetensors of {DECODER_URL}"
UNET_FOLDERS = "models/diffusion_models (or models/unet)"
MOVQ_FOLDERS = "models/vae"
_PICK = f"The UNet slot takes {UNET_FILE} (in {UNET_FOLDERS}); the MoVQ slot takes {MOVQ_FILE} (in {MOVQ_FOLDERS})."


def shipped_config(part: str) -> dict:
    """The published kandinsky-2-2-decoder config of "unet", "movq" or "scheduler" (a fresh copy)."""
    if part not in _CONFIG_FILES:
        raise ValueError(f"part must be one of {sorted(_CONFIG_FILES)}; got {part!r}")
    return read_json(CONFIG_DIR / _CONFIG_FILES[part])


# -- safetensors headers -----------------------------------------------------------------------------

@dataclass(frozen=True)
class _Header:
    tensors: Mapping[str, tuple[str, tuple[int, ...]]]  # name → (dtype, shape)
    metadata: Mapping[str, str]


def _file_key(path: Path) -> tuple[str, int, int]:
    from .fsio import require_regular_file

    require_regular_file(path, "weight file", ModelFileError)
    resolved = path.resolve()
    stat = resolved.stat()
    return str(resolved), stat.st_mtime_ns, stat.st_size


@functools.lru_cache(maxsize=512)
def _header_cached(resolved: str, mtime_ns: int, size: int) -> _Header | str:
    """The parsed header, or the reason it is unreadable (errors are cached too: menus list files often)."""
    try:
        with open(resolved, "rb") as handle:
            raw = handle.read(8)
            if len(raw) < 8:
                return "the file is shorter than a safetensors header"
            (length,) = struct.unpack("<Q", raw)
            if length > min(_MAX_HEADER, size - 8):
                return f"its header length ({length} bytes) does not fit the file ({size} bytes)"
            header = json.loads(handle.read(length))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return str(exc)
    if not isinstance(header, dict):
        return "its header is not a JSON object"
    metadata = header.pop("__metadata__", None) or {}
    tensors = {}
    end = 0
    for name, info in header.items():
        try:
            tensors[name] = (str(info["dtype"]), tuple(int(d) for d in info["shape"]))
            end = max(end, int(info["data_offsets"][1]))
        except (KeyError, TypeError, ValueError, IndexError):
            return f"its header entry {name!r} is malformed"
    if 8 + length + end > size:
        return f"it is truncated ({size} bytes; the header promises {8 + length + end})"
    return _Header(tensors, {str(k): str(v) for k, v in dict(metadata).items()})


def _read_header(path: Path, what: str) -> _Header:
    header = _header_cached(*_file_key(path))
    if isinstance(header, str):
        raise ModelFileError(
            f"The {what} weights in {path} could not be read (not a readable .safetensors file: {header}). "
            f"Re-download them from {DECODER_URL}; a partial download is the usual cause."
        )
    return header


def _config_from_metadata(header: _Header, path: Path, key: str = METADATA_CONFIG) -> dict | None:
    text = header.metadata.get(key)
    if not text:
        return None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelFileError(f"{path.name}: the safetensors metadata key {key!r} is not valid JSON ({exc}).") from exc
    if not isinstance(config, dict):
        raise ModelFileError(f"{path.name}: the safetensors metadata key {key!r} is not a JSON object.")
    return config


# -- what a file is ------------------------------------------------------------------------------------

def _classify(tensors: Mapping[str, tuple]) -> tuple[str | None, str, str]:
    """(kind, what the file is, what to do): kind is "unet", "movq" or None (not usable)."""
    keys = tensors.keys()

    def has(key):
        return key in tensors

    def prefix(p):
        return any(k.startswith(p) for k in keys)

    def shape(key):
        return tensors[key][1]

    k22 = f"λ-ECLIPSE decodes with the Kandinsky 2.2 text-to-image decoder ({DECODER_URL}). " + _PICK
    if has("conv_in.weight") and prefix("down_blocks."):  # diffusers UNet2DConditionModel family
        in_channels = shape("conv_in.weight")[1] if len(shape("conv_in.weight")) > 1 else None
        if has("encoder_hid_proj.text_proj.weight"):
            return None, "a Kandinsky 2.1 UNet (text + image conditioning, 'text_image_proj')", k22
        if has("encoder_hid_proj.image_embeds.weight"):
            if prefix("add_embedding.input_hint_block."):
                return None, "the Kandinsky 2.2 ControlNet-depth decoder UNet (it also needs a hint image)", k22
            if in_channels == 9:
                return None, "the Kandinsky 2.2 inpainting decoder UNet (9 input channels: latents, masked image, mask)", k22
            if in_channels != 4:
                return None, f"a Kandinsky-style UNet with {in_channels} input channels (the decoder takes 4)", k22
            if not has("add_embedding.image_proj.weight"):
                return None, "a Kandinsky-style UNet without the image time-embedding ('addition_embed_type' is not 'image')", k22
            return "unet", "a Kandinsky 2.2 decoder UNet", ""
        if has("add_embedding.linear_1.weight"):
            return None, "an SDXL UNet (diffusers format)", k22
        return None, "a Stable Diffusion UNet (diffusers format)", k22
    if has("quantize.embedding.weight"):
        if prefix("encoder.down_blocks.") and prefix("decoder.up_blocks."):
            if has("decoder.conv_norm_out.conv_y.weight"):
                return "movq", "the Kandinsky MoVQ", ""
            return None, "a VQ autoencoder without MoVQ's spatial normalisation (not Kandinsky's MoVQ)", _PICK
        return None, "a VQ autoencoder in its original (non-diffusers) key format", f"Use the diffusers-format {MOVQ_FILE}."
    sd_vae = "The MoVQ is not a Stable Diffusion VAE. " + _PICK
    if prefix("encoder.down.") and prefix("decoder.up."):
        return None, "a Stable Diffusion/SDXL-style VAE (KL autoencoder, original keys encoder.down.* / decoder.up.*)", sd_vae
    if prefix("encoder.down_blocks.") and prefix("decoder.up_blocks."):
        return None, "a Stable Diffusion/SDXL-style VAE (KL autoencoder, diffusers format)", sd_vae
    if prefix("model.diffusion_model.") or prefix("first_stage_model.") or prefix("conditioner.") or prefix("cond_stage_model."):
        xl = has("model.diffusion_model.label_emb.0.0.weight") or prefix("conditioner.")
        return None, f"a full {'SDXL' if xl else 'Stable Diffusion'} checkpoint (models/checkpoints)", k22
    if prefix("input_blocks.") and prefix("output_blocks."):
        what = "an SDXL" if has("label_emb.0.0.weight") else "a Stable Diffusion"
        return None, f"{what} UNet in ComfyUI's original key format (input_blocks.*)", k22
    if has("prd_embedding") or (has("positional_embedding") and prefix("transformer_blocks.") and has("proj_in.weight")):
        if has("embedding_control.weight"):
            return None, "the λ-ECLIPSE prior", "Load it with the prior loader. " + _PICK
        if has("time_embedding.linear_1.weight"):
            return None, "the Kandinsky 2.2 diffusion prior (not used by λ-ECLIPSE)", _PICK
        return None, "a prior transformer", _PICK
    if prefix("vision_model.") or prefix("visual.") or prefix("text_model.") or prefix("transformer.resblocks."):
        return None, "a CLIP model", "Load it with the CLIP loader. " + _PICK
    if prefix("double_blocks.") or prefix("joint_blocks.") or prefix("transformer_blocks."):
        return None, "a transformer diffusion model (Flux/SD3-like)", k22
    sample = ", ".join(sorted(keys)[:3]) or "no tensors"
    return None, f"not a Kandinsky 2.2 decoder UNet or MoVQ ({len(tensors)} tensors: {sample}, …)", _PICK


def sniff_decoder_file(path: str | os.PathLike) -> str:
    """"unet" or "movq" from the safetensors header alone (fast; cached by path, mtime and size).

    Raises ModelFileError saying what the file is when it is neither.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        from .fsio import not_regular_reason

        reason = not_regular_reason(path)
        if reason is not None:
            raise ModelFileError(f"{path} {reason}. Give the path of the .safetensors file.")
        raise MissingModelsError(f"{path} does not exist or is not a file.")
    if path.suffix.lower() != ".safetensors":
        raise ModelFileError(
            f"{path.name}: single-file decoder parts are read from .safetensors only (got '{path.suffix}'). {_PICK}"
        )
    kind, what, advice = _classify(_read_header(path, "decoder").tensors)
    if kind is None:
        raise ModelFileError(f"{path.name} is {what}, not a Kandinsky 2.2 decoder UNet or MoVQ. {advice}".rstrip())
    return kind


def _slot_message(path: Path, slot: str, other: Path) -> None:
    """Raise when a file sits in the wrong slot (or is no decoder part at all)."""
    want, label = ("unet", "UNet") if slot == "unet" else ("movq", "MoVQ")
    try:
        kind = sniff_decoder_file(path)
    except MissingModelsError:
        raise
    except ModelFileError as exc:
        raise ModelFileError(f"Given as the {label}: {exc}") from exc
    if kind == want:
        return
    try:
        other_kind = sniff_decoder_file(other)
    except ModelFileError:
        other_kind = None
    if other_kind == slot:  # both are decoder parts, in each other's place
        raise ModelFileError(
            f"The UNet and MoVQ files are swapped: {path.name} (given as the {label}) is the "
            f"{'MoVQ' if kind == 'movq' else 'UNet'} and {other.name} is the {label}. Exchange the two."
        )
    found = "the Kandinsky MoVQ" if kind == "movq" else "the Kandinsky 2.2 decoder UNet"
    raise ModelFileError(f"{path.name} was given as the {label} but it is {found}. {_PICK}")


# -- building models with empty weights -----------------------------------------------------------------

@contextmanager
def _empty_weights():
    """Parameters on the meta device (buffers too, without accelerate; checked after loading)."""
    try:
        from accelerate import init_empty_weights
    except ImportError:
        with torch.device("meta"):
            yield
    else:
        with init_empty_weights(include_buffers=False):
            yield


def _empty_model(cls, config: Mapping[str, Any], what: str, where: str):
    try:
        with _empty_weights():
            return cls.from_config(dict(config))
    except Exception as exc:
        raise ModelFileError(f"The {what} config of {where} cannot build a {cls.__name__} ({type(exc).__name__}: {exc}).") from exc


def _key_mapping(model, file_keys) -> dict[str, str]:
    """model key → file key; old attention names (query/key/value/proj_attn) renamed as from_pretrained does."""
    mapping = {key: key for key in file_keys}
    fix = getattr(model, "_fix_state_dict_keys_on_load", None)
    if fix is not None:
        fix(mapping)  # pops the deprecated names and stores the values (the file keys) under the new ones
    return mapping


def _examples(items, n: int = 3) -> str:
    items = list(items)
    return ", ".join(str(i) for i in items[:n]) + (", …" if len(items) > n else "")


def _load_model_file(cls, config: Mapping[str, Any], path: Path, header: _Header, dtype: torch.dtype,
                     what: str, config_source: str, from_folder: bool = False):
    """Build `cls` from `config` with empty weights and assign the file's tensors, read one at a time in `dtype`."""
    from safetensors import safe_open

    model = _empty_model(cls, config, what, config_source)
    mapping = _key_mapping(model, header.tensors)
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    missing = sorted(set(expected) - set(mapping))
    unexpected = sorted(file_key for key, file_key in mapping.items() if key not in expected)
    mismatched = [
        f"{key} {list(header.tensors[mapping[key]][1])} vs {list(shape)}"
        for key, shape in expected.items() if key in mapping and header.tensors[mapping[key]][1] != shape
    ]
    if missing or unexpected or mismatched:
        kind, found, advice = _classify(header.tensors)
        parts = []
        if missing:
            parts.append(f"{len(missing)} tensors missing (e.g. {_examples(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {_examples(unexpected)})")
        if mismatched:
            parts.append(f"{len(mismatched)} of another shape (file vs config: {_examples(mismatched, 2)})")
        if kind is None:
            hint = f"It is {found}. {advice}"
        elif from_folder:
            hint = f"The folder's config.json does not describe its weights: download both again from {DECODER_URL}."
        elif METADATA_CONFIG in header.metadata:
            hint = "Its metadata config does not describe its own tensors: re-export the file."
        else:
            hint = (
                f"It looks like {found} of another size. A fine-tuned or resized model must carry its config JSON "
                f"in the safetensors metadata key '{METADATA_CONFIG}' (save_decoder_files writes it)."
            )
        raise ModelFileError(f"{path.name} does not fit the {what} config ({config_source}): {'; '.join(parts)}. {hint}")

    keep_fp32 = tuple(getattr(cls, "_keep_in_fp32_modules", None) or ())
    state = {}
    try:
        handle, mapped = None, 0
        for key, file_key in mapping.items():
            if handle is None or mapped >= _REOPEN_BYTES:
                handle, mapped = safe_open(str(path), framework="pt", device="cpu"), 0
            tensor = handle.get_tensor(file_key)
            mapped += tensor.numel() * tensor.element_size()
            target = tensor.dtype
            if tensor.is_floating_point():
                target = torch.float32 if keep_fp32 and any(m in key.split(".") for m in keep_fp32) else dtype
            # Always an owned copy: safetensors hands out views of its memory map, and a model backed by the
            # file would change (or crash) when the file is rewritten in place while it is in use.
            state[key] = tensor.to(target, copy=True)
            del tensor
            if state[key].is_floating_point() and not bool(torch.isfinite(state[key]).all()):
                bad = state[key]
                raise NonFiniteError(
                    f"{path.name}: the {what} tensor '{file_key}' holds {int(bad.isnan().sum())} NaN and "
                    f"{int(bad.isinf().sum())} infinite values (of {bad.numel()}), so every picture would be black. "
                    f"The file is damaged or was saved from a diverged run: download it again from {DECODER_URL}."
                )
        handle = None
    except NonFiniteError:
        raise
    except Exception as exc:  # safetensors raises SafetensorError/OSError for damaged files
        raise ModelFileError(
            f"The {what} weights in {path} could not be read ({type(exc).__name__}: {exc}). "
            f"Re-download them from {DECODER_URL}; a partial download is the usual cause."
        ) from exc
    model.load_state_dict(state, strict=True, assign=True)
    del state
    if any(t.is_meta for t in list(model.parameters()) + list(model.buffers())):
        raise ModelFileError(f"{path.name}: some {what} tensors were not loaded (this diffusers version has new buffers).")
    return model.eval()


# -- single files ---------------------------------------------------------------------------------------

def _check_file(path: Path, label: str, where: str, wanted: str):
    if not path.exists():
        raise MissingModelsError(
            f"Kandinsky 2.2 {label} file not found: {path}. Put {wanted} there (ComfyUI: {where})."
        )
    if path.is_dir():
        raise ModelFileError(
            f"{path} is a folder; the {label} slot takes one .safetensors file ({wanted}). "
            "For the whole diffusers folder use load_decoder(folder)."
        )


def _resolve_scheduler_config(scheduler_config, header: _Header, unet_path: Path) -> tuple[dict, str]:
    if scheduler_config is None:
        stored = _config_from_metadata(header, unet_path, METADATA_SCHEDULER)
        if stored is not None:
            return stored, f"the '{METADATA_SCHEDULER}' metadata of {unet_path.name}"
        return shipped_config("scheduler"), "the shipped kandinsky-2-2-decoder scheduler config"
    if isinstance(scheduler_config, Mapping):
        return dict(scheduler_config), "the given scheduler config"
    path = Path(scheduler_config).expanduser()
    if path.is_dir():
        for candidate in (path / "scheduler_config.json", path / "scheduler" / "scheduler_config.json"):
            if candidate.is_file():
                return read_json(candidate), str(candidate)
        raise ModelFileError(f"{path} holds no scheduler_config.json (nor scheduler/scheduler_config.json).")
    if not path.is_file():
        raise MissingModelsError(f"Scheduler config not found: {path}.")
    return read_json(path), str(path)


def load_decoder_files(
    unet: str | os.PathLike, movq: str | os.PathLike, device="cpu", dtype="fp32", scheduler_config=None
) -> KandinskyDecoder:
    """The decoder from one UNet .safetensors (diffusers key names) and one MoVQ .safetensors.

    Configs: the published ones (core/configs/kandinsky-2-2-decoder), or the JSON in a file's safetensors
    metadata key `config`. `scheduler_config`: a dict, a scheduler_config.json (or a folder holding one);
    None takes the UNet file's `scheduler_config` metadata, else the published DDPM config.
    """
    from diffusers import UNet2DConditionModel, VQModel

    torch_dtype = resolve_dtype(dtype)
    unet_path, movq_path = Path(unet).expanduser(), Path(movq).expanduser()
    _check_file(unet_path, "UNet", UNET_FOLDERS, UNET_FILE)
    _check_file(movq_path, "MoVQ", MOVQ_FOLDERS, MOVQ_FILE)
    for path in (unet_path, movq_path):
        if path.suffix.lower() != ".safetensors":
            raise ModelFileError(f"{path.name}: single-file decoder parts are read from .safetensors only. {_PICK}")
    _slot_message(unet_path, "unet", movq_path)
    _slot_message(movq_path, "movq", unet_path)

    unet_header = _read_header(unet_path, "UNet")
    movq_header = _read_header(movq_path, "MoVQ")
    configs = {}
    for part, path, header in (("unet", unet_path, unet_header), ("movq", movq_path, movq_header)):
        stored = _config_from_metadata(header, path)
        configs[part] = (
            (stored, f"the '{METADATA_CONFIG}' metadata of {path.name}") if stored is not None
            else (shipped_config(part), f"the shipped kandinsky-2-2-decoder {part} config")
        )
    _check_unet_config(configs["unet"][0], unet_path.name, configs["movq"][0].get("latent_channels", 4))
    sched_config, sched_source = _resolve_scheduler_config(scheduler_config, unet_header, unet_path)
    _scheduler_from_config(sched_config, sched_source)  # fail now, not at the first decode

    unet_model = _load_model_file(UNet2DConditionModel, configs["unet"][0], unet_path, unet_header, torch_dtype,
                                  "UNet", configs["unet"][1])
    movq_model = _load_model_file(VQModel, configs["movq"][0], movq_path, movq_header, torch_dtype,
                                  "MoVQ", configs["movq"][1])
    decoder = KandinskyDecoder(unet_model, movq_model, dict(sched_config), f"{unet_path} + {movq_path}")
    decoder.to(device=device)
    log.info(
        "Kandinsky 2.2 decoder from %s: %s, %s, scheduler %s (%s)", decoder.source, decoder.dtype, decoder.device,
        sched_config.get("_class_name", "DDPMScheduler"), sched_source,
    )
    return decoder


def _public_config(model) -> dict:
    config = json.loads(model.to_json_string())
    config.pop("_name_or_path", None)
    return config


def save_decoder_files(decoder: KandinskyDecoder, unet_path: str | os.PathLike, movq_path: str | os.PathLike,
                       dtype=None) -> tuple[Path, Path]:
    """Write the UNet and the MoVQ as single .safetensors files (atomically), each with its config JSON in the
    metadata key `config` (the UNet also with the scheduler config), in `dtype` (None: as loaded)."""
    target = resolve_dtype(dtype) if dtype is not None else None
    unet_path, movq_path = Path(unet_path).expanduser(), Path(movq_path).expanduser()
    if unet_path.resolve() == movq_path.resolve():
        raise InputError("The UNet and the MoVQ need two different file names.")
    for path in (unet_path, movq_path):
        if path.suffix.lower() != ".safetensors":
            raise InputError(f"{path.name}: decoder parts are written as .safetensors files.")
    for model, path, extra in (
        (decoder.unet, unet_path, {METADATA_SCHEDULER: json.dumps(dict(decoder.scheduler_config), sort_keys=True)}),
        (decoder.movq, movq_path, {}),
    ):
        tensors = {
            key: value.to(target) if target is not None and value.is_floating_point() else value
            for key, value in model.state_dict().items()
        }
        metadata = {"format": "pt", METADATA_CONFIG: json.dumps(_public_config(model), sort_keys=True), **extra}
        save_file_atomic(tensors, path, metadata)
        del tensors
    return unet_path, movq_path


# -- diffusers folders ----------------------------------------------------------------------------------

def _expected_layout(folder: str | Path) -> str:
    folder = Path(folder)
    return "\n".join(f"    {folder / name}" for name in EXPECTED_FILES)


def _looks_like_hub_id(text: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", text)) and not text.startswith((".", "/"))


def _check_unet_config(config: Mapping[str, Any], where: str, latent_channels: int | None = None):
    hid_type = config.get("encoder_hid_dim_type")
    if hid_type != "image_proj":
        raise ModelFileError(
            f"The UNet in {where} is not an image-embedding UNet (encoder_hid_dim_type={hid_type!r}; the "
            "Kandinsky 2.2 decoder uses 'image_proj'). Kandinsky 2.1 ('text_image_proj') or Stable Diffusion "
            f"UNets cannot decode λ-ECLIPSE embeddings. Use {DECODER_URL}."
        )
    added = config.get("addition_embed_type")
    if added != "image":
        hint = " (that is the ControlNet-depth decoder, which also needs a hint image)" if added == "image_hint" else ""
        raise ModelFileError(
            f"The UNet in {where} has addition_embed_type={added!r}{hint}; the text-to-image Kandinsky 2.2 "
            f"decoder has 'image'. Use {DECODER_URL}."
        )
    in_channels = config.get("in_channels")
    if latent_channels is not None and in_channels != latent_channels:
        hint = " (the inpainting decoder takes image + mask channels)" if in_channels == 9 else ""
        raise ModelFileError(
            f"The UNet in {where} takes {in_channels} input channels but the MoVQ makes {latent_channels}-channel "
            f"latents{hint}. Use the text-to-image decoder from {DECODER_URL}."
        )


def _weights_variant(folder: Path) -> tuple[bool, str | None]:
    """(use_safetensors, variant) for a diffusers model folder; raises when it holds no weights."""
    for variant in (None, "fp16"):
        stem = _WEIGHT_STEM if variant is None else f"{_WEIGHT_STEM}.{variant}"
        if (folder / f"{stem}.safetensors").is_file() or (folder / f"{stem}.safetensors.index.json").is_file():
            return True, variant
        if (folder / f"{stem}.bin").is_file() or (folder / f"{stem}.bin.index.json").is_file():
            return False, variant
    found = sorted(p.name for p in folder.iterdir())[:10]
    raise ModelFileError(
        f"No weights in {folder}: expected {_WEIGHT_STEM}.safetensors (or .bin); found {found}. "
        f"Download it from {DECODER_URL} (folder {folder.name}/)."
    )


def _from_pretrained(cls, source: str, what: str, **kwargs):
    from diffusers.utils import is_accelerate_available

    try:
        # Explicit, so diffusers never prints its "install accelerate" warning.
        return cls.from_pretrained(source, low_cpu_mem_usage=is_accelerate_available(), **kwargs)
    except ModelFileError:
        raise
    except Exception as exc:  # diffusers raises OSError/ValueError/EnvironmentError/SafetensorError
        raise ModelFileError(
            f"The {what} weights in {source} could not be read ({type(exc).__name__}: {exc}). "
            f"Re-download them from {DECODER_URL}; a partial download is the usual cause."
        ) from exc


def _load_folder_model(cls, folder: Path, config: dict, dtype: torch.dtype, what: str):
    use_safetensors, variant = _weights_variant(folder)
    stem = _WEIGHT_STEM if variant is None else f"{_WEIGHT_STEM}.{variant}"
    single = folder / f"{stem}.safetensors"
    if use_safetensors and single.is_file():
        return _load_model_file(cls, config, single, _read_header(single, what), dtype, what, str(folder / "config.json"),
                                from_folder=True)
    # Sharded or .bin weights: diffusers' own loader.
    model = _from_pretrained(
        cls, str(folder), what, torch_dtype=dtype, use_safetensors=use_safetensors, variant=variant, local_files_only=True,
    )
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise NonFiniteError(
                f"{folder}: the {what} tensor '{name}' holds NaN or infinite values, so every picture would be black. "
                f"The weights are damaged: download them again from {DECODER_URL}."
            )
    return model.eval()


def _reject_other_folder(folder: Path):
    """Say what a folder is when it is clearly not the decoder."""
    index = folder / "model_index.json"
    if index.is_file():
        name = read_json(index).get("_class_name")
        if name in DECODER_PIPELINES:
            return
        if name == "KandinskyV22PriorPipeline":
            raise ModelFileError(
                f"{folder} is the Kandinsky 2.2 prior (model_index.json: {name}), not the decoder. "
                f"The decoder is {DECODER_URL}."
            )
        raise ModelFileError(
            f"{folder} is a {name or 'unknown'} folder (model_index.json), not the Kandinsky 2.2 decoder "
            f"(KandinskyV22Pipeline). Download {DECODER_URL}."
        )
    config = folder / "config.json"
    if config.is_file() and not (folder / "unet").is_dir():
        name = read_json(config).get("_class_name")
        if name == "PriorTransformer":
            raise ModelFileError(
                f"{folder} is a prior (config.json: PriorTransformer), not the Kandinsky 2.2 decoder. Load it as "
                f"the λ-ECLIPSE prior; the decoder is a separate download: {DECODER_URL}."
            )
        raise ModelFileError(
            f"{folder} holds a single {name or 'unknown'} model (config.json), not the Kandinsky 2.2 decoder "
            f"pipeline folder. Expected:\n{_expected_layout(folder)}\nDownload: {DECODER_URL}"
        )


def _load_local(folder: Path, dtype: torch.dtype) -> KandinskyDecoder:
    from diffusers import UNet2DConditionModel, VQModel

    _reject_other_folder(folder)
    missing = [name for name in SUBFOLDERS if not (folder / name).is_dir()]
    if missing:
        raise ModelFileError(
            f"{folder} is not a complete Kandinsky 2.2 decoder folder: {', '.join(n + '/' for n in missing)} "
            f"missing. Expected:\n{_expected_layout(folder)}\nDownload: {DECODER_URL}"
        )
    if not (folder / "model_index.json").is_file():
        log.debug("%s has no model_index.json; loading unet/, movq/ and scheduler/ anyway", folder)
    for name, file in (("unet", "config.json"), ("movq", "config.json"), ("scheduler", "scheduler_config.json")):
        if not (folder / name / file).is_file():
            raise ModelFileError(f"{folder / name / file} is missing. Download it from {DECODER_URL}.")

    unet_config = read_json(folder / "unet" / "config.json")
    movq_config = read_json(folder / "movq" / "config.json")
    _check_unet_config(unet_config, str(folder / "unet"), movq_config.get("latent_channels", 4))
    scheduler_config = read_json(folder / "scheduler" / "scheduler_config.json")
    _scheduler_from_config(scheduler_config, str(folder / "scheduler" / "scheduler_config.json"))
    if (folder / "model_index.json").is_file():
        listed = (read_json(folder / "model_index.json").get("scheduler") or [None, None])[-1]
        named = scheduler_config.get("_class_name", "DDPMScheduler")
        if listed and listed != named:
            log.warning(
                "%s: model_index.json lists the scheduler %s but scheduler_config.json says %s; using %s "
                "(diffusers' from_pretrained would use %s).", folder, listed, named, named, listed,
            )
    unet = _load_folder_model(UNet2DConditionModel, folder / "unet", unet_config, dtype, "UNet")
    movq = _load_folder_model(VQModel, folder / "movq", movq_config, dtype, "MoVQ")
    return KandinskyDecoder(unet, movq, dict(scheduler_config), str(folder))


def load_decoder(
    path: str | os.PathLike, device="cpu", dtype="fp32", allow_download: bool | None = None
) -> KandinskyDecoder:
    """Load the Kandinsky 2.2 decoder from its diffusers folder (model_index.json, unet/, movq/, scheduler/).

    `allow_download` is deprecated and ignored: this loader reads local files only.
    """
    if allow_download:
        log.warning(
            "load_decoder(allow_download=True) is deprecated and ignored: the decoder is read from local files "
            "only. Download %s into a folder first.", DECODER_URL,
        )
    torch_dtype = resolve_dtype(dtype)
    text = os.fspath(path)
    folder = Path(text).expanduser()
    if folder.exists():
        if not folder.is_dir():
            raise ModelFileError(
                f"{folder} is a file; load_decoder takes the Kandinsky 2.2 decoder's diffusers folder, which "
                f"holds:\n{_expected_layout('<decoder folder>')}\nFor a single UNet file plus a MoVQ file use "
                f"load_decoder_files(unet, movq). Download: {DECODER_URL}"
            )
        decoder = _load_local(folder, torch_dtype)
    else:
        hint = ""
        if _looks_like_hub_id(text):
            hint = f" '{text}' looks like a Hugging Face id; downloading is off here (local files only)."
        raise MissingModelsError(
            f"Kandinsky 2.2 decoder not found: {folder} does not exist.{hint} Download the decoder into a "
            f"folder holding:\n{_expected_layout(folder)}\nfrom {DECODER_URL}"
        )
    decoder.to(device=device)
    log.info(
        "Kandinsky 2.2 decoder from %s: %s, %s, scheduler %s",
        decoder.source, decoder.dtype, decoder.device, decoder.scheduler_config.get("_class_name", "DDPMScheduler"),
    )
    return decoder


def load_decoder_parts(unet: str | os.PathLike, movq: str | os.PathLike | None = None, device="cpu", dtype="fp32"):
    """The decoder from a diffusers folder (`unet` is the folder; `movq` is then ignored) or from its two files."""
    if Path(unet).is_dir():
        return load_decoder(unet, device=device, dtype=dtype)
    return load_decoder_files(unet, movq, device=device, dtype=dtype)
