import torch


def cd_loss(e_pos: torch.Tensor, e_neg: torch.Tensor, alpha: float) -> torch.Tensor:
    """Contrastive divergence with the IGEBM energy regulariser: E+ - E- + alpha (E+^2 + E-^2)."""
    return e_pos.mean() - e_neg.mean() + alpha * (e_pos.pow(2).mean() + e_neg.pow(2).mean())
