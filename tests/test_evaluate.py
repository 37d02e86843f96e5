"""hpcgan.evaluate / tools/evaluate.py: metrics by name against a real shard split, cached, on 1 or 2 ranks.

The real data is the project's simulator sharded at 32 px; the `cell` extractor is trained on its train split
(the offline default). Generators are tiny checkpoints written with the real save_checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from hpcgan import REPO_ROOT
from hpcgan.checkpoint import save_checkpoint
from hpcgan.data.shards import iter_samples, read_manifest
from hpcgan.evaluate import EvaluateError, EvaluateSettings, evaluate
from hpcgan.generate import slug
from hpcgan.models.registry import build_model, load_spec
from hpcgan.settings import SettingsError, parse

FAST = ["fid", "kid", "prdc", "intra_fid", "is", "class_accuracy"]


@pytest.fixture(scope="module")
def shards(simulated_shards) -> Path:
    return simulated_shards(0.6)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def run_eval(shards, cache, tmp_path, **kw) -> dict:
    kw.setdefault("metrics", FAST)
    return evaluate({"shards": str(shards), "cache_dir": str(cache), "progress": False, "device": "cpu", **kw})


def png_folder(root: Path, shards: Path, split: str, transform=None, relabel=None) -> Path:
    """The split's images as png/<class>/*.png, optionally transformed (PIL -> PIL) and relabelled."""
    classes = read_manifest(shards)["classes"]
    for key, data, ext, label, _ in iter_samples(shards, split):
        cls = classes[relabel.get(label, label) if relabel else label]
        im = Image.open(__import__("io").BytesIO(data)).convert("RGB")
        if transform is not None:
            im = transform(im)
        (root / "png" / slug(cls)).mkdir(parents=True, exist_ok=True)
        im.save(root / "png" / slug(cls) / f"{key}.png")
    return root


def tiny_checkpoint(run_dir: Path, classes: list[str], model="wgan_gp_ac", step=5, class_counts=None,
                    size=32) -> Path:
    spec = dataclasses.replace(load_spec(model), width=8, z_dim=16)
    torch.manual_seed(0)
    G, D = build_model(spec, len(classes), size)
    state = {"step": step, "epoch": 0, "batch_in_epoch": 0,
             "config": {"model": dataclasses.asdict(spec), "image_size": size, "classes": list(classes), "seed": 3,
                        "steps": step, "balance_classes": False, "class_counts": class_counts},
             "G": G.state_dict(), "D": D.state_dict(), "G_ema": None, "opt_G": {}, "opt_D": {}, "scaler": None,
             "rng": {}, "meta": {}}
    return save_checkpoint(run_dir, state, keep_last=0)


def test_real_halves_score_near_the_floor_and_far_below_a_degraded_set(shards, cache, tmp_path):
    floor = run_eval(shards, cache, tmp_path, fake=str(shards), fake_split="val", out=str(tmp_path / "floor.json"))
    blurred = png_folder(tmp_path / "blur", shards, "val", lambda im: im.filter(ImageFilter.GaussianBlur(2)))
    bad = run_eval(shards, cache, tmp_path, fake=str(blurred), out=str(tmp_path / "blur.json"))
    assert floor["metrics"]["fid"]["fid"] * 3 < bad["metrics"]["fid"]["fid"]
    assert floor["metrics"]["class_accuracy"]["class_accuracy"] > 0.5  # the classifier knows real val cells
    assert floor["metrics"]["prdc"]["recall"] > bad["metrics"]["prdc"]["recall"]


def test_fid_rises_monotonically_with_blur(shards, cache, tmp_path):
    fids = []
    for radius in (0.0, 0.7, 1.5, 3.0):
        tf = (lambda im, r=radius: im.filter(ImageFilter.GaussianBlur(r))) if radius else None
        folder = png_folder(tmp_path / f"b{radius}", shards, "val", tf)
        doc = run_eval(shards, cache, tmp_path, fake=str(folder), out=str(tmp_path / f"b{radius}.json"),
                       metrics=["fid"])
        fids.append(doc["metrics"]["fid"]["fid"])
    assert fids == sorted(fids) and fids[-1] > 2 * fids[0], fids


