"""BAGAN (Mariani et al. 2018) as BAGAN-GP refines it (Huang & Jafari 2021), for any class-conditional spec; one
job: the autoencoder that initialises a GAN, and the class-conditional latent prior it leaves behind.

Before the first GAN step (hpcgan.train, `model.ae_init` steps), the generator is trained as the decoder and the
critic's trunk (its `features`, plus a linear head to z) as the encoder of an autoencoder, on every training image
at its natural rate: the common classes shape the weights that the scarce ones then start from. As in BAGAN-GP's
supervised autoencoder, the decoder is given the label, G(E(x), y). The GAN starts from those weights (the
generator, its EMA copy, the critic's trunk; the encoder head is dropped).

The latent prior then replaces N(0, I): z -> mean_y + L z, with mean_y the mean code of class y's training images
and L L^T their within-class covariance, pooled over the classes. BAGAN fits one covariance per class, but a class
of 20 cells in 128 dimensions has a singular one; pooled, a scarce class borrows the spread of the common ones. A
class without images gets the mean of all codes. The prior is a buffer (`PriorGenerator.prior`), so checkpoints,
EMA, resume and generation carry it; until fitted it is the identity.
"""
from __future__ import annotations

import logging
import time
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from hpcgan import dist

logger = logging.getLogger(__name__)

AE_LR = 1e-3             # the autoencoder's Adam learning rate (both networks)
AE_BETAS = (0.5, 0.999)
JITTER = 1e-4            # added to the pooled covariance's diagonal before its Cholesky factor


class LatentPrior(nn.Module):
    """z -> mean[y] + z @ scale_tril.T: class-conditional Gaussian codes for a decoder trained on encoder codes."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(num_classes, dim))
        self.register_buffer("scale_tril", torch.eye(dim))

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.mean[y].to(z.dtype) + z @ self.scale_tril.T.to(z.dtype)

    @torch.no_grad()
    def fit(self, sums: torch.Tensor, counts: torch.Tensor, outer: torch.Tensor) -> None:
        """From the codes' sufficient statistics: per-class sums [C, d], counts [C] and sum of z z^T [d, d]."""
        sums, counts, outer = sums.double(), counts.double(), outer.double()
        has = counts > 0
        total = counts.sum()
        if int(has.sum()) < 1 or total - has.sum() < 1:
            raise ValueError(f"BAGAN's latent prior needs more codes than classes with images; got {int(total)} "
                             f"codes of {int(has.sum())} classes")
        mean = (sums.sum(0) / total).expand_as(sums).clone()
        mean[has] = sums[has] / counts[has, None]
        within = outer - (sums[has].T / counts[has]) @ sums[has]     # sum over classes of n_c times cov_c
        cov = within / (total - has.sum()) + JITTER * torch.eye(len(outer), dtype=torch.float64)
        self.mean.copy_(mean.to(self.mean.dtype))
        self.scale_tril.copy_(torch.linalg.cholesky(cov).to(self.scale_tril.dtype))


class PriorGenerator(nn.Module):
    """A generator whose latents go through BAGAN's class-conditional prior first: net(prior(z, y), y)."""

    def __init__(self, net: nn.Module, num_classes: int, latent_dim: int):
        super().__init__()
        self.net, self.latent_dim = net, latent_dim
        self.prior = LatentPrior(num_classes, latent_dim)

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None, **kw):
        """kw: the wrapped generator's options (low_res, UTLO)."""
        if y is None:
            raise ValueError("a BAGAN generator is conditional: call G(z, y) with labels y")
        return self.net(self.prior(z, y), y, **kw)


class Encoder(nn.Module):
    """The critic's trunk (its `features`) and a linear head to the generator's latent size."""

    def __init__(self, critic: nn.Module, latent_dim: int):
        super().__init__()
        if not hasattr(critic, "features"):
            raise ValueError(f"model.ae_init: critic {type(critic).__name__} has no `features` to encode with")
        self.critic = critic
        self.head = nn.Linear(critic.heads.adv.in_features, latent_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.critic.features(x))


