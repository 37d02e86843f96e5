"""Pixel fidelity of generated images against their nearest real image of the same class (paper Table 4).

    r = nn_fidelity(fake_u8, fake_labels, real_u8, real_labels)
    r["l1"], r["l2"], r["psnr"], r["ssim"], r["n"], r["skipped"]

How ours is defined: every generated image is paired with the real image OF THE SAME CLASS that is nearest
to it in pixel L2 distance (images as [0, 1] floats; searched with blocked torch.cdist, so any set size fits
in memory). Over each pair, with pixel values in [0, 1]:
    l1    mean absolute difference
    l2    root-mean-square difference (RMSE, not the squared error)
    psnr  10 log10(1 / MSE) in dB (data range 1); an exact copy (MSE 0, PSNR infinite) counts as
          PSNR_CAP = 100 dB, and no value is reported above it
    ssim  skimage.metrics.structural_similarity(channel_axis=-1, data_range=1) with its default 7x7 uniform
          window (fits 32 px and larger images; smaller images use the largest odd window that fits)
and the reported values are their means over all generated images that have a real image of their class;
generated images of a class without real images are left out and counted in "skipped".

Hazra et al. (Biology 2022) report l1, l2, PSNR and SSIM of generated against real images but do not say
how they paired the images (probably random pairs or class means), so our numbers - against the nearest
real image, i.e. the most favourable pairing - are not directly comparable with theirs. Nearest-neighbour
pairing measures closeness to the training set: very high PSNR / SSIM can also mean memorisation (see
hpcgan.metrics.memorisation).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from hpcgan.metrics.prdc import as_numpy, nearest
from hpcgan.progress import Progress

PSNR_CAP = 100.0   # dB, the PSNR reported for an exact copy (and the most ever reported)


def _images_u8(images, name: str) -> np.ndarray:
    arr = as_numpy(images)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[1] != 3:
        raise ValueError(f"{name}: expected uint8 images [N, 3, H, W], got {arr.dtype} {arr.shape}")
    return arr


def _ssim_window(h: int, w: int) -> int:
    side = min(7, h, w)
    return side if side % 2 else side - 1


def _pair_scores(fake: np.ndarray, real: np.ndarray) -> dict[str, np.ndarray]:
    """l1, l2, psnr, ssim of each pair of uint8 images [n, 3, H, W]; sums in integers so a constant
    offset of d grey levels gives l1 = d/255 exactly."""
    from skimage.metrics import structural_similarity

    diff = fake.astype(np.int32) - real.astype(np.int32)
    npix = diff[0].size
    sad = np.abs(diff).reshape(len(diff), -1).sum(axis=1, dtype=np.int64)
    ssd = (diff * diff).reshape(len(diff), -1).sum(axis=1, dtype=np.int64)
    mse = ssd / (npix * 255.0 ** 2)
    with np.errstate(divide="ignore"):
        psnr = np.minimum(PSNR_CAP, 10 * np.log10(npix * 255.0 ** 2 / ssd.astype(np.float64)))
    win = _ssim_window(*fake.shape[2:])
    ssim = np.array([structural_similarity(f.transpose(1, 2, 0) / 255.0, r.transpose(1, 2, 0) / 255.0,
                                           channel_axis=-1, data_range=1.0, win_size=win)
                     for f, r in zip(fake, real)])
    return {"l1": sad / (npix * 255.0), "l2": np.sqrt(mse), "psnr": psnr, "ssim": ssim}


def nn_fidelity(fake_images, fake_labels, real_images, real_labels, block: int = 256) -> dict:
    """{"l1", "l2" (RMSE), "psnr" (dB, capped at 100), "ssim"}: means over the generated images of each one
    against its nearest real image of the same class (see the module docstring), plus "n" (generated images
    scored) and "skipped" (generated images whose class has no real image). Means are nan when n == 0."""
    fake, real = _images_u8(fake_images, "fake_images"), _images_u8(real_images, "real_images")
    fy, ry = as_numpy(fake_labels).reshape(-1), as_numpy(real_labels).reshape(-1)
    if len(fake) != len(fy) or len(real) != len(ry):
        raise ValueError(f"images and labels differ in length: generated {len(fake)} vs {len(fy)}, "
                         f"real {len(real)} vs {len(ry)}")
    if fake.shape[1:] != real.shape[1:]:
        raise ValueError(f"generated images are {fake.shape[1:]}, real ones {real.shape[1:]}: resize one side")
    scores: dict[str, list[np.ndarray]] = {"l1": [], "l2": [], "psnr": [], "ssim": []}
    skipped = 0
    bar = Progress(len(fake), "nn fidelity", "img", bar=len(fake) >= 2000, leave=False)
    for c in np.unique(fy):
        f_idx, r_idx = np.nonzero(fy == c)[0], np.nonzero(ry == c)[0]
        if len(r_idx) == 0:
            skipped += len(f_idx)
            bar.update(len(f_idx))
            continue
        r_flat = torch.from_numpy(real[r_idx].reshape(len(r_idx), -1))
        for s in range(0, len(f_idx), block):
            fb = fake[f_idx[s:s + block]]
            _, nn = nearest(torch.from_numpy(fb.reshape(len(fb), -1)), r_flat, block=block, scale=1 / 255)
            for key, v in _pair_scores(fb, real[r_idx[nn]]).items():
                scores[key].append(v)
            bar.update(len(fb))
    bar.close()
    n = sum(len(v) for v in scores["l1"])
    out = {k: float(np.concatenate(v).mean()) if n else math.nan for k, v in scores.items()}
    return {**out, "n": n, "skipped": skipped}
