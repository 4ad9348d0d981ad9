"""`python -m lambda_eclipse download` against a loopback fake of the hub's resolve endpoint (no internet).

The fake answers HEAD/GET on {endpoint}/{repo}/resolve/{revision}/{file} the way hf_hub_download expects
(X-Repo-Commit, ETag = sha256, Content-Length, Range → 206, optional LFS-style 302 with X-Linked-Etag /
X-Linked-Size), and can drop a connection mid-body, lie about a hash or fail a GET.
"""

import argparse
import hashlib
import json
import os
import random
import socket
import threading
import unittest.mock as mock
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

import pytest

from lambda_eclipse.core import download as dl
from lambda_eclipse.core.download import (
    ManifestEntry, add_download_parser, download_models, load_manifest, manifest_url, parse_manifest,
)
from lambda_eclipse.core.errors import InputError, MissingModelsError, ModelFileError

COMMIT = "0123456789abcdef0123456789abcdef01234567"
SPEC = [  # key, repo, file, folder, name, size
    ("prior", "ECLIPSE-Community/Lambda-ECLIPSE-Prior-v1.0", "diffusion_pytorch_model.safetensors", "lambda_eclipse", "prior.safetensors", 40_000),
    ("clip_text", "stabilityai/stable-diffusion-xl-base-1.0", "text_encoder_2/model.fp16.safetensors", "text_encoders", "clip_g.safetensors", 50_000),
    ("clip_vision", "comfyanonymous/clip_vision_g", "clip_vision_g.safetensors", "clip_vision", "clip_vision_g.safetensors", 60_000),
    ("decoder_unet", "kandinsky-community/kandinsky-2-2-decoder", "unet/diffusion_pytorch_model.safetensors", "diffusion_models", "unet.safetensors", 300_000),
    ("decoder_movq", "kandinsky-community/kandinsky-2-2-decoder", "movq/diffusion_pytorch_model.safetensors", "vae", "movq.safetensors", 30_000),
]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class FakeHub:
    def __init__(self):
        self.files: dict[tuple[str, str], bytes] = {}  # (repo, file) → content
        self.etag: dict[str, str] = {}  # file → a (lying) etag to advertise
        self.corrupt: set[str] = set()  # files whose body is served with one byte flipped
        self.drop_once: set[str] = set()  # files whose first GET is cut mid-body
        self.fail_get: set[str] = set()  # files whose GET answers 500
        self.redirect: set[str] = set()  # files served LFS-style through a 302 to another host
        self.stall: set[str] = set()  # files whose every GET sends the headers, then closes without a byte of body
        self.requests: list[tuple[str, str, str | None]] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def gets(self, file=None):
        """GETs of file content (resolve and CDN URLs). huggingface_hub also asks {endpoint}/api/… for its own
        bookkeeping (e.g. /api/agent-harnesses, at most once a day): those are no download and are not counted."""
        return [r for r in self.requests if r[0] == "GET" and not r[1].startswith("/api/")
                and (file is None or r[1].endswith(file))]

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self.answer(body=False)

            def do_GET(self):
                self.answer(body=True)

            def send(self, status, headers, data=b""):
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if data and self.command == "GET":
                    self.wfile.write(data)

            def answer(self, body: bool):
                path = unquote(self.path.split("?")[0])
                with hub.lock:
                    hub.requests.append((self.command, path, self.headers.get("Range")))
                if path.startswith("/cdn/"):
                    found = [(f, c) for (_, f), c in hub.files.items() if sha(c) == path[5:]]
                    if not found:
                        return self.send(404, {})
                    return self.content(found[0][1], path[5:], found[0][0], extra={})
                parts = path.lstrip("/").split("/")
                if len(parts) < 5 or parts[2] != "resolve":
                    return self.send(404, {"X-Error-Code": "RepoNotFound"})
                repo, revision, file = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
                if revision != "main" or (repo, file) not in hub.files:
                    return self.send(404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT})
                content = hub.files[(repo, file)]
                etag = hub.etag.get(file, sha(content))
                if file in hub.redirect:
                    return self.send(302, {
                        "Location": f"http://localhost:{hub.port}/cdn/{sha(content)}", "X-Repo-Commit": COMMIT,
                        "X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(len(content)), "ETag": '"abc"',
                    })
                if body and file in hub.fail_get:
                    return self.send(500, {"X-Repo-Commit": COMMIT}, b"boom")
                if body and file in hub.corrupt:
                    content = bytes([content[0] ^ 0xFF]) + content[1:]
                self.content(content, etag, file, extra={"X-Repo-Commit": COMMIT})

            def content(self, content: bytes, etag: str, key: str, extra: dict):
                """Serve `content` (repo file `key`), honouring `Range: bytes=N-`."""
                start = 0
                rng = self.headers.get("Range")
                if rng and rng.startswith("bytes=") and self.command == "GET":
                    start = int(rng[6:].split("-")[0])
                status = 206 if start else 200
                self.send_response(status)
                for k, v in {**extra, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}.items():
                    self.send_header(k, v)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(content) - 1}/{len(content)}")
                self.send_header("Content-Length", str(len(content) - start))
                self.end_headers()
                if self.command != "GET":
                    return
                data = content[start:]
                if key in hub.stall:
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                if key in hub.drop_once:
                    hub.drop_once.discard(key)
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                self.wfile.write(data)

        return Handler

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _point_hub_at(monkeypatch, endpoint: str, cache: Path, offline: bool = False):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # huggingface_hub reads these once at import; the conftest imported it with HF_HUB_OFFLINE=1
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_PROGRESS_BARS", True)


