"""Where the models live in a ComfyUI `models/` tree, and the one message that lists what is missing.

Five single files under ComfyUI's standard folders (the names the bundled workflows use, listed in the
shipped `manifest.json`) come first; the older folder layout and any other compatible file are found too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterable

from .download import GROUPS as _GROUPS
from .download import MANIFEST_PATH, ManifestEntry, human_size, load_manifest  # noqa: F401
from .errors import InputError, MissingModelsError, ModelFileError

# The pack's first release kept whole folders; they still load (relative to models/).
LEGACY_LAYOUT = {
    "prior": "lambda_eclipse/Lambda-ECLIPSE-Prior-v1.0",
    "clip": "lambda_eclipse/CLIP-ViT-bigG-14-laion2B-39B-b160k",
    "decoder": "diffusers/kandinsky-2-2-decoder",
}
DEFAULT_LAYOUT = LEGACY_LAYOUT  # kept for callers of the first release

# ComfyUI maps the legacy folder names onto the new ones; outside ComfyUI we do the same.
FOLDER_ALIASES = {
    "text_encoders": ("text_encoders", "clip"),
    "diffusion_models": ("diffusion_models", "unet"),
}

# Which manifest entries make up each model (the groups `download --only` accepts).
GROUPS = _GROUPS
PARTS = tuple(part for parts in GROUPS.values() for part in parts)
ModelFile = ManifestEntry  # one weight file of the manifest: where it comes from and where it goes


@lru_cache(maxsize=None)
def _manifest(path: str) -> dict[str, ManifestEntry]:
    return {entry.key: entry for entry in load_manifest(path)}


def manifest(path: str | os.PathLike | None = None) -> dict[str, ManifestEntry]:
    """key → entry of the shipped manifest (or another one)."""
    return _manifest(str(path or MANIFEST_PATH))


# Where `check` and `download` look when --models is not given, in this order.
MODELS_ENV_HELP = "$COMFYUI_MODELS, else $COMFYUI_PATH/models"


def default_models_dir() -> tuple[str | None, str]:
    """(the models folder from the environment, which variable gave it) — $COMFYUI_MODELS first, then
    $COMFYUI_PATH/models; (None, '') when neither is set."""
    if os.environ.get("COMFYUI_MODELS"):
        return os.environ["COMFYUI_MODELS"], "$COMFYUI_MODELS"
    if os.environ.get("COMFYUI_PATH"):
        return str(Path(os.environ["COMFYUI_PATH"]) / "models"), "$COMFYUI_PATH/models"
    return None, ""


def folder_candidates(models_dir: Path, folder: str) -> list[Path]:
    return [models_dir / alias for alias in FOLDER_ALIASES.get(folder, (folder,))]


# -- what a file is (header only; the sniffers cache by file signature) ------------------------------

def _sniff_ok(check: Callable[[Path], object]) -> Callable[[Path], bool]:
    def accept(path: Path) -> bool:
        try:
            check(path)
            return True
        except ModelFileError:
            return False
        except OSError:
            return False

    return accept


def is_prior_file(path: Path) -> bool:
    from .prior import sniff_prior

    return _sniff_ok(sniff_prior)(path)


def clip_towers(path: Path) -> frozenset:
    """{'text', 'vision'} ⊇ the bigG towers a file or folder holds (empty when it is not a bigG tower)."""
    from .clip_formats import sniff_clip

    try:
        return frozenset(sniff_clip(path).towers)
    except (ModelFileError, OSError):
        return frozenset()


def decoder_part(path: Path) -> str | None:
    """'unet' or 'movq' for a single Kandinsky 2.2 decoder file, None otherwise."""
    from .decoder_files import sniff_decoder_file

    try:
        return sniff_decoder_file(path)
    except (ModelFileError, OSError):
        return None


def is_decoder_folder(path: Path) -> bool:
    return (path / "model_index.json").is_file() and (path / "unet").is_dir() and (path / "movq").is_dir()


def is_openclip_folder(path: Path) -> bool:
    return (path / "open_clip_config.json").is_file()


def is_prior_folder(path: Path) -> bool:
    return (path / "config.json").is_file() and not (path / "model_index.json").exists() and any(
        (path / n).is_file() for n in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"))


def _files(bases: Iterable[Path], suffixes=(".safetensors", ".sft")) -> list[Path]:
    out = []
    for base in bases:
        if not base.is_dir():
            continue
        for root, dirs, files in os.walk(base, followlinks=True):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            out.extend(Path(root) / f for f in sorted(files) if Path(f).suffix.lower() in suffixes)
    return out


def _folders(bases: Iterable[Path], accept: Callable[[Path], bool]) -> list[Path]:
    out = []
    for base in bases:
        if base.is_dir():
            out.extend(p for p in sorted(base.iterdir()) if p.is_dir() and accept(p))
    return out


# -- resolving ---------------------------------------------------------------------------------------

@dataclass
class ResolvedModels:
    """The paths to load, plus one line per model saying which was chosen and why."""

    paths: dict[str, Path] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def __getitem__(self, key):
        return self.paths[key]

    def __contains__(self, key):
        return key in self.paths

    def get(self, key, default=None):
        return self.paths.get(key, default)

    def describe(self) -> str:
        return "\n".join(self.notes)


def _first(models_dir: Path, entry: ModelFile, finders: list[tuple[str, Callable[[], Path | None]]]):
    """The manifest's default name first, then each finder in order: (path, how it was found)."""
    for base in folder_candidates(models_dir, entry.folder):
        candidate = base / entry.name
        if candidate.is_file():
            return candidate, "default name"
    for how, finder in finders:
        found = finder()
        if found is not None:
            return found, how
    return None, None


