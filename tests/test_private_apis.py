"""Each private API ebmscale uses has a fallback through public ones that gives the same answer. The tests take the
private name away and compare the two answers."""
import torch
from mlflow.tracking import MlflowClient
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from ebmscale.models import resnet
from ebmscale.precision import cpu_bf16_flag
from ebmscale.tracking.mlflow_run import MlflowTracker
from ebmscale.train.guard import norms


def test_foreach_norm_fallback_gives_the_same_norms(monkeypatch):
    ts = [torch.randn(3, 4), torch.randn(7), torch.zeros(2)]
    fused = torch.stack(norms(ts))
    monkeypatch.delattr(torch, "_foreach_norm")
    assert torch.allclose(torch.stack(norms(ts)), fused)


def test_cpu_bf16_flag_without_torchs_probes_reads_cpuinfo(monkeypatch):
    with_probes = cpu_bf16_flag()
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    assert cpu_bf16_flag() == with_probes  # /proc/cpuinfo's avx512_bf16 / amx_tile flags agree with torch


def test_spectral_norm_class_is_the_one_public_spectral_norm_registers():
    assert type(spectral_norm(nn.Linear(1, 1)).parametrizations.weight[0]) is resnet._SpectralNorm
    assert all(hasattr(resnet._SpectralNorm, a) for a in resnet._SN_INTERNALS)


def test_latest_steps_without_metric_objs_asks_the_public_api(tmp_path):
    c = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = c.create_run(c.create_experiment("x")).info.run_id
    for step, key in ((3, "a"), (7, "a"), (5, "b")):
        c.log_metric(run_id, key, 1.0, step=step)
    run = c.get_run(run_id)
    private = MlflowTracker._latest_steps(c, run)

    class Data:  # the run as a later MLflow might give it: public fields only
        metrics = run.data.metrics
    public = MlflowTracker._latest_steps(c, type("Run", (), {"data": Data, "info": run.info}))
    assert private == public == {"a": 7, "b": 5}
