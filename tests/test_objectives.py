"""The spec-driven GAN objective: gradient penalty, auxiliary classifier stats, InfoGAN codes, clipping."""
import pytest
import torch
import torch.nn as nn

from hpcgan.augment import diff_augment, parse_policy
from hpcgan.latent import sample_latent
from hpcgan.models.registry import GANSpec
from hpcgan.objectives import GANObjective

C, S = 3, 8


class LinearCritic(nn.Module):
    """D(x) = <w, x> (+ heads): its input gradient is w everywhere, so ||grad|| = ||w||."""

    def __init__(self, scale: float, cls: bool = False, q_cat: int = 0, q_cont: int = 0, twin: bool = False):
        super().__init__()
        w = torch.randn(3 * S * S)
        self.w = nn.Parameter(w / w.norm() * scale)
        self.cls = nn.Linear(3 * S * S, C) if cls else None
        self.cls_twin = nn.Linear(3 * S * S, C) if twin else None
        self.q_cat = nn.Linear(3 * S * S, q_cat) if q_cat else None
        self.q_cont = nn.Linear(3 * S * S, q_cont) if q_cont else None

    def forward(self, x, y=None):
        f = x.flatten(1)
        out = {"adv": f @ self.w}
        for name in ("cls", "cls_twin", "q_cat", "q_cont"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)(f)
        return out


def _spec(**kw) -> GANSpec:
    return GANSpec(name="t", **{"gp_lambda": 10.0, "z_dim": 4, **kw})


def _batch(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, S, S, generator=g) * 2 - 1, torch.randint(0, C, (n,), generator=g)


def test_gp_zero_for_unit_gradient_positive_otherwise():
    obj = GANObjective(_spec(), C)
    real, _ = _batch()
    fake, _ = _batch(seed=1)
    g = torch.Generator().manual_seed(0)
    assert obj.gradient_penalty(LinearCritic(1.0), real, fake, None, g).item() == pytest.approx(0.0, abs=1e-8)
    assert obj.gradient_penalty(LinearCritic(3.0), real, fake, None, g).item() == pytest.approx(4.0, rel=1e-4)
    assert obj.gradient_penalty(LinearCritic(0.5), real, fake, None, g).item() == pytest.approx(0.25, rel=1e-4)


def test_gp_with_grad_scale_matches_unscaled():
    """The fp16 pattern (scale the output given to autograd.grad, unscale the gradient) is the same penalty."""
    obj = GANObjective(_spec(), C)
    real, _ = _batch()
    fake, _ = _batch(seed=1)
    D = LinearCritic(2.0)
    a = obj.gradient_penalty(D, real, fake, None, torch.Generator().manual_seed(0))
    b = obj.gradient_penalty(D, real, fake, None, torch.Generator().manual_seed(0), grad_scale=65536.0)
    assert torch.allclose(a, b, rtol=1e-5)


def test_critic_loss_backward_reaches_critic_through_penalty():
    obj = GANObjective(_spec(), C)
    D = LinearCritic(2.0)
    real, y = _batch()
    fake, _ = _batch(seed=1)
    lat = sample_latent(obj.spec, 16, torch.Generator().manual_seed(0), num_classes=C)
    loss, stats = obj.critic_loss(D, real, y, fake, lat, torch.Generator().manual_seed(1))
    loss.backward()
    assert D.w.grad is not None and D.w.grad.abs().sum() > 0
    assert stats["gp"] > 0
    assert stats["wdist"].item() == pytest.approx((real.flatten(1) @ D.w - fake.flatten(1) @ D.w).mean().item(), rel=1e-5)


def test_ac_accuracy_stats_in_unit_interval_and_correct():
    obj = GANObjective(_spec(ac_weight=1.0, conditional=True), C)
    D = LinearCritic(1.0, cls=True)
    real, y = _batch()
    fake, _ = _batch(seed=1)
    lat = sample_latent(obj.spec, 16, torch.Generator().manual_seed(0), num_classes=C)
    _, stats = obj.critic_loss(D, real, y, fake, lat, torch.Generator().manual_seed(1))
    for k in ("ac_acc_real", "ac_acc_fake"):
        assert 0.0 <= stats[k].item() <= 1.0
    with torch.no_grad():
        expected = (D.cls(real.flatten(1)).argmax(1) == y).float().mean()
    assert stats["ac_acc_real"].item() == pytest.approx(expected.item())


def test_ac_needs_conditional_generator():
    with pytest.raises(ValueError, match="conditional"):
        GANObjective(_spec(ac_weight=1.0, conditional=False), C)


