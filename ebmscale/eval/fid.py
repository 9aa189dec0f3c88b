"""Features -> IS and FID: the feature network (the paper's Inception v3 from a local weights file, or a
classifier from classifier.py), batched feature extraction, and reference statistics cached beside the shards."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ebmscale.data.shards import is_local, list_shards
from ebmscale.eval.data import iter_images
from ebmscale.eval.metrics import frechet_distance, gaussian_stats, inception_score
from ebmscale.eval.classifier import load_classifier
from ebmscale.trust import read_npz

INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")


class Inception(nn.Module):
    """The TensorFlow Inception v3 of the original IS and FID code (torch-fidelity's exact port, including its
    TF1 bilinear resize to 299): 2048-d pool features for FID, the 1008 bias-free logits for IS."""
    key = "inception-v3-compat"

    def __init__(self, weights: str | Path):
        super().__init__()
        if not Path(weights).is_file():
            raise FileNotFoundError(f"--inception {weights}: no such file. Download it once where there is internet "
                                    f"({INCEPTION_URL}) and pass its path; nothing is downloaded at run time")
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except Exception as e:  # ImportError, or a torchvision built for another torch
            raise ImportError(f"--inception needs torch-fidelity ({type(e).__name__}: {e}); install a torchvision "
                              f"that matches your torch, then `pip install torch-fidelity`") from None
        self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                               feature_extractor_weights_path=str(weights))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = (x.clamp(0, 1) * 255).round().to(torch.uint8)  # it takes 8-bit images, as the TF code read PNGs
        return self.net(x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x)


def feature_net(inception: str | None = None, classifier: str | None = None,
                device: str | torch.device = "cpu") -> nn.Module:
    """`--inception WEIGHTS` (the paper's numbers) or `--classifier C.pt` (e.g. the digits CNN)."""
    if classifier:
        return load_classifier(classifier, device)
    if inception:
        return Inception(inception).to(device).eval()
    raise ValueError("IS and FID need a feature network: --inception PATH (weights-inception-2015-12-05-"
                     "6726825d.pth, for the paper's numbers) or --classifier PATH (from `tools/evaluate.py "
                     "digits-classifier`)")


def check_input(net: nn.Module, x_shape: tuple) -> None:
    want = (getattr(net, "in_channels", None), getattr(net, "resolution", None))
    if want != (None, None) and tuple(x_shape[1:]) != (want[0], want[1], want[1]):
        raise ValueError(f"the feature network takes {want[0]}x{want[1]}x{want[1]} images, these are "
                         f"{'x'.join(map(str, x_shape[1:]))}")


@torch.no_grad()
def extract(net: nn.Module, x, batch: int = 250) -> tuple[np.ndarray, np.ndarray]:
    """Images [N, C, H, W] (float in [0, 1] or uint8) -> (features [N, D], logits [N, K]), float32."""
    x = torch.as_tensor(np.asarray(x))
    check_input(net, x.shape)
    dev = next(net.parameters()).device
    out = [[t.float().cpu() for t in net(b.to(dev).float() / (255 if b.dtype == torch.uint8 else 1))]
           for b in x.split(batch)]
    return tuple(torch.cat(o).numpy() for o in zip(*out))


def cache_path(spec: str, net_key: str, size: int, channels: int, limit: int | None, run_dir: Path | None) -> Path:
    """`fid_stats-<net>-<hash of what was read>.npz` beside the first shard (if local and writable), else in the
    run folder's eval/, else in ~/.cache/ebmscale."""
    h = hashlib.sha256(json.dumps([spec, size, channels, limit]).encode()).hexdigest()[:10]
    name = f"fid_stats-{net_key}-{h}.npz"
    first = list_shards(spec)[0].url
    for folder in ([Path(first).parent] if is_local(first) else []) + ([run_dir / "eval"] if run_dir else []):
        if folder.is_dir() and os.access(folder, os.W_OK) or (folder / name).exists():
            return folder / name
    return Path.home() / ".cache" / "ebmscale" / name


def reference_stats(net: nn.Module, spec: str, size: int, channels: int, limit: int | None = None,
                    run_dir: Path | None = None, log=print, allow_pipe: bool = False) -> dict:
    """The Gaussian statistics of the real images in `spec` (fitted to size x size x channels), computed once."""
    path = cache_path(spec, net.key, size, channels, limit, run_dir)
    if path.exists():
        log(f"reference statistics from {path}")
        return read_npz(path, keys=("mu", "sigma", "n"))  # may lie in a received run's eval/: read as data
    log(f"reference statistics of the images of {spec} -> {path}")
    stats = gaussian_stats(np.concatenate([extract(net, x)[0] for x, _ in iter_images(spec, size, channels, limit,
                                                                                        allow_pipe=allow_pipe)]))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}.npz")
    np.savez(tmp, **stats, spec=spec, feature_net=net.key, size=size, channels=channels)
    os.replace(tmp, path)
    return stats


def fid_and_is(net: nn.Module, images, reference: dict | None, splits: int = 10) -> dict:
    """{"fid" (if a reference is given), "is", "is_std", "n"} of the samples `images`."""
    feats, logits = extract(net, images)
    is_mean, is_std = inception_score(logits, splits)
    out = {"is": is_mean, "is_std": is_std, "n": int(len(feats))}
    if reference is not None:
        out["fid"] = frechet_distance(reference, feats)
    return out
