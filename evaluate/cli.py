"""`python -m lambda_eclipse.evaluate dreambench | multibench | compare | download-metrics`."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Sequence

from ..core.cli import HelpFormatter, run_command
from ..core.errors import InputError
from .dreambench import DatasetError
from .metrics import MetricModelError

log = logging.getLogger("lambda_eclipse")


class Processes:
    """This process's place among several (accelerate launch / torchrun), or the only one."""

    def __init__(self, index: int = 0, count: int = 1, state=None):
        self.index, self.count, self.state = index, count, state

    @classmethod
    def detect(cls, device: str = "auto") -> "Processes":
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return cls()
        from datetime import timedelta

        from accelerate import PartialState

        # Processes wait for one another after generating (shares can take hours to even out) and while the main
        # one downloads: far longer than the process group's default 10-minute timeout. Without cpu=True on a
        # machine with no GPU (or with --device cpu), PartialState sets up no process group at all: every process
        # would believe it is the only one, make every image and write every file.
        state = PartialState(cpu=_cpu_processes(device), timeout=timedelta(hours=24))
        return cls(state.process_index, state.num_processes, state)

    @property
    def main(self) -> bool:
        return self.index == 0

    def wait(self):
        if self.state is not None:
            self.state.wait_for_everyone()

    def on_main(self, step):
        """`step()` on the main process only (None elsewhere); if it fails, every process stops: the others would
        otherwise wait at the next barrier for a main process that has gone (for up to 24 hours)."""
        result, error = None, None
        if self.main:
            try:
                result = step()
            except Exception as exc:  # noqa: BLE001 (re-raised below, after the others have been told)
                error = exc
        if self.state is not None and self.count > 1:
            from accelerate.utils import broadcast_object_list

            told = broadcast_object_list([None if error is None else str(error) or type(error).__name__], from_process=0)
            if error is None and told[0] is not None:
                raise InputError(f"process {self.index + 1}/{self.count} stopped because the main process did: {told[0]}")
        if error is not None:
            raise error
        return result


def _cpu_processes(device: str) -> bool:
    """Whether the processes of a launch run on the CPU (a gloo process group)."""
    import torch

    if device == "cpu" or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        return True
    accelerator = getattr(torch, "accelerator", None)
    return not (accelerator.is_available() if accelerator is not None else torch.cuda.is_available())


def _log(line: str) -> None:
    print(line, file=sys.stderr)


def _metric_paths(args) -> tuple[str, str]:
    """(DINO, evaluation CLIP) paths: --dino / --clip-eval, else the folders under --metric-models (fetched first
    with --download). Resolved before generating, so a run does not fail for want of them hours later."""
    from .metric_models import resolve_metric_models
    from .metrics import check_clip_eval, check_dino

    dino, clip = resolve_metric_models(args.dino, args.clip_eval, args.metric_models, download=args.download, log=_log)
    check_dino(dino)
    check_clip_eval(clip, args.clip_eval_model)
    return dino, clip


def _scorer(args, device: str, paths: tuple[str, str]):
    from .metrics import ClipEmbedder, DinoEmbedder, Scorer

    dino, clip = paths
    return Scorer(DinoEmbedder(dino, device=device, preprocess=args.dino_preprocess),
                  ClipEmbedder(clip, model_name=args.clip_eval_model, device=device))


def _check_guidance(value: float) -> None:
    """`generate`'s rule for --guidance (core/cli.py, _check_render_args): a finite number, not below 0; below 1
    classifier-free guidance is off, which is said."""
    if not math.isfinite(value):
        raise InputError(f"--guidance must be a finite number (1 = no guidance; the paper uses 7.5); got {value}.")
    if value < 0:
        raise InputError(f"--guidance must be 0 or more (1 = no guidance; the paper uses 7.5); got {value}.")
    if value < 1:
        log.warning("--guidance %.2f is below 1: classifier-free guidance is off (the same as 1).", value)


def _check_generation(args) -> list[int]:
    """Check the generation settings before anything is loaded; returns the seeds of a prompt's images."""
    from ..core.decoder import check_sampler
    from ..core.outputs import check_size
    from ..core.seeds import check_seed, seed_for

    check_seed(args.seed, "--seed")
    check_size(args.width, args.height)
    check_sampler(args.sampler)
    if args.steps < 1 or args.steps > 1000:
        raise InputError(f"--steps must be between 1 and 1000; got {args.steps}.")
    _check_guidance(args.guidance)
    _decoder_loras(args)  # the files exist: checked before anything loads
    return [seed_for(args.seed, i) for i in range(args.images_per_prompt)]


