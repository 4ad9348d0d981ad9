"""The one place the nodes reach ComfyUI: model folders, devices, VRAM, progress and interrupt.

Everything is imported lazily. Without ComfyUI (tests, notebooks) a plain-PyTorch fallback is used:
model folders under `LAMBDA_ECLIPSE_MODELS` (or `set_models_dir`), the CPU, and a local cancel flag.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Callable, Iterable

import torch

from ..core.errors import Cancelled, MissingModelsError, ModelFileError
from ..core.paths import FOLDER_ALIASES  # the legacy folders ComfyUI maps onto the new names

log = logging.getLogger("lambda_eclipse")

MODEL_FOLDER = "lambda_eclipse"
WEIGHT_EXTENSIONS = {".safetensors", ".bin", ".pt", ".pth", ".ckpt"}
SNIFFABLE_EXTENSIONS = {".safetensors", ".sft"}

_fallback_models_dir: Path | None = None
_fallback_input_dir: Path | None = None
_cancel = threading.Event()


# -- is ComfyUI here? --------------------------------------------------------------------------------

_ABSENT: set[str] = set()


def _import(name: str):
    if name in _ABSENT:  # outside ComfyUI this is asked once per decode step: don't search sys.path each time
        return None
    try:
        return __import__(name, fromlist=["_"])
    except Exception:  # any failure means "not inside ComfyUI"; never break the caller
        _ABSENT.add(name)
        return None


def folder_paths():
    """ComfyUI's `folder_paths` module, or None outside ComfyUI."""
    return _import("folder_paths")


def model_management():
    module = _import("comfy.model_management")
    return module if module is not None and folder_paths() is not None else None


def in_comfyui() -> bool:
    return model_management() is not None


# -- model folders ---------------------------------------------------------------------------------

def set_models_dir(path: str | os.PathLike | None):
    """Fallback models folder (ComfyUI's `models/` layout) for use outside ComfyUI."""
    global _fallback_models_dir
    _fallback_models_dir = Path(path) if path is not None else None


def set_input_dir(path: str | os.PathLike | None):
    global _fallback_input_dir
    _fallback_input_dir = Path(path) if path is not None else None


def models_dir() -> Path | None:
    fp = folder_paths()
    if fp is not None:
        return Path(fp.models_dir)
    if _fallback_models_dir is not None:
        return _fallback_models_dir
    env = os.environ.get("LAMBDA_ECLIPSE_MODELS")
    return Path(env) if env else None


def input_dir() -> Path | None:
    fp = folder_paths()
    if fp is not None:
        return Path(fp.get_input_directory())
    return _fallback_input_dir


def register_model_folder() -> Path | None:
    """Register models/lambda_eclipse with ComfyUI without dropping paths from extra_model_paths.yaml."""
    fp = folder_paths()
    if fp is None:
        return None
    default = Path(fp.models_dir) / MODEL_FOLDER
    try:
        default.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        log.warning("could not create %s (%s); add a 'lambda_eclipse' entry to extra_model_paths.yaml instead", default, exc)
    table = fp.folder_names_and_paths
    if MODEL_FOLDER in table:
        paths, extensions = table[MODEL_FOLDER]
        paths = list(paths)
        if str(default) not in paths:
            paths.append(str(default))
        # A fresh set: the shared supported_pt_extensions set must never be mutated.
        table[MODEL_FOLDER] = (paths, set(extensions) | WEIGHT_EXTENSIONS)
    else:
        table[MODEL_FOLDER] = ([str(default)], set(WEIGHT_EXTENSIONS))
    return default


def folder_bases(key: str) -> list[Path]:
    """The base folders ComfyUI searches for `key` (fallback: <models>/<key>), existing ones only."""
    fp = folder_paths()
    bases: list[str] = []
    if fp is not None:
        try:
            bases = list(fp.get_folder_paths(key))
        except Exception:  # an unknown key: ComfyUI raises KeyError
            bases = []
    else:
        root = models_dir()
        if root is not None:
            bases = [str(root / alias) for alias in FOLDER_ALIASES.get(key, (key,))]
    out, seen = [], set()
    for base in bases:
        path = Path(base)
        real = os.path.realpath(path)
        if real not in seen and path.is_dir():
            seen.add(real)
            out.append(path)
    return out


