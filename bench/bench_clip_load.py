"""Peak memory of loading a bigG tower from a transformers-key .safetensors (ComfyUI's clip_g / clip_vision_g).

Writes a random tower with the published bigG shapes (text: width 1280, 32 layers, 20 heads, 0.69B
parameters; vision: width 1664, 48 layers, 16 heads of 104, 1.84B parameters) as an fp16 .safetensors,
streamed tensor by tensor, into a temporary folder. Then, for each target dtype, a fresh Python process
loads it with `load_clip_towers` and reports its peak resident memory (VmHWM, reset with
/proc/self/clear_refs just before loading) minus its resident memory just before loading, divided by the
size of the weights in the target dtype (goal: ≤ 1.3). Two phases are reported: filling the model
(`fill`) and the whole load including the blank-image embedding computed at load (`total`, vision only).
Prints one JSON line per load.

    python bench/bench_clip_load.py                                  # text tower, fp16 and fp32 targets
    python bench/bench_clip_load.py --tower vision --dtype fp16      # 3.7 GB file, 3.7 GB of weights
    python bench/bench_clip_load.py --tower text --layers 4          # quicker: fewer layers
"""

from __future__ import annotations

import argparse
import json
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

BIGG = {
    "text": {"width": 1280, "layers": 32, "mlp": 5120, "vocab": 49408, "context": 77, "embed": 1280},
    "vision": {"width": 1664, "layers": 48, "mlp": 8192, "patch": 14, "grid": 16, "embed": 1280},
}


def tower_shapes(tower: str, layers: int) -> dict[str, tuple]:
    cfg = BIGG[tower]
    w, m = cfg["width"], cfg["mlp"]
    base = "text_model." if tower == "text" else "vision_model."
    out: dict[str, tuple] = {}
    if tower == "text":
        out[base + "embeddings.token_embedding.weight"] = (cfg["vocab"], w)
        out[base + "embeddings.position_embedding.weight"] = (cfg["context"], w)
    else:
        out[base + "embeddings.class_embedding"] = (w,)
        out[base + "embeddings.patch_embedding.weight"] = (w, 3, cfg["patch"], cfg["patch"])
        out[base + "embeddings.position_embedding.weight"] = (cfg["grid"] ** 2 + 1, w)
        out[base + "pre_layrnorm.weight"] = out[base + "pre_layrnorm.bias"] = (w,)
    for i in range(layers):
        layer = f"{base}encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out[f"{layer}self_attn.{proj}.weight"], out[f"{layer}self_attn.{proj}.bias"] = (w, w), (w,)
        for norm in ("layer_norm1", "layer_norm2"):
            out[f"{layer}{norm}.weight"] = out[f"{layer}{norm}.bias"] = (w,)
        out[f"{layer}mlp.fc1.weight"], out[f"{layer}mlp.fc1.bias"] = (m, w), (m,)
        out[f"{layer}mlp.fc2.weight"], out[f"{layer}mlp.fc2.bias"] = (w, m), (w,)
    if tower == "text":
        out[base + "final_layer_norm.weight"] = out[base + "final_layer_norm.bias"] = (w,)
        out["text_projection.weight"] = (cfg["embed"], w)
    else:
        out[base + "post_layernorm.weight"] = out[base + "post_layernorm.bias"] = (w,)
        out["visual_projection.weight"] = (cfg["embed"], w)
    return out


def write_streamed(path: Path, shapes: dict[str, tuple], dtype=torch.float16, seed: int = 0) -> int:
    """A .safetensors written one tensor at a time (never the whole model in memory). Returns the data bytes."""
    names = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}
    size = torch.empty((), dtype=dtype).element_size()
    header, offset = {}, 0
    for key, shape in shapes.items():
        n = size
        for s in shape:
            n *= s
        header[key] = {"dtype": names[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    gen = torch.Generator().manual_seed(seed)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(raw)) + raw)
        for key, shape in shapes.items():
            tensor = torch.randn(shape, generator=gen).mul_(0.02)
            if key.endswith(("layer_norm1.weight", "layer_norm2.weight", "layrnorm.weight", "layernorm.weight", "layer_norm.weight")):
                tensor.add_(1.0)
            handle.write(tensor.to(dtype).contiguous().view(torch.uint8).numpy().tobytes())
    return offset


