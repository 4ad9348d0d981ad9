"""Dreambench evaluation (lambda_eclipse.evaluate): metrics, dataset parsing, the resumable run, score-only, compare."""

import csv
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from lambda_eclipse.evaluate import dreambench as db
from lambda_eclipse.evaluate.cli import main
from lambda_eclipse.evaluate.compare import bootstrap_difference, compare_rows
from lambda_eclipse.evaluate.metrics import (ClipEmbedder, DinoEmbedder, Scorer, cosine_matrix, per_image_scores)
from lambda_eclipse.evaluate.tiny import write_tiny_dino, write_tiny_eval_clip, write_tiny_timm_dino

OBJECT = ["in the jungle", "in the snow", "on the beach"] + [f"object place {i}" for i in range(22)]
LIVE = ["in the jungle", "wearing a red hat", "in a chef outfit"] + [f"live place {i}" for i in range(22)]


def prompts_and_classes(classes: dict) -> str:
    """The google/dreambooth dataset/prompts_and_classes.txt format."""
    lines = ["Classes", "", "subject_name,class", *[f"{k},{v}" for k, v in classes.items()], "", "Prompts", "",
             "Object Prompts", "", "prompt_list = ["]
    lines += [f"'a {{0}} {{1}} {p}'.format(unique_token, class_token)," for p in OBJECT[:-1]]
    lines += [f"'a {{0}} {{1}} {OBJECT[-1]}'.format(unique_token, class_token)", "]", "", "Live Subject Prompts", "",
              "prompt_list = ["]
    lines += [f"'a {{0}} {{1}} {p}'.format(unique_token, class_token)," for p in LIVE[:-1]]
    lines += ["'a red {0} {1}'.format(unique_token, class_token)", "]", ""]
    return "\n".join(lines)


def _photo(color, shape, size=(96, 80)):
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    (draw.ellipse if shape == "ellipse" else draw.rectangle)((15, 10, size[0] - 15, size[1] - 10), fill=color)
    return img


