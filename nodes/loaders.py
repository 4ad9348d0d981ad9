"""Loader nodes for the three models: λ-ECLIPSE prior, OpenCLIP bigG (two towers), Kandinsky 2.2 decoder.

Every weight file is the value of its own menu (combo), listing files in ComfyUI's standard folders, so the
frontend's missing-models check can name each absent file with its folder and download link. The menus list
only files the loader can load (read from their headers). An absent file stops the run before any node runs,
with the loader's own message (file, folder, link), not only ComfyUI's "Value not in list".

Loaded models are shared through a weak cache: while ComfyUI keeps a loader's output, a second loader with the
same file gets the same model; once ComfyUI drops it (its cache, "free memory"), nothing of ours keeps it alive.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from ..core.errors import LambdaEclipseError, ModelFileError
from ..core.paths import (
    clip_towers, decoder_part, is_decoder_folder, is_openclip_folder, is_prior_file, is_prior_folder, manifest,
)
from . import comfy

log = logging.getLogger("lambda_eclipse")

CATEGORY = "λ-ECLIPSE/loaders"
DTYPES = ["auto", "fp32", "fp16", "bf16"]
PRIOR_FOLDERS = ("lambda_eclipse",)
CLIP_TEXT_FOLDERS = ("text_encoders", "lambda_eclipse", "checkpoints")
CLIP_VISION_FOLDERS = ("clip_vision", "lambda_eclipse")
UNET_FOLDERS = ("diffusion_models", "diffusers", "lambda_eclipse")
MOVQ_FOLDERS = ("vae", "lambda_eclipse")
# Kept for callers of the first release.
CLIP_FOLDERS = CLIP_TEXT_FOLDERS
DECODER_FOLDERS = UNET_FOLDERS
SAME_AS_CLIP = "(from clip_name)"
SAME_AS_DECODER = "(from decoder_name)"


@dataclass(eq=False)
class Loaded:
    """What travels on a LAMBDA_ECLIPSE_PRIOR / _CLIP / _DECODER link: the core model and its ComfyUI patcher."""

    kind: str
    model: Any  # LambdaEclipsePrior, ClipEncoder or KandinskyDecoder
    patcher: Any  # comfy.model_patcher.ModelPatcher, or None outside ComfyUI
    name: str

    def ready(self):
        """Bring the model to its device through ComfyUI's memory manager (a no-op outside ComfyUI)."""
        comfy.load_models([self.patcher])
        return self.model


# Weak: an entry lives only as long as someone (ComfyUI's output cache, a running graph) holds the model.
_LIVE: "weakref.WeakValueDictionary[tuple, Loaded]" = weakref.WeakValueDictionary()


def clear_cache():
    _LIVE.clear()


def _dtype(kind: str, choice: str):
    from ..core.loading import resolve_dtype

    if choice not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {choice!r}.")
    return comfy.auto_dtype(kind) if choice == "auto" else resolve_dtype(choice)


def _shared(kind: str, paths: Iterable[Path], dtype, name: str, load: Callable[[], tuple]) -> Loaded:
    key = (kind,) + tuple(comfy.model_signature(p) for p in paths) + (str(dtype),)
    hit = _LIVE.get(key)
    if hit is not None:
        return hit
    model, patcher = load()
    loaded = Loaded(kind, model, patcher, name)
    _LIVE[key] = loaded
    return loaded


# -- what each menu lists --------------------------------------------------------------------------------

def _accept_prior(path: Path) -> bool:
    return is_prior_folder(path) if path.is_dir() else is_prior_file(path)


def _accept_text(path: Path) -> bool:
    return is_openclip_folder(path) if path.is_dir() else "text" in clip_towers(path)


def _accept_vision(path: Path) -> bool:
    return "vision" in clip_towers(path) if path.is_file() else False


def _accept_unet(path: Path) -> bool:
    return is_decoder_folder(path) if path.is_dir() else decoder_part(path) == "unet"


def _accept_movq(path: Path) -> bool:
    return decoder_part(path) == "movq" if path.is_file() else False


def _is_model_folder(path: Path) -> bool:
    return is_prior_folder(path) or is_openclip_folder(path) or is_decoder_folder(path)


def _names(keys, accept, folders: bool) -> list[str]:
    return comfy.list_model_files(keys, accept, folders=folders, model_folder=_is_model_folder)


