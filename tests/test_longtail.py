"""Long-tail options of the class-conditional generators (issue 20): group spectral regularisation (gSR,
model.gsr_weight), class conditioning only from a resolution up (model.class_from, UTLO's generator half) and
the rest of UTLO (model.utlo_alpha: the unconditional layers' low-resolution image and the critic's unconditional
low-resolution path), NoisyTwins (model.noisy_twins) and BAGAN's autoencoder initialisation (model.ae_init); known
answers, and each under torchrun on 2 ranks with a bit-exact resume like every model."""
from __future__ import annotations

import dataclasses
import math
import os
import signal
import subprocess

import pytest
import torch
import torch.nn.functional as F

from hpcgan.models.blocks import ConditionalBatchNorm2d, PlainBatchNorm2d
from hpcgan.latent import sample_latent
from hpcgan.dist import DistEnv
from hpcgan.models.bagan import AutoencoderStopped, LatentPrior, PriorGenerator, autoencoder_init
from hpcgan.models.registry import GANSpec, build_model, load_spec
from hpcgan.models.twins import TWIN_DIM, class_noise_mapping, fit_class_noise
from hpcgan.objectives import GANObjective, barlow_twins_loss, gsr_penalty
from hpcgan.settings import SettingsError
from hpcgan.train import _check_compatible

from test_train import (ENV, _children, _rank_of, _wait_for, assert_same_weights, cli,  # noqa: F401  (fixture)
                        shards_with_an_empty_class, status)


def test_gsr_penalty_known_answer():
    """Two classes, 4 channels in 2 groups. Class 0: gain deviation [1,0,0,0] -> [[1,0],[0,0]], sigma 1; bias 0.
    Class 1: deviation [1,1,1,1] -> [[1,1],[1,1]], sigma 2; bias [3,4,0,0] -> [[3,4],[0,0]], sigma 5.
    Batch labels [0, 1, 1] (classes 0 and 1 once each): mean(1, 4) + mean(0, 25) = 15."""
    norm = ConditionalBatchNorm2d(4, 3)
    with torch.no_grad():
        norm.gain.weight[:] = torch.tensor([[2., 1, 1, 1], [2, 2, 2, 2], [9, 9, 9, 9]])
        norm.bias.weight[:] = torch.tensor([[0., 0, 0, 0], [3, 4, 0, 0], [9, 9, 9, 9]])
    G = torch.nn.Sequential(norm)
    pen = gsr_penalty(G, torch.tensor([0, 1, 1]), groups=2)
    assert pen.item() == pytest.approx(15.0, abs=1e-5)
    pen.backward()
    assert norm.gain.weight.grad[2].abs().sum() == 0 and norm.gain.weight.grad[1].abs().sum() > 0
    with pytest.raises(ValueError, match="does not divide"):
        gsr_penalty(G, torch.tensor([0]), groups=3)


def test_class_from_leaves_low_resolutions_unconditional():
    """dcgan_cbn at 32 px with class_from=16: the 4x4 and 8x8 layers neither see the label nor differ by it,
    the 16x16 layer does, and so do the images."""
    spec = dataclasses.replace(load_spec("cellgan"), width=8, z_dim=16, class_from=16)
    G, _ = build_model(spec, 3, 32)
    kinds = [type(n) for n in G.norms]
    assert kinds == [PlainBatchNorm2d, PlainBatchNorm2d, ConditionalBatchNorm2d] and G.embed is None
    seen = {}
    G.norms[1].register_forward_hook(lambda m, i, o: seen.__setitem__("8x8", o.detach().clone()))
    G.eval()
    z = torch.randn(2, spec.latent_dim)
    a = G(z, torch.tensor([0, 0]))
    low_a = seen["8x8"]
    b = G(z, torch.tensor([1, 1]))
    assert torch.equal(low_a, seen["8x8"]) and not torch.equal(a, b)


def utlo_spec(model: str = "cellgan", **kw) -> GANSpec:
    return GANSpec.from_config({**dataclasses.asdict(load_spec(model)), "width": 8, "z_dim": 16, "class_from": 16,
                                "utlo_alpha": 3.0, **kw})