def make_dataset(root, identical=False):
    root.mkdir(parents=True)
    (root / "prompts_and_classes.txt").write_text(prompts_and_classes({"backpack": "backpack", "dog": "dog"}))
    for name, colors in (("backpack", ("red", "orange")), ("dog", ("brown", "black"))):
        (root / name).mkdir()
        for i, color in enumerate(colors):
            img = _photo(colors[0] if identical else color, "ellipse" if i == 0 or identical else "rect")
            img.save(root / name / f"{i:02d}.jpg" if not identical else root / name / f"{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def metric_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("metric_models")
    return {"dino": write_tiny_dino(root / "dino-vits16"),
            "clip_file": write_tiny_eval_clip(root / "clip_eval.safetensors"),
            "clip_folder": write_tiny_eval_clip(root / "clip_folder", folder=True)}


@pytest.fixture(scope="module")
def scorer(metric_models):
    return Scorer(DinoEmbedder(metric_models["dino"]), ClipEmbedder(metric_models["clip_file"], model_name="tiny-eval-clip"))


def _metric_args(metric_models):
    return ["--dino", str(metric_models["dino"]), "--clip-eval", str(metric_models["clip_file"]),
            "--clip-eval-model", "tiny-eval-clip", "--quiet"]


# -- metrics ---------------------------------------------------------------------------------------------------------

def test_cosine_matrix_known_values():
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    b = torch.tensor([[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0]])
    expected = torch.tensor([[1.0, 0.0, -1.0], [2 ** -0.5, 2 ** -0.5, -(2 ** -0.5)]], dtype=torch.float64)
    assert torch.allclose(cosine_matrix(a, b), expected)


def test_per_image_scores_average_over_reals():
    gen = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    real = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    text = torch.tensor([[0.0, 5.0], [0.0, 5.0]])
    rows = per_image_scores(gen, gen, text, real, real)
    assert rows[0]["dino"] == pytest.approx((1 + 2 ** -0.5) / 2)
    assert rows[1]["clip_i"] == pytest.approx((0 + 2 ** -0.5) / 2)
    assert [r["clip_t"] for r in rows] == pytest.approx([0.0, 1.0])


def test_identical_images_score_one(scorer, metric_models):
    img = _photo("green", "ellipse", (130, 90))
    (row,) = scorer.score([img], ["a thing"], "same", [img.copy()])
    assert row["dino"] == pytest.approx(1.0, abs=1e-6) and row["clip_i"] == pytest.approx(1.0, abs=1e-6)
    other = scorer.score([_photo("blue", "rect")], ["a thing"], "same", [img])[0]
    assert other["dino"] < 1 - 1e-4 and other["clip_i"] < 1 - 1e-4
    # The OpenCLIP folder layout (local-dir) loads the same weights as the single file + registered config.
    folder = ClipEmbedder(metric_models["clip_folder"])
    assert torch.allclose(folder.images([img]), scorer.clip.images([img]), atol=1e-5)


def test_clip_t_uses_the_prompt_as_written(scorer):
    prompt = "a dog in the jungle"
    direct = scorer.clip.model.encode_text(scorer.clip.tokenizer([prompt])).float()
    assert torch.allclose(scorer.clip_text_embed([prompt]), direct)
    assert not torch.allclose(scorer.clip_text_embed(["a sks dog in the jungle"]), direct)


def test_timm_dino_folder(tmp_path):
    pytest.importorskip("timm")
    dino = DinoEmbedder(write_tiny_timm_dino(tmp_path / "timm_dino"))
    img = _photo("red", "ellipse")
    e = dino([img, img.copy()])
    assert dino.kind == "timm" and e.shape == (2, 32)
    assert cosine_matrix(e[:1], e[1:]).item() == pytest.approx(1.0)


# -- dataset ---------------------------------------------------------------------------------------------------------

def test_parse_real_format(tmp_path):
    classes, objects, live = db.parse_prompts_and_classes(prompts_and_classes({"bear_plushie": "stuffed animal", "dog2": "dog"}))
    assert classes == {"bear_plushie": "stuffed animal", "dog2": "dog"}
    assert len(objects) == len(live) == 25
    assert db.format_prompt(objects[0], "stuffed animal") == "a stuffed animal in the jungle"
    assert db.format_prompt(live[-1], "dog") == "a red dog"
    data = make_dataset(tmp_path / "dataset")
    subjects = db.load_dataset(data)
    assert [(s.name, s.live, len(s.photos)) for s in subjects] == [("backpack", False, 2), ("dog", True, 2)]
    assert subjects[1].prompt(1) == "a dog wearing a red hat" and subjects[0].prompt(1) == "a backpack in the snow"
    with pytest.raises(db.DatasetError, match="cat"):
        db.load_dataset(data, ["cat"])


def test_shards_are_disjoint_and_cover(tmp_path):
    subjects = db.load_dataset(make_dataset(tmp_path / "dataset"))
    items = db.work_items(subjects, limit_prompts=5)
    assert len(items) == 10
    for count in (1, 3, 4):
        parts = [db.shard(items, i, count) for i in range(count)]
        assert sorted((x.subject, x.index) for p in parts for x in p) == sorted((x.subject, x.index) for x in items)
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    with pytest.raises(ValueError):
        db.shard(items, 2, 2)


# -- runs ------------------------------------------------------------------------------------------------------------

def _read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_dreambench_run_resume_and_compare(tmp_path, tiny_models, metric_models, capsys):
    data = make_dataset(tmp_path / "dataset")
    out = tmp_path / "run"
    args = ["dreambench", "--dataset", str(data), "--out", str(out), "--models", str(tiny_models["root"]),
            "--limit-prompts", "2", "--images-per-prompt", "2", "--seed", "5", "--steps", "2",
            "--width", "64", "--height", "64", *_metric_args(metric_models)]
    assert main(args) == 0
    rows = _read(out / "scores.csv")
    assert list(rows[0]) == list(db.CSV_FIELDS)
    assert len(rows) == 2 * 2 * 2
    assert {(r["subject"], r["prompt"], r["seed"]) for r in rows} >= {("dog", "a dog wearing a red hat", "6"),
                                                                     ("backpack", "a backpack in the jungle", "5")}
    for r in rows:
        for k in ("dino", "clip_i", "clip_t"):
            assert math.isfinite(float(r[k])) and -1 <= float(r[k]) <= 1
    summary = (out / "summary.md").read_text()
    assert "0.613" in summary and "| dog | 4 |" in summary
    assert Image.open(out / "scores.png").size[0] > 300
    first = out / "images" / "dog" / "p01_s6.png"
    before = {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.png")}
    capsys.readouterr()

    assert main(args) == 0  # resumable: nothing is generated again
    assert "nothing to generate" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.png")} == before

    pixels = np.asarray(Image.open(first))
    first.unlink()  # a missing image is made alone: the same picture as in its batch (up to batched-matmul rounding)
    assert main(args) == 0
    diff = np.abs(np.asarray(Image.open(first)).astype(int) - pixels.astype(int))
    assert diff.max() <= 3 and diff.mean() < 0.5
    again = _read(out / "scores.csv")
    assert [r["image"] for r in again] == [r["image"] for r in rows]
    assert [float(r["dino"]) for r in again] == pytest.approx([float(r["dino"]) for r in rows], abs=1e-3)

    capsys.readouterr()
    assert main(["compare", str(out), str(out / "scores.csv")]) == 0
    table = capsys.readouterr().out
    assert "+0.0000 | [+0.0000, +0.0000]" in table and "paired over the 8 images" in table


def test_score_only_on_copies_of_the_references(tmp_path, metric_models):
    data = make_dataset(tmp_path / "dataset", identical=True)
    out = tmp_path / "other_tool"
    for name in ("backpack", "dog"):
        for k in range(2):
            (out / "images" / name).mkdir(parents=True, exist_ok=True)
            shutil.copy(data / name / "00.png", out / "images" / name / f"p{k:02d}_s0.png")
    (out / "images" / "dog" / "notes.txt").write_text("ignored")
    assert main(["dreambench", "--dataset", str(data), "--out", str(out), "--score-only", *_metric_args(metric_models)]) == 0
    rows = db.read_scores(out)
    assert len(rows) == 4
    assert all(r["dino"] == pytest.approx(1.0, abs=1e-5) and r["clip_i"] == pytest.approx(1.0, abs=1e-5) for r in rows)
    assert {r["prompt"] for r in rows if r["subject"] == "dog"} == {"a dog in the jungle", "a dog wearing a red hat"}


def test_score_only_needs_images_and_metric_models(tmp_path, metric_models, capsys):
    data = make_dataset(tmp_path / "dataset")
    assert main(["dreambench", "--dataset", str(data), "--out", str(tmp_path / "empty"), "--score-only",
                 *_metric_args(metric_models)]) == 2
    assert "No images to score" in capsys.readouterr().err
    assert main(["dreambench", "--dataset", str(data), "--out", str(tmp_path / "x"), "--score-only"]) == 2
    assert "--dino is needed" in capsys.readouterr().err


def test_compare_bootstrap():
    rows_a = [{"subject": "s", "prompt": f"p{i}", "seed": 0, "dino": 0.5, "clip_i": 0.6, "clip_t": 0.2} for i in range(20)]
    rows_b = [dict(r, dino=r["dino"] + 0.1 + 0.01 * (i % 3)) for i, r in enumerate(rows_a)]
    result = compare_rows(rows_a, rows_b, samples=500)
    d = result["metrics"]["dino"]
    assert result["paired"] and d["low"] <= d["diff"] <= d["high"] and 0.1 <= d["low"] and d["high"] <= 0.12
    assert result["metrics"]["clip_t"]["diff"] == pytest.approx(0.0)
    unpaired = compare_rows(rows_a, [dict(r, seed=1) for r in rows_b], samples=500)
    assert not unpaired["paired"] and unpaired["metrics"]["dino"]["diff"] == pytest.approx(d["diff"])
    point, low, high = bootstrap_difference([0.0] * 5, [1.0] * 5, paired=False)
    assert (point, low, high) == (1.0, 1.0, 1.0)


def test_dreambench_with_a_decoder_lora_and_early_checks(tmp_path, tiny_models, metric_models, capsys):
    """--decoder-lora decodes through the LoRA (other pixels than without); a missing LoRA or DINO folder is said
    before anything is generated."""
    from safetensors.torch import save_file

    from lambda_eclipse.core.tiny import make_tiny_decoder_components

    unet = make_tiny_decoder_components()[0]
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(("to_q", "to_v")):
            tensors[f"unet.{name}.lora_A.weight"] = torch.randn(4, module.in_features, generator=gen) * 0.3
            tensors[f"unet.{name}.lora_B.weight"] = torch.randn(module.out_features, 4, generator=gen) * 0.3
    lora = tmp_path / "concept.safetensors"
    save_file(tensors, str(lora), {"rank": "4", "alpha": "4.0"})
    data = make_dataset(tmp_path / "dataset")
    common = ["dreambench", "--dataset", str(data), "--models", str(tiny_models["root"]), "--subjects", "dog",
              "--limit-prompts", "1", "--images-per-prompt", "1", "--steps", "2", "--width", "64", "--height", "64",
              *_metric_args(metric_models)]
    assert main(common + ["--out", str(tmp_path / "base")]) == 0
    assert main(common + ["--out", str(tmp_path / "tuned"), "--decoder-lora", f"{lora}:1.0"]) == 0
    a = np.asarray(Image.open(tmp_path / "base" / "images" / "dog" / "p00_s0.png"), dtype=int)
    b = np.asarray(Image.open(tmp_path / "tuned" / "images" / "dog" / "p00_s0.png"), dtype=int)
    assert np.abs(a - b).max() > 0
    assert "concept.safetensors@1" in (tmp_path / "tuned" / "summary.md").read_text()
    capsys.readouterr()
    assert main(common + ["--out", str(tmp_path / "x"), "--decoder-lora", str(tmp_path / "nope.safetensors")]) == 2
    assert "nope.safetensors" in capsys.readouterr().err and not (tmp_path / "x" / "images").exists()
    bad_dino = [a if a != str(metric_models["dino"]) else str(tmp_path / "no-dino") for a in common]
    assert main(bad_dino + ["--out", str(tmp_path / "y")]) == 2
    assert "--dino" in capsys.readouterr().err and not (tmp_path / "y" / "images").exists()
