"""Canny as the official code makes it; lerp, slerp and the paper's grid."""

import cv2
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from lambda_eclipse.core.canny import as_edge_map, canny_edges, control_embedding
from lambda_eclipse.core.errors import InputError
from lambda_eclipse.core.interpolate import bilinear_grid, blend, lerp, slerp


def drawn_square(size=(120, 90)):
    img = Image.new("RGB", size, (255, 255, 255))
    ImageDraw.Draw(img).rectangle((30, 20, 90, 70), fill=(20, 40, 200))
    return img


def test_canny_finds_the_square_outline_at_full_resolution(tmp_path):
    edges = canny_edges(drawn_square())
    assert edges.shape == (90, 120, 3) and edges.dtype == np.uint8
    assert set(np.unique(edges)) <= {0, 255} and (edges[..., 0] == edges[..., 2]).all()
    ys, xs = np.nonzero(edges[..., 0])
    assert abs(xs.min() - 30) <= 1 and abs(xs.max() - 90) <= 1 and abs(ys.min() - 20) <= 1 and abs(ys.max() - 70) <= 1
    assert edges[45, 60, 0] == 0 and edges[5, 5, 0] == 0  # inside and outside are empty
    # Same as the official path on a PNG: cv.imread(..., IMREAD_GRAYSCALE) then cv.Canny(100, 200).
    path = tmp_path / "layout.png"
    drawn_square().save(path)
    official = cv2.Canny(cv2.imread(str(path), cv2.IMREAD_GRAYSCALE), 100, 200)
    assert np.array_equal(edges[..., 0], official)


def test_canny_thresholds_are_adjustable_and_checked():
    img = drawn_square()
    faint = Image.new("RGB", (120, 90), (128, 128, 128))
    ImageDraw.Draw(faint).rectangle((30, 20, 90, 70), fill=(140, 140, 140))
    assert canny_edges(faint).sum() == 0  # a weak edge under the official thresholds
    assert canny_edges(faint, 5, 10).sum() > 0
    assert canny_edges(img, 100, 200).sum() > 0
    with pytest.raises(InputError, match="low ≤ high"):
        canny_edges(img, 200, 100)


def test_edge_map_from_elsewhere_and_control_embedding(tiny_clip):
    edges = canny_edges(drawn_square())
    as_float = torch.from_numpy(edges).float() / 255
    assert np.array_equal(as_edge_map(as_float), edges)
    emb = control_embedding(tiny_clip, edges)
    assert emb.shape == (32,) and torch.allclose(emb, tiny_clip.encode_images([edges])[0])
    assert torch.equal(control_embedding(tiny_clip, None), tiny_clip.blank_embedding())


def test_lerp_and_slerp_endpoints_and_norms():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 64, generator=g), 3 * torch.randn(4, 64, generator=g)
    for fn in (lerp, slerp):
        assert torch.allclose(fn(a, b, 0.0), a, atol=1e-5) and torch.allclose(fn(a, b, 1.0), b, atol=1e-5)
    for t in (0.25, 0.5, 0.8):
        mid = slerp(a, b, t)
        expected_norm = (1 - t) * a.norm(dim=-1) + t * b.norm(dim=-1)
        assert torch.allclose(mid.norm(dim=-1), expected_norm, atol=1e-4)
        # lerp shrinks the norm between non-parallel vectors; slerp does not.
        assert (lerp(a, b, t).norm(dim=-1) < expected_norm).all()
    # Per-row t.
    t = torch.tensor([0.0, 1.0, 0.5, 0.5])
    rows = slerp(a, b, t)
    assert torch.allclose(rows[0], a[0], atol=1e-5) and torch.allclose(rows[1], b[1], atol=1e-5)
    # Parallel vectors fall back to lerp without NaNs.
    assert torch.isfinite(slerp(a, 2 * a, 0.5)).all() and torch.allclose(slerp(a, 2 * a, 0.5), 1.5 * a, atol=1e-4)


def test_grid_is_the_official_bilinear_order():
    tl, tr, bl, br = (torch.tensor([float(v), 0.0]) for v in (0, 1, 10, 11))
    grid = bilinear_grid(tl, tr, bl, br, steps=2)
    assert grid.shape == (9, 2)
    assert grid[:, 0].tolist() == [0, 0.5, 1, 5, 5.5, 6, 10, 10.5, 11]
    assert torch.equal(bilinear_grid(tl, tr, bl, br, steps=1)[:, 0], torch.tensor([0.0, 1, 10, 11]))
    # Official formula: left = lerp(TL, BL, r/S), right = lerp(TR, BR, r/S), cell = lerp(left, right, c/S).
    g = torch.Generator().manual_seed(1)
    corners = [torch.randn(16, generator=g) for _ in range(4)]
    grid = bilinear_grid(*corners, steps=4)
    r, c = 3, 1
    left, right = lerp(corners[0], corners[2], r / 4), lerp(corners[1], corners[3], r / 4)
    assert torch.allclose(grid[r * 5 + c], lerp(left, right, c / 4))
    assert bilinear_grid(*corners, steps=3, mode="slerp").shape == (16, 16)


def test_blend_errors():
    with pytest.raises(InputError, match="same batch size"):
        blend(torch.zeros(2, 4), torch.zeros(3, 4), 0.5)
    with pytest.raises(InputError, match="lerp"):
        blend(torch.zeros(2, 4), torch.zeros(2, 4), 0.5, mode="cubic")
    with pytest.raises(InputError, match="at least 1"):
        bilinear_grid(*(torch.zeros(4) for _ in range(4)), steps=0)
