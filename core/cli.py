"""Command line: `python -m lambda_eclipse generate | interpolate | encode | download | check`.

Each image command first runs one validation pass over its arguments and the headers of the files it names
(`_validate_generate`, `_validate_interpolate`, `_validate_encode`): numbers, the output path, images, the subject
words against the prompt (CLIP's tokenizer alone), LoRA files and the model files' headers. Only then is a model
loaded, so a mistake costs seconds, not the minutes of loading 10 GB of weights.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InputError, LambdaEclipseError, ModelFileError

log = logging.getLogger("lambda_eclipse")

EXIT_USER_ERROR = 2
EXIT_CHECK_STRICT = 1  # `check --strict`: every file loads, but some are not the published ones
EXIT_INTERRUPTED = 130


class HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, unless the option has none (a flag, an optional input) or the
    text already says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (action.option_strings and action.nargs != 0 and default is not None and default is not argparse.SUPPRESS
                and "%(default)" not in text and "default:" not in text.lower()):
            text += " (default: %(default)s)"
        return text


def _device(name: str) -> str:
    from .devices import check_device

    return check_device(name, what="--device")


def _dtype(name: str, device: str) -> str:
    if name != "auto":
        return name
    if device.startswith("cuda"):
        import torch

        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def parse_subject(spec: str) -> tuple[str, str, str | None]:
    """WORD=IMAGE[:MASK] → (word, image, mask). A ':' inside an existing image path is not a mask separator."""
    if "=" not in spec:
        raise InputError(f"--subject {spec!r}: expected WORD=IMAGE or WORD=IMAGE:MASK, e.g. --subject dog=dog.jpg:dog_mask.png")
    word, rest = spec.split("=", 1)
    image, mask = rest, None
    if not os.path.lexists(os.path.expanduser(rest)) and ":" in rest:
        image, mask = rest.rsplit(":", 1)
    for label, path in (("image", image), ("mask", mask)):
        # Only a path that is not there at all is refused here; anything else (a folder, a FIFO, a device) goes
        # unchanged to core.images.open_image, which says what it is.
        if path is not None and not os.path.lexists(os.path.expanduser(path)):
            raise InputError(f"--subject {spec!r}: the {label} file {path!r} does not exist.")
    if not word.strip():
        raise InputError(f"--subject {spec!r}: the word before '=' is empty.")
    return word.strip(), image, mask


def _subjects(specs, opened: dict | None = None):
    """Subjects with their images opened and decoded now, before any model loads (a bad file fails at once).

    `opened` maps a path to its image so that a photo used in several places is one object (encoded once).
    """
    from .images import open_image
    from .pipeline import SubjectInput

    opened = {} if opened is None else opened

    def load(path, what):
        if path is None:
            return None
        if path not in opened:
            opened[path] = open_image(path, what=what)
        return opened[path]

    return [SubjectInput(w, load(img, f"subject image for '{w}'"), load(mask, f"subject mask for '{w}'"))
            for w, img, mask in (parse_subject(s) for s in specs or [])]


class _Progress:
    """A per-step progress line on stderr (tqdm when installed)."""

    live: set = set()  # open bars, closed by run_command on Ctrl-C so that its one line starts a line

    def __init__(self, desc: str, quiet: bool = False):
        self.desc, self.quiet, self.bar = desc, quiet, None

    def __call__(self, step: int, total: int):
        if self.quiet:
            return
        if self.bar is None:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=self.desc, unit="step", file=sys.stderr)
                _Progress.live.add(self.bar)
            except ImportError:
                self.bar = False
        if self.bar:
            self.bar.update(1)
            if step + 1 >= total:
                self.bar.close()
                _Progress.live.discard(self.bar)
                self.bar = None
        else:
            print(f"\r{self.desc}: {step + 1}/{total}", end="\n" if step + 1 >= total else "", file=sys.stderr)


def save_images(images, out: Path, grid_cols: int | None = None, overwrite: bool = True) -> list[Path]:
    """Save [B,H,W,3] floats: one file, `name_1.png…` for a batch, or one grid image when grid_cols is set.

    With overwrite=False an existing file is never replaced, even one another run wrote a moment ago (the name is
    taken atomically: core.fsio)."""
    import numpy as np
    from PIL import Image

    from .outputs import save_image_atomic

    arrays = [(img.clamp(0, 1).numpy() * 255 + 0.5).astype(np.uint8) for img in images.cpu().float()]
    if grid_cols:
        h, w = arrays[0].shape[:2]
        rows = (len(arrays) + grid_cols - 1) // grid_cols
        canvas = Image.new("RGB", (w * grid_cols, h * rows), "white")
        for i, arr in enumerate(arrays):
            canvas.paste(Image.fromarray(arr), ((i % grid_cols) * w, (i // grid_cols) * h))
        save_image_atomic(canvas, out, overwrite=overwrite)
        return [out]
    if len(arrays) == 1:
        save_image_atomic(arrays[0], out, overwrite=overwrite)
        return [out]
    paths = []
    for i, arr in enumerate(arrays, 1):
        path = out.with_name(f"{out.stem}_{i}{out.suffix}")
        save_image_atomic(arr, path, overwrite=overwrite)
        paths.append(path)
    return paths


ENCODE_IGNORED = ("--prior", "--decoder", "--decoder-unet", "--decoder-movq")


def _add_model_args(p: argparse.ArgumentParser, download: bool = True, clip_only: bool = False):
    """The model options. `download`: also --download and --decoder-lora (the image commands). `clip_only`: only
    the CLIP towers are offered (encode); the prior/decoder options are still accepted, hidden, and ignored with a
    warning, so old scripts keep running."""
    title = ("models (the CLIP towers, from a ComfyUI models/ folder or named one by one)" if clip_only else
             "models (single files in a ComfyUI models/ folder, or named one by one)")
    g = p.add_argument_group(title)
    g.add_argument("--models", metavar="DIR", help="a ComfyUI models/ folder: every file is found under the default "
                   "names the bundled workflows use (or any compatible file), and the choice is printed (no default: "
                   "without it, name each file)")
    if clip_only:
        for flag in ENCODE_IGNORED:
            g.add_argument(flag, dest="ignored_" + flag[2:].replace("-", "_"), help=argparse.SUPPRESS)
    else:
        g.add_argument("--prior", metavar="FILE", help="λ-ECLIPSE prior: a .safetensors file (or a folder with "
                       "config.json) (default: found in --models)")
    g.add_argument("--clip", metavar="PATH", help="bigG with both towers: an OpenCLIP folder or file (a text-only file "
                   "is used for the text tower; the vision tower is then looked for in --models) (default: the towers are found in --models)")
    g.add_argument("--clip-text", metavar="PATH", help="bigG text tower: a transformers/OpenCLIP .safetensors (e.g. "
                   "SDXL's clip_g), an SDXL checkpoint, or a transformers folder (default: found in --models)")
    g.add_argument("--clip-vision", metavar="PATH", help="bigG vision tower: e.g. ComfyUI's clip_vision_g.safetensors, "
                   "or a transformers folder (default: found in --models)")
    if not clip_only:
        g.add_argument("--decoder", metavar="DIR", help="Kandinsky 2.2 decoder diffusers folder (model_index.json, "
                       "unet/, movq/, scheduler/) (default: its two files are found in --models)")
        g.add_argument("--decoder-unet", metavar="FILE", help="Kandinsky 2.2 decoder UNet as one .safetensors "
                       "(models/diffusion_models) (default: found in --models)")
        g.add_argument("--decoder-movq", metavar="FILE", help="Kandinsky 2.2 MoVQ as one .safetensors (models/vae) "
                       "(default: found in --models)")
    if download:
        g.add_argument("--download", dest="download", action="store_true",
                       help="first fetch the missing model files into --models from the Hugging Face hub (nothing is "
                       "ever downloaded without this flag)")
        g.add_argument("--allow-download", dest="download", action="store_true", help=argparse.SUPPRESS)  # old name
    if download:  # the image commands (encode needs no decoder)
        g.add_argument("--decoder-lora", action="append", metavar="PATH[:STRENGTH]", help="a concept LoRA of the "
                       "decoder (from `trainer finetune-decoder`), at strength 1 unless given; repeatable (default: "
                       "none)")
    g.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 …")
    g.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"], help=(
        "CLIP" if clip_only else "CLIP and decoder") + " precision (auto: bf16/fp16 on GPU, fp32 on CPU)")


def _model_paths(args, needed=None, existing_folder: bool = False):
    """Resolve (and with --download first fetch) the model files; prints which file serves which part.

    `existing_folder`: with --download, refuse a --models folder that does not exist (a typo would otherwise be
    created and filled with 10 GB); generate and interpolate ask for it."""
    from .paths import PARTS, resolve_models

    explicit = {name: getattr(args, name, None)
                for name in ("prior", "clip", "clip_text", "clip_vision", "decoder", "decoder_unet", "decoder_movq")}
    if getattr(args, "download", False):
        if not args.models:
            raise InputError("--download needs --models DIR: the ComfyUI models/ folder to download into.")
        from .download import check_models_folder, download_models

        if existing_folder:
            check_models_folder(args.models)  # a mistyped --models is refused, never created and filled

        from .paths import find_models

        present = find_models(args.models, needed or PARTS)  # a file under another name counts: no second copy
        wanted = [key for key in (needed or PARTS) if key not in present
                  and not explicit.get(key) and not explicit.get(key.split("_")[0])]
        if wanted:
            download_models(args.models, only=wanted, log=lambda line: print(line, file=sys.stderr))
    found = resolve_models(args.models, needed=needed or PARTS, **explicit)
    for line in found.notes:
        print(f"using {line}", file=sys.stderr)
    return found


def _add_render_args(p: argparse.ArgumentParser, default_out: str):
    p.add_argument("--prompt", required=True, help="the prompt; each subject word must appear in it (required)")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed+i for the prior noise and the decoder latents")
    p.add_argument("--steps", type=int, default=50, help="decoder steps (paper: 50; recommended: ddpm/ddim 50, "
                   "dpmpp_2m/unipc 20, euler_a 30)")
    p.add_argument("--sampler", default="ddpm", help="decoder sampler: ddpm (official), ddim (the paper's), "
                   "dpmpp_2m, dpmpp_2m_karras, unipc, euler_a")
    p.add_argument("--guidance", type=float, default=7.5, help="decoder classifier-free guidance (paper: 7.5)")
    p.add_argument("--width", type=int, default=512, help="rounded up to a multiple of 64")
    p.add_argument("--height", type=int, default=512, help="rounded up to a multiple of 64")
    p.add_argument("--fit", choices=["crop", "pad"], default="crop", help="subject framing: centre crop (official) or "
                   "pad to a white square")
    p.add_argument("--out", default=default_out, help="output image (.png, .jpg, .webp)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files (never done without it)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _finite(value, flag: str, hint: str = "") -> float:
    """`value` as a float when it is a finite number, else an InputError naming the flag (nan and inf parse as floats)."""
    if not math.isfinite(value):
        raise InputError(f"{flag} must be a finite number{hint}; got {value}.")
    return float(value)


def _check_render_args(args, count: int, extra_outputs=()):
    """The settings of an image command and its output paths (nothing is read or loaded)."""
    from .outputs import check_output_path, check_size
    from .seeds import check_seed

    check_seed(args.seed, "--seed")
    check_size(args.width, args.height)
    from .decoder import check_sampler

    check_sampler(args.sampler)
    if getattr(args, "init_image", None) is None and getattr(args, "strength", None) is not None:
        log.warning("--strength only matters with --init-image; ignored.")
    if args.steps < 1 or args.steps > 1000:
        raise InputError(f"--steps must be between 1 and 1000; got {args.steps}.")
    _finite(args.guidance, "--guidance", " (1 = no guidance; the paper uses 7.5)")
    if args.guidance < 0:
        raise InputError(f"--guidance must be 0 or more (1 = no guidance; the paper uses 7.5); got {args.guidance}.")
    if args.guidance < 1:
        log.warning("--guidance %.2f is below 1: classifier-free guidance is off (the same as 1).", args.guidance)
    _device(args.device)
    paths = check_output_path(args.out, count=count, overwrite=args.overwrite)
    for extra in extra_outputs:
        paths += check_output_path(extra, overwrite=args.overwrite)
    return paths


def _parse_lora(spec: str) -> tuple[str, float]:
    """PATH[:STRENGTH] → (path, strength); the file must exist (checked before any model loads)."""
    from .fsio import require_regular_file

    path, strength = spec, 1.0
    if not os.path.lexists(spec) and ":" in spec:
        path, _, text = spec.rpartition(":")
        try:
            strength = float(text)
        except ValueError:
            raise InputError(f"--decoder-lora {spec!r}: the strength after ':' must be a number, e.g. lora.safetensors:0.8.") from None
        if not math.isfinite(strength):
            raise InputError(f"--decoder-lora {spec!r}: the strength must be a finite number (0 = off, 1 = as "
                             f"trained); got {text}.")
    if not os.path.lexists(path):
        raise InputError(f"--decoder-lora {spec!r}: {path} does not exist. Give a LoRA made by "
                         "`python -m lambda_eclipse.trainer finetune-decoder`.")
    require_regular_file(path, "--decoder-lora file")
    return path, strength


def _read_loras(specs) -> list:
    """Every --decoder-lora read and checked (a LoRA is a few MB): (DecoderLoRA, strength), before any model loads.
    Whether its layers fit the UNet is known only once the UNet is loaded (core.lora.check_lora_fits)."""
    from .lora import load_decoder_lora

    return [(load_decoder_lora(path), strength) for path, strength in (_parse_lora(spec) for spec in specs or [])]


def _check_words(prompt: str, subject_lists) -> None:
    """Every subject word against the prompt with CLIP's tokenizer alone (core.interleave.check_prompt_words): a word
    absent, inside a longer word, on another subject's token or past the 77-token limit stops the run here."""
    from .interleave import check_prompt_words

    for subjects in subject_lists:
        check_prompt_words(prompt, [s.word for s in subjects])


