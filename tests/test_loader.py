"""make_loader: both backends, rank partition, determinism, resume, balance, flips, errors.

Fixture shards are tiny random 32x32 images written with ShardWriter, so every image is distinct and a
hash of the decoded uint8 pixels identifies its sample.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hpcgan.data import loader as loader_mod
from hpcgan.data.loader import make_loader
from hpcgan.data.shards import ShardWriter, write_manifest

CLASSES = [f"class{i}" for i in range(12)]
HAVE_DALI = loader_mod.dali_available()[0]
BACKENDS = ["webdataset", pytest.param("dali", marks=pytest.mark.skipif(not HAVE_DALI, reason="DALI not importable"))]
DALI_MODES = ["index", "reader"]


def write_shards(out: Path, counts: dict[int, int], *, size=32, ext="png", seed=0, split="train",
                 shard_size=17, classes=CLASSES) -> Path:
    rng = np.random.default_rng(seed)
    with ShardWriter(out, split, shard_size) as w:
        k = 0
        for label, n in counts.items():
            for _ in range(n):
                arr = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
                buf = io.BytesIO()
                Image.fromarray(arr).save(buf, format="PNG" if ext == "png" else "JPEG", quality=95)
                w.write(f"s{seed}x{k:05d}", buf.getvalue(), ext, label, {"class": classes[label], "synthetic": False})
                k += 1
    write_manifest(out, {"classes": classes, "image_size": size,
                         "counts": {split: {classes[c]: n for c, n in counts.items()}},
                         "shards": {split: w.shards}, "settings": {"ext": ext}, "synthetic": False})
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_shards(tmp_path_factory.mktemp("shards"), {0: 20, 3: 20, 7: 10})  # 50 samples, 3 shards


@pytest.fixture(scope="module")
def imbalanced(tmp_path_factory) -> Path:
    return write_shards(tmp_path_factory.mktemp("imb"), {0: 60, 1: 4, 2: 16}, seed=1)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    return torch.round(images.cpu() * 127.5 + 127.5).clamp(0, 255).to(torch.uint8).numpy()


def digest(img: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(img).tobytes()).hexdigest()[:16]


def epoch_samples(loader) -> list[tuple[str, int]]:
    out = []
    for images, labels in loader:
        assert images.dtype == torch.float32 and labels.dtype == torch.int64
        assert images.shape == (loader.batch_size, 3, 32, 32) and labels.shape == (loader.batch_size,)
        assert images.min() >= -1 and images.max() <= 1
        out += [(digest(im), int(y)) for im, y in zip(to_uint8(images), labels)]
    return out


def ground_truth(shard_dir: Path) -> Counter:
    loader = make_loader(shard_dir, "train", 1, backend="webdataset", shuffle=False, num_threads=0)
    return Counter(epoch_samples(loader))


@pytest.mark.parametrize("shuffle", [False, True])
def test_backends_give_same_samples(shards, shuffle):
    truth = ground_truth(shards)
    assert len(truth) == 50 and sum(truth.values()) == 50  # all distinct
    wds = epoch_samples(make_loader(shards, "train", 10, backend="webdataset", shuffle=shuffle, num_threads=2))
    assert Counter(wds) == truth
    if HAVE_DALI:
        dali = make_loader(shards, "train", 10, backend="dali", shuffle=shuffle, num_threads=2)
        assert dali.backend == "dali"
        # Both backends execute the same epoch plan, so even the order agrees (PNG decodes exactly).
        assert epoch_samples(dali) == wds
        reader = make_loader(shards, "train", 10, backend="dali", shuffle=shuffle, dali_source="reader")
        assert Counter(epoch_samples(reader)) == truth


def test_attributes(shards):
    loader = make_loader(shards, "train", 8, backend="webdataset")
    assert loader.backend == "webdataset"
    assert loader.num_samples == 50 and loader.classes == CLASSES and loader.image_size == 32
    assert len(loader) == loader.epoch_batches == 7  # ceil(50 / 8), last batch padded


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("backend,mode", [("webdataset", "index"), ("dali", "index"), ("dali", "reader")])
def test_ranks_disjoint_and_cover(shards, world_size, backend, mode):
    if backend == "dali" and not HAVE_DALI:
        pytest.skip("DALI not importable")
    truth = ground_truth(shards)
    per_rank, lengths = [], []
    for rank in range(world_size):
        loader = make_loader(shards, "train", 8, rank, world_size, backend=backend, dali_source=mode, seed=3,
                             num_threads=1)
        lengths.append(len(loader))
        got = epoch_samples(loader)
        assert len(got) == len(loader) * 8
        per_rank.append(got)
    assert len(set(lengths)) == 1, lengths
    all_samples = [s for got in per_rank for s in got]
    assert set(all_samples) == set(truth)  # together they cover the split
    n_pad = len(all_samples) - len(truth)
    assert n_pad < 8 * world_size
    # Disjoint apart from padding: duplicates (within or across ranks) number exactly the padding.
    assert sum(c - 1 for c in Counter(all_samples).values()) == n_pad


@pytest.mark.parametrize("backend", BACKENDS)
def test_order_deterministic_per_seed_and_epoch(shards, backend):
    def order(**kw):
        return [s for s, _ in epoch_samples(make_loader(shards, "train", 5, 1, 2, backend=backend, num_threads=1,
                                                        **kw))]
    a = order(seed=5, epoch=2)
    assert order(seed=5, epoch=2) == a
    assert order(seed=5, epoch=3) != a
    assert order(seed=6, epoch=2) != a


def test_reader_mode_deterministic(shards):
    if not HAVE_DALI:
        pytest.skip("DALI not importable")
    def order(**kw):
        return epoch_samples(make_loader(shards, "train", 5, 0, 2, backend="dali", dali_source="reader", flip=True,
                                         num_threads=2, **kw))
    a = order(seed=1, epoch=0)
    assert order(seed=1, epoch=0) == a
    assert order(seed=1, epoch=1) != a


@pytest.mark.parametrize("backend,mode", [("webdataset", "index"), ("dali", "index"), ("dali", "reader")])
def test_skip_batches_yields_tail(shards, backend, mode):
    if backend == "dali" and not HAVE_DALI:
        pytest.skip("DALI not importable")
    kw = dict(seed=11, epoch=4, flip=True, backend=backend, dali_source=mode, num_threads=1)
    full = epoch_samples(make_loader(shards, "train", 6, 0, 2, **kw))
    for k in (0, 2, 5):
        tail_loader = make_loader(shards, "train", 6, 0, 2, skip_batches=k, **kw)
        assert len(tail_loader) == tail_loader.epoch_batches - k
        assert epoch_samples(tail_loader) == full[k * 6:]
    with pytest.raises(ValueError, match="skip_batches"):
        make_loader(shards, "train", 6, 0, 2, skip_batches=6, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_balance_classes(imbalanced, backend):
    counts = Counter()
    for epoch in range(3):
        loader = make_loader(imbalanced, "train", 16, backend=backend, balance_classes=True, epoch=epoch,
                             num_threads=1)
        assert loader.num_samples == 80 and len(loader) == 5
        counts.update(y for _, y in epoch_samples(loader))
    total = sum(counts.values())
    assert set(counts) == {0, 1, 2}
    for c in (0, 1, 2):  # uniform: 1/3 each (240 draws; the natural share of class 1 would be 5%)
        assert abs(counts[c] / total - 1 / 3) < 0.1, counts


def test_balanced_draws_with_a_real_share_known_answer():
    """Issue 19: classes drawn uniformly; within a class, a draw is real with probability real_share, and each
    group cycles through its members (no member repeats before all were used). Without a share the plan is the
    one balanced sampling always made."""
    labels = np.array([0] * 2 + [1] * 40 + [0] * 6 + [1] * 10)    # class 0: 2 real + 6 synthetic; class 1: 40 + 10
    group = np.array([0] * 42 + [1] * 16, np.int8)
    plan = loader_mod.epoch_plan(np.tile(labels, 400), 64, 0, 1, seed=3, epoch=0, shuffle=True, flip=False,
                                 balance_classes=True, balance_share=(np.tile(group, 400), 0.25))
    drawn = plan.indices % len(labels)
    y, g = labels[drawn], group[drawn]
    for c in (0, 1):
        assert abs((y == c).mean() - 0.5) < 0.02
        assert abs((g[y == c] == 0).mean() - 0.25) < 0.02, (c, (g[y == c] == 0).mean())
    old = loader_mod.epoch_plan(labels, 8, 0, 1, seed=3, epoch=1, shuffle=True, flip=False, balance_classes=True)
    new = loader_mod.epoch_plan(labels, 8, 0, 1, seed=3, epoch=1, shuffle=True, flip=False, balance_classes=True,
                                balance_share=None)
    assert (old.indices == new.indices).all()
    # each group is a cycle: over 2 x 2 draws the 2 real images of class 0 are each used twice
    rng = np.random.default_rng(1)
    small = loader_mod._balanced_order(labels, 400, rng, (group, 0.5))
    real0 = Counter(int(i) for i in small if labels[i] == 0 and group[i] == 0)
    assert set(real0) == {0, 1} and abs(real0[0] - real0[1]) <= 1, real0


@pytest.mark.parametrize("backend", BACKENDS)
def test_flip_mirrors_some_images(shards, backend):
    truth = {s for s, _ in ground_truth(shards)}
    loader = make_loader(shards, "train", 10, backend=backend, flip=True, num_threads=1)
    plain = mirrored = 0
    for images, _ in loader:
        for im in to_uint8(images):
            if digest(im) in truth:
                plain += 1
            else:
                assert digest(im[:, :, ::-1]) in truth  # a horizontal mirror of a real sample
                mirrored += 1
    assert plain > 5 and mirrored > 5


def test_mixed_png_and_jpg_dirs(shards, tmp_path):
    jpg = write_shards(tmp_path / "syn", {1: 7, 3: 5}, ext="jpg", seed=9)
    for backend in ["webdataset"] + (["dali"] if HAVE_DALI else []):
        loader = make_loader([shards, jpg], "train", 8, backend=backend, num_threads=1)
        assert loader.num_samples == 62
        labels = Counter(y for _, y in epoch_samples(loader))
        assert labels[1] >= 7 and labels[3] >= 25 and sum(labels.values()) == 64
    if HAVE_DALI:
        reader = make_loader([shards, jpg], "train", 8, backend="dali", dali_source="reader", shuffle=False)
        assert sum(Counter(y for _, y in epoch_samples(reader)).values()) == 64
        # Same plan on both backends: batch by batch the same samples; JPEG decoders (libjpeg-turbo in
        # DALI and in PIL) may round differently, so compare pixels with a tolerance.
        kw = dict(seed=2, flip=True, num_threads=1)
        for (xd, yd), (xw, yw) in zip(make_loader(jpg, "train", 4, backend="dali", **kw),
                                      make_loader(jpg, "train", 4, backend="webdataset", **kw)):
            assert torch.equal(yd, yw)
            assert (xd - xw).abs().max() <= 3 / 127.5


def test_dali_decodes_on_cpu_and_logs_it(shards, caplog):
    if not HAVE_DALI:
        pytest.skip("DALI not importable")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: auto picks mixed decode")
    loader_mod._logged_once.clear()
    with caplog.at_level(logging.INFO, logger="hpcgan.data.loader"):
        loader = make_loader(shards, "train", 8, backend="auto", device="auto")
        images, labels = next(iter(loader))
    assert loader.backend == "dali" and loader.device == "cpu"
    assert images.device.type == "cpu" and labels.device.type == "cpu"
    assert any("decode on cpu" in r.getMessage() for r in caplog.records)


@pytest.mark.skipif(not (HAVE_DALI and torch.cuda.is_available()), reason="needs DALI and a CUDA GPU (mixed decode)")
@pytest.mark.parametrize("source", ["index", "reader"])
def test_dali_mixed_decode_on_gpu_matches_cpu(tmp_path, source):
    """device=cuda: nvJPEG decodes on the GPU and batches arrive on the GPU, with the same samples in the same
    order as the CPU decode and pixels within JPEG decoder rounding of it."""
    jpg = write_shards(tmp_path / "jpg", {0: 20, 1: 12, 2: 8}, ext="jpg", seed=5)
    kw = dict(seed=1, flip=True, num_threads=2, backend="dali", dali_source=source, shuffle=source == "index")
    gpu = make_loader(jpg, "train", 8, device="cuda", **kw)
    cpu = make_loader(jpg, "train", 8, device="cpu", **kw)
    assert gpu.device == "cuda" and cpu.device == "cpu"
    n = 0
    for (xg, yg), (xc, yc) in zip(gpu, cpu):
        assert xg.is_cuda and xg.dtype == torch.float32 and xg.shape == xc.shape
        assert torch.equal(yg.cpu(), yc)
        diff = (xg.cpu() - xc).abs()
        assert diff.mean() < 0.02 and diff.max() <= 0.25  # nvJPEG vs libjpeg-turbo IDCT rounding
        n += xg.shape[0]
    assert n == 40


def test_errors(shards, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        make_loader(tmp_path / "nope", "train", 4)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no manifest"):
        make_loader(tmp_path / "empty", "train", 4)
    with pytest.raises(FileNotFoundError, match="no shards for split 'val'.*train"):
        make_loader(shards, "val", 4)
    with pytest.raises(ValueError, match="batch_size 30 exceeds the samples per rank.*50 samples over 2"):
        make_loader(shards, "train", 30, 0, 2)
    big = write_shards(tmp_path / "big", {0: 3}, size=64, seed=2)
    with pytest.raises(ValueError, match="image size.*32px.*64px"):
        make_loader([shards, big], "train", 4)
    other = write_shards(tmp_path / "other", {0: 3}, seed=3, classes=[f"x{i}" for i in range(12)])
    with pytest.raises(ValueError, match="disagree on classes"):
        make_loader([shards, other], "train", 4)
    with pytest.raises(ValueError, match="backend"):
        make_loader(shards, "train", 4, backend="ffcv")
    with pytest.raises(ValueError, match="rank 2 not in"):
        make_loader(shards, "train", 4, 2, 2)


def test_stale_or_incomplete_shard_set_is_refused(tmp_path):
    d = write_shards(tmp_path / "s", {0: 10, 1: 10}, shard_size=8)  # 3 shards
    assert make_loader(d, "train", 4, backend="webdataset").num_samples == 20
    (d / "train-000002.tar").unlink()
    with pytest.raises(ValueError, match="manifest lists train shards.*incomplete"):
        make_loader(d, "train", 4)
    write_shards(d, {0: 10, 1: 13}, shard_size=8)  # rewritten in place: the index cache must notice
    assert make_loader(d, "train", 4, backend="webdataset").num_samples == 23


ORDER_SCRIPT = """
import hashlib, sys
from hpcgan.data.loader import make_loader
d, backend, rank = sys.argv[1], sys.argv[2], int(sys.argv[3])
h = [hashlib.sha1(x.numpy().tobytes()).hexdigest()[:12]
     for xs, _ in make_loader(d, "train", 5, rank, 2, backend=backend, seed=7, epoch=1, flip=True, num_threads=1)
     for x in xs]