class AutoencoderStopped(RuntimeError):
    """A stop signal arrived during the autoencoder phase: every rank left it after the same step."""

    def __init__(self, step: int, steps: int):
        super().__init__(f"stopped during BAGAN's autoencoder, after step {step}/{steps}")
        self.step, self.steps = step, steps


def _train(G: PriorGenerator, encoder: Encoder, batches: Iterator, steps: int, env,
           log_every: int = 100, stop_requested=lambda: False) -> list[float]:
    """`steps` Adam steps of mean squared reconstruction error, G.net(E(x), y) against x in [-1, 1], on
    `batches` ((images, labels), each rank its own); gradients averaged over the ranks (one all-reduce a step), so
    every rank's weights stay the same. Returns the loss of each step (this rank's batch). When
    `stop_requested()` is true on any rank, every rank raises AutoencoderStopped after the same step."""
    params = [p for m in (G.net, encoder) for p in m.parameters()]
    opt = torch.optim.Adam(params, lr=AE_LR, betas=AE_BETAS)
    losses = []
    for step in range(steps):
        x, y = next(batches)
        loss = F.mse_loss(G.net(encoder(x), y).float(), x.float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        stop = _average_grads(env, params, stop_requested())
        opt.step()
        losses.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            logger.info("BAGAN autoencoder step %d/%d: reconstruction MSE %.4f", step + 1, steps, losses[-1])
        if stop:
            raise AutoencoderStopped(step + 1, steps)
    return losses


def _average_grads(env, params: list[nn.Parameter], stop: bool) -> bool:
    """Average the gradients over the ranks in one all-reduce, with this rank's stop flag beside them; whether
    any rank asked to stop (the flag's mean is above 0)."""
    grads = [p.grad for p in params if p.grad is not None]      # the critic's heads have none
    flat = torch.cat([g.reshape(-1) for g in grads] + [torch.tensor([float(stop)], device=grads[0].device,
                                                                    dtype=grads[0].dtype)])
    dist.all_reduce_mean(env, flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()
    return bool(flat[-1] > 0)


@torch.no_grad()
def fit_prior(G: PriorGenerator, encoder: Encoder, every_image, n_images: int) -> int:
    """Fit G's prior to the codes of the training images: `every_image` yields (images, labels) batches of all
    `n_images` of them, in one order padded at the end (rows past n_images are not read), the same on every rank,
    so every rank fits the same prior. The encoder stays in training mode: a critic's batch norms then give the
    codes the decoder was trained on (their running statistics lag behind a short training). Returns the number
    of codes."""
    num_classes, dim = G.prior.mean.shape
    sums = torch.zeros(num_classes, dim, dtype=torch.float64)
    counts = torch.zeros(num_classes, dtype=torch.float64)
    outer = torch.zeros(dim, dim, dtype=torch.float64)
    seen = 0
    for x, y in every_image:
        keep = min(len(y), n_images - seen)
        if keep <= 0:
            break
        z, y = encoder(x[:keep]).double().cpu(), y[:keep].cpu()
        sums.index_add_(0, y, z)
        counts += torch.bincount(y, minlength=num_classes).double()
        outer += z.T @ z
        seen += keep
    G.prior.fit(sums, counts, outer)
    return int(counts.sum())


def autoencoder_init(G: PriorGenerator, D: nn.Module, batches: Iterator, every_image, n_images: int, steps: int,
                     env, clock=time.monotonic, stop_requested=lambda: False) -> dict:
    """BAGAN's initialisation of G and D (see the module docstring): `steps` autoencoder steps on `batches` (each
    rank its own), then the prior from `every_image` (see fit_prior). Returns its record (steps, first and last
    reconstruction error, codes fitted, seconds by `clock`). A stop signal (`stop_requested`) ends it with
    AutoencoderStopped after the step the ranks agree on."""
    t0 = clock()
    encoder = Encoder(D, G.latent_dim).to(env.device)
    losses = _train(G, encoder, batches, steps, env, stop_requested=stop_requested)
    codes = fit_prior(G, encoder, every_image, n_images)
    return {"steps": steps, "mse_first": losses[0] if losses else None, "mse_last": losses[-1] if losses else None,
            "codes_fitted": codes, "seconds": round(clock() - t0, 3)}
