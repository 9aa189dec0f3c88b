"""The data layer on real images: scikit-image photos (class = which photo) and scikit-learn digits."""
import hashlib
import io
import json
import pickle
import shutil
import tarfile
from collections import Counter
from itertools import islice

import numpy as np
import pytest
import skimage.data
import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from PIL import Image

from ebmscale.config import CONFIG_DIR, ConfigError, DataConfig, ModelConfig
from ebmscale.data import CorruptDataError, build_stream, check_shards
from ebmscale.data.sources import cifar10, digits, flat, imagenet
from ebmscale.data.writer import write_shards

PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry"]
PER_PHOTO, SHARD = 8, 12  # 48 crops -> 4 shards of 12


def cfgs(shards, batch_size=8, num_classes=6, channels=3, resolution=32, **data):
    d = {**dict(shards=str(shards), batch_size=batch_size, workers=0, shuffle_buffer=20, resampled=False,
                dequantize=False, pin_memory=False), **data}
    m = ModelConfig(in_channels=channels, resolution=resolution, num_classes=num_classes)
    return OmegaConf.structured(DataConfig(**d)), OmegaConf.structured(m)


def stream_of(shards, rank=0, world_size=1, seed=0, **kw):
    return build_stream(*cfgs(shards, **kw), rank, world_size, seed)


def pixels(x):  # one hash per image of a batch (dequantize off: x = uint8 / 255 exactly)
    u8 = (x * 255).round().to(torch.uint8).numpy()
    return [hashlib.sha1(a.tobytes()).hexdigest() for a in u8]


def tar_members(path):
    with tarfile.open(path) as t:
        return {m.name: t.extractfile(m).read() for m in t if m.isreg()}


def write_tar(path, members):
    with tarfile.open(path, "w") as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))


def png(a):
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """An ILSVRC-style tree n0000000k/*.JPEG of random 128x128 crops of six photos, and its shards at 32 px."""
    root, rng = tmp_path_factory.mktemp("photos"), np.random.default_rng(0)
    tree = root / "train"
    for k, name in enumerate(PHOTOS):
        img = getattr(skimage.data, name)()
        (tree / f"n{k:08d}").mkdir(parents=True)
        for j in range(PER_PHOTO):
            y, x = rng.integers(0, img.shape[0] - 128), rng.integers(0, img.shape[1] - 128)
            Image.fromarray(img[y:y + 128, x:x + 128]).save(tree / f"n{k:08d}" / f"{name}_{j}.JPEG", quality=95)
    (root / "mapping.txt").write_text("".join(f"n{k:08d} {name}, a photo\n" for k, name in enumerate(PHOTOS)))
    out = root / "shards"
    write_shards(imagenet(str(tree), str(root / "mapping.txt")), out, size=32, samples_per_shard=SHARD, progress=False)
    return root


def all_pixels(shard_dir):
    return Counter(hashlib.sha1(np.asarray(Image.open(io.BytesIO(d)).convert("RGB")).transpose(2, 0, 1).tobytes())
                   .hexdigest() for p in sorted(shard_dir.glob("*.tar")) for n, d in tar_members(p).items()
                   if n.endswith(".jpg"))


PATTERN = "shards/train-{000000..000003}.tar"


def test_manifest_and_shard_contents(photos):
    m = json.loads((photos / "shards/manifest.json").read_text())
    assert m["complete"] and m["total_samples"] == 48 and [s["samples"] for s in m["shards"]] == [SHARD] * 4
    assert m["class_counts"] == [PER_PHOTO] * 6 and (m["num_classes"], m["image_size"], m["channels"]) == (6, 32, 3)
    for s in m["shards"]:
        assert hashlib.sha256((photos / "shards" / s["name"]).read_bytes()).hexdigest() == s["sha256"]
        assert (photos / "shards" / s["name"]).stat().st_size == s["bytes"]
    classes = json.loads((photos / "shards/classes.json").read_text())
    assert [c["name"] for c in classes] == [f"{n}, a photo" for n in PHOTOS] and classes[0]["id"] == "n00000000"
    members = tar_members(photos / "shards/train-000000.tar")
    assert {n.split(".", 1)[1] for n in members} == {"jpg", "cls"}  # nothing pickled
    labels = [int(d) for n, d in members.items() if n.endswith(".cls")]
    assert len(labels) == SHARD and all(0 <= y < 6 for y in labels) and len(set(labels)) > 1  # classes mixed
    assert Image.open(io.BytesIO(next(d for n, d in members.items() if n.endswith(".jpg")))).size == (32, 32)


