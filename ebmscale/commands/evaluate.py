"""Evaluate a trained run as the paper does. Results go to a JSON (default RUN/eval/<task>_step<step>.json) and to
the run's MLflow run as eval/* metrics and pictures.

  python tools/evaluate.py digits-classifier runs/digits_classifier.pt             # the digits feature network
  python tools/evaluate.py fid SAMPLES.npz --classifier runs/digits_classifier.pt  # FID + IS (digits features)
  python tools/evaluate.py fid SAMPLES.npz --inception weights-inception-2015-12-05-6726825d.pth
  python tools/evaluate.py is SAMPLES.npz --inception W.pth
  python tools/evaluate.py accuracy SAMPLES.npz --classifier runs/digits_classifier.pt
  python tools/evaluate.py ood RUN_DIR --source svhn=data/svhn/manifest.json
  python tools/evaluate.py restore RUN_DIR --task inpaint denoise
SAMPLES.npz come from tools/sample.py, which records the run they belong to. These are the quick evaluations;
`paper` runs the release's whole protocol (ebmscale/eval/paper.py) and sets the paper's numbers beside ours:
  python tools/evaluate.py paper RUN_DIR --inception W.pth --fid-shards "TRAIN::TEST" --test-shards TEST \
      --ensemble 10 --source svhn=data/svhn/manifest.json textures=data/textures/manifest.json
"""
import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch

from ebmscale.eval.report import Report
from ebmscale.log import get_logger
from ebmscale.tracking.pictures import image_grid
from ebmscale.eval.classifier import digits_as_shards, load_classifier, predict, save_classifier, train_classifier
from ebmscale.eval.data import read_images
from ebmscale.eval.fid import feature_net, fid_and_is, reference_stats
from ebmscale.eval.loading import cast_for_sampling, load_ensemble, sampling_precision
from ebmscale.eval.ood import aurocs, energy_scores, histograms, roc_curves, synthetic
from ebmscale.eval.paper import (PAPER, RELEASE_SAMPLING, markdown_table, release_denoise, release_inpaint,
                                 release_samples)
from ebmscale.eval.restore import denoise, inpaint
from ebmscale.export import is_exported
from ebmscale.train.checkpoint import trust_pickles
from ebmscale.program import prog
from ebmscale.trust import Untrusted, read_npz, run_config, run_shards as config_shards

log = get_logger(__name__)


def load_samples(path: str, run: str | None):
    """(images as stored: float32 in [0, 1] or uint8, labels, run folder, step) of a tools/sample.py output, read
    as data (trust.read_npz: no pickle, no zip bomb). The run it records is used only if it is a run folder."""
    try:
        d = read_npz(path)
    except Untrusted as e:
        raise SystemExit(f"evaluate: {e}") from None
    if run is None and "run" in d:
        recorded = Path(str(d["run"]))
        if (recorded / "config.yaml").is_file():
            run = recorded
        else:
            log.warning(f"{path} records run '{str(d['run'])[:200]}', which is not a run folder here; pass --run")
    return d["images"], d["labels"], Path(run) if run else None, int(d["step"]) if "step" in d else 0


def as_float(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32) / 255 if x.dtype == np.uint8 else x


def run_shards(run: Path | None, shards: str | None) -> tuple[str, bool]:
    """(shards spec, whether `pipe:` URLs may run): --shards as typed on the command line (trusted), else the run
    folder's data.shards read as data (trust.run_config): local files only, never a pipe: command or URL, and
    never its data.allow_pipe (docs/security.md)."""
    if shards:
        return shards, True
    if run is None or not (run / "config.yaml").exists():
        raise SystemExit("--shards is needed: the samples name no run folder with a config.yaml")
    try:
        return config_shards(run, run_config(run)), False
    except Untrusted as e:
        raise SystemExit(f"evaluate: {e}") from None


def device_of(a) -> str:
    return a.device or ("cuda" if torch.cuda.is_available() else "cpu")


