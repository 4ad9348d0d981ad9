"""Is a model file the real thing? Header-level checks for `check`: it opens, holds the expected tensors and
shapes, has the published size (not a tiny test model), and matches the manifest's byte size when named so.

A verdict is `ok` (the published file), or not ok but `usable` (the pipeline loads it: a tiny test model, another
training run, a file of another byte size — `check` warns, `check --strict` fails), or broken (it would not load:
unreadable, truncated, the wrong part — `check` fails)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelFileError
from .paths import manifest

# Published sizes (parameters counted from the tensors; the prior includes its two 1280-d normalisation buffers).
EXPECTED = {
    "prior": dict(what="λ-ECLIPSE prior", min_parameters=30_000_000, width=512, layers=10, embedding_dim=1280),
    "clip_text": dict(what="bigG text tower", width=1280),
    "clip_vision": dict(what="bigG vision tower", width=1664),
    "decoder_unet": dict(what="Kandinsky 2.2 decoder UNet", min_parameters=1_200_000_000),
    "decoder_movq": dict(what="Kandinsky 2.2 MoVQ", min_parameters=60_000_000),
}


@dataclass
class Verdict:
    key: str
    path: Path
    ok: bool
    message: str
    usable: bool | None = None  # None: the same as ok

    def __post_init__(self):
        if self.usable is None:
            self.usable = self.ok


def _header_parameters(path: Path) -> int:
    from safetensors import safe_open

    weights = path
    if path.is_dir():
        files = sorted(path.rglob("*.safetensors"))
        if not files:
            raise ModelFileError(f"{path} holds no .safetensors file.")
        return sum(_header_parameters(f) for f in files)
    try:
        with safe_open(str(weights), framework="pt") as handle:
            return sum(math.prod(handle.get_slice(k).get_shape()) for k in handle.keys())
    except Exception as exc:
        raise ModelFileError(f"{weights.name} is not a readable .safetensors file ({exc}). Re-download it.") from exc


def _size_matches_manifest(key: str, path: Path) -> str | None:
    """A message when `path`, under the manifest's name, has another byte count than the published file (the
    manifest's, or the one `download` measured when it verified the file in this models folder)."""
    entry = manifest().get(key)
    if entry is None or not path.is_file() or path.name != entry.name:
        return None
    expected = entry.size or _recorded_size(entry, path)
    if not expected:
        return None
    got = path.stat().st_size
    if got != expected:
        return (f"{path} is {got:,} bytes but the published file is {expected:,} bytes: a partial or different "
                f"download. Fetch it again from {entry.url}.")  # check names the download command once, for every file
    return None


def _recorded_size(entry, path: Path) -> int | None:
    """The byte count `download` recorded for this file, read from the models folder it sits in (models/<folder>/name)."""
    from .download import recorded_size

    models_dir = path.parent
    for _ in entry.folder.split("/"):
        models_dir = models_dir.parent
    return recorded_size(entry, models_dir)


def verify(key: str, path: str | Path) -> Verdict:
    """Check one part; never raises for a bad file (the verdict says what is wrong and what to do)."""
    path = Path(path)
    spec = EXPECTED[key]
    try:
        problem = _size_matches_manifest(key, path)
    except OSError:
        problem = None
    try:
        verdict = _verify_content(key, path, spec)
        if verdict.ok and problem:  # right kind and size class, wrong bytes: a partial or other download
            return Verdict(key, path, False, problem, usable=True)
        return verdict  # a tiny or other model says so, whatever its size
    except ModelFileError as exc:
        return Verdict(key, path, False, problem or str(exc))  # unreadable: the byte count says more when known
    except OSError as exc:
        return Verdict(key, path, False, f"{path} could not be read ({exc}).")


def _verify_content(key: str, path: Path, spec: dict) -> Verdict:
    if key == "prior":
        from .prior import sniff_prior

        info = sniff_prior(path)
        if (info.width, info.layers, info.embedding_dim) != (spec["width"], spec["layers"], spec["embedding_dim"]) \
                or info.parameters < spec["min_parameters"]:
            return Verdict(key, path, False, usable=True, message=(
                f"{path} is a λ-ECLIPSE-style prior but not the published one ({info.layers} blocks, width "
                f"{info.width}, {info.embedding_dim}-d, {info.parameters:,} parameters; published: 10 blocks, width 512, "
                "1280-d, 34.8M): a tiny test model or another training run. Use the published prior."))
        return Verdict(key, path, True, f"{spec['what']}: {info.parameters:,} parameters")
    if key in ("clip_text", "clip_vision"):
        from .clip_formats import sniff_clip

        info = sniff_clip(path)
        tower = key.split("_")[1]
        if tower not in info.towers:
            return Verdict(key, path, False, f"{path} holds no {spec['what']} ({info.description}).")
        width = info.text_width if tower == "text" else info.vision_width
        if width != spec["width"]:
            return Verdict(key, path, False, usable=True, message=(
                f"{path} is a CLIP {tower} tower of width {width}, not the published bigG's {spec['width']}: a tiny "
                "test model or another CLIP. λ-ECLIPSE needs OpenCLIP ViT-bigG/14."))
        return Verdict(key, path, True, f"{spec['what']}: {info.description}")
    if path.is_file():
        from .decoder_files import sniff_decoder_file

        part = sniff_decoder_file(path)
        if part != key.split("_")[1]:
            return Verdict(key, path, False, f"{path} is the decoder's {part}, not its {key.split('_')[1]}: swap the two files.")
        parameters = _header_parameters(path)
    else:
        sub = path / key.split("_")[1]
        if not sub.is_dir():
            return Verdict(key, path, False, f"{path} has no {sub.name}/ folder: it is not a Kandinsky 2.2 decoder folder.")
        parameters = _header_parameters(sub)
    if parameters < spec["min_parameters"]:
        return Verdict(key, path, False, usable=True, message=(
            f"{path} has {parameters:,} parameters, far fewer than the published {spec['what']}: a tiny test model. "
            "Use the published weights."))
    return Verdict(key, path, True, f"{spec['what']}: {parameters:,} parameters")


def check_loadable(paths) -> None:
    """Read every chosen file's header before anything is loaded, so that a wrong or broken file is named at
    once rather than after minutes of loading the others. Raises the sniffer's ModelFileError."""
    from .clip_formats import sniff_clip
    from .decoder_files import sniff_decoder_file
    from .prior import sniff_prior

    paths = dict(getattr(paths, "paths", paths))
    prior = paths.get("prior")
    if prior is not None and (Path(prior).is_dir() or Path(prior).suffix.lower() == ".safetensors"):
        sniff_prior(prior)
    for key, tower in (("clip_text", "text"), ("clip_vision", "vision"), ("clip", None)):
        path = paths.get(key)
        if path is None:
            continue
        info = sniff_clip(path)
        if tower is not None and tower not in info.towers:
            raise ModelFileError(f"{path} holds no bigG {tower} tower ({info.description}).")
    for key, part in (("decoder_unet", "unet"), ("decoder_movq", "movq")):
        path = paths.get(key)
        if path is None or Path(path).is_dir():
            continue
        found = sniff_decoder_file(path)
        if found != part:
            raise ModelFileError(f"{path} is the decoder's {found}, not its {part}: swap the two files.")
