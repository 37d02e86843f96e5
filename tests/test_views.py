"""Generative views (hpcgan.views, tools/generate.py views=true): a class's cells drawn around its own training cells,
each inverted into the generator, or around the other classes' cells (view_from=others). Inversion recovers a
planted latent; sigma moves the stream around the anchors as said; only the GAN's cut train split is read (a
removed cell or a val/test cell would fail to decode); the manifest records the views."""
from __future__ import annotations

import dataclasses
import hashlib
import io

import numpy as np
import pytest
import torch
from PIL import Image

from hpcgan.data.shards import iter_samples, read_manifest
from hpcgan.generate import GenerateError, generate
from hpcgan.models.registry import load_spec
from hpcgan.views import Views, ViewsError, fit_views, interleave, invert
from test_curate import CLASSES, CUT, gan_run, run_without_trained_on, write_set


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    return write_set(tmp_path_factory.mktemp("views_real"))


class ToyGenerator(torch.nn.Module):
    """G(z, y) = tanh(BN(W z) + b_y) as 3 x 8 x 8 images: every image it can make depends on all of z; the batch
    norm's running statistics would move if it ran in training mode."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.w = torch.nn.Linear(16, 3 * 8 * 8)
        self.bn = torch.nn.BatchNorm1d(3 * 8 * 8)
        self.b = torch.nn.Embedding(len(CLASSES), 3 * 8 * 8)

    def forward(self, z, y):
        return torch.tanh(self.bn(self.w(z)) + self.b(y)).view(-1, 3, 8, 8)


def test_inversion_recovers_a_planted_latent():
    """Images the generator can make exactly (G(z*, y)) are found again: the latents and the error fall to a small
    fraction of the starting point's, and the generator is left as it was (run in eval mode, its weights, batch
    norm statistics, mode and requires_grad flags as before); each cell's problem is its own, so chunks of 2 cells
    find the same latents."""
    G = ToyGenerator().train()
    G.b.weight.requires_grad_(False)
    spec = dataclasses.replace(load_spec("cgan"), z_dim=16)
    before = {k: v.clone() for k, v in G.state_dict().items()}
    z_star = 0.8 * torch.randn(6, 16, generator=torch.Generator().manual_seed(3))
    y = torch.full((6,), 1)
    with torch.no_grad():
        x = G.eval()(z_star, y)
    G.train()
    z0, start_error = invert(G, spec, x, 1, steps=1, weight=0.0, seed=0)
    z, error = invert(G, spec, x, 1, steps=500, weight=0.0, seed=0)
    assert error < 1e-3 * start_error
    assert (z - z_star).abs().max() < 0.05 < (z0 - z_star).abs().max()
    assert G.training and not G.b.weight.requires_grad and G.w.weight.requires_grad and G.bn.weight.requires_grad
    assert all(torch.equal(v, G.state_dict()[k]) for k, v in before.items())
    with torch.no_grad():
        assert torch.nn.functional.mse_loss(G.eval()(z, y), x).item() == pytest.approx(error, rel=1e-4)
    z2, error2 = invert(G, spec, x, 1, steps=500, weight=0.0, seed=0, batch_size=2)
    assert torch.allclose(z2, z, atol=1e-5) and error2 == pytest.approx(error, rel=1e-3)


def test_views_move_the_stream_around_the_anchors_in_turn():
    anchors = torch.arange(6.0).reshape(3, 2)
    z = torch.ones(7, 2)
    at = Views({4: anchors}, 0.0, {}).move(z, 4)
    assert torch.equal(at, anchors[[0, 1, 2, 0, 1, 2, 0]])       # sigma 0: the anchors themselves, in turn
    assert torch.equal(Views({4: anchors}, 0.5, {}).move(z, 4), at + 0.5)
    assert Views({4: anchors}, 0.5, {}).move(z, 2) is z           # a class without anchors: its own stream


def images(out) -> dict[str, np.ndarray]:
    """{key: HWC float array} of a synthetic set's train shards."""
    return {k: np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float64)
            for k, data, _, _, _ in iter_samples(out, "train")}


def decoded(out):
    """{key: sha256 of the PNG} of a synthetic set's train shards."""
    return {k: hashlib.sha256(data).hexdigest() for k, data, _, _, _ in iter_samples(out, "train")}


