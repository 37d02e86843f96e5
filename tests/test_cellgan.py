"""cellgan (configs/model/cellgan.yaml) and the pieces it adds: the dcgan_cbn generator (the conditional DCGAN
generator with class-conditional batch norm in every layer), projection plus an auxiliary classifier in one critic,
and a bit-exact resume under the same loop (also with mode seeking, whose paired latents come from the step's
generator)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from hpcgan.models.blocks import ConditionalBatchNorm2d, num_resamples
from hpcgan.models.registry import build_model, critic_heads, load_spec
from conftest import train_4_and_2_plus_2

C = 12
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _spec(**kw):
    return dataclasses.replace(load_spec("cgan"), generator="dcgan_cbn", width=8, **kw)


@pytest.mark.parametrize("size", [32, 64])
def test_every_layer_is_conditioned_on_the_class(size):
    torch.manual_seed(0)
    G, _ = build_model(_spec(), C, size)
    cbns = [m for m in G.modules() if isinstance(m, ConditionalBatchNorm2d)]
    assert len(cbns) == num_resamples(size)                # one per layer before RGB: 32 px 3, 64 px 4
    assert not any(isinstance(m, torch.nn.BatchNorm2d) and m.affine for m in G.modules())
    G.eval()
    z = torch.randn(3, G.latent_dim)
    with torch.no_grad():
        a, b = G(z, torch.zeros(3, dtype=torch.long)), G(z, torch.full((3,), 7))
    assert a.shape == (3, 3, size, size) and a.abs().max() <= 1
    assert not torch.allclose(a, b)
    # a class's gain and bias act on its own images only: change class 7's, class 0's images stay
    with torch.no_grad():
        cbns[-1].bias.weight[7] += 1.0
        a2, b2 = G(z, torch.zeros(3, dtype=torch.long)), G(z, torch.full((3,), 7))
    assert torch.equal(a, a2) and not torch.allclose(b, b2)


def test_gains_start_near_one_biases_at_zero():
    G, _ = build_model(_spec(), C, 32)
    for m in G.modules():
        if isinstance(m, ConditionalBatchNorm2d):
            assert (m.gain.weight - 1).abs().max() < 0.15 and m.bias.weight.abs().max() == 0


def test_needs_labels_and_a_conditional_spec():
    G, _ = build_model(_spec(), C, 32)
    with pytest.raises(ValueError, match="labels"):
        G(torch.randn(2, G.latent_dim), None)
    with pytest.raises(ValueError, match="dcgan_cbn' is class-conditional"):
        build_model(_spec(conditional=False, critic_condition="none"), C, 32)


def test_cellgan_spec_and_critic_heads():
    spec = load_spec("cellgan")
    assert (spec.generator, spec.critic, spec.adversarial, spec.critic_condition) == (
        "dcgan_cbn", "dcgan", "bce", "projection")
    assert spec.ac_weight == 0.5 and not spec.ac_twin and spec.diffaug == ["color", "translation"]
    assert spec.gp_lambda == 0 and spec.mode_seeking == 0 and spec.critic_norm == "batch"
    assert critic_heads(spec, C) == {"adv": None, "cls": C}
    G, D = build_model(dataclasses.replace(spec, width=8), C, 32)
    x, y = torch.rand(4, 3, 32, 32) * 2 - 1, torch.tensor([0, 1, 2, 3])
    out = D(x, y)
    assert out["adv"].shape == (4,) and out["cls"].shape == (4, C)
    assert not torch.allclose(out["adv"], D(x, torch.tensor([5, 5, 5, 5]))["adv"])   # projection: label matters


@pytest.mark.parametrize("extra", [[], ["model.mode_seeking=1.0"]], ids=["cellgan", "mode_seeking"])
def test_cellgan_resumes_bit_exactly(simulated_shards, tmp_path, extra):
    """2 + 2 steps give the bytes of 4 straight ones (weights, batch-norm statistics, optimiser state), with the
    model's DiffAugment and (mode seeking) the paired latents drawn from each step's generator."""
    import csv

    a, b, straight = train_4_and_2_plus_2(simulated_shards(0.05), tmp_path, "cellgan", "ema=0.9", *extra)
    assert a["step"] == b["step"] == 4 and a["config"]["diffaug"] == ["color", "translation"]
    for net in ("G", "D", "G_ema"):
        assert a[net].keys() == b[net].keys()
        assert all(torch.equal(a[net][k], b[net][k]) for k in a[net]), net
    with open(straight / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["ac_acc_real"] != "" for r in rows] == [True, True]
    assert all((r["ms_ratio"] != "") == bool(extra) for r in rows)
