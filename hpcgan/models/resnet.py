"""ResNet generator and critic (WGAN-GP-AC, Hazra et al. 2022, Figs. 3-6; Gulrajani et al. 2017).

Generator: z -> dense -> ReLU -> [c0, 4, 4]; label -> embedding -> dense -> ReLU -> [c0/8, 4, 4];
concatenated, then one residual up-sampling block per doubling (32 px: 3, 64: 4, 128: 5), BN-ReLU,
a 3x3 conv to RGB and tanh. Unconditional variants drop the label branch.

Critic: 3x3 conv stem, one residual down-sampling block per halving to 4x4, activation, global mean
pooling, then the heads the spec asks for (CriticHeads). Batch norm only if spec.critic_norm says so,
which GANSpec forbids together with a gradient penalty.

SNGAN family (Miyato et al. 2018; Miyato & Koyama 2018), model sngan_proj:
  resnet_cbn generator: z -> dense -> [c0, 4, 4], then residual up-sampling blocks whose batch norms are
    class-conditional (the label sets every block's gains and biases instead of being concatenated once at
    4x4), BN-ReLU, 3x3 conv to RGB, tanh.
  sngan critic: the ResNet critic with ReLU and global SUM pooling (as the papers; with spectral norm the
    pooled features stay on a scale where the hinge margin of 1 matters). Spectral norm itself is the
    spec's `spectral_norm` (build_model), the label enters by projection (critic_condition).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from hpcgan.models.blocks import (CondResBlockUp, CriticHeads, LabelTo4x4, ResBlockDown, ResBlockUp, activation,
                                  channels_at, check_labels, check_latent, num_resamples, require_conditional,
                                  utlo_level)
from hpcgan.models.builders import register_critic, register_generator


class ResNetGenerator(nn.Module):
    def __init__(self, latent_dim: int, num_classes: int, image_size: int, width: int, conditional: bool):
        super().__init__()
        self.latent_dim, self.conditional = latent_dim, conditional
        n_up = num_resamples(image_size)
        res = [4 * 2 ** i for i in range(n_up + 1)]              # 4, 8, ..., image_size
        ch = [channels_at(r, image_size, width) for r in res]
        self.z_channels = ch[0]
        self.z_to_4x4 = nn.Sequential(nn.Linear(latent_dim, ch[0] * 16), nn.ReLU())
        self.label_to_4x4 = LabelTo4x4(num_classes, max(1, ch[0] // 8)) if conditional else None
        in0 = ch[0] + (self.label_to_4x4.channels if conditional else 0)
        self.blocks = nn.Sequential(*[ResBlockUp(in0 if i == 0 else ch[i], ch[i + 1]) for i in range(n_up)])
        self.to_rgb = nn.Sequential(nn.BatchNorm2d(ch[-1]), nn.ReLU(), nn.Conv2d(ch[-1], 3, 3, padding=1), nn.Tanh())

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        check_latent(z, self.latent_dim)
        h = self.z_to_4x4(z).view(-1, self.z_channels, 4, 4)
        if self.conditional:
            check_labels(y, z.shape[0])
            h = torch.cat([h, self.label_to_4x4(y)], dim=1)
        return self.to_rgb(self.blocks(h))


class CBNResNetGenerator(nn.Module):
    """The class-conditional ResNet generator with conditional batch norm in every block (SNGAN, BigGAN)."""

    def __init__(self, latent_dim: int, num_classes: int, image_size: int, width: int, class_from: int = 0,
                 low_rgb: bool = False):
        """class_from: see blocks.class_norm; low_rgb: UTLO's low-resolution image (BN-ReLU-conv-tanh on the last
        unconditional features; forward(low_res=True); the spec's utlo_alpha)."""
        super().__init__()
        self.latent_dim = latent_dim
        n_up = num_resamples(image_size)
        ch = [channels_at(4 * 2 ** i, image_size, width) for i in range(n_up + 1)]   # 4x4 ... image_size
        self.z_channels = ch[0]
        self.z_to_4x4 = nn.Linear(latent_dim, ch[0] * 16)
        self.blocks = nn.ModuleList([CondResBlockUp(ch[i], ch[i + 1], num_classes, 4 * 2 ** i, class_from)
                                     for i in range(n_up)])
        self.to_rgb = nn.Sequential(nn.BatchNorm2d(ch[-1]), nn.ReLU(), nn.Conv2d(ch[-1], 3, 3, padding=1), nn.Tanh())
        # features at 4 * 2^k px: the 4x4 input (k = 0) or block k - 1's output; the last block's must stay conditional
        self.low_index = utlo_level(class_from, n_up, f"{image_size} px resnet_cbn generator") if low_rgb else None
        self.to_rgb_low = (nn.Sequential(nn.BatchNorm2d(ch[self.low_index]), nn.ReLU(),
                                         nn.Conv2d(ch[self.low_index], 3, 3, padding=1), nn.Tanh())
                           if low_rgb else None)

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None, low_res: bool = False):
        """Images [B, 3, S, S]; with low_res=True (UTLO), (images, the unconditional layers' low-resolution images)."""
        check_latent(z, self.latent_dim)
        check_labels(y, z.shape[0])
        if low_res and self.to_rgb_low is None:
            raise ValueError("this generator draws no low-resolution image: it needs a spec with utlo_alpha > 0")
        h = self.z_to_4x4(z).view(-1, self.z_channels, 4, 4)
        low = self.to_rgb_low(h) if low_res and self.low_index == 0 else None
        for k, block in enumerate(self.blocks, start=1):
            h = block(h, y)
            if low_res and k == self.low_index:
                low = self.to_rgb_low(h)
        return (self.to_rgb(h), low) if low_res else self.to_rgb(h)


