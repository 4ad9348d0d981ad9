"""python -m lambda_eclipse.trainer extract|train|eval|export|finetune-decoder …  (see TRAINING.md).

A user error (a missing file, a bad value, a refused resume, a folder that cannot be written) prints one
line, ``error: <message>``, to stderr and exits with status 2, without a traceback; Ctrl-C prints one line
and exits with status 130 (the checkpoints written so far stay intact). A traceback means a bug.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from ..core.errors import LambdaEclipseError
from .errors import ConfigError
from .settings import EVAL_RULES, EXTRACT_RULES, FILTER_RULES, FINETUNE_RULES, TRAIN_RULES, Rule

USAGE_ERROR = 2  # exit status of every user error (argparse's own convention)
INTERRUPTED = 130  # exit status after Ctrl-C (128 + SIGINT), as a shell reports it
#: The extras each command imports (pyproject's [train]); checked before anything else runs.
COMMAND_EXTRAS = {"extract": ("accelerate",), "train": ("accelerate",), "finetune-decoder": ("accelerate", "peft")}


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is `error: <message>` plus where to look, not the whole usage block."""

    def error(self, message):
        self.exit(USAGE_ERROR, f"error: {message}\n(see: {self.prog} --help)\n")


class Flag(argparse.Action):
    """A boolean option: `--cpu` turns it on, `--no-cpu` off. `--cpu true|false` (the spelling of older scripts
    and config files) is still accepted."""

    def __init__(self, option_strings, dest, default=False, help=None, **kwargs):
        names = list(option_strings) + [f"--no-{o[2:]}" for o in option_strings if o.startswith("--")]
        super().__init__(names, dest, nargs="?", const=None, default=default, type=_bool, help=help, metavar="")

    def __call__(self, parser, namespace, values, option_string=None):
        negative = bool(option_string and option_string.startswith("--no-"))
        if negative and values is not None:
            parser.error(f"{option_string} takes no value (use {option_string} alone, or --{option_string[5:]} "
                         f"{'false' if values else 'true'})")
        setattr(namespace, self.dest, (not negative) if values is None else values)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown; a boolean reads as `--cpu, --no-cpu`, not `--cpu [CPU]`."""

    def _format_action_invocation(self, action):
        if isinstance(action, Flag):
            return ", ".join(action.option_strings)
        return super()._format_action_invocation(action)

    def _format_args(self, action, default_metavar):
        if isinstance(action, Flag):
            return ""
        return super()._format_args(action, default_metavar)


def _bool(v: str) -> bool:
    if isinstance(v, bool):
        return v
    if v.lower() in ("1", "true", "yes", "on"):
        return True
    if v.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {v!r}")


def load_config_file(path: str) -> dict:
    """--config FILE → {option_name: value}; ConfigError for a missing, unreadable, oversized or malformed file.

    The file is checked before it is opened: a FIFO would block and /dev/zero never ends (trainer.fsio)."""
    from .fsio import read_small_text

    if not Path(path).exists():
        raise ConfigError(f"--config {path}: cannot be read (no such file).")
    text = read_small_text(path, "--config", ConfigError, advice="Give a YAML or JSON file of options.")
    if path.endswith((".yaml", ".yml")):
        from .extras import require_extras

        require_extras("--config (YAML)", ("yaml",))
    try:
        if path.endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except Exception as exc:  # yaml.YAMLError / json.JSONDecodeError
        raise ConfigError(f"--config {path}: not valid {'YAML' if path.endswith(('.yaml', '.yml')) else 'JSON'} "
                          f"({str(exc)[:300]}).") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of option names to values")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="python -m lambda_eclipse.trainer",
        description="Train the λ-ECLIPSE prior: extract CLIP features once, train (Eq. 1), evaluate, export for Load Prior. "
                    "Every command takes --config FILE.yaml|json with the same option names (dashes or underscores); "
                    "flags given on the command line override the file.",
        formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    fmt = HelpFormatter
    e = sub.add_parser("extract", help="CLIP features of a dataset → sharded feature folder (resumable)", formatter_class=fmt)
    e.add_argument("--config", help="YAML/JSON file of options (CLI flags override)")
    e.add_argument("--clip", help="OpenCLIP folder (open_clip_config.json + weights) or bigG checkpoint file; the same CLIP the prior will be used with")
    e.add_argument("--out", help="feature folder to write (rerun with the same arguments to resume)")
    e.add_argument("--manifest", help="JSONL manifest: {image, caption, subjects:[{word, mask|box|polygon|rle}]} per line, paths relative to the file")
    e.add_argument("--coco-captions", help="COCO captions_*.json (instead of --manifest)")
    e.add_argument("--coco-instances", help="COCO instances_*.json with polygons/RLE and category names")
    e.add_argument("--coco-images", help="folder of the COCO images")
    e.add_argument("--shard-size", type=EXTRACT_RULES["shard_size"], default=4096, help="records per shard (unit of resume and of multi-process work)")
    e.add_argument("--batch-size", type=EXTRACT_RULES["batch_size"], default=64, help="examples per CLIP forward batch")
    e.add_argument("--device", default=None, help="cpu / cuda:N; default: the process's accelerate device")
    e.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="CLIP compute dtype: fp32, fp16, bf16 (features are stored as fp16 anyway)")
    e.add_argument("--subject-fit", default="pad", choices=["pad", "crop"], help="subject crop: pad to a white square (keeps all of it) or let CLIP centre-crop")
    e.add_argument("--canny-low", type=EXTRACT_RULES["canny_low"], default=100, help="Canny low threshold for the edge token")
    e.add_argument("--canny-high", type=EXTRACT_RULES["canny_high"], default=200, help="Canny high threshold")
    e.add_argument("--min-box-area", type=FILTER_RULES["min_box_area"], default=0.08, help="skip a subject whose mask box covers less of the image (paper: 0.08)")
    e.add_argument("--max-box-area", type=FILTER_RULES["max_box_area"], default=0.7, help="skip a subject whose mask box covers more (paper: 0.7)")
    e.add_argument("--min-mask-fill", type=FILTER_RULES["min_mask_fill"], default=0.4, help="skip a subject whose mask fills less of its box (paper: 0.4)")
    e.add_argument("--max-subjects", type=FILTER_RULES["max_subjects"], default=4, help="skip an example with more valid subjects (paper: 4)")
    e.add_argument("--min-subjects", type=FILTER_RULES["min_subjects"], default=1, help="skip an example with fewer valid subjects")
    e.add_argument("--limit", type=EXTRACT_RULES["limit"], default=None, help="use only the first N records (smoke runs)")
    e.add_argument("--progress", action=Flag, default=True, help="progress bar with rate and ETA")

    t = sub.add_parser("train", help="train the prior on extracted features", formatter_class=fmt)
    t.add_argument("--config", help="YAML/JSON file of options (CLI flags override)")
    t.add_argument("--data", help="feature folder from `extract` (when resuming: the checkpoint's, unless given)")
    t.add_argument("--out", help="run folder: checkpoints/, metrics.csv, tensorboard/, curves.png")
    t.add_argument("--val-data", default=None, help="separate feature folder for evaluation (else --val-fraction of --data is held out)")
    t.add_argument("--val-fraction", type=TRAIN_RULES["val_fraction"], default=0.05, help="fraction of --data held out by a fixed hash of the example index")
    t.add_argument("--model", default="paper", help="architecture: 'paper' (1280-d, 10 layers, 34.8M), 'tiny' (32-d test size), or a config.json")
    t.add_argument("--init-from", default=None, help="published/exported prior (folder or .safetensors) to fine-tune from")
    t.add_argument("--max-steps", type=TRAIN_RULES["max_steps"], default=100_000, help="optimizer steps (paper: ~100k)")
    t.add_argument("--batch-size", type=TRAIN_RULES["batch_size"], default=1024, help="GLOBAL micro-batch over all processes (paper: 2×512); must divide by the process count")
    t.add_argument("--grad-accum", type=TRAIN_RULES["grad_accum"], default=1, help="micro-batches per optimizer step (contrastive negatives stay within a micro-batch)")
    t.add_argument("--lr", type=TRAIN_RULES["lr"], default=5e-5, help="peak learning rate (paper: 5e-5)")
    t.add_argument("--min-lr-ratio", type=TRAIN_RULES["min_lr_ratio"], default=0.0, help="final lr as a fraction of the peak")
    t.add_argument("--warmup-steps", type=TRAIN_RULES["warmup_steps"], default=500, help="linear warmup steps")
    t.add_argument("--schedule", default="cosine", choices=["cosine", "linear", "constant"], help="decay after warmup")
    t.add_argument("--weight-decay", type=TRAIN_RULES["weight_decay"], default=0.0, help="AdamW weight decay")
    t.add_argument("--adam-beta1", type=TRAIN_RULES["adam_beta1"], default=0.9, help="AdamW beta1")
    t.add_argument("--adam-beta2", type=TRAIN_RULES["adam_beta2"], default=0.999, help="AdamW beta2")
    t.add_argument("--adam-eps", type=TRAIN_RULES["adam_eps"], default=1e-8, help="AdamW epsilon")
    t.add_argument("--max-grad-norm", type=TRAIN_RULES["max_grad_norm"], default=1.0, help="gradient clipping (0 = off)")
    t.add_argument("--lam", type=TRAIN_RULES["lam"], default=0.2, help="λ of Eq. 1: weight of the contrastive term (paper: 0.2)")
    t.add_argument("--temperature", type=TRAIN_RULES["temperature"], default=0.07, help="τ of the contrastive term")
    t.add_argument("--similarity", default="cosine", choices=["cosine", "dot"], help="⟨ẑ_x, z_y⟩: cosine (normalised) or raw inner product")
    t.add_argument("--mse-reduction", default="sum", choices=["mean", "sum"], help="projection loss: sum over the embedding, mean over the batch (the ‖·‖² of Eq. 1, default), or mean over all elements")
    t.add_argument("--edge-drop", type=TRAIN_RULES["edge_drop"], default=0.01, help="probability of replacing the edge token by the blank embedding (paper: 1%%)")
    t.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"], help="autocast through accelerate (bf16 works on CPU)")
    t.add_argument("--seed", type=TRAIN_RULES["seed"], default=0, help="seed of init, data order, noise and dropout")
    t.add_argument("--deterministic", action=Flag, default=False, help="deterministic kernels (bit-exact resume on GPU)")
    t.add_argument("--cpu", action=Flag, default=False, help="force CPU even if a GPU is present")
    t.add_argument("--log-every", type=TRAIN_RULES["log_every"], default=50, help="steps between training-metric rows")
    t.add_argument("--eval-every", type=TRAIN_RULES["eval_every"], default=1000, help="steps between held-out evaluations")
    t.add_argument("--eval-batch-size", type=TRAIN_RULES["eval_batch_size"], default=256, help="eval batch (retrieval is among this many)")
    t.add_argument("--eval-max-batches", type=TRAIN_RULES["eval_max_batches"], default=20, help="cap on eval batches per evaluation (none = all)")
    t.add_argument("--save-every", type=TRAIN_RULES["save_every"], default=1000, help="steps between checkpoints")
    t.add_argument("--keep-last", type=TRAIN_RULES["keep_last"], default=3, help="checkpoints kept (older ones deleted; 0 = keep all)")
    t.add_argument("--resume", default="auto", help="'auto' (latest in --out), 'none', or a checkpoint folder. Options not "
                   "given take the checkpoint's values; a different hyperparameter is refused unless --force")
    t.add_argument("--force", action=Flag, default=False,
                   help="resume even where hyperparameters differ from the checkpoint's (the changes are logged and kept in "
                        "train_config.json); data, held-out split and model shape can never change within a run")
    t.add_argument("--shuffle-shards", type=TRAIN_RULES["shuffle_shards"], default=8, help="shards shuffled together (memory vs randomness)")
    t.add_argument("--prefetch", type=TRAIN_RULES["prefetch"], default=2, help="batches prepared ahead in a thread (0 = off)")
    t.add_argument("--verify-shards", action=Flag, default=True, help="check each shard's sha256 when loading it")
    t.add_argument("--tensorboard", action=Flag, default=True, help="also log to --out/tensorboard")

    v = sub.add_parser("eval", help="metrics of a checkpoint/run/exported prior on features", formatter_class=fmt)
    v.add_argument("--config", help="YAML/JSON file of options (CLI flags override)")
    v.add_argument("--checkpoint", help="checkpoint folder, run folder (latest checkpoint) or exported prior")
    v.add_argument("--data", help="feature folder")
    v.add_argument("--all", action=Flag, default=False, help="evaluate on all of --data instead of its held-out split")
    v.add_argument("--val-fraction", type=EVAL_RULES["val_fraction"], default=0.05, help="the held-out fraction, as in training; for a run or checkpoint not given means its own (from trainer_state.json), so its held-out split is scored")
    v.add_argument("--eval-batch-size", type=EVAL_RULES["eval_batch_size"], default=256, help="retrieval batch")
    v.add_argument("--eval-max-batches", type=EVAL_RULES["eval_max_batches"], default=None, help="cap on batches")
    v.add_argument("--lam", type=EVAL_RULES["lam"], default=0.2, help="λ for the reported loss (a run or checkpoint: its own unless given)")
    v.add_argument("--temperature", type=EVAL_RULES["temperature"], default=0.07, help="τ for the reported loss (a run or checkpoint: its own unless given)")
    v.add_argument("--similarity", default="cosine", choices=["cosine", "dot"], help="similarity for the reported loss (a run or checkpoint: its own unless given)")
    v.add_argument("--seed", type=EVAL_RULES["seed"], default=0, help="seed of the eval noise")

    x = sub.add_parser("export", help="checkpoint → prior that the Load Prior node reads", formatter_class=fmt)
    x.add_argument("--config", help="YAML/JSON file of options (CLI flags override)")
    x.add_argument("--checkpoint", help="checkpoint folder or run folder (latest checkpoint)")
    x.add_argument("--out", help="output: a folder (config.json + diffusion_pytorch_model.safetensors) or, with --single-file, a .safetensors")
    x.add_argument("--single-file", action=Flag, default=False, help="one .safetensors with the config in its metadata")
    x.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="weights' dtype")
    x.add_argument("--overwrite", action=Flag, default=False, help="replace an existing export at --out (without it an "
                   "existing .safetensors, or a folder's weights or config.json, is never replaced)")
    f = sub.add_parser("finetune-decoder", help="concept fine-tuning of the Kandinsky 2.2 decoder (paper §3.3, Eq. 2) as a LoRA", formatter_class=fmt)
    f.add_argument("--config", help="YAML/JSON file of options (CLI flags override)")
    f.add_argument("--decoder", help="Kandinsky 2.2 decoder diffusers folder (or --decoder-unet + --decoder-movq)")
    f.add_argument("--decoder-unet", help="decoder UNet single .safetensors file")
    f.add_argument("--decoder-movq", help="decoder MoVQ single .safetensors file")
    f.add_argument("--clip-vision", help="bigG vision tower file (ComfyUI clip_vision_g.safetensors)")
    f.add_argument("--clip", help="OpenCLIP bigG folder/file holding the vision tower (instead of --clip-vision)")
    f.add_argument("--images", nargs="+", help="photos of the concept (3-5): files and/or folders; RGBA: the alpha cuts the subject out onto white")
    f.add_argument("--masks", help="optional folder of masks named after the photos (MASKS/<photo stem>.png, white = subject): the subject is put on white, as the paper prepares subjects")
    f.add_argument("--out", help="run folder: concept_lora.safetensors, checkpoint/, metrics.csv")
    f.add_argument("--steps", type=FINETUNE_RULES["steps"], default=400, help="optimizer steps")
    f.add_argument("--rank", type=FINETUNE_RULES["rank"], default=4, help="LoRA rank")
    f.add_argument("--alpha", type=FINETUNE_RULES["alpha"], default=None, help="LoRA alpha (scale alpha/rank); default: = rank")
    f.add_argument("--lr", type=FINETUNE_RULES["lr"], default=None, help="AdamW learning rate; default 1e-4 (LoRA), 1e-5 with --full (App. D)")
    f.add_argument("--batch-size", type=FINETUNE_RULES["batch_size"], default=1, help="examples per step")
    f.add_argument("--resolution", type=FINETUNE_RULES["resolution"], default=512, help="photos are centre-cropped to this square (multiple of 64)")
    f.add_argument("--seed", type=FINETUNE_RULES["seed"], default=0, help="seed of the LoRA init, image order, timesteps, noise, unconditional draws")
    f.add_argument("--save-every", type=FINETUNE_RULES["save_every"], default=100, help="steps between checkpoints (and LoRA file updates)")
    f.add_argument("--resume", action=Flag, default=False, help="continue the run in --out from its checkpoint")
    f.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"], help="autocast through accelerate")
    f.add_argument("--gradient-checkpointing", action=Flag, default=False, help="recompute activations (less memory)")
    f.add_argument("--full", action=Flag, default=False, help="fine-tune the whole UNet (App. D) instead of a LoRA; writes concept_unet.safetensors")
    f.add_argument("--uncond-prob", type=FINETUNE_RULES["uncond_prob"], default=0.1, help="fraction of examples whose z_x is the blank-image embedding (keeps classifier-free guidance calibrated)")
    f.add_argument("--weight-decay", type=FINETUNE_RULES["weight_decay"], default=1e-2, help="AdamW weight decay")
    f.add_argument("--max-grad-norm", type=FINETUNE_RULES["max_grad_norm"], default=1.0, help="gradient clipping (0 = off)")
    f.add_argument("--cpu", action=Flag, default=False, help="force CPU even if a GPU is present")
    f.add_argument("--deterministic", action=Flag, default=False, help="deterministic kernels: a "
                   "resume on a GPU gives bit-identical weights too (slower; on the CPU it is bit-identical anyway)")
    f.add_argument("--sample-every", type=FINETUNE_RULES["sample_every"], default=0, help="every N steps (and at step 0, before training) decode each "
                   "concept photo's own embedding with the current weights into OUT/samples/step_NNNNNN.png (0 = off)")
    f.add_argument("--sample-steps", type=FINETUNE_RULES["sample_steps"], default=20, help="decoder steps of those samples (dpmpp_2m, guidance 4)")
    f.add_argument("--progress", action=Flag, default=True, help="progress bar with loss, rate and ETA")
    for command in sub.choices.values():  # say each numeric option's allowed range in --help
        for action in command._actions:
            if isinstance(action.type, Rule) and action.help:
                action.help += f" [{action.type.describe()}]"
    return p


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    return parser._subparsers._group_actions[0].choices[command]


def _convert_config_values(sub: argparse.ArgumentParser, values: dict, source: str) -> dict:
    """Config-file values through the same type functions and choices as typed flags (ranges included)."""
    actions = {a.dest: a for a in sub._actions}
    out = {}
    for key, value in values.items():
        action = actions[key]
        if value is not None and action.type is not None and not isinstance(value, (list, dict)):
            try:
                value = action.type(value if isinstance(value, str) else str(value))
            except (argparse.ArgumentTypeError, ValueError) as exc:
                sub.error(f"{source}: {key}: {exc}")
        if action.choices is not None and value not in action.choices:
            sub.error(f"{source}: {key}: must be one of {', '.join(map(str, action.choices))}, got {value!r}")
        out[key] = value
    return out


def explicit_options(argv, command: str) -> set[str]:
    """The options typed on the command line (not their defaults): parsed again with every default suppressed."""
    parser = build_parser()
    for action in _subparser(parser, command)._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv))) - {"command", "config"}


def parse(argv=None):
    """Parsed options; `args._explicit` is the set of options given (on the command line or in --config)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    from_file: set[str] = set()
    if getattr(args, "config", None):
        subparser = _subparser(parser, args.command)
        try:
            values = load_config_file(args.config)
        except ConfigError as exc:
            subparser.error(str(exc))
        known = {a.dest for a in subparser._actions} - {"help", "config"}
        unknown = sorted(set(values) - known)
        if unknown:
            subparser.error(f"--config {args.config}: unknown options for {args.command}: {unknown}")
        subparser.set_defaults(**_convert_config_values(subparser, values, f"--config {args.config}"))
        args = parser.parse_args(argv)
        from_file = set(values)
    args._explicit = explicit_options(argv, args.command) | from_file
    return args


