"""
A probe, not part of the project: where does the time of one eager grouped + cached step go on a GPU? Its output
(profile_probe_h200.txt) came from the code of its time (bench_results/README.md); the LoRA variant it times is now
lora.py's own forward.

    python bench_results/profile_probe.py       # needs a CUDA GPU (DEV=cpu SIZE=tiny for a quick try on CPU)

Times the batch-16 step of `bench.py --model full` (mode grouped_cached), profiles one step with torch.profiler
(device time, device operations, CPU time), then times a variant of LoRALinear.forward that skips the float32 input
cast under autocast, at batch 16, 32 and 64. Its H200 output is bench_results/profile_probe_h200.txt.
"""
import sys, time, json, torch
sys.path.insert(0, ".")
import torch.nn.functional as F
import bench, lora
from model import autocast_context, vision_embeds
from torch.profiler import profile, ProfilerActivity

import os
dev = os.environ.get("DEV", "cuda")
model = bench.build(os.environ.get("SIZE", "full"), dev, torch.bfloat16)
ac = autocast_context(dev, torch.bfloat16)
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
res = {}
def run(b, label, repeats=5):
    batch, _ = bench.make_batch(model, b, dev)
    with torch.no_grad(), ac:
        cached = vision_embeds(model, batch["pixel_values"]).cpu()
        cached = cached.pin_memory() if dev == "cuda" else cached
    fn = bench.step_fn(model, batch, "grouped_cached", cached, opt, ac)
    torch.cuda.reset_peak_memory_stats() if dev == "cuda" else None
    t = bench.timed(fn, dev, 2, repeats)
    res[label] = (round(1000 * t, 1), round(b * 5 / t, 1), round(torch.cuda.max_memory_allocated() / 2**30, 1) if dev == 'cuda' else 0)
    print(label, res[label], flush=True)
    return fn

fn = run(16, "base_b16")
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    fn(); bench.sync(dev)
try:
    ka = prof.key_averages()
    cuda_total = sum(e.self_device_time_total for e in ka) / 1e3
    kernels = sum(e.count for e in ka if e.self_device_time_total > 0)
    print(f"profiled step: GPU busy {cuda_total:.1f} ms, device ops {kernels}", flush=True)
    open(os.environ.get("OUT", ".") + "/prof_tables.txt", "w").write(
        ka.table(sort_by="self_device_time_total", row_limit=25) + "\n" + ka.table(sort_by="self_cpu_time_total", row_limit=25))
    print(ka.table(sort_by="self_device_time_total", row_limit=8), flush=True)
except Exception as e:
    print("profile summary failed", e)

def fwd_nocast(self, x):
    result = self.base(x)
    if torch.is_autocast_enabled(x.device.type):
        h = self.dropout(x)
    else:
        h = self.dropout(x.to(self.lora_A.dtype))
    update = F.linear(F.linear(h, self.lora_A), self.lora_B)
    return result + (update * self.scaling).to(result.dtype)
lora.LoRALinear.forward = fwd_nocast
run(16, "nocast_b16")
run(32, "nocast_b32")
run(64, "nocast_b64", repeats=3)
print(json.dumps(res))
