"""Reading subject images and masks: open and decode up front, 8-bit RGB from any depth, alpha as the subject.

- `open_image` fails at once, with one message naming the file and what to do, on a missing, empty,
  damaged, non-image or over-large file (the size is checked from the header, before decoding).
- `to_rgb8` turns a PIL image, an array or a tensor (what `clip.to_pil` accepts) into 8-bit RGB plus
  its alpha (None when there is no real transparency). 16-bit data is scaled by its real range.
- `subject_on_white` composites the subject on white, as the paper prepares subjects: the alpha
  (and/or an explicit mask, 1 = subject) says what is subject. Cropping to the mask box is left to
  `clip.prepare_subject`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .fsio import not_regular_reason
from .errors import ImageFileError, InputError

MAX_PIXELS = 64_000_000  # 64 megapixels: far above what a subject needs (CLIP sees 224×224)
_SIXTEEN_BIT = {"I;16", "I;16B", "I;16L", "I;16N"}
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}


def _megapixels(pixels: float) -> str:
    return f"{pixels / 1e6:.3g} megapixels"


def _sniff(path: Path) -> str:
    """A hint from the first bytes of a file Pillow cannot identify."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(64)
    except OSError:
        return ""
    if head[4:8] == b"ftyp":
        brand = head[8:12].decode("ascii", "replace")
        if brand.startswith(("hei", "hev", "mif", "msf")):
            return " It is a HEIC/HEIF photo (iPhone), which Pillow cannot read: export it as JPEG or PNG."
        if brand.startswith("avi"):
            return " It is an AVIF image, which this Pillow cannot read: convert it to PNG or JPEG."
        return " It looks like a video or MP4-family file, not a still image."
    if head.lstrip()[:1] in (b"<", b"{", b"[") or (head and all(32 <= b < 127 or b in (9, 10, 13) for b in head)):
        return " It looks like a text file (HTML, JSON or a download error page?), not an image."
    return ""


def open_image(path, what: str = "subject image", max_pixels: int | None = MAX_PIXELS) -> Image.Image:
    """Open AND fully decode an image file, EXIF orientation applied; ImageFileError naming the file otherwise.

    `max_pixels` (None: no cap of ours) is checked from the header before any pixel is decoded. The
    returned image is detached from the file (no open handle). Multi-frame files give their first frame.
    """
    path = Path(os.path.expanduser(str(path)))
    name = f"The {what} {str(path)!r}"
    if not path.exists():
        hint = "" if path.is_absolute() else f" (relative paths start from the current folder, {os.getcwd()})"
        raise ImageFileError(f"{name} does not exist. Check the path{hint}.")
    if path.is_dir():
        raise ImageFileError(f"{name} is a folder, not an image file. Give the path of a .png or .jpg file.")
    reason = not_regular_reason(path)
    if reason is not None:
        raise ImageFileError(f"{name} {reason}. Give the path of a .png or .jpg file.")
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ImageFileError(f"{name} cannot be read ({exc.strerror or exc}). Check its permissions.") from exc
    if size == 0:
        raise ImageFileError(f"{name} is empty (0 bytes): it was not fully copied or downloaded. Copy it again.")
    try:
        with Image.open(path) as im:
            width, height = im.size
            if max_pixels is not None and width * height > max_pixels:
                raise ImageFileError(
                    f"{name} is {width}×{height} ({_megapixels(width * height)}), over the {_megapixels(max_pixels)} "
                    f"limit for a {what}. Downscale it first: a subject needs only a few hundred pixels a side "
                    "(CLIP sees 224×224)."
                )
            im.load()  # decode everything now: a damaged file fails here, not in the middle of a run
            try:
                out = ImageOps.exif_transpose(im)  # a new image, detached from the file
            except Exception:  # broken EXIF: keep the pixels as stored
                out = im.copy()
    except ImageFileError:
        raise
    except Image.DecompressionBombError as exc:
        limit = max_pixels if max_pixels is not None else 2 * (Image.MAX_IMAGE_PIXELS or 0)
        raise ImageFileError(
            f"{name} is too large to open safely ({exc}). The limit is {_megapixels(limit)}: downscale it first "
            "(a subject needs only a few hundred pixels a side)."
        ) from exc
    except UnidentifiedImageError as exc:
        raise ImageFileError(
            f"{name} is not an image Pillow can read.{_sniff(path)} Save it as PNG or JPEG and try again."
        ) from exc
    except PermissionError as exc:
        raise ImageFileError(f"{name} cannot be read (permission denied). Check its permissions.") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageFileError(
            f"{name} could not be decoded ({exc}). The file is damaged or was cut short (an interrupted download "
            "or copy?): open and re-save it in an image editor, or copy it again."
        ) from exc
    return out


# -- any image → 8-bit RGB (+ alpha) ---------------------------------------------------------------------

