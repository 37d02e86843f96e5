"""The shard format every stage shares (DESIGN.md, "Shards").

A shard set is a directory with
  {split}-{NNNNNN}.tar   WebDataset tars; per sample three members with the same key:
                           {key}.png|.jpg  the encoded RGB image
                           {key}.label     the 12-class label, 8 bytes little-endian int64 (DALI reads it
                                           with dtypes=INT64; webdataset gives raw bytes)
                           {key}.json      metadata: source, source_label, fine, class, path, sha256,
                                           synthetic (bool), and whatever the producer adds
  {split}-{NNNNNN}.idx   DALI index beside each tar (wds2idx format v1.2)
  manifest.json          format, classes (label order), image_size, counts per split and class, shards
                         per split with checksums (checked by write_manifest), plus what the producer adds
                         (synthetic, settings, taxonomy, provenance)
Tar members carry fixed mtime/owner/mode so the same samples give byte-identical tars.
"""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hpcgan.jsonfile import dumps, write_json

SPLITS = ("train", "val", "test")
IMAGE_EXTS = ("png", "jpg")
NO_TRAINING_IMAGES = "no training images"   # how a class a run never trained on is labelled (grids, warnings)


def unseen_classes(counts: dict[str, int] | None, classes) -> list[str]:
    """The classes (in the given order) a run had no training image of; [] when the counts are unknown."""
    return [] if counts is None else [c for c in classes if counts.get(c, 0) == 0]
MANIFEST = "manifest.json"
FORMAT = 1                    # manifest format; bump when a reader could misread an older one


def encode_label(label: int) -> bytes:
    return np.array([label], dtype="<i8").tobytes()


def decode_label(raw: bytes) -> int:
    return int(np.frombuffer(raw, dtype="<i8")[0])


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_idx(tar_path: Path, idx_path: Path) -> None:
    """DALI's index (same format as the bundled `wds2idx`): one line per sample,
    'ext offset size name' for each member, offsets of the member data in the tar."""
    samples: list[list[tuple[str, int, int, str]]] = []
    last_key = None
    with tarfile.open(tar_path, "r:") as tf:
        for m in tf:
            if not m.isfile():
                continue
            key, ext = m.name.split(".", 1)
            if key != last_key:
                samples.append([])
                last_key = key
            samples[-1].append((ext, m.offset_data, m.size, m.name))
    lines = [f"v1.2 {len(samples)}"]
    for comps in samples:
        lines.append(" ".join(f"{ext} {off} {size} {name}" for ext, off, size, name in comps))
    idx_path.write_text("\n".join(lines) + "\n")


def _add_member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    ti.mtime = 0
    ti.mode = 0o644
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    tf.addfile(ti, io.BytesIO(data))


@dataclass
class ShardWriter:
    """Writes one split's samples into `{split}-NNNNNN.tar` (+ .idx) of at most `shard_size` samples,
    numbered from `first` (so several writers can each write some of one split's shards)."""

    out_dir: Path
    split: str
    shard_size: int = 1000
    first: int = 0
    shards: list[dict] = field(default_factory=list)
    _tf: tarfile.TarFile | None = None
    _n_in_shard: int = 0

    def __post_init__(self):
        self.out_dir = Path(self.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)

    def _open(self):
        name = f"{self.split}-{self.first + len(self.shards):06d}.tar"
        self._tf = tarfile.open(self.out_dir / name, "w", format=tarfile.GNU_FORMAT)
        self.shards.append({"name": name, "count": 0})
        self._n_in_shard = 0

    def _finish(self):
        if self._tf is None:
            return
        self._tf.close()
        self._tf = None
        info = self.shards[-1]
        tar = self.out_dir / info["name"]
        idx = tar.with_suffix(".idx")
        write_idx(tar, idx)
        info["count"] = self._n_in_shard
        info["sha256"] = sha256_file(tar)
        info["idx"] = idx.name
        info["idx_sha256"] = sha256_file(idx)

    def write(self, key: str, image: bytes, ext: str, label: int, meta: dict) -> None:
        if "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} must not contain '.' or '/'")
        if ext not in IMAGE_EXTS:
            raise ValueError(f"image extension {ext!r} not in {IMAGE_EXTS}")
        if self._tf is None or self._n_in_shard >= self.shard_size:
            self._finish()
            self._open()
        _add_member(self._tf, f"{key}.{ext}", image)
        _add_member(self._tf, f"{key}.label", encode_label(label))
        _add_member(self._tf, f"{key}.json", dumps(meta, sort_keys=True).encode())
        self._n_in_shard += 1

    def close(self) -> list[dict]:
        self._finish()
        return self.shards

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self.close()
        elif self._tf is not None:
            self._tf.close()


