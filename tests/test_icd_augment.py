"""Augmentation transitions keep images in [0, 1] and labels (and fresh chains) unchanged."""
import pytest
import torch

from ebmscale.sampling.augment import ChainAugment, augment_chains


@pytest.mark.parametrize("channels", [1, 3])
def test_images_stay_in_unit_range_and_shape(channels):
    torch.manual_seed(0)
    aug = ChainAugment(crop_scale=0.08, flip=True, color_jitter=1.0, grayscale=0.2)
    for x in (torch.rand(64, channels, 16, 16), torch.zeros(8, channels, 16, 16), torch.ones(8, channels, 16, 16),
              (torch.rand(16, channels, 16, 16) > 0.5).float()):
        out = aug(x)
        assert out.shape == x.shape and out.dtype == x.dtype
        assert out.min() >= 0.0 and out.max() <= 1.0 and torch.isfinite(out).all()
    x = torch.rand(64, channels, 16, 16)
    assert (aug(x) - x).abs().mean() > 0.05  # it does move the chains


def test_each_op_alone_and_the_identity():
    torch.manual_seed(1)
    x = torch.rand(32, 3, 8, 8)
    assert torch.allclose(ChainAugment(1.0, False, 0.0, 0.0)(x), x, atol=1e-6)  # all off: no change
    flipped = ChainAugment(1.0, True, 0.0, 0.0)(x)
    is_flip = [(torch.allclose(f, o.flip(-1), atol=1e-5) or torch.allclose(f, o, atol=1e-5)) for f, o in zip(flipped, x)]
    assert all(is_flip) and not torch.allclose(flipped, x)  # flips (some) exactly, does nothing else
    gray = ChainAugment(1.0, False, 0.0, 1.0)(x)
    assert torch.allclose(gray[:, 0], gray[:, 1]) and torch.allclose(gray[:, 1], gray[:, 2])
    hue = ChainAugment._hue(x, torch.zeros(32))
    assert torch.allclose(hue, x, atol=1e-5)


def test_transition_keeps_labels_and_fresh_chains():
    torch.manual_seed(2)
    x0, y = torch.rand(16, 3, 8, 8), torch.randint(0, 10, (16,))
    fresh = torch.arange(16) % 4 == 0
    out, y_out = augment_chains(ChainAugment(), x0, y.clone(), fresh)
    assert torch.equal(y_out, y)
    assert torch.equal(out[fresh], x0[fresh]) and not torch.allclose(out[~fresh], x0[~fresh])
