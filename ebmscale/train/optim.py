"""Adam with beta1 = 0 as in IGEBM, optionally with the release's per-element gradient clip."""
from __future__ import annotations

import torch


class ClippedAdam(torch.optim.Adam):
    """Adam whose gradient is first clamped element-wise to +-(3 * sqrt(v_hat) + 0.1), as the IGEBM release
    (custom_adam.py _apply_dense): v_hat = v_{t-1} / (1 - beta2^t), the second moment before this step divided
    by the bias correction of this step t (TF's beta2_power is beta2^t while step t is applied). At t = 1 the
    bound is 0.1. Element-wise, so it holds unchanged on ZeRO's flat fp32 partitions. (TF adds epsilon to the
    uncorrected sqrt(v), torch to the corrected one: at eps = 1e-8 a difference only where v ~ 0.)"""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta2 = group["betas"][1]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state.get(p, {})
                if "exp_avg_sq" in state:
                    t = float(state["step"]) + 1  # the step about to be applied
                    v_hat = state["exp_avg_sq"] / (1 - beta2 ** t)
                    bound = 3.0 * v_hat.sqrt() + 0.1
                else:
                    bound = torch.full_like(p.grad, 0.1)
                p.grad.copy_(torch.maximum(torch.minimum(p.grad, bound), -bound))
        return super().step(closure)


def build_optimizer(model: torch.nn.Module, optim_cfg) -> torch.optim.Optimizer:
    cls = ClippedAdam if optim_cfg.official_clip else torch.optim.Adam  # null (a bare OptimConfig): off
    return cls(model.parameters(), lr=optim_cfg.lr, betas=(optim_cfg.beta1, optim_cfg.beta2),
               weight_decay=optim_cfg.weight_decay, foreach=False)
