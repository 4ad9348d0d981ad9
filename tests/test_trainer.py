"""Trainer end to end on CPU: synthetic shapes → extract → train → eval → export → load_prior; resume, DDP, bad data."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lambda_eclipse.core.interleave import plan_positions, substitute
from lambda_eclipse.core.prior import load_prior
from lambda_eclipse.core.tiny import write_tiny_clip
from lambda_eclipse.trainer.__main__ import main as cli_main
from lambda_eclipse.trainer.__main__ import parse
from lambda_eclipse.trainer.batches import Assembler, Split
from lambda_eclipse.trainer.data import FilterConfig, read_coco, rle_decode, rle_encode
from lambda_eclipse.trainer.extract import ExtractConfig, run_extract
from lambda_eclipse.trainer.store import FeatureStore, ShardError
from lambda_eclipse.trainer.train import SimulatedCrash, TrainConfig, export, model_from_checkpoint, run_train

COLORS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (235, 210, 30), "purple": (140, 40, 170)}
BACKS = {"white": (245, 245, 245), "black": (15, 15, 15), "gray": (128, 128, 128), "orange": (240, 140, 20)}
SHAPES = ["circle", "square", "triangle"]


def _draw(draw, shape, box, fill):
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        x0, y0, x1, y1 = box
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)


def make_shapes(root: Path, n: int, size: int = 64, seed: int = 0) -> Path:
    """Coloured shapes on coloured backgrounds, captions 'a red circle and a blue square on gray', masks."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    (root / "img").mkdir(parents=True, exist_ok=True)
    (root / "mask").mkdir(exist_ok=True)
    with open(root / "manifest.jsonl", "w") as f:
        for i in range(n):
            bg = rng.choice(list(BACKS))
            k = rng.choice([1, 2])
            shapes = rng.sample(SHAPES, k)
            cols = [rng.choice(list(COLORS)) for _ in shapes]
            img = Image.new("RGB", (size, size), BACKS[bg])
            d = ImageDraw.Draw(img)
            subjects = []
            for j, (sh, c) in enumerate(zip(shapes, cols)):
                s = rng.randint(26, 32)
                x0 = 2 + j * 32 if k == 2 else rng.randint(2, size - s - 2)
                y0 = rng.randint(2, size - s - 2)
                box = (x0, y0, x0 + s - 1, y0 + s - 1)
                _draw(d, sh, box, COLORS[c])
                m = Image.new("L", (size, size), 0)
                _draw(ImageDraw.Draw(m), sh, box, 255)
                m.save(root / f"mask/{i}_{j}.png")
                subjects.append({"word": sh, "mask": f"mask/{i}_{j}.png"})
            img.save(root / f"img/{i}.png")
            cap = " and ".join(f"a {c} {sh}" for sh, c in zip(shapes, cols)) + f" on {bg}"
            f.write(json.dumps({"image": f"img/{i}.png", "caption": cap, "subjects": subjects}) + "\n")
    return root / "manifest.jsonl"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("trainer")
    manifest = make_shapes(root / "ds", 256)
    clip = write_tiny_clip(root / "clip")
    feats = root / "feats"
    index = run_extract(ExtractConfig(clip=str(clip), out=str(feats), manifest=str(manifest), shard_size=64, batch_size=64,
                                      device="cpu", progress=False))
    return {"root": root, "clip": clip, "feats": feats, "index": index, "manifest": manifest}


def small_cfg(world, out, **kw) -> TrainConfig:
    base = dict(data=str(world["feats"]), out=str(out), model="tiny", max_steps=30, batch_size=16, lr=1e-3, warmup_steps=5,
                schedule="cosine", mse_reduction="sum", lam=0.05, val_fraction=0.2, eval_every=1000, save_every=10,
                log_every=10, eval_batch_size=32, cpu=True, deterministic=True, tensorboard=False, prefetch=0, seed=3)
    base.update(kw)
    return TrainConfig(**base)


def state(path):
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "model.safetensors"))


# -- extraction and storage -------------------------------------------------------------------------

