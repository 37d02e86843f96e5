"""Picture helpers: grids and contact sheets come out as PNGs of the expected size, one row per class."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from hpcgan.viz import (class_grid, contact_sheet, curves_figure, hwc_uint8, image_grid, read_columns,
                        training_curves)

TILE, PAD = 32, 2


def _solid(n, value, size=TILE):
    return np.full((n, size, size, 3), value, np.uint8)


def _tile_at(img: Image.Image, row: int, col: int, left: int, top: int = 0) -> np.ndarray:
    x, y = left + PAD + col * (TILE + PAD), top + PAD + row * (TILE + PAD)
    return np.asarray(img)[y:y + TILE, x:x + TILE]


def test_hwc_uint8_accepts_uint8_and_float_tensors_in_either_layout():
    u8 = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    assert hwc_uint8(u8) is u8 or np.array_equal(hwc_uint8(u8), u8)
    assert np.array_equal(hwc_uint8(torch.from_numpy(u8)), u8)  # uint8 tensors are taken as they are
    x = torch.linspace(-1, 1, 2 * 3 * 8 * 8).reshape(2, 3, 8, 8)
    out = hwc_uint8(x)
    assert out.shape == (2, 8, 8, 3) and out.dtype == np.uint8
    assert out[0, 0, 0, 0] == 0 and out[1, 7, 7, 2] == 255
    assert np.array_equal(out, hwc_uint8(x.numpy().transpose(0, 2, 3, 1)))
    xb = x.to(torch.bfloat16)  # what a bf16 autocast generator returns: no numpy dtype of its own
    assert np.array_equal(hwc_uint8(xb), hwc_uint8(xb.float()))
    with pytest.raises(ValueError, match="batch"):
        hwc_uint8(np.zeros((8, 8)))


def test_image_grid_tiles_images_in_rows():
    images = np.concatenate([_solid(3, 10), _solid(2, 200)])
    grid = image_grid(images, nrow=3, pad=PAD)
    assert grid.size == (3 * (TILE + PAD) + PAD, 2 * (TILE + PAD) + PAD)
    assert (_tile_at(grid, 0, 2, 0) == 10).all() and (_tile_at(grid, 1, 1, 0) == 200).all()
    assert (_tile_at(grid, 1, 2, 0) == 255).all()  # the missing sixth tile is background

    labelled = image_grid(images, nrow=3, labels=["first", "second"], pad=PAD)
    assert labelled.height == grid.height and labelled.width > grid.width
    left = labelled.width - grid.width
    assert (_tile_at(labelled, 1, 0, left) == 200).all()
    label_area = np.asarray(labelled)[:, :left]
    assert (label_area < 128).any(), "no label text drawn"
    with pytest.raises(ValueError, match="labels"):
        image_grid(images, nrow=3, labels=["only one"])


def test_image_grid_greys_out_and_crosses_marked_rows():
    """A sample grid's row of a class without training images (issue 9): faded to grey and crossed out in red,
    the other rows untouched."""
    images = np.concatenate([_solid(2, 10), _solid(2, 200)])
    plain = image_grid(images, nrow=2, pad=PAD)
    grid = image_grid(images, nrow=2, pad=PAD, marked=[1])
    assert grid.size == plain.size
    assert np.array_equal(np.asarray(grid)[: PAD + TILE], np.asarray(plain)[: PAD + TILE])  # row 0 as it was
    for col in range(2):
        tile = _tile_at(grid, 1, col, 0)
        assert (tile[TILE // 2, 2] == (200 + 3 * 160) // 4).all()  # a quarter of the picture, the rest grey 160
        for y, x in ((1, 1), (TILE - 2, TILE - 2), (1, TILE - 2), (TILE - 2, 1), (TILE // 2, TILE // 2)):
            r, g, b = tile[y, x]
            assert r >= 150 and g < 60 and b < 60, (col, y, x, tile[y, x])  # on the red cross


def test_contact_sheet_has_one_row_per_class_with_its_images(tmp_path):
    rows = {"basophil": _solid(3, 40), "eosinophil": [_solid(1, 90)[0]] * 10, "smudge cell": []}
    path = contact_sheet(rows, tmp_path / "sheet.png", title="demo", per_row=4)
    assert path.is_file() and [p.name for p in tmp_path.iterdir()] == ["sheet.png"]  # no temp files left
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == "RGB"
        sheet = im.copy()
    title_band = 20
    assert sheet.height == title_band + len(rows) * (TILE + PAD) + PAD
    left = sheet.width - (4 * (TILE + PAD) + PAD)
    assert left > 0
    assert (_tile_at(sheet, 0, 2, left, title_band) == 40).all()
    assert (_tile_at(sheet, 0, 3, left, title_band) == 255).all()  # only 3 basophils
    assert all((_tile_at(sheet, 1, c, left, title_band) == 90).all() for c in range(4))
    assert (_tile_at(sheet, 2, 0, left, title_band) == 255).all()  # empty class: empty row
    row_labels = np.asarray(sheet)[title_band:, :left]
    for r in range(3):
        band = row_labels[PAD + r * (TILE + PAD): PAD + r * (TILE + PAD) + TILE]
        assert (band < 128).any(), f"row {r} has no class name"


def test_contact_sheet_resizes_sources_of_different_sizes(tmp_path):
    rows = {"a": _solid(2, 50, size=64), "b": [np.full((363, 360, 3), 120, np.uint8)]}
    path = contact_sheet(rows, tmp_path / "mixed.png", per_row=2, tile=TILE)
    with Image.open(path) as im:
        assert im.height == 2 * (TILE + PAD) + PAD


def test_class_grid_puts_each_label_in_its_row(tmp_path):
    classes = ["basophil", "eosinophil", "lymphocyte"]
    labels = torch.tensor([2, 0, 2, 0, 0])
    values = torch.tensor([-1.0, 0.0, 0.5])[labels]  # class k gets its own grey level
    images = values.view(-1, 1, 1, 1).expand(-1, 3, TILE, TILE).contiguous()
    path = class_grid(images, labels, classes, tmp_path / "grid.png", per_row=3)
    with Image.open(path) as im:
        grid = im.copy()
    assert grid.height == len(classes) * (TILE + PAD) + PAD
    left = grid.width - (3 * (TILE + PAD) + PAD)
    assert all((_tile_at(grid, 0, c, left) == 0).all() for c in range(3))      # three basophils, black
    assert (_tile_at(grid, 1, 0, left) == 255).all()                             # no eosinophil
    assert (_tile_at(grid, 2, 1, left) == 191).all() and (_tile_at(grid, 2, 2, left) == 255).all()
    with pytest.raises(ValueError, match="labels"):
        class_grid(images, labels[:3], classes, tmp_path / "bad.png")


def _write_csv(path, header, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([",".join(header)] + [",".join(map(str, r)) for r in rows]) + "\n")


def test_training_curves_draw_a_panel_per_logged_quantity(tmp_path):
    run = tmp_path / "run"
    assert training_curves(run, tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()
    # no auxiliary classifier, no codes: losses and critic only; empty, nan and inf cells are skipped
    _write_csv(run / "log.csv", ["step", "d_loss", "g_loss", "wdist", "gp", "ac_acc_real", "ac_acc_fake", "info_loss"],
               [[2, 1.0, "", 0.5, 0.1, "", "", ""], [4, 0.8, 0.3, "nan", 0.1, "", "", ""], [6, 0.7, 0.2, 0.6, "inf", "", "", ""]])
    cols = read_columns(run / "log.csv")
    assert cols["g_loss"] == [(4.0, 0.3), (6.0, 0.2)] and cols["wdist"] == [(2.0, 0.5), (6.0, 0.6)]
    assert "ac_acc_real" not in cols
    out = training_curves(run, tmp_path / "curves.png", title="wgan_gp")
    with Image.open(out) as im:
        assert im.size == (700, 2 * 230)
    # + classifier accuracies and the sample-diversity gauge: four panels
    _write_csv(run / "log.csv", ["step", "d_loss", "g_loss", "wdist", "gp", "ac_acc_real", "ac_acc_fake"],
               [[2, 1.0, 0.5, 0.5, 0.1, 0.2, 0.1], [4, 0.8, 0.3, 0.6, 0.1, 0.5, 0.4]])
    _write_csv(run / "samples" / "diversity.csv", ["step", "within_row_std", "between_row_std"], [[4, 0.1, 0.2]])
    with Image.open(training_curves(run, tmp_path / "curves.png")) as im:
        assert im.size == (700, 4 * 230)
        assert np.asarray(im.convert("L")).std() > 10  # something drawn, not a blank canvas


def test_classifier_curves_draw_the_learning_rate_on_a_log_axis(tmp_path):
    """A classifier's curves: loss, accuracies and the learning rate, whose x0.1 decays (schedule=plateau) are
    equal steps on its log axis; a cosine's final 0 is left out rather than breaking the axis."""
    from hpcgan.viz import CLASSIFIER_PANELS
    run = tmp_path / "run"
    _write_csv(run / "log.csv", ["step", "loss", "train_accuracy", "lr", "val_accuracy", "val_macro_f1",
                                 "best_step"],
               [[2, 1.0, 0.5, 1e-3, 0.4, 0.3, 2], [4, 0.8, 0.6, 1e-4, 0.5, 0.4, 4], [6, 0.7, 0.7, 1e-5, 0.6, 0.5, 4],
                [8, 0.6, 0.8, 0.0, 0.6, 0.5, 4]])
    with Image.open(training_curves(run, tmp_path / "curves.png", panels=CLASSIFIER_PANELS)) as im:
        assert im.size == (700, 3 * 230)
    loss, acc, lr = curves_figure(run, panels=CLASSIFIER_PANELS).axes
    assert [ax.get_yscale() for ax in (loss, acc, lr)] == ["linear", "linear", "log"]
    assert lr.get_lines()[0].get_ydata().tolist() == [1e-3, 1e-4, 1e-5, 0.0]   # the 0 is masked on the axis
    for ax in (loss, acc, lr):   # the kept weights' step (the log's last best_step, not its first) on every panel
        kept = [ln for ln in ax.get_lines() if ln.get_label().startswith("kept weights")]
        assert [ln.get_label() for ln in kept] == ["kept weights (step 4)"]
        assert list(kept[0].get_xdata()) == [4, 4]
    assert lr.get_ylim()[0] == pytest.approx(0.5e-5)   # half the smallest rate: the last decay is clear of the edge
    _write_csv(run / "log.csv", ["step", "loss", "train_accuracy", "lr"],
               [[2, 1.0, 0.5, 1e-3], [4, 0.8, 0.6, 5e-4], [6, 0.7, 0.7, 1.6e-8]])   # a cosine's last rates
    lr = curves_figure(run, panels=CLASSIFIER_PANELS).axes[-1]
    assert lr.get_ylim()[0] == pytest.approx(0.5e-6)   # three decades under the top, not down to 1.6e-8
    _write_csv(run / "log.csv", ["step", "loss", "train_accuracy", "best_step"], [[2, 1.0, 0.5, -1], [4, 0.8, 0.6, -1]])
    with Image.open(training_curves(run, tmp_path / "curves.png", panels=CLASSIFIER_PANELS)) as im:
        assert im.size == (700, 2 * 230)   # no lr column (an older log): no panel for it
    assert not [ln for ax in curves_figure(run, panels=CLASSIFIER_PANELS).axes for ln in ax.get_lines()
                if ln.get_label().startswith("kept")]   # no val scoring yet (best_step -1): no line
