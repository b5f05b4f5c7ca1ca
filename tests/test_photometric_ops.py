"""The photometric operations and the view crop, written with torch alone, equal torchvision's kernels."""
import numpy as np
import pytest
import torch

TF = pytest.importorskip("torchvision.transforms.v2.functional")

from clips4.pipeline import photometric as P  # noqa: E402
from clips4.trainer.augment import resized_crop  # noqa: E402


def _image(seed=0, h=37, w=53):
    g = torch.Generator().manual_seed(seed)
    img = torch.rand(3, h, w, generator=g)
    img[:, :5, :5] = 0.5  # grey pixels: the hue and saturation special case
    img[:, 5:9, :5] = torch.tensor([0.2, 0.9, 0.9])[:, None, None]  # ties between the largest channels
    return img


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_colour_operations_equal_torchvision(seed):
    img = _image(seed)
    for factor in (0.0, 0.6, 1.0, 1.4):
        assert torch.equal(P.adjust_brightness(img, factor), TF.adjust_brightness(img, factor))
        assert torch.equal(P.adjust_contrast(img, factor), TF.adjust_contrast(img, factor))
        assert torch.equal(P.adjust_saturation(img, factor), TF.adjust_saturation(img, factor))
    for hue in (-0.5, -0.1, 0.0, 0.07, 0.5):
        assert torch.equal(P.adjust_hue(img, hue), TF.adjust_hue(img, hue))
    assert torch.equal(P.rgb_to_grayscale(img), TF.rgb_to_grayscale(img, num_output_channels=3))
    for sigma in (0.3, 1.0, 2.5):
        k = 2 * int(np.ceil(3 * sigma)) + 1
        assert torch.equal(P.gaussian_blur(img, k, sigma), TF.gaussian_blur(img, [k, k], [sigma, sigma]))


def test_apply_ops_changes_what_each_op_names():
    img = _image(3)
    ops = P.IDENTITY.copy()
    assert torch.equal(P.apply_ops(img, ops), img.clamp(0, 1))
    ops[0], ops[4] = 1, 0.25
    rotated = P.apply_ops(img, ops)
    assert not torch.allclose(rotated, img)
    assert torch.allclose(rotated.amax(0), img.amax(0), atol=1e-6)  # a hue rotation keeps HSV's value
    assert torch.equal(rotated[:, :5, :5], img[:, :5, :5])  # and leaves grey alone
    ops[9] = 1
    grey = P.apply_ops(img, ops)
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])


@pytest.mark.parametrize("box", [(0, 0, 37, 53), (3, 4, 20, 30), (10, 0, 5, 9), (0, 7, 37, 40)])
@pytest.mark.parametrize("size", [16, 41])
def test_resized_crop_equals_torchvision_on_uint8_views(box, size):
    hwc = (np.random.default_rng(7).random((37, 53, 3)) * 255).astype(np.uint8)
    img = torch.from_numpy(hwc).permute(2, 0, 1)  # how the views are made: a strided (3, H, W) view
    top, left, h, w = box
    ours = resized_crop(img, top, left, h, w, size)
    ref = TF.resized_crop(img, top, left, h, w, [size, size], antialias=True)
    assert ours.dtype == torch.uint8 and ours.shape == (3, size, size)
    assert torch.equal(ours, ref)
