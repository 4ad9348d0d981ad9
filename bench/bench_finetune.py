"""Decoder fine-tuning (trainer finetune-decoder): time per optimizer step and peak memory, per setting.

The published Kandinsky 2.2 decoder UNet (the config shipped in core/configs/, 1.25B parameters) with random
weights, set up by the trainer's own code (`prepare_unet`: LoRA via peft or the whole UNet, gradient
checkpointing, frozen base in the autocast dtype) and stepped by the trainer's own `training_step` under
accelerate (AdamW, clipping). Latents and image embeddings are random tensors of the real shapes: the MoVQ and
CLIP encodings happen once before training and are not part of a step.

Each setting runs in its own process, so that its peak memory is its own: on CUDA
`torch.cuda.max_memory_allocated` (and reserved), on the CPU the process's peak RSS (ru_maxrss) next to the RSS
after the model is built. One warm-up step, then the median of `--steps` timed steps.

    python bench/bench_finetune.py                                   # CPU: 128 px, LoRA r4/r16, ± checkpointing
    python bench/bench_finetune.py --device cuda --size 512 --mixed-precision bf16 --settings lora4,lora16,full,lora4-gc,lora16-gc,full-gc
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

SETTINGS = {
    "lora4": dict(rank=4, full=False, gc=False), "lora4-gc": dict(rank=4, full=False, gc=True),
    "lora16": dict(rank=16, full=False, gc=False), "lora16-gc": dict(rank=16, full=False, gc=True),
    "full": dict(rank=4, full=True, gc=False), "full-gc": dict(rank=4, full=True, gc=True),
}
CPU_DEFAULT = "lora4,lora4-gc,lora16,lora16-gc"


def _rss_mb() -> float:
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_one(name: str, args) -> dict:
    """One setting, in this process."""
    import torch
    from accelerate import Accelerator
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from lambda_eclipse.core.decoder_files import CONFIG_DIR
    from lambda_eclipse.trainer.finetune_decoder import FinetuneConfig, half_dtype, prepare_unet, training_step
    from _machine import machine_info, sync

    if args.threads:
        torch.set_num_threads(args.threads)
    spec = SETTINGS[name]
    accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=args.device == "cpu")
    device = accelerator.device
    torch.manual_seed(0)
    unet_config = json.loads((CONFIG_DIR / "unet_config.json").read_text())
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(unet_config)
    scheduler = DDPMScheduler.from_config(json.loads((CONFIG_DIR / "scheduler_config.json").read_text()))
    cfg = FinetuneConfig(out="-", images=["-"], decoder="-", clip="-", rank=spec["rank"], full=spec["full"],
                         gradient_checkpointing=spec["gc"], batch_size=args.batch, resolution=args.size,
                         mixed_precision=args.mixed_precision).check()
    _, params, _ = prepare_unet(unet, cfg, half_dtype(accelerator))
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the fp32 UNet as built is gone: its cached blocks must not count
        torch.cuda.reset_peak_memory_stats(device)
    rss_built = _rss_mb()
    weights_mb = sum(p.numel() * p.element_size() for p in unet.parameters()) / 2**20

    g = torch.Generator().manual_seed(0)
    r, b = args.size // 8, args.batch
    dim = unet_config["encoder_hid_dim"]

    def step():
        latents = torch.randn(b, 4, r, r, generator=g)
        cond = torch.randn(b, dim, generator=g)
        t = torch.randint(0, 1000, (b,), generator=g)
        noise = torch.randn(b, 4, r, r, generator=g)
        loss = training_step(unet, accelerator, optimizer, params, scheduler, latents, cond, t, noise, cfg.max_grad_norm)
        sync(device)
        return loss

    step()  # warm-up (allocations, kernels, AdamW state)
    times, losses = [], []
    for _ in range(args.steps):
        start = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - start)
    out = {
        "setting": name, "device": str(device), "size": args.size, "batch": b, "mixed_precision": args.mixed_precision,
        "trainable_params": sum(p.numel() for p in params), "unet_params": sum(p.numel() for p in unet.parameters()),
        "weights_mb": round(weights_mb), "s_per_step_median": round(statistics.median(times), 3),
        "s_per_step_min": round(min(times), 3), "steps_timed": len(times), "loss_finite": all(x == x for x in losses),
    }
    if device.type == "cuda":
        out["peak_allocated_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20)
        out["peak_reserved_mb"] = round(torch.cuda.max_memory_reserved(device) / 2**20)
        out["minutes_for_500_steps"] = round(statistics.median(times) * 500 / 60, 1)
    else:
        out["rss_after_build_mb"] = round(rss_built)
        out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    out["machine"] = machine_info(device)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--size", type=int, default=None, help="photo side in px (default 128 on CPU, 512 on CUDA)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per setting (after one warm-up)")
    parser.add_argument("--settings", default=None, help=f"comma-separated of {', '.join(SETTINGS)} "
                        f"(default: {CPU_DEFAULT} on CPU, all on CUDA)")
    parser.add_argument("--mixed-precision", default=None, choices=["no", "fp16", "bf16"],
                        help="default: no on CPU, bf16 on CUDA")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run this setting in this process
    args = parser.parse_args(argv)
    args.size = args.size or (512 if args.device == "cuda" else 128)
    args.mixed_precision = args.mixed_precision or ("bf16" if args.device == "cuda" else "no")
    if args.size % 64:
        parser.error("--size must be a multiple of 64")
    if args.one:
        print(json.dumps(run_one(args.one, args)))
        return 0
    names = (args.settings or (CPU_DEFAULT if args.device == "cpu" else ",".join(SETTINGS))).split(",")
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        parser.error(f"unknown settings {unknown}; choose from {', '.join(SETTINGS)}")
    results = []
    for name in names:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--one", name, "--device", args.device, "--size",
               str(args.size), "--batch", str(args.batch), "--steps", str(args.steps), "--mixed-precision",
               args.mixed_precision] + (["--threads", str(args.threads)] if args.threads else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if proc.returncode != 0:
            tail = proc.stderr.strip().splitlines()[-3:]
            result = {"setting": name, "error": " | ".join(tail) or f"exit {proc.returncode} (killed: out of memory?)"}
        else:
            result = json.loads(proc.stdout.strip().splitlines()[-1])
        print(json.dumps(result), flush=True)
        results.append(result)
    ok = [r for r in results if "error" not in r]
    if ok:
        base = ok[0]
        mem = "peak_allocated_mb" if "peak_allocated_mb" in base else "peak_rss_mb"
        print(f"\n| setting | trainable | s/step | × {base['setting']} | {mem} |", file=sys.stderr)
        print("|---|---:|---:|---:|---:|", file=sys.stderr)
        for r in ok:
            print(f"| {r['setting']} | {r['trainable_params']:,} | {r['s_per_step_median']:.2f} | "
                  f"{r['s_per_step_median'] / base['s_per_step_median']:.2f} | {r[mem]:,} |", file=sys.stderr)
    return 0 if len(ok) == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