@pytest.mark.parametrize("model", ["cellgan", "sngan_proj"])
def test_utlo_low_resolution_image_is_unconditional(model):
    """With class_from=16 at 32 px, G(z, y, low_res=True) also returns the 8x8 image of its unconditional layers:
    the same for any label, while the 32 px image is the plain forward's and depends on it. The critic's
    low-resolution path scores it without the label."""
    torch.manual_seed(0)
    G, D = build_model(utlo_spec(model), 3, 32)
    G.eval()
    D.eval()
    z = torch.randn(2, G.latent_dim)
    a, low_a = G(z, torch.tensor([0, 0]), low_res=True)
    b, low_b = G(z, torch.tensor([2, 2]), low_res=True)
    assert low_a.shape == (2, 3, 8, 8) and torch.equal(low_a, low_b)
    assert torch.equal(a, G(z, torch.tensor([0, 0]))) and not torch.equal(a, b)
    out = D(low_a, torch.tensor([0, 1]), low=True)
    assert set(out) == {"adv"} and out["adv"].shape == (2,)
    assert torch.equal(out["adv"], D(low_a, None, low=True)["adv"])


def test_utlo_objective_known_answer():
    """alpha = 3: each side's adversarial loss is 1/4 of the conditional one on 32 px images plus 3/4 of the
    unconditional one on 8 px images (the real ones average-pooled 4x4), the auxiliary classifier's terms
    unweighted, as computed here from the same networks by hand (no DiffAugment, so no randomness)."""
    torch.manual_seed(0)
    spec = utlo_spec()
    G, D = build_model(spec, 3, 32)
    obj = GANObjective(spec, 3, diffaug=None)
    lat = sample_latent(spec, 6, torch.Generator().manual_seed(1), num_classes=3)
    real, y = torch.rand(6, 3, 32, 32) * 2 - 1, torch.tensor([0, 1, 2, 0, 1, 2])
    with torch.no_grad():
        fake, fake_low = obj.fakes(G, lat)
    loss, stats = obj.critic_loss(D, real, y, fake, lat, torch.Generator(), fake_low=fake_low)

    def bce(logits, target):
        return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))

    r, f = D(real, y), D(fake, lat.y)
    rl, fl = D(F.avg_pool2d(real, 4), None, low=True)["adv"], D(fake_low, None, low=True)["adv"]
    adv, adv_low = bce(r["adv"], 1) + bce(f["adv"], 0), bce(rl, 1) + bce(fl, 0)
    ac = 0.5 * (F.cross_entropy(r["cls"], y) + F.cross_entropy(f["cls"], lat.y))
    assert loss.item() == pytest.approx((adv / 4 + 3 * adv_low / 4 + ac).item(), rel=1e-5)
    assert stats["utlo"].item() == pytest.approx(adv_low.item(), rel=1e-5)

    fake, fake_low = obj.fakes(G, lat)
    g_loss, _ = obj.generator_loss(D, fake, lat, torch.Generator(), G=G, fake_low=fake_low)
    f = D(fake, lat.y)
    expected = (bce(f["adv"], 1) + 3 * bce(D(fake_low, None, low=True)["adv"], 1)) / 4 + 0.5 * F.cross_entropy(
        f["cls"], lat.y)
    assert g_loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()     # the critic's low-resolution term trains its own input conv and head
    assert D.from_rgb_low[0].weight.grad.abs().sum() > 0 and D.heads.adv_low.weight.grad.abs().sum() > 0

    G.zero_grad()       # the generator's low-resolution term alone reaches the unconditional layers only
    fake, fake_low = obj.fakes(G, lat)
    bce(D(fake_low, None, low=True)["adv"], 1).backward()
    assert G.to_rgb_low[0].weight.grad.abs().sum() > 0 and G.convs[0].weight.grad.abs().sum() > 0
    assert G.norms[2].gain.weight.grad is None and G.to_rgb[0].weight.grad is None


