"""Adam with beta1 = 0 as in IGEBM, optionally with the release's per-element gradient clip."""
from __future__ import annotations

import torch


class ClippedAdam(torch.optim.Adam):
    """Adam whose gradient is first clamped element-wise to +-(3 * sqrt(v_hat) + 0.1), v_hat being
    the bias-corrected second moment before this step (the IGEBM release's rule). Element-wise,
    so it holds unchanged on ZeRO's flat fp32 partitions."""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta2 = group["betas"][1]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state.get(p, {})
                if "exp_avg_sq" in state:
                    step = float(state["step"])
                    v_hat = state["exp_avg_sq"] / (1 - beta2 ** step)
                    bound = 3.0 * v_hat.sqrt() + 0.1
                else:
                    bound = torch.full_like(p.grad, 0.1)
                p.grad.copy_(torch.maximum(torch.minimum(p.grad, bound), -bound))
        return super().step(closure)


def build_optimizer(model: torch.nn.Module, optim_cfg) -> torch.optim.Optimizer:
    cls = ClippedAdam if optim_cfg.official_clip else torch.optim.Adam
    return cls(model.parameters(), lr=optim_cfg.lr, betas=(optim_cfg.beta1, optim_cfg.beta2),
               weight_decay=optim_cfg.weight_decay, foreach=False)
