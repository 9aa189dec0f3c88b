"""The near-distribution OOD sources keep each image's pixels and break its shape."""
import numpy as np

from ebmscale.eval.ood import synthetic


def test_near_sources_permute_pixels_within_each_image():
    x = np.random.default_rng(0).random((5, 1, 16, 16), dtype=np.float32)
    for kind in ("rot90", "quadrants"):
        y = synthetic(kind, x, np.random.default_rng(1))
        assert y.shape == x.shape and not np.allclose(y, x)
        assert all(np.array_equal(np.sort(a.ravel()), np.sort(b.ravel())) for a, b in zip(x, y))
