"""Where results go: check the output path before any work, write images atomically, check the image size.

`check_output_path` runs before a model is loaded, so a bad `--out` costs nothing; `save_image_atomic`
(through core.fsio, the pack's one writer) never leaves a half-written file (or a temporary one) behind, never
damages the file it replaces unless the new one is complete, and without overwrite never replaces one at all.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import InputError, OutputPathError

SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
MIN_SIDE = 64
MAX_SIDE = 4096


def _list(items) -> str:
    items = list(items)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " or " + items[-1]


def batch_paths(path, count: int) -> list[Path]:
    """The files a run writes: `path` for one image, `stem_1.ext … stem_N.ext` for a batch (as cli.save_images)."""
    path = Path(path)
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}_{i}{path.suffix}") for i in range(1, count + 1)]


def _cannot_write(folder: Path) -> str | None:
    """None when a file can be created in `folder` (tried for real: permissions, ACLs, read-only disks), else why not."""
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".lambda_eclipse-write-test-")
    except OSError as exc:
        return exc.strerror or str(exc)
    os.close(fd)
    try:
        os.unlink(probe)
    except OSError:
        pass
    return None


def check_output_path(
    path,
    count: int = 1,
    overwrite: bool = False,
    suffixes=SUFFIXES,
    what: str = "--out",
    overwrite_hint: str = "pass --overwrite",
) -> list[Path]:
    """The final file paths of a run writing `count` images to `path`, or an OutputPathError. Run it before any work.

    Checks: a known extension (case-insensitive), not a folder, a parent folder that exists or can be
    created and is writable, and no existing file among the paths unless `overwrite`. Creates nothing.
    """
    suffixes = tuple(s.lower() for s in suffixes)
    raw = "" if path is None else str(path)
    if not raw.strip():
        raise OutputPathError(f"{what} is empty. Give an output file name such as result.png.")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise InputError(f"The number of images to write must be ≥ 1; got {count!r}.")
    if raw.endswith(("/", os.sep)):
        raise OutputPathError(
            f"{what} {raw!r} names a folder. Give a file name inside it, e.g. {os.path.join(raw, 'result' + suffixes[0])}."
        )
    out = Path(os.path.expanduser(raw))
    if out.is_dir():
        raise OutputPathError(
            f"{what} {raw!r} is an existing folder. Give a file name inside it, e.g. {out / ('result' + suffixes[0])}."
        )
    suffix = out.suffix.lower()
    if not suffix:
        raise OutputPathError(
            f"{what} {raw!r} has no extension, so the image format is unknown. End it with {_list(suffixes)}, "
            f"e.g. {out.name}{suffixes[0]}."
        )
    if suffix not in suffixes:
        raise OutputPathError(
            f"{what} {raw!r}: {out.suffix!r} is not a format this can write. End it with {_list(suffixes)}."
        )
    if suffix == ".webp":
        from PIL import features

        if not features.check("webp"):
            raise OutputPathError(f"{what} {raw!r}: this Pillow was built without WebP support. Use .png or .jpg.")

    parent = out.parent if str(out.parent) else Path(".")
    existing = parent
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise OutputPathError(
            f"{what} {raw!r}: the folder {str(parent)!r} cannot be created because {str(existing)!r} is a file. "
            "Choose another folder."
        )
    why = _cannot_write(existing)
    if why is not None:
        where = "" if existing == parent else f" (needed to create {str(parent)!r})"
        raise OutputPathError(
            f"{what} {raw!r}: the folder {str(existing)!r} is not writable{where}: {why}. Choose a folder you can "
            "write to, or fix its permissions."
        )

    paths = batch_paths(out, count)
    folders = [p for p in paths if p.is_dir()]
    if folders:
        raise OutputPathError(
            f"{what} {raw!r}: {', '.join(map(str, folders))} {'is a folder' if len(folders) == 1 else 'are folders'} "
            "where an image would be written. Choose another name."
        )
    if not overwrite:
        taken = [p for p in paths if p.exists()]
        if taken:
            names = ", ".join(str(p) for p in taken[:10]) + (f" and {len(taken) - 10} more" if len(taken) > 10 else "")
            verb = "already exists" if len(taken) == 1 else "already exist"
            raise OutputPathError(
                f"{names} {verb}; nothing was overwritten. Choose another {what}, or {overwrite_hint} to replace "
                f"{'it' if len(taken) == 1 else 'them'}."
            )
    return paths


def check_size(width, height, max_side: int = MAX_SIDE, min_side: int = MIN_SIDE, names=("--width", "--height")) -> tuple[int, int]:
    """(width, height) as ints when both are in min_side … max_side pixels, else an InputError stating the range.

    The decoder rounds each side up to a multiple of 64; its latents are (side / 8) a side and its
    attention memory grows with their number, so very large images run out of memory.
    """
    out = []
    for value, name in zip((width, height), names):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise InputError(f"{name} must be a whole number of pixels ({min_side} … {max_side}); got {value!r}.")
        value = int(value)
        if not min_side <= value <= max_side:
            raise InputError(
                f"{name} {value} is out of range: choose {min_side} … {max_side} pixels (rounded up to a multiple of "
                f"64; Kandinsky 2.2 works best at 512 … 1024). The limit is memory: the decoder's latents are "
                f"{max_side // 8}×{max_side // 8} at {max_side}×{max_side}, and larger ones run out of memory."
            )
        out.append(value)
    return out[0], out[1]


def _as_pil(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    if hasattr(image, "detach") and hasattr(image, "cpu"):
        image = image.detach().cpu()
        image = image.float().numpy() if image.is_floating_point() else image.numpy()
    array = np.asarray(image)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise InputError(f"Expected an image [H,W,3] to save, got an array of shape {array.shape}.")
    if array.dtype != np.uint8:
        # the same rounding as cli.save_images: clamp to 0…1, ×255, +0.5, truncate
        array = (np.clip(array.astype(np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    mode = "L" if array.ndim == 2 else ("RGB" if array.shape[-1] == 3 else "RGBA")
    return Image.fromarray(np.ascontiguousarray(array), mode)


def save_image_atomic(image, path, *, overwrite: bool = True, **save_options) -> Path:
    """Write `image` (PIL, [H,W,3(4)] uint8 or 0…1 float array/tensor) to `path` atomically; return the path.

    Written by the pack's one writer, core.fsio.atomic_write: the image goes to `.<name>.tmp-XXXX<suffix>` in the
    same folder, is flushed and fsync'ed, then takes the name `path`: `path` is either the old file or the complete
    new one. With overwrite=False an existing `path` is never replaced, even by a run racing this one
    (OutputExistsError). The file gets mode 0o666 & ~umask, like any file the user creates. On any error the
    temporary file is removed and the old file is left as it was. The format follows the suffix (.png, .jpg/.jpeg,
    .webp; others as Pillow knows them); JPEG gets RGB (an alpha channel is dropped).
    """
    from .fsio import atomic_write

    path = Path(path)
    pil = _as_pil(image)
    suffix = path.suffix.lower()
    fmt = _FORMATS.get(suffix) or Image.registered_extensions().get(suffix)
    if fmt is None:
        raise OutputPathError(f"{path}: {path.suffix or 'no extension'} is not an image format. Use {_list(SUFFIXES)}.")
    if fmt == "JPEG" and pil.mode not in ("RGB", "L", "CMYK"):
        pil = pil.convert("RGB")

    def write(tmp: Path):
        with open(tmp, "wb") as handle:
            pil.save(handle, format=fmt, **save_options)

    return atomic_write(path, write, overwrite=overwrite)