def _decoder_loras(args) -> list[tuple[str, float]]:
    from ..core.cli import _parse_lora

    return [_parse_lora(spec) for spec in args.decoder_lora or []]


def _check_counts(args) -> None:
    if not 1 <= args.images_per_prompt <= 64:
        raise InputError(f"--images-per-prompt must be between 1 and 64; got {args.images_per_prompt}.")


def _model_files(args, download: bool):
    """The λ-ECLIPSE model files; with `download` (--download and --models) missing ones are fetched first,
    as `generate --download` does."""
    from ..core.cli import _model_paths

    return _model_paths(argparse.Namespace(**{**vars(args), "download": download}))


def _generate_stage(args, procs: Processes, device: str, missing: int, generate) -> None:
    """Load the λ-ECLIPSE models and make this process's `missing` images with `generate(models)`. With
    --download the main process fetches missing model files first, while the others wait."""
    from ..core.cli import _dtype

    fetch = bool(args.download and args.models)
    paths = None
    if fetch and procs.main and (missing or procs.count > 1):
        paths = _model_files(args, download=True)
    procs.wait()
    if not missing:
        print(f"process {procs.index + 1}/{procs.count}: every image exists; nothing to generate", file=sys.stderr)
        return
    from ..core.pipeline import load_models
    from ..core.verify import check_loadable

    paths = paths or _model_files(args, download=False)
    check_loadable(paths)
    models = load_models(paths, device=device, dtype=_dtype(args.dtype, device))
    for path, strength in _decoder_loras(args):
        from ..core.lora import apply_decoder_lora

        models.decoder = apply_decoder_lora(models.decoder, path, strength)
    start = time.perf_counter()
    made = generate(models)
    print(f"process {procs.index + 1}/{procs.count}: generated {made} images in "
          f"{time.perf_counter() - start:.1f} s", file=sys.stderr)


def _generation_settings(args, seeds) -> dict:
    return {"images per prompt": args.images_per_prompt, "seeds": f"{seeds[0]}…{seeds[-1]}", "sampler": args.sampler,
            "steps": args.steps, "guidance": args.guidance, "size": f"{args.width}×{args.height}", "fit": args.fit,
            "decoder LoRA": ", ".join(f"{p}@{w:g}" for p, w in _decoder_loras(args)) or "(none)",
            "subject photo": f"photo #{args.reference} in name order"}


def _device_for(args, procs: Processes) -> str:
    from ..core.cli import _device

    return str(procs.state.device) if procs.state is not None else _device(args.device)


def _run_folders(args, out: Path, images_dir: Path, generating: bool) -> list[Path]:
    """The folders the run writes (OUT; the image folder when generating), checked now: a file there, a file
    among their parents or a read-only folder is refused before anything is read or loaded."""
    from .common import check_out_folder

    folders = [check_out_folder(out, "--out")]
    if generating:
        folders.append(check_out_folder(images_dir, "--images" if args.images else "--out (its images/ folder)"))
    return folders


def _start_run(args, procs: Processes, stack: ExitStack, folders: Sequence[Path], metric: bool):
    """On the main process: lock the run's folders (core.fsio.FolderLock, held until the command ends; a folder
    already there at once, before any download; the others once the metric models are found) and find the metric
    models (fetching them with --download). The other processes take no lock (the main one holds it for them and
    they write only under it); if this fails, every process stops. Returns the metric paths (None elsewhere)."""
    from ..core.fsio import FolderLock

    def step():
        locks = [FolderLock(folder, f"evaluate {args.command} --out {args.out}") for folder in folders]
        taken = set()
        for i, lock in enumerate(locks):
            if lock.folder.is_dir():
                stack.enter_context(lock)
                taken.add(i)
        paths = _metric_paths(args) if metric else None
        for i, lock in enumerate(locks):
            if i not in taken:
                stack.enter_context(lock)
        return paths

    return procs.on_main(step)