def test_extract_index_and_bytes_per_example(world):
    index = world["index"]
    assert index["examples"] == 256 and index["records"] == 256
    assert index["skipped"] == {}
    store = FeatureStore(world["feats"])
    E = store.embed_dim
    assert E == 32 and len(store) == 256
    # Bound for the tiny sizes: fp16 image/pooled/control + real tokens + subjects, int32 ids, 2 int64 offsets,
    # plus per-example JSON (caption, words, ids) and the shard header, generously 400 B.
    tokens = sum(s["tokens"] for s in index["shards"])
    subjects = sum(s["subjects"] for s in index["shards"])
    n = index["examples"]
    bound = ((3 * n + tokens + subjects) * 2 * E + 4 * tokens + 16 * n) / n + 400
    assert index["bytes_per_example"] <= bound, (index["bytes_per_example"], bound)
    padded = 77 * E * 2
    assert index["bytes_per_example"] < padded * 1.0  # below even the padded token tensor alone
    assert 8 <= tokens / n <= 16  # only real tokens were stored (captions are 8–14 tokens)


def test_interleave_on_the_fly_matches_core(world):
    store = FeatureStore(world["feats"])
    asm = Assembler(store)
    idx = [0, 5, 77, 130]
    got = asm.gather(idx)
    for b, g in enumerate(idx):
        s, i = store.locate(g)
        sh = store.shard(s)
        a, e = int(sh.tok_off[i]), int(sh.tok_off[i + 1])
        raw = torch.zeros(1, 77, store.embed_dim)
        raw[0, :e - a] = sh.tokens[a:e].float()
        ex = sh.examples[i]
        plan = plan_positions(ex["caption"], sh.ids[a:e].tolist(), ex["words"], ex["word_ids"], 77)
        sa, sb = int(sh.subj_off[i]), int(sh.subj_off[i + 1])
        want = substitute(raw, plan, list(sh.subj[sa:sb].float()))
        assert torch.equal(got["tokens"][b], want[0])
        assert got["mask"][b].sum() == e - a and got["mask"][b, : e - a].all()


def test_extract_resume_redoes_only_missing_shard(world, tmp_path):
    feats = tmp_path / "feats"
    shutil.copytree(world["feats"], feats)
    (feats / "shards" / "shard-00002.json").unlink()  # as if killed before the sidecar was written
    (feats / "shards" / "shard-00002.safetensors").write_bytes(b"torn")
    mtimes = {p.name: p.stat().st_mtime_ns for p in (feats / "shards").glob("*.safetensors")}
    index = run_extract(ExtractConfig(clip=str(world["clip"]), out=str(feats), manifest=str(world["manifest"]), shard_size=64,
                                      batch_size=64, device="cpu", progress=False))
    assert index["examples"] == 256
    after = {p.name: p.stat().st_mtime_ns for p in (feats / "shards").glob("*.safetensors")}
    assert [k for k in after if after[k] != mtimes[k]] == ["shard-00002.safetensors"]
    store = FeatureStore(feats)
    for s in range(len(store.shards)):
        store.shard(s)


def test_corrupt_shard_is_a_clear_error(world, tmp_path):
    feats = tmp_path / "feats"
    shutil.copytree(world["feats"], feats)
    path = feats / "shards" / "shard-00001.safetensors"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    store = FeatureStore(feats)
    store.shard(0)
    with pytest.raises(ShardError) as err:
        store.shard(1)
    msg = str(err.value)
    assert "shard-00001.safetensors" in msg and "corrupt" in msg and "Delete" in msg and "extract" in msg
    # Unverified read of a torn header is still a clear error, not a crash deep in safetensors.
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"bad")
    store = FeatureStore(feats, verify=False)
    with pytest.raises(ShardError, match="cannot be read"):
        store.shard(1)
    # Training on it fails at the start with the same message, before any step is lost.
    with pytest.raises(ShardError, match="shard-00001"):
        run_train(small_cfg({"feats": feats}, tmp_path / "run", max_steps=2))