@pytest.fixture
def hub(monkeypatch, tmp_path):
    fake = FakeHub()
    rng = random.Random(7)
    for key, repo, file, folder, name, size in SPEC:
        fake.files[(repo, file)] = rng.randbytes(size)
    _point_hub_at(monkeypatch, fake.endpoint, tmp_path / "hf-cache")
    yield fake
    fake.close()


def write_manifest(hub, path: Path, unknown=(), overrides=None) -> Path:
    entries = []
    for key, repo, file, folder, name, size in SPEC:
        content = hub.files[(repo, file)]
        entry = {"key": key, "what": f"test {key}", "repo": repo, "file": file, "revision": "main",
                 "folder": folder, "name": name, "size": len(content), "sha256": sha(content)}
        if key in unknown:
            entry["size"] = entry["sha256"] = None
        entry.update((overrides or {}).get(key, {}))
        entries.append(entry)
    path.write_text(json.dumps(entries))
    return path


@pytest.fixture
def setup(hub, tmp_path):
    models = tmp_path / "models"
    models.mkdir()  # download never creates a --models folder that does not exist (a typo would be filled silently)
    manifest = write_manifest(hub, tmp_path / "manifest.json")
    return hub, models, manifest


def dest_of(models, key):
    row = next(r for r in SPEC if r[0] == key)
    return models / row[3] / row[4]


def content_of(hub, key):
    row = next(r for r in SPEC if r[0] == key)
    return hub.files[(row[1], row[2])]


def leftovers(models: Path):
    return [p for p in models.rglob("*") if p.name.startswith(dl.TMP_PREFIX) or p.name.endswith((".incomplete", ".tmp"))]


# ------------------------------------------------------------------------------------------ the manifest


def test_shipped_manifest_is_valid_and_complete():
    entries = load_manifest()
    assert [e.key for e in entries] == ["prior", "clip_text", "clip_vision", "decoder_unet", "decoder_movq"]
    assert {e.group for e in entries} == {"prior", "clip", "decoder"}
    for e in entries:
        assert manifest_url(e) == f"https://huggingface.co/{e.repo}/resolve/{e.revision}/{e.file}"
        assert e.sha256 is None or len(e.sha256) == 64
    assert len({e.relpath for e in entries}) == 5


def test_manifest_url_format():
    e = ManifestEntry("k", "w", "owner/repo", "sub/file.safetensors", "main", "vae", "x.safetensors")
    assert manifest_url(e) == "https://huggingface.co/owner/repo/resolve/main/sub/file.safetensors"
    assert e.dest("/m") == Path("/m/vae/x.safetensors")


GOOD = {"key": "prior", "what": "w", "repo": "a/b", "file": "f.safetensors", "revision": "main",
        "folder": "lambda_eclipse", "name": "p.safetensors", "size": 1, "sha256": "a" * 64}


