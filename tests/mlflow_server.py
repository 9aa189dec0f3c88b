"""A real `mlflow server` on 127.0.0.1 for tests, with its own SQLite store and artifact folder.

`MlflowServer` can be stopped (SIGKILL, like a crash) and started again on the same port; `api()` reads the
REST API. The `mlflow_server` fixture shares one per test module (a start takes ~10 s). Use it from a test
file with `from mlflow_server import mlflow_server`, or from conftest.py the same way.
"""
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

MLFLOW = Path(sys.executable).parent / "mlflow"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    def __init__(self, root: Path, port: int = None):
        self.root, self.port = Path(root), port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self, timeout_s: float = 120) -> "MlflowServer":
        cmd = [str(MLFLOW if MLFLOW.exists() else shutil.which("mlflow")), "server", "--host", "127.0.0.1",
               "--port", str(self.port), "--workers", "1",
               "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
               "--artifacts-destination", str(self.root / "artifacts")]
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        with open(self.root / "server.log", "ab") as log:  # own session, so stop() ends uvicorn's children too
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.root,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                if requests.get(f"{self.url}/health", timeout=1).ok:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.2)
        self.stop()
        tail = (self.root / "server.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"mlflow server on {self.url} did not come up in {timeout_s}s:\n{tail}")

    def stop(self) -> None:
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
        self.proc = None

    def api(self, endpoint: str, **params) -> dict:
        """GET /api/2.0/mlflow/<endpoint>, e.g. api("runs/get", run_id=...)."""
        r = requests.get(f"{self.url}/api/2.0/mlflow/{endpoint}", params=params, timeout=10)
        r.raise_for_status()
        return r.json()

    def metric_steps(self, run_id: str, key: str) -> list:
        return [m["step"] for m in self.api("metrics/get-history", run_id=run_id, metric_key=key).get("metrics", [])]

    def artifacts(self, run_id: str, path: str = "") -> list:
        return [f["path"] for f in self.api("artifacts/list", run_id=run_id, path=path).get("files", [])]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow_server")).start()
    yield server
    server.stop()
