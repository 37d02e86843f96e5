"""tools/shard.py and hpcgan.data.build end to end, on generated corpora of all three source layouts
(including a corpus of bad files) and, when present, on ../shared/data/pbc-sample.

Every build here is small (32 px, < 100 images) so the whole file runs in well under a minute.
"""
from __future__ import annotations

import csv
import hashlib
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import imagehash
import numpy as np
import pytest
from PIL import Image

from hpcgan.data.clean import clean_image, decode_rgb
from hpcgan.data.build import BuildError, BuildSettings, build, near_pairs, split_counts
from hpcgan.data.shards import SPLITS, iter_samples, read_manifest, sha256_file
from hpcgan.data.taxonomy import Taxonomy

REPO = Path(__file__).resolve().parents[1]
PBC_SAMPLE = REPO.parent / "shared/data/pbc-sample"
TAX = Taxonomy.load()


# ---------------------------------------------------------------- corpus generator

def cell_image(seed: int, w: int = 48, h: int = 40) -> np.ndarray:
    """A stained-looking RGB image whose perceptual hash differs from every other seed's:
    a smooth random background field (low frequencies drive phash) plus a purple nucleus and noise."""
    rng = np.random.default_rng(seed)
    field = Image.fromarray((rng.random((4, 4)) * 255).astype(np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
    base = 170 + 70 * (np.asarray(field, np.float64)[..., None] / 255)
    img = base * np.array([1.0, 0.92, 1.0])
    yy, xx = np.mgrid[:h, :w]
    r = np.hypot(yy - rng.uniform(0.3, 0.7) * h, xx - rng.uniform(0.3, 0.7) * w)
    img[r < 0.35 * min(w, h)] = (205, 150, 190)
    img[r < 0.18 * min(w, h)] = (90, 40, 130)
    img += rng.normal(0, 8, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def save(path: Path, img: Image.Image | bytes, fmt: str | None = None, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(img, bytes):
        path.write_bytes(img)
    else:
        img.save(path, format=fmt, **kw)
    return path


def jpeg_bytes(img: Image.Image, quality=95) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def make_corpus(root: Path) -> dict:
    """Write pbc/, aml/, lab/ under root. Returns what a correct build must do with each file:
    {"good": {path: class}, "bad": {path: reason fragment}, "ignored": {...}, "exact": {dropped: kept},
     "near": {dropped: kept}, "conflict": [paths], "notes": {path: note fragment}}."""
    seed = iter(range(10_000))
    exp = {"good": {}, "bad": {}, "ignored": {}, "exact": {}, "near": {}, "conflict": [], "notes": {}}

    def good(source, rel, cls, fmt="PNG", img=None, note=None, **kw):
        img = img if img is not None else Image.fromarray(cell_image(next(seed)))
        save(root / source / rel, img, fmt, **kw)
        exp["good"][f"{source}/{rel}"] = cls
        if note:
            exp["notes"][f"{source}/{rel}"] = note
        return root / source / rel

    def bad(source, rel, data: bytes, reason):
        save(root / source / rel, data)
        exp["bad"][f"{source}/{rel}"] = reason

    # PBC: folder per class, prefixes carry the fine type
    for i in range(6):
        good("pbc", f"basophil/BA_{i}.jpg", "basophil", "JPEG")
        good("pbc", f"eosinophil/EO_{i}.jpg", "eosinophil", "JPEG")
    for prefix, cls, n in [("PMY", "promyelocyte", 3), ("MY", "immature granulocyte", 3),
                           ("MMY", "immature granulocyte", 2), ("IG", "immature granulocyte", 1),
                           ("SNE", "neutrophil", 4), ("BNE", "neutrophil", 2)]:
        folder = "neutrophil" if prefix in ("SNE", "BNE") else "ig"
        for i in range(n):
            good("pbc", f"{folder}/{prefix}_{i}.jpg", cls, "JPEG")
    for i in range(4):
        good("pbc", f"platelet/PLATELET_{i}.jpg", "platelet", "JPEG")
    shutil.copyfile(root / "pbc/neutrophil/BNE_0.jpg", root / "pbc/neutrophil/BNE_0_copy.jpg")
    exp["exact"]["pbc/neutrophil/BNE_0_copy.jpg"] = "pbc/neutrophil/BNE_0.jpg"
    bad("pbc", "basophil/BA_zero.jpg", b"", "empty file")
    bad("pbc", "basophil/BA_trunc.jpg", jpeg_bytes(Image.fromarray(cell_image(999)))[:400], "truncated")
    bad("pbc", "eosinophil/EO_text.jpg", b"Patient notes: not an image\n", "not an image")
    save(root / "pbc/README.md", b"# PBC\n")
    exp["ignored"]["pbc/README.md"] = "not an image file name"

    # AML: folder per code, TIFF
    for i in range(3):
        good("aml", f"BAS/BAS_{i:04d}.tiff", "basophil", "TIFF")
    for i in range(6):
        good("aml", f"MYO/MYO_{i:04d}.tiff", "myeloblast", "TIFF")
    good("aml", "KSC/KSC_0000.tiff", "smudge cell", "TIFF")            # a class with one image
    for i in range(2):
        good("aml", f"MOB/MOB_{i:04d}.tiff", "monoblast", "TIFF")       # a class with two images
    import tifffile
    rgb16 = cell_image(next(seed)).astype(np.uint16) * 257
    save(root / "aml/MYO/MYO_16bit.tiff", b"")
    tifffile.imwrite(root / "aml/MYO/MYO_16bit.tiff", rgb16)
    exp["good"]["aml/MYO/MYO_16bit.tiff"] = "myeloblast"
    frames = [Image.fromarray(cell_image(next(seed))) for _ in range(2)]
    buf = io.BytesIO()
    frames[0].save(buf, format="TIFF", save_all=True, append_images=frames[1:])
    bad("aml", "EOS/EOS_multi.tiff", buf.getvalue(), "frames")
    bad("aml", "XYZ/XYZ_0000.tiff", jpeg_bytes(Image.fromarray(cell_image(next(seed)))), "unknown")

    # lab: forgiving folder names and every odd mode
    for i in range(4):
        good("lab", f"Neutrophils_Band/nb_{i}.png", "neutrophil")
        good("lab", f"Lymphocytes_Typical/ly_{i}.png", "lymphocyte")
    for i in range(3):
        good("lab", f"smudge/sm_{i}.png", "smudge cell")
        good("lab", f"Thrombocytes/th_{i}.png", "platelet")
    good("lab", "Thrombocytes/th_blank.png", "platelet", img=Image.new("RGB", (40, 40), (250, 250, 250)),
         note="macenko skipped")
    mono = lambda: Image.fromarray(cell_image(next(seed)))  # noqa: E731
    good("lab", "Monocyte/mo_cmyk.jpg", "monocyte", "JPEG", img=mono().convert("CMYK"), note="CMYK")
    g16 = (np.asarray(mono().convert("L"), np.uint16) * 257)
    good("lab", "Monocyte/mo_16bit.png", "monocyte", img=Image.fromarray(g16), note="16-bit")
    good("lab", "Monocyte/mo_palette.png", "monocyte", img=mono().convert("P"), note="palette")
    good("lab", "Monocyte/mo_rgba.png", "monocyte", img=mono().convert("RGBA"), note="white")
    good("lab", "Monocyte/mo_gray.png", "monocyte", img=mono().convert("L"), note="L -> RGB")
    near_src = good("lab", "Monocyte/mo_a.png", "monocyte")
    save(root / "lab/Monocyte/mo_b_reencoded.jpg", jpeg_bytes(Image.open(near_src).convert("RGB"), 85))
    exp["near"]["lab/Monocyte/mo_b_reencoded.jpg"] = "lab/Monocyte/mo_a.png"
    bad("lab", "Monocyte/mo_tiny.png", _png(Image.fromarray(cell_image(next(seed), 10, 10))), "too small")
    bad("lab", "Monocyte/mo_mask.png", _png(mono().convert("1")), "1-bit")
    bad("lab", "Monocyte/mo_corrupt.png", np.random.default_rng(5).bytes(3000), "not an image")
    bad("lab", "Macrophage/ma_0.png", _png(mono()), "unknown lab class folder")
    # the same picture filed under two classes: nobody can say which is right
    conflict = _png(mono())
    for folder in ("Basophil", "Eosinophils"):
        save(root / "lab" / folder / "x_conflict.png", conflict)
        exp["conflict"].append(f"lab/{folder}/x_conflict.png")
    save(root / "lab/Monocyte/.DS_Store", b"\0\0\0\1Bud1")
    exp["ignored"]["lab/Monocyte/.DS_Store"] = "hidden"
    return exp


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def tree_digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


def sources_of(root: Path) -> dict[str, str]:
    return {s: str(root / s) for s in ("pbc", "aml", "lab")}


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def samples(out: Path) -> dict[str, list]:
    return {s: list(iter_samples(out, s)) for s in SPLITS}


# ---------------------------------------------------------------- fixtures: one corpus, one build

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    exp = make_corpus(root)
    # guard the fixture itself: distinct images must be far apart in phash, or the dedupe tests lie
    rgb = [decode_rgb((root / p).read_bytes())[0] for p in exp["good"]]
    hashes = [int(str(imagehash.phash(Image.fromarray(a))), 16) for a in rgb]
    assert not near_pairs(hashes, 6), "corpus generator made look-alike images"
    return root, exp


@pytest.fixture(scope="module")
def built(corpus, tmp_path_factory):
    root, exp = corpus
    before = tree_digest(root)
    out = tmp_path_factory.mktemp("built") / "shards"
    manifest = build(sources_of(root), out, size=32, seed=0, shard_size=16, workers=2, progress=False)
    return out, manifest, before


# ---------------------------------------------------------------- tests

def test_every_file_gets_its_outcome(corpus, built):
    root, exp = corpus
    out, manifest, _ = built
    rejected = {r["path"]: r for r in read_csv(out / "rejected.csv")}
    assert set(rejected) == set(exp["bad"]) | set(exp["ignored"])
    for path, fragment in {**exp["bad"], **exp["ignored"]}.items():
        assert fragment in rejected[path]["reason"], (path, rejected[path]["reason"])
        assert rejected[path]["source"] == path.split("/")[0]
    for path in exp["ignored"]:
        assert rejected[path]["reason"].startswith("ignored:")
    assert manifest["rejected"]["bad"] == len(exp["bad"])
    assert manifest["rejected"]["ignored"] == len(exp["ignored"])

    metas = {m["path"]: m for split in SPLITS for *_, m in iter_samples(out, split)}
    dropped = set(exp["exact"]) | set(exp["near"]) | set(exp["conflict"])
    assert set(metas) == set(exp["good"]) - dropped
    for path, fragment in exp["notes"].items():
        assert fragment in metas[path]["note"], (path, metas[path]["note"])
    # blank and grey images have no (or one) stain direction: kept unnormalised, with a note
    unnormalised = {p for p, m in metas.items() if m["stain"] == "none"}
    assert unnormalised == {"lab/Thrombocytes/th_blank.png", "lab/Monocyte/mo_gray.png", "lab/Monocyte/mo_16bit.png"}
    assert all("macenko skipped" in metas[p]["note"] for p in unnormalised)
    assert manifest["stain_skipped"] == 3
    assert metas["lab/Monocyte/mo_a.png"]["stain"] == "macenko"


def test_taxonomy_on_all_three_layouts(corpus, built):
    _, exp = corpus
    out, manifest, _ = built
    metas = {m["path"]: (m, label) for split in SPLITS for *_, label, m in iter_samples(out, split)}
    for path, (meta, label) in metas.items():
        assert meta["class"] == exp["good"][path]
        assert label == meta["label"] == TAX.label(meta["class"])
        res = TAX.resolve(meta["source"], path.split("/", 1)[1])
        assert (meta["fine"], meta["source_label"]) == (res.fine, res.source_label)
    assert metas["pbc/ig/PMY_0.jpg"][0]["fine"] == "promyelocyte"
    assert metas["pbc/ig/MMY_0.jpg"][0]["class"] == "immature granulocyte"
    assert metas["lab/Neutrophils_Band/nb_0.png"][0]["fine"] == "neutrophil band"
    assert metas["aml/KSC/KSC_0000.tiff"][0]["class"] == "smudge cell"
    assert {m["source"] for m, _ in metas.values()} == {"pbc", "aml", "lab"}


def test_duplicates_are_removed_and_reported(corpus, built):
    root, exp = corpus
    out, manifest, _ = built
    rows = read_csv(out / "duplicates.csv")
    by_dropped = {r["dropped"]: r for r in rows}
    assert set(by_dropped) == set(exp["exact"]) | set(exp["near"]) | set(exp["conflict"])
    for dropped, kept in exp["exact"].items():
        assert (by_dropped[dropped]["kept"], by_dropped[dropped]["kind"]) == (kept, "exact")
        assert by_dropped[dropped]["distance"] == "0"
    for dropped, kept in exp["near"].items():
        r = by_dropped[dropped]
        assert (r["kept"], r["kind"]) == (kept, "near")
        assert 0 <= int(r["distance"]) <= 4
    for path in exp["conflict"]:
        assert by_dropped[path]["kept"] == "" and "conflicting classes" in by_dropped[path]["reason"]
    assert manifest["duplicates"] == {"dropped": len(rows), "exact": len(exp["exact"]) + len(exp["conflict"]),
                                      "near": len(exp["near"]), "conflicting_label_groups": 1}
    # the file hash recorded per sample is of the original bytes
    meta = next(m for *_, m in iter_samples(out, "train"))
    assert meta["sha256"] == sha256_file(root / meta["path"])


def test_manifest_counts_equal_what_is_in_the_tars(corpus, built):
    out, manifest, _ = built
    assert manifest["format"] == 1 and manifest["synthetic"] is False
    assert manifest["classes"] == TAX.classes and manifest["image_size"] == 32
    assert manifest["taxonomy"] == TAX.spec
    got = samples(out)
    for split in SPLITS:
        counted = Counter(m["class"] for *_, m in got[split])
        assert {c: n for c, n in manifest["counts"][split].items() if n} == dict(counted)
        by_src = Counter((m["source"], m["class"]) for *_, m in got[split])
        flat = {(s, c): n for s, d in manifest["counts_by_source"][split].items() for c, n in d.items() if n}
        assert flat == dict(by_src)
        assert manifest["totals"][split] == len(got[split]) == sum(s["count"] for s in manifest["shards"][split])
        for shard in manifest["shards"][split]:
            assert sha256_file(out / shard["name"]) == shard["sha256"]
            assert sha256_file(out / shard["idx"]) == shard["idx_sha256"]
        keys = [k for k, *_ in got[split]]
        assert keys == [f"{split}{i:07d}" for i in range(len(keys))]
        for _, image, ext, label, meta in got[split]:
            assert ext == "png"
            im = Image.open(io.BytesIO(image))
            assert (im.mode, im.size) == ("RGB", (32, 32))
            assert meta["synthetic"] is False and len(meta["orig_size"]) == 2
            assert set(meta) >= {"source", "source_label", "fine", "class", "label", "path", "sha256",
                                 "phash", "orig_size", "stain"}
    assert len(manifest["shards"]["train"]) > 1         # shard_size=16 rolls over
    assert not list(out.glob(".*")), "spool or temp files left in the output"
    # tars are class-mixed, not sorted by class
    train_labels = [label for *_, label, _ in got["train"]]
    assert train_labels != sorted(train_labels)


def test_split_rule():
    assert split_counts(0) == (0, 0, 0)
    assert split_counts(1) == (0, 0, 1)
    assert split_counts(2) == (1, 0, 1)
    assert split_counts(3) == (2, 0, 1)
    assert split_counts(4) == (2, 1, 1)
    assert split_counts(10) == (6, 1, 3)
    assert split_counts(100) == (56, 14, 30)
    for n in range(1, 300):
        tr, va, te = split_counts(n)
        assert tr + va + te == n and te >= 1 and (tr >= 1 or n == 1)
        assert abs(te - 0.3 * n) <= 1 and abs(va - 0.2 * (n - te)) <= 1

    # the fractions are settings: no test split for a GAN-only shard set, another val share
    assert split_counts(10, test_fraction=0.0) == (8, 2, 0)
    assert split_counts(1, test_fraction=0.0) == (1, 0, 0)
    assert split_counts(10, test_fraction=0.0, val_fraction=0.0) == (10, 0, 0)
    assert split_counts(100, test_fraction=0.1, val_fraction=0.1) == (81, 9, 10)


def test_split_fractions_are_settings(corpus, tmp_path):
    root, _ = corpus
    m = build(sources_of(root), tmp_path / "all", size=32, test_fraction=0, val_fraction=0, workers=1,
              progress=False, contact_sheet=False)
    assert sum(m["counts"]["test"].values()) == sum(m["counts"]["val"].values()) == 0
    assert m["settings"]["test_fraction"] == 0 and m["settings"]["val_fraction"] == 0
    r = run_cli(f"lab={root / 'lab'}", f"out={tmp_path / 'bad'}", "test_fraction=1.5")
    assert r.returncode == 2 and "test_fraction=1.5" in r.stderr and not (tmp_path / "bad").exists()


def test_crop_zooms_on_the_centre_and_is_recorded(corpus, tmp_path):
    """crop=0.5 writes the same samples, each the central half of its field (recorded in the manifest);
    a crop out of [0.1, 1] is refused before anything is written."""
    root, _ = corpus
    kw = dict(size=32, workers=1, progress=False, contact_sheet=False, stain="none")
    whole = build(sources_of(root), tmp_path / "whole", **kw)
    zoom = build(sources_of(root), tmp_path / "zoom", crop=0.5, **kw)
    assert zoom["settings"]["crop"] == 0.5 and whole["settings"]["crop"] == 1.0
    assert zoom["counts"] == whole["counts"]
    a, b = samples(tmp_path / "whole"), samples(tmp_path / "zoom")
    assert [m["path"] for *_, m in a["train"]] == [m["path"] for *_, m in b["train"]]
    differ = [x[1] != y[1] for x, y in zip(a["train"], b["train"])]
    assert sum(differ) > 0.8 * len(differ), differ     # (a flat field looks the same zoomed)
    r = run_cli(f"lab={root / 'lab'}", f"out={tmp_path / 'bad'}", "crop=0")
    assert r.returncode == 2 and "crop=0" in r.stderr and not (tmp_path / "bad").exists()


def test_split_is_stratified_and_disjoint(built):
    out, manifest, _ = built
    got = samples(out)
    per_class = Counter(m["class"] for s in SPLITS for *_, m in got[s])
    for cls, n in per_class.items():
        assert tuple(manifest["counts"][s][cls] for s in SPLITS) == split_counts(n), cls
    assert manifest["counts"]["test"]["smudge cell"] >= 1      # scarce classes still get a test image
    assert manifest["counts"]["test"]["monoblast"] == manifest["counts"]["train"]["monoblast"] == 1
    paths = [m["path"] for s in SPLITS for *_, m in got[s]]
    assert len(paths) == len(set(paths))


def test_deterministic_and_independent_of_worker_count(corpus, built, tmp_path):
    root, _ = corpus
    out, manifest, _ = built
    again = build(sources_of(root), tmp_path / "again", size=32, seed=0, shard_size=16, workers=1, progress=False)
    assert again["shards"] == manifest["shards"]
    for p in out.iterdir():
        assert (tmp_path / "again" / p.name).read_bytes() == p.read_bytes(), p.name
    other = build(sources_of(root), tmp_path / "seed1", size=32, seed=1, shard_size=16, workers=2, progress=False)
    assert other["shards"] != manifest["shards"]
    assert other["totals"] == manifest["totals"]


def test_inputs_are_never_modified(corpus, built):
    root, _ = corpus
    _, _, before = built
    assert tree_digest(root) == before


def test_missing_empty_and_dangerous_arguments(corpus, built, tmp_path, caplog):
    root, _ = corpus
    good = {"pbc": str(root / "pbc")}
    with pytest.raises(BuildError, match="does not exist"):
        build({**good, "aml": str(tmp_path / "nope")}, tmp_path / "o1", size=32, workers=1, progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(BuildError, match="no image files"):
        build({"lab": str(tmp_path / "empty")}, tmp_path / "o2", size=32, workers=1, progress=False)
    with pytest.raises(BuildError, match="strict"):
        build({**good, "lab": str(tmp_path / "empty")}, tmp_path / "o3", size=32, on_bad="strict",
              workers=1, progress=False)
    with caplog.at_level("WARNING"):    # an empty source beside a good one: a warning, not an error
        m = build({**good, "lab": str(tmp_path / "empty")}, tmp_path / "o6", size=32, workers=1, progress=False)
    assert "has no image files" in caplog.text and m["totals"]["all"] > 0
    shutil.rmtree(tmp_path / "o6")
    with pytest.raises(BuildError, match="no sources"):
        build({}, tmp_path / "o4")
    home = tmp_path / "home"
    (home / "thesis.tex").parent.mkdir()
    (home / "thesis.tex").write_text("years of work")
    with pytest.raises(BuildError, match="not a shard set"):
        build(good, home, size=32, workers=1, progress=False)
    assert (home / "thesis.tex").read_text() == "years of work"
    with pytest.raises(BuildError, match="overlaps"):
        build(good, root / "pbc" / "shards", size=32, workers=1, progress=False)
    with pytest.raises(BuildError, match="stain"):
        build(good, tmp_path / "o5", stain="reinhard")
    assert not any(p.name.startswith("o") for p in tmp_path.iterdir())


def run_cli(*args, timeout=120, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, str(REPO / "tools/shard.py"), *args], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=kw.get("cwd", REPO))


def test_cli_strict_fails_lists_bad_files_and_writes_nothing(corpus, built, tmp_path):
    root, exp = corpus
    out = tmp_path / "shards"
    shutil.copytree(built[0], out)
    before = tree_digest(out)
    r = run_cli(*[f"{k}={v}" for k, v in sources_of(root).items()], f"out={out}", "size=32",
                "on_bad=strict", "workers=1", "progress=false")
    assert r.returncode == 2, r.stderr
    for path in exp["bad"]:
        assert path in r.stderr
    for path in exp["ignored"]:
        assert path not in r.stderr
    assert tree_digest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shards"]   # no staging left behind


def test_cli_builds_and_prints_summary(tmp_path):
    src = tmp_path / "lab"
    for i in range(3):
        save(src / "Eosinophil" / f"e{i}.png", Image.fromarray(cell_image(100 + i)))
    r = run_cli(f"lab={src}", "out=rel_out", "size=32", "stain=none", "encoding=jpg", "quality=90",
                "progress=false", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "shard: 3 images" in r.stdout
    r = run_cli(f"lab={src}", cwd=tmp_path)
    assert r.returncode == 2 and "out is required: pass out=" in r.stderr
    m = read_manifest(tmp_path / "rel_out")   # relative out resolved against the caller's cwd
    assert m["settings"]["encoding"] == "jpg" and m["counts"]["test"]["eosinophil"] == 1
    assert {ext for *_, ext, _, _ in iter_samples(tmp_path / "rel_out", "train")} == {"jpg"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lab", "rel_out"]   # Hydra left no litter


def test_cli_bad_setting_is_one_line_exit_2(tmp_path):
    """A bad value ends in one line naming the setting and exit code 2, before anything is read or written."""
    cases = [("size=abc", "size"), ("size=256", "size=256: the GANs are built for 32, 64 or 128 px"),
             ("shard_size=0", "shard_size=0"), ("stain=reinhard", "stain='reinhard'")]
    for arg, words in cases:
        r = run_cli(f"lab={tmp_path / 'nope'}", "out=out", arg, cwd=tmp_path)
        assert r.returncode == 2, (arg, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("shard: error: ") and words in lines[0], (arg, r.stderr)
    assert list(tmp_path.iterdir()) == []


def test_image_size_the_gans_cannot_train_on_is_refused_at_shard_time(corpus, tmp_path):
    root, _ = corpus
    for size in (256, 48):
        with pytest.raises(BuildError, match=f"size={size}: the GANs are built for 32, 64 or 128 px"):
            build(sources_of(root), tmp_path / "out", size=size, workers=1, progress=False)
    assert list(tmp_path.iterdir()) == []


def big_corpus(root: Path, n: int = 120) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        a = (rng.random((24, 24, 3)) * 255).astype(np.uint8)
        save(root / "lab" / "Monocyte" / f"m{i:04d}.png", Image.fromarray(a).resize((256, 256)))
    return root / "lab"


@pytest.mark.slow
@pytest.mark.parametrize("sig, workers", [(signal.SIGKILL, 1), (signal.SIGINT, 2)], ids=["sigkill-1worker", "sigint-2workers"])
def test_interrupted_run_leaves_previous_output_intact(built, tmp_path, sig, workers):
    # 600 images: enough work that the build is still running when the signal lands, even on a loaded machine
    # (with 120 a starved test process sometimes saw the spool only as the build was finishing: rc 0)
    src = big_corpus(tmp_path / "src", n=600)
    parent = tmp_path / "work"
    out = parent / "shards"
    shutil.copytree(built[0], out)
    before = tree_digest(out)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # SIGINT as at a terminal, whatever this suite inherited: a suite started in the background of a
    # non-interactive shell (`./.ci/run &`) ignores SIGINT, and an ignored signal stays ignored across exec
    proc = subprocess.Popen([sys.executable, str(REPO / "tools/shard.py"), f"lab={src}", f"out={out}",
                             "size=32", f"workers={workers}", "progress=false"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 60
    spooled = 0
    while time.time() < deadline and proc.poll() is None:
        spool = list(parent.glob(".shards.staging-*/.spool/*"))
        spooled = len(spool)
        if spooled >= 5:
            break
        time.sleep(0.02)
    assert proc.poll() is None and spooled >= 5, "the build finished before it could be interrupted"
    proc.send_signal(sig)
    proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert tree_digest(out) == before                  # previous dataset byte-identical
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in built[0].iterdir())
    leftovers = [p.name for p in parent.iterdir() if p.name != "shards"]
    if sig == signal.SIGINT:
        assert leftovers == []                         # cleaned up on Ctrl-C
    else:
        # SIGKILL cannot be caught: at worst a hidden staging sibling stays, never a half dataset at `out`
        assert leftovers and all(name.startswith(f".shards.staging-{socket.gethostname()}@{proc.pid}-")
                                 for name in leftovers)
        # the next run (here one that fails validation) removes what the killed process left behind
        err = run_cli(f"lab={src}", f"out={out}", "size=32", "on_bad=strict", "min_size=1000", "progress=false",
                      "workers=1").stderr
        assert "left by an interrupted run" in err
        assert [p.name for p in parent.iterdir()] == ["shards"]


@pytest.mark.skipif(not hasattr(os, "seteuid"), reason="needs POSIX users")
def test_unreadable_file_is_rejected_not_fatal():
    """chmod 000 does not stop root, so as root the build runs with the effective uid of 'nobody'."""
    work = Path(tempfile.mkdtemp(prefix="hpcgan-unreadable-"))   # /tmp itself: traversable by nobody
    try:
        src = work / "lab"
        for i in range(3):
            save(src / "Basophil" / f"b{i}.png", Image.fromarray(cell_image(200 + i)))
        locked = save(src / "Basophil" / "locked.png", Image.fromarray(cell_image(300)))
        locked.chmod(0)
        for p in [work, *src.rglob("*")]:
            if p != locked:
                p.chmod(0o777 if p.is_dir() else 0o644)
        if os.geteuid() == 0:
            try:
                import pwd
                nobody = pwd.getpwnam("nobody")
            except KeyError:
                pytest.skip("running as root and there is no 'nobody' user to lose read permission")
            # lazy imports (scipy via imagehash) live under /root: load them while still root
            clean_image(_png(Image.fromarray(cell_image(1))), BuildSettings(size=32).clean())
            os.setegid(nobody.pw_gid)
            os.seteuid(nobody.pw_uid)
            try:
                manifest = build({"lab": str(src)}, work / "out", size=32, workers=1, progress=False)
            finally:
                os.seteuid(0)
                os.setegid(0)
        else:
            manifest = build({"lab": str(src)}, work / "out", size=32, workers=1, progress=False)
        rows = read_csv(work / "out" / "rejected.csv")
        assert [(x["path"], x["reason"].split(":")[0]) for x in rows] == [("lab/Basophil/locked.png", "unreadable")]
        assert "ermission" in rows[0]["reason"]
        assert manifest["totals"]["all"] == 3
    finally:
        shutil.rmtree(work)


def test_near_pairs_is_exact():
    rng = np.random.default_rng(0)
    base = [int(x) for x in rng.integers(0, 2**63, 60, dtype=np.int64)]
    hashes = base + [h ^ (1 << int(rng.integers(64))) ^ (1 << int(rng.integers(64))) for h in base[:20]]
    for t in (0, 2, 4, 7):
        brute = [(i, j, (a ^ b).bit_count()) for i, a in enumerate(hashes) for j, b in enumerate(hashes)
                 if i < j and (a ^ b).bit_count() <= t]
        assert near_pairs(hashes, t) == brute
    assert near_pairs(hashes, -1) == []


def test_near_pairs_is_exact_on_clustered_hashes():
    """Real cells' hashes share bit blocks (big buckets) and exact copies repeat a hash: still exact."""
    rng = np.random.default_rng(1)
    common = int(rng.integers(0, 2**63))
    hashes = [common ^ int(rng.integers(0, 2**20)) for _ in range(150)]     # the high 44 bits all equal
    hashes += hashes[:10] + [hashes[0]] * 3
    for t in (0, 3, 4, 9):
        brute = [(i, j, (a ^ b).bit_count()) for i, a in enumerate(hashes) for j, b in enumerate(hashes)
                 if i < j and (a ^ b).bit_count() <= t]
        assert brute, "the test must have pairs to find"
        assert near_pairs(hashes, t) == brute
    top = [(1 << 63) | h for h in hashes[:20]]                                  # the top bit set: uint64, not int64
    assert near_pairs(top, 4) == near_pairs(hashes[:20], 4)


def test_dali_reads_the_shards(built):
    pytest.importorskip("nvidia.dali", reason="DALI not installed")
    from nvidia.dali import fn, pipeline_def, types
    out, manifest, _ = built
    shards = manifest["shards"]["train"]

    @pipeline_def(batch_size=4, num_threads=1, device_id=None)
    def pipe():
        img, label = fn.readers.webdataset(paths=[str(out / s["name"]) for s in shards],
                                           index_paths=[str(out / s["idx"]) for s in shards],
                                           ext=["png", "label"], dtypes=[types.UINT8, types.INT64],
                                           missing_component_behavior="error", name="r")
        return fn.decoders.image(img, device="cpu", output_type=types.RGB), label

    p = pipe()
    p.build()
    n = p.epoch_size("r")
    labels = []
    while len(labels) < n:
        images, lab = p.run()
        for i in range(len(lab)):
            assert np.asarray(images[i]).shape == (32, 32, 3)
            labels.append(int(np.asarray(lab[i]).reshape(-1)[0]))
    labels = labels[:n]
    want = Counter({TAX.label(c): k for c, k in manifest["counts"]["train"].items() if k})
    assert n == manifest["totals"]["train"] and Counter(labels) == want


def test_webdataset_reads_the_shards(built):
    wds = pytest.importorskip("webdataset", reason="webdataset not installed")
    out, manifest, _ = built
    urls = [str(out / s["name"]) for s in manifest["shards"]["test"]]
    ds = wds.WebDataset(urls, shardshuffle=False).decode("pil")
    n = 0
    for sample in ds:
        assert sample["png"].size == (32, 32)
        assert int(np.frombuffer(sample["label"], "<i8")[0]) == sample["json"]["label"]
        n += 1
    assert n == manifest["totals"]["test"]


def test_simulated_sources_build_cleanly(tmp_path):
    """The simulator's three layouts (if that module is present) go through without loss or false duplicates."""
    simulate = pytest.importorskip("hpcgan.data.simulate", reason="hpcgan.data.simulate not present").simulate
    summary = simulate(tmp_path / "sim", seed=0, scale=0.02, progress=False)
    m = build({s: str(tmp_path / "sim" / s) for s in ("pbc", "aml", "lab")}, tmp_path / "out", size=32,
              workers=2, progress=False)
    assert m["totals"]["all"] == summary["total"]
    assert m["rejected"]["bad"] == 0 and m["duplicates"]["dropped"] == 0
    for source, fine_counts in summary["counts"].items():
        want = Counter()
        for fine, n in fine_counts.items():
            want[TAX.types[fine]] += n
        got = Counter({c: sum(m["counts_by_source"][s][source][c] for s in SPLITS) for c in TAX.classes})
        assert +got == want, source


@pytest.mark.real_data
@pytest.mark.skipif(not PBC_SAMPLE.is_dir(), reason=f"{PBC_SAMPLE} absent (real PBC sample lives in ../shared)")
def test_real_pbc_sample(tmp_path):
    out = tmp_path / "pbc64"
    r = run_cli(f"pbc={PBC_SAMPLE}", f"out={out}", "size=64", "progress=false", timeout=300)
    assert r.returncode == 0, r.stderr
    m = read_manifest(out)
    # expected per-class counts straight from the file names through the taxonomy
    expected = Counter()
    for p in sorted(PBC_SAMPLE.rglob("*.jpg")):
        expected[TAX.resolve("pbc", p.relative_to(PBC_SAMPLE).as_posix()).cls] += 1
    assert sum(expected.values()) == 400
    assert expected["promyelocyte"] == len(list(PBC_SAMPLE.glob("ig/PMY_*")))
    removed = Counter()
    for row in read_csv(out / "duplicates.csv"):
        removed[TAX.resolve("pbc", row["dropped"].split("/", 1)[1]).cls] += 1
    for row in read_csv(out / "rejected.csv"):
        if row["path"].endswith(".jpg"):
            removed[TAX.resolve("pbc", row["path"].split("/", 1)[1]).cls] += 1
    got = Counter({c: sum(m["counts"][s][c] for s in SPLITS) for c in m["classes"]})
    assert +got == expected - removed
    # the sample's README says byte-identical duplicates were left out; a run that reports
    # exact duplicates here would be wrong
    assert m["duplicates"]["exact"] == 0
    assert m["rejected"]["bad"] == 0
    assert f"shard: {sum(got.values())} images" in r.stdout


def test_contact_sheet_shows_every_class_of_the_train_split(built):
    """contact_sheet.png: a row per class of the manifest (64 px tiles + 2 px padding, a title band on top),
    and the first tile of each row is the first training image of that class, blown up from 32 px."""
    out, manifest, _ = built
    with Image.open(out / "contact_sheet.png") as im:
        sheet = np.asarray(im.convert("RGB"))
    rows = len(manifest["classes"])
    title = sheet.shape[0] - (2 + rows * 66)
    assert 0 < title <= 40, sheet.shape
    firsts = {}
    for _k, img, _e, label, _m in iter_samples(out, "train"):
        firsts.setdefault(label, np.asarray(Image.open(io.BytesIO(img)).convert("RGB")))
    assert firsts, "fixture has training images"
    for label, first in firsts.items():
        y0 = title + 2 + label * 66
        tile = sheet[y0:y0 + 64, -(8 * 66):][:, :64]  # first of the 8 columns (66 px each) at the right
        small = np.asarray(Image.fromarray(tile).resize((32, 32), Image.BOX), dtype=float)
        assert np.abs(small - first).mean() < 12, manifest["classes"][label]
