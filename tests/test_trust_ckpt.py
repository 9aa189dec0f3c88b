"""Committed history never changes (issue 23, items 2-4): drills with the real trainer, unit tests of the content
hash, the universal-conversion markers, the refusal to restart from zero, the writer lease under races, full disks."""
import json
import os
import shutil
import subprocess
import time

import pytest
import torch

from conftest import train
from ebmscale.train import checkpoint as ck

DIGITS = ["tracking.enabled=false", "guard.on_nonfinite=rollback", "guard.remedies=[lr*0.5]"]


# ---- drill 1: a rollback, a kill before the next commit, a relaunch -------------------------------------------
@pytest.mark.slow
def test_drill_rollback_then_kill_resumes_at_the_rolled_back_step(tmp_path, digits_shards):
    run = tmp_path / "run"
    args = ["train.steps=8", "checkpoint.every=4", *DIGITS]
    res = train(run, digits_shards, *args, nproc=1, check=False, env={"EBMSCALE_FAULT": "nan_loss:6:0,kill_at_step:7:0"})
    out = res.stdout + res.stderr
    assert res.returncode != 0 and "rollback 1/3 to step 4" in out, out[-3000:]
    step4 = run / "checkpoints" / ck.tag(4)
    before = {f.name: f.read_bytes() for f in step4.iterdir()}
    assert ck.invalid(step4, content=True) is None and (run / "checkpoints" / f"{ck.tag(4)}{ck.ROLLBACK}").exists()
    res = train(run, digits_shards, *args, nproc=1)
    out = res.stdout + res.stderr
    assert "skipping torn checkpoint" not in out and "resumed step 4" in out, out[-3000:]
    assert "remedies in force: lr*0.5" in out  # the rollback's guard state survived the kill, beside the step
    assert {f.name: f.read_bytes() for f in step4.iterdir()} == before  # the committed step was never rewritten


# ---- drill 4: 1 rank -> 2 ranks beside a stale FAILED marker ------------------------------------------------------
@pytest.mark.slow
def test_drill_new_world_size_beside_a_stale_failed_marker(tmp_path, digits_shards):
    run = tmp_path / "run"
    common = ["checkpoint.every=3", "tracking.enabled=false", "train.zero_stage=2"]
    train(run, digits_shards, "train.steps=3", *common, nproc=1)
    stale = run / "checkpoints" / f"{ck.tag(3)}_universal"
    stale.mkdir()
    (stale / "FAILED").touch()  # left by an earlier attempt
    res = train(run, digits_shards, "train.steps=4", *common, nproc=2, check=False)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    assert "written by 1 ranks on 2" in out
    assert json.loads((stale / "COMPLETE").read_text())["source"] == ck.commit_key(run / "checkpoints" / ck.tag(3))
    step4 = run / "checkpoints" / ck.tag(4)  # committed by 2 ranks: each hashed its own files
    marker = json.loads((step4 / ck.COMMIT).read_text())
    assert set(marker["sha256"]) == set(marker["files"]) and any("pp_rank_1_" in n for n in marker["sha256"])
    assert ck.invalid(step4, content=True) is None


@pytest.mark.slow
def test_drill_a_fork_to_a_new_world_size_writes_nothing_in_the_other_run(tmp_path, digits_shards):
    other, run = tmp_path / "other", tmp_path / "run"
    common = ["checkpoint.every=3", "tracking.enabled=false", "train.zero_stage=2"]
    train(other, digits_shards, "train.steps=3", *common, nproc=1)
    before = {p: p.read_bytes() for p in (other / "checkpoints").rglob("*") if p.is_file()}
    res = train(run, digits_shards, "train.steps=4", f"checkpoint.resume={other / 'checkpoints' / ck.tag(3)}", *common,
                nproc=2, check=False)
    out = res.stdout + res.stderr
    assert res.returncode == 0 and "written by 1 ranks on 2" in out, out[-4000:]
    after = {p: p.read_bytes() for p in (other / "checkpoints").rglob("*") if p.is_file()}
    assert after == before  # the conversion went into this run's folder (before: step_3_universal, latest_universal)
    assert (run / "checkpoints" / f"{ck.tag(3)}{ck.UNIVERSAL}" / "COMPLETE").exists()


