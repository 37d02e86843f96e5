"""Feature extractors: the networks whose features and logits the metrics compare.

    ex = load_extractor("cell", path=cell_file)          # the project's own (hpcgan.metrics.cell)
    ex = load_extractor("inception", weights_dir=DIR)    # torch-fidelity's FID Inception-v3, staged file
    feats, logits = ex.extract(images_u8)                # [N, dim] float32, [N, C] or None

Every extractor takes what torch-fidelity takes: uint8 images [N, 3, H, W] of any size. It resizes
them to its own input size with antialiased bilinear interpolation (`resize_u8`; clean-fid, Parmar et
al. 2022: the same resize for real and generated images, with antialiasing when shrinking), then
normalises them as its network expects. `ex.sha256` is the hash of its weights file: results rows carry
it, so a number is traceable to the exact network.

`register_with_torch_fidelity(ex)` makes the same network available to
`torch_fidelity.calculate_metrics(feature_extractor=NAME, ...)` (its "features" layer for fid/kid/prc,
"logits" for isc), so torch-fidelity's FID/IS/KID/PRC can be cross-checked against ours.
"""
from __future__ import annotations

import copy
import logging
import os
from typing import Iterable

import numpy as np
import torch

from hpcgan import dist
from hpcgan.metrics import weights
from hpcgan.metrics.extractor import Extractor, resize_u8

logger = logging.getLogger(__name__)

NAMES = ("cell", "inception")


class InceptionExtractor(Extractor):
    """torch-fidelity's FID Inception-v3 ("inception-v3-compat": the TensorFlow 2015-12-05 graph) from a file.

    features: the 2048-d pool features ("2048"); logits: its 1008 ImageNet logits without the bias
    ("logits_unbiased", what torch-fidelity's IS uses). The resize to 299 px is ours (`resize_u8`, rounded
    back to uint8, since torch-fidelity's network takes uint8); torch-fidelity's own TF1-style bilinear
    resize then has nothing left to do (299 -> 299 is the identity).
    """

    SIZE = 299

    def __init__(self, weights_file: str | os.PathLike, sha256: str, **kw):
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        super().__init__("inception", sha256=sha256, dim=2048, num_classes=1008, input_size=self.SIZE,
                         path=weights_file, **kw)
        self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                               feature_extractor_weights_path=str(weights_file))

    def _run(self, images_u8):
        x = resize_u8(images_u8, self.SIZE).round_().clamp_(0, 255).to(torch.uint8)
        return self.net(x)


def _device(device) -> torch.device:
    return dist.resolve_device(str(device))


def load_inception(*, path=None, weights_dir=None, device="cpu") -> InceptionExtractor:
    """From the staged file (checked against its published hash), or from the weights file `path`."""
    path, digest = weights.resolve("inception", weights_dir, path)
    return InceptionExtractor(path, digest).to(_device(device)).eval()


def load_extractor(name: str, *, path=None, weights_dir=None, device="cpu") -> Extractor:
    """name "cell": `path` is a cell extractor file (hpcgan.metrics.cell); "inception": the staged
    Inception-v3 (or the weights file `path`). device: auto | cpu | cuda | cuda:N (or a torch.device)."""
    if name == "cell":
        if path is None:
            raise ValueError("load_extractor('cell') needs path=: a cell extractor file (make one with "
                             "tools/train_features.py, or hpcgan.metrics.cell.ensure_cell_extractor)")
        from hpcgan.metrics.cell import load_cell_extractor
        return load_cell_extractor(path, device=_device(device))
    if name == "inception":
        return load_inception(path=path, weights_dir=weights_dir, device=device)
    raise ValueError(f"unknown feature extractor {name!r}; choose one of {', '.join(NAMES)}")


def extract_all(extractor: Extractor, batches: Iterable[torch.Tensor], device="cpu", *, progress: bool = True,
                total: int | None = None, desc: str = "features") -> tuple[np.ndarray, np.ndarray | None]:
    """Every batch (uint8 [B, 3, H, W]) through the extractor on `device`: (features float32 [N, D],
    logits float32 [N, C] or None). `total`: number of images, for the progress bar."""
    from hpcgan.progress import Progress
    extractor.to(_device(device)).eval()
    feats, logits = [], []
    with Progress(total, desc, "img", bar=progress) as bar:
        for images in batches:
            f, lg = extractor.extract(images)
            feats.append(f.cpu().numpy().astype(np.float32, copy=False))
            if lg is not None:
                logits.append(lg.cpu().numpy().astype(np.float32, copy=False))
            bar.update(len(images))
    if not feats:
        raise ValueError("extract_all: no images")
    return np.concatenate(feats), (np.concatenate(logits) if logits else None)


def register_with_torch_fidelity(extractor: Extractor) -> str:
    """Register `extractor` with torch-fidelity as "hpcgan-<name>-<sha256[:8]>" and return that name.

    torch-fidelity instantiates the registered class itself (and moves it to the GPU with cuda=True), so
    the class wraps a copy of `extractor`. The name carries the weights' hash, so torch-fidelity's on-disk
    feature cache cannot mix networks; registering the same weights again returns the same name."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor
    name = f"hpcgan-{extractor.name}-{extractor.sha256[:8]}"
    if name in FEATURE_EXTRACTORS_REGISTRY:
        return name
    prototype = copy.deepcopy(extractor).cpu().eval()
    provided = tuple(extractor.features_list)

    class Registered(Extractor):
        def __init__(self, reg_name, features_list, **_torch_fidelity_kwargs):
            super().__init__(reg_name, sha256=prototype.sha256, dim=prototype.dim,
                             num_classes=prototype.num_classes, input_size=prototype.input_size,
                             classes=prototype.classes, path=prototype.path, features_list=tuple(features_list))
            self.inner = copy.deepcopy(prototype)

        @staticmethod
        def get_provided_features_list():
            return provided

        def _run(self, images_u8):
            return self.inner._run(images_u8)

    Registered.__name__ = Registered.__qualname__ = f"Registered_{extractor.name}_{extractor.sha256[:8]}"
    register_feature_extractor(name, Registered)
    return name