def test_info_codes_shapes_and_loss():
    spec = _spec(info_cat=5, info_cont=2, info_weight=1.0, conditional=False, gp_lambda=0.0)
    obj = GANObjective(spec, C)
    lat = sample_latent(obj.spec, 16, torch.Generator().manual_seed(0), num_classes=C)
    assert lat.z.shape == (16, spec.latent_dim) == (16, 4 + 5 + 2)
    assert lat.y is None and lat.cat.shape == (16,) and lat.cont.shape == (16, 2)
    onehot = lat.z[:, 4:9]
    assert torch.equal(onehot.argmax(1), lat.cat) and torch.equal(onehot.sum(1), torch.ones(16))
    assert torch.equal(lat.z[:, 9:], lat.cont) and lat.cont.abs().max() <= 1
    D = LinearCritic(1.0, q_cat=5, q_cont=2)
    fake, _ = _batch(seed=1)
    loss, stats = obj.generator_loss(D, fake, lat, torch.Generator())
    assert stats["g_loss"].isfinite() and "info_loss" not in stats  # info loss is logged from the critic step
    real, y = _batch()
    _, dstats = obj.critic_loss(D, real, y, fake, lat, torch.Generator())
    assert dstats["info_loss"] > 0


def test_conditional_labels_uniform_over_classes():
    obj = GANObjective(_spec(conditional=True), C)
    lat = sample_latent(obj.spec, 3000, torch.Generator().manual_seed(0), num_classes=C)
    counts = torch.bincount(lat.y, minlength=C)
    assert counts.min() > 900 and lat.y.max() < C


@pytest.mark.parametrize("adversarial", ["wasserstein", "bce", "hinge"])
def test_generator_loss_signs(adversarial):
    """A critic that scores fakes higher gives the generator a lower loss."""
    obj = GANObjective(_spec(adversarial=adversarial, gp_lambda=0.0), C)
    lat = sample_latent(obj.spec, 16, torch.Generator().manual_seed(0), num_classes=C)
    fake = torch.ones(16, 3, S, S)
    hi, lo = LinearCritic(1.0), LinearCritic(1.0)
    with torch.no_grad():
        hi.w.abs_()
        lo.w.copy_(-hi.w)
    l_hi, _ = obj.generator_loss(hi, fake, lat, torch.Generator())
    l_lo, _ = obj.generator_loss(lo, fake, lat, torch.Generator())
    assert l_hi < l_lo


def test_weight_clipping():
    obj = GANObjective(_spec(clip=0.01, gp_lambda=0.0), C)
    D = LinearCritic(100.0)
    obj.clip_critic(D)
    assert D.w.abs().max().item() <= 0.01 + 1e-9