# ---- the content hash --------------------------------------------------------------------------------------------
from test_faults import make_trainer, saved_run  # noqa: E402  (the fake engine's tiny trainer)


def test_commit_records_each_files_sha256_and_a_changed_byte_is_skipped_by_name(tmp_path, capsys):
    saved_run(tmp_path, steps=(2, 4))
    marker = json.loads((tmp_path / ck.tag(4) / ck.COMMIT).read_text())
    assert set(marker["sha256"]) == set(marker["files"]) == {"mp_rank_00_model_states.pt", "rank_00000.pt", "trainer.json"}
    assert marker["sha256"]["trainer.json"] == ck.digest(tmp_path / ck.tag(4) / "trainer.json")
    bad = tmp_path / ck.tag(4) / "rank_00000.pt"
    data = bytearray(bad.read_bytes())
    data[-1] ^= 1  # same size, other content: sizes alone pass it
    bad.write_bytes(bytes(data))
    assert ck.invalid(tmp_path / ck.tag(4)) is None
    assert "has changed since its commit" in ck.invalid(tmp_path / ck.tag(4), content=True)
    assert make_trainer(tmp_path).ckpt.resume_target() == tmp_path / ck.tag(2)
    err = capsys.readouterr().err
    assert f"skipping torn checkpoint {ck.tag(4)}: {bad} has changed since its commit" in err
    assert make_trainer(tmp_path).ckpt.rollback_target() == tmp_path / ck.tag(2)  # not rolled back to either


def test_committed_names_outside_the_folder_are_refused(tmp_path):
    saved_run(tmp_path, steps=(2,))
    marker = json.loads((tmp_path / ck.tag(2) / ck.COMMIT).read_text())
    marker["sha256"]["../../etc/passwd"] = "0" * 64
    (tmp_path / ck.tag(2) / ck.COMMIT).write_text(json.dumps(marker))
    assert "outside its folder" in ck.invalid(tmp_path / ck.tag(2), content=True)


def _rewrite(key, value):
    return lambda m, f: (f / ck.COMMIT).write_text(json.dumps({**m, key: {k: value for k in m[key]}}))


@pytest.mark.parametrize("craft, names", [
    (_rewrite("sha256", "abc"), "COMMITTED"),  # a hash of the wrong length
    (_rewrite("files", "12"), "COMMITTED"),  # said "12 bytes, 12 at commit" before
    (lambda m, f: (f / ck.COMMIT).write_text("not json{"), "COMMITTED"),  # blamed trainer.json before
    (lambda m, f: ((f / ck.COMMIT).unlink(), os.mkfifo(f / ck.COMMIT)), "COMMITTED"),  # read forever before
    (lambda m, f: ((f / ck.COMMIT).unlink(), os.symlink("/dev/zero", f / ck.COMMIT)), "COMMITTED"),  # filled memory
    (lambda m, f: (f / "trainer.json").write_text("{}"), "trainer.json"),  # passed as a 0-rank checkpoint before
])
def test_a_crafted_marker_is_refused_naming_the_file_and_never_hangs(tmp_path, craft, names):
    saved_run(tmp_path, steps=(2, 4))
    step4 = tmp_path / ck.tag(4)
    craft(json.loads((step4 / ck.COMMIT).read_text()), step4)
    why = ck.invalid(step4, content=True)
    assert why and why.startswith(f"{step4 / names} unreadable"), why
    assert ck.latest(tmp_path) == tmp_path / ck.tag(2) and ck.healthy_checkpoints(tmp_path, 1) == [tmp_path / ck.tag(2)]


