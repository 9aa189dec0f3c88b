"""The `paper` recipe against openai/ebm_code_release, tensor by tensor (models.py construct_weights/forward,
utils.py init_res_weight/smart_res_block/conv_block/spectral_normed_weight, train.py)."""
import pytest
import torch
import torch.nn as nn
from omegaconf import OmegaConf
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _SpectralNorm

from ebmscale.buffer import ReplayBuffer
from ebmscale.config import CONFIG_DIR, load_config
from ebmscale.models import build_model, count_parameters
from ebmscale.models.resnet import _CappedSpectralNorm, set_dropout
from ebmscale.sampling import frozen, model_energy

# Transcribed from the release's models.py: the stem c1_pre (in, out), then each residual block its forward
# calls as (scope, c_in, c_out, adaptive shortcut used), the class count of its conditioning tables (0: the
# classes=1 vectors of an unconditional net) and the trainable parameters its forward uses, as the issue counts.
RELEASE = {
    "cifar10": ("resnet32", (3, 128), 10, 5_350_529, [  # ResNet32(num_filters=128), train.py 553
        ("res_optim", 128, 128, False), ("res_1", 128, 128, False), ("res_2", 128, 256, True),
        ("res_3", 256, 256, False), ("res_4", 256, 256, False), ("res_5", 256, 256, False)]),
    "cifar10_uncond": ("resnet32large", (3, 128), 0, 18_591_105, [  # ResNet32Large(128, train=True), train.py 540
        ("res_optim", 128, 128, False), ("res_1", 128, 128, False), ("res_2", 128, 128, False),
        ("res_3", 128, 256, True), ("res_4", 256, 256, False), ("res_5", 256, 256, False),
        ("res_6", 256, 512, True), ("res_7", 512, 512, False), ("res_8", 512, 512, False)]),
    "imagenet32": ("resnet32wider", (3, 128), 1000, 89_559_681, [  # ResNet32Wider(num_filters=256), train.py 570
        ("res_optim", 128, 256, True), ("res_1", 256, 256, False), ("res_2", 256, 256, False),
        ("res_3", 256, 512, True), ("res_4", 512, 512, False), ("res_5", 512, 512, False),
        ("res_6", 512, 1024, True), ("res_7", 1024, 1024, False), ("res_8", 1024, 1024, False)]),
    "imagenet128": ("resnet128", (3, 64), 1000, 21_212_289, [  # ResNet128(num_filters=64), train.py 581
        ("res_optim", 64, 64, False), ("res_3", 64, 128, True), ("res_5", 128, 256, True),
        ("res_7", 256, 512, True), ("res_9", 512, 512, False), ("res_10", 512, 512, False)]),
}


def release_tensors(stem, classes, blocks):
    """{release name: its shape} for every variable the release's forward reads (TF layouts)."""
    table = lambda c: [classes, c] if classes else [c]
    out = {"c1_pre/c": [3, 3, *stem]}  # conv_block: no bias (use_bias=False), no label, no scale
    for scope, cin, cout, adaptive in blocks:
        out[f"{scope}_res_c1/c"] = [3, 3, cin, cout]
        out[f"{scope}_res_c1/gb"] = table(cin)  # extra_bias on conv1's input; its g, cb unused (use_scale=False)
        out[f"{scope}_res_c2/c"] = [3, 3, cout, cout]
        out[f"{scope}_res_c2/gb"] = table(cout)
        out[f"{scope}_res_c2/g"] = table(cout)  # use_scale=True
        if classes:
            out[f"{scope}_res_c2/cb"] = [cout]  # added to g[label] only when there is a label
        if adaptive:
            out[f"{scope}_res_adaptive/c"] = [3, 3, cin, cout]  # 3x3, no bias, no scale
    c = blocks[-1][2]
    out.update({"fc5/w": [c, 1], "fc5/b": [1]})
    return out


