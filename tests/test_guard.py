"""The stability guard: the verdict logic, DeepSpeed's skipped step, and injected failures in real 2-rank runs.

Run as a script under torchrun (`_ds_skip_worker`) it checks what a skipped step does to DeepSpeed's ZeRO state.
"""
import json
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import ROOT, train
from ebmscale.config import CONFIG_DIR, ConfigError, GuardConfig, load_config
from ebmscale.train.checkpoint import Checkpointer, healthy, healthy_checkpoints, list_checkpoints
from ebmscale.train.guard import COLLAPSED, E_NEG, E_POS, GRAD_SQ, NONFINITE, OVERFLOW, Guard


def guard(**kw) -> Guard:
    return Guard(OmegaConf.structured(GuardConfig(**kw)), {"optim.lr": 3e-4, "sampler.steps": 4, "train.alpha": 1.0},
                 world_size=2, device=torch.device("cpu"))


def reduced(e=0.1, grad=1.0, nonfinite=0, collapsed=0, overflow=0) -> list:
    """What the all-reduce hands every rank (sums over 2 ranks)."""
    s = [0.0] * 9
    s[E_POS], s[E_NEG], s[GRAD_SQ], s[NONFINITE], s[COLLAPSED] = 2 * e, 2 * e, grad ** 2, nonfinite, collapsed
    s[OVERFLOW] = overflow
    return s


# ---- the verdict, without processes ----------------------------------------------------------------------------
def test_each_signal_gets_its_configured_response_and_the_worst_wins():
    g = guard(on_collapse="stop")
    assert g.judge(1, reduced()).action == "ok"
    v = g.judge(2, reduced(nonfinite=1))
    assert (v.action, v.signals) == ("skip", ["nonfinite"]) and "1 rank" in v.detail
    assert g.judge(3, reduced(e=500)).signals == ["energy"] and g.judge(4, reduced(e=500)).action == "rollback"
    v = g.judge(5, reduced(e=500, collapsed=1))
    assert (v.action, v.signals) == ("stop", ["energy", "collapse"])
    v = g.judge(6, reduced(e=500, nonfinite=1))  # overflowing gradients in a blow-up: rolled back, not skipped
    assert (v.action, v.signals) == ("rollback", ["nonfinite", "energy"])
    assert guard(on_energy="warn").judge(1, reduced(e=500)).action == "warn"
    assert guard(max_energy=0, max_gap=0).judge(1, reduced(e=1e9)).action == "ok"  # 0 = off


def test_grad_spike_against_the_running_median_and_skips_escalate():
    g = guard(max_skips=2)
    for t in range(1, 11):
        assert g.judge(t, reduced(grad=1.0 + 0.01 * t)).action == "ok"
    v = g.judge(11, reduced(grad=50.0))
    assert (v.action, v.signals) == ("skip", ["grad_spike"]) and len(g.grad_norms) == 10  # a spike is not learnt
    assert g.judge(12, reduced(grad=1.0)).action == "ok"
    assert g.judge(13, reduced(grad=50.0)).action == "skip"
    v = g.judge(14, reduced(nonfinite=1))
    assert v.action == "rollback" and "2 skipped steps in a row" in v.detail


def test_fp16_overflow_steps_stay_out_of_the_grad_norm_window():
    """On an fp16 overflow DeepSpeed skips the step itself; the guard saw a norm of 0 (nan_to_num) that must not
    drag the running median down (the next normal step would look like a spike)."""
    g = guard()
    for t in range(1, 11):
        g.judge(t, reduced(grad=1.0))
    window = list(g.grad_norms)
    v = g.judge(11, reduced(grad=0.0, overflow=1))
    assert v.action == "ok" and g.grad_norms == window and v.metrics["guard/fp16_overflow"] == 1.0
    assert v.metrics["guard/grad_norm"] != v.metrics["guard/grad_norm"]  # NaN: no norm on an overflow step
    assert g.judge(12, reduced(grad=1.0)).action == "ok"


def test_healthy_needs_a_clean_window_and_a_clean_next_step():
    g = guard(clean_steps=3)
    for t in range(1, 10):
        g.judge(t, reduced(nonfinite=int(t == 5)))
    assert g.healthy(2) and not g.healthy(4) and not g.healthy(6) and not g.healthy(7) and g.healthy(8)
    assert g.first_bad(after=2) == 5 and g.first_bad(after=5) is None