def _walk(base: Path) -> Iterable[tuple[Path, list[str], list[str]]]:
    for root, dirs, files in os.walk(base, followlinks=True):
        dirs.sort()
        yield Path(root), dirs, sorted(files)


def _rel(path: Path, base: Path) -> str:
    return path.relative_to(base).as_posix()


def list_model_files(keys: Iterable[str], accept: Callable[[Path], bool], folders: bool,
                     model_folder: Callable[[Path], bool] | None = None) -> list[str]:
    """Names (relative to their base folder) of the files, and if `folders` the model folders, that `accept` takes.

    A folder that is a model of any kind (`model_folder`) is never descended into, so its inner files never
    clutter a menu; it is listed itself only when `folders` and `accept` say so. Only .safetensors/.sft files
    are offered: their headers say what they are without running pickle code.
    """
    names: list[str] = []
    for key in keys:
        for base in folder_bases(key):
            for root, dirs, filenames in _walk(base):
                if root != base and model_folder is not None and model_folder(root):
                    if folders and accept(root):
                        names.append(_rel(root, base))
                    dirs[:] = []
                    continue
                dirs[:] = [d for d in dirs if not d.startswith(".")]
                for f in filenames:
                    if Path(f).suffix.lower() in SNIFFABLE_EXTENSIONS and accept(root / f):
                        names.append(_rel(root / f, base))
    return sorted(dict.fromkeys(names), key=str.lower)


def resolve_model(keys: Iterable[str], name: str, what: str, url: str) -> Path:
    """A listed name back to its path, searched in the same folders; a clear error when it is gone."""
    keys = list(keys)
    if not name or os.path.isabs(name) or ".." in Path(name).parts:
        raise ModelFileError(f"{what}: {name!r} is not a name from the list. Pick one in the loader's menu.")
    for key in keys:
        for base in folder_bases(key):
            candidate = base / name
            if candidate.exists():
                return candidate
    where = ", ".join(f"models/{k}" for k in keys)
    if not any(folder_bases(k) for k in keys):
        where += " (none of these folders exists yet)"
    raise MissingModelsError(
        f"{what} {name!r} was not found in {where}. Download it from {url} and put it in "
        f"models/{keys[0]}/, then press R (refresh) and pick it in the loader."
    )


def model_signature(path: Path) -> tuple:
    """(path, newest mtime, total size) of a file or of the weight/config files in a folder: a changed file reloads."""
    path = Path(path)
    if path.is_file():
        st = path.stat()
        return (str(path.resolve()), st.st_mtime_ns, st.st_size)
    mtime, size = 0, 0
    for root, _dirs, files in os.walk(path, followlinks=True):
        for f in files:
            if Path(f).suffix.lower() in WEIGHT_EXTENSIONS | {".json"}:
                st = (Path(root) / f).stat()
                mtime, size = max(mtime, st.st_mtime_ns), size + st.st_size
    return (str(path.resolve()), mtime, size)


# -- devices and dtypes --------------------------------------------------------------------------------

def load_device() -> torch.device:
    mm = model_management()
    return mm.get_torch_device() if mm is not None else torch.device("cpu")


def offload_device(kind: str = "unet") -> torch.device:
    mm = model_management()
    if mm is None:
        return torch.device("cpu")
    if kind == "text":
        return mm.text_encoder_offload_device()
    return mm.unet_offload_device()


def text_encoder_device() -> torch.device:
    mm = model_management()
    return mm.text_encoder_device() if mm is not None else torch.device("cpu")


def intermediate_device() -> torch.device:
    mm = model_management()
    return mm.intermediate_device() if mm is not None else torch.device("cpu")


