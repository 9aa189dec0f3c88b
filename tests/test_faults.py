"""Trust under faults (issue 15): one writer per run folder, branch-safe history, safe loading, data that ends or
lies, bounded spool. Fast tests use the real Checkpointer and Trainer state plumbing with a stand-in engine; the
`slow` ones run real 2-rank DeepSpeed jobs (tests/conftest.py `train`)."""
import json
import random
import threading
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from conftest import ROOT
from ebmscale.buffer import ReplayBuffer
from ebmscale.data.writer import encode as _real_encode
from ebmscale.config import GuardConfig
from ebmscale.tracking.mlflow_run import NullTracker
from ebmscale.train import checkpoint as ck
from ebmscale.train.guard import Guard
from ebmscale.train.heartbeat import Heartbeat
from ebmscale.train.trainer import Trainer


class FakeEngine:
    """DeepSpeed's part of a checkpoint: one model file; remembers what it was asked to load."""
    def __init__(self):
        self.loaded, self.module = None, torch.nn.Linear(2, 1)

    def save_checkpoint(self, save_dir, tag, **kw):
        (Path(save_dir) / tag).mkdir(parents=True, exist_ok=True)
        torch.save({"module": {"w": torch.ones(3)}}, Path(save_dir) / tag / "mp_rank_00_model_states.pt")

    def load_checkpoint(self, load_dir, tag, **kw):
        self.loaded = (load_dir, tag)


class FakeStream:
    def __init__(self):
        self.epoch, self.batch = 0, 0

    def state_dict(self):
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, sd):
        self.epoch, self.batch = sd["epoch"], sd["batch"]


def make_trainer(root: Path, **ckpt_cfg) -> Trainer:
    t = object.__new__(Trainer)
    t.cfg = OmegaConf.create({"guard": {"initial_checkpoint": False}, "run": {"seed": 0},
                              "train": {"precision": "fp32", "zero_stage": 0}})
    t.engine, t.stream, t.tracker = FakeEngine(), FakeStream(), NullTracker()
    t.buffer = ReplayBuffer(16, (1, 4, 4), 10, "uint8")
    t.guard = Guard(OmegaConf.structured(GuardConfig()), {}, world_size=1, device=torch.device("cpu"))
    cfg = {**dict(async_buffer=False, keep_last=3, keep_every=0, resume="auto"), **ckpt_cfg}
    t.ckpt = ck.Checkpointer(root, SimpleNamespace(**cfg), rank=0, world_size=1)
    t.rank, t.world_size, t.step, t.images_seen, t._saved_step = 0, 1, 0, 0, -1
    t.heartbeat = Heartbeat(root.parent / "hb", 0)
    t.icd, t.device = None, torch.device("cpu")
    return t


def saved_run(root: Path, steps=(5,)) -> Trainer:
    t = make_trainer(root)
    t.buffer.push(torch.rand(8, 1, 4, 4), torch.randint(0, 10, (8,)))
    for s in steps:
        t.step, t.images_seen, t.stream.batch = s, 10 * s, s
        t.save()
        t.ckpt.commit()
    return t


# ---- 1. one list of stateful components; restore lives with the checkpoint code ----------------------------------
def test_every_component_round_trips_through_one_list(tmp_path):
    t = saved_run(tmp_path)
    t.guard.skipped = 3
    t.ckpt.write_trainer_state(tmp_path / ck.tag(5), {**ck.Checkpointer.read_trainer_state(tmp_path / ck.tag(5)),
                                                      "guard": t.guard.state_dict()})
    want_buffer, want_rng = t.buffer.state_dict(), (random.random(), np.random.rand(), torch.rand(1))
    u = make_trainer(tmp_path)
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    ck.restore(u, tmp_path / ck.tag(5))
    assert (u.step, u.images_seen, u.stream.batch, u.guard.skipped) == (5, 50, 5, 3)
    assert u.engine.loaded == (str(tmp_path), ck.tag(5))
    assert torch.equal(u.buffer.state_dict()["images"], want_buffer["images"])
    assert (random.random(), np.random.rand(), torch.rand(1)) == want_rng
    assert set(u.components()) == {"buffer", "stream", "rng", "trainer", "guard"}