def test_remedies_in_order_the_last_repeats_and_they_survive_state_dict():
    g = guard(remedies=["lr*0.5", "sampler.steps+3", "alpha*2"], max_rollbacks=5)
    for _ in range(4):
        g.next_remedy()
    assert g.remedies == ["lr*0.5", "sampler.steps+3", "alpha*2", "alpha*2"]
    assert g.effective() == {"optim.lr": 1.5e-4, "sampler.steps": 7, "train.alpha": 4.0}
    h = guard()
    h.load_state_dict(json.loads(json.dumps(g.state_dict())))  # it lives in trainer.json
    assert h.effective() == g.effective() and h.rollbacks == 4
    assert g.refuse_rollback(g.judge(1, reduced(e=500)), target=Path("x")) is None
    g.rollbacks = 5
    assert "out of rollbacks" in g.refuse_rollback(g.judge(2, reduced(e=500)), target=Path("x"))
    assert "no healthy checkpoint" in guard().refuse_rollback(g.judge(3, reduced(e=500)), target=None)


def test_config_rejects_bad_responses_and_remedies():
    with pytest.raises(ConfigError, match="guard.on_energy.*warn, skip, rollback, stop"):
        load_config(CONFIG_DIR / "digits.yaml", ["guard.on_energy=panic"])
    with pytest.raises(ConfigError, match="guard.remedies.*lr\\*0.5"):
        load_config(CONFIG_DIR / "digits.yaml", ["guard.remedies=[lr/2]"])


def test_a_deepspeed_without_the_internals_the_guard_needs_is_refused_at_startup():
    from types import SimpleNamespace
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
    from ebmscale.train.guard import check_discard_supported
    opt = object.__new__(DeepSpeedZeroOptimizer)  # no instance state: as if this DeepSpeed renamed it
    with pytest.raises(RuntimeError, match=r"averaged_gradients.*guard.enabled=false"):
        check_discard_supported(SimpleNamespace(optimizer=opt))
    opt.averaged_gradients, opt.all_grad_tensors, opt.micro_step_id, opt.cpu_offload = {}, {}, -1, False
    check_discard_supported(SimpleNamespace(optimizer=opt))
    check_discard_supported(SimpleNamespace(optimizer=torch.optim.SGD([torch.zeros(1, requires_grad=True)])))


def test_checkpoint_health_rollback_target_and_pruning(tmp_path):
    ck = Checkpointer(tmp_path, OmegaConf.create({"keep_last": 2, "keep_every": 0}), rank=0, world_size=2)
    for step, ok in [(2, True), (4, True), (6, False), (8, False)]:
        (tmp_path / f"step_{step:09d}").mkdir()
        (tmp_path / f"step_{step:09d}" / "trainer.json").write_text(json.dumps({"world_size": 2}))
        for r in range(2):
            (tmp_path / f"step_{step:09d}" / f"rank_{r:05d}.pt").touch()
        ck._pending = (tmp_path / f"step_{step:09d}", {}, None)
        ck.commit(healthy=ok)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000000004", "step_000000006", "step_000000008"]
    assert ck.rollback_target().name == "step_000000004"  # kept by prune although past keep_last
    (tmp_path / "legacy").mkdir()
    (tmp_path / "legacy" / "COMMITTED").touch()
    assert healthy(tmp_path / "legacy")  # an empty marker, from before the guard
    ck.discard_after(tmp_path / "step_000000004")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000000004"]
    assert (tmp_path / "latest").read_text().strip() == "step_000000004" and healthy_checkpoints(tmp_path, 1) == []


# ---- DeepSpeed: a skipped step leaves nothing behind, on every ZeRO stage ------------------------------------------
CASES = [(0, "fp32"), (0, "bf16"), (1, "fp32"), (2, "fp32"), (2, "bf16"), (3, "fp32")]


