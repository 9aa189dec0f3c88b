"""Readers of raw image collections for the shard writer.

Each returns a `Source`: `items` is a list of (path or uint8 array, label) that worker processes can pickle,
`classes` a list of {"index", "id", "name"} (empty = unconditional).
"""
from __future__ import annotations

import json
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Tuple

import numpy as np

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
SYNSET = re.compile(r"^n\d{8}$")


@dataclass
class Source:
    kind: str
    root: str
    items: List[Tuple[Any, int]]
    classes: List[dict] = field(default_factory=list)


def _images(folder: Path) -> List[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def folder(root: str, names: Optional[dict] = None, kind: str = "folder", only=lambda name: True) -> Source:
    """One sub-folder per class (nested files included); class index = position in the sorted folder names."""
    dirs = sorted(d for d in Path(root).iterdir() if d.is_dir() and only(d.name))
    if not dirs:
        raise FileNotFoundError(f"{root}: no class folders found")
    classes = [{"index": i, "id": d.name, "name": (names or {}).get(d.name, d.name)} for i, d in enumerate(dirs)]
    items = [(str(p), i) for i, d in enumerate(dirs) for p in _images(d)]
    return Source(kind, str(Path(root).resolve()), items, classes)


def imagenet(root: str, mapping: Optional[str] = None) -> Source:
    """ILSVRC2012 train tree `n01440764/*.JPEG`; `mapping` names the synsets: LOC_synset_mapping.txt
    ("n01440764 tench, Tinca tinca" per line) or a JSON {synset: name} or imagenet_class_index.json
    ({"0": [synset, name]})."""
    names = None
    if mapping:
        text = Path(mapping).read_text()
        if mapping.endswith(".json"):
            data = json.loads(text)
            names = {v[0]: v[1] for v in data.values()} if isinstance(next(iter(data.values())), list) else data
        else:
            names = dict(line.split(maxsplit=1) for line in text.splitlines() if line.strip())
    return folder(root, names, "imagenet", only=SYNSET.match)


def flat(root: str) -> Source:
    """Every image under `root`, no labels (unconditional)."""
    return Source("flat", str(Path(root).resolve()), [(str(p), 0) for p in _images(Path(root))])


def digits() -> Source:
    """scikit-learn's 1,797 8x8 handwritten digits (0..16 grey levels) as uint8 arrays, labels 0..9."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.round(d.images * (255 / 16)).astype(np.uint8)
    return Source("digits", "sklearn.datasets.load_digits", [(im, int(y)) for im, y in zip(images, d.target)],
                  [{"index": i, "id": str(i), "name": str(i)} for i in range(10)])


def cifar10(root: str, split: str = "train") -> Source:
    """The CIFAR-10 python batches (cifar-10-batches-py/data_batch_1..5, test_batch). They are pickles, read with
    a restricted unpickler (`_unpickle`): dicts, lists, str/bytes/numbers and numpy arrays only, so a tampered
    batch cannot run code."""
    root = Path(root)
    if (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    files = sorted(root.glob("data_batch_*")) if split == "train" else [root / "test_batch"]
    if not files or not files[0].exists():
        raise FileNotFoundError(f"{root}: no CIFAR-10 python batches (data_batch_1..5 / test_batch)")
    items = []
    for f in files:
        batch = _unpickle(f)
        images = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        items += [(im, int(y)) for im, y in zip(images, batch[b"labels"])]
    meta = root / "batches.meta"
    names = [n.decode() for n in _unpickle(meta)[b"label_names"]] if meta.exists() else [str(i) for i in range(10)]
    classes = [{"index": i, "id": n, "name": n} for i, n in enumerate(names)]
    return Source("cifar10", str(root.resolve()), items, classes)


class _ArraysOnly(pickle.Unpickler):
    """Finds only what a pickled dict of numpy arrays needs; any other global (os.system, builtins.eval, a class
    with a __reduce__) is refused before it is called."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("_codecs", "encode"), ("numpy.core.numeric", "_frombuffer"),
               ("numpy._core.numeric", "_frombuffer")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR-10 batch (numpy arrays only)")


def textures(root: str) -> Source:
    """The Describable Textures images (dtd/images/<class>/*.jpg) as the IGEBM release reads them for its OOD table
    (data.py Textures): the top-left 32x32 pixels of the raw RGB image, no resize; unconditional."""
    from PIL import Image

    paths = [p for d in sorted(Path(root).iterdir()) if d.is_dir() for p in _images(d)]
    if not paths:
        raise FileNotFoundError(f"{root}: no class folders of images (dtd/images)")
    items = []
    for p in paths:
        with Image.open(p) as img:
            items.append((np.asarray(img.convert("RGB").crop((0, 0, 32, 32))), 0))
    return Source("textures", str(Path(root).resolve()), items)


def svhn(root: str, split: str = "train") -> Source:
    """SVHN's cropped digits (train_32x32.mat / test_32x32.mat; a folder holding them or the file). The IGEBM
    release's OOD set reads the train split whatever it asks for (data.py Svhn: torchvision's default split)."""
    from scipy.io import loadmat

    path = Path(root)
    path = path / f"{split}_32x32.mat" if path.is_dir() else path
    if not path.exists():
        raise FileNotFoundError(f"{path}: no SVHN {split}_32x32.mat")
    mat = loadmat(str(path))
    images = np.ascontiguousarray(mat["X"].transpose(3, 0, 1, 2))
    return Source("svhn", str(path.resolve()), [(im, int(y) % 10) for im, y in zip(images, mat["y"].ravel())],
                  [{"index": i, "id": str(i), "name": str(i)} for i in range(10)])


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        try:
            out = _ArraysOnly(f, encoding="bytes").load()
        except pickle.UnpicklingError as e:
            raise ValueError(f"{path}: not a CIFAR-10 python batch: {e}") from None
    if not isinstance(out, dict):
        raise ValueError(f"{path}: not a CIFAR-10 python batch (a {type(out).__name__}, not a dict)")
    return out


def open_source(kind: str, src: Optional[str], mapping: Optional[str] = None, split: str = "train") -> Source:
    if kind == "digits":
        return digits()
    if src is None:
        raise ValueError(f"source '{kind}' needs a SRC path")
    return {"imagenet": lambda: imagenet(src, mapping), "folder": lambda: folder(src), "flat": lambda: flat(src),
            "cifar10": lambda: cifar10(src, split), "textures": lambda: textures(src),
            "svhn": lambda: svhn(src, split)}[kind]()


KINDS = ("digits", "imagenet", "folder", "flat", "cifar10", "textures", "svhn")
