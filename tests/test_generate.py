"""hpcgan.generate / tools/generate.py: synthetic shards from a checkpoint.

The checkpoints here are tiny untrained ResNet generators (width 8, 32 px) saved with the real
hpcgan.checkpoint.save_checkpoint, so the files honour the checkpoint contract exactly.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hpcgan import REPO_ROOT
from hpcgan.checkpoint import save_checkpoint
from hpcgan.data.shards import ShardWriter, iter_samples, read_manifest, sha256_file, shard_paths, write_manifest
from hpcgan.data.taxonomy import Taxonomy
from hpcgan.generate import GenerateError, class_images, class_seed, generate, load_generator, sample_key
from hpcgan.models.registry import MODEL_NAMES, build_model, load_spec

CLASSES = Taxonomy.load().classes
SIZE = 32


def tiny_spec(model: str = "wgan_gp_ac"):
    return dataclasses.replace(load_spec(model), width=8, z_dim=16)


def write_checkpoint(run_dir: Path, step: int, *, model: str = "wgan_gp_ac", ema: bool = True,
                     classes=CLASSES, class_counts: dict | None = None, ema_bn: str | None = "standing") -> Path:
    """A checkpoint as hpcgan.train writes it; by default without class_counts (as before issue 9) and with
    the EMA generator's own BatchNorm statistics (ema_bn=None: a checkpoint from before it had them)."""
    spec = tiny_spec(model)
    torch.manual_seed(step)
    G, D = build_model(spec, len(classes), SIZE)
    G_ema = None
    if ema:  # an EMA generator that differs visibly from the raw one
        G_ema = {k: (v + 0.5 * torch.randn_like(v) if v.is_floating_point() else v.clone())
                 for k, v in G.state_dict().items()}
        G_ema = {k: (v.abs() + 0.5 if "running_var" in k else v) for k, v in G_ema.items()}
    config = {"model": dataclasses.asdict(spec), "image_size": SIZE, "classes": list(classes)}
    if class_counts is not None:
        config["class_counts"] = class_counts
    state = {"step": step, "epoch": 0, "batch_in_epoch": 0, "config": config,
             "G": G.state_dict(), "D": D.state_dict(), "G_ema": G_ema, "opt_G": {}, "opt_D": {},
             "scaler": None, "rng": {}, "meta": {}}
    if ema_bn is not None:
        state["G_ema_bn"] = ema_bn
    return save_checkpoint(run_dir, state, keep_last=0)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("run")
    write_checkpoint(d, 10)
    return d


def write_real_shards(out: Path, counts: dict[str, int], classes=CLASSES, size=SIZE) -> Path:
    """A small real-looking shard set (random RGB images) with the given train counts per class."""
    rng = np.random.default_rng(0)
    with ShardWriter(out, "train", shard_size=7) as w:
        for label, cls in enumerate(classes):
            for i in range(counts.get(cls, 0)):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
                w.write(f"real_{label:02d}_{i:04d}", buf.getvalue(), "png", label,
                        {"source": "pbc", "class": cls, "fine": cls, "synthetic": False})
    write_manifest(out, {"classes": list(classes), "image_size": size,
                         "counts": {"train": {c: counts.get(c, 0) for c in classes}},
                         "shards": {"train": w.shards}, "synthetic": False})
    return out


REAL_COUNTS = {c: (3 * i) % 7 for i, c in enumerate(CLASSES)}  # 0..6, several zero-count classes


@pytest.fixture(scope="module")
def real_shards(tmp_path_factory) -> Path:
    return write_real_shards(tmp_path_factory.mktemp("real"), REAL_COUNTS)


def tar_hashes(d: Path) -> list[str]:
    return [sha256_file(p) for p in shard_paths(d, "train")]


# ------------------------------------------------------------------------------------------------