def _ds_skip_worker(out: Path) -> None:
    """Engines a, b, c from one seed, each stepped on batch 1. a: batch 2 with rank 1's loss NaN -> the guard says
    skip on both ranks -> gradients discarded; then batch 3 and a step. b: batch 3 and a step. c: like a, but batch 2
    finite and not discarded (the control). a must equal b exactly; c differs where DeepSpeed accumulates across
    backwards (no ZeRO, ZeRO-3; ZeRO-1/2 overwrite their partition at each boundary unless offloading, where
    `micro_step_id` makes them accumulate too). The guard's pre-step gradient norm must equal DeepSpeed's."""
    import deepspeed
    from ebmscale import distributed
    from ebmscale.train.guard import discard_gradients
    d = distributed.init()
    results = {}
    for stage, precision in CASES:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]

        def engine():
            torch.manual_seed(0)
            model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.SiLU(), torch.nn.Linear(64, 1)).to(dtype)
            cfg = {"train_micro_batch_size_per_gpu": 4, "train_batch_size": 4 * d.world_size, "steps_per_print": 10 ** 9,
                   "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
                   **({"bf16": {"enabled": True}} if precision == "bf16" else {})}
            opt = torch.optim.Adam(model.parameters(), lr=1e-2, foreach=False)
            return deepspeed.initialize(model=model, optimizer=opt, config=cfg)[0]

        def backward(e, i, scale=1.0):
            x = torch.randn(4, 16, generator=torch.Generator().manual_seed(100 * i + d.rank)).to(dtype)
            energies = e(x).float().squeeze(1)
            loss = energies.pow(2).mean() * scale
            e.backward(loss)
            return {"loss": loss.detach(), "e_pos_all": energies.detach(), "e_neg_all": energies.detach(),
                    "x_neg": torch.rand(4, 1, 4, 4)}

        def params(e):
            ps = list(e.module.parameters())
            with deepspeed.zero.GatheredParameters(ps):
                return [p.detach().float().clone() for p in ps]

        g = Guard(OmegaConf.structured(GuardConfig(max_energy=0, max_gap=0)), {}, d.world_size, torch.device("cpu"))
        accumulates = stage in (0, 3)
        a, b, c = engine(), engine(), engine() if accumulates else None
        for e in filter(None, (a, b, c)):
            backward(e, 1)
            e.step()
        v = g.check(2, backward(a, 2, scale=float("nan") if d.rank == 1 else 1.0), a, False)
        discard_gradients(a)
        ours = g.check(3, backward(a, 3), a, False).metrics["guard/grad_norm"]
        a.step()
        backward(b, 3)
        b.step()
        if accumulates:
            backward(c, 2, scale=1000.0)
            backward(c, 3)
            c.step()
        pa, pb, pc = params(a), params(b), params(c) if accumulates else None
        results[f"{stage}-{precision}"] = {
            "action": v.action, "signals": v.signals, "ours": ours, "deepspeed": None if a.get_global_grad_norm() is None else float(a.get_global_grad_norm()),
            "diff": max((x - y).abs().max().item() for x, y in zip(pa, pb)),
            "control": pc and max((x - y).abs().max().item() for x, y in zip(pc, pb))}
    (out / f"rank_{d.rank}.json").write_text(json.dumps(results))


