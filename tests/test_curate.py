"""Curation of generated cells (hpcgan.curate, tools/generate.py curate=true): a judge trained on exactly the GAN's
training cells keeps the on-class cells and drops off-class ones and near-copies; it never reads a cell the scarce
cut removed, nor val or test; the manifest records what was drawn, kept and dropped why."""
from __future__ import annotations

import dataclasses
import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hpcgan.checkpoint import save_checkpoint
from hpcgan.curate import ClassTally, curated, train_judge
from hpcgan.data.scarce import scarce_keep
from hpcgan.data.shards import ShardWriter, read_manifest, write_manifest
from hpcgan.generate import GenerateError, generate
from hpcgan.models.registry import build_model, load_spec

CLASSES = ["red", "green", "blue"]
PER_CLASS = 16
CUT = {"red": 4}


def cell(rng, label: int) -> np.ndarray:
    """A 32 px "cell": a disc of the class's colour on white, at a random place, with noise."""
    img = np.full((32, 32, 3), 235, np.uint8)
    cy, cx = rng.integers(11, 21, 2)
    yy, xx = np.mgrid[:32, :32]
    disc = (yy - cy) ** 2 + (xx - cx) ** 2 < rng.integers(36, 90)
    colour = np.array([40, 40, 40])
    colour[label] = 220
    img[disc] = np.clip(colour + rng.normal(0, 25, (disc.sum(), 3)), 0, 255)
    return img


def png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


GARBAGE = b"not an image: a cell no curation may ever decode"


def write_set(out: Path) -> tuple[Path, list[np.ndarray], list[int]]:
    """train: 16 cells per class, the red ones the cut removes written as GARBAGE (same metadata, so the cut is
    the same); val and test: GARBAGE only. Returns (dir, train images, train labels)."""
    rng = np.random.default_rng(0)
    images = [cell(rng, i % 3) for i in range(3 * PER_CLASS)]
    labels = [i % 3 for i in range(3 * PER_CLASS)]
    hashes = [hashlib.sha256(png(a)).hexdigest() for a in images]
    keep, _ = scarce_keep(np.array(labels), hashes, CLASSES, CUT, 0)
    shards = {}
    for split, n in (("train", len(images)), ("val", 6), ("test", 6)):
        with ShardWriter(out, split, shard_size=100) as w:
            for i in range(n):
                label = labels[i]
                data = png(images[i]) if split == "train" and i in keep else GARBAGE
                w.write(f"{split}_{i:04d}", data, "png", label,
                        {"class": CLASSES[label], "sha256": hashes[i] if split == "train" else f"{split}{i}"})
        shards[split] = w.shards
    counts = {sp: {c: sum(1 for i in range(n) if labels[i] == k) for k, c in enumerate(CLASSES)}
              for sp, n in (("train", len(images)), ("val", 6), ("test", 6))}
    write_manifest(out, {"classes": CLASSES, "image_size": 32, "counts": counts, "shards": shards,
                         "synthetic": False})
    return out, [images[i] for i in keep], [labels[i] for i in keep]


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    return write_set(tmp_path_factory.mktemp("curate_real"))


@pytest.fixture(scope="module")
def judge(real):
    shards, _, _ = real
    seen = {"shards": str(shards), "split": "train", "scarce": CUT, "scarce_seed": 0}
    return train_judge(seen, CLASSES, 32, confidence=0.5, copy_percentile=1.0, epochs=30, seed=0)


def u8(arrays) -> torch.Tensor:
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def test_judge_sees_exactly_the_cut_train_split(judge):
    """Reading a removed red cell, or any val/test cell, would fail on its GARBAGE bytes; the judge trained."""
    assert judge.info["samples"] == {"red": 4, "green": 16, "blue": 16}
    assert judge.info["trained_on"]["scarce"] == CUT and judge.info["train_accuracy"] == 1.0
    assert judge.threshold is not None and judge.threshold > 0

    from PIL import UnidentifiedImageError
    with pytest.raises(UnidentifiedImageError):   # the plant is live: the uncut split does read a GARBAGE cell
        train_judge({"shards": judge.info["trained_on"]["shards"], "split": "train"}, CLASSES, 32,
                    confidence=0.5, copy_percentile=1.0, epochs=1, seed=0)