def cmd_digits_classifier(a) -> dict:
    x, y = digits_as_shards()
    model, acc = train_classifier(x, y, a.epochs, a.seed)
    save_classifier(model, a.out, held_out_accuracy=acc, data="sklearn digits 16x16 as tools/make_shards.py")
    print(f"held-out accuracy {acc:.4f} -> {a.out}")
    return {"held_out_accuracy": acc}


def cmd_fid(a, with_fid: bool = True) -> dict:
    x, _, run, step = load_samples(a.samples, a.run)
    try:
        net = feature_net(a.inception, a.classifier, device_of(a))
    except (ValueError, FileNotFoundError, ImportError) as e:
        raise SystemExit(str(e)) from None
    ref = None
    if with_fid:  # `is` has no reference images (and no --shards)
        spec, allow_pipe = run_shards(run, a.shards)
        ref = reference_stats(net, spec, x.shape[2], x.shape[1], a.ref_limit, run, allow_pipe=allow_pipe)
    res = fid_and_is(net, x, ref, a.splits)
    tag = "" if net.key.startswith("inception") else "_classifier"
    report = Report("fid" if with_fid else "is", run, step, a.json)
    report.add({f"{k}{tag}": v for k, v in res.items() if k != "n"}, samples=a.samples, n=res["n"],
               feature_net=net.key)
    report.image("samples", image_grid(as_float(x[:100]), nrow=10))
    return report.finish()


def cmd_accuracy(a) -> dict:
    x, y, run, step = load_samples(a.samples, a.run)
    pred = predict(load_classifier(a.classifier, device_of(a)), as_float(x))
    per_class = {int(c): float((pred[y == c] == c).mean()) for c in np.unique(y)}
    report = Report("accuracy", run, step, a.json)
    report.add({"accuracy": (pred == y).mean(), **{f"accuracy/class_{c}": v for c, v in per_class.items()}},
               samples=a.samples, n=len(y), classifier=a.classifier)
    return report.finish()


def load_models(a):
    models, cfg, ckpt, step = load_ensemble(a.run, a.ensemble, device_of(a))
    cast_for_sampling(models, sampling_precision(a.precision, cfg.train.precision, device_of(a)))
    return models, cfg, Path(ckpt) if is_exported(ckpt) else Path(ckpt).parent.parent, step


def cmd_ood(a) -> dict:
    models, cfg, run, step = load_models(a)
    m = cfg.model
    spec, allow_pipe = run_shards(run, a.shards)
    x_in, _ = read_images(spec, m.resolution, m.in_channels, a.n, allow_pipe=allow_pipe)
    rng = np.random.default_rng(a.seed)
    sources = {k: synthetic(k, x_in, rng) for k in a.synthetic}
    for item in a.source:
        name, _, spec = item.partition("=")
        sources[name] = read_images(spec, m.resolution, m.in_channels, a.n, allow_pipe=True)[0]  # as typed
    score = lambda x: energy_scores(models, x, m.num_classes, a.score)
    s_in = score(x_in)
    s_out = {k: score(x) for k, x in sources.items()}
    auc = aurocs(s_in, s_out)
    report = Report("ood", run, step, a.json)
    report.add({f"ood/auroc_{k}": v for k, v in auc.items()}, n_in=len(x_in), score=a.score,
               energy_mean={"in-distribution": float(np.mean(s_in)), **{k: float(np.mean(s)) for k, s in s_out.items()}})
    report.image("ood/histograms", histograms(s_in, s_out))
    report.image("ood/roc", roc_curves(s_in, s_out))
    report.image("ood/examples", image_grid(np.concatenate([x_in[:10], *[x[:10] for x in sources.values()]]), nrow=10))
    return report.finish()


