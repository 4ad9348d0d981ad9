"""Training loop: Eq. 1, AdamW + warmup/decay, accelerate (DDP, autocast), atomic resumable checkpoints, eval."""

from __future__ import annotations

import csv
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

from ..core.loading import save_file_atomic, write_json_atomic
from ..core.prior import LambdaEclipsePrior, PriorConfig, load_prior, save_prior
from .batches import Split, TrainStream, eval_batches
from .losses import prior_loss, retrieval_metrics
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
    crash_at_step: int | None = None  # test hook: raise after this optimizer step

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        bad = sorted(set(d) - known)
        if bad:
            raise ValueError(f"Unknown training settings: {bad}")
        return cls(**d)


def model_config(spec: str) -> PriorConfig:
    from ..core.tiny import TINY_PRIOR_CONFIG

    if spec == "paper":
        return PriorConfig()
    if spec == "tiny":
        return PriorConfig(**TINY_PRIOR_CONFIG.__dict__)
    path = Path(spec)
    if path.is_file():
        return PriorConfig.from_dict(json.loads(path.read_text()))
    raise ValueError(f"--model must be 'paper', 'tiny' or a config.json path, not {spec!r}")


def init_model(cfg: TrainConfig) -> LambdaEclipsePrior:
    if cfg.init_from:
        model = load_prior(cfg.init_from)  # eval + frozen: undo for training
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


def save_checkpoint(accelerator, out: Path, step: int, model, optimizer, scheduler, cfg: TrainConfig, extra: dict):
    """Written into step-N.tmp/ and renamed to step-N/ by the main process: a checkpoint is whole or absent."""
    root = out / "checkpoints"
    final = root / f"step-{step:08d}"
    tmp = root / f"step-{step:08d}.tmp"
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(_rng_state(), tmp / f"rng-{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        save_file_atomic({k: v.detach().float() for k, v in unwrapped.state_dict().items()}, tmp / "model.safetensors")
        write_json_atomic(unwrapped.config.to_dict(), tmp / "config.json")
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None},
                   tmp / "optimizer.pt")
        write_json_atomic({"step": step, "world_size": accelerator.num_processes, "config": asdict(cfg), **extra},
                          tmp / "trainer_state.json")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in checkpoint_dirs(out)[:-cfg.keep_last] if cfg.keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(path: Path, accelerator, model, optimizer, scheduler) -> dict:
    from safetensors.torch import load_file

    state = json.loads((path / "trainer_state.json").read_text())
    accelerator.unwrap_model(model).load_state_dict(load_file(str(path / "model.safetensors")))
    opt = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False)
    optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    if opt.get("scaler") and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(opt["scaler"])
    rng_path = path / f"rng-{accelerator.process_index}.pt"
    if rng_path.is_file():  # a different world size has no per-rank state for new ranks: data/noise don't need it
        _set_rng_state(torch.load(rng_path, weights_only=False))
    return state


# -- metrics ---------------------------------------------------------------------------------------

class MetricLog:
    def __init__(self, out: Path, resume_step: int, tensorboard: bool):
        self.path = out / "metrics.csv"
        rows = []
        if self.path.is_file():  # drop rows past the resumed step (they were written after that checkpoint)
            with open(self.path, newline="", encoding="utf-8") as f:
                rows = [r for r in csv.DictReader(f) if int(float(r["step"])) <= resume_step]
        with open(self.path, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, CSV_FIELDS)
            w.writeheader()
            w.writerows(rows)
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)
            except Exception as exc:  # tensorboard missing: CSV + PNG still work
                log.warning("TensorBoard logging off (%s)", exc)

    def write(self, row: dict):
        with open(self.path, "a", newline="", encoding="utf-8") as f:
            csv.DictWriter(f, CSV_FIELDS).writerow({k: row.get(k, "") for k in CSV_FIELDS})
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
    model.train(was)
    return {k: v / n for k, v in totals.items()} if n else {}


# -- the loop --------------------------------------------------------------------------------------

def set_deterministic(seed: int):
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    if torch.backends.cudnn.is_available():
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