def test_intra_fid_catches_swapped_labels_that_global_fid_misses(shards, cache, tmp_path):
    classes = read_manifest(shards)["classes"]
    counts = read_manifest(shards)["counts"]["val"]
    a, b = sorted(range(len(classes)), key=lambda i: -counts[classes[i]])[:2]  # two well-populated classes
    right = png_folder(tmp_path / "right", shards, "val")
    swapped = png_folder(tmp_path / "swapped", shards, "val", relabel={a: b, b: a})
    r = run_eval(shards, cache, tmp_path, fake=str(right), out=str(tmp_path / "r.json"), metrics=["fid", "intra_fid"])
    s = run_eval(shards, cache, tmp_path, fake=str(swapped), out=str(tmp_path / "s.json"), metrics=["fid", "intra_fid"])
    assert s["metrics"]["fid"]["fid"] == pytest.approx(r["metrics"]["fid"]["fid"], rel=1e-6)
    assert s["per_class"]["intra_fid"]["intra_fid"][classes[a]] > 2 * r["per_class"]["intra_fid"]["intra_fid"][classes[a]]
    assert s["metrics"]["intra_fid"]["intra_fid"] > r["metrics"]["intra_fid"]["intra_fid"]


def test_a_planted_copy_of_a_training_image_is_caught(shards, cache, tmp_path):
    folder = png_folder(tmp_path / "gen", shards, "val")
    classes = read_manifest(shards)["classes"]
    key, data, _, label, _ = next(iter_samples(shards, "train"))
    (folder / "png" / slug(classes[label]) / "copy.png").write_bytes(data)
    doc = run_eval(shards, cache, tmp_path, fake=str(folder), out=str(tmp_path / "m" / "eval.json"),
                   metrics=["memorisation"])
    n = doc["n_fake"]
    assert doc["info"]["memorisation"]["flagged"] >= 1
    assert doc["metrics"]["memorisation"]["memorisation"] == pytest.approx(doc["info"]["memorisation"]["flagged"] / n)
    assert Path(doc["info"]["memorisation"]["sheet"]).is_file()


def test_real_features_are_cached_and_the_cache_follows_the_shards(shards, cache, tmp_path):
    own = tmp_path / "own-cache"
    first = run_eval(shards, own, tmp_path, fake=str(shards), fake_split="val", out=str(tmp_path / "1.json"),
                     metrics=["fid"])
    second = run_eval(shards, own, tmp_path, fake=str(shards), fake_split="val", out=str(tmp_path / "2.json"),
                      metrics=["fid"])
    assert not first["real"]["cache_hit"] and second["real"]["cache_hit"]
    assert second["metrics"]["fid"]["fid"] == pytest.approx(first["metrics"]["fid"]["fid"], rel=1e-9)
    changed = tmp_path / "changed"
    shutil.copytree(shards, changed)
    m = json.loads((changed / "manifest.json").read_text())
    m["note"] = "edited"  # any change of the shard set changes the manifest's sha256
    (changed / "manifest.json").write_text(json.dumps(m))
    third = run_eval(changed, own, tmp_path, fake=str(changed), fake_split="val", out=str(tmp_path / "3.json"),
                     metrics=["fid"])
    assert not third["real"]["cache_hit"] and third["real"]["cache"] != first["real"]["cache"]


