"""Where the three models live in a ComfyUI `models/` tree, and the one message that lists what is missing."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import MissingModelsError

# Relative to ComfyUI's models/ folder. The README documents exactly these.
DEFAULT_LAYOUT = {
    "prior": "lambda_eclipse/Lambda-ECLIPSE-Prior-v1.0",
    "clip": "lambda_eclipse/CLIP-ViT-bigG-14-laion2B-39B-b160k",
    "decoder": "diffusers/kandinsky-2-2-decoder",
}

# Where else each model is looked for, so an existing download can be reused.
SEARCH_FOLDERS = {
    "prior": ("lambda_eclipse",),
    "clip": ("lambda_eclipse", "text_encoders", "clip"),
    "decoder": ("diffusers", "lambda_eclipse"),
}


@dataclass(frozen=True)
class ModelSpec:
    key: str
    what: str
    files: tuple[str, ...]
    url: str

    def describe(self, models_dir: Path | None = None) -> str:
        where = (models_dir / DEFAULT_LAYOUT[self.key]) if models_dir else Path("models") / DEFAULT_LAYOUT[self.key]
        files = "\n".join(f"      {where / f}" for f in self.files)
        return f"  - {self.what}: put\n{files}\n    download: {self.url}"


SPECS = {
    "prior": ModelSpec(
        "prior", "λ-ECLIPSE prior (34M)",
        ("config.json", "diffusion_pytorch_model.safetensors"),
        "https://huggingface.co/ECLIPSE-Community/Lambda-ECLIPSE-Prior-v1.0",
    ),
    "clip": ModelSpec(
        "clip", "OpenCLIP ViT-bigG/14 laion2b_s39b_b160k (text + vision)",
        ("open_clip_config.json", "open_clip_model.safetensors"),
        "https://huggingface.co/laion/CLIP-ViT-bigG-14-laion2B-39B-b160k",
    ),
    "decoder": ModelSpec(
        "decoder", "Kandinsky 2.2 decoder (diffusers folder)",
        ("model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
         "movq/config.json", "movq/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json"),
        "https://huggingface.co/kandinsky-community/kandinsky-2-2-decoder",
    ),
}


def _looks_like(key: str, folder: Path) -> bool:
    if key == "prior":
        return (folder / "config.json").is_file() and any(
            (folder / n).is_file() for n in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
        ) and not (folder / "model_index.json").exists()
    if key == "clip":
        return (folder / "open_clip_config.json").is_file()
    if key == "decoder":
        return (folder / "model_index.json").is_file() and (folder / "unet").is_dir() and (folder / "movq").is_dir()
    raise KeyError(key)


def find_model(key: str, models_dir: str | Path) -> Path | None:
    """The default location first, then any matching folder (one level deep) in the search folders."""
    models_dir = Path(models_dir)
    default = models_dir / DEFAULT_LAYOUT[key]
    if default.exists() and (default.is_file() or _looks_like(key, default)):
        return default
    for sub in SEARCH_FOLDERS[key]:
        base = models_dir / sub
        if not base.is_dir():
            continue
        for candidate in sorted(base.iterdir()):
            if candidate.is_dir() and _looks_like(key, candidate):
                return candidate
        if key == "prior":
            files = sorted(p for p in base.glob("*.safetensors") if "prior" in p.name.lower() or "eclipse" in p.name.lower())
            if files:
                return files[0]
    return None


def resolve_models(models_dir: str | Path | None = None, **explicit: str | Path | None) -> dict[str, Path]:
    """Explicit paths override; the rest come from `models_dir`. Raises one error listing everything missing."""
    found: dict[str, Path] = {}
    missing: list[str] = []
    for key in ("prior", "clip", "decoder"):
        given = explicit.get(key)
        if given:
            path = Path(given)
            if path.exists():
                found[key] = path
                continue
            missing.append(f"  - {SPECS[key].what}: {path} does not exist.\n" + SPECS[key].describe(Path(models_dir) if models_dir else None))
            continue
        path = find_model(key, models_dir) if models_dir else None
        if path is None:
            missing.append(SPECS[key].describe(Path(models_dir) if models_dir else None))
        else:
            found[key] = path
    if missing:
        hint = "" if models_dir else " (no --models folder was given)"
        raise MissingModelsError(
            f"Model files are missing{hint}. Download each and place it as shown:\n" + "\n".join(missing)
        )
    return found