def test_trainer_does_not_import_main():
    assert "ebmscale.train.main" not in (ROOT / "ebmscale" / "train" / "trainer.py").read_text()
    code = "import sys, ebmscale.train.trainer; import ebmscale.train.checkpoint as c; " \
           "assert c.restore and 'ebmscale.train.main' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True, timeout=600)


# ---- 2. safe loading ---------------------------------------------------------------------------------------------
class Payload:  # what an attacker's pickle could carry: any importable callable
    def __reduce__(self):
        return (print, ("pwned",))


def test_what_ebmscale_writes_loads_weights_only(tmp_path):
    saved_run(tmp_path)
    for f in (tmp_path / ck.tag(5)).glob("*.pt"):
        torch.load(f, weights_only=True)
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    torch.save({"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum(2)}, tmp_path / "ds.pt")
    assert ck.load(tmp_path / "ds.pt")["zero_stage"] == ZeroStageEnum(2)


def test_a_file_that_needs_pickles_is_refused_unless_trusted(tmp_path, capsys):
    from ebmscale.eval.loading import load_buffer
    folder = tmp_path / ck.tag(1)
    folder.mkdir()
    torch.save({"buffer": Payload()}, folder / "rank_00000.pt")
    (folder / "trainer.json").write_text('{"world_size": 1}')
    with pytest.raises(ck.UntrustedFile, match="--trust-pickles"):
        load_buffer(folder)
    with ck.safe_torch_load(), pytest.raises(ck.UntrustedFile):  # what DeepSpeed's loaders call
        torch.load(folder / "rank_00000.pt", weights_only=False)
    assert "pwned" not in capsys.readouterr().out
    ck.load(folder / "rank_00000.pt", trust=True)
    assert "pwned" in capsys.readouterr().out


# ---- 3. one writer per run folder -------------------------------------------------------------------------------
def test_a_users_folder_in_checkpoints_is_neither_listed_nor_touched(tmp_path):
    saved_run(tmp_path, steps=(5,))
    bak = tmp_path / "step_000000500.bak"
    bak.mkdir()
    (bak / ck.COMMIT).write_text("{}")
    partial = tmp_path / ck.tag(9)
    partial.mkdir()
    (partial / "mp_rank_00_model_states.pt").write_text("half a save")
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == [ck.tag(5)]
    assert make_trainer(tmp_path).ckpt.resume_target() == tmp_path / ck.tag(5)
    assert bak.exists() and not partial.exists()
    moved = list(tmp_path.glob(f"partial-*/{ck.tag(9)}/mp_rank_00_model_states.pt"))
    assert len(moved) == 1 and moved[0].read_text() == "half a save"  # moved aside, not deleted


def _take(run: Path) -> subprocess.CompletedProcess:
    code = f"from ebmscale.train import runlock; runlock.acquire({str(run)!r}); print('took it')"
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_a_live_writer_refuses_a_second_one_a_dead_one_is_taken_over(tmp_path, monkeypatch):
    from ebmscale.launch.checks import check_not_in_use
    from ebmscale.config import ConfigError
    from ebmscale.train import runlock
    held = runlock.acquire(tmp_path)
    res = _take(tmp_path)
    assert res.returncode != 0 and f"pid {held['pid']}" in res.stderr and "RunFolderInUse" in res.stderr
    with pytest.raises(ConfigError, match=f"pid {held['pid']}"):  # the launcher, on the login node
        check_not_in_use(tmp_path)
    runlock.release(tmp_path, held)
    assert not (tmp_path / runlock.LOCK).exists()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / runlock.LOCK).write_text(json.dumps({**held.info, "pid": int(dead.stdout)}))  # a SIGKILLed holder
    res = _take(tmp_path)
    assert res.returncode == 0 and f"pid {int(dead.stdout)}" in res.stdout and "is gone" in res.stdout
    assert not (tmp_path / runlock.LOCK).exists()  # released at exit
    other = {"job_id": "4242", "host": "node-x", "pid": 1, "start": "then"}  # another host's job
    (tmp_path / runlock.LOCK).write_text(json.dumps(other))
    monkeypatch.setattr(runlock, "slurm_state", lambda job: "RUNNING")
    with pytest.raises(runlock.RunFolderInUse, match="SLURM job 4242 on host node-x, pid 1.*SLURM says it is RUNNING"):
        runlock.acquire(tmp_path)
    monkeypatch.setattr(runlock, "slurm_state", lambda job: None)  # squeue/sacct failing: unknown, not taken over
    with pytest.raises(runlock.RunFolderInUse, match="could not be asked about job 4242.*unknown"):
        runlock.acquire(tmp_path)
    monkeypatch.setattr(runlock, "slurm_state", lambda job: "CANCELLED by 0")
    assert runlock.check(tmp_path) is None


@pytest.mark.slow
def test_two_launches_on_one_run_folder_in_the_same_second(tmp_path, digits_shards):
    import time
    from concurrent.futures import ThreadPoolExecutor
    from conftest import train
    run = tmp_path / "run"

    def launch():
        t0 = time.monotonic()
        res = train(run, digits_shards, "train.steps=4", "checkpoint.every=2", "tracking.enabled=false", check=False,
                    timeout=1200)
        return res, time.monotonic() - t0
    with ThreadPoolExecutor(2) as pool:
        done = [f.result() for f in [pool.submit(launch), pool.submit(launch)]]
    ok = [(r, t) for r, t in done if r.returncode == 0]
    refused = [(r, t) for r, t in done if r.returncode != 0]
    assert len(ok) == 1 and len(refused) == 1, [r.stderr[-2000:] for r, _ in done]
    msg = refused[0][0].stdout + refused[0][0].stderr
    assert "is being written by a job outside SLURM on host" in msg and "pid" in msg, msg[-3000:]
    print(f"refused after {refused[0][1]:.0f} s, the other ran {ok[0][1]:.0f} s")
    assert [p.name for p in ck.list_checkpoints(run / "checkpoints")] == [ck.tag(2), ck.tag(4)]
    assert not list((run / "checkpoints").glob("partial-*")) and not (run / "writer.lock").exists()


# ---- 4. a history that knows branches ---------------------------------------------------------------------------
def test_resuming_an_older_step_branches_and_a_relaunch_continues_the_branch(tmp_path):
    old = saved_run(tmp_path, steps=(2, 4, 6))
    stamp = (tmp_path / ck.tag(4) / ck.COMMIT).read_text()
    t = make_trainer(tmp_path, resume=str(tmp_path / ck.tag(2)))
    assert t.ckpt.resume_target() == tmp_path / ck.tag(2)
    branched = list(tmp_path.glob("branched-*"))
    assert len(branched) == 1 and sorted(p.name for p in branched[0].iterdir()) == [ck.tag(4), ck.tag(6)]
    assert (branched[0] / ck.tag(4) / ck.COMMIT).read_text() == stamp  # moved whole, not rewritten
    ck.restore(t, tmp_path / ck.tag(2))
    t.buffer.push(torch.rand(8, 1, 4, 4), torch.randint(0, 10, (8,)))
    t.step = 4
    t.save()
    t.ckpt.commit()
    assert (tmp_path / ck.tag(4) / ck.COMMIT).read_text() != stamp
    assert (tmp_path / "latest").read_text().strip() == ck.tag(4) == ck.latest(tmp_path).name
    again = make_trainer(tmp_path, resume=str(tmp_path / ck.tag(2)))  # the same command, relaunched
    assert again.ckpt.resume_target() == tmp_path / ck.tag(4) and len(list(tmp_path.glob("branched-*"))) == 1
    assert old.step == 6


def test_a_save_never_writes_into_a_committed_folder(tmp_path):
    t = saved_run(tmp_path, steps=(4,))
    before = (tmp_path / ck.tag(4) / ck.COMMIT).read_text()
    t._saved_step = -1
    t.save()  # step 4 again (e.g. a second line of history)
    assert not (tmp_path / ck.tag(4) / ck.COMMIT).exists()  # not committed before the commit
    assert (next(tmp_path.glob(f"branched-*/{ck.tag(4)}")) / ck.COMMIT).read_text() == before


def test_auto_falls_back_past_a_torn_checkpoint_naming_the_bad_file(tmp_path, capsys):
    saved_run(tmp_path, steps=(2, 4))
    bad = tmp_path / ck.tag(4) / "mp_rank_00_model_states.pt"
    bad.write_bytes(bad.read_bytes()[:10])
    assert make_trainer(tmp_path).ckpt.resume_target() == tmp_path / ck.tag(2)
    assert str(bad) in capsys.readouterr().err  # a warning: stderr (ebmscale/log.py)
    (tmp_path / ck.tag(2) / "trainer.json").write_text("{")
    assert ck.latest(tmp_path) is None
    from ebmscale.config import ConfigError  # and a launch refuses to start from step 0 over them
    with pytest.raises(ConfigError, match="none is readable.*checkpoint.resume=never run.overwrite=true"):
        make_trainer(tmp_path).ckpt.resume_target()


def test_with_the_guard_off_retention_keeps_the_newest_finite_checkpoint(tmp_path):
    t = make_trainer(tmp_path, keep_last=1)
    t.guard.cfg.enabled = False
    for s in (2, 4, 6):
        if s == 4:
            with torch.no_grad():
                t.engine.module.weight.fill_(float("nan"))
        t.step = s
        t.save()
        t.commit()
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == [ck.tag(2), ck.tag(6)]
    assert [p.name for p in ck.healthy_checkpoints(tmp_path)] == [ck.tag(2)]
    files = json.loads((tmp_path / ck.tag(2) / ck.COMMIT).read_text())["files"]
    assert files["rank_00000.pt"] == (tmp_path / ck.tag(2) / "rank_00000.pt").stat().st_size


def test_a_fork_into_another_run_folder_is_recognised_and_frozen_keys_checked(tmp_path):
    from ebmscale.config import ConfigError, load_config
    from ebmscale.train.main import check_frozen, fork_parent
    cfg = load_config(ROOT / "configs" / "digits.yaml", [])
    parent = tmp_path / "parent"
    (parent / "checkpoints" / ck.tag(2)).mkdir(parents=True)
    (parent / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    child = tmp_path / "child"
    assert fork_parent(parent / "checkpoints" / ck.tag(2), child) == parent.resolve()
    assert fork_parent(child / "checkpoints" / ck.tag(2), child) is None
    cfg.model.filters = 7
    with pytest.raises(ConfigError, match="model differs"):
        check_frozen(cfg, parent)


@pytest.mark.slow
def test_kill_during_branch_drill(tmp_path, digits_shards):
    """Resume from an older step, kill mid-save, relaunch the same command: the branch continues, the old line is in
    branched-*/, the torn save in partial-*/, nothing is deleted."""
    from conftest import train
    run, common = tmp_path / "run", ["checkpoint.every=2", "tracking.enabled=false", "train.steps=6"]
    train(run, digits_shards, *common, timeout=1200)
    old = {p.name: (p / ck.COMMIT).read_text() for p in ck.list_checkpoints(run / "checkpoints")}
    assert sorted(old) == [ck.tag(2), ck.tag(4), ck.tag(6)]
    branch = [*common, f"checkpoint.resume={run / 'checkpoints' / ck.tag(2)}"]
    res = train(run, digits_shards, *branch, env={"EBMSCALE_FAULT": "kill_in_save:4:0"}, check=False,
                timeout=1200)
    assert res.returncode != 0
    res = train(run, digits_shards, *branch, timeout=1200)
    out = res.stdout + res.stderr
    assert "continuing the branch" in out and "resumed step 2" in out, out[-3000:]
    (aside,) = (run / "checkpoints").glob("branched-*")
    assert {p.name: (p / ck.COMMIT).read_text() for p in aside.iterdir()} == {k: v for k, v in old.items()
                                                                            if k != ck.tag(2)}
    assert list((run / "checkpoints").glob(f"partial-*/{ck.tag(4)}"))  # the torn save, kept
    assert [p.name for p in ck.list_checkpoints(run / "checkpoints")] == [ck.tag(2), ck.tag(4), ck.tag(6)]
    assert ck.latest(run / "checkpoints").name == ck.tag(6)


# ---- 5. data that ends and data that lies -----------------------------------------------------------------------
def data_cfgs(shards, **data):
    from ebmscale.config import DataConfig, ModelConfig
    d = {**dict(shards=str(shards), batch_size=8, workers=0, shuffle_buffer=10, resampled=False, dequantize=False,
                pin_memory=False, max_bad_fraction=0.5), **data}
    return (OmegaConf.structured(DataConfig(**d)),
            OmegaConf.structured(ModelConfig(in_channels=1, resolution=8, num_classes=3)))


def write_tar(path: Path, samples: list) -> Path:
    import io
    import tarfile
    with tarfile.open(path, "w") as tar:
        for key, fields in samples:
            for ext, data in fields.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def png(w=8, h=8) -> bytes:
    import io
    from PIL import Image
    buf = io.BytesIO()
    Image.new("L", (w, h), 128).save(buf, "PNG")
    return buf.getvalue()


def test_a_finite_stream_runs_epoch_after_epoch_with_exact_resume(tmp_path):
    from ebmscale.data import build_stream
    for i in range(2):
        write_tar(tmp_path / f"s-{i:06d}.tar", [(f"{i}{k:03d}", {"png": png(8, 8 + k % 5), "cls": str(k % 3).encode()})
                                                 for k in range(20)])
    pattern = tmp_path / "s-{000000..000001}.tar"
    t = make_trainer(tmp_path / "ckpt")
    t.stream = build_stream(*data_cfgs(pattern), 0, 1, 0)
    t._data = iter(t.stream)
    assert t.stream.steps_per_epoch == 5
    for _ in range(6):  # no StopIteration at the epoch boundary
        t.next_batch()
    state = t.stream.state_dict()
    after = [t.next_batch()[0] for _ in range(6)]  # across the next boundary too
    u = make_trainer(tmp_path / "ckpt2")
    u.stream = build_stream(*data_cfgs(pattern), 0, 1, 0)
    u.stream.load_state_dict(state)
    u._data = iter(u.stream)
    assert state["epoch"] == 1 and all(torch.equal(a, u.next_batch()[0]) for a in after)
    assert t.stream.state_dict()["epoch"] == 2


def test_lying_samples_are_skipped_and_counted_not_fatal(tmp_path, caplog):
    from ebmscale.data import build_stream
    good = [(f"g{k:03d}", {"png": png(), "cls": b"1"}) for k in range(30)]
    liars = [("label", {"png": png(), "cls": b"7"}),  # outside model.num_classes=3
             ("broken", {"png": b"\x89PNG not really", "cls": b"0"}),
             ("bomb", {"png": png(64, 64), "cls": b"0"}),  # over the pixel cap of this test
             ("huge", {"png": png(), "cls": b"0", "txt": b"x" * 5000})]  # a member over this test's member cap
    write_tar(tmp_path / "s-000000.tar", good[:15] + liars + good[15:])
    s = build_stream(*data_cfgs(tmp_path / "s-000000.tar", batch_size=10, max_image_pixels=1000,
                                max_member_bytes=4000), 0, 1, 0)
    assert sum(1 for _ in s) == 3
    assert s.stats()["bad_samples"] == 4 and s.stats()["samples"] == 30
    log = caplog.text
    assert "label: BadSample: label 7 outside" in log and "bomb: ImageBomb: 64x64 pixels" in log
    assert "huge: BadSample: huge.txt is 5,000 bytes, over data.max_member_bytes=4,000" in log
    assert "broken:" in log and "s-000000.tar" in log


def test_an_oversized_tar_member_is_skipped_unread(tmp_path):
    import tracemalloc
    from ebmscale.data.shards import tar_samples
    write_tar(tmp_path / "big.tar", [("a", {"png": png(), "cls": b"0"}), ("b", {"png": b"\0" * (64 << 20)}),
                                     ("c", {"png": png(), "cls": b"1"})])
    tracemalloc.start()
    samples = list(tar_samples(str(tmp_path / "big.tar"), max_member_bytes=1 << 20))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert [x["__key__"] for x in samples] == ["a", "b", "c"] and "png" not in samples[1]
    assert "b.png is 67,108,864 bytes" in samples[1]["__bad__"] and "__bad__" not in samples[2]
    assert peak < 8 << 20


def test_a_stuck_loader_worker_fails_the_run_naming_the_rank(tmp_path):
    import time
    from ebmscale.data import build_stream
    from ebmscale.data.stream import LoaderTimeout
    shard = write_tar(tmp_path / "s.tar", [(f"g{k:03d}", {"png": png(), "cls": b"1"}) for k in range(16)])
    stalled = f"pipe:sleep 90; cat {shard}"  # storage that stops answering
    (tmp_path / "manifest.json").write_text(json.dumps({"num_classes": 3, "shards": [{"name": stalled, "samples": 16}]}))
    s = build_stream(*data_cfgs(tmp_path / "manifest.json", workers=1, allow_pipe=True, loader_timeout_s=3), 0, 1, 0)
    t0 = time.monotonic()
    with pytest.raises(LoaderTimeout, match=r"rank 0 on .*data.loader_timeout_s=3 s .*sleep 90"):
        next(iter(s))
    assert time.monotonic() - t0 < 80  # not the 90 s the storage takes
    s.close()


def _die_on_third(item, **kw):
    import os
    if item[1] == 2:
        os._exit(9)  # what the OOM killer does to a worker
    return _real_encode(item, **kw)  # not writer.encode: a forked worker inherits the patch (itself: a recursion)


def test_make_shards_survives_a_dead_worker_and_verify_checks_sha256(tmp_path, monkeypatch):
    import time
    from ebmscale.data import build_stream, writer
    from ebmscale.config import ConfigError
    from ebmscale.data.sources import Source
    items = [(np.full((8, 8), k * 20, np.uint8), k % 3) for k in range(12)]
    src = Source("arrays", "mem", items, [{"name": c} for c in "abc"])
    monkeypatch.setattr(writer, "encode", _die_on_third)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="worker process died"):
        writer.write_shards(src, tmp_path, prefix="s", size=8, channels=1, fmt="png", samples_per_shard=4,
                            workers=2, progress=False, seed=1)
    assert time.monotonic() - t0 < 60
    monkeypatch.undo()
    writer.write_shards(src, tmp_path, prefix="s", size=8, channels=1, fmt="png", samples_per_shard=4, workers=2,
                        progress=False, seed=1)
    cli = [sys.executable, str(ROOT / "tools" / "make_shards.py"), "verify", str(tmp_path)]
    env = {**__import__("os").environ, "PYTHONPATH": str(ROOT)}
    assert subprocess.run(cli, cwd=ROOT, env=env, capture_output=True, timeout=120).returncode == 0
    shard = tmp_path / "s-000001.tar"
    data = bytearray(shard.read_bytes())
    data[600] ^= 1
    shard.write_bytes(bytes(data))
    res = subprocess.run(cli, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and "s-000001.tar: sha256 differs" in res.stderr
    with pytest.raises(ConfigError, match="s-000001.tar"):
        build_stream(*data_cfgs(tmp_path / "manifest.json", verify=True), 0, 1, 0)


# ---- 6. bounded waits: the KILLED watchdog judges by the trainer's heartbeat -------------------------------------
def test_the_killed_watchdog_waits_for_a_slow_but_beating_trainer(tmp_path, monkeypatch):
    import threading
    import time
    from ebmscale.tracking import mlflow_run
    from ebmscale.tracking.mlflow_run import MlflowTracker
    from ebmscale.train import heartbeat, stop
    # the trainer's and the watchdog's clock, moved by this test alone: how busy the machine is changes nothing
    clock = [1000.0]
    fake_time = SimpleNamespace(monotonic=lambda: clock[0], time=lambda: clock[0])
    monkeypatch.setattr(heartbeat, "time", fake_time)
    monkeypatch.setattr(mlflow_run, "time", fake_time)
    monkeypatch.setattr(heartbeat, "WRITE_EVERY_S", 0.0)
    hb = Heartbeat(tmp_path, 0)
    hb.beat(0)
    clock[0] += 1.0
    hb.beat(1)  # the trainer's pace: 1 s a step
    ends = []
    fake = SimpleNamespace(_closed=threading.Event(), _last_put=0.0, killed_after_s=0.3, heartbeat=hb, _run_id="r",
                           run_dir=tmp_path, spool=SimpleNamespace(lock=threading.Lock()),
                           _put=lambda r: ends.append((clock[0], r)))
    stop.request_stop("SIGTERM")
    try:
        t0 = clock[0]
        dog = threading.Thread(target=MlflowTracker._watchdog, args=(fake,), daemon=True)
        dog.start()
        for step in (2, 3, 4):  # slower than killed_after_s, but steady
            time.sleep(0.6)  # the watchdog looks every 0.5 s of real time
            clock[0] += 0.9
            hb.beat(step)
        time.sleep(0.6)
        assert not ends, "marked KILLED while the trainer was beating"
        clock[0] += 10.0  # then silence, far past its patience (1.5 steps)
        dog.join(10)
    finally:
        stop.clear()
        fake._closed.set()
    assert ends and ends[-1][1]["status"] == "KILLED" and ends[-1][0] - t0 > 2.7 + 1.0
    assert "rank 0 on" in ends[0][1]["tags"]["end_reason"]  # names the silent rank and its host


# ---- 7. a bounded tracking spool; checkpoints recorded only once committed --------------------------------------
def test_the_spool_is_capped_artifacts_dropped_metrics_kept(tmp_path, capsys):
    from ebmscale.config import TrackingConfig
    from ebmscale.tracking import build_tracker
    cfg = OmegaConf.structured(TrackingConfig(uri="http://127.0.0.1:9", retry_s=3600, spool_max_mb=1))
    t = build_tracker(cfg, tmp_path / "run", 0)  # a store that never answers
    t.start({"a": 1}, None, {})
    big = tmp_path / "big.bin"
    big.write_bytes(b"x" * (2 << 20))
    t.log_artifact(big, "x")
    t.log_image("noise", (np.random.default_rng(0).random((600, 600, 3)) * 255).astype(np.uint8), step=1)
    for step in range(1, 2001):
        t.log_metrics({"loss": 1.0 / step}, step)
    ops = [r.get("op") for _, r in t.spool.records(start=0)]
    assert ops.count("metrics") == 2000 and "artifact" not in ops and "image" not in ops
    assert t.spool.file_bytes <= 1 << 20
    err = capsys.readouterr().err
    assert "tracking.spool_max_mb=1" in err and "Metrics and tags are still kept" in err
    t._closed.set()


def test_a_checkpoint_is_recorded_for_tracking_only_after_its_commit(tmp_path):
    t = make_trainer(tmp_path)
    seen = []
    t.tracker.record_checkpoint = lambda folder, step: seen.append((folder, step, ck.committed(folder)))
    t.step = 3
    t.save()
    assert seen == []
    t.commit()
    assert seen == [(tmp_path / ck.tag(3), 3, True)]


def test_inside_one_slurm_job_a_requeue_takes_over_but_a_second_launch_on_the_node_does_not(tmp_path, monkeypatch):
    import os
    import socket
    import time
    from ebmscale.train import runlock
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    live = {"job_id": "77", "restart": 0, "host": socket.gethostname(), "pid": os.getppid(), "token": "t",
            "proc_start": runlock._proc_start(os.getppid()), "start": "now", "lease_s": 0.5}
    assert runlock.stale(live) is None  # same job, same node, live process: a second launch, refused
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert runlock.stale(live) is None  # a live earlier instance of this job on this node: a zombie, refused
    lock = tmp_path / runlock.LOCK
    lock.write_text(json.dumps({**live, "host": "node-b"}))
    assert "silent for" in runlock.stale({**live, "host": "node-b"}, lock)  # requeued here; node-b no longer beats
    beat = threading.Thread(target=lambda: [time.sleep(0.05) or os.utime(lock) for _ in range(30)])
    beat.start()
    assert runlock.stale({**live, "host": "node-b"}, lock) is None  # still beating on node-b: a zombie
    beat.join()