def as_ours(name, shape, block_index):
    """(our parameter name, the shape that must equal ours) for one release variable."""
    scope, var = name.split("/")
    if scope == "c1_pre":
        return "stem.parametrizations.weight.original", [shape[3], shape[2], shape[0], shape[1]]
    if scope == "fc5":
        return ("fc.weight", [1, shape[0]]) if var == "w" else ("fc.bias", shape)
    block, conv = scope.split("_res_")
    b = f"blocks.{block_index[block]}"
    if var == "c":
        layer = {"c1": "conv1", "c2": "conv2", "adaptive": "shortcut"}[conv]
        return f"{b}.{layer}.parametrizations.weight.original", [shape[3], shape[2], shape[0], shape[1]]
    tables = {("c1", "gb"): "bias1.weight", ("c2", "gb"): "bias2.weight", ("c2", "g"): "gain2.weight",
              ("c2", "cb"): "gain2_bias"}
    ours = f"{b}.{tables[conv, var]}"
    return ours, shape if len(shape) == 2 or var == "cb" else [1, *shape]  # classes=1 vectors: one table row


def paper_model(config, *overrides, meta=True):
    cfg = load_config(CONFIG_DIR / f"{config}.yaml", list(overrides))
    with torch.device("meta" if meta else "cpu"):
        return build_model(cfg.model), cfg


def liven(model):
    """The release's conv2 starts at ~1e-10, so its residual branches do nothing yet: give them weight."""
    with torch.no_grad():
        for b in model.blocks:
            b.conv2.parametrizations.weight.original.normal_()
            b.bias2.weight.normal_()
    return model


@pytest.mark.parametrize("config", list(RELEASE))
def test_paper_nets_hold_exactly_the_release_tensors(config):
    arch, stem, classes, count, blocks = RELEASE[config]
    model, cfg = paper_model(config)
    assert cfg.recipe == "paper" and cfg.model.arch == arch and cfg.model.num_classes == classes
    expected = {}
    for name, shape in release_tensors(stem, classes, blocks).items():
        ours, want = as_ours(name, shape, {scope: i for i, (scope, *_) in enumerate(blocks)})
        expected[ours] = want
    have = {n: list(p.shape) for n, p in model.named_parameters() if p.requires_grad}
    assert have == expected
    assert sum(torch.Size(s).numel() for s in expected.values()) == count == count_parameters(model)


def test_ebmscale_recipe_keeps_todays_nets():
    assert count_parameters(paper_model("cifar10", "recipe=ebmscale")[0]) == 5_090_055
    assert count_parameters(paper_model("imagenet128", "recipe=ebmscale")[0]) == 19_838_983


def test_spectral_norm_on_the_release_layers_with_its_bounds():
    model, _ = paper_model("cifar10", "model.filters=8", meta=False)
    kinds = {n.rsplit(".parametrizations", 1)[0]: type(m.parametrizations.weight[0])
             for n, m in model.named_modules() if parametrize.is_parametrized(m)}
    assert kinds.pop("stem") is _SpectralNorm and "fc" not in kinds  # fc5: spec_norm=False
    for name, kind in kinds.items():  # conv1, shortcut: W / sigma; conv2: W / max(sigma, 1) (lower_bound)
        assert kind is (_CappedSpectralNorm if name.endswith("conv2") else _SpectralNorm), name
    assert len(kinds) == 6 * 2 + 1
    conv2 = model.blocks[1].conv2
    assert conv2.weight.std() < 1e-8  # N(0, 1e-10), not normalised up to sigma 1
    big = nn.Conv2d(4, 4, 3)
    with torch.no_grad():
        big.weight.mul_(100)
    parametrize.register_parametrization(big, "weight", _CappedSpectralNorm(big.weight, n_power_iterations=30))
    assert abs(torch.linalg.matrix_norm(big.weight.flatten(1), 2) - 1) < 1e-3  # sigma > 1: capped at 1


def test_paper_residual_blocks_start_as_the_shortcut():
    model, _ = paper_model("cifar10", "model.filters=8", meta=False)
    model.eval()
    block, x, y = model.blocks[1], torch.randn(2, 8, 16, 16), torch.tensor([3, 4])
    assert block.res_scale is None
    assert torch.allclose(block(x, y), block.act(x), atol=1e-6)  # no downsample, identity shortcut


