"""hpcgan.images: the image sizes the GANs are built for, and the one [-1, 1] -> uint8 rounding."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from hpcgan.images import IMAGE_SIZES, check_image_size, to_uint8
from hpcgan.settings import SettingsError


def test_image_sizes_one_rule():
    assert IMAGE_SIZES == (32, 64, 128)
    for s in IMAGE_SIZES:
        assert check_image_size(s) == s
    for bad in (256, 48, 16, 8, 0, True, "64", None):
        with pytest.raises(SettingsError) as e:
            check_image_size(bad, "size")
        assert str(e.value).startswith(f"size={bad!r}:") and "32, 64 or 128" in str(e.value)


def test_models_use_the_rule():
    from hpcgan.models.blocks import num_resamples
    from hpcgan.models.registry import build_model, load_spec
    assert [num_resamples(s) for s in IMAGE_SIZES] == [3, 4, 5]
    with pytest.raises(ValueError, match="image_size=256.*32, 64 or 128"):
        build_model(load_spec("dcgan"), 3, 256)


def test_to_uint8_known_answers():
    x = torch.tensor([-1.0, 1.0, 0.0, -2.0, 3.0, float("nan"), float("inf"), -float("inf")])
    assert to_uint8(x).tolist() == [0, 255, 128, 0, 255, 0, 255, 0]   # 0 -> 127.5 -> 128 (half up)
    assert to_uint8(x).dtype == torch.uint8


def test_to_uint8_rounds_half_up_at_every_half_level():
    """Where (x + 1) * 127.5 is exactly k + 0.5 in float32, the result is k + 1, also for even k (half to even,
    e.g. torch.round, would give k there)."""
    k = torch.arange(255)
    x = ((k + 0.5) / 127.5 - 1).float()
    exact = ((x + 1) * 127.5) == (k + 0.5).float()
    assert exact.sum() > 20 and (exact & (k % 2 == 0)).sum() > 10   # enough exact halves, even and odd
    assert torch.equal(to_uint8(x[exact]).long(), k[exact] + 1)
    assert not torch.equal(torch.round((x[exact] + 1) * 127.5).long(), k[exact] + 1)  # the other rounding differs
    assert torch.equal(to_uint8(x[exact] - 1e-4).long(), k[exact])   # just under a half: rounded down


def test_to_uint8_keeps_shape_layout_and_device():
    x = torch.rand(2, 3, 5, 7, generator=torch.Generator().manual_seed(0)) * 2 - 1
    nhwc = x.contiguous(memory_format=torch.channels_last)
    out = to_uint8(nhwc)
    assert out.shape == x.shape and out.device == x.device and torch.equal(out, to_uint8(x))
    assert to_uint8(x.to(torch.bfloat16)).dtype == torch.uint8


def test_viz_and_generate_use_the_same_rounding():
    from hpcgan.generate import to_png
    from hpcgan.viz import hwc_uint8
    k = torch.arange(255)
    x = ((k + 0.5) / 127.5 - 1).float().view(1, 1, 15, 17).expand(1, 3, 15, 17).contiguous()
    expect = to_uint8(x).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(hwc_uint8(x), expect)
    png = to_png(x)[0]
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))), expect[0])
    assert to_png(to_uint8(x)) == [png]
