"""The extractor interface every feature network of the metrics implements (its one job): uint8 images in,
(features, logits) out, torch-fidelity's FeatureExtractorBase underneath; and the one resize every extractor
uses (`resize_u8`). The networks themselves: hpcgan.metrics.features (Inception, the loader by name) and
hpcgan.metrics.cell (the project's own), both built on this module, which imports neither.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch_fidelity.feature_extractor_base import FeatureExtractorBase

FEATURES, LOGITS = "features", "logits"
METRIC_LAYER = {"isc": LOGITS, "fid": FEATURES, "kid": FEATURES, "prc": FEATURES}


def resize_u8(images_u8: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [N, 3, H, W] -> float32 [N, 3, size, size] in [0, 255]: antialiased bilinear, half-pixel centres
    (unchanged when already size x size; a non-square input is stretched to a square)."""
    x = images_u8.float()
    if tuple(x.shape[-2:]) == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def check_images(images: torch.Tensor) -> None:
    if not (torch.is_tensor(images) and images.dtype == torch.uint8 and images.dim() == 4 and images.shape[1] == 3):
        what = f"{images.dtype} {tuple(images.shape)}" if torch.is_tensor(images) else type(images).__name__
        raise ValueError(f"expected uint8 images [N, 3, H, W] (0..255, torch-fidelity's convention), got {what}")


class Extractor(FeatureExtractorBase):
    """A feature extractor: uint8 images in, (features [N, dim], logits [N, num_classes] or None) out.

    Subclasses build their network and implement `_run(images_u8) -> (features, logits | None)`.
    forward(x) returns the tuple torch-fidelity expects: the requested entries of ("features", "logits").
    """

    def __init__(self, name: str, *, sha256: str, dim: int, num_classes: int | None, input_size: int,
                 classes: list[str] | None = None, path: str | os.PathLike | None = None,
                 features_list: tuple[str, ...] | None = None):
        features_list = tuple(features_list or ((FEATURES, LOGITS) if num_classes else (FEATURES,)))
        if LOGITS in features_list and not num_classes:
            raise ValueError(f"extractor {name!r} has no class logits")
        super().__init__(name, list(features_list))
        self.sha256, self.dim, self.num_classes = sha256, int(dim), num_classes
        self.input_size, self.classes = int(input_size), classes
        self.path = Path(path) if path is not None else None

    # -- torch-fidelity's interface ----------------------------------------------------------------------
    @staticmethod
    def get_provided_features_list():
        return FEATURES, LOGITS

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return METRIC_LAYER[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 8, 8, dtype=torch.uint8)

    def forward(self, x):
        feats, logits = self.extract(x)
        out = {FEATURES: feats, LOGITS: logits}
        return tuple(out[k] for k in self.features_list)

    # -- ours --------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        p = next(self.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    @torch.no_grad()
    def extract(self, images_u8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        check_images(images_u8)
        feats, logits = self._run(images_u8.to(self.device))
        return feats.float(), (logits.float() if logits is not None else None)

    def _run(self, images_u8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"name={self.name!r}, dim={self.dim}, num_classes={self.num_classes}, input_size={self.input_size}, " \
               f"sha256={self.sha256[:12]}"
