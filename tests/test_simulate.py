"""The embedded simulator: layouts the taxonomy understands, formats, determinism, imbalance, class signal."""
from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import imagehash
import numpy as np
import pytest
from PIL import Image

from hpcgan import REPO_ROOT
from hpcgan.data import simulate as sim
from hpcgan.data.taxonomy import Taxonomy

TINY = 0.05  # every (source, type) at least once: a few dozen images
FORMATS = {"pbc": ("JPEG", (360, 363)), "aml": ("TIFF", (400, 400)), "lab": ("PNG", (320, 320))}


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim") / "data"
    summary = sim.simulate(out, seed=0, scale=TINY, progress=False, workers=2)   # a process pool
    return out, summary


def test_every_file_resolves_to_the_type_it_was_drawn_as(tiny):
    out, summary = tiny
    taxonomy = Taxonomy.load()
    expected = {(s, rel): fine for s, rel, fine, _ in sim.iter_images(0, TINY)}
    seen = Counter()
    for source in sim.LAYOUTS:
        files = sorted(p for p in (out / source).rglob("*") if p.is_file())
        assert files, f"no files under {source}"
        for path in files:
            rel = path.relative_to(out / source).as_posix()
            resolved = taxonomy.resolve(source, rel)
            assert resolved.fine == expected[(source, rel)], rel
            seen[(source, resolved.fine)] += 1
    assert sum(seen.values()) == summary["total"] == len(expected)
    for source, counts in summary["counts"].items():
        for fine, n in counts.items():
            assert seen[(source, fine)] == n
    # Every class is present, and the lab folders use several spellings the forgiving matcher must undo.
    assert {taxonomy.types[f] for _, f in seen} == set(taxonomy.classes)
    lab_folders = [p.name for p in (out / "lab").iterdir()]
    assert any("_" in f for f in lab_folders) and any(" " in f for f in lab_folders)
    assert any(f != f.lower() for f in lab_folders)
    assert (out / "simulation.json").is_file()


def test_formats_sizes_and_names_per_layout(tiny):
    out, _ = tiny
    for source, (fmt, size) in FORMATS.items():
        for path in (out / source).rglob("*.*"):
            with Image.open(path) as im:
                assert (im.format, im.size, im.mode) == (fmt, size, "RGB"), path
    pbc_prefixes = {p.name.split("_")[0] for p in (out / "pbc").rglob("*.jpg")}
    assert {"BA", "EO", "ERB", "IG", "MMY", "MY", "PMY", "LY", "MO", "BNE", "SNE", "PLATELET"} <= pbc_prefixes
    aml_codes = {p.name for p in (out / "aml").iterdir()}
    assert len(aml_codes) == 15
    for code in aml_codes:
        assert all(f.name.startswith(code + "_") and f.suffix == ".tiff" for f in (out / "aml" / code).iterdir())


def test_same_seed_gives_byte_identical_files_and_scale_does_not_reshuffle(tiny, tmp_path):
    out, _ = tiny
    again = tmp_path / "again"
    sim.simulate(again, seed=0, scale=TINY, progress=False, workers=1)   # no pool: the same bytes
    first, second = _files(out), _files(again)
    assert first.keys() == second.keys()
    assert [k for k in first if first[k] != second[k]] == []

    bigger = tmp_path / "bigger"
    sim.simulate(bigger, seed=0, scale=0.15, layouts=("lab",), progress=False)
    more = {k: v for k, v in _files(bigger).items() if k.endswith(".png")}
    lab_small = {k: v for k, v in first.items() if k.endswith(".png")}
    assert len(more) > len(lab_small)
    for k, v in lab_small.items():
        assert more[k] == v, f"{k} changed when only the scale changed"

    other = tmp_path / "other"
    sim.simulate(other, seed=1, scale=TINY, layouts=("lab",), progress=False)
    differs = [k for k, v in _files(other).items() if k.endswith(".png") and v != first[k]]
    assert len(differs) == len(lab_small)


def test_no_two_images_are_perceptual_near_duplicates(tiny):
    """The sharder drops near-duplicates (phash distance <= 4), whole groups if their labels differ:
    simulated cells of different types must not collapse onto the same perceptual hash."""
    out, _ = tiny
    hashes = []
    for path in sorted(p for p in out.rglob("*.*") if p.suffix in (".jpg", ".tiff", ".png")):
        with Image.open(path) as im:
            hashes.append((path.relative_to(out).as_posix(), imagehash.phash(im.convert("RGB").resize((64, 64)))))
    close = [(a, b, ha - hb) for i, (a, ha) in enumerate(hashes) for b, hb in hashes[i + 1:] if ha - hb <= 4]
    assert close == []


def test_imbalance_follows_the_public_counts():
    taxonomy = Taxonomy.load()
    for scale in (1.0, 0.3):
        per_class = Counter()
        for source, entries in sim.plan(scale).items():
            public = {fine: c for _, _, fine, c in sim.CATALOG[source]}
            ordered = sorted(entries, key=lambda e: -public[e[2]])
            counts = [n for *_, n in ordered]
            assert counts == sorted(counts, reverse=True), f"{source}: counts out of order {counts}"
            for _, _, fine, n in entries:
                per_class[taxonomy.types[fine]] += n
        top, bottom = per_class.most_common()[0], per_class.most_common()[-1]
        assert top[0] == "neutrophil", per_class
        assert per_class["smudge cell"] == bottom[1] and per_class["smudge cell"] < per_class["monocyte"] / 5
        assert per_class["neutrophil"] > 10 * per_class["smudge cell"]
    total = sum(n for e in sim.plan(1.0).values() for *_, n in e)
    assert 200 <= total <= 800, f"default demo set should be a few hundred images, is {total}"
    assert sum(n for e in sim.plan(TINY).values() for *_, n in e) < 100