def _model_files(args, needed=None):
    """Resolve (with --download first fetch) the model files and read every header (core.verify.check_loadable)."""
    from .verify import check_loadable

    paths = _model_paths(args, needed=needed, existing_folder=True)
    check_loadable(paths)  # every file's header first: a wrong file is named before minutes of loading
    return paths


@dataclass
class _Plan:
    """What an image command will do, every part checked: its inputs opened, its files' headers read."""

    paths: object = None  # core.paths.ResolvedModels
    subjects: list = field(default_factory=list)
    corners: list = field(default_factory=list)
    canny: object = None
    init: object = None
    loras: list = field(default_factory=list)
    images: list = field(default_factory=list)
    outputs: list = field(default_factory=list)


def _validate_generate(args) -> _Plan:
    """generate's one validation pass: settings, output paths, images, words, LoRAs, then the model files."""
    from .canny import canny_edges
    from .images import open_image

    if args.batch < 1 or args.batch > 64:
        raise InputError(f"--batch must be between 1 and 64; got {args.batch}.")
    low = _finite(args.canny_low, "--canny-low")
    high = _finite(args.canny_high, "--canny-high")
    if args.strength is not None:
        _finite(args.strength, "--strength", " in (0, 1]")
    edges_path = Path(args.out).with_name(Path(args.out).stem + "_edges.png") if args.save_edges else None
    if args.save_edges and not args.canny:
        log.warning("--save-edges only matters with --canny; no edge map will be written.")
    plan = _Plan()
    plan.outputs = _check_render_args(args, count=args.batch, extra_outputs=[edges_path] if edges_path else [])
    plan.subjects = _subjects(args.subject)
    plan.canny = open_image(args.canny, what="--canny layout image") if args.canny else None
    if plan.canny is not None:
        canny_edges(plan.canny, low, high)  # the thresholds, checked on the real image (milliseconds)
    plan.init = open_image(args.init_image, what="--init-image") if args.init_image else None
    args.strength = 0.6 if args.strength is None else args.strength
    if plan.init is not None and not 0 < args.strength <= 1:
        raise InputError(f"--strength must be in (0, 1] (1 redraws everything); got {args.strength}.")
    _check_words(args.prompt, [plan.subjects])
    plan.loras = _read_loras(args.decoder_lora)
    plan.paths = _model_files(args)
    return plan


