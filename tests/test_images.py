"""core/images.py: opening subject files up front, any depth → 8-bit RGB, alpha → subject on white."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from lambda_eclipse.core.errors import ImageFileError, InputError
from lambda_eclipse.core.images import mask_array, open_image, subject_on_white, to_rgb8


def _png_header_only(path, width, height):
    """A PNG whose header says width×height but whose pixel data is garbage: decoding it would fail."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", b"not deflate data"))


# -- open_image ------------------------------------------------------------------------------------------

def test_missing_file(tmp_path):
    with pytest.raises(ImageFileError, match=r"subject image '.*nope\.png' does not exist\. Check the path"):
        open_image(tmp_path / "nope.png")


def test_folder(tmp_path):
    with pytest.raises(ImageFileError, match=r"is a folder, not an image file\. Give the path of a \.png or \.jpg"):
        open_image(tmp_path)


def test_empty_file(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ImageFileError, match=r"empty\.jpg' is empty \(0 bytes\).*Copy it again"):
        open_image(tmp_path / "empty.jpg")


def test_text_file(tmp_path):
    (tmp_path / "page.jpg").write_text("<html>404 Not Found</html>")
    with pytest.raises(ImageFileError, match=r"page\.jpg' is not an image Pillow can read\. It looks like a text file.*Save it as PNG or JPEG"):
        open_image(tmp_path / "page.jpg")


def test_heic_is_named(tmp_path):
    (tmp_path / "photo.heic").write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64)
    with pytest.raises(ImageFileError, match=r"HEIC/HEIF photo.*export it as JPEG or PNG"):
        open_image(tmp_path / "photo.heic")


def test_truncated_jpeg_fails_up_front(tmp_path):
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8)).save(buffer, "JPEG")
    (tmp_path / "cut.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ImageFileError, match=r"cut\.jpg' could not be decoded \(.*truncated.*\)\. The file is damaged or was cut short.*copy it again"):
        open_image(tmp_path / "cut.jpg")


def test_size_cap_is_checked_from_the_header_before_decoding(tmp_path):
    _png_header_only(tmp_path / "huge.png", 10000, 8000)  # 80 MP, and no pixel data at all
    with pytest.raises(ImageFileError, match=r"huge\.png' is 10000×8000 \(80 megapixels\), over the 64 megapixels limit for a subject image\. Downscale it"):
        open_image(tmp_path / "huge.png")


def test_pillow_decompression_bomb_becomes_our_message(tmp_path, monkeypatch):
    Image.new("RGB", (40, 40)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # Pillow refuses above 2× this
    with pytest.raises(ImageFileError, match=r"bomb\.png' is too large to open safely.*downscale it first"):
        open_image(tmp_path / "bomb.png", max_pixels=None)


def test_exif_orientation_kept_and_file_released(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display
    Image.new("RGB", (40, 20), (200, 10, 10)).save(tmp_path / "rot.jpg", exif=exif)
    image = open_image(tmp_path / "rot.jpg")
    assert image.size == (20, 40)
    (tmp_path / "rot.jpg").unlink()  # no handle left open
    assert image.getpixel((5, 5))[0] > 150


def test_what_names_the_role(tmp_path):
    with pytest.raises(ImageFileError, match=r"The subject mask '.*m\.png' does not exist"):
        open_image(tmp_path / "m.png", what="subject mask")


# -- to_rgb8 -----------------------------------------------------------------------------------------------

def test_sixteen_bit_gray_is_scaled_not_clipped(tmp_path):
    ramp = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)  # 0 … 65520
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    image = Image.open(tmp_path / "g16.png")
    assert image.mode == "I;16"
    rgb, alpha = to_rgb8(image)
    arr = np.asarray(rgb)
    assert alpha is None and rgb.mode == "RGB"
    assert (arr == 255).mean() < 0.01  # Pillow's own convert("RGB") clips: 99.6% white
    np.testing.assert_array_equal(arr[..., 0], np.round(ramp / 65535 * 255).astype(np.uint8))
    big_endian = Image.frombytes("I;16B", (64, 64), ramp.astype(">u2").tobytes())
    np.testing.assert_array_equal(np.asarray(to_rgb8(big_endian)[0]), arr)


def test_sixteen_bit_arrays_and_tensors():
    gray16 = np.full((4, 4), 32768, np.uint16)
    assert np.asarray(to_rgb8(gray16)[0])[0, 0].tolist() == [128, 128, 128]
    rgba16 = np.zeros((4, 4, 4), np.uint16)
    rgba16[..., 0] = 65535
    rgba16[..., 3] = 65535
    rgba16[0, 0, 3] = 0
    rgb, alpha = to_rgb8(rgba16)
    assert np.asarray(rgb)[1, 1].tolist() == [255, 0, 0] and alpha[0, 0] == 0 and alpha[1, 1] == 1


def test_mode_i_and_f():
    as_i = Image.fromarray(np.full((4, 4), 65535, np.int32))
    assert as_i.mode == "I" and np.asarray(to_rgb8(as_i)[0])[0, 0, 0] == 255
    half = Image.fromarray(np.full((4, 4), 0.5, np.float32))
    assert half.mode == "F" and np.asarray(to_rgb8(half)[0])[0, 0, 0] == 128
    byte_range = Image.fromarray(np.full((4, 4), 200.0, np.float32))
    assert np.asarray(to_rgb8(byte_range)[0])[0, 0, 0] == 200


@pytest.mark.parametrize("mode", ["1", "L", "CMYK", "RGB", "P"])
def test_opaque_modes_give_rgb_and_no_alpha(mode):
    image = Image.new("RGB", (8, 6), (255, 255, 255)).convert(mode)
    rgb, alpha = to_rgb8(image)
    assert rgb.mode == "RGB" and rgb.size == (8, 6) and alpha is None
    assert np.asarray(rgb).min() == 255


def test_alpha_only_when_really_transparent():
    opaque = Image.new("RGBA", (8, 8), (10, 20, 30, 255))
    assert to_rgb8(opaque)[1] is None
    cut = Image.new("RGBA", (8, 8), (10, 20, 30, 0))
    cut.paste((10, 20, 30, 255), (2, 2, 6, 6))
    rgb, alpha = to_rgb8(cut)
    assert alpha.dtype == np.float32 and alpha.shape == (8, 8)
    assert alpha[3, 3] == 1.0 and alpha[0, 0] == 0.0
    assert np.asarray(rgb)[0, 0].tolist() == [10, 20, 30]  # colour kept, not premultiplied
    la = Image.new("LA", (4, 4), (100, 0))
    assert to_rgb8(la)[1].max() == 0.0
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0])
    palette.putpixel((0, 0), 1)
    palette.info["transparency"] = 0
    rgb, alpha = to_rgb8(palette)
    assert alpha is not None and alpha[0, 0] == 1.0 and alpha[1, 1] == 0.0


