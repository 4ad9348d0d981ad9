"""The Dreambench metrics as DreamBooth / BLIP-Diffusion / λ-ECLIPSE (Tables 2 and 4) measure them.

* DINO   — cosine of the CLS features of DINO ViT-S/16 between a generated image and a real photo of the concept.
* CLIP-I — cosine of the CLIP (ViT-B/32) image embeddings between a generated image and a real photo.
* CLIP-T — cosine of the generated image's CLIP image embedding and the prompt's CLIP text embedding.

A generated image's DINO and CLIP-I are its mean over every real photo of its subject; the run's score is the
mean over every generated image (= the mean over every (generated, real) pair, every subject having the same
photos for all its images). An image with several subjects (Multibench) gets each subject's score against that
subject's own photos, averaged over its subjects (`Scorer.score_multi`).

Models load from local files (nothing is downloaded here; `--metric-models DIR --download` or `evaluate
download-metrics` fetch the two below into DIR first, see metric_models.py):
  DINO: a transformers folder in the `facebook/dino-vits16` layout (config.json + weights, `ViTModel`, the CLS
        token of `last_hidden_state`), or — when `timm` is installed — a timm folder (config.json with
        "architecture", e.g. `timm/vit_small_patch16_224.dino`, + model.safetensors / pytorch_model.bin).
  CLIP: an OpenCLIP folder (open_clip_config.json + open_clip_model.safetensors / open_clip_pytorch_model.bin,
        the `laion/…` / `timm/…` hub layout) or a single weights file of a named OpenCLIP config (default
        ViT-B-32; OpenAI's ViT-B/32 weights need ViT-B-32-quickgelu, as they were trained with QuickGELU — a
        hub folder's open_clip_config.json says so itself), loaded by open_clip's create_model_and_transforms.
"""

from __future__ import annotations

import importlib
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: The paper's Table 2 row for λ-ECLIPSE on Dreambench.
PAPER = {"dino": 0.613, "clip_i": 0.783, "clip_t": 0.307}
METRICS = ("dino", "clip_i", "clip_t")
LABELS = {"dino": "DINO", "clip_i": "CLIP-I", "clip_t": "CLIP-T"}


class MetricModelError(ValueError):
    """A metric model path that cannot be loaded (named, with what was expected)."""


