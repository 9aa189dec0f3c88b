"""The console of `tools/launch.py --local`: progress lines with step numbers during a real run, plain in a file and a
live bar in a terminal; Ctrl-C once = a committed checkpoint at the next step boundary, twice = stop now."""
import io
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, TINY, make_digits_shards
from ebmscale.progress import LINE, Console, progress_line
from ebmscale.train.stop import HOLD_ENV

DIGITS = str(ROOT / "configs" / "digits.yaml")


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_line_plain_in_a_file_and_a_bar_in_a_terminal():
    line = progress_line(25, 1500, {"batch/loss": 0.01, "batch/e_pos": -0.5, "batch/e_neg": 0.25,
                                     "images_per_s": 45.2}, 754, "bf16")
    assert line == "[ebmscale] progress step 25/1500 (1%) loss 0.0100 E+ -0.5000 E- 0.2500 img/s 45.2 ETA 12m34s bf16"
    assert LINE.match(line).groups()[:2] == ("25", "1500")
    plain = io.StringIO()
    console = Console(plain)
    console.line("train:  5%|##   | 5/100\rtrain: 10%|###  | 10/100")  # a tqdm redraw keeps its last state
    console.line(line)
    assert plain.getvalue() == f"train: 10%|###  | 10/100\n{line}\n"
    term = Terminal()
    console = Console(term)
    console.line(line)
    console.line("[ebmscale] checkpoint committed")
    console.close()
    shown = term.getvalue()
    assert "25/1500" in shown and "E+ -0.5000" in shown and "\r" in shown and "[ebmscale] checkpoint committed\n" in shown


@pytest.fixture(scope="module")
def digits_shards():
    return make_digits_shards(ROOT / "data" / "digits")  # kept between sessions, as tests/test_launch.py does


def _launch(run, shards, out_file, *extra, env=()):
    """The launcher as a terminal's foreground job: its own process group, which Ctrl-C signals as a whole, and
    SIGINT not ignored (it is in background jobs of a non-interactive shell, which may be running these tests)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **dict(env)}
    return subprocess.Popen([sys.executable, str(ROOT / "tools" / "launch.py"), "--local", "--nproc", "2", DIGITS,
                             f"run.dir={run}", f"data.shards={shards}/digits-{{000000..000003}}.tar", *TINY,
                             "train.steps=100000", "checkpoint.every=100000", "tracking.enabled=false", *extra],
                            cwd=ROOT, env=env, stdout=out_file, stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as a terminal starts it



def _wait_for(path, text, proc, timeout=900):  # a first start may JIT-build DeepSpeed's CPU ops
    deadline = time.time() + timeout
    while text not in path.read_text(errors="replace"):
        if proc.poll() is not None or time.time() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"no '{text}' in the launcher's output:\n{path.read_text()[-3000:]}")
        time.sleep(0.2)


def _tasks_left(run):
    out = subprocess.run(["pgrep", "-f", f"submitit.*{run}"], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


@pytest.mark.slow
def test_progress_lines_and_first_ctrl_c_saves_a_checkpoint(tmp_path, digits_shards):
    run, log = tmp_path / "run", tmp_path / "launch.out"
    with open(log, "w") as f:
        proc = _launch(run, digits_shards, f)
        _wait_for(log, "progress step 3/100000", proc)
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=240) == 3
    out = log.read_text()
    assert "\r" not in out
    steps = [int(LINE.match(x)[1]) for x in out.splitlines() if LINE.match(x)]
    assert steps[:3] == [1, 2, 3]
    assert all(x.rsplit(" ", 1)[1] in ("fp32", "bf16", "fp16") for x in out.splitlines() if LINE.match(x))  # resolved
    assert "stopping at the next step boundary, saving a checkpoint" in out and "STOPPED" in out
    latest = (run / "checkpoints" / "latest").read_text().strip()
    assert int(latest.split("_")[1]) >= 3 and (run / "checkpoints" / latest / "COMMITTED").exists()
    assert json.loads((run / "checkpoints" / latest / "COMMITTED").read_text())
    assert "STOPPED by SIGINT" in (run / "launcher.log").read_text()
    assert _tasks_left(run) == []


@pytest.mark.slow
def test_second_ctrl_c_stops_now(tmp_path, digits_shards):
    run, log = tmp_path / "run", tmp_path / "launch.out"
    with open(log, "w") as f:
        # the ranks hold the first stop before its checkpoint until the second Ctrl-C (stop.HOLD_ENV): however busy
        # the machine, the second signal lands while the first stop is pending, as a user's second Ctrl-C does
        proc = _launch(run, digits_shards, f, env={HOLD_ENV: "1"})
        _wait_for(log, "progress step 2/100000", proc)
        os.killpg(proc.pid, signal.SIGINT)
        _wait_for(log, "Ctrl-C again to stop now", proc)
        _wait_for(log, "stop held", proc)  # rank 0 has taken the first Ctrl-C (two pending signals would be one)
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=120) == 130
    assert "stopped now" in log.read_text()
    assert "INTERRUPTED on rank 0: KeyboardInterrupt" in (run / "launcher.log").read_text()  # not at a step boundary
    assert not (run / "checkpoints" / "latest").exists()
    assert _tasks_left(run) == []  # the launcher waited for them
