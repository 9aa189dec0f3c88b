#!/usr/bin/env python
"""Compare the training recipes on the digits demo at equal wall time (or equal steps): paper vs ebmscale vs icd,
several seeds, and any variant of them.

    python tools/make_shards.py digits data/digits
    python tools/compare_recipes.py --minutes 10 --seeds 0 1 --out runs/compare
    # one key at a time at equal steps, scored on the buffer and 60 steps from noise only:
    python tools/compare_recipes.py --steps 600 --nproc 1 --seeds 0 --recipes ebmscale \
        --variant init:recipe=ebmscale,model.init=release --samples buffer noise60 --out runs/ablation

--variant NAME:KEY=VALUE[,KEY=VALUE...] adds a run named NAME trained with those overrides (repeatable).
--steps N trains each run for N steps to completion instead of stopping it after --minutes (a loaded shared machine
gives every run the same number of updates, not the same share of a varying CPU).

For each seed, then each recipe (interleaved, so a slow machine hour hurts every recipe alike): train
configs/digits.yaml on 2 DeepSpeed ranks for --minutes from its first logged step (start-up not counted), then stop
it with SIGUSR1 to its ranks, which commit a checkpoint. Then evaluate that checkpoint:
  conditional accuracy (the digits CNN, trained first if missing) of samples from the replay buffer, from noise with
  60 steps, and from noise with the paper's test-time procedure; FID in the CNN's feature space (each sample
  set); OOD AUROC against uniform noise, constant images, interpolations and the near-distribution
  rot90 / quadrants; how often the stability guard fired (skipped steps, rollbacks) and the steps reached.
Writes OUT/results.json and OUT/table.md (mean and range over seeds). Re-running continues where it stopped: a
run trained for the same --minutes is not trained again, and a sample set or score already written is not
recomputed. --dry-run prints the commands only.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from ebmscale.program import prog  # noqa: E402

# icd: with configs/digits.yaml's icd section (crop and brightness/contrast only) and two scales; the others one
RECIPES = {"paper": ["recipe=paper", "model.scales=1"], "ebmscale": ["recipe=ebmscale", "model.scales=1"],
           "icd": ["recipe=icd", "model.scales=2"]}
SAMPLES = {"buffer": ["--init", "buffer"],
           "noise60": ["--init", "noise", "--steps", "60"],
           "noise_ttp": ["--init", "noise", "--rounds", "10", "--steps", "30", "--reinit", "0.01", "--relabel", "0.1",
                         "--nomix", "3"]}
OOD = ["random", "interpolation", "uniform", "constant", "rot90", "quadrants"]


def run(cmd: list[str], dry: bool, log: Path | None = None) -> int:
    print("$", " ".join(cmd), flush=True)
    if dry:
        return 0
    with open(log, "a") if log else open(os.devnull, "w") as f:
        return subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode


def train(run_dir: Path, overrides: list[str], seed: int, minutes: float, shards: str, dry: bool,
          steps: int | None = None, nproc: int = 2) -> None:
    """Train to `steps` (to completion), or else for `minutes` from the first logged step."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
           "ebmscale.train.main", "configs/digits.yaml", f"run.dir={run_dir}", f"run.seed={seed}",
           f"data.shards={shards}", f"train.steps={steps or 1000000}", f"checkpoint.every={steps or 100}",
           "tracking.enabled=false", "train.precision=fp32", *overrides]  # fp32: as a CPU without native bf16
    print("$", " ".join(cmd), f"  # to step {steps}" if steps else f"  # stopped {minutes} min after its first step",
          flush=True)
    minutes = 1e9 if steps else minutes
    if dry:
        return
    import psutil
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics = run_dir / "logs" / "metrics.jsonl"
    with open(run_dir / "train.log", "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
        while not metrics.exists() and proc.poll() is None:
            time.sleep(1)
        try:
            proc.wait(timeout=minutes * 60)
        except subprocess.TimeoutExpired:
            for rank in psutil.Process(proc.pid).children():  # torchrun's ranks: they checkpoint and exit
                rank.send_signal(signal.SIGUSR1)
            proc.wait()  # nonzero: a rank stopped with a checkpoint exits 3, and torchrun reports that as a failure
    from ebmscale.train.checkpoint import healthy_checkpoints
    if not healthy_checkpoints(run_dir / "checkpoints"):
        raise SystemExit(f"[compare] training left no committed checkpoint (exit {proc.returncode}); see "
                         f"{run_dir / 'train.log'}")
    budget = {"steps": steps} if steps else {"minutes": minutes}
    (run_dir / "trained.json").write_text(json.dumps({**budget, "exit": proc.returncode}) + "\n")


def evaluate(run_dir: Path, classifier: Path, seed: int, per_class: int, dry: bool, samples=tuple(SAMPLES),
             ood=tuple(OOD)) -> dict:
    """Each sample set and score once: a command whose output is already there is not run again."""
    ev, py, log = run_dir / "eval", sys.executable, run_dir / "eval.log"
    out: dict = {}

    def once(output: Path, cmd: list[str]) -> None:
        if dry or not output.exists():
            run([py, *cmd, str(output)], dry, log)
    for name in samples:
        flags = SAMPLES[name]
        npz = ev / f"{name}.npz"
        once(npz, ["tools/sample.py", str(run_dir), "--per-class", str(per_class), "--seed", str(seed), *flags,
                   "--precision", "fp32", "--out"])
        for task in ("accuracy", "fid"):
            once(ev / f"{task}_{name}.json", ["tools/evaluate.py", task, str(npz), "--classifier", str(classifier), "--json"])
    if ood:
        once(ev / "ood.json", ["tools/evaluate.py", "ood", str(run_dir), "--synthetic", *ood, "--precision", "fp32",
                               "--json"])
    if dry:
        return out
    read = lambda p: json.loads(p.read_text())["metrics"] if p.exists() else {}  # noqa: E731
    for name in samples:
        out[f"acc_{name}"] = read(ev / f"accuracy_{name}.json").get("accuracy")
        out[f"fid_{name}"] = read(ev / f"fid_{name}.json").get("fid_classifier")
    scores = read(ev / "ood.json")
    out.update({f"auroc_{k}": scores.get(f"ood/auroc_{k}") for k in ood})
    rows = [json.loads(line) for line in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()]
    out["steps"] = rows[-1]["step"] if rows else 0
    out["guard_skipped"] = rows[-1].get("guard/skipped_steps", 0) if rows else 0
    out["guard_rollbacks"] = rows[-1].get("guard/rollbacks", 0) if rows else 0
    return out


def table(results: dict) -> str:
    keys = sorted({k for per_seed in results.values() for r in per_seed.values() for k in r if k != "overrides"})
    lines = ["| recipe | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for recipe, per_seed in results.items():
        cells = []
        for k in keys:
            v = [r[k] for r in per_seed.values() if r.get(k) is not None]
            cells.append(f"{sum(v) / len(v):.3f} [{min(v):.3f}, {max(v):.3f}]" if v else "n/a")
        lines.append(f"| {recipe} ({len(per_seed)} seeds) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(prog=prog(), description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", nargs="*", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE[,KEY=VALUE]",
                   help="one more run, named NAME, trained with these overrides (after --recipes)")
    p.add_argument("--steps", type=int, help="train each run for this many steps instead of --minutes")
    p.add_argument("--nproc", type=int, default=2, help="DeepSpeed ranks per run")
    p.add_argument("--samples", nargs="+", default=list(SAMPLES), choices=list(SAMPLES), help="sample sets scored")
    p.add_argument("--ood", nargs="*", default=OOD, choices=OOD, help="OOD sets scored (none: no OOD evaluation)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--minutes", type=float, default=10.0, help="training wall time per run, from its first step")
    p.add_argument("--per-class", type=int, default=30, help="samples per class for each evaluation")
    p.add_argument("--shards", default="data/digits/digits-{000000..000003}.tar")
    p.add_argument("--classifier", default="runs/digits_classifier.pt", help="trained first if missing")
    p.add_argument("--out", default="runs/compare")
    p.add_argument("--dry-run", action="store_true")
    a = p.parse_args()
    out, classifier = Path(a.out).resolve(), Path(a.classifier).resolve()
    if not classifier.exists():
        run([sys.executable, "tools/evaluate.py", "digits-classifier", str(classifier)], a.dry_run)
    runs = {r: RECIPES[r] for r in a.recipes}
    for v in a.variant:
        name, sep, keys = v.partition(":")
        if not sep or not name or any("=" not in k for k in keys.split(",")):
            p.error(f"--variant '{v}' is not NAME:KEY=VALUE[,KEY=VALUE...] (e.g. init:recipe=ebmscale,model.init=release)")
        runs[name] = keys.split(",")
    budget = {"steps": a.steps} if a.steps else {"minutes": a.minutes}
    results: dict = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else {}
    for seed in a.seeds:
        for recipe, overrides in runs.items():
            run_dir = out / f"{recipe}_seed{seed}"
            trained = run_dir / "trained.json"
            if trained.exists() and all(json.loads(trained.read_text()).get(k) == v for k, v in budget.items()):
                print(f"[compare] {run_dir} was trained for {budget} already", flush=True)
            else:
                if run_dir.exists() and not a.dry_run:  # an interrupted attempt: set aside, never resumed or deleted
                    run_dir.rename(run_dir.with_name(f"{run_dir.name}.interrupted-{int(time.time())}"))
                train(run_dir, overrides, seed, a.minutes, a.shards, a.dry_run, a.steps, a.nproc)
            row = {**evaluate(run_dir, classifier, seed, a.per_class, a.dry_run, a.samples, a.ood), **budget,
                   "overrides": " ".join(overrides)}
            print(f"[compare] {recipe} seed {seed}: {json.dumps(row)}", flush=True)
            if not a.dry_run:
                results.setdefault(recipe, {})[str(seed)] = row
                out.mkdir(parents=True, exist_ok=True)
                (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    if not a.dry_run:
        out.mkdir(parents=True, exist_ok=True)
        (out / "table.md").write_text(table(results) + "\n")
        print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
