"""The frozen OpenCLIP ViT-bigG/14: prompt features, image embeddings, subject preparation, blank embedding.

Text: per-token states after `ln_final` ([B,77,W], the `last_hidden_state` the official code interleaves)
and the pooled projected embedding at the EOT token. Images: `encode_image` after the official
preprocessing (shortest side → 224 bicubic, centre crop, OpenAI mean/std), unnormalised outputs.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from .errors import InputError, ModelFileError
from .loading import read_json, resolve_dtype

log = logging.getLogger("lambda_eclipse")

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
BIGG_NAME = "ViT-bigG-14"
CLIP_CONFIG_NAME = "open_clip_config.json"
CLIP_WEIGHT_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "open_clip_pytorch_model.safetensors")
CLIP_DOWNLOAD = "https://huggingface.co/laion/CLIP-ViT-bigG-14-laion2B-39B-b160k"


@dataclass
class TextFeatures:
    """CLIP text features of a batch of prompts."""

    pooled: torch.Tensor  # [B, E] projected EOT state ("text_embeds"), not normalised
    tokens: torch.Tensor  # [B, L, W] per-token states after ln_final ("last_hidden_state")
    mask: torch.Tensor  # [B, L] bool: True from SOT through EOT
    ids: torch.Tensor  # [B, L] int64 token ids (0 = padding)


@dataclass
class Preprocess:
    image_size: int = 224
    mean: tuple = OPENAI_MEAN
    std: tuple = OPENAI_STD


def to_pil(image) -> Image.Image:
    """PIL RGB from a PIL image, a uint8/float HWC array, or a float tensor [H,W,C] / [1,H,W,C] in 0..1."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")  # an alpha channel is dropped, as the official processor does
    if isinstance(image, torch.Tensor):
        image = image.detach().float().cpu()
        if image.ndim == 4:
            if image.shape[0] != 1:
                raise InputError(f"Expected one image, got a batch of {image.shape[0]}.")
            image = image[0]
        image = image.numpy()
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise InputError(f"Expected an image [H,W,3], got an array of shape {array.shape}.")
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    array = array[..., :3]
    if array.dtype != np.uint8:
        array = (np.clip(array.astype(np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return Image.fromarray(array, "RGB")


def to_mask(mask, size: tuple[int, int]) -> np.ndarray:
    """A bool [H,W] mask (True = subject) from a PIL L/1 image, array or tensor, resized to `size` (W,H)."""
    if isinstance(mask, Image.Image):
        array = np.asarray(mask.convert("L"), dtype=np.float32) / 255.0
    else:
        if isinstance(mask, torch.Tensor):
            mask = mask.detach().float().cpu().numpy()
        array = np.asarray(mask, dtype=np.float32)
        while array.ndim > 2 and array.shape[0] == 1:
            array = array[0]
        if array.ndim == 3:  # an RGB(A) mask image: use its first channel
            array = array[..., 0]
        if array.ndim != 2:
            raise InputError(f"Expected a mask [H,W], got shape {array.shape}.")
        if array.max() > 1.0:
            array = array / 255.0
    if (array.shape[1], array.shape[0]) != tuple(size):
        resized = Image.fromarray((array * 255).astype(np.uint8), "L").resize(size, Image.NEAREST)
        array = np.asarray(resized, dtype=np.float32) / 255.0
    return array > 0.5


def prepare_subject(image, mask=None, fit: str = "crop") -> Image.Image:
    """The subject as the paper feeds it: on white, cropped to its mask's box (aspect kept).

    Without a mask the image is used as given. `fit="pad"` pads the result to a white square so
    CLIP's centre crop cannot cut a long subject off; `fit="crop"` leaves it to the centre crop
    (the official behaviour for an unmasked image).
    """
    if fit not in ("crop", "pad"):
        raise InputError(f"fit must be 'crop' or 'pad', not {fit!r}.")
    pil = to_pil(image)
    if mask is not None:
        keep = to_mask(mask, pil.size)
        if not keep.any():
            raise InputError(
                "The subject mask is empty (no pixel above 0.5). Paint the subject in the mask, "
                "or disconnect the mask to use the whole image."
            )
        array = np.asarray(pil).copy()
        array[~keep] = 255
        rows, cols = np.where(keep)
        top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
        pil = Image.fromarray(array[top:bottom, left:right], "RGB")
    if fit == "pad" and pil.width != pil.height:
        side = max(pil.size)
        canvas = Image.new("RGB", (side, side), (255, 255, 255))
        canvas.paste(pil, ((side - pil.width) // 2, (side - pil.height) // 2))
        pil = canvas
    return pil


def preprocess_image(image, config: Preprocess = Preprocess()) -> torch.Tensor:
    """[3,S,S] float32, the transformers CLIPImageProcessor steps the official code runs."""
    pil = to_pil(image)
    size = config.image_size
    w, h = pil.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    if (new_w, new_h) != (w, h):
        pil = pil.resize((new_w, new_h), Image.BICUBIC, reducing_gap=None)
    array = np.asarray(pil, dtype=np.float32)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    array = array[top:top + size, left:left + size] / 255.0
    array = (array - np.asarray(config.mean, np.float32)) / np.asarray(config.std, np.float32)
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


class ClipEncoder:
    """An OpenCLIP model with its tokenizer and preprocessing, frozen."""

    def __init__(self, model, tokenizer, preprocess: Preprocess, name: str = BIGG_NAME, source: str = ""):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.name = name
        self.source = source
        self._blank: torch.Tensor | None = None
        self._blank_key = None
        width = model.ln_final.weight.shape[0]
        self.embed_dim = int(getattr(model, "embed_dim", 0) or _projection_dim(model))
        if width != self.embed_dim:
            raise ModelFileError(
                f"CLIP {name}: text width {width} differs from embedding size {self.embed_dim}; interleaving "
                "image embeddings into text tokens needs them equal (bigG: 1280 = 1280)."
            )
        self.context_length = int(model.positional_embedding.shape[0])

    @property
    def device(self) -> torch.device:
        return self.model.ln_final.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.ln_final.weight.dtype

    # -- text --------------------------------------------------------------------------------
    def word_ids(self, text: str) -> list[int]:
        """BPE ids of a piece of text, without SOT/EOT and without truncation (lower-cased as CLIP does)."""
        return list(self.tokenizer.encode(text))

    def tokenize(self, prompts: str | Sequence[str]) -> torch.Tensor:
        return self.tokenizer(prompts, context_length=self.context_length)

    def piece_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id]).strip()

    @torch.no_grad()
    def encode_text(self, prompts: str | Sequence[str]) -> TextFeatures:
        ids = self.tokenize(prompts).to(self.device)
        model = self.model
        cast = model.transformer.get_cast_dtype()
        x = model.token_embedding(ids).to(cast) + model.positional_embedding.to(cast)
        x = model.transformer(x, attn_mask=model.attn_mask)
        tokens = model.ln_final(x)
        eot = ids.argmax(dim=-1)  # EOT has the highest id in the vocabulary
        pooled = tokens[torch.arange(ids.shape[0], device=ids.device), eot]
        proj = model.text_projection
        pooled = proj(pooled) if isinstance(proj, torch.nn.Linear) else pooled @ proj
        positions = torch.arange(ids.shape[1], device=ids.device)[None]
        mask = positions <= eot[:, None]
        return TextFeatures(pooled.float(), tokens.float(), mask, ids)

    # -- images ------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B,3,S,S] already-normalised pixels → [B,E] float32."""
        return self.model.encode_image(pixels.to(self.device, self.dtype)).float()

    def encode_images(self, images: Sequence, batch_size: int = 16) -> torch.Tensor:
        """Images (PIL, arrays or [H,W,3] tensors in 0..1) → [B,E] float32 embeddings, not normalised."""
        if len(images) == 0:
            raise InputError("No image to encode.")
        out = []
        for start in range(0, len(images), batch_size):
            chunk = [preprocess_image(img, self.preprocess) for img in images[start:start + batch_size]]
            out.append(self.encode_pixels(torch.stack(chunk)))
        return torch.cat(out)

    def encode_subject(self, image, mask=None, fit: str = "crop") -> torch.Tensor:
        return self.encode_images([prepare_subject(image, mask, fit)])[0]

    def blank_embedding(self) -> torch.Tensor:
        """[E]: the vision tower on all-zero normalised pixels (the mean-colour grey image), cached."""
        key = (self.device, self.dtype)
        if self._blank is None or self._blank_key != key:
            size = self.preprocess.image_size
            self._blank = self.encode_pixels(torch.zeros(1, 3, size, size))[0]
            self._blank_key = key
        return self._blank

    def to(self, device=None, dtype=None) -> "ClipEncoder":
        self.model.to(device=device, dtype=resolve_dtype(dtype) if dtype is not None else None)
        return self


def _projection_dim(model) -> int:
    proj = model.text_projection
    return proj.out_features if isinstance(proj, torch.nn.Linear) else proj.shape[1]


def _preprocess_from(cfg: dict, image_size) -> Preprocess:
    size = cfg.get("size", image_size)
    if isinstance(size, (list, tuple)):
        size = size[0]
    return Preprocess(int(size), tuple(cfg.get("mean", OPENAI_MEAN)), tuple(cfg.get("std", OPENAI_STD)))


def _check_clip_keys(path: Path):
    """Fail early, with a useful message, on files that are not OpenCLIP checkpoints."""
    if path.suffix.lower() != ".safetensors":
        return
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
    except Exception as exc:
        raise ModelFileError(f"{path.name} is not a readable .safetensors file ({exc}). Re-download it.") from exc
    if any(k.startswith("vision_model.") or k.startswith("text_model.") for k in keys):
        raise ModelFileError(
            f"{path.name} is a transformers-format CLIP (e.g. ComfyUI's clip_vision_g.safetensors). λ-ECLIPSE needs "
            f"the OpenCLIP ViT-bigG/14 with both towers: open_clip_config.json + open_clip_model.safetensors from {CLIP_DOWNLOAD}."
        )
    if not any(k.startswith("visual.") for k in keys) or "token_embedding.weight" not in keys:
        raise ModelFileError(
            f"{path.name} is not an OpenCLIP model (no visual.* / token_embedding.weight). "
            f"Use open_clip_model.safetensors from {CLIP_DOWNLOAD}."
        )


def resolve_clip_files(path: str | os.PathLike) -> tuple[str, Path, Path | None]:
    """(model name for open_clip, weights file, open_clip_config.json or None)."""
    path = Path(path)
    if path.is_dir():
        config = path / CLIP_CONFIG_NAME
        weights = next((path / n for n in CLIP_WEIGHT_NAMES if (path / n).is_file()), None)
        if weights is None:
            raise ModelFileError(
                f"No CLIP weights in {path}: expected {' or '.join(CLIP_WEIGHT_NAMES)} (and {CLIP_CONFIG_NAME}). "
                f"Download them from {CLIP_DOWNLOAD}."
            )
        if not config.is_file():
            return BIGG_NAME, weights, None
        return "local-dir:" + str(path), weights, config
    if not path.is_file():
        raise ModelFileError(f"CLIP not found: {path}. Download ViT-bigG/14 from {CLIP_DOWNLOAD}.")
    return BIGG_NAME, path, None


def load_clip(path: str | os.PathLike, device="cpu", dtype="fp32") -> ClipEncoder:
    """OpenCLIP from local files only: a bigG checkpoint file, or a folder with open_clip_config.json + weights."""
    import open_clip

    dtype = resolve_dtype(dtype)
    name, weights, config_path = resolve_clip_files(path)
    _check_clip_keys(weights)
    preprocess = Preprocess()
    if config_path is not None:
        config = read_json(config_path)
        if "model_cfg" not in config:
            raise ModelFileError(f"{config_path} has no 'model_cfg'; it is not an open_clip config.")
        preprocess = _preprocess_from(config.get("preprocess_cfg", {}), config["model_cfg"].get("vision_cfg", {}).get("image_size", 224))
    try:
        if name.startswith("local-dir:"):
            model = open_clip.create_model(name, device="cpu")
            tokenizer = open_clip.get_tokenizer(name)
        else:
            model = open_clip.create_model(name, pretrained=str(weights), device="cpu", weights_only=True)
            tokenizer = open_clip.get_tokenizer(name)
    except (RuntimeError, KeyError, ValueError) as exc:
        raise ModelFileError(
            f"{weights.name} could not be loaded as OpenCLIP {name.replace('local-dir:', '')} ({str(exc)[:300]}). "
            f"λ-ECLIPSE needs ViT-bigG/14 (laion2b_s39b_b160k) from {CLIP_DOWNLOAD}."
        ) from exc
    if not hasattr(tokenizer, "encode"):
        raise ModelFileError(f"{path}: this CLIP uses a tokenizer without CLIP's BPE; λ-ECLIPSE needs the bigG tokenizer.")
    model.to(device=device, dtype=dtype)
    encoder = ClipEncoder(model, tokenizer, preprocess, name=name, source=str(path))
    log.info("CLIP %s loaded from %s (%s, %s)", name.replace("local-dir:", ""), path, device, dtype)
    return encoder
