"""
A probe, not part of the project: how much does torch.compile take off a grouped + cached step?

    python bench_results/compile_probe.py            # needs a CUDA GPU; SIZE=tiny DEV=cpu for a quick try on CPU

The same step as `bench.py --model full` mode grouped_cached (same batch, LoRA on the default targets, AdamW), with
model.grouped_caption_loss wrapped in torch.compile. Prints one line per batch size: the first call (compilation),
then the median of 5 timed steps. Its H200 output is in README "Performance".
"""
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench  # noqa: E402
from model import autocast_context, grouped_caption_loss, vision_embeds  # noqa: E402

device = os.environ.get("DEV", "cuda")
dtype = torch.bfloat16 if device == "cuda" else torch.float32
model = bench.build(os.environ.get("SIZE", "full"), device, dtype)
autocast = autocast_context(device, dtype)
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
loss_fn = torch.compile(lambda batch, embeds: grouped_caption_loss(model, batch, embeds))
results = {}
for batch_images in (16, 32):
    batch, _ = bench.make_batch(model, batch_images, device)
    with torch.no_grad(), autocast:
        cached = vision_embeds(model, batch["pixel_values"]).cpu()

    def step():
        with autocast:
            loss_sum, tokens = loss_fn(batch, cached.to(device, non_blocking=True))
        (loss_sum / tokens).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    t0 = time.time()
    step()
    bench.sync(device)
    first_call = time.time() - t0
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = bench.timed(step, device, 2, 5)
    peak = round(torch.cuda.max_memory_allocated() / 2**30, 1) if device == "cuda" else None
    results[batch_images] = {"first_call_s": round(first_call, 1), "ms": round(1000 * seconds, 1),
                             "captions_per_s": round(batch_images * 5 / seconds, 1),
                             # 158.65 GFLOP per caption: bench.py's count for the full model; 989 TFLOP/s: bf16 peak
                             "mfu": round(158.65e9 * batch_images * 5 / seconds / 989e12, 3), "peak_gb": peak}
    print(batch_images, results[batch_images], flush=True)
print(json.dumps(results))