def _metric_settings(args, metric) -> dict:
    from .metrics import describe_clip_eval

    if not metric:
        return {}
    return {"dino": metric[0], "clip-eval": describe_clip_eval(metric[1], args.clip_eval_model),
            "dino preprocessing": args.dino_preprocess}


def cmd_dreambench(args) -> int:
    from .common import check_reference
    from .dreambench import (find_images, generate_missing, load_dataset, means, missing_images, plot_scores,
                             score_images, shard, summary_markdown, work_items, write_scores, write_text)
    from .metrics import quiet_loading

    out = Path(args.out)
    images_dir = Path(args.images) if args.images else out / "images"
    if args.limit_prompts is not None and args.limit_prompts < 1:
        raise InputError(f"--limit-prompts must be 1 or more; got {args.limit_prompts}.")
    _check_counts(args)
    seeds = None if args.score_only else _check_generation(args)
    folders = _run_folders(args, out, images_dir, generating=not args.score_only)
    subjects = load_dataset(args.dataset, args.subjects, args.masks)
    if not args.score_only:
        check_reference(args.reference, subjects)
    procs = Processes.detect(args.device)
    device = _device_for(args, procs)
    with ExitStack() as stack:
        stack.enter_context(quiet_loading(args.quiet))
        metric = _start_run(args, procs, stack, folders, metric=True)
        settings = {"dataset": args.dataset, "subjects": len(subjects), "prompts per subject": args.limit_prompts or 25}
        settings.update(_metric_settings(args, metric))
        if not args.score_only:
            items = shard(work_items(subjects, args.limit_prompts), procs.index, procs.count)
            missing = sum(len(m) for _, m in missing_images(items, images_dir, seeds))
            _generate_stage(args, procs, device, missing, lambda models: generate_missing(
                models, subjects, items, images_dir, seeds, reference=args.reference, steps=args.steps,
                guidance=args.guidance, width=args.width, height=args.height, sampler=args.sampler, fit=args.fit,
                quiet=args.quiet))
            settings.update(_generation_settings(args, seeds))
        procs.wait()
        if not procs.main:
            return 0
        if not find_images(images_dir, subjects, args.limit_prompts):  # said before the metric models load
            raise InputError(f"No images to score under {images_dir} (expected <subject>/p<NN>_s<seed>.png).")
        rows = score_images(_scorer(args, device, metric), subjects, images_dir, args.limit_prompts, quiet=args.quiet)
        write_scores(rows, out / "scores.csv")
        write_text(out / "summary.md", summary_markdown(rows, settings))
        plot_scores(rows, out / "scores.png")
    m = means(rows)
    print(json.dumps({k: round(v, 4) for k, v in m.items()}))
    print(f"wrote {out / 'scores.csv'}, {out / 'summary.md'}, {out / 'scores.png'} ({len(rows)} images)")
    return 0


