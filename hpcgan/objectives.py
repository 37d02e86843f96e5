"""The GAN objective, built from a GANSpec: one code path for every model.

  adversarial  wasserstein: D loss = E[D(fake)] - E[D(real)],  G loss = -E[D(fake)]
               bce:         D loss = BCE(D(real), 1) + BCE(D(fake), 0),  G loss = BCE(D(fake), 1)
                            (the non-saturating generator loss)
               hinge:       D loss = E[relu(1 - D(real))] + E[relu(1 + D(fake))],  G loss = -E[D(fake)]
                            (Lim & Ye 2017; SNGAN, SAGAN, BigGAN): the critic stops pushing a sample once
                            it is beyond the margin, so it does not grow without bound on a few images
  gp_lambda    gradient penalty  lambda * E[(||grad_x D(x_hat)||_2 - 1)^2] on x_hat = eps*real + (1-eps)*fake,
               taken with autograd.grad w.r.t. x_hat (create_graph=True), so the caller does ONE backward;
               gp_every=k > 1 takes it on every k-th critic step only, weighted k*lambda ("lazy
               regularisation", Karras et al. 2020): the penalty is about half of a WGAN-GP-AC step's time
  r1_gamma     R1 penalty (Mescheder et al. 2018) gamma/2 * E[||grad_x D(x)||^2] on the real images as the
               critic sees them (after DiffAugment), lazy with gp_every like the gradient penalty; logged as gp
  clip         weight clipping of the critic after its optimiser step (WGAN)
  ac_weight    auxiliary classifier: CE(cls(real), y_real) + CE(cls(fake), y_fake) in the critic loss,
               CE(cls(fake), y_fake) in the generator loss
  ac_twin      TAC-GAN (Gong et al. 2019): cls is trained on real images only and a twin head cls_twin on
               generated ones; the generator minimises CE(cls(fake), y) - CE(cls_twin(fake), y). Plain
               AC-GAN rewards the easiest-to-classify image of each class, so the generator collapses onto
               class prototypes; the twin term cancels that bias
  info_*       InfoGAN codes appended to z (hpcgan/latent.py: one-hot categorical, then uniform(-1, 1)
               continuous); the critic's Q heads recover them: CE on the categorical, MSE (a unit-variance
               Gaussian NLL up to constants) on the continuous; in both the critic and the generator loss
  mode_seeking MSGAN (Mao et al. 2019): the generator's batch is drawn in pairs that share labels and codes
               and differ in noise (sample_latent(pairs=True)); the generator loss adds
               mode_seeking / (mean|x1 - x2| / mean|z1 - z2| + 1e-5): a generator that maps different noise
               of one class to one image (the within-class collapse of conditional GANs) pays for it
  noisy_twins  NoisyTwins (Rangwani et al. 2023; hpcgan.models.twins): the generator's batch is drawn as twins
               (sample_latent(twins=True): same noise and class, independent class-embedding noise) and the
               generator loss adds noisy_twins * barlow_twins_loss(w of the first halves, w of the second): the
               mapping's output stays the same across twins, its dimensions decorrelated over the batch (each
               rank's own batch under DDP: NoisyTwins' code all-reduces the correlation matrix across GPUs)
  utlo_alpha   UTLO (Khorram et al. 2024), with class_from: the generator's unconditional layers also draw a
               low-resolution image (`fakes`), the real images are average-pooled to its size, and the critic
               scores both through its low-resolution path and an unconditional head (D(x, low=True)); each side's
               adversarial loss becomes (L(high-resolution, conditional) + alpha L(low, unconditional)) / (1 + alpha),
               as in the authors' code. The penalties (GP, R1) stay on the high-resolution path
Stats (detached tensors, averaged and logged by the loop): d_loss, g_loss, gp (GP and R1), wdist (E[D(real)] -
E[D(fake)]), ac_acc_real / ac_acc_fake (the auxiliary classifier's accuracy on real and on generated
images, the paper's Figs. 7-8), info_loss, ms_ratio (mode seeking's image/noise distance ratio), gsr (the gSR
penalty), twins (the Barlow Twins term, unweighted), utlo (the critic's low-resolution adversarial loss, unweighted).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from hpcgan.augment import diff_augment, parse_policy
from hpcgan.latent import Latent
from hpcgan.models.registry import ADVERSARIAL, GANSpec
from hpcgan.models.twins import class_noise_mapping

STAT_KEYS = ("d_loss", "g_loss", "gp", "wdist", "ac_acc_real", "ac_acc_fake", "info_loss", "ms_ratio", "gsr", "twins",
             "utlo")
MS_EPS = 1e-5
BT_OFF_DIAGONAL = 0.05   # Barlow Twins' weight of the off-diagonal correlations (NoisyTwins' configs: 0.05)


class GANObjective:
    def __init__(self, spec: GANSpec, num_classes: int, *, diffaug: str | None = None,
                 device_type: str = "cpu", autocast_dtype: torch.dtype | None = None):
        if spec.adversarial not in ADVERSARIAL:
            raise ValueError(f"{spec.name}: adversarial must be one of {', '.join(ADVERSARIAL)}, "
                             f"got {spec.adversarial!r}")
        if spec.ac_weight > 0 and not spec.conditional:
            raise ValueError(f"{spec.name}: an auxiliary classifier (ac_weight > 0) needs a conditional generator")
        self.spec = spec
        self.num_classes = num_classes
        self.policy = parse_policy(diffaug)
        self.device_type = device_type
        self.autocast_dtype = autocast_dtype

    # ---- helpers ---------------------------------------------------------------------------------
    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.autocast_dtype)

    def _augment(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return diff_augment(x, self.policy, gen) if self.policy else x

    def _critic(self, D: nn.Module, x: torch.Tensor, y: torch.Tensor | None, low: bool = False) -> dict:
        """D's heads (low: its unconditional low-resolution score, UTLO), cast to fp32 so losses and statistics
        are computed in full precision."""
        with self.autocast():
            out = D(x, None, low=True) if low else D(x, y)
        return {k: v.float() for k, v in out.items()}

    def fakes(self, G: nn.Module, latent: Latent) -> tuple[torch.Tensor, torch.Tensor | None]:
        """G's images of `latent` in fp32, and (UTLO, utlo_alpha > 0) its unconditional low-resolution images,
        else None. Under torch.no_grad() for a critic step."""
        with self.autocast():
            out = G(latent.z, latent.y, low_res=True) if self.spec.utlo_alpha > 0 else (G(latent.z, latent.y), None)
        return out[0].float(), (None if out[1] is None else out[1].float())

    def _with_low(self, adv: torch.Tensor, adv_low: torch.Tensor) -> torch.Tensor:
        a = self.spec.utlo_alpha
        return (adv + a * adv_low) / (1 + a)

    def _required_low(self, fake_low: torch.Tensor | None) -> torch.Tensor:
        if fake_low is None:
            raise ValueError(f"{self.spec.name}: utlo_alpha > 0 scores low-resolution images too: pass fake_low "
                             "(GANObjective.fakes)")
        return fake_low

    def _low_scores(self, D: nn.Module, x_low: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return self._critic(D, self._augment(x_low, gen), None, low=True)["adv"]

    def _info_loss(self, out: dict, latent: Latent) -> torch.Tensor | None:
        s = self.spec
        if s.info_weight <= 0 or (s.info_cat <= 0 and s.info_cont <= 0):
            return None
        loss = 0.0
        if s.info_cat > 0:
            loss = loss + F.cross_entropy(out["q_cat"], latent.cat)
        if s.info_cont > 0:
            loss = loss + F.mse_loss(out["q_cont"], latent.cont)
        return s.info_weight * loss

    # ---- losses ----------------------------------------------------------------------------------
    def critic_loss(self, D: nn.Module, real: torch.Tensor, y_real: torch.Tensor, fake: torch.Tensor,
                    latent: Latent, gen: torch.Generator, grad_scale: float | None = None, step: int = 0,
                    fake_low: torch.Tensor | None = None):
        """(loss, stats) of one critic step. `fake` (and `fake_low`, UTLO's low-resolution images: `fakes`) should
        be detached. `grad_scale`: the fp16 GradScaler's current scale (the penalty's inner gradient is taken of
        scaled outputs, then unscaled). `step`: the critic step, which decides whether a lazy penalty (gp_every >
        1) is due."""
        s = self.spec
        y_fake_d = latent.y if latent.y is not None else y_real  # projection critic needs some label
        real_in, fake_in = self._augment(real, gen), self._augment(fake, gen)
        out_r = self._critic(D, real_in, y_real)
        out_f = self._critic(D, fake_in, y_fake_d)
        loss = self.critic_adversarial(out_r["adv"], out_f["adv"])
        stats = {"wdist": (out_r["adv"].mean() - out_f["adv"].mean()).detach()}
        if s.utlo_alpha > 0:
            fake_low = self._required_low(fake_low)
            real_low = F.avg_pool2d(real, real.shape[-1] // fake_low.shape[-1])
            low = self.critic_adversarial(self._low_scores(D, real_low, gen), self._low_scores(D, fake_low, gen))
            loss = self._with_low(loss, low)
            stats["utlo"] = low.detach()
        if (s.gp_lambda > 0 or s.r1_gamma > 0) and step % s.gp_every == 0:
            gp = 0.0
            if s.gp_lambda > 0:
                gp = s.gp_lambda * s.gp_every * self.gradient_penalty(D, real_in, fake_in, y_real, gen, grad_scale)
            if s.r1_gamma > 0:
                gp = gp + s.r1_gamma / 2 * s.gp_every * self.r1_penalty(D, real_in, y_real, grad_scale)
            loss = loss + gp
            stats["gp"] = gp.detach()
        if s.ac_weight > 0:
            on_fakes = out_f["cls_twin"] if s.ac_twin else out_f["cls"]
            loss = loss + s.ac_weight * (F.cross_entropy(out_r["cls"], y_real) + F.cross_entropy(on_fakes, latent.y))
            stats["ac_acc_real"] = (out_r["cls"].argmax(1) == y_real).float().mean()
            stats["ac_acc_fake"] = (out_f["cls"].argmax(1) == latent.y).float().mean()
        info = self._info_loss(out_f, latent)
        if info is not None:
            loss = loss + info
            stats["info_loss"] = info.detach()
        stats["d_loss"] = loss.detach()
        return loss, stats

    def critic_adversarial(self, adv_real: torch.Tensor, adv_fake: torch.Tensor) -> torch.Tensor:
        """The critic's adversarial loss (spec.adversarial) from its scores on real and generated images."""
        kind = self.spec.adversarial
        if kind == "wasserstein":
            return adv_fake.mean() - adv_real.mean()
        if kind == "hinge":
            return F.relu(1 - adv_real).mean() + F.relu(1 + adv_fake).mean()
        return (F.binary_cross_entropy_with_logits(adv_real, torch.ones_like(adv_real))
                + F.binary_cross_entropy_with_logits(adv_fake, torch.zeros_like(adv_fake)))

    def generator_adversarial(self, adv_fake: torch.Tensor) -> torch.Tensor:
        """The generator's adversarial loss (spec.adversarial) from the critic's scores on its images."""
        if self.spec.adversarial == "bce":
            return F.binary_cross_entropy_with_logits(adv_fake, torch.ones_like(adv_fake))
        return -adv_fake.mean()   # wasserstein and hinge alike

    def _input_gradient_norms(self, D: nn.Module, x: torch.Tensor, y: torch.Tensor | None,
                              grad_scale: float | None) -> torch.Tensor:
        """[B] ||grad_x D(x)["adv"]||_2 per sample, with the graph kept (create_graph) for the critic's backward."""
        x = x.detach().requires_grad_(True)
        out = self._critic(D, x, y)["adv"].sum()
        if grad_scale is not None:  # fp16: scale so small gradients do not underflow, unscale after
            (g,) = torch.autograd.grad(out * grad_scale, x, create_graph=True)
            g = g / grad_scale
        else:
            (g,) = torch.autograd.grad(out, x, create_graph=True)
        return g.float().flatten(1).norm(2, dim=1)

    def gradient_penalty(self, D: nn.Module, real: torch.Tensor, fake: torch.Tensor, y: torch.Tensor | None,
                         gen: torch.Generator, grad_scale: float | None = None) -> torch.Tensor:
        """E[(||grad_x D(x_hat)|| - 1)^2] (without lambda), differentiable w.r.t. D's parameters."""
        eps = torch.rand(real.shape[0], 1, 1, 1, generator=gen, device=gen.device).to(real.device, real.dtype)
        x_hat = eps * real.detach() + (1 - eps) * fake.detach()
        return ((self._input_gradient_norms(D, x_hat, y, grad_scale) - 1) ** 2).mean()

    def r1_penalty(self, D: nn.Module, real: torch.Tensor, y: torch.Tensor | None,
                   grad_scale: float | None = None) -> torch.Tensor:
        """E[||grad_x D(real)||^2] (without gamma / 2), differentiable w.r.t. D's parameters."""
        return (self._input_gradient_norms(D, real, y, grad_scale) ** 2).mean()

    def generator_loss(self, D: nn.Module, fake: torch.Tensor, latent: Latent, gen: torch.Generator,
                       y_for_critic: torch.Tensor | None = None, G: nn.Module | None = None,
                       fake_low: torch.Tensor | None = None):
        """(loss, stats) of one generator step; `fake` = G(latent.z, latent.y) with its graph (and `fake_low`,
        UTLO's low-resolution images: `fakes`); `G` (unwrapped): the generator, for the spec's regularisers of its
        weights (gsr_weight)."""
        s = self.spec
        y_d = latent.y if latent.y is not None else y_for_critic
        out = self._critic(D, self._augment(fake, gen), y_d)
        loss = self.generator_adversarial(out["adv"])
        if s.utlo_alpha > 0:
            low = self._low_scores(D, self._required_low(fake_low), gen)
            loss = self._with_low(loss, self.generator_adversarial(low))
        stats = {}
        if s.ac_weight > 0:
            ac = F.cross_entropy(out["cls"], latent.y)
            if s.ac_twin:
                ac = ac - F.cross_entropy(out["cls_twin"], latent.y)
            loss = loss + s.ac_weight * ac
        info = self._info_loss(out, latent)
        if info is not None:
            loss = loss + info
        if s.mode_seeking > 0:
            ratio = mode_seeking_ratio(fake, latent.z[:, :s.z_dim])
            loss = loss + s.mode_seeking / (ratio + MS_EPS)
            stats["ms_ratio"] = ratio.detach()
        if s.gsr_weight > 0:
            if G is None:
                raise ValueError(f"{s.name}: gsr_weight > 0 regularises the generator's weights: pass G")
            gsr = gsr_penalty(G, latent.y, s.gsr_groups)
            loss = loss + s.gsr_weight * gsr
            stats["gsr"] = gsr.detach()
        if s.noisy_twins > 0:
            mapping = class_noise_mapping(G) if G is not None else None
            if mapping is None:
                raise ValueError(f"{s.name}: noisy_twins > 0 regularises the generator's class mapping: pass G")
            w = mapping(latent.z, latent.y).float()
            half = w.shape[0] // 2
            bt = barlow_twins_loss(w[:half], w[half:])
            loss = loss + s.noisy_twins * bt
            stats["twins"] = bt.detach()
        stats["g_loss"] = loss.detach()
        return loss, stats

    @torch.no_grad()
    def clip_critic(self, D: nn.Module) -> None:
        """WGAN weight clipping, after the critic's optimiser step."""
        if self.spec.clip > 0:
            for p in D.parameters():
                p.clamp_(-self.spec.clip, self.spec.clip)


