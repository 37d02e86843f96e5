"""hpcgan.classify / tools/classify.py: regimes, the leakage guard, per-class metrics, architectures, training,
exact resume.

The real data is the project's simulator sharded at 32 px (module fixture); synthetic sets are written by the
real hpcgan.generate from tiny GAN checkpoints whose config names the shard set and split(s) they "trained"
on (their images only feed counts and the guard, never a reported number).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from hpcgan import CONFIG_DIR, REPO_ROOT
from hpcgan.checkpoint import list_checkpoints, load_latest, save_checkpoint
from hpcgan.classify.archs import ARCHS, build_classifier, load_pretrained
from hpcgan.classify.augment import RECIPES, augment_batch, build_recipe
from hpcgan.classify.data import DataError, decode_split, epoch_loader, training_set
from hpcgan.classify.metrics import confusion, expand, scores
from hpcgan.classify.provenance import LeakageError, check_synthetic
from hpcgan.classify.regimes import REGIMES, RegimeLoss, check_final, get_regime
from hpcgan.classify.run import CKPT_KEYS, ClassifySettings, main
from hpcgan.classify.schedule import Schedule
from hpcgan.rundir import EXIT_BAD_INPUT, EXIT_OK, EXIT_SIGNAL
from hpcgan.data.loader import dali_available
from hpcgan.data.shards import read_manifest, write_manifest
from hpcgan.generate import generate
from hpcgan.models.registry import build_model, load_spec
from hpcgan.results import REQUIRED, read_rows
from hpcgan.settings import SettingsError, parse

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
FAST = ["progress=false"]


@pytest.fixture(scope="module")
def shards(simulated_shards) -> Path:
    return simulated_shards(0.6)


def gan_checkpoint(run_dir: Path, shards: Path, split, scarce: dict | None = None) -> Path:
    """A tiny (untrained) GAN checkpoint whose config says it trained on `shards`' `split` (with a scarce cut),
    as hpcgan.train's do."""
    classes = read_manifest(shards)["classes"]
    spec = dataclasses.replace(load_spec("wgan_gp_ac"), width=8, z_dim=16)
    torch.manual_seed(0)
    G, D = build_model(spec, len(classes), 32)
    config = {"model": dataclasses.asdict(spec), "image_size": 32, "classes": classes, "seed": 0, "steps": 1,
              "shards": str(Path(shards).resolve()), "split": split, **({"scarce": scarce} if scarce else {})}
    state = {"step": 1, "epoch": 0, "batch_in_epoch": 0, "config": config, "G": G.state_dict(), "D": D.state_dict(),
             "G_ema": None, "opt_G": {}, "opt_D": {}, "scaler": None, "rng": {}, "meta": {}}
    return save_checkpoint(run_dir, state, keep_last=0)


def synthetic_set(root: Path, real: Path, split="train", gan_shards: Path | None = None, scarce=None, **how) -> Path:
    """A synthetic set from a GAN that trained on `gan_shards` (default `real`) split(s) `split`."""
    run = root / "gan"
    gan_checkpoint(run, gan_shards or real, split, scarce)
    out = root / "synthetic"
    generate(run_dir=run, out=out, png=False, progress=False, device="cpu", **how)
    return out


@pytest.fixture(scope="module")
def topup(shards, tmp_path_factory) -> Path:
    return synthetic_set(tmp_path_factory.mktemp("topup"), shards, balance="max", shards=shards)


@pytest.fixture(scope="module")
def per_class(shards, tmp_path_factory) -> Path:
    return synthetic_set(tmp_path_factory.mktemp("perclass"), shards, per_class=5)


def counts(shards: Path, split: str) -> dict[str, int]:
    return read_manifest(shards)["counts"][split]


# ---- metrics ---------------------------------------------------------------------------------------

CM = np.array([[5, 1, 0, 0],
               [2, 3, 1, 0],
               [0, 0, 4, 0],
               [0, 0, 0, 0]])   # rows: true a, b, c, d (d: no test image, never predicted)


def test_per_class_metrics_known_answer_and_agree_with_sklearn():
    from sklearn.metrics import f1_score, precision_score, recall_score
    sc = scores(CM, ["a", "b", "c", "d"])
    o, p = sc["overall"], sc["per_class"]
    assert o["accuracy"] == pytest.approx(12 / 16)
    assert p["precision"] == pytest.approx({"a": 5 / 7, "b": 3 / 4, "c": 4 / 5, "d": None})
    assert p["recall"] == p["sensitivity"] == pytest.approx({"a": 5 / 6, "b": 1 / 2, "c": 1.0, "d": None})
    # specificity TN / (TN + FP): a: 8 / 10, b: 9 / 10, c: 11 / 12, d: 16 / 16
    assert p["specificity"] == pytest.approx({"a": 0.8, "b": 0.9, "c": 11 / 12, "d": 1.0})
    assert p["f1"] == pytest.approx({"a": 10 / 13, "b": 0.6, "c": 8 / 9, "d": None})
    assert p["accuracy"] == pytest.approx({"a": 13 / 16, "b": 12 / 16, "c": 15 / 16, "d": None})
    assert p["support"] == {"a": 6, "b": 6, "c": 4, "d": 0}
    # macro over the classes the test split has (a, b, c)
    assert o["macro_recall"] == o["balanced_accuracy"] == pytest.approx((5 / 6 + 1 / 2 + 1) / 3)
    assert o["macro_f1"] == pytest.approx((10 / 13 + 0.6 + 8 / 9) / 3)
    assert o["macro_precision"] == pytest.approx((5 / 7 + 3 / 4 + 4 / 5) / 3)
    y, yhat = expand(CM)
    assert (confusion(y, yhat, 4) == CM).all()
    labels = [0, 1, 2]
    assert o["macro_f1"] == pytest.approx(f1_score(y, yhat, labels=labels, average="macro"))
    assert [p["precision"][c] for c in "abc"] == pytest.approx(precision_score(y, yhat, labels=labels, average=None))
    assert [p["recall"][c] for c in "abc"] == pytest.approx(recall_score(y, yhat, labels=labels, average=None))


def test_a_class_never_predicted_costs_precision_zero():
    sc = scores(np.array([[3, 0], [2, 0]]), ["x", "y"])
    assert sc["per_class"]["precision"]["y"] == 0.0 and sc["overall"]["macro_precision"] == pytest.approx(0.3)


# ---- regimes, data ---------------------------------------------------------------------------------

def test_regime_image_counts(shards, topup, per_class):
    real = counts(shards, "train")
    biggest = max(real.values())
    orig = training_set(get_regime("original"), shards)
    assert orig.describe()["per_class"] == real and orig.counts["synthetic"] == {}
    both = training_set(get_regime("original+synthetic"), shards, topup)
    assert set(both.describe()["per_class"].values()) == {biggest}           # topped up to balance
    assert both.counts["real"] == real
    assert both.counts["synthetic"] == {c: biggest - n for c, n in real.items()}
    syn = training_set(get_regime("synthetic"), shards, per_class)
    assert syn.counts["real"] == {} and set(syn.describe()["per_class"].values()) == {5}   # class-balanced
    assert set(training_set(get_regime("synthetic"), shards, per_class, 3).describe()["per_class"].values()) == {3}
    assert training_set(get_regime("balanced"), shards).balanced_sampling
    with pytest.raises(DataError, match="balance=max"):       # 5 per class cannot top up to the largest class
        training_set(get_regime("original+synthetic"), shards, per_class)
    with pytest.raises(DataError, match="per_class=N"):       # balance=max has no image of the largest class
        training_set(get_regime("synthetic"), shards, topup)


