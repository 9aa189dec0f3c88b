"""The launch config: defaults -> base.yaml -> cluster profile -> experiment -> key=value -> flags.

A cluster profile (slurm/profiles/NAME.yaml, or a path) holds site defaults in the config's own
sections (mostly `launcher:`): it sits *underneath* the experiment config, so anything the
experiment or the command line says wins. Command-line flags (--nodes, --time, ...) win over all.
The profile is chosen by --profile, else the config's `launcher.profile`, else $EBMSCALE_PROFILE.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from ebmscale.config import (CONFIG_DIR, Config, ConfigError, _merge, merge_file, merge_overrides, resolve_recipe,
                             shipped_dir, validate)

PROFILE_DIR = Path(os.environ.get("EBMSCALE_PROFILE_DIR") or shipped_dir("slurm/profiles", "profiles"))

# argparse dest -> config key
FLAG_KEYS = {
    "nodes": "launcher.nodes",
    "gpus_per_node": "launcher.gpus_per_node",
    "nproc": "launcher.tasks_per_node",
    "partition": "launcher.partition",
    "time": "launcher.time_min",
    "account": "launcher.account",
}


def available_profiles() -> List[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml")) if PROFILE_DIR.is_dir() else []


def profile_path(name: str) -> Path:
    p = Path(name)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    cand = PROFILE_DIR / f"{name}.yaml"
    if cand.exists():
        return cand
    have = ", ".join(available_profiles()) or "none"
    raise ConfigError(f"launcher.profile: no cluster profile '{name}' (profiles in {PROFILE_DIR}: {have}; "
                      f"or give the path of a YAML file)")


def _layers(config_path: Optional[str], overrides: Sequence[str], flags: Dict[str, object],
            profile: Optional[Path]) -> DictConfig:
    cfg = OmegaConf.structured(Config)
    base = CONFIG_DIR / "base.yaml"
    if base.exists():
        cfg = _merge(cfg, OmegaConf.load(base), str(base))
    if profile is not None:
        try:
            prof = OmegaConf.load(profile)
        except Exception as e:
            raise ConfigError(f"launcher.profile: cannot read {profile}: {e}") from None
        cfg = _merge(cfg, prof, f"profile {profile}")
    if config_path is not None:
        cfg = merge_file(cfg, config_path)
    cfg = merge_overrides(cfg, overrides)
    for dest, value in flags.items():
        if value is None or dest not in FLAG_KEYS:
            continue
        key = FLAG_KEYS[dest]
        flag = "--" + dest.replace("_", "-")
        cfg = _merge(cfg, OmegaConf.from_dotlist([f"{key}={value}"]), f"flag {flag} ({key})")
    return cfg


def resolve_config(config_path: Optional[str], overrides: Sequence[str] = (),
                   flags: Optional[Dict[str, object]] = None, profile: Optional[str] = None) -> DictConfig:
    """The validated config a launch runs with; raises ConfigError naming the key."""
    flags = dict(flags or {})
    first = _layers(config_path, overrides, flags, None)
    name = profile or first.launcher.profile or os.environ.get("EBMSCALE_PROFILE") or None
    if name:
        cfg = _layers(config_path, overrides, flags, profile_path(name))
        cfg.launcher.profile = name
    else:
        cfg = first
    resolve_recipe(cfg)
    validate(cfg)
    return cfg
