"""A FIFO, a device or a folder where a file is expected is refused at once, by name: never a hang, never a read
that grows until the machine runs out of memory."""

from __future__ import annotations

import os
import threading

import pytest

from lambda_eclipse.core.errors import ImageFileError, LambdaEclipseError, ModelFileError

pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs POSIX FIFOs")


def _within(seconds, call):
    """Run `call` in a daemon thread; fail (instead of hanging the suite) if it does not return in time."""
    result = {}

    def run():
        try:
            result["value"] = call()
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{call} blocked for {seconds} s"
    if "error" in result:
        raise result["error"]
    return result.get("value")


@pytest.fixture()
def fifo(tmp_path):
    path = tmp_path / "model.safetensors"
    os.mkfifo(path)
    return path


def test_model_readers_refuse_a_fifo(fifo):
    from lambda_eclipse.core.clip_formats import read_safetensors_header, sniff_clip
    from lambda_eclipse.core.decoder_files import sniff_decoder_file
    from lambda_eclipse.core.loading import load_state_dict, read_safetensors_metadata
    from lambda_eclipse.core.prior import load_prior, sniff_prior

    for call in (load_state_dict, read_safetensors_metadata, read_safetensors_header, sniff_decoder_file, sniff_prior,
                 load_prior, sniff_clip):
        with pytest.raises(LambdaEclipseError, match="FIFO"):
            _within(10, lambda: call(fifo))


def test_menus_skip_a_fifo(fifo):
    from lambda_eclipse.core.paths import clip_towers, decoder_part, is_prior_file

    assert _within(10, lambda: (clip_towers(fifo), decoder_part(fifo), is_prior_file(fifo))) == (frozenset(), None, False)


def test_json_readers_refuse_devices_and_fifos(tmp_path):
    from lambda_eclipse.core.loading import read_json

    pipe = tmp_path / "config.json"
    os.mkfifo(pipe)
    with pytest.raises(ModelFileError, match="FIFO"):
        _within(10, lambda: read_json(pipe))
    if os.path.exists("/dev/zero"):
        with pytest.raises(ModelFileError, match="device"):
            _within(10, lambda: read_json("/dev/zero"))
    big = tmp_path / "big.json"
    with open(big, "wb") as handle:
        handle.truncate((16 << 20) + 1)
    with pytest.raises(ModelFileError, match="too large for a JSON config"):
        read_json(big)


def test_images_name_what_the_path_is(tmp_path):
    from lambda_eclipse.core.images import open_image

    pipe = tmp_path / "dog.png"
    os.mkfifo(pipe)
    with pytest.raises(ImageFileError, match="is a FIFO"):
        _within(10, lambda: open_image(pipe))
    if os.path.exists("/dev/zero"):
        with pytest.raises(ImageFileError, match="is a device"):
            _within(10, lambda: open_image("/dev/zero"))
    with pytest.raises(ImageFileError, match="is a folder"):
        open_image(tmp_path)