def test_synthetic_count_in_all_three_forms_and_a_composed_regimes_shares(shards, per_class):
    """Issue 19: real cut to 1 per class, a synthetic set of 5 per class. topup fills to the largest real class,
    N adds N, Fx adds F times the real count; the composed regime keeps every axis."""
    classes = read_manifest(shards)["classes"]
    present = [c for c, n in counts(shards, "train").items() if n > 0]
    cut = {c: 1 for c in present}
    real = {c: 1 for c in present}

    def syn(spec):
        return training_set(get_regime(spec), shards, per_class, scarce=cut).counts["synthetic"]
    assert not any(syn("original+synthetic").values())   # topup: every class already has the largest count
    assert {c: n for c, n in syn("original+synthetic synthetic_count=3").items() if n} == {c: 3 for c in present}
    assert {c: n for c, n in syn("original+synthetic synthetic_count=4x").items() if n} == {c: 4 for c in present}
    assert {c: n for c, n in syn("original+synthetic synthetic_count=1.5x").items() if n} == {c: 2 for c in present}
    with pytest.raises(DataError, match="synthetic_count=6"):   # the set has 5 per class
        syn("original+synthetic synthetic_count=6")
    r = get_regime("original+synthetic sampling=balanced augment=aug2 synthetic_count=3 real_share=0.25")
    assert r.name == "original+synthetic(3)+balanced+aug2+real_share=0.25"
    assert r.axes() == {"data": "real+synthetic", "sampling": "balanced", "loss": "ce", "augment": "aug2",
                        "synthetic_count": "3", "real_share": 0.25, "prior": "all", "synthetic_bn": "shared"}
    ts = training_set(r, shards, per_class, scarce=cut)
    assert ts.describe()["per_class"] == {c: (4 if c in present else 0) for c in classes}
    group, share = ts.balance_share()
    assert share == 0.25 and int(group.sum()) == 3 * len(present) and (group[:len(present)] == 0).all()
    assert ts.counts["real"] == {c: real.get(c, 0) for c in classes}
    # a preset spelled out by its axes is the preset
    assert get_regime("original sampling=balanced").name == "balanced" and get_regime("aug2 augment=none").name == "original"


def test_the_synthetic_top_up_is_the_first_images_of_each_class(shards, topup):
    """Taking the first n of a class = what generate(per_class=n) writes: independent of the classifier seed."""
    both = training_set(get_regime("original+synthetic"), shards, topup)
    n_real = sum(counts(shards, "train").values())
    syn_tars = {t for t in both.index.tars if t.parent == topup}
    assert syn_tars and all(both.index.tars[t].parent == topup for t in both.index.tar_of[n_real:])
    from hpcgan.data.loader import load_index
    full = load_index(topup, "train")
    for c in np.unique(full.labels):
        mine = both.index.offset[n_real:][both.index.labels[n_real:] == c]
        assert (mine == full.offset[full.labels == c][:len(mine)]).all()


def _pixel_hashes(images_u8: torch.Tensor) -> set[str]:
    return {hashlib.sha256(x.contiguous().numpy().tobytes()).hexdigest() for x in images_u8.cpu()}


def test_no_test_or_val_image_reaches_a_training_loader(shards, topup):
    ts = training_set(get_regime("original+synthetic"), shards, topup)
    test_x, _ = decode_split(shards, "test", torch.device("cpu"), backend="webdataset", num_threads=1)
    val_x, _ = decode_split(shards, "val", torch.device("cpu"), backend="webdataset", num_threads=1)
    held_out = _pixel_hashes(test_x) | _pixel_hashes(val_x)
    seen = set()
    for x, _ in epoch_loader(ts, 16, 0, 1, seed=0, epoch=0, backend="auto", device="cpu"):
        seen |= _pixel_hashes(x.mul(127.5).add(127.5).round().to(torch.uint8))
    assert len(held_out) >= 0.95 * (len(test_x) + len(val_x))
    assert len(seen) >= 0.95 * len(ts.index)           # the epoch covered the training set
    assert not seen & held_out


def test_regime_losses_known_answer():
    counts_ = [6, 2, 0]
    logits, y = torch.tensor([[1.0, 0.0, 0.5], [0.2, 0.3, 0.0]]), torch.tensor([0, 1])
    w = RegimeLoss(get_regime("weighted_loss"), counts_)
    assert w.weight.tolist() == pytest.approx([8 / (2 * 6), 8 / (2 * 2), 0.0])   # N / (K n_c), K = present classes
    la = RegimeLoss(get_regime("logit_adjust"), counts_, tau=1.0)
    prior = torch.tensor([0.75, 0.25, 1e-12])
    expected = torch.nn.functional.cross_entropy(logits + prior.log(), y)
    assert float(la(logits, y)) == pytest.approx(float(expected), rel=1e-5)
    assert float(RegimeLoss(get_regime("original"), counts_)(logits, y)) == pytest.approx(
        float(torch.nn.functional.cross_entropy(logits, y)))
    # prior=real: real+synthetic counts [6+0, 2+4, 0+0] weigh like the real ones [6, 2, 0] alone
    real = get_regime("original+synthetic loss=logit_adjust synthetic_count=4 prior=real")
    assert real.name == "original+synthetic(4)+logit_adjust+real_prior" and real.axes()["prior"] == "real"
    assert float(RegimeLoss(real, [6, 6, 0], real_counts=counts_)(logits, y)) == pytest.approx(float(expected), rel=1e-5)
    assert RegimeLoss(get_regime("original+synthetic loss=weighted prior=real"), [6, 6, 0],
                      real_counts=counts_).weight.tolist() == pytest.approx(w.weight.tolist())
    every = RegimeLoss(get_regime("original+synthetic loss=logit_adjust"), [6, 6, 0], real_counts=counts_)
    assert every.log_prior.tolist() == pytest.approx(torch.tensor([0.5, 0.5, 1e-12]).log().tolist())
    with pytest.raises(ValueError, match="prior=real changes nothing"):    # nothing synthetic
        get_regime("logit_adjust prior=real")
    unweighed = get_regime("original+synthetic prior=real")   # a rival's recipe may still give it its loss
    with pytest.raises(ValueError, match="changes nothing with loss=ce"):
        check_final(unweighed)
    assert check_final(real) is real
    with pytest.raises(SettingsError, match="changes nothing with loss=ce"):   # no recipe: the loss is final
        ClassifySettings(shards="s", out="o", synthetic="x", regime="original+synthetic prior=real")
    ClassifySettings(shards="s", out="o", synthetic="x", regime="original+synthetic prior=real", recipe_from=["r"])
    with pytest.raises(ValueError, match="prior='some'"):
        get_regime("original+synthetic loss=logit_adjust prior=some")


def test_augmentation_recipes_are_seeded_and_grow_in_strength():
    torch.manual_seed(0)
    x = (torch.randint(0, 256, (6, 3, 32, 32)).float() - 127.5) / 127.5   # what the loader gives: 8-bit levels
    outs = {}
    for name in ("aug1", "aug2", "aug3"):
        t = build_recipe(RECIPES[name], 32)
        torch.manual_seed(1)
        a = augment_batch(x, t)
        torch.manual_seed(1)
        assert torch.equal(a, augment_batch(x, t))        # the same seed draws the same augmentations
        assert a.shape == x.shape and a.min() >= -1 and a.max() <= 1
        outs[name] = a
    # aug1 only permutes pixels (flips, rotations): the set of values is kept; the others change them
    assert torch.equal(outs["aug1"].flatten(1).sort(1).values, x.flatten(1).sort(1).values)
    assert not torch.allclose(outs["aug3"].flatten(1).sort(1).values, x.flatten(1).sort(1).values)
    with pytest.raises(ValueError, match="name must be one of"):
        build_recipe([{"name": "warp"}], 32)


def test_the_scarce_cut_is_exact_nested_and_fixed_by_seed(shards):
    real = counts(shards, "train")
    original = get_regime("original")

    def kept(n, seed=0, **more):
        ts = training_set(original, shards, scarce={"neutrophil": n, **more}, scarce_seed=seed)
        assert ts.describe()["per_class"] == {**real, "neutrophil": n, **more}     # exact; the rest untouched
        return ts.scarce["classes"]["neutrophil"]["sha256"]

    ten, thirty = kept(10), kept(30)
    assert len(set(ten)) == 10 and thirty[:10] == ten                # nested: the 10 are the first of the 30
    assert kept(10, lymphocyte=5) == ten                              # other classes' cuts do not move it
    assert set(kept(10, seed=1)) != set(ten)                          # another seed, another subset
    with pytest.raises(DataError, match="neutrophil=999"):
        kept(999)
    with pytest.raises(DataError, match="unknown classes"):
        training_set(original, shards, scarce={"megakaryocyte": 3})


def test_the_val_cut_keeps_the_train_cuts_share_of_a_class_and_the_rest_whole(shards):
    """cut_val: a class cut to N of its T train images keeps round(N V / T) of its V val images (at least 1), the
    same nested way as the train cut; every other class keeps all of its val images."""
    from hpcgan.classify.data import val_cut
    train, val = counts(shards, "train"), counts(shards, "val")
    cut = val_cut(shards, {"neutrophil": 10, "lymphocyte": 1})
    assert cut == {"neutrophil": max(1, math.floor(10 * val["neutrophil"] / train["neutrophil"] + 0.5)),
                   "lymphocyte": 1}
    assert 1 <= cut["neutrophil"] < val["neutrophil"] and val_cut(shards, None) is None
    classes = read_manifest(shards)["classes"]
    _, y = decode_split(shards, "val", torch.device("cpu"), scarce=cut, scarce_seed=0)
    kept = dict(zip(classes, np.bincount(y.numpy(), minlength=len(classes)).tolist()))
    assert kept == {c: cut.get(c, n) for c, n in zip(classes, [val.get(c, 0) for c in classes])}
    with pytest.raises(DataError, match="val split's cut"):
        decode_split(shards, "val", torch.device("cpu"), scarce={"neutrophil": 10 ** 6})


