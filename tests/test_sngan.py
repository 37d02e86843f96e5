"""SNGAN-projection (model sngan_proj) and the pieces it adds to the registry and the objective: spectral norm,
conditional batch norm, the sum-pooled projection critic, hinge loss, R1, two time-scale learning rates."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from hpcgan import dist
from hpcgan.latent import sample_latent
from hpcgan.models.blocks import ConditionalBatchNorm2d, apply_spectral_norm
from hpcgan.models.registry import GANSpec, build_model, load_spec, optimiser_lr
from hpcgan.objectives import GANObjective
from hpcgan.settings import SettingsError
from conftest import train_4_and_2_plus_2

C = 12


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny(name: str = "sngan_proj", **kw) -> GANSpec:
    return dataclasses.replace(load_spec(name), width=8, **kw)


def top_singular_value(w: torch.Tensor) -> float:
    return torch.linalg.matrix_norm(w.detach().flatten(1), 2).item()


# ---- spectral norm -------------------------------------------------------------------------------------

def test_spectral_norm_keeps_every_critic_layer_near_one_singular_value():
    torch.manual_seed(0)
    _, D = build_model(tiny(), C, 32)
    layers = [m for m in D.modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.Embedding))]
    assert layers and all(hasattr(m, "parametrizations") for m in layers)   # every weight, the embedding too
    with torch.no_grad():
        for m in layers:   # far from 1 before normalisation, in both directions
            m.parametrizations.weight.original.mul_(50.0 if m is layers[0] else 0.02)
        x, y = torch.rand(4, 3, 32, 32) * 2 - 1, torch.arange(4)
        for _ in range(10):  # training forwards: one power iteration each (plus 15 at construction)
            D(x, y)
    for m in layers:
        # the power method's estimate of sigma is from below: the normalised weight's sigma is >= 1, and close
        # (the small 1x1 shortcut convs, with close singular values, converge slowest: a few % after 10)
        assert 1 - 1e-4 <= top_singular_value(m.weight) <= 1.06, m
        assert abs(top_singular_value(m.parametrizations.weight.original) - 1.0) > 0.5


def test_spectral_norm_is_off_by_default_and_the_vectors_are_checkpointed():
    assert not any(hasattr(m, "parametrizations") for m in build_model(load_spec("wgan_gp_ac"), C, 32)[1].modules())
    torch.manual_seed(0)
    _, D = build_model(tiny(), C, 32)
    D(torch.rand(2, 3, 32, 32), torch.arange(2))
    state = D.state_dict()
    assert any(k.endswith("parametrizations.weight.0._u") for k in state)
    torch.manual_seed(1)
    _, other = build_model(tiny(), C, 32)
    other.load_state_dict(state)          # same estimates -> the same critic, bit for bit
    D.eval(), other.eval()
    x = torch.rand(3, 3, 32, 32)
    assert torch.equal(D(x, torch.arange(3))["adv"], other(x, torch.arange(3))["adv"])


def test_apply_spectral_norm_on_a_linear_layer():
    torch.manual_seed(0)
    lin = apply_spectral_norm(nn.Linear(20, 30))
    with torch.no_grad():
        lin.parametrizations.weight.original.mul_(7.0)
        for _ in range(3):
            lin(torch.randn(5, 20))
    assert top_singular_value(lin.weight) == pytest.approx(1.0, abs=1e-3)


# ---- conditional batch norm -------------------------------------------------------------------------------

def test_conditional_batch_norm_is_the_class_gain_and_bias():
    torch.manual_seed(0)
    cbn = ConditionalBatchNorm2d(4, 3)
    with torch.no_grad():
        cbn.gain.weight.copy_(torch.tensor([[1.0] * 4, [2.0] * 4, [0.5, 1, 1, 1]]))
        cbn.bias.weight.copy_(torch.tensor([[0.0] * 4, [0.0] * 4, [3.0, 0, 0, 0]]))
    x = torch.randn(6, 4, 5, 5) * 3 + 1
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    out = cbn(x, y)
    normed = F.batch_norm(x, None, None, training=True, eps=cbn.bn.eps)
    assert torch.allclose(out[0], normed[0], atol=1e-5)                    # class 0: identity gain, no bias
    assert torch.allclose(out[1], 2 * normed[1], atol=1e-5)                # class 1: gain 2
    assert torch.allclose(out[2, 0], 0.5 * normed[2, 0] + 3, atol=1e-5)    # class 2: channel 0 only
    assert torch.allclose(out[2, 1:], normed[2, 1:], atol=1e-5)


def test_cbn_generator_output_depends_on_the_class_in_every_block():
    torch.manual_seed(0)
    G, _ = build_model(tiny(), C, 32)
    G.eval()
    z = torch.randn(3, G.latent_dim)
    with torch.no_grad():
        a, b = G(z, torch.zeros(3, dtype=torch.long)), G(z, torch.full((3,), 7))
    assert not torch.allclose(a, b)
    cbns = [m for m in G.modules() if isinstance(m, ConditionalBatchNorm2d)]
    assert len(cbns) == 2 * 3                    # two per up-sampling block, 3 blocks at 32 px
    with pytest.raises(ValueError, match="labels"):
        G(z, None)
    with pytest.raises(ValueError, match="resnet_cbn.*conditional"):
        build_model(tiny(conditional=False, critic_condition="none"), C, 32)


# ---- the projection critic ---------------------------------------------------------------------------------

def test_projection_term_is_embed_y_dot_features():
    """D(x, y)["adv"] = linear(phi(x)) + <embed(y), phi(x)>, phi(x) the sum-pooled ReLU features."""
    torch.manual_seed(0)
    _, D = build_model(tiny(), C, 32)
    D.eval()   # no power iteration: the normalised weights stay fixed between the calls below
    x, y = torch.rand(5, 3, 32, 32) * 2 - 1, torch.tensor([0, 3, 3, 7, 11])
    with torch.no_grad():
        phi = torch.relu(D.blocks(D.stem(x))).sum(dim=(2, 3))
        expected = D.heads.adv(phi).squeeze(1) + (D.heads.project.weight[y] * phi).sum(1)
        adv = D(x, y)["adv"]
    assert torch.allclose(adv, expected, atol=1e-5)
    assert not torch.allclose(adv, D.heads.adv(phi).squeeze(1))   # the projection term is not zero
    with pytest.raises(ValueError, match="labels"):
        D(x, None)


# ---- hinge loss, R1 -------------------------------------------------------------------------------------------

def test_hinge_loss_on_known_scores():
    obj = GANObjective(GANSpec(name="t", adversarial="hinge"), C)
    real, fake = torch.tensor([2.0, 0.5, -1.0, 1.0]), torch.tensor([-2.0, 0.0, 1.5, -0.5])
    # real: relu(1 - [2, .5, -1, 1]) = [0, .5, 2, 0] -> 0.625;  fake: relu(1 + [-2, 0, 1.5, -.5]) = [0, 1, 2.5, .5] -> 1.0
    assert obj.critic_adversarial(real, fake).item() == pytest.approx(1.625)
    assert obj.generator_adversarial(fake).item() == pytest.approx(0.25)   # -mean(fake): no margin for G
    # beyond the margin the critic gets no gradient
    r = torch.tensor([3.0, 0.0], requires_grad=True)
    obj.critic_adversarial(r, torch.tensor([-3.0])).backward()
    assert r.grad.tolist() == [0.0, -0.5]


class LinearCritic(nn.Module):
    """D(x) = <w, x>: ||grad_x D|| = ||w|| everywhere."""

    def __init__(self, norm: float, n: int):
        super().__init__()
        w = torch.randn(n)
        self.w = nn.Parameter(w / w.norm() * norm)

    def forward(self, x, y=None):
        return {"adv": x.flatten(1) @ self.w}


def test_r1_penalty_known_value_lazy_and_added_to_the_critic_loss():
    real, y = torch.rand(8, 3, 4, 4) * 2 - 1, torch.arange(8) % 3
    fake = torch.rand(8, 3, 4, 4) * 2 - 1
    D = LinearCritic(3.0, 48)
    spec = GANSpec(name="t", adversarial="hinge", r1_gamma=2.0, gp_every=4, z_dim=4)
    obj = GANObjective(spec, 3)
    assert obj.r1_penalty(D, real, y).item() == pytest.approx(9.0, rel=1e-5)      # ||grad||^2 = 3^2
    lat = sample_latent(spec, 8, torch.Generator().manual_seed(0), num_classes=3)
    g = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    loss_due, s_due = obj.critic_loss(D, real, y, fake, lat, g(), step=8)
    assert s_due["gp"].item() == pytest.approx(2.0 / 2 * 4 * 9.0, rel=1e-5)         # gamma/2 * k * E||g||^2
    loss_skip, s_skip = obj.critic_loss(D, real, y, fake, lat, g(), step=9)
    assert "gp" not in s_skip
    assert loss_due.item() == pytest.approx(loss_skip.item() + s_due["gp"].item(), rel=1e-5)
    loss_due.backward()
    assert D.w.grad.abs().sum() > 0


# ---- the spec, the optimisers ---------------------------------------------------------------------------------

def test_sngan_proj_spec():
    spec = load_spec("sngan_proj")
    assert (spec.generator, spec.critic, spec.adversarial, spec.critic_condition) == (
        "resnet_cbn", "sngan", "hinge", "projection")
    assert spec.spectral_norm and spec.conditional and spec.gp_lambda == 0 and spec.ac_weight == 0
    assert optimiser_lr(spec.optim, "G") < optimiser_lr(spec.optim, "D")        # TTUR: the critic faster
    assert spec.diffaug == ["color", "translation"]
    wgan = load_spec("wgan_gp_ac")
    assert optimiser_lr(wgan.optim, "G") == optimiser_lr(wgan.optim, "D") == 1e-3   # one lr (the paper's)


@pytest.mark.parametrize("cfg, match", [
    ({"adversarial": "least_squares"}, "model.adversarial"),
    ({"spectral_norm": True, "clip": 0.01}, "spectral_norm"),
    ({"r1_gamma": -1.0}, "model.r1_gamma"),
    ({"r1_gamma": 1.0, "critic_norm": "batch"}, "batch norm"),
    ({"optim": {"lr_d": 0.0}}, "model.optim.lr_d"),
    ({"diffaug": ["colour"]}, "model.diffaug"),
])
def test_bad_specs_are_refused(cfg, match):
    with pytest.raises(SettingsError, match=match):
        GANSpec.from_config({"name": "t", **cfg})


def test_trainer_gives_generator_and_critic_their_own_lr_also_after_resume():
    from hpcgan.train import Trainer
    spec = tiny(optim={**load_spec("sngan_proj").optim, "lr_g": 1e-4, "lr_d": 3e-4})
    tr = Trainer(spec, 3, 32, dist.DistEnv(), seed=0)
    lrs = lambda t: ([g["lr"] for g in t.opt_G.param_groups], [g["lr"] for g in t.opt_D.param_groups])  # noqa: E731
    assert lrs(tr) == ([1e-4], [3e-4])
    stats, bad, _ = tr.step(torch.rand(8, 3, 32, 32) * 2 - 1, torch.arange(8) % 3, step=0)
    assert not bad and torch.isfinite(stats["d_loss"]) and torch.isfinite(stats["g_loss"])
    again = Trainer(spec, 3, 32, dist.DistEnv(), seed=1)
    again.load_state_dict(tr.state_dict())
    assert lrs(again) == ([1e-4], [3e-4])


@pytest.mark.parametrize("given, used", [([], ["color", "translation"]), (["cutout"], ["cutout"])])
def test_a_runs_diffaug_defaults_to_the_models(given, used):
    from hpcgan.train import TrainSettings
    model = dataclasses.asdict(load_spec("sngan_proj"))
    s = TrainSettings(shards="s", run_dir="r", model=model, diffaug=given)
    assert list(s.diffaug) == used
    off = TrainSettings(shards="s", run_dir="r", model={**model, "diffaug": []})
    assert list(off.diffaug) == []
    assert list(TrainSettings(shards="s", run_dir="r", model=dataclasses.asdict(load_spec("cgan"))).diffaug) == []


# ---- the training loop: exact resume with the spectral-norm vectors and the model's DiffAugment ---------

@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """24 PNGs of 32 px in 3 classes (different brightness), one shard set."""
    import io

    import numpy as np
    from PIL import Image

    from hpcgan.data.shards import ShardWriter, write_manifest
    out, classes = tmp_path_factory.mktemp("sngan_shards"), ["a", "b", "c"]
    rng = np.random.default_rng(0)
    with ShardWriter(out, "train", shard_size=10) as w:
        for i in range(24):
            buf = io.BytesIO()
            Image.fromarray((rng.random((32, 32, 3)) * 60 + (i % 3) * 80).astype(np.uint8)).save(buf, format="PNG")
            w.write(f"s{i:05d}", buf.getvalue(), "png", i % 3, {"class": classes[i % 3], "synthetic": True})
    write_manifest(out, {"classes": classes, "image_size": 32, "counts": {"train": {c: 8 for c in classes}},
                         "shards": {"train": w.shards}, "synthetic": True})
    return out


def test_sngan_proj_resumes_bit_exactly(shards, tmp_path):
    """2 + 2 steps give the bytes of 4 straight ones: weights, spectral-norm vectors (buffers of D), optimiser
    state, with the model's own DiffAugment drawn from the step's generator."""
    a, b, _ = train_4_and_2_plus_2(shards, tmp_path, "sngan_proj")
    assert a["step"] == b["step"] == 4 and a["config"]["diffaug"] == ["color", "translation"]
    assert any(k.endswith("._u") for k in a["D"])
    for net in ("G", "D"):
        assert a[net].keys() == b[net].keys()
        assert all(torch.equal(a[net][k], b[net][k]) for k in a[net]), net
    assert a["opt_D"]["param_groups"][0]["lr"] == 4e-4 and a["opt_G"]["param_groups"][0]["lr"] == 1e-4
