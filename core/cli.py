"""Command line: `python -m lambda_eclipse generate | interpolate | check`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

from .errors import InputError, LambdaEclipseError

log = logging.getLogger("lambda_eclipse")

EXIT_USER_ERROR = 2


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
    if not Path(rest).is_file() and ":" in rest:
        image, mask = rest.rsplit(":", 1)
    for label, path in (("image", image), ("mask", mask)):
        if path is not None and not Path(path).is_file():
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

    def __init__(self, desc: str, quiet: bool = False):
        self.desc, self.quiet, self.bar = desc, quiet, None

    def __call__(self, step: int, total: int):
        if self.quiet:
            return
        if self.bar is None:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=self.desc, unit="step", file=sys.stderr)
            except ImportError:
                self.bar = False
        if self.bar:
            self.bar.update(1)
            if step + 1 >= total:
                self.bar.close()
                self.bar = None
        else:
            print(f"\r{self.desc}: {step + 1}/{total}", end="\n" if step + 1 >= total else "", file=sys.stderr)


def save_images(images, out: Path, grid_cols: int | None = None) -> list[Path]:
    """Save [B,H,W,3] floats: one file, `name_1.png…` for a batch, or one grid image when grid_cols is set."""
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
        save_image_atomic(canvas, out)
        return [out]
    if len(arrays) == 1:
        save_image_atomic(arrays[0], out)
        return [out]
    paths = []
    for i, arr in enumerate(arrays, 1):
        path = out.with_name(f"{out.stem}_{i}{out.suffix}")
        save_image_atomic(arr, path)
        paths.append(path)
    return paths


def _add_model_args(p: argparse.ArgumentParser, download: bool = True):
    g = p.add_argument_group("models (single files in a ComfyUI models/ folder, or named one by one)")
    g.add_argument("--models", help="a ComfyUI models/ folder: every file is found under the default names the "
                   "bundled workflows use (or any compatible file), and the choice is printed")
    g.add_argument("--prior", help="λ-ECLIPSE prior: a .safetensors file (or a folder with config.json)")
    g.add_argument("--clip", help="bigG with both towers: an OpenCLIP folder or file (a text-only file is used for the "
                   "text tower; the vision tower is then looked for in --models)")
    g.add_argument("--clip-text", help="bigG text tower: a transformers/OpenCLIP .safetensors (e.g. SDXL's clip_g), an "
                   "SDXL checkpoint, or a transformers folder")
    g.add_argument("--clip-vision", help="bigG vision tower: e.g. ComfyUI's clip_vision_g.safetensors, or a transformers folder")
    g.add_argument("--decoder", help="Kandinsky 2.2 decoder diffusers folder (model_index.json, unet/, movq/, scheduler/)")
    g.add_argument("--decoder-unet", help="Kandinsky 2.2 decoder UNet as one .safetensors (models/diffusion_models)")
    g.add_argument("--decoder-movq", help="Kandinsky 2.2 MoVQ as one .safetensors (models/vae)")
    if download:
        g.add_argument("--download", "--allow-download", dest="download", action="store_true",
                       help="first fetch the missing model files into --models from the Hugging Face hub (nothing is "
                       "ever downloaded without this flag)")
    if download:  # the image commands (encode needs no decoder)
        g.add_argument("--decoder-lora", action="append", metavar="PATH[:STRENGTH]", help="a concept LoRA of the "
                       "decoder (from `trainer finetune-decoder`), at strength 1 unless given; repeatable")
    g.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 …")
    g.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"], help="CLIP and decoder precision (auto: bf16/fp16 on GPU, fp32 on CPU)")


def _model_paths(args, needed=None):
    """Resolve (and with --download first fetch) the model files; prints which file serves which part."""
    from .paths import PARTS, resolve_models

    explicit = dict(prior=args.prior, clip=args.clip, clip_text=args.clip_text, clip_vision=args.clip_vision,
                    decoder=args.decoder, decoder_unet=args.decoder_unet, decoder_movq=args.decoder_movq)
    if getattr(args, "download", False):
        if not args.models:
            raise InputError("--download needs --models DIR: the ComfyUI models/ folder to download into.")
        from .download import download_models

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
    p.add_argument("--prompt", required=True, help="the prompt; each subject word must appear in it")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed+i for the prior noise and the decoder latents")
    p.add_argument("--steps", type=int, default=50, help="decoder steps (paper: 50; recommended: ddpm/ddim 50, "
                   "dpmpp_2m/unipc 20, euler_a 30)")
    p.add_argument("--sampler", default="ddpm", help="decoder sampler: ddpm (official, default), ddim (the paper's), "
                   "dpmpp_2m, dpmpp_2m_karras, unipc, euler_a")
    p.add_argument("--guidance", type=float, default=7.5, help="decoder classifier-free guidance (paper: 7.5)")
    p.add_argument("--width", type=int, default=512, help="rounded up to a multiple of 64")
    p.add_argument("--height", type=int, default=512, help="rounded up to a multiple of 64")
    p.add_argument("--fit", choices=["crop", "pad"], default="crop", help="subject framing: centre crop (official) or pad to a white square")
    p.add_argument("--out", default=default_out, help="output image (.png, .jpg, .webp)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files (never done without it)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _check_render_args(args, count: int, extra_outputs=()):
    """Everything about the run that can be wrong, checked before any model is loaded."""
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
    if args.guidance < 0:
        raise InputError(f"--guidance must be 0 or more (1 = no guidance; the paper uses 7.5); got {args.guidance}.")
    if args.guidance < 1:
        log.warning("--guidance %.2f is below 1: classifier-free guidance is off (the same as 1).", args.guidance)
    _device(args.device)
    paths = check_output_path(args.out, count=count, overwrite=args.overwrite)
    for extra in extra_outputs:
        paths += check_output_path(extra, overwrite=args.overwrite)
    return paths


def _load(args):
    from .pipeline import load_models

    from .verify import check_loadable

    paths = _model_paths(args)
    check_loadable(paths)  # every file's header first: a wrong file is named before minutes of loading
    loras = [_parse_lora(spec) for spec in getattr(args, "decoder_lora", None) or []]
    device = _device(args.device)
    models = load_models(paths, device=device, dtype=_dtype(args.dtype, device))
    if loras:
        from .lora import apply_decoder_lora

        for path, strength in loras:
            models.decoder = apply_decoder_lora(models.decoder, path, strength)
    return models


def _parse_lora(spec: str) -> tuple[str, float]:
    """PATH[:STRENGTH] → (path, strength); the file must exist (checked before any model loads)."""
    path, strength = spec, 1.0
    if not Path(spec).is_file() and ":" in spec:
        path, _, text = spec.rpartition(":")
        try:
            strength = float(text)
        except ValueError:
            raise InputError(f"--decoder-lora {spec!r}: the strength after ':' must be a number, e.g. lora.safetensors:0.8.") from None
    if not Path(path).is_file():
        raise InputError(f"--decoder-lora {spec!r}: {path} does not exist. Give a LoRA made by "
                         "`python -m lambda_eclipse.trainer finetune-decoder`.")
    return path, strength


def cmd_generate(args) -> int:
    from .images import open_image
    from .outputs import save_image_atomic
    from .pipeline import generate

    if args.batch < 1 or args.batch > 64:
        raise InputError(f"--batch must be between 1 and 64; got {args.batch}.")
    edges_path = Path(args.out).with_name(Path(args.out).stem + "_edges.png") if args.save_edges else None
    _check_render_args(args, count=args.batch, extra_outputs=[edges_path] if edges_path else [])
    subjects = _subjects(args.subject)
    canny = open_image(args.canny, what="--canny layout image") if args.canny else None
    init = open_image(args.init_image, what="--init-image") if args.init_image else None
    args.strength = 0.6 if args.strength is None else args.strength
    if init is not None and not 0 < args.strength <= 1:
        raise InputError(f"--strength must be in (0, 1] (1 redraws everything); got {args.strength}.")
    models = _load(args)
    start = time.perf_counter()
    result = generate(
        models, args.prompt, subjects, canny_image=canny, canny_low=args.canny_low, canny_high=args.canny_high,
        seed=args.seed, batch=args.batch, steps=args.steps, guidance=args.guidance, width=args.width,
        height=args.height, fit=args.fit, callback=_Progress("decode", args.quiet), sampler=args.sampler,
        init_image=init, strength=args.strength if init is not None else 1.0,
    )
    paths = save_images(result.images, Path(args.out))
    if result.edge_map is not None and args.save_edges:
        save_image_atomic(result.edge_map, edges_path)
    print(f"{result.prompt.describe()}\nwrote {', '.join(map(str, paths))} in {time.perf_counter() - start:.1f} s")
    return 0


def cmd_interpolate(args) -> int:
    from .pipeline import interpolation_grid

    if args.grid < 1 or args.grid > 16:
        raise InputError(f"--grid must be between 1 (2×2) and 16 (17×17); got {args.grid}.")
    _check_render_args(args, count=1)
    opened: dict = {}
    corners = [_subjects(c, opened) for c in (args.top_left, args.top_right, args.bottom_left, args.bottom_right)]
    models = _load(args)
    result = interpolation_grid(
        models, args.prompt, corners, grid_steps=args.grid, mode=args.mode, seed=args.seed, steps=args.steps,
        guidance=args.guidance, width=args.width, height=args.height, fit=args.fit,
        callback=_Progress("decode", args.quiet), sampler=args.sampler,
    )
    paths = save_images(result.images, Path(args.out), grid_cols=args.grid + 1)
    print(f"wrote a {args.grid + 1}×{args.grid + 1} grid to {paths[0]}")
    return 0


def cmd_encode(args) -> int:
    """CLIP features only: prompt tokens/pooled/mask, subject image embeddings, the blank embedding → .safetensors."""
    import torch

    from .clip import load_clip_towers
    from .loading import resolve_dtype, save_file_atomic

    if not args.prompt and not args.image:
        raise InputError("Nothing to encode: give --prompt TEXT and/or --image PATH (repeatable).")
    out = Path(args.out)
    if out.suffix.lower() != ".safetensors":
        raise InputError(f"--out {out}: the features are written as .safetensors; name the file e.g. features.safetensors.")
    if out.exists() and not args.overwrite:
        raise InputError(f"{out} exists. Pass --overwrite to replace it, or choose another --out.")
    from .images import open_image

    images = [open_image(path, what="--image") for path in args.image or []]
    needed = (["clip_text"] if args.prompt else []) + ["clip_vision"]
    if args.prompt and not args.image and not (args.clip_vision or args.clip or args.models):
        needed = ["clip_text"]  # a prompt alone needs no vision tower; blank_embed is then left out
    paths = _model_paths(args, needed=needed)
    from .verify import check_loadable

    check_loadable(paths)
    device = _device(args.device)
    encoder = load_clip_towers(text=paths.get("clip_text"), vision=paths.get("clip_vision"), device=device,
                               dtype=_dtype(args.dtype, device))
    tensors = {}
    if args.prompt:
        features = encoder.encode_text(args.prompt)
        tensors.update(text_pooled=features.pooled, text_tokens=features.tokens, text_mask=features.mask)
    if images:
        tensors["image_embeds"] = torch.cat([encoder.encode_subject(img, None, args.fit)[None] for img in images])
    if "clip_vision" in paths:
        tensors["blank_embed"] = encoder.blank_embedding().reshape(1, -1)
    store = resolve_dtype(args.store_dtype)
    tensors = {k: (v.to(store) if v.is_floating_point() else v).cpu().contiguous() for k, v in tensors.items()}
    metadata = {"prompt": args.prompt or "", "images": "\n".join(map(str, args.image or [])),
                "clip_text": str(paths.get("clip_text", "")), "clip_vision": str(paths.get("clip_vision", ""))}
    save_file_atomic(tensors, out, metadata=metadata)
    for name, tensor in tensors.items():
        print(f"{name:13s} {list(tensor.shape)} {str(tensor.dtype).replace('torch.', '')}")
    print(f"wrote {out}")
    return 0


def _draw_subject(color, shape):
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (160, 120), "white")
    mask = Image.new("L", (160, 120), 0)
    for target, fill in ((img, color), (mask, 255)):
        draw = ImageDraw.Draw(target)
        (draw.ellipse if shape == "ellipse" else draw.rectangle)((30, 20, 130, 100), fill=fill)
    return img, mask


def cmd_check(args) -> int:
    """Verify the real weights by content (or name exactly what is missing or broken), then prove the plumbing
    on tiny random models."""
    from .errors import MissingModelsError
    from .paths import PARTS, manifest, resolve_models
    from .pipeline import SubjectInput, generate, load_models
    from .tiny import write_tiny_models
    from .verify import verify

    if args.out:
        from .outputs import check_output_path

        check_output_path(args.out, overwrite=args.overwrite)
    ok = True
    models_dir = args.models or os.environ.get("COMFYUI_MODELS") or (
        str(Path(os.environ["COMFYUI_PATH"]) / "models") if os.environ.get("COMFYUI_PATH") else None
    )
    print("1/2  Real weights" + (f" in {models_dir}" if models_dir else ""))
    explicit = dict(prior=args.prior, clip=args.clip, clip_text=args.clip_text, clip_vision=args.clip_vision,
                    decoder=args.decoder, decoder_unet=args.decoder_unet, decoder_movq=args.decoder_movq)
    entries = manifest()
    for key in PARTS:
        try:
            found = resolve_models(models_dir, needed=[key], **explicit)
        except MissingModelsError:
            ok = ok and not args.strict
            print(f"     MISSING {entries[key].what}\n" + entries[key].describe(Path(models_dir) if models_dir else None)
                  .replace("\n", "\n     ").replace("  - ", "     ", 1))
            continue
        verdict = verify(key, found[key])
        if verdict.ok:
            print(f"     ok      {key}: {found[key]} ({verdict.message})")
        else:
            ok = ok and not args.strict
            where = "" if str(found[key]) in verdict.message else f"{found[key]}: "
            print(f"     BROKEN  {key}: {where}{verdict.message}")

    print("2/2  Whole pipeline on tiny random-weight models (proves the code paths; the picture is noise by construction)")
    with tempfile.TemporaryDirectory(prefix="lambda_eclipse_check_") as tmp:
        start = time.perf_counter()
        paths = write_tiny_models(tmp)
        models = load_models(paths, device="cpu", dtype="fp32")
        dog, dog_mask = _draw_subject((160, 90, 40), "ellipse")
        hat, _ = _draw_subject((30, 30, 200), "rect")
        layout, _ = _draw_subject((0, 0, 0), "ellipse")
        subjects = [SubjectInput("dog", dog, dog_mask), SubjectInput("hat", hat)]
        result = generate(models, "a dog is wearing a hat", subjects, canny_image=layout, seed=7, batch=2,
                          steps=3, guidance=4.0, width=64, height=64)
        again = generate(models, "a dog is wearing a hat", subjects, canny_image=layout, seed=7, batch=2,
                         steps=3, guidance=4.0, width=64, height=64)
        same = bool((result.images == again.images).all())
        print(f"     {result.prompt.describe()}")
        print(f"     images {tuple(result.images.shape)}, same seed → same pixels: {same}, {time.perf_counter() - start:.1f} s")
        ok = ok and same and tuple(result.images.shape) == (2, 64, 64, 3)
        if args.out:
            save_images(result.images, Path(args.out), grid_cols=2)
            print(f"     wrote {args.out} (tiny random models: noise, not a picture)")
    print("check passed" if ok else "check FAILED")
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lambda_eclipse", description="λ-ECLIPSE: subject-driven images with a diffusion-free prior and Kandinsky 2.2.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what is loaded and inferred")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="subjects + prompt (+ Canny layout) → image(s)")
    gen.add_argument("--subject", action="append", metavar="WORD=IMAGE[:MASK]", help="a subject: its word in the prompt and its photo (+ optional mask); repeat for more subjects")
    gen.add_argument("--canny", metavar="IMAGE", help="layout image; its Canny edges are a soft control")
    gen.add_argument("--canny-low", type=float, default=100, help="Canny low threshold (official: 100)")
    gen.add_argument("--canny-high", type=float, default=200, help="Canny high threshold (official: 200)")
    gen.add_argument("--save-edges", action="store_true", help="also write the edge map next to the output")
    gen.add_argument("--batch", type=int, default=1, help="images to make (seed, seed+1, …)")
    gen.add_argument("--init-image", metavar="IMAGE", help="img2img: start from this picture (MoVQ-encoded, noised to --strength)")
    gen.add_argument("--strength", type=float, default=None, help="img2img: how much of --init-image is redrawn, (0, 1] (default 0.6)")
    _add_render_args(gen, "lambda_eclipse.png")
    _add_model_args(gen)
    gen.set_defaults(func=cmd_generate)

    interp = sub.add_parser("interpolate", help="the 4-corner interpolation grid of the paper")
    for corner in ("top-left", "top-right", "bottom-left", "bottom-right"):
        interp.add_argument(f"--{corner}", nargs="+", required=True, metavar="WORD=IMAGE[:MASK]", help=f"subjects of the {corner} corner")
    interp.add_argument("--grid", type=int, default=2, help="steps between corners: 1 → 2×2, 4 → 5×5")
    interp.add_argument("--mode", choices=["lerp", "slerp"], default="lerp", help="blend (official: lerp)")
    _add_render_args(interp, "lambda_eclipse_grid.png")
    _add_model_args(interp)
    interp.set_defaults(func=cmd_interpolate)

    enc = sub.add_parser("encode", help="CLIP features only (prompt tokens, subject and blank embeddings) → .safetensors")
    enc.add_argument("--prompt", help="text to encode: text_pooled [1,E], text_tokens [1,77,W], text_mask [1,77]")
    enc.add_argument("--image", action="append", metavar="PATH", help="an image to embed (repeatable): image_embeds [N,E] in order")
    enc.add_argument("--fit", choices=["crop", "pad"], default="crop", help="image framing: centre crop (official) or pad to a white square")
    enc.add_argument("--store-dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="precision of the written tensors")
    enc.add_argument("--out", required=True, help="output .safetensors file")
    enc.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    _add_model_args(enc, download=False)
    enc.set_defaults(func=cmd_encode)

    from .download import add_download_parser

    add_download_parser(sub)

    check = sub.add_parser("check", help="verify an install: find the weights, run the pipeline on tiny models")
    check.add_argument("--models", help="ComfyUI models/ folder (default: $COMFYUI_PATH/models)")
    for flag in ("--prior", "--clip", "--clip-text", "--clip-vision", "--decoder", "--decoder-unet", "--decoder-movq"):
        check.add_argument(flag, help="as for generate")
    check.add_argument("--strict", action="store_true", help="fail when a real weight file is missing or broken")
    check.add_argument("--out", help="also save the tiny run's (noise) images here")
    check.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    check.set_defaults(func=cmd_check)
    return parser


def run_command(args, user_errors: tuple = ()) -> int:
    """Run a parsed command: a user's mistake prints `error: <message>` and exits 2 (no traceback); Ctrl-C 130."""
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (LambdaEclipseError, *user_errors) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
        return 130


def main(argv=None) -> int:
    return run_command(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