def test_bad_arguments_are_refused_with_a_reason(tmp_path):
    with pytest.raises(ValueError, match="scale"):
        sim.plan(0)
    with pytest.raises(ValueError, match="layout"):
        sim.simulate(tmp_path / "x", layouts=("pbc", "nope"), progress=False)
    with pytest.raises(ValueError, match="unknown cell type"):
        sim.render_cell("dragon", np.random.default_rng(0))
    with pytest.raises(ValueError, match="seed"):
        sim.simulate(tmp_path / "x", seed=-1, progress=False)
    assert not (tmp_path / "x").exists()
    # Someone's own folder is never replaced by a simulated dataset.
    precious = tmp_path / "mine"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="refusing"):
        sim.simulate(precious, scale=TINY, layouts=("lab",), progress=False)
    assert (precious / "notes.txt").read_text() == "keep me"


def test_an_interrupted_run_leaves_the_previous_dataset_whole(tiny, tmp_path, monkeypatch):
    out = tmp_path / "data"
    sim.simulate(out, seed=0, scale=TINY, layouts=("lab",), progress=False)
    before = _files(out)
    real, calls = sim.make_image, []

    def crash_on_fifth(*args):
        calls.append(args)
        if len(calls) == 5:
            raise KeyboardInterrupt("simulated interruption")
        return real(*args)

    monkeypatch.setattr(sim, "make_image", crash_on_fifth)
    with pytest.raises(KeyboardInterrupt):
        sim.simulate(out, seed=3, scale=TINY, layouts=("lab",), progress=False)
    assert _files(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["data"], "staging directory left behind"


def _centre(img: np.ndarray, frac: float = 0.3) -> np.ndarray:
    h, w, _ = img.shape
    lo, hi = (1 - frac) / 2, (1 + frac) / 2
    return img[int(h * lo):int(h * hi), int(w * lo):int(w * hi)].reshape(-1, 3).astype(np.float64)


def test_classes_differ_measurably():
    classes = Taxonomy.load().classes
    images = {k: [sim.make_image(0, "lab", k, i) for i in range(8)] for k in classes}

    # Eosinophil granules are orange-red, basophil granules dark purple-blue: red minus blue at the
    # centre (relative to the whole field, which cancels the slide's stain) separates them.
    def red_minus_blue(img):
        centre, field = _centre(img), img.reshape(-1, 3).astype(np.float64)
        return float(np.mean(centre[:, 0] - centre[:, 2]) - np.mean(field[:, 0] - field[:, 2]))
    eos = [red_minus_blue(im) for im in images["eosinophil"]]
    baso = [red_minus_blue(im) for im in images["basophil"]]
    assert min(eos) > max(baso) + 15, (eos, baso)
    assert np.mean(eos) - np.mean(baso) > 30, (eos, baso)
    # Lymphocyte nuclei are dense and dark; blast nuclei have fine, pale chromatin.
    def darkest(img):  # the darkest pixels of the centre are nucleus in both
        return float(np.percentile(_centre(img).sum(-1), 1))
    lymph, blast = [darkest(im) for im in images["lymphocyte"]], [darkest(im) for im in images["monoblast"]]
    assert max(lymph) < min(blast), (lymph, blast)

    # A nearest-centroid classifier on colour histograms of the centre beats chance (1/12) clearly.
    def hist(img, bins=4):
        h, w, _ = img.shape
        c = (img[h // 4: 3 * h // 4, w // 4: 3 * w // 4].reshape(-1, 3).astype(int) * bins) // 256
        counts = np.bincount((c[:, 0] * bins + c[:, 1]) * bins + c[:, 2], minlength=bins ** 3)
        return np.sqrt(counts / counts.sum())
    feats = {k: np.stack([hist(im) for im in v]) for k, v in images.items()}
    centroids = {k: f[:5].mean(0) for k, f in feats.items()}
    hits = [min(centroids, key=lambda c: np.linalg.norm(centroids[c] - x)) == k
            for k, f in feats.items() for x in f[5:]]
    assert np.mean(hits) >= 0.4, f"held-out accuracy {np.mean(hits):.2f} (chance 0.08)"


def test_within_class_variation():
    imgs = [sim.make_image(0, "pbc", "neutrophil", i).astype(np.float64) for i in range(4)]
    means = [im.reshape(-1, 3).mean(0) for im in imgs]
    assert max(np.abs(imgs[0] - im).mean() for im in imgs[1:]) > 5
    assert np.ptp(np.stack(means), axis=0).max() > 1.0  # stain/background differ between slides


def test_tool_writes_the_dataset_without_littering(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    out = tmp_path / "sim"
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tools" / "simulate.py"), f"out={out}", "seed=2", "scale=0.01",
         "layouts=[lab]", "progress=false"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sim"], "the tool littered its working directory"
    assert sorted(p.name for p in out.iterdir()) == ["lab", "simulation.json"]
    assert len(list((out / "lab").rglob("*.png"))) == len(sim.CATALOG["lab"])
    assert "smudge cell" in proc.stdout

    for arg in ("scale=0", "scale=abc", "layouts=[nope]"):
        bad = subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "simulate.py"), f"out={out}", arg],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        lines = bad.stderr.strip().splitlines()
        assert bad.returncode == 2 and len(lines) == 1 and lines[0].startswith("simulate: error: "), bad.stderr
        assert arg.split("=")[0].rstrip("s") in lines[0]