def test_a_step_folder_or_file_that_is_a_link_elsewhere_is_not_resumed_and_its_target_survives(tmp_path):
    run, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    saved_run(run, steps=(2, 4, 6))
    elsewhere.mkdir()
    shutil.move(run / ck.tag(6), elsewhere / ck.tag(6))  # intact and committed, but not in this run's folder
    (run / ck.tag(6)).symlink_to(elsewhere / ck.tag(6))
    assert "is a symbolic link" in ck.invalid(run / ck.tag(6), content=True)
    shutil.move(run / ck.tag(4) / "rank_00000.pt", elsewhere / "rank_00000.pt")
    (run / ck.tag(4) / "rank_00000.pt").symlink_to(elsewhere / "rank_00000.pt")
    assert "rank_00000.pt is a symbolic link" in ck.invalid(run / ck.tag(4), content=True)
    t = make_trainer(run, keep_last=1)
    assert t.ckpt.resume_target() == run / ck.tag(2)
    t.ckpt.discard_after(run / ck.tag(2))  # a rollback removes what is newer: the link, never what it points to
    assert ck.invalid(elsewhere / ck.tag(6), content=True) is None and (elsewhere / "rank_00000.pt").exists()


def test_hashing_happens_off_the_training_thread_and_skips_other_ranks_temporary_files(tmp_path, monkeypatch):
    import threading
    t = make_trainer(tmp_path, async_buffer=True)
    t.buffer.push(torch.rand(8, 1, 4, 4), torch.randint(0, 10, (8,)))
    where, digest = [], ck.digest
    monkeypatch.setattr(ck, "digest", lambda f: (where.append((f.name, threading.current_thread().name)), digest(f))[1])
    t.step = 2
    t.save()
    t.ckpt.commit()
    main = threading.main_thread().name
    assert where and all(th != main for _, th in where), where  # a large checkpoint's hash does not stall a step
    assert ck.invalid(tmp_path / ck.tag(2), content=True) is None
    assert ck._owned(".rank_00001.pt.tmp") == -1  # another rank's file, still being written: rank 0 leaves it


def test_rollback_state_lives_beside_the_step_keyed_to_its_commit_and_moves_with_it(tmp_path):
    t = saved_run(tmp_path, steps=(2, 4))
    step2 = tmp_path / ck.tag(2)
    before = {f.name: f.read_bytes() for f in step2.iterdir()}
    t.ckpt.write_trainer_state(step2, {**ck.Checkpointer.read_trainer_state(step2), "guard": {"marker": 1}})
    assert {f.name: f.read_bytes() for f in step2.iterdir()} == before and ck.invalid(step2, content=True) is None
    assert ck.Checkpointer.read_trainer_state(step2)["guard"] == {"marker": 1}
    (tmp_path / f"{ck.tag(4)}{ck.UNIVERSAL}").mkdir()
    t.ckpt.discard_after(step2)  # a rollback to step 2: step 4 and what belongs to it go
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("step_")) == [ck.tag(2), f"{ck.tag(2)}{ck.ROLLBACK}"]
    (tmp_path / "latest").unlink()
    aside = tmp_path / "aside"
    aside.mkdir()
    ck._move_with_companions(step2, aside)  # a branch moves the step with what belongs to it
    assert sorted(p.name for p in aside.iterdir()) == [ck.tag(2), f"{ck.tag(2)}{ck.ROLLBACK}"]
    side = aside / f"{ck.tag(2)}{ck.ROLLBACK}"  # keyed to another commit of step 2: ignored
    side.write_text(side.read_text().replace(ck.commit_key(aside / ck.tag(2)), "another-commit"))
    assert "marker" not in json.dumps(ck.Checkpointer.read_trainer_state(aside / ck.tag(2)))
    side.write_text(json.dumps({"commit": ck.commit_key(aside / ck.tag(2)), "state": {"crafted": 1}}))
    assert ck.Checkpointer.read_trainer_state(aside / ck.tag(2))["world_size"] == 1  # KeyError in main before


def test_no_readable_checkpoint_refuses_to_start_from_zero_saying_how(tmp_path):
    from ebmscale.config import ConfigError
    saved_run(tmp_path, steps=(2, 4))
    for s in (2, 4):
        (tmp_path / ck.tag(s) / "trainer.json").write_text("{")
    with pytest.raises(ConfigError, match=r"none is readable.*refusing to start again from step 0.*"
                                          r"checkpoint.resume=never run.overwrite=true"):
        make_trainer(tmp_path).ckpt.resume_target()
    assert make_trainer(tmp_path / "fresh").ckpt.resume_target() is None  # an empty folder starts from zero