def gsr_penalty(G: nn.Module, y: torch.Tensor, groups: int) -> torch.Tensor:
    """Group spectral regularisation (gSR, Rangwani et al. ECCV 2022): for every class-conditional batch norm of
    G and every class in the batch `y`, the class's gain deviation (gain - 1: the identity is the unconditioned
    layer) and its bias, each a C-vector grouped into a [groups, C / groups] matrix, add their largest singular
    value squared; the mean over the batch's classes, summed over layers. Penalising it spreads a class's
    conditioning over many directions instead of a few, which is what collapses a tail class onto one mode."""
    from hpcgan.models.blocks import ConditionalBatchNorm2d
    classes = torch.unique(y)
    total = None
    for m in G.modules():
        if not isinstance(m, ConditionalBatchNorm2d):
            continue
        channels = m.gain.weight.shape[1]
        if channels % groups:
            raise ValueError(f"gsr_groups={groups} does not divide a conditional batch norm's {channels} channels")
        for vectors in (m.gain(classes) - 1.0, m.bias(classes)):
            sigma = torch.linalg.matrix_norm(vectors.float().reshape(len(classes), groups, -1), ord=2)
            term = sigma.square().mean()
            total = term if total is None else total + term
    if total is None:
        raise ValueError("gsr_penalty: the generator has no class-conditional batch norm")
    return total