@pytest.mark.parametrize("change, message", [
    ({"sha256": "xyz"}, "sha256 must be 64 hexadecimal"),
    ({"sha256": "a" * 63}, "sha256 must be 64 hexadecimal"),
    ({"folder": "../outside"}, "path traversal"),
    ({"folder": "/etc"}, "absolute path"),
    ({"folder": "C:/models"}, "absolute path"),
    ({"name": "../p.safetensors"}, "must be a file name"),
    ({"name": ".."}, "path traversal"),
    ({"name": "a\\b.safetensors"}, "backslash"),
    ({"file": "a/../../b"}, "path traversal"),
    ({"size": -1}, "size must be a byte count"),
    ({"size": "12"}, "size must be a byte count"),
    ({"repo": "no-slash"}, "owner/name"),
    ({"revision": ""}, "revision must be a non-empty string"),
    ({"extra": 1}, "unknown field(s) extra"),
])
def test_manifest_validation_errors(change, message):
    with pytest.raises(InputError) as err:
        parse_manifest([{**GOOD, **change}], "m.json")
    assert message in str(err.value) and "m.json" in str(err.value)


def test_manifest_missing_fields_and_duplicates(tmp_path):
    with pytest.raises(InputError) as err:
        parse_manifest([{k: v for k, v in GOOD.items() if k not in ("sha256", "size")}])
    assert "missing field(s) size, sha256" in str(err.value)
    with pytest.raises(InputError, match="duplicate folder/name"):
        parse_manifest([GOOD, {**GOOD, "key": "other", "name": "P.safetensors"}])
    with pytest.raises(InputError, match="duplicate key"):
        parse_manifest([GOOD, {**GOOD, "name": "q.safetensors"}])
    assert parse_manifest([{**GOOD, "sha256": None, "size": None, "_comment": "ok"}])[0].sha256 is None
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        load_manifest(bad)
    with pytest.raises(InputError, match="Cannot read the manifest"):
        load_manifest(tmp_path / "absent.json")


# ------------------------------------------------------------------------------------------ downloading


def test_fetches_into_the_comfyui_folders_then_skips(setup):
    hub, models, manifest = setup
    lines = []
    report = download_models(models, manifest=manifest, log=lines.append)
    for key, *_ in SPEC:
        assert dest_of(models, key).read_bytes() == content_of(hub, key)
    assert len(report.fetched) == 5 and not report.skipped
    assert report.bytes_fetched == sum(r[5] for r in SPEC)
    assert f"({report.bytes_fetched} bytes)" in lines[-1]
    assert not leftovers(models)
    assert (models / dl.MARKER_NAME).is_file()

    gets = len(hub.gets())
    hashed = []
    real = dl.sha256_file
    dl_sha = lambda p: hashed.append(p) or real(p)  # noqa: E731
    with mock.patch.object(dl, "sha256_file", dl_sha):
        lines.clear()
        again = download_models(models, manifest=manifest, log=lines.append)
    assert len(again.skipped) == 5 and not again.fetched and again.bytes_fetched == 0
    assert len(hub.gets()) == gets, "a second run must not download anything"
    assert not hashed, "verified files are not hashed again while size and mtime are unchanged"
    assert sum(line.endswith("— skipped") for line in lines) == 5

    with mock.patch.object(dl, "sha256_file", dl_sha):
        download_models(models, manifest=manifest, log=lines.append, rehash=True)
    assert len(hashed) == 5


def test_only_filters_by_group(setup):
    hub, models, manifest = setup
    report = download_models(models, only="clip", manifest=manifest, log=lambda s: None)
    assert sorted(p.name for p in report.fetched) == ["clip_g.safetensors", "clip_vision_g.safetensors"]
    assert not dest_of(models, "prior").exists() and not dest_of(models, "decoder_unet").exists()
    report = download_models(models, only=["prior", "decoder"], manifest=manifest, log=lambda s: None)
    assert len(report.fetched) == 3
    with pytest.raises(InputError) as err:
        download_models(models, only="prior,vae", manifest=manifest, log=lambda s: None)
    assert "'vae'" in str(err.value) and "prior, clip, decoder" in str(err.value)