print(" ".join(h))
"""


@pytest.mark.slow
def test_separate_processes_agree_with_in_process_plan(shards):
    """Two real processes as rank 0 and 1 (different hash seeds) reproduce the in-process epoch."""
    import os
    import subprocess
    import sys
    backend = "dali" if HAVE_DALI else "webdataset"
    for rank in (0, 1):
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED=str(100 + rank))
        out = subprocess.run([sys.executable, "-c", ORDER_SCRIPT, str(shards), backend, str(rank)], env=env,
                             capture_output=True, text=True, timeout=120, check=True).stdout.split()
        here = [hashlib.sha1(x.numpy().tobytes()).hexdigest()[:12]
                for xs, _ in make_loader(shards, "train", 5, rank, 2, backend=backend, seed=7, epoch=1, flip=True,
                                         num_threads=1)
                for x in xs]
        assert out == here and len(here) == 25


REAL = Path(__file__).resolve().parents[1].parent / "shared/data/pbc-sample"


@pytest.mark.real_data
@pytest.mark.slow
@pytest.mark.skipif(not REAL.is_dir(), reason=f"{REAL} absent (real PBC sample is not part of the repo)")
def test_real_pbc_sample_shards_load(tmp_path):
    from hpcgan.data.build import build
    manifest = build({"pbc": str(REAL)}, tmp_path / "pbc", size=32, encoding="jpg", workers=2, progress=False)
    n = manifest["totals"]["train"]
    backends = ["webdataset"] + (["dali"] if HAVE_DALI else [])
    seen = {}
    for backend in backends:
        loader = make_loader(tmp_path / "pbc", "train", 16, backend=backend, flip=True, num_threads=2)
        assert loader.num_samples == n and loader.image_size == 32
        labels = torch.cat([y for _, y in loader])
        assert len(labels) == len(loader) * 16 >= n
        seen[backend] = labels
    assert len({tuple(v.tolist()) for v in seen.values()}) == 1  # same plan, same label sequence
    present = {manifest["classes"].index(c) for c, k in manifest["counts"]["train"].items() if k > 0}
    assert set(seen["webdataset"].tolist()) == present


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_file_descriptors_leak_across_epochs(shards, backend):
    import os
    def open_fds():
        return len(os.listdir("/proc/self/fd"))
    for epoch in range(2):  # warm-up: DALI and torch open what they keep for the process lifetime
        list(make_loader(shards, "train", 10, backend=backend, epoch=epoch, num_threads=1))
    before = open_fds()
    for epoch in range(2, 8):
        list(make_loader(shards, "train", 10, backend=backend, epoch=epoch, num_threads=1))
        it = iter(make_loader(shards, "train", 10, backend=backend, epoch=epoch, num_threads=1))
        next(it)
        it.close()  # abandoned mid-epoch, as training does at its last step
    assert open_fds() <= before + 1


STOP_SIGNAL_SCRIPT = r"""
import os, signal, sys, time
from hpcgan.data.loader import make_loader
stopped = []
signal.signal(signal.SIGTERM, lambda *_: stopped.append(1))
print("ready", flush=True)
n = 0
for epoch in range(40):   # a fresh set of workers every epoch: signals land on starting workers too
    for images, labels in make_loader(sys.argv[1], "train", 4, backend="webdataset", num_threads=2, epoch=epoch):
        n += len(labels)
        time.sleep(0.005)
