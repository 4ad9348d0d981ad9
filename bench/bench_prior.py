"""Benchmark: one λ-ECLIPSE prior forward vs the Kandinsky 2.2 diffusion prior's 25-step guided loop.

Both models have their published sizes and random weights (speed does not depend on the values), run
on the same device in the same process. Prints one JSON line. Not a test.

    python bench/bench_prior.py                       # CPU, fp32
    python bench/bench_prior.py --device cuda --dtype fp16
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
    from lambda_eclipse.core.loading import resolve_dtype
    from lambda_eclipse.core.prior import LambdaEclipsePrior, PriorConfig
except ImportError as exc:  # pragma: no cover
    sys.exit(f"{exc}: install the project first (pip install -e .).")

# kandinsky-community/kandinsky-2-2-prior, prior/config.json (diffusers PriorTransformer).
KANDINSKY22_PRIOR_CONFIG = dict(
    num_attention_heads=32, attention_head_dim=64, num_layers=20, embedding_dim=1280, num_embeddings=77,
    additional_embeddings=4, dropout=0.0, time_embed_act_fn="silu", norm_in_type=None,
    embedding_proj_norm_type=None, encoder_hid_proj_type="linear", added_emb_type="prd",
    time_embed_dim=None, embedding_proj_dim=None, clip_embed_dim=None,
)
# kandinsky-community/kandinsky-2-2-prior, scheduler/scheduler_config.json.
KANDINSKY22_PRIOR_SCHEDULER = dict(
    num_train_timesteps=1000, clip_sample=True, clip_sample_range=10.0, prediction_type="sample",
    variance_type="fixed_small_log",
)


def timed(fn, device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return (time.perf_counter() - start) * 1000.0


def params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", help="fp32, fp16 or bf16")
    parser.add_argument("--repeats", type=int, default=20, help="timed λ-ECLIPSE prior calls (median reported)")
    parser.add_argument("--kandinsky-repeats", type=int, default=3, help="timed 25-step Kandinsky prior calls")
    parser.add_argument("--steps", type=int, default=25, help="Kandinsky prior steps (pipeline default 25)")
    parser.add_argument("--guidance", type=float, default=4.0, help="Kandinsky prior guidance (pipeline default 4.0)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    args = parser.parse_args(argv)

    from diffusers import PriorTransformer, UnCLIPScheduler

    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), resolve_dtype(args.dtype)
    torch.manual_seed(0)

    with torch.device(device):
        ours = LambdaEclipsePrior(PriorConfig()).eval()
        theirs = PriorTransformer(**KANDINSKY22_PRIOR_CONFIG).eval()
    if dtype != torch.float32:
        ours.to(dtype)
        theirs.to(dtype)
    E, T = 1280, 77
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    mask = torch.zeros(1, T, dtype=torch.bool)
    mask[:, :12] = True  # a 10-word prompt with SOT/EOT
    mask = mask.to(device)

    # λ-ECLIPSE: one forward, batch 1, no guidance, no scheduler (as the official pipeline).
    noise, text_emb, tokens, control = rand(1, E), rand(1, E), rand(1, T, E), rand(1, E)

    def run_ours():
        with torch.inference_mode():
            return ours.predict(noise, text_emb, tokens, mask, control)

    # Kandinsky 2.2 prior: KandinskyV22PriorPipeline's loop without its text encoder (both methods need
    # one), i.e. [negative, positive] text features, latents doubled, guidance, UnCLIPScheduler.
    prompt_embeds, hidden, cfg_mask = rand(2, E), rand(2, T, E), mask.repeat(2, 1)

    def run_kandinsky(steps=args.steps):
        scheduler = UnCLIPScheduler(**KANDINSKY22_PRIOR_SCHEDULER)
        gen = torch.Generator().manual_seed(0)
        with torch.inference_mode():
            scheduler.set_timesteps(steps, device=device)
            timesteps = scheduler.timesteps
            latents = torch.randn(1, E, generator=gen).to(device=device, dtype=dtype) * scheduler.init_noise_sigma
            for i, t in enumerate(timesteps):
                pred = theirs(
                    torch.cat([latents] * 2), timestep=t, proj_embedding=prompt_embeds,
                    encoder_hidden_states=hidden, attention_mask=cfg_mask,
                ).predicted_image_embedding
                uncond, text = pred.chunk(2)
                pred = uncond + args.guidance * (text - uncond)
                prev = None if i + 1 == timesteps.shape[0] else timesteps[i + 1]
                latents = scheduler.step(pred, timestep=t, sample=latents, generator=gen, prev_timestep=prev).prev_sample
            return theirs.post_process_latents(latents)

    for _ in range(3):
        timed(run_ours, device)
    ours_ms = [timed(run_ours, device) for _ in range(args.repeats)]
    timed(lambda: run_kandinsky(steps=2), device)  # warm-up: same shapes, fewer steps
    theirs_ms = [timed(run_kandinsky, device) for _ in range(args.kandinsky_repeats)]
    ours_med, theirs_med = statistics.median(ours_ms), statistics.median(theirs_ms)

    result = {
        "bench": "prior",
        "device": str(device), "dtype": str(dtype).replace("torch.", ""),
        "lambda_eclipse_prior": {"params": params(ours), "calls": "1 forward, batch 1", "ms_median": round(ours_med, 2),
                                 "ms_min": round(min(ours_ms), 2), "repeats": len(ours_ms)},
        "kandinsky22_prior": {"params": params(theirs), "calls": f"{args.steps} steps x CFG batch 2, UnCLIPScheduler",
                              "ms_median": round(theirs_med, 1), "ms_min": round(min(theirs_ms), 1),
                              "ms_per_step": round(theirs_med / args.steps, 1), "repeats": len(theirs_ms)},
        "ratio_kandinsky_over_ours": round(theirs_med / ours_med, 1),
        "machine": machine_info(device),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
