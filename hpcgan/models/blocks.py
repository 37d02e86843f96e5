"""Building blocks shared by the generator and critic families.

Residual blocks follow Gulrajani et al. (WGAN-GP, ResNet variant) as used by Hazra et al. (2022):
  up:   BN-ReLU-upsample-conv-BN-ReLU-conv        + upsample-conv1x1 shortcut
  down: act-conv-act-conv-avgpool                  + conv1x1-avgpool shortcut
The critic-side blocks take an optional norm so that a non-GP critic may use batch norm; a critic
trained with a gradient penalty never gets one (the penalty is per-sample, batch norm mixes samples).
The class-conditional up block (SNGAN / BigGAN generators) replaces both batch norms by conditional batch
norm: the class chooses the gain and bias, in every block rather than only at the input.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from hpcgan.images import check_image_size

NORMS = ("none", "batch")


def num_resamples(image_size: int) -> int:
    """Up/down-sampling stages between 4x4 and the image: 32 -> 3, 64 -> 4, 128 -> 5."""
    return int(math.log2(check_image_size(image_size))) - 2


def channels_at(resolution: int, image_size: int, width: int, max_mult: int = 8) -> int:
    """Channels at a feature-map resolution: width at full resolution, doubling per halving,
    capped at width*max_mult (keeps 128 px at width 64 near 12M parameters per network)."""
    return width * min(max_mult, image_size // resolution)


def norm_2d(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown critic_norm {kind!r}; expected one of {NORMS}")


def activation(kind: str) -> nn.Module:
    if kind == "relu":
        return nn.ReLU()
    if kind == "lrelu":
        return nn.LeakyReLU(0.2)
    raise ValueError(f"unknown activation {kind!r}; expected 'relu' or 'lrelu'")


class ResBlockUp(nn.Module):
    """Doubles the resolution: BN-ReLU-up-conv-BN-ReLU-conv + up-conv1x1 shortcut."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.residual = nn.Sequential(
            nn.BatchNorm2d(in_ch), nn.ReLU(),
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(in_ch, out_ch, 3, padding=1),
            nn.BatchNorm2d(out_ch), nn.ReLU(),
            nn.Conv2d(out_ch, out_ch, 3, padding=1),
        )
        self.shortcut = nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(in_ch, out_ch, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.residual(x) + self.shortcut(x)


class ConditionalBatchNorm2d(nn.Module):
    """Class-conditional batch norm (de Vries et al. 2017; Miyato & Koyama 2018; BigGAN): batch statistics in
    training (running ones in eval mode, as nn.BatchNorm2d), then a gain and a bias chosen by the class:
    out = gain[y] * BN(x) + bias[y]. Gains start at N(1, 0.02) (as dcgan_init's batch-norm scales: near the
    identity, yet every class its own from the first step) and biases at 0."""

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, affine=False)
        self.gain = nn.Embedding(num_classes, channels)
        self.bias = nn.Embedding(num_classes, channels)
        nn.init.normal_(self.gain.weight, 1.0, 0.02)
        nn.init.zeros_(self.bias.weight)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.bn(x)
        return h * self.gain(y)[:, :, None, None].to(h.dtype) + self.bias(y)[:, :, None, None].to(h.dtype)


class PlainBatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d that takes (and ignores) the label, in place of a ConditionalBatchNorm2d in a layer that
    the spec's class_from leaves unconditional."""

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(x)


def class_norm(channels: int, num_classes: int, resolution: int, class_from: int) -> nn.Module:
    """The batch norm of a generator layer at `resolution`: class-conditional from `class_from` up (0: always)."""
    if resolution >= class_from:
        return ConditionalBatchNorm2d(channels, num_classes)
    return PlainBatchNorm2d(channels)


def utlo_level(class_from: int, conditional_from: int | None = None, generator: str = "") -> int:
    """UTLO's unconditional low-resolution image (the spec's utlo_alpha; Khorram et al. 2024) is drawn at the last
    generator resolution that class_from leaves unconditional, the largest power of two below class_from:
    4 * 2^level px. conditional_from: a generator's levels are conditional up to this one (exclusive); a level at
    or above it leaves no class-conditional layer in `generator` and is refused."""
    if class_from <= 4:
        raise ValueError(f"utlo_alpha needs class_from > 4 (unconditional layers to draw its image), got {class_from}")
    level = math.ceil(math.log2(class_from)) - 3
    if conditional_from is not None and level >= conditional_from:
        raise ValueError(f"class_from={class_from} leaves no class-conditional layer in a {generator}: lower it")
    return level


class CondResBlockUp(nn.Module):
    """ResBlockUp with conditional batch norm (SNGAN's generator block):
    CBN-ReLU-up-conv-CBN-ReLU-conv + conv1x1-up shortcut (a 1x1 conv commutes with nearest upsampling)."""

    def __init__(self, in_ch: int, out_ch: int, num_classes: int, resolution: int = 0, class_from: int = 0):
        """resolution: the block's input resolution (it outputs twice that); class_from: see class_norm."""
        super().__init__()
        self.norm1 = class_norm(in_ch, num_classes, resolution, class_from)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = class_norm(out_ch, num_classes, 2 * resolution, class_from)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = F.interpolate(F.relu(self.norm1(x, y)), scale_factor=2, mode="nearest")
        h = self.conv2(F.relu(self.norm2(self.conv1(h), y)))
        return h + F.interpolate(self.shortcut(x), scale_factor=2, mode="nearest")


