"""A trained model people can take away: `ebmscale export RUN_OR_CHECKPOINT OUT_DIR [--dtype fp32|bf16]`.

OUT_DIR holds
  model.safetensors  the weights (spectral-norm vectors included), fp32 or bf16; no pickle
  config.json        {"model": the model section, "sampler": the training Langevin settings, "recipe": if the
                     config has one, "ebmscale": version, step, source checkpoint, training precision, dtype}
  README.md          a model card: Hugging Face Hub front matter (license, library_name, tags, datasets when the
                     data is a known Hub dataset), architecture, data, steps, recipe, evaluation figures, a sample
                     grid; no paths or shard URLs, only the data folder's name (cifar10, digits)
  samples.png        the run's newest negatives grid, when it has one

Loading (`EnergyModel.from_pretrained(OUT_DIR)`, `ebmscale.load_model(OUT_DIR)`; models/pretrained.py) needs torch,
safetensors and omegaconf only: no DeepSpeed, no ebmscale run folder, no pickle. An exported folder is data
(docs/security.md): config.json is read through trust.exported_config (size-capped; only model, sampler, recipe and
the ebmscale block; the model section checked against the schema), and the weights file must fit that model exactly.
The card shows no paths or secrets, and only pictures that lie inside the run are copied. Exporting reads the run
with eval.loading (which may need DeepSpeed for ZeRO checkpoints); the names loaders used from here stay importable.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path, PurePosixPath

import torch
import yaml
from omegaconf import OmegaConf
from safetensors.torch import save_file

import ebmscale
from ebmscale.eval.loading import load_energy_model, load_exported, load_model, resolve_checkpoint  # noqa: F401
from ebmscale.models import count_parameters
from ebmscale.models.pretrained import CARD, CONFIG, WEIGHTS, is_exported, load_pretrained, read_config  # noqa: F401
from ebmscale.log import get_logger
from ebmscale.program import prog
from ebmscale.trust import Untrusted, confined, read_json

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
HUB_DATASETS = {"cifar10": "cifar10", "imagenet": "imagenet-1k"}  # a data folder's name (its prefix) -> Hub dataset
log = get_logger(__name__)


def dataset_names(shards: str) -> list[str]:
    """The data folders' names of a data.shards spec, never a path or URL: `/x/cifar10/train-{0..9}.tar` -> cifar10,
    `pipe:aws s3 cp s3://b/imagenet32/train-{..}.tar -` -> imagenet32, `data/digits/manifest.json` -> digits."""
    names = []
    for spec in str(shards).split("::"):
        paths = [t for t in spec.removeprefix("pipe:").split() if "/" in t] or spec.split()[-1:]
        if not paths:
            continue
        path = PurePosixPath(paths[-1])
        name = path.parent.name or path.name.split("{")[0].split("-")[0].removesuffix(".tar")
        if name and not any(c in name for c in "{}:$?*") and name not in names:
            names.append(name)
    return names


def _front_matter(cfg, names: list[str]) -> str:
    """The Hugging Face Hub's model-card metadata."""
    hub = sorted({v for n in names for k, v in HUB_DATASETS.items() if n.startswith(k)})
    meta = {"license": "mit", "library_name": "ebmscale",
            "tags": ["energy-based-model", "igebm", "langevin-dynamics", "image-generation",
                     "class-conditional" if cfg.model.num_classes else "unconditional", "pytorch", "safetensors"],
            **({"datasets": hub} if hub else {})}
    return f"---\n{yaml.safe_dump(meta, sort_keys=False)}---\n"


def _eval_results(run: Path) -> list[dict]:
    out = []
    for f in sorted((run / "eval").glob("*.json")):
        try:
            d = read_json(f, root=run)
        except (OSError, ValueError):  # Untrusted is a ValueError
            continue
        if isinstance(d, dict) and isinstance(d.get("metrics"), dict):
            out.append({"file": f.name, "task": d.get("task", f.stem), "step": d.get("step"), "metrics": d["metrics"]})
    return out


