"""Long-tail options of the class-conditional generators (issue 20): group spectral regularisation (gSR,
model.gsr_weight) and class conditioning only from a resolution up (model.class_from, UTLO's generator half);
known answers, and both under torchrun on 2 ranks with a bit-exact resume like every model."""
from __future__ import annotations

import dataclasses
import subprocess

import pytest
import torch

from hpcgan.models.blocks import ConditionalBatchNorm2d, PlainBatchNorm2d
from hpcgan.models.registry import GANSpec, build_model, load_spec
from hpcgan.objectives import gsr_penalty
from hpcgan.settings import SettingsError

from test_train import ENV, assert_same_weights, cli, shards, status  # noqa: F401  (the shards fixture)


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


@pytest.mark.slow
@pytest.mark.parametrize("option", [["model.gsr_weight=0.5"], ["model.class_from=16"]], ids=["gsr", "class_from"])
def test_long_tail_option_under_torchrun_resumes_exactly(shards, tmp_path, option):  # noqa: F811
    args = ["model=cellgan", "ckpt_every=2", "log_every=2", "sample_every=0", "ema=0.9", "balance_classes=true",
            *option]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    for rd, steps in ((straight, 6), (resumed, 2), (resumed, 6)):
        p = subprocess.run(cli(shards, rd, f"steps={steps}", *args, nproc=2), env=ENV, capture_output=True, text=True)
        assert p.returncode == 0, p.stderr[-3000:]
    assert status(resumed)["state"] == "finished"
    state = assert_same_weights(straight, resumed)
    assert state["step"] == 6
    if "gsr" in option[0]:
        import csv
        rows = list(csv.DictReader(open(straight / "log.csv")))
        assert all(float(r["gsr"]) > 0 for r in rows)
