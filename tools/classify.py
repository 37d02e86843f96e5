#!/usr/bin/env python
"""Train a classifier on real (and/or synthetic) cells and score it on the real test split
(hpcgan/classify/, configs/classify.yaml).

  python tools/classify.py shards=shards/real64 arch=small_cnn regime=original out=runs/cls/small_cnn-original
  python tools/classify.py shards=shards/real64 synthetic=shards/syn64 regime=original+synthetic out=...
  torchrun --standalone --nproc_per_node=4 -m hpcgan.classify shards=... arch=resnet50 regime=aug2 out=...

Re-running the same out= resumes (or says it is finished). Exit status: 0 finished, 1 failed, 2 bad input
(nothing trained), 3 stopped by a signal after a checkpoint.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

from hpcgan.classify.run import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