def _validate_interpolate(args) -> _Plan:
    if args.grid < 1 or args.grid > 16:
        raise InputError(f"--grid must be between 1 (2×2) and 16 (17×17); got {args.grid}.")
    plan = _Plan()
    plan.outputs = _check_render_args(args, count=1)
    opened: dict = {}
    plan.corners = [_subjects(c, opened) for c in (args.top_left, args.top_right, args.bottom_left, args.bottom_right)]
    _check_words(args.prompt, plan.corners)
    plan.loras = _read_loras(args.decoder_lora)
    plan.paths = _model_files(args)
    return plan


def _load(args, plan: _Plan | None = None):
    """The three models of a validated plan (with its decoder LoRAs applied)."""
    from .pipeline import load_models

    plan = plan if plan is not None else _Plan(paths=_model_files(args), loras=_read_loras(getattr(args, "decoder_lora", None)))
    device = _device(args.device)
    models = load_models(plan.paths, device=device, dtype=_dtype(args.dtype, device))
    if plan.loras:
        from .lora import apply_decoder_lora

        for lora, strength in plan.loras:
            models.decoder = apply_decoder_lora(models.decoder, lora, strength)
    return models


def cmd_generate(args) -> int:
    from .outputs import save_image_atomic
    from .pipeline import generate

    plan = _validate_generate(args)
    models = _load(args, plan)
    start = time.perf_counter()
    result = generate(
        models, args.prompt, plan.subjects, canny_image=plan.canny, canny_low=args.canny_low,
        canny_high=args.canny_high, seed=args.seed, batch=args.batch, steps=args.steps, guidance=args.guidance,
        width=args.width, height=args.height, fit=args.fit, callback=_Progress("decode", args.quiet),
        sampler=args.sampler, init_image=plan.init, strength=args.strength if plan.init is not None else 1.0,
    )
    paths = save_images(result.images, Path(args.out), overwrite=args.overwrite)
    if result.edge_map is not None and args.save_edges:
        edges_path = Path(args.out).with_name(Path(args.out).stem + "_edges.png")
        save_image_atomic(result.edge_map, edges_path, overwrite=args.overwrite)
    print(f"{result.prompt.describe()}\nwrote {', '.join(map(str, paths))} in {time.perf_counter() - start:.1f} s")
    return 0


