#!/usr/bin/env bash
# The GPU measurements the README's Performance section still lacks, as one script of about 10 minutes on one
# H100 or H200 (issue 12). Run from the repository root:   bash bench_results/gpu_run.sh
# Writes bench_results/<gpu>_eager.json and <gpu>_compiled.json, and the log of each run beside them.
set -uo pipefail
cd "$(dirname "$0")/.."
gpu=$(python -c "import torch; print(torch.cuda.get_device_name().split()[-1].lower())")
common=(--model full --device cuda --dtype bfloat16 --batch-images 16,32,64 --repeats 5 --json)
timeout 240 python bench.py "${common[@]}" > "bench_results/${gpu}_eager.json" 2> "bench_results/${gpu}_eager.log"
echo "eager: exit $?"
timeout 330 python bench.py "${common[@]}" --compile > "bench_results/${gpu}_compiled.json" \
    2> "bench_results/${gpu}_compiled.log"
echo "compiled: exit $?"
