"""The training loop: contrastive divergence with Langevin negatives and a replay buffer.

The trainer receives built components; it never reads raw config to construct them.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from tqdm import tqdm

from ebmscale.buffer import ReplayBuffer
from ebmscale.sampling import frozen, langevin, model_energy
from ebmscale.train import faults, stop
from ebmscale.train.checkpoint import Checkpointer
from ebmscale.train.ds_config import compute_dtype
from ebmscale.train.loss import cd_loss


def _all_reduce_max(flag: bool, device) -> bool:
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


class Trainer:
    def __init__(self, cfg, engine, buffer: ReplayBuffer, stream, tracker, checkpointer: Checkpointer,
                 rank: int, world_size: int, run_dir: Path, pictures=None):
        self.cfg, self.engine, self.buffer, self.stream = cfg, engine, buffer, stream
        self.tracker, self.ckpt, self.rank, self.world_size = tracker, checkpointer, rank, world_size
        self.run_dir, self.pictures = Path(run_dir), pictures
        self.device = engine.device if hasattr(engine, "device") else torch.device("cpu")
        self.dtype = compute_dtype(cfg.train.precision)
        self.conditional = cfg.model.num_classes > 0
        self.step = 0
        self.images_seen = 0
        self._saved_step = -1
        self.history: list[dict] = []  # per-log-step metrics (rank 0), for tests and the stability guard

    # ---- one step -----------------------------------------------------------------------------
    def sample_negatives(self, n: int, frames: Optional[list] = None):
        s = self.cfg.sampler
        x0, y, fresh, born = self.buffer.init_chains(n, self.step, self.device)
        with frozen(self.engine.module) as model:
            energy = model_energy(model, y if self.conditional else None, self.dtype)
            x, stats = langevin(energy, x0, s.steps, s.step_size, s.noise, s.grad_clip,
                                frames=frames, frame_every=max(1, s.steps // 10) if frames is not None else 0)
        self.buffer.push(x, y, born)
        return x, y, fresh, born, stats

    def train_step(self, x_pos: torch.Tensor, y_pos: torch.Tensor, frames: Optional[list] = None) -> dict:
        t0 = time.perf_counter()
        n = x_pos.shape[0]
        x_neg, y_neg, fresh, born, lstats = self.sample_negatives(n, frames)
        t1 = time.perf_counter()
        x = torch.cat([x_pos, x_neg]).to(self.dtype)
        y = torch.cat([y_pos, y_neg]) if self.conditional else None
        energies = self.engine(x, y).float()
        e_pos, e_neg = energies[:n], energies[n:]
        loss = cd_loss(e_pos, e_neg, self.cfg.train.alpha)
        if faults.active("nan_loss", self.step + 1, self.rank):
            loss = loss * float("nan")
        self.engine.backward(loss)
        self.engine.step()
        t2 = time.perf_counter()
        self.step += 1
        self.images_seen += n * self.world_size
        return {"loss": loss.detach(), "e_pos": e_pos.detach().mean(), "e_neg": e_neg.detach().mean(),
                "langevin": lstats, "fresh": fresh.float().mean(), "age": (self.step - 1 - born).float().mean(),
                "t_sample": t1 - t0, "t_update": t2 - t1, "x_neg": x_neg, "y_neg": y_neg,
                "e_pos_all": e_pos.detach(), "e_neg_all": e_neg.detach(), "x_pos": x_pos}

    # ---- the loop -----------------------------------------------------------------------------
    def fit(self) -> stop.Outcome:
        t_cfg, steps = self.cfg.train, self.cfg.train.steps
        bar = tqdm(total=steps, initial=self.step, disable=self.rank != 0, dynamic_ncols=True, desc="train")
        data = iter(self.stream)
        window_t, window_imgs = time.perf_counter(), 0
        t_data = 0.0
        while self.step < steps:
            self.ckpt.commit()  # a save from the previous boundary finishes here
            if _all_reduce_max(stop.stop_requested(), self.device):
                self.save()
                self.ckpt.commit()
                print(f"[ebmscale] rank {self.rank}: stop requested ({stop.stop_reason() or 'by a peer'}); "
                      f"checkpoint committed at step {self.step}", flush=True)
                bar.close()
                return stop.Outcome.PREEMPTED
            td = time.perf_counter()
            x_pos, y_pos = next(data)
            x_pos = x_pos.to(self.device, non_blocking=True).float()
            y_pos = y_pos.to(self.device, non_blocking=True)
            t_data += time.perf_counter() - td
            want_gif = self.rank == 0 and (self.step + 1) % self.cfg.tracking.chain_gif_every == 0
            frames = [] if want_gif else None
            out = self.train_step(x_pos, y_pos, frames)
            window_imgs += x_pos.shape[0]
            if self.step % t_cfg.log_every == 0 or self.step == steps:
                dt = time.perf_counter() - window_t
                metrics = self.metrics(out, window_imgs * self.world_size / dt, t_data / max(window_imgs, 1))
                window_t, window_imgs, t_data = time.perf_counter(), 0, 0.0
                if self.rank == 0:
                    bar.set_postfix(loss=f"{metrics['loss']:.4f}", Epos=f"{metrics['e_pos']:.3f}",
                                    Eneg=f"{metrics['e_neg']:.3f}", ips=f"{metrics['images_per_s']:.1f}")
                    self.history.append({"step": self.step, **metrics})
                    self.tracker.log_metrics(metrics, step=self.step)
                    with open(self.run_dir / "logs" / "metrics.jsonl", "a") as f:
                        f.write(json.dumps({"step": self.step, **metrics}) + "\n")
            if self.rank == 0 and (self.step % t_cfg.sample_every == 0 or self.step == steps):
                self.log_pictures(out)
            if frames:
                self.log_gif(frames)
            bar.update(1)
            faults.maybe_kill("kill_at_step", self.step, self.rank)
            if self.step % self.cfg.checkpoint.every == 0 or self.step == steps:
                self.save()
        self.ckpt.commit()
        bar.close()
        return stop.Outcome.COMPLETED

    # ---- outputs ------------------------------------------------------------------------------
    def metrics(self, out: dict, images_per_s: float, data_s_per_img: float) -> dict:
        ls = out["langevin"]
        m = {"loss": out["loss"], "e_pos": out["e_pos"], "e_neg": out["e_neg"],
             "energy_gap": out["e_neg"] - out["e_pos"],
             "langevin/energy_start": ls.energy_start, "langevin/energy_end": ls.energy_end,
             "langevin/grad_abs": ls.grad_abs, "langevin/step_change": ls.step_change,
             "buffer/fresh_share": out["fresh"], "buffer/mean_age": out["age"]}
        vals = torch.stack([torch.as_tensor(v, dtype=torch.float32).to(self.device) for v in m.values()])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(vals)
            vals /= self.world_size
        m = dict(zip(m.keys(), vals.tolist()))
        gn = self.engine.get_global_grad_norm() if hasattr(self.engine, "get_global_grad_norm") else None
        m["grad_norm"] = float(gn) if gn is not None else float("nan")
        m["lr"] = float(self.engine.optimizer.param_groups[0]["lr"])
        m["images_per_s"] = images_per_s
        m["time/sample_s"] = out["t_sample"]
        m["time/update_s"] = out["t_update"]
        m["time/data_s"] = data_s_per_img * self.cfg.data.batch_size
        m["buffer/fill"] = len(self.buffer) / self.buffer.capacity
        stats = self.stream.stats() if hasattr(self.stream, "stats") else {}
        m["data/bad_samples"] = float(stats.get("bad_samples", 0))
        return m

    def log_pictures(self, out: dict) -> None:
        if self.pictures is None:
            return
        x, y = out["x_neg"].float().cpu(), out["y_neg"].cpu()
        if self.conditional:  # one row per class
            order = torch.argsort(y, stable=True)
            x = x[order]
        grid = self.pictures.image_grid(x.clamp(0, 1).numpy(), nrow=min(16, x.shape[0]))
        path = self.run_dir / "samples" / f"negatives_{self.step:09d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        from PIL import Image
        Image.fromarray(grid).save(path)
        self.tracker.log_image("negatives", grid, step=self.step)
        pos = self.pictures.image_grid(out["x_pos"].float().cpu().clamp(0, 1).numpy(), nrow=min(16, x.shape[0]))
        self.tracker.log_image("positives", pos, step=self.step)
        hist = self.pictures.energy_histogram(out["e_pos_all"].float().cpu().numpy(),
                                              out["e_neg_all"].float().cpu().numpy())
        self.tracker.log_image("energy_histogram", hist, step=self.step)

    def log_gif(self, frames: list) -> None:
        if self.pictures is None:
            return
        path = self.run_dir / "samples" / f"chains_{self.step:09d}.gif"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.pictures.chain_gif([f[:16].float().numpy() for f in frames], path)
        self.tracker.log_artifact(path, "chains")

    # ---- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"step": self.step, "images_seen": self.images_seen}

    def load_state_dict(self, sd: dict) -> None:
        self.step, self.images_seen = int(sd["step"]), int(sd["images_seen"])

    def save(self) -> None:
        if self.step == 0 or self.step == self._saved_step:
            return
        self._saved_step = self.step
        rank_state = {"buffer": self.buffer.state_dict(), "stream": self.stream.state_dict(),
                      "rank": self.rank, "world_size": self.world_size}
        trainer_state = {**self.state_dict(), "world_size": self.world_size,
                         "tracking": self.tracker.state_dict(), "precision": self.cfg.train.precision,
                         "zero_stage": self.cfg.train.zero_stage}
        folder = self.ckpt.save(self.engine, self.step, rank_state, trainer_state)
        if self.rank == 0:
            self.tracker.record_checkpoint(folder, self.step)
