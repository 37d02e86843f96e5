"""hpcgan.data.clean: decoding with sound mode conversions, Macenko, crop/resize, per-file results."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from hpcgan.data.build import BuildSettings
from hpcgan.data.clean import (BadImage, DegenerateStain, clean_image, decode_rgb, macenko,
                               process_file, square_resize)


def cell(w=48, h=40, seed=0) -> np.ndarray:
    """A stained-looking RGB image: bright background, purple nucleus, pink cytoplasm, noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    img = np.full((h, w, 3), (235, 225, 235), np.float64)
    cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w
    r = np.hypot(yy - cy, xx - cx)
    img[r < 0.35 * min(w, h)] = (210, 150, 190)
    img[r < 0.2 * min(w, h)] = (90, 40, 130)
    img += rng.normal(0, 12, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_rgba_is_composited_on_white():
    a = np.zeros((40, 40, 4), np.uint8)
    a[..., 0] = 200
    a[:20, :, 3] = 255          # top half opaque red-ish, bottom half fully transparent
    rgb, size, note = decode_rgb(encode(Image.fromarray(a, "RGBA"), "PNG"))
    assert size == (40, 40) and "white" in note
    assert tuple(rgb[0, 0]) == (200, 0, 0)
    assert tuple(rgb[-1, -1]) == (255, 255, 255)


def test_sixteen_bit_gray_is_scaled_not_clipped():
    g = np.array([[0, 257, 32896, 65535]] * 40, np.uint16).repeat(10, axis=1)
    rgb, _, note = decode_rgb(encode(Image.fromarray(g), "PNG"))
    assert "16-bit" in note
    assert rgb[0, ::10, 0].tolist() == [0, 1, 128, 255]
    assert (rgb[..., 0] == rgb[..., 2]).all()


def test_sixteen_bit_rgb_tiff_becomes_8_bit():
    tifffile = pytest.importorskip("tifffile", reason="tifffile writes 16-bit RGB TIFF fixtures")
    a = np.full((40, 40, 3), 65535, np.uint16)
    a[:, :, 1] = 32768
    buf = io.BytesIO()
    tifffile.imwrite(buf, a)
    rgb, _, _ = decode_rgb(buf.getvalue())
    assert rgb.dtype == np.uint8 and rgb.shape == (40, 40, 3)
    assert tuple(rgb[5, 5]) == (255, 128, 255)


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "LA"])
def test_convertible_modes_become_rgb(mode):
    img = Image.fromarray(cell()).convert(mode)
    data = encode(img, "JPEG" if mode == "CMYK" else "PNG")
    rgb, _, note = decode_rgb(data)
    assert rgb.shape == (40, 48, 3) and mode in note
    # the conversion keeps the picture: correlates strongly with the original's luminance
    lum = np.asarray(Image.fromarray(cell()).convert("L"), np.float64)
    assert np.corrcoef(lum.ravel(), rgb.mean(2).ravel())[0, 1] > 0.9


@pytest.mark.parametrize("make, reason", [
    (lambda: b"", "empty file"),
    (lambda: b"this is a text file, not a JPEG\n", "not an image"),
    (lambda: encode(Image.fromarray(cell()), "JPEG")[:300], "truncated"),
    (lambda: encode(Image.fromarray(cell()).convert("1"), "PNG"), "1-bit"),
    (lambda: encode(Image.fromarray(cell(10, 10)), "PNG"), "too small"),
    (lambda: encode(Image.fromarray(cell()), "TIFF", save_all=True,
                    append_images=[Image.fromarray(cell(seed=1))]), "frames"),
    (lambda: encode(Image.fromarray(np.ones((40, 40), np.float32)), "TIFF"), "mode"),
])
def test_bad_images_are_rejected_with_a_reason(make, reason):
    with pytest.raises(BadImage, match=reason):
        decode_rgb(make(), min_size=32)


