"""The dcgan_cbn generator: the conditional DCGAN generator with class-conditional batch norm in every layer."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from hpcgan.models.blocks import ConditionalBatchNorm2d
from hpcgan.models.registry import build_model, load_spec

C = 12
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _spec(**kw):
    return dataclasses.replace(load_spec("cgan"), generator="dcgan_cbn", width=8, **kw)


@pytest.mark.parametrize("size", [32, 64])
def test_every_layer_is_conditioned_on_the_class(size):
    torch.manual_seed(0)
    G, _ = build_model(_spec(), C, size)
    cbns = [m for m in G.modules() if isinstance(m, ConditionalBatchNorm2d)]
    assert len(cbns) == size.bit_length() - 3              # one per layer before RGB: 32 px 3, 64 px 4
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
    with pytest.raises(ValueError, match="dcgan_cbn is class-conditional"):
        build_model(_spec(conditional=False, critic_condition="none"), C, 32)
