"""The shard format every stage shares (DESIGN.md, "Shards").

A shard set is a directory with
  {split}-{NNNNNN}.tar   WebDataset tars; per sample three members with the same key:
                           {key}.png|.jpg  the encoded RGB image
                           {key}.label     the 12-class label, 8 bytes little-endian int64 (DALI reads it
                                           with dtypes=INT64; webdataset gives raw bytes)
                           {key}.json      metadata: source, source_label, fine, class, path, sha256,
                                           synthetic (bool), and whatever the producer adds
  {split}-{NNNNNN}.idx   DALI index beside each tar (wds2idx format v1.2)
  manifest.json          classes (label order), counts, shards with checksums, settings
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

SPLITS = ("train", "val", "test")
IMAGE_EXTS = ("png", "jpg")
MANIFEST = "manifest.json"


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
    """Writes one split's samples into `{split}-NNNNNN.tar` (+ .idx) of at most `max_count` samples."""

    out_dir: Path
    split: str
    max_count: int = 1000
    shards: list[dict] = field(default_factory=list)
    _tf: tarfile.TarFile | None = None
    _n_in_shard: int = 0

    def __post_init__(self):
        self.out_dir = Path(self.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)

    def _open(self):
        name = f"{self.split}-{len(self.shards):06d}.tar"
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
        if self._tf is None or self._n_in_shard >= self.max_count:
            self._finish()
            self._open()
        _add_member(self._tf, f"{key}.{ext}", image)
        _add_member(self._tf, f"{key}.label", encode_label(label))
        _add_member(self._tf, f"{key}.json", json.dumps(meta, sort_keys=True).encode())
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
