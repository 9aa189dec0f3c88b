"""`ebmscale COMMAND`: one entry point for every tool; tools/*.py are wrappers of the same code."""
import os
import subprocess
import sys

from conftest import ROOT
from ebmscale.cli import COMMANDS, main


def test_usage_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("launch", "status", "sample", "evaluate", "export", "make-shards", "bench"))
    assert main(["nope"]) == 2 and "unknown command 'nope'" in capsys.readouterr().err


def test_each_command_has_help():
    for name in COMMANDS:
        res = subprocess.run([sys.executable, "-m", "ebmscale", name, "--help"], cwd=ROOT, capture_output=True,
                             text=True, timeout=120)
        assert res.returncode == 0 and "usage" in res.stdout.lower(), (name, res.stderr[-2000:])


def test_launch_dry_run_by_config_name(tmp_path, digits_shards):
    res = subprocess.run([sys.executable, "-m", "ebmscale", "launch", "--local", "--dry-run", "digits",
                          f"run.dir={tmp_path / 'run'}", f"data.shards={digits_shards}/digits-{{000000..000003}}.tar"],
                         cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0 and "name: digits" in res.stdout, res.stderr[-2000:]


def test_tools_are_wrappers():
    for tool in ("sample", "evaluate", "status", "make_shards", "bench", "export"):
        text = (ROOT / "tools" / f"{tool}.py").read_text()
        assert len(text.splitlines()) < 15 and "import main" in text, tool