class ResBlockDown(nn.Module):
    """Halves the resolution: [norm]-act-conv-[norm]-act-conv-avgpool + conv1x1-avgpool shortcut.
    (The critic has a separate conv stem, so every block can be pre-activation.)"""

    def __init__(self, in_ch: int, out_ch: int, act: str = "lrelu", norm: str = "none"):
        super().__init__()
        self.residual = nn.Sequential(
            norm_2d(norm, in_ch), activation(act),
            nn.Conv2d(in_ch, out_ch, 3, padding=1),
            norm_2d(norm, out_ch), activation(act),
            nn.Conv2d(out_ch, out_ch, 3, padding=1),
            nn.AvgPool2d(2),
        )
        self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1), nn.AvgPool2d(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.residual(x) + self.shortcut(x)


class LabelTo4x4(nn.Module):
    """Class label -> embedding -> dense -> activation -> [B, channels, 4, 4] feature map."""

    def __init__(self, num_classes: int, channels: int, embed_dim: int = 64):
        super().__init__()
        self.channels = channels
        self.embed = nn.Embedding(num_classes, embed_dim)
        self.dense = nn.Sequential(nn.Linear(embed_dim, channels * 16), nn.ReLU())

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.dense(self.embed(y)).view(-1, self.channels, 4, 4)


class CriticHeads(nn.Module):
    """Heads on pooled critic features. A head exists only when the spec uses it, so DDP sees no
    unused parameters:
      adv    (always)                       linear -> 1, plus <embed(y), h> under projection (CGAN)
      cls    (spec.ac_weight > 0)           linear -> num_classes
      cls_twin (spec.ac_twin)               linear -> num_classes (TAC-GAN's classifier of generated images)
      q_cat  (spec.info_cat > 0)            linear -> info_cat
      q_cont (spec.info_cont > 0)           linear -> info_cont
      adv_low (spec.utlo_alpha > 0)         linear -> 1, unconditional: UTLO's head for the critic's low-resolution
                                            path (`low`), on images of utlo_level(spec.class_from)
    """

    def __init__(self, spec, num_classes: int, features: int):
        super().__init__()
        if spec.critic_condition not in ("none", "projection"):
            raise ValueError(f"{spec.name}: unknown critic_condition {spec.critic_condition!r}; "
                             "expected 'none' or 'projection'")
        self.adv = nn.Linear(features, 1)
        self.project = nn.Embedding(num_classes, features) if spec.critic_condition == "projection" else None
        self.cls = nn.Linear(features, num_classes) if spec.ac_weight > 0 else None
        self.cls_twin = nn.Linear(features, num_classes) if spec.ac_twin else None
        self.q_cat = nn.Linear(features, spec.info_cat) if spec.info_cat > 0 else None
        self.q_cont = nn.Linear(features, spec.info_cont) if spec.info_cont > 0 else None
        self.adv_low = nn.Linear(features, 1) if spec.utlo_alpha > 0 else None

    def forward(self, h: torch.Tensor, y: torch.Tensor | None) -> dict[str, torch.Tensor]:
        adv = self.adv(h).squeeze(1)
        if self.project is not None:
            if y is None:
                raise ValueError("this critic is conditioned by projection: call D(x, y) with labels y")
            adv = adv + (self.project(y) * h).sum(dim=1)
        out = {"adv": adv}
        for name in ("cls", "cls_twin", "q_cat", "q_cont"):
            head = getattr(self, name)
            if head is not None:
                out[name] = head(h)
        return out

    def low(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        """The unconditional score of low-resolution features (UTLO): {"adv": [B]}."""
        if self.adv_low is None:
            raise ValueError("this critic has no low-resolution head: it needs a spec with utlo_alpha > 0")
        return {"adv": self.adv_low(h).squeeze(1)}


SPECTRAL_NORMED = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.Embedding)


def apply_spectral_norm(module: nn.Module, n_power_iterations: int = 1) -> nn.Module:
    """Spectral normalisation (Miyato et al. 2018) of every conv, linear and embedding weight in `module`:
    W / sigma(W), sigma the top singular value estimated by `n_power_iterations` of the power method per
    training forward (the vectors are buffers, so checkpoints and DDP ranks carry them). Each layer is then
    1-Lipschitz, which bounds the critic without a gradient penalty. In place; returns `module`."""
    from torch.nn.utils.parametrizations import spectral_norm
    for m in list(module.modules()):
        if isinstance(m, SPECTRAL_NORMED):
            spectral_norm(m, n_power_iterations=n_power_iterations)
    return module


def check_latent(z: torch.Tensor, latent_dim: int) -> None:
    if z.dim() != 2 or z.shape[1] != latent_dim:
        raise ValueError(f"generator expects z of shape [B, {latent_dim}] (z_dim + info codes), "
                         f"got {tuple(z.shape)}")


def require_conditional(spec, arch: str, plain: str) -> None:
    """A class-conditional generator architecture (conditional batch norm) refuses an unconditional spec."""
    if not spec.conditional:
        raise ValueError(f"{spec.name}: generator {arch!r} is class-conditional (conditional batch norm); "
                         f"set conditional: true or use generator {plain!r}")


def check_labels(y, batch: int) -> None:
    if y is None:
        raise ValueError("this generator is class-conditional: call G(z, y) with labels y [B] int64")
    if y.shape != (batch,):
        raise ValueError(f"labels y must have shape [{batch}], got {tuple(y.shape)}")


def dcgan_init(module: nn.Module) -> None:
    """Radford et al.: conv/linear weights N(0, 0.02), BN scale N(1, 0.02), biases 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d) and m.affine:   # conditional batch norm: no affine of its own
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)
