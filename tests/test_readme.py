"""The README and docs/ cannot go stale: every command line in README.md's code blocks, and every `python tools/...` /
`ebmscale ...` line in the code blocks of docs/*.md, runs here as far as it can without training: `--help` for a
tool (each option the line names must be in that help), `--dry-run` for a `--local` launch (the real checks: config,
overrides, shards, model, run folder) and the launcher's own config resolution for a SLURM launch (this machine is
no login node of theirs). Every relative link and #anchor resolves, the configs table in docs/recipes.md states
configs/*.yaml, and the README's Layout block names every module and tool. One process, no training: seconds."""
import contextlib
import importlib.metadata
import io
import os
import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest
from conftest import ROOT, make_digits_shards

import ebmscale
from ebmscale.cli import main as ebmscale_main
from ebmscale.config import load_config
from ebmscale.launch.cli import _flags, build_parser, launch_main
from ebmscale.launch.resolve import resolve_config
from ebmscale.models import EnergyModel

README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
SHELL_ONLY = {"source", "export", "cd", "sudo", "bash", "squeue", "tail", "sbatch", "scancel", "torchrun"}


def code_blocks(path: Path):
    """(language, lines) of each fenced block, `\\` continuations joined."""
    blocks, lang, lines = [], None, []
    for line in path.read_text().splitlines():
        fence = re.match(r"\s*```(\w*)", line)
        if fence and lang is None:
            lang, lines = fence[1] or "text", []
        elif fence:
            blocks.append((lang, lines))
            lang = None
        elif lang is not None:
            if lines and lines[-1].endswith("\\"):
                lines[-1] = lines[-1][:-1] + " " + line.strip()
            else:
                lines.append(line.strip())
    return blocks


def commands(path: Path, everything: bool):
    """The command lines of a file's shell blocks, each `a && b` as two; README: all, docs: tools and ebmscale."""
    out = []
    for lang, lines in code_blocks(path):
        if lang not in ("bash", "sh"):
            continue
        for line in lines:
            words = shlex.split(line, comments=True)
            while words:
                cut = words.index("&&") if "&&" in words else len(words)
                cmd, words = words[:cut], words[cut + 1:]
                if cmd and cmd[0].startswith(".venv/bin/"):
                    cmd[0] = cmd[0][len(".venv/bin/"):]
                if cmd and cmd[0] in ("python", "python3", "ebmscale", "mlflow", "pip") and (
                        everything or cmd[0] == "ebmscale" or cmd[1:2] and cmd[1].startswith("tools/")):
                    out.append(cmd)
                elif cmd and everything and cmd[0] not in SHELL_ONLY:
                    raise AssertionError(f"{path.name}: a command this test does not know how to check: {cmd}")
    return out


CASES = [(README, c) for c in commands(README, True)] + [(p, c) for p in DOCS for c in commands(p, False)]


@contextlib.contextmanager
def argv_and_output(argv):
    old, out, err = sys.argv, io.StringIO(), io.StringIO()
    sys.argv = list(argv)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            yield out, err
    finally:
        sys.argv = old


def run_help(argv) -> str:
    """A tool's --help after the line's own arguments (the options before it are parsed, subcommands chosen)."""
    with argv_and_output(argv + ["--help"]) as (out, err):
        try:
            if argv[0] == "ebmscale":
                code = ebmscale_main(argv[1:] + ["--help"])
            else:
                runpy.run_path(str(ROOT / argv[0]), run_name="__main__")
                code = 0
        except SystemExit as e:
            code = e.code
    assert code in (0, None), f"{argv}: --help exited {code}:\n{err.getvalue()[-2000:]}"
    return out.getvalue() + err.getvalue()


def check_launch(args, name):
    if "--local" in args:  # the real checks, as the line would run them, minus the training
        with argv_and_output(["launch"]) as (out, err):
            code = launch_main([*args, "--dry-run"])
        assert code == 0, f"{name}: {args} --dry-run exited {code}:\n{err.getvalue()[-2000:]}"
        return
    a = build_parser().parse_args(args)  # a SLURM line: its flags, config, overrides and profile
    resolve_config(a.config, a.overrides, _flags(a), a.profile)


def case_id(case):
    path, cmd = case
    return f"{path.name}:{' '.join(cmd)[:70]}"


