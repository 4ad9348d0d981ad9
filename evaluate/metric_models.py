"""The metric models in one folder: where --dino / --clip-eval default to under --metric-models DIR, and their
download (only when asked) through core.download with this folder's manifest, metric_models.json.

Layout: DIR/dino-vits16/ (facebook/dino-vits16: config.json, preprocessor_config.json, pytorch_model.bin) and
DIR/clip-vit-b-32-openai/ (timm/vit_base_patch32_clip_224.openai: open_clip_config.json,
open_clip_model.safetensors), the layouts DinoEmbedder and ClipEmbedder load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

from .metrics import MetricModelError

MANIFEST_PATH = Path(__file__).with_name("metric_models.json")
GROUPS = ("dino", "clip")
_WHAT = {"dino": ("--dino", "DINO ViT-S/16"), "clip": ("--clip-eval", "the evaluation CLIP ViT-B/32")}


def manifest():
    from ..core.download import load_manifest

    return load_manifest(MANIFEST_PATH)


def folders(root) -> dict[str, Path]:
    """{'dino': DIR/<its folder>, 'clip': DIR/<its folder>} from the manifest."""
    out: dict[str, Path] = {}
    for entry in manifest():
        out.setdefault(entry.group, Path(root).expanduser() / entry.folder)
    return out


def missing_files(root, groups: Iterable[str] = GROUPS) -> dict[str, list[Path]]:
    """The manifest files not yet under `root`, per group (only groups with something missing)."""
    out: dict[str, list[Path]] = {}
    for entry in manifest():
        if entry.group in groups and not entry.dest(Path(root).expanduser()).is_file():
            out.setdefault(entry.group, []).append(entry.dest(Path(root).expanduser()))
    return out


def download_metric_models(root, only: Iterable[str] | None = None, log: Callable[[str], None] = print):
    """Fetch the metric models (all, or the groups 'dino' / 'clip') into `root`; files in place are checked and
    skipped. Raises core.errors.MissingModelsError listing what could not be fetched (offline, network)."""
    from ..core.download import download_models

    return download_models(root, only=list(only) if only is not None else None, manifest=MANIFEST_PATH, log=log)


def resolve_metric_models(dino, clip_eval, root=None, download: bool = False,
                          log: Callable[[str], None] = print) -> tuple[str, str]:
    """(DINO path, evaluation CLIP path). A path given explicitly wins; otherwise it is the folder under `root`
    (--metric-models), fetched first when `download` and something is missing. Nothing is loaded here."""
    from ..core.errors import InputError

    given = {"dino": dino, "clip": clip_eval}
    if download and not root and not all(given.values()):
        raise InputError("--download needs --metric-models DIR: the folder to put the metric models in (e.g. "
                         "ComfyUI/models/metrics), unless --dino and --clip-eval are both given.")
    if root:
        wanted = [g for g in GROUPS if not given[g]]
        missing = missing_files(root, wanted)
        if missing and download:
            download_metric_models(root, only=list(missing), log=log)
        elif missing:
            lines = [f"  {p}" for group in missing for p in missing[group]]
            raise MetricModelError(f"--metric-models {root}: missing\n" + "\n".join(lines)
                                   + "\nAdd --download to fetch them (about 700 MB, once), run "
                                   f"`python -m lambda_eclipse.evaluate download-metrics --metric-models {root}`, "
                                   "or give --dino / --clip-eval.")
        default = folders(root)
        given = {g: given[g] or str(default[g]) for g in GROUPS}
    for group in GROUPS:
        if not given[group]:
            flag, what = _WHAT[group]
            raise InputError(f"{flag} is needed to score: {what} as a local folder/file, or --metric-models DIR "
                             "(add --download to fetch the models there; see EVALUATION.md).")
    return given["dino"], given["clip"]
