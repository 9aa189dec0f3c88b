"""Our config -> DeepSpeed's config dict."""
from __future__ import annotations


def guard_covers_nonfinite(cfg) -> bool:
    """Whether the stability guard keeps non-finite gradients out of the weights (it skips, rolls back or stops before
    the optimizer step), so DeepSpeed's own bf16 overflow check (bf16.check_grad_overflow, DeepSpeed >= 0.16; ZeRO-1/2
    only: ZeRO-3 checks fp16 alone, and BF16_Optimizer always) adds nothing but its collective and its sync."""
    g = cfg.guard
    return bool(g.enabled) and g.on_nonfinite in ("skip", "rollback", "stop")


def build_ds_config(cfg, world_size: int) -> dict:
    t, o = cfg.train, cfg.optim
    micro = cfg.data.batch_size
    ds = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro * world_size,
        "zero_optimization": {"stage": t.zero_stage, **(
            {"stage3_param_persistence_threshold": t.zero3_persistence_threshold}
            if t.zero_stage == 3 and t.zero3_persistence_threshold is not None else {})},
        # a client optimizer (Adam with the official per-element clip) is "untested" for ZeRO;
        # ZeRO steps it on flat fp32 partitions, where an element-wise rule still holds
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
    if t.precision == "bf16":
        ds["bf16"] = {"enabled": True}
        if guard_covers_nonfinite(cfg):  # ZeRO-1/2's overflow check: an all-reduce and a host sync per step, redundant
            ds["bf16"]["check_grad_overflow"] = False
        if t.grad_reduce_fp32:  # bf16 keeps 8 bits of mantissa: a sum over hundreds of ranks would lose the small terms
            ds["communication_data_type"] = "fp32"
    elif t.precision == "fp16":
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "hysteresis": 2,
                      "min_loss_scale": 1}
    if o.grad_clip > 0:
        ds["gradient_clipping"] = o.grad_clip
    return ds

