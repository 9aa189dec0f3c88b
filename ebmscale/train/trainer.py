"""The training loop: contrastive divergence with Langevin negatives and a replay buffer.

The trainer receives built components; it never reads raw config to construct them.
"""
from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from PIL import Image
from omegaconf import OmegaConf
from tqdm import tqdm

from ebmscale.buffer import ReplayBuffer
from ebmscale.config import icd_active
from ebmscale.log import get_logger
from ebmscale.progress import progress_line
from ebmscale.sampling import frozen, langevin, model_energy
from ebmscale.sampling.langevin import InputGradScale
from ebmscale.train import faults, stop
from ebmscale.train.checkpoint import RNG, Checkpointer, healthy_checkpoints, restore, step_of
from ebmscale.precision import compute_dtype
from ebmscale.train.guard import SEVERITY, Guard, GuardFailure, Verdict, build_guard, discard_gradients, norms
from ebmscale.train.heartbeat import Heartbeat
from ebmscale.train.icd import ICD
from ebmscale.train.timing import Marks, step_times
from ebmscale.train.loss import cd_loss
from ebmscale.tracking import system

log = get_logger(__name__)


def peak_memory_gb(device) -> float:
    """The most memory this rank has held: the GPU's allocator peak on CUDA (a host-side counter, no sync), the
    process's peak resident set on CPU."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


def _partition(p: torch.nn.Parameter) -> torch.Tensor:
    """The elements of a ZeRO-3 parameter this rank holds, without the padding of the last partition (torch.empty:
    garbage, NaN at times)."""
    part = p.ds_tensor.ds_numel
    rank = dist.get_rank(group=p.ds_process_group) if dist.is_initialized() else 0
    return p.ds_tensor.detach().view(-1)[:max(0, min(part, p.ds_numel - rank * part))]


def weights_finite(module: torch.nn.Module, device, step: int = 0, rank: int = 0) -> bool:
    """Whether every weight is finite on every rank: each rank sums the squares of what it holds (under ZeRO-3 its
    partition `ds_tensor`, whatever stage3_param_persistence_threshold keeps whole; else the full replica), and one
    all-reduce adds them, so every rank sees the whole weights and gives the same answer."""
    held = [_partition(p) if hasattr(p, "ds_tensor") else p.detach() for p in module.parameters()]
    if faults.active("nan_weight", step, rank):  # a NaN in this rank's share of the first weight it holds
        next(t for t in held if t.numel()).view(-1)[0] = float("nan")
        log.warning(f"fault injection: nan_weight at step {step} on rank {rank}")
    held_norms = norms([t for t in held if t.numel()])
    sq = torch.stack(held_norms).float().pow(2).sum().to(device) if held_norms else torch.zeros((), device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sq)
    return bool(torch.isfinite(sq))


class Trainer:
    def __init__(self, cfg, engine, buffer: ReplayBuffer, stream, tracker, checkpointer: Checkpointer,
                 rank: int, world_size: int, run_dir: Path, pictures=None, guard: Optional[Guard] = None):
        self.cfg, self.engine, self.buffer, self.stream = cfg, engine, buffer, stream
        self.tracker, self.ckpt, self.rank, self.world_size = tracker, checkpointer, rank, world_size
        self.run_dir, self.pictures = Path(run_dir), pictures
        self.device = engine.device if hasattr(engine, "device") else torch.device("cpu")
        self.dtype = compute_dtype(cfg.train.precision)
        self.conditional = cfg.model.num_classes > 0
        self.step = 0
        self.images_seen = 0
        self._saved_step = -1
        self.guard = guard or build_guard(cfg, world_size, self.device)
        self.heartbeat = Heartbeat(self.run_dir, rank)
        self.icd = ICD(cfg, buffer.shape, self.device) if icd_active(cfg) else None
        # fp16: the input-gradient scale carried over the run, on the device (sampling/langevin.py: InputGradScale)
        self.input_grad_scale = InputGradScale(self.device) if self.dtype == torch.float16 else None

    # ---- one step -----------------------------------------------------------------------------
    def sample_negatives(self, n: int, frames: Optional[list] = None, y_pos: Optional[torch.Tensor] = None):
        """Langevin negatives for one batch; under buffer.labels=batch conditional chains take `y_pos`."""
        s = self.cfg.sampler
        batch_labels = y_pos if self.conditional and y_pos is not None and self.cfg.buffer.labels == "batch" else None
        x0, y, fresh, born = self.buffer.init_chains(n, self.step, self.device, labels=batch_labels)
        if self.icd:
            x0, y = self.icd.transition(x0, y, fresh)
        tail = self.icd.cfg.kl_steps if self.icd else 0  # ICD: the last steps keep the graph, for the KL term
        with frozen(self.engine.module, s.channels_last) as model:
            energy = model_energy(model, y if self.conditional else None, self.dtype,
                                  channels_last=s.channels_last, compile=s.compile, grad_scale=self.input_grad_scale)
            x, stats = langevin(energy, x0, s.steps - tail, s.step_size, s.noise, s.grad_clip,
                                frames=frames, frame_every=max(1, s.steps // 10) if frames is not None else 0)
        x_final = self.icd.last_steps(self.engine.module, x, y if self.conditional else None, self.dtype) \
            if self.icd else x
        x = x_final.detach()
        self.buffer.push(x, y, born)
        return x, y, fresh, born, stats, x_final

    def train_step(self, x_pos: torch.Tensor, y_pos: torch.Tensor, frames: Optional[list] = None) -> dict:
        marks = Marks(self.device)  # CUDA events on a GPU: read at log steps only (train/timing.py)
        marks.mark("start")
        n = x_pos.shape[0]
        x_neg, y_neg, fresh, born, lstats, x_final = self.sample_negatives(n, frames, y_pos)
        if faults.active("collapse", self.step + 1, self.rank):
            x_neg = torch.full_like(x_neg, 0.5)
        marks.mark("sampled")
        x = torch.cat([x_pos, x_neg])  # fp32: the model's stem reads it in fp32 (models/resnet.py)
        if self.cfg.train.channels_last_update:
            x = x.contiguous(memory_format=torch.channels_last)
        y = torch.cat([y_pos, y_neg]) if self.conditional else None
        # multi-scale under model.scale_loss=mean: [2n, scales], the ICD release's loss (models/multiscale.py)
        per_scale = self.cfg.model.scales > 1 and self.cfg.model.scale_loss == "mean"
        energies = (self.engine(x, y, per_scale=True) if per_scale else self.engine(x, y)).float()
        loss = cd_loss(energies[:n], energies[n:], self.cfg.train.alpha)
        energies = energies.sum(-1) if per_scale else energies
        e_pos, e_neg = energies[:n], energies[n:]
        icd_stats = {}
        if self.icd:
            extra, icd_stats = self.icd.loss(self.engine.module, x_final, y_neg if self.conditional else None, self.dtype)
            loss = loss + extra
            self.icd.remember(x_neg, self.step)
        if faults.active("nan_loss", self.step + 1, self.rank):
            loss = loss * float("nan")
        self.engine.backward(loss)  # the optimizer step waits for the guard's verdict: update()
        marks.mark("backward")
        return {"loss": loss.detach(), "e_pos": e_pos.detach().mean(), "e_neg": e_neg.detach().mean(),
                "langevin": lstats, "fresh": fresh.float().mean(), "age": (self.step - born).float().mean(),
                "marks": marks, "x_neg": x_neg, "y_neg": y_neg,
                "e_pos_all": e_pos.detach(), "e_neg_all": e_neg.detach(), "x_pos": x_pos, "icd": icd_stats}

    def update(self, out: dict, skip: bool) -> None:
        out["marks"].mark("update")
        if skip:
            discard_gradients(self.engine)  # on every rank alike: the verdict is the same everywhere
        else:
            self.engine.step()
        out["marks"].mark("updated")
        self.step += 1
        self.images_seen += out["x_pos"].shape[0] * self.world_size

    # ---- the loop -----------------------------------------------------------------------------
    def fit(self) -> stop.Outcome:
        steps = self.cfg.train.steps
        # the live bar only in a terminal; a log file gets plain progress lines (log_step)
        bar = tqdm(total=steps, initial=self.step, disable=self.rank != 0 or not sys.stderr.isatty(),
                   dynamic_ncols=True, desc="train")
        self._started = (time.perf_counter(), self.step)
        self._data = iter(self.stream)
        self._window = [time.perf_counter(), 0, 0.0]  # since the last log: start, images, data seconds
        self.apply_remedies()
        if self.step == 0 and self.cfg.guard.initial_checkpoint:
            self.save()
        self.heartbeat.beat(self.step)
        while self.step < steps:
            td = time.perf_counter()
            x_pos, y_pos = self.next_batch()
            x_pos = x_pos.to(self.device, non_blocking=True).float()
            y_pos = y_pos.to(self.device, non_blocking=True)
            self._window[2] += time.perf_counter() - td
            want_gif = self.rank == 0 and (self.step + 1) % self.cfg.tracking.chain_gif_every == 0
            frames = [] if want_gif else None
            out = self.train_step(x_pos, y_pos, frames)  # forward + backward
            verdict = self.guard.check(self.step + 1, out, self.engine, stop.stop_requested())  # the one all-reduce
            self.commit()  # the last save, judged by the step run on it
            if verdict.action in ("rollback", "stop"):
                self.rollback(verdict)  # GuardFailure when it may not
                bar.n = self.step
            else:
                if verdict.action != "ok":
                    self.report(verdict, verdict.action)
                self.update(out, skip=verdict.action == "skip")
                self.log_step(out, verdict, frames, bar)
                bar.update(1)
            if verdict.stop_requested and self.step < steps:
                return self.preempt(bar)
            self.heartbeat.beat(self.step)
            faults.maybe_kill("kill_at_step", self.step, self.rank)
            if self.step % self.cfg.checkpoint.every == 0 or self.step == steps:
                self.save()
        self.commit()
        bar.close()
        return stop.Outcome.COMPLETED

    def next_batch(self):
        """The next batch; a finite stream (data.resampled=false) ends each epoch, and the next one starts here."""
        try:
            return next(self._data)
        except StopIteration:
            self._data = iter(self.stream)
            return next(self._data)

    def preempt(self, bar) -> stop.Outcome:
        stop.hold_for_test()
        self.save()
        self.commit()
        log.info(f"rank {self.rank}: stop requested ({stop.stop_reason() or 'by a peer'}); "
                 f"checkpoint committed at step {self.step}")
        bar.close()
        return stop.Outcome.PREEMPTED

    def log_step(self, out: dict, verdict: Verdict, frames: Optional[list], bar) -> None:
        t_cfg, steps = self.cfg.train, self.cfg.train.steps
        self._window[1] += out["x_pos"].shape[0]
        if self.step % t_cfg.log_every == 0 or self.step == steps:
            start, imgs, t_data = self._window
            metrics = {**self.metrics(out, imgs * self.world_size / (time.perf_counter() - start), t_data / max(imgs, 1)),
                       **verdict.metrics, **self.guard.counters()}
            self._window = [time.perf_counter(), 0, 0.0]
            if self.rank == 0:
                bar.set_postfix(loss=f"{metrics['batch/loss']:.4f}", Epos=f"{metrics['batch/e_pos']:.3f}",
                                Eneg=f"{metrics['batch/e_neg']:.3f}", ips=f"{metrics['images_per_s']:.1f}")
                if bar.disable:
                    t0, step0 = self._started
                    done = self.step - step0
                    eta = (steps - self.step) * (time.perf_counter() - t0) / done if done > 0 else None
                    print(progress_line(self.step, steps, metrics, eta, self.cfg.train.precision), flush=True)
                self.tracker.log_metrics(metrics, step=self.step)
                try:  # bookkeeping: a full disk is the next save's error (in words), not this one's
                    with open(self.run_dir / "logs" / "metrics.jsonl", "a") as f:
                        f.write(json.dumps({"step": self.step, **metrics}) + "\n")
                except OSError as e:
                    log.warning(f"could not append to {self.run_dir / 'logs' / 'metrics.jsonl'} ({e.strerror or e})")
        if self.rank == 0 and (self.step % t_cfg.sample_every == 0 or self.step == steps):
            self.log_pictures(out)
        if frames:
            self.log_gif(frames)

    # ---- the stability guard's responses ------------------------------------------------------
    def rollback(self, v: Verdict) -> None:
        """Back to the newest healthy checkpoint (model, optimizer, replay buffer; the data stream moves on past
        the batches that went bad, the RNG is reseeded), then the next remedy. GuardFailure when it may not."""
        discard_gradients(self.engine)
        target = self.ckpt.rollback_target()
        why = self.guard.refuse_rollback(v, target)
        if why:
            raise GuardFailure(self.report(v, "stop", target, why))
        self.report(v, "rollback", target, self.guard.next_remedy())
        keep = self.guard.state_dict()["run"]
        self.ckpt.discard_after(target)
        restore(self, target, data_and_rng=False)
        self.guard.load_state_dict({**self.guard.state_dict(), "run": keep})
        torch.manual_seed(self.cfg.run.seed + 7919 * self.rank + 104729 * self.guard.rollbacks + self.step)
        self.apply_remedies()
        self._saved_step = self.step  # on disk already
        self.ckpt.write_trainer_state(target, {**Checkpointer.read_trainer_state(target), "guard": self.guard.state_dict()})

    def apply_remedies(self) -> None:
        """Set what the guard's remedies changed (after a rollback, and on resume: they are in the trainer state)."""
        changes = self.guard.effective()
        for path, value in changes.items():
            OmegaConf.update(self.cfg, path, value)
        if "optim.lr" in changes:
            for group in self.engine.optimizer.param_groups:
                group["lr"] = changes["optim.lr"]
        if changes and self.rank == 0:
            log.info(f"guard: remedies in force: {', '.join(self.guard.remedies)} -> "
                     f"{', '.join(f'{k}={v:.6g}' for k, v in changes.items())}")

    def report(self, v: Verdict, action: str, target: Optional[Path] = None, note: Optional[str] = None) -> str:
        """One event: the console on every rank; MLflow (tag, metric, text) from rank 0. Returns the message."""
        g = self.guard
        if target is None and self.rank == 0:
            target = next(iter(healthy_checkpoints(self.ckpt.root)[-1:]), None)
        last_ok = int(target.name.split("_")[1]) if target else None
        first_bad = g.first_bad(after=last_ok or 0) or v.step
        if action == "rollback":
            action_text = f"rollback {g.rollbacks}/{g.cfg.max_rollbacks} to step {last_ok}, remedy {note or 'none'}"
        else:
            action_text = f"run stopped: {note}" if action == "stop" else action
        msg = f"step {v.step}: {', '.join(v.signals)} ({v.detail}) -> {action_text}"
        log.warning(f"rank {self.rank}: guard: {msg}")
        if self.rank == 0:
            tags = {"guard.last_event": msg, "guard.rollbacks": g.rollbacks, "guard.skipped_steps": g.skipped,
                    "guard.remedies": ", ".join(g.remedies) or "none"}
            if action == "stop":
                tags["guard.failure"] = tags["mlflow.note.content"] = f"stability guard: {msg}"
            self.tracker.set_tags(tags)
            self.tracker.log_metrics({"guard/event": SEVERITY[action], **g.counters()}, step=v.step)
            self.tracker.log_text(f"{msg}\n\nresponse: {action}\nlast healthy step: {last_ok}\nfirst bad step: "
                                  f"{first_bad}\nrollbacks: {g.rollbacks}\nremedies: {', '.join(g.remedies) or 'none'}\n"
                                  f"values: {json.dumps(v.metrics)}\n",
                                  f"guard/event_{len(g.events):04d}_step_{v.step:09d}_{action}.txt")
        return f"stability guard: {msg}; last healthy step {last_ok}, first bad step {first_bad}"

    # ---- outputs ------------------------------------------------------------------------------
    def metrics(self, out: dict, images_per_s: float, data_s_per_img: float) -> dict:
        ls = out["langevin"]
        # "batch/" and "batch/langevin/" sort first among MLflow's chart sections (tracking/README.md)
        m = {"batch/loss": out["loss"], "batch/e_pos": out["e_pos"], "batch/e_neg": out["e_neg"],
             "batch/energy_gap": out["e_neg"] - out["e_pos"],
             "batch/langevin/energy_start": ls.energy_start, "batch/langevin/energy_end": ls.energy_end,
             "batch/langevin/grad_abs": ls.grad_abs, "batch/langevin/step_change": ls.step_change,
             "buffer/fresh_share": out["fresh"], "buffer/mean_age": out["age"], **out.get("icd", {})}
        vals = torch.stack([torch.as_tensor(v, dtype=torch.float32).to(self.device) for v in m.values()])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(vals)
            vals /= self.world_size
        m = dict(zip(m.keys(), vals.tolist()))
        gn = self.engine.get_global_grad_norm() if hasattr(self.engine, "get_global_grad_norm") else None
        m["grad_norm"] = float(gn) if gn is not None else float("nan")
        m["lr"] = float(self.engine.optimizer.param_groups[0]["lr"])
        m["images_per_s"] = images_per_s
        m.update(step_times(out["marks"]))  # time/sample_s, update_s, step_s, langevin_share
        m["time/data_s"] = data_s_per_img * self.cfg.data.batch_size
        m["buffer/fill"] = len(self.buffer) / self.buffer.capacity
        m["memory/peak_gb"] = peak_memory_gb(self.device)
        stats = self.stream.stats() if hasattr(self.stream, "stats") else {}
        m["data/bad_samples"] = float(stats.get("bad_samples", 0))
        if self.cfg.tracking.enabled and self.cfg.tracking.system_metrics:
            # system.gather is a collective: every node's local rank 0 samples its node
            m.update(system.gather())
        return m

    def log_pictures(self, out: dict) -> None:
        if self.pictures is None:
            return
        x, y = out["x_neg"].float().cpu(), out["y_neg"].cpu()
        if self.conditional:  # one row per class
            order = torch.argsort(y, stable=True)
            x = x[order]
        up = self.pictures.upscale  # small images are legible in the UI only enlarged
        grid = self.pictures.image_grid(up(x.clamp(0, 1)), nrow=min(16, x.shape[0]))
        path = self.run_dir / "samples" / f"negatives_{self.step:09d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(grid).save(path)
        self.tracker.log_image("negatives", grid, step=self.step)
        pos = self.pictures.image_grid(up(out["x_pos"].float().cpu().clamp(0, 1)), nrow=min(16, x.shape[0]))
        self.tracker.log_image("positives", pos, step=self.step)
        hist = self.pictures.energy_histogram(out["e_pos_all"].float().cpu().numpy(),
                                              out["e_neg_all"].float().cpu().numpy())
        self.tracker.log_image("energy_histogram", hist, step=self.step)

    def log_gif(self, frames: list) -> None:
        if self.pictures is None:
            return
        path = self.run_dir / "samples" / f"chains_{self.step:09d}.gif"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.pictures.chain_gif([self.pictures.upscale(f[:16].float()) for f in frames], path)
        self.tracker.log_artifact(path, "chains")

    # ---- state --------------------------------------------------------------------------------
    def components(self) -> dict:
        """Everything a checkpoint holds besides the engine: name -> (state_dict/load_state_dict, where);
        "rank": this rank's rank_*.pt, "shared": trainer.json (the trainer's own counters at its top level)."""
        parts = {"buffer": (self.buffer, "rank"), "stream": (self.stream, "rank"), "rng": (RNG, "rank"),
                 "trainer": (self, "shared"), "guard": (self.guard, "shared")}
        if self.icd is not None:  # the ICD recipe's entropy bank
            parts["icd"] = (self.icd, "rank")
        return parts

    def state_dict(self) -> dict:
        return {"step": self.step, "images_seen": self.images_seen}

    def load_state_dict(self, sd: dict) -> None:
        self.step, self.images_seen = int(sd["step"]), int(sd["images_seen"])

    def commit(self) -> None:
        """Commit the save in flight, judged by the guard and by whether its weights are finite (with the guard off,
        retention still keeps the newest finite checkpoint)."""
        if self.ckpt.pending:
            self.heartbeat.beat(self.step, "commit")
            finite = weights_finite(self.engine.module, self.device, self.step, self.rank)
            folder = self.ckpt.commit(healthy=self.guard.healthy(self.step), finite=finite)
            if folder is not None and self.rank == 0:  # recorded (and uploaded) only once committed
                self.tracker.record_checkpoint(folder, step_of(folder))

    def save(self) -> None:
        if (self.step == 0 and not self.cfg.guard.initial_checkpoint) or self.step == self._saved_step:
            return
        self._saved_step = self.step
        self.heartbeat.beat(self.step, "save")
        rank_state, trainer_state = {"rank": self.rank, "world_size": self.world_size}, {}
        for name, (part, where) in self.components().items():
            if where == "rank":
                rank_state[name] = part.state_dict()
            else:
                trainer_state.update(part.state_dict() if name == "trainer" else {name: part.state_dict()})
        trainer_state = {**trainer_state, "world_size": self.world_size,
                         "tracking": self.tracker.state_dict(), "precision": self.cfg.train.precision,
                         "zero_stage": self.cfg.train.zero_stage}
        self.ckpt.save(self.engine, self.step, rank_state, trainer_state)