class ResNetCritic(nn.Module):
    def __init__(self, spec, num_classes: int, image_size: int, act: str = "lrelu", pool: str = "mean"):
        super().__init__()
        if pool not in ("mean", "sum"):
            raise ValueError(f"pool={pool!r}: expected 'mean' or 'sum'")
        self.pool = pool
        width, n_down = spec.width, num_resamples(image_size)
        res = [image_size // 2 ** i for i in range(n_down + 1)]  # image_size, ..., 4
        ch = [channels_at(r, image_size, width) for r in res]
        self.stem = nn.Conv2d(3, ch[0], 3, padding=1)
        self.blocks = nn.Sequential(*[ResBlockDown(ch[i], ch[i + 1], act=act, norm=spec.critic_norm)
                                      for i in range(n_down)])
        self.act = activation(act)
        self.heads = CriticHeads(spec, num_classes, ch[-1])
        # UTLO: low-resolution images enter through their own stem where the blocks' features have their size
        self.low_from = n_down - utlo_level(spec.class_from) if spec.utlo_alpha > 0 else None
        self.from_rgb_low = (nn.Conv2d(3, ch[self.low_from], 3, padding=1) if spec.utlo_alpha > 0 else None)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled features the heads read (also BAGAN's encoder trunk, hpcgan.models.bagan)."""
        return self._pooled(self.blocks(self.stem(x)))

    def low_features(self, x: torch.Tensor) -> torch.Tensor:
        if self.from_rgb_low is None:
            raise ValueError("this critic has no low-resolution path: it needs a spec with utlo_alpha > 0")
        return self._pooled(self.blocks[self.low_from:](self.from_rgb_low(x)))

    def _pooled(self, h: torch.Tensor) -> torch.Tensor:
        h = self.act(h)
        return h.mean(dim=(2, 3)) if self.pool == "mean" else h.sum(dim=(2, 3))

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, low: bool = False) -> dict[str, torch.Tensor]:
        """The spec's heads on images; low=True: UTLO's unconditional score of low-resolution images (y unused)."""
        if low:
            return self.heads.low(self.low_features(x))
        return self.heads(self.features(x), y)


@register_generator("resnet")
def build_resnet_generator(spec, num_classes: int, image_size: int) -> nn.Module:
    return ResNetGenerator(spec.latent_dim, num_classes, image_size, spec.width, spec.conditional)


@register_critic("resnet")
def build_resnet_critic(spec, num_classes: int, image_size: int) -> nn.Module:
    return ResNetCritic(spec, num_classes, image_size)


@register_generator("resnet_cbn")
def build_cbn_resnet_generator(spec, num_classes: int, image_size: int) -> nn.Module:
    require_conditional(spec, "resnet_cbn", "resnet")
    return CBNResNetGenerator(spec.latent_dim, num_classes, image_size, spec.width, spec.class_from,
                              low_rgb=spec.utlo_alpha > 0)


@register_critic("sngan")
def build_sngan_critic(spec, num_classes: int, image_size: int) -> nn.Module:
    return ResNetCritic(spec, num_classes, image_size, act="relu", pool="sum")
