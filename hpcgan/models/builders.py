"""The architecture tables (one job): name -> builder(spec, num_classes, image_size) -> nn.Module, for the
generators and the critics. The architecture files (dcgan.py, resnet.py) fill them with the decorators below;
hpcgan.models.architectures imports those files, and hpcgan.models.registry looks the spec's names up here.
This module imports none of them, so the registry and the architectures never import each other."""
from __future__ import annotations

from typing import Callable

import torch.nn as nn

GENERATORS: dict[str, Callable[..., nn.Module]] = {}
CRITICS: dict[str, Callable[..., nn.Module]] = {}


def register_generator(name: str):
    def deco(fn):
        GENERATORS[name] = fn
        return fn
    return deco


def register_critic(name: str):
    def deco(fn):
        CRITICS[name] = fn
        return fn
    return deco
