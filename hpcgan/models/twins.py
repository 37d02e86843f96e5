"""NoisyTwins (Rangwani et al., CVPR 2023) for the class-conditional batch-norm DCGAN generator (dcgan_cbn), one
job: the generator's class-embedding mapping and the noise it adds.

NoisyTwins gives a StyleGAN's mapping network a noisy class embedding, c~ = c_y + sigma_y * eps, and asks, with a
Barlow Twins term on the mapping's outputs w of two such "twins" (same z and class, independent eps), that w
stay the same across the twins and that its dimensions be decorrelated over the batch (hpcgan.objectives,
barlow_twins_loss). A tail class then occupies a region of the embedding space, not a point, and its generated
cells vary with z instead of collapsing on one.

Here (no StyleGAN on a CPU budget): the mapping (z noise, c~) -> w replaces dcgan_cbn's [z, embed(y)] input, a
two-layer MLP; the class-conditional batch norms of every layer still see the clean label. So the noise reaches
the generator through its input only, a weaker form of the method than StyleGAN's, where w styles every layer.

sigma_y = sigma * E(n_y) / max_c E(n_c), with E(n) = (1 - beta^n) / (1 - beta) the effective number of a class's
n training images (Cui et al. 2019; NoisyTwins' per-class scaling, beta = 0.99): a class with many images gets the
full noise, a class of 20 about a fifth of it. fit_class_noise sets it from the run's class counts (hpcgan.train);
it is a buffer, so checkpoints and generation carry it.

The latent layout (hpcgan/latent.py): the last TWIN_DIM entries of z are eps ~ N(0, 1).
"""
from __future__ import annotations

import torch
import torch.nn as nn

TWIN_DIM = 64          # class-embedding size, and so the size of the noise eps at the end of z
MAPPING_DIM = 128      # the mapping's hidden and output width (w)
BETA = 0.99            # effective-number beta of the per-class noise scale


def effective_number(counts: torch.Tensor, beta: float = BETA) -> torch.Tensor:
    """E(n) = (1 - beta^n) / (1 - beta) for each class's image count n (0 for a class without images)."""
    return (1.0 - beta ** counts.double()) / (1.0 - beta)


def normalize_2nd_moment(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    return x * (x.square().mean(dim=1, keepdim=True) + eps).rsqrt()


class ClassNoiseMapping(nn.Module):
    """(z, y) -> w: z = [noise: noise_dim | eps: TWIN_DIM]; w = MLP([normalised noise, normalised embed(y) +
    sigma_y * eps])."""

    def __init__(self, noise_dim: int, num_classes: int, sigma: float):
        super().__init__()
        self.noise_dim, self.sigma = noise_dim, float(sigma)
        self.embed = nn.Embedding(num_classes, TWIN_DIM)
        self.net = nn.Sequential(nn.Linear(noise_dim + TWIN_DIM, MAPPING_DIM), nn.LeakyReLU(0.2),
                                 nn.Linear(MAPPING_DIM, MAPPING_DIM), nn.LeakyReLU(0.2))
        self.register_buffer("class_sigma", torch.full((num_classes,), self.sigma))

    def reset_parameters(self) -> None:
        """PyTorch's default init (the DCGAN init's N(0, 0.02) would shrink w through two layers)."""
        nn.init.normal_(self.embed.weight)
        for m in self.net:
            if isinstance(m, nn.Linear):
                m.reset_parameters()

    @torch.no_grad()
    def fit_class_counts(self, counts) -> None:
        e = effective_number(torch.as_tensor(counts))
        if len(e) != len(self.class_sigma) or e.max() <= 0:
            raise ValueError(f"class counts {list(counts)}: need one count per class ({len(self.class_sigma)}), "
                             "at least one above 0")
        self.class_sigma.copy_((self.sigma * e / e.max()).to(self.class_sigma.dtype))

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        noise, eps = z[:, :self.noise_dim], z[:, self.noise_dim:]
        c = normalize_2nd_moment(self.embed(y).to(z.dtype)) + self.class_sigma[y, None].to(z.dtype) * eps
        return self.net(torch.cat([normalize_2nd_moment(noise), c], dim=1))


def class_noise_mapping(G: nn.Module) -> ClassNoiseMapping | None:
    """G's NoisyTwins mapping, or None when it has none."""
    return next((m for m in G.modules() if isinstance(m, ClassNoiseMapping)), None)


def fit_class_noise(G: nn.Module, counts) -> None:
    """Scale G's class-embedding noise by its classes' training image counts (nothing for a G without it)."""
    mapping = class_noise_mapping(G)
    if mapping is not None:
        mapping.fit_class_counts(counts)
