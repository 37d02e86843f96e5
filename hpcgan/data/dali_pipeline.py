"""DALI execution of a ShardLoader: decode on GPU (`mixed`, nvJPEG) or on CPU, mirror, normalise to [-1, 1].

Two sources feed the same decode stage:

* "index" (default): `fn.external_source` gets each planned batch's encoded bytes (read by offset via
  the .idx files), the labels and the per-sample mirror flags from the loader's epoch plan. The order
  is exactly the plan's, skip_batches costs nothing, and balance_classes works.
* "reader": `fn.readers.webdataset` over the tars + .idx files with `shard_id/num_shards` per rank,
  `pad_last_batch` so every rank yields the same number of batches, reader shuffling seeded from
  (seed, epoch) (the pipeline is rebuilt per epoch), flips from `fn.random.coin_flip`. Deterministic for
  fixed (seed, epoch, rank, world_size, batch_size, num_threads); skip_batches decodes and discards (the
  coin flips stay aligned). Each rank reads a contiguous block of the file order (block (rank + epoch) %
  world_size), shuffled with DALI's buffer of `initial_fill` samples: a shuffle local to that block, not
  the global permutation of the index source.
"""
from __future__ import annotations

import logging

import numpy as np
import torch

logger = logging.getLogger(__name__)


def _seed32(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0] & 0x7FFFFFFF)


def _device_id(device: str):
    return torch.cuda.current_device() if device == "cuda" else None


def _decode_normalise(encoded, mirror, device: str):
    from nvidia.dali import fn, types
    images = fn.decoders.image(encoded, device="mixed" if device == "cuda" else "cpu", output_type=types.RGB)
    # (x - 127.5) / 127.5: 0..255 -> [-1, 1], HWC uint8 -> CHW float32, mirrored where asked.
    return fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW",
                                    mean=[127.5] * 3, std=[127.5] * 3, mirror=mirror)


class _PlanSource:
    """external_source callback: batch i of the remaining plan -> (encoded images, labels, mirror flags)."""

    def __init__(self, loader):
        self.index = loader.index
        self.batches = list(loader.planned_batches())
        self._files: dict = {}

    def __call__(self, iteration: int):
        if iteration >= len(self.batches):
            raise StopIteration
        idx, flips = self.batches[iteration]
        images = [np.frombuffer(self.index.read_image_bytes(int(i), self._files), np.uint8) for i in idx]
        labels = [np.array(self.index.labels[i], np.int64) for i in idx]
        mirror = [np.array(f, np.int32) for f in flips]
        return images, labels, mirror

    def close(self):
        self.index.close_files(self._files)


def _index_pipeline(loader, source: _PlanSource):
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=loader.batch_size, num_threads=max(1, loader.num_threads),
                  device_id=_device_id(loader.device), seed=_seed32(loader.seed, loader.epoch, loader.rank),
                  exec_dynamic=True)
    def pipe():
        encoded, labels, mirror = fn.external_source(source=source, num_outputs=3, batch=True,
                                                     dtype=[types.UINT8, types.INT64, types.INT32])
        images = _decode_normalise(encoded, mirror, loader.device)
        return images, (labels.gpu() if loader.device == "cuda" else labels)

    return pipe()


def _reader_pipeline(loader):
    from nvidia.dali import fn, pipeline_def, types
    index = loader.index
    exts = ";".join(sorted(set(index.ext)))  # "png", "jpg" or "jpg;png" for mixed shard sets

    @pipeline_def(batch_size=loader.batch_size, num_threads=max(1, loader.num_threads),
                  device_id=_device_id(loader.device), seed=_seed32(loader.seed, loader.epoch, loader.rank),
                  exec_dynamic=True)
    def pipe():
        encoded, labels = fn.readers.webdataset(
            paths=[str(t) for t in index.tars], index_paths=[str(t.with_suffix(".idx")) for t in index.tars],
            ext=[exts, "label"], dtypes=[types.UINT8, types.INT64], missing_component_behavior="error",
            shard_id=(loader.rank + loader.epoch) % loader.world_size, num_shards=loader.world_size,
            pad_last_batch=True, stick_to_shard=True, random_shuffle=loader.shuffle,
            initial_fill=min(4096, max(loader.batch_size, len(index))),
            seed=_seed32(loader.seed, loader.epoch), name="Reader")
        mirror = fn.random.coin_flip(probability=0.5, dtype=types.INT32) if loader.flip else 0
        images = _decode_normalise(encoded, mirror, loader.device)
        return images, (labels.gpu() if loader.device == "cuda" else labels)

    return pipe()


def iterate_dali(loader):
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

    if loader.dali_source == "reader":
        pipe = _reader_pipeline(loader)
        pipe.build()
        it = DALIGenericIterator(pipe, ["images", "labels"], reader_name="Reader",
                                 last_batch_policy=LastBatchPolicy.FILL)
        source = None
        to_skip, to_yield = loader.skip_batches, len(loader)
    else:
        source = _PlanSource(loader)
        if not source.batches:
            return
        pipe = _index_pipeline(loader, source)
        pipe.build()
        it = DALIGenericIterator(pipe, ["images", "labels"], size=-1)
        to_skip, to_yield = 0, len(source.batches)
    try:
        n = 0
        for out in it:
            if to_skip:
                to_skip -= 1
                continue
            batch = out[0]
            yield batch["images"], batch["labels"].view(-1)
            n += 1
            if n == to_yield:
                break
        if n < to_yield:  # the reader's own epoch accounting disagrees with batches_per_rank: say so
            raise RuntimeError(f"DALI gave {n + loader.skip_batches} batches on rank {loader.rank}, expected "
                               f"{loader.epoch_batches}; ranks would fall out of step")
    finally:
        del it, pipe
        if source is not None:
            source.close()
