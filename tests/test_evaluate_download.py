"""Metric models on request: `evaluate download-metrics` and `--metric-models DIR --download`, through core.download
with evaluate/metric_models.json, against the loopback fake hub of test_download (no internet). The served files
are tiny metric models in the real layouts, so scoring from the downloaded folder is checked too."""

import csv
import json

import pytest

from lambda_eclipse.core.download import load_manifest
from lambda_eclipse.evaluate import metric_models
from lambda_eclipse.evaluate.cli import main
from lambda_eclipse.evaluate.tiny import write_tiny_dino, write_tiny_eval_clip
from test_download import FakeHub, _point_hub_at, serve_shipped_manifest, sha
from test_evaluate import make_dataset

FILES = {"facebook/dino-vits16": ("config.json", "preprocessor_config.json", "pytorch_model.bin"),
         "timm/vit_base_patch32_clip_224.openai": ("open_clip_config.json", "open_clip_model.safetensors")}


@pytest.fixture(scope="module")
def tiny_metric_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_metrics")
    return {"dino": write_tiny_dino(root / "dino", weights="bin"), "clip": write_tiny_eval_clip(root / "clip", folder=True)}


@pytest.fixture
def hub(monkeypatch, tmp_path, tiny_metric_files):
    """The fake hub serving the tiny DINO and CLIP under the shipped manifest's repositories and file names."""
    fake = FakeHub()
    for entry in metric_models.manifest():
        source = tiny_metric_files["dino" if entry.group == "dino" else "clip"] / entry.file
        fake.files[(entry.repo, entry.file)] = source.read_bytes()
    _point_hub_at(monkeypatch, fake.endpoint, tmp_path / "hf-cache")
    yield fake
    fake.close()


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _score_only(data, out, *metric):
    return ["dreambench", "--dataset", str(data), "--out", str(out), "--score-only", "--quiet", *metric]


def _copies(data, out):
    """Images that are copies of each subject's photo (2 per subject)."""
    for name in ("backpack", "dog"):
        (out / "images" / name).mkdir(parents=True, exist_ok=True)
        for k in range(2):
            (out / "images" / name / f"p{k:02d}_s0.png").write_bytes((data / name / "00.png").read_bytes())


def test_shipped_metric_manifest():
    entries = load_manifest(metric_models.MANIFEST_PATH)
    assert {(e.repo, e.file) for e in entries} == {(r, f) for r, files in FILES.items() for f in files}
    assert all(e.revision == "main" and e.sha256 is None and e.size is None for e in entries)  # checked against the hub
    assert {e.group for e in entries} == {"dino", "clip"} and all(e.name == e.file for e in entries)
    assert {k: p.name for k, p in metric_models.folders("/m").items()} == {"dino": "dino-vits16", "clip": "clip-vit-b-32-openai"}


def test_download_metrics_then_score_from_the_folder(hub, tmp_path, tiny_metric_files, capsys):
    target = tmp_path / "metrics"
    assert main(["download-metrics", "--metric-models", str(target)]) == 0
    out = capsys.readouterr().out
    assert "fetched 5 file(s)" in out and f"--metric-models {target}" in out
    assert "checking against the hub's sha256" in out  # no hash in the manifest: the hub's (ETag) is used
    for entry in metric_models.manifest():
        assert entry.dest(target).read_bytes() == hub.files[(entry.repo, entry.file)]
    gets = len(hub.gets())
    assert main(["download-metrics", "--to", str(target)]) == 0  # in place and verified: nothing fetched
    assert len(hub.gets()) == gets and "skipped 5 already in place" in capsys.readouterr().out

    data = make_dataset(tmp_path / "dataset", identical=True)
    _copies(data, tmp_path / "a")
    _copies(data, tmp_path / "b")
    assert main(_score_only(data, tmp_path / "a", "--metric-models", str(target))) == 0
    assert main(_score_only(data, tmp_path / "b", "--dino", str(tiny_metric_files["dino"]),
                            "--clip-eval", str(tiny_metric_files["clip"]))) == 0
    from_download, direct = _rows(tmp_path / "a" / "scores.csv"), _rows(tmp_path / "b" / "scores.csv")
    assert len(from_download) == 4 and from_download == direct
    assert all(float(r["dino"]) == pytest.approx(1.0, abs=1e-5) for r in from_download)
    assert str(target / "dino-vits16") in (tmp_path / "a" / "summary.md").read_text()