def test_arrays_and_tensors_like_clip_to_pil():
    rng = np.random.default_rng(0)
    floats = rng.random((6, 5, 3)).astype(np.float32)
    expected = (np.clip(floats, 0, 1) * 255 + 0.5).astype(np.uint8)  # clip.to_pil's rounding
    for value in (floats, torch.from_numpy(floats), torch.from_numpy(floats)[None], floats[None]):
        rgb, alpha = to_rgb8(value)
        np.testing.assert_array_equal(np.asarray(rgb), expected)
        assert alpha is None
    as_uint8_tensor = torch.from_numpy(expected)
    np.testing.assert_array_equal(np.asarray(to_rgb8(as_uint8_tensor)[0]), expected)  # not ×255 again
    rgba = np.concatenate([floats, np.zeros((6, 5, 1), np.float32)], -1)
    rgba[2:4, 2:4, 3] = 1.0
    rgb, alpha = to_rgb8(torch.from_numpy(rgba))
    np.testing.assert_array_equal(np.asarray(rgb), expected)
    assert alpha[2, 2] == 1 and alpha[0, 0] == 0
    assert to_rgb8(np.zeros((4, 4), np.uint8))[0].size == (4, 4)


def test_array_errors_say_what_to_do():
    with pytest.raises(InputError, match="got a batch of 2. Pass the images one at a time"):
        to_rgb8(torch.zeros(2, 4, 4, 3))
    with pytest.raises(InputError, match=r"channels first; expected \[H,W,C\].*transpose\(1, 2, 0\)"):
        to_rgb8(np.zeros((3, 16, 16), np.float32))
    with pytest.raises(InputError, match=r"values up to 255; float images must be 0…1.*Divide it by 255"):
        to_rgb8(np.full((4, 4, 3), 255.0, np.float32))
    with pytest.raises(InputError, match="NaN or infinite"):
        to_rgb8(np.full((4, 4, 3), np.nan, np.float32))


# -- subject_on_white and masks ----------------------------------------------------------------------------

def test_alpha_is_the_subject_blended_on_white():
    cut = np.zeros((10, 10, 4), np.uint8)
    cut[..., :3] = (0, 0, 200)
    cut[3:7, 2:8, 3] = 255
    cut[3, 2, 3] = 128  # a soft edge pixel
    rgb, keep = subject_on_white(Image.fromarray(cut, "RGBA"))
    arr = np.asarray(rgb)
    assert arr[0, 0].tolist() == [255, 255, 255] and arr[5, 5].tolist() == [0, 0, 200]
    assert arr[3, 2].tolist() == [127, 127, 227]  # 50% blue over white
    assert keep.dtype == bool and keep.sum() == 24 and keep[3, 2]


def test_explicit_mask_is_thresholded_like_clip_to_mask_and_combined_with_alpha():
    image = np.full((10, 10, 3), 50, np.uint8)
    mask = np.zeros((10, 10), np.float32)
    mask[2:5, 2:5] = 0.9
    rgb, keep = subject_on_white(image, mask)
    assert keep.sum() == 9 and np.asarray(rgb)[3, 3].tolist() == [50, 50, 50]
    assert np.asarray(rgb)[0, 0].tolist() == [255, 255, 255]
    with_alpha = np.concatenate([image, np.full((10, 10, 1), 255, np.uint8)], -1)
    with_alpha[2, 2, 3] = 0
    _, keep = subject_on_white(with_alpha, mask)
    assert keep.sum() == 8 and not keep[2, 2]
    rgb, keep = subject_on_white(image)
    assert keep is None and np.asarray(rgb)[0, 0].tolist() == [50, 50, 50]


def test_fully_transparent_subject_is_refused():
    with pytest.raises(InputError, match=r"subject image is fully transparent.*Re-export it with the subject opaque"):
        subject_on_white(Image.new("RGBA", (8, 8), (255, 0, 0, 0)))


def test_mask_array_matches_clip_to_mask():
    from lambda_eclipse.core.clip import to_mask

    rng = np.random.default_rng(1)
    for mask in (rng.random((20, 30)).astype(np.float32), (rng.random((1, 20, 30)) * 255).astype(np.uint8),
                 Image.fromarray((rng.random((10, 15)) * 255).astype(np.uint8))):
        np.testing.assert_array_equal(mask_array(mask, (30, 20)) > 0.5, to_mask(mask, (30, 20)))
    sixteen = Image.fromarray(np.full((4, 4), 40000, np.uint16))
    assert mask_array(sixteen, (4, 4)).min() > 0.6  # 16-bit mask files scaled, not clipped
