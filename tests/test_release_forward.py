"""`recipe: paper` against openai/ebm_code_release, re-implemented here in NumPy from its code, not from ebmscale's:
the initial raw weights (utils.py get_weight, models.py init_fc_weight), one step of its Adam (custom_adam.py) and
the whole forward pass of each net (models.py ResNet32 / ResNet32Large / ResNet32Wider / ResNet128 `forward`,
utils.py smart_res_block / conv_block / spectral_normed_weight) on the same weights.
"""
import numpy as np
import pytest
import torch
from torch.nn.utils import parametrize

from ebmscale.config import load_config
from ebmscale.models import build_model, count_parameters
from ebmscale.models.resnet import set_dropout
from ebmscale.train.optim import build_optimizer


def paper_config(arch, filters, num_classes=0, activation="leaky_relu", **extra):
    res = 32
    return load_config(None, ["recipe=paper", "data.shards=x", f"model.arch={arch}", f"model.filters={filters}",
                              f"model.num_classes={num_classes}", f"model.activation={activation}",
                              f"model.resolution={res}", *[f"{k}={v}" for k, v in extra.items()]])


# ---- the release, in NumPy (NHWC, weights [k, k, c_in, c_out], labels one-hot) ----

def leaky_relu(x):  # tf.nn.leaky_relu: alpha 0.2
    return np.where(x > 0, x, 0.2 * x)


def swish(x):  # utils.py swish
    return x / (1 + np.exp(-x))


def relu(x):
    return np.maximum(x, 0)


def l2_normalize(v):  # tf.nn.l2_normalize, epsilon 1e-12 on the squared norm
    return v / np.sqrt(max(float((v ** 2).sum()), 1e-12))


def spectral_normed_weight(w, u, lower_bound=False):
    """utils.py spectral_normed_weight, spec_iter 1, spec_norm_val 1: one power iteration from u [1, c_out]."""
    shape = w.shape
    w = w.reshape(-1, shape[-1])
    v_hat = l2_normalize(u @ w.T)
    u_hat = l2_normalize(v_hat @ w)
    sigma = (v_hat @ w @ u_hat.T).item()
    if lower_bound:
        sigma = sigma + 1e-6
        w_norm = w / sigma * min(sigma, 1.0)
    else:
        w_norm = w / sigma
    return w_norm.reshape(shape)


def conv2d_same(x, w):
    """tf.nn.conv2d(x, w, [1, 1, 1, 1], 'SAME') for an odd kernel."""
    k = w.shape[0]
    p = k // 2
    xp = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    n, h, wd, _ = x.shape
    out = np.zeros((n, h, wd, w.shape[-1]))
    for i in range(k):
        for j in range(k):
            out += xp[:, i:i + h, j:j + wd, :] @ w[i, j]
    return out


def avg_pool(x):  # tf.nn.avg_pool (1, 2, 2, 1) VALID
    n, h, w, c = x.shape
    return x.reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def conv_block(inp, c, label=None, gb=None, g=None, cb=None, extra_bias=False, use_scale=False):
    """utils.py conv_block with use_bias=False (the conv's 'b' is unused), no norm, activation None."""
    if extra_bias:
        inp = inp + ((label @ gb)[:, None, None, :] if label is not None else gb)
    out = conv2d_same(inp, c)
    if use_scale:
        out = out * ((label @ g + cb)[:, None, None, :] if label is not None else g)
    return out


def smart_res_block(inp, wts, scope, label, downsample=True, adaptive=True, act=leaky_relu):
    """utils.py smart_res_block (dropout off)."""
    c1, c2 = wts[scope + "_res_c1"], wts[scope + "_res_c2"]
    h = act(conv_block(inp, c1["c"], label, gb=c1["gb"], extra_bias=True))
    h = conv_block(h, c2["c"], label, gb=c2["gb"], g=c2["g"], cb=c2["cb"], extra_bias=True, use_scale=True)
    bypass = conv_block(inp, wts[scope + "_res_adaptive"]["c"]) if adaptive else inp
    res = h + bypass
    if downsample:
        res = avg_pool(res)
    return act(res)


# models.py `forward`: (scope, downsample, adaptive, act is the model's act (else leaky_relu)) per block
RELEASE_BLOCKS = {
    "resnet32": [("res_optim", True, False, False), ("res_1", False, False, False), ("res_2", True, True, False),
                 ("res_3", False, False, False), ("res_4", True, False, False), ("res_5", False, False, False)],
    "resnet32large": [("res_optim", True, False, False), ("res_1", False, False, False),
                      ("res_2", False, False, False), ("res_3", True, True, False), ("res_4", False, False, False),
                      ("res_5", False, False, False), ("res_6", True, True, False), ("res_7", False, False, False),
                      ("res_8", False, False, False)],
    "resnet32wider": [("res_optim", True, True, False), ("res_1", False, False, True), ("res_2", False, False, True),
                      ("res_3", True, True, True), ("res_4", False, False, True), ("res_5", False, False, True),
                      ("res_6", True, True, True), ("res_7", False, False, True), ("res_8", False, False, True)],
    "resnet128": [("res_optim", True, False, False), ("res_3", True, True, True), ("res_5", True, True, True),
                  ("res_7", True, True, True), ("res_9", True, False, True), ("res_10", False, False, True)],
}