def auto_dtype(kind: str) -> torch.dtype:
    """ComfyUI's choice for this kind of model on this machine ('prior' is always fp32: 34M parameters)."""
    mm = model_management()
    if kind == "prior" or mm is None:
        return torch.float32
    plain = (torch.float16, torch.bfloat16, torch.float32)
    if kind == "clip":
        # ComfyUI's own text encoders compute through casting ops; open_clip runs in its weight dtype, so
        # no fp16 on a CPU and no fp8 anywhere.
        device = mm.text_encoder_device()
        if mm.is_device_cpu(device):
            return torch.float32
        chosen = mm.text_encoder_dtype(device)
        return chosen if chosen in plain else torch.float16
    if kind == "decoder":
        chosen = mm.unet_dtype(mm.get_torch_device(), supported_dtypes=list(plain))
        return chosen if chosen in plain else torch.float16
    return torch.float32


# -- VRAM sharing --------------------------------------------------------------------------------------

class ModelHolder(torch.nn.Module):
    """A plain module owning the model's parts: ModelPatcher must set `.device`, which diffusers models refuse."""

    def __init__(self, **parts: torch.nn.Module):
        super().__init__()
        for name, part in parts.items():
            self.add_module(name, part)


# Kinds whose layers are swapped for comfy.ops classes so ComfyUI can offload them (lowvram, DynamicVRAM). The
# 34M-parameter prior (~140 MB fp32) stays plain and fully loaded: too small to be worth streaming.
OFFLOADABLE_KINDS = ("clip", "decoder")
_warned: set[str] = set()


def _warn_once(key: str, message: str, *args) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(message, *args)


def _offload_ops(dtype: torch.dtype, device: torch.device):
    """The comfy.ops namespace ComfyUI would pick for weights of `dtype` computed in `dtype` on `device`, or None.

    Only `disable_weight_init` / `manual_cast` (plain subclasses of the torch layers) are used: fp8/cuBLAS ops
    (picked with `--fast`) expect weights loaded through their own state-dict path, so they fall back to
    `disable_weight_init`.
    """
    ops = _import("comfy.ops")
    if ops is None or not hasattr(ops, "disable_weight_init"):
        return None
    plain = {getattr(ops, "disable_weight_init", None), getattr(ops, "manual_cast", None)}
    picked = None
    if hasattr(ops, "pick_operations"):
        try:
            picked = ops.pick_operations(dtype, dtype, load_device=device)
        except Exception:  # signature or device query changed: use the default below
            picked = None
    return picked if picked in plain else ops.disable_weight_init


def _first_param_owner(module: torch.nn.Module):
    """The module owning `module`'s first parameter: diffusers' `.device` / `.dtype` read that parameter."""
    for name, _ in module.named_parameters():
        owner = module
        for part in name.split(".")[:-1]:
            owner = getattr(owner, part)
        return owner
    return None


def _device_anchors(parts: dict[str, torch.nn.Module]) -> list[torch.nn.Module]:
    """Layers the core reads its compute device from: kept plain so ComfyUI always loads them on the GPU."""
    anchors = [_first_param_owner(part) for part in parts.values()]
    for part in parts.values():  # open_clip: ClipEncoder.device reads ln_final (text) or visual.ln_post
        anchors.append(getattr(part, "ln_final", None))
        anchors.append(getattr(getattr(part, "visual", None), "ln_post", None))
    return [a for a in anchors if isinstance(a, torch.nn.Module)]


def _make_offloadable(kind: str, parts: dict[str, torch.nn.Module], load: torch.device):
    """Swap the parts' layers for comfy.ops classes: the [(layer, old class)] swapped, or None (nothing changed)
    when that is not possible."""
    from . import offload

    if kind not in OFFLOADABLE_KINDS or not parts:
        return None
    if _import("comfy.ops") is None:
        _warn_once("no-ops", "λ-ECLIPSE: this ComfyUI has no comfy.ops; models load whole (no offloading).")
        return None
    swapped = []
    try:
        dtype = next(p for part in parts.values() for p in part.parameters()).dtype
        ops = _offload_ops(dtype, load)
        keep = _device_anchors(parts)
        for part in parts.values():
            swapped += offload.make_offloadable(part, ops, keep=keep)
        return swapped
    except Exception as e:  # never break a run: today's plain, fully loaded path
        offload.restore(swapped)
        _warn_once("swap-failed", "λ-ECLIPSE: could not make the %s offloadable (%s: %s); loading it whole.",
                   kind, type(e).__name__, e)
        return None