def test_make_shards_rerun_skips_complete_shards(photos, tmp_path):
    src = imagenet(str(photos / "train"))
    m = write_shards(src, tmp_path, size=32, samples_per_shard=10, progress=False)
    assert [s["samples"] for s in m["shards"]] == [10, 10, 10, 10, 8]
    mtimes = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.tar")}
    assert write_shards(src, tmp_path, size=32, samples_per_shard=10, progress=False)["shards"] == m["shards"]
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.tar")} == mtimes  # nothing rewritten
    (tmp_path / "train-000003.tar").unlink()  # a lost shard: the ones before it are kept, it is rebuilt identically
    m2 = write_shards(src, tmp_path, size=32, samples_per_shard=10, progress=False)
    assert [s["sha256"] for s in m2["shards"]] == [s["sha256"] for s in m["shards"]]
    assert (tmp_path / "train-000000.tar").stat().st_mtime_ns == mtimes["train-000000.tar"]
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(ValueError, match="other settings"):
        write_shards(src, tmp_path, size=32, samples_per_shard=10, quality=80, progress=False)


def test_digits_cli_shards_match_the_digits_config(digits_shards):
    m = json.loads((digits_shards / "manifest.json").read_text())
    assert [s["name"] for s in m["shards"]] == [f"digits-{i:06d}.tar" for i in range(4)]
    assert (m["total_samples"], m["channels"], m["image_size"], m["format"]) == (1797, 1, 16, "png")
    assert m["num_classes"] == 10 and sum(m["class_counts"]) == 1797
    pattern = OmegaConf.load(CONFIG_DIR / "digits.yaml").data.shards.replace("data/digits", str(digits_shards))
    assert len(check_shards(cfgs(pattern)[0])) == 4
    x, y = next(iter(stream_of(pattern, batch_size=32, num_classes=10, channels=1, resolution=16)))
    assert x.shape == (32, 1, 16, 16) and x.dtype.is_floating_point and y.dtype == torch.int64
    assert 0 <= x.min() and x.max() <= 1 and 0 <= y.min() and y.max() <= 9
    x3, _ = next(iter(stream_of(pattern, batch_size=4, num_classes=10, channels=3, resolution=32)))
    assert x3.shape == (4, 3, 32, 32) and (x3[:, 0] == x3[:, 1]).all()  # grey -> RGB, 16 -> 32 px


def test_every_sample_once_per_epoch(photos):
    want = all_pixels(photos / "shards")
    s = stream_of(photos / PATTERN)
    assert s.steps_per_epoch == 6
    epochs = [[h for x, _ in s for h in pixels(x)] for _ in range(2)]
    assert all(Counter(e) == want for e in epochs) and epochs[0] != epochs[1]  # all once, reshuffled
    assert s.stats()["samples"] == 96 and s.state_dict()["epoch"] == 2