def _card(cfg, meta: dict, evals: list[dict], n_params: int, grid: bool) -> str:
    m, s, d = cfg.model, cfg.sampler, cfg.data
    e = meta["ebmscale"]
    cond = f"class-conditional, {m.num_classes} classes" if m.num_classes else "unconditional"
    names = dataset_names(d.shards)
    lines = [_front_matter(cfg, names), f"# {cfg.run.name}: an IGEBM energy model (ebmscale {e['version']})", "",
             f"An energy function E(x{', y' if m.num_classes else ''}) over {m.in_channels}x{m.resolution}x"
             f"{m.resolution} images in [0, 1] ({cond}); low energy = likely. Samples come from Langevin dynamics "
             "on E.", "",
             "## Model", "",
             f"- architecture: {m.arch}, {m.filters} filters, {m.activation}, spectral norm {m.spectral_norm}",
             f"- parameters: {n_params:,}",
             f"- weights: {WEIGHTS} ({e['dtype']}); trained in {e['precision']}",
             f"- training: {e['step']} steps, batch {d.batch_size} per rank, {e.get('world_size', '?')} ranks",
             f"- data: {', '.join(names) or 'not recorded'}",
             f"- Langevin (training): {s.steps} steps, step size {s.step_size}, noise {s.noise}, "
             f"dE/dx clip {s.grad_clip}",
             f"- source checkpoint: `checkpoints/{Path(e['checkpoint']).name}` of run {cfg.run.name}"]
    if "recipe" in meta:
        lines += ["", "## Recipe", "", "```json", json.dumps(meta["recipe"], indent=1), "```"]
    lines += ["", "## Evaluation", ""]
    if evals:
        lines += ["| task | step | metric | value |", "|---|---|---|---|"]
        lines += [f"| {r['task']} | {r['step']} | {k} | {v:.4g} |" for r in evals for k, v in r["metrics"].items()
                  if isinstance(v, (int, float))]
    else:
        lines += ["No evaluation results in the run's eval/ folder (see tools/evaluate.py)."]
    if grid:
        lines += ["", "## Samples (negatives at the exported step's neighbourhood)", "", "![samples](samples.png)"]
    lines += ["", "## Use", "", "```python", "import torch, ebmscale",
              "model = ebmscale.load_model('THIS_FOLDER')  # torch + safetensors only",
              f"x = torch.rand(8, {m.in_channels}, {m.resolution}, {m.resolution})",
              f"energy = model(x{', torch.zeros(8, dtype=torch.long)' if m.num_classes else ''})", "```",
              "", "Sample with `ebmscale sample THIS_FOLDER --init noise --out samples.npz`.", ""]
    return "\n".join(lines)


def _inside(path: Path, run: Path) -> bool:
    try:
        confined(path, run, "sample grid")
        return True
    except Untrusted as e:
        log.warning(f"{e}; not copied into the export")
        return False


def export(src: str | Path, out: str | Path, dtype: str = "fp32") -> Path:
    """Write OUT_DIR from a run folder (its newest healthy committed checkpoint) or a checkpoint folder."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype}: allowed {', '.join(DTYPES)}")
    run, _ = resolve_checkpoint(src)
    model, cfg, ckpt, step = load_energy_model(src)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(DTYPES[dtype] if v.is_floating_point() else v.dtype).contiguous().clone()
             for k, v in model.state_dict().items()}
    trainer = read_json(Path(ckpt) / "trainer.json")
    container = OmegaConf.to_container(cfg, resolve=True)
    meta = {"model": container["model"], "sampler": container["sampler"]}
    if "recipe" in container:
        meta["recipe"] = container["recipe"]
    meta["ebmscale"] = {"version": ebmscale.__version__, "step": step, "checkpoint": str(Path(ckpt).resolve()),
                        "precision": cfg.train.precision, "dtype": dtype, "world_size": trainer.get("world_size")}
    save_file(state, str(out / WEIGHTS), metadata={"format": "pt", "ebmscale_step": str(step)})
    (out / CONFIG).write_text(json.dumps(meta, indent=1) + "\n")
    grids = sorted((run / "samples").glob("negatives_*.png"), key=lambda p: int(p.stem.split("_")[-1]))
    grids = [g for g in grids if int(g.stem.split("_")[-1]) <= step] or grids
    grids = [g for g in grids if _inside(g, run)][-1:]  # a picture linked from outside the run is not published
    if grids:
        shutil.copyfile(grids[-1], out / "samples.png")
    (out / CARD).write_text(_card(cfg, meta, _eval_results(run), count_parameters(model), bool(grids)))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog=prog(), description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="run folder (newest healthy committed checkpoint) or a checkpoint folder")
    p.add_argument("out", help="the folder to write")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="weights dtype in model.safetensors")
    a = p.parse_args(argv)
    try:
        out = export(a.run, a.out, a.dtype)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"export: {e}") from None
    print(f"exported {a.run} -> {out} ({', '.join(sorted(p.name for p in out.iterdir()))})")
    return 0