@pytest.mark.parametrize("size", [32, 64, 128])
@pytest.mark.parametrize("generator, critic", [("dcgan_cbn", "dcgan"), ("resnet_cbn", "resnet"),
                                               ("resnet_cbn", "sngan")])
def test_utlo_low_image_enters_the_critic_where_its_trunk_has_that_size(size, generator, critic):
    """For every class_from that leaves a conditional layer, the low image is at the largest power of two below
    class_from, and the critic's low-resolution input conv gives features of exactly the shape its trunk has at
    the stage where the low path joins it; a class_from that leaves no conditional layer is refused."""
    last = size // 2 if generator == "dcgan_cbn" else size   # the highest resolution with a batch norm
    for class_from in (8, 12, 16, 32, 64, 128, 256):
        spec = dataclasses.replace(load_spec("cellgan"), generator=generator, critic=critic, width=4, z_dim=8,
                                   critic_norm="none", class_from=class_from, utlo_alpha=1.0)
        if class_from > last:
            with pytest.raises(ValueError, match="leaves no class-conditional layer"):
                build_model(spec, 3, size)
            continue
        G, D = build_model(spec, 3, size)
        img, low = G(torch.randn(2, spec.latent_dim), torch.tensor([0, 1]), low_res=True)
        expected = 2 ** (math.ceil(math.log2(class_from)) - 1)
        assert low.shape == (2, 3, expected, expected) and img.shape == (2, 3, size, size)
        trunk = D.net[:D.low_from](img) if critic == "dcgan" else D.blocks[:D.low_from](D.stem(img))
        assert D.from_rgb_low(low).shape == trunk.shape
        assert D(low, None, low=True)["adv"].shape == (2,)


def test_utlo_is_refused_where_it_cannot_act(tmp_path):
    with pytest.raises(SettingsError, match="set class_from too"):
        utlo_spec(class_from=0)
    with pytest.raises(SettingsError, match="utlo_alpha"):
        utlo_spec(utlo_alpha=-1.0)
    with pytest.raises(SettingsError, match="unbounded"):
        utlo_spec(adversarial="wasserstein", gp_lambda=10.0, critic_norm="none")
    on = {"model": {**dataclasses.asdict(utlo_spec())}}
    with pytest.raises(ValueError, match=r"model.utlo_alpha > 0: False -> True"):   # resume cannot switch it
        _check_compatible({"model": {**on["model"], "utlo_alpha": 0.0}}, on, tmp_path)
    _check_compatible({"model": {**on["model"], "utlo_alpha": 0.5}}, on, tmp_path)   # its weight may change
    G, D = build_model(dataclasses.replace(load_spec("cellgan"), width=8, class_from=16), 3, 32)
    with pytest.raises(ValueError, match="utlo_alpha > 0"):
        G(torch.randn(1, G.latent_dim), torch.tensor([0]), low_res=True)
    with pytest.raises(ValueError, match="utlo_alpha > 0"):
        D(torch.rand(1, 3, 8, 8), None, low=True)
    spec = utlo_spec()
    G, D = build_model(spec, 3, 32)
    lat = sample_latent(spec, 2, torch.Generator(), num_classes=3)
    with pytest.raises(ValueError, match="pass fake_low"):
        GANObjective(spec, 3).critic_loss(D, torch.rand(2, 3, 32, 32), lat.y, torch.rand(2, 3, 32, 32), lat,
                                          torch.Generator())


def twins_spec(**kw) -> GANSpec:
    return GANSpec.from_config({**dataclasses.asdict(load_spec("cellgan")), "width": 8, "z_dim": 16,
                                "noisy_twins": 0.01, **kw})