def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status", encoding="utf-8") as handle:
        for line in handle:
            if line.startswith(("VmHWM", "VmRSS", "RssAnon", "RssFile")):
                key, value = line.split(":", 1)
                out[key] = int(value.split()[0]) * 1024
    return out


def _reset_peak():
    with open("/proc/self/clear_refs", "w", encoding="utf-8") as handle:
        handle.write("5")


def child(args):
    """Runs in a fresh process: load the tower, report peak RSS over the baseline."""
    torch.set_num_threads(args.threads)
    from lambda_eclipse.core.clip import ClipEncoder, Preprocess, _tokenizer
    from lambda_eclipse.core.clip_formats import build_clip_model, open_source
    from lambda_eclipse.core.loading import resolve_dtype

    _tokenizer(None)  # the tokenizer is not weights: load it before the baseline
    dtype = resolve_dtype(args.dtype)
    kwargs = {args.tower: args.child}
    _reset_peak()
    base = _status()
    start = time.perf_counter()
    source = open_source(args.child, prefer_half=dtype != torch.float32)
    model, weight_bytes = build_clip_model(source if args.tower == "text" else None,
                                           source if args.tower == "vision" else None, dtype=dtype)
    fill_s = time.perf_counter() - start
    fill = _status()
    encoder = ClipEncoder(model, _tokenizer(None), Preprocess(), sources=kwargs)  # computes the blank (vision)
    total_s = time.perf_counter() - start
    total = _status()
    params = sum(p.numel() for p in model.parameters())
    result = {
        "tower": args.tower, "layers": model.visual.transformer.layers if args.tower == "vision" else model.transformer.layers,
        "params": params, "file_dtype": "fp16", "target_dtype": args.dtype, "weights_bytes": weight_bytes,
        "baseline_rss": base["VmRSS"],
        "fill": {"seconds": round(fill_s, 2), "peak_over_baseline": fill["VmHWM"] - base["VmRSS"],
                 "ratio": round((fill["VmHWM"] - base["VmRSS"]) / weight_bytes, 3),
                 "rss_after": fill["VmRSS"] - base["VmRSS"], "rss_file_after": fill.get("RssFile", 0) - base.get("RssFile", 0)},
        "total": {"seconds": round(total_s, 2), "peak_over_baseline": total["VmHWM"] - base["VmRSS"],
                  "ratio": round((total["VmHWM"] - base["VmRSS"]) / weight_bytes, 3)},
        "blank_computed": encoder.has_vision,
    }
    print(json.dumps(result))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tower", choices=["text", "vision"], default="text")
    ap.add_argument("--dtype", nargs="+", default=["fp16", "fp32"], help="target dtypes, one fresh process each")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers than bigG's (32 text / 48 vision) for a quick run")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dir", type=Path, default=None, help="where to write the file (default: a temporary folder)")
    ap.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        args.dtype = args.dtype[0]
        return child(args)

    from _machine import machine_info

    layers = args.layers or BIGG[args.tower]["layers"]
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / f"bigg_{args.tower}_fp16.safetensors"
        start = time.perf_counter()
        data = write_streamed(path, tower_shapes(args.tower, layers))
        print(json.dumps({"wrote": str(path.name), "bytes": data, "seconds": round(time.perf_counter() - start, 1),
                          "machine": machine_info(torch.device("cpu"))}), flush=True)
        for dtype in args.dtype:
            cmd = [sys.executable, __file__, "--child", str(path), "--tower", args.tower, "--dtype", dtype,
                   "--threads", str(args.threads)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True)
            print(out.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