# -- messages --------------------------------------------------------------------------------------------

# Which input of which loader takes each manifest part: a file picked in the wrong menu is sent to the right one.
PART_INPUTS = {
    "prior": "Load Prior's prior_name",
    "clip_text": "Load CLIP's clip_name",
    "clip_vision": "Load CLIP's vision_name",
    "decoder_unet": "Load Kandinsky Decoder's decoder_name",
    "decoder_movq": "Load Kandinsky Decoder's movq_name",
}


def _entry_for(name: str, default_key: str):
    entries = manifest()
    return next((e for e in entries.values() if e.name == name), entries[default_key])


def _default_text(default_key: str) -> str:
    entry = manifest()[default_key]
    return f"models/{entry.folder}/{entry.name} ({entry.size_text()}, {entry.url})"


def _missing_message(what: str, name: str, keys: tuple, default_key: str) -> str:
    entry = _entry_for(name, default_key)
    where = " or ".join(f"models/{k}" for k in keys)
    if not any(comfy.folder_bases(k) for k in keys):
        where += " (none of these folders exists yet)"
    if entry.key != default_key:  # the default name of another part, picked in this menu
        other = manifest()[entry.key]
        return (f"{what} '{name}' is not in {where}: '{name}' is the {other.what}, which belongs in "
                f"{PART_INPUTS.get(entry.key, 'another loader')}. The {what} is {_default_text(default_key)}.")
    if entry.name == name:
        fix = f"download {entry.url} ({entry.size_text()}) and save it as models/{entry.folder}/{entry.name}"
    else:
        fix = (f"put it into models/{keys[0]}/ (the default is {entry.name} from {entry.url}, "
               f"{entry.size_text()}, saved in models/{entry.folder}/)")
    return f"{what} '{name}' is not in {where}: {fix}."


def what_file_is(path: Path) -> str | None:
    """What a model file or folder is, from its headers only: 'the bigG text tower', 'the Kandinsky 2.2 MoVQ', …,
    or the CLIP sniffer's own words for a foreign file (a T5, a CLIP-L, an SD UNet…); None when nothing is known."""
    towers = clip_towers(path)
    if towers == {"text"}:
        return "the bigG text tower"
    if towers == {"vision"}:
        return "the bigG vision tower"
    if towers:
        return "a bigG CLIP holding both towers"
    if path.is_file():
        part = decoder_part(path)
        if part is not None:
            return "the Kandinsky 2.2 decoder UNet" if part == "unet" else "the Kandinsky 2.2 MoVQ"
        if is_prior_file(path):
            return "a λ-ECLIPSE prior"
    elif _is_model_folder(path):
        if is_prior_folder(path):
            return "a λ-ECLIPSE prior folder"
        if is_decoder_folder(path):
            return "a Kandinsky 2.2 decoder folder"
    from ..core.clip_formats import sniff_clip

    try:
        sniff_clip(path)
    except (LambdaEclipseError, OSError) as exc:
        text = str(exc)
        # the sniffer says "<file> is <what it is> …"; keep that clause, drop its advice about CLIP
        for marker in (" is ", " looks like "):
            if marker in text:
                clause = text.split(marker, 1)[1].split(". ")[0].split(";")[0].rstrip(".")
                if clause and "not found" not in clause:
                    return clause
    return None


_PART_OF = {"the bigG text tower": "clip_text", "the bigG vision tower": "clip_vision",
            "the Kandinsky 2.2 decoder UNet": "decoder_unet", "the Kandinsky 2.2 MoVQ": "decoder_movq",
            "a λ-ECLIPSE prior": "prior", "a λ-ECLIPSE prior folder": "prior",
            "a Kandinsky 2.2 decoder folder": "decoder_unet"}


def _wrong_file_message(what: str, name: str, path: Path, default_key: str) -> str:
    found = what_file_is(path)
    if found is None:
        return (f"{what} '{name}' is not a file this loader can use (not a model file it recognises). "
                f"The {what} is {_default_text(default_key)}. Pick another file in the menu.")
    other = _PART_OF.get(found)
    where = f"; it belongs in {PART_INPUTS[other]}" if other in PART_INPUTS and other != default_key else ""
    return (f"{what} '{name}' is {found}, not the {what}{where}. The {what} is {_default_text(default_key)}. "
            "Pick it in this menu.")