def cmd_interpolate(args) -> int:
    from .pipeline import interpolation_grid

    plan = _validate_interpolate(args)
    models = _load(args, plan)
    result = interpolation_grid(
        models, args.prompt, plan.corners, grid_steps=args.grid, mode=args.mode, seed=args.seed, steps=args.steps,
        guidance=args.guidance, width=args.width, height=args.height, fit=args.fit,
        callback=_Progress("decode", args.quiet), sampler=args.sampler,
    )
    paths = save_images(result.images, Path(args.out), grid_cols=args.grid + 1, overwrite=args.overwrite)
    print(f"wrote a {args.grid + 1}×{args.grid + 1} grid to {paths[0]}")
    return 0


def _check_features_out(out: Path, overwrite: bool) -> None:
    """encode's --out: a .safetensors file name (not a folder) in a folder that can be written; creates nothing."""
    from .outputs import check_output_path

    if out.is_dir():
        raise InputError(f"--out {out} is a folder, not a file. Give a file name inside it, e.g. "
                         f"{out / 'features.safetensors'}.")
    if out.suffix.lower() != ".safetensors":
        raise InputError(f"--out {out}: the features are written as .safetensors; name the file e.g. features.safetensors.")
    if out.exists() and not overwrite:
        raise InputError(f"{out} exists. Pass --overwrite to replace it, or choose another --out.")
    check_output_path(out, overwrite=True, suffixes=(".safetensors",))  # a parent that is a file, not writable …