def test_a_run_directory_is_evaluated_and_every_row_is_traceable(shards, cache, tmp_path):
    classes = read_manifest(shards)["classes"]
    run = tmp_path / "run"
    tiny_checkpoint(run, classes)
    doc = run_eval(shards, cache, tmp_path, run=str(run), n_per_class=6, metrics=FAST + ["nn_fidelity"])
    out = run / "eval" / "step-00000005-cell.json"
    assert out.is_file() and json.loads(out.read_text())["metrics"] == doc["metrics"]
    present = [c for c, n in read_manifest(shards)["counts"]["train"].items() if n > 0]
    assert doc["n_fake"] == 6 * len(present)
    rows = [json.loads(line) for line in (run / "eval" / "results.jsonl").read_text().splitlines()]
    assert rows == json.loads(json.dumps(doc["rows"]))
    for r in rows:
        for k in ("run_dir", "stage", "model", "seed", "image_size", "steps", "extractor", "extractor_sha256",
                  "manifest_sha256", "metric", "value", "n_fake", "n_real"):
            assert k in r
    fid = next(r for r in rows if r["metric"] == "fid")
    assert fid["model"] == "wgan_gp_ac" and fid["steps"] == 5 and fid["seed"] == 3 and fid["extractor"] == "cell"
    assert {r["class"] for r in rows if r["metric"] == "intra_fid" and r["class"]} <= set(present)
    for k in ("l1", "l2", "psnr", "ssim"):
        assert np.isfinite(doc["metrics"]["nn_fidelity"][k])
    # an untrained generator is worse than the real val split, by every distance
    floor = run_eval(shards, cache, tmp_path, fake=str(shards), fake_split="val", out=str(tmp_path / "f.json"))
    assert doc["metrics"]["fid"]["fid"] > 3 * floor["metrics"]["fid"]["fid"]


def test_unscored_numbers_are_null_and_the_files_strict_json(shards, cache, tmp_path):
    """One image per class: intra-FID and diversity cannot be scored per class. The files say null."""
    from hpcgan.jsonfile import loads_strict
    run = tmp_path / "run"
    tiny_checkpoint(run, read_manifest(shards)["classes"])
    run_eval(shards, cache, tmp_path, run=str(run), n_per_class=1, metrics=["fid", "intra_fid", "diversity"])
    doc = loads_strict((run / "eval" / "step-00000005-cell.json").read_text())
    per_class = doc["per_class"]["intra_fid"]["intra_fid"]
    assert per_class and all(v is None for v in per_class.values()), per_class
    rows = [loads_strict(line) for line in (run / "eval" / "results.jsonl").read_text().splitlines()]
    assert any(r["metric"] == "intra_fid" and r["class"] and r["value"] is None for r in rows)


def test_classes_the_generator_never_saw_are_not_scored(shards, cache, tmp_path):
    man = read_manifest(shards)
    classes, train = man["classes"], man["counts"]["train"]
    present = [c for c in classes if train.get(c, 0) > 0]
    never = present[0]
    run = tmp_path / "run"
    tiny_checkpoint(run, classes, class_counts={c: (0 if c == never else train.get(c, 0)) for c in classes})
    doc = run_eval(shards, cache, tmp_path, run=str(run), n_per_class=3, metrics=["fid", "intra_fid"])
    assert doc["source"]["unseen_classes"] == [never]
    assert doc["n_fake"] == 3 * (len(present) - 1)
    assert [r["value"] for r in doc["rows"] if r["metric"] == "intra_fid" and r["class"] == never] in ([], [None])


def test_unconditional_generators_skip_per_class_metrics_with_the_reason(shards, cache, tmp_path):
    classes = read_manifest(shards)["classes"]
    run = tmp_path / "dcgan"
    tiny_checkpoint(run, classes, model="dcgan")
    doc = run_eval(shards, cache, tmp_path, run=str(run), n_per_class=2, metrics=["fid", "intra_fid"])
    assert np.isfinite(doc["metrics"]["fid"]["fid"])
    assert "unconditional" in doc["skipped"]["intra_fid"]
    assert any(r["metric"] == "intra_fid" and r["value"] is None and r["skipped"] for r in doc["rows"])


def test_unstaged_lpips_is_said_once_per_process_short_with_the_staging_command(shards, cache, tmp_path, caplog):
    import hpcgan.evaluate as ev
    ev._said.clear()
    caplog.set_level("DEBUG", logger=ev.logger.name)
    run = tmp_path / "run"
    tiny_checkpoint(run, read_manifest(shards)["classes"])
    for i in range(2):
        doc = run_eval(shards, cache, tmp_path, run=str(run), n_per_class=2, metrics=["fid", "lpips"],
                       weights_dir=str(tmp_path / "empty"), out=str(tmp_path / f"{i}.json"))
        assert "stage_weights.py lpips" in doc["skipped"]["lpips"]
    said = [r for r in caplog.records if "lpips not computed" in r.getMessage()]
    warned = [r for r in said if r.levelname == "WARNING"]
    assert len(said) == 2 and len(warned) == 1, [(r.levelname, r.getMessage()) for r in said]
    msg = warned[0].getMessage()
    where = str(tmp_path / "empty")
    assert "tools/stage_weights.py lpips" in msg and where in msg and len(msg.replace(where, "")) < 160, msg