def shard_paths(shard_dir: str | Path, split: str) -> list[Path]:
    paths = sorted(Path(shard_dir).glob(f"{split}-[0-9][0-9][0-9][0-9][0-9][0-9].tar"))
    return paths


class ManifestError(ValueError):
    """A manifest that breaks the shard-set contract; the message names the field."""


def write_manifest(shard_dir: str | Path, manifest: dict) -> dict:
    """Check the contract fields of `manifest`, fill in `format`, write `shard_dir`/manifest.json atomically
    and return what was written. Contract: classes (unique names, label order), image_size (one of
    hpcgan.images.IMAGE_SIZES), counts {split: {class: n}} and shards {split: [{"name", "count", ...}]}
    whose counts add up to the split's. Other fields are the producer's (e.g. synthetic, settings)."""
    manifest = {"format": FORMAT, **manifest}
    _check_manifest(manifest)
    write_json(Path(shard_dir) / MANIFEST, manifest)
    return manifest


def _check_manifest(m: dict) -> None:
    from hpcgan.images import check_image_size
    if m["format"] != FORMAT:
        raise ManifestError(f"format={m['format']!r}: this version writes format {FORMAT}")
    missing = [k for k in ("classes", "image_size", "counts", "shards") if k not in m]
    if missing:
        raise ManifestError(f"manifest lacks {', '.join(missing)}")
    classes = m["classes"]
    if not classes or not all(isinstance(c, str) and c for c in classes) or len(set(classes)) != len(classes):
        raise ManifestError(f"classes={classes!r}: give a non-empty list of unique class names in label order")
    try:
        check_image_size(m["image_size"])
    except ValueError as e:
        raise ManifestError(str(e)) from None
    for split, per_class in m["counts"].items():
        unknown = sorted(set(per_class) - set(classes))
        if unknown or any(not isinstance(n, int) or n < 0 for n in per_class.values()):
            raise ManifestError(f"counts[{split!r}]={per_class!r}: give a count >= 0 per class of `classes`")
    for split, shards in m["shards"].items():
        if any(not {"name", "count"} <= set(s) for s in shards):
            raise ManifestError(f"shards[{split!r}]: every shard needs a name and a count")
        listed, counted = sum(s["count"] for s in shards), sum(m["counts"].get(split, {}).values())
        if listed != counted:
            raise ManifestError(f"shards[{split!r}] hold {listed} samples but counts[{split!r}] add up to {counted}")


def read_manifest(shard_dir: str | Path) -> dict:
    path = Path(shard_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no manifest; is {shard_dir} a shard directory written by tools/shard.py?")
    return json.loads(path.read_text())


def iter_samples(shard_dir: str | Path, split: str):
    """Plain sequential read of a split (no DALI, no torch): yields (key, image_bytes, ext, label, meta)."""
    for tar in shard_paths(shard_dir, split):
        with tarfile.open(tar, "r:") as tf:
            cur: dict = {}
            for m in tf:
                key, ext = m.name.split(".", 1)
                if cur and cur["key"] != key:
                    yield _finish_sample(cur)
                    cur = {}
                cur["key"] = key
                cur[ext] = tf.extractfile(m).read()
            if cur:
                yield _finish_sample(cur)


def _finish_sample(cur: dict):
    ext = next(e for e in IMAGE_EXTS if e in cur)
    return cur["key"], cur[ext], ext, decode_label(cur["label"]), json.loads(cur["json"])