def make_patcher(kind: str, **parts: torch.nn.Module):
    """A ComfyUI patcher over `parts` (None outside ComfyUI, where nothing is managed).

    CLIP and decoder: layers swapped for comfy.ops classes under `CoreModelPatcher` (the dynamic-VRAM patcher on
    a ComfyUI that has it; `ModelPatcher` on one older than it), so they can be partially loaded or streamed. The
    prior, a ComfyUI without comfy.ops, or any swap failure: the legacy `ModelPatcher`, loaded whole (as before).
    The size is left to the patcher (`model_size()` sums the holder's state dict: all parameters and buffers).
    """
    mm = model_management()
    patcher_module = _import("comfy.model_patcher")
    if mm is None or patcher_module is None:
        return None
    load = mm.text_encoder_device() if kind == "clip" else mm.get_torch_device()
    offload_to = offload_device("text" if kind == "clip" else "unet")
    # CoreModelPatcher: what ComfyUI's own loaders use (ModelPatcherDynamic under DynamicVRAM, 0.33+); before it
    # existed, ModelPatcher, which partially loads comfy.ops layers under --lowvram / low free VRAM.
    core = getattr(patcher_module, "CoreModelPatcher", None) or patcher_module.ModelPatcher
    swapped = _make_offloadable(kind, parts, load)
    holder = ModelHolder(**parts)
    holder.lambda_eclipse_offloadable = offloadable = swapped is not None
    if not offloadable:
        return patcher_module.ModelPatcher(holder, load_device=load, offload_device=offload_to)
    try:
        patcher = core(holder, load_device=load, offload_device=offload_to)
        log.info("λ-ECLIPSE: %s under %s with %d comfy.ops layers (offloadable).", kind, type(patcher).__name__,
                 len(swapped))
        return patcher
    except Exception as e:
        _warn_once("core-failed", "λ-ECLIPSE: CoreModelPatcher failed (%s: %s); loading the %s whole.",
                   type(e).__name__, e, kind)
        from . import offload

        offload.restore(swapped)
        holder.lambda_eclipse_offloadable = False
        return patcher_module.ModelPatcher(holder, load_device=load, offload_device=offload_to)


def is_offloadable(patcher) -> bool:
    return bool(getattr(getattr(patcher, "model", None), "lambda_eclipse_offloadable", False))


def _is_dynamic(patcher) -> bool:
    is_dynamic = getattr(patcher, "is_dynamic", None)
    return bool(is_dynamic()) if callable(is_dynamic) else False


def load_models(patchers: Iterable) -> None:
    """Ask ComfyUI to bring these models to the GPU, freeing others if needed (one shared VRAM budget).

    Plain models (the prior, or a failed swap): full loads only, since a partial load would leave weights on the
    CPU that nothing casts over. Offloadable models: one call without `force_full_load` (a dynamic patcher
    asserts it), with `memory_required` = the bytes of their non-ops tensors (attention `in_proj` weights,
    embeddings, norms, buffers), which stay whole on the GPU, so ComfyUI reserves room for them. The activation
    memory is not included: the callers (`.ready()`) do not know the image size or batch; ComfyUI already keeps
    its `minimum_inference_memory` free. After a legacy partial load those non-ops tensors are moved to the GPU
    (ComfyUI leaves non-leaf parameters and non-fitting plain modules behind).
    """
    patchers = [p for p in patchers if p is not None]
    mm = model_management()
    if mm is None or not patchers:
        return
    import inspect

    has_full = "force_full_load" in inspect.signature(mm.load_models_gpu).parameters
    plain = [p for p in patchers if not is_offloadable(p)]
    offloadable = [p for p in patchers if is_offloadable(p)]
    if plain:
        if has_full:
            mm.load_models_gpu(plain, force_full_load=True)
        else:  # a ComfyUI older than the argument
            mm.load_models_gpu(plain)
    if offloadable:
        from . import offload

        resident = sum(offload.resident_bytes(p.model) for p in offloadable)
        mm.load_models_gpu(offloadable, memory_required=resident)
        for p in offloadable:
            if not _is_dynamic(p) and not mm.is_device_cpu(p.load_device):
                moved = offload.move_resident(p.model, p.load_device)
                if moved:
                    log.debug("λ-ECLIPSE: moved %.1f MB of non-offloadable weights to %s", moved / 2**20, p.load_device)