DOWNLOAD_HINT = ("Or fetch every missing file at once: python -m lambda_eclipse download --models <ComfyUI>/models. "
                 "Then press R (refresh) and pick the files in the loader.")


def _resolve(keys, name, what, default_key) -> Path:
    try:
        return comfy.resolve_model(keys, name, what, manifest()[default_key].url)
    except ModelFileError as exc:
        if "was not found" in str(exc):
            raise type(exc)(_missing_message(what, name, keys, default_key) + " " + DOWNLOAD_HINT) from None
        raise


def _validate(*checks: tuple) -> bool | str:
    """VALIDATE_INPUTS: True, or every problem in one message. ComfyUI stops before running anything and attaches
    the message to each input named in VALIDATE_INPUTS, so each problem names its own input."""
    problems = []
    for check in checks:
        keys, name, what, default_key, accept = check[:5]
        label = f"{check[5]}: " if len(check) > 5 and check[5] else ""
        try:
            path = _resolve(keys, name, what, default_key)
        except LambdaEclipseError as exc:
            problems.append(label + str(exc).replace(" " + DOWNLOAD_HINT, ""))
            continue
        if accept is not None and not accept(path):
            problems.append(label + _wrong_file_message(what, name, path, default_key))
    if not problems:
        return True
    if any(" is not in models/" in p for p in problems):
        problems.append(DOWNLOAD_HINT)
    return " ".join(problems)


def _changed(*pairs) -> str:
    """IS_CHANGED: ComfyUI reruns the loader (and so reloads) when a file behind a name changes."""
    signatures = []
    for keys, name in pairs:
        try:
            signatures.append(comfy.model_signature(comfy.resolve_model(keys, name, "model", "")))
        except Exception:  # a missing file: VALIDATE_INPUTS / the loader say so
            signatures.append(None)
    return repr(signatures)


def _dtype_input(what: str):
    return (DTYPES, {"default": "auto", "tooltip": f"Weight precision of the {what}. auto = ComfyUI's choice for this machine "
                     "(fp32 for the small prior; fp16/bf16 on GPUs that support them)."})


def _file_hint(key: str) -> str:
    entry = manifest()[key]
    return f"Default: models/{entry.folder}/{entry.name} ({entry.size_text()}) from {entry.url}"


@dataclass(frozen=True)
class Slot:
    """One model menu: where its files live, what they are called in messages, and which it accepts."""

    folders: tuple
    what: str
    key: str  # manifest key of the default file
    accept: Callable[[Path], bool]
    input: str = ""  # the node input that holds this menu (named in messages)

    def check(self, name):
        return (self.folders, name, self.what, self.key, self.accept, self.input)

    def resolve(self, name) -> Path:
        return _resolve(self.folders, name, self.what, self.key)


@dataclass(frozen=True)
class Pair:
    """A loader with a main menu and an optional second one whose `same` value takes the part from the main choice
    (an OpenCLIP folder holds both towers, a diffusers folder both decoder parts)."""

    main: Slot
    second: Slot
    same: str
    holds_both: Callable[[Path], bool]  # may raise a LambdaEclipseError saying what the file is
    only_one: Callable[[str], str]  # the message when the main choice lacks the second part

    def validate(self, main_name, second_name) -> bool | str:
        checks = [self.main.check(main_name)] + ([self.second.check(second_name)] if second_name != self.same else [])
        ok = _validate(*checks)
        if ok is True and second_name == self.same:
            try:
                self.paths(main_name, second_name)
            except LambdaEclipseError as exc:
                return str(exc)
        return ok

    def changed(self, main_name, second_name) -> str:
        names = [(self.main.folders, main_name)]
        if second_name != self.same:
            names.append((self.second.folders, second_name))
        return _changed(*names)

    def paths(self, main_name, second_name) -> tuple[Path, Path]:
        main = self.main.resolve(main_name)
        if second_name != self.same:
            return main, self.second.resolve(second_name)
        if not self.holds_both(main):
            raise ModelFileError(self.only_one(main_name))
        return main, main


# -- nodes -----------------------------------------------------------------------------------------------