def test_square_resize_centre_crops():
    a = np.zeros((40, 100, 3), np.uint8)
    a[:, 30:70] = 255            # the central 40 columns are white
    out = np.asarray(square_resize(Image.fromarray(a), 20))
    assert out.shape == (20, 20, 3)
    assert out.min() >= 250


def test_square_resize_crop_keeps_the_centre_of_the_square():
    """crop=0.5 of a 40x100 field: its centred 40x40 square, then that square's central 20x20 (white on black)."""
    a = np.zeros((40, 100, 3), np.uint8)
    a[10:30, 40:60] = 255        # the central 20x20 of the centred square is white, the rest black
    whole = np.asarray(square_resize(Image.fromarray(a), 20))
    zoomed = np.asarray(square_resize(Image.fromarray(a), 20, crop=0.5))
    assert zoomed.shape == (20, 20, 3) and zoomed.min() >= 250
    assert whole[0, 0].max() <= 5 and whole[10, 10].min() >= 250    # the whole square: black border, white centre


def stained(stains: np.ndarray, conc_scale: float, side=96, seed=0) -> np.ndarray:
    """Beer-Lambert image of fixed concentration maps (nuclei + cytoplasm) under given stain vectors."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:side, :side]
    conc = np.zeros((2, side, side))
    for _ in range(6):
        cy, cx = rng.uniform(10, side - 10, 2)
        r = np.hypot(yy - cy, xx - cx)
        conc[0] += (r < 10) * rng.uniform(0.8, 1.6)
        conc[1] += (r < 22) * rng.uniform(0.3, 0.8)
    conc += rng.gamma(2, 0.03, conc.shape)
    od = np.einsum("sk,khw->hws", stains, conc * conc_scale)
    return np.clip(240 * np.exp(-od), 0, 255).astype(np.uint8)


def test_macenko_normalises_colour_and_is_deterministic():
    # one slide, two stainings (different stain vectors and strength): Macenko should undo the difference
    a = stained(np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]]).T, 1.0)
    b = stained(np.array([[0.55, 0.78, 0.30], [0.20, 0.90, 0.40]]).T, 1.3)
    out = macenko(a)
    assert out.shape == a.shape and out.dtype == np.uint8
    assert np.array_equal(out, macenko(a.copy()))
    before = np.abs(a.astype(int) - b).mean()
    after = np.abs(out.astype(int) - macenko(b)).mean()
    assert after < before / 3


def test_macenko_white_balances_a_tinted_background():
    """The same smear under yellowish (PBC's CellaVision) and bluish illumination: the normalised
    backgrounds are neutral and the two results nearly the same (a fixed white point tinted them)."""
    smear = stained(np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]]).T, 1.0).astype(float) / 240
    background = (smear.min(axis=2) > 0.93)          # the unstained pixels of the synthetic smear
    outs = []
    for light in ((255, 230, 204), (205, 225, 255)):
        img = np.clip(smear * np.array(light), 0, 255).astype(np.uint8)
        out = macenko(img).astype(int)
        bg = out[background].mean(axis=0)
        assert bg.max() - bg.min() < 6, (light, bg)   # neutral grey-white, not pink or violet
        outs.append(out)
    assert np.abs(outs[0] - outs[1]).mean() < 4


def test_macenko_refuses_blank_images():
    with pytest.raises(DegenerateStain):
        macenko(np.full((64, 64, 3), 240, np.uint8))


def test_blank_image_kept_unnormalised_with_note():
    res = clean_image(encode(Image.new("RGB", (64, 64), (250, 250, 250)), "PNG"), BuildSettings(size=32).clean())
    assert res["stain"] == "none" and "macenko skipped" in res["note"]
    assert Image.open(io.BytesIO(res["image"])).size == (32, 32)


def test_process_file_reports_unreadable_path(tmp_path):
    r = process_file((3, str(tmp_path / "missing.png"), str(tmp_path / "spool"), BuildSettings().clean()))
    assert r["index"] == 3 and not r["ok"] and r["reason"].startswith("unreadable")
    assert not (tmp_path / "spool").exists()
