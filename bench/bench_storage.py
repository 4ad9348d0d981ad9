"""Bytes per stored example at the paper's sizes vs a padded 77×1280 fp16 token tensor.

Writes real shards with the trainer's own writer (trainer.store.write_shard) from random features of
paper size: E=1280, captions of 12–20 real tokens (SOT..EOT), 1–4 subjects drawn with the paper's
subject-count distribution (Appendix B: 1,479,785 / 432,831 / 65,597 / 11,910). Prints JSON.

    python bench/bench_storage.py [--examples 2048] [--shard-size 1024]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import tempfile
from pathlib import Path

import torch

from lambda_eclipse.trainer.store import FeatureStore, write_index, write_shard

PAPER_SUBJECTS = [1_479_785, 432_831, 65_597, 11_910]


def fake_example(i: int, E: int, rng: random.Random) -> dict:
    t = rng.randint(12, 20)
    s = rng.choices([1, 2, 3, 4], weights=PAPER_SUBJECTS)[0]
    words = [f"word{k}" for k in range(s)]
    caption = "a photo of " + " and ".join(words) + " " + " ".join("x" for _ in range(max(0, t - 2 - 3 - 2 * s)))
    return {"key": f"laion:{i:09d}", "caption": caption[:160], "words": words, "word_ids": [[40000 + k] for k in range(s)],
            "image": torch.randn(E), "pooled": torch.randn(E), "control": torch.randn(E),
            "tokens": torch.randn(t, E), "ids": torch.randint(0, 49408, (t,)), "subj": torch.randn(s, E)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=2048)
    ap.add_argument("--shard-size", type=int, default=1024)
    ap.add_argument("--embed-dim", type=int, default=1280)
    args = ap.parse_args()
    rng = random.Random(0)
    torch.manual_seed(0)
    E = args.embed_dim
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        sides, toks, subs = [], 0, 0
        for k, start in enumerate(range(0, args.examples, args.shard_size)):
            exs = [fake_example(i, E, rng) for i in range(start, min(args.examples, start + args.shard_size))]
            toks += sum(e["tokens"].shape[0] for e in exs)
            subs += sum(e["subj"].shape[0] for e in exs)
            sides.append(write_shard(folder, k, exs, {}, len(exs)))
        from lambda_eclipse.core.loading import save_file_atomic

        save_file_atomic({"blank": torch.zeros(E, dtype=torch.float16)}, folder / "meta.safetensors")
        index = write_index(folder, {"embed_dim": E, "context_length": 77}, sides)
        FeatureStore(folder).shard(0)  # readable and verified
        total = index["bytes"] + (folder / "index.json").stat().st_size + (folder / "meta.safetensors").stat().st_size
    n = args.examples
    padded_tokens = 77 * E * 2
    padded_example = padded_tokens + 3 * E * 2 + 4 * E * 2  # padded tokens + 3 vectors + 4 subject slots
    result = {
        "bench": "storage", "embed_dim": E, "examples": n, "shards": len(sides),
        "mean_real_tokens": toks / n, "mean_subjects": subs / n,
        "bytes_per_example": total / n, "kb_per_example": total / n / 1000,
        "padded_77xE_fp16_tokens_kb": padded_tokens / 1000,
        "padded_full_example_kb": padded_example / 1000,
        "ratio_vs_padded_tokens": (total / n) / padded_tokens,
        "goal_kb": 60, "meets_goal": total / n <= 60_000,
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