@pytest.mark.parametrize("config, overrides, pool", [
    ("cifar10", [], nn.ReLU),  # models.py 254
    ("cifar10_uncond", [], nn.ReLU),  # 342
    ("cifar10_uncond", ["model.num_classes=10"], nn.LeakyReLU),  # 340: leaky when conditional
    ("imagenet32", [], nn.ReLU),  # 438
    ("imagenet128", [], nn.SiLU),  # 614: swish_act
    ("cifar10", ["recipe=ebmscale"], nn.LeakyReLU),
])
def test_activation_before_the_pool_is_the_releases(config, overrides, pool):
    model, _ = paper_model(config, "model.filters=8", *overrides, meta=False)
    assert type(model.pool_act) is pool
    if pool is nn.ReLU:  # every feature summed into fc5 is >= 0; ebmscale's leaky-relu lets negatives through
        seen = []
        model.pool_act.register_forward_hook(lambda m, a, out: seen.append(out))
        res = model.resolution
        y = torch.arange(4) % max(model.num_classes, 1)
        with torch.no_grad():
            liven(model)(torch.rand(4, 3, res, res), y)
        assert seen[0].min() >= 0


def test_swish_nets_keep_a_leaky_relu_first_block():
    model, _ = paper_model("imagenet128", "model.filters=8", meta=False)
    assert type(model.act) is nn.SiLU and type(model.blocks[0].act) is nn.LeakyReLU
    assert all(type(b.act) is nn.SiLU for b in model.blocks[1:])
    ours, _ = paper_model("imagenet128", "model.filters=8", "recipe=ebmscale", meta=False)
    assert type(ours.blocks[0].act) is nn.SiLU


def test_resnet32large_dropout_is_on_in_langevin_under_paper():
    torch.manual_seed(0)
    model, cfg = paper_model("cifar10_uncond", "model.filters=8", meta=False)
    liven(model)
    assert cfg.model.dropout == 0.5
    x = torch.rand(2, 3, 32, 32)
    with frozen(model) as m:  # the sampler's context: eval mode, frozen weights
        assert not m.training
        energy = model_energy(m, None, torch.float32)
        assert not torch.equal(energy(x), energy(x))  # a fresh dropout mask at every Langevin step
        set_dropout(m, False)  # evaluation
        assert torch.equal(energy(x), energy(x))
    plain, cfg = paper_model("cifar10_uncond", "model.filters=8", "recipe=ebmscale", meta=False)
    assert cfg.model.dropout == 0.0
    with frozen(plain) as m:
        energy = model_energy(m, None, torch.float32)
        assert torch.equal(energy(x), energy(x))
    assert paper_model("cifar10", "model.filters=8")[1].model.dropout == 0.0  # ResNet32 has none


@pytest.mark.parametrize("config", list(RELEASE))
def test_no_augmentation_under_paper(config):
    d = load_config(CONFIG_DIR / f"{config}.yaml").data
    assert not d.flip and not d.random_resized_crop
    # an explicit key still beats the recipe
    assert load_config(CONFIG_DIR / f"{config}.yaml", ["data.flip=true"]).data.flip


def test_explicit_keys_beat_the_recipe_and_digits_is_icd_on_ebmscale_choices():
    cfg = load_config(CONFIG_DIR / "cifar10.yaml", ["model.shortcut_kernel=1", "buffer.labels=stored"])
    assert (cfg.model.shortcut_kernel, cfg.buffer.labels, cfg.model.conv_bias) == (1, "stored", False)
    assert (cfg.model.init, cfg.train.precision, cfg.train.tf32, cfg.guard.enabled) == ("release", "fp32", False, False)
    mine = load_config(CONFIG_DIR / "cifar10.yaml", ["train.precision=bf16", "train.tf32=true", "guard.enabled=true",
                                                     "model.init=torch"])
    assert (mine.model.init, mine.train.precision, mine.train.tf32, mine.guard.enabled) == ("torch", "bf16", True, True)
    digits = load_config(CONFIG_DIR / "digits.yaml")
    assert digits.recipe == "icd" and digits.model.residual == "scaled" and digits.buffer.labels == "stored"
    assert (digits.model.init, digits.train.precision, digits.guard.enabled) == ("torch", "fp32", True)  # fp32: its own