# -- progress and interrupt -------------------------------------------------------------------------------

def request_cancel():
    """Fallback only: make the next progress callback raise Cancelled (ComfyUI uses its own interrupt)."""
    _cancel.set()


def clear_cancel():
    _cancel.clear()


def check_interrupt():
    mm = model_management()
    if mm is not None:
        mm.throw_exception_if_processing_interrupted()
    elif _cancel.is_set():
        _cancel.clear()
        raise Cancelled("Cancelled by the user.")


class _NullBar:
    def __init__(self, total: int):
        self.total, self.current = total, 0

    def update(self, value: int):
        self.current += value

    def update_absolute(self, value: int, total: int | None = None, preview=None):
        self.current = value


def progress_bar(total: int):
    utils = _import("comfy.utils") if in_comfyui() else None
    return utils.ProgressBar(total) if utils is not None else _NullBar(total)


def previews_enabled() -> bool:
    """The user's preview setting (--preview-method; 'none' turns previews off). Off outside ComfyUI."""
    if not in_comfyui():
        return False
    cli = _import("comfy.cli_args")
    method = getattr(getattr(cli, "args", None), "preview_method", None)
    return str(getattr(method, "value", method)).lower() not in ("none", "nopreviews")


def preview_callback(bar, make_image: Callable[[object], object], min_interval: float = 1.0, clock=None):
    """A core-style preview(step, total, latents): the first step's picture always, then at most one per
    `min_interval` seconds (and never one that took longer to make than a fifth of the time since the last),
    shown on ComfyUI's node like KSampler's. `clock` (default time.monotonic) is only for tests: the throttle
    never compares with the clock's absolute value, which on some systems counts from boot."""
    import time

    clock = clock or time.monotonic
    state = {"last": None, "cost": 0.0}

    def preview(step: int, total: int, latents):
        now = clock()
        last = state["last"]
        if last is not None and now - last < max(min_interval, 5 * state["cost"]) and step + 1 < total:
            return
        image = make_image(latents)
        done = clock()
        state["cost"], state["last"] = done - now, done
        if image is not None:
            bar.update_absolute(step + 1, total, ("JPEG", image, 512))

    return preview


def tell_node(unique_id, text: str):
    """Say something the user should see, on the node itself: ComfyUI's progress text (drawn on the node by the
    frontend, as API nodes do) and the server log. Outside ComfyUI only the log."""
    log.warning(text)
    if unique_id is None or not in_comfyui():
        return
    server = _import("server")
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    send = getattr(instance, "send_progress_text", None)
    if send is None:
        return
    try:
        send(text, str(unique_id))
    except Exception as exc:  # a message must never break the run
        log.debug("could not show a message on node %s: %s", unique_id, exc)


def annotated_input_path(name: str) -> Path | None:
    """The file behind a Load Image value ('x.png', 'x.png [input]', 'sub/x.png'), or None outside ComfyUI."""
    fp = folder_paths()
    if fp is None:
        base = _fallback_input_dir
        return (base / name) if base is not None else None
    try:
        return Path(fp.get_annotated_filepath(name))
    except Exception:
        return None


def step_callback(total: int) -> Callable[[int, int], None]:
    """A core-style callback(step, total): one progress tick per step, and stop at once on Cancel."""
    bar = progress_bar(total)

    def callback(step: int, steps: int):
        bar.update_absolute(step + 1, steps)
        check_interrupt()

    callback.bar = bar
    return callback