def release_forward(arch, wts, inp, label, swish_act, cclass):
    """models.py ResNet32/ResNet32Large/ResNet32Wider/ResNet128 `forward`, FLAGS.use_attention off."""
    act = swish if swish_act else leaky_relu
    stem_act = act if arch in ("resnet32wider", "resnet128") else leaky_relu  # ResNet32(Large): conv_block default
    h = stem_act(conv_block(inp, wts["c1_pre"]["c"]))
    for scope, down, adaptive, model_act in RELEASE_BLOCKS[arch]:
        h = smart_res_block(h, wts, scope, label, down, adaptive, act if model_act else leaky_relu)
    if arch == "resnet32large":
        pool = leaky_relu if cclass else relu
    elif arch == "resnet32":
        pool = relu
    else:
        pool = act if swish_act else relu
    h = pool(h).sum(axis=(1, 2))
    return h @ wts["fc5"]["w"] + wts["fc5"]["b"]


# ---- the same weights read off ebmscale's module, in the release's layout ----

def sn_weight(conv):
    """(raw weight [k, k, c_in, c_out], u [1, c_out]) of a spectral-normed conv, u as it is before the next forward."""
    p = conv.parametrizations.weight
    return p.original.detach().double().permute(2, 3, 1, 0).numpy(), p[0]._u.detach().double().numpy()[None]


def release_weights(model, conditional):
    """{scope: {...}} with the release's names, spectral norm applied as the release does."""
    def cond(table):
        w = table.weight.detach().double().numpy()
        return w if conditional else w[0]
    wts = {"c1_pre": {"c": spectral_normed_weight(*sn_weight(model.stem))}}
    for blk, (scope, *_rest) in zip(model.blocks, RELEASE_BLOCKS[model.arch]):
        gain_bias = blk.gain2_bias.detach().double().numpy() if blk.gain2_bias is not None else None
        wts[scope + "_res_c1"] = {"c": spectral_normed_weight(*sn_weight(blk.conv1)), "gb": cond(blk.bias1)}
        wts[scope + "_res_c2"] = {"c": spectral_normed_weight(*sn_weight(blk.conv2), lower_bound=True),
                                  "gb": cond(blk.bias2), "g": cond(blk.gain2), "cb": gain_bias}
        if not isinstance(blk.shortcut, torch.nn.Identity):
            wts[scope + "_res_adaptive"] = {"c": spectral_normed_weight(*sn_weight(blk.shortcut))}
    wts["fc5"] = {"w": model.fc.weight.detach().double().numpy().T, "b": model.fc.bias.detach().double().numpy()}
    return wts