# ---- universal conversion markers -----------------------------------------------------------------------------------
def test_to_universal_ignores_stale_markers_and_times_out_naming_rank_0(tmp_path):
    from ebmscale.train.main import to_universal
    saved_run(tmp_path, steps=(3,))
    step = tmp_path / ck.tag(3)
    out = tmp_path / f"{ck.tag(3)}{ck.UNIVERSAL}"
    out.mkdir()
    (out / "COMPLETE").touch()  # an unconverted (old-style) folder
    (out / "FAILED").write_text(json.dumps({"source": ck.commit_key(step), "attempt": "old"}))
    os.utime(out / "FAILED", (time.time() - 60, time.time() - 60))  # an earlier attempt's
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="rank 1: rank 0 did not finish converting .* within 1 s"):
        to_universal(step, rank=1, timeout_s=1)
    assert time.monotonic() - t0 < 10
    (out / "COMPLETE").write_text(json.dumps({"source": "another-branch", "attempt": "x"}))
    with pytest.raises(TimeoutError):
        to_universal(step, rank=1, timeout_s=0.5)
    (out / "COMPLETE").write_text(json.dumps({"source": ck.commit_key(step), "attempt": "x"}))
    assert to_universal(step, rank=1, timeout_s=0.5) == out
    elsewhere = tmp_path / "fork" / "checkpoints"  # a fork converts another run's step into its own folder
    (elsewhere / out.name).mkdir(parents=True)
    (elsewhere / out.name / "COMPLETE").write_text((out / "COMPLETE").read_text())
    assert to_universal(step, rank=1, timeout_s=0.5, into=elsewhere) == elsewhere / out.name
    (out / "COMPLETE").unlink()
    (out / "FAILED").write_text(json.dumps({"source": ck.commit_key(step), "attempt": "new"}))  # this attempt's
    with pytest.raises(RuntimeError, match="rank 0 could not convert"):
        to_universal(step, rank=1, timeout_s=5)


# ---- full disks ---------------------------------------------------------------------------------------------------
def test_a_save_checks_free_space_first_and_names_folder_and_bytes(tmp_path, monkeypatch):
    t = saved_run(tmp_path, steps=(2,))
    size = sum(json.loads((tmp_path / ck.tag(2) / ck.COMMIT).read_text())["files"].values())
    before = {f.name: f.read_bytes() for f in (tmp_path / ck.tag(2)).iterdir()}
    monkeypatch.setattr(ck.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 ** 9, 10 ** 9, 100))
    t.step = 4
    with pytest.raises(ck.CheckpointWriteError, match=rf"not enough free space to save {tmp_path / ck.tag(4)}: "
                                                      rf"about {int(size * 1.1)} bytes needed.*100 free"):
        t.save()
    assert not (tmp_path / ck.tag(4)).exists()
    assert {f.name: f.read_bytes() for f in (tmp_path / ck.tag(2)).iterdir()} == before


def test_a_disk_that_fills_during_a_save_is_an_error_in_words(tmp_path, monkeypatch):
    t = saved_run(tmp_path, steps=(2,))

    def full(*a, **kw):
        raise OSError(28, "No space left on device", str(tmp_path / ck.tag(4) / "rank_00000.pt"))
    monkeypatch.setattr(ck, "_save_file", full)
    t.step = 4
    t.save()
    with pytest.raises(ck.CheckpointWriteError, match=rf"writing checkpoint {tmp_path / ck.tag(4)} failed: the filesystem "
                                                      rf"holding {tmp_path} is full.*No space left on device.*not "
                                                      rf"committed.*the newest is {ck.tag(2)}"):
        t.ckpt.commit()
    assert ck.latest(tmp_path) == tmp_path / ck.tag(2)