def _require(args, *names):
    missing = [n for n in names if not getattr(args, n, None)]
    if missing:
        raise ConfigError(f"{args.command}: missing " + ", ".join("--" + m.replace("_", "-") for m in missing))


def main(argv=None) -> int:
    """Run one command; 0 on success, 2 (after `error: <message>` on stderr) on a user error."""
    try:
        return _run(argv)
    except LambdaEclipseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C): the files written so far are intact (checkpoints are whole or absent); run the "
              "same command again to continue (finetune-decoder: add --resume).", file=sys.stderr)
        return INTERRUPTED
    except OSError as exc:  # the disk, not the code: a full disk, a read-only or vanished folder
        where = f" {exc.filename}" if getattr(exc, "filename", None) else ""
        print(f"error: cannot read or write{where} ({exc.strerror or exc}). Check the free space and the permissions "
              "of the folders involved; the checkpoints written so far are intact.", file=sys.stderr)
        return USAGE_ERROR


def _run(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = parse(argv)
    if args.command in COMMAND_EXTRAS:  # before anything is read or loaded
        from .extras import require_extras

        require_extras(args.command, COMMAND_EXTRAS[args.command])
    d = {k: v for k, v in vars(args).items() if k not in ("command", "config") and not k.startswith("_")}
    if args.command == "extract":
        from .data import FilterConfig
        from .extract import ExtractConfig, run_extract

        _require(args, "clip", "out")
        filters = FilterConfig(*(d.pop(k) for k in ("min_box_area", "max_box_area", "min_mask_fill", "max_subjects", "min_subjects")))
        index = run_extract(ExtractConfig(filters=filters, **d))
        if index:
            print(json.dumps({"examples": index["examples"], "records": index["records"], "bytes_per_example": index["bytes_per_example"],
                              "skipped": index["skipped"]}, indent=2))
    elif args.command == "train":
        from .train import TrainConfig, run_train

        _require(args, "out")  # --data may come from the checkpoint when resuming
        result = run_train(TrainConfig(**d), explicit=args._explicit)
        result.pop("model", None)
        print(json.dumps(result, indent=2, default=str))
    elif args.command == "eval":
        from .train import TrainConfig, describe_eval, run_eval

        _require(args, "checkpoint", "data")
        cfg = TrainConfig(val_fraction=d["val_fraction"], eval_batch_size=d["eval_batch_size"],
                          eval_max_batches=d["eval_max_batches"], lam=d["lam"], temperature=d["temperature"],
                          similarity=d["similarity"], seed=d["seed"])
        metrics = run_eval(d["checkpoint"], d["data"], cfg, all_data=d["all"], explicit=args._explicit)
        print(describe_eval(metrics), file=sys.stderr)
        print(json.dumps(metrics, indent=2))
    elif args.command == "export":
        from .train import export

        _require(args, "checkpoint", "out")
        print(export(d["checkpoint"], d["out"], d["single_file"], d["dtype"], overwrite=d["overwrite"]))
    elif args.command == "finetune-decoder":
        from .finetune_decoder import FinetuneConfig, run_finetune

        _require(args, "out", "images")
        print(json.dumps(run_finetune(FinetuneConfig(**d)), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
