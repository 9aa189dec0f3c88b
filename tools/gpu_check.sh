#!/usr/bin/env bash
# One command that measures ebmscale on one GPU, offline, in under 8 minutes (one H100), and prints one table.
#
#   tools/gpu_check.sh --wheels /path/to/wheels      # on the GPU machine (torch with CUDA already installed)
#   tools/gpu_check.sh --dry-run                     # every stage on this CPU (gloo, tiny steps): ~4-6 minutes here
#   tools/gpu_check.sh --print-packages              # what the wheel folder must hold (docs/gpu.md prepares it)
#
# Stages (logs and JSON in --out, default runs/gpu_check): install the carried wheels (--no-index); synthetic
# ImageNet-like shards (random JPEGs through tools/make_shards.py folder: no download); configs/imagenet128.yaml end
# to end through tools/launch.py --local on CUDA + NCCL, batch 32, 100 steps, then a resume to 150; the train-step
# bench (imagenet128 and cifar10's ResNet32 against plain fp32 and bf16-autocast PyTorch, same run); the sampler's
# FLOPs and MFU (bench langevin); 10 fp16 steps; 10 ZeRO-3 steps at persistence threshold 0; then the summary
# (python -m ebmscale.bench.gpu_check OUT). A failed stage is reported and the rest still run; exit 1 if any failed.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PACKAGES=("deepspeed>=0.19,<0.20" "omegaconf>=2.3" "webdataset>=1.0,<1.1" "submitit>=1.5,<1.6" "mlflow>=3.0,<4"
          "safetensors>=0.4" numpy pillow tqdm ninja psutil matplotlib nvidia-ml-py)
DRY=0; WHEELS=${EBMSCALE_WHEELS:-}; OUT=runs/gpu_check; PY=${PYTHON:-python3}
while [ $# -gt 0 ]; do
  case $1 in
    --dry-run) DRY=1 ;;
    --wheels) WHEELS=$2; shift ;;
    --out) OUT=$2; shift ;;
    --print-packages) printf '%s\n' "${PACKAGES[@]}"; exit 0 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH} OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
export MLFLOW_TRACKING_URI=sqlite:///$OUT/mlflow.db HF_HUB_OFFLINE=1 PIP_NO_INPUT=1
: > "$OUT/stages.tsv"
FAILED=0

stage() {  # stage NAME COMMAND...: run it, log to OUT/NAME.log, record seconds and status
  local name=$1; shift
  local t0=$SECONDS
  printf '%-12s ' "$name"
  if "$@" > "$OUT/$name.log" 2>&1; then
    printf 'ok      %4d s\n' $((SECONDS - t0)); printf '%s\tok\t%d\n' "$name" $((SECONDS - t0)) >> "$OUT/stages.tsv"
  else
    printf 'FAILED  %4d s  (%s)\n' $((SECONDS - t0)) "$OUT/$name.log"; tail -n 15 "$OUT/$name.log" | sed 's/^/    /'
    printf '%s\tFAILED\t%d\n' "$name" $((SECONDS - t0)) >> "$OUT/stages.tsv"; FAILED=1
  fi
}

install() {
  if [ -n "$WHEELS" ]; then
    [ -d "$WHEELS" ] || { echo "--wheels $WHEELS: no such folder (docs/gpu.md: how to prepare it)"; return 1; }
    local dry=(); [ $DRY = 1 ] && dry=(--dry-run)
    "$PY" -m pip install --no-index --find-links "$WHEELS" "${dry[@]}" "${PACKAGES[@]}" || return 1
  else
    echo "no --wheels: using what is installed"
  fi
  "$PY" -c "import torch, deepspeed, omegaconf, webdataset, submitit, mlflow, safetensors, PIL; print('torch', \
torch.__version__, 'cuda', torch.version.cuda, 'deepspeed', deepspeed.__version__)"
}

device() {
  "$PY" - "$DRY" <<'PY'
import sys, torch
dry = sys.argv[1] == "1"
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"{torch.cuda.get_device_name(0)}, {p.total_memory / 2**30:.0f} GiB, capability {p.major}.{p.minor}, "
          f"{torch.cuda.device_count()} visible, torch {torch.__version__}, NCCL {torch.cuda.nccl.version()}")
elif dry:
    print("no CUDA: dry run on the CPU (gloo)")
else:
    sys.exit("no CUDA device visible: run on the GPU machine, or pass --dry-run to check the stages on a CPU")
PY
}