def test_run_with_download_fetches_only_what_is_missing(hub, tmp_path, tiny_metric_files, capsys):
    data = make_dataset(tmp_path / "dataset", identical=True)
    _copies(data, tmp_path / "run")
    target = tmp_path / "metrics"
    # --dino given: only the CLIP is fetched
    assert main(_score_only(data, tmp_path / "run", "--metric-models", str(target), "--download",
                            "--dino", str(tiny_metric_files["dino"]))) == 0
    assert (target / "clip-vit-b-32-openai" / "open_clip_model.safetensors").is_file()
    assert not (target / "dino-vits16").exists()
    assert {"/".join(r[1].split("/")[1:3]) for r in hub.gets()} == {"timm/vit_base_patch32_clip_224.openai"}
    capsys.readouterr()
    # without --download, the missing DINO is named with what to do
    assert main(_score_only(data, tmp_path / "run", "--metric-models", str(target))) == 2
    err = capsys.readouterr().err
    assert str(target / "dino-vits16" / "pytorch_model.bin") in err and "Add --download" in err
    assert main(_score_only(data, tmp_path / "run", "--download")) == 2
    assert "--download needs --metric-models DIR" in capsys.readouterr().err
    # multibench takes the same flags
    concept = tmp_path / "concepts" / "hat"
    concept.mkdir(parents=True)
    (concept / "concept.json").write_text(json.dumps({"class": "hat", "kind": "wearable"}))
    (concept / "a.png").write_bytes((data / "dog" / "00.png").read_bytes())
    mb = tmp_path / "mb"
    args = ["multibench", "--dataset", str(data), "--concepts", str(concept), "--out", str(mb), "--subjects-count", "2",
            "--max-prompts", "1", "--metric-models", str(target), "--download", "--quiet"]
    assert main([*args, "--prompts-only"]) == 0
    (prompt,) = _rows(mb / "prompts.csv")
    assert prompt["prompt"] == "a dog wearing a hat"
    (mb / "images" / "two").mkdir(parents=True)
    (mb / "images" / "two" / f"{prompt['id']}_s0.png").write_bytes((data / "dog" / "00.png").read_bytes())
    assert main([*args, "--score-only"]) == 0
    (row,) = _rows(mb / "scores.csv")
    assert (target / "dino-vits16" / "pytorch_model.bin").is_file()
    assert float(row["dino"]) == pytest.approx(1.0, abs=1e-5)  # dog and hat photos are the same picture here


def test_offline_and_corrupt_downloads_are_reported(hub, tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    data = make_dataset(tmp_path / "dataset", identical=True)
    _copies(data, tmp_path / "run")
    hub.corrupt.add("pytorch_model.bin")
    assert main(_score_only(data, tmp_path / "run", "--metric-models", str(tmp_path / "m"), "--download")) == 2
    err = capsys.readouterr().err
    assert "failed verification" in err and sha(hub.files[("facebook/dino-vits16", "pytorch_model.bin")]) in err
    assert not (tmp_path / "m" / "dino-vits16" / "pytorch_model.bin").exists()
    assert not (tmp_path / "run" / "scores.csv").exists()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert main(["download-metrics", "--metric-models", str(tmp_path / "off")]) == 2
    err = capsys.readouterr().err
    assert "could not be downloaded because offline mode is on" in err
    assert "https://huggingface.co/facebook/dino-vits16/resolve/main/pytorch_model.bin" in err


def test_dreambench_on_a_fresh_machine_with_download(hub, tmp_path, tiny_models, monkeypatch, capsys):
    """--download fetches the λ-ECLIPSE models into --models (core.download, as `generate --download`) and the
    metric models into --metric-models; then the run generates and scores."""
    from lambda_eclipse.core.paths import manifest as shipped

    serve_shipped_manifest(hub, {key: tiny_models["root"] / e.folder / e.name for key, e in shipped().items()},
                           tmp_path, monkeypatch)
    data = make_dataset(tmp_path / "dataset")
    models, metrics, out = tmp_path / "models", tmp_path / "metrics", tmp_path / "run"
    args = ["dreambench", "--dataset", str(data), "--out", str(out), "--models", str(models), "--download",
            "--metric-models", str(metrics), "--subjects", "dog", "--limit-prompts", "1", "--images-per-prompt", "1",
            "--steps", "2", "--width", "64", "--height", "64", "--device", "cpu", "--quiet"]
    assert main(args) == 0, capsys.readouterr().err
    assert len(_rows(out / "scores.csv")) == 1
    for entry in shipped().values():
        assert (models / entry.folder / entry.name).is_file()
    assert (metrics / "clip-vit-b-32-openai" / "open_clip_config.json").is_file()
    gets = len(hub.gets())
    assert main(args) == 0  # everything in place: nothing fetched, nothing generated
    assert len(hub.gets()) == gets and "nothing to generate" in capsys.readouterr().err