def test_the_val_cut_rounds_halves_up_and_leaves_out_a_class_with_no_val_image(tmp_path):
    from hpcgan.classify.data import val_cut
    (tmp_path / "manifest.json").write_text(json.dumps({"counts": {"train": {"a": 280, "b": 40, "c": 9},
                                                                   "val": {"a": 70, "b": 0, "c": 2}}}))
    # a: 10 x 70 / 280 = 2.5 -> 3 (Python's round would say 2); b: no val image; c: 1 x 2 / 9 -> at least 1
    assert val_cut(tmp_path, {"a": 10, "b": 5, "c": 1}) == {"a": 3, "c": 1}


def test_a_scarce_run_writes_its_cut_and_the_guard_holds_its_gan_to_it(shards, tmp_path):
    cut = {"neutrophil": 10}
    same = synthetic_set(tmp_path / "same", shards, scarce=cut, per_class=1)
    assert check_synthetic(shards, same, scarce=cut, scarce_seed=0)["gan"]["scarce"] == cut
    with pytest.raises(LeakageError, match="saw 10 neutrophil images; the classifier is allowed 5"):
        check_synthetic(shards, same, scarce={"neutrophil": 5}, scarce_seed=0)
    with pytest.raises(LeakageError, match="seed"):
        check_synthetic(shards, same, scarce=cut, scarce_seed=1)
    uncut = synthetic_set(tmp_path / "uncut", shards, per_class=1)
    with pytest.raises(LeakageError, match="saw every neutrophil image"):
        check_synthetic(shards, uncut, scarce=cut, scarce_seed=0)
    out = tmp_path / "run"
    assert main([f"shards={shards}", f"out={out}", "scarce={neutrophil:10}", "steps=4", "eval_every=2",
                 "batch_size=16", *FAST]) == EXIT_OK
    written = json.loads((out / "scarce.json").read_text())
    assert written["classes"]["neutrophil"]["sha256"] == training_set(
        get_regime("original"), shards, scarce=cut).scarce["classes"]["neutrophil"]["sha256"]
    rows = read_rows(out / "results.jsonl")
    assert {json.dumps(r["scarce"]) for r in rows} == {json.dumps(cut)} and rows[0]["n_train"] == sum(
        counts(shards, "train").values()) - counts(shards, "train")["neutrophil"] + 10