def find_models(models_dir: str | Path, needed: Iterable[str] = PARTS) -> ResolvedModels:
    """Find every part in `needed` under a ComfyUI models/ folder (missing ones are simply absent)."""
    models_dir = Path(models_dir)
    entries = manifest()
    found = ResolvedModels()
    needed = set(needed)

    def note(key, path, how):
        found.paths[key] = path
        found.notes.append(f"{key}: {path} ({how})")

    def first_match(paths, accept):
        return next((p for p in paths if accept(p)), None)

    legacy = {k: models_dir / v for k, v in LEGACY_LAYOUT.items()}
    if "prior" in needed:
        path, how = _first(models_dir, entries["prior"], [
            ("folder of the first release", lambda: legacy["prior"] if is_prior_folder(legacy["prior"]) else None),
            ("a prior found in models/lambda_eclipse", lambda: first_match(
                _files([models_dir / "lambda_eclipse"]) + _folders([models_dir / "lambda_eclipse"], is_prior_folder),
                is_prior_file)),
        ])
        if path is not None:
            note("prior", path, how)

    openclip = legacy["clip"] if is_openclip_folder(legacy["clip"]) else None
    if openclip is None:
        openclip = next(iter(_folders([models_dir / f for f in ("lambda_eclipse", "text_encoders", "clip")],
                                      is_openclip_folder)), None)
    if "clip_text" in needed:
        text_bases = folder_candidates(models_dir, "text_encoders")
        path, how = _first(models_dir, entries["clip_text"], [
            ("OpenCLIP folder, both towers", lambda: openclip),
            ("a bigG text tower found by its tensors", lambda: first_match(_files(text_bases), lambda p: "text" in clip_towers(p))),
            ("the bigG text tower inside an SDXL checkpoint", lambda: first_match(
                _files([models_dir / "checkpoints"]), lambda p: "text" in clip_towers(p))),
        ])
        if path is not None:
            note("clip_text", path, how)
    if "clip_vision" in needed:
        text_choice = found.paths.get("clip_text")
        path, how = _first(models_dir, entries["clip_vision"], [
            ("same source as the text tower", lambda: text_choice if text_choice is not None and "vision" in clip_towers(text_choice) else None),
            ("OpenCLIP folder, both towers", lambda: openclip),
            ("a bigG vision tower found by its tensors", lambda: first_match(
                _files([models_dir / "clip_vision"]), lambda p: "vision" in clip_towers(p))),
        ])
        if path is not None:
            note("clip_vision", path, how)

    folder = legacy["decoder"] if is_decoder_folder(legacy["decoder"]) else next(
        iter(_folders([models_dir / "diffusers", models_dir / "lambda_eclipse"], is_decoder_folder)), None)
    for key, part, base in (("decoder_unet", "unet", "diffusion_models"), ("decoder_movq", "movq", "vae")):
        if key not in needed:
            continue
        path, how = _first(models_dir, entries[key], [
            ("diffusers folder", lambda: folder),
            (f"a Kandinsky 2.2 {part} found by its tensors", lambda part=part, base=base: first_match(
                _files(folder_candidates(models_dir, base)), lambda p: decoder_part(p) == part)),
        ])
        if path is not None:
            note(key, path, how)
    return found