def test_hub_reporting_another_hash_is_refused_before_downloading(setup, tmp_path):
    hub, models, _ = setup
    manifest = write_manifest(hub, tmp_path / "m2.json", overrides={"clip_vision": {"sha256": "b" * 64}})
    with pytest.raises(ModelFileError) as err:
        download_models(models, only="clip_vision", manifest=manifest, log=lambda s: None)
    text = str(err.value)
    assert "b" * 64 in text and sha(content_of(hub, "clip_vision")) in text and "clip_vision_g.safetensors" in text
    assert not hub.gets() and not dest_of(models, "clip_vision").exists()


def test_corrupt_download_is_deleted_and_reported(setup):
    hub, models, manifest = setup
    hub.corrupt.add("movq/diffusion_pytorch_model.safetensors")
    with pytest.raises(ModelFileError) as err:
        download_models(models, only="decoder_movq", manifest=manifest, log=lambda s: None)
    good = sha(content_of(hub, "decoder_movq"))
    text = str(err.value)
    assert "failed verification" in text and f"expected {good}" in text and "got " in text
    assert "movq.safetensors" in text
    assert not dest_of(models, "decoder_movq").exists()
    assert not leftovers(models)


def test_unknown_hash_is_checked_against_the_hub(setup, tmp_path):
    hub, models, _ = setup
    manifest = write_manifest(hub, tmp_path / "m3.json", unknown=("prior",))
    lines = []
    download_models(models, only="prior", manifest=manifest, log=lines.append)
    assert dest_of(models, "prior").read_bytes() == content_of(hub, "prior")
    assert any("manifest has no sha256" in line and sha(content_of(hub, "prior")) in line for line in lines)
    # a body that does not match the hub's own hash is refused too
    dest_of(models, "prior").unlink()
    hub.corrupt.add("diffusion_pytorch_model.safetensors")
    with pytest.raises(ModelFileError, match="from the hub"):
        download_models(models, only="prior", manifest=manifest, log=lambda s: None)
    assert not dest_of(models, "prior").exists()


def test_interrupted_transfer_is_resumed(setup, monkeypatch):
    from huggingface_hub import constants

    hub, models, manifest = setup
    name = "unet/diffusion_pytorch_model.safetensors"
    hub.drop_once.add(name)  # the first GET sends 150 000 of 300 000 bytes, then closes the connection
    # huggingface_hub writes whole chunks (10 MB by default): 64 KiB ones make the resume point visible here
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 1 << 16)
    report = download_models(models, only="decoder_unet", manifest=manifest, log=lambda s: None)
    assert dest_of(models, "decoder_unet").read_bytes() == content_of(hub, "decoder_unet")
    gets = hub.gets(name)
    # huggingface_hub retried within the same call (after 1 s) and asked only for what it had not written
    assert len(gets) == 2 and gets[0][2] is None and gets[1][2] == f"bytes={2 << 16}-"
    assert report.bytes_fetched == 300_000 and not leftovers(models)


def test_failed_transfer_reports_then_a_rerun_succeeds(setup):
    hub, models, manifest = setup
    name = "unet/diffusion_pytorch_model.safetensors"
    hub.fail_get.add(name)
    with pytest.raises(MissingModelsError) as err:
        download_models(models, only="decoder", manifest=manifest, log=lambda s: None)
    text = str(err.value)
    assert "1 model file(s) could not be downloaded" in text and "the hub answered HTTP 500" in text
    assert str(dest_of(models, "decoder_unet")) in text
    assert "The other 1 file(s) are in place" in text
    assert not dest_of(models, "decoder_unet").exists() and dest_of(models, "decoder_movq").is_file()
    assert not leftovers(models)
    hub.fail_get.clear()
    report = download_models(models, only="decoder", manifest=manifest, log=lambda s: None)
    assert [p.name for p in report.fetched] == ["unet.safetensors"] and len(report.skipped) == 1


def test_lfs_style_redirect_to_another_host(setup):
    hub, models, manifest = setup
    hub.redirect.add("clip_vision_g.safetensors")
    download_models(models, only="clip_vision", manifest=manifest, log=lambda s: None)
    assert dest_of(models, "clip_vision").read_bytes() == content_of(hub, "clip_vision")
    assert any(r[1].startswith("/cdn/") for r in hub.gets())


