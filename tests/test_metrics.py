"""Known-answer tests of the pure metric functions (hpcgan/metrics: fid, prdc, isc, accuracy, pixel,
memorisation) on synthetic features, logits and images with fixed seeds."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from hpcgan.metrics.accuracy import class_accuracy, per_class_accuracy
from hpcgan.metrics.fid import feature_stats, fid, fid_from_stats, intra_fid, kid
from hpcgan.metrics.isc import inception_score
from hpcgan.metrics.memorisation import closest_pairs_sheet, memorisation
from hpcgan.metrics.pixel import PSNR_CAP, nn_fidelity
from hpcgan.metrics.prdc import density_coverage, kth_neighbour_distance, nearest, prdc


def gaussian(n, d=16, shift=0.0, seed=0):
    return np.random.default_rng(seed).standard_normal((n, d)) + shift


# ---- FID / KID --------------------------------------------------------------------------------------

def test_fid_same_distribution_near_zero_and_far_below_shifted():
    x = gaussian(2000)
    same = fid(x[:1000], x[1000:])
    # finite-sample bias of two independent halves: 2D/n + ~D(D+1)/(2n) ~ 0.17 for D=16, n=1000
    assert 0 <= same < 0.3
    shifted = fid(x[:1000], gaussian(1000, shift=1.0, seed=1))   # |m|^2 = 16
    assert 14 < shifted < 18
    assert same < shifted / 50


def test_fid_from_stats_closed_forms():
    d = 8
    m = np.arange(d) / 4
    assert fid_from_stats(np.zeros(d), np.eye(d), m, np.eye(d)) == pytest.approx(float(m @ m), abs=1e-9)
    s = 1.7
    assert fid_from_stats(np.zeros(d), np.eye(d), np.zeros(d), s**2 * np.eye(d)) == \
        pytest.approx(d * (1 - s) ** 2, abs=1e-9)


def test_feature_stats_float64_and_torch_input():
    x = gaussian(500, d=5).astype(np.float32)
    mu, sigma = feature_stats(torch.from_numpy(x))
    assert mu.dtype == sigma.dtype == np.float64 and mu.shape == (5,) and sigma.shape == (5, 5)
    np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-6)
    _, sigma1 = feature_stats(x[:, :1])               # D = 1 keeps its (1, 1) covariance
    assert sigma1.shape == (1, 1)


def test_fid_grows_with_mean_shift():
    x = gaussian(1000)
    values = [fid(x, gaussian(1000, shift=s, seed=7)) for s in (0.0, 0.25, 0.5, 1.0)]
    assert values == sorted(values) and values[-1] > 10 * values[1]


def test_kid_same_near_zero_shifted_positive():
    x = gaussian(2000)
    mean, std = kid(x[:1000], x[1000:], subsets=50, subset_size=500)
    assert abs(mean) < max(3 * std, 1e-2)
    mean_s, std_s = kid(x[:1000], gaussian(1000, shift=1.0, seed=1), subsets=50, subset_size=500)
    assert mean_s > 0.1 and mean_s > 10 * std_s and mean_s > 20 * abs(mean)


def test_kid_clips_subset_size_to_smaller_set():
    mean, std = kid(gaussian(100), gaussian(300, shift=1.0, seed=1), subsets=5)   # subset_size 1000 -> 100
    assert mean > 0.1 and np.isfinite(std)


def test_intra_fid_sees_swapped_labels_and_skips_tiny_classes():
    classes = ["a", "b", "c", "d"]
    d, n = 8, 300

    def labelled(seed):
        rng = np.random.default_rng(seed)
        y = np.repeat(np.arange(3), n)
        return rng.standard_normal((3 * n, d)) + 3 * np.eye(d)[y], y

    real, ry = labelled(0)
    fake, fy = labelled(1)
    real, ry = np.vstack([real, np.zeros((1, d))]), np.append(ry, 3)        # class d: one real sample
    fake, fy = np.vstack([fake, gaussian(50, d, seed=3)]), np.append(fy, np.full(50, 3))
    swapped = np.where(fy == 0, 1, np.where(fy == 1, 0, fy))

    good = intra_fid(real, ry, fake, fy, classes)
    bad = intra_fid(real, ry, fake, swapped, classes)
    assert fid(real[:-1], fake[:-50]) < 1.0             # the global FID (no labels) sees the same mixture
    assert math.isnan(good["per_class"]["d"]) and good["classes_scored"] == 3
    assert good["mean"] == pytest.approx(np.mean([good["per_class"][c] for c in "abc"]))
    assert good["mean"] < 1.0
    assert bad["mean"] > 10 + 10 * good["mean"]          # a/b mix-up costs |3e_a - 3e_b|^2 = 18 per class
    assert bad["per_class"]["c"] == pytest.approx(good["per_class"]["c"])


# ---- PRDC -------------------------------------------------------------------------------------------

def test_prdc_identical_distributions():
    r = prdc(gaussian(1000, d=8), gaussian(1000, d=8, seed=1), k=3)
    assert r["precision"] > 0.6 and r["recall"] > 0.6
    assert r["f1"] == pytest.approx(2 * r["precision"] * r["recall"] / (r["precision"] + r["recall"]))
    assert 0.8 < r["density"] < 1.2
    assert r["coverage"] > 0.8


def test_prdc_mode_collapse_is_precise_but_has_no_recall():
    # also pins torch-fidelity's argument order (generated first): swapped, precision and recall swap
    real = gaussian(1000, d=8)
    fake = np.tile(real.mean(axis=0) + 0.01, (500, 1))
    r = prdc(real, fake, k=3)
    assert r["precision"] > 0.95
    assert r["recall"] < 0.02
    assert r["coverage"] < 0.05


def test_prdc_far_away_is_zero():
    real = gaussian(300, d=8)
    r = prdc(real, real + 100.0, k=3)
    assert r == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "density": 0.0, "coverage": 0.0}


def _brute_prdc(real, fake, k):
    def radii(x):
        d = np.linalg.norm(x[:, None] - x[None], axis=-1)
        np.fill_diagonal(d, np.inf)
        return np.sort(d, axis=1)[:, k - 1]

    rr, rf = radii(real), radii(fake)
    d_fr = np.linalg.norm(fake[:, None] - real[None], axis=-1)            # [M, N]
    inside = d_fr <= rr[None, :]
    precision = inside.any(axis=1).mean()
    recall = (d_fr.T <= rf[None, :]).any(axis=1).mean()
    density = inside.sum() / (k * len(fake))
    coverage = inside.any(axis=0).mean()
    return precision, recall, density, coverage


@pytest.mark.parametrize("block", [7, 1024])
def test_prdc_matches_brute_force(block):
    real = gaussian(40, d=3)
    fake = 1.5 * gaussian(30, d=3, shift=0.5, seed=5)
    p, r, dens, cov = _brute_prdc(real, fake, k=3)
    got = prdc(real, fake, k=3, block=block)
    assert 0 < p < 1 and 0 < cov < 1 and 0 < dens                         # a case with something to get wrong
    assert (got["precision"], got["recall"]) == (p, r)
    assert got["density"] == dens and got["coverage"] == cov
    assert density_coverage(torch.from_numpy(real), torch.from_numpy(fake), k=3, block=block) == (dens, cov)


def test_knn_helpers_match_brute_force():
    x = torch.from_numpy(gaussian(50, d=4))
    x[7] = x[3]                                                           # a duplicate: distance 0
    d = torch.cdist(x, x)
    d.fill_diagonal_(float("inf"))
    brute_kth = d.sort(dim=1).values[:, 1]
    torch.testing.assert_close(kth_neighbour_distance(x, 2, block=6), brute_kth)
    dist, idx = nearest(x, x, exclude_self=True, block=6)
    assert dist[3] == dist[7] == 0.0 and idx[3] == 7 and idx[7] == 3
    np.testing.assert_array_equal(idx, d.argmin(dim=1).numpy())
    np.testing.assert_allclose(dist, d.min(dim=1).values.numpy(), rtol=1e-12)


# ---- IS and accuracy --------------------------------------------------------------------------------

def test_inception_score_known_values():
    n, c = 1000, 10
    one_class = np.zeros((n, c))
    one_class[:, 0] = 30.0
    mean, std = inception_score(one_class)
    assert mean == pytest.approx(1.0, abs=1e-6) and std < 1e-6

    k = 4
    spread = np.zeros((n, c))
    spread[np.arange(n), np.arange(n) % k] = 30.0
    assert inception_score(spread, splits=1)[0] == pytest.approx(k, rel=1e-6)
    mean, std = inception_score(torch.from_numpy(spread))                # 10 shuffled splits of 100
    assert k - 0.2 < mean <= k + 1e-6


def test_inception_score_refuses_more_splits_than_images():
    with pytest.raises(ValueError, match="splits"):
        inception_score(np.zeros((5, 3)), splits=10)


def test_class_accuracy_hand_made():
    logits = np.array([[3, 1, 0], [0, 2, 1], [1, 0, 5], [0, 4, 1], [2, 1, 0]], float)
    labels = np.array([0, 1, 1, 1, 2])                   # argmax 0, 1, 2, 1, 0 -> hits: T T F T F
    assert class_accuracy(logits, labels) == pytest.approx(3 / 5)
    assert class_accuracy(torch.from_numpy(logits), torch.from_numpy(labels)) == pytest.approx(3 / 5)
    per = per_class_accuracy(logits, labels, ["a", "b", "c", "d"])
    assert per["a"] == 1.0 and per["b"] == pytest.approx(2 / 3) and per["c"] == 0.0 and math.isnan(per["d"])


# ---- pixel fidelity ---------------------------------------------------------------------------------

def _images(n, seed=0, high=200, size=32):
    return np.random.default_rng(seed).integers(0, high, (n, 3, size, size), dtype=np.uint8)


def test_nn_fidelity_exact_copy():
    real, ry = _images(6), np.array([0, 0, 1, 1, 2, 2])
    r = nn_fidelity(real[[3]].copy(), np.array([1]), real, ry)
    assert (r["l1"], r["l2"], r["psnr"], r["n"], r["skipped"]) == (0.0, 0.0, PSNR_CAP, 1, 0)
    assert r["ssim"] == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("d", [1, 5, 40])
def test_nn_fidelity_constant_offset(d):
    real, ry = _images(6), np.array([0, 0, 1, 1, 2, 2])
    fake = real[[1, 4]] + np.uint8(d)
    r = nn_fidelity(torch.from_numpy(fake), torch.tensor([0, 2]), torch.from_numpy(real), torch.from_numpy(ry))
    assert r["l1"] == d / 255
    assert r["l2"] == pytest.approx(d / 255, rel=1e-12)
    assert r["psnr"] == pytest.approx(20 * math.log10(255 / d), rel=1e-12)
    assert 0 < r["ssim"] < 1 and r["n"] == 2


def test_nn_fidelity_searches_only_within_the_class():
    real, ry = _images(6), np.array([0, 0, 1, 1, 2, 2])
    fake = np.stack([real[0], real[0]])                       # a copy of a class-0 image ...
    fy = np.array([1, 3])                                     # ... generated as class 1, and a class without reals
    r = nn_fidelity(fake, fy, real, ry, block=1)
    want = np.abs(real[0].astype(int) - real[2:4].astype(int)).mean(axis=(1, 2, 3)).min() / 255
    assert r["l1"] == pytest.approx(want, rel=1e-12) and r["l1"] > 0.1   # not 0: real[0] is class 0
    assert r["psnr"] < 20 and r["n"] == 1 and r["skipped"] == 1


def test_nn_fidelity_blocks_agree():
    real, ry = _images(40, seed=1), np.arange(40) % 3
    fake, fy = _images(25, seed=2), np.arange(25) % 3
    a, b = nn_fidelity(fake, fy, real, ry, block=4), nn_fidelity(fake, fy, real, ry)
    assert a == b and a["n"] == 25


# ---- memorisation -----------------------------------------------------------------------------------

def _planted():
    real = gaussian(300, d=16)
    fake = gaussian(50, d=16, seed=9)
    fake[5], fake[30] = real[17], real[123]
    return real, fake


def test_memorisation_flags_exactly_the_planted_copies():
    real, fake = _planted()
    r = memorisation(torch.from_numpy(fake).float(), real.astype(np.float32), percentile=1.0)
    assert np.flatnonzero(r["flagged"]).tolist() == [5, 30]
    assert r["nearest"][5] == 17 and r["nearest"][30] == 123
    assert r["distance"][5] == r["distance"][30] == 0.0
    assert r["fraction"] == pytest.approx(2 / 50) and r["threshold"] > 0
    assert r["flagged"].dtype == bool and r["distance"].shape == (50,)


def test_memorisation_zero_threshold_still_flags_exact_copies():
    real = gaussian(100, d=8)
    real[1], real[3] = real[0], real[2]                  # 4 % of the reals have a duplicate: 1st percentile = 0
    fake = gaussian(20, d=8, seed=4)
    fake[11] = real[50]
    r = memorisation(fake, real, percentile=1.0)
    assert r["threshold"] == 0.0
    assert np.flatnonzero(r["flagged"]).tolist() == [11]


def test_closest_pairs_sheet(tmp_path):
    real, fake = _planted()
    r = memorisation(fake, real)
    real_img, fake_img = _images(300, seed=1), _images(50, seed=2)
    fake_img[5], fake_img[30] = real_img[17], real_img[123]
    path = closest_pairs_sheet(fake_img, real_img, r, tmp_path / "sheet.png", n=4, title="pairs", min_tile=32)
    with Image.open(path) as im:
        sheet = np.asarray(im.convert("RGB"))
    pad, tile, band = 2, 32, 20
    assert sheet.shape[0] == band + 4 * (tile + pad) + pad
    label_w = sheet.shape[1] - (2 * (tile + pad) + pad)
    assert label_w > 0
    y0, x0 = band + pad, label_w + pad
    first_fake = sheet[y0:y0 + tile, x0:x0 + tile]
    first_real = sheet[y0:y0 + tile, x0 + tile + pad:x0 + 2 * tile + pad]
    np.testing.assert_array_equal(first_fake, fake_img[5].transpose(1, 2, 0))   # flagged, closest, first
    np.testing.assert_array_equal(first_real, real_img[17].transpose(1, 2, 0))


def test_spread_known_values():
    from hpcgan.metrics.diversity import spread
    assert spread(np.array([[0.0, 0.0], [3.0, 4.0]])) == 5.0
    # an equilateral triangle of side 2: every pair 2 apart
    tri = np.array([[0.0, 0.0], [2.0, 0.0], [1.0, np.sqrt(3.0)]])
    assert spread(tri) == pytest.approx(2.0)
    assert np.isnan(spread(np.zeros((1, 4))))
    # sampled pairs (large class) agree with every pair
    x = np.random.default_rng(0).normal(size=(400, 8))
    assert spread(x, max_pairs=20000, seed=1) == pytest.approx(spread(x, max_pairs=10**6), rel=0.03)


def test_diversity_ratio_collapse_zero_real_one_and_per_class():
    from hpcgan.metrics import EvalData, Side, compute
    rng = np.random.default_rng(0)
    real = rng.normal(size=(60, 5)).astype(np.float32)
    labels = np.repeat([0, 1, 2], 20)
    collapsed = np.repeat(real[[0, 20]], 10, axis=0)          # one image per class, classes 0 and 1 only
    same = EvalData(["a", "b", "c", "d"], Side(real, labels=labels), Side(real.copy(), labels=labels))
    r = compute(["diversity"], same)[0]["diversity"]
    assert r.values["diversity_ratio"] == pytest.approx(1.0)
    assert set(r.per_class["diversity_ratio"]) == {"a", "b", "c"}   # d has no images: left out
    half = EvalData(["a", "b", "c", "d"], Side(real, labels=labels), Side(real * 0.5, labels=labels))
    assert compute(["diversity"], half)[0]["diversity"].values["diversity_ratio"] == pytest.approx(0.5)
    col = EvalData(["a", "b", "c", "d"], Side(real, labels=labels), Side(collapsed, labels=np.repeat([0, 1], 10)))
    r = compute(["diversity"], col)[0]["diversity"]
    assert r.values["diversity_ratio"] == 0.0 and r.info["classes_scored"] == ["a", "b"]
