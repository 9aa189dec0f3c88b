"""The model card `ebmscale export` writes (README.md): Hugging Face Hub front matter, and no path or shard URL. The
whole export of a trained run is tests/test_export.py (slow); this builds the card of a config directly."""
import re

import yaml

from ebmscale.config import load_config
from ebmscale.export import _card, dataset_names

SHARDS = "pipe:aws s3 cp s3://bucket/team/cifar10/train-{000000..000009}.tar -::/home/me/data/digits/manifest.json"


def front_matter(card: str) -> dict:
    assert card.startswith("---\n"), card[:80]
    return yaml.safe_load(card.split("---\n")[1])


def no_paths(card: str) -> None:
    assert not re.search(r"(^|[\s`(])/[\w.]", card, re.M), "an absolute path in the card"
    assert not re.search(r"\{\d+\.\.\d+\}|s3://|pipe:|\.tar\b|manifest\.json|/home/", card), "a shard spec in the card"


def test_card_front_matter_and_no_paths():
    cfg = load_config("digits", [f"data.shards={SHARDS}", "run.name=tiny"])
    meta = {"ebmscale": {"version": "0", "step": 7, "checkpoint": "/home/me/runs/tiny/checkpoints/step_00000007",
                         "precision": "fp32", "dtype": "fp32", "world_size": 2}, "recipe": cfg.recipe}
    evals = [{"file": "fid.json", "task": "fid", "step": 7, "metrics": {"fid_classifier": 12.5}}]
    card = _card(cfg, meta, evals, 1234, True)
    fm = front_matter(card)
    assert fm["license"] == "mit" and fm["library_name"] == "ebmscale" and fm["datasets"] == ["cifar10"]
    assert {"energy-based-model", "igebm", "class-conditional"} <= set(fm["tags"])
    assert "- data: cifar10, digits" in card and "`checkpoints/step_00000007` of run tiny" in card
    no_paths(card)


def test_dataset_names_are_folder_names_never_paths():
    assert dataset_names("data/digits/digits-{000000..000003}.tar") == ["digits"]
    assert dataset_names("/x/imagenet128/manifest.json::/y/cifar10/train-{0..1}.tar") == ["imagenet128", "cifar10"]
    assert dataset_names("???") == []
    cfg = load_config("digits", ["data.shards=/d/digits/digits-{0..3}.tar"])
    assert "datasets" not in front_matter(_card(cfg, {"ebmscale": {"version": "0", "step": 1, "checkpoint": "c",
                                                                   "precision": "fp32", "dtype": "fp32"}}, [], 1, False))
