#!/usr/bin/env bash
# What a session lent a GPU (H100/H200) runs first: one device call, at most 8 minutes, everything a
# GPU must show that a CPU cannot. Record its numbers in the issue note and the README.
#
#   here, once:   bash gpu_check.sh prepare       # wheels the GPU image lacks, into .whl/ (git-ignored)
#   on the GPU:   device run, command "bash gpu_check.sh", carry [".whl"], timeout_s 540
#
# What it measures, each step under its own time limit (a failing step does not stop the next):
#   1. the depth rehearsal on CUDA at the paper's batch 32 (rehearse_depth.py: random-weight SD 2.1 in the
#      real single-file layout, Hypersim/VKITTI/NYUv2 in their real layouts, the README's commands with a
#      kill and --resume, the latent cache, sample.py --eval nyu): wall time per stage, peak GPU memory
#      and the data-loading share of a training step (the cache's claim: under 5%);
#   2. bench.py --config sd21 (full SD2.1, 8 input channels, 384x512, LoRA rank 64) against diffusers +
#      peft, eager and torch.compile'd: step time, ratio, TFLOP/s and MFU against the bf16 dense peak;
#   3. the test suite on CUDA (train.py and sample.py pick CUDA by default there), the slow CPU-only
#      demo test left out.
# Everything lands in $OUT (the device tool brings it back): gpu.txt, rehearsal.md, *.log.
set -uo pipefail
cd "$(dirname "$0")"

if [ "${1:-}" = prepare ]; then
    # The image has torch, transformers, peft, safetensors, tqdm; not diffusers (a test/bench oracle),
    # open_clip_torch (text_encoder.py's tokenizer and layers) and ftfy (open_clip's).
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl diffusers open_clip_torch ftfy wcwidth
    exit $?
fi

OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt"
PEAK=989   # dense bf16 TFLOP/s of the H100 SXM and the H200 (NVIDIA's data sheets, without sparsity)

echo "== 1. depth rehearsal on CUDA, batch 32"
timeout 220 python3 rehearse_depth.py --device cuda --batch-size 32 --grad-accum 1 --steps 10 --dir /tmp/rehearsal \
    2>&1 | tee "$OUT/rehearsal.log" | grep -v '^\s*$' | tail -n 25
cp /tmp/rehearsal/rehearsal.md "$OUT/" 2>/dev/null
cp /tmp/rehearsal/runs/depth/log.jsonl "$OUT/train_log.jsonl" 2>/dev/null

echo "== 2. bench: ours vs diffusers + peft, full SD2.1, eager and compiled"
timeout 200 python3 bench.py --config sd21 --device cuda --peak-tflops $PEAK 2>&1 | tee "$OUT/bench.log" | tail -n 25

echo "== 3. tests on CUDA"
timeout 100 python3 -m pytest -q -x -p no:cacheprovider test_train.py test_depth.py test_diff2flow.py test_lora.py \
    -k "not improves_heldout" 2>&1 | tee "$OUT/tests.log" | tail -n 15