def _rgb(image) -> Image.Image:
    if isinstance(image, (str, Path)):
        from ..core.images import open_image

        image = open_image(image, what="image to score")
    if not isinstance(image, Image.Image):
        array = np.asarray(image)
        if array.dtype != np.uint8:
            array = (np.clip(array, 0, 1) * 255 + 0.5).astype(np.uint8)
        image = Image.fromarray(array)
    return image.convert("RGB")


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[N,D] × [M,D] → [N,M] cosine similarities (computed in float64)."""
    a = torch.nn.functional.normalize(a.double(), dim=-1)
    b = torch.nn.functional.normalize(b.double(), dim=-1)
    return a @ b.T


def dino_transform(crop: int = 224, mean=IMAGENET_MEAN, std=IMAGENET_STD, mode: str = "crop"):
    """The community DINO protocol: resize the short side to 256/224·crop (bicubic), centre crop, ImageNet
    normalisation (`mode="crop"`); or `mode="processor"`: the HF image processor's plain resize to crop×crop
    (bilinear, aspect not kept)."""
    from torchvision import transforms as T

    if mode == "processor":
        resize = [T.Resize((crop, crop), interpolation=T.InterpolationMode.BILINEAR)]
    elif mode == "crop":
        resize = [T.Resize(round(crop * 256 / 224), interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(crop)]
    else:
        raise ValueError(f"DINO preprocessing must be 'crop' or 'processor'; got {mode!r}.")
    return T.Compose([*resize, T.ToTensor(), T.Normalize(mean, std)])


DINO_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors")


def check_dino(path) -> None:
    """What DinoEmbedder would refuse for want of files, found without loading anything."""
    path = Path(path).expanduser()
    if not path.is_dir() or not (path / "config.json").is_file():
        raise MetricModelError(
            f"--dino {path}: expected a folder with config.json and the weights, e.g. a download of "
            "facebook/dino-vits16 (transformers) or timm/vit_small_patch16_224.dino (needs timm)."
        )
    if not any((path / name).is_file() for name in DINO_WEIGHTS):
        raise MetricModelError(f"--dino {path}: config.json is there but no weights ({' or '.join(DINO_WEIGHTS[:2])}).")


class DinoEmbedder:
    """DINO CLS features from a local transformers ViTModel folder or (when timm is installed) a timm folder."""

    def __init__(self, path, device: str = "cpu", preprocess: str = "crop"):
        path = Path(path).expanduser()
        check_dino(path)
        config = json.loads((path / "config.json").read_text())
        self.device = device
        if "architecture" in config:  # timm hub layout
            try:
                import timm
            except ImportError:
                raise MetricModelError(f"--dino {path} is a timm folder, but timm is not installed "
                                       "(pip install timm), or give the transformers facebook/dino-vits16 folder.") from None
            self.kind = "timm"
            self.model = timm.create_model(f"local-dir:{path}", pretrained=True, num_classes=0)
            cfg = config.get("pretrained_cfg", {})
            crop = int(cfg.get("input_size", [3, 224, 224])[-1])
            mean, std = tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))
        else:
            from transformers import ViTModel

            if config.get("model_type") not in ("vit", "dino", None):
                raise MetricModelError(f"--dino {path}: config.json is a {config.get('model_type')!r} model, not a ViT.")
            self.kind = "transformers"
            self.model = ViTModel.from_pretrained(str(path), add_pooling_layer=False)
            crop = int(config.get("image_size", 224))
            processor_file = path / "preprocessor_config.json"
            processor = json.loads(processor_file.read_text()) if processor_file.is_file() else {}
            mean = tuple(processor.get("image_mean", IMAGENET_MEAN))
            std = tuple(processor.get("image_std", IMAGENET_STD))
        self.model = self.model.to(device).eval().float()
        self.transform = dino_transform(crop, mean, std, preprocess)

    @torch.no_grad()
    def __call__(self, images: Sequence, batch_size: int = 16) -> torch.Tensor:
        out = []
        for start in range(0, len(images), batch_size):
            x = torch.stack([self.transform(_rgb(im)) for im in images[start:start + batch_size]]).to(self.device)
            if self.kind == "timm":
                features = self.model.forward_features(x)[:, 0]  # CLS after the final norm
            else:
                features = self.model(pixel_values=x).last_hidden_state[:, 0]
            out.append(features.float().cpu())
        return torch.cat(out) if out else torch.zeros(0, 0)


def check_clip_eval(path, model_name: str) -> None:
    """What ClipEmbedder would refuse, found without loading any weights (run before hours of generation)."""
    import open_clip

    path = Path(path).expanduser()
    if path.is_dir():
        if not (path / "open_clip_config.json").is_file():
            raise MetricModelError(f"--clip-eval {path}: an OpenCLIP folder needs open_clip_config.json "
                                   "(the hub layout), or give the weights file and --clip-eval-model.")
    elif path.is_file():
        if open_clip.get_model_config(model_name) is None:
            raise MetricModelError(f"--clip-eval-model {model_name!r} is not an OpenCLIP config "
                                   f"(e.g. ViT-B-32-quickgelu, ViT-B-32, ViT-L-14; see open_clip.list_models()).")
    else:
        raise MetricModelError(f"--clip-eval {path} does not exist.")


def describe_clip_eval(path, model_name: str) -> str:
    """What ClipEmbedder loads from `path`, in words for summary.md: a weights file is read with the named
    OpenCLIP config; a folder with its own open_clip_config.json (--clip-eval-model is not used for it)."""
    path = Path(path).expanduser()
    if not path.is_dir():
        return f"{path} (weights file, OpenCLIP config {model_name})"
    try:
        model = json.loads((path / "open_clip_config.json").read_text(encoding="utf-8")).get("model_cfg") or {}
    except (OSError, ValueError, AttributeError):
        model = {}
    vision = model.get("vision_cfg") or {}
    parts = []
    if vision:
        parts.append("vision " + ", ".join(f"{label} {vision[key]}" for key, label in
                                           (("image_size", "image"), ("patch_size", "patch"), ("width", "width"),
                                            ("layers", "layers")) if key in vision))
    if "embed_dim" in model:
        parts.append(f"embedding {model['embed_dim']}")
    parts.append("QuickGELU" if model.get("quick_gelu") else "GELU")
    return f"{path} (OpenCLIP folder: {'; '.join(parts)}, from its open_clip_config.json)"


@contextmanager
def quiet_loading(quiet: bool = True):
    """With --quiet: transformers' (and diffusers') "Loading weights" bars and info lines off while loading, as
    they were after."""
    if not quiet:
        yield
        return
    saved = []
    for name in ("transformers.utils.logging", "diffusers.utils.logging"):
        try:
            hf_logging = importlib.import_module(name)
        except ImportError:
            continue
        saved.append((hf_logging, hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()))
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        for hf_logging, level, bars in saved:
            hf_logging.set_verbosity(level)
            if bars:
                hf_logging.enable_progress_bar()


class ClipEmbedder:
    """OpenCLIP image and text embeddings from a local folder or a weights file of a named config."""

    def __init__(self, path, model_name: str = "ViT-B-32-quickgelu", device: str = "cpu"):
        import open_clip

        path = Path(path).expanduser()
        check_clip_eval(path, model_name)
        if path.is_dir():
            name = f"local-dir:{path}"
            self.model, _, self.transform = open_clip.create_model_and_transforms(name, device=device)
        else:
            name = model_name
            self.model, _, self.transform = open_clip.create_model_and_transforms(name, pretrained=str(path), device=device)
        self.tokenizer = open_clip.get_tokenizer(name)
        self.model = self.model.eval().float()
        self.device = device

    @torch.no_grad()
    def images(self, images: Sequence, batch_size: int = 32) -> torch.Tensor:
        out = []
        for start in range(0, len(images), batch_size):
            x = torch.stack([self.transform(_rgb(im)) for im in images[start:start + batch_size]]).to(self.device)
            out.append(self.model.encode_image(x).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, 0)

    @torch.no_grad()
    def texts(self, texts: Sequence[str]) -> torch.Tensor:
        """The prompts as written (no template, no unique token added)."""
        if not texts:
            return torch.zeros(0, 0)
        return self.model.encode_text(self.tokenizer(list(texts)).to(self.device)).float().cpu()


class Scorer:
    """Both metric models; `score` gives each generated image's dino / clip_i / clip_t."""

    def __init__(self, dino: DinoEmbedder, clip: ClipEmbedder):
        self.dino, self.clip = dino, clip
        self._reals: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def dino_embed(self, images) -> torch.Tensor:
        return self.dino(images)

    def clip_image_embed(self, images) -> torch.Tensor:
        return self.clip.images(images)

    def clip_text_embed(self, texts) -> torch.Tensor:
        return self.clip.texts(texts)

    def reals(self, key: str, images) -> tuple[torch.Tensor, torch.Tensor]:
        """(DINO, CLIP) embeddings of a subject's real photos, computed once per key."""
        if key not in self._reals:
            self._reals[key] = (self.dino_embed(images), self.clip_image_embed(images))
        return self._reals[key]

    def score(self, generated, prompts: Sequence[str], real_key: str, real_images) -> list[dict[str, float]]:
        real_dino, real_clip = self.reals(real_key, real_images)
        return per_image_scores(self.dino_embed(generated), self.clip_image_embed(generated),
                                self.clip_text_embed(prompts), real_dino, real_clip)

    def score_multi(self, generated, prompts: Sequence[str],
                    subjects: Sequence[Sequence[tuple[str, Sequence]]]) -> list[dict[str, float]]:
        """Images with several subjects (Multibench): `subjects[i]` is image i's (key, real photos) per subject.
        dino / clip_i are each subject's score against its own photos, averaged over the image's subjects; clip_t
        is against the prompt. Every image and every subject's photos are embedded once."""
        gen_dino, gen_clip = self.dino_embed(generated), self.clip_image_embed(generated)
        text = self.clip_text_embed(prompts)
        out = []
        for i, own in enumerate(subjects):
            if not own:
                raise ValueError(f"image {i} has no subject to score against")
            per = [per_image_scores(gen_dino[i:i + 1], gen_clip[i:i + 1], text[i:i + 1], *self.reals(key, photos))[0]
                   for key, photos in own]
            out.append({"dino": sum(p["dino"] for p in per) / len(per),
                        "clip_i": sum(p["clip_i"] for p in per) / len(per), "clip_t": per[0]["clip_t"]})
        return out


def per_image_scores(gen_dino, gen_clip, text, real_dino, real_clip) -> list[dict[str, float]]:
    """Per generated image i: dino = mean_r cos(gen_dino[i], real_dino[r]); clip_i likewise with CLIP;
    clip_t = cos(gen_clip[i], text[i])."""
    dino = cosine_matrix(gen_dino, real_dino).mean(dim=1)
    clip_i = cosine_matrix(gen_clip, real_clip).mean(dim=1)
    clip_t = torch.nn.functional.cosine_similarity(gen_clip.double(), text.double(), dim=-1)
    return [{"dino": float(d), "clip_i": float(c), "clip_t": float(t)} for d, c, t in zip(dino, clip_i, clip_t)]