def test_config_yaml_is_written_atomically_and_only_when_it_changes(tmp_path, monkeypatch):
    f = tmp_path / "config.yaml"
    assert ck.write_if_changed(f, "a: 1\n") and not ck.write_if_changed(f, "a: 1\n")
    mtime = f.stat().st_mtime_ns

    def full(*a, **kw):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(ck.os, "fsync", full)
    with pytest.raises(OSError):
        ck.write_if_changed(f, "a: 2\n")
    assert f.read_text() == "a: 1\n" and f.stat().st_mtime_ns == mtime and list(tmp_path.iterdir()) == [f]
    ck.bookkeeping(tmp_path / "latest", "step_2\n")  # a warning, not an error


# ---- one writer under races ---------------------------------------------------------------------------------------
def _racer(run_dir, barrier, rounds, results):
    from ebmscale.train import runlock
    for _ in range(rounds):
        barrier.wait()  # the parent planted this round's lock (or none)
        barrier.wait()  # both go at once
        try:
            lease = runlock.acquire(run_dir, log=lambda m: None, lease_s=30)
        except runlock.RunFolderInUse:
            lease = None
        barrier.wait()  # every contender has finished trying
        results.put((os.getpid(), lease is not None and lease.lost() is None))
        barrier.wait()
        if lease is not None:
            runlock.release(run_dir, lease)
        barrier.wait()  # released before the next round


def test_two_processes_racing_for_one_lock_exactly_one_holds_it_every_round(tmp_path):
    import multiprocessing as mp
    from ebmscale.train import runlock
    ctx, rounds = mp.get_context("fork"), 40
    barrier, results = ctx.Barrier(3), ctx.Queue()
    procs = [ctx.Process(target=_racer, args=(tmp_path, barrier, rounds, results)) for _ in range(2)]
    for p in procs:
        p.start()
    dead = ctx.Process(target=lambda: None)
    dead.start()
    dead.join()
    won = []
    for r in range(rounds):
        if r % 2:  # a lock left by a SIGKILLed holder: both judge it stale and race to take it over
            (tmp_path / runlock.LOCK).write_text(json.dumps({**runlock.me(), "pid": dead.pid, "proc_start": "x"}))
        barrier.wait()
        barrier.wait()
        barrier.wait()
        got = [results.get(timeout=30) for _ in procs]
        won.append(sum(ok for _, ok in got))
        barrier.wait()
        barrier.wait()
    for p in procs:
        p.join(timeout=30)
    assert won == [1] * rounds
    assert not (tmp_path / runlock.LOCK).exists() and not list(tmp_path.glob(".writer.lock.*"))


@pytest.mark.parametrize("lock", ["fifo", "garbage"])
def test_a_lock_that_is_not_a_lock_file_is_refused_by_name_and_never_hangs(tmp_path, lock):
    from ebmscale.train import runlock
    path = tmp_path / runlock.LOCK
    os.mkfifo(path) if lock == "fifo" else path.write_text("garbage{")  # a FIFO: the launch waited forever before
    with pytest.raises(runlock.RunFolderInUse, match=f"its lock {path} is not a lock file.*If none does, delete {path}"):
        runlock.acquire(tmp_path)
    assert runlock.check(tmp_path) == {}  # the launcher's check says "held, unknown by whom", not "free"