def run_train(cfg: TrainConfig, accelerator=None) -> dict:
    """Train; returns {"step", "final_checkpoint", "val": last eval metrics, "out"}."""
    from accelerate import Accelerator

    out = Path(cfg.out)
    if accelerator is None:
        accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=cfg.cpu)
    if cfg.deterministic:
        set_deterministic(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed % (2**32))
    torch.manual_seed(cfg.seed + accelerator.process_index)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(asdict(cfg), out / "train_config.json")
    accelerator.wait_for_everyone()

    store = FeatureStore(cfg.data, verify=cfg.verify_shards, cache_shards=max(2, cfg.shuffle_shards + 1))
    if cfg.val_data:
        train_split = Split.make(store, 0.0, want_val=False)
        val_store = FeatureStore(cfg.val_data, verify=cfg.verify_shards)
        val_split = Split.make(val_store, 0.0, want_val=False)
    else:
        train_split = Split.make(store, cfg.val_fraction, want_val=False)
        val_split = Split.make(FeatureStore(cfg.data, verify=cfg.verify_shards), cfg.val_fraction, want_val=True)

    model = init_model(cfg)
    if model.config.embedding_dim != store.embed_dim:
        raise ValueError(f"The prior's embedding_dim is {model.config.embedding_dim} but the features are {store.embed_dim}-d "
                         f"(CLIP {store.index.get('clip')}). Use a matching --model / --init-from.")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                                  weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))  # stepped by us once per step, not prepared
    model, optimizer = accelerator.prepare(model, optimizer)

    step = 0
    resume_from = None
    if cfg.resume not in ("none", "", None):
        if cfg.resume == "auto":
            found = checkpoint_dirs(out)
            resume_from = found[-1] if found else None
        else:
            resume_from = Path(cfg.resume)
    if resume_from is not None:
        state = load_checkpoint(resume_from, accelerator, model, optimizer, scheduler)
        step = int(state["step"])
        log.info("resumed from %s at step %d", resume_from, step)
    if accelerator.is_main_process:
        for stale in (out / "checkpoints").glob("*.tmp") if (out / "checkpoints").is_dir() else []:
            shutil.rmtree(stale, ignore_errors=True)  # a checkpoint cut off mid-write

    stream = TrainStream(train_split, cfg.seed, cfg.batch_size, accelerator.process_index, accelerator.num_processes,
                         cfg.edge_drop, cfg.shuffle_shards, cfg.prefetch)
    metrics = MetricLog(out, step, cfg.tensorboard) if accelerator.is_main_process else None
    device = accelerator.device
    accum = cfg.grad_accum
    last_val: dict = {}
    t0, seen = time.time(), 0
    run_sum: dict[str, float] = {}
    run_n = 0
    if accelerator.is_main_process:
        log.info("training %.1fM params on %d examples (%d held out), global batch %d×%d, %d steps/epoch, %d processes",
                 accelerator.unwrap_model(model).num_parameters / 1e6, train_split.size, val_split.size, cfg.batch_size,
                 accum, stream.per_epoch // accum, accelerator.num_processes)

    micro_iter = stream.iterate(step * accum, cfg.max_steps * accum)
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
                    try:
                        from .plot import plot_curves

                        plot_curves(metrics.path, out / "curves.png")
                    except Exception as exc:  # a plot must never stop training
                        log.warning("could not draw curves.png: %s", exc)
                accelerator.wait_for_everyone()
            if step % cfg.save_every == 0 or step == cfg.max_steps:
                save_checkpoint(accelerator, out, step, model, optimizer, scheduler, cfg,
                                {"epoch": epoch, "micro_step": step * accum, "val": last_val,
                                 "interleave_failures": stream.assembler.interleave_failures})
            if cfg.crash_at_step is not None and step == cfg.crash_at_step:
                raise SimulatedCrash(f"crash_at_step={step}")
    finally:
        micro_iter.close()
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
    found = checkpoint_dirs(path)
    if not found:
        raise FileNotFoundError(f"No checkpoint in {path} (expected {path}/checkpoints/step-N/ or a step-N/ folder).")
    return found[-1]


def model_from_checkpoint(path: str | Path) -> LambdaEclipsePrior:
    from safetensors.torch import load_file

    ckpt = resolve_checkpoint(path)
    model = LambdaEclipsePrior(PriorConfig.from_dict(json.loads((ckpt / "config.json").read_text())))
    model.load_state_dict(load_file(str(ckpt / "model.safetensors")))
    return model.eval()


def export(checkpoint: str | Path, out: str | Path, single_file: bool = False, dtype: str = "fp32") -> Path:
    """Checkpoint → exactly what core.prior.load_prior (the Load Prior node) reads."""
    return save_prior(model_from_checkpoint(checkpoint), out, single_file=single_file, dtype=dtype)


def run_eval(checkpoint_or_prior: str | Path, data: str, cfg: TrainConfig, all_data: bool = False) -> dict:
    """Metrics of a checkpoint, run dir or exported prior on a feature folder (its held-out split, or all of it)."""
    path = Path(checkpoint_or_prior)
    try:
        model = model_from_checkpoint(path)
    except FileNotFoundError:
        model = load_prior(path)
    store = FeatureStore(data, verify=cfg.verify_shards)
    split = Split.make(store, 0.0 if all_data else cfg.val_fraction, want_val=not all_data)
    return evaluate(model, split, cfg, torch.device("cpu"))
