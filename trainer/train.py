"""Training loop: Eq. 1, AdamW + warmup/decay, accelerate (DDP, autocast), atomic resumable checkpoints, eval."""

from __future__ import annotations

import csv
import io
import itertools
import json
import logging
import math
import os
import random
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch

from ..core.errors import LambdaEclipseError, OutputPathError
from ..core.prior import LambdaEclipsePrior, PriorConfig, load_prior
from .batches import Split, TrainStream, eval_batches
from .errors import CheckpointError, ConfigError, DataError, ResumeError, TrainingDivergedError
from .fsio import (RunLock, check_output_folder, read_small_text, save_file_atomic, set_file_mode, set_tree_modes,
                   write_json_atomic, write_text_atomic)
from .state_io import load_legacy, load_state, save_state
from .losses import prior_loss, retrieval_metrics
from .settings import (FREE, LOCKED, MIN_RETRIEVAL_CANDIDATES, NOT_INHERITED, TRAIN_RULES, Change, check_value, flag,
                       fmt_value, same_path)
from .store import FeatureStore

log = logging.getLogger("lambda_eclipse.trainer")

CSV_FIELDS = ["step", "split", "epoch", "loss", "mse", "contrastive", "cosine", "top1", "top5", "lr", "samples_per_s", "time"]


class SimulatedCrash(RuntimeError):
    """Raised by the `crash_at_step` test hook."""