def perturb(model):
    """Weights that exercise every path: conv2 at full scale (sigma above and below the cap), class tables off
    their 1/0 start, a nonzero fc bias."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for i, blk in enumerate(model.blocks):
            raw = blk.conv2.parametrizations.weight.original
            raw.copy_(torch.randn(raw.shape, generator=g) * (0.02 if i % 2 else 1.0))
            for t in (blk.bias1, blk.bias2):
                t.weight.copy_(0.3 * torch.randn(t.weight.shape, generator=g))
            blk.gain2.weight.copy_(1 + 0.3 * torch.randn(blk.gain2.weight.shape, generator=g))
            if blk.gain2_bias is not None:
                blk.gain2_bias.copy_(0.3 * torch.randn(blk.gain2_bias.shape, generator=g))
        model.fc.bias.fill_(0.7)
        # Power iteration order differs (torch keeps v and sets u <- Wv first, the release keeps u): one iteration
        # from the same state gives different sigmas until the vectors have converged, so converge them first.
        for m in model.modules():
            if parametrize.is_parametrized(m, "weight"):
                sn = m.parametrizations.weight[0]
                sn._power_method(sn._reshape_weight_to_matrix(m.parametrizations.weight.original), 500)


CASES = [("resnet32", 0, "leaky_relu"), ("resnet32", 10, "leaky_relu"), ("resnet32large", 0, "leaky_relu"),
         ("resnet32large", 10, "leaky_relu"), ("resnet32wider", 0, "swish"), ("resnet32wider", 10, "leaky_relu"),
         ("resnet128", 0, "leaky_relu"), ("resnet128", 7, "swish")]


@pytest.mark.parametrize("arch,classes,activation", CASES)
def test_whole_forward_equals_the_release(arch, classes, activation):
    torch.manual_seed(0)
    model = build_model(paper_config(arch, 4, classes, activation).model).double()
    set_dropout(model, False).train()  # train(): one power iteration per forward, as the release's graph runs
    perturb(model)
    x = torch.rand(3, 3, 32, 32, dtype=torch.float64)
    y = torch.tensor([0, 1, classes - 1]) if classes else None
    wts = release_weights(model, classes > 0)  # reads u before the forward advances it
    label = np.eye(classes)[y.numpy()] if classes else None
    expected = release_forward(arch, wts, x.permute(0, 2, 3, 1).numpy(), label, activation == "swish", classes > 0)
    with torch.no_grad():
        got = model(x, y).numpy()
    np.testing.assert_allclose(got, expected[:, 0], rtol=2e-5, atol=1e-6)  # the stem and head run in fp32
    assert np.abs(expected).max() > 1e-3  # a forward that exercised the weights, not a near-zero energy


def test_parameter_counts_are_the_release():
    counts = {("resnet32", 128, 10): 5_350_529, ("resnet32large", 128, 0): 18_591_105,
              ("resnet32wider", 128, 1000): 89_559_681, ("resnet128", 64, 1000): 21_212_289}
    for (arch, filters, classes), n in counts.items():
        cfg = paper_config(arch, filters, classes)
        cfg.model.resolution = 128 if arch == "resnet128" else 32
        with torch.device("meta"):
            assert count_parameters(build_model(cfg.model)) == n, arch


def test_initial_weights_are_the_release_and_an_explicit_key_wins():
    torch.manual_seed(0)
    model = build_model(paper_config("resnet32", 32, 10).model)
    raw = {n: p for n, p in model.named_parameters() if n.endswith("original")}
    for name, w in raw.items():
        if ".conv2." in name:  # get_weight(zero=True): N(0, 1e-10)
            assert 0.5e-10 < w.std() < 2e-10, name
        else:  # get_weight(spec_norm=True): N(0, 1), torch's kaiming-uniform would be ~1/sqrt(3 fan_in) ~ 0.03
            assert abs(w.std().item() - 1) < 0.1 and abs(w.mean().item()) < 0.1, name
    fan_in = model.fc.weight.shape[1]  # init_fc_weight(spec_norm=False): xavier uniform on [fan_in, 1], zero bias
    limit = np.sqrt(6 / (fan_in + 1))
    assert model.fc.weight.abs().max() <= limit and model.fc.weight.abs().max() > 0.8 * limit
    assert model.fc.bias.item() == 0
    torch_init = build_model(paper_config("resnet32", 32, 10, **{"model.init": "torch"}).model)
    assert torch_init.stem.parametrizations.weight.original.std() < 0.3  # model.init=torch beats the recipe


def test_one_adam_step_moves_each_weight_by_the_release_formula():
    """custom_adam.py at t = 1, beta1 = 0: g clipped to +-0.1, m = g, v = (1 - b2) g^2,
    lr_t = lr sqrt(1 - b2), w -= lr_t m / (sqrt(v) + eps): every element moves by ~lr, so an N(0, 1) raw weight
    turns by ~lr per step, as in the release (a kaiming-uniform one ~30x faster at 32 filters)."""
    torch.manual_seed(0)
    cfg = paper_config("resnet32", 32, 10)
    model = build_model(cfg.model)
    opt = build_optimizer(model, cfg.optim)
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    e = model(x, y)
    (e[:4].mean() - e[4:].mean() + cfg.train.alpha * e.pow(2).mean()).backward()
    before = {n: p.detach().clone().double() for n, p in model.named_parameters()}
    grads = {n: p.grad.detach().clone().double() for n, p in model.named_parameters()}
    opt.step()
    lr, b2, eps = cfg.optim.lr, cfg.optim.beta2, 1e-8
    for n, p in model.named_parameters():
        g = grads[n].clamp(-0.1, 0.1)
        expected = -lr * np.sqrt(1 - b2) * g / (np.sqrt(1 - b2) * g.abs() + eps)
        moved = g.abs() > 1e-3  # torch adds eps after the bias correction, TF before: equal where |g| >> eps
        assert torch.allclose((p.detach().double() - before[n])[moved], expected[moved], rtol=1e-3, atol=1e-9), n
    stem = "stem.parametrizations.weight.original"
    turn = (model.stem.parametrizations.weight.original.detach().double() - before[stem]).norm() / before[stem].norm()
    assert 0.3 * lr < turn < 1.5 * lr  # the direction of an N(0, 1) weight turns by ~lr per step


def test_an_exported_paper_resnet32large_samples_without_dropout(tmp_path):
    """ResNet32Large under `paper` drops units in every training forward; an exported model must not."""
    import json

    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    from ebmscale.export import load_pretrained
    cfg = paper_config("resnet32large", 4)
    assert cfg.model.dropout == 0.5
    model = build_model(cfg.model)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"model": OmegaConf.to_container(cfg.model)}))
    loaded = load_pretrained(tmp_path)
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), loaded(x))
        assert not torch.equal(model(x), model(x))  # the trained module itself: dropout on, as the release