def test_per_class_counts_labels_metadata_and_pngs(run_dir, tmp_path):
    out = tmp_path / "syn"
    manifest = generate(run_dir, out, per_class=3, seed=1, batch_size=5, progress=False)
    ckpt = run_dir / "checkpoints/step-00000010.pt"

    samples = list(iter_samples(out, "train"))
    assert len(samples) == 3 * len(CLASSES)
    per_label = {}
    for key, image, ext, label, meta in samples:
        per_label[label] = per_label.get(label, 0) + 1
        assert ext == "png" and key.startswith("syn_")
        assert meta["synthetic"] is True and meta["source"] == "synthetic"
        assert meta["class"] == CLASSES[label] == meta["fine"] and meta["label"] == label
        assert meta["checkpoint_sha256"] == sha256_file(ckpt) and meta["checkpoint_step"] == 10
        assert meta["model"] == "wgan_gp_ac" and meta["seed"] == 1 and meta["weights"] == "ema"
        assert key == sample_key(meta["class"], meta["index"])
        img = Image.open(io.BytesIO(image))
        assert img.size == (SIZE, SIZE) and img.mode == "RGB"
        assert (out / meta["path"]).read_bytes() == image  # the PNG folder holds the same image
        assert Path(meta["path"]).name.startswith("syn_") and meta["sha256"] == hashlib.sha256(image).hexdigest()
    assert per_label == {i: 3 for i in range(len(CLASSES))}

    on_disk = read_manifest(out)
    assert on_disk == json.loads(json.dumps(manifest))
    assert on_disk["synthetic"] is True and on_disk["classes"] == CLASSES and on_disk["image_size"] == SIZE
    assert on_disk["counts"] == {"train": {c: 3 for c in CLASSES}}
    with Image.open(out / "contact_sheet.png") as sheet:  # a row per class: 64 px tiles, 2 px padding, title
        assert 0 < sheet.height - (2 + len(CLASSES) * 66) <= 40
    assert on_disk["checkpoint"] == {"path": str(ckpt.resolve()), "sha256": sha256_file(ckpt), "step": 10}
    assert on_disk["weights"] == "ema" and on_disk["seed"] == 1
    assert on_disk["taxonomy"] == Taxonomy.load().spec
    assert len(on_disk["images"]) == 3 * len(CLASSES)
    assert sum(s["count"] for s in on_disk["shards"]["train"]) == 3 * len(CLASSES)
    assert all((out / s["name"]).is_file() and (out / s["idx"]).is_file() for s in on_disk["shards"]["train"])
    pngs = sorted((out / "png").rglob("*.png"))
    assert len(pngs) == 3 * len(CLASSES) and all(p.name.startswith("syn_") for p in pngs)
    assert (out / "png/smudge_cell/syn_smudge_cell_000002.png").is_file()
    # untrained does not mean constant: the images of a class differ from each other
    assert len({hashlib.sha256(s[1]).hexdigest() for s in samples}) == len(samples)


def test_chosen_classes_and_png_off(run_dir, tmp_path):
    out = tmp_path / "syn"
    m = generate(run_dir, out, per_class=2, classes=["smudge cell", "basophil"], png=False, progress=False)
    assert {c: n for c, n in m["counts"]["train"].items() if n} == {"basophil": 2, "smudge cell": 2}
    assert sorted(meta["class"] for *_, meta in iter_samples(out, "train")) == ["basophil"] * 2 + ["smudge cell"] * 2
    assert not (out / "png").exists()
    with pytest.raises(GenerateError, match="unknown classes"):
        generate(run_dir, tmp_path / "x", per_class=1, classes=["platelets"], progress=False)


def test_balance_tops_up_exactly_to_target(run_dir, real_shards, tmp_path):
    m = generate(run_dir, tmp_path / "a", balance=5, shards=real_shards, progress=False)
    expected = {c: max(0, 5 - REAL_COUNTS[c]) for c in CLASSES}
    assert m["counts"]["train"] == expected
    got = {}
    for *_, label, meta in iter_samples(tmp_path / "a", "train"):
        got[meta["class"]] = got.get(meta["class"], 0) + 1
    assert got == {c: n for c, n in expected.items() if n}
    assert all(REAL_COUNTS[c] + expected[c] >= 5 for c in CLASSES)
    assert m["balance"]["target"] == 5 and m["balance"]["real_counts"] == REAL_COUNTS

    biggest = max(REAL_COUNTS.values())
    m = generate(run_dir, tmp_path / "b", balance="max", shards=real_shards, classes=["basophil", "eosinophil"],
                 progress=False)
    assert m["balance"]["target"] == biggest
    assert m["counts"]["train"]["basophil"] == biggest - REAL_COUNTS["basophil"]
    assert m["counts"]["train"]["eosinophil"] == biggest - REAL_COUNTS["eosinophil"]
    assert sum(m["counts"]["train"].values()) == m["counts"]["train"]["basophil"] + m["counts"]["train"]["eosinophil"]