def test_generate_views_read_only_the_cut_train_split_and_are_recorded(real, tmp_path):
    """write_set plants GARBAGE for the cells the cut removed and for val/test: reading one would fail. Every
    training cell of each class becomes an anchor (red: the 4 the cut kept); sigma 0 repeats them in turn."""
    shards, _, _ = real
    run = gan_run(tmp_path / "gan", shards)
    kw = dict(run_dir=run, png=False, progress=False, device="cpu", views=True, view_steps=3)
    m = generate(out=tmp_path / "v0", per_class=6, view_sigma=0.0, **kw)
    views = m["views"]
    assert {c: v["anchors"] for c, v in views["classes"].items()} == {"red": 4, "green": 16, "blue": 16}
    assert views["from"] == {"shards": str(shards.resolve()), "split": "train", "scarce": CUT, "scarce_seed": 0}
    assert views["sigma"] == 0.0 and views["steps"] == 3
    png = decoded(tmp_path / "v0")
    # the recorded error is the written reconstructions' (up to the uint8 rounding): view i of red is cell i's
    _, train_images, train_labels = real
    reds = [a for a, label in zip(train_images, train_labels) if label == 0]
    written = {k: a for k, a in images(tmp_path / "v0").items() if k.startswith("syn_red")}
    mse = np.mean([((written[f"syn_red_{i:06d}"] / 127.5 - 1) - (reds[i] / 127.5 - 1)) ** 2 for i in range(4)])
    assert mse == pytest.approx(views["classes"]["red"]["reconstruction_mse"], rel=5e-3)
    assert png["syn_red_000004"] == png["syn_red_000000"] and png["syn_red_000005"] == png["syn_red_000001"]
    assert len({png[f"syn_red_{i:06d}"] for i in range(4)}) == 4
    assert len({png[f"syn_green_{i:06d}"] for i in range(6)}) == 6     # 16 anchors: no repeat in 6
    assert read_manifest(tmp_path / "v0")["views"] == views
    # at most view_anchors per class; sigma > 0 draws new cells; the same settings, the same cells
    m = generate(out=tmp_path / "v1", per_class=6, view_sigma=0.5, view_anchors=2, **kw)
    assert {c: v["anchors"] for c, v in m["views"]["classes"].items()} == {c: 2 for c in CLASSES}
    png1 = decoded(tmp_path / "v1")
    assert png1["syn_red_000002"] != png1["syn_red_000000"]
    generate(out=tmp_path / "v2", per_class=6, view_sigma=0.5, view_anchors=2, **kw)
    assert decoded(tmp_path / "v2") == png1
    assert generate(out=tmp_path / "plain", per_class=2, **{**kw, "views": False})["views"] is None
    # only the classes the cut made scarce as views; the others exactly as without views
    m = generate(out=tmp_path / "scarce", per_class=2, view_classes="scarce", **kw)
    assert list(m["views"]["classes"]) == ["red"]
    scarce, plain = decoded(tmp_path / "scarce"), decoded(tmp_path / "plain")
    assert all(scarce[k] == plain[k] for k in plain if not k.startswith("syn_red"))
    assert scarce["syn_red_000000"] != plain["syn_red_000000"]


def test_views_refuse_what_they_cannot_do(real, tmp_path):
    shards, _, _ = real
    run = gan_run(tmp_path / "g", shards)
    for bad, match in (({"count": 3}, "labelled cells"), ({"per_class": 3, "truncation": 2.0}, "truncation"),
                       ({"per_class": 3, "view_sigma": -1}, "view_sigma"),
                       ({"per_class": 3, "view_anchors": 0}, "view_anchors"),
                       ({"per_class": 3, "view_classes": ["purple"]}, "not among the classes"),
                       ({"per_class": 3, "view_classes": 3}, "view_classes=3"),
                       ({"per_class": 3, "view_weight": "x"}, "view_weight"),
                       ({"per_class": 3, "view_from": "mine"}, "view_from='mine'"),
                       ({"per_class": 3, "view_from": "others"}, "none is left to borrow"),
                       ({"per_class": 3, "classes": ["green"], "view_classes": "scarce"}, "none of the classes")):
        with pytest.raises(GenerateError, match=match):
            generate(run_dir=run, out=tmp_path / "o", views=True, **bad)
    with pytest.raises(GenerateError, match="add views=true"):
        generate(run_dir=run, out=tmp_path / "o", per_class=3, view_from="others")
    with pytest.raises(GenerateError, match="what the GAN trained on"):
        generate(run_dir=run_without_trained_on(tmp_path / "old"), out=tmp_path / "o", per_class=3, views=True,
                 device="cpu", progress=False)
    assert not (tmp_path / "o").exists()


