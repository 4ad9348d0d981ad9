"""`python -m lambda_eclipse.evaluate dreambench | compare`."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from ..core.cli import run_command
from ..core.errors import InputError
from .dreambench import DatasetError
from .metrics import MetricModelError



class Processes:
    """This process's place among several (accelerate launch / torchrun), or the only one."""

    def __init__(self, index: int = 0, count: int = 1, state=None):
        self.index, self.count, self.state = index, count, state

    @classmethod
    def detect(cls) -> "Processes":
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return cls()
        from accelerate import PartialState

        state = PartialState()
        return cls(state.process_index, state.num_processes, state)

    @property
    def main(self) -> bool:
        return self.index == 0

    def wait(self):
        if self.state is not None:
            self.state.wait_for_everyone()


def _scorer(args, device: str):
    from .metrics import ClipEmbedder, DinoEmbedder, Scorer

    for flag, value in (("--dino", args.dino), ("--clip-eval", args.clip_eval)):
        if not value:
            raise InputError(f"{flag} is needed to score: a local folder/file (see EVALUATION.md for the downloads).")
    return Scorer(DinoEmbedder(args.dino, device=device, preprocess=args.dino_preprocess),
                  ClipEmbedder(args.clip_eval, model_name=args.clip_eval_model, device=device))


def cmd_dreambench(args) -> int:
    from ..core.cli import _device, _dtype, _model_paths
    from ..core.decoder import check_sampler
    from ..core.outputs import check_size
    from ..core.seeds import check_seed
    from .dreambench import (generate_missing, load_dataset, plot_scores, score_images, shard, summary_markdown,
                             work_items, write_scores, _write_text)

    out = Path(args.out)
    images_dir = Path(args.images) if args.images else out / "images"
    if args.limit_prompts is not None and args.limit_prompts < 1:
        raise InputError(f"--limit-prompts must be 1 or more; got {args.limit_prompts}.")
    if not 1 <= args.images_per_prompt <= 64:
        raise InputError(f"--images-per-prompt must be between 1 and 64; got {args.images_per_prompt}.")
    subjects = load_dataset(args.dataset, args.subjects, args.masks)
    procs = Processes.detect()
    device = str(procs.state.device) if procs.state is not None else _device(args.device)
    settings = {"dataset": args.dataset, "subjects": len(subjects), "prompts per subject": args.limit_prompts or 25,
                "dino": args.dino, "clip-eval": f"{args.clip_eval} ({args.clip_eval_model})",
                "dino preprocessing": args.dino_preprocess}
    if not args.score_only:
        check_seed(args.seed, "--seed")
        check_size(args.width, args.height)
        check_sampler(args.sampler)
        if args.steps < 1 or args.steps > 1000:
            raise InputError(f"--steps must be between 1 and 1000; got {args.steps}.")
        seeds = [args.seed + i for i in range(args.images_per_prompt)]
        items = shard(work_items(subjects, args.limit_prompts), procs.index, procs.count)
        from .dreambench import missing_images

        todo = missing_images(items, images_dir, seeds)
        made = 0
        if todo:
            from ..core.pipeline import load_models
            from ..core.verify import check_loadable

            paths = _model_paths(args)
            check_loadable(paths)
            models = load_models(paths, device=device, dtype=_dtype(args.dtype, device))
            start = time.perf_counter()
            made = generate_missing(models, subjects, items, images_dir, seeds, reference=args.reference,
                                    steps=args.steps, guidance=args.guidance, width=args.width, height=args.height,
                                    sampler=args.sampler, fit=args.fit, quiet=args.quiet)
            print(f"process {procs.index + 1}/{procs.count}: generated {made} images in "
                  f"{time.perf_counter() - start:.1f} s", file=sys.stderr)
        else:
            print(f"process {procs.index + 1}/{procs.count}: every image exists; nothing to generate", file=sys.stderr)
        settings.update({"images per prompt": args.images_per_prompt, "seeds": f"{seeds[0]}…{seeds[-1]}",
                         "sampler": args.sampler, "steps": args.steps, "guidance": args.guidance,
                         "size": f"{args.width}×{args.height}", "fit": args.fit,
                         "subject photo": f"photo #{args.reference} in name order"})
    procs.wait()
    if not procs.main:
        return 0
    rows = score_images(_scorer(args, device), subjects, images_dir, args.limit_prompts, quiet=args.quiet)
    if not rows:
        raise InputError(f"No images to score under {images_dir} (expected <subject>/p<NN>_s<seed>.png).")
    write_scores(rows, out / "scores.csv")
    _write_text(out / "summary.md", summary_markdown(rows, settings))
    plot_scores(rows, out / "scores.png")
    from .dreambench import means

    m = means(rows)
    print(json.dumps({k: round(v, 4) for k, v in m.items()}))
    print(f"wrote {out / 'scores.csv'}, {out / 'summary.md'}, {out / 'scores.png'} ({len(rows)} images)")
    return 0


