"""tools/gpu_check.sh's table (ebmscale/bench/gpu_check.py) from what its stages leave behind, and the script's
own command line. The dry run itself (every stage on CPU) takes 8-9 minutes here: not a test (docs/gpu.md)."""
import json
import subprocess

from conftest import ROOT
from ebmscale.bench.gpu_check import summary


def test_the_table_reads_the_stages_outputs_and_says_which_failed(tmp_path):
    (tmp_path / "stages.tsv").write_text("install\tok\t30\ntrain\tok\t158\nfp16\tFAILED\t57\n")
    (tmp_path / "device.log").write_text("NVIDIA H100 80GB HBM3, 79 GiB, capability 9.0\n")
    (tmp_path / "train" / "logs").mkdir(parents=True)
    rows = [{"step": s, "images_per_s": 100.0 + s, "time/step_s": 0.3, "time/sample_s": 0.24, "time/update_s": 0.05,
             "time/langevin_share": 0.8, "memory/peak_gb": 12.5, "batch/loss": -0.01} for s in (5, 10, 15, 20)]
    (tmp_path / "train" / "logs" / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "langevin.json").write_text(json.dumps({"batch": 32, "gflop_per_image_step": 20.95, "rows": [
        {"sampler": "ebmscale bf16", "img_steps_per_s": 5000.0, "flop_per_s": 1.05e14, "mfu": 0.106}]}))
    text, ok = summary(tmp_path)
    assert not ok and "SOME STAGES FAILED" in text and "fp16 FAILED 57 s" in text
    train = next(line for line in text.splitlines() if line.startswith("train + resume"))
    assert "117.5" in train and "80.0%" in train and "12.50" in train  # median img/s of the resumed half, share, GB
    assert "20.95 GFLOP" in text and "10.6%" in text
    (tmp_path / "stages.tsv").write_text("install\tok\t30\n")
    assert summary(tmp_path)[1]


def test_the_script_lists_its_packages_and_refuses_unknown_arguments():
    out = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh"), "--print-packages"], capture_output=True,
                         text=True, check=True).stdout.split()
    assert any(p.startswith("deepspeed") for p in out) and "omegaconf>=2.3" in out and "torch" not in out
    bad = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh"), "--nope"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown argument --nope" in bad.stderr
