#!/usr/bin/env bash
# One GPU, at most about 8 minutes: ResNet-18 (imagenet stem) at 64 and 224 px, batch 256,
# float32 against mixed_float16 and mixed_bfloat16, XLA off and on, MixCo and MoCo.
#
#   bash benchmarks/gpu.sh [OUTPUT_DIR]     # default: runs/gpu-benchmark
#
# Writes step.jsonl (one record per configuration, see benchmarks/step.py) and step.log.
# Every setting runs in its own subprocess with a 150 s limit, so one slow setting cannot
# use up the machine's time.
set -euo pipefail
cd "$(dirname "$0")/.."
output=${1:-runs/gpu-benchmark}
mkdir -p "$output"
python -c "import tensorflow as tf; gpus = tf.config.list_physical_devices('GPU'); print('GPUs:', gpus); assert gpus, 'no GPU visible'"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$output/gpu.txt"
python -m benchmarks.step \
  --image_size=64,224 --batch_size=256 \
  --precision=float32,mixed_float16,mixed_bfloat16 --jit_compile=false,true \
  --steps=5 --warmup_steps=2 --repeats=3 --queue_size=16384 --timeout=150 \
  --output="$output/step.jsonl" 2>&1 | tee "$output/step.log"
