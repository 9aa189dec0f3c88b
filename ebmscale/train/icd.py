"""The ICD recipe's per-step pieces, as the trainer uses them (Du, Li, Tenenbaum & Mordatch, ICML 2021).

Per training step, on top of contrastive divergence (trainer.py):
  1. chains restarted from the replay buffer take an augmentation transition (sampling/augment.py);
  2. the sampler runs its first `sampler.steps - icd.kl_steps` steps as usual, the last `kl_steps` keeping the
     graph (sampling/kl.py); their result is the step's negatives, for the CD loss and the buffer alike;
  3. the loss gains kl_coeff * E_frozen(x_final) + entropy_coeff * (-mean log nearest-neighbour distance of
     x_final to the entropy bank) (train/entropy.py); then x_final joins the bank.
The replay buffer is a reservoir (reservoir.py) and the model may be multi-scale (models/multiscale.py), both
chosen where those are built. State: the entropy bank, in the rank file; the frozen copy is the current weights.
"""
from __future__ import annotations

from typing import Optional

import torch

from ebmscale.buffer import reshard
from ebmscale.sampling import model_energy
from ebmscale.sampling.augment import ChainAugment, augment_chains
from ebmscale.sampling.kl import differentiable_steps, evaluating, kl_loss
from ebmscale.train.entropy import build_bank, entropy_loss


class ICD:
    def __init__(self, cfg, shape: tuple, device):
        self.cfg, self.sampler = cfg.icd, cfg.sampler
        i = self.cfg
        self.augment = ChainAugment(i.crop_scale, i.flip, i.color_jitter, i.grayscale) if i.augment else None
        self.bank = build_bank(i.entropy_bank, shape, device)
        # model.scale_loss=mean: the KL term of the mean of the scales' energies, as the release (entropy weight kept)
        self.kl_scale = 1.0 / cfg.model.scales if cfg.model.scale_loss == "mean" else 1.0

    def transition(self, x0: torch.Tensor, y: torch.Tensor, fresh: torch.Tensor):
        return augment_chains(self.augment, x0, y, fresh) if self.augment else (x0, y)

    def last_steps(self, module, x: torch.Tensor, y: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """The sampler's last `kl_steps` from `x`, differentiable in the model's parameters."""
        s = self.sampler
        with evaluating(module, weights_grad=True):
            energy = model_energy(module, y, dtype, channels_last=s.channels_last)
            return differentiable_steps(energy, x, self.cfg.kl_steps, s.step_size, s.noise, s.grad_clip)

    def loss(self, module, x_final: torch.Tensor, y: Optional[torch.Tensor], dtype: torch.dtype):
        """(kl_coeff * KL + entropy_coeff * entropy term, {metric: value}); gradients reach the parameters only
        through `x_final`."""
        with evaluating(module, weights_grad=False):
            kl = kl_loss(model_energy(module, y, dtype, channels_last=self.sampler.channels_last), x_final)
        ent = entropy_loss(x_final, self.bank, self.cfg.entropy_compare) if self.cfg.entropy_coeff > 0 \
            else kl.new_zeros(())
        total = self.cfg.kl_coeff * self.kl_scale * kl + self.cfg.entropy_coeff * ent
        return total, {"icd/kl": kl.detach(), "icd/entropy": ent.detach(), "icd/bank_fill": len(self.bank) / self.bank.capacity}

    def remember(self, x: torch.Tensor, step: int) -> None:
        self.bank.push(x.detach(), born=torch.full((x.shape[0],), step, dtype=torch.long))

    def state_dict(self) -> dict:
        return {"bank": self.bank.state_dict()}

    def load_state_dict(self, sd: dict) -> None:
        self.bank.load_state_dict(sd["bank"])

    def load_resharded(self, states: list[dict], world_size: int, rank: int) -> None:
        """This rank's share of the banks of a run saved on another world size (the newest rows kept)."""
        share, _ = reshard([s["bank"] for s in states], world_size, rank, self.bank.capacity)
        self.bank.load_state_dict(share)
