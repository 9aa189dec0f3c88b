"""Command line of `tools/launch.py` (launch_main); `python -m ebmscale.train.main`'s (train_main) is train/entry.py.

    python tools/launch.py [--nodes N] [--gpus-per-node G] [--nproc N] [--partition P] [--time MIN]
                           [--account A] [--profile NAME] [--local] [--dry-run] [--wait] CONFIG [key=value ...]

Exit codes: 0 submitted / completed; 2 config error (nothing submitted); 1 job failed; 3 the job
stopped with a committed checkpoint but did not finish (relaunch to resume); 4 a rank hung or died
silently and the others gave up waiting for it (the message names it); 130 interrupted.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Optional, Sequence

from omegaconf import OmegaConf

from ebmscale.config import ConfigError, run_dir
from ebmscale.program import prog
from ebmscale.launch import checks, submit
from ebmscale.launch.resolve import resolve_config
from ebmscale.tracking import default_uri
from ebmscale.train.entry import EXIT_CONFIG, EXIT_STOPPED, parse_train_args, train_main  # noqa: F401 (their old home)
from ebmscale.trust import redacted_yaml

DESCRIPTION = """\
Launch an ebmscale training run: on SLURM through submitit (when sbatch is on PATH), or with
--local as N processes on this machine. The config is validated on this machine first (schema,
model, data shards, run folder, sizes); a problem prints one message and exits 2, submitting nothing.

Precedence, lowest first: defaults, configs/base.yaml, cluster profile (slurm/profiles/NAME.yaml),
CONFIG, key=value overrides, flags. Relaunching with the same run folder resumes from its latest
checkpoint. See slurm/README.md."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog(), description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", metavar="CONFIG", help="experiment YAML, e.g. configs/digits.yaml")
    p.add_argument("overrides", metavar="key=value", nargs="*", help="config overrides, e.g. train.steps=100")
    p.add_argument("--nodes", type=int, help="SLURM nodes (launcher.nodes)")
    p.add_argument("--gpus-per-node", type=int, help="GPUs per node, one task each (launcher.gpus_per_node)")
    p.add_argument("--nproc", type=int, help="--local: processes on this machine (default: one per GPU, else 2); "
                                             "SLURM CPU nodes: tasks per node (launcher.tasks_per_node)")
    p.add_argument("--partition", help="SLURM partition (launcher.partition)")
    p.add_argument("--time", type=int, metavar="MIN", help="time limit in minutes (launcher.time_min)")
    p.add_argument("--account", help="SLURM account (launcher.account)")
    p.add_argument("--profile", help="cluster profile: a name in slurm/profiles/ or a YAML path (launcher.profile)")
    p.add_argument("--local", action="store_true", help="run here through submitit's LocalExecutor and wait")
    p.add_argument("--dry-run", action="store_true",
                   help="validate, print the sbatch script (or local plan) and the resolved config; submit nothing")
    p.add_argument("--wait", action="store_true", help="SLURM: wait for the job (through requeues), follow its "
                                                       "rank-0 log, exit with its outcome")
    p.add_argument("--quiet", action="store_true", help="do not echo the rank-0 log while waiting")
    return p


def _flags(args: argparse.Namespace) -> dict:
    return {k: getattr(args, k) for k in ("nodes", "gpus_per_node", "nproc", "partition", "time", "account")}


def _print_notes(notes: Sequence[str]) -> None:
    for n in notes:
        print(f"  {n}")


def launch_main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)

    mode = "local" if args.local else "slurm"
    if mode == "slurm" and not args.dry_run and not shutil.which("sbatch"):
        print("error: sbatch is not on PATH, so this is not a SLURM login node. Run here with --local, or use "
              "--dry-run to see the sbatch script.", file=sys.stderr)
        return EXIT_CONFIG
    try:
        flags = _flags(args)
        if mode == "local":
            flags["nproc"] = None  # --local's --nproc is a process count, not a launcher key
        cfg = resolve_config(args.config, args.overrides, flags, args.profile)
        OmegaConf.resolve(cfg)
        cfg.run.dir = str(run_dir(cfg).resolve())  # fixed in the pickle: requeued jobs find their folder
        if mode == "local":
            nproc, ngpu = submit.local_nproc(args.nproc)
            world = nproc
        else:
            nproc, ngpu = checks.tasks_per_node(cfg.launcher), cfg.launcher.gpus_per_node
            world = cfg.launcher.nodes * nproc
        notes = checks.preflight(cfg, mode, nproc, world, dry_run=args.dry_run, ngpu=ngpu)
        script = submit.render_sbatch(cfg, submit.submitit_folder(Path(cfg.run.dir))) if mode == "slurm" else None
        if script is not None and shutil.which("sbatch"):
            notes.append(submit.sbatch_test_only(script))
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return EXIT_CONFIG

    out = Path(cfg.run.dir)
    if args.dry_run:
        print("checks passed:")
        _print_notes(notes)
        if mode == "slurm":
            print("\n# ---- sbatch script (dry run: not submitted) ----")
            print(script)
        else:
            print(f"\n# ---- local plan (dry run: nothing started) ----\n{nproc} process(es) on this machine via "
                  f"submitit.LocalExecutor, {'NCCL on %d GPU(s)' % ngpu if ngpu else 'gloo on CPU'}; "
                  f"time limit {cfg.launcher.time_min} min; logs in {submit.submitit_folder(out)}")
        print("\n# ---- resolved config ----")  # secrets masked (trust.redact)
        print(redacted_yaml(cfg), end="")
        return 0

    print("checks passed:")
    _print_notes(notes)
    if mode == "local":
        job = submit.submit_local(cfg, nproc, ngpu)
        print(f"local job {job.job_id}: {nproc} process(es) ({'GPU' if ngpu else 'CPU, gloo'}); run folder {out}")
        print(f"logs: {submit.submitit_folder(out)}/{job.job_id}_<rank>_log.out; events: {out}/launcher.log")
        return submit.wait_local(job, nproc, out, follow=not args.quiet)

    job = submit.submit_slurm(cfg)
    lc = cfg.launcher
    jid = job.job_id
    folder = submit.submitit_folder(out)
    uri = cfg.tracking.uri or default_uri(out)
    print(f"submitted SLURM job {jid}: {lc.nodes} node(s) x {nproc} task(s)"
          f"{' x 1 GPU' if lc.gpus_per_node else ''}, {lc.time_min} min"
          f"{', partition ' + lc.partition if lc.partition else ''}; requeues up to {lc.max_requeues} times")
    print(f"run folder:  {out}")
    print(f"logs:        {folder}/{jid}_0_log.out (rank 0; {jid}_<rank>_log.out for the others)")
    print(f"events:      {out}/launcher.log (starts, preemptions, requeues, the final state)")
    print("follow:")
    print(f"  squeue -j {jid}")
    print(f"  tail -f {folder}/{jid}_0_log.out")
    print(f"  python tools/status.py {out}")
    print(f"  mlflow ui --backend-store-uri {uri}")
    print(f"stop: scancel {jid} (the job checkpoints on SIGTERM); relaunch the same command to resume")
    if args.wait:
        return submit.wait_slurm(jid, lc.nodes * nproc, out, follow=not args.quiet)
    return 0


if __name__ == "__main__":
    sys.exit(launch_main())