@pytest.mark.slow
def test_skipped_step_leaves_no_trace_in_deepspeed_on_any_zero_stage(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__, str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    for r in range(2):
        for case, got in json.loads((tmp_path / f"rank_{r}.json").read_text()).items():
            assert (got["action"], got["signals"]) == ("skip", ["nonfinite"]), (r, case, got)  # both ranks, rank 1's NaN
            assert got["diff"] == 0.0, (r, case, got)  # as if the bad batch had never been seen
            if got["control"] is not None:
                assert got["control"] > 1e-6, (r, case, got)  # not discarding would have shown
            if got["deepspeed"] is not None:  # plain fp32 without ZeRO: DeepSpeed computes no norm
                assert got["ours"] == pytest.approx(float(got["deepspeed"]), rel=2e-3), (r, case, got)


# ---- real runs: 2 DeepSpeed ranks, injected failures ---------------------------------------------------------------
def mlflow(tmp: Path) -> tuple[str, dict, dict, list]:
    db = sqlite3.connect(tmp / "mlflow.db")
    ((run_id, status),) = db.execute("select run_uuid, status from runs").fetchall()
    tags = dict(db.execute("select key, value from tags where run_uuid=?", (run_id,)).fetchall())
    events = db.execute("select step, value from metrics where key='guard/event' order by step").fetchall()
    texts = {p.name: p.read_text() for p in (tmp / "mlartifacts").rglob("guard/event_*.txt")}
    return status, tags, texts, events


def metrics(run: Path) -> dict:
    return {r["step"]: r for r in map(json.loads, (run / "logs" / "metrics.jsonl").read_text().splitlines())}


def guard_lines(res, step: int) -> dict:
    """The guard's console line for `step`, per rank: both ranks must report the same verdict."""
    out = res.stdout + res.stderr
    return {r: m.group(1) for r in range(2) if (m := re.search(rf"rank {r}: guard: step {step}: (.*?)(?=\[ebmscale\]|\n|$)", out))}


A = ["train.steps=12", "checkpoint.every=2", "guard.on_nonfinite=rollback", "guard.remedies=[lr*0.5,sampler.steps+2]"]


@pytest.fixture(scope="module")
def nan_then_collapse(tmp_path_factory, digits_shards):
    """NaN in rank 1's loss at step 5, rank 0's sampler collapsed at step 9; both answered by a rollback."""
    tmp = tmp_path_factory.mktemp("guard_a")
    res = train(tmp / "run", digits_shards, *A, env={"EBMSCALE_FAULT": "nan_loss:5:1,collapse:9:0"})
    return tmp, res


@pytest.mark.slow
def test_nan_and_collapse_roll_back_to_the_last_healthy_checkpoint_with_remedies(nan_then_collapse):
    tmp, res = nan_then_collapse
    run = tmp / "run"
    assert "remedies in force: lr*0.5, sampler.steps+2 -> optim.lr=0.00015, sampler.steps=6" in res.stdout
    nan, collapse = guard_lines(res, 5), guard_lines(res, 9)
    assert nan[0] == nan[1] and "nonfinite" in nan[0] and "rollback 1/3 to step 2, remedy lr*0.5" in nan[0]
    # step 4's checkpoint was committed unhealthy: step 5 was the first to run on its weights
    assert collapse[0] == collapse[1] and "collapse" in collapse[0] and "rollback 2/3 to step 6, remedy sampler.steps+2" in collapse[0]
    m = metrics(run)
    assert m[12]["lr"] == pytest.approx(1.5e-4) and m[12]["guard/rollbacks"] == 2
    assert all(torch.isfinite(torch.tensor(r["batch/loss"])) for r in m.values())
    final = list_checkpoints(run / "checkpoints")[-1]
    assert final.name == "step_000000012" and healthy(final)
    state = Checkpointer.read_trainer_state(final)["guard"]["run"]
    assert state["remedies"] == ["lr*0.5", "sampler.steps+2"] and state["rollbacks"] == 2
    status, tags, texts, events = mlflow(tmp)
    assert status == "FINISHED" and tags["guard.rollbacks"] == "2" and tags["guard.remedies"] == "lr*0.5, sampler.steps+2"
    assert events == [(5, 3.0), (9, 3.0)]  # 3 = rollback
    nan_text = texts["event_0001_step_000000005_rollback.txt"]
    assert "last healthy step: 2" in nan_text and "first bad step: 5" in nan_text
    assert "last healthy step: 6" in texts["event_0002_step_000000009_rollback.txt"]


@pytest.mark.slow
def test_resume_keeps_the_remedies_and_stops_failed_when_out_of_rollbacks(nan_then_collapse, digits_shards):
    tmp, _ = nan_then_collapse
    run = tmp / "run"
    res = train(run, digits_shards, *A, "train.steps=16", "guard.max_rollbacks=2", check=False,
                env={"EBMSCALE_FAULT": "nan_loss:14:0"})
    out = res.stdout + res.stderr
    assert res.returncode != 0 and "resumed step 12" in out
    assert "remedies in force: lr*0.5, sampler.steps+2 -> optim.lr=0.00015, sampler.steps=6" in out
    assert metrics(run)[13]["lr"] == pytest.approx(1.5e-4)  # not the config's 3e-4: the remedy survived the requeue
    lines = guard_lines(res, 14)
    assert lines[0] == lines[1] and "out of rollbacks (2 done, guard.max_rollbacks=2)" in lines[0]
    assert out.count("run FAILED: stability guard: step 14: nonfinite") == 2
    status, tags, texts, events = mlflow(tmp)
    assert status == "FAILED" and "out of rollbacks" in tags["guard.failure"] and "out of rollbacks" in tags["end_reason"]
    assert events[-1] == (14, 4.0)  # 4 = stop
    assert "last healthy step: 12" in texts["event_0003_step_000000014_stop.txt"]


@pytest.mark.slow
def test_huge_learning_rate_rolls_back_to_the_start_and_a_nan_batch_is_skipped(tmp_path, digits_shards):
    run = tmp_path / "run"
    res = train(run, digits_shards, "train.steps=6", "checkpoint.every=2", "optim.lr=10", "guard.max_energy=10",
                "guard.initial_checkpoint=true", "guard.remedies=[lr*0.0001]", env={"EBMSCALE_FAULT": "nan_loss:4:1"})
    blowup, nan = guard_lines(res, 2), guard_lines(res, 4)
    # lr=10: Adam's first update is +-10 per weight; energies explode (sometimes with overflowing gradients too)
    assert blowup[0] == blowup[1] and "energy" in blowup[0] and "rollback 1/3 to step 0, remedy lr*0.0001" in blowup[0]
    assert nan[0] == nan[1] and nan[0].endswith("-> skip")
    m = metrics(run)
    assert m[6]["lr"] == pytest.approx(1e-3) and m[6]["guard/skipped_steps"] == 1
    assert all(abs(m[s]["batch/e_pos"]) < 10 for s in (3, 4, 5, 6))  # the skipped NaN step reached no weight
    status, tags, texts, events = mlflow(tmp_path)
    assert status == "FINISHED" and events == [(2, 3.0), (4, 2.0)]  # rollback, skip
    assert "first bad step: 2" in texts["event_0001_step_000000002_rollback.txt"]
    assert "last healthy step: 2" in texts["event_0002_step_000000004_skip.txt"]


if __name__ == "__main__":
    _ds_skip_worker(Path(sys.argv[1]))