def test_a_bad_run_fails_before_the_extractor_cache_is_touched(shards, tmp_path):
    """Issue 18: run=/nonexistent first trained the cell extractor (minutes), then looked for the run."""
    fresh = tmp_path / "cache"
    with pytest.raises(EvaluateError, match="nonexistent"):
        run_eval(shards, fresh, tmp_path, run=str(tmp_path / "nonexistent"))
    classes = read_manifest(shards)["classes"]
    tiny_checkpoint(tmp_path / "big", classes, size=64)   # a checkpoint at another size: refused as early
    with pytest.raises(EvaluateError, match="64 px"):
        run_eval(shards, fresh, tmp_path, run=str(tmp_path / "big"))
    ckpt = tiny_checkpoint(tmp_path / "edited", classes)   # weights that do not fit their config: a clear error
    state = torch.load(ckpt, weights_only=False)
    state["config"]["model"]["width"] = 16
    torch.save(state, ckpt)
    with pytest.raises(EvaluateError, match="do not fit"):
        run_eval(shards, fresh, tmp_path, run=str(tmp_path / "edited"))
    assert not (fresh / "extractors").exists() and not (fresh / "stats").exists()


def test_bad_input_is_a_clear_error(shards, cache, tmp_path):
    with pytest.raises(SettingsError, match="nothing to evaluate"):
        parse(EvaluateSettings, {"shards": str(shards)})
    with pytest.raises(SettingsError, match="metrics"):
        parse(EvaluateSettings, {"shards": str(shards), "run": "x", "metrics": ["fid", "fidd"]})
    with pytest.raises(EvaluateError, match="no checkpoint"):
        run_eval(shards, cache, tmp_path, run=str(tmp_path))
    r = subprocess.run([sys.executable, "tools/evaluate.py", f"shards={shards}", "run=x", "n_per_class=abc"],
                       cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "n_per_class" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_missing_inception_weights_name_the_staging_command(shards, cache, tmp_path):
    r = subprocess.run([sys.executable, "tools/evaluate.py", f"shards={shards}", f"fake={shards}", "fake_split=val",
                        f"out={tmp_path / 'x.json'}", "features=inception", f"weights_dir={tmp_path / 'empty'}",
                        f"cache_dir={cache}", "metrics=[fid]", "progress=false"],
                       cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "stage_weights.py" in r.stderr and str(tmp_path / "empty") in r.stderr
    assert not (tmp_path / "x.json").exists()


@pytest.mark.slow
def test_one_and_two_ranks_give_the_same_numbers(shards, cache, tmp_path):
    from hpcgan.metrics.cell import ensure_cell_extractor
    classes = read_manifest(shards)["classes"]
    run = tmp_path / "run"
    tiny_checkpoint(run, classes)
    extractor, _ = ensure_cell_extractor(shards, cache / "extractors", progress=False)  # one for both runs
    docs = []
    for n in (1, 2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
               "-m", "hpcgan.evaluate", f"run={run}", f"shards={shards}", f"cache_dir={tmp_path / f'c{n}'}",
               f"out={tmp_path / f'{n}.json'}", "n_per_class=5", "device=cpu", "progress=false", f"feature_file={extractor}",
               "metrics=[fid,kid,prdc,intra_fid,is,class_accuracy,memorisation]", "batch_size=16"]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        r = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env=env)
        assert r.returncode == 0, r.stderr[-3000:]
        docs.append(json.loads((tmp_path / f"{n}.json").read_text()))
    assert docs[0]["world_size"] == 1 and docs[1]["world_size"] == 2
    assert docs[0]["metrics"] == docs[1]["metrics"]
    assert docs[0]["per_class"] == docs[1]["per_class"]