def test_wrong_existing_file_is_replaced(setup):
    hub, models, manifest = setup
    dest = dest_of(models, "decoder_movq")
    dest.parent.mkdir(parents=True)
    dest.write_bytes(b"\0" * 30_000)  # right size, wrong content
    lines = []
    report = download_models(models, only="decoder_movq", manifest=manifest, log=lines.append)
    assert dest.read_bytes() == content_of(hub, "decoder_movq") and report.fetched == [dest]
    assert any("its sha256 is" in line for line in lines)


def test_missing_file_on_the_hub(setup, tmp_path):
    hub, models, _ = setup
    manifest = write_manifest(hub, tmp_path / "m4.json", overrides={"prior": {"file": "nope.safetensors"}})
    with pytest.raises(MissingModelsError) as err:
        download_models(models, only="prior", manifest=manifest, log=lambda s: None)
    assert "has no file 'nope.safetensors'" in str(err.value)


def test_offline_says_what_is_missing_and_where_it_goes(setup, monkeypatch):
    hub, models, manifest = setup
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(MissingModelsError) as err:
        download_models(models, manifest=manifest, log=lambda s: None)
    text = str(err.value)
    assert "5 model file(s) could not be downloaded because offline mode is on (HF_HUB_OFFLINE=1)" in text
    for key, repo, file, *_ in SPEC:
        assert str(dest_of(models, key)) in text
        assert f"https://huggingface.co/{repo}/resolve/main/{file}" in text
    assert "unset HF_HUB_OFFLINE" in text and "curl -L -C -" in text
    assert not hub.requests


def test_offline_uses_the_huggingface_cache(setup, monkeypatch, tmp_path):
    hub, models, manifest = setup
    from huggingface_hub import constants

    content = content_of(hub, "prior")
    repo_dir = Path(constants.HF_HUB_CACHE) / "models--ECLIPSE-Community--Lambda-ECLIPSE-Prior-v1.0"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(COMMIT)
    (repo_dir / "blobs").mkdir()
    (repo_dir / "blobs" / sha(content)).write_bytes(content)
    snap = repo_dir / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    os.symlink(repo_dir / "blobs" / sha(content), snap / "diffusion_pytorch_model.safetensors")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    lines = []
    report = download_models(models, only="prior", manifest=manifest, log=lines.append)
    assert dest_of(models, "prior").read_bytes() == content and report.bytes_fetched == 0
    assert any("Hugging Face cache" in line for line in lines) and not hub.requests


def test_unreachable_endpoint(setup, monkeypatch, tmp_path):
    hub, models, manifest = setup
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    _point_hub_at(monkeypatch, dead, tmp_path / "hf-cache")
    with pytest.raises(MissingModelsError) as err:
        download_models(models, only="clip", manifest=manifest, log=lambda s: None)
    text = str(err.value)
    assert "2 model file(s) could not be downloaded" in text and f"could not reach {dead}" in text
    assert "Check your connection" in text and str(dest_of(models, "clip_text")) in text


# ------------------------------------------------------------------------------------------ command line


def _parser():
    parser = argparse.ArgumentParser(prog="python -m lambda_eclipse")
    add_download_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def test_cli_download(setup, capsys):
    hub, models, manifest = setup
    args = _parser().parse_args(["download", "--models", str(models), "--only", "prior,clip", "--manifest", str(manifest)])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "fetched 3 file(s)" in out
    assert dest_of(models, "prior").is_file() and not dest_of(models, "decoder_movq").exists()
    args = _parser().parse_args(["download", "--models", str(models), "--only", "bogus", "--manifest", str(manifest)])
    with pytest.raises(InputError, match="choose from prior, clip, decoder"):
        args.func(args)


def test_cli_needs_a_models_folder(monkeypatch):
    monkeypatch.delenv("COMFYUI_MODELS", raising=False)
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    args = _parser().parse_args(["download"])
    with pytest.raises(InputError, match="--models"):
        args.func(args)


def serve_shipped_manifest(hub, files: dict, tmp_path, monkeypatch):
    """The fake hub serves, under the shipped manifest's repos and names, the given local file for each key, and
    `download` uses a manifest with those files' sizes and hashes."""
    from lambda_eclipse.core import download as download_module
    from lambda_eclipse.core.paths import manifest as shipped

    entries = []
    for key, entry in shipped().items():
        content = Path(files[key]).read_bytes()
        hub.files[(entry.repo, entry.file)] = content
        entries.append({"key": key, "what": entry.what, "repo": entry.repo, "file": entry.file, "revision": "main",
                        "folder": entry.folder, "name": entry.name, "size": len(content), "sha256": sha(content)})
    test_manifest = tmp_path / "manifest.json"
    test_manifest.write_text(json.dumps(entries))
    monkeypatch.setattr(download_module, "MANIFEST_PATH", test_manifest)