def barlow_twins_loss(a: torch.Tensor, b: torch.Tensor, off_diagonal: float = BT_OFF_DIAGONAL) -> torch.Tensor:
    """Barlow Twins (Zbontar et al. 2021) between two [N, D] batches of twins: each dimension standardised over
    the batch (mean 0, std 1, biased), C = a^T b / N, loss = sum_i (1 - C_ii)^2 + off_diagonal * sum_{i!=j} C_ij^2."""
    if a.shape != b.shape or a.dim() != 2 or a.shape[0] < 2:
        raise ValueError(f"barlow_twins_loss needs two [N >= 2, D] batches of one shape, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")

    def standardise(x):
        return (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + 1e-5)

    c = standardise(a).T @ standardise(b) / a.shape[0]
    on = torch.diagonal(c)
    return (1 - on).square().sum() + off_diagonal * (c.square().sum() - on.square().sum())


def mode_seeking_ratio(images: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """MSGAN's ratio mean|x1 - x2| / mean|z1 - z2| between the two halves of a paired batch (image i and
    i + B/2 were made from the same label and codes, different noise: sample_latent(pairs=True))."""
    half = images.shape[0] // 2
    if images.shape[0] != 2 * half or half == 0:
        raise ValueError(f"mode seeking needs a paired batch of even size >= 2, got {images.shape[0]}")
    x1, x2 = images[:half], images[half:]
    z1, z2 = noise[:half], noise[half:]
    return (x1 - x2).abs().mean() / (z1 - z2).abs().mean()