def cmd_restore(a) -> dict:
    models, cfg, run, step = load_models(a)
    m, s = cfg.model, cfg.sampler
    spec, allow_pipe = run_shards(run, a.shards)
    x, y = read_images(spec, m.resolution, m.in_channels, a.n, allow_pipe=allow_pipe)
    labels = y if m.num_classes > 0 else None
    langevin = dict(step_size=a.step_size or s.step_size, noise=s.noise if a.noise is None else a.noise,
                    grad_clip=s.grad_clip if a.grad_clip is None else (a.grad_clip or None), seed=a.seed)
    report = Report("restore", run, step, a.json)
    for task in a.task:  # default steps: filling a hole takes long; denoising drifts off the image if run long
        steps = a.steps or (3 * s.steps if task == "inpaint" else max(1, s.steps // 2))
        res, ims = inpaint(models, x, labels, a.mask, steps=steps, **langevin) if task == "inpaint" else \
            denoise(models, x, labels, a.sigma, steps=steps, **langevin)
        report.add({f"{task}/{k}": v for k, v in res.items()}, **{f"{task}_steps": steps})
        report.image(f"{task}", image_grid(np.concatenate([x[:16], ims["input"][:16], ims["restored"][:16]]), nrow=16))
    report.add({}, n=len(x), mask=a.mask, sigma=a.sigma, langevin=langevin)
    return report.finish()


def cmd_paper(a) -> dict:
    """IS/FID by the release's sampling, OOD AUROC on the held-out split, inpainting and denoising (MSE, PSNR) on
    training and held-out images; one JSON (RUN/eval/paper_step<step>.json) and a Markdown table beside it."""
    models, cfg, run, step = load_models(a)
    if torch.cuda.is_available():  # the run's train.tf32: off under recipe paper, fp32 convs as the release's
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = bool(cfg.train.tf32)
    m, s = cfg.model, cfg.sampler
    train_spec, allow_pipe = run_shards(run, a.train_shards)
    report = Report("paper", run, step, a.json)
    metrics, info = {}, {"ensemble": len(models), "test_shards": a.test_shards}
    if "sample" in a.tasks:  # every model of the ensemble in turn
        try:
            net = feature_net(a.inception, a.classifier, device_of(a))
        except (ValueError, FileNotFoundError, ImportError) as e:
            raise SystemExit(str(e)) from None
        sampling = {**RELEASE_SAMPLING, **{k: v for k, v in (("iterations", a.iterations), ("batch", a.batch),
                                                              ("buffer_size", a.buffer_size)) if v}}
        x, y = release_samples(models, a.n, m.num_classes, (m.in_channels, m.resolution, m.resolution),
                               seed=a.seed, progress=True, **sampling)
        ref = reference_stats(net, a.fid_shards or train_spec, m.resolution, m.in_channels, None, run,
                              allow_pipe=allow_pipe)
        res = fid_and_is(net, x, ref, splits=max(1, len(x) // 5000))
        tag = "" if net.key.startswith("inception") else "_classifier"
        metrics.update({f"{k}{tag}": v for k, v in res.items() if k != "n"})
        samples = report.json_path.with_name(f"paper_samples_step{step:09d}.npz")
        samples.parent.mkdir(parents=True, exist_ok=True)
        np.savez(samples, images=x, labels=y, run=str(run), step=step)
        info.update(samples=str(samples), sampling=sampling, feature_net=net.key, fid_reference=a.fid_shards or train_spec)
        report.image("samples", image_grid(as_float(x[:100]), nrow=10))
    model = models[0]  # the sandbox scores one checkpoint
    if "ood" in a.tasks:
        x_in, _ = read_images(a.test_shards, m.resolution, m.in_channels, a.ood_n, allow_pipe=True)
        rng = np.random.default_rng(a.seed)
        # the release's random and interpolation, then our extras uniform and constant (eval/ood.py)
        sources = {k: synthetic(k, x_in, rng) for k in ("random", "interpolation", "uniform", "constant")}
        for item in a.source:
            name, _, spec = item.partition("=")
            sources[name] = read_images(spec, m.resolution, m.in_channels, a.ood_n, allow_pipe=True)[0]
        score = lambda x: energy_scores([model], x, m.num_classes, "min")
        metrics.update({f"ood/auroc_{k}": v for k, v in aurocs(score(x_in), {k: score(x) for k, x in sources.items()}).items()})
    if "restore" in a.tasks:
        for split, spec in (("train", train_spec), ("test", a.test_shards)):
            x, y = read_images(spec, m.resolution, m.in_channels, a.restore_n, allow_pipe=allow_pipe or split == "test")
            labels = y if m.num_classes > 0 else None
            for name, fn in (("inpaint", release_inpaint), ("denoise", release_denoise)):
                res, out = fn(model, x, labels, s.step_size, s.noise, seed=a.seed, prefix=f"{name}_{split}")
                metrics.update(res)
                if split == "test":
                    report.image(name, image_grid(np.concatenate([x[:16], out[:16]]), nrow=16))
    report.add(metrics, **info)
    out = report.finish()
    key = a.paper or cfg.run.name
    table = markdown_table(out["metrics"], PAPER.get(key, {}), f"{run} step {step} (paper: {key if key in PAPER else 'none'})")
    md = Path(out["json"]).with_suffix(".md")
    md.write_text(table)
    print(table)
    out["markdown"] = str(md)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog=prog(), description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", help="where the results go (default RUN/eval/<task>_step<step>.json)")
    common.add_argument("--device", help="default: cuda if available, else cpu")
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--trust-pickles", action="store_true",
                        help="load checkpoint files that hold more than tensors (they could run code): only ones you trust")
    common.add_argument("--tracking-uri", help="log results to this MLflow store (default: MLFLOW_TRACKING_URI, "
                        "else the run's own local store only); must be the store the run's tracking.json records")

    c = sub.add_parser("digits-classifier", parents=[common], help="train the digits CNN (feature network)")
    c.add_argument("out")
    c.add_argument("--epochs", type=int, default=30)
    for name in ("fid", "is", "accuracy"):
        c = sub.add_parser(name, parents=[common], help={"fid": "FID and IS of samples", "is": "IS of samples",
                                                         "accuracy": "classifier accuracy on conditional samples"}[name])
        c.add_argument("samples", help=".npz from tools/sample.py")
        c.add_argument("--run", help="the run the samples belong to (default: the one recorded in the .npz)")
        c.add_argument("--classifier", help="a classifier from `digits-classifier`", required=name == "accuracy")
        if name != "accuracy":
            c.add_argument("--inception", help="Inception weights file weights-inception-2015-12-05-6726825d.pth")
            c.add_argument("--splits", type=int, default=10, help="IS splits")
        if name == "fid":
            c.add_argument("--shards", help="reference images (default: the run's data.shards)")
            c.add_argument("--ref-limit", type=int, help="use only the first N reference images")
    for name in ("ood", "restore"):
        c = sub.add_parser(name, parents=[common], help={"ood": "out-of-distribution AUROC per source",
                                                         "restore": "inpainting and denoising PSNR"}[name])
        c.add_argument("run", help="run folder (latest committed checkpoint), a checkpoint folder or an exported model")
        c.add_argument("--shards", help="in-distribution images (default: the run's data.shards; needed for an "
                       "exported model)")
        c.add_argument("--ensemble", type=int, default=1, help="sum the energies of the last K checkpoints")
        c.add_argument("--precision", choices=["auto", "train", "fp32", "bf16", "fp16"], default="auto",
                       help="model compute (Langevin chains stay fp32); auto = bf16 where this hardware has it "
                            "natively, else fp32 (fp16 on older GPUs); train = the run's train.precision")
    c = sub.choices["ood"]
    c.add_argument("--n", type=int, default=1000, help="images per source")
    c.add_argument("--synthetic", nargs="*", default=["random", "interpolation", "uniform", "constant"],
                   help="synthetic sources: the release's random (N(0.5, 0.5^2)) and interpolation; extras uniform, "
                        "constant and the near-distribution rot90 quadrants")
    c.add_argument("--source", nargs="*", default=[], metavar="NAME=SHARDS",
                   help="other datasets' shards, fitted to the model's size, e.g. svhn=data/svhn/manifest.json")
    c.add_argument("--score", choices=["min", "marginal"], default="min",
                   help="conditional models: min over classes of E(x, y) (the release) or -log sum_y exp(-E(x, y))")
    c = sub.add_parser("paper", parents=[common], help="the release's whole protocol, beside the paper's numbers")
    c.add_argument("run", help="run folder (latest committed checkpoint) or a checkpoint folder")
    c.add_argument("--test-shards", required=True, help="the held-out split (e.g. CIFAR-10 test): OOD in-distribution "
                   "images and the held-out restoration images")
    c.add_argument("--train-shards", help="training images for restoration (default: the run's data.shards)")
    c.add_argument("--fid-shards", help="FID reference (the release: CIFAR-10 train + test, 'A::B'; default: the "
                   "run's data.shards)")
    c.add_argument("--tasks", nargs="+", choices=["sample", "ood", "restore"], default=["sample", "ood", "restore"])
    c.add_argument("--inception", help="Inception weights file (the paper's IS/FID)")
    c.add_argument("--classifier", help="a classifier from `digits-classifier` as the feature network instead")
    c.add_argument("--ensemble", type=int, default=10, help="the last K checkpoints, cycled (the release: 10)")
    c.add_argument("--n", type=int, default=50000, help="samples for IS/FID (the release: 50,000)")
    c.add_argument("--iterations", type=int, help="sampling iterations per 1,000 images (default 200, the release)")
    c.add_argument("--batch", type=int, help="chains per iteration (default 512)")
    c.add_argument("--buffer-size", type=int, help="images per buffer (default 1000)")
    c.add_argument("--ood-n", type=int, default=10000, help="images per OOD source")
    c.add_argument("--source", nargs="*", default=[], metavar="NAME=SHARDS", help="OOD datasets, e.g. svhn=...")
    c.add_argument("--restore-n", type=int, default=10000, help="images per split for inpainting/denoising")
    c.add_argument("--paper", choices=["cifar10", "cifar10_uncond", "imagenet128"],
                   help="whose published numbers go beside ours (default: the run's run.name)")
    c.add_argument("--precision", choices=["auto", "train", "fp32", "bf16", "fp16"], default="train",
                   help="model compute (chains stay fp32): train = the run's (recipe paper: fp32, the release's), "
                        "auto = this hardware's native")
    c = sub.choices["restore"]
    c.add_argument("--task", nargs="+", choices=["inpaint", "denoise"], default=["inpaint", "denoise"])
    c.add_argument("--n", type=int, default=100, help="images")
    c.add_argument("--mask", choices=["half", "centre", "pixels"], default="half", help="inpainting: missing region")
    c.add_argument("--sigma", type=float, default=0.1, help="denoising: std of the added Gaussian noise")
    c.add_argument("--steps", type=int, help="Langevin steps (default: inpaint 3x training's, denoise half of it)")
    c.add_argument("--step-size", type=float)
    c.add_argument("--noise", type=float, help="Langevin noise (default: training's)")
    c.add_argument("--grad-clip", type=float, help="default: training's; 0 = none")
    a = p.parse_args(argv)
    if a.tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = a.tracking_uri  # eval.report: the store the user named
    trust_pickles(a.trust_pickles)
    out = {"digits-classifier": cmd_digits_classifier, "fid": cmd_fid, "is": lambda a: cmd_fid(a, with_fid=False),
     "accuracy": cmd_accuracy, "ood": cmd_ood, "restore": cmd_restore, "paper": cmd_paper}[a.cmd](a)
    for k, v in out.get("metrics", out).items():
        print(f"{k}: {v:.4f}")
    if "task" in out:
        print(f"-> {out.get('json', '')}{' and MLflow run ' + out['mlflow_run_id'] if out.get('mlflow_run_id') else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