def test_barlow_twins_loss_known_answer():
    """Four samples of two standardised, uncorrelated dimensions: C = I for identical twins (loss 0), -I for
    opposite twins ((1 - -1)^2 twice: 8), the swap [[0, 1], [1, 0]] for swapped dimensions (1 + 1 on the
    diagonal, 0.05 * (1 + 1) off it: 2.1)."""
    a = torch.tensor([[1., 1], [-1, -1], [1, -1], [-1, 1]])
    assert barlow_twins_loss(a, a).item() == pytest.approx(0.0, abs=1e-4)
    assert barlow_twins_loss(a, -a).item() == pytest.approx(8.0, abs=1e-4)
    assert barlow_twins_loss(a, a[:, [1, 0]]).item() == pytest.approx(2.1, abs=1e-4)
    assert barlow_twins_loss(3 * a + 7, a).item() == pytest.approx(0.0, abs=1e-4)   # scale and shift free
    with pytest.raises(ValueError, match="batches of one shape"):
        barlow_twins_loss(a, a[:3])


def test_noisy_twins_noise_scales_with_the_effective_number_of_images():
    """sigma_c = 0.75 * E(n_c) / max E with E(n) = (1 - 0.99^n) / 0.01: 300 images -> 0.75, 20 -> 0.75 *
    0.18209 / 0.95096 = 0.14361, none -> 0; and a class with no noise makes the same cell for both twins."""
    G, _ = build_model(twins_spec(), 3, 32)
    fit_class_noise(G, [300, 20, 0])
    assert class_noise_mapping(G).class_sigma.tolist() == pytest.approx([0.75, 0.14361, 0.0], abs=1e-4)
    with pytest.raises(ValueError, match="one count per class"):
        fit_class_noise(G, [300, 20])
    G.eval()
    z = torch.randn(2, 16 + TWIN_DIM).repeat(2, 1)
    z[2:, 16:] = torch.randn(2, TWIN_DIM)           # twins: the same noise and class, other embedding noise
    x = G(z, torch.tensor([2, 0, 2, 0]))
    assert torch.equal(x[0], x[2]) and not torch.allclose(x[1], x[3])


def test_twin_latents_share_noise_and_class_and_append_the_embedding_noise():
    spec = twins_spec()
    assert spec.latent_dim == 16 + TWIN_DIM
    lat = sample_latent(spec, 6, torch.Generator().manual_seed(1), num_classes=5, twins=True)
    z, eps = lat.z[:, :16], lat.z[:, 16:]
    assert torch.equal(z[:3], z[3:]) and torch.equal(lat.y[:3], lat.y[3:]) and not torch.equal(eps[:3], eps[3:])
    # without twins the noise and labels are drawn as for the same model without NoisyTwins, eps after them
    plain = sample_latent(load_spec("cellgan"), 6, torch.Generator().manual_seed(1), num_classes=5)
    wide = GANSpec.from_config({**dataclasses.asdict(load_spec("cellgan")), "noisy_twins": 0.01})
    alone = sample_latent(wide, 6, torch.Generator().manual_seed(1), num_classes=5)
    assert torch.equal(alone.z[:, :128], plain.z) and torch.equal(alone.y, plain.y)
    with pytest.raises(ValueError, match="even batch"):
        sample_latent(spec, 5, torch.Generator(), num_classes=5, twins=True)
    with pytest.raises(ValueError, match="give no y"):
        sample_latent(spec, 4, torch.Generator(), y=torch.tensor([0, 1, 2, 3]), twins=True)