def _validate_encode(args) -> _Plan:
    """encode's one validation pass: what to encode, --out, the images, the prompt's length, then the CLIP files."""
    from .images import open_image

    for flag in ENCODE_IGNORED:
        if getattr(args, "ignored_" + flag[2:].replace("-", "_"), None) is not None:
            log.warning("encode uses only the CLIP towers: %s is ignored.", flag)
    if not args.prompt and not args.image:
        raise InputError("Nothing to encode: give --prompt TEXT and/or --image PATH (repeatable).")
    _check_features_out(Path(args.out), args.overwrite)
    _device(args.device)
    plan = _Plan()
    plan.images = [open_image(path, what="--image") for path in args.image or []]
    if args.prompt:
        from .interleave import check_prompt_words

        check_prompt_words(args.prompt, [])  # an empty prompt is refused; one over 77 tokens is said
    needed = (["clip_text"] if args.prompt else []) + ["clip_vision"]
    if args.prompt and not args.image and not (args.clip_vision or args.clip or args.models):
        needed = ["clip_text"]  # a prompt alone needs no vision tower; blank_embed is then left out
    plan.paths = _model_files(args, needed=needed)
    return plan


def cmd_encode(args) -> int:
    """CLIP features only: prompt tokens/pooled/mask, subject image embeddings, the blank embedding → .safetensors."""
    import torch

    from .clip import load_clip_towers
    from .fsio import save_file_atomic
    from .loading import resolve_dtype

    plan = _validate_encode(args)
    paths, out = plan.paths, Path(args.out)
    device = _device(args.device)
    encoder = load_clip_towers(text=paths.get("clip_text"), vision=paths.get("clip_vision"), device=device,
                               dtype=_dtype(args.dtype, device))
    tensors = {}
    if args.prompt:
        features = encoder.encode_text(args.prompt)
        tensors.update(text_pooled=features.pooled, text_tokens=features.tokens, text_mask=features.mask)
    if plan.images:
        tensors["image_embeds"] = torch.cat([encoder.encode_subject(img, None, args.fit)[None] for img in plan.images])
    if "clip_vision" in paths:
        tensors["blank_embed"] = encoder.blank_embedding().reshape(1, -1)
    store = resolve_dtype(args.store_dtype)
    tensors = {k: (v.to(store) if v.is_floating_point() else v).cpu().contiguous() for k, v in tensors.items()}
    metadata = {"prompt": args.prompt or "", "images": "\n".join(map(str, args.image or [])),
                "clip_text": str(paths.get("clip_text", "")), "clip_vision": str(paths.get("clip_vision", ""))}
    save_file_atomic(tensors, out, metadata=metadata, overwrite=args.overwrite)
    for name, tensor in tensors.items():
        print(f"{name:13s} {list(tensor.shape)} {str(tensor.dtype).replace('torch.', '')}")
    print(f"wrote {out}")
    return 0


