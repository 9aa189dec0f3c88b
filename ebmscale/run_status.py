"""What a run folder says about its run: latest committed step, checkpoints, world size, MLflow run."""
from __future__ import annotations

from pathlib import Path

from ebmscale.train import heartbeat, runlock
from ebmscale.train.checkpoint import latest, list_checkpoints, step_of
from ebmscale.trust import read_json, redact_text, run_config


def _tail(path: Path, n: int) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-n:]
    except OSError:
        return []


def run_status(run: str | Path, log_lines: int = 10) -> dict:
    run = Path(run)
    if not (run / "config.yaml").exists():
        raise FileNotFoundError(f"{run} is not an ebmscale run folder (no config.yaml)")
    ckpts = list_checkpoints(run / "checkpoints")
    newest = latest(run / "checkpoints", warn=False)  # the one that would be resumed
    state = read_json(newest / "trainer.json") if newest else {}  # checkpoints/ may live on another disk
    holder = runlock.check(run)
    tracking = read_json(run / "tracking.json", root=run) if (run / "tracking.json").exists() else {}
    partial = [p.name for p in (run / "checkpoints").glob("step_*") if p.is_dir() and p not in ckpts] \
        if (run / "checkpoints").exists() else []
    logs = sorted((run / "logs").rglob("*.out"), key=lambda p: p.stat().st_mtime) + \
        sorted((run / "logs").rglob("*.log"), key=lambda p: p.stat().st_mtime) if (run / "logs").exists() else []
    final = (run / "FINAL").read_text().strip() if (run / "FINAL").exists() else None
    total = int(run_config(run).train.steps)
    uri = redact_text(str(tracking["tracking_uri"])) if tracking.get("tracking_uri") else None
    resolved = read_json(run / "precision.json", root=run) if (run / "precision.json").exists() else {}
    return {
        "run_dir": str(run.resolve()),
        "step": int(state.get("step", 0)),
        "total_steps": total,
        "checkpoints": [{"path": str(p), "step": step_of(p)} for p in ckpts],
        "writer": runlock.describe(holder) if holder else None,
        "silent_ranks": heartbeat.stale(run) if holder else [],
        "partial_checkpoints": partial,
        "world_size": state.get("world_size"),
        "precision": resolved.get("precision") or state.get("precision"),
        "precision_reason": resolved.get("reason"),
        "mlflow_run_id": tracking.get("run_id") or (state.get("tracking") or {}).get("run_id"),
        "tracking_uri": uri,
        "mlflow_ui": f"mlflow ui --backend-store-uri {uri}" if uri and not uri.startswith("http") else uri,
        "final_state": final,
        "log": str(logs[-1]) if logs else None,
        "last_log_lines": _tail(logs[-1], log_lines) if logs else [],
    }


def format_status(s: dict) -> str:
    lines = [f"run        {s['run_dir']}",
             f"step       {s['step']} / {s['total_steps']} (latest committed checkpoint)"
             + (f"   final: {s['final_state']}" if s["final_state"] else ""),
             f"world size {s['world_size']}",
             f"precision  {s['precision']}" + (f" ({s['precision_reason']})" if s["precision_reason"] else ""),
             f"checkpoints {', '.join(str(c['step']) for c in s['checkpoints']) or 'none'}"
             + (f"   (partial, ignored: {', '.join(s['partial_checkpoints'])})" if s["partial_checkpoints"] else ""),
             f"writer     {s['writer']}" if s.get("writer") else "",
             *(f"silent     {r}" for r in s.get("silent_ranks") or []),
             f"MLflow     run {s['mlflow_run_id']} at {s['tracking_uri']}",
             f"           open: {s['mlflow_ui']}" if s["mlflow_ui"] else "",
             "           (MLflow 3.17+: choose 'Model training' in the UI's workflow switch, or add "
             "?workflowType=machine_learning to the page address)" if s["mlflow_ui"] else ""]
    if s["log"]:
        lines += [f"log        {s['log']}"] + [f"  | {l}" for l in s["last_log_lines"]]
    return "\n".join(l for l in lines if l)