def test_bad_data_is_counted_not_fatal(world, tmp_path):
    from PIL import Image

    src = world["manifest"].parent
    ds = tmp_path / "ds"
    ds.mkdir()
    good = [json.loads(x) for x in world["manifest"].read_text().splitlines()[:6]]
    for row in good:
        for p in [row["image"]] + [s["mask"] for s in row["subjects"]]:
            (ds / p).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src / p, ds / p)
    (ds / "img" / "garbage.png").write_bytes(b"not a png at all")
    Image.new("L", (64, 64), 0).save(ds / "mask" / "empty.png")
    tiny = Image.new("L", (64, 64), 0)
    tiny.paste(255, (0, 0, 6, 6))
    tiny.save(ds / "mask" / "tiny.png")
    m = good[0]["subjects"][0]["mask"]
    rows = [
        good[0], good[1],
        {"image": "img/missing.png", "caption": "a red circle", "subjects": [{"word": "circle", "mask": m}]},
        {"image": "img/garbage.png", "caption": "a red circle", "subjects": [{"word": "circle", "mask": m}]},
        {"image": good[2]["image"], "caption": "a red blob", "subjects": [{"word": "circle", "mask": m}]},
        {"image": good[3]["image"], "caption": "a red circle", "subjects": [{"word": "circle", "mask": "mask/empty.png"}]},
        {"image": good[4]["image"], "caption": "a red circle", "subjects": [{"word": "circle", "mask": "mask/tiny.png"}]},
        {"image": good[5]["image"], "caption": "a b c d e on a table",
         "subjects": [{"word": w, "box": [0, 0, 40, 40]} for w in "abcde"]},
    ]
    with open(ds / "manifest.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
        f.write("{not json\n")
    index = run_extract(ExtractConfig(clip=str(world["clip"]), out=str(tmp_path / "f"), manifest=str(ds / "manifest.jsonl"),
                                      shard_size=4, batch_size=4, device="cpu", progress=False))
    sk = index["skipped"]
    assert index["examples"] == 2
    assert sk["example:missing_image"] == 1
    assert sk["example:unreadable_image"] == 1
    assert sk["subject:word_not_in_caption"] == 1
    assert sk["subject:empty_mask"] == 1
    assert sk["subject:box_too_small"] == 1
    assert sk["example:too_many_subjects"] == 1
    assert sk["example:bad_manifest_line"] == 1
    assert sk["example:too_few_subjects"] == 3  # the three examples whose only subject was dropped


def test_coco_reader_polygons_and_rle(tmp_path):
    from PIL import Image

    Image.new("RGB", (40, 30), "white").save(tmp_path / "a.jpg")
    mask = np.zeros((30, 40), bool)
    mask[5:20, 10:30] = True
    assert np.array_equal(rle_decode(rle_encode(mask), 30, 40), mask)
    caps = {"images": [{"id": 1, "file_name": "a.jpg", "width": 40, "height": 30}],
            "annotations": [{"id": 9, "image_id": 1, "caption": "A dog next to a cat."}]}
    inst = {"categories": [{"id": 1, "name": "dog"}, {"id": 2, "name": "cat"}, {"id": 3, "name": "car"}],
            "annotations": [
                {"id": 1, "image_id": 1, "category_id": 1, "area": 300, "segmentation": [[10, 5, 30, 5, 30, 20, 10, 20]], "iscrowd": 0},
                {"id": 2, "image_id": 1, "category_id": 1, "area": 10, "segmentation": [[0, 0, 3, 0, 3, 3]], "iscrowd": 0},
                {"id": 3, "image_id": 1, "category_id": 2, "area": 300, "segmentation": rle_encode(mask), "iscrowd": 1},
                {"id": 4, "image_id": 1, "category_id": 3, "area": 300, "segmentation": [[0, 0, 5, 0, 5, 5]], "iscrowd": 0}]}
    (tmp_path / "c.json").write_text(json.dumps(caps))
    (tmp_path / "i.json").write_text(json.dumps(inst))
    recs = read_coco(tmp_path / "c.json", tmp_path / "i.json", tmp_path)
    assert len(recs) == 1
    words = {s.word: s for s in recs[0].subjects}
    assert set(words) == {"dog", "cat"}  # "car" is not in the caption
    from lambda_eclipse.trainer.data import subject_mask

    assert subject_mask(words["dog"], 40, 30).sum() == pytest.approx(mask.sum(), rel=0.25)  # the larger dog instance
    assert np.array_equal(subject_mask(words["cat"], 40, 30), mask)
    # pycocotools' compressed string form ("counts" as a string) decodes to the same runs.
    from lambda_eclipse.trainer.data import _rle_string_to_counts

    counts = rle_encode(mask)["counts"]
    assert _rle_string_to_counts(_rle_to_string(counts)) == counts
    compressed = {"size": [30, 40], "counts": _rle_to_string(counts)}
    assert np.array_equal(rle_decode(compressed, 30, 40), mask)


def _rle_to_string(counts):
    """pycocotools' rleToString (C), transcribed, to produce compressed test input."""
    out = []
    for i, x in enumerate(counts):
        if i > 2:
            x -= counts[i - 2]
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = (x != -1) if (c & 0x10) else (x != 0)
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return "".join(out)


# -- training ---------------------------------------------------------------------------------------

def test_train_eval_export_roundtrip(world, tmp_path):
    out = tmp_path / "run"
    cfg = small_cfg(world, out, max_steps=400, batch_size=32, lr=1e-3, warmup_steps=20, schedule="constant", lam=0.01,
                    eval_every=200, save_every=200, log_every=50, deterministic=False, tensorboard=True, prefetch=2)
    result = run_train(cfg)
    rows = [r for r in __import__("csv").DictReader(open(out / "metrics.csv"))]
    train = [float(r["loss"]) for r in rows if r["split"] == "train"]
    val = [r for r in rows if r["split"] == "val"]
    assert train[-1] < 0.5 * train[0], train
    chance = 1 / 32
    top1 = float(val[-1]["top1"])
    assert top1 >= 4 * chance, val[-1]
    assert float(val[-1]["top5"]) > 5 * chance
    assert (out / "curves.png").stat().st_size > 1000
    assert any((out / "tensorboard").iterdir())
    assert len(list((out / "checkpoints").iterdir())) == 2

    # export: folder and single file, both read by core.prior.load_prior with identical outputs
    model = result["model"].eval()
    folder = export(out, tmp_path / "prior")
    single = export(out, tmp_path / "prior1.safetensors", single_file=True)
    store = FeatureStore(world["feats"])
    batch = Assembler(store).gather(list(range(8)))
    noise = torch.randn(8, 32, generator=torch.Generator().manual_seed(0))
    args = (noise, batch["pooled"], batch["tokens"], batch["mask"], batch["control"])
    with torch.no_grad():
        want = model.predict(*args)
        for p in (folder, single):
            assert torch.equal(load_prior(p).predict(*args), want)
        assert torch.equal(model_from_checkpoint(out).predict(*args), want)

    # CLI eval on the exported prior and on the run agree
    a = run_eval_cli(["eval", "--checkpoint", str(folder), "--data", str(world["feats"]), "--val-fraction", "0.2",
                      "--eval-batch-size", "32", "--lam", "0.01"])
    assert a["top1"] >= 4 * chance


def run_eval_cli(argv):
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert cli_main(argv) == 0
    return json.loads(buf.getvalue())


def test_resume_after_crash_is_bit_identical(world, tmp_path):
    ref = run_train(small_cfg(world, tmp_path / "ref", max_steps=20))
    with pytest.raises(SimulatedCrash):
        run_train(small_cfg(world, tmp_path / "cut", max_steps=20, crash_at_step=17))  # last checkpoint: step 10
    ck = tmp_path / "cut" / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["step-00000010"]
    # A checkpoint torn mid-write (killed during save) is ignored and cleaned up.
    (ck / "step-00000020.tmp").mkdir()
    (ck / "step-00000020.tmp" / "model.safetensors").write_bytes(b"half")
    res = run_train(small_cfg(world, tmp_path / "cut", max_steps=20, keep_last=1))
    assert res["step"] == 20
    a = state(ref["final_checkpoint"])
    b = state(res["final_checkpoint"])
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not (ck / "step-00000020.tmp").exists()
    # keep-last-N (1 here)
    assert sorted(p.name for p in ck.iterdir()) == ["step-00000020"]
    # metrics.csv was cut back to the checkpoint and continued: same loss rows as the uninterrupted run
    def losses(run):
        return [line.split(",")[:6] for line in open(tmp_path / run / "metrics.csv").read().splitlines()]

    assert losses("cut") == losses("ref")


def test_hard_kill_subprocess_and_resume(world, tmp_path):
    """SIGKILL-equivalent: the process dies (os._exit) right after step 12, mid-run, then resumes."""
    out = tmp_path / "k"
    code = (
        "import os, sys\n"
        "from lambda_eclipse.trainer import train as T\n"
        "orig = T.save_checkpoint\n"
        "def hook(acc, out, step, *a, **k):\n"
        "    r = orig(acc, out, step, *a, **k)\n"
        "    if step == 10: os._exit(137)\n"
        "    return r\n"
        "T.save_checkpoint = hook\n"
        "from lambda_eclipse.trainer.__main__ import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    args = ["train", "--data", str(world["feats"]), "--out", str(out), "--model", "tiny", "--max-steps", "20",
            "--batch-size", "16", "--lr", "1e-3", "--warmup-steps", "5", "--mse-reduction", "sum", "--lam", "0.05",
            "--val-fraction", "0.2", "--eval-every", "1000", "--save-every", "10", "--cpu", "true", "--deterministic", "true",
            "--tensorboard", "false", "--prefetch", "0", "--seed", "3"]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    p = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 137, p.stderr[-2000:]
    res = run_train(small_cfg(world, out, max_steps=20))
    ref = run_train(small_cfg(world, tmp_path / "ref", max_steps=20))
    a, b = state(ref["final_checkpoint"]), state(res["final_checkpoint"])
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ddp_two_processes_match_single(world, tmp_path):
    single = run_train(small_cfg(world, tmp_path / "one", max_steps=8, save_every=8, edge_drop=0.3))
    args = ["--nproc_per_node", "2", "--master_port", str(29500 + os.getpid() % 1000), "-m", "lambda_eclipse.trainer", "train",
            "--data", str(world["feats"]), "--out", str(tmp_path / "two"), "--model", "tiny", "--max-steps", "8",
            "--batch-size", "16", "--lr", "1e-3", "--warmup-steps", "5", "--mse-reduction", "sum", "--lam", "0.05",
            "--val-fraction", "0.2", "--eval-every", "1000", "--save-every", "8", "--cpu", "true", "--edge-drop", "0.3",
            "--tensorboard", "false", "--prefetch", "0", "--seed", "3", "--deterministic", "true"]
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", *args], env=env, capture_output=True, text=True, timeout=170)
    assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-3000:])
    st = json.loads((tmp_path / "two" / "checkpoints" / "step-00000008" / "trainer_state.json").read_text())
    assert st["world_size"] == 2
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints" / "step-00000008").glob("rng-*")) == \
        ["rng-0.safetensors", "rng-1.safetensors"]  # per-rank RNG states, as tensors + JSON (nothing pickled)
    a = state(single["final_checkpoint"])
    b = state(tmp_path / "two" / "checkpoints" / "step-00000008")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)


