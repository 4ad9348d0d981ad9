"""The frozen OpenCLIP ViT-bigG/14: prompt features, image embeddings, subject preparation, blank embedding.

Text: per-token states after `ln_final` ([B,77,W], the `last_hidden_state` the official code interleaves)
and the pooled projected embedding at the EOT token. Images: `encode_image` after the official
preprocessing (shortest side → 224 bicubic, centre crop, OpenAI mean/std), unnormalised outputs.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from .clip_formats import BIGG_TEXT_WIDTH, BIGG_VISION_WIDTH, NEEDED, ClipSource, build_clip_model, open_source
from .errors import InputError, ModelFileError
from .images import mask_array, subject_on_white, to_rgb8
from .loading import resolve_dtype

log = logging.getLogger("lambda_eclipse")

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
BIGG_NAME = "ViT-bigG-14"
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
    """PIL RGB from a PIL image, a uint8/uint16/float HWC array, or a float tensor [H,W,C] / [1,H,W,C] in 0..1.

    High-depth images are scaled to 8 bits (never clipped); an alpha channel is dropped here, as the official
    processor does (subjects use it as their mask: see `prepare_subject`).
    """
    return to_rgb8(image)[0]


def to_mask(mask, size: tuple[int, int]) -> np.ndarray:
    """A bool [H,W] mask (True = subject) from a PIL L/1 image, array or tensor, resized to `size` (W,H)."""
    return mask_array(mask, size) > 0.5


SMALL_SUBJECT = 112  # px on the short side: below this CLIP's 224 px input is more than a 2x enlargement


def small_subject_warning(size: tuple[int, int], what: str = "subject") -> str | None:
    """A warning for a subject (after cropping to its mask) too small for CLIP to see well, or None."""
    width, height = size
    if min(width, height) >= SMALL_SUBJECT:
        return None
    return (f"The {what} is only {width}×{height} pixels (after cropping to its mask); CLIP looks at subjects at "
            f"224×224, so it is enlarged {224 / max(1, min(width, height)):.0f}× and its details are lost. Use a larger "
            f"photo (at least {SMALL_SUBJECT} px, ideally 224 px or more, on the short side of the subject).")


def prepare_subject(image, mask=None, fit: str = "crop", notes: list | None = None) -> Image.Image:
    """The subject as the paper feeds it: on white, cropped to its mask's box (aspect kept).

    The mask is `mask`, or the image's own alpha (a transparent cut-out is composited on white); both together
    are multiplied. Without either the image is used as given. `fit="pad"` pads the result to a white square so
    CLIP's centre crop cannot cut a long subject off; `fit="crop"` leaves it to the centre crop (the official
    behaviour for an unmasked image).
    """
    if fit not in ("crop", "pad"):
        raise InputError(f"fit must be 'crop' or 'pad', not {fit!r}.")
    pil, keep = subject_on_white(image, mask)
    if keep is not None:
        if not keep.any():
            raise InputError(
                "The subject mask is empty (no pixel above 0.5). Paint the subject in the mask, "
                "or disconnect the mask to use the whole image."
            )
        rows, cols = np.where(keep)
        pil = pil.crop((int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1))
    small = small_subject_warning(pil.size)
    if small:
        log.warning(small)
        if notes is not None:
            notes.append(small)
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
    """An OpenCLIP model with its tokenizer and preprocessing, frozen.

    Either tower may be absent (`model.visual` or `model.transformer` is None): asking it for what the absent
    tower computes raises ModelFileError naming the tower to give. The blank embedding (all-zero normalised
    pixels) is computed once, at construction, and kept on the CPU in float32.
    """

    def __init__(self, model, tokenizer, preprocess: Preprocess, name: str = BIGG_NAME, source: str = "",
                 sources: dict | None = None, blank: torch.Tensor | None = None):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.name = name
        self.source = source
        self.sources = dict(sources) if sources is not None else {"text": source or None, "vision": source or None}
        self.has_text = getattr(model, "transformer", None) is not None
        self.has_vision = getattr(model, "visual", None) is not None
        if not self.has_text:
            self.sources["text"] = None
        if not self.has_vision:
            self.sources["vision"] = None
        self.embed_dim = int(getattr(model, "embed_dim", 0) or _projection_dim(model))
        if self.has_text:
            width = model.ln_final.weight.shape[0]
            if width != self.embed_dim:
                raise ModelFileError(
                    f"CLIP {name}: text width {width} differs from embedding size {self.embed_dim}; interleaving "
                    "image embeddings into text tokens needs them equal (bigG: 1280 = 1280)."
                )
            self.context_length = int(model.positional_embedding.shape[0])
        else:
            self.context_length = 77
        self._blank: torch.Tensor | None = None
        if blank is not None:
            self._blank = blank.detach().float().cpu()
        elif self.has_vision:
            self._blank = compute_blank_embedding(model, preprocess.image_size)

    def _param(self) -> torch.Tensor:
        return self.model.ln_final.weight if self.has_text else self.model.visual.ln_post.weight

    @property
    def device(self) -> torch.device:
        return self._param().device

    @property
    def dtype(self) -> torch.dtype:
        return self._param().dtype

    def describe(self) -> str:
        """One line: which file gives each tower, on which device and in which dtype."""
        text, vision = self.sources.get("text"), self.sources.get("vision")
        if text and text == vision:
            where = f"both towers from {text}"
        else:
            where = f"text: {text or '(none)'}, vision: {vision or '(none)'}"
        dtype = str(self.dtype).replace("torch.", "")
        return f"CLIP {self.name.replace('local-dir:', '')} ({where}; {self.device}, {dtype})"

    def _need(self, tower: str, what: str):
        if not (self.has_text if tower == "text" else self.has_vision):
            other = "text" if tower == "vision" else "vision"
            hint = ("clip_vision_g.safetensors in models/clip_vision" if tower == "vision"
                    else "SDXL's clip_g / text_encoder_2, or an SDXL checkpoint")
            raise ModelFileError(
                f"This CLIP was loaded with only its {other} tower, so it cannot {what}. Give the bigG {tower} tower too "
                f"({hint}; load_clip_towers(text=..., vision=...))."
            )

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
        self._need("text", "encode prompts")
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
        self._need("vision", "encode images")
        visual = self.model.visual
        param = visual.ln_post.weight
        return visual(pixels.to(param.device, param.dtype)).float()

    def encode_images(self, images: Sequence, batch_size: int = 16) -> torch.Tensor:
        """Images (PIL, arrays or [H,W,3] tensors in 0..1) → [B,E] float32 embeddings, not normalised."""
        if len(images) == 0:
            raise InputError("No image to encode.")
        self._need("vision", "encode images")
        out = []
        for start in range(0, len(images), batch_size):
            chunk = [preprocess_image(img, self.preprocess) for img in images[start:start + batch_size]]
            out.append(self.encode_pixels(torch.stack(chunk)))
        return torch.cat(out)

    def encode_subject(self, image, mask=None, fit: str = "crop", notes: list | None = None) -> torch.Tensor:
        return self.encode_images([prepare_subject(image, mask, fit, notes)])[0]

    def blank_embedding(self) -> torch.Tensor:
        """[E] float32 on the CPU: the vision tower on all-zero normalised pixels (the mean-colour grey image),
        computed once at load; needs no model on any device."""
        if self._blank is None:
            self._need("vision", "give the blank-image embedding")
        return self._blank

    def to(self, device=None, dtype=None) -> "ClipEncoder":
        self.model.to(device=device, dtype=resolve_dtype(dtype) if dtype is not None else None)
        return self


@torch.no_grad()
def compute_blank_embedding(model, image_size: int = 224) -> torch.Tensor:
    """[E] float32 CPU: `model.visual` on all-zero normalised pixels.

    On a CPU in fp16/bf16 the tower runs block by block in float32 (each block upcast, then restored
    exactly), since CPU half-precision matmuls are slow; elsewhere it runs as it is.
    """
    visual = model.visual
    param = visual.ln_post.weight
    pixels = torch.zeros(1, 3, image_size, image_size)
    half = param.dtype in (torch.float16, torch.bfloat16)
    blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
    plain = all(hasattr(visual, n) for n in ("conv1", "ln_pre", "ln_post", "proj")) and getattr(visual, "attn_pool", None) is None
    if param.device.type != "cpu" or not half or blocks is None or not plain or visual.proj is None:
        return visual(pixels.to(param.device, param.dtype))[0].float().cpu()
    dtype = param.dtype
    handles = []
    for module in (visual.conv1, visual.ln_pre, *blocks, visual.ln_post):
        handles.append(module.register_forward_pre_hook(lambda m, args: (m.float(), None)[1]))
        handles.append(module.register_forward_hook(lambda m, args, out: (m.to(dtype), None)[1]))
    proj = visual.proj
    try:
        visual.proj = None
        pooled = visual(pixels)
    finally:
        visual.proj = proj
        for handle in handles:
            handle.remove()
        for module in (visual.conv1, visual.ln_pre, *blocks, visual.ln_post):
            module.to(dtype)
    return (pooled @ proj.float())[0].cpu()


def _projection_dim(model) -> int:
    proj = model.text_projection
    return proj.out_features if isinstance(proj, torch.nn.Linear) else proj.shape[1]


_TOKENIZERS: dict[str, object] = {}


def _tokenizer(name: str | None):
    import open_clip

    name = name or BIGG_NAME
    if name not in _TOKENIZERS:
        _TOKENIZERS[name] = open_clip.get_tokenizer(name)
    tokenizer = _TOKENIZERS[name]
    if not hasattr(tokenizer, "encode"):
        raise ModelFileError(f"{name}: this CLIP uses a tokenizer without CLIP's BPE; λ-ECLIPSE needs the bigG tokenizer.")
    return tokenizer


def _load_with_open_clip(source: ClipSource, device, dtype) -> ClipEncoder:
    """An OpenCLIP folder whose config is not a plain CLIP: open_clip builds and loads it (as the first release did)."""
    import open_clip

    name = "local-dir:" + str(source.path)
    try:
        model = open_clip.create_model(name, device="cpu")
    except (RuntimeError, KeyError, ValueError) as exc:
        raise ModelFileError(
            f"{source.path.name} could not be loaded by open_clip ({str(exc)[:300]}). "
            f"λ-ECLIPSE needs ViT-bigG/14 (laion2b_s39b_b160k) from {CLIP_DOWNLOAD}."
        ) from exc
    model.to(device=device, dtype=dtype)
    pre = Preprocess(**source.preprocess) if source.preprocess else Preprocess()
    return ClipEncoder(model, _tokenizer(name), pre, name=name, source=str(source.path),
                       sources={"text": str(source.path), "vision": str(source.path)})


def load_clip_towers(text: str | os.PathLike | None = None, vision: str | os.PathLike | None = None,
                     device="cpu", dtype="fp32") -> ClipEncoder:
    """OpenCLIP ViT-bigG/14 with its text tower from `text` and its vision tower from `vision` (local files only).

    Each may be any format of `clip_formats` (a transformers-key file such as clip_g / clip_vision_g, an
    OpenCLIP-key file, an SDXL checkpoint, a transformers / diffusers / OpenCLIP folder). Either may be None when
    that tower is not needed (the encoder then refuses, with a message, what only that tower can do). The same
    path for both is read once. Weights are read one tensor at a time into a model built on the meta device.
    """
    if text is None and vision is None:
        raise ModelFileError(f"No CLIP given: name the bigG text tower and/or vision tower. {NEEDED}")
    dtype = resolve_dtype(dtype)
    device = torch.device(device)
    half = dtype in (torch.float16, torch.bfloat16)
    same = text is not None and vision is not None and Path(text).expanduser().resolve() == Path(vision).expanduser().resolve()
    text_source = open_source(text, prefer_half=half) if text is not None else None
    vision_source = text_source if same else (open_source(vision, prefer_half=half) if vision is not None else None)
    for source, kind in ((text_source, "text"), (vision_source, "vision")):
        if source is None or source.model_cfg is not None:
            continue
        if kind not in source.towers:
            other = next(iter(source.towers))
            hint = ("the vision tower is ComfyUI's clip_vision_g.safetensors (models/clip_vision)" if kind == "vision"
                    else "the text tower is SDXL's clip_g / text_encoder_2, or an SDXL checkpoint")
            raise ModelFileError(
                f"{source.path.name} holds only the {other} tower of the CLIP ({source.description}), not the {kind} "
                f"tower: {hint}. {NEEDED}"
            )
    exotic = next((s for s in (text_source, vision_source) if s is not None and s.model_cfg is not None), None)
    if exotic is not None:
        if (text_source is not None and text_source is not exotic) or (vision_source is not None and vision_source is not exotic):
            raise ModelFileError(f"{exotic.path.name}: this OpenCLIP folder can only give both towers itself.")
        return _load_with_open_clip(exotic, device, dtype)

    start = time.perf_counter()
    model, size = build_clip_model(text_source, vision_source, device=device, dtype=dtype)
    main = text_source or vision_source
    vision_part = vision_source.for_tower("vision") if vision_source is not None else None
    pre = {}
    if vision_part is not None:
        pre = {"image_size": vision_part.towers["vision"].image_size, **vision_part.preprocess}
    preprocess = Preprocess(int(pre.get("image_size", 224)), tuple(pre.get("mean", OPENAI_MEAN)), tuple(pre.get("std", OPENAI_STD)))
    text_tower = text_source.for_tower("text").towers["text"] if text_source is not None else None
    vision_tower = vision_part.towers["vision"] if vision_part is not None else None
    bigg = (text_tower is None or text_tower.width == BIGG_TEXT_WIDTH) and (vision_tower is None or vision_tower.width == BIGG_VISION_WIDTH)
    name = BIGG_NAME if bigg else "custom (" + ", ".join(f"{t.kind} width {t.width}" for t in (text_tower, vision_tower) if t) + ")"
    tokenizer_name = text_source.for_tower("text").tokenizer if text_source is not None else None
    sources = {"text": str(text_source.path) if text_source else None, "vision": str(vision_source.path) if vision_source else None}
    encoder = ClipEncoder(model, _tokenizer(tokenizer_name), preprocess, name=name, source=str(main.path), sources=sources)
    log.info("%s loaded in %.1f s (%.2f GB of weights)", encoder.describe(), time.perf_counter() - start, size / 1e9)
    return encoder


def load_clip(path: str | os.PathLike, device="cpu", dtype="fp32") -> ClipEncoder:
    """OpenCLIP bigG from one local source holding both towers (an OpenCLIP folder or file, a CLIPModel folder,
    a diffusers folder with both encoders...). For towers in separate files use `load_clip_towers`."""
    return load_clip_towers(text=path, vision=path, device=device, dtype=dtype)