def test_a_gan_trained_with_scarce_sees_the_classifiers_cut_and_balance_tops_the_cut_up(shards, tmp_path):
    """The real hpcgan.train with scarce=: the same images as the classifier's cut, recorded in config.yaml,
    scarce.json and the synthetic manifest; balance=max tops the cut class up to the target; the guard holds."""
    from hpcgan.rundir import read_config
    cut, run = {"neutrophil": 4}, tmp_path / "gan"
    r = subprocess.run([sys.executable, "-m", "hpcgan.train", f"shards={shards}", f"run_dir={run}", "model=cgan",
                        "model.width=8", "steps=2", "batch_size=8", "scarce={neutrophil:4}", "scarce_seed=1",
                        "sample_every=0", "progress=false", "tensorboard=false", "precision=fp32"],
                       env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    cfg = read_config(run)
    assert cfg["scarce"] == cut and cfg["scarce_seed"] == 1 and cfg["class_counts"]["neutrophil"] == 4
    kept = training_set(get_regime("original"), shards, scarce=cut, scarce_seed=1).scarce["classes"]["neutrophil"]
    assert json.loads((run / "scarce.json").read_text())["classes"]["neutrophil"]["sha256"] == kept["sha256"]
    syn = tmp_path / "syn"
    man = generate(run_dir=run, out=syn, balance="max", shards=shards, png=False, progress=False, device="cpu")
    real = counts(shards, "train")
    target = max(min(n, 4) if c == "neutrophil" else n for c, n in real.items())
    assert man["balance"]["target"] == target and man["balance"]["scarce"]["classes"] == cut
    assert man["counts"]["train"]["neutrophil"] == target - 4
    assert man["trained_on"]["scarce"] == cut and man["trained_on"]["scarce_seed"] == 1
    assert check_synthetic(shards, syn, scarce=cut, scarce_seed=1)["gan"]["scarce"] == cut
    with pytest.raises(LeakageError, match="saw 4 neutrophil images; the classifier is allowed 3"):
        check_synthetic(shards, syn, scarce={"neutrophil": 3}, scarce_seed=1)
    with pytest.raises(LeakageError, match="seed"):
        check_synthetic(shards, syn, scarce=cut, scarce_seed=0)


def test_train_refuses_a_scarce_cut_of_other_splits(shards, tmp_path):
    from hpcgan.train import TrainSettings
    model = dataclasses.asdict(load_spec("cgan"))
    with pytest.raises(SettingsError, match="split=train"):
        parse(TrainSettings, {"shards": str(shards), "run_dir": str(tmp_path), "model": model,
                              "split": "val", "scarce": {"neutrophil": 3}})
    ok = parse(TrainSettings, {"shards": str(shards), "run_dir": str(tmp_path), "model": model, "seed": 7,
                               "scarce": {"neutrophil": 3}})
    assert ok.scarce_seed == 7      # null: the run's seed, as for the classifier


# ---- the leakage guard -----------------------------------------------------------------------------

def test_leakage_guard_refuses_a_gan_that_saw_the_test_split(shards, topup, tmp_path):
    ok = check_synthetic(shards, topup)
    assert ok["gan"]["splits"] == ["train"] and ok["checked"][0]["overlap"] == 0
    leaky = synthetic_set(tmp_path / "leaky", shards, split=["train", "test"], per_class=1)
    with pytest.raises(LeakageError, match=r"hold \d+ of the \d+ images of .* test split"):
        check_synthetic(shards, leaky)
    # another shard set (here a copy) holding the test images: caught by content hash, whatever its name
    other = tmp_path / "other_shards"
    shutil.copytree(shards, other)
    with pytest.raises(LeakageError, match="test split"):
        check_synthetic(shards, synthetic_set(tmp_path / "other", shards, split="test", gan_shards=other, per_class=1))
    # through the entry point: exit 2, nothing trained
    out = tmp_path / "cls"
    assert main([f"shards={shards}", f"synthetic={leaky}", "regime=synthetic", f"out={out}", *FAST]) == 2
    assert not list_checkpoints(out)


def test_unknown_provenance_is_refused_unless_allowed(shards, topup, tmp_path):
    unknown = tmp_path / "unknown"
    shutil.copytree(topup, unknown)
    man = read_manifest(unknown)
    man["checkpoint"] = {**man["checkpoint"], "path": str(tmp_path / "gone" / "checkpoints" / "step-00000001.pt")}
    assert man["trained_on"]["split"] == "train"   # known from the manifest alone ...
    write_manifest(unknown, {k: v for k, v in man.items() if k not in ("format", "trained_on")})  # ... until dropped
    with pytest.raises(LeakageError, match="allow_unknown_provenance=true"):
        check_synthetic(shards, unknown)
    assert check_synthetic(shards, unknown, allow_unknown=True)["unknown"] is True


# ---- architectures ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(ARCHS))
def test_each_architecture_trains_one_step_at_32px(name):
    torch.manual_seed(0)
    model, info = build_classifier(name, 12, 32)
    assert info["input_size"] == ARCHS[name].min_size if ARCHS[name].min_size > 32 else info["input_size"] == 32
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.tensor([0, 11])
    logits = model(x)
    assert logits.shape == (2, 12)
    torch.nn.functional.cross_entropy(logits, y).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_pretrained_weights_come_from_a_file_and_the_head_is_fresh(tmp_path):
    torch.manual_seed(1)
    imagenet, _ = build_classifier("small_cnn", 1000, 32)   # stands for a staged ImageNet file of this arch
    torch.save(imagenet.state_dict(), tmp_path / "w.pth")
    torch.manual_seed(2)
    model, _ = build_classifier("small_cnn", 12, 32)
    info = load_pretrained(model, tmp_path / "w.pth")
    assert info["sha256"] == hashlib.sha256((tmp_path / "w.pth").read_bytes()).hexdigest()
    mine, theirs = model.state_dict(), imagenet.state_dict()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine if not k.startswith("head."))
    assert mine["head.weight"].shape == (12, 256)
    torch.save({"conv.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="does not fit this architecture"):
        load_pretrained(model, tmp_path / "other.pth")
    with pytest.raises(FileNotFoundError, match="stage"):
        load_pretrained(model, tmp_path / "missing.pth")


def test_pretrained_true_finds_the_imagenet_weights_staged_by_arch_name(shards, tmp_path, capsys):
    """Issue 18: `tools/stage_weights.py timm:resnet50` saves timm's state dict with its sha256 and the timm
    version; pretrained=true finds it by name. Here the test makes the state dict (no internet)."""
    from hpcgan.classify.pretrained import find_staged, save_staged
    wd, out = tmp_path / "weights", tmp_path / "run"
    args = [f"shards={shards}", "arch=resnet50", "pretrained=true", f"weights_dir={wd}", "steps=2", "eval_every=2",
            "batch_size=8", "precision=fp32", "device=cpu", *FAST]
    assert main([*args, f"out={out}"]) == 2   # not staged: exit 2 naming the command, nothing trained
    err = capsys.readouterr().err
    assert f"python tools/stage_weights.py timm:resnet50 weights_dir={wd}" in err and not (out / "checkpoints").exists()
    torch.manual_seed(1)
    imagenet, _ = build_classifier("resnet50", 1000, 32)   # stands for timm's resnet50.tv_in1k
    path = save_staged("resnet50", imagenet.state_dict(), wd, timm_version="9.9.9")
    record = json.loads(path.with_suffix(".json").read_text())
    assert record == {"arch": "resnet50", "timm_model": "resnet50", "pretrained_tag": "tv_in1k", "timm_version": "9.9.9",
                      "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "bytes": path.stat().st_size}
    assert find_staged("resnet50", wd) == path
    assert main([*args, f"out={out}"]) == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["arch"]["pretrained"]["sha256"] == doc["rows"][0]["pretrained_sha256"] == record["sha256"]
    torch.manual_seed(2)   # pretrained_file= wins over the staged file
    torch.save(build_classifier("resnet50", 1000, 32)[0].state_dict(), tmp_path / "mine.pth")
    assert main([*args, f"out={tmp_path / 'run2'}", f"pretrained_file={tmp_path / 'mine.pth'}"]) == 0
    assert (json.loads((tmp_path / "run2" / "results.json").read_text())["rows"][0]["pretrained_sha256"]
            == hashlib.sha256((tmp_path / "mine.pth").read_bytes()).hexdigest())
    path.write_bytes(path.read_bytes()[:-8] + b"\0" * 8)   # a damaged staged file is refused
    with pytest.raises(ValueError, match="not the file staged"):
        find_staged("resnet50", wd)
    with pytest.raises(SettingsError, match="small_cnn has no ImageNet weights"):
        parse(ClassifySettings, {"shards": "s", "out": "o", "pretrained": True})


def test_stage_weights_knows_the_classifier_archs_by_name():
    sys.path.insert(0, str(REPO_ROOT / "tools"))
    try:
        from stage_weights import parse_args
    finally:
        sys.path.pop(0)
    assert parse_args(["timm:resnet50", "timm:xception", "weights_dir=/w"]) == (
        ["timm:resnet50", "timm:xception"], {"weights_dir": "/w"})
    with pytest.raises(ValueError, match="timm:vgg19"):
        parse_args(["timm:small_cnn"])


# ---- settings --------------------------------------------------------------------------------------

def test_yaml_documents_the_settings_defaults():
    from omegaconf import OmegaConf
    doc = yaml.safe_load((CONFIG_DIR / "classify.yaml").read_text())
    doc.pop("hydra"), doc.pop("defaults")
    assert doc == OmegaConf.to_container(OmegaConf.structured(ClassifySettings))
    assert set(doc["recipes"]) == {r.augment for r in REGIMES.values() if r.augment}


@pytest.mark.parametrize("bad, msg", [({"regime": "mixup"}, "regime='mixup'"), ({"arch": "alexnet"}, "arch='alexnet'"),
                                      ({"regime": "synthetic"}, "pass synthetic=DIR"),
                                      ({"synthetic": "x"}, "drop synthetic="), ({"select_on": "loss"}, "select_on"),
                                      ({"schedule": "plateau"}, "set patience=N"), ({"schedule": "step"}, "schedule="),
                                      ({"recipes": {"aug1": [{"name": "flip", "angle": 3}]}}, "recipes.aug1"),
                                      ({"sampling": "random"}, "sampling='random'"), ({"augment": "aug9"}, "augment='aug9'"),
                                      ({"loss": "focal"}, "loss='focal'"), ({"synthetic_count": 90}, r"only for real\+synthetic"),
                                      ({"regime": "original+synthetic", "synthetic": "x", "synthetic_count": "3y"},
                                       "synthetic_count='3y'"),
                                      ({"regime": "original+synthetic", "synthetic": "x", "real_share": 0.5},
                                       "with sampling=balanced"),
                                      ({"regime": "balanced augmnt=aug2"}, "not axis=value"),
                                      ({"warmup": 2.5}, "warmup=2.5"), ({"warmup": 5000, "steps": 5000}, "under steps=5000")])
def test_bad_settings_are_one_line_errors(bad, msg):
    with pytest.raises(SettingsError, match=msg):
        parse(ClassifySettings, {"shards": "s", "out": "o", **bad})

@pytest.mark.parametrize("size, stem_strides", [(32, 0), (64, 1), (128, 2)])
def test_small_resnet_brings_every_size_to_32px_stages_with_strided_stem_convs(size, stem_strides):
    """The study's default classifier: its four residual stages see 32, 16, 8 and 4 px whatever the shard size
    (a stride-2 stem conv per doubling), so its cost per image stays that of 32 px."""
    from hpcgan.classify.archs import SmallResNet
    torch.manual_seed(0)
    model, info = build_classifier("small_resnet", 9, size)
    assert isinstance(model, SmallResNet) and info["input_size"] == size
    strides = [m.stride[0] for m in model.stem if isinstance(m, torch.nn.Conv2d)]
    assert strides == [2] * stem_strides + [1]
    seen = []
    model.stages[0].register_forward_hook(lambda m, i, o: seen.append(o.shape[-1]))
    assert model(torch.zeros(1, 3, size, size)).shape == (1, 9) and seen == [32]



# ---- training --------------------------------------------------------------------------------------

def overrides(shards: Path, out: Path, *extra: str) -> list[str]:
    return [f"shards={shards}", f"out={out}", "batch_size=32", "steps=100", "eval_every=50", "log_every=25",
            "ckpt_every=50", *FAST, *extra]


def test_small_cnn_learns_well_above_chance_and_writes_its_results(shards, tmp_path):
    out = tmp_path / "run"
    assert main(overrides(shards, out)) == EXIT_OK
    doc = json.loads((out / "results.json").read_text())
    test = counts(shards, "test")
    majority = max(test.values()) / sum(test.values())
    assert doc["metrics"]["accuracy"] > majority + 0.25, doc["metrics"]
    assert doc["metrics"]["macro_f1"] > 0.4
    assert doc["selection"]["best_step"] in (50, 100) and doc["real"]["n"] == sum(test.values())
    rows = read_rows(out / "results.jsonl")
    keys = {"stage", "run_dir", "arch", "regime", "seed", "steps", "image_size", "manifest_sha256",
            "synthetic_manifest_sha256", "metric", "class", "value", "n_train", "n_test", *REQUIRED}
    assert all(keys <= set(r) for r in rows)
    assert {r["stage"] for r in rows} == {"classify"} and {r["steps"] for r in rows} == {100}
    overall = {r["metric"]: r["value"] for r in rows if r["class"] is None}
    assert overall["accuracy"] == pytest.approx(doc["metrics"]["accuracy"])
    assert {"macro_f1", "balanced_accuracy", "macro_precision", "macro_recall"} <= set(overall)
    per = [r for r in rows if r["class"] is not None]
    assert {r["metric"] for r in per} >= {"precision", "recall", "sensitivity", "specificity", "f1"}
    assert {r["class"] for r in per} == set(doc["classes"])
    cm = np.loadtxt(out / "confusion_matrix.csv", delimiter=",", skiprows=1, usecols=range(1, 13), dtype=int)
    assert cm.sum() == sum(test.values()) and (cm == np.array(doc["confusion_matrix"])).all()
    assert (out / "confusion_matrix.png").stat().st_size > 1000
    from PIL import Image
    assert Image.open(out / "curves.png").height > 2 * 200     # two panels: the loss, train and val accuracy
    assert json.loads((out / "status.json").read_text())["state"] == "finished"
    assert main(overrides(shards, out)) == EXIT_OK       # finished: nothing to do, nothing appended
    assert len(read_rows(out / "results.jsonl")) == len(rows)


def test_original_plus_synthetic_runs_and_records_its_synthetic_set(shards, topup, tmp_path):
    out = tmp_path / "run"
    assert main(overrides(shards, out, f"synthetic={topup}", "regime=original+synthetic", "steps=8",
                          "eval_every=4")) == EXIT_OK
    rows = read_rows(out / "results.jsonl")
    assert {r["synthetic_manifest_sha256"] for r in rows} == {
        hashlib.sha256((topup / "manifest.json").read_bytes()).hexdigest()}
    assert {r["synthetic_from"] for r in rows} == {"wgan_gp_ac"}
    ts = json.loads((out / "training_set.json").read_text())
    assert len(set(ts["per_class"].values())) == 1 and ts["provenance"]["gan"]["splits"] == ["train"]
    named = tmp_path / "named"   # a study's variant names its set: the rows carry that name, not the model's
    assert main(overrides(shards, named, f"synthetic={topup}", "regime=original+synthetic", "steps=4",
                          "eval_every=4", "synthetic_name=wgan_gp_ac-long")) == EXIT_OK
    assert {r["synthetic_from"] for r in read_rows(named / "results.jsonl")} == {"wgan_gp_ac-long"}
    assert json.loads((named / "results.json").read_text())["synthetic"]["name"] == "wgan_gp_ac-long"
    assert main(overrides(shards, tmp_path / "bad", "synthetic_name=x")) == EXIT_BAD_INPUT   # no set to name
    refit = tmp_path / "refit"   # trained again on train + val: the same synthetic cells, val's real ones added
    assert main(overrides(shards, refit, f"synthetic={topup}", "regime=original+synthetic", "steps=8",
                          "eval_every=4", f"refit_from={out}")) == EXIT_OK
    again = json.loads((refit / "training_set.json").read_text())
    assert again["counts"]["synthetic"] == ts["counts"]["synthetic"]
    assert again["counts"]["real"] == {c: n + counts(shards, "val").get(c, 0) for c, n in ts["counts"]["real"].items()}


def test_a_composed_regime_runs_and_records_every_axis(shards, per_class, tmp_path):
    out = tmp_path / "run"
    assert main(overrides(shards, out, f"synthetic={per_class}", "regime=original+synthetic", "sampling=balanced",
                          "augment=aug2", "synthetic_count=3", "steps=4", "eval_every=4")) == EXIT_OK
    doc = json.loads((out / "results.json").read_text())
    name = "original+synthetic(3)+balanced+aug2"
    assert doc["regime"]["name"] == name and doc["regime"]["synthetic_count"] == "3" and doc["regime"]["augment"] == "aug2"
    row = doc["rows"][0]
    assert (row["regime"], row["preset"], row["sampling"], row["loss"], row["augment"], row["synthetic_count"],
            row["real_share"]) == (name, "original+synthetic", "balanced", "ce", "aug2", "3", None)
    present = [c for c, n in counts(shards, "train").items() if n > 0]
    assert {c: n for c, n in doc["training_set"]["counts"]["synthetic"].items() if n} == {c: 3 for c in present}
    out = tmp_path / "prior"   # the logit adjustment by the real counts: recorded as an axis and in the name
    assert main(overrides(shards, out, f"synthetic={per_class}", "regime=original+synthetic", "loss=logit_adjust",
                          "synthetic_count=3", "prior=real", "steps=4", "eval_every=4")) == EXIT_OK
    row = json.loads((out / "results.json").read_text())["rows"][0]
    assert (row["regime"], row["loss"], row["prior"]) == ("original+synthetic(3)+logit_adjust+real_prior",
                                                          "logit_adjust", "real")


def test_split_batch_norm_normalises_each_source_by_its_own_statistics():
    """Known answer: the real rows go through the original layer (its running mean moves by 0.1 x their mean), the
    synthetic rows through the copy (0.1 x 100); the real rows' output is the original layer's on them alone."""
    from hpcgan.classify.splitbn import SplitBatchNorm, real_layers, split_batchnorm, synthetic_rows
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 1, 1, bias=False), torch.nn.BatchNorm2d(1))
    torch.nn.init.ones_(net[0].weight)
    alone = torch.nn.BatchNorm2d(1)
    assert split_batchnorm(net) == 1 and isinstance(net[1], SplitBatchNorm)
    real = torch.randn(3, 1, 4, 4)
    x = torch.cat([real[:2], torch.full((2, 1, 4, 4), 100.0), real[2:]])
    rows = torch.tensor([False, False, True, True, False])
    with synthetic_rows(net, rows):
        out = net(x)
    assert net[1].rows is None   # only within the block
    assert torch.allclose(net[1].main.running_mean, 0.1 * real.mean().reshape(1), atol=1e-6)
    assert torch.allclose(net[1].aux.running_mean, torch.tensor([10.0]))
    assert torch.allclose(out[~rows], alone(real), atol=1e-5) and torch.allclose(out[rows], torch.zeros(2, 1, 4, 4), atol=1e-3)
    net.eval()
    assert torch.allclose(net(real), net[1].main(real))   # scoring: the real cells' layer alone
    plain = torch.nn.Sequential(torch.nn.Conv2d(1, 1, 1, bias=False), torch.nn.BatchNorm2d(1)).eval()
    plain.load_state_dict(real_layers(net.state_dict()))   # strict: the plain architecture's names, no aux
    assert torch.equal(plain(real), net(real))
    with pytest.raises(ValueError, match="no batch-norm layer"):
        split_batchnorm(torch.nn.Linear(2, 2))


def test_a_single_row_of_a_one_by_one_map_is_normalised_by_the_running_statistics():
    """resnet50 / xception end at 1x1 maps at 32 px: one synthetic row there has no batch statistics (BatchNorm
    would raise), so it takes aux's running ones (at the start 0 and 1: x / sqrt(1 + eps)), leaving them."""
    from hpcgan.classify.splitbn import split_batchnorm, synthetic_rows
    net = torch.nn.Sequential(torch.nn.BatchNorm2d(2))
    split_batchnorm(net)
    x = torch.randn(3, 2, 1, 1)
    with synthetic_rows(net, torch.tensor([False, True, False])):
        out = net(x)
    assert torch.allclose(out[1], x[1] / math.sqrt(1 + 1e-5))
    assert torch.equal(net[0].aux.running_mean, torch.zeros(2)) and int(net[0].aux.num_batches_tracked) == 0
    assert int(net[0].main.num_batches_tracked) == 1


@pytest.mark.parametrize("backend", ["webdataset", pytest.param("dali", marks=pytest.mark.skipif(
    not dali_available()[0], reason="DALI not importable"))])
def test_planned_batches_carry_their_training_set_positions(shards, per_class, backend):
    """What split batch norm's mask rests on: each batch's positions are those of its images (their labels),
    after a skip as on resume."""
    from hpcgan.classify.run import planned
    ts = training_set(get_regime("original+synthetic synthetic_count=3"), shards, per_class)
    loader = epoch_loader(ts, 16, 0, 1, seed=0, epoch=1, skip_batches=1, backend=backend, device="cpu")
    seen = 0
    for x, y, idx in planned(loader):
        assert len(x) == len(idx) == 16 and torch.equal(y.cpu(), torch.as_tensor(ts.index.labels[idx]))
        seen += 1
    assert seen == len(loader) > 1 and ts.synthetic.sum() > 0


def test_split_batch_norm_runs_resumes_exactly_and_is_refused_without_both_sources(shards, per_class, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    args = (f"synthetic={per_class}", "regime=original+synthetic", "synthetic_count=3", "synthetic_bn=split", "steps=12",
            "eval_every=4", "ckpt_every=8", "batch_size=16")
    assert main(overrides(shards, straight, *args)) == EXIT_OK
    doc = json.loads((straight / "results.json").read_text())
    assert doc["regime"]["synthetic_bn"] == "split" and doc["rows"][0]["synthetic_bn"] == "split"
    assert doc["regime"]["name"] == "original+synthetic(3)+split_bn" and doc["arch"]["split_batchnorm_layers"] > 0
    a, _ = load_latest(straight, required=CKPT_KEYS)
    aux = [k for k in a["model"] if k.endswith(".aux.running_mean")]
    assert aux and all(not torch.equal(a["model"][k], a["model"][k.replace(".aux.", ".main.")]) for k in aux)
    from hpcgan.classify.kept import kept_weights
    plain, _ = build_classifier("small_cnn", len(doc["classes"]), 32)
    plain.load_state_dict(kept_weights(straight)[1])   # outside the run: the real cells' layers, plain names
    as_if_stopped_at(straight, resumed, 8)
    assert main(overrides(shards, resumed, *args)) == EXIT_OK
    b, _ = load_latest(resumed, required=CKPT_KEYS)
    assert a["step"] == b["step"] == 12 and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    shared = [x if x != "synthetic_bn=split" else "synthetic_bn=shared" for x in args]
    assert main(overrides(shards, resumed, *shared)) == EXIT_BAD_INPUT   # another model: refused on resume
    for bad in (("regime=aug2", "synthetic_bn=split"), (f"synthetic={per_class}", "regime=synthetic",
                                                         "synthetic_bn=split"), ("synthetic_bn=own",)):
        with pytest.raises(SettingsError, match="synthetic_bn"):
            ClassifySettings(shards="s", out="o", **dict(a.split("=", 1) for a in bad))


def cli(shards: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(REPO_ROOT / "tools" / "classify.py"), f"shards={shards}", f"out={out}",
            "batch_size=8", "eval_every=4", "log_every=1", *FAST, *extra]


def _wait_for(cond, proc, timeout=240):
    t0 = time.time()
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"process ended (rc={proc.returncode}) before the condition held")
        if time.time() - t0 > timeout:
            raise AssertionError("timed out")
        time.sleep(0.02)


@pytest.mark.slow
def test_resume_after_sigkill_gives_the_same_weights(shards, tmp_path):
    args = ["steps=40", "ckpt_every=4", "regime=aug2"]   # augmentation: its randomness must resume exactly too
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    p = subprocess.run(cli(shards, straight, *args), env=ENV, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    proc = subprocess.Popen(cli(shards, killed, *args), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: any(c.name >= "step-00000008.pt" for c in list_checkpoints(killed)), proc)
    finally:
        proc.kill()
        proc.wait()
    assert json.loads((killed / "status.json").read_text())["state"] == "running"
    p = subprocess.run(cli(shards, killed, *args), env=ENV, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    a, _ = load_latest(straight, required=CKPT_KEYS)
    b, _ = load_latest(killed, required=CKPT_KEYS)
    assert a["step"] == b["step"] == 40 and a["best"]["step"] == b["best"]["step"]
    for part in ("model", ):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part])
    assert all(torch.equal(a["best"]["model"][k], b["best"]["model"][k]) for k in a["best"]["model"])
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (straight, killed))
    assert ra["confusion_matrix"] == rb["confusion_matrix"]


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR2], ids=["SIGTERM", "SIGUSR2"])
def test_a_stop_signal_checkpoints_exits_3_and_the_rerun_finishes(shards, tmp_path, signum):
    out = tmp_path / "run"
    args = ["steps=60", "ckpt_every=1000"]
    proc = subprocess.Popen(cli(shards, out, *args), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    _wait_for(lambda: (out / "log.csv").is_file() and len((out / "log.csv").read_text().splitlines()) >= 4, proc)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_SIGNAL, err[-3000:]
    st = json.loads((out / "status.json").read_text())
    assert st["state"] == "interrupted" and st["signal"] == signum.name and 3 <= st["step"] < 60
    assert load_latest(out, required=CKPT_KEYS)[0]["step"] == st["step"]
    p = subprocess.run(cli(shards, out, *args), env=ENV, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads((out / "status.json").read_text())["state"] == "finished"
    assert (out / "results.json").is_file()


@pytest.mark.slow
def test_two_ranks_under_torchrun(shards, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "hpcgan.classify", f"shards={shards}", f"out={out}", "batch_size=8", "steps=12", "eval_every=6",
           "log_every=3", *FAST]
    p = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    doc = json.loads((out / "results.json").read_text())
    assert doc["world_size"] == 2 and sum(map(sum, doc["confusion_matrix"])) == sum(counts(shards, "test").values())


@pytest.mark.slow
def test_split_batch_norm_under_torchrun(shards, per_class, tmp_path):
    """Two ranks, some batches without a synthetic cell (the auxiliary layers then unused: DDP must allow it)."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "hpcgan.classify", f"shards={shards}", f"out={out}", f"synthetic={per_class}",
           "regime=original+synthetic", "synthetic_count=1", "synthetic_bn=split", "batch_size=4", "steps=12",
           "eval_every=6", "log_every=3", *FAST]
    p = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    doc = json.loads((out / "results.json").read_text())
    assert doc["world_size"] == 2 and doc["regime"]["synthetic_bn"] == "split"


def test_train_split_settings_one_or_several(shards, tmp_path):
    from hpcgan.train import TrainSettings
    base = {"shards": str(shards), "run_dir": str(tmp_path), "model": dataclasses.asdict(load_spec("cgan"))}
    assert parse(TrainSettings, {**base, "split": ["train", "val"]}).split == ["train", "val"]
    assert parse(TrainSettings, {**base, "split": ["train"]}).split == "train"
    for bad, words in ((["train", "train"], "different splits"), ("tets", "split='tets'"), ([], "give a split")):
        with pytest.raises(SettingsError, match=words):
            parse(TrainSettings, {**base, "split": bad})


def test_classes_without_real_training_images_are_never_topped_up():
    from hpcgan.classify.data import synthetic_wanted
    real, names = np.array([5, 0, 2]), ["a", "absent", "c"]
    top = synthetic_wanted(get_regime("original+synthetic"), real, np.array([0, 0, 3]), names, None)
    assert top == {2: 3}
    cas = synthetic_wanted(get_regime("synthetic"), real, np.array([4, 0, 6]), names, None)
    assert cas == {0: 4, 2: 4}
    with pytest.raises(DataError, match=r"\{'c': '2 < 3'\}"):
        synthetic_wanted(get_regime("original+synthetic"), real, np.array([0, 9, 2]), names, None)


def plant_val_curve(monkeypatch, shards: Path, values: list[float]) -> None:
    """Every val scoring of a run in this process returns the next of `values` as its macro-F1 (test is real)."""
    import hpcgan.classify.run as run_mod
    curve, real = iter(values), getattr(run_mod.confusion_on, "real", run_mod.confusion_on)   # planted again: over the real one
    test_y = decode_split(shards, "test", torch.device("cpu"))[1]

    def planted(model, images, labels, num_classes, *a, **k):
        cm = real(model, images, labels, num_classes, *a, **k)
        if len(labels) != len(test_y):   # val: a confusion matrix whose macro-F1 is the next point of the curve
            f = next(curve)   # class 1: 100 f right, 100 (1 - f) taken for class 0
            cm = np.zeros((num_classes, num_classes), np.int64)
            cm[0, 0], cm[1, 1], cm[1, 0] = 100, int(100 * f), int(100 * (1 - f))
        return cm
    planted.real = real
    monkeypatch.setattr(run_mod, "confusion_on", planted)


def test_early_stopping_stops_where_a_planted_validation_curve_peaks(shards, tmp_path, monkeypatch):
    """Issue 19: val macro-F1 planted to rise to a peak at the 3rd scoring (step 6) and fall after: with
    patience 2 the run stops at step 10 (two scorings later), keeps step 6's weights, and says so; a rerun
    finds it finished."""
    plant_val_curve(monkeypatch, shards, [0.2, 0.5, 0.9, 0.6, 0.4, 0.3, 0.3, 0.3, 0.3, 0.3])
    out = tmp_path / "run"
    assert main(overrides(shards, out, "steps=40", "eval_every=2", "patience=2", "ckpt_every=1000")) == EXIT_OK
    doc = json.loads((out / "results.json").read_text())
    assert doc["selection"]["best_step"] == 6
    row = doc["rows"][0]
    assert (row["steps_run"], row["stopped_early"], row["patience"]) == (10, True, 2)
    assert [r["value"] for r in doc["rows"] if r["metric"] == "steps_run"] == [10.0]
    assert main(overrides(shards, out, "steps=40", "eval_every=2", "patience=2", "ckpt_every=1000")) == EXIT_OK
    assert json.loads((out / "results.json").read_text())["time"] == doc["time"]   # not trained again


def test_schedules_known_answer():
    """cosine: the warm-up ramp, then half the rate halfway through the decay, 0 at the cap, and patience's stop.
    plateau: scorings every 10 steps, patience 2, best steps 10, 20, 30, then none until 80: the rate drops x0.1
    at step 50 (two scorings after 30) and at 70 (two after that decay), the best at 80 does not lift it back, and
    the run stops at 100, the second plateau after the last decay; a fresh schedule loaded with the state agrees."""
    cos = Schedule("cosine", 1e-3, total=110, warmup=10 / 110, eval_every=10, patience=2)
    assert [cos.lr_at(s) for s in (0, 4, 9)] == pytest.approx([1e-4, 5e-4, 1e-3])
    assert [cos.lr_at(s) for s in (10, 60, 110)] == pytest.approx([1e-3, 5e-4, 0.0])
    assert not cos.scored(40, best_step=30) and cos.scored(50, best_step=30) and cos.lr_at(50) > 0
    assert not cos.stopped(110, best_step=30)    # the cap is an end, not an early stop
    # a warm-up in steps (over 1) is the same ramp whatever the cap; a share (up to 1) moves with it
    share, fixed = (Schedule("plateau", 1e-3, total=6000, warmup=w, eval_every=10, patience=2) for w in (0.05, 300))
    assert share.warmup_steps() == fixed.warmup_steps() == 300
    assert [share.lr_at(s) for s in range(0, 400, 7)] == [fixed.lr_at(s) for s in range(0, 400, 7)]
    longer = Schedule("plateau", 1e-3, total=20000, warmup=300, eval_every=10, patience=2)
    assert [longer.lr_at(s) for s in (149, 299, 300)] == pytest.approx([5e-4, 1e-3, 1e-3])
    assert Schedule("plateau", 1e-3, total=20000, warmup=0.05, eval_every=10, patience=2).warmup_steps() == 1000
    assert Schedule("cosine", 1e-3, total=100, warmup=1.0, eval_every=10, patience=2).warmup_steps() == 100  # a share
    # plateau: patience counts from the warm-up's end at the earliest (best at 10, warm-up to 50: no decay at 30)
    warm = Schedule("plateau", 1e-3, total=1000, warmup=50, eval_every=10, patience=2)
    assert [warm.scored(s, best_step=10) for s in (20, 30, 40, 50, 60)] == [False] * 5 and warm.taken == 0
    assert not warm.scored(70, best_step=10) and warm.taken == 1 and warm.lr_at(70) == pytest.approx(1e-4)

    plat = Schedule("plateau", 1e-3, total=1000, warmup=0.0, eval_every=10, patience=2, factor=0.1, decays=2)
    best, seen = -1, []
    for step in range(10, 200, 10):
        best = step if step in (10, 20, 30, 80) else best
        stop = plat.scored(step, best)
        seen.append((step, plat.lr_at(step), stop))
        if stop:
            break
    assert [(s, round(lr, 8), stop) for s, lr, stop in seen] == [
        (10, 1e-3, False), (20, 1e-3, False), (30, 1e-3, False), (40, 1e-3, False), (50, 1e-4, False),
        (60, 1e-4, False), (70, 1e-5, False), (80, 1e-5, False), (90, 1e-5, False), (100, 1e-5, True)]
    again = Schedule("plateau", 1e-3, total=1000, warmup=0.0, eval_every=10, patience=2, factor=0.1, decays=2)
    again.load_state_dict(plat.state_dict())
    assert again.stopped(100, 80) and not again.stopped(90, 80) and again.lr_at(95) == pytest.approx(1e-5)


PLATEAU = ["steps=40", "eval_every=2", "patience=2", "schedule=plateau", "warmup=0"]
# val macro-F1 at steps 2, 4, ...: best at 6; decay 1 at 10 (6 + 2 x 2), decay 2 at 14, a new best at 16, stop at 20
PLATEAU_CURVE = [0.2, 0.5, 0.9, 0.6, 0.4, 0.3, 0.3, 0.95, 0.3, 0.3]


def test_plateau_decays_the_rate_where_val_stalls_and_stops_after_the_last_decay(shards, tmp_path, monkeypatch):
    """schedule=plateau on a planted val curve: log.csv shows the rate x0.1 after step 10 and again after 14,
    the best weights are step 16's (found after both decays), the run stops at step 20, and says so."""
    plant_val_curve(monkeypatch, shards, PLATEAU_CURVE)
    out = tmp_path / "run"
    assert main(overrides(shards, out, *PLATEAU, "ckpt_every=1000")) == EXIT_OK
    lr = {int(r.split(",")[0]): float(r.split(",")[5]) for r in (out / "log.csv").read_text().splitlines()[1:]}
    assert [lr[s] for s in (10, 12, 14, 16, 20)] == pytest.approx([1e-3, 1e-4, 1e-4, 1e-5, 1e-5])
    doc = json.loads((out / "results.json").read_text())
    assert doc["selection"]["best_step"] == 16
    row = doc["rows"][0]
    assert (row["steps_run"], row["stopped_early"], row["schedule"], row["lr_decays"]) == (20, True, "plateau", 2)


def as_if_stopped_at(finished: Path, copy: Path, step: int) -> None:
    """`copy`: the finished run as a run stopped at `step` would have left it (that checkpoint, no results)."""
    shutil.copytree(finished, copy)
    for path in list_checkpoints(copy):
        if path.name != f"step-{step:08d}.pt":
            path.unlink()
    (copy / "results.json").unlink()


def test_plateau_resumes_with_its_decays(shards, tmp_path, monkeypatch):
    """A plateau run resumed from its step-12 checkpoint (one decay taken, at step 10) ends with the weights, best
    step and stop of the uninterrupted run: the decays are in the checkpoint, not re-derived from step 0."""
    plant_val_curve(monkeypatch, shards, PLATEAU_CURVE)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(overrides(shards, straight, *PLATEAU, "ckpt_every=12")) == EXIT_OK
    as_if_stopped_at(straight, resumed, 12)
    plant_val_curve(monkeypatch, shards, PLATEAU_CURVE[6:] + [0.3] * 10)   # the scorings after step 12 (and more,
                                                                             # for a run that would not stop at 20)
    other_patience = [a if a != "patience=2" else "patience=3" for a in PLATEAU]   # shapes the rate: refused
    assert main(overrides(shards, resumed, *other_patience, "ckpt_every=12")) == EXIT_BAD_INPUT
    assert main(overrides(shards, resumed, *PLATEAU, "ckpt_every=12")) == EXIT_OK
    a, _ = load_latest(straight, required=CKPT_KEYS)
    b, _ = load_latest(resumed, required=CKPT_KEYS)
    assert a["step"] == b["step"] == 20 and a["best"]["step"] == b["best"]["step"] == 16
    assert a["schedule"] == b["schedule"] == {"taken": 2, "since": 14, "decayed_at": [10, 14]}
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_a_plateau_checkpoint_from_before_the_decay_steps_were_kept_loads_its_last_decay():
    old = Schedule("plateau", 1e-3, total=40, warmup=0, eval_every=2, patience=2)
    old.load_state_dict({"taken": 2, "since": 14})
    assert (old.taken, old.since, old.lr_at(15)) == (2, 14, pytest.approx(1e-5))
    assert not old.known and "decayed_at" not in old.state_dict()   # the first decay's step is not made up
    fresh = Schedule("plateau", 1e-3, total=40, warmup=0, eval_every=2, patience=2)
    fresh.load_state_dict({"taken": 0, "since": 0})
    assert fresh.known and fresh.state_dict()["decayed_at"] == []


def test_a_replayed_schedule_has_the_decays_it_is_given_and_never_stops_early():
    """A refit's rate: another run's decays at steps 10 and 14 (x0.1 each from that step on), after a 4-step
    warm-up; patience never stops it, and the decays it reports are those before a given step."""
    rep = Schedule("plateau", 1e-3, total=40, warmup=4, eval_every=2, patience=2, replay=(10, 14))
    assert [rep.lr_at(s) for s in (0, 3, 9, 10, 13, 14, 30)] == pytest.approx(
        [2.5e-4, 1e-3, 1e-3, 1e-4, 1e-4, 1e-5, 1e-5])
    assert not any(rep.scored(s, best_step=2) for s in range(2, 40, 2)) and rep.taken == 0
    assert rep.decay_steps(before=12) == (10,) and rep.decay_steps(before=16) == (10, 14)


def plateau_source(monkeypatch, shards: Path, out: Path) -> Path:
    """The planted plateau run of the tests above: best step 16, decays at 10 and 14, stopped at 20."""
    plant_val_curve(monkeypatch, shards, PLATEAU_CURVE)
    assert main(overrides(shards, out, *PLATEAU, "ckpt_every=1000")) == EXIT_OK
    doc = json.loads((out / "results.json").read_text())
    assert (doc["selection"]["best_step"], doc["lr_decay_steps"]) == (16, [10, 14])
    return out


def test_a_refit_trains_on_train_and_val_for_the_best_step_with_the_runs_decays(shards, tmp_path, monkeypatch):
    """refit_from= a plateau run (best step 16, decays at 10 and 14): 16 steps on train + val at the rate the run
    had (x0.1 from step 10, x0.01 from 14; log.csv row s shows step s-1's rate), no val scoring at all, and the
    last weights scored on test; the rows say so."""
    src = plateau_source(monkeypatch, shards, tmp_path / "src")
    plant_val_curve(monkeypatch, shards, [])   # a val scoring would raise StopIteration
    out = tmp_path / "refit"
    assert main(overrides(shards, out, *PLATEAU, "ckpt_every=1000", "log_every=1", f"refit_from={src}")) == EXIT_OK
    rows = [r.split(",") for r in (out / "log.csv").read_text().splitlines()[1:]]
    lr = {int(r[0]): float(r[5]) for r in rows}
    assert sorted(lr) == list(range(1, 17)) and all(r[8] == r[9] == "" for r in rows)   # 16 steps, no val
    assert [lr[s] for s in (1, 10, 11, 14, 15, 16)] == pytest.approx([1e-3, 1e-3, 1e-4, 1e-4, 1e-5, 1e-5])
    doc = json.loads((out / "results.json").read_text())
    n = counts(shards, "train")
    assert doc["training_set"]["n_train"] == sum(n.values()) + sum(counts(shards, "val").values())
    assert doc["selection"] == {"on": "refit", "source": str(src.resolve()), "best_step": 16, "decayed_at": [10, 14],
                                "source_result_time": pytest.approx(json.loads((src / "results.json").read_text())["time"]),
                                "val": None}
    assert doc["real"]["split"] == "test" and doc["lr_decay_steps"] == [10, 14]
    row = doc["rows"][0]
    assert (row["selected_on"], row["refit_from"], row["best_step"], row["steps_run"], row["lr_decays"]) == (
        "refit", str(src.resolve()), 16, 16, 2)
    assert (out / "curves.png").is_file()


def test_a_run_with_cut_val_selects_on_the_cut_val_split_and_records_it(shards, tmp_path, monkeypatch):
    """scarce= with cut_val=true: every val scoring sees the cut val split (the neutrophils cut to their train
    share), the rows record the val cut, and a resume without cut_val is refused."""
    import hpcgan.classify.run as run_mod
    from hpcgan.classify.data import val_cut
    seen, real = [], run_mod.confusion_on
    monkeypatch.setattr(run_mod, "confusion_on", lambda m, x, y, *a, **k: seen.append(y.clone()) or real(m, x, y, *a, **k))
    out, cut = tmp_path / "run", {"neutrophil": 10}
    args = overrides(shards, out, "steps=4", "eval_every=2", "scarce={neutrophil: 10}", "cut_val=true", "ckpt_every=2")
    assert main(args) == EXIT_OK
    classes = read_manifest(shards)["classes"]
    n_val = sum(counts(shards, "val").values())
    want = val_cut(shards, cut)["neutrophil"]
    vals = [y for y in seen[:-1]]   # the last scoring is test's
    assert len(vals) == 2 and all(len(y) == n_val - counts(shards, "val")["neutrophil"] + want for y in vals)
    assert all(int((y == classes.index("neutrophil")).sum()) == want for y in vals)
    row = json.loads((out / "results.json").read_text())["rows"][0]
    assert row["val_cut"] == {"neutrophil": want}
    (out / "results.json").unlink()
    assert main([a for a in args if a != "cut_val=true"]) == EXIT_BAD_INPUT   # another val: refused on resume


def test_a_refit_resumes_exactly_and_refuses_what_its_source_did_not_run(shards, tmp_path, monkeypatch):
    """A refit resumed from its step-8 checkpoint ends with the uninterrupted refit's weights. Refused before any
    training, each with a one-line error: another lr than the source's, a source with no results, a refit as a
    source, a plateau source from before runs kept their decay steps, and a scarce cut."""
    src = plateau_source(monkeypatch, shards, tmp_path / "src")
    plant_val_curve(monkeypatch, shards, [])
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    refit = [*PLATEAU, f"refit_from={src}"]
    assert main(overrides(shards, straight, *refit, "ckpt_every=8")) == EXIT_OK
    as_if_stopped_at(straight, resumed, 8)
    assert main(overrides(shards, resumed, *refit, "ckpt_every=8")) == EXIT_OK
    a, _ = load_latest(straight, required=CKPT_KEYS)
    b, _ = load_latest(resumed, required=CKPT_KEYS)
    assert a["step"] == b["step"] == 16 and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])

    def refused(*extra, src_dir=src) -> bool:
        out = tmp_path / f"bad-{len(list(tmp_path.iterdir()))}"
        code = main(overrides(shards, out, *PLATEAU, f"refit_from={src_dir}", *extra))
        return code == EXIT_BAD_INPUT and not list_checkpoints(out)
    assert refused("lr=0.002")
    assert refused(src_dir=tmp_path / "nothing-here")
    assert refused(src_dir=straight)
    assert refused("scarce={a: 2}")
    other_ranks = tmp_path / "other-ranks"
    shutil.copytree(src, other_ranks)
    config = (other_ranks / "config.yaml").read_text()
    assert "world_size: 1\n" in config
    (other_ranks / "config.yaml").write_text(config.replace("world_size: 1\n", "world_size: 2\n"))
    assert refused(src_dir=other_ranks)   # another global batch: its best step is another amount of training
    old = tmp_path / "old"
    shutil.copytree(src, old)
    doc = json.loads((old / "results.json").read_text())
    del doc["lr_decay_steps"]
    (old / "results.json").write_text(json.dumps(doc))
    assert refused(src_dir=old)