def test_noisy_twins_term_is_weighted_into_the_generator_loss_and_trains_the_mapping():
    """The same step at weights 0.01 and 0.03 differs by exactly 0.02 x the Barlow Twins term; the term's
    own gradient reaches the class embedding and the mapping, and nothing else of the generator."""
    spec = twins_spec()
    G, D = build_model(spec, 3, 32)
    lat = sample_latent(spec, 8, torch.Generator().manual_seed(0), num_classes=3, twins=True)

    def loss_at(weight):
        s = dataclasses.replace(spec, noisy_twins=weight)
        return GANObjective(s, 3).generator_loss(D, G(lat.z, lat.y), lat, torch.Generator().manual_seed(1), G=G)

    (low, stats), (high, _) = loss_at(0.01), loss_at(0.03)
    assert (high - low).item() == pytest.approx(0.02 * stats["twins"].item(), rel=1e-4) and stats["twins"] > 1
    G.zero_grad()
    barlow_twins_loss(*class_noise_mapping(G)(lat.z, lat.y).chunk(2)).backward()
    grads = {n for n, p in G.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert "mapping.embed.weight" in grads and grads <= {n for n, _ in G.named_parameters() if n.startswith("mapping.")}
    with pytest.raises(ValueError, match="pass G"):
        GANObjective(spec, 3).generator_loss(D, G(lat.z, lat.y), lat, torch.Generator())


def test_long_tail_options_are_refused_where_they_cannot_act():
    with pytest.raises(SettingsError, match="class-conditional batch norm"):
        GANSpec.from_config({**dataclasses.asdict(load_spec("cgan")), "gsr_weight": 0.5})
    spec = dataclasses.replace(load_spec("cellgan"), class_from=64)
    with pytest.raises(ValueError, match="leaves no class-conditional layer"):
        build_model(spec, 3, 32)
    with pytest.raises(SettingsError, match="changes nothing"):
        GANSpec.from_config({**dataclasses.asdict(load_spec("cellgan")), "class_from": 4})
    spec = dataclasses.replace(load_spec("cellgan"), width=8, gsr_weight=0.5, gsr_groups=3)
    with pytest.raises(ValueError, match="must divide the channels"):   # at build, before any step
        build_model(spec, 3, 32)
    with pytest.raises(SettingsError, match="class-embedding mapping"):
        GANSpec.from_config({**dataclasses.asdict(load_spec("acgan")), "noisy_twins": 0.01})
    with pytest.raises(SettingsError, match="mode_seeking"):
        twins_spec(mode_seeking=1.0)
    with pytest.raises(SettingsError, match="class_from"):
        twins_spec(class_from=16)
    for model, change, match in (("dcgan", {}, "conditional generator"), ("cellgan", {"info_cont": 2}, "InfoGAN codes"),
                                 ("cellgan", {"noisy_twins": 0.01}, "NoisyTwins")):
        with pytest.raises(SettingsError, match=match):
            GANSpec.from_config({**dataclasses.asdict(load_spec(model)), **change, "ae_init": 10})


def test_bagan_prior_known_answer():
    """Class 0's codes (1, 0), (3, 0); class 1's (0, 2), (0, 4); class 2 none: means (2, 0), (0, 3) and, for the
    class without codes, the mean of all (1, 1.5); the within-class scatter pooled over 4 - 2 degrees of freedom
    is the identity."""
    codes = torch.tensor([[1., 0.], [3., 0.], [0., 2.], [0., 4.]])
    y = torch.tensor([0, 0, 1, 1])
    prior = LatentPrior(3, 2)
    assert torch.equal(prior(codes, y), codes)                  # unfitted: the identity
    prior.fit(torch.zeros(3, 2).index_add_(0, y, codes), torch.bincount(y, minlength=3), codes.T @ codes)
    assert torch.allclose(prior.mean, torch.tensor([[2., 0.], [0., 3.], [1., 1.5]]))
    assert torch.allclose(prior.scale_tril, torch.eye(2) * (1 + 1e-4) ** 0.5)
    out = prior(torch.tensor([[1., -1.], [0., 0.]]), torch.tensor([1, 2]))
    assert torch.allclose(out, torch.tensor([[1., 2.], [1., 1.5]]), atol=1e-4)
    with pytest.raises(ValueError, match="more codes than classes"):
        prior.fit(codes[:2], torch.tensor([1, 1, 0]), codes.T @ codes)


def test_bagan_autoencoder_reconstructs_and_leaves_a_prior_per_class():
    """On images of three flat colours the autoencoder's error falls, every class's codes are fitted, and the
    prior moves each class's latents to its own mean: the generator's classes start apart."""
    torch.manual_seed(0)
    spec = dataclasses.replace(load_spec("cellgan"), width=8, ae_init=40)
    G, D = build_model(spec, 3, 32)
    assert isinstance(G, PriorGenerator)
    colours = torch.tensor([[-0.8, -0.8, 0.6], [0.6, -0.2, -0.8], [0.2, 0.8, 0.2]])

    def batch(k):
        y = torch.arange(12) % 3
        return colours[y][:, :, None, None] + 0.05 * torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(k)), y
    endless = (batch(k) for k in range(10 ** 6))
    # 24 rows to fit from, of which the last 4 are an epoch's padding (not read)
    record = autoencoder_init(G, D, endless, [batch(-1), batch(-2)], 20, spec.ae_init, DistEnv())
    assert record["steps"] == 40 and record["codes_fitted"] == 20
    assert record["mse_last"] < 0.3 * record["mse_first"]
    means = G.prior.mean
    assert torch.cdist(means, means).add(torch.eye(3) * 1e9).min() > 0   # three distinct class means
    with torch.no_grad():   # four latents per class at its mean code (batch statistics, as in training)
        made = G(torch.zeros(12, spec.latent_dim), torch.arange(12) % 3).mean(dim=(2, 3))
    nearest = torch.cdist(made, colours).argmin(dim=1)
    assert nearest.tolist() == (torch.arange(12) % 3).tolist()   # each class's colour already, before any GAN step