def test_diffaugment_deterministic_and_differentiable():
    policy = parse_policy("color,translation,cutout")
    x = torch.rand(4, 3, 16, 16, requires_grad=True)
    a = diff_augment(x, policy, torch.Generator().manual_seed(3))
    b = diff_augment(x, policy, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == x.shape and not torch.equal(a, x)
    a.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert parse_policy(["color", "cutout"]) == ("color", "cutout")
    with pytest.raises(ValueError, match="unknown policy"):
        parse_policy("colour")


def test_lazy_penalty_every_k_steps_weighted_by_k():
    """gp_every=k: no penalty on steps that are not multiples of k; k*lambda*penalty on those that are."""
    D = LinearCritic(3.0)  # ||grad|| = 3 everywhere: penalty (3-1)^2 = 4
    real, y = _batch()
    fake, _ = _batch(seed=1)
    every = GANObjective(_spec(), C)
    lazy = GANObjective(_spec(gp_every=4), C)
    lat = sample_latent(every.spec, 16, torch.Generator().manual_seed(0), num_classes=C)
    g = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    _, s_every = every.critic_loss(D, real, y, fake, lat, g(), step=5)
    assert s_every["gp"].item() == pytest.approx(10.0 * 4.0, rel=1e-4)
    loss_skip, s_skip = lazy.critic_loss(D, real, y, fake, lat, g(), step=5)
    assert "gp" not in s_skip
    assert loss_skip.item() == pytest.approx(s_every["d_loss"].item() - s_every["gp"].item(), rel=1e-4, abs=1e-4)
    _, s_due = lazy.critic_loss(D, real, y, fake, lat, g(), step=8)
    assert s_due["gp"].item() == pytest.approx(4 * 10.0 * 4.0, rel=1e-4)


def test_gp_every_must_be_positive():
    with pytest.raises(ValueError, match="gp_every"):
        GANSpec.from_config({"name": "t", "gp_lambda": 10.0, "gp_every": 0})


def test_twin_classifier_losses():
    """TAC-GAN: the critic trains cls on real images and cls_twin on generated ones; the generator minimises
    CE(cls(fake), y) - CE(cls_twin(fake), y)."""
    import torch.nn.functional as F
    spec = _spec(gp_lambda=0.0, ac_weight=1.0, ac_twin=True)
    obj = GANObjective(spec, C)
    D = LinearCritic(1.0, cls=True, twin=True)
    real, y = _batch()
    fake, _ = _batch(seed=1)
    lat = sample_latent(obj.spec, 16, torch.Generator().manual_seed(0), num_classes=C)
    loss, stats = obj.critic_loss(D, real, y, fake, lat, torch.Generator().manual_seed(1))
    adv = (fake.flatten(1) @ D.w).mean() - (real.flatten(1) @ D.w).mean()
    expect = adv + F.cross_entropy(D.cls(real.flatten(1)), y) + F.cross_entropy(D.cls_twin(fake.flatten(1)), lat.y)
    assert loss.item() == pytest.approx(expect.item(), rel=1e-5)
    # the accuracy on generated images is the real-image classifier's (does it recognise the asked class?)
    assert stats["ac_acc_fake"].item() == pytest.approx(
        (D.cls(fake.flatten(1)).argmax(1) == lat.y).float().mean().item())
    g_loss, _ = obj.generator_loss(D, fake, lat, torch.Generator().manual_seed(2))
    f = fake.flatten(1)
    expect_g = -(f @ D.w).mean() + F.cross_entropy(D.cls(f), lat.y) - F.cross_entropy(D.cls_twin(f), lat.y)
    assert g_loss.item() == pytest.approx(expect_g.item(), rel=1e-5)


def test_twin_needs_a_classifier():
    with pytest.raises(ValueError, match="ac_twin needs an auxiliary classifier"):
        GANSpec.from_config({"name": "t", "ac_twin": True})


def test_mode_seeking_ratio_known_answer():
    """MSGAN's ratio: mean |x1 - x2| over mean |z1 - z2|, between the two halves of a paired batch."""
    from hpcgan.objectives import mode_seeking_ratio
    x = torch.zeros(4, 3, S, S)
    x[2:] = 0.5                                   # every pixel differs by 0.5 between the pairs
    z = torch.zeros(4, 4)
    z[2:] = 2.0                                   # every noise value differs by 2
    assert mode_seeking_ratio(x, z).item() == pytest.approx(0.25)
    assert mode_seeking_ratio(torch.ones(4, 3, S, S), z).item() == 0.0   # a collapsed pair: ratio 0
    with pytest.raises(ValueError, match="even"):
        mode_seeking_ratio(x[:3], z[:3])


def test_mode_seeking_term_in_generator_loss_only():
    """mode_seeking = w adds w / (ratio + 1e-5) to the generator loss on the paired batch (not the noise codes),
    logs the ratio, and leaves the critic's loss alone; a collapsed generator pays about w * 1e5."""
    from hpcgan.objectives import MS_EPS, mode_seeking_ratio
    spec = _spec(gp_lambda=0.0, conditional=True, mode_seeking=2.0, info_cont=1, info_weight=0.0)
    obj, plain = GANObjective(spec, C), GANObjective(_spec(gp_lambda=0.0, conditional=True, info_cont=1), C)
    D = LinearCritic(1.0)
    lat = sample_latent(spec, 16, torch.Generator().manual_seed(0), num_classes=C, pairs=True)
    fake, _ = _batch(seed=1)
    loss, stats = obj.generator_loss(D, fake, lat, torch.Generator().manual_seed(2))
    base, _ = plain.generator_loss(D, fake, lat, torch.Generator().manual_seed(2))
    ratio = mode_seeking_ratio(fake, lat.z[:, :4])
    assert stats["ms_ratio"].item() == pytest.approx(ratio.item())
    assert loss.item() == pytest.approx(base.item() + 2.0 / (ratio.item() + MS_EPS), rel=1e-5)
    real, y = _batch(seed=3)
    d_ms, _ = obj.critic_loss(D, real, y, fake, lat, torch.Generator().manual_seed(4))
    d_plain, _ = plain.critic_loss(D, real, y, fake, lat, torch.Generator().manual_seed(4))
    assert d_ms.item() == pytest.approx(d_plain.item())
    collapsed, _ = obj.generator_loss(D, fake[:1].expand(16, -1, -1, -1), lat, torch.Generator().manual_seed(2))
    assert collapsed.item() > 1e5


def test_mode_seeking_must_not_be_negative():
    with pytest.raises(ValueError, match="mode_seeking"):
        GANSpec.from_config({"name": "t", "mode_seeking": -1.0})
