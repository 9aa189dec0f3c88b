"""The summary table of tools/gpu_check.sh: `python -m ebmscale.bench.gpu_check OUT` reads what the stages left in
OUT (stages.tsv, the runs' logs/metrics.jsonl, train_step.json, langevin.json) and prints one table: per stage its
status and seconds; for the imagenet128 run img/s per GPU, s/step, the Langevin share (time/langevin_share, from
CUDA events), peak memory; the train-step bench (ebmscale against plain fp32 and bf16-autocast PyTorch); the
sampler's GFLOP per image-step and MFU; the fp16 and ZeRO-3 steps. A missing piece prints as '-'.
"""
from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path


def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _metrics(run: Path, last: int = 0) -> list:
    """The metrics records of a run, the last `last` of them (all with 0)."""
    try:
        rows = [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines() if line]
    except (OSError, ValueError):
        return []
    return rows[-last:] if last else rows


def _median(rows: list, key: str) -> float:
    vals = [r[key] for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return statistics.median(vals) if vals else float("nan")


def _f(v, fmt: str = "{:.3g}") -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else fmt.format(v)


def summary(out: Path) -> tuple[str, bool]:
    """(the table, whether every stage passed)."""
    lines, ok = [], True
    stages = [line.split("\t") for line in (out / "stages.tsv").read_text().splitlines()] \
        if (out / "stages.tsv").exists() else []
    device = (out / "device.log").read_text().strip().splitlines()[-1:] if (out / "device.log").exists() else []
    lines.append(f"ebmscale GPU check, {out}")
    lines.append(f"device: {device[0] if device else '-'}")
    lines.append("stages: " + ", ".join(f"{n} {s} {t} s" for n, s, t in stages))
    ok = bool(stages) and all(s == "ok" for _, s, _ in stages)

    train = _metrics(out / "train")
    steady = train[len(train) // 2:]  # the resumed half: warm, cuDNN tuned
    cfg = _json(out / "train" / "precision.json") or {}
    lines.append("")
    lines.append(f"{'imagenet128 (launch.py --local)':34} {'img/s/GPU':>9} {'s/step':>7} {'sample s':>8} {'update s':>8} "
                 f"{'Langevin':>8} {'peak GB':>7} {'loss':>8}")
    for name, rows in (("train + resume, " + str(cfg.get("precision", "?")), steady),
                       ("fp16, 10 steps", _metrics(out / "fp16")), ("ZeRO-3 threshold 0, 10 steps", _metrics(out / "zero3"))):
        lines.append(f"{name:34} {_f(_median(rows, 'images_per_s'), '{:9.1f}'):>9} "
                     f"{_f(_median(rows, 'time/step_s'), '{:7.3f}'):>7} {_f(_median(rows, 'time/sample_s'), '{:8.3f}'):>8} "
                     f"{_f(_median(rows, 'time/update_s'), '{:8.3f}'):>8} "
                     f"{_f(100 * _median(rows, 'time/langevin_share'), '{:7.1f}%'):>8} "
                     f"{_f(max((r.get('memory/peak_gb', float('nan')) for r in rows), default=None), '{:7.2f}'):>7} "
                     f"{_f(rows[-1].get('batch/loss') if rows else None, '{:8.4f}'):>8}")

    bench = _json(out / "train_step.json") or {}
    for arch in bench.get("archs", []):
        lines.append("")
        lines.append(f"train step, {arch['arch']} batch {arch['batch']}, {arch['langevin_steps']} Langevin steps "
                     f"({arch['precision']})")
        lines.append(f"  {'':28} {'s/step':>7} {'img/s':>7} {'speed-up':>8} {'sampling':>8} {'update':>7}")
        for r in arch["rows"]:
            lines.append(f"  {r['row']:28} {r['total']:7.3f} {arch['batch'] / r['total']:7.1f} {r['speedup']:7.2f}x "
                         f"{r['sampling']:8.3f} {r['update']:7.3f}")

    lg = _json(out / "langevin.json") or {}
    if lg:
        lines.append("")
        lines.append(f"sampler, imagenet128 batch {lg.get('batch')}: {lg.get('gflop_per_image_step', float('nan')):.2f} "
                     f"GFLOP per image per Langevin step (energy + dE/dx)")
        lines.append(f"  {'':36} {'img*steps/s':>11} {'TFLOP/s':>8} {'MFU':>6}")
        for r in lg.get("rows", []):
            lines.append(f"  {r['sampler']:36} {r['img_steps_per_s']:11.1f} {r['flop_per_s'] / 1e12:8.2f} "
                         f"{_f(None if r.get('mfu') is None else 100 * r['mfu'], '{:5.1f}%'):>6}")
    lines.append("")
    lines.append("ALL STAGES PASSED" if ok else "SOME STAGES FAILED (their logs are in the folder above)")
    return "\n".join(lines), ok


if __name__ == "__main__":
    text, passed = summary(Path(sys.argv[1]))
    print(text)
    sys.exit(0 if passed else 1)