def cmd_multibench(args) -> int:
    from . import multibench as mb
    from .common import check_reference, means, shard, write_text
    from .metrics import quiet_loading

    out = Path(args.out)
    images_dir = Path(args.images) if args.images else out / "images"
    if args.max_prompts is not None and args.max_prompts < 1:
        raise InputError(f"--max-prompts must be 1 or more; got {args.max_prompts}.")
    _check_counts(args)
    counts = {"2": [2], "3": [3], "both": [2, 3]}[args.subjects_count]
    generating = not (args.score_only or args.prompts_only)
    seeds = _check_generation(args) if generating else None
    folders = _run_folders(args, out, images_dir, generating)
    pool = mb.subject_pool(args.dataset, args.subjects, args.masks, args.concepts or ())
    if generating:
        check_reference(args.reference, pool)
    procs = Processes.detect(args.device)
    device = None if args.prompts_only else _device_for(args, procs)
    with ExitStack() as stack:
        stack.enter_context(quiet_loading(args.quiet))
        metric = _start_run(args, procs, stack, folders, metric=not args.prompts_only)
        compositions, how = mb.compositions_for_run(out, pool, counts, args.max_prompts, args.composition_seed,
                                                    write=procs.main)
        per_count = {n: sum(c.count == n for c in compositions) for n in counts}
        print(f"{len(compositions)} compositions (" + ", ".join(f"{v} {mb.COUNT_NAMES[n]}-subject"
                                                                for n, v in per_count.items())
              + f"), {how}", file=sys.stderr)
        unfillable = mb.unfillable_templates(pool, counts)
        if unfillable:
            print("no subject fits the template(s) " + "; ".join(unfillable) + " (add --concepts folders of the kinds "
                  "they need; see EVALUATION.md)", file=sys.stderr)
        if args.prompts_only:
            print(f"wrote {out / 'prompts.csv'}")
            return 0
        settings = {"dataset": args.dataset or "(none)", "concepts": ", ".join(args.concepts or []) or "(none)",
                    "subjects": f"{len(pool)} ({sum(s.source == 'concept' for s in pool)} from concept folders)",
                    "compositions": f"{len(compositions)}, {how}", "subjects per prompt": args.subjects_count,
                    "max prompts per subject count": args.max_prompts or "the paper's (904 / 1476)",
                    "composition seed": args.composition_seed}
        settings.update(_metric_settings(args, metric))
        if generating:
            _check_image_folder(out / "prompts.csv", images_dir, write=procs.main)
            mine = shard(compositions, procs.index, procs.count)
            missing = sum(len(m) for _, m in mb.missing_images(mine, images_dir, seeds))
            _generate_stage(args, procs, device, missing, lambda models: mb.generate_missing(
                models, pool, mine, images_dir, seeds, reference=args.reference, steps=args.steps,
                guidance=args.guidance, width=args.width, height=args.height, sampler=args.sampler, fit=args.fit,
                quiet=args.quiet))
            settings.update(_generation_settings(args, seeds))
        procs.wait()
        if not procs.main:
            return 0
        if not mb.find_images(images_dir, compositions)[0]:  # said before the metric models load
            raise InputError(f"No images to score under {images_dir} (expected two/<id>_s<seed>.png and "
                             f"three/<id>_s<seed>.png for the ids in {out / 'prompts.csv'}).")
        rows = mb.score_images(_scorer(args, device, metric), pool, compositions, images_dir, quiet=args.quiet)
        mb.write_scores(rows, out / "scores.csv")
        write_text(out / "summary.md", mb.summary_markdown(rows, compositions, settings, unfillable))
        mb.plot_scores(rows, compositions, out / "scores.png")
    result = {mb.COUNT_NAMES[n]: {k: round(v, 4) for k, v in means([r for r in rows if r["count"] == n]).items()}
              for n in counts if any(r["count"] == n for r in rows)}
    print(json.dumps(result))
    print(f"wrote {out / 'scores.csv'}, {out / 'summary.md'}, {out / 'scores.png'} ({len(rows)} images)")
    return 0


def _check_image_folder(prompts: Path, images_dir: Path, write: bool) -> None:
    """Multibench image names (two-0000_s0.png) mean nothing without their prompt list: an image folder keeps a copy
    of the list it was made for (IMAGES/prompts.csv), and one made for another list is refused rather than mixed."""
    from .common import write_text

    mark = images_dir / "prompts.csv"
    text = prompts.read_text(encoding="utf-8")
    if mark.is_file():
        if mark.read_text(encoding="utf-8") != text:
            raise DatasetError(f"{images_dir} holds images made for another prompt list ({mark} differs from "
                               f"{prompts}): their names would be scored against other prompts. Use another --images "
                               "folder (or none: OUT/images), or the --out whose prompts.csv they were made for.")
    elif write:
        write_text(mark, text)


def cmd_download_metrics(args) -> int:
    from .metric_models import download_metric_models, folders

    download_metric_models(args.metric_models, only=None if args.only == "all" else [args.only], log=print)
    paths = folders(args.metric_models)
    print(f"metric models in {args.metric_models}: pass --metric-models {args.metric_models} "
          f"(= --dino {paths['dino']} --clip-eval {paths['clip']})")
    return 0


def cmd_compare(args) -> int:
    from ..core.fsio import check_writable_target
    from .common import write_text
    from .compare import check_samples, compare_runs

    check_samples(args.samples, args.seed)
    if args.out:  # refused before anything is read: a folder, a file without --overwrite, a parent that is a file
        check_writable_target(args.out, overwrite=args.overwrite, what="--out file")
    text = compare_runs(args.a, args.b, samples=args.samples, seed=args.seed)
    print(text, end="")
    if args.out:
        write_text(args.out, text, overwrite=args.overwrite)
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