def test_generate_with_download_makes_an_image_on_a_fresh_machine(hub, tmp_path, monkeypatch, capsys):
    """The README's run command with --download: the five files come from the (loopback) hub, then an image."""
    from lambda_eclipse.core.cli import main
    from lambda_eclipse.core.paths import manifest as shipped
    from lambda_eclipse.core.tiny import write_tiny_single_files
    from PIL import Image

    tiny = write_tiny_single_files(tmp_path / "tiny")
    files = {"prior": tiny["prior_file"], **{k: tiny[k] for k in ("clip_text", "clip_vision", "decoder_unet", "decoder_movq")}}
    serve_shipped_manifest(hub, files, tmp_path, monkeypatch)
    photo = tmp_path / "dog.png"
    Image.new("RGB", (80, 60), (150, 90, 40)).save(photo)
    models, out = tmp_path / "models", tmp_path / "out.png"
    models.mkdir()  # an empty models/ folder, as on a fresh install
    argv = ["generate", "--models", str(models), "--download", "--prompt", "a dog on a beach", "--subject", f"dog={photo}",
            "--steps", "2", "--width", "64", "--height", "64", "--device", "cpu", "--quiet", "--out", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    assert Image.open(out).size == (64, 64)
    for entry in shipped().values():
        assert (models / entry.folder / entry.name).is_file()
    gets = len(hub.gets())
    out.unlink()
    assert main(argv) == 0  # a second run finds every file and fetches nothing
    assert len(hub.gets()) == gets


# ------------------------------------------------------------------------------------ folders, disks, messages


def test_a_models_folder_that_does_not_exist_is_refused_and_not_created(hub, tmp_path, monkeypatch):
    manifest = write_manifest(hub, tmp_path / "manifest.json")
    typo = tmp_path / "ComfyUI" / "modles"
    args = _parser().parse_args(["download", "--models", str(typo), "--manifest", str(manifest)])
    with pytest.raises(InputError) as err:
        args.func(args)
    assert f"--models {typo} does not exist, and nothing was created" in str(err.value)
    assert "mkdir -p" in str(err.value)
    monkeypatch.delenv("COMFYUI_MODELS", raising=False)
    monkeypatch.setenv("COMFYUI_PATH", str(tmp_path / "ComfyUI"))  # the environment's folder is checked the same way
    args = _parser().parse_args(["download", "--manifest", str(manifest)])
    with pytest.raises(InputError, match=r"\$COMFYUI_PATH/models .* does not exist"):
        args.func(args)
    assert not (tmp_path / "ComfyUI").exists() and not hub.requests


def test_generate_download_into_a_mistyped_models_folder_creates_nothing(hub, tmp_path, capsys):
    from lambda_eclipse.core.cli import main

    typo = tmp_path / "modles"
    assert main(["generate", "--models", str(typo), "--download", "--prompt", "a dog", "--out",
                 str(tmp_path / "x.png")]) == 2
    assert f"--models {typo} does not exist, and nothing was created" in capsys.readouterr().err
    assert not typo.exists() and not hub.requests


def test_the_library_makes_a_new_folder_only_with_its_first_file(setup, tmp_path):
    hub, _, manifest = setup
    fresh = tmp_path / "metrics"  # evaluate's metric models go to a folder of their own, made on demand
    hub.fail_get.add("diffusion_pytorch_model.safetensors")
    with pytest.raises(MissingModelsError):
        download_models(fresh, only="prior", manifest=manifest, log=lambda s: None)
    assert not fresh.exists()
    hub.fail_get.clear()
    download_models(fresh, only="prior", manifest=manifest, log=lambda s: None)
    assert dest_of(fresh, "prior").read_bytes() == content_of(hub, "prior")


def test_a_models_path_that_is_a_file_is_called_a_file(hub, tmp_path):
    manifest = write_manifest(hub, tmp_path / "manifest.json")
    (tmp_path / "models.txt").write_text("mine")
    with pytest.raises(InputError, match="is a file, not a folder"):
        download_models(tmp_path / "models.txt", manifest=manifest, log=lambda s: None)
    args = _parser().parse_args(["download", "--models", str(tmp_path / "models.txt"), "--manifest", str(manifest)])
    with pytest.raises(InputError, match="is a file, not a folder"):
        args.func(args)
    assert (tmp_path / "models.txt").read_text() == "mine"


def test_models_inside_a_comfyui_folder_is_made_when_the_first_file_arrives(hub, tmp_path):
    comfy = tmp_path / "ComfyUI"
    (comfy / "custom_nodes").mkdir(parents=True)
    (comfy / "main.py").write_text("# ComfyUI")
    manifest = write_manifest(hub, tmp_path / "manifest.json")
    download_models(comfy / "models", only="prior", manifest=manifest, log=lambda s: None)
    assert dest_of(comfy / "models", "prior").read_bytes() == content_of(hub, "prior")


def test_a_failed_file_leaves_no_empty_folder_behind(setup):
    hub, models, manifest = setup
    hub.fail_get.add("unet/diffusion_pytorch_model.safetensors")
    with pytest.raises(MissingModelsError):
        download_models(models, only="decoder_unet", manifest=manifest, log=lambda s: None)
    assert list(models.iterdir()) == []  # no models/diffusion_models/ made for a file that never came


def test_offline_creates_nothing(setup, monkeypatch):
    from huggingface_hub import constants

    hub, models, manifest = setup
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(MissingModelsError):
        download_models(models, manifest=manifest, log=lambda s: None)
    assert list(models.iterdir()) == []


def _full_disk_on(monkeypatch, file: str):
    """The download of `file` fails the way a full disk does, after writing part of it."""
    import huggingface_hub

    real = huggingface_hub.hf_hub_download

    def download(repo_id, filename, **kwargs):
        if filename == file:
            partial = Path(kwargs["local_dir"]) / "partial.incomplete"
            partial.parent.mkdir(parents=True, exist_ok=True)
            partial.write_bytes(b"x" * 100)
            raise OSError(28, "No space left on device")
        return real(repo_id, filename, **kwargs)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)


