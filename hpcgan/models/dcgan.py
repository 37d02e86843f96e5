"""DCGAN generator and critic (Radford et al. 2016), the backbone of the baselines (DCGAN, CGAN,
AC-GAN, InfoGAN, WGAN with weight clipping).

Generator: [z, embed(y)] -> 4x4 conv-transpose -> BN-ReLU, then one stride-2 conv-transpose(+BN-ReLU)
per doubling; the last one outputs RGB through tanh. Unconditional variants drop embed(y).
Critic: stride-2 4x4 convs with LeakyReLU(0.2) down to 4x4 (no norm on the first layer, then the
spec's critic_norm), flattened into the spec's heads (CriticHeads).
Both use the DCGAN init: N(0, 0.02).
dcgan_cbn generator: the conditional DCGAN generator whose batch norms are class-conditional (gain and bias
chosen by the label in every layer, as SNGAN / BigGAN's generators), besides [z, embed(y)] at the input: the
class shapes every scale, not only the 4x4 seed that the generator can learn to ignore.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from hpcgan.models.blocks import (ConditionalBatchNorm2d, CriticHeads, channels_at, check_labels, check_latent,
                                  class_norm, dcgan_init, norm_2d, num_resamples, require_conditional,
                                  utlo_level)
from hpcgan.models.builders import register_critic, register_generator
from hpcgan.models.twins import MAPPING_DIM, TWIN_DIM, ClassNoiseMapping

LABEL_EMBED_DIM = 64


class DCGANGenerator(nn.Module):
    def __init__(self, latent_dim: int, num_classes: int, image_size: int, width: int, conditional: bool):
        super().__init__()
        self.latent_dim, self.conditional = latent_dim, conditional
        n_up = num_resamples(image_size)
        ch = [channels_at(4 * 2 ** i, image_size, width) for i in range(n_up)]  # 4x4 ... image_size/2
        self.embed = nn.Embedding(num_classes, LABEL_EMBED_DIM) if conditional else None
        in_dim = latent_dim + (LABEL_EMBED_DIM if conditional else 0)
        layers = [nn.ConvTranspose2d(in_dim, ch[0], 4, 1, 0, bias=False), nn.BatchNorm2d(ch[0]), nn.ReLU()]
        for i in range(n_up - 1):
            layers += [nn.ConvTranspose2d(ch[i], ch[i + 1], 4, 2, 1, bias=False), nn.BatchNorm2d(ch[i + 1]), nn.ReLU()]
        layers += [nn.ConvTranspose2d(ch[-1], 3, 4, 2, 1), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        dcgan_init(self)

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        check_latent(z, self.latent_dim)
        if self.conditional:
            check_labels(y, z.shape[0])
            z = torch.cat([z, self.embed(y).to(z.dtype)], dim=1)
        return self.net(z[:, :, None, None])


class CBNDCGANGenerator(nn.Module):
    """DCGANGenerator (conditional) with ConditionalBatchNorm2d in place of every BatchNorm2d."""

    def __init__(self, latent_dim: int, num_classes: int, image_size: int, width: int, class_from: int = 0,
                 twin_sigma: float | None = None, low_rgb: bool = False):
        """class_from: layers below this resolution are unconditional and the label is not at the input when
        class_from > 4 (blocks.class_norm; the spec's class_from). twin_sigma: NoisyTwins' class-embedding noise
        (hpcgan.models.twins): a mapping of [z noise, noisy embed(y)] is the input instead of [z, embed(y)].
        low_rgb: UTLO's low-resolution image, a 3x3 conv + tanh on the last unconditional layer
        (forward(low_res=True); the spec's utlo_alpha)."""
        super().__init__()
        self.latent_dim = latent_dim
        n_up = num_resamples(image_size)
        ch = [channels_at(4 * 2 ** i, image_size, width) for i in range(n_up)]  # 4x4 ... image_size/2
        self.mapping = (None if twin_sigma is None else
                        ClassNoiseMapping(latent_dim - TWIN_DIM, num_classes, twin_sigma))
        self.embed = (nn.Embedding(num_classes, LABEL_EMBED_DIM) if class_from <= 4 and self.mapping is None
                      else None)
        in_dim = (MAPPING_DIM if self.mapping is not None else
                  latent_dim + (LABEL_EMBED_DIM if self.embed is not None else 0))
        self.convs = nn.ModuleList([nn.ConvTranspose2d(in_dim, ch[0], 4, 1, 0, bias=False)]
                                   + [nn.ConvTranspose2d(ch[i], ch[i + 1], 4, 2, 1, bias=False) for i in range(n_up - 1)])
        self.norms = nn.ModuleList([class_norm(c, num_classes, 4 * 2 ** i, class_from) for i, c in enumerate(ch)])
        self.to_rgb = nn.Sequential(nn.ConvTranspose2d(ch[-1], 3, 4, 2, 1), nn.Tanh())
        # layer i is 4 * 2^i px; the last one (n_up - 1) must stay conditional
        self.low_index = utlo_level(class_from, n_up - 1, f"{image_size} px dcgan_cbn generator") if low_rgb else None
        self.to_rgb_low = (nn.Sequential(nn.Conv2d(ch[self.low_index], 3, 3, padding=1), nn.Tanh()) if low_rgb
                           else None)
        dcgan_init(self)
        for norm in self.norms:   # dcgan_init drew the embeddings N(0, 0.02): gains start near 1, biases at 0
            if isinstance(norm, ConditionalBatchNorm2d):
                nn.init.normal_(norm.gain.weight, 1.0, 0.02)
                nn.init.zeros_(norm.bias.weight)
        if self.mapping is not None:
            self.mapping.reset_parameters()

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None, low_res: bool = False):
        """Images [B, 3, S, S]; with low_res=True (UTLO), (images, the unconditional layers' low-resolution images)."""
        check_latent(z, self.latent_dim)
        check_labels(y, z.shape[0])
        if low_res and self.to_rgb_low is None:
            raise ValueError("this generator draws no low-resolution image: it needs a spec with utlo_alpha > 0")
        if self.mapping is not None:
            h = self.mapping(z, y)
        else:
            h = z if self.embed is None else torch.cat([z, self.embed(y).to(z.dtype)], dim=1)
        h = h[:, :, None, None]
        low = None
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            h = torch.relu(norm(conv(h), y))
            if low_res and i == self.low_index:
                low = self.to_rgb_low(h)
        return (self.to_rgb(h), low) if low_res else self.to_rgb(h)


class DCGANCritic(nn.Module):
    def __init__(self, spec, num_classes: int, image_size: int):
        super().__init__()
        n_down = num_resamples(image_size)
        res = [image_size // 2 ** (i + 1) for i in range(n_down)]   # image_size/2 ... 4
        ch = [channels_at(r, image_size, spec.width) for r in res]
        layers = [nn.Conv2d(3, ch[0], 4, 2, 1), nn.LeakyReLU(0.2)]
        for i in range(n_down - 1):
            # no conv bias before a norm layer: the norm's shift replaces it
            layers += [nn.Conv2d(ch[i], ch[i + 1], 4, 2, 1, bias=spec.critic_norm == "none"),
                       norm_2d(spec.critic_norm, ch[i + 1]), nn.LeakyReLU(0.2)]
        self.net = nn.Sequential(*layers)
        self.heads = CriticHeads(spec, num_classes, ch[-1] * 16)
        if spec.utlo_alpha > 0:   # UTLO: low-resolution images enter where net's features have their resolution
            j = num_resamples(image_size) - utlo_level(spec.class_from) - 1   # res[j] = L
            self.low_from = 2 + 3 * j   # net[:2] makes res[0], each later [conv, norm, act] the next
            self.from_rgb_low = nn.Sequential(nn.Conv2d(3, ch[j], 1), nn.LeakyReLU(0.2))
        else:
            self.from_rgb_low = None
        dcgan_init(self)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The flattened 4x4 features the heads read (also BAGAN's encoder trunk, hpcgan.models.bagan)."""
        return self.net(x).flatten(1)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, low: bool = False) -> dict[str, torch.Tensor]:
        """The spec's heads on images; low=True: UTLO's unconditional score of low-resolution images (y unused)."""
        if low:
            return self.heads.low(self.low_features(x))
        return self.heads(self.features(x), y)

    def low_features(self, x: torch.Tensor) -> torch.Tensor:
        if self.from_rgb_low is None:
            raise ValueError("this critic has no low-resolution path: it needs a spec with utlo_alpha > 0")
        return self.net[self.low_from:](self.from_rgb_low(x)).flatten(1)


@register_generator("dcgan")
def build_dcgan_generator(spec, num_classes: int, image_size: int) -> nn.Module:
    return DCGANGenerator(spec.latent_dim, num_classes, image_size, spec.width, spec.conditional)


@register_generator("dcgan_cbn")
def build_dcgan_cbn_generator(spec, num_classes: int, image_size: int) -> nn.Module:
    require_conditional(spec, "dcgan_cbn", "dcgan")
    return CBNDCGANGenerator(spec.latent_dim, num_classes, image_size, spec.width, spec.class_from,
                             twin_sigma=spec.twin_sigma if spec.noisy_twins > 0 else None,
                             low_rgb=spec.utlo_alpha > 0)


@register_critic("dcgan")
def build_dcgan_critic(spec, num_classes: int, image_size: int) -> nn.Module:
    return DCGANCritic(spec, num_classes, image_size)