def _draw_subject(color, shape):
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (320, 240), "white")  # a subject of 200×160 px: no "small subject" warning
    mask = Image.new("L", (320, 240), 0)
    for target, fill in ((img, color), (mask, 255)):
        draw = ImageDraw.Draw(target)
        (draw.ellipse if shape == "ellipse" else draw.rectangle)((60, 40, 260, 200), fill=fill)
    return img, mask


def _check_models_dir(args) -> tuple[str | None, str]:
    """check's models folder (--models, else the environment) and where it came from; refuses a file or a folder
    that does not exist (every file would otherwise be reported missing, for a typo)."""
    from .paths import default_models_dir

    models_dir, source = (args.models, "--models") if args.models else default_models_dir()
    if models_dir:
        path = Path(models_dir).expanduser()
        if path.exists() and not path.is_dir():
            raise InputError(f"{source} {models_dir} is a file, not a folder. Give the ComfyUI models/ folder (the one "
                             "holding checkpoints/, vae/, clip_vision/ …).")
        if not path.exists():
            raise InputError(f"{source} {models_dir} does not exist. Check the path: it is the models/ folder inside "
                             "your ComfyUI folder (e.g. ComfyUI/models).")
    return models_dir, source


def _tiny_run(tmp: str):
    """The whole pipeline on tiny random-weight models written to `tmp`: (same seed → same pixels, images)."""
    from .pipeline import SubjectInput, generate, load_models
    from .tiny import write_tiny_models

    try:
        paths = write_tiny_models(tmp)
    except OSError as exc:
        raise InputError(f"check could not write its tiny test models to {tmp} ({exc.strerror or exc}). Free some "
                         "space there, or set TMPDIR to a folder you can write to.") from exc
    models = load_models(paths, device="cpu", dtype="fp32")
    dog, dog_mask = _draw_subject((160, 90, 40), "ellipse")
    hat, _ = _draw_subject((30, 30, 200), "rect")
    layout, _ = _draw_subject((0, 0, 0), "ellipse")
    subjects = [SubjectInput("dog", dog, dog_mask), SubjectInput("hat", hat)]
    runs = [generate(models, "a dog is wearing a hat", subjects, canny_image=layout, seed=7, batch=2, steps=3,
                     guidance=4.0, width=64, height=64) for _ in range(2)]
    return runs[0], bool((runs[0].images == runs[1].images).all())