def test_balance_refuses_real_shards_that_do_not_match(run_dir, tmp_path):
    other = write_real_shards(tmp_path / "reordered", {"basophil": 1}, classes=list(reversed(CLASSES)))
    with pytest.raises(GenerateError, match="differ from the checkpoint"):
        generate(run_dir, tmp_path / "o1", balance=4, shards=other, progress=False)
    bigger = write_real_shards(tmp_path / "64px", {"basophil": 1}, size=64)
    with pytest.raises(GenerateError, match="64 px"):
        generate(run_dir, tmp_path / "o2", balance=4, shards=bigger, progress=False)
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


@pytest.mark.parametrize("model", MODEL_NAMES)
def test_every_model_family(model, tmp_path):
    """Conditional models write labelled shards; unconditional ones (InfoGAN codes included) PNGs only."""
    write_checkpoint(tmp_path / "run", 1, model=model)
    spec = tiny_spec(model)
    if spec.conditional:
        m = generate(tmp_path / "run", tmp_path / "out", per_class=2, classes=["eosinophil", "platelet"],
                     progress=False)
        labels = sorted(label for *_, label, _ in iter_samples(tmp_path / "out", "train"))
        assert labels == [CLASSES.index("eosinophil")] * 2 + [CLASSES.index("platelet")] * 2
    else:
        m = generate(tmp_path / "run", tmp_path / "out", count=3, progress=False)
        assert len(list((tmp_path / "out/png/unlabelled").glob("syn_*.png"))) == 3
    assert m["model"] == model


def test_same_seed_same_bytes_other_seed_other_bytes(run_dir, tmp_path):
    a = generate(run_dir, tmp_path / "a", per_class=2, seed=7, shard_size=10, progress=False)
    generate(run_dir, tmp_path / "b", per_class=2, seed=7, shard_size=10, progress=False)
    generate(run_dir, tmp_path / "c", per_class=2, seed=8, shard_size=10, progress=False)
    assert len(a["shards"]["train"]) == 3  # 24 samples, 10 per shard
    assert tar_hashes(tmp_path / "a") == tar_hashes(tmp_path / "b")
    assert (tmp_path / "a/manifest.json").read_bytes() == (tmp_path / "b/manifest.json").read_bytes()
    assert not set(tar_hashes(tmp_path / "a")) & set(tar_hashes(tmp_path / "c"))
    # a class's images depend on (seed, class) only, not on which other classes are generated
    generate(run_dir, tmp_path / "d", per_class=2, seed=7, classes=["monocyte"], progress=False)
    key = "png/monocyte/syn_monocyte_000001.png"
    assert (tmp_path / "a" / key).read_bytes() == (tmp_path / "d" / key).read_bytes()


def test_load_generator_and_class_images_are_what_generate_writes(run_dir, tmp_path):
    """The evaluation stage's entry points: a checkpoint -> G and what it was trained on; class_images gives
    the images generate() writes for a class and seed, in index order, as uint8 batches."""
    G, spec, classes, size, info = load_generator(run_dir)
    ckpt = run_dir / "checkpoints/step-00000010.pt"
    assert not G.training and next(G.parameters()).device.type == "cpu"
    assert spec.name == "wgan_gp_ac" and classes == CLASSES and size == SIZE
    assert {k: info[k] for k in ("path", "sha256", "step", "weights")} == {
        "path": str(ckpt.resolve()), "sha256": sha256_file(ckpt), "step": 10, "weights": "ema"}
    assert load_generator(checkpoint=ckpt, weights="raw")[4]["weights"] == "raw"
    generate(run_dir, tmp_path / "syn", per_class=5, seed=3, classes=["monocyte"], batch_size=2, progress=False)
    label = CLASSES.index("monocyte")
    assert class_seed(3, label) == class_seed(3, str(label)) != class_seed(3, None) == class_seed(3, "unlabelled")
    batches = list(class_images(G, spec, label, 5, class_seed(3, label), batch_size=2, device="cpu"))
    assert [tuple(b.shape) for b in batches] == [(2, 3, SIZE, SIZE)] * 2 + [(1, 3, SIZE, SIZE)]
    assert all(b.dtype == torch.uint8 and b.device.type == "cpu" for b in batches)
    written = [np.asarray(Image.open(tmp_path / f"syn/png/monocyte/syn_monocyte_{i:06d}.png")) for i in range(5)]
    assert np.array_equal(torch.cat(batches).permute(0, 2, 3, 1).numpy(), np.stack(written))
    other = torch.cat(list(class_images(G, spec, label, 5, class_seed(4, label), batch_size=2, device="cpu")))
    assert not torch.equal(other, torch.cat(batches))
    with pytest.raises(GenerateError, match="give a class label"):
        next(class_images(G, spec, None, 1, seed=0, batch_size=1, device="cpu"))


