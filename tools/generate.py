#!/usr/bin/env python
"""Synthetic, class-balanced data from a trained checkpoint (see hpcgan/generate.py, configs/generate.yaml).

  python tools/generate.py run=runs/x out=synth per_class=100
  python tools/generate.py run=runs/x out=synth balance=max shards=data/shards
"""
import logging

import hydra
from omegaconf import DictConfig

from hpcgan import CONFIG_DIR
from hpcgan.generate import GenerateError, GenerateSettings, write_synthetic
from hpcgan.settings import exit_on_error, parse


@hydra.main(config_path=str(CONFIG_DIR), config_name="generate", version_base=None)
def main(cfg: DictConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with exit_on_error("generate", GenerateError):
        s = parse(GenerateSettings, cfg)
        manifest = write_synthetic(s)
    counts = manifest["counts"].get(s.split, {})
    total = sum(counts.values()) + manifest["unlabelled"]
    print(f"{total} synthetic images ({manifest['weights']} weights, step {manifest['checkpoint']['step']}): "
          + ", ".join(f"{c}={n}" for c, n in counts.items() if n))


if __name__ == "__main__":
    main()
