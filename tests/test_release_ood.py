"""The OOD sets as the IGEBM release builds them (data.py Textures / Svhn, ebm_sandbox.py energyevalmix)."""
import numpy as np
from PIL import Image

from ebmscale.data.sources import open_source
from ebmscale.eval.ood import synthetic


def test_textures_are_top_left_crops_and_svhn_reads_the_train_split(tmp_path):
    from scipy.io import savemat
    rng = np.random.default_rng(0)
    big = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)
    (tmp_path / "dtd" / "banded").mkdir(parents=True)
    Image.fromarray(big).save(tmp_path / "dtd" / "banded" / "a.png")
    src = open_source("textures", str(tmp_path / "dtd"))
    assert len(src.items) == 1 and np.array_equal(src.items[0][0], big[:32, :32])  # no resize, no centre crop
    x = rng.integers(0, 256, (32, 32, 3, 4), dtype=np.uint8)
    savemat(tmp_path / "train_32x32.mat", {"X": x, "y": np.array([[10], [1], [2], [3]])})
    svhn = open_source("svhn", str(tmp_path))  # default split: train, as torchvision's SVHN() in the release
    assert [y for _, y in svhn.items] == [0, 1, 2, 3] and np.array_equal(svhn.items[1][0], x[..., 1])


def test_random_is_the_release_gaussian():
    x = synthetic("random", np.zeros((200, 3, 32, 32), np.float32), np.random.default_rng(0))
    assert abs(x.mean() - 0.5) < 0.01 and abs(x.std() - 0.5) < 0.01 and x.min() < 0  # N(0.5, 0.5^2), unclipped
