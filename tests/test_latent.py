"""hpcgan.latent: the one latent layout (noise | one-hot categorical code | uniform(-1, 1) continuous codes) and
its draw order, shared by training, sample grids and generation."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from hpcgan.latent import sample_latent
from hpcgan.models.registry import GANSpec, load_spec

C = 5


def _spec(**kw) -> GANSpec:
    return GANSpec(name="t", **{"z_dim": 6, **kw})


def test_layout_and_draw_order_known_answer():
    """noise, then the categorical code, then the continuous codes, then the labels, all from one generator."""
    spec = _spec(conditional=True, info_cat=4, info_cont=2)
    lat = sample_latent(spec, 10, torch.Generator().manual_seed(3), num_classes=C)
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(10, 6, generator=g)
    cat = torch.randint(0, 4, (10,), generator=g)
    cont = torch.rand(10, 2, generator=g) * 2 - 1
    y = torch.randint(0, C, (10,), generator=g)
    assert lat.z.shape == (10, spec.latent_dim) == (10, 6 + 4 + 2)
    assert torch.equal(lat.z, torch.cat([noise, F.one_hot(cat, 4).float(), cont], 1))
    assert torch.equal(lat.cat, cat) and torch.equal(lat.cont, cont) and torch.equal(lat.y, y)
    assert lat.cont.abs().max() <= 1 and lat.y.max() < C


def test_given_labels_and_codes_are_not_drawn():
    """A sample grid fixes y and the categorical code per row: the stream then goes noise -> continuous codes."""
    spec = _spec(conditional=True, info_cat=3, info_cont=1)
    row = torch.arange(3).repeat_interleave(2)
    lat = sample_latent(spec, 6, torch.Generator().manual_seed(0), y=row, cat=row)
    g = torch.Generator().manual_seed(0)
    noise, cont = torch.randn(6, 6, generator=g), torch.rand(6, 1, generator=g) * 2 - 1
    assert torch.equal(lat.z, torch.cat([noise, F.one_hot(row, 3).float(), cont], 1))
    assert torch.equal(lat.y, row) and torch.equal(lat.cat, row)


def test_unconditional_plain_noise_and_device():
    spec = _spec(conditional=False)
    lat = sample_latent(spec, 4, torch.Generator().manual_seed(1), device="cpu")
    assert lat.y is None and lat.cat is None and lat.cont is None
    assert torch.equal(lat.z, torch.randn(4, 6, generator=torch.Generator().manual_seed(1)))
    with pytest.raises(ValueError, match="num_classes"):
        sample_latent(_spec(conditional=True), 4, torch.Generator())


def test_truncation_bounds_the_noise():
    spec = dataclasses.replace(load_spec("infogan"), z_dim=64)
    lat = sample_latent(spec, 200, torch.Generator().manual_seed(0), truncation=0.5)
    z = lat.z
    assert z.shape == (200, spec.latent_dim)
    assert z[:, :64].abs().max() <= 0.5 and z[:, :64].std() > 0.1
    cat = z[:, 64:64 + spec.info_cat]
    assert torch.equal(cat.sum(1), torch.ones(200)) and set(cat.unique().tolist()) == {0.0, 1.0}
    assert z[:, 64 + spec.info_cat:].abs().max() <= 1
    # without truncation the same seed gives the plain normal draw
    plain = sample_latent(spec, 200, torch.Generator().manual_seed(0)).z
    assert torch.equal(plain[:, :64], torch.randn(200, 64, generator=torch.Generator().manual_seed(0)))


def test_sample_grid_rows_are_classes_or_codes():
    """Trainer.sample_grid draws through the same function: a row per class (or code), fixed by the seed."""
    from hpcgan import dist
    from hpcgan.train import Trainer
    for name in ("wgan_gp_ac", "infogan"):
        spec = dataclasses.replace(load_spec(name), width=8, z_dim=8)
        tr = Trainer(spec, 3, 32, dist.DistEnv(), seed=0)
        a, b = tr.sample_grid(2), tr.sample_grid(2)
        assert a.shape == (3 * 2, 3, 32, 32) and torch.equal(a, b)


def test_labels_restrict_the_drawn_classes_and_all_of_them_change_nothing():
    from hpcgan.models.registry import load_spec
    spec = load_spec("cgan")
    draw = lambda **kw: sample_latent(spec, 64, torch.Generator().manual_seed(5), **kw)  # noqa: E731
    every = draw(num_classes=12)
    same = draw(num_classes=12, labels=torch.arange(12))
    assert torch.equal(every.y, same.y) and torch.equal(every.z, same.z)
    some = draw(num_classes=12, labels=torch.tensor([2, 7, 9]))
    assert set(some.y.tolist()) == {2, 7, 9} and torch.equal(some.z, every.z)


def test_trainer_draws_fake_labels_only_from_classes_with_images():
    from hpcgan import dist
    from hpcgan.models.registry import load_spec
    from hpcgan.train import Trainer
    spec = load_spec("cgan")
    spec.width = 8
    seen = []
    t = Trainer(spec, 12, 32, dist.DistEnv(), seed=0, labels=[0, 3, 4])
    forward = t.G.forward
    t.G.forward = lambda z, y: (seen.append(y.clone()), forward(z, y))[1]
    real = torch.rand(8, 3, 32, 32) * 2 - 1
    t.step(real, torch.tensor([0, 3, 4, 0, 3, 4, 0, 3]), 0)
    assert seen and set(torch.cat(seen).tolist()) <= {0, 3, 4}
    assert Trainer(spec, 12, 32, dist.DistEnv(), seed=0, labels=list(range(12))).labels is None   # all: as before


def test_pairs_share_labels_and_codes_not_noise():
    """pairs=True (mode seeking): latent i and i + n/2 have the same label and InfoGAN codes, fresh noise; the
    draws are half as many labels/codes from the same stream; an odd batch is refused."""
    spec = _spec(conditional=True, info_cat=3, info_cont=2)
    lat = sample_latent(spec, 8, torch.Generator().manual_seed(4), num_classes=C, pairs=True)
    assert torch.equal(lat.y[:4], lat.y[4:]) and torch.equal(lat.cat[:4], lat.cat[4:])
    assert torch.equal(lat.cont[:4], lat.cont[4:]) and torch.equal(lat.z[:4, 6:], lat.z[4:, 6:])
    assert not torch.isclose(lat.z[:4, :6], lat.z[4:, :6]).any()
    g = torch.Generator().manual_seed(4)
    noise = torch.randn(8, 6, generator=g)
    cat = torch.randint(0, 3, (4,), generator=g)
    assert torch.equal(lat.z[:, :6], noise) and torch.equal(lat.cat[:4], cat)
    only = sample_latent(spec, 8, torch.Generator().manual_seed(4), labels=torch.tensor([1, 3]), pairs=True)
    assert set(only.y.tolist()) <= {1, 3} and torch.equal(only.y[:4], only.y[4:])
    with pytest.raises(ValueError, match="even"):
        sample_latent(spec, 7, torch.Generator(), num_classes=C, pairs=True)