class LambdaEclipseLoadPrior:
    DESCRIPTION = (
        "Loads the λ-ECLIPSE prior (34M parameters) from models/lambda_eclipse: one .safetensors file (its "
        "architecture is read from the tensors) or a diffusers-style folder (config.json + diffusion_pytorch_model.safetensors)."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LAMBDA_ECLIPSE_PRIOR",)
    RETURN_NAMES = ("prior",)
    OUTPUT_TOOLTIPS = ("The λ-ECLIPSE prior: turns an interleaved prompt into a CLIP image embedding.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "prior_name": (_names(PRIOR_FOLDERS, _accept_prior, folders=True),
                           {"tooltip": "The prior in models/lambda_eclipse. " + _file_hint("prior")}),
            "dtype": _dtype_input("prior"),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, prior_name):
        return _validate((PRIOR_FOLDERS, prior_name, "λ-ECLIPSE prior", "prior", _accept_prior))

    @classmethod
    def IS_CHANGED(cls, prior_name, dtype="auto"):
        return _changed((PRIOR_FOLDERS, prior_name))

    def load(self, prior_name, dtype="auto"):
        from ..core.prior import load_prior

        path = _resolve(PRIOR_FOLDERS, prior_name, "λ-ECLIPSE prior", "prior")
        torch_dtype = _dtype("prior", dtype)

        def load():
            model = load_prior(path, device=comfy.offload_device(), dtype=torch_dtype)
            return model, comfy.make_patcher("prior", prior=model)

        return (_shared("prior", [path], torch_dtype, prior_name, load),)


