#!/usr/bin/env python
"""Stage pretrained weights for the evaluation, on a machine with internet (hpcgan/metrics/weights.py).

    python tools/stage_weights.py inception lpips_alex weights_dir=/project/hpcgan-weights
    python tools/stage_weights.py inception weights_dir=DIR from=~/Downloads/weights-inception-2015-12-05-6726825d.pth
    python tools/stage_weights.py timm:resnet50 timm:vgg16 weights_dir=DIR   # classifiers' ImageNet weights

Downloads each named file (urllib) into weights_dir (default: $HPCGAN_WEIGHTS, else ~/.cache/hpcgan/weights)
under a temporary name, checks its hash, then renames it into place. `from=FILE` copies a file obtained
otherwise (scp, a browser) instead, with the same check; it takes exactly one name. Then copy the folder to
the cluster and `export HPCGAN_WEIGHTS=DIR`. Names: inception, lpips_alex, lpips_vgg (see STAGED), and
timm:ARCH for the classifiers' ImageNet weights (inception_v3, resnet50, vgg16, vgg19, xception: timm's own
pretrained download, saved as a state dict with its sha256 and the timm version; hpcgan/classify/pretrained.py),
which `tools/classify.py pretrained=true` then finds by name.
Exit status: 0 staged, 2 bad arguments or a file that fails its hash check, 1 a download that failed.
(The download itself is not covered by the tests, which run without internet; `from=` is.)
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from urllib.error import URLError

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

from hpcgan.classify import pretrained  # noqa: E402
from hpcgan.metrics.weights import ENV, STAGED, stage, weights_dir  # noqa: E402

SETTINGS = ("weights_dir", "from", "progress")


def parse_args(argv: list[str]) -> tuple[list[str], dict]:
    names, settings = [], {}
    for arg in argv:
        if "=" in arg:
            key, value = arg.split("=", 1)
            if key not in SETTINGS:
                raise ValueError(f"unknown setting {key!r} (known: {', '.join(SETTINGS)})")
            settings[key] = value
        else:
            names.append(arg)
    known = [*STAGED, *(pretrained.PREFIX + a for a in pretrained.stageable())]
    if not names:
        raise ValueError(f"name the weights to stage: one or more of {', '.join(known)}")
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown weights name {', '.join(map(repr, unknown))}; known: {', '.join(known)}")
    if "from" in settings and (len(names) != 1 or names[0] not in STAGED):
        raise ValueError(f"from=FILE stages one file: name exactly one of {', '.join(STAGED)}")
    return names, settings


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        names, settings = parse_args(sys.argv[1:] if argv is None else argv)
    except ValueError as e:
        print(f"stage_weights: error: {e}", file=sys.stderr)
        return 2
    folder = weights_dir(settings.get("weights_dir")).resolve()
    progress = settings.get("progress", "true").lower() not in ("false", "0", "no")
    for name in names:
        try:
            if name.startswith(pretrained.PREFIX):
                path = pretrained.stage(name[len(pretrained.PREFIX):], folder)
            else:
                path = stage(name, folder, source=settings.get("from"), progress=progress)
        except (ValueError, FileNotFoundError) as e:
            print(f"stage_weights: error: {e}", file=sys.stderr)
            return 2
        except pretrained.DownloadError as e:
            print(f"stage_weights: error: {e}", file=sys.stderr)
            return 1
        except URLError as e:
            print(f"stage_weights: error: downloading {name} from {STAGED[name]['url']} failed ({e}); on a machine "
                  f"without internet fetch the file elsewhere and pass from=FILE", file=sys.stderr)
            return 1
        except OSError as e:
            print(f"stage_weights: error: cannot stage {name} into {folder}: {e}", file=sys.stderr)
            return 1
        print(f"staged {name} -> {path}")
    print(f"export {ENV}={folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
