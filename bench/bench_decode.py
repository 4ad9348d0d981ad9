"""Benchmark: `core.decoder.decode` vs diffusers' `KandinskyV22Pipeline.__call__` on the same components.

Same embeddings, seeds, size and steps; calls interleaved (the order alternates each round) so drift in
machine load hits both alike; medians and the ratio ours/diffusers (goal ≤ 1.00). Every round also
checks that both give the same pixels. Prints one JSON line. Not a test.

    python bench/bench_decode.py                                   # tiny components, CPU, seconds
    python bench/bench_decode.py --real-config --size 64 --steps 2 --repeats 3   # published sizes, random weights
    python bench/bench_decode.py --real-config --device cuda --dtype fp16 --size 512 --steps 50
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
    from lambda_eclipse.core.decoder import KandinskyDecoder, decode
    from lambda_eclipse.core.loading import resolve_dtype
    from lambda_eclipse.core.tiny import DECODER_SCHEDULER_CONFIG, make_tiny_decoder_components
except ImportError as exc:  # pragma: no cover
    sys.exit(f"{exc}: install the project first (pip install -e .).")

# kandinsky-community/kandinsky-2-2-decoder unet/config.json (1,253,057,288 parameters).
REAL_UNET_CONFIG = dict(
    act_fn="silu", addition_embed_type="image", addition_embed_type_num_heads=64, attention_head_dim=64,
    block_out_channels=[384, 768, 1152, 1536], center_input_sample=False, class_embed_type=None,
    class_embeddings_concat=False, conv_in_kernel=3, conv_out_kernel=3, cross_attention_dim=768,
    cross_attention_norm=None,
    down_block_types=["ResnetDownsampleBlock2D"] + ["SimpleCrossAttnDownBlock2D"] * 3,
    downsample_padding=1, dual_cross_attention=False, encoder_hid_dim=1280, encoder_hid_dim_type="image_proj",
    flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=3, mid_block_only_cross_attention=None,
    mid_block_scale_factor=1, mid_block_type="UNetMidBlock2DSimpleCrossAttn", norm_eps=1e-5, norm_num_groups=32,
    num_class_embeds=None, only_cross_attention=False, out_channels=8, projection_class_embeddings_input_dim=None,
    resnet_out_scale_factor=1.0, resnet_skip_time_act=False, resnet_time_scale_shift="scale_shift", sample_size=64,
    time_cond_proj_dim=None, time_embedding_act_fn=None, time_embedding_dim=None, time_embedding_type="positional",
    timestep_post_act=None, up_block_types=["SimpleCrossAttnUpBlock2D"] * 3 + ["ResnetUpsampleBlock2D"],
    upcast_attention=False, use_linear_projection=False,
)
# kandinsky-community/kandinsky-2-2-decoder movq/config.json (67,832,495 parameters).
REAL_MOVQ_CONFIG = dict(
    act_fn="silu", block_out_channels=[128, 256, 256, 512],
    down_block_types=["DownEncoderBlock2D"] * 3 + ["AttnDownEncoderBlock2D"], in_channels=3, latent_channels=4,
    layers_per_block=2, norm_num_groups=32, norm_type="spatial", num_vq_embeddings=16384, out_channels=3,
    sample_size=32, scaling_factor=0.18215, up_block_types=["AttnUpDecoderBlock2D"] + ["UpDecoderBlock2D"] * 3,
    vq_embed_dim=4,
)


def build(real: bool, device: torch.device, dtype: torch.dtype) -> KandinskyDecoder:
    from diffusers import DDPMScheduler, UNet2DConditionModel, VQModel

    if real:
        torch.manual_seed(0)
        with torch.device(device):
            unet = UNet2DConditionModel(**REAL_UNET_CONFIG).eval()
            movq = VQModel(**REAL_MOVQ_CONFIG).eval()
        scheduler = DDPMScheduler(**DECODER_SCHEDULER_CONFIG)
    else:
        unet, movq, scheduler = make_tiny_decoder_components(seed=0)
    config = {"_class_name": type(scheduler).__name__, **dict(scheduler.config)}
    decoder = KandinskyDecoder(unet, movq, config, "real-config (random)" if real else "tiny (random)")
    return decoder.to(device=device, dtype=dtype)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", help="fp32, fp16 or bf16")
    parser.add_argument("--real-config", action="store_true",
                        help="published UNet (1.25B) + MoVQ sizes with random weights (slow on CPU: keep size/steps small)")
    parser.add_argument("--size", type=int, default=None, help="width = height in px (default 64 tiny/real on CPU, 512 on CUDA)")
    parser.add_argument("--steps", type=int, default=None, help="decoder steps (default 10 tiny, 2 real on CPU, 50 on CUDA)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds (each: one call of each)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)

    from diffusers import KandinskyV22Pipeline

    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), resolve_dtype(args.dtype)
    gpu = device.type == "cuda"
    size = args.size or (512 if gpu else 64)
    steps = args.steps or (50 if gpu else (2 if args.real_config else 10))

    t0 = time.perf_counter()
    decoder = build(args.real_config, device, dtype)
    build_s = time.perf_counter() - t0
    pipe = KandinskyV22Pipeline(unet=decoder.unet, scheduler=decoder.new_scheduler(), movq=decoder.movq)
    pipe.set_progress_bar_config(disable=True)

    g = torch.Generator().manual_seed(0)
    dim = decoder.embedding_dim
    image_embeds = torch.randn(args.batch, dim, generator=g).to(device=device, dtype=dtype)
    negative = torch.randn(args.batch, dim, generator=g).to(device=device, dtype=dtype)
    seeds = list(range(100, 100 + args.batch))

    def run_ours():
        return decode(decoder, image_embeds, negative, width=size, height=size, steps=steps,
                      guidance=args.guidance, seeds=seeds)

    def run_diffusers():
        images = pipe(
            image_embeds=image_embeds, negative_image_embeds=negative, width=size, height=size,
            num_inference_steps=steps, guidance_scale=args.guidance,
            generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="np",
        ).images
        return torch.from_numpy(images)

    def timed(fn):
        sync(device)
        start = time.perf_counter()
        out = fn()
        sync(device)
        return (time.perf_counter() - start) * 1000.0, out

    run_ours(), run_diffusers()  # warm-up
    ours_ms, theirs_ms, equal = [], [], True
    for r in range(args.repeats):
        order = [("ours", run_ours), ("diffusers", run_diffusers)]
        if r % 2:
            order.reverse()
        outs = {}
        for name, fn in order:
            ms, outs[name] = timed(fn)
            (ours_ms if name == "ours" else theirs_ms).append(ms)
        # NaN == NaN here: random real-size weights can overflow, and then both must overflow alike.
        same = torch.equal(outs["ours"].nan_to_num(-1.0), outs["diffusers"].nan_to_num(-1.0))
        equal = equal and same
    if not equal:
        print("PIXELS DIFFER between decode() and KandinskyV22Pipeline", file=sys.stderr)

    ours_med, theirs_med = statistics.median(ours_ms), statistics.median(theirs_ms)
    result = {
        "bench": "decode",
        "components": "real-config (random weights)" if args.real_config else "tiny",
        "unet_params": sum(p.numel() for p in decoder.unet.parameters()),
        "movq_params": sum(p.numel() for p in decoder.movq.parameters()),
        "device": str(device), "dtype": str(dtype).replace("torch.", ""),
        "size": size, "steps": steps, "batch": args.batch, "guidance": args.guidance, "repeats": args.repeats,
        "ours_ms_median": round(ours_med, 2), "diffusers_ms_median": round(theirs_med, 2),
        "ours_ms_min": round(min(ours_ms), 2), "diffusers_ms_min": round(min(theirs_ms), 2),
        "ratio_ours_over_diffusers": round(ours_med / theirs_med, 3),
        # Median over rounds of (ours / diffusers) within the same round: the least drift-sensitive figure.
        "paired_ratio_median": round(statistics.median(o / d for o, d in zip(ours_ms, theirs_ms)), 3),
        "pixels_equal": equal, "build_s": round(build_s, 1),
        "machine": machine_info(device),
    }
    print(json.dumps(result))
    assert equal, "decode() and KandinskyV22Pipeline gave different pixels"
    return result


if __name__ == "__main__":
    main()
