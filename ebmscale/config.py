"""The config schema: one typed section per component, merged base.yaml -> experiment -> overrides.

Every error raised here is a `ConfigError` naming the key and what would be accepted, so a bad
config fails in seconds on the login node rather than after a queue wait.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException



def shipped_dir(checkout: str, installed: str) -> Path:
    """A folder shipped with ebmscale: top-level in a checkout (configs/, slurm/profiles/), inside the package when
    installed non-editable (pyproject.toml maps them to ebmscale/configs, ebmscale/profiles)."""
    here = Path(__file__).resolve().parent
    return here / installed if (here / installed).is_dir() else here.parent / checkout


CONFIG_DIR = shipped_dir("configs", "configs")
ARCHS = ("resnet32", "resnet32large", "resnet32wider", "resnet128")  # their block tables: models/resnet.py
ACTIVATIONS = ("leaky_relu", "swish")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # auto: resolved per run by ebmscale/precision.py
BUFFER_DTYPES = ("uint8", "fp16")
RECIPES = ("paper", "ebmscale", "icd")
RESIDUALS = ("release", "scaled")
INITS = ("release", "torch")
CHAIN_LABELS = ("batch", "stored")
BUFFER_CODECS = ("release", "unbiased")


class ConfigError(ValueError):
    """A config that cannot run; the message names the key and the fix."""


@dataclass
class RunConfig:
    dir: Optional[str] = None  # default: runs/<name>
    name: str = "ebm"
    overwrite: bool = False  # start fresh in a run folder that already holds checkpoints
    seed: int = 0


@dataclass
class ModelConfig:
    arch: str = "resnet32"
    filters: int = 128
    in_channels: int = 3
    resolution: int = 32
    num_classes: int = 0  # 0 = unconditional
    activation: str = "leaky_relu"
    spectral_norm: bool = True
    # null = as the `recipe` says (recipe_choices below); a value given here beats the recipe
    shortcut_kernel: Optional[int] = None  # the channel-changing shortcut conv: 3 (release) or 1
    conv_bias: Optional[bool] = None  # additive bias in the convolutions (the release has none)
    pool_activation: Optional[str] = None  # applied before the global sum pool (release: relu for most nets)
    first_block_activation: Optional[str] = None  # the first residual block's (release: leaky_relu even under swish)
    dropout: Optional[float] = None  # on conv1's output in every block, training and Langevin (release: 0.5 in ResNet32Large)
    residual: Optional[str] = None  # release: conv2 ~ N(0, 1e-10), sigma capped at 1 | scaled: learned scale from 1
    class_gain_bias: Optional[bool] = None  # conditional nets: a per-channel `cb` added to conv2's class gain
    init: Optional[str] = None  # initial raw weights: release (spectral-normed N(0, 1), fc xavier, zero bias) | torch
    scale_loss: str = "mean"  # scales > 1: mean (ICD release: CD/KL over the mean of the scales, L2 of each) | sum
    scales: int = 1  # >1: a multi-scale energy (models/multiscale.py), one net per resolution 1, 1/2, 1/4, ... summed


@dataclass
class SamplerConfig:
    steps: int = 60
    step_size: float = 10.0
    noise: float = 0.005
    grad_clip: Optional[float] = 0.01  # per-element clamp of dE/dx; null = none
    # speed switches, measured by tools/bench.py langevin (ebmscale/bench/README.md); neither changes the maths
    compile: bool = False  # torch.compile the energy and its input-gradient (CPU: slower, and a minute to compile)
    channels_last: bool = True  # NHWC input and cached weights for the convolutions (CPU bf16: 1.2x)


@dataclass
class BufferConfig:
    capacity: int = 10000  # per rank
    fresh_fraction: float = 0.05
    dtype: str = "uint8"
    labels: Optional[str] = None  # conditional chains' labels: batch (the data batch's, release) | stored (kept with each sample)
    codec: Optional[str] = None  # uint8 storage: release (floor(255x), decode +U/256: shrinks by 255/256) | unbiased (floor(256x))


@dataclass
class DataConfig:
    shards: str = "???"  # brace pattern, list file, or manifest.json; several joined by '::'
    weights: Optional[List[float]] = None  # share of each '::' source when resampling; null = by sample count
    batch_size: int = 128  # per rank
    workers: int = 2
    shuffle_buffer: int = 1000
    resampled: bool = True
    flip: bool = False
    random_resized_crop: bool = False
    dequantize: bool = True
    max_bad_fraction: float = 0.01
    max_image_pixels: int = 1 << 26  # a bigger image (checked in its header, before decoding) is a bad sample
    max_member_bytes: int = 1 << 26  # a bigger tar member is skipped unread and its sample counted bad
    loader_timeout_s: float = 600.0  # a loader worker silent this long fails the run, naming the rank (0 = wait forever)
    verify: bool = False  # check each shard's sha256 against its manifest.json when the run starts
    allow_pickle: bool = False
    allow_pipe: bool = False
    pin_memory: bool = True
    prefetch: int = 2


@dataclass
class OptimConfig:
    lr: float = 3e-4
    beta1: float = 0.0
    beta2: float = 0.999
    weight_decay: float = 0.0
    official_clip: Optional[bool] = None  # per-element clip of g to 3*sqrt(v_hat)+0.1, as the IGEBM release
    grad_clip: float = 0.0  # global-norm clip through DeepSpeed; 0 = off


@dataclass
class TrainConfig:
    steps: int = 100000
    alpha: float = 1.0
    # auto: bf16 where the hardware computes it natively (GPU compute capability >= 8.0, CPU with avx512_bf16/AMX),
    # fp16 on older GPUs, fp32 on other CPUs; resolved once per run (ebmscale/precision.py)
    precision: Optional[str] = None  # null = as the `recipe` says: paper fp32 (the release), else auto
    tf32: Optional[bool] = None  # fp32 convs/matmuls on Ampere+ GPUs may use TF32; null = recipe (paper: false)
    zero_stage: int = 2
    log_every: int = 10
    sample_every: int = 500  # sample grid PNG (and MLflow image)
    # GPU speed switches, off until measured on a GPU (issue 18): cuDNN's autotuner for the fixed shapes of
    # sampling and update; NHWC input for the update's forward/backward as the sampler already uses
    cudnn_benchmark: bool = False
    channels_last_update: bool = False
    grad_reduce_fp32: bool = True  # bf16: all-reduce / reduce-scatter gradients in fp32 (DeepSpeed communication_data_type)
    collective_timeout_s: float = 600.0  # a collective waits this long for a peer, then the job fails (not hangs)
    threads: int = 0  # torch intra-op threads per rank on CPU; 0 = this rank's share of the usable cores, less its loader workers
    # ZeRO-3: parameters below this many elements stay whole on every rank; null = DeepSpeed's default (1e5). The
    # model reads every parameter inside its module's call, so any value works, 0 included (tests/test_zero3.py)
    zero3_persistence_threshold: Optional[int] = None
    # bit-exact CUDA runs: cudnn.deterministic, no cuDNN autotuner, TF32 off, torch.use_deterministic_algorithms
    # (slower; resume is bit-exact on CPU without it, on CUDA only with it; docs/gpu.md)
    deterministic: bool = False


@dataclass
class CheckpointConfig:
    every: int = 1000
    keep_last: int = 3
    keep_every: int = 0  # also keep every M-th step forever; 0 = off
    resume: str = "auto"  # auto | never | path to a checkpoint folder
    async_buffer: bool = True
    trust_pickles: bool = False  # load checkpoint files that need more than tensors (could run code): only your own
    universal_timeout_s: float = 3600.0  # ranks > 0 wait this long for rank 0's universal conversion (new world size)


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: Optional[str] = None  # default: sqlite:///<run parent>/mlflow.db
    experiment: str = "ebmscale"
    run_name: Optional[str] = None
    chain_gif_every: int = 2000
    system_metrics: bool = True  # per node CPU/memory/disk/network/GPU (psutil, pynvml) as system/<host>/* at log steps
    retry_s: float = 30.0  # while the store is down, retry the spooled backlog at most this often
    flush_timeout_s: float = 60.0  # finish() waits this long for the backlog; the rest stays in run_dir/tracking_spool
    upload_checkpoints: bool = False  # record_checkpoint also uploads the (committed) checkpoint as an artifact
    spool_max_mb: int = 10240  # cap of the local spool while the store is down: images and artifacts are dropped


GUARD_SIGNALS = ("nonfinite", "energy", "gap", "grad_spike", "collapse")
GUARD_RESPONSES = ("warn", "skip", "rollback", "stop")  # in rising severity
REMEDY_KEYS = {"lr": "optim.lr", "alpha": "train.alpha", "sampler.steps": "sampler.steps",
               "sampler.step_size": "sampler.step_size", "sampler.noise": "sampler.noise"}


def parse_remedy(text: str) -> tuple[str, str, float]:
    """'lr*0.5' -> ('optim.lr', '*', 0.5); operators * + =; keys: the REMEDY_KEYS (alpha = the L2 coefficient)."""
    m = re.fullmatch(r"\s*([a-z_.]+)\s*([*+=])\s*([-+0-9.eE]+)\s*", str(text))
    key = m and {**REMEDY_KEYS, **{v: v for v in REMEDY_KEYS.values()}}.get(m.group(1))
    try:
        value = float(m.group(3)) if key else None
    except ValueError:
        value = None
    if value is None:
        raise ValueError(f"remedy '{text}' is not KEY*FACTOR, KEY+DELTA or KEY=VALUE with KEY one of "
                         f"{', '.join(REMEDY_KEYS)} (e.g. lr*0.5, sampler.steps+20, alpha*2)")
    return key, m.group(2), value


@dataclass
class GuardConfig:
    """The stability guard (ebmscale/train/guard.py): per-step signals and what to do when one fires."""
    enabled: Optional[bool] = None  # null = as the `recipe` says: off under paper (the release has none), else on
    max_energy: float = 100.0  # |mean E+| or |mean E-| over all ranks above this: signal `energy`; 0 = off
    max_gap: float = 100.0  # |mean E+ - mean E-| above this: signal `gap`; 0 = off
    grad_spike: float = 10.0  # global grad norm above this x the running median: signal `grad_spike`; 0 = off
    grad_window: int = 50  # steps in the running median (checked once 10 steps are in)
    min_neg_std: float = 1e-3  # negatives' pixel std (across the batch, within images) below this: `collapse`
    max_saturated: float = 0.995  # share of negative pixels at exactly 0 or 1 above this: `collapse`
    on_nonfinite: str = "skip"  # warn | skip | rollback | stop, for each signal
    on_energy: str = "rollback"
    on_gap: str = "rollback"
    on_grad_spike: str = "skip"
    on_collapse: str = "rollback"
    max_skips: int = 3  # this many skipped steps in a row escalate to a rollback
    max_rollbacks: int = 3  # one more stops the run (FAILED, with the reason)
    remedies: List[str] = field(default_factory=lambda: ["lr*0.5", "sampler.steps*2", "alpha*2"])  # one per rollback, in order; the last repeats
    clean_steps: int = 10  # a checkpoint is healthy if no signal fired in the clean_steps before it nor the step after
    initial_checkpoint: bool = False  # also save before the first step: somewhere to go if the first updates diverge


@dataclass
class ICDConfig:
    """Improved contrastive divergence (Du, Li, Tenenbaum & Mordatch 2021; ebmscale/train/icd.py). The release's
    value is the default unless docs/recipes.md's ICD table says otherwise."""
    enabled: bool = False  # the ICD recipe: KL + entropy terms, augmentation transitions, reservoir buffer
    kl_coeff: float = 1.0  # weight of the KL term: E(final samples) under the frozen model, through the sampler
    kl_steps: int = 1  # the sampler's last K steps the KL gradient flows through (release: 1; `all_step` = all)
    entropy_coeff: float = 0.3  # weight of the nearest-neighbour entropy term (release: 0.3); 0 = off
    entropy_bank: int = 1000  # per rank: the most recent final samples the entropy is estimated against
    entropy_compare: int = 100  # bank rows drawn per step to measure nearest-neighbour distances to (release: 100)
    reservoir: bool = True  # replay buffer keeps a uniform sample of every chain ever pushed (reservoir sampling)
    augment: bool = True  # an augmentation transition on every chain restarted from the buffer
    crop_scale: float = 0.08  # random resized crop: least area kept (release cifar10: 0.08); 1 = no crop
    flip: bool = True  # random horizontal flip (off for digits: a mirrored digit is another symbol)
    color_jitter: float = 1.0  # strength s: brightness/contrast/saturation 0.8s, hue 0.4s, applied with p 0.8; 0 = off
    grayscale: float = 0.2  # probability of a grayscale transition (3-channel images only)


