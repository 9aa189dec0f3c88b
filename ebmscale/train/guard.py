"""The stability guard: is this step healthy? One small all-reduce per step decides, the same on every rank.

Signals, measured after backward and before the optimizer step, so nothing bad is ever stepped into the weights:
  nonfinite   loss, energies, negatives or gradients not finite on any rank
  energy      |mean E+| or |mean E-| over all ranks above guard.max_energy
  gap         |mean E+ - mean E-| above guard.max_gap
  grad_spike  the global gradient norm above guard.grad_spike x the median of the last guard.grad_window steps
  collapse    on any rank the negatives' pixel std (across the batch or within images) below guard.min_neg_std,
              or their share of pixels at exactly 0 or 1 above guard.max_saturated
Every rank puts its local values and the stop-request flag into one 8-float tensor: one SUM all-reduce (it
replaces the stop flag's), then each rank judges the same numbers with the same state: the same verdict everywhere.

Responses (guard.on_<signal>; the most severe of the fired signals wins): warn (log only); skip (no optimizer step,
the gradients dropped); rollback (the trainer goes back to the newest healthy checkpoint and applies the next of
guard.remedies); stop (GuardFailure: the run ends FAILED with the reason). guard.max_skips skips in a row escalate
to a rollback, and a rollback beyond guard.max_rollbacks stops. A checkpoint is healthy when no signal fired in the
guard.clean_steps steps before it nor in the step after it, the first one that runs on its weights.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from ebmscale.config import GUARD_RESPONSES, GUARD_SIGNALS, REMEDY_KEYS, parse_remedy

SEVERITY = {"ok": 0, **{r: i + 1 for i, r in enumerate(GUARD_RESPONSES)}}
STOP, NONFINITE, GRAD_SQ, E_POS, E_NEG, COLLAPSED, NEG_STD, SATURATED, OVERFLOW = range(9)  # the all-reduced tensor


class GuardFailure(RuntimeError):
    """The guard gave up on the run; the message says why, where it was last healthy and where it went bad."""


@dataclass
class Verdict:
    step: int  # the step being taken (1-based)
    action: str = "ok"  # ok | warn | skip | rollback | stop
    signals: list = field(default_factory=list)
    detail: str = ""
    stop_requested: bool = False
    metrics: dict = field(default_factory=dict)


# ---- DeepSpeed's gradients between backward() and step() ------------------------------------------------------
def norms(tensors: list) -> list:
    """The 2-norm of each tensor: torch._foreach_norm (private, one fused kernel; torch 2.3-2.13), else one
    torch.linalg.vector_norm per tensor (same values, more launches)."""
    foreach = getattr(torch, "_foreach_norm", None)
    return list(foreach(tensors)) if foreach is not None else [torch.linalg.vector_norm(t) for t in tensors]


def gradient_shard(engine) -> tuple[list, bool]:
    """This rank's reduced gradients after `engine.backward`, and whether they are a full replica (no ZeRO) rather
    than this rank's disjoint partition (ZeRO 1-3 keep it in `averaged_gradients`)."""
    opt = engine.optimizer
    shards = getattr(opt, "averaged_gradients", None)
    if isinstance(shards, dict):
        return [g for gs in shards.values() if gs is not None for g in gs if g is not None], False
    if hasattr(opt, "get_grads_for_norm"):  # bf16 without ZeRO: all-reduced fp32 copies
        return list(opt.get_grads_for_norm()[0]), True
    return [p.grad for p in engine.module.parameters() if p.grad is not None], True


def discard_gradients(engine) -> None:
    """Drop a backward's gradients without stepping, as DeepSpeed's own overflow branch does, so that the next
    backward starts from zero and nothing reaches the weights. Needed: without ZeRO and with ZeRO-3 the next backward
    would accumulate into them (tests/test_guard.py shows it); ZeRO-1/2 overwrite their partition at each boundary
    except when offloading (`micro_step_id`), and get their buffers released and counters reset here."""
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import INITIAL_MICRO_STEP_ID, DeepSpeedZeroOptimizer
    opt = engine.optimizer
    opt.zero_grad(set_to_none=True)  # ZeRO 3 also resets its micro step here
    if isinstance(opt, DeepSpeedZeroOptimizer):
        opt._release_preflattened_grad_buffers()
        if opt.cpu_offload:
            opt.reset_cpu_buffers()
        for k in opt.averaged_gradients:
            opt.averaged_gradients[k] = None
            opt.all_grad_tensors[k] = None
        opt.micro_step_id = INITIAL_MICRO_STEP_ID
    elif isinstance(opt, DeepSpeedZeroOptimizer_Stage3):
        opt.averaged_gradients = {}
    engine.zero_grad()


