"""The shipped configs: `ebmscale configs` lists them (the first comment line of each YAML);
`ebmscale configs NAME [key=value ...]` prints one resolved as launch would run it (defaults, configs/base.yaml,
cluster profile, the config, its recipe's choices, the overrides), with launch's checks of the keys and values.

    ebmscale configs
    ebmscale configs digits train.steps=100 recipe=icd
"""
import argparse
import sys
from pathlib import Path

from omegaconf import OmegaConf

from ebmscale.config import CONFIG_DIR, ConfigError, to_yaml
from ebmscale.launch.resolve import resolve_config
from ebmscale.program import prog


def describe(path: Path) -> str:
    """The first comment line of a YAML file, without its '#'."""
    for line in path.read_text().splitlines():
        if line.strip().startswith("#"):
            return line.strip().lstrip("#").strip()
    return ""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog=prog(), description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", metavar="CONFIG", help="a shipped config's name (digits) or a YAML path")
    p.add_argument("overrides", metavar="key=value", nargs="*", help="config overrides, e.g. train.steps=100")
    p.add_argument("--profile", help="cluster profile: a name in slurm/profiles/ or a YAML path (launcher.profile)")
    a = p.parse_args(argv)
    if a.config is None:
        shipped = sorted(CONFIG_DIR.glob("*.yaml"))
        width = max((len(f.stem) for f in shipped), default=0)
        print(f"configs in {CONFIG_DIR} ({prog()} NAME [key=value ...] prints one resolved):")
        for f in shipped:
            print(f"  {f.stem:<{width}}  {describe(f)}")
        return 0
    try:
        cfg = resolve_config(a.config, a.overrides, {}, a.profile)
        OmegaConf.resolve(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    print(to_yaml(cfg), end="")
    return 0