def test_curation_keeps_exactly_the_on_class_cells_of_a_planted_set(real, judge):
    """A planted "red" batch: fresh red cells (kept), green and blue cells labelled red (off-class: dropped,
    low confidence) and exact copies of red training cells (near-copies: dropped), interleaved."""
    _, train_images, train_labels = real
    rng = np.random.default_rng(123)
    fresh = [cell(rng, 0) for _ in range(6)]
    off = [cell(rng, 1), cell(rng, 2), cell(rng, 1), cell(rng, 2)]
    copies = [a for a, y in zip(train_images, train_labels) if y == 0][:2]
    planted = [fresh[0], off[0], copies[0], fresh[1], fresh[2], off[1], off[2], fresh[3], copies[1], fresh[4],
               off[3], fresh[5]]
    expected = [0, 3, 4, 7, 9, 11]
    tally = ClassTally(wanted=100)
    batches = [u8(planted[:5]), u8(planted[5:])]
    kept = list(curated(iter(batches), judge, 0, 100, tally))
    assert [k[0] for k in kept] == expected
    assert all(torch.equal(img, u8([planted[i]])[0]) for (_, img, _, _), i in zip(kept, expected))
    assert tally.as_dict() == {"wanted": 100, "drawn": 12, "kept": 6,
                               "dropped": {"low_confidence": 4, "near_copy": 2}, "short": 94}
    assert all(p >= 0.5 and d >= judge.threshold for _, _, p, d in kept)
    # and it stops drawing once it has what it wants
    tally = ClassTally(wanted=2)
    assert [k[0] for k in curated(iter(batches), judge, 0, 2, tally)] == [0, 3]
    assert tally.drawn == 4


def gan_run(run_dir: Path, shards: Path) -> Path:
    """A tiny untrained GAN checkpoint whose config says it trained on `shards`' cut train split."""
    spec = dataclasses.replace(load_spec("cgan"), width=8, z_dim=16)
    torch.manual_seed(0)
    G, D = build_model(spec, len(CLASSES), 32)
    config = {"model": dataclasses.asdict(spec), "image_size": 32, "classes": CLASSES, "seed": 0, "steps": 1,
              "shards": str(shards.resolve()), "split": "train", "scarce": CUT, "scarce_seed": 0,
              "class_counts": {"red": 4, "green": 16, "blue": 16}}
    state = {"step": 1, "epoch": 0, "batch_in_epoch": 0, "config": config, "G": G.state_dict(), "D": D.state_dict(),
             "G_ema": None, "opt_G": {}, "opt_D": {}, "scaler": None, "rng": {}, "meta": {}}
    save_checkpoint(run_dir, state, keep_last=0)
    return run_dir


def test_generate_curates_and_records_it_in_the_manifest(real, tmp_path):
    shards, _, _ = real
    run = gan_run(tmp_path / "gan", shards)
    kw = dict(run_dir=run, per_class=5, png=False, progress=False, device="cpu", curate=True, curate_epochs=5)
    m = generate(out=tmp_path / "all", curate_confidence=0.0, curate_copy_percentile=None, **kw)
    cur = m["curation"]
    assert cur["judge"]["samples"] == {"red": 4, "green": 16, "blue": 16}
    assert cur["classes"] == {c: {"wanted": 5, "drawn": 5, "kept": 5, "short": 0,
                                  "dropped": {"low_confidence": 0, "near_copy": 0}} for c in CLASSES}
    assert m["counts"]["train"] == {c: 5 for c in CLASSES}
    assert all(0 <= im["judge_p"] <= 1 and im["copy_distance"] >= 0 for im in m["images"])
    # an unreachable confidence keeps nothing: every draw is dropped, said and recorded, and nothing is faked
    m = generate(out=tmp_path / "none", curate_confidence=1.0, curate_max_draws=2, **kw)
    for c in CLASSES:
        t = m["curation"]["classes"][c]
        assert t["drawn"] == 10 and t["kept"] + t["dropped"]["low_confidence"] + t["dropped"]["near_copy"] == 10
        assert m["counts"]["train"][c] == t["kept"] and t["short"] == 5 - t["kept"]
    assert read_manifest(tmp_path / "none")["curation"] == m["curation"]
    assert generate(out=tmp_path / "all2", curate_confidence=0.0, curate_copy_percentile=None, **kw)["images"] == \
        read_manifest(tmp_path / "all")["images"]   # same checkpoint, seed and settings: the same cells


def test_curation_refuses_what_it_cannot_judge(real, tmp_path):
    shards, _, _ = real
    with pytest.raises(GenerateError, match="labelled cells"):
        generate(run_dir=gan_run(tmp_path / "g", shards), out=tmp_path / "o", count=3, curate=True)
    with pytest.raises(GenerateError, match="curate_confidence"):
        generate(run_dir=tmp_path / "g", out=tmp_path / "o", per_class=3, curate=True, curate_confidence=2)
    with pytest.raises(GenerateError, match="what the GAN trained on"):
        generate(run_dir=run_without_trained_on(tmp_path / "old"), out=tmp_path / "o", per_class=3, curate=True,
                 device="cpu", progress=False)


def run_without_trained_on(run_dir: Path) -> Path:
    """A tiny checkpoint from before runs recorded what they trained on (no shards or scarce in its config)."""
    spec = dataclasses.replace(load_spec("cgan"), width=8, z_dim=16)
    G, D = build_model(spec, len(CLASSES), 32)
    state = {"step": 1, "epoch": 0, "batch_in_epoch": 0, "G": G.state_dict(), "D": D.state_dict(), "G_ema": None,
             "config": {"model": dataclasses.asdict(spec), "image_size": 32, "classes": CLASSES},
             "opt_G": {}, "opt_D": {}, "scaler": None, "rng": {}, "meta": {}}
    save_checkpoint(run_dir, state, keep_last=0)
    return run_dir
