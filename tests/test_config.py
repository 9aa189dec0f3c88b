import pytest

from ebmscale.config import CONFIG_DIR, ConfigError, flatten, load_config


def test_merge_order_base_experiment_overrides():
    cfg = load_config(CONFIG_DIR / "digits.yaml", ["train.steps=7", "sampler.noise=0.01"])
    assert cfg.model.in_channels == 1  # experiment
    assert cfg.optim.beta1 == 0.0 and cfg.optim.lr == 3e-4  # base
    assert cfg.train.steps == 7 and cfg.sampler.noise == 0.01  # overrides win
    assert flatten(cfg)["model.arch"] == "resnet32"


@pytest.mark.parametrize("name", ["digits", "cifar10", "cifar10_uncond", "imagenet32", "imagenet128"])
def test_shipped_configs_load(name):
    cfg = load_config(CONFIG_DIR / f"{name}.yaml")
    assert cfg.train.steps > 0


def test_official_hyper_parameters():
    c, i = load_config(CONFIG_DIR / "cifar10.yaml"), load_config(CONFIG_DIR / "imagenet128.yaml")
    assert (c.model.arch, c.sampler.steps, c.sampler.step_size, c.sampler.grad_clip, c.data.batch_size) == \
        ("resnet32", 60, 10.0, 0.01, 128)
    assert (i.model.arch, i.sampler.steps, i.sampler.step_size, i.sampler.grad_clip, i.model.activation,
            i.model.num_classes, i.data.batch_size) == ("resnet128", 50, 100.0, None, "swish", 1000, 16)
    assert load_config(CONFIG_DIR / "imagenet32.yaml").model.arch == "resnet32wider"
    assert load_config(CONFIG_DIR / "cifar10_uncond.yaml").model.arch == "resnet32large"
    assert c.buffer.capacity == 10000 and c.buffer.fresh_fraction == 0.05 and c.train.alpha == 1.0


@pytest.mark.parametrize("override, key, words", [
    ("model.archh=resnet32", "model.archh", "allowed keys"),
    ("nope.x=1", "nope", "allowed keys"),
    ("train.steps=many", "train.steps", "train.steps"),
    ("train.steps=-5", "train.steps", "> 0"),
    ("model.arch=resnet9000", "model.arch", "resnet32, resnet32large, resnet32wider, resnet128"),
    ("buffer.capacity=4", "buffer.capacity", "at least one batch"),
    ("train.precision=fp8", "train.precision", "fp32, bf16, fp16"),
    ("model.activation=tanh", "model.activation", "leaky_relu, swish"),
    ("model.resolution=20", "model.resolution", "multiple of 8"),
    ("sampler.step_size=0", "sampler.step_size", "> 0"),
    ("buffer.fresh_fraction=1.5", "buffer.fresh_fraction", "[0, 1]"),
    ("train.zero_stage=4", "train.zero_stage", "0, 1, 2 or 3"),
    ("buffer.dtype=int4", "buffer.dtype", "uint8, fp16"),
    ("checkpoint.keep_last=0", "checkpoint.keep_last", ">= 1"),
    ("launcher.nodes=0", "launcher.nodes", ">= 1"),
    ("train.steps", "train.steps", "key=value"),
])
def test_validation_errors_name_the_key(override, key, words):
    with pytest.raises(ConfigError) as e:
        load_config(CONFIG_DIR / "digits.yaml", [override])
    assert key in str(e.value) and words in str(e.value)


def test_missing_file_and_required_key(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "x.yaml").write_text("model:\n  arch: resnet32\n")
    with pytest.raises(ConfigError, match="data.shards"):
        load_config(tmp_path / "x.yaml")


def test_unknown_key_in_file(tmp_path):
    (tmp_path / "x.yaml").write_text("sampler:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match=r"x.yaml.*sampler.stepz.*steps"):
        load_config(tmp_path / "x.yaml")


def test_config_by_name_or_path_and_star_import():
    from ebmscale.config import CONFIG_DIR, config_path
    assert config_path("digits") == config_path("digits.yaml") == CONFIG_DIR / "digits.yaml"
    assert load_config("digits").model.resolution == 16
    with pytest.raises(ConfigError, match=r"name of a shipped config \(cifar10, .*digits"):
        load_config("digitz")
    exec("from ebmscale.config import *", {})  # every name in __all__ exists


def test_one_list_of_architectures():
    from ebmscale.models.resnet import ARCH_BLOCKS
    with pytest.raises(ConfigError, match="model.arch: unknown architecture 'vgg'; allowed: " + ", ".join(ARCH_BLOCKS)):
        load_config("digits", ["model.arch=vgg"])