# -- CLI ------------------------------------------------------------------------------------------------

def test_cli_help_and_config_file(tmp_path, capsys):
    for cmd in ("extract", "train", "eval", "export"):
        with pytest.raises(SystemExit) as e:
            parse([cmd, "--help"])
        assert e.value.code == 0
        text = capsys.readouterr().out
        assert "--config" in text
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: d\nout: o\nlr: 0.001\nbatch-size: 8\n")
    args = parse(["train", "--config", str(cfg), "--lr", "0.01"])
    assert (args.data, args.lr, args.batch_size) == ("d", 0.01, 8)
    (tmp_path / "bad.json").write_text(json.dumps({"nope": 1}))
    with pytest.raises(SystemExit):
        parse(["train", "--config", str(tmp_path / "bad.json")])


def test_filters_and_split_are_deterministic(world):
    store = FeatureStore(world["feats"])
    tr, va = Split.make(store, 0.2, False), Split.make(store, 0.2, True)
    assert tr.size + va.size == 256 and 25 <= va.size <= 80
    assert set(np.concatenate(tr.indices_by_shard)).isdisjoint(np.concatenate(va.indices_by_shard))
    assert np.array_equal(tr.epoch_order(1, 2), tr.epoch_order(1, 2))
    assert not np.array_equal(tr.epoch_order(1, 2), tr.epoch_order(1, 3))
    assert FilterConfig().max_subjects == 4