def test_ema_or_raw_weights(run_dir, tmp_path):
    ema = generate(run_dir, tmp_path / "ema", per_class=1, classes=["lymphocyte"], progress=False)
    raw = generate(run_dir, tmp_path / "raw", per_class=1, classes=["lymphocyte"], weights="raw", progress=False)
    assert ema["weights"] == "ema" and raw["weights"] == "raw"
    assert tar_hashes(tmp_path / "ema") != tar_hashes(tmp_path / "raw")
    assert next(iter_samples(tmp_path / "raw", "train"))[4]["weights"] == "raw"

    no_ema = tmp_path / "run_no_ema"
    write_checkpoint(no_ema, 5, ema=False)
    m = generate(no_ema, tmp_path / "auto", per_class=1, classes=["lymphocyte"], progress=False)
    assert m["weights"] == "raw"
    with pytest.raises(GenerateError, match="no EMA"):
        generate(no_ema, tmp_path / "x", per_class=1, weights="ema", progress=False)


def test_newest_or_chosen_checkpoint(tmp_path):
    run = tmp_path / "run"
    old = write_checkpoint(run, 10)
    write_checkpoint(run, 20)
    assert generate(run, tmp_path / "a", per_class=1, classes=["platelet"], progress=False)["checkpoint"]["step"] == 20
    m = generate(None, tmp_path / "b", per_class=1, classes=["platelet"], checkpoint=old, progress=False)
    assert m["checkpoint"] == {"path": str(old.resolve()), "sha256": sha256_file(old), "step": 10}


def test_corrupt_newest_checkpoint_falls_back(tmp_path):
    run = tmp_path / "run"
    good = write_checkpoint(run, 10)
    bad = run / "checkpoints/step-00000020.pt"
    bad.write_bytes(good.read_bytes()[:1000])  # truncated copy
    m = generate(run, tmp_path / "a", per_class=1, classes=["platelet"], progress=False)
    assert m["checkpoint"]["step"] == 10 and m["checkpoint"]["sha256"] == sha256_file(good)
    good.unlink()
    with pytest.raises(GenerateError, match="none of the 1 checkpoints"):
        generate(run, tmp_path / "b", per_class=1, progress=False)