def resolve_models(
    models_dir: str | Path | None = None,
    *,
    prior=None, clip=None, clip_text=None, clip_vision=None, decoder=None, decoder_unet=None, decoder_movq=None,
    needed: Iterable[str] = PARTS,
) -> ResolvedModels:
    """Explicit paths override; the rest come from `models_dir`. Raises one error naming each missing file.

    `clip` is a source holding both towers (OpenCLIP folder or file); `decoder` a diffusers folder. Their
    parts can also be given one by one (`clip_text`/`clip_vision`, `decoder_unet`/`decoder_movq`).
    """
    if clip and not (clip_text and clip_vision) and Path(clip).exists():
        # One source named for both towers: use it for the towers it holds, find the other as usual.
        towers = clip_towers(Path(clip)) or frozenset({"text", "vision"})  # unknown: let the loader explain
        clip_text = clip_text or (clip if "text" in towers else None)
        clip_vision = clip_vision or (clip if "vision" in towers else None)
    elif clip:
        clip_text, clip_vision = clip_text or clip, clip_vision or clip
    explicit = {
        "prior": prior,
        "clip_text": clip_text,
        "clip_vision": clip_vision,
        "decoder_unet": decoder_unet or decoder,
        "decoder_movq": decoder_movq or decoder,
    }
    needed = [p for p in PARTS if p in set(needed)]
    entries = manifest()
    result = ResolvedModels()
    problems: list[str] = []
    folder_note = ""
    if models_dir and Path(models_dir).expanduser().exists() and not Path(models_dir).expanduser().is_dir():
        raise InputError(f"--models {models_dir} is a file, not a folder. Give the ComfyUI models/ folder (the one "
                         "holding checkpoints/, vae/, clip_vision/ …), or name the files one by one (--prior, "
                         "--clip-text, …).")
    if models_dir and not Path(models_dir).expanduser().exists():
        folder_note = (f" The --models folder {models_dir} does not exist: check the path (it is the models/ folder "
                       "inside your ComfyUI folder).")
    for key in needed:
        given = explicit[key]
        if given:
            path = Path(given).expanduser()
            if path.exists():
                result.paths[key] = path
                result.notes.append(f"{key}: {path} (given)")
            else:
                problems.append(f"  - {entries[key].what}: {path} does not exist.")
    rest = [k for k in needed if k not in result.paths and not explicit[k]]
    if rest and models_dir:
        found = find_models(models_dir, rest)
        result.paths.update(found.paths)
        result.notes.extend(found.notes)
    for key in rest:
        if key not in result.paths:
            problems.append(entries[key].describe(Path(models_dir) if models_dir else None))
    if problems:
        hint = "" if models_dir else " (no --models folder was given)"
        raise MissingModelsError(
            f"Model files are missing{hint}.{folder_note} Download each and place it as shown (or run "
            f"`python -m lambda_eclipse download --models <ComfyUI>/models`):\n" + "\n".join(problems)
        )
    return result
