import pytest
import torch
from torch.nn.utils import parametrize

from ebmscale.config import CONFIG_DIR, ModelConfig, load_config
from ebmscale.models import ARCH_BLOCKS, EnergyModel, build_model, count_parameters

ARCHS = list(ARCH_BLOCKS)


def make(arch="resnet32", filters=8, **kw):
    kw.setdefault("resolution", 128 if arch == "resnet128" else 32)
    return build_model(ModelConfig(arch=arch, filters=filters, **kw))


def randomize_conditioning(model):
    """At init the class tables are gain 1 / bias 0 and the residual scales 0; perturb them so they matter."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.rsplit(".", 2)[-2] in ("bias1", "bias2", "gain2") or name.endswith("res_scale"):
                p.add_(0.5 * torch.randn(p.shape, generator=g))


# Independent of the model code: (output width / filters) of each block, from the IGEBM paper / release.
WIDTHS = {
    "resnet32": [1, 1, 2, 2, 2, 2],
    "resnet32large": [1, 1, 1, 2, 2, 2, 4, 4, 4],
    "resnet32wider": [2, 2, 2, 4, 4, 4, 8, 8, 8],
    "resnet128": [1, 2, 4, 8, 8, 8],
}


def expected_params(arch, f, in_ch, num_classes):
    k = max(num_classes, 1)
    n, cin = 9 * in_ch * f + f, f  # stem conv
    for m in WIDTHS[arch]:
        cout = m * f
        n += 9 * cin * cout + cout + 9 * cout * cout + cout  # conv1, conv2 (+ biases)
        n += cin * cout + cout if cin != cout else 0  # 1x1 shortcut
        n += k * (cin + 2 * cout) + 1  # class bias before conv1, bias + gain around conv2, residual scale
        cin = cout
    return n + cin + 1  # linear -> energy


@pytest.mark.parametrize("arch,uncond,cond10", [
    ("resnet32", 20367, 22455),
    ("resnet32large", 68586, 72906),
    ("resnet32wider", 270834, 279402),
    ("resnet128", 225463, 231655),
])
def test_parameter_count(arch, uncond, cond10):
    assert expected_params(arch, 8, 3, 0) == uncond and expected_params(arch, 8, 3, 10) == cond10
    assert count_parameters(make(arch, resolution=32)) == uncond
    assert count_parameters(make(arch, num_classes=10, resolution=32)) == cond10
    assert count_parameters(make(arch, in_channels=1, resolution=32)) == expected_params(arch, 8, 1, 0)
    # spectral norm keeps the weight as one parameter (`original`) plus buffers
    assert count_parameters(make(arch, spectral_norm=False, resolution=32)) == uncond


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_backward(arch):
    torch.manual_seed(0)
    model = make(arch, num_classes=3, resolution=32)
    randomize_conditioning(model)  # nonzero residual scales, so every parameter gets a gradient
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    e = model(x, torch.tensor([0, 2]))
    assert e.shape == (2,) and torch.isfinite(e).all()
    e.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_residual_branch_is_gated_by_its_scale():
    model = make("resnet32", num_classes=10).eval()  # eval: no power-iteration step between the two calls
    block, x = model.blocks[2], torch.randn(2, 8, 16, 16)  # 8 -> 16 channels, downsamples
    y = torch.tensor([1, 7])
    ref = model.act(torch.nn.functional.avg_pool2d(block.shortcut(x), 2))
    assert block.res_scale.item() == 1.0 and not torch.allclose(block(x, y), ref)
    with torch.no_grad():
        block.res_scale.zero_()
    torch.testing.assert_close(block(x, y), ref)


def test_conditioning():
    x, y1, y2 = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]), torch.tensor([4, 5, 6, 7])
    cond = make("resnet32", num_classes=10).eval()
    randomize_conditioning(cond)
    with torch.no_grad():
        assert not torch.allclose(cond(x, y1), cond(x, y2))
        with pytest.raises(ValueError, match="labels"):
            cond(x)
    uncond = make("resnet32").eval()
    randomize_conditioning(uncond)
    with torch.no_grad():
        e = uncond(x)
        torch.testing.assert_close(uncond(x, y1), e)
        torch.testing.assert_close(uncond(x, y2), e)


def test_bf16_channels_last():
    torch.manual_seed(0)
    model = make("resnet32", num_classes=10)
    randomize_conditioning(model)
    x = torch.rand(4, 3, 32, 32).to(memory_format=torch.channels_last)
    y = torch.tensor([0, 3, 5, 9])
    e32 = model.eval()(x, y)
    model = model.to(torch.bfloat16).train()
    xb = x.to(torch.bfloat16).requires_grad_()
    e = model(xb, y)
    assert e.dtype == torch.float32 and e.shape == (4,) and torch.isfinite(e).all()  # the head runs in fp32
    e.sum().backward()
    assert xb.grad.dtype == torch.bfloat16 and torch.isfinite(xb.grad).all()
    assert all(p.grad is not None for p in model.parameters())
    torch.testing.assert_close(e.float(), e32, atol=0.1, rtol=0.1)


@pytest.mark.parametrize("sn", [True, False])
def test_spectral_norm(sn):
    model = make("resnet32", num_classes=10, spectral_norm=sn)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 1 + 2 * 6 + 1  # stem, two per block, the one 1x1 shortcut (8 -> 16)
    assert all(parametrize.is_parametrized(c, "weight") == sn for c in convs)
    assert not parametrize.is_parametrized(model.fc)
    if sn:
        with torch.no_grad():
            for _ in range(20):  # power iteration runs once per training-mode forward
                model(torch.rand(1, 3, 32, 32), torch.tensor([0]))
        sigma = torch.linalg.matrix_norm(model.blocks[0].conv1.weight.flatten(1), ord=2)
        assert abs(sigma.item() - 1) < 0.05


def test_resnet128_at_128():
    model = make("resnet128", filters=4, num_classes=5)
    x = torch.rand(2, 3, 128, 128).to(memory_format=torch.channels_last)
    e = model(x, torch.tensor([0, 4]))
    assert e.shape == (2,) and torch.isfinite(e).all()


def test_build_from_config_file():
    cfg = load_config("configs/digits.yaml", ["model.scales=1"])  # the demo itself has two scales
    model = build_model(cfg.model)
    assert isinstance(model, EnergyModel)
    x = torch.rand(3, cfg.model.in_channels, cfg.model.resolution, cfg.model.resolution)
    assert model(x, torch.tensor([0, 5, 9])).shape == (3,)


def test_bad_arch_and_resolution():
    with pytest.raises(ValueError, match="unknown arch"):
        make("resnet50", resolution=32)
    with pytest.raises(ValueError, match="multiple of 32"):
        make("resnet128", resolution=48)


@pytest.mark.parametrize("recipe", ["paper", "ebmscale"])
def test_a_1_512_input_perturbation_changes_the_bf16_energy(recipe):
    """bf16's spacing on [0.5, 1) is 1/256: cast, x + 1/512 rounds back to x (ties to even). The stem reads the
    fp32 input, so the energy - in bf16, through the sampler's path - still sees it."""
    from ebmscale.sampling import frozen, model_energy
    torch.manual_seed(0)
    cfg = load_config(CONFIG_DIR / "cifar10.yaml", [f"recipe={recipe}", "model.filters=8"])
    model = build_model(cfg.model).to(torch.bfloat16)
    x = 0.5 + 2 * torch.randint(0, 64, (4, 3, 32, 32)) / 256  # bf16-exact, even last mantissa bit
    x_plus = x + 1 / 512
    assert torch.equal(x.to(torch.bfloat16), x_plus.to(torch.bfloat16))  # what the old input cast did
    y = torch.tensor([0, 3, 5, 9])
    with frozen(model, channels_last=True) as m:
        energy = model_energy(m, y, torch.bfloat16, channels_last=True)
        e, e_plus = energy(x), energy(x_plus)
        assert torch.equal(energy(x), e)  # deterministic: the difference below is the input's
        assert (e != e_plus).all(), (e, e_plus)
        (g,) = torch.autograd.grad(energy(x.requires_grad_()).sum(), x)
        assert g.dtype == torch.float32