class Upsampled(torch.nn.Module):
    """ToyGenerator's 8 px images, nearest-neighbour upsampled to the 32 px of the test shard set."""

    def __init__(self):
        super().__init__()
        self.g = ToyGenerator()

    def forward(self, z, y):
        return torch.nn.functional.interpolate(self.g(z, y), scale_factor=4, mode="nearest")


def test_interleave_takes_the_groups_in_turn():
    a, b = torch.tensor([[0.0], [1.0], [2.0]]), torch.tensor([[10.0]])
    assert interleave([a, b]).flatten().tolist() == [0.0, 10.0, 1.0, 2.0]


def test_class_swapped_views_anchor_on_the_other_classes_inverted_cells(real):
    """view_from=others: the view class's anchors are the other classes' cells, each inverted under its own label
    exactly as those classes' own views would be, taken in turn across them; the view class has none of its own."""
    shards, _, _ = real
    G = Upsampled()
    spec = dataclasses.replace(load_spec("cgan"), z_dim=16)
    seen = {"shards": str(shards), "split": "train", "scarce": CUT, "scarce_seed": 0}
    kw = dict(sigma=0.0, steps=4, weight=0.0, anchors=3, seed=0)
    swapped = fit_views(G, spec, seen, CLASSES, ["red"], source="others", **kw)
    own = fit_views(G, spec, seen, CLASSES, ["green", "blue"], **kw)
    assert list(swapped.anchors) == [0] and set(own.anchors) == {1, 2}
    assert torch.equal(swapped.anchors[0], interleave([own.anchors[1], own.anchors[2]]))
    assert swapped.record["source"] == "others" and swapped.record["view_classes"] == ["red"]
    assert swapped.record["classes"] == own.record["classes"]          # green and blue: 3 anchors each, same error
    z = torch.zeros(7, own.anchors[1].shape[1])
    assert torch.equal(swapped.move(z, 0)[:2], torch.stack([own.anchors[1][0], own.anchors[2][0]]))
    assert swapped.move(z, 1) is z                                      # a borrowed-from class: drawn as usual
    with pytest.raises(ViewsError, match="view_from='x'"):
        fit_views(G, spec, seen, CLASSES, ["red"], source="x", **kw)
    with pytest.raises(ViewsError, match="none is left to borrow"):
        fit_views(G, spec, seen, CLASSES, CLASSES, source="others", **kw)
    # two view classes share the one class left to lend; each view is drawn under its own class's label
    two = fit_views(G, spec, seen, CLASSES, ["red", "green"], source="others", **kw)
    assert set(two.anchors) == {0, 1} and list(two.record["classes"]) == ["blue"]
    assert torch.equal(two.anchors[0], own.anchors[2]) and torch.equal(two.anchors[1], own.anchors[2])
    assert two.record["view_classes"] == ["red", "green"] and own.record["view_classes"] == ["green", "blue"]
    with torch.no_grad():
        drawn = G.eval()(two.move(torch.randn(3, 16), 0), torch.zeros(3, dtype=torch.int64))
        assert torch.equal(drawn, G(own.anchors[2], torch.zeros(3, dtype=torch.int64)))   # sigma 0: G(anchor, red)
        assert not torch.equal(drawn, G(own.anchors[2], torch.full((3,), 2)))


def test_generate_class_swapped_views_are_recorded_and_change_only_the_view_class(real, tmp_path):
    shards, _, _ = real
    run = gan_run(tmp_path / "gan", shards)
    kw = dict(run_dir=run, png=False, progress=False, device="cpu", views=True, view_steps=3, per_class=4,
              view_classes="scarce")
    m = generate(out=tmp_path / "swap", view_from="others", view_anchors=2, **kw)
    assert m["views"]["source"] == "others" and m["views"]["view_classes"] == ["red"]
    assert {c: v["anchors"] for c, v in m["views"]["classes"].items()} == {"green": 2, "blue": 2}
    own = generate(out=tmp_path / "own", **kw)
    assert own["views"]["source"] == "own" and list(own["views"]["classes"]) == ["red"]
    swap, mine = decoded(tmp_path / "swap"), decoded(tmp_path / "own")
    assert all(swap[k] == mine[k] for k in mine if not k.startswith("syn_red"))
    assert all(swap[f"syn_red_{i:06d}"] != mine[f"syn_red_{i:06d}"] for i in range(4))