def test_failed_run_leaves_no_output_and_keeps_the_previous_one(run_dir, tmp_path, monkeypatch):
    import hpcgan.generate as gen_mod
    real_to_png, calls = gen_mod.to_png, []

    def crash_on_third_batch(images):  # fault injection: a crash (OOM, kill) half-way through
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated crash")
        return real_to_png(images)

    monkeypatch.setattr(gen_mod, "to_png", crash_on_third_batch)
    out = tmp_path / "syn"
    with pytest.raises(RuntimeError, match="simulated crash"):
        generate(run_dir, out, per_class=2, batch_size=1, progress=False)
    assert not out.exists() and list(tmp_path.iterdir()) == []

    monkeypatch.setattr(gen_mod, "to_png", real_to_png)
    generate(run_dir, out, per_class=1, progress=False)
    before = tar_hashes(out)
    calls.clear()
    monkeypatch.setattr(gen_mod, "to_png", crash_on_third_batch)
    with pytest.raises(RuntimeError):
        generate(run_dir, out, per_class=2, batch_size=1, progress=False)
    assert tar_hashes(out) == before and read_manifest(out)["counts"]["train"]["basophil"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["syn"]


def test_unconditional_model(tmp_path):
    run = tmp_path / "run"
    write_checkpoint(run, 3, model="wgan_gp")
    with pytest.raises(GenerateError, match=r"unconditional and cannot generate a chosen class.*wgan_gp_ac"):
        generate(run, tmp_path / "x", per_class=2, progress=False)
    with pytest.raises(GenerateError, match="unconditional"):
        generate(run, tmp_path / "x", balance="max", shards=tmp_path, progress=False)
    m = generate(run, tmp_path / "u", count=4, progress=False)
    assert m["unlabelled"] == 4 and m["counts"] == {} and m["shards"] == {}
    assert [i["label"] for i in m["images"]] == [-1] * 4 and {i["class"] for i in m["images"]} == {"unlabelled"}
    assert sorted(p.name for p in (tmp_path / "u/png/unlabelled").iterdir()) == \
        [f"syn_unlabelled_{i:06d}.png" for i in range(4)]
    assert list((tmp_path / "u").glob("*.tar")) == []
    with pytest.raises(GenerateError, match="cannot generate chosen classes"):
        generate(run, tmp_path / "x", count=4, classes=["basophil"], progress=False)
    with pytest.raises(GenerateError, match="png=false would write nothing"):
        generate(run, tmp_path / "x", count=4, png=False, progress=False)
    assert not (tmp_path / "x").exists()


def test_clear_errors(run_dir, real_shards, tmp_path):
    empty_run = tmp_path / "empty_run"
    empty_run.mkdir()
    cases = [
        (dict(run_dir=empty_run, per_class=1), "has no checkpoint"),
        (dict(run_dir=tmp_path / "nope", per_class=1), "does not exist"),
        (dict(run_dir=run_dir, balance=5), "needs shards="),
        (dict(run_dir=run_dir, balance=5, shards=tmp_path / "nope"), "no manifest"),
        (dict(run_dir=run_dir, per_class=-1), "negative"),
        (dict(run_dir=run_dir, balance=-3, shards=real_shards), "negative"),
        (dict(run_dir=run_dir, balance="lots", shards=real_shards), "whole number"),
        (dict(run_dir=empty_run, balance=-1), "negative"),  # checked before anything is loaded
        (dict(run_dir=run_dir), "exactly one of"),
        (dict(run_dir=run_dir, per_class=1, balance=2), "exactly one of"),
        (dict(run_dir=run_dir, count=3), "count=N is for unconditional"),
        (dict(run_dir=run_dir, per_class=1, weights="best"), "weights="),
        (dict(run_dir=run_dir, per_class=1, truncation=-1.0), "truncation"),
        (dict(run_dir=run_dir, per_class=1, device="gpu"), "device='gpu'"),
        (dict(run_dir=run_dir, per_class=1, device=f"cuda:{torch.cuda.device_count()}"), "CUDA (device|GPU)"),
    ]
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"PK\x03\x04 half a checkpoint")
    cases.append((dict(checkpoint=broken, per_class=1), "broken.pt does not load"))
    for kwargs, message in cases:
        with pytest.raises(GenerateError, match=message):
            generate(out=tmp_path / "out", progress=False, **kwargs)
    assert not (tmp_path / "out").exists()
    # never replaces what is not an earlier synthetic output
    with pytest.raises(GenerateError, match="real shard directory"):
        generate(run_dir, real_shards, balance=5, shards=real_shards, progress=False)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep")
    with pytest.raises(GenerateError, match="not an earlier synthetic output"):
        generate(run_dir, precious, per_class=1, progress=False)
    assert (precious / "notes.txt").read_text() == "keep"


UNSEEN = ["monoblast", "smudge cell"]
TRAINED = {c: (0 if c in UNSEEN else 10 + i) for i, c in enumerate(CLASSES)}  # what the run trained on


@pytest.fixture(scope="module")
def counted_run(tmp_path_factory) -> Path:
    """A checkpoint whose run recorded its training images per class, two classes without any."""
    d = tmp_path_factory.mktemp("counted")
    write_checkpoint(d, 10, class_counts=TRAINED)
    return d