def cmd_compare(args) -> int:
    from .compare import compare_runs

    text = compare_runs(args.a, args.b, samples=args.samples, seed=args.seed)
    print(text, end="")
    if args.out:
        from .dreambench import _write_text

        _write_text(args.out, text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from ..core.cli import _add_model_args

    parser = argparse.ArgumentParser(prog="python -m lambda_eclipse.evaluate",
                                     description="λ-ECLIPSE evaluation: Dreambench DINO / CLIP-I / CLIP-T (paper Table 2).")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    d = sub.add_parser("dreambench", help="generate (resumable, shardable) and score the Dreambench prompts")
    d.add_argument("--dataset", required=True, help="google/dreambooth's dataset/ folder (prompts_and_classes.txt + <subject>/*.jpg)")
    d.add_argument("--out", required=True, help="run folder: images/, scores.csv, summary.md, scores.png")
    d.add_argument("--images", help="image folder (default OUT/images): <subject>/p<NN>_s<seed>.png")
    d.add_argument("--subjects", nargs="+", help="only these subjects (default: all 30)")
    d.add_argument("--limit-prompts", type=int, help="only the first N prompts of each subject (default: all 25)")
    d.add_argument("--images-per-prompt", type=int, default=4, help="images per prompt: seeds SEED … SEED+N−1 (paper: 4)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--reference", type=int, default=0, help="which photo (in name order) is the subject image")
    d.add_argument("--masks", help="optional masks folder: MASKS/<subject>/<photo stem>.png (segment on white)")
    d.add_argument("--score-only", action="store_true", help="generate nothing: score the images already there")
    d.add_argument("--dino", help="DINO ViT-S/16: transformers facebook/dino-vits16 folder (or a timm folder)")
    d.add_argument("--dino-preprocess", choices=["crop", "processor"], default="crop",
                   help="crop: resize 256 + centre crop 224 (community protocol, default); processor: the HF processor's 224×224 resize")
    d.add_argument("--clip-eval", help="evaluation CLIP: an OpenCLIP folder, or a weights file of --clip-eval-model")
    d.add_argument("--clip-eval-model", default="ViT-B-32", help="OpenCLIP config of a --clip-eval weights file")
    d.add_argument("--steps", type=int, default=50)
    d.add_argument("--sampler", default="ddpm")
    d.add_argument("--guidance", type=float, default=7.5)
    d.add_argument("--width", type=int, default=512)
    d.add_argument("--height", type=int, default=512)
    d.add_argument("--fit", choices=["crop", "pad"], default="crop")
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_model_args(d, download=False)
    d.set_defaults(func=cmd_dreambench)

    c = sub.add_parser("compare", help="two runs' scores side by side with bootstrap 95%% intervals")
    c.add_argument("a", help="run folder or scores.csv")
    c.add_argument("b", help="run folder or scores.csv")
    c.add_argument("--samples", type=int, default=2000, help="bootstrap resamples")
    c.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    c.add_argument("--out", help="also write the table (markdown) here")
    c.set_defaults(func=cmd_compare)
    return parser


def main(argv=None) -> int:
    return run_command(build_parser().parse_args(argv), (DatasetError, MetricModelError, FileNotFoundError))
