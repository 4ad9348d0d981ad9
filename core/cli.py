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
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


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


def _subjects(specs):
    from .pipeline import SubjectInput

    return [SubjectInput(w, img, mask) for w, img, mask in (parse_subject(s) for s in specs or [])]


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

    arrays = [(img.clamp(0, 1).numpy() * 255 + 0.5).astype(np.uint8) for img in images.cpu().float()]
    out.parent.mkdir(parents=True, exist_ok=True)
    if grid_cols:
        h, w = arrays[0].shape[:2]
        rows = (len(arrays) + grid_cols - 1) // grid_cols
        canvas = Image.new("RGB", (w * grid_cols, h * rows), "white")
        for i, arr in enumerate(arrays):
            canvas.paste(Image.fromarray(arr), ((i % grid_cols) * w, (i // grid_cols) * h))
        canvas.save(out)
        return [out]
    if len(arrays) == 1:
        Image.fromarray(arrays[0]).save(out)
        return [out]
    paths = []
    for i, arr in enumerate(arrays, 1):
        path = out.with_name(f"{out.stem}_{i}{out.suffix}")
        Image.fromarray(arr).save(path)
        paths.append(path)
    return paths


def _add_model_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("models")
    g.add_argument("--models", help="a ComfyUI models/ folder; the three models are found at the README's default places")
    g.add_argument("--prior", help="λ-ECLIPSE prior: folder (config.json + diffusion_pytorch_model.safetensors) or .safetensors")
    g.add_argument("--clip", help="OpenCLIP ViT-bigG/14 folder (open_clip_config.json + open_clip_model.safetensors) or checkpoint")
    g.add_argument("--decoder", help="Kandinsky 2.2 decoder diffusers folder (model_index.json, unet/, movq/, scheduler/)")
    g.add_argument("--allow-download", action="store_true", help="let --decoder be a hub id downloaded when online (off by default)")
    g.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 …")
    g.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"], help="CLIP and decoder precision (auto: bf16/fp16 on GPU, fp32 on CPU)")


def _add_render_args(p: argparse.ArgumentParser, default_out: str):
    p.add_argument("--prompt", required=True, help="the prompt; each subject word must appear in it")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed+i for the prior noise and the decoder latents")
    p.add_argument("--steps", type=int, default=50, help="decoder steps (paper: 50)")
    p.add_argument("--guidance", type=float, default=7.5, help="decoder classifier-free guidance (paper: 7.5)")
    p.add_argument("--width", type=int, default=512, help="rounded up to a multiple of 64")
    p.add_argument("--height", type=int, default=512, help="rounded up to a multiple of 64")
    p.add_argument("--fit", choices=["crop", "pad"], default="crop", help="subject framing: centre crop (official) or pad to a white square")
    p.add_argument("--out", default=default_out, help="output PNG")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _load(args):
    from .paths import resolve_models
    from .pipeline import load_models

    paths = resolve_models(args.models, prior=args.prior, clip=args.clip, decoder=args.decoder)
    device = _device(args.device)
    return load_models(paths, device=device, dtype=_dtype(args.dtype, device), allow_download=args.allow_download)


def cmd_generate(args) -> int:
    from PIL import Image

    from .pipeline import generate

    subjects = _subjects(args.subject)
    canny = Image.open(args.canny) if args.canny else None
    models = _load(args)
    start = time.perf_counter()
    result = generate(
        models, args.prompt, subjects, canny_image=canny, canny_low=args.canny_low, canny_high=args.canny_high,
        seed=args.seed, batch=args.batch, steps=args.steps, guidance=args.guidance, width=args.width,
        height=args.height, fit=args.fit, callback=_Progress("decode", args.quiet),
    )
    paths = save_images(result.images, Path(args.out))
    if result.edge_map is not None and args.save_edges:
        Image.fromarray(result.edge_map).save(Path(args.out).with_name(Path(args.out).stem + "_edges.png"))
    print(f"{result.prompt.describe()}\nwrote {', '.join(map(str, paths))} in {time.perf_counter() - start:.1f} s")
    return 0


def cmd_interpolate(args) -> int:
    from .pipeline import interpolation_grid

    corners = [_subjects(c) for c in (args.top_left, args.top_right, args.bottom_left, args.bottom_right)]
    models = _load(args)
    result = interpolation_grid(
        models, args.prompt, corners, grid_steps=args.grid, mode=args.mode, seed=args.seed, steps=args.steps,
        guidance=args.guidance, width=args.width, height=args.height, fit=args.fit,
        callback=_Progress("decode", args.quiet),
    )
    paths = save_images(result.images, Path(args.out), grid_cols=args.grid + 1)
    print(f"wrote a {args.grid + 1}×{args.grid + 1} grid to {paths[0]}")
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
    """Find the real weights (or list what is missing), then prove the plumbing on tiny random models."""
    from .errors import MissingModelsError
    from .paths import resolve_models
    from .pipeline import SubjectInput, generate, load_models
    from .tiny import write_tiny_models

    ok = True
    models_dir = args.models or os.environ.get("COMFYUI_MODELS") or (
        str(Path(os.environ["COMFYUI_PATH"]) / "models") if os.environ.get("COMFYUI_PATH") else None
    )
    print("1/2  Real weights" + (f" in {models_dir}" if models_dir else ""))
    try:
        found = resolve_models(models_dir, prior=args.prior, clip=args.clip, decoder=args.decoder)
        for key, path in found.items():
            print(f"     found {key}: {path}")
    except MissingModelsError as exc:
        ok = not args.strict
        print("     " + str(exc).replace("\n", "\n     "))

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

    check = sub.add_parser("check", help="verify an install: find the weights, run the pipeline on tiny models")
    check.add_argument("--models", help="ComfyUI models/ folder (default: $COMFYUI_PATH/models)")
    check.add_argument("--prior"); check.add_argument("--clip"); check.add_argument("--decoder")  # noqa: E702
    check.add_argument("--strict", action="store_true", help="fail when real weights are missing")
    check.add_argument("--out", help="also save the tiny run's (noise) images here")
    check.set_defaults(func=cmd_check)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except LambdaEclipseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