@dataclass
class TrainConfig:
    data: str = ""
    out: str = ""
    val_data: str | None = None
    val_fraction: float = 0.05
    model: str = "paper"  # paper | tiny | path/to/config.json
    init_from: str | None = None
    max_steps: int = 100_000
    batch_size: int = 1024  # global micro-batch (all processes together)
    grad_accum: int = 1
    lr: float = 5e-5
    min_lr_ratio: float = 0.0
    warmup_steps: int = 500
    schedule: str = "cosine"  # cosine | linear | constant
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    lam: float = 0.2
    temperature: float = 0.07
    similarity: str = "cosine"
    mse_reduction: str = "sum"
    edge_drop: float = 0.01
    mixed_precision: str = "no"  # no | bf16 | fp16
    seed: int = 0
    deterministic: bool = False
    cpu: bool = False
    log_every: int = 50
    eval_every: int = 1000
    eval_batch_size: int = 256
    eval_max_batches: int | None = 20
    save_every: int = 1000
    keep_last: int = 3
    resume: str = "auto"  # auto | none | path to a checkpoint dir
    shuffle_shards: int = 8
    prefetch: int = 2
    verify_shards: bool = True
    tensorboard: bool = True
    force: bool = False  # resume even where hyperparameters differ from the checkpoint's (see TRAINING.md)
    crash_at_step: int | None = None  # test hook: raise after this optimizer step

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        bad = sorted(set(d) - known)
        if bad:
            raise ConfigError(f"Unknown training settings: {bad}")
        return cls(**d)

    def validate(self) -> "TrainConfig":
        """Every numeric setting within its range (settings.TRAIN_RULES) and every choice known; ConfigError otherwise."""
        problems = [check_value(name, getattr(self, name), rule) for name, rule in TRAIN_RULES.items()]
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                problems.append(f"{flag(name)} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        problems = [p for p in problems if p]
        if problems:
            raise ConfigError("; ".join(problems))
        return self


CHOICES = {"schedule": ("cosine", "linear", "constant"), "similarity": ("cosine", "dot"), "mse_reduction": ("mean", "sum"),
           "mixed_precision": ("no", "bf16", "fp16")}


def model_config(spec: str) -> PriorConfig:
    from ..core.tiny import TINY_PRIOR_CONFIG

    if spec == "paper":
        return PriorConfig()
    if spec == "tiny":
        return PriorConfig(**TINY_PRIOR_CONFIG.__dict__)
    path = Path(spec)
    if path.is_file():
        try:
            return PriorConfig.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise ConfigError(f"--model {spec}: not a prior config.json ({type(exc).__name__}: {str(exc)[:200]}).") from exc
    raise ConfigError(f"--model must be 'paper', 'tiny' or the path of a config.json, not {spec!r}")


def init_model(cfg: TrainConfig) -> LambdaEclipsePrior:
    if cfg.init_from:
        model = load_prior(cfg.init_from)  # eval + frozen: undo for training
        bad = nonfinite_tensor(model.state_dict().items())
        if bad is not None:
            raise ConfigError(f"--init-from {cfg.init_from}: the prior's tensor {bad} holds NaN or inf, so training "
                              "from it would only produce NaN. Use an intact prior (re-download or re-export it).")
        model.requires_grad_(True)
        for name in ("clip_mean", "clip_std"):  # kept for the checkpoint, unused by forward
            getattr(model, name).requires_grad_(False)
        return model.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = LambdaEclipsePrior(model_config(cfg.model))
        _init_weights(model)
    model.clip_mean.requires_grad_(False)
    model.clip_std.requires_grad_(False)
    return model.train()


def _init_weights(model: LambdaEclipsePrior):
    """Small normal init for linear layers and the learned tokens (the diffusers prior's defaults are zeros for these)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                torch.nn.init.normal_(m.weight, std=0.02)
                torch.nn.init.zeros_(m.bias)
        torch.nn.init.normal_(model.positional_embedding, std=0.02)
        torch.nn.init.normal_(model.prd_embedding, std=0.02)


def lr_lambda(cfg: TrainConfig):
    def f(step: int) -> float:
        if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        span = max(1, cfg.max_steps - cfg.warmup_steps)
        t = min(1.0, (step - cfg.warmup_steps) / span)
        decay = 0.5 * (1 + math.cos(math.pi * t)) if cfg.schedule == "cosine" else 1.0 - t
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay
    return f


# -- checkpoints -----------------------------------------------------------------------------------

def checkpoint_dirs(out: Path) -> list[Path]:
    root = out / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and not p.name.endswith(".tmp")
            and (p / "trainer_state.json").is_file()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def nonfinite_tensor(tensors) -> str | None:
    """The name of the first tensor holding NaN or inf among (name, tensor) pairs, else None."""
    for name, t in tensors:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


def save_checkpoint(accelerator, out: Path, step: int, model, optimizer, scheduler, cfg: TrainConfig, extra: dict):
    """Written into step-N.tmp/ and renamed to step-N/ by the main process: a checkpoint is whole or absent.

    Weights holding NaN or inf are never saved (TrainingDivergedError; the checkpoints before stay as they were).
    Optimizer and RNG states are stored as safetensors + JSON (trainer/state_io.py): nothing is pickled.
    """
    bad = nonfinite_tensor(accelerator.unwrap_model(model).named_parameters())
    if bad is not None:
        raise TrainingDivergedError(
            f"The weights became non-finite (NaN or inf in {bad}) by step {step}; this checkpoint was not saved, the "
            f"earlier ones in {out / 'checkpoints'} are intact. Lower --lr, keep --max-grad-norm on, or use "
            "--mixed-precision no/bf16, then resume (--force for the changed values) or start a new --out.")
    root = out / "checkpoints"
    final = root / f"step-{step:08d}"
    tmp = root / f"step-{step:08d}.tmp"
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        try:
            tmp.mkdir(parents=True)
        except OSError as exc:
            raise OutputPathError(f"Cannot create the checkpoint folder {tmp} ({exc.strerror or exc}). Check the free "
                                  "space and the permissions of --out; the earlier checkpoints are intact.") from exc
    accelerator.wait_for_everyone()
    save_state(_rng_state(), tmp / f"rng-{accelerator.process_index}.safetensors")
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        save_file_atomic({k: v.detach().float() for k, v in unwrapped.state_dict().items()}, tmp / "model.safetensors")
        write_json_atomic(unwrapped.config.to_dict(), tmp / "config.json")
        save_state({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None},
                   tmp / "optimizer.safetensors")
        write_json_atomic({"step": step, "world_size": accelerator.num_processes, "config": asdict(cfg), **extra},
                          tmp / "trainer_state.json")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        set_tree_modes(tmp)  # every rank's files: the mode a plain open() gives, whatever wrote them
        try:
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except OSError as exc:
            raise OutputPathError(f"Cannot put the checkpoint {final} in place ({exc.strerror or exc}). Check the "
                                  "free space and the permissions of --out.") from exc
        for old in checkpoint_dirs(out)[:-cfg.keep_last] if cfg.keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def read_trainer_state(path: Path) -> dict:
    advice = "Give a checkpoints/step-N folder or a run folder."
    try:
        text = read_small_text(Path(path) / "trainer_state.json", "The checkpoint file", CheckpointError,
                               advice=advice)
        state = json.loads(text)
        int(state["step"])
    except CheckpointError as exc:
        raise CheckpointError(f"{path} is not a readable training checkpoint ({exc})") from exc
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path} is not a readable training checkpoint (trainer_state.json: {type(exc).__name__}: "
                              f"{str(exc)[:200]}). {advice}") from exc
    return state


def _checkpoint_state(path: Path, name: str, what: str, advice: str, numpy_arrays: bool = False):
    """`name`.safetensors (this version), or `name`.pt of an earlier version read without unpickling code;
    None when neither exists."""
    new, old = path / f"{name}.safetensors", path / f"{name}.pt"
    if new.exists() or new.is_symlink():
        return load_state(new, what, advice)
    if old.exists() or old.is_symlink():
        return load_legacy(old, what, advice, numpy_arrays=numpy_arrays)
    return None


def load_checkpoint(path: Path, accelerator, model, optimizer, scheduler) -> dict:
    from safetensors.torch import load_file

    state = read_trainer_state(path)
    advice = "Delete this checkpoint folder to resume from the one before, or pass another with --resume."
    try:
        accelerator.unwrap_model(model).load_state_dict(load_file(str(path / "model.safetensors")))
    except Exception as exc:  # missing / torn file, other architecture
        raise CheckpointError(f"Checkpoint {path} cannot be loaded ({type(exc).__name__}: {str(exc)[:300]}). {advice}") from exc
    opt = _checkpoint_state(path, "optimizer", "optimizer state", advice)
    if opt is None:
        raise CheckpointError(f"Checkpoint {path} has no optimizer state (optimizer.safetensors). {advice}")
    rng_name = f"rng-{accelerator.process_index}"
    # a different world size has no per-rank state for new ranks: data/noise don't need it
    rng = _checkpoint_state(path, rng_name, "RNG state", advice, numpy_arrays=True)
    try:
        optimizer.load_state_dict(opt["optimizer"])
        scheduler.load_state_dict(opt["scheduler"])
        if opt.get("scaler") and accelerator.scaler is not None:
            accelerator.scaler.load_state_dict(opt["scaler"])
        if rng is not None:
            _set_rng_state(rng)
    except Exception as exc:  # a file of the right format holding the wrong things
        raise CheckpointError(f"Checkpoint {path}: the optimizer or RNG state does not fit this run "
                              f"({type(exc).__name__}: {str(exc)[:200]}). {advice}") from exc
    return state


# -- metrics ---------------------------------------------------------------------------------------

def read_metric_rows(path: Path, resume_step: int) -> list[dict]:
    """The rows of an earlier metrics.csv up to `resume_step` (later ones were written after that checkpoint).

    A file without its header line (cut off by a kill) is read with the known columns; a garbled one is refused
    (DataError) before anything is written, so no row is lost.
    """
    if not path.exists() and not path.is_symlink():
        return []
    advice = (f"Move {path} away (or delete it) and run the same command again: the checkpoints are intact, and the "
              "rows from the checkpoint on are written to a new metrics.csv.")
    text = read_small_text(path, "The metrics file", DataError, max_bytes=1 << 30, advice=advice)
    lines = list(csv.reader(io.StringIO(text)))
    if lines and lines[0] == CSV_FIELDS:
        lines = lines[1:]
        first = 2
    else:
        first = 1
    rows = []
    for number, line in enumerate(lines, first):
        if not line:
            continue
        try:
            if len(line) != len(CSV_FIELDS):
                raise ValueError(f"{len(line)} columns, expected {len(CSV_FIELDS)}: {', '.join(CSV_FIELDS)}")
            row = dict(zip(CSV_FIELDS, line))
            step = int(float(row["step"]))
        except ValueError as exc:
            raise DataError(f"{path} line {number} is not a metrics row ({str(exc)[:200]}). {advice}") from None
        if step <= resume_step:
            rows.append(row)
    return rows


class MetricLog:
    def __init__(self, out: Path, resume_step: int, tensorboard: bool, rows: list[dict] | None = None):
        self.path = out / "metrics.csv"
        if rows is None:
            rows = read_metric_rows(self.path, resume_step)
        buf = io.StringIO()
        w = csv.DictWriter(buf, CSV_FIELDS)
        w.writeheader()
        w.writerows(rows)
        write_text_atomic(buf.getvalue(), self.path)  # the header is always there, the old rows never half-written
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)
            except Exception as exc:  # tensorboard missing: CSV + PNG still work
                log.warning("TensorBoard logging off (%s)", exc)

    def write(self, row: dict):
        try:
            with open(self.path, "a", newline="", encoding="utf-8") as f:
                csv.DictWriter(f, CSV_FIELDS).writerow({k: row.get(k, "") for k in CSV_FIELDS})
        except OSError as exc:
            raise OutputPathError(f"Could not add a row to {self.path} ({exc.strerror or exc}). Check the free space "
                                  "and the permissions of --out; the checkpoints written so far are intact.") from exc
        if self.writer is not None:
            for k in ("loss", "mse", "contrastive", "cosine", "top1", "top5", "lr", "samples_per_s"):
                if k in row and row[k] != "":
                    self.writer.add_scalar(f"{row['split']}/{k}", float(row[k]), int(row["step"]))
            self.writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()


@torch.no_grad()
def evaluate(model, split: Split, cfg: TrainConfig, device) -> dict[str, float]:
    was = model.training
    model.eval()
    totals: dict[str, float] = {}
    n = 0
    among = 0
    for batch in eval_batches(split, cfg.eval_batch_size, cfg.seed, cfg.eval_max_batches):
        pred = model.predict(batch.noise.to(device), batch.pooled.to(device), batch.tokens.to(device),
                             batch.mask.to(device), batch.control.to(device)).float()
        losses = prior_loss(pred, batch.image.to(device), batch.pooled_global.to(device), 0, cfg.lam,
                            cfg.temperature, cfg.similarity, cfg.mse_reduction)
        metrics = {k: v.item() for k, v in losses.items()}
        metrics.update(retrieval_metrics(pred, batch.image.to(device)))
        b = batch.image.shape[0]
        for k, v in metrics.items():
            totals[k] = totals.get(k, 0.0) + v * b
        n += b
        among = b if not among else min(among, b)
    model.train(was)
    if not n:
        return {}
    out = {k: v / n for k, v in totals.items()}
    out["examples"] = n  # how many held-out examples the figures average over
    out["retrieval_among"] = among  # top-1/top-5 candidates per example (chance = 1/among)
    return out


def retrieval_caveat(examples: int, among: int, where: str = "held-out split") -> str | None:
    """A warning when top-1/top-5 retrieval is among too few candidates to mean anything, else None."""
    if not examples or among >= MIN_RETRIEVAL_CANDIDATES:
        return None
    advice = (f"use at least {MIN_RETRIEVAL_CANDIDATES} examples (more data, a larger --val-fraction, --val-data, "
              "or eval --all true)")
    if among <= 1:
        return (f"the {where} has {examples} example{'s' if examples != 1 else ''}: top-1/top-5 retrieval among a "
                f"single candidate is always 1.0 and means nothing; {advice}.")
    return (f"the {where} has {examples} examples: top-1/top-5 retrieval is among only {among} candidates "
            f"(chance 1/{among} = {1 / among:.3f}), too few to mean much; {advice}.")


def describe_eval(m: dict) -> str:
    """One line of held-out figures with the count beside them."""
    if not m:
        return "no held-out examples"
    return (f"top-1 {m['top1']:.3f}, top-5 {m['top5']:.3f}, cosine {m['cosine']:.3f}, loss {m['loss']:.4f} "
            f"(n={m['examples']} example{'s' if m['examples'] != 1 else ''}, retrieval among {m['retrieval_among']})")


# -- resume: what may change --------------------------------------------------------------------------

@dataclass
class ResumePlan:
    checkpoint: Path
    step: int
    saved: dict  # the checkpoint's trainer_state.json
    inherited: dict  # options not given that took the checkpoint's (non-default) value
    free: list  # [Change] of settings that do not touch the training math
    forced: list  # [Change] of hyperparameters changed with --force


def find_resume_checkpoint(cfg: TrainConfig, out: Path) -> Path | None:
    if cfg.resume in ("none", "", None):
        return None
    if cfg.resume == "auto":
        found = checkpoint_dirs(out)
        return found[-1] if found else None
    path = Path(cfg.resume)
    if not path.exists():
        raise CheckpointError(f"--resume {path} does not exist (give 'auto', 'none', a checkpoints/step-N folder or a run folder).")
    return resolve_checkpoint(path)


def _index_fingerprint(folder) -> str | None:
    try:
        return json.loads((Path(folder) / "index.json").read_text(encoding="utf-8")).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        return None


def _same_setting(name: str, old, new, saved: dict, ckpt: Path) -> bool:
    if name in ("data", "val_data"):
        if same_path(old, new):
            return True
        # the same features moved elsewhere are the same data
        fp = saved.get(f"{name}_fingerprint")
        return bool(old and new and fp and _index_fingerprint(new) == fp)
    if name == "init_from":
        return same_path(old, new)
    if name == "model":
        if old == new:
            return True
        try:  # 'tiny' and a config.json of the same shape are the same model
            have = json.loads((ckpt / "config.json").read_text(encoding="utf-8"))
            return model_config(new).to_dict() == PriorConfig.from_dict(have).to_dict()
        except Exception:
            return False
    return old == new


def reconcile_resume(cfg: TrainConfig, explicit: set[str] | None, ckpt: Path) -> tuple[TrainConfig, ResumePlan]:
    """The settings a resumed run goes on with: options not given take the checkpoint's values; a given value that
    differs is refused (ResumeError) unless it is harmless (FREE), or a hyperparameter with --force. Settings that
    define the run (LOCKED: data, split, model) are refused even with --force."""
    saved = read_trainer_state(ckpt)
    old_cfg = saved.get("config") or {}
    names = [f.name for f in fields(TrainConfig) if f.name not in NOT_INHERITED]
    given = set(names) if explicit is None else set(explicit)
    values = asdict(cfg)
    if not values.get("data"):
        given.discard("data")  # an empty --data is "not given", also from the Python API
    defaults = asdict(TrainConfig())
    inherited, free, forced, locked = {}, [], [], []
    for name in names:
        if name not in old_cfg:  # a setting newer than the checkpoint
            continue
        old = old_cfg[name]
        if name not in given:
            values[name] = old
            if old != defaults.get(name):
                inherited[name] = old
            continue
        new = values[name]
        if _same_setting(name, old, new, saved, ckpt):
            continue
        change = Change(name, old, new)
        (locked if name in LOCKED else free if name in FREE else forced).append(change)
    where = f"Resuming from {ckpt} (step {int(saved['step'])})"
    if locked:
        msg = (f"{where} would change settings that define the run, which cannot change even with --force:\n  "
               + "\n  ".join(map(str, locked))
               + "\nOmit them (or give the checkpoint's values) to continue this run, or start a new run in a new --out folder.")
        if forced:
            msg += "\nAlso different (allowed only with --force):\n  " + "\n  ".join(map(str, forced))
        raise ResumeError(msg)
    if forced and not cfg.force:
        raise ResumeError(
            f"{where} with settings that differ from the checkpoint's:\n  " + "\n  ".join(map(str, forced))
            + "\nOmit them (or give the checkpoint's values) to continue with the checkpoint's settings, or add --force to "
              "continue with the new values (the run is then no longer bit-identical to an uninterrupted one).")
    new_cfg = TrainConfig(**values)
    try:
        new_cfg.validate()
    except ConfigError as exc:
        raise ResumeError(f"{where}: the checkpoint's settings are not valid any more ({exc}). Give valid values "
                          "explicitly (with --force where they differ).") from exc
    return new_cfg, ResumePlan(ckpt, int(saved["step"]), saved, inherited, free, forced)


def _log_resume_plan(plan: ResumePlan, explicit_known: bool):
    if explicit_known:
        if plan.inherited:
            log.info("resume: options not given take the checkpoint's values: %s",
                     ", ".join(f"{flag(k)} {fmt_value(v)}" for k, v in plan.inherited.items()))
        else:
            log.info("resume: options not given take the checkpoint's values (all of them the defaults)")
    if plan.free:
        log.info("resume: changed (training math unaffected): %s", "; ".join(map(str, plan.free)))
    if plan.forced:
        log.warning("resume with --force: %s; the run is no longer bit-identical to an uninterrupted one",
                    "; ".join(map(str, plan.forced)))


def _check_resumed_data(plan: ResumePlan, name: str, store: FeatureStore | None, folder):
    want = plan.saved.get(f"{name}_fingerprint")
    if store is None or not want:
        return
    have = store.index.get("fingerprint")
    if have != want:
        raise ResumeError(
            f"Resuming from {plan.checkpoint}: the features in {folder} are not the ones the checkpoint was trained on "
            f"(index fingerprint {str(have)[:12]}… ≠ {want[:12]}…; extracted again from other data or settings?). This "
            f"cannot change within a run, even with --force: point {flag(name)} at the original features, or start a "
            "new run in a new --out folder.")


def _apply_forced(plan: ResumePlan, cfg: TrainConfig, optimizer, scheduler):
    """The checkpoint's optimizer/scheduler state holds the old lr, betas, eps and decay: put the new ones in."""
    if not plan.forced:
        return
    lam = lr_lambda(cfg)
    scheduler.lr_lambdas = [lam for _ in optimizer.param_groups]
    scheduler.base_lrs = [cfg.lr for _ in optimizer.param_groups]
    for group in optimizer.param_groups:
        group.update(initial_lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(cfg.adam_beta1, cfg.adam_beta2),
                     eps=cfg.adam_eps, lr=cfg.lr * lam(scheduler.last_epoch))
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


def _write_train_config(out: Path, cfg: TrainConfig, plan: ResumePlan | None):
    """train_config.json: the settings in force (top level) and the run's history of starts, resumes and changes."""
    path = out / "train_config.json"
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    if plan is None:
        history = [{"event": "start", "time": now, "config": asdict(cfg)}]
    else:
        history = []
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
            history = list(old.get("history") or []) if isinstance(old, dict) else []
        except (OSError, ValueError):
            pass
        if not history:
            history = [{"event": "start", "config": plan.saved.get("config"), "note": "recorded from " + str(plan.checkpoint)}]
        entry = {"event": "resume", "time": now, "step": plan.step, "from": str(plan.checkpoint)}
        if plan.forced:
            entry["forced"] = {c.name: c.to_json() for c in plan.forced}
        if plan.free:
            entry["changed"] = {c.name: c.to_json() for c in plan.free}
        history.append(entry)
    write_json_atomic({**asdict(cfg), "history": history}, path)


# -- the loop --------------------------------------------------------------------------------------

def set_deterministic(seed: int):
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    if torch.backends.cudnn.is_available():
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


def run_train(cfg: TrainConfig, accelerator=None, explicit: set[str] | None = None) -> dict:
    """Train; returns {"step", "final_checkpoint", "val": last eval metrics, "out"}.

    `explicit`: the settings the user gave (the command line passes them). When resuming, the others take the
    checkpoint's values. None (the Python API's default) counts every field as given.
    Every check runs before anything is written: a refused run leaves --out as it was.
    """
    from .extras import require_extras

    require_extras("train", ("accelerate",))
    from accelerate import Accelerator

    cfg.validate()
    if not cfg.out:
        raise ConfigError("train: missing --out")
    out = Path(cfg.out)
    check_output_folder(out)
    # Another run on this --out is refused at once (before its checkpoints are even read); a folder this run
    # creates is locked before its first file is written.
    lock = RunLock(out, "trainer train", None if accelerator is None else accelerator.is_main_process)
    with lock:
        return _train(cfg, accelerator, explicit, out, lock.take_if_exists())


def _train(cfg: TrainConfig, accelerator, explicit: set[str] | None, out: Path, lock: RunLock) -> dict:
    from accelerate import Accelerator

    resume_from = find_resume_checkpoint(cfg, out)
    plan = None
    if resume_from is not None:
        cfg, plan = reconcile_resume(cfg, explicit, resume_from)
    if not cfg.data:
        raise ConfigError("train: missing --data")

    if accelerator is None:
        accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=cfg.cpu)
    if cfg.deterministic:
        set_deterministic(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed % (2**32))
    torch.manual_seed(cfg.seed + accelerator.process_index)

    store = FeatureStore(cfg.data, verify=cfg.verify_shards, cache_shards=max(2, cfg.shuffle_shards + 1))
    store.check_files()  # before Split.make allocates per example: an index claiming 10^9 examples stops here
    val_store = None
    if cfg.val_data:
        val_store = FeatureStore(cfg.val_data, verify=cfg.verify_shards)
        val_store.check_files()
        train_split = Split.make(store, 0.0, want_val=False)
        val_split = Split.make(val_store, 0.0, want_val=False)
    else:
        train_split = Split.make(store, cfg.val_fraction, want_val=False)
        val_split = Split.make(FeatureStore(cfg.data, verify=cfg.verify_shards), cfg.val_fraction, want_val=True)
    if plan is not None:
        _check_resumed_data(plan, "data", store, cfg.data)
        _check_resumed_data(plan, "val_data", val_store, cfg.val_data)
    world = accelerator.num_processes
    if cfg.batch_size % world:
        raise ConfigError(f"--batch-size {cfg.batch_size} must be divisible by the number of processes ({world}).")
    if train_split.size < cfg.batch_size:
        held = f", after holding out {val_split.size} with --val-fraction {cfg.val_fraction}" if not cfg.val_data else ""
        raise ConfigError(f"--batch-size {cfg.batch_size} is larger than the training split: {train_split.size} examples "
                          f"in {cfg.data}{held}. Use --batch-size {train_split.size} or less, or more data.")

    model = init_model(cfg)
    if model.config.embedding_dim != store.embed_dim:
        raise ConfigError(f"The prior's embedding_dim is {model.config.embedding_dim} but the features are {store.embed_dim}-d "
                          f"(CLIP {store.index.get('clip')}). Use a matching --model / --init-from.")
    if accelerator.is_main_process:
        if plan is not None:
            _log_resume_plan(plan, explicit is not None)
        if val_split.size == 0:
            log.warning("no held-out examples (--val-fraction %s of %d examples%s): no evaluation will be reported",
                        cfg.val_fraction, len(store), f", --val-data {cfg.val_data}" if cfg.val_data else "")
        else:
            caveat = retrieval_caveat(val_split.size, min(cfg.eval_batch_size, val_split.size))
            if caveat:
                log.warning(caveat)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                                  weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))  # stepped by us once per step, not prepared
    model, optimizer = accelerator.prepare(model, optimizer)

    step = 0
    if resume_from is not None:
        state = load_checkpoint(resume_from, accelerator, model, optimizer, scheduler)
        step = int(state["step"])
        _apply_forced(plan, cfg, optimizer, scheduler)
        log.info("resumed from %s at step %d", resume_from, step)

    stream = TrainStream(train_split, cfg.seed, cfg.batch_size, accelerator.process_index, accelerator.num_processes,
                         cfg.edge_drop, cfg.shuffle_shards, cfg.prefetch)
    accum = cfg.grad_accum
    micro_gen = stream.iterate(step * accum, cfg.max_steps * accum)
    try:  # the first batch loads (and verifies) its shards before anything is written
        first = [next(micro_gen)] if step < cfg.max_steps else []
    except BaseException:
        micro_gen.close()
        raise
    micro_iter = itertools.chain(first, micro_gen)

    # Nothing has been written before this point: a refused or failed start leaves --out as it was.
    metrics = None
    try:
        old_rows = read_metric_rows(out / "metrics.csv", step) if accelerator.is_main_process else None
        if accelerator.is_main_process:
            lock.take()
            try:
                out.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise OutputPathError(f"Cannot create the run folder {out} ({exc.strerror or exc}).") from exc
            _write_train_config(out, cfg, plan)
            for stale in (out / "checkpoints").glob("*.tmp") if (out / "checkpoints").is_dir() else []:
                shutil.rmtree(stale, ignore_errors=True)  # a checkpoint cut off mid-write
        accelerator.wait_for_everyone()
        metrics = MetricLog(out, step, cfg.tensorboard, old_rows) if accelerator.is_main_process else None
    except BaseException:
        micro_gen.close()
        raise
    device = accelerator.device
    last_val: dict = {}
    t0, seen = time.time(), 0
    run_sum: dict[str, float] = {}
    run_n = 0
    data_ids = {"data_fingerprint": store.index.get("fingerprint"), "data_examples": len(store)}
    if val_store is not None:
        data_ids.update(val_data_fingerprint=val_store.index.get("fingerprint"), val_data_examples=len(val_store))
    if accelerator.is_main_process:
        log.info("training %.1fM params on %d examples (%d held out), global batch %d×%d, %d steps/epoch, %d processes",
                 accelerator.unwrap_model(model).num_parameters / 1e6, train_split.size, val_split.size, cfg.batch_size,
                 accum, stream.per_epoch // accum, accelerator.num_processes)

    try:
        while step < cfg.max_steps:
            model.train()
            for k in range(accum):
                micro, batch = next(micro_iter)
                sync = k == accum - 1
                ctx = nullcontext() if sync or accelerator.num_processes == 1 else accelerator.no_sync(model)
                with ctx:
                    with accelerator.autocast():
                        pred = model(batch.noise.to(device), proj_embedding=batch.pooled.to(device),
                                     encoder_hidden_states=batch.tokens.to(device), attention_mask=batch.mask.to(device),
                                     control_embedding=batch.control.to(device)).predicted_image_embedding
                    losses = prior_loss(pred, batch.image.to(device), batch.pooled_global.to(device), batch.row_offset,
                                        cfg.lam, cfg.temperature, cfg.similarity, cfg.mse_reduction)
                    if not bool(torch.isfinite(losses["loss"].detach())):
                        last = checkpoint_dirs(out)
                        kept = (f"the last checkpoint ({last[-1].name}) is intact" if last else
                                "no checkpoint was written yet")
                        raise TrainingDivergedError(
                            f"The loss became {float(losses['loss'].detach()):g} at step {step + 1} (before its update; {kept}, "
                            "and no NaN weights were saved). Lower --lr, keep --max-grad-norm on, raise "
                            "--warmup-steps or use --mixed-precision no/bf16; then resume (--force for the "
                            "changed values) or start a new --out.")
                    accelerator.backward(losses["loss"] / accum)
                for key, v in losses.items():
                    run_sum[key] = run_sum.get(key, 0.0) + v.item()
                run_n += 1
                seen += cfg.batch_size
            if cfg.max_grad_norm and cfg.max_grad_norm > 0:
                accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            epoch = (step * accum) // stream.per_epoch

            if accelerator.is_main_process and (step % cfg.log_every == 0 or step == cfg.max_steps):
                dt = time.time() - t0
                row = {"step": step, "split": "train", "epoch": epoch, "lr": scheduler.get_last_lr()[0],
                       "samples_per_s": seen / max(dt, 1e-9), "time": round(time.time(), 3)}
                row.update({k: v / run_n for k, v in run_sum.items()})
                metrics.write(row)
                log.info("step %d  loss %.4f  mse %.5f  contrastive %.4f  lr %.3g  %.1f samples/s", step, row["loss"],
                         row["mse"], row["contrastive"], row["lr"], row["samples_per_s"])
                run_sum, run_n, t0, seen = {}, 0, time.time(), 0
            if (step % cfg.eval_every == 0 or step == cfg.max_steps) and val_split.size:
                if accelerator.is_main_process:
                    last_val = evaluate(accelerator.unwrap_model(model), val_split, cfg, device)
                    metrics.write({"step": step, "split": "val", "epoch": epoch, **last_val, "time": round(time.time(), 3)})
                    log.info("step %d  held-out: %s", step, describe_eval(last_val))
                    try:
                        from .plot import plot_curves

                        plot_curves(metrics.path, out / "curves.png")
                    except Exception as exc:  # a plot must never stop training
                        log.warning("could not draw curves.png: %s", exc)
                accelerator.wait_for_everyone()
            if step % cfg.save_every == 0 or step == cfg.max_steps:
                save_checkpoint(accelerator, out, step, model, optimizer, scheduler, cfg,
                                {"epoch": epoch, "micro_step": step * accum, "val": last_val,
                                 "interleave_failures": stream.assembler.interleave_failures, **data_ids})
            if cfg.crash_at_step is not None and step == cfg.crash_at_step:
                raise SimulatedCrash(f"crash_at_step={step}")
    finally:
        micro_gen.close()
        if metrics is not None:
            metrics.close()
    final = checkpoint_dirs(out)[-1] if checkpoint_dirs(out) else None
    if accelerator.is_main_process and val_split.size:
        try:
            from .plot import plot_curves

            plot_curves(out / "metrics.csv", out / "curves.png")
        except Exception as exc:
            log.warning("could not draw curves.png: %s", exc)
    return {"step": step, "final_checkpoint": str(final) if final else None, "val": last_val, "out": str(out),
            "model": accelerator.unwrap_model(model)}


# -- export / standalone eval ------------------------------------------------------------------------

def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint dir, or a run dir (its latest checkpoint)."""
    path = Path(path)
    if (path / "trainer_state.json").is_file():
        return path
    if not path.exists():
        raise CheckpointError(f"{path} does not exist (expected a run folder, its checkpoints/step-N/ folder, "
                              "or an exported prior).")
    found = checkpoint_dirs(path)
    if not found:
        raise CheckpointError(f"No checkpoint in {path} (expected {path}/checkpoints/step-N/ or a step-N/ folder).")
    return found[-1]


def check_weights(tensors: dict, source) -> None:
    """CheckpointError unless every tensor is floating point and finite (a NaN prior only makes NaN, and an int8
    or bool one is not a trained prior)."""
    for name, t in tensors.items():
        if not t.is_floating_point():
            raise CheckpointError(f"{source}: the tensor {name} is stored as {str(t.dtype).replace('torch.', '')}, not "
                                  "as floating point; this is not a prior the trainer wrote. Use an intact checkpoint "
                                  "or prior.")
    bad = nonfinite_tensor(tensors.items())
    if bad is not None:
        raise CheckpointError(f"{source}: the tensor {bad} holds NaN or inf; evaluating or exporting it would only give "
                              "NaN. Use an earlier checkpoint (checkpoints/step-N/) or an intact prior.")


def model_from_checkpoint(path: str | Path) -> LambdaEclipsePrior:
    from safetensors.torch import load_file

    ckpt = resolve_checkpoint(path)
    advice = "Use an earlier checkpoint (checkpoints/step-N/) or rerun the training to rewrite it."
    try:
        config = json.loads(read_small_text(ckpt / "config.json", "The checkpoint's config", CheckpointError))
        model = LambdaEclipsePrior(PriorConfig.from_dict(config))
        weights = ckpt / "model.safetensors"
        if not weights.is_file():
            raise CheckpointError(f"{weights} is missing or not a regular file")
        tensors = load_file(str(weights))
        check_weights(tensors, weights)
        model.load_state_dict(tensors)
    except CheckpointError as exc:
        raise CheckpointError(f"Checkpoint {ckpt} cannot be loaded ({exc}). {advice}") from exc
    except Exception as exc:  # torn config.json or weights, another architecture
        raise CheckpointError(f"Checkpoint {ckpt} cannot be loaded ({type(exc).__name__}: {str(exc)[:300]}). "
                              f"{advice}") from exc
    return model.eval()


def export(checkpoint: str | Path, out: str | Path, single_file: bool = False, dtype: str = "fp32",
           overwrite: bool = False) -> Path:
    """Checkpoint → exactly what core.prior.load_prior (the Load Prior node) reads, readable by other users (0644).

    An existing export (the .safetensors, or the folder's weights or config.json) is replaced only with
    `overwrite` (--overwrite); otherwise OutputExistsError, and nothing is written.
    """
    from ..core.fsio import check_writable_target
    from ..core.loading import resolve_dtype
    from ..core.prior import CONFIG_METADATA_KEY

    try:
        torch_dtype = resolve_dtype(dtype)
    except ValueError as exc:
        raise ConfigError(f"--dtype {dtype!r}: use fp32, fp16 or bf16.") from exc
    target = Path(out)
    if single_file and target.is_dir():
        raise ConfigError(f"--out {target} is a folder; with --single-file give the path of a .safetensors file.")
    if not single_file and target.exists() and not target.is_dir():
        raise ConfigError(f"--out {target} is a file; give a folder, or add --single-file to write one .safetensors.")
    if single_file:
        if target.suffix != ".safetensors":
            target = target.with_suffix(".safetensors")
        files = [target]
    else:
        check_output_folder(target)
        files = [target / "diffusion_pytorch_model.safetensors", target / "config.json"]
    for path in files:  # every refusal before anything is written
        check_writable_target(path, overwrite=overwrite, what="exported prior")
    model = model_from_checkpoint(checkpoint)
    tensors = {k: v.to(torch_dtype) for k, v in model.state_dict().items()}
    config = model.config.to_dict()
    if single_file:
        save_file_atomic(tensors, target, metadata={CONFIG_METADATA_KEY: json.dumps(config)}, overwrite=overwrite)
    else:
        try:
            target.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputPathError(f"Cannot create the folder {target} ({exc.strerror or exc}).") from exc
        save_file_atomic(tensors, files[0], overwrite=overwrite)
        write_json_atomic(config, files[1], overwrite=overwrite)
    for written in files:  # the mode a plain open() gives (0644 with umask 022)
        if written.is_file():
            set_file_mode(written)
    return target


#: Settings `eval` takes from the run's trainer_state.json when they are not given (the run's own split and loss).
EVAL_INHERITED = ("val_fraction", "lam", "temperature", "similarity", "mse_reduction")


def _run_settings(path: Path) -> tuple[Path, dict] | None:
    """(checkpoint folder, its run's config) when `path` is a run or checkpoint folder, else None."""
    try:
        ckpt = resolve_checkpoint(path)
        return ckpt, dict(read_trainer_state(ckpt).get("config") or {})
    except CheckpointError:
        return None


def run_eval(checkpoint_or_prior: str | Path, data: str, cfg: TrainConfig, all_data: bool = False,
             explicit: set[str] | None = None) -> dict:
    """Metrics of a checkpoint, run dir or exported prior on a feature folder (its held-out split, or all of it).

    `explicit`: the settings the user gave (the command line passes them). For a run or checkpoint, the others
    in EVAL_INHERITED take the run's values from trainer_state.json, so its own held-out split is scored. None
    (the Python API's default) uses `cfg` as it is.
    The result carries `examples` (how many were evaluated) and `retrieval_among` (top-1/top-5 candidates); a
    warning is logged when there are too few for the retrieval figures to mean anything.
    """
    path = Path(checkpoint_or_prior)
    if not path.exists():
        raise CheckpointError(f"--checkpoint {path} does not exist (give a run folder, a checkpoints/step-N/ folder "
                              "or an exported prior).")
    run = _run_settings(path) if explicit is not None else None
    if run is not None:
        ckpt, saved = run
        taken = {k: saved[k] for k in EVAL_INHERITED if k not in explicit and k in saved and saved[k] != getattr(cfg, k)}
        if taken:
            cfg = TrainConfig(**{**asdict(cfg), **taken})
            log.info("eval: settings not given take the run's values (%s): %s", ckpt / "trainer_state.json",
                     ", ".join(f"{flag(k)} {fmt_value(v)}" for k, v in taken.items()))
        if "val_fraction" in explicit and saved.get("val_fraction") not in (None, cfg.val_fraction) and not all_data:
            log.warning("eval: --val-fraction %s is not the run's %s: this split holds examples the run trained on.",
                        fmt_value(cfg.val_fraction), fmt_value(saved["val_fraction"]))
        if saved.get("val_data") and not all_data:
            if same_path(saved["val_data"], data):
                all_data = True
                log.info("eval: %s is the run's --val-data (its held-out folder): evaluating all of it.", data)
            else:
                log.warning("eval: the run held out --val-data %s and trained on all of its --data; evaluate with "
                            "--data %s for held-out figures.", saved["val_data"], saved["val_data"])
    try:
        model = model_from_checkpoint(path)
    except CheckpointError as not_ckpt:
        try:
            model = load_prior(path)
        except LambdaEclipseError as not_prior:
            raise CheckpointError(f"{path} is neither a training checkpoint ({not_ckpt}) nor an exported prior "
                                  f"({not_prior}).") from not_prior
        check_weights(model.state_dict(), path)
    store = FeatureStore(data, verify=cfg.verify_shards)
    store.check_files()
    split = Split.make(store, 0.0 if all_data else cfg.val_fraction, want_val=not all_data)
    if split.size == 0:
        raise ConfigError(f"No held-out examples in {data} with --val-fraction {cfg.val_fraction} ({len(store)} examples): "
                          "use --all true to evaluate on all of them, or a larger --val-fraction.")
    metrics = evaluate(model, split, cfg, torch.device("cpu"))
    caveat = retrieval_caveat(metrics["examples"], metrics["retrieval_among"],
                              "evaluated data" if all_data else "held-out split")
    if caveat:
        log.warning(caveat)
    return metrics