def cmd_check(args) -> int:
    """Verify the real weights by content (or name exactly what is missing or broken), then prove the plumbing
    on tiny random models.

    Exit 0: every file the pipeline needs is there and loads (tiny test models or other builds pass with a warning);
    2: a file is missing or broken (the `download` command fetches it); 1: --strict and a file is not the published
    one, or the tiny run failed."""
    from .errors import MissingModelsError
    from .paths import PARTS, manifest, resolve_models
    from .verify import verify

    if args.out:
        from .outputs import check_output_path

        check_output_path(args.out, overwrite=args.overwrite)
    models_dir, source = _check_models_dir(args)
    print("1/2  Real weights" + (f" in {models_dir}" + (f" (from {source})" if source != "--models" else "")
                                 if models_dir else ""))
    explicit = dict(prior=args.prior, clip=args.clip, clip_text=args.clip_text, clip_vision=args.clip_vision,
                    decoder=args.decoder, decoder_unet=args.decoder_unet, decoder_movq=args.decoder_movq)
    entries = manifest()
    missing, broken, other = [], [], []
    for key in PARTS:
        try:
            found = resolve_models(models_dir, needed=[key], **explicit)
        except MissingModelsError:
            missing.append(key)
            print(f"     MISSING {entries[key].what}\n" + entries[key].describe(Path(models_dir) if models_dir else None)
                  .replace("\n", "\n     ").replace("  - ", "     ", 1))
            continue
        verdict = verify(key, found[key])
        where = "" if str(found[key]) in verdict.message else f"{found[key]}: "
        if verdict.ok:
            print(f"     ok      {key}: {found[key]} ({verdict.message})")
        elif verdict.usable and not args.strict:
            other.append(key)
            print(f"     warning {key}: {where}{verdict.message}")
        elif verdict.usable:
            other.append(key)
            print(f"     BROKEN  {key}: {where}{verdict.message}")
        else:
            broken.append(key)
            print(f"     BROKEN  {key}: {where}{verdict.message}")

    print("2/2  Whole pipeline on tiny random-weight models (proves the code paths; the picture is noise by construction)")
    try:
        with tempfile.TemporaryDirectory(prefix="lambda_eclipse_check_") as tmp:
            start = time.perf_counter()
            result, same = _tiny_run(tmp)
            print(f"     {result.prompt.describe()}")
            print(f"     images {tuple(result.images.shape)}, same seed → same pixels: {same}, "
                  f"{time.perf_counter() - start:.1f} s")
            plumbing = same and tuple(result.images.shape) == (2, 64, 64, 3)
            if args.out:
                save_images(result.images, Path(args.out), grid_cols=2, overwrite=args.overwrite)
                print(f"     wrote {args.out} (tiny random models: noise, not a picture)")
    except OSError as exc:  # the temporary folder itself (TMPDIR full or read-only)
        raise InputError(f"check could not use a temporary folder in {tempfile.gettempdir()} ({exc.strerror or exc}). "
                         "Free some space there, or set TMPDIR to a folder you can write to.") from exc
    if missing or broken:
        print("check FAILED")
        parts = ([f"{len(missing)} missing ({', '.join(missing)})"] if missing else []) + (
            [f"{len(broken)} broken ({', '.join(broken)})"] if broken else [])
        where = f"--models {models_dir}" if models_dir else "--models <ComfyUI>/models"
        raise ModelFileError(
            f"check: model files the pipeline needs are {' and '.join(parts)}; see the lines above. Run "
            f"`python -m lambda_eclipse download {where}` once: it fetches every missing file (and replaces a broken "
            "one at its default name), verified by sha256. Then run check again.")
    ok = plumbing and not (args.strict and other)
    print("check passed" if ok else "check FAILED")
    if other:
        where = f"--models {models_dir}" if models_dir else "--models <ComfyUI>/models"
        print(f"note: {', '.join(other)} {'is' if len(other) == 1 else 'are'} not the published weights (see above): "
              "fine for a dry run, not for real pictures" + ("" if args.strict else "; `check --strict` fails on this")
              + f". `python -m lambda_eclipse download {where}` replaces such a file at its default name with the "
              "published one.")
    return 0 if ok else EXIT_CHECK_STRICT


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lambda_eclipse", formatter_class=HelpFormatter,
                                     description="λ-ECLIPSE: subject-driven images with a diffusion-free prior and "
                                     "Kandinsky 2.2.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what is loaded and inferred")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name, **kwargs):
        return sub.add_parser(name, formatter_class=HelpFormatter, **kwargs)

    gen = command("generate", help="subjects + prompt (+ Canny layout) → image(s)")
    gen.add_argument("--subject", action="append", metavar="WORD=IMAGE[:MASK]", help="a subject: its word in the "
                     "prompt and its photo (+ optional mask); repeat for more subjects (default: none, a plain text "
                     "prompt)")
    gen.add_argument("--canny", metavar="IMAGE", help="layout image; its Canny edges are a soft control (default: none)")
    gen.add_argument("--canny-low", type=float, default=100, metavar="LOW", help="Canny low threshold, 0 ≤ LOW ≤ "
                     "HIGH (the default is the official value)")
    gen.add_argument("--canny-high", type=float, default=200, metavar="HIGH", help="Canny high threshold (the default "
                     "is the official value)")
    gen.add_argument("--save-edges", action="store_true", help="also write the edge map next to the output "
                     "(OUT_edges.png)")
    gen.add_argument("--batch", type=int, default=1, help="images to make (seed, seed+1, …)")
    gen.add_argument("--init-image", metavar="IMAGE", help="img2img: start from this picture (MoVQ-encoded, noised "
                     "to --strength; default: none, start from noise)")
    gen.add_argument("--strength", type=float, default=None, help="img2img: how much of --init-image is redrawn, "
                     "(0, 1] (default: 0.6)")
    _add_render_args(gen, "lambda_eclipse.png")
    _add_model_args(gen)
    gen.set_defaults(func=cmd_generate)

    interp = command("interpolate", help="the 4-corner interpolation grid of the paper")
    for corner in ("top-left", "top-right", "bottom-left", "bottom-right"):
        interp.add_argument(f"--{corner}", nargs="+", required=True, metavar="WORD=IMAGE[:MASK]",
                            help=f"subjects of the {corner} corner (required)")
    interp.add_argument("--grid", type=int, default=2, help="steps between corners: 1 → 2×2, 4 → 5×5")
    interp.add_argument("--mode", choices=["lerp", "slerp"], default="lerp", help="blend (official: lerp)")
    _add_render_args(interp, "lambda_eclipse_grid.png")
    _add_model_args(interp)
    interp.set_defaults(func=cmd_interpolate)

    enc = command("encode", help="CLIP features only (prompt tokens, subject and blank embeddings) → .safetensors")
    enc.add_argument("--prompt", help="text to encode: text_pooled [1,E], text_tokens [1,77,W], text_mask [1,77] "
                     "(default: none)")
    enc.add_argument("--image", action="append", metavar="PATH", help="an image to embed (repeatable): image_embeds "
                     "[N,E] in order (default: none)")
    enc.add_argument("--fit", choices=["crop", "pad"], default="crop", help="image framing: centre crop (official) or "
                     "pad to a white square")
    enc.add_argument("--store-dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="precision of the "
                     "written tensors")
    enc.add_argument("--out", required=True, help="output .safetensors file (required)")
    enc.add_argument("--overwrite", action="store_true", help="replace --out if it exists (never done without it)")
    _add_model_args(enc, download=False, clip_only=True)
    enc.set_defaults(func=cmd_encode)

    from .download import add_download_parser
    from .paths import MODELS_ENV_HELP

    add_download_parser(sub)

    check = command("check", help="verify an install: find the weights, run the pipeline on tiny models",
                    description="Verify an install: each model file is found and checked by its content (exit 2 when "
                    "one the pipeline needs is missing or broken), then the whole pipeline runs on tiny random "
                    "models. Tiny test models or other builds in place of the published files pass with a warning; "
                    "--strict fails on them (exit 1).")
    check.add_argument("--models", metavar="DIR", help=f"ComfyUI models/ folder (default: {MODELS_ENV_HELP})")
    for flag, metavar, what in (
            ("--prior", "FILE", "the λ-ECLIPSE prior"), ("--clip", "PATH", "bigG with both towers"),
            ("--clip-text", "PATH", "the bigG text tower"), ("--clip-vision", "PATH", "the bigG vision tower"),
            ("--decoder", "DIR", "the Kandinsky 2.2 decoder diffusers folder"),
            ("--decoder-unet", "FILE", "the decoder UNet"), ("--decoder-movq", "FILE", "the MoVQ")):
        check.add_argument(flag, metavar=metavar, help=f"check this file as {what} (as for generate; default: the one "
                           "found in --models)")
    check.add_argument("--strict", action="store_true", help="also fail (exit 1) when a file loads but is not the "
                       "published one: a tiny test model, another build, another byte size")
    check.add_argument("--out", metavar="IMAGE", help="also save the tiny run's (noise) images here (default: none)")
    check.add_argument("--overwrite", action="store_true", help="replace --out if it exists (never done without it)")
    check.set_defaults(func=cmd_check)
    return parser


class _SayOnce(logging.Filter):
    """A warning is said once per command, however many times the code paths meet it (the validation pass and
    then the run check the same prompt; an interpolation grid has four corners)."""

    def __init__(self):
        super().__init__()
        self.seen: set = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key = (record.levelno, record.getMessage())
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


def run_command(args, user_errors: tuple = ()) -> int:
    """Run a parsed command: a user's mistake prints `error: <message>` and exits 2 (no traceback); Ctrl-C 130."""
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    once = _SayOnce()
    log.addFilter(once)
    try:
        return args.func(args)
    except (LambdaEclipseError, *user_errors) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        for bar in list(_Progress.live):  # end the progress line, so that the message is a line of its own
            try:
                bar.close()
            except Exception:
                pass
        _Progress.live.clear()
        print("stopped by Ctrl-C; no output file was left half-written", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        log.removeFilter(once)


def main(argv=None) -> int:
    return run_command(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