@dataclass
class LauncherConfig:
    profile: Optional[str] = None
    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int = 1  # CPU-only nodes
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    time_min: int = 60 * 24
    cpus_per_task: int = 8
    mem_gb: Optional[int] = None
    signal_delay_s: int = 120
    max_requeues: int = 50
    additional_parameters: Dict[str, Any] = field(default_factory=dict)
    setup: List[str] = field(default_factory=list)
    entry: str = "ebmscale.train.main:main"  # module:function the job calls with the config


@dataclass
class Config:
    recipe: str = "ebmscale"  # paper | ebmscale | icd: fills every null choice key (recipe_choices); explicit keys win
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    buffer: BufferConfig = field(default_factory=BufferConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    icd: ICDConfig = field(default_factory=ICDConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)


def _allowed_keys(node: Any, key: str) -> str:
    parent = key.rsplit(".", 1)[0] if "." in key else ""
    try:
        sub = OmegaConf.select(OmegaConf.structured(Config), parent) if parent else OmegaConf.structured(Config)
        return ", ".join(sorted(sub.keys()))
    except Exception:
        return ""


def _merge(base: DictConfig, other: Any, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except (OmegaConfBaseException, TypeError, ValueError) as e:  # omegaconf raises a bare TypeError for {} into a list
        key = getattr(e, "full_key", None) or "?"
        msg = str(e).splitlines()[0]
        hint = ""
        if "not in" in msg or "Key" in msg and "not" in msg:
            allowed = _allowed_keys(base, key)
            hint = f"; allowed keys here: {allowed}" if allowed else ""
        raise ConfigError(f"{source}: bad key '{key}': {msg}{hint}") from None


def load_config(path: Optional[str | Path] = None, overrides: List[str] = ()) -> DictConfig:
    """base.yaml -> experiment yaml -> `key=value` overrides, validated. Returns a typed DictConfig."""
    cfg = OmegaConf.structured(Config)
    base = CONFIG_DIR / "base.yaml"
    if base.exists():
        cfg = _merge(cfg, OmegaConf.load(base), str(base))
    if path is not None:
        cfg = merge_file(cfg, path)
    cfg = merge_overrides(cfg, overrides)
    try:
        resolve_recipe(cfg)
        validate(cfg)
    except OmegaConfBaseException as e:  # e.g. an interpolation ${...} that names no key
        key = getattr(e, "full_key", None) or "?"
        raise ConfigError(f"{key}: {str(e).splitlines()[0]}") from None
    return cfg


def config_path(name: str | Path) -> Path:
    """A config file: a path, or the name of a shipped config (`digits` = CONFIG_DIR/digits.yaml)."""
    path = Path(name)
    if path.exists():
        return path
    shipped = CONFIG_DIR / (path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml")
    if path.parent == Path(".") or path.parent.name == "configs":  # `digits`, `digits.yaml`, `configs/digits.yaml`
        if shipped.exists():
            return shipped
    names = ", ".join(p.stem for p in sorted(CONFIG_DIR.glob("*.yaml")) if p.stem != "base")
    raise ConfigError(f"config file '{path}' does not exist; give a path or the name of a shipped config ({names})")


def merge_file(cfg: DictConfig, path: str | Path) -> DictConfig:
    path = config_path(path)
    return _merge(cfg, OmegaConf.load(path), str(path))


def merge_overrides(cfg: DictConfig, overrides: List[str]) -> DictConfig:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not key=value (e.g. train.steps=100)")
        try:
            other = OmegaConf.from_dotlist([item])
        except Exception as e:  # the value is YAML: an unclosed quote or bracket raises yaml's own errors
            raise ConfigError(f"override '{item}': the value is not valid YAML ({str(e).splitlines()[0]}); "
                              f"quote it, e.g. key='\"...\"'") from None
        cfg = _merge(cfg, other, f"override '{item}'")
    return cfg


def recipe_choices(recipe: str, model: Any) -> Dict[str, Any]:
    """Every choice a recipe makes, as {config key: value}, for a `model` section (arch, activation, classes).
    `paper` is openai/ebm_code_release line by line (models.py, utils.py, custom_adam.py, train.py); `ebmscale`
    is today's measured choices; `icd` is `ebmscale` plus the ICD terms (`icd_active`). docs/recipes.md ("The three recipes")
    gives the why of each; docs/paper-recipe.md what each `paper` key costs, measured."""
    if recipe == "paper":
        if model.activation == "swish":  # models.py 435-438, 613-616: the block activation again
            pool = "swish"
        elif model.arch == "resnet32large" and model.num_classes > 0:  # models.py 339-342
            pool = "leaky_relu"
        else:  # models.py 254, 342, 438, 616
            pool = "relu"
        return {"model.shortcut_kernel": 3, "model.conv_bias": False, "model.pool_activation": pool,
                "model.first_block_activation": "leaky_relu", "model.residual": "release",
                "model.dropout": 0.5 if model.arch == "resnet32large" else 0.0, "model.class_gain_bias": True,
                "optim.official_clip": True, "buffer.labels": "batch", "buffer.codec": "release",
                "model.init": "release", "train.precision": "fp32", "train.tf32": False, "guard.enabled": False}
    return {"model.shortcut_kernel": 1, "model.conv_bias": True, "model.pool_activation": model.activation,
            "model.first_block_activation": model.activation, "model.residual": "scaled", "model.dropout": 0.0,
            "model.class_gain_bias": False, "optim.official_clip": False, "buffer.labels": "stored",
            "buffer.codec": "unbiased", "model.init": "torch", "train.precision": "auto", "train.tf32": True,
            "guard.enabled": True}


def resolve_recipe(cfg: DictConfig) -> DictConfig:
    """Fill each recipe key left null with the recipe's value, in place; keys given explicitly stay."""
    _check(cfg.recipe in RECIPES, "recipe", f"unknown recipe '{cfg.recipe}'; allowed: {', '.join(RECIPES)}")
    for key, value in recipe_choices(cfg.recipe, cfg.model).items():
        if OmegaConf.select(cfg, key) is None:
            OmegaConf.update(cfg, key, value)
    return cfg


def _check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {msg}")


def validate(cfg: DictConfig) -> None:
    """Value checks the type system cannot express. Raises ConfigError naming the key."""
    missing = OmegaConf.missing_keys(cfg)
    if missing:
        k = sorted(missing)[0]
        raise ConfigError(f"{k}: required but not set; give it in the config or as {k}=VALUE")
    m, s, b, d, o, t, c = cfg.model, cfg.sampler, cfg.buffer, cfg.data, cfg.optim, cfg.train, cfg.checkpoint
    _check(m.arch in ARCHS, "model.arch", f"unknown architecture '{m.arch}'; allowed: {', '.join(ARCHS)}")
    _check(m.activation in ACTIVATIONS, "model.activation",
           f"unknown activation '{m.activation}'; allowed: {', '.join(ACTIVATIONS)}")
    _check(m.filters > 0, "model.filters", f"must be > 0, got {m.filters}")
    _check(m.in_channels in (1, 3), "model.in_channels", f"must be 1 or 3, got {m.in_channels}")
    _check(m.num_classes >= 0, "model.num_classes", f"must be >= 0 (0 = unconditional), got {m.num_classes}")
    _check(cfg.recipe in RECIPES, "recipe", f"unknown recipe '{cfg.recipe}'; allowed: {', '.join(RECIPES)}")
    for key, allowed in (("model.pool_activation", ACTIVATIONS + ("relu",)), ("model.first_block_activation", ACTIVATIONS),
                         ("model.residual", RESIDUALS), ("model.init", INITS), ("buffer.labels", CHAIN_LABELS), ("buffer.codec", BUFFER_CODECS),
                         ("model.shortcut_kernel", (1, 3))):
        value = OmegaConf.select(cfg, key)
        _check(value is None or value in allowed, key, f"unknown '{value}'; allowed: {', '.join(map(str, allowed))} "
               f"(or null: the recipe's)")
    _check(m.scale_loss in ("mean", "sum"), "model.scale_loss", f"unknown '{m.scale_loss}'; allowed: mean, sum")
    _check(m.dropout is None or 0 <= m.dropout < 1, "model.dropout", f"must be in [0, 1), got {m.dropout}")
    n_down = {"resnet32": 3, "resnet32large": 3, "resnet32wider": 3, "resnet128": 5}[m.arch]
    _check(m.resolution > 0 and m.resolution % (2 ** n_down) == 0, "model.resolution",
           f"{m.arch} downsamples {n_down} times, so the resolution must be a positive multiple of "
           f"{2 ** n_down}; got {m.resolution}")
    _check(m.scales >= 1 and m.resolution % (2 ** (n_down + m.scales - 1)) == 0, "model.scales",
           f"scale {m.scales} sees {m.resolution}/{2 ** (m.scales - 1)} px, which {m.arch} ({n_down} downsamplings) "
           f"cannot take; the resolution must be a multiple of {2 ** (n_down + m.scales - 1)} (fewer scales)")
    _check(s.steps >= 0, "sampler.steps", f"must be >= 0, got {s.steps}")
    _check(s.step_size > 0, "sampler.step_size", f"must be > 0, got {s.step_size}")
    _check(s.noise >= 0, "sampler.noise", f"must be >= 0, got {s.noise}")
    _check(s.grad_clip is None or s.grad_clip > 0, "sampler.grad_clip", f"must be > 0 or null, got {s.grad_clip}")
    _check(not (s.compile and t.zero_stage == 3), "sampler.compile",
           "needs train.zero_stage <= 2 (ZeRO-3 gathers the weights inside the forward); set sampler.compile=false")
    _check(b.dtype in BUFFER_DTYPES, "buffer.dtype", f"unknown '{b.dtype}'; allowed: {', '.join(BUFFER_DTYPES)}")
    _check(0.0 <= b.fresh_fraction <= 1.0, "buffer.fresh_fraction", f"must be in [0, 1], got {b.fresh_fraction}")
    _check(d.batch_size > 0, "data.batch_size", f"must be > 0, got {d.batch_size}")
    _check(b.capacity >= d.batch_size, "buffer.capacity",
           f"the buffer ({b.capacity}) must hold at least one batch (data.batch_size={d.batch_size})")
    _check(d.workers >= 0, "data.workers", f"must be >= 0, got {d.workers}")
    _check(0.0 <= d.max_bad_fraction <= 1.0, "data.max_bad_fraction", f"must be in [0, 1], got {d.max_bad_fraction}")
    _check(d.shuffle_buffer >= 0, "data.shuffle_buffer", f"must be >= 0, got {d.shuffle_buffer}")
    _check(d.max_member_bytes > 0, "data.max_member_bytes", f"must be > 0 bytes, got {d.max_member_bytes}")
    _check(d.loader_timeout_s >= 0, "data.loader_timeout_s", f"must be >= 0 seconds (0 = no limit), got {d.loader_timeout_s}")
    _check(d.prefetch >= 1, "data.prefetch", f"must be >= 1 (batches each loader worker keeps ready), got {d.prefetch}")
    if d.weights is not None:
        n = len(d.shards.split("::"))
        _check(len(d.weights) == n and all(w > 0 for w in d.weights), "data.weights",
               f"needs one positive weight per '::'-separated source in data.shards ({n}), got {list(d.weights)}")
        _check(d.resampled, "data.weights", "mixing sources by weight needs data.resampled=true")
    _check(o.lr > 0, "optim.lr", f"must be > 0, got {o.lr}")
    _check(0 <= o.beta1 < 1 and 0 <= o.beta2 < 1, "optim.beta1/beta2", "must be in [0, 1)")
    _check(o.grad_clip >= 0, "optim.grad_clip", f"must be >= 0 (0 = off), got {o.grad_clip}")
    _check(t.steps > 0, "train.steps", f"must be > 0, got {t.steps}")
    _check(t.alpha >= 0, "train.alpha", f"must be >= 0, got {t.alpha}")
    _check(t.precision in PRECISIONS, "train.precision", f"unknown '{t.precision}'; allowed: {', '.join(PRECISIONS)}")
    _check(t.zero_stage in (0, 1, 2, 3), "train.zero_stage", f"must be 0, 1, 2 or 3, got {t.zero_stage}")
    for k in ("log_every", "sample_every"):
        _check(t[k] > 0, f"train.{k}", f"must be > 0, got {t[k]}")
    _check(t.threads >= 0, "train.threads", f"must be >= 0, got {t.threads}")
    _check(t.collective_timeout_s >= 30, "train.collective_timeout_s",
           f"must be >= 30 seconds (a slow peer is not a dead one), got {t.collective_timeout_s}")
    _check(c.every > 0, "checkpoint.every", f"must be > 0, got {c.every}")
    _check(c.keep_last >= 1, "checkpoint.keep_last", f"must be >= 1 (the latest is always kept), got {c.keep_last}")
    _check(c.keep_every >= 0, "checkpoint.keep_every", f"must be >= 0, got {c.keep_every}")
    _check(cfg.tracking.chain_gif_every > 0, "tracking.chain_gif_every",
           f"must be > 0, got {cfg.tracking.chain_gif_every}")
    _check(cfg.tracking.retry_s > 0, "tracking.retry_s", f"must be > 0 seconds, got {cfg.tracking.retry_s}")
    _check(cfg.tracking.flush_timeout_s >= 0, "tracking.flush_timeout_s",
           f"must be >= 0 seconds, got {cfg.tracking.flush_timeout_s}")
    validate_guard(cfg.guard)
    validate_icd(cfg)
    lc = cfg.launcher
    _check(lc.nodes >= 1, "launcher.nodes", f"must be >= 1, got {lc.nodes}")
    _check(lc.gpus_per_node >= 0, "launcher.gpus_per_node", f"must be >= 0, got {lc.gpus_per_node}")
    _check(lc.tasks_per_node >= 1, "launcher.tasks_per_node", f"must be >= 1, got {lc.tasks_per_node}")
    _check(lc.time_min > 0, "launcher.time_min", f"must be > 0 minutes, got {lc.time_min}")
    _check(lc.max_requeues >= 0, "launcher.max_requeues", f"must be >= 0, got {lc.max_requeues}")


def validate_guard(g: DictConfig) -> None:
    for sig in GUARD_SIGNALS:
        _check(g[f"on_{sig}"] in GUARD_RESPONSES, f"guard.on_{sig}",
               f"unknown response '{g[f'on_{sig}']}'; allowed: {', '.join(GUARD_RESPONSES)}")
    for k in ("max_energy", "max_gap", "grad_spike", "min_neg_std"):
        _check(g[k] >= 0, f"guard.{k}", f"must be >= 0 (0 = off), got {g[k]}")
    _check(0 < g.max_saturated <= 1, "guard.max_saturated", f"must be in (0, 1], got {g.max_saturated}")
    _check(g.grad_window >= 1, "guard.grad_window", f"must be >= 1, got {g.grad_window}")
    _check(g.max_skips >= 1, "guard.max_skips", f"must be >= 1, got {g.max_skips}")
    _check(g.max_rollbacks >= 0, "guard.max_rollbacks", f"must be >= 0 (0 = stop at the first rollback), got {g.max_rollbacks}")
    _check(g.clean_steps >= 0, "guard.clean_steps", f"must be >= 0, got {g.clean_steps}")
    for r in g.remedies:
        try:
            parse_remedy(r)
        except ValueError as e:
            raise ConfigError(f"guard.remedies: {e}") from None


def icd_active(cfg: DictConfig) -> bool:
    """The ICD terms are on: `recipe: icd`, or `icd.enabled` on top of another recipe."""
    return bool(cfg.icd.enabled) or cfg.recipe == "icd"


def validate_icd(cfg: DictConfig) -> None:
    i = cfg.icd
    if not icd_active(cfg):
        return
    _check(1 <= i.kl_steps <= cfg.sampler.steps, "icd.kl_steps",
           f"must be in [1, sampler.steps={cfg.sampler.steps}] (the KL term differentiates the sampler's last "
           f"steps), got {i.kl_steps}")
    _check(cfg.train.zero_stage <= 2, "icd.enabled",
           "the KL term differentiates through the model's own input gradient, which ZeRO-3's partitioned "
           "parameters do not allow; set train.zero_stage=2")
    for k in ("kl_coeff", "entropy_coeff", "color_jitter"):
        _check(i[k] >= 0, f"icd.{k}", f"must be >= 0, got {i[k]}")
    _check(i.entropy_bank >= 1 and 1 <= i.entropy_compare <= i.entropy_bank, "icd.entropy_compare",
           f"needs 1 <= icd.entropy_compare ({i.entropy_compare}) <= icd.entropy_bank ({i.entropy_bank})")
    _check(0 < i.crop_scale <= 1, "icd.crop_scale", f"must be in (0, 1], got {i.crop_scale}")
    _check(0 <= i.grayscale <= 1, "icd.grayscale", f"must be in [0, 1], got {i.grayscale}")


def run_dir(cfg: DictConfig) -> Path:
    return Path(cfg.run.dir) if cfg.run.dir else Path("runs") / cfg.run.name


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def flatten(cfg: DictConfig, prefix: str = "") -> Dict[str, Any]:
    """{'model.arch': 'resnet32', ...} for MLflow params."""
    out: Dict[str, Any] = {}
    container = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    for k, v in container.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def from_yaml_file(path: str | Path) -> DictConfig:
    """Re-load a resolved config.yaml written to a run folder (no base merge: it is complete)."""
    cfg = _merge(OmegaConf.structured(Config), OmegaConf.load(path), str(path))
    resolve_recipe(cfg)  # a run written before the recipe keys existed ran ebmscale's choices
    validate(cfg)
    return cfg


__all__ = ["CONFIG_DIR", "Config", "ConfigError", "config_path", "flatten", "from_yaml_file", "load_config",
           "merge_file", "merge_overrides", "run_dir", "to_yaml", "validate"]