def _no_room_in(monkeypatch, folder: str):
    real_usage = dl.shutil.disk_usage
    monkeypatch.setattr(dl.shutil, "disk_usage",
                        lambda p: real_usage(p)._replace(free=10) if Path(p).name == folder else real_usage(p))


def test_disk_filling_during_file_1_reports_file_1(setup, monkeypatch):
    hub, models, manifest = setup
    _full_disk_on(monkeypatch, "diffusion_pytorch_model.safetensors")  # the prior, file 1 of 3
    _no_room_in(monkeypatch, "text_encoders")  # and afterwards the disk is full for file 2
    with pytest.raises(ModelFileError) as err:
        download_models(models, only="prior,clip", manifest=manifest, log=lambda s: None)
    text = str(err.value)
    assert "The disk filled up while writing prior (prior.safetensors)" in text and "No space left on device" in text
    assert "Not tried: clip_text, clip_vision." in text
    assert not dest_of(models, "prior").exists() and not leftovers(models) and list(models.iterdir()) == []


def test_a_later_free_space_error_also_names_the_earlier_failures(setup, monkeypatch):
    hub, models, manifest = setup
    hub.fail_get.add("diffusion_pytorch_model.safetensors")  # file 1: the hub fails
    _no_room_in(monkeypatch, "text_encoders")  # file 2: no room
    with pytest.raises(ModelFileError) as err:
        download_models(models, only="prior,clip", manifest=manifest, log=lambda s: None)
    text = str(err.value)
    assert text.startswith("Not enough free space in") and "clip_g.safetensors" in text
    assert "Before that, 1 file(s) could not be downloaded:" in text and "prior (" in text and "HTTP 500" in text
    assert "Not tried: clip_vision." in text


