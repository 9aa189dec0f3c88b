"""`ebmscale COMMAND`: one entry point for every tool; tools/*.py are wrappers of the same code."""
import os
import subprocess
import sys

import yaml

from conftest import ROOT
from ebmscale.cli import COMMANDS, main


def test_usage_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"  {name} " in out for name in COMMANDS)
    assert main(["nope"]) == 2 and "unknown command 'nope'" in capsys.readouterr().err


def test_each_help_names_the_program_as_typed():
    """`python -m ebmscale X --help` says `usage: python -m ebmscale X`, `python tools/x.py --help` says
    `usage: tools/x.py`, never argparse's `launch.py` / `__main__.py` (all started at once: ~2 s of CPU each)."""
    runs = {}
    for name in COMMANDS:
        words = [name, "langevin"] if name == "bench" else [name]  # a benchmark's own parser
        tool = f"tools/{name.replace('-', '_')}.py"
        runs[f"python -m ebmscale {' '.join(words)}"] = [sys.executable, "-m", "ebmscale", *words, "--help"]
        runs[" ".join([tool, *words[1:]])] = [sys.executable, tool, *words[1:], "--help"]
    procs = {want: subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for want, cmd in runs.items()}
    for want, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0 and out.startswith(f"usage: {want} "), (want, out[:200], err[-2000:])


def test_program_name_of_a_console_script_on_path(tmp_path):
    script = tmp_path / "ebmscale"
    script.write_text(f"#!{sys.executable}\nimport sys\nfrom ebmscale.cli import main\nsys.exit(main())\n")
    script.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(ROOT)}
    res = subprocess.run(["ebmscale", "status", "--help"], env=env, capture_output=True, text=True, timeout=120)
    assert res.stdout.startswith("usage: ebmscale status "), res.stdout[:200] + res.stderr[-2000:]


def test_launch_dry_run_by_config_name(tmp_path, digits_shards):
    res = subprocess.run([sys.executable, "-m", "ebmscale", "launch", "--local", "--dry-run", "digits",
                          f"run.dir={tmp_path / 'run'}", f"data.shards={digits_shards}/digits-{{000000..000003}}.tar"],
                         cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0 and "name: digits" in res.stdout, res.stderr[-2000:]


def test_tools_are_wrappers():
    for tool in ("sample", "evaluate", "status", "make_shards", "bench", "export", "configs"):
        text = (ROOT / "tools" / f"{tool}.py").read_text()
        assert len(text.splitlines()) < 15 and "import main" in text, tool


def test_configs_lists_each_shipped_config_with_its_first_comment(capsys):
    assert main(["configs"]) == 0
    out = capsys.readouterr().out
    for f in sorted((ROOT / "configs").glob("*.yaml")):
        first = next(line for line in f.read_text().splitlines() if line.startswith("#")).lstrip("#").strip()
        assert f"  {f.stem} " in out and first in out, f.stem


def test_configs_prints_one_resolved_with_its_recipe_and_overrides(capsys):
    assert main(["configs", "digits", "train.steps=7", "recipe=paper"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["train"]["steps"] == 7 and cfg["recipe"] == "paper"
    assert cfg["model"]["residual"] == "release" and cfg["buffer"]["codec"] == "release"  # the recipe's, not null
    assert cfg["data"]["batch_size"] == 32  # configs/digits.yaml over base.yaml
    assert main(["configs", "digits", "train.stepz=3"]) == 2
    assert "train.stepz" in capsys.readouterr().err
    assert main(["configs", "nope"]) == 2 and "digits" in capsys.readouterr().err  # names the shipped ones


def test_compare_recipes_subcommand_runs_the_tool_with_its_arguments(capsys, tmp_path):
    (tmp_path / "digits_classifier.pt").touch()  # present: the dry run does not plan its training
    assert main(["compare-recipes", "--dry-run", "--recipes", "paper", "--seeds", "3", "--out", str(tmp_path / "c"),
                 "--classifier", str(tmp_path / "digits_classifier.pt")]) == 0
    out = capsys.readouterr().out
    assert "run.seed=3" in out and "recipe=paper" in out and "recipe=icd" not in out and "digits-classifier" not in out
