"""The `paper` and `ebmscale` recipes on the digits data at equal wall time, each over several seeds.

  python tools/make_shards.py digits data/digits
  python tools/evaluate.py digits-classifier runs/digits_classifier.pt
  python tools/ablate_recipes.py --minutes 12 --seeds 0 1 --classifier runs/digits_classifier.pt

Each run trains configs/digits.yaml under torchrun (--nproc ranks) with `recipe=R run.seed=S` and no step limit,
for --minutes from its first step; then SIGUSR1 asks its ranks to stop (the trainer commits a checkpoint). Then, per run: the digits
CNN's accuracy on --n conditional samples from noise (the test-time procedure of ebmscale/eval/README.md) and on
--n refined from the replay buffer, and the FID of the noise samples in the CNN's feature space. Writes
OUT/results.json and OUT/results.md: per run, and mean ± std per recipe.
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
NOISE_SAMPLING = ["--init", "noise", "--rounds", "10", "--steps", "30", "--reinit", "0.01", "--relabel", "0.1",
                  "--nomix", "3"]


def run(cmd: list, env: dict) -> None:
    subprocess.run([sys.executable, *cmd], cwd=ROOT, env=env, check=True)


def train_for(run_dir: Path, recipe: str, seed: int, seconds: float, nproc: int, extra: list, env: dict) -> int:
    """Train for `seconds` from the first logged step (start-up not counted), then ask every rank to stop with
    SIGUSR1 (the trainer commits a checkpoint and exits); returns the step of the newest healthy checkpoint."""
    import psutil
    from ebmscale.train.checkpoint import Checkpointer, healthy_checkpoints
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "ebmscale.train.main", str(ROOT / "configs" / "digits.yaml"), f"run.dir={run_dir}",
           f"recipe={recipe}", f"run.seed={seed}", "train.steps=10000000", "train.log_every=1",
           "tracking.enabled=false", *extra]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
    log = run_dir / "logs" / "metrics.jsonl"
    while not log.exists() and proc.poll() is None:
        time.sleep(1)
    try:
        proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        for worker in psutil.Process(proc.pid).children():  # torchrun's ranks
            worker.send_signal(signal.SIGUSR1)
        proc.wait()
    done = healthy_checkpoints(run_dir / "checkpoints")
    return int(Checkpointer.read_trainer_state(done[-1])["step"]) if done else 0


def evaluate_run(run_dir: Path, classifier: str, n: int, env: dict) -> dict:
    out = {}
    for name, how in (("noise", NOISE_SAMPLING), ("buffer", [])):
        samples = run_dir / "eval" / f"ablation_{name}.npz"
        run(["tools/sample.py", str(run_dir), "--n", str(n), *how, "--out", str(samples)], env)
        acc = run_dir / "eval" / f"ablation_{name}_accuracy.json"
        run(["tools/evaluate.py", "accuracy", str(samples), "--classifier", classifier, "--json", str(acc)], env)
        out[f"accuracy_{name}"] = json.loads(acc.read_text())["metrics"]["accuracy"]
        if name == "noise":
            fid = run_dir / "eval" / "ablation_noise_fid.json"
            run(["tools/evaluate.py", "fid", str(samples), "--classifier", classifier, "--json", str(fid)], env)
            out["fid_classifier_noise"] = json.loads(fid.read_text())["metrics"]["fid_classifier"]
    return out


def table(rows: list) -> str:
    keys = ["steps", "accuracy_noise", "accuracy_buffer", "fid_classifier_noise"]
    lines = ["| recipe | seeds | " + " | ".join(keys) + " |", "|---" * (len(keys) + 2) + "|"]
    for recipe in sorted({r["recipe"] for r in rows}):
        mine = [r for r in rows if r["recipe"] == recipe]
        cells = [f"{np.mean([r[k] for r in mine]):.4g} ± {np.std([r[k] for r in mine]):.2g}" for k in keys]
        lines.append(f"| {recipe} | {', '.join(str(r['seed']) for r in mine)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classifier", required=True, help="from `tools/evaluate.py digits-classifier`")
    p.add_argument("--minutes", type=float, default=12.0, help="training wall time per run")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--recipes", nargs="+", default=["paper", "ebmscale"], choices=["paper", "ebmscale"])
    p.add_argument("--nproc", type=int, default=2, help="DeepSpeed ranks per run")
    p.add_argument("--n", type=int, default=500, help="samples per evaluation")
    p.add_argument("--out", default="runs/ablation")
    p.add_argument("--override", nargs="*", default=[], help="extra config overrides for every run (key=value)")
    a = p.parse_args(argv)
    out = Path(a.out)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    rows = []
    for seed in a.seeds:  # recipes interleaved, so a slower machine hour hurts both alike
        for recipe in a.recipes:
            run_dir = out / f"{recipe}_seed{seed}"
            t = time.time()
            steps = train_for(run_dir, recipe, seed, a.minutes * 60, a.nproc, a.override, env)
            rows.append({"recipe": recipe, "seed": seed, "steps": steps, "train_s": time.time() - t,
                         **evaluate_run(run_dir, a.classifier, a.n, env)})
            print(json.dumps(rows[-1]), flush=True)
    md = table(rows)
    (out / "results.json").write_text(json.dumps({"runs": rows, "minutes": a.minutes, "override": a.override}, indent=1))
    (out / "results.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