def test_a_stalled_transfer_gives_one_message_per_file(setup, monkeypatch):
    import logging
    import time as real_time
    import types

    from huggingface_hub import file_download

    hub, models, manifest = setup
    hub.stall.update({"diffusion_pytorch_model.safetensors", "clip_vision_g.safetensors"})
    # huggingface_hub waits 1 s before each of its 5 retries: not here
    no_wait = {k: getattr(real_time, k) for k in dir(real_time) if not k.startswith("_")}
    no_wait["sleep"] = lambda seconds: None
    monkeypatch.setattr(file_download, "time", types.SimpleNamespace(**no_wait))
    seen = []
    catcher = logging.Handler(logging.WARNING)
    catcher.emit = seen.append
    logging.getLogger("huggingface_hub").addHandler(catcher)
    lines = []
    try:
        with pytest.raises(MissingModelsError) as err:
            download_models(models, only="prior,clip_vision", manifest=manifest, log=lines.append)
    finally:
        logging.getLogger("huggingface_hub").removeHandler(catcher)
    assert [r.getMessage() for r in seen] == []  # none of its per-retry warnings reached a terminal
    said = [line for line in lines if "was interrupted" in line]
    assert len(said) == 2 and "prior.safetensors was interrupted 6 time(s)" in said[0], said
    assert "clip_vision_g.safetensors" in said[1]
    assert "2 model file(s) could not be downloaded" in str(err.value)
    assert list(models.iterdir()) == [] and len(hub.gets("clip_vision_g.safetensors")) == 6


# ------------------------------------------------------------------------------------ sizes


def test_the_prior_prints_its_approximate_size_not_size_unknown(tmp_path, capsys):
    from lambda_eclipse.core.cli import main
    from lambda_eclipse.core.paths import manifest as shipped

    prior = shipped()["prior"]
    assert prior.size is None and prior.approx_size == 139_000_000
    assert prior.size_text() == "~139 MB" and "(~139 MB)" in prior.describe(tmp_path)
    assert main(["check", "--models", str(tmp_path)]) == 2
    out = capsys.readouterr().out
    assert "(~139 MB)" in out and "size unknown" not in out


def test_approx_size_is_validated():
    assert parse_manifest([{**GOOD, "approx_size": 5}])[0].approx_size == 5
    with pytest.raises(InputError, match="approx_size must be a byte count"):
        parse_manifest([{**GOOD, "approx_size": "139 MB"}])


def test_a_verified_download_records_the_exact_size(setup, tmp_path, monkeypatch):
    from huggingface_hub import constants

    from lambda_eclipse.core.download import human_size

    hub, models, _ = setup
    manifest = write_manifest(hub, tmp_path / "m5.json", overrides={"prior": {"size": None, "approx_size": 39_000}})
    entry = next(e for e in load_manifest(manifest) if e.key == "prior")
    assert entry.size_text(models) == "~39 KB"
    download_models(models, only="prior", manifest=manifest, log=lambda s: None)
    marker = json.loads((models / dl.MARKER_NAME).read_text())
    assert marker["files"]["lambda_eclipse/prior.safetensors"]["size"] == 40_000
    assert entry.exact_size(models) == 40_000 and entry.size_text(models) == human_size(40_000) == "40.00 KB"
    assert "(40.00 KB)" in entry.describe(models)
    # measured once, known after the file is gone too (e.g. in the offline message that asks for it again)
    dest_of(models, "prior").unlink()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(MissingModelsError) as err:
        download_models(models, only="prior", manifest=manifest, log=lambda s: None)
    assert "[prior] (40.00 KB)" in str(err.value)
    # a record of another file (another sha256) is not this file's size
    other = write_manifest(hub, tmp_path / "m6.json", overrides={"prior": {"size": None, "sha256": "c" * 64}})
    assert next(e for e in load_manifest(other) if e.key == "prior").exact_size(models) is None


def test_verify_uses_the_recorded_size(setup, tmp_path, monkeypatch):
    from lambda_eclipse.core import verify as verify_module

    hub, models, _ = setup
    manifest = write_manifest(hub, tmp_path / "m7.json", overrides={"prior": {"size": None}})
    download_models(models, only="prior", manifest=manifest, log=lambda s: None)
    entry = next(e for e in load_manifest(manifest) if e.key == "prior")
    monkeypatch.setattr(verify_module, "manifest", lambda: {"prior": entry})
    assert verify_module._size_matches_manifest("prior", dest_of(models, "prior")) is None
    dest_of(models, "prior").write_bytes(b"y" * 123)
    assert "is 123 bytes but the published file is 40,000 bytes" in verify_module._size_matches_manifest(
        "prior", dest_of(models, "prior"))