shards() {  # random JPEGs in 10 class folders -> WebDataset shards (tools/make_shards.py folder)
  "$PY" - "$OUT/images" "$1" <<'PY' || return 1
import sys
from pathlib import Path
import numpy as np
from PIL import Image
out, per_class = Path(sys.argv[1]), int(sys.argv[2])
rng = np.random.default_rng(0)
for c in range(10):
    d = out / f"class{c:02d}"
    d.mkdir(parents=True, exist_ok=True)
    for i in range(per_class):  # smooth colour fields plus noise: JPEG-decodable, not constant
        base = rng.random((4, 4, 3)) * 255
        img = np.kron(base, np.ones((40, 40, 1))) + rng.normal(0, 12, (160, 160, 3))
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(d / f"{i:04d}.jpg", quality=90)
print(f"{10 * per_class} images in {out}")
PY
  "$PY" tools/make_shards.py folder "$OUT/images" "$OUT/shards" --size 128 --num-shards 4 --workers 2
}

if [ $DRY = 1 ]; then  # the same stages, tiny, on this CPU
  export DS_ACCELERATOR=cpu CUDA_VISIBLE_DEVICES=""
  IMAGES=8; TINY=(model.filters=8 sampler.steps=2 data.batch_size=2 data.workers=0 train.threads=1 buffer.capacity=64)
  STEPS=(4 6); EVERY=2; BATCH=2; FEW=3
  BENCH=(--reps 1 --threads 1 --resnet128-batch 2 --override model.filters=8 sampler.steps=2 buffer.capacity=64)
  LANGEVIN=(--batch 2 --steps 1 --reps 1 --threads 1 --gemm-size 256 --override model.filters=8)
else
  IMAGES=64; TINY=(data.workers=4); STEPS=(100 150); EVERY=50; BATCH=32; FEW=10
  BENCH=(--reps 3 --resnet128-batch 32); LANGEVIN=(--batch 32 --steps 5 --reps 3)
fi
RUN=(tools/launch.py --local --nproc 1 --quiet configs/imagenet128.yaml "data.shards=$OUT/shards/manifest.json"
     "data.batch_size=$BATCH" "checkpoint.every=$EVERY" train.log_every=5 train.sample_every=50 "${TINY[@]}")

train() {  # N steps, then the same command to M: a resume of the same run folder and MLflow run
  rm -rf "$OUT/train"
  "$PY" "${RUN[@]}" "run.dir=$OUT/train" "train.steps=${STEPS[0]}" || return 1
  "$PY" "${RUN[@]}" "run.dir=$OUT/train" "train.steps=${STEPS[1]}" || return 1
  grep -rq "resumed step ${STEPS[0]}" "$OUT/train/logs/submitit" || { echo "no resume found"; return 1; }
}
few() {  # a few steps of one variant: few NAME OVERRIDES...
  local name=$1; shift
  rm -rf "$OUT/$name"
  "$PY" "${RUN[@]}" "run.dir=$OUT/$name" "train.steps=$FEW" "checkpoint.every=$FEW" tracking.enabled=false "$@"
}

echo "ebmscale GPU check -> $OUT ($([ $DRY = 1 ] && echo 'dry run: CPU, tiny' || echo 'CUDA'))"
stage install install
stage device device
stage shards shards "$IMAGES"
stage train train
stage bench_step "$PY" tools/bench.py train-step --archs resnet128 resnet32 "${BENCH[@]}" --json "$OUT/train_step.json"
stage bench_flops "$PY" tools/bench.py langevin --config configs/imagenet128.yaml "${LANGEVIN[@]}" --json "$OUT/langevin.json"
fp16_sampler() {  # DeepSpeed refuses fp16 on a CPU: the dry run checks the sampler's own fp16 path instead
  "$PY" - <<'PY'
import torch
from ebmscale.config import load_config
from ebmscale.models import build_model
from ebmscale.sampling import frozen, langevin, model_energy
from ebmscale.sampling.langevin import InputGradScale
cfg = load_config("configs/imagenet128.yaml", ["model.filters=8", "tracking.enabled=false"])
model, scale = build_model(cfg.model).half(), InputGradScale("cpu")
with frozen(model) as m:
    x, _ = langevin(model_energy(m, torch.tensor([3, 7]), torch.float16, grad_scale=scale), torch.rand(2, 3, 128, 128),
                    2, cfg.sampler.step_size, cfg.sampler.noise)
assert torch.isfinite(x).all(), "fp16 samples not finite"
print(f"fp16 sampler on CPU: 2 Langevin steps, finite; input-gradient scale {float(scale.scale):g}, "
      f"{float(scale.overflows):g} overflowed step(s)")
PY
}
if [ $DRY = 1 ]; then stage fp16 fp16_sampler; else stage fp16 few fp16 train.precision=fp16; fi
stage zero3 few zero3 train.zero_stage=3 train.zero3_persistence_threshold=0
"$PY" -m ebmscale.bench.gpu_check "$OUT" | tee "$OUT/summary.txt" || FAILED=1
exit $FAILED
