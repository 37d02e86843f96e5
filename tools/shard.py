#!/usr/bin/env python
"""Build WebDataset shards from cell-image sources.

    python tools/shard.py pbc=/data/PBC_dataset_normal_DIB aml=/data/AML-Cytomorphology_LMU \
        lab=/data/our_cells out=shards/real128 size=128

Settings and what they mean: configs/shard.yaml. Exit status: 0 built, 2 bad input (nothing written).
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

from hpcgan import CONFIG_DIR  # noqa: E402
from hpcgan.data.build import BuildError, build, summary_line  # noqa: E402

logger = logging.getLogger("shard")


@hydra.main(config_path=str(CONFIG_DIR), config_name="shard", version_base=None)
def main(cfg: DictConfig) -> None:
    logging.basicConfig(level=cfg.log_level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    sources = {name: to_absolute_path(str(cfg[name])) for name in ("pbc", "aml", "lab") if cfg[name]}
    if OmegaConf.is_missing(cfg, "out"):
        print("shard: error: no output directory: pass out=DIR", file=sys.stderr)
        sys.exit(2)
    out = to_absolute_path(str(cfg.out))
    try:
        manifest = build(sources, out, size=cfg.size, seed=cfg.seed, shard_size=cfg.shard_size,
                         stain=cfg.stain, encoding=cfg.encoding, quality=cfg.quality, near_dup=cfg.near_dup,
                         min_size=cfg.min_size, on_bad=cfg.on_bad, workers=cfg.workers, progress=cfg.progress,
                         contact_sheet=cfg.contact_sheet,
                         taxonomy=to_absolute_path(str(cfg.taxonomy)) if cfg.taxonomy else None)
    except BuildError as e:
        print(f"shard: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(summary_line(manifest, out))


if __name__ == "__main__":
    main()