print("done", n, len(stopped) > 0, flush=True)
"""


@pytest.mark.slow
def test_webdataset_workers_survive_stop_signals(shards):
    """Slurm sends SIGTERM to every process of a job step (scancel, preemption); the DataLoader workers must
    leave it to the training process, which checkpoints, instead of dying and failing the run."""
    import signal
    import subprocess
    import sys
    import time
    proc = subprocess.Popen([sys.executable, "-c", STOP_SIGNAL_SCRIPT, str(shards)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.stdout.readline().strip() == "ready"
    for _ in range(30):  # the whole process group, as Slurm does
        time.sleep(0.1)
        if proc.poll() is not None:
            break
        os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    done = out.split()
    expected = 40 * make_loader(shards, "train", 4, backend="webdataset").epoch_batches * 4
    assert done[0] == "done" and int(done[1]) == expected and done[2] == "True", out


def test_several_splits_read_as_one(tmp_path):
    """split=[train, val]: e.g. a GAN that no classifier will be scored with sees val too (issue 10 §2)."""
    d = tmp_path / "two"
    rng = np.random.default_rng(0)
    written = {}
    for split, (label, n) in (("train", (0, 6)), ("val", (1, 4))):
        with ShardWriter(d, split, 5) as w:
            for k in range(n):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="PNG")
                w.write(f"{split}{k:03d}", buf.getvalue(), "png", label, {"class": CLASSES[label]})
        written[split] = w.shards
    write_manifest(d, {"classes": CLASSES, "image_size": 32, "shards": written,
                       "counts": {"train": {CLASSES[0]: 6}, "val": {CLASSES[1]: 4}}})
    syn = write_shards(tmp_path / "syn", {2: 3}, seed=5)  # a synthetic set has only a train split
    for backend in ["webdataset"] + (["dali"] if HAVE_DALI else []):
        both = make_loader(d, ["train", "val"], 1, backend=backend, num_threads=1, shuffle=False)
        assert both.num_samples == 10 and Counter(y for _, y in epoch_samples(both)) == {0: 6, 1: 4}
        mixed = make_loader([d, syn], ["train", "val"], 1, backend=backend, num_threads=1, shuffle=False)
        assert Counter(y for _, y in epoch_samples(mixed)) == {0: 6, 1: 4, 2: 3}
    with pytest.raises(FileNotFoundError, match=r"no shards for split \['val', 'test'\]"):
        make_loader(syn, ["val", "test"], 1, backend="webdataset")
    with pytest.raises(ValueError, match="distinct"):
        make_loader(d, ["train", "train"], 1, backend="webdataset")


def test_an_undecodable_image_is_an_error_and_the_workers_stop_with_it(tmp_path):
    """A bad image in a worker process raises in the caller; a caller that keeps the error (and so the loader's
    frame) still exits: the workers were shut down with the iteration, not left for the interpreter's exit."""
    import subprocess
    import sys
    with ShardWriter(tmp_path, "train", shard_size=100) as w:
        for i in range(8):
            w.write(f"s{i}", b"not an image" if i == 5 else _png(i), "png", 0, {"class": "a"})
    write_manifest(tmp_path, {"classes": ["a"], "image_size": 32, "counts": {"train": {"a": 8}},
                              "shards": {"train": w.shards}})
    code = f"""
from hpcgan.data.loader import make_loader
try:
    for _ in make_loader({str(tmp_path)!r}, "train", 2, shuffle=False, backend="webdataset", device="cpu",
                         num_threads=2):
        pass
except Exception as e:
    kept = e
    print("raised", type(e).__name__, flush=True)
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "raised UnidentifiedImageError" in p.stdout, p.stderr[-2000:]


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()