def test_two_ranks_two_workers_disjoint_and_reproducible(photos, tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:  # loader workers start beside a live gloo group (as under DeepSpeed), which keeps working
        runs = [list(stream_of(photos / PATTERN, rank=r, world_size=2, batch_size=4, workers=2)) for r in (0, 1, 0)]
        dist.all_reduce(torch.ones(1))
    finally:
        dist.destroy_process_group()
    assert len(runs[0]) == len(runs[1]) == 6
    seen = [Counter(h for x, _ in run for h in pixels(x)) for run in runs[:2]]
    assert not set(seen[0]) & set(seen[1]) and seen[0] + seen[1] == all_pixels(photos / "shards")
    assert all((a[0] == b[0]).all() and (a[1] == b[1]).all() for a, b in zip(runs[0], runs[2]))


def test_close_stops_the_loader_workers_at_once(photos):
    """The trainer closes its stream on the way out: leaving the workers to garbage collection let a finished job
    hang in multiprocessing's exit handler, which cannot stop workers that block SIGTERM."""
    import multiprocessing as mp
    before = set(mp.active_children())
    s = stream_of(photos / PATTERN, batch_size=4, workers=2, resampled=True)
    next(iter(s))
    workers = set(mp.active_children()) - before
    assert len(workers) == 2
    s.close()
    assert not any(w.is_alive() for w in workers)
    s.close()  # idempotent


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_the_same_stream(photos, workers):
    kw = dict(resampled=True, workers=workers, flip=True, random_resized_crop=True, dequantize=True, resolution=16)
    a = stream_of(photos / PATTERN, seed=3, **kw)
    it, sd = iter(a), None
    ref = []
    for i in range(9):  # crosses the epoch boundary (steps_per_epoch = 48 // 8 = 6)
        if i == 3:
            sd = a.state_dict()
        ref.append(next(it))
    b = stream_of(photos / PATTERN, seed=99, **kw)  # the checkpoint's seed wins
    b.load_state_dict(sd)
    torch.manual_seed(0)
    got = list(islice(iter(b), 6))
    after, _ = torch.rand(1), torch.manual_seed(0)
    assert after == torch.rand(1)  # the global torch RNG (the trainer's) is untouched by the stream
    assert all((x == rx).all() and (y == ry).all() for (x, y), (rx, ry) in zip(got, ref[3:]))
    assert b.state_dict()["epoch"] == 1 and b.state_dict()["batch"] == 3


def test_equal_steps_per_rank_with_uneven_shards(digits_shards):
    pattern = str(digits_shards / "digits-{000000..000003}.tar")  # 4 shards over 3 ranks
    streams = [stream_of(pattern, rank=r, world_size=3, batch_size=32, num_classes=10, channels=1, resolution=16)
               for r in range(3)]
    assert len({s.steps_per_epoch for s in streams}) == 1
    assert [sum(1 for _ in s) for s in streams] == [streams[0].steps_per_epoch] * 3 == [447 // 32] * 3
    with pytest.raises(ConfigError, match="data.resampled"):
        stream_of(pattern, world_size=5, num_classes=10)


def test_corrupt_samples_are_skipped_and_counted(photos, tmp_path):
    good = sorted((photos / "shards").glob("*.tar"))
    for p in good[:2]:
        shutil.copy(p, tmp_path / p.name)
    raw = good[2].read_bytes()
    (tmp_path / "train-000002.tar").write_bytes(raw[:len(raw) * 6 // 10])  # truncated mid-shard
    members = sorted(tar_members(good[3]).items())
    write_tar(tmp_path / "train-000003.tar", members + [("junk.jpg", b"not a JPEG at all"), ("junk.cls", b"1"),
                                                        ("nolabel.jpg", members[0][1])])
    s = stream_of(tmp_path / "train-{000000..000003}.tar", max_bad_fraction=0.5)
    assert sum(1 for _ in s) == s.steps_per_epoch
    bad = s.stats()["bad_shards"]
    assert set(bad) == {str(tmp_path / "train-000002.tar"), str(tmp_path / "train-000003.tar")}
    assert bad[str(tmp_path / "train-000003.tar")] == 2 and s.stats()["bad_samples"] >= 3


def test_mostly_corrupt_data_fails_naming_the_shard(tmp_path):
    ok = png(np.full((8, 8, 3), 128, np.uint8))
    members = [(f"{i:04d}.png", ok if i % 5 == 0 else b"garbage") for i in range(150)]
    write_tar(tmp_path / "bad-000000.tar", [x for i in range(150) for x in (members[i], (f"{i:04d}.cls", b"0"))])
    with pytest.raises(CorruptDataError, match="bad-000000.tar.*max_bad_fraction|max_bad_fraction.*bad-000000.tar"):
        for _ in stream_of(tmp_path / "bad-000000.tar", batch_size=4, resolution=8):
            pass


def test_secure_by_default(tmp_path):
    with pytest.raises(ConfigError, match="allow_pipe"):
        check_shards(cfgs("pipe:curl -s http://example.com/x-{0..3}.tar")[0])
    (tmp_path / "list.txt").write_text("# shards\npipe:cat x.tar\n")
    with pytest.raises(ConfigError, match="allow_pipe"):
        check_shards(cfgs(tmp_path / "list.txt")[0])
    ok = png(np.full((8, 8, 3), 200, np.uint8))
    write_tar(tmp_path / "p-000000.tar",
              [x for i in range(8) for x in ((f"{i}.png", ok), (f"{i}.pyd", pickle.dumps(2)))])
    with pytest.raises(CorruptDataError, match="allow_pickle"):
        list(stream_of(tmp_path / "p-000000.tar", batch_size=2, resolution=8, num_classes=3))
    s = stream_of(tmp_path / "p-000000.tar", batch_size=2, resolution=8, num_classes=3, allow_pickle=True)
    assert all((y == 2).all() for _, y in s)


def test_check_shards_forms_and_errors(photos, tmp_path):
    urls = check_shards(cfgs(photos / PATTERN)[0])
    assert urls == check_shards(cfgs(photos / "shards/manifest.json")[0]) and len(urls) == 4
    (tmp_path / "shards.txt").write_text("\n".join(urls) + "\n")
    assert check_shards(cfgs(tmp_path / "shards.txt")[0]) == urls
    with pytest.raises(ConfigError, match=r"data.shards.*tools/make_shards.py digits data/digits"):
        check_shards(cfgs(tmp_path / "digits/digits-{000000..000003}.tar")[0])
    with pytest.raises(ConfigError, match="1 of 5 shards are missing"):
        check_shards(cfgs(str(photos / "shards/train-{000000..000004}.tar"))[0])


def test_greyscale_cmyk_alpha_palette_inputs_and_broken_files(tmp_path):
    src = tmp_path / "flat"
    src.mkdir()
    Image.fromarray(skimage.data.camera()).save(src / "grey.png")
    Image.fromarray(skimage.data.astronaut()).convert("CMYK").save(src / "cmyk.jpg")
    rgba = np.dstack([skimage.data.coffee(), np.full((400, 600), 255, np.uint8)])
    rgba[:, :300, 3] = 0  # left half transparent -> composited onto white
    Image.fromarray(rgba).save(src / "rgba.png")
    Image.fromarray(skimage.data.coffee()).convert("P").save(src / "palette.gif", transparency=0)
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a whole JPEG")
    (src / "truncated.jpg").write_bytes((src / "cmyk.jpg").read_bytes()[:2000])
    m = write_shards(flat(str(src)), tmp_path / "out", size=32, progress=False)
    assert m["total_samples"] == 4 and m["num_classes"] == 0
    assert sorted(s["src"].rsplit("/", 1)[1] for s in m["skipped"]) == ["broken.jpg", "truncated.jpg"]
    images = {n: Image.open(io.BytesIO(d)) for n, d in tar_members(tmp_path / "out/train-000000.tar").items()}
    assert set(n.split(".")[1] for n in images) == {"jpg"} and all(i.mode == "RGB" and i.size == (32, 32)
                                                                   for i in images.values())
    keys = {p.name: f"{i:08d}.jpg" for i, p in enumerate(sorted(src.iterdir()))}  # key = index in sorted order
    assert np.asarray(images[keys["rgba.png"]])[:, :12].min() > 235
    grey = np.asarray(images[keys["grey.png"]]).astype(int)
    assert np.abs(grey[..., 0] - grey[..., 1]).max() <= 2
    x, y = next(iter(stream_of(tmp_path / "out/train-000000.tar", batch_size=4, num_classes=0, channels=1)))
    assert x.shape == (4, 1, 32, 32) and (y == 0).all()


def test_cifar10_python_batches(photos, tmp_path):
    rng = np.random.default_rng(1)
    img = skimage.data.chelsea()
    crops = np.stack([img[y:y + 32, x:x + 32] for y, x in rng.integers(0, 250, (20, 2))])
    data = crops.transpose(0, 3, 1, 2).reshape(20, -1)
    (tmp_path / "cifar-10-batches-py").mkdir()
    with open(tmp_path / "cifar-10-batches-py/data_batch_1", "wb") as f:
        pickle.dump({b"data": data, b"labels": list(range(10)) * 2}, f)
    with open(tmp_path / "cifar-10-batches-py/batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f)
    m = write_shards(cifar10(str(tmp_path)), tmp_path / "out", size=32, fmt="png", progress=False)
    assert m["total_samples"] == 20 and m["class_counts"] == [2] * 10
    assert json.loads((tmp_path / "out/classes.json").read_text())[3]["name"] == "c3"
    got = Counter(hashlib.sha1(np.asarray(Image.open(io.BytesIO(d))).tobytes()).hexdigest()
                  for n, d in tar_members(tmp_path / "out/train-000000.tar").items() if n.endswith(".png"))
    assert got == Counter(hashlib.sha1(c.tobytes()).hexdigest() for c in crops)  # lossless


def test_weighted_sources(photos, tmp_path):
    src = digits()
    src.items = src.items[:600]
    write_shards(src, tmp_path, prefix="digits", size=32, channels=1, fmt="png", samples_per_shard=12, progress=False)
    spec = f"{photos / PATTERN}::{tmp_path / 'manifest.json'}"  # 4 photo shards, 50 digit shards
    s = stream_of(spec, resampled=True, weights=[1.0, 3.0], batch_size=16, num_classes=10, shuffle_buffer=50)
    grey = np.mean([bool((x[0] == x[1]).all()) for b, _ in islice(iter(s), 60) for x in b])
    assert 0.6 < grey < 0.9  # digits are 3/4 of the samples, though 93% of the shards
    with pytest.raises(ConfigError, match="data.weights"):
        from ebmscale.config import Config, validate
        cfg = OmegaConf.structured(Config)
        cfg.data.shards, cfg.data.weights, cfg.data.resampled = spec, [1.0, 3.0], False
        validate(cfg)
