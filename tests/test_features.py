"""Feature extractors of the evaluation: the trained `cell` network, Inception-v3 and LPIPS from staged files,
the staging command, and torch-fidelity computing its metrics with our network.

No pretrained weights exist here (no internet): the Inception/LPIPS tests build weights files from randomly
initialised layers to check loading and shapes only (their names say so); no metric is read from them."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hpcgan.data.shards import MANIFEST, read_manifest, sha256_file
from hpcgan.metrics import weights
from hpcgan.metrics.cell import (cell_extractor_path, ensure_cell_extractor, load_split, CellTrainSettings,
                                 train_cell_extractor)
from hpcgan.metrics.extractor import resize_u8
from hpcgan.metrics.features import extract_all, load_extractor, register_with_torch_fidelity
from hpcgan.metrics.lpips import load_lpips, load_lpips_module, lpips_diversity

REPO = Path(__file__).resolve().parents[1]
TRAIN = dict(epochs=30, batch_size=16, device="cpu", backend="webdataset", num_threads=1, progress=False)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def shards(simulated_shards) -> Path:
    return simulated_shards(0.3)


@pytest.fixture(scope="module")
def trained(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("cell") / "cell.pt"
    info = train_cell_extractor(shards, out, seed=0, **TRAIN)  # ~130 images: small batches, more steps
    return out, info


def split_u8(shards, split):
    s = CellTrainSettings(backend="webdataset", num_threads=1)
    return load_split(shards, split, s, torch.device("cpu"))


# ---- the cell extractor -----------------------------------------------------------------------------------

def test_cell_extractor_learns_the_classes_and_records_its_data(shards, trained):
    path, info = trained
    man = read_manifest(shards)
    classes = man["classes"]
    # chance: 1/12; always naming the largest val class: ~0.26 (seeds 0-4 give 0.74-0.89 here)
    assert info["val_accuracy"] >= 0.6 and info["val_accuracy"] > 2 * info["val_chance"]
    blob = torch.load(path, map_location="cpu", weights_only=True)
    assert blob["format"] == 1 and blob["arch"]["name"] == "cellcnn"
    assert blob["manifest_sha256"] == sha256_file(shards / MANIFEST)
    assert blob["classes"] == classes and blob["image_size"] == 32
    assert blob["val_accuracy"] == info["val_accuracy"] and info["sha256"] == sha256_file(path)


def test_same_seed_gives_bit_identical_weights(shards, trained, tmp_path):
    path, info = trained
    again = train_cell_extractor(shards, tmp_path / "again.pt", seed=0, **TRAIN)
    a = torch.load(path, weights_only=True)["state_dict"]
    b = torch.load(again["path"], weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert again["val_accuracy"] == info["val_accuracy"]


def test_loaded_extractor_reproduces_the_recorded_accuracy(shards, trained):
    path, info = trained
    ex = load_extractor("cell", path=path)
    x, y = split_u8(shards, "val")
    feats, logits = ex.extract(x)
    assert feats.shape == (len(x), 256) and logits.shape == (len(x), 12) and feats.dtype == torch.float32
    assert (ex.name, ex.dim, ex.num_classes, ex.input_size) == ("cell", 256, 12, 32)
    assert ex.sha256 == info["sha256"] and ex.classes == read_manifest(shards)["classes"]
    # the extractor's preprocessing is the training's: same accuracy as recorded
    assert float((logits.argmax(1) == y).float().mean()) == pytest.approx(info["val_accuracy"], abs=1e-6)
    f2, l2 = ex(x)  # torch-fidelity's forward: the same tuple
    assert torch.equal(f2, feats) and torch.equal(l2, logits)


def test_cell_extractor_resizes_larger_inputs(shards, trained):
    from hpcgan.metrics.cell import to_input
    ex = load_extractor("cell", path=trained[0])
    x, _ = split_u8(shards, "val")
    x64 = x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # every pixel doubled
    f64, l64 = ex.extract(x64)
    assert f64.shape == (len(x), 256) and l64.shape == (len(x), 12)
    assert torch.allclose(f64, ex.net.features(to_input(x64, 32)), atol=1e-5)


def test_resize_is_antialiased_bilinear():
    """Halving a pixel-doubled image: plain bilinear would return the original exactly; the antialiased
    (triangle filter over 4 input pixels: 1/8, 3/8, 3/8, 1/8) one blurs it by a known amount."""
    cols = torch.tensor([0, 40, 80, 200, 120, 10, 250, 60], dtype=torch.float64)
    img = cols.repeat(3, 8, 1).to(torch.uint8)[None]  # [1, 3, 8, 8], constant down each column
    big = img.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    small = resize_u8(big, 8)[0, 0, 0].double()
    want = 0.75 * cols[1:-1] + 0.125 * (cols[:-2] + cols[2:])
    assert torch.allclose(small[1:-1], want, atol=1e-3)
    assert torch.equal(resize_u8(img, 8), img.float())  # the input size: untouched
    flat = torch.full((2, 3, 50, 50), 77, dtype=torch.uint8)
    assert torch.allclose(resize_u8(flat, 32), torch.full((2, 3, 32, 32), 77.0), atol=1e-4)  # weights sum to 1


def test_ensure_cell_extractor_trains_once_per_manifest(shards, tmp_path, caplog):
    cache = tmp_path / "cache"
    caplog.set_level("INFO", logger="hpcgan.metrics.cell")
    path, trained_now = ensure_cell_extractor(shards, cache, epochs=1, device="cpu", backend="webdataset",
                                              num_threads=1, progress=False)
    assert trained_now and path == cell_extractor_path(shards, cache) and path.is_file()
    assert path.name == f"cell-{sha256_file(shards / MANIFEST)[:16]}-32.pt"
    assert "training a cell feature extractor" in caplog.text and str(path) in caplog.text
    stamp = path.stat().st_mtime_ns
    again, trained_now = ensure_cell_extractor(shards, cache, epochs=1, progress=False)
    assert (again, trained_now) == (path, False) and path.stat().st_mtime_ns == stamp

    other = tmp_path / "other"
    shutil.copytree(shards, other)
    man = json.loads((other / MANIFEST).read_text())
    man["note"] = "rebuilt"
    (other / MANIFEST).write_text(json.dumps(man))
    assert cell_extractor_path(other, cache) != path


def test_train_features_tool(shards, tmp_path):
    out = tmp_path / "cell.pt"
    r = subprocess.run([sys.executable, str(REPO / "tools" / "train_features.py"), f"shards={shards}", f"out={out}",
                        "epochs=1", "progress=false", "backend=webdataset", "num_threads=1", "device=cpu"],
                       text=True, capture_output=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert "val accuracy" in r.stdout and f"sha256 {sha256_file(out)}" in r.stdout
    r = subprocess.run([sys.executable, str(REPO / "tools" / "train_features.py"), f"shards={shards}", f"out={out}",
                        "epochs=0"], text=True, capture_output=True, timeout=60)
    assert r.returncode == 2 and r.stderr.strip() == "train_features: error: epochs=0: must be >= 1"


def test_yaml_documents_the_dataclass_defaults():
    import yaml
    from omegaconf import OmegaConf
    from hpcgan.metrics.cell import TrainFeaturesSettings
    documented = yaml.safe_load((REPO / "configs" / "train_features.yaml").read_text())
    documented.pop("hydra"), documented.pop("defaults")
    assert documented == OmegaConf.to_container(OmegaConf.structured(TrainFeaturesSettings))


def test_unknown_cell_file_is_refused(trained, tmp_path):
    blob = torch.load(trained[0], weights_only=True)
    torch.save({**blob, "format": 2}, tmp_path / "future.pt")
    with pytest.raises(ValueError, match="format 2.*reads format 1"):
        load_extractor("cell", path=tmp_path / "future.pt")
    torch.save({**blob, "arch": {**blob["arch"], "name": "resnet"}}, tmp_path / "arch.pt")
    with pytest.raises(ValueError, match="unknown cell extractor architecture"):
        load_extractor("cell", path=tmp_path / "arch.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="not a cell extractor file"):
        load_extractor("cell", path=tmp_path / "junk.pt")
    with pytest.raises(ValueError, match="cell, inception"):
        load_extractor("clip")


# ---- torch-fidelity with our network ----------------------------------------------------------------------

class U8Dataset(torch.utils.data.Dataset):
    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


def test_torch_fidelity_computes_fid_and_is_with_the_cell_network(shards, trained):
    import torch_fidelity
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_isc import isc_features_to_metric
    ex = load_extractor("cell", path=trained[0])
    name = register_with_torch_fidelity(ex)
    assert name == f"hpcgan-cell-{ex.sha256[:8]}" and register_with_torch_fidelity(ex) == name
    real, _ = split_u8(shards, "train")
    fake, _ = split_u8(shards, "test")
    bs = 32
    tf = torch_fidelity.calculate_metrics(input1=U8Dataset(fake), input2=U8Dataset(real), fid=True, isc=True,
                                          feature_extractor=name, cuda=False, batch_size=bs, save_cpu_ram=True,
                                          cache=False, verbose=False, isc_splits=2)
    f_fake, l_fake = extract_all(ex, fake.split(bs), progress=False)
    f_real, _ = extract_all(ex, real.split(bs), progress=False)
    assert f_fake.shape == (len(fake), 256) and f_fake.dtype == np.float32 and l_fake.shape == (len(fake), 12)
    ours = fid_statistics_to_metric(fid_features_to_statistics(torch.from_numpy(f_fake)),
                                    fid_features_to_statistics(torch.from_numpy(f_real)), False)
    fid = ours["frechet_inception_distance"]
    assert fid > 0 and tf["frechet_inception_distance"] == pytest.approx(fid, rel=1e-3)
    isc = isc_features_to_metric(torch.from_numpy(l_fake), splits=2, shuffle=True, rng_seed=2020)
    assert tf["inception_score_mean"] == pytest.approx(isc["inception_score_mean"], rel=1e-3)


# ---- staged weights ---------------------------------------------------------------------------------------

def test_missing_weights_name_the_path_and_the_staging_command(tmp_path, monkeypatch):
    monkeypatch.setenv("HPCGAN_WEIGHTS", str(tmp_path / "env"))
    assert weights.weights_dir() == tmp_path / "env"
    assert weights.weights_dir(tmp_path / "given") == tmp_path / "given"
    with pytest.raises(weights.MissingWeightsError) as e:
        load_extractor("inception")
    msg = str(e.value)
    assert str(tmp_path / "env" / weights.STAGED["inception"]["file"]) in msg
    assert "tools/stage_weights.py inception" in msg and "HPCGAN_WEIGHTS" in msg
    with pytest.raises(weights.MissingWeightsError, match="tools/stage_weights.py lpips_alex") as e:
        load_lpips("alex", weights_dir=tmp_path / "w")
    assert str(tmp_path / "w" / "alexnet-owt-7be5be79.pth") in str(e.value)
    assert isinstance(e.value, FileNotFoundError)


def run_stage(*args):
    return subprocess.run([sys.executable, str(REPO / "tools" / "stage_weights.py"), *args, "progress=false"],
                          text=True, capture_output=True, timeout=60)


def test_stage_weights_refuses_unknown_names_and_wrong_files(tmp_path):
    r = run_stage("incpetion", f"weights_dir={tmp_path}")
    assert r.returncode == 2 and "unknown weights name 'incpetion'" in r.stderr and "inception" in r.stderr
    wrong = tmp_path / "wrong.pth"
    wrong.write_bytes(b"certainly not inception")
    r = run_stage("inception", f"weights_dir={tmp_path / 'w'}", f"from={wrong}")
    assert r.returncode == 2 and "not the inception weights file" in r.stderr and "6726825d" in r.stderr
    assert list((tmp_path / "w").iterdir()) == []  # nothing staged, no temporary left
    r = run_stage("inception", "lpips_alex", f"from={wrong}")
    assert r.returncode == 2 and "exactly one" in r.stderr


def test_stage_weights_copies_and_verifies_a_local_file(tmp_path, monkeypatch, capsys):
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import stage_weights
    finally:
        sys.path.remove(str(REPO / "tools"))
    src = tmp_path / "download.bin"
    src.write_bytes(b"weights" * 1000)
    monkeypatch.setitem(weights.STAGED, "testfile", {"file": "test-1234.bin", "url": "https://example.invalid/x",
                                                      "sha256": sha256_file(src), "what": "a test file"})
    dest = tmp_path / "staged"
    assert stage_weights.main(["testfile", f"weights_dir={dest}", f"from={src}", "progress=false"]) == 0
    out = capsys.readouterr().out
    assert f"staged testfile -> {dest / 'test-1234.bin'}" in out and f"HPCGAN_WEIGHTS={dest}" in out
    assert (dest / "test-1234.bin").read_bytes() == src.read_bytes()
    assert weights.require("testfile", dest) == dest / "test-1234.bin"
    src.write_bytes(b"tampered")
    with pytest.raises(ValueError, match="not the testfile weights file"):
        weights.stage("testfile", dest, source=src, progress=False)
    assert (dest / "test-1234.bin").read_bytes() == b"weights" * 1000  # the good file stays


def _random_inception_file(path: Path) -> Path:
    """An Inception-v3 weights file from randomly initialised layers: for loading plumbing only."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Untrained(FeatureExtractorInceptionV3):
        def load_state_dict(self, *a, **k):  # skip loading: keep the random initialisation
            return None

    torch.save({}, path)
    torch.save(Untrained("x", ["2048"], feature_extractor_weights_path=str(path)).state_dict(), path)
    return path