def _add_metric_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("metric models (local files; fetched only with --download)")
    g.add_argument("--metric-models", metavar="DIR", help="a folder with dino-vits16/ and clip-vit-b-32-openai/ (the "
                   "layout `download-metrics` writes): the default of --dino and --clip-eval")
    g.add_argument("--download", action="store_true", help="first fetch what is missing from the Hugging Face hub: "
                   "the metric models into --metric-models and, when generating, the λ-ECLIPSE models into --models "
                   "(nothing is ever downloaded without this flag)")
    g.add_argument("--dino", metavar="DIR", help="DINO ViT-S/16: transformers facebook/dino-vits16 folder (or a timm "
                   "folder) (default: DIR/dino-vits16 of --metric-models)")
    g.add_argument("--dino-preprocess", choices=["crop", "processor"], default="crop",
                   help="crop: resize 256 + centre crop 224 (the community protocol); processor: the HF processor's "
                   "224×224 resize")
    g.add_argument("--clip-eval", metavar="PATH", help="evaluation CLIP: an OpenCLIP folder, or a weights file of "
                   "--clip-eval-model (default: DIR/clip-vit-b-32-openai of --metric-models)")
    g.add_argument("--clip-eval-model", default="ViT-B-32-quickgelu", help="OpenCLIP config of a --clip-eval weights "
                   "file (not used for a folder, which names its own): the default is OpenAI's ViT-B/32, the metric's "
                   "CLIP, which uses QuickGELU; e.g. ViT-B-32 for a LAION ViT-B/32 file")