class LambdaEclipseLoadCLIP:
    DESCRIPTION = (
        "Loads OpenCLIP ViT-bigG/14 (laion2b_s39b_b160k): the text tower for the prompt and the vision tower for "
        "subjects, edge maps and the blank embedding. SDXL users already have both: SDXL's second text encoder "
        "(clip_g, or the SDXL checkpoint itself) is the text tower, ComfyUI's clip_vision_g.safetensors the vision "
        "tower. An OpenCLIP folder (open_clip_config.json + weights) holds both."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LAMBDA_ECLIPSE_CLIP",)
    RETURN_NAMES = ("clip",)
    OUTPUT_TOOLTIPS = ("OpenCLIP ViT-bigG/14 for Encode Subject, Interleave Prompt, Canny Condition and Prior Sample.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "clip_name": (_names(CLIP_TEXT_FOLDERS, _accept_text, folders=True), {"tooltip": (
                "The bigG text tower: a file in models/text_encoders (or clip), an SDXL checkpoint in models/checkpoints "
                "(only its text-encoder tensors are read), or an OpenCLIP folder holding both towers. Only files that "
                "are a bigG text tower are listed. " + _file_hint("clip_text"))}),
            "dtype": _dtype_input("CLIP"),
        }, "optional": {
            "vision_name": ([SAME_AS_CLIP] + _names(CLIP_VISION_FOLDERS, _accept_vision, folders=False), {
                "default": SAME_AS_CLIP, "tooltip": (
                    "The bigG vision tower in models/clip_vision (ComfyUI's clip_vision_g.safetensors). "
                    f"'{SAME_AS_CLIP}' uses the vision tower of clip_name (an OpenCLIP folder has both). "
                    + _file_hint("clip_vision"))}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, clip_name, vision_name=SAME_AS_CLIP):
        return CLIP_PAIR.validate(clip_name, vision_name)

    @classmethod
    def IS_CHANGED(cls, clip_name, dtype="auto", vision_name=SAME_AS_CLIP):
        return CLIP_PAIR.changed(clip_name, vision_name)

    def load(self, clip_name, dtype="auto", vision_name=SAME_AS_CLIP):
        from ..core.clip import load_clip_towers

        text, vision = CLIP_PAIR.paths(clip_name, vision_name)
        torch_dtype = _dtype("clip", dtype)

        def load():
            encoder = load_clip_towers(text=text, vision=vision, device=comfy.offload_device("text"), dtype=torch_dtype)
            return encoder, comfy.make_patcher("clip", clip=encoder.model)

        name = clip_name if vision == text else f"{clip_name} + {vision_name}"
        return (_shared("clip", dict.fromkeys([text, vision]), torch_dtype, name, load),)


def _holds_both_towers(path: Path) -> bool:
    """An OpenCLIP folder, or a file with both towers; a file that is no bigG tower raises why."""
    if path.is_dir():
        return True
    from ..core.clip_formats import sniff_clip

    return "vision" in sniff_clip(path).towers


def _no_vision_message(clip_name: str) -> str:
    entry = manifest()["clip_vision"]
    return (f"'{clip_name}' holds only the bigG text tower. Pick the vision tower in vision_name: "
            f"models/{entry.folder}/{entry.name} ({entry.size_text()}, {entry.url}).")


class LambdaEclipseLoadDecoder:
    DESCRIPTION = (
        "Loads the Kandinsky 2.2 decoder: the UNet as one file in models/diffusion_models (or unet) and the MoVQ as "
        "one file in models/vae (their configs ship with the pack; a config in the file's metadata wins), or a "
        "diffusers folder (model_index.json, unet/, movq/, scheduler/) in models/diffusers."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LAMBDA_ECLIPSE_DECODER",)
    RETURN_NAMES = ("decoder",)
    OUTPUT_TOOLTIPS = ("The Kandinsky 2.2 decoder: turns image embeddings into pictures.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "decoder_name": (_names(UNET_FOLDERS, _accept_unet, folders=True), {"tooltip": (
                "The Kandinsky 2.2 decoder UNet file (models/diffusion_models or unet), or a whole diffusers decoder "
                "folder (models/diffusers). " + _file_hint("decoder_unet"))}),
            "dtype": _dtype_input("decoder"),
        }, "optional": {
            "movq_name": ([SAME_AS_DECODER] + _names(MOVQ_FOLDERS, _accept_movq, folders=False), {
                "default": SAME_AS_DECODER, "tooltip": (
                    f"The MoVQ image decoder file in models/vae. '{SAME_AS_DECODER}' uses the movq/ of a diffusers "
                    "folder picked in decoder_name. " + _file_hint("decoder_movq"))}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, decoder_name, movq_name=SAME_AS_DECODER):
        return DECODER_PAIR.validate(decoder_name, movq_name)

    @classmethod
    def IS_CHANGED(cls, decoder_name, dtype="auto", movq_name=SAME_AS_DECODER):
        return DECODER_PAIR.changed(decoder_name, movq_name)

    def load(self, decoder_name, dtype="auto", movq_name=SAME_AS_DECODER):
        from ..core.decoder_files import load_decoder_parts

        unet, movq = DECODER_PAIR.paths(decoder_name, movq_name)
        torch_dtype = _dtype("decoder", dtype)

        def load():
            decoder = load_decoder_parts(unet, movq, device=comfy.offload_device(), dtype=torch_dtype)
            return decoder, comfy.make_patcher("decoder", unet=decoder.unet, movq=decoder.movq)

        name = decoder_name if movq == unet else f"{decoder_name} + {movq_name}"
        return (_shared("decoder", dict.fromkeys([unet, movq]), torch_dtype, name, load),)


def _no_movq_message(decoder_name: str) -> str:
    entry = manifest()["decoder_movq"]
    return (f"'{decoder_name}' is a single UNet file: pick the MoVQ in movq_name: models/{entry.folder}/{entry.name} "
            f"({entry.size_text()}, {entry.url}).")


CLIP_PAIR = Pair(
    Slot(CLIP_TEXT_FOLDERS, "bigG text tower", "clip_text", _accept_text, "clip_name"),
    Slot(CLIP_VISION_FOLDERS, "bigG vision tower", "clip_vision", _accept_vision, "vision_name"),
    SAME_AS_CLIP, _holds_both_towers, _no_vision_message,
)
DECODER_PAIR = Pair(
    Slot(UNET_FOLDERS, "Kandinsky 2.2 decoder UNet", "decoder_unet", _accept_unet, "decoder_name"),
    Slot(MOVQ_FOLDERS, "Kandinsky 2.2 MoVQ", "decoder_movq", _accept_movq, "movq_name"),
    SAME_AS_DECODER, lambda path: path.is_dir(), _no_movq_message,
)

NODES = {
    "LambdaEclipseLoadPrior": (LambdaEclipseLoadPrior, "λ-ECLIPSE Load Prior"),
    "LambdaEclipseLoadCLIP": (LambdaEclipseLoadCLIP, "λ-ECLIPSE Load CLIP (bigG)"),
    "LambdaEclipseLoadDecoder": (LambdaEclipseLoadDecoder, "λ-ECLIPSE Load Kandinsky Decoder"),
}
