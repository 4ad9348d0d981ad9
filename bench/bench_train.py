"""Training throughput: real data path (shards on disk → loader → interleave → step) vs in-memory random tensors.

Same model, optimizer, loss and step code (trainer.losses.prior_loss, AdamW, clipping). Paper-size prior
(1280-d, 10 layers, 34.8M) by default. On CPU the figures are CPU figures; the GPU-hours estimate is only
printed when the step was measured on a GPU.

    python bench/bench_train.py [--batch 32] [--steps 6] [--warmup 2] [--examples 512] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import tempfile
import time
from pathlib import Path

import torch

from lambda_eclipse.core.loading import save_file_atomic
from lambda_eclipse.core.prior import LambdaEclipsePrior, PriorConfig
from lambda_eclipse.trainer.batches import Split, TrainStream
from lambda_eclipse.trainer.losses import prior_loss
from lambda_eclipse.trainer.store import FeatureStore, write_index, write_shard


def make_store(folder: Path, n: int, E: int, shard_size: int = 256) -> FeatureStore:
    rng = random.Random(0)
    sides = []
    for k, start in enumerate(range(0, n, shard_size)):
        exs = []
        for i in range(start, min(n, start + shard_size)):
            t = rng.randint(12, 20)
            s = rng.choices([1, 2, 3, 4], weights=[74, 22, 3, 1])[0]
            ids = [49406] + [1000 + 10 * j for j in range(t - 2)] + [49407]
            words = [f"w{j}" for j in range(s)]
            exs.append({"key": str(i), "caption": " ".join(words), "words": words, "word_ids": [[ids[1 + j]] for j in range(s)],
                        "image": torch.randn(E), "pooled": torch.randn(E), "control": torch.randn(E),
                        "tokens": torch.randn(t, E), "ids": torch.tensor(ids), "subj": torch.randn(s, E)})
        sides.append(write_shard(folder, k, exs, {}, len(exs)))
    save_file_atomic({"blank": torch.zeros(E, dtype=torch.float16)}, folder / "meta.safetensors")
    write_index(folder, {"embed_dim": E, "context_length": 77}, sides)
    return FeatureStore(folder)


def step_fn(model, opt, device):
    def step(noise, pooled, tokens, mask, control, image, pooled_global, offset):
        pred = model(noise.to(device), proj_embedding=pooled.to(device), encoder_hidden_states=tokens.to(device),
                     attention_mask=mask.to(device), control_embedding=control.to(device)).predicted_image_embedding
        loss = prior_loss(pred, image.to(device), pooled_global.to(device), offset)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return step


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--examples", type=int, default=512)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--prefetch", type=int, default=2)
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    cfg = PriorConfig()
    E, B = cfg.embedding_dim, args.batch
    model = LambdaEclipsePrior(cfg).to(device).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-5)
    step = step_fn(model, opt, device)
    total = args.warmup + args.steps

    # in-memory random tensors (no data path at all)
    mem = [(torch.randn(B, E), torch.randn(B, E), torch.randn(B, 77, E), torch.arange(77)[None].expand(B, -1) < 16,
            torch.randn(B, E), torch.randn(B, E)) for _ in range(2)]
    times = []
    for k in range(total):
        noise, pooled, tokens, mask, control, image = mem[k % 2]
        t0 = time.perf_counter()
        step(noise, pooled, tokens, mask, control, image, pooled, 0)
        times.append(time.perf_counter() - t0)
    mem_step = sum(times[args.warmup:]) / args.steps

    with tempfile.TemporaryDirectory() as tmp:
        store = make_store(Path(tmp), max(args.examples, B * 2), E)
        stream = TrainStream(Split.make(store, 0.0, False), 0, B, 0, 1, 0.01, prefetch=args.prefetch)
        it = stream.iterate(0, total)
        loader_only = []
        times = []
        t_prev = time.perf_counter()
        for k in range(total):
            t_a = time.perf_counter()
            _, b = next(it)
            t_b = time.perf_counter()
            step(b.noise, b.pooled, b.tokens, b.mask, b.control, b.image, b.pooled_global, b.row_offset)
            t_c = time.perf_counter()
            times.append(t_c - t_prev)
            loader_only.append(t_b - t_a)
            t_prev = t_c
        it.close()
        data_step = sum(times[args.warmup:]) / args.steps
        wait = sum(loader_only[args.warmup:]) / args.steps
        # the loader alone, unoverlapped (cost of assembling one batch)
        s2 = TrainStream(Split.make(store, 0.0, False), 0, B, 0, 1, 0.01, prefetch=0)
        t0 = time.perf_counter()
        for m in range(args.steps):
            s2.make(m)
        assemble = (time.perf_counter() - t0) / args.steps

    result = {
        "bench": "train", "device": str(device), "model_params_M": round(model.num_parameters / 1e6, 2), "batch": B,
        "steps_timed": args.steps,
        "in_memory": {"step_s": mem_step, "samples_per_s": B / mem_step},
        "data_path": {"step_s": data_step, "samples_per_s": B / data_step, "loader_wait_s": wait,
                      "batch_assembly_s_unoverlapped": assemble, "prefetch": args.prefetch},
        "data_path_overhead": data_step / mem_step - 1.0,
        # robust to a noisy/shared machine: what the loader costs relative to one step, overlapped or not
        "loader_wait_fraction_of_step": wait / data_step,
        "assembly_fraction_of_step_if_not_overlapped": assemble / min(mem_step, data_step),
        "goal_overhead": 0.10,
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
                    "torch": torch.__version__, "platform": platform.platform(), "processor": platform.processor(),
                    "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None},
    }
    if device.type == "cuda":
        # 100k iterations × global batch 1024, from the measured per-sample time of this GPU
        result["estimate_gpu_hours_100k_x_1024"] = data_step / B * 1024 * 100_000 / 3600
    else:
        result["note"] = "measured on CPU: no GPU-hour estimate (the paper reports 74 A100-hours for ~100k × 1024)"
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