def _add_run_args(p: argparse.ArgumentParser) -> None:
    from ..core.cli import _add_model_args

    p.add_argument("--images-per-prompt", type=int, default=4, help="images per prompt, 1 … 64: seeds SEED … "
                   "SEED+N−1 (paper: 4)")
    p.add_argument("--seed", type=int, default=0, help="seed of each prompt's first image (image i uses SEED+i)")
    p.add_argument("--reference", type=int, default=0, help="which photo of each subject (from 0, in name order) is "
                   "its subject image; every subject must have that many photos")
    p.add_argument("--masks", metavar="DIR", help="optional masks folder for Dreambench subjects: "
                   "DIR/<subject>/<photo stem>.png (segment on white)")
    p.add_argument("--score-only", action="store_true", help="generate nothing: score the images already there")
    _add_metric_args(p)
    p.add_argument("--steps", type=int, default=50, help="decoder steps, 1 … 1000 (paper: 50)")
    p.add_argument("--sampler", default="ddpm", help="decoder sampler: ddpm (official), ddim (the paper's), "
                   "dpmpp_2m, dpmpp_2m_karras, unipc, euler_a")
    p.add_argument("--guidance", type=float, default=7.5, help="decoder classifier-free guidance, 0 or more (below 1: "
                   "off, with a warning; paper: 7.5)")
    p.add_argument("--width", type=int, default=512, help="image width in pixels, 64 … 4096 (rounded up to a multiple "
                   "of 64)")
    p.add_argument("--height", type=int, default=512, help="image height in pixels, 64 … 4096 (rounded up to a "
                   "multiple of 64)")
    p.add_argument("--fit", choices=["crop", "pad"], default="crop", help="subject framing: centre crop (official) "
                   "or pad to a white square")
    p.add_argument("--quiet", action="store_true", help="no progress bars (nor transformers' loading bars)")
    _add_model_args(p, download=False)
    p.add_argument("--decoder-lora", action="append", metavar="PATH[:STRENGTH]", help="decode with a concept LoRA of "
                   "the decoder (from `trainer finetune-decoder`), at strength 1 unless given; repeatable")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lambda_eclipse.evaluate", formatter_class=HelpFormatter,
                                     description="λ-ECLIPSE evaluation: DINO / CLIP-I / CLIP-T on Dreambench (paper "
                                     "Table 2) and Multibench (Table 4).")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what is loaded and inferred")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("dreambench", help="generate (resumable, shardable) and score the Dreambench prompts",
                       formatter_class=HelpFormatter)
    d.add_argument("--dataset", required=True, help="google/dreambooth's dataset/ folder (prompts_and_classes.txt + <subject>/*.jpg)")
    d.add_argument("--out", required=True, help="run folder: images/, scores.csv, summary.md, scores.png (one run "
                   "at a time: a second run on it is refused)")
    d.add_argument("--images", metavar="DIR", help="image folder (default: OUT/images): <subject>/p<NN>_s<seed>.png")
    d.add_argument("--subjects", nargs="+", help="only these subjects (default: all 30)")
    d.add_argument("--limit-prompts", type=int, help="only the first N prompts of each subject (default: all 25)")
    _add_run_args(d)
    d.set_defaults(func=cmd_dreambench)

    m = sub.add_parser(
        "multibench", help="two- and three-subject prompts (paper Table 4): sample, generate, score",
        formatter_class=HelpFormatter,
        description="Multibench as the paper measures it: the Table 8 templates filled with Dreambench subjects and "
        "concept folders of your own, four images per prompt, DINO / CLIP-I per subject and CLIP-T. The paper's "
        "subject pairings and its extra concepts (parks, hats, glasses, …) are not public: the compositions are "
        "sampled here (reproducibly, OUT/prompts.csv) and the numbers are not exactly the paper's.")
    m.add_argument("--dataset", help="google/dreambooth's dataset/ folder (its 30 subjects)")
    m.add_argument("--concepts", nargs="+", metavar="DIR", help="extra concept folders: DIR/concept.json "
                   '({"class": "hat", "kind": "wearable"}; kinds live, object, wearable, place) + photos, or a folder '
                   "of such folders")
    m.add_argument("--out", required=True, help="run folder: prompts.csv, prompts.json, images/, scores.csv, "
                   "summary.md, scores.png (one run at a time: a second run on it is refused)")
    m.add_argument("--images", metavar="DIR", help="image folder (default: OUT/images): "
                   "two|three/<composition id>_s<seed>.png")
    m.add_argument("--subjects", nargs="+", help="only these Dreambench subjects (default: all)")
    m.add_argument("--subjects-count", choices=["2", "3", "both"], default="both", help="two-subject, three-subject "
                   "or both")
    m.add_argument("--max-prompts", type=int, help="at most N compositions per subject count (default: the paper's "
                   "904 two- and 1476 three-subject prompts, or as many as the subjects allow)")
    m.add_argument("--composition-seed", type=int, default=0, help="seed of the composition sampling (independent of "
                   "--seed, so runs with other image seeds share their prompts)")
    m.add_argument("--prompts-only", action="store_true", help="write OUT/prompts.csv and stop (to make the images "
                   "with another tool, then score them with --score-only)")
    _add_run_args(m)
    m.set_defaults(func=cmd_multibench)

    c = sub.add_parser("compare", help="two runs' scores side by side with bootstrap 95%% intervals",
                       formatter_class=HelpFormatter)
    c.add_argument("a", help="run A: a run folder or its scores.csv")
    c.add_argument("b", help="run B: a run folder or its scores.csv")
    c.add_argument("--samples", type=int, default=2000, help="bootstrap resamples, 1 … 100000")
    c.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    c.add_argument("--out", metavar="FILE", help="also write the table (markdown) to FILE")
    c.add_argument("--overwrite", action="store_true", help="replace --out if it exists (never done without it)")
    c.set_defaults(func=cmd_compare)

    dm = sub.add_parser("download-metrics", help="fetch DINO ViT-S/16 and CLIP ViT-B/32 into a folder (verified)",
                        formatter_class=HelpFormatter,
                        description="Download facebook/dino-vits16 and timm/vit_base_patch32_clip_224.openai from the "
                        "Hugging Face hub (evaluate/metric_models.json) through the pack's downloader: files in place "
                        "are checked and skipped; HF_ENDPOINT, HF_TOKEN and HF_HUB_OFFLINE are honoured.")
    dm.add_argument("--metric-models", "--to", dest="metric_models", required=True, metavar="DIR",
                    help="the folder to fetch into (then pass --metric-models DIR to dreambench / multibench)")
    dm.add_argument("--only", choices=["dino", "clip", "all"], default="all", help="fetch only DINO, only the CLIP, "
                    "or both")
    dm.set_defaults(func=cmd_download_metrics)
    return parser


def main(argv=None) -> int:
    return run_command(build_parser().parse_args(argv), (DatasetError, MetricModelError, FileNotFoundError))
