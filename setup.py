"""The package list: ebmscale's own packages plus configs/ and slurm/profiles/ mapped into it (pyproject.toml has
the rest). A declarative `packages.find` cannot add mapped folders, hence this file."""
from setuptools import find_packages, setup

setup(packages=find_packages(include=["ebmscale", "ebmscale.*"]) + ["ebmscale.configs", "ebmscale.profiles"],
      package_dir={"ebmscale.configs": "configs", "ebmscale.profiles": "slurm/profiles"})
