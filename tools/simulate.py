#!/usr/bin/env python
"""Write the embedded simulated dataset (see hpcgan/data/simulate.py, configs/simulate.yaml).

  python tools/simulate.py out=data/sim
  python tools/simulate.py out=data/sim seed=1 scale=0.1 layouts=[pbc,aml]
"""
import dataclasses
import json
import logging

import hydra
from omegaconf import DictConfig

from hpcgan import CONFIG_DIR
from hpcgan.data.simulate import SimulateSettings, simulate
from hpcgan.settings import exit_on_error, parse


@hydra.main(config_path=str(CONFIG_DIR), config_name="simulate", version_base=None)
def main(cfg: DictConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with exit_on_error("simulate", ValueError):
        summary = simulate(**dataclasses.asdict(parse(SimulateSettings, cfg)))
    width = max(len(f) for c in summary["counts"].values() for f in c)
    for source, counts in summary["counts"].items():
        print(f"{source}: {sum(counts.values())} images")
        for fine, n in sorted(counts.items(), key=lambda kv: -kv[1]):
            print(f"  {fine:<{width}} {n:>5}")
    print(json.dumps({"out": summary["out"], "total": summary["total"]}))


if __name__ == "__main__":
    main()
