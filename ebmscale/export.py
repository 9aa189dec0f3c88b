"""A trained model people can take away: `ebmscale export RUN_OR_CHECKPOINT OUT_DIR [--dtype fp32|bf16]`.

OUT_DIR holds
  model.safetensors  the weights (spectral-norm vectors included), fp32 or bf16; no pickle
  config.json        {"model": the model section, "sampler": the training Langevin settings, "recipe": if the
                     config has one, "ebmscale": version, step, source checkpoint, training precision, dtype}
  README.md          a model card: architecture, data, steps, recipe, evaluation figures, a sample grid
  samples.png        the run's newest negatives grid, when it has one

Loading (`EnergyModel.from_pretrained(OUT_DIR)`, `ebmscale.load_model(OUT_DIR)`) needs torch, safetensors and
omegaconf only: no DeepSpeed, no ebmscale run folder, no pickle. Exporting reads the run with eval.loading (which
may need DeepSpeed for ZeRO checkpoints).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

WEIGHTS, CONFIG, CARD = "model.safetensors", "config.json", "README.md"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def is_exported(path: str | Path) -> bool:
    return (Path(path) / WEIGHTS).is_file() and (Path(path) / CONFIG).is_file()


def read_config(folder: str | Path) -> dict:
    return json.loads((Path(folder) / CONFIG).read_text())


def load_pretrained(folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """The model of an exported folder, in eval mode with the release's always-on dropout off (ResNet32Large under
    `paper`: `.eval()` does not reach it; eval/loading.py does the same), built from config.json's model section."""
    from omegaconf import OmegaConf
    from safetensors.torch import load_file

    from ebmscale.config import ModelConfig
    from ebmscale.models import build_model
    from ebmscale.models.resnet import set_dropout
    folder = Path(folder)
    if not is_exported(folder):
        raise FileNotFoundError(f"{folder} is not an exported model (needs {WEIGHTS} and {CONFIG}; make one with "
                                f"`ebmscale export RUN {folder}`)")
    model = build_model(OmegaConf.merge(OmegaConf.structured(ModelConfig), read_config(folder)["model"]))
    state = load_file(str(folder / WEIGHTS))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"{folder / WEIGHTS} does not fit the model of {folder / CONFIG}: missing {missing}, "
                           f"unexpected {unexpected}")
    return set_dropout(model, False).to(device=device, dtype=dtype).eval()


def load_exported(folder: str | Path, device: str | torch.device = "cpu"):
    """(model, a full config with the exported sections, step), the shape eval.loading.load_energy_model returns."""
    from omegaconf import OmegaConf

    from ebmscale.config import Config
    meta = read_config(folder)
    known = {f for f in Config.__dataclass_fields__}
    sections = {k: v for k, v in meta.items() if k in known}
    sections.setdefault("train", {})["precision"] = meta.get("ebmscale", {}).get("precision", "fp32")
    cfg = OmegaConf.merge(OmegaConf.structured(Config), sections)
    return load_pretrained(folder, device), cfg, int(meta.get("ebmscale", {}).get("step", 0))


def load_model(path: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """An energy model in eval mode from an exported folder (torch + safetensors), or from a run folder or
    checkpoint folder (through eval.loading, which may need DeepSpeed)."""
    if is_exported(path):
        return load_pretrained(path, device)
    from ebmscale.eval.loading import load_energy_model
    return load_energy_model(path, device)[0]


def _eval_results(run: Path) -> list[dict]:
    out = []
    for f in sorted((run / "eval").glob("*.json")):
        try:
            d = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(d, dict) and isinstance(d.get("metrics"), dict):
            out.append({"file": f.name, "task": d.get("task", f.stem), "step": d.get("step"), "metrics": d["metrics"]})
    return out


def _card(cfg, meta: dict, evals: list[dict], n_params: int, grid: bool) -> str:
    m, s, d = cfg.model, cfg.sampler, cfg.data
    e = meta["ebmscale"]
    cond = f"class-conditional, {m.num_classes} classes" if m.num_classes else "unconditional"
    lines = [f"# {cfg.run.name}: an IGEBM energy model (ebmscale {e['version']})", "",
             f"An energy function E(x{', y' if m.num_classes else ''}) over {m.in_channels}x{m.resolution}x"
             f"{m.resolution} images in [0, 1] ({cond}); low energy = likely. Samples come from Langevin dynamics "
             "on E.", "",
             "## Model", "",
             f"- architecture: {m.arch}, {m.filters} filters, {m.activation}, spectral norm {m.spectral_norm}",
             f"- parameters: {n_params:,}",
             f"- weights: {WEIGHTS} ({e['dtype']}); trained in {e['precision']}",
             f"- training: {e['step']} steps, batch {d.batch_size} per rank, {e.get('world_size', '?')} ranks",
             f"- data: `{d.shards}`",
             f"- Langevin (training): {s.steps} steps, step size {s.step_size}, noise {s.noise}, "
             f"dE/dx clip {s.grad_clip}",
             f"- source checkpoint: `{e['checkpoint']}`"]
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


def export(src: str | Path, out: str | Path, dtype: str = "fp32") -> Path:
    """Write OUT_DIR from a run folder (its newest healthy committed checkpoint) or a checkpoint folder."""
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    import ebmscale
    from ebmscale.eval.loading import load_energy_model, resolve_checkpoint
    from ebmscale.models import count_parameters
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype}: allowed {', '.join(DTYPES)}")
    run, _ = resolve_checkpoint(src)
    model, cfg, ckpt, step = load_energy_model(src)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(DTYPES[dtype] if v.is_floating_point() else v.dtype).contiguous().clone()
             for k, v in model.state_dict().items()}
    trainer = json.loads((Path(ckpt) / "trainer.json").read_text())
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
    if grids:
        shutil.copyfile(grids[-1], out / "samples.png")
    (out / CARD).write_text(_card(cfg, meta, _eval_results(run), count_parameters(model), bool(grids)))
    return out


def main(argv=None) -> int:
    import argparse
    p = argparse.ArgumentParser(prog="ebmscale export", description=__doc__,
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