def _scale_to_uint8(array: np.ndarray, scale: float | None, what: str) -> np.ndarray:
    """uint8 from bool / uint8 / 16-bit / other ints / floats. `scale`: the value that means full intensity."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.floating) and scale is None:
        if array.size and not np.isfinite(array).all():
            raise InputError(f"The {what} contains NaN or infinite values. Check the node or code that made it.")
        top = float(array.max()) if array.size else 0.0
        if top > 2.0:
            raise InputError(
                f"The {what} is a float image with values up to {top:g}; float images must be 0…1 (ComfyUI IMAGE). "
                "Divide it by 255, or pass it as uint8."
            )
        return (np.clip(array.astype(np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer) and scale is None:
        if array.dtype.itemsize == 2 and np.issubdtype(array.dtype, np.unsignedinteger):
            scale = 65535.0
        else:
            low = int(array.min()) if array.size else 0
            high = int(array.max()) if array.size else 0
            if low < 0 or high > 65535:
                raise InputError(
                    f"The {what} is an {array.dtype} image with values {low}…{high}; expected 0…255 or 0…65535 "
                    "(16-bit). Convert it to uint8 or uint16 first."
                )
            scale = 255.0 if high <= 255 else 65535.0
    values = array.astype(np.float64) / float(scale)
    return (np.clip(values, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _alpha_or_none(alpha8: np.ndarray) -> np.ndarray | None:
    """Alpha 0…1 (1 = opaque) as float32, or None when every pixel is opaque."""
    if alpha8.size == 0 or int(alpha8.min()) == 255:
        return None
    return alpha8.astype(np.float32) / 255.0


def _pil_to_arrays(image: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
    mode = image.mode
    if mode in _SIXTEEN_BIT:
        gray = _scale_to_uint8(np.asarray(image), 65535.0, "image")
        return np.repeat(gray[..., None], 3, axis=-1), None
    if mode == "I":  # 32-bit integer: how Pillow gives some 16-bit grayscale files
        array = np.asarray(image)
        scale = 255.0 if array.size and int(array.max()) <= 255 and image.format is None else 65535.0
        gray = _scale_to_uint8(array.astype(np.int64), scale, "image")
        return np.repeat(gray[..., None], 3, axis=-1), None
    if mode == "F":  # 32-bit float: 0…1, else 0…255, else scaled by its maximum
        array = np.asarray(image, dtype=np.float32)
        if array.size and not np.isfinite(array).all():
            raise InputError("The image contains NaN or infinite values. Re-save it as an 8- or 16-bit PNG.")
        top = float(array.max()) if array.size else 1.0
        scale = 1.0 if top <= 1.0 else 255.0 if top <= 255.0 else top
        gray = _scale_to_uint8(array, scale, "image")
        return np.repeat(gray[..., None], 3, axis=-1), None
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif mode in ("RGBa", "La", "PA"):
        image = image.convert("RGBA")
    elif mode in ("1", "L", "CMYK", "YCbCr", "HSV", "RGBX"):
        image = image.convert("RGB")
    elif mode not in ("RGB", "RGBA", "LA"):
        try:
            image = image.convert("RGBA" if "A" in mode else "RGB")
        except (ValueError, OSError) as exc:
            raise InputError(
                f"Images of Pillow mode {mode!r} cannot be converted to RGB ({exc}). Save the image as an 8-bit RGB "
                "PNG or JPEG."
            ) from exc
    if image.mode == "LA":
        la = np.asarray(image)
        return np.repeat(la[..., :1], 3, axis=-1), _alpha_or_none(la[..., 1])
    array = np.asarray(image)
    if image.mode == "RGBA":
        return np.ascontiguousarray(array[..., :3]), _alpha_or_none(array[..., 3])
    return array, None


def _tensor_to_numpy(image) -> np.ndarray:
    import torch

    tensor = image.detach().cpu()
    if tensor.is_floating_point():
        return tensor.float().numpy()
    if tensor.dtype == torch.bool:
        return tensor.numpy()
    if tensor.dtype in (torch.uint8, torch.int16, torch.int32, torch.int64):
        return tensor.numpy()
    if tensor.dtype == getattr(torch, "uint16", None):
        return tensor.to(torch.int32).numpy().astype(np.uint16)
    raise InputError(f"Images as {tensor.dtype} tensors are not supported. Use float 0…1 or uint8.")


def _array_to_arrays(image, what: str) -> tuple[np.ndarray, np.ndarray | None]:
    array = np.asarray(image)
    if array.ndim == 4:
        if array.shape[0] != 1:
            raise InputError(f"Expected one image, got a batch of {array.shape[0]}. Pass the images one at a time.")
        array = array[0]
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3:
        raise InputError(f"Expected an image [H,W,3] (or [H,W,4] with alpha), got an array of shape {array.shape}.")
    if array.shape[-1] not in (1, 2, 3, 4):
        if array.shape[0] in (1, 3, 4):
            raise InputError(
                f"The image has shape {array.shape}, channels first; expected [H,W,C] (channels last). Transpose it, "
                "e.g. array.transpose(1, 2, 0)."
            )
        raise InputError(f"Expected an image [H,W,3] (or [H,W,4] with alpha), got an array of shape {array.shape}.")
    channels = array.shape[-1]
    alpha = None
    if channels in (2, 4):
        alpha = _alpha_or_none(_scale_to_uint8(array[..., -1], None, f"{what}'s alpha"))
        array = array[..., :-1]
    rgb = _scale_to_uint8(array, None, what)
    if rgb.shape[-1] == 1:
        rgb = np.repeat(rgb, 3, axis=-1)
    return np.ascontiguousarray(rgb), alpha


def to_rgb8(image, what: str = "image") -> tuple[Image.Image, np.ndarray | None]:
    """(8-bit RGB PIL image, alpha or None) from a PIL image, an array or a tensor.

    Accepts what `clip.to_pil` accepts: PIL images of any mode (16-bit I;16 scaled by 65535, I, F, L, LA, P
    with transparency, CMYK, 1, RGBA …), numpy arrays [H,W], [H,W,C] or [1,H,W,C] with C = 1, 2 (gray +
    alpha), 3 or 4 (RGBA) as uint8, uint16 (÷65535), bool or float 0…1, and torch tensors of the same
    shapes ([H,W,C] / [1,H,W,C], ComfyUI IMAGE). The alpha is float32 [H,W] in 0…1 (1 = opaque = subject;
    `alpha > 0.5` is the boolean mask), and None when the image has no alpha or every pixel is opaque.
    """
    if isinstance(image, Image.Image):
        rgb, alpha = _pil_to_arrays(image)
    else:
        if hasattr(image, "detach") and hasattr(image, "cpu"):
            image = _tensor_to_numpy(image)
        rgb, alpha = _array_to_arrays(image, what)
    return Image.fromarray(np.ascontiguousarray(rgb), "RGB"), alpha


def mask_array(mask, size: tuple[int, int]) -> np.ndarray:
    """A float32 [H,W] mask in 0…1 (1 = subject) from a PIL image, array or tensor, resized to `size` (W,H).

    The same reading as `clip.to_mask` (which is `mask_array(...) > 0.5`): PIL images by their luminance
    (16-bit ones scaled by 65535), arrays/tensors [H,W], [1,H,W] or [H,W,C] (first channel), uint8 or
    values above 1 read as 0…255, uint16 as 0…65535; nearest-neighbour resize.
    """
    if isinstance(mask, Image.Image):
        if mask.mode in _SIXTEEN_BIT or mask.mode in ("I", "F"):
            array = np.asarray(to_rgb8(mask)[0].convert("L"), dtype=np.float32) / 255.0
        else:
            array = np.asarray(mask.convert("L"), dtype=np.float32) / 255.0
    else:
        if hasattr(mask, "detach") and hasattr(mask, "cpu"):
            mask = _tensor_to_numpy(mask)
        raw = np.asarray(mask)
        while raw.ndim > 2 and raw.shape[0] == 1:
            raw = raw[0]
        if raw.ndim == 3:  # an RGB(A) mask image: use its first channel
            raw = raw[..., 0]
        if raw.ndim != 2:
            raise InputError(f"Expected a mask [H,W], got shape {raw.shape}.")
        if raw.dtype == np.uint16:
            array = raw.astype(np.float32) / 65535.0
        else:
            array = raw.astype(np.float32)
            if array.size and not np.isfinite(array).all():
                raise InputError("The mask contains NaN or infinite values. Check the node or code that made it.")
            if array.size and array.max() > 1.0:
                array = array / 255.0
    if (array.shape[1], array.shape[0]) != tuple(size):
        resized = Image.fromarray((np.clip(array, 0, 1) * 255).astype(np.uint8), "L").resize(tuple(size), Image.NEAREST)
        array = np.asarray(resized, dtype=np.float32) / 255.0
    return array


def subject_on_white(image, mask=None, what: str = "subject image") -> tuple[Image.Image, np.ndarray | None]:
    """(the subject composited on white as 8-bit RGB, bool mask [H,W] with True = subject, or None).

    The subject is what is opaque (the image's alpha, blended softly: edges stay smooth) and, when `mask`
    is given (1 = subject; same forms as `mask_array`), inside the mask (thresholded at 0.5, as
    `clip.to_mask` does). With neither real transparency nor a mask: (the RGB image, None), used whole.
    The boolean mask is `weight > 0.5`; `clip.prepare_subject` crops to its box.
    """
    rgb, alpha = to_rgb8(image, what)
    if alpha is None and mask is None:
        return rgb, None
    if alpha is not None and not (alpha > 0.5).any():
        raise InputError(
            f"The {what} is fully transparent (no pixel with alpha above 0.5): nothing of the subject is visible. "
            "Re-export it with the subject opaque, or without an alpha channel."
        )
    weight = np.ones((rgb.height, rgb.width), np.float32) if alpha is None else alpha
    if mask is not None:
        weight = weight * (mask_array(mask, rgb.size) > 0.5)
    pixels = np.asarray(rgb, dtype=np.float32)
    blended = pixels * weight[..., None] + 255.0 * (1.0 - weight[..., None])
    out = Image.fromarray((blended + 0.5).clip(0, 255).astype(np.uint8), "RGB")
    return out, weight > 0.5
