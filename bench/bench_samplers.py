"""Benchmark: time per image of every `core.decoder` sampler at its recommended steps, as a ratio to DDPM-50.

The published UNet/MoVQ configs (core/configs/kandinsky-2-2-decoder) with random weights: speed does not
depend on the values. One image per call, guidance 4.0 (CFG, UNet batch 2). One warm-up call, then
`--repeats` rounds; each round runs every sampler once, in an order rotated every round so that drifting
machine load falls on all alike. Prints one JSON line. Not a test.

    python bench/bench_samplers.py                                   # CPU, 64 px, full recommended steps
    python bench/bench_samplers.py --steps-scale 0.2 --repeats 1     # CPU quick run: 1/5 of every step count
    python bench/bench_samplers.py --device cuda --dtype fp16 --size 512
    python bench/bench_samplers.py --tiny                            # tiny components: scheduler overhead only
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from _machine import machine_info, sync

try:
    from lambda_eclipse.core.decoder import RECOMMENDED_STEPS, SAMPLERS, KandinskyDecoder, decode
    from lambda_eclipse.core.decoder_files import shipped_config
    from lambda_eclipse.core.loading import resolve_dtype
    from lambda_eclipse.core.tiny import make_tiny_decoder_components
except ImportError as exc:  # pragma: no cover
    sys.exit(f"{exc}: install the project first (pip install -e .).")

BASELINE = ("ddpm", 50)


def build(tiny: bool, device: torch.device, dtype: torch.dtype) -> KandinskyDecoder:
    from diffusers import UNet2DConditionModel, VQModel

    if tiny:
        unet, movq, scheduler = make_tiny_decoder_components(seed=0)
        scheduler_config = {"_class_name": type(scheduler).__name__, **dict(scheduler.config)}
    else:
        torch.manual_seed(0)
        with torch.device(device):
            unet = UNet2DConditionModel.from_config(shipped_config("unet")).eval()
            movq = VQModel.from_config(shipped_config("movq")).eval()
        scheduler_config = shipped_config("scheduler")
    decoder = KandinskyDecoder(unet, movq, scheduler_config, "tiny (random)" if tiny else "published configs (random)")
    return decoder.to(device=device, dtype=dtype)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", help="fp32, fp16 or bf16")
    parser.add_argument("--size", type=int, default=None, help="width = height in px (default 64 on CPU, 512 on CUDA)")
    parser.add_argument("--steps-scale", type=float, default=1.0,
                        help="multiply every step count (recommended steps and the DDPM-50 baseline) by this, for quick CPU runs")
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (each: one call of every sampler)")
    parser.add_argument("--samplers", default=",".join(SAMPLERS), help="comma-separated subset of " + ",".join(SAMPLERS))
    parser.add_argument("--tiny", action="store_true", help="tiny components instead of the published sizes")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), resolve_dtype(args.dtype)
    size = args.size or (512 if device.type == "cuda" else 64)
    names = [s.strip() for s in args.samplers.split(",") if s.strip()]
    unknown = sorted(set(names) - set(SAMPLERS))
    if unknown:
        parser.error(f"unknown sampler(s) {unknown}; choose from {', '.join(SAMPLERS)}")

    def scaled(steps: int) -> int:
        return max(2, round(steps * args.steps_scale))

    runs = {"ddpm-50 (baseline)": (BASELINE[0], scaled(BASELINE[1]))}
    for name in names:
        label = f"{name}-{RECOMMENDED_STEPS[name]}"
        if (name, RECOMMENDED_STEPS[name]) != BASELINE:
            runs[label] = (name, scaled(RECOMMENDED_STEPS[name]))

    t0 = time.perf_counter()
    decoder = build(args.tiny, device, dtype)
    build_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(0)
    image_embeds = torch.randn(1, decoder.embedding_dim, generator=g)
    negative = torch.randn(1, decoder.embedding_dim, generator=g)

    def run(sampler: str, steps: int):
        sync(device)
        start = time.perf_counter()
        out = decode(decoder, image_embeds, negative, width=size, height=size, steps=steps, guidance=args.guidance,
                     seeds=1, sampler=sampler)
        sync(device)
        return time.perf_counter() - start, out

    run("ddpm", 2)  # warm-up
    times: dict[str, list[float]] = {label: [] for label in runs}
    finite = {}
    labels = list(runs)
    for r in range(args.repeats):
        order = labels[r % len(labels):] + labels[: r % len(labels)]
        for label in order:
            seconds, out = run(*runs[label])
            times[label].append(seconds)
            finite[label] = bool(torch.isfinite(out).all())

    base = statistics.median(times["ddpm-50 (baseline)"])
    results = {}
    for label, (sampler, steps) in runs.items():
        median = statistics.median(times[label])
        results[label] = {
            "sampler": sampler, "steps_run": steps, "s_per_image_median": round(median, 3),
            "s_per_image_min": round(min(times[label]), 3), "ms_per_step": round(1000 * median / steps, 1),
            "ratio_to_ddpm50": round(median / base, 3), "finite": finite[label],
        }
    result = {
        "bench": "samplers",
        "components": "tiny" if args.tiny else "published configs (random weights)",
        "unet_params": sum(p.numel() for p in decoder.unet.parameters()),
        "device": str(device), "dtype": str(dtype).replace("torch.", ""), "size": size, "batch": 1,
        "guidance": args.guidance, "steps_scale": args.steps_scale, "repeats": args.repeats,
        "results": results, "build_s": round(build_s, 1), "machine": machine_info(device),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