@pytest.fixture(scope="module")
def at_root():
    make_digits_shards(ROOT / "data" / "digits")  # the README's first command, kept between sessions
    old, env = os.getcwd(), dict(os.environ)
    os.chdir(ROOT)
    os.environ.setdefault("EBMSCALE_DATA", str(ROOT / "data"))
    os.environ["PWD"] = str(ROOT)
    yield
    os.chdir(old)
    os.environ.clear()
    os.environ.update(env)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_each_documented_command_parses(case, at_root, pytestconfig):
    path, cmd = case
    cmd = [os.path.expandvars(w) for w in cmd]
    name = path.relative_to(ROOT)
    if cmd[0] in ("python", "python3") and cmd[1:3] == ["-m", "venv"]:
        return
    if cmd[0] == "pip":
        extras = importlib.metadata.metadata("ebmscale").get_all("Provides-Extra")  # the installed checkout's
        for w in cmd:
            for extra in re.findall(r"\.\[([\w,]+)\]", w):
                assert set(extra.split(",")) <= set(extras), f"{name}: {w}: extras are {sorted(extras)}"
        return
    if cmd[0] in ("python", "python3") and cmd[1:3] == ["-m", "pytest"]:
        declared = {m.split(":")[0] for m in pytestconfig.getini("markers")}
        if "-m" in cmd[3:]:
            named = set(re.findall(r"\w+", cmd[cmd.index("-m", 3) + 1])) - {"not", "and", "or"}
            assert named <= declared, f"{name}: {cmd}: markers declared: {sorted(declared)}"
        assert all((ROOT / w).exists() for w in cmd[3:] if not w.startswith("-") and "/" in w or w == "tests")
        return
    if cmd[0] == "mlflow":
        from mlflow.cli import cli
        with argv_and_output(["mlflow"]) as (out, _):
            with pytest.raises(SystemExit):
                cli.main([*cmd[1:2], "--help"])
        shown = out.getvalue()
    else:
        argv = cmd[1:] if cmd[0] in ("python", "python3") else cmd
        tool = Path(argv[0]).stem.replace("_", "-") if argv[0].startswith("tools/") else argv[1]
        args = argv[1:] if argv[0].startswith("tools/") else argv[2:]
        if tool == "launch":
            check_launch(args, name)
        shown = run_help(argv)
    for w in cmd:
        if w.startswith("--") and w != "--help":
            assert w.split("=")[0] in shown, f"{name}: {' '.join(cmd)}: no {w} in its --help"


def headings(path: Path) -> set:
    """GitHub's anchors of a markdown file's headings."""
    out = set()
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            text = line.lstrip("#").strip().lower()
            out.add(re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", text)))
    return out


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: p.name)
def test_links_point_at_files_that_exist(path):
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"\w+://", target):
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        assert dest.exists(), f"{path.name}: link to {target}: no such file"
        if anchor and dest.suffix == ".md":
            assert anchor in headings(dest), f"{path.name}: link to {target}: no such heading in {dest.name}"


def test_the_configs_table_states_the_configs():
    rows = [r for r in (ROOT / "docs" / "recipes.md").read_text().splitlines() if re.match(r"\| `\w+` \| \w+ \|", r)]
    assert {r.split("`")[1] for r in rows} == {p.stem for p in (ROOT / "configs").glob("*.yaml")} - {"base"}
    num = lambda s: None if s == "none" else float(s.replace(",", ""))
    for row in rows:
        cells = [c.strip().strip("`") for c in row.strip("|").split("|")]
        name, recipe, arch, filters, size, classes, act, steps, step_size, clip, noise, batch, buf, train = cells
        c = load_config(ROOT / "configs" / f"{name}.yaml")
        m, s = c.model, c.sampler
        side, _, ch = size.partition("×")[2].partition("×")
        assert (recipe, arch, act) == (c.recipe, m.arch, m.activation), name
        assert [num(x) for x in (filters, side, ch, classes, steps, step_size, clip, noise, batch, buf, train)] == [
            m.filters, m.resolution, m.in_channels, m.num_classes, s.steps, s.step_size, s.grad_clip, s.noise,
            c.data.batch_size, c.buffer.capacity, c.train.steps], name


def test_the_layout_names_every_module_and_tool():
    layout = next(lines for lang, lines in code_blocks(README) if lines and lines[0].startswith("tools/"))
    words = set(re.findall(r"[\w.]+", " ".join(layout)))
    pkg = ROOT / "ebmscale"
    modules = {p.name for p in pkg.glob("*.py") if not p.name.startswith("__")}
    packages = {p.name for p in pkg.iterdir() if (p / "__init__.py").exists()} - {"configs", "profiles"}
    tools = {p.stem for p in (ROOT / "tools").glob("*.py")}
    assert modules | packages | tools <= words, f"the README's Layout misses {sorted((modules | packages | tools) - words)}"


def test_the_documented_python_names_exist():
    assert callable(ebmscale.load_model) and callable(EnergyModel.from_pretrained)
