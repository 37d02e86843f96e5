#!/usr/bin/env python
"""Evaluate a GAN run (or a synthetic / PNG image set) against real shards (hpcgan/evaluate.py,
configs/evaluate.yaml).

  python tools/evaluate.py run=runs/x shards=shards/real64
  python tools/evaluate.py run=runs/x shards=shards/real64 metrics=[fid,prdc] features=inception
  python tools/evaluate.py fake=synth shards=shards/real64 out=synth-eval.json
  torchrun --standalone --nproc_per_node=2 -m hpcgan.evaluate run=runs/x shards=shards/real64

Exit status: 0 written, 2 bad input (nothing written).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

from hpcgan.evaluate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