def test_per_class_refuses_a_class_asked_for_by_name_that_the_generator_never_saw(counted_run, tmp_path):
    """Issue 9: `per_class=8` wrote 8 "smudge cells" although the shards had none: mislabelled data."""
    for classes in (["basophil", "smudge cell"], "monoblast", ["monoblast", "smudge cell"]):
        with pytest.raises(GenerateError) as e:
            generate(counted_run, tmp_path / "out", per_class=2, classes=classes, progress=False)
        named = [c for c in UNSEEN if c in classes]
        assert f"never saw a training image of {named}" in str(e.value)
        assert "no training images" in str(e.value) and "classes=[" in str(e.value)
    assert not (tmp_path / "out").exists()
    m = generate(counted_run, tmp_path / "ok", per_class=2, classes=["basophil", "platelet"], progress=False)
    assert {c: n for c, n in m["counts"]["train"].items() if n} == {"basophil": 2, "platelet": 2}
    assert m["trained_counts"] == TRAINED and read_manifest(tmp_path / "ok")["trained_counts"] == TRAINED
    seen = [c for c in CLASSES if c not in UNSEEN]  # the error's suggestion works as it is
    assert sum(generate(counted_run, tmp_path / "all", per_class=1, classes=seen, progress=False)["counts"]["train"]
               .values()) == len(seen)


def test_per_class_and_balance_skip_unseen_classes_by_one_rule_said_once_and_recorded(counted_run, real_shards,
                                                                                      tmp_path, caplog):
    """Issue 18: per_class refused the whole run where balance skipped (shards with 8 of the 12 classes)."""
    with caplog.at_level("WARNING", logger="hpcgan.generate"):
        m = generate(counted_run, tmp_path / "p", per_class=2, progress=False)
    assert m["counts"]["train"] == {c: 0 if c in UNSEEN else 2 for c in CLASSES}
    assert m["skipped_classes"] == UNSEEN == read_manifest(tmp_path / "p")["skipped_classes"]
    warned = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert len(warned) == 1 and str(UNSEEN) in warned[0] and "never saw" in warned[0]
    m = generate(counted_run, tmp_path / "b", balance=5, shards=real_shards, progress=False)
    assert m["skipped_classes"] == UNSEEN == m["balance"]["skipped_classes"]


def test_balance_skips_classes_the_generator_never_saw(counted_run, real_shards, tmp_path, caplog):
    with caplog.at_level("WARNING", logger="hpcgan.generate"):
        m = generate(counted_run, tmp_path / "a", balance=5, shards=real_shards, progress=False)
    expected = {c: 0 if c in UNSEEN else max(0, 5 - REAL_COUNTS[c]) for c in CLASSES}
    assert m["counts"]["train"] == expected
    assert m["balance"]["skipped_classes"] == UNSEEN == read_manifest(tmp_path / "a")["balance"]["skipped_classes"]
    assert not {meta["class"] for *_, meta in iter_samples(tmp_path / "a", "train")} & set(UNSEEN)
    warned = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert len(warned) == 1 and str(UNSEEN) in warned[0] and "never saw" in warned[0]


def test_checkpoint_without_counts_generates_every_class_with_a_warning(run_dir, tmp_path, caplog):
    with caplog.at_level("WARNING", logger="hpcgan.generate"):
        m = generate(run_dir, tmp_path / "a", per_class=1, progress=False)
    assert m["counts"]["train"] == {c: 1 for c in CLASSES} and m["trained_counts"] is None
    assert any("does not record how many training images" in r.getMessage() for r in caplog.records)
    assert load_generator(run_dir)[4]["class_counts"] is None


def test_ema_weights_get_batchnorm_statistics_of_their_own(tmp_path, caplog):
    """A checkpoint from before issue 9 carries the live generator's BatchNorm statistics beside the EMA
    weights: loading recomputes them (hpcgan.train.standing_stats, as training now does before it saves,
    with the run's seed and batch size); a checkpoint that says they are its own keeps them as saved."""
    from hpcgan.train import TrainSettings, standing_stats
    old, new = tmp_path / "old", tmp_path / "new"
    write_checkpoint(old, 3, ema_bn=None)
    write_checkpoint(new, 3)
    saved = torch.load(old / "checkpoints/step-00000003.pt", weights_only=True)["G_ema"]
    bn = [k for k in saved if k.endswith("running_mean")]
    with caplog.at_level("WARNING", logger="hpcgan.generate"):
        G_old = load_generator(old)[0].state_dict()
    assert any("recomputed them" in r.getMessage() for r in caplog.records)
    G_new = load_generator(new)[0].state_dict()
    assert all(torch.equal(G_new[k], saved[k]) for k in saved)
    assert all(not torch.equal(G_old[k], saved[k]) for k in bn)
    expected, spec, *_ = load_generator(new)
    standing_stats(expected, spec, len(CLASSES), batches=TrainSettings.ema_standing_batches,
                   batch_size=TrainSettings.batch_size, seed=0)
    assert all(torch.equal(G_old[k], v) for k, v in expected.state_dict().items())
    raw = load_generator(old, weights="raw")[0].state_dict()  # the raw generator's statistics are its own
    assert all(torch.equal(raw[k], v) for k, v in
               torch.load(old / "checkpoints/step-00000003.pt", weights_only=True)["G"].items())