def check_discard_supported(engine) -> None:
    """Raise when the run starts, not at the first skipped step weeks into it, if this DeepSpeed lacks what
    `discard_gradients` touches (DeepSpeed 0.19.8's names)."""
    import deepspeed
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
    needs = {DeepSpeedZeroOptimizer: ("_release_preflattened_grad_buffers", "averaged_gradients", "all_grad_tensors",
                                      "micro_step_id", "cpu_offload"),
             DeepSpeedZeroOptimizer_Stage3: ("averaged_gradients",)}
    opt = engine.optimizer
    missing = [a for cls, names in needs.items() if isinstance(opt, cls) for a in names if not hasattr(opt, a)]
    if missing:
        raise RuntimeError(f"deepspeed {deepspeed.__version__} lacks {missing}, which the stability guard uses to "
                           f"drop a skipped step's gradients (tested with deepspeed 0.19.8). Install "
                           f"deepspeed==0.19.8, or set guard.enabled=false to train without the guard.")


# ---- the guard ------------------------------------------------------------------------------------------------
class Guard:
    def __init__(self, cfg, base: dict, world_size: int, device, fp16: bool = False):
        self.cfg, self.base, self.world_size, self.device, self.fp16 = cfg, base, world_size, device, fp16
        # the run's history (kept across rollbacks): rollbacks, remedies applied, skipped steps, event log
        self.rollbacks, self.remedies, self.skipped, self.events = 0, [], 0, []
        # the timeline (goes back with a rollback): recent grad norms, recent event steps, skips in a row
        self.grad_norms: list[float] = []
        self.recent: list[int] = []
        self.skips_in_row = 0

    # -- per step
    def check(self, step: int, out: dict, engine, stop_requested: bool) -> Verdict:
        t0 = time.perf_counter()
        v = self.measure(out, engine, stop_requested)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(v)  # the step's one collective outside DeepSpeed's own
        verdict = self.judge(step, v.tolist())
        verdict.metrics["time/guard_s"] = time.perf_counter() - t0
        return verdict

    def measure(self, out: dict, engine, stop_requested: bool) -> torch.Tensor:
        """This rank's contribution: [stop, nonfinite, grad norm^2 share, mean E+, mean E-, collapsed, std, saturated]."""
        zero = torch.zeros((), device=self.device)
        if self.cfg.enabled is False:  # null (unresolved): the recipe default outside paper, on
            return torch.stack([zero + float(stop_requested)] + [zero] * 8)
        grads, replicated = gradient_shard(engine)
        gsq = torch.stack(norms(grads)).float().pow(2).sum() if grads else zero
        gsq = gsq / float(getattr(engine.optimizer, "loss_scale", 1.0) or 1.0) ** 2 / (self.world_size if replicated else 1)
        overflow = zero
        if self.fp16:  # DeepSpeed's loss scaler owns fp16 overflow: it skips the step and lowers the scale itself
            overflow = (~torch.isfinite(gsq)).float()
            gsq = torch.nan_to_num(gsq, nan=0.0, posinf=0.0)
        e_pos, e_neg, x = out["e_pos_all"].float(), out["e_neg_all"].float(), out["x_neg"].detach().float().flatten(1)
        bad = ~torch.isfinite(torch.stack([out["loss"].float(), e_pos.sum(), e_neg.sum(), x.sum(), gsq])).all()
        across = x.std(0).mean() if x.shape[0] > 1 else zero + math.inf  # identical samples
        std = torch.minimum(across, x.std(1).mean())  # or flat images
        saturated = ((x <= 0) | (x >= 1)).float().mean()
        collapsed = (std < self.cfg.min_neg_std) | (saturated > self.cfg.max_saturated)
        return torch.stack([zero + float(stop_requested), bad.float(), gsq, e_pos.mean(), e_neg.mean(),
                            collapsed.float(), std, saturated, overflow])

    def judge(self, step: int, s: list) -> Verdict:
        """The verdict on the all-reduced values; changes the timeline state the same way on every rank."""
        c, w = self.cfg, self.world_size
        norm = math.sqrt(s[GRAD_SQ]) if s[GRAD_SQ] >= 0 else float("nan")
        e_pos, e_neg = s[E_POS] / w, s[E_NEG] / w
        overflow = s[OVERFLOW] > 0  # fp16: DeepSpeed skips this step; its norm (0 after nan_to_num) means nothing
        v = Verdict(step, stop_requested=s[STOP] > 0,
                    metrics={"guard/grad_norm": float("nan") if overflow else norm, "guard/neg_std": s[NEG_STD] / w,
                             "guard/saturated": s[SATURATED] / w, "guard/fp16_overflow": float(overflow)})
        if c.enabled is False:
            return v
        fired = {}  # all of them (a NaN compares False): a blow-up whose gradients overflow is still a blow-up
        if s[NONFINITE] > 0:
            fired["nonfinite"] = f"loss, energies, negatives or gradients not finite on {s[NONFINITE]:.0f} rank(s)"
        if c.max_energy and max(abs(e_pos), abs(e_neg)) > c.max_energy:
            fired["energy"] = f"mean E+ {e_pos:.4g}, E- {e_neg:.4g} beyond |E| <= {c.max_energy:g}"
        if c.max_gap and abs(e_pos - e_neg) > c.max_gap:
            fired["gap"] = f"E+ - E- = {e_pos - e_neg:.4g} beyond +-{c.max_gap:g}"
        median = statistics.median(self.grad_norms) if len(self.grad_norms) >= min(10, c.grad_window) else None
        if c.grad_spike and median and not overflow and norm > c.grad_spike * median:
            fired["grad_spike"] = f"grad norm {norm:.4g} > {c.grad_spike:g} x median {median:.4g}"
        if s[COLLAPSED] > 0:
            fired["collapse"] = (f"negatives collapsed on {s[COLLAPSED]:.0f} rank(s) (mean pixel std {s[NEG_STD] / w:.3g}, "
                                 f"min {c.min_neg_std:g}; at 0/1 {s[SATURATED] / w:.3f}, max {c.max_saturated:g})")
        v.signals, v.detail = list(fired), "; ".join(fired.values())
        v.action = max((getattr(c, f"on_{k}") for k in fired), key=SEVERITY.get, default="ok")
        self.skips_in_row = self.skips_in_row + 1 if v.action == "skip" else 0
        if v.action == "skip" and self.skips_in_row >= c.max_skips:
            v.action, v.detail = "rollback", f"{v.detail}; {self.skips_in_row} skipped steps in a row (guard.max_skips)"
        if SEVERITY[v.action] <= SEVERITY["warn"] and math.isfinite(norm) and not overflow:
            self.grad_norms = (self.grad_norms + [norm])[-c.grad_window:]
        if fired:
            self.recent = [t for t in self.recent if t > step - c.clean_steps - 2] + [step]
            self.skipped += v.action == "skip"
            self.events = (self.events + [{"step": step, "action": v.action, "detail": v.detail}])[-50:]
        return v

    # -- checkpoints and rollbacks
    def healthy(self, step: int) -> bool:
        """Whether a checkpoint at `step` may be rolled back to: nothing fired shortly before it nor in the step after."""
        return not any(step - self.cfg.clean_steps < t <= step + 1 for t in self.recent)

    def first_bad(self, after: int) -> Optional[int]:
        return min((t for t in self.recent if t > after), default=None)

    def refuse_rollback(self, v: Verdict, target) -> Optional[str]:
        """Why this rollback may not happen (the run must stop), or None."""
        if v.action == "stop":
            return "guard.on_" + next(k for k in v.signals if getattr(self.cfg, f"on_{k}") == "stop") + "=stop"
        if self.rollbacks >= self.cfg.max_rollbacks:
            return f"out of rollbacks ({self.rollbacks} done, guard.max_rollbacks={self.cfg.max_rollbacks})"
        if target is None:
            return "no healthy checkpoint to roll back to"
        return None

    def next_remedy(self) -> Optional[str]:
        """Count a rollback and take the next remedy (the last one repeats)."""
        self.rollbacks += 1
        if not self.cfg.remedies:
            return None
        self.remedies.append(self.cfg.remedies[min(self.rollbacks, len(self.cfg.remedies)) - 1])
        return self.remedies[-1]

    def effective(self) -> dict:
        """Config path -> value for every key a remedy touched: the base config with the remedies in order."""
        vals = {}
        for r in self.remedies:
            key, op, x = parse_remedy(r)
            old = vals.get(key, self.base[key])
            new = old * x if op == "*" else old + x if op == "+" else x
            vals[key] = max(1, round(new)) if isinstance(self.base[key], int) else new
        return vals

    def counters(self) -> dict:
        return {"guard/rollbacks": self.rollbacks, "guard/skipped_steps": self.skipped}

    # -- state: "run" survives a rollback, "timeline" goes back with it; both survive a requeue
    def state_dict(self) -> dict:
        return {"run": {"rollbacks": self.rollbacks, "remedies": list(self.remedies), "skipped": self.skipped,
                        "events": list(self.events)},
                "timeline": {"grad_norms": list(self.grad_norms), "recent": list(self.recent),
                             "skips_in_row": self.skips_in_row}}

    def load_state_dict(self, sd: dict) -> None:
        run, tl = sd["run"], sd["timeline"]
        self.rollbacks, self.remedies, self.skipped = int(run["rollbacks"]), list(run["remedies"]), int(run["skipped"])
        self.events = list(run["events"])
        self.grad_norms, self.recent, self.skips_in_row = list(tl["grad_norms"]), list(tl["recent"]), int(tl["skips_in_row"])


def build_guard(cfg, world_size: int, device) -> Guard:
    base = {path: OmegaConf.select(cfg, path) for path in REMEDY_KEYS.values()}
    return Guard(cfg.guard, base, world_size, device, fp16=cfg.train.precision == "fp16")


__all__ = ["Guard", "GuardFailure", "Verdict", "build_guard", "check_discard_supported", "discard_gradients",
           "gradient_shard", "GUARD_SIGNALS"]