def test_bagan_autoencoder_stops_after_the_step_a_stop_is_asked():
    """A stop asked during the third step ends the autoencoder after it: three steps taken, no prior fitted."""
    torch.manual_seed(0)
    spec = dataclasses.replace(load_spec("cellgan"), width=8, ae_init=40)
    G, D = build_model(spec, 3, 32)
    before = {k: v.clone() for k, v in G.state_dict().items()}
    x, y = torch.rand(6, 3, 32, 32) * 2 - 1, torch.arange(6) % 3
    asked = iter([False, False, True] + [False] * 100)
    with pytest.raises(AutoencoderStopped) as stopped:
        autoencoder_init(G, D, iter([(x, y)] * 40), [(x, y)], 6, 40, DistEnv(), stop_requested=lambda: next(asked))
    assert (stopped.value.step, stopped.value.steps) == (3, 40) and "after step 3/40" in str(stopped.value)
    assert next(asked) is False and next(asked) is False   # 3 asked, not more: it left right after step 3
    assert any(not torch.equal(v, G.state_dict()[k]) for k, v in before.items())   # the 3 steps were taken
    assert torch.equal(G.prior.scale_tril, torch.eye(spec.latent_dim))     # and no prior fitted


@pytest.mark.slow
def test_a_signal_during_the_autoencoder_stops_every_rank_then_a_rerun_starts_afresh(shards_with_an_empty_class,  # noqa: F811
                                                                                   tmp_path):
    """SIGUSR2 to rank 1 alone, during an autoencoder phase far too long to finish: both ranks leave it after the
    same step, with status "interrupted" (phase autoencoder, step 0) and no checkpoint; the run directory then
    takes a fresh run."""
    rd, log = tmp_path / "run", tmp_path / "stderr.txt"
    args = ["model=cellgan", "sample_every=0", "balance_classes=true"]
    with open(log, "w") as err:
        proc = subprocess.Popen(cli(shards_with_an_empty_class, rd, "steps=4", "model.ae_init=1000000", *args,
                                    nproc=2), env=ENV, stdout=subprocess.DEVNULL, stderr=err, text=True)
        _wait_for(lambda: "BAGAN autoencoder step 100/1000000" in log.read_text(), proc, timeout=300)
        rank1 = [c for c in _children(proc.pid) if _rank_of(c) == 1]
        assert len(rank1) == 1
        os.kill(rank1[0], signal.SIGUSR2)
        proc.wait(timeout=120)
    text = log.read_text()
    assert proc.returncode != 0   # torchrun reports the workers' exit code 3 as a failure
    st = status(rd)
    assert st["state"] == "interrupted" and st["phase"] == "autoencoder" and st["step"] == 0, st
    assert "at step 0/4; stopped during BAGAN's autoencoder, after step" in text   # rank 0 heard it from rank 1
    assert not list(rd.glob("checkpoints/*.pt")) and not (rd / "ae_init.json").exists()
    p = subprocess.run(cli(shards_with_an_empty_class, rd, "steps=2", "model.ae_init=3", *args, nproc=2), env=ENV,
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    assert status(rd)["state"] == "finished" and status(rd)["step"] == 2


@pytest.mark.parametrize("model", ["wgan_gp_ac", "sngan_proj"])
def test_bagan_starts_the_residual_models_too(model):
    """The paper's model and the projection SNGAN (residual critics, pooled features) take ae_init as well."""
    torch.manual_seed(0)
    spec = dataclasses.replace(load_spec(model), width=8, ae_init=2)
    G, D = build_model(spec, 3, 32)
    x, y = torch.rand(6, 3, 32, 32) * 2 - 1, torch.arange(6) % 3
    record = autoencoder_init(G, D, iter([(x, y)] * 2), [(x, y)], 6, 2, DistEnv())
    assert record["codes_fitted"] == 6 and record["mse_first"] > 0
    assert not torch.equal(G.prior.scale_tril, torch.eye(spec.latent_dim))
    assert G(torch.randn(3, spec.latent_dim), torch.arange(3)).shape == (3, 3, 32, 32)


@pytest.mark.slow
@pytest.mark.parametrize("option, column", [("model.gsr_weight=0.5", "gsr"), ("model.class_from=16", None),
                                            ("model.class_from=16 model.utlo_alpha=1", "utlo"),
                                            ("model.noisy_twins=0.01", "twins"), ("model.ae_init=3", None),
                                            ("model.mode_seeking=1", "ms_ratio"), ("model.ac_twin=true", None)],
                         ids=["gsr", "class_from", "utlo", "noisy_twins", "ae_init", "mode_seeking", "ac_twin"])
def test_long_tail_option_under_torchrun_resumes_exactly(shards_with_an_empty_class, tmp_path, option,  # noqa: F811
                                                        column):
    shards = shards_with_an_empty_class   # classes a, b, c with 16 images each and d with none
    args = ["model=cellgan", "ckpt_every=2", "log_every=2", "sample_every=0", "ema=0.9", "balance_classes=true",
            *option.split()]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    for rd, steps in ((straight, 6), (resumed, 2), (resumed, 6)):
        p = subprocess.run(cli(shards, rd, f"steps={steps}", *args, nproc=2), env=ENV, capture_output=True, text=True)
        assert p.returncode == 0, p.stderr[-3000:]
        assert "differ between ranks" not in p.stderr
    assert status(resumed)["state"] == "finished"
    state = assert_same_weights(straight, resumed)
    assert state["step"] == 6
    if option.startswith("model.noisy_twins"):
        # sigma_c = 0.75 E(n_c) / E(16): the full noise for a, b, c, none for d (no images)
        for key in ("G", "G_ema"):
            assert state[key]["mapping.class_sigma"].tolist() == [0.75, 0.75, 0.75, 0.0]
    if option.startswith("model.ae_init"):
        # the prior fitted once, before step 0, from all 48 images on each rank alike, d (no images) at their mean
        import json
        assert json.loads((resumed / "ae_init.json").read_text())["codes_fitted"] == 48
        for key in ("G", "G_ema"):
            mean = state[key]["prior.mean"]
            assert torch.allclose(mean[3], mean[:3].mean(0), atol=1e-5)   # 16 codes each in a, b, c
            assert not torch.equal(state[key]["prior.scale_tril"], torch.eye(len(mean[0])))
    if option == "model.ac_twin=true":   # the twin head exists and was trained alike on both ranks
        assert state["D"]["heads.cls_twin.weight"].shape[0] == 4
    if column:  # the option's own stat, logged on every row
        import csv
        rows = list(csv.DictReader(open(straight / "log.csv")))
        assert rows and all(float(r[column]) > 0 for r in rows)