def test_conditional_chains_take_the_batch_labels_under_paper(tmp_path):
    from ebmscale.train.trainer import Trainer
    torch.manual_seed(0)
    cfg = load_config(CONFIG_DIR / "cifar10.yaml", ["model.filters=8", "sampler.steps=1", "data.batch_size=8",
                                                    "buffer.capacity=8", "tracking.enabled=false",
                                                    "train.precision=fp32", "buffer.fresh_fraction=0.5"])
    model = build_model(cfg.model)
    engine = type("Engine", (), {"module": model, "device": torch.device("cpu")})()
    for recipe_labels, expect_batch in (("batch", True), ("stored", False)):
        cfg.buffer.labels = recipe_labels
        buffer = ReplayBuffer(8, (3, 32, 32), num_classes=10)
        buffer.push(torch.rand(8, 3, 32, 32), torch.full((8,), 9))  # full: every chain is reused or fresh
        trainer = Trainer(cfg, engine, buffer, None, None, None, 0, 1, tmp_path)
        y_pos = torch.arange(8) % 3
        _, y_neg, fresh, *_ = trainer.sample_negatives(8, None, y_pos)
        if expect_batch:
            assert torch.equal(y_neg, y_pos)  # train.py 252-256: LABEL fed the data batch's labels
        else:
            assert torch.equal(y_neg[~fresh], torch.full((int((~fresh).sum()),), 9))  # the stored labels
            assert not torch.equal(y_neg, y_pos)


def test_release_buffer_codec_shrinks_and_ours_does_not():
    x = torch.full((4000, 1, 1, 1), 0.75)
    for codec, mean in (("release", (191 + 0.5) / 256), ("unbiased", (192 + 0.5) / 256)):  # floor(255 x), floor(256 x)
        b = ReplayBuffer(4000, (1, 1, 1), codec=codec)
        b.push(x)
        got = b.sample(4000)[0].mean().item()
        assert abs(got - mean) < 2e-4, (codec, got)
    assert load_config(CONFIG_DIR / "cifar10.yaml").buffer.codec == "release"


@pytest.mark.parametrize("override, words", [("recipe=cd", "paper, ebmscale, icd"), ("model.residual=zero", "release, scaled"),
                                              ("buffer.labels=random", "batch, stored"), ("model.shortcut_kernel=5", "1, 3")])
def test_bad_recipe_values_name_the_key(override, words):
    from ebmscale.config import ConfigError
    with pytest.raises(ConfigError) as e:
        load_config(CONFIG_DIR / "cifar10.yaml", [override])
    assert override.split("=")[0] in str(e.value) and words in str(e.value)


def test_recipe_icd_is_ebmscale_plus_the_icd_terms():
    from ebmscale.config import icd_active, recipe_choices
    icd = load_config(CONFIG_DIR / "cifar10.yaml", ["recipe=icd"])
    plain = load_config(CONFIG_DIR / "cifar10.yaml", ["recipe=ebmscale"])
    assert icd_active(icd) and not icd_active(plain)
    assert {k: OmegaConf.select(icd, k) for k in recipe_choices("ebmscale", icd.model)} == \
        recipe_choices("ebmscale", plain.model)
    on_paper = load_config(CONFIG_DIR / "cifar10.yaml", ["icd.enabled=true"])  # the terms on top of another recipe
    assert icd_active(on_paper) and on_paper.model.shortcut_kernel == 3


def test_a_run_written_before_recipes_reloads_as_ebmscale(tmp_path):
    from omegaconf import OmegaConf
    from ebmscale.config import from_yaml_file
    cfg = OmegaConf.to_container(load_config(CONFIG_DIR / "digits.yaml"))
    for section, keys in (("model", ("shortcut_kernel", "conv_bias", "pool_activation", "first_block_activation",
                                     "dropout", "residual", "class_gain_bias")), ("buffer", ("labels", "codec")),
                          ("optim", ("official_clip",))):
        for k in keys:
            del cfg[section][k]
    del cfg["recipe"]
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    old = from_yaml_file(tmp_path / "config.yaml")
    assert (old.recipe, old.model.residual, old.model.shortcut_kernel, old.buffer.labels) == ("ebmscale", "scaled", 1, "stored")