@pytest.mark.slow
def test_drill_a_real_full_disk_stops_in_words_and_resumes_once_space_is_freed(tmp_path, digits_shards):
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("needs root to mount a small tmpfs")
    try:
        run, args = disk / "run", ["checkpoint.every=2", "tracking.enabled=false"]
        res = train(run, digits_shards, "train.steps=4", *args, nproc=1, check=False)  # full during the 1st save
        out = res.stdout + res.stderr
        assert res.returncode != 0 and "[rank0]: Traceback" not in out, out[-3000:]
        assert f"run stopped: rank 0: writing checkpoint {run / 'checkpoints' / ck.tag(2)} failed: the filesystem " \
               f"holding {run / 'checkpoints'} is full" in out
        subprocess.run(["mount", "-o", "remount,size=1m", str(disk)], check=True)
        res = train(run, digits_shards, "train.steps=8", *args, nproc=1, check=False)  # room for one checkpoint
        out = res.stdout + res.stderr
        assert res.returncode != 0 and "[rank0]: Traceback" not in out, out[-3000:]
        assert f"not enough free space to save {run / 'checkpoints' / ck.tag(4)}: about" in out
        assert "relaunch to resume from step_000000002" in out
        assert ck.invalid(run / "checkpoints" / ck.tag(2), content=True) is None  # committed, intact
        config = (run / "config.yaml").stat().st_mtime_ns
        subprocess.run(["mount", "-o", "remount,size=4m", str(disk)], check=True)  # space freed
        res = train(run, digits_shards, "train.steps=8", *args, nproc=1)
        assert "resumed step 2" in res.stdout + res.stderr
        assert ck.latest(run / "checkpoints") == run / "checkpoints" / ck.tag(8)
        assert (run / "config.yaml").stat().st_mtime_ns == config  # unchanged content: not rewritten
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_loading_for_evaluation_checks_the_content_hash(tmp_path):
    from ebmscale.eval.loading import resolve_checkpoint
    saved_run(tmp_path / "checkpoints", steps=(2,))
    step = tmp_path / "checkpoints" / ck.tag(2)
    assert resolve_checkpoint(tmp_path) == (tmp_path, step)
    f = step / "mp_rank_00_model_states.pt"
    data = bytearray(f.read_bytes())
    data[-3] ^= 4
    f.write_bytes(bytes(data))
    ck._verified.clear()
    with pytest.raises(ValueError, match="has changed since its commit"):
        resolve_checkpoint(step)


def test_heartbeat_files_of_a_received_folder_are_data_never_a_crash_or_a_hang(tmp_path):
    from ebmscale.train import heartbeat
    hb = tmp_path / "heartbeat"
    hb.mkdir()
    (hb / "rank_00000.json").write_text("{}")  # KeyError 'time' before
    (hb / "rank_00001.json").write_text("[1]")
    os.mkfifo(hb / "rank_00002.json")  # read forever before
    (hb / "rank_00003.json").write_text(json.dumps({"time": 0, "rank": 3}))
    found = heartbeat.stale(tmp_path)
    assert len(found) == 1 and found[0].startswith("rank 3 on None (pid None): silent"), found
    assert heartbeat.last_beat(tmp_path, 0) is None and heartbeat.last_beat(tmp_path, 2) is None


def test_only_the_rank_files_of_the_ranks_that_committed_are_read(tmp_path):
    from ebmscale.eval.loading import load_buffer
    saved_run(tmp_path, steps=(2,))
    step = tmp_path / ck.tag(2)
    shutil.copy(step / "rank_00000.pt", step / "rank_00007.pt")  # not in COMMITTED, never hashed
    assert ck.invalid(step, content=True) is None
    assert len(load_buffer(step)["labels"]) == 8  # 16 before: the stray file's samples joined the buffer


def test_a_kill_in_the_middle_of_a_prune_leaves_no_torn_committed_checkpoint(tmp_path, monkeypatch):
    t = saved_run(tmp_path, steps=(2, 4))
    rmtree = shutil.rmtree

    def killed(path, *a, **kw):  # deletes one file, then the process dies
        next(p for p in sorted(path.iterdir()) if p.name != ck.COMMIT).unlink()
        raise SystemExit("kill -9")
    monkeypatch.setattr(ck.shutil, "rmtree", killed)
    with pytest.raises(SystemExit):
        ck._remove_with_companions(tmp_path / ck.tag(2))
    monkeypatch.setattr(ck.shutil, "rmtree", rmtree)
    assert ck.list_checkpoints(tmp_path) == [tmp_path / ck.tag(4)]  # before: step 2 stayed, committed and torn
    assert make_trainer(tmp_path).ckpt.resume_target() == tmp_path / ck.tag(4)
    assert not any(p.name.startswith(ck.REMOVING) for p in tmp_path.iterdir()) and t
