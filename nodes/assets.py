"""Copy the example images the bundled workflows load into ComfyUI's input folder (never overwriting)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from . import comfy

log = logging.getLogger("lambda_eclipse")

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
# Top level of input/ (LoadImage lists only that), with a prefix so they sort together and never clash.
PREFIX = "lambda_eclipse_"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}


def asset_files() -> list[Path]:
    if not ASSETS_DIR.is_dir():
        return []
    return sorted(p for p in ASSETS_DIR.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def input_name(asset: Path) -> str:
    """The name a workflow's LoadImage uses for a bundled asset."""
    return PREFIX + asset.name


def install_assets(target: str | Path | None = None) -> list[Path]:
    """Copy missing assets into `target` (default: ComfyUI's input folder). Fails soft: logs, never raises."""
    try:
        target = Path(target) if target is not None else comfy.input_dir()
        if target is None:
            return []
        target.mkdir(parents=True, exist_ok=True)
        copied = []
        for asset in asset_files():
            dest = target / input_name(asset)
            if dest.exists():  # the user's file (or an earlier copy) wins
                continue
            tmp = dest.with_name(dest.name + ".tmp")
            shutil.copyfile(asset, tmp)
            tmp.replace(dest)
            copied.append(dest)
        if copied:
            log.info("copied %d λ-ECLIPSE example image(s) into %s", len(copied), target)
        return copied
    except Exception as exc:  # a read-only input folder must not stop the pack from loading
        log.warning("could not copy the λ-ECLIPSE example images into the input folder (%s); the bundled workflows "
                    "will need their images picked by hand", exc)
        return []
