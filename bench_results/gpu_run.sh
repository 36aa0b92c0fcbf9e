#!/usr/bin/env bash
# The GPU measurements the README still lacks, as one script of at most 8 minutes on one H100 or H200, in order of
# value (issues 12, 17, 22, 25). From the repository root:
#     bash bench_results/gpu_run.sh             # on the GPU machine
#     bash bench_results/gpu_run.sh --dry-run   # here, on the CPU, with the tiny model: checks the script, measures nothing
# 1. train.py itself at full size: blip2-flan-t5-xl's architecture with random weights (written once to $WORK, not
#    committed) on 2,000 generated images with 5 captions each: the vision cache's build, 60 steps at the default
#    batch (eager: compiling is timed by step 3), one val evaluation of 100 images; its log has captions/s and peak
#    memory (train.py's default levers: the ViT leaves the GPU once the cache is built).
# 2. bench.py eager at batch 16 and 32: captions/s, MFU, peak memory, per-pair vs grouped vs grouped + cached; and
#    beam-5 generation both ways (generation.py's and transformers' generate(), images/s, identical captions).
# 3. bench.py compiled at batch 16 and 32 (the compile time is each mode's first_step_s; generation.py's decode step
#    compiled too, beside transformers' generate()).
# 4. bench.py eager at batch 16 for blip2-opt-2.7b's architecture: per-pair vs grouped (the prefix once per image) vs
#    grouped + cached, beside the FLOPs the CPU counted (bench_results/memory_full_opt-2.7b.json).
# Then compare: the measured peaks beside bench_results/memory_full_flan-t5-xl.json (bench.py --memory, predicted on the CPU).
# Writes bench_results/<gpu>_train.log, <gpu>_eager.json, <gpu>_compiled.json, <gpu>_eager_opt.json (and a .log
# beside each JSON).
set -uo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-/tmp/blip2-gpu-run}
if [ "${1:-}" = "--dry-run" ]; then
    size=tiny device=cpu images=40 steps=4 batches=2 repeats=1 gpu=dryrun backend=aot_eager
    limits=(120 120 120 180 120) batches_opt=2
else
    size=full device=cuda images=2000 steps=60 batches=16,32 repeats=5 backend=inductor
    gpu=$(python -c "import torch; print(torch.cuda.get_device_name().split()[-1].lower())")
    limits=(90 120 60 140 60) batches_opt=16  # seconds: 470 in all
fi
started=$(date +%s)
rm -rf "$WORK"
timeout "${limits[0]}" python bench.py --model $size --make-world "$WORK" --images $images --device $device
echo "world: exit $? ($(( $(date +%s) - started )) s)"
timeout "${limits[1]}" python train.py --model="$WORK/blip2-$size" --data_dir="$WORK/flickr8k" --out_dir="$WORK/out" \
    --device=$device --max_steps=$steps --eval_interval=$steps --eval_images=100 --final_eval=False \
    --log_interval=10 --num_workers=8 --torch_compile=False > "bench_results/${gpu}_train.log" 2>&1
echo "train: exit $? ($(( $(date +%s) - started )) s)"
common=(--model $size --device $device --dtype bfloat16 --batch-images $batches --repeats $repeats --json)
timeout "${limits[2]}" python bench.py "${common[@]}" > "bench_results/${gpu}_eager.json" 2> "bench_results/${gpu}_eager.log"
echo "eager: exit $? ($(( $(date +%s) - started )) s)"
timeout "${limits[3]}" python bench.py "${common[@]}" --compile --compile-backend $backend \
    > "bench_results/${gpu}_compiled.json" 2> "bench_results/${gpu}_compiled.log"
echo "compiled: exit $? ($(( $(date +%s) - started )) s)"
timeout "${limits[4]}" python bench.py --arch opt-2.7b "${common[@]}" --batch-images $batches_opt \
    > "bench_results/${gpu}_eager_opt.json" 2> "bench_results/${gpu}_eager_opt.log"
echo "eager opt-2.7b: exit $? ($(( $(date +%s) - started )) s)"
if [ "${1:-}" = "--dry-run" ]; then rm -f bench_results/dryrun_*; fi
