"""The multi-scale energy: the sum of one net per resolution, each seeing the pooled input."""
import pytest
import torch
import torch.nn.functional as F

from ebmscale.config import ConfigError, ModelConfig, load_config
from ebmscale.models import EnergyModel, MultiScaleEnergy, build_model


@pytest.mark.slow  # over 10 s on 2 busy cores
def test_energy_is_the_sum_over_resolutions():
    torch.manual_seed(0)
    model = build_model(ModelConfig(filters=4, in_channels=1, resolution=32, num_classes=3, scales=3)).eval()
    assert isinstance(model, MultiScaleEnergy) and [n.resolution for n in model.nets] == [32, 16, 8]
    x, y = torch.rand(5, 1, 32, 32), torch.randint(0, 3, (5,))
    half = F.avg_pool2d(x, 3, stride=2, padding=1)
    quarter = F.avg_pool2d(half, 3, stride=2, padding=1)
    expected = model.nets[0](x, y) + model.nets[1](half, y) + model.nets[2](quarter, y)
    assert torch.allclose(model(x, y), expected, atol=1e-6)
    (g,) = torch.autograd.grad(model(x, y).sum(), model.nets[2].fc.weight)
    assert g.abs().sum() > 0  # the coarsest net is trained too


def test_one_scale_is_the_plain_net_and_bad_scales_fail_early():
    assert isinstance(build_model(ModelConfig(filters=4, resolution=32)), EnergyModel)
    cfg = load_config("configs/digits.yaml", ["model.scales=2"])
    assert isinstance(build_model(cfg.model), MultiScaleEnergy)  # from a DictConfig too
    try:
        load_config("configs/digits.yaml", ["model.scales=3"])  # 16 px / 4 = 4 px: resnet32 cannot downsample 3x
    except ConfigError as e:
        assert "model.scales" in str(e)
    else:
        raise AssertionError("model.scales=3 on 16 px digits must be refused")


def test_per_scale_energies_and_the_release_loss():
    """The ICD release's loss sees [N, scales]: CD over the mean of the scales, L2 of each scale's own energy."""
    from ebmscale.train.loss import cd_loss
    torch.manual_seed(0)
    model = build_model(ModelConfig(filters=4, in_channels=1, resolution=32, num_classes=3, scales=2)).eval()
    x, y = torch.rand(6, 1, 32, 32), torch.randint(0, 3, (6,))
    per = model(x, y, per_scale=True)
    assert per.shape == (6, 2) and torch.allclose(per.sum(-1), model(x, y), atol=1e-6)
    e_pos, e_neg = per[:3], per[3:]
    release = (e_pos.mean() - e_neg.mean()) + (e_pos.pow(2).mean() + e_neg.pow(2).mean())  # ICD train.py
    assert torch.allclose(cd_loss(e_pos, e_neg, 1.0), release)
    summed = cd_loss(e_pos.sum(-1), e_neg.sum(-1), 1.0)  # (E1 + E2)^2 is not E1^2 + E2^2
    assert not torch.allclose(summed / 2, release)
