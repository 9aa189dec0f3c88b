#!/usr/bin/env python
"""Images -> WebDataset shards + manifest.json for ebmscale.

  python tools/make_shards.py digits data/digits                                   # the CPU demo (4 shards)
  python tools/make_shards.py cifar10 ~/cifar-10-batches-py data/cifar10             # 10 shards, lossless PNG
  python tools/make_shards.py imagenet /data/ILSVRC/train data/imagenet128 --size 128 --workers 32 \\
      --mapping LOC_synset_mapping.txt
  python tools/make_shards.py imagenet /data/ILSVRC/train data/imagenet32 --size 32 --num-shards 128
  python tools/make_shards.py folder my_classes/ data/mine        # one folder per class
  python tools/make_shards.py flat my_images/ data/mine           # no labels (unconditional)
  python tools/make_shards.py textures dtd/images data/textures   # OOD sets as the IGEBM release reads them:
  python tools/make_shards.py svhn ~/svhn data/svhn               #   DTD top-left 32x32 crops; SVHN train split

Re-running the same command skips the shards already complete.

  python tools/make_shards.py verify data/imagenet128    # every shard against manifest.json's sha256; exit 1 if not
"""
import argparse
import logging
import math
import sys

from ebmscale.data.sources import KINDS, open_source
from ebmscale.data.writer import verify_shards, write_shards
from ebmscale.program import prog

DEFAULTS = {  # kind: (size, channels, format, num_shards, prefix)
    "digits": (16, 1, "png", 4, "digits"), "cifar10": (32, 3, "png", None, "train"),
    "textures": (32, 3, "png", None, "textures"), "svhn": (32, 3, "png", None, "svhn"),
}


def verify(out: str) -> int:
    bad = verify_shards(out)
    for line in bad:
        print(line, file=sys.stderr)
    print(f"{out}: {'all shards match manifest.json' if not bad else f'{len(bad)} shard(s) do not match'}")
    return 1 if bad else 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["verify"]:
        if len(argv) != 2:
            sys.exit("usage: make_shards.py verify OUT_DIR")
        return verify(argv[1])
    p = argparse.ArgumentParser(prog=prog(), usage="%(prog)s KIND [SRC] OUT_DIR [options]", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", choices=KINDS, metavar="KIND", help=f"one of {', '.join(KINDS)}")
    p.add_argument("paths", nargs="+", metavar="[SRC] OUT_DIR", help="source folder (cifar10: the batches "
                   "folder; digits: none), then the output folder")
    p.add_argument("--size", type=int, help="output side in pixels (default: 16 digits, 32 cifar10, 128 others)")
    p.add_argument("--channels", type=int, choices=(1, 3), help="1 = greyscale (default for digits)")
    p.add_argument("--format", choices=("jpg", "png"), help="default: png for digits and cifar10 (lossless), else jpg")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality")
    p.add_argument("--samples-per-shard", type=int, default=5000)
    p.add_argument("--num-shards", type=int, help="split into this many shards instead (default 4 for digits)")
    p.add_argument("--max-shard-bytes", type=int, default=10 ** 9)
    p.add_argument("--prefix", help="shard names PREFIX-000000.tar ... (default: digits / train / test)")
    p.add_argument("--mapping", help="imagenet: synset names (LOC_synset_mapping.txt or imagenet_class_index.json)")
    p.add_argument("--split", default="train", choices=("train", "test"), help="cifar10, svhn: which split")
    p.add_argument("--workers", type=int, default=1, help="encoding processes")
    p.add_argument("--seed", type=int, default=0, help="seed of the one shuffle that mixes classes across shards")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    src, out = (None, *a.paths) if a.kind == "digits" else (a.paths + [None])[:2]
    if out is None or len(a.paths) > (1 if a.kind == "digits" else 2):
        p.error(f"{a.kind} takes {'OUT_DIR' if a.kind == 'digits' else 'SRC OUT_DIR'}")
    size, channels, fmt, num_shards, prefix = DEFAULTS.get(a.kind, (128, 3, "jpg", None, "train"))
    source = open_source(a.kind, src, a.mapping, a.split)
    num_shards = a.num_shards or num_shards
    per_shard = math.ceil(len(source.items) / num_shards) if num_shards else a.samples_per_shard
    m = write_shards(source, out, prefix=a.prefix or (a.split if a.kind == "cifar10" else prefix),
                     size=a.size or size, channels=a.channels or channels, fmt=a.format or fmt, quality=a.quality,
                     samples_per_shard=per_shard, max_shard_bytes=a.max_shard_bytes, workers=a.workers, seed=a.seed)
    print(f"{m['total_samples']} samples in {len(m['shards'])} shards, {len(m['skipped'])} skipped\n"
          f"data.shards: {out}/{m['pattern']}   (or {out}/manifest.json)")


if __name__ == "__main__":
    sys.exit(main())
