#!/usr/bin/env python
"""Train the `cell` feature extractor of the evaluation on a shard set (hpcgan/metrics/cell.py).

    python tools/train_features.py shards=shards/real128 out=weights/cell-real128.pt epochs=60

Settings: hpcgan.metrics.cell.TrainFeaturesSettings (configs/train_features.yaml). Prints the val accuracy
and the file's sha256. Exit status: 0 trained, 2 bad settings or an unusable shard set.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.utils import to_absolute_path
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

from hpcgan import CONFIG_DIR  # noqa: E402
from hpcgan.metrics.cell import TrainFeaturesSettings, train_cell_extractor  # noqa: E402
from hpcgan.settings import exit_on_error, parse  # noqa: E402


@hydra.main(config_path=str(CONFIG_DIR), config_name="train_features", version_base=None)
def main(cfg: DictConfig) -> None:
    with exit_on_error("train_features", FileNotFoundError, ValueError):
        s = parse(TrainFeaturesSettings, cfg)
        logging.basicConfig(level=s.log_level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
        info = train_cell_extractor(to_absolute_path(s.shards), to_absolute_path(s.out), progress=s.progress,
                                    **s.train_settings())
    print(f"cell extractor -> {info['path']}: val accuracy {info['val_accuracy']:.3f} (largest class "
          f"{info['val_chance']:.3f}), train {info['train_accuracy']:.3f}, best epoch {info['best_epoch'] + 1}; "
          f"sha256 {info['sha256']}")


if __name__ == "__main__":
    main()