def test_test_time_augmentation_averages_the_eight_views_known_answer(shards, tmp_path):
    """A planted net that only looks at the top-left pixel: one bright top-left pixel is class 0 by itself, but
    the pixel sits top-left in only 2 of the 8 flips and rotations, so the averaged softmax says class 1."""
    from hpcgan.classify.run import dihedral_views, predict

    class TopLeft(torch.nn.Module):
        def forward(self, x):
            v = x[:, :, 0, 0].mean(1)
            return torch.stack([10 * v, torch.zeros_like(v)], 1)

    x = -torch.ones(1, 3, 4, 4)
    x[..., 0, 0] = 1
    views = dihedral_views(x)
    assert len(views) == 8 and sum(bool(v[0, 0, 0, 0] == 1) for v in views) == 2
    assert len({tuple(v.flatten().tolist()) for v in dihedral_views(torch.arange(16.).view(1, 1, 4, 4))}) == 8
    assert predict(TopLeft(), x).tolist() == [0] and predict(TopLeft(), x, tta=True).tolist() == [1]



def test_a_run_with_tta_scores_val_and_test_with_it_and_resumes_only_with_it(shards, tmp_path, monkeypatch):
    import hpcgan.classify.run as run_mod
    seen, real = [], run_mod.predict
    monkeypatch.setattr(run_mod, "predict", lambda net, x, tta=False: seen.append(tta) or real(net, x, tta))
    out = tmp_path / "run"
    assert main(overrides(shards, out, "steps=4", "eval_every=2", "tta=true")) == EXIT_OK
    assert seen and all(seen)            # every val scoring (selection) and the test score
    doc = json.loads((out / "results.json").read_text())
    assert doc["settings"]["tta"] is True and doc["rows"][0]["tta"] is True
    assert main(overrides(shards, out, "steps=4", "eval_every=2")) == EXIT_BAD_INPUT   # tta: false differs


def test_a_checkpoint_from_before_a_setting_existed_resumes_with_its_default(shards, tmp_path):
    """A classifier checkpointed before `tta` and the regime axis `prior` existed (its config has no such keys)
    continues as tta=false, prior=all."""
    out = tmp_path / "run"
    assert main(overrides(shards, out, "steps=4", "eval_every=2", "ckpt_every=2")) == EXIT_OK
    for path in list_checkpoints(out):
        state = torch.load(path, map_location="cpu", weights_only=False)
        del state["config"]["tta"]
        del state["config"]["regime_axes"]["prior"]
        torch.save(state, path)
    (out / "results.json").unlink()      # not finished: the rerun loads the checkpoint and scores it
    assert main(overrides(shards, out, "steps=4", "eval_every=2", "ckpt_every=2")) == EXIT_OK
    assert (out / "results.json").is_file()
    (out / "results.json").unlink()
    assert main(overrides(shards, out, "steps=4", "eval_every=2", "ckpt_every=2", "tta=true")) == EXIT_BAD_INPUT
