"""Pictures people look at: image grids, per-class contact sheets and training curves, written as PNG
atomically."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from hpcgan.fsutil import atomic_write_bytes

BACKGROUND = (255, 255, 255)
TEXT = (20, 20, 20)
MARK = (200, 0, 0)        # the cross over a marked row's tiles
GREY = 160                # what a marked row's tiles are faded towards


def hwc_uint8(images) -> np.ndarray:
    """Images as uint8 tiles [N, H, W, 3] for drawing.

    Accepts uint8 [N, H, W, 3] (or [N, H, W] grey) as they are, or float [N, 3, H, W] / [N, H, W, 3] in
    [-1, 1], numpy or torch (any device), converted by hpcgan.images.to_uint8.
    """
    arr, converted = _uint8_array(images)
    if arr.ndim == 3:
        arr = arr[..., None]
    if arr.ndim != 4:
        raise ValueError(f"expected a batch of images [N,H,W,3] or [N,3,H,W], got shape {arr.shape}")
    if converted and arr.shape[1] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = arr.transpose(0, 2, 3, 1)
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    if arr.shape[-1] != 3:
        raise ValueError(f"expected 1 or 3 colour channels, got shape {arr.shape}")
    return arr


def _uint8_array(images) -> tuple[np.ndarray, bool]:
    """(uint8 numpy array, whether it was converted from floats); torch is imported only for floats."""
    is_torch = hasattr(images, "detach")
    if not is_torch:
        images = np.asarray(images)
        if images.dtype == np.uint8:
            return images, False
    elif not images.is_floating_point():
        return images.detach().cpu().numpy(), False
    import torch

    from hpcgan.images import to_uint8
    return to_uint8(images if is_torch else torch.from_numpy(images.astype(np.float32))).cpu().numpy(), True


def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default()


def _text_width(font, text: str) -> int:
    left, _, right, _ = font.getbbox(text)
    return int(right - left)


def image_grid(images, nrow: int, labels: Sequence[str] | None = None, pad: int = 2,
               marked: Sequence[int] = ()) -> Image.Image:
    """Tile images `nrow` per row; with `labels`, one text label per row written at the left. Rows listed in
    `marked` (e.g. classes without training images) have their tiles faded to grey and crossed out."""
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    tiles = hwc_uint8(images)
    n, h, w, _ = tiles.shape
    rows = max(1, -(-n // nrow))
    if labels is not None and len(labels) != rows:
        raise ValueError(f"got {len(labels)} labels for {rows} rows ({n} images, {nrow} per row)")
    font = _font()
    label_w = (max(_text_width(font, str(t)) for t in labels) + 2 * pad + 4) if labels else 0
    canvas = Image.new("RGB", (label_w + nrow * (w + pad) + pad, rows * (h + pad) + pad), BACKGROUND)
    marked = set(marked)
    draw = ImageDraw.Draw(canvas)
    for i in range(n):
        r, c = divmod(i, nrow)
        x, y = label_w + pad + c * (w + pad), pad + r * (h + pad)
        canvas.paste(Image.fromarray(_faded(tiles[i]) if r in marked else tiles[i]), (x, y))
        if r in marked:
            draw.line([(x, y), (x + w - 1, y + h - 1)], fill=MARK, width=max(1, h // 16))
            draw.line([(x, y + h - 1), (x + w - 1, y)], fill=MARK, width=max(1, h // 16))
    if labels:
        for r, text in enumerate(labels):
            draw.text((pad + 2, pad + r * (h + pad) + h // 2), str(text), fill=TEXT, font=font, anchor="lm")
    return canvas


def _faded(tile: np.ndarray) -> np.ndarray:
    """A tile washed out towards grey (a quarter of the picture left)."""
    return ((tile.astype(np.uint16) + 3 * GREY) // 4).astype(np.uint8)


def save_png(image: Image.Image, path: str | Path) -> Path:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def contact_sheet(rows: Mapping[str, Sequence], path: str | Path, title: str | None = None,
                  per_row: int = 8, tile: int | None = None) -> Path:
    """One row per class, the class name at the left, up to `per_row` images each; saved as PNG.

    `rows` maps a class name to its images (a batch as accepted by `hwc_uint8`, or a list of single
    images [H,W,3] uint8 / [3,H,W] float). Tiles are resized to `tile` px (default: the first image's
    height) so sources of different sizes line up. Classes without images get an empty row.
    """
    if not rows:
        raise ValueError("contact_sheet: no rows given")
    batches = {name: _as_batch(imgs) for name, imgs in rows.items()}
    if tile is None:
        first = next((b for b in batches.values() if len(b)), None)
        tile = first.shape[1] if first is not None else 32
    blank = np.full((tile, tile, 3), 255, np.uint8)
    flat, labels = [], []
    for name, batch in batches.items():
        chosen = [_resize(img, tile) for img in batch[:per_row]]
        chosen += [blank] * (per_row - len(chosen))
        flat.extend(chosen)
        labels.append(f"{name} ({len(batch)})" if len(batch) > per_row else name)
    sheet = image_grid(np.stack(flat), per_row, labels=labels)
    if title:
        font = _font()
        band = 20
        titled = Image.new("RGB", (sheet.width, sheet.height + band), BACKGROUND)
        titled.paste(sheet, (0, band))
        ImageDraw.Draw(titled).text((4, band // 2), title, fill=TEXT, font=font, anchor="lm")
        sheet = titled
    return save_png(sheet, path)


def class_grid(images, labels, class_names: Sequence[str], path: str | Path, per_row: int = 8,
               title: str | None = None) -> Path:
    """A row per class of a labelled batch (e.g. generator samples [N,3,H,W] in [-1,1])."""
    tiles = hwc_uint8(images)
    if hasattr(labels, "detach"):
        labels = labels.detach().cpu().numpy()
    labels = np.asarray(labels).reshape(-1)
    if len(labels) != len(tiles):
        raise ValueError(f"{len(tiles)} images but {len(labels)} labels")
    rows = {name: tiles[labels == k] for k, name in enumerate(class_names)}
    return contact_sheet(rows, path, title=title, per_row=per_row)


def _as_batch(imgs) -> np.ndarray:
    if isinstance(imgs, (list, tuple)):
        if not imgs:
            return np.zeros((0, 1, 1, 3), np.uint8)
        return np.concatenate([hwc_uint8(_with_batch_dim(x)) for x in imgs])
    return hwc_uint8(imgs)


def _with_batch_dim(x):
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    x = np.asarray(x)
    return x[None] if x.ndim == 3 or (x.ndim == 2) else x


def _resize(img: np.ndarray, size: int) -> np.ndarray:
    if img.shape[0] == size and img.shape[1] == size:
        return img
    return np.asarray(Image.fromarray(img).resize((size, size), Image.BILINEAR))


def shard_contact_sheet(shard_dir: str | Path, split: str, path: str | Path, title: str | None = None,
                        per_row: int = 8, min_tile: int = 64) -> Path:
    """The first `per_row` images of every class of a shard set's split, one row per class (all classes of
    the manifest, empty rows included, so a missing cell type shows). Small images are blown up to
    `min_tile` px so people can see the cells."""
    from hpcgan.data.shards import iter_samples, read_manifest
    manifest = read_manifest(shard_dir)
    classes = manifest["classes"]
    counts = manifest.get("counts", {}).get(split, {})
    missing = sum(min(per_row, int(counts.get(c, 0))) for c in classes)  # stop reading once every row is full
    rows: dict[str, list[np.ndarray]] = {c: [] for c in classes}
    for _key, image, _ext, label, _meta in iter_samples(shard_dir, split):
        if 0 <= label < len(classes) and len(rows[classes[label]]) < per_row:
            with Image.open(io.BytesIO(image)) as im:
                rows[classes[label]].append(np.asarray(im.convert("RGB")))
            missing -= 1
            if missing <= 0 and counts:
                break
    tile = max(min_tile, next((r[0].shape[0] for r in rows.values() if r), min_tile))
    return contact_sheet(rows, path, title=title, per_row=per_row, tile=tile)


# Panels of training_curves(): (title, [(csv, column, legend)], y label[, "log" for a log y axis]).
# csv "log" = run_dir/log.csv, "div" = run_dir/samples/diversity.csv. A panel whose columns are all empty
# (e.g. no auxiliary classifier) is left out.
CURVE_PANELS = (
    ("losses", [("log", "d_loss", "critic"), ("log", "g_loss", "generator")], "loss"),
    ("critic", [("log", "wdist", "E[D(real)] - E[D(fake)]"), ("log", "gp", "gradient penalty")], ""),
    ("auxiliary classifier (paper Figs. 7-8)", [("log", "ac_acc_real", "on real images"),
                                                ("log", "ac_acc_fake", "on generated images")], "accuracy"),
    ("InfoGAN codes", [("log", "info_loss", "info loss")], "loss"),
    ("sample diversity (near 0: collapse)", [("div", "within_row_std", "within a class row"),
                                             ("div", "between_row_std", "across class rows")], "pixel std"),
)


# The same for a classifier run (hpcgan.classify): its log.csv has train loss/accuracy every log_every steps and
# the val scores every eval_every steps.
CLASSIFIER_PANELS = (
    ("training loss", [("log", "loss", "train batches")], "cross-entropy"),
    ("accuracy", [("log", "train_accuracy", "train batches"), ("log", "val_accuracy", "val"),
                  ("log", "val_macro_f1", "val macro-F1 (model selection)")], ""),
    ("learning rate: the warm-up, then the cosine or the plateau schedule's decays", [("log", "lr", "lr")],
     "", "log"),
)


def read_columns(path: Path) -> dict[str, list[tuple[float, float]]]:
    """{column: [(step, value), ...]} of a CSV with a `step` column, skipping empty and non-finite cells."""
    import csv
    import math
    out: dict[str, list[tuple[float, float]]] = {}
    if not path.is_file():
        return out
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            x = float(row.pop("step"))
            for k, v in row.items():
                try:
                    y = float(v)
                except (TypeError, ValueError):  # empty cell
                    continue
                if math.isfinite(y):
                    out.setdefault(k, []).append((x, y))
    return out


def _log_floor(ys, decades: int = 3) -> float | None:
    """A log axis's bottom: half of the smallest positive value or of `decades` under the largest, whichever is
    higher (a cosine's last rates, 1e-8 and less, would otherwise squeeze its whole decay into the panel's top)."""
    pos = [y for y in ys if y > 0]
    return max(min(pos), max(pos) * 10.0 ** -decades) / 2 if pos else None


def training_curves(run_dir: str | Path, path: str | Path, title: str | None = None,
                    panels=CURVE_PANELS) -> Path | None:
    """One PNG of a run's log.csv and samples/diversity.csv against the step, a panel per quantity that
    the run logs (`panels`: CURVE_PANELS for a GAN, CLASSIFIER_PANELS for a classifier); a log with a best_step
    column (a classifier's) gets a dashed line on every panel at its last value, the step whose weights the run
    keeps. None (and nothing written) while there is nothing to draw."""
    fig = curves_figure(run_dir, title, panels)
    if fig is None:
        return None
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def curves_figure(run_dir: str | Path, title: str | None = None, panels=CURVE_PANELS):
    """training_curves' matplotlib Figure (None while there is nothing to draw)."""
    from matplotlib.figure import Figure  # no pyplot: no backend or global state, no display needed

    run_dir = Path(run_dir)
    data = {"log": read_columns(run_dir / "log.csv"),
            "div": read_columns(run_dir / "samples" / "diversity.csv")}
    panels = [(t, [(data[src][col], leg) for src, col, leg in lines if data[src].get(col)], ylabel, *scale)
              for t, lines, ylabel, *scale in panels]   # scale: optional, "log" for a log y axis
    panels = [p for p in panels if p[1]]
    if not panels:
        return None
    kept = data["log"].get("best_step", [])[-1:]   # a classifier's log: the step whose weights it keeps so far
    kept = kept[0][1] if kept and kept[0][1] >= 0 else None
    fig = Figure(figsize=(7, 2.3 * len(panels)))
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)
    for ax, (panel_title, lines, ylabel, *scale) in zip(axes[:, 0], panels):
        for points, legend in lines:
            xs, ys = zip(*points)
            ax.plot(xs, ys, label=legend, lw=1.2, marker="." if len(xs) < 30 else None)
        if kept is not None:
            ax.axvline(kept, color="0.4", ls="--", lw=0.9, label=f"kept weights (step {int(kept)})")
        if scale == ["log"]:
            ax.set_yscale("log", nonpositive="mask")   # a cosine's last 0 is left out
            ax.set_ylim(bottom=_log_floor([y for points, _ in lines for _, y in points]))
        ax.set_title(panel_title, fontsize=9, loc="left")
        ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    axes[-1, 0].set_xlabel("step", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