def test_inception_loading_plumbing_with_random_weights(tmp_path, caplog):
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x
    path = _random_inception_file(tmp_path / "random-inception.pth")
    ex = load_extractor("inception", path=path)
    assert "not the published inception weights file" in caplog.text
    assert (ex.name, ex.dim, ex.num_classes, ex.input_size, ex.sha256) == ("inception", 2048, 1008, 299,
                                                                           sha256_file(path))
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    feats, logits = ex.extract(x)
    assert feats.shape == (2, 2048) and logits.shape == (2, 1008)
    # our resize hands torch-fidelity 299 px images, which its TF1-style resize leaves as they are
    big = torch.randint(0, 256, (1, 3, 299, 299), dtype=torch.uint8)
    same = interpolate_bilinear_2d_like_tensorflow1x(big.float(), size=(299, 299), align_corners=False)
    assert torch.equal(same, big.float())
    # at the staged location a file must pass the published hash
    staged = tmp_path / "w" / weights.STAGED["inception"]["file"]
    staged.parent.mkdir()
    shutil.copyfile(path, staged)
    with pytest.raises(ValueError, match="6726825d"):
        load_extractor("inception", weights_dir=tmp_path / "w")


def test_lpips_loading_plumbing_with_random_backbone(tmp_path):
    import lpips as lpips_pkg
    import torchvision
    backbone = tmp_path / "random-alexnet.pth"
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), backbone)
    distance = load_lpips("alex", path=backbone)
    # the calibrated linear layers come from the lpips package, the backbone from our file
    lin = torch.load(Path(lpips_pkg.__file__).parent / "weights/v0.1/alex.pth", map_location="cpu", weights_only=True)
    mod = load_lpips_module("alex", path=backbone)
    assert torch.equal(mod.lin0.model[1].weight, lin["lin0.model.1.weight"])
    assert torch.equal(mod.net.slice1[0].weight, torch.load(backbone, weights_only=True)["features.0.weight"])
    a = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    b = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    d = distance(a, b)
    assert d.shape == (3,) and (d > 0).all()
    assert torch.equal(distance(a, a), torch.zeros(3))
    assert torch.allclose(distance(b, a), d, rtol=1e-5)


def test_lpips_diversity_known_answers():
    def mean_abs(a, b):  # a stand-in distance with answers known by hand
        return (a.float() - b.float()).abs().mean(dim=(1, 2, 3))

    img = lambda v: torch.full((3, 4, 4), v, dtype=torch.uint8)  # noqa: E731
    images = torch.stack([img(10), img(40), img(7), img(7), img(7), img(200)])
    labels = [0, 0, 1, 1, 1, 3]
    out = lpips_diversity(images, labels, mean_abs, ["a", "b", "c", "d"], pairs_per_class=20)
    assert out["per_class"]["a"] == pytest.approx(30.0)  # every pair is (10, 40) or (40, 10)
    assert out["per_class"]["b"] == 0.0                   # identical images
    assert np.isnan(out["per_class"]["c"]) and np.isnan(out["per_class"]["d"])  # 0 and 1 image
    assert out["mean"] == pytest.approx(15.0)
    again = lpips_diversity(images, labels, mean_abs, ["a", "b", "c", "d"], pairs_per_class=20)
    assert json.dumps(again) == json.dumps(out)  # (nan != nan in a plain comparison)