@pytest.mark.parametrize("backend", ["webdataset", "dali"])
def test_loader_reads_real_and_synthetic_together(backend, run_dir, real_shards, tmp_path):
    loader_mod = pytest.importorskip("hpcgan.data.loader", reason="hpcgan.data.loader (helper 'loader') not importable")
    if backend == "dali":
        pytest.importorskip("nvidia.dali", reason="DALI is not installed for this platform")
    out = tmp_path / "syn"
    generate(run_dir, out, balance="max", shards=real_shards, progress=False)
    loader = loader_mod.make_loader([real_shards, out], "train", batch_size=8, backend=backend,
                                    device="cpu", shuffle=False)
    assert loader.backend == backend
    n_real, n_syn = sum(REAL_COUNTS.values()), len(CLASSES) * max(REAL_COUNTS.values()) - sum(REAL_COUNTS.values())
    assert loader.num_samples == n_real + n_syn and list(loader.classes) == CLASSES
    labels = torch.cat([y for _, y in loader])
    images, _ = next(iter(loader))
    assert images.shape == (8, 3, SIZE, SIZE) and images.min() >= -1 and images.max() <= 1
    counts = torch.bincount(labels[: n_real + n_syn], minlength=len(CLASSES))
    assert counts.tolist() == [max(REAL_COUNTS.values())] * len(CLASSES)


def _cli(*args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(REPO_ROOT / "tools/generate.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli(run_dir, real_shards, tmp_path):
    r = _cli(f"run={run_dir}", "out=syn", "balance=max", f"shards={real_shards}", "progress=false", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "ema weights, step 10" in r.stdout
    m = read_manifest(tmp_path / "syn")
    assert m["counts"]["train"] == {c: max(REAL_COUNTS.values()) - n for c, n in REAL_COUNTS.items()}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["syn"]  # no Hydra outputs/ or .hydra/ litter

    r = _cli(f"run={tmp_path}", "out=syn2", "per_class=2", cwd=tmp_path)
    assert r.returncode == 2 and "has no checkpoint" in r.stderr
    assert not (tmp_path / "syn2").exists()


def test_cli_bad_value_is_one_line_exit_2(run_dir, tmp_path):
    for arg, key in (("per_class=abc", "per_class"), ("shard_size=x", "shard_size"), ("seed=-1", "seed")):
        r = _cli(f"run={run_dir}", "out=syn", *(["per_class=1"] if key != "per_class" else []), arg, cwd=tmp_path)
        assert r.returncode == 2, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and key in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "syn").exists()


PBC_SAMPLE = Path(__file__).resolve().parents[1].parent / "shared/data/pbc-sample"


@pytest.mark.real_data
@pytest.mark.skipif(not PBC_SAMPLE.is_dir(), reason=f"real data {PBC_SAMPLE} is absent")
def test_balance_against_real_pbc_shards(run_dir, tmp_path):
    """Top up shards built by hpcgan.data.build from the real PBC sample (scarce classes at 0)."""
    from hpcgan.data.build import build
    real = build({"pbc": str(PBC_SAMPLE)}, tmp_path / "pbc", size=SIZE, workers=2, progress=False)
    train = real["counts"]["train"]
    m = generate(run_dir, tmp_path / "syn", balance="max", shards=tmp_path / "pbc", progress=False)
    target = max(train.values())
    assert m["counts"]["train"] == {c: target - n for c, n in train.items()}
    assert m["taxonomy"] == real["taxonomy"] and m["classes"] == real["classes"]
    merged = {c: train[c] for c in CLASSES}
    for *_, label, meta in iter_samples(tmp_path / "syn", "train"):
        merged[CLASSES[label]] += 1
    assert set(merged.values()) == {target}
