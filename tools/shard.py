#!/usr/bin/env python
"""Build WebDataset shards from cell-image sources.

    python tools/shard.py pbc=/data/PBC_dataset_normal_DIB aml=/data/AML-Cytomorphology_LMU \
        lab=/data/our_cells out=shards/real128 size=128

Settings and what they mean: configs/shard.yaml. Exit status: 0 built, 2 bad input (nothing written).
"""
from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path

import hydra
from hydra.utils import to_absolute_path
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

from hpcgan import CONFIG_DIR  # noqa: E402
from hpcgan.data.build import BuildError, ShardSettings, build_shards, summary_line  # noqa: E402
from hpcgan.settings import exit_on_error, parse  # noqa: E402


@hydra.main(config_path=str(CONFIG_DIR), config_name="shard", version_base=None)
def main(cfg: DictConfig) -> None:
    with exit_on_error("shard", BuildError):
        s = parse(ShardSettings, cfg)
        logging.basicConfig(level=s.log_level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
        paths = {k: to_absolute_path(getattr(s, k)) for k in ("pbc", "aml", "lab", "out", "taxonomy") if getattr(s, k)}
        s = dataclasses.replace(s, **paths)   # relative to where the command was run
        manifest = build_shards(s)
    print(summary_line(manifest, s.out))


if __name__ == "__main__":
    main()
