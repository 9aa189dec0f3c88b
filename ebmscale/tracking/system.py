"""System metrics per node (`tracking.system_metrics`): CPU, memory, disk, network and, with NVML, every GPU.

Every node's local rank 0 samples its node at the trainer's log steps; one `all_gather_object` brings the
samples to rank 0, which logs them with the training metrics at the same step, as
`system/<host>/<name>` (MLflow's own names, and its `system/<node id>/` convention, so the UI's
"System metrics" tab charts them per node). Other local ranks send None. Sampling at log steps (not on a
timer) keeps it a collective every rank makes at the same point, survives requeues like any metric (the
step is the training step), and costs ~1 ms per log step; a stalled loop shows as a gap, not as a flat line.

GPU figures need NVML (`pip install 'ebmscale[gpu]'`: nvidia-ml-py, module `pynvml`); without it a node logs CPU/memory/disk/
network only and says so once. NVML counts every GPU of the node, whatever CUDA_VISIBLE_DEVICES says.
"""
from __future__ import annotations

import os
import re
import socket
import time
from typing import Dict, Optional

import psutil
import torch
import torch.distributed as dist

from ebmscale.log import get_logger
from ebmscale import distributed

log = get_logger(__name__)

_sampler: Optional["NodeSampler"] = None


def host_name() -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname().split(".")[0]) or "node"


class NodeSampler:
    def __init__(self, disk_path: str = os.sep):
        self.disk_path = disk_path
        psutil.cpu_percent(None)  # the next call reports the time since this one
        self._net = (time.monotonic(), psutil.net_io_counters())
        self._gpus = self._init_nvml()
        time.sleep(0.1)  # once, so that the first sample is not of an empty interval

    @staticmethod
    def _init_nvml() -> list:
        try:
            import pynvml
            pynvml.nvmlInit()
            return [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        except ImportError:
            if torch.cuda.is_available():
                log.warning("[tracking] no GPU system metrics: install nvidia-ml-py (pynvml): pip install 'ebmscale[gpu]'")
        except Exception as e:
            log.warning(f"[tracking] no GPU system metrics: NVML: {e}")
        return []

    def sample(self) -> Dict[str, float]:
        m: Dict[str, float] = {"cpu_utilization_percentage": psutil.cpu_percent(None)}
        mem = psutil.virtual_memory()
        m["system_memory_usage_megabytes"] = mem.used / 1e6
        m["system_memory_usage_percentage"] = mem.used / mem.total * 100
        try:
            m["load_average_1m"] = os.getloadavg()[0]
        except OSError:
            pass
        try:
            disk = psutil.disk_usage(self.disk_path)
            m["disk_usage_percentage"] = disk.percent
            m["disk_available_megabytes"] = disk.free / 1e6
        except OSError:
            pass
        t, net = time.monotonic(), psutil.net_io_counters()
        t0, net0 = self._net
        if net is not None and net0 is not None and t > t0:
            m["network_receive_megabytes_per_s"] = (net.bytes_recv - net0.bytes_recv) / 1e6 / (t - t0)
            m["network_transmit_megabytes_per_s"] = (net.bytes_sent - net0.bytes_sent) / 1e6 / (t - t0)
        self._net = (t, net)
        if self._gpus:
            import pynvml
            for i, h in enumerate(self._gpus):
                for name, read in (("utilization_percentage", lambda: pynvml.nvmlDeviceGetUtilizationRates(h).gpu),
                                   ("memory_usage_megabytes", lambda: pynvml.nvmlDeviceGetMemoryInfo(h).used / 1e6),
                                   ("memory_usage_percentage", lambda: (lambda x: x.used / x.total * 100)(
                                       pynvml.nvmlDeviceGetMemoryInfo(h))),
                                   ("power_usage_watts", lambda: pynvml.nvmlDeviceGetPowerUsage(h) / 1000),
                                   ("temperature_celsius", lambda: pynvml.nvmlDeviceGetTemperature(h, 0))):
                    try:
                        m[f"gpu_{i}_{name}"] = float(read())
                    except Exception:  # an unsupported query on this GPU: leave it out
                        pass
        return m


def _local_rank() -> int:
    d = distributed.current()
    return d.local_rank if d else int(os.environ.get("LOCAL_RANK", "0"))


def gather() -> Dict[str, float]:
    """A collective: call it on every rank at the same point. Returns {"system/<host>/<name>": value} for
    every node (the same dict on every rank)."""
    global _sampler
    mine = None
    if _local_rank() == 0:
        _sampler = _sampler or NodeSampler()
        mine = {"host": host_name(), **_sampler.sample()}
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        samples = [None] * dist.get_world_size()
        dist.all_gather_object(samples, mine)
    else:
        samples = [mine]
    out: Dict[str, float] = {}
    hosts: set = set()
    for rank, s in enumerate(samples):
        if not s:
            continue
        host = s.pop("host")
        host = host if host not in hosts else f"{host}-rank{rank}"  # two nodes with one short name
        hosts.add(host)
        out.update({f"system/{host}/{k}": float(v) for k, v in s.items()})
    return out
