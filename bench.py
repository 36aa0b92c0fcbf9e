"""
How fast is a fine-tuning step, three ways, and how much GPU memory does it need? Random weights, no download:

    python bench.py --model small                       # CPU: the architecture scaled down (257 vision tokens)
    python bench.py --model full --device cuda --dtype bfloat16 --batch-images 16,32,64 --json   # blip2-flan-t5-xl
    python bench.py --model full --device cuda --dtype bfloat16 --batch-images 16,32,64 --compile --json
    python bench.py --model full --memory --batch-images 8,16 --json      # peak GPU memory, predicted on the CPU
    python bench.py --model full --memory --batch-images 8,16 --base_bits 16,4 --gradient_checkpointing False,True
    python bench.py --model full --make-world /tmp/world --images 2000 --device cuda   # for train.py at full size

--memory runs train.py's step on fake tensors (memory.py) for every batch size and every combination of the levers
given (named as train.py's settings) and prints each run's predicted peak with its breakdown; nothing is timed.

(a) per_pair       one full BLIP-2 forward + backward per (image, caption) pair: the usual loop
(b) grouped        ViT, Q-Former and T5 encoder once per image, the decoder once per caption (train.py's step)
(c) grouped_cached (b) with the frozen ViT's outputs read from a cache instead of computed (train.py's default)
Each is one optimizer step as train.py takes it (its LoRA settings, frozen base in eval mode, gradient clipping,
AdamW) over the same images x 5 captions of 16 tokens. Also: beam-5 caption generation, images/s; FLOPs per caption
counted by torch.utils.flop_counter (matmuls and attention), the speedups those FLOPs predict beside the measured
ones, aten operations per step (what a launch-bound GPU step's time follows), peak memory, the projected time of a
Flickr8k epoch, and on CUDA the model FLOPs utilisation against the bf16 peak. The JSON records the commit and the
torch and transformers versions.
"""
import argparse
import json
import os
import time

import torch

import memory
from model import (autocast_context, generate_captions, grouped_caption_loss, per_pair_caption_loss,
                   separate_lm_head, train_mode, vision_embeds)
from train import SETTINGS  # its settings block: the LoRA and clipping defaults a training run uses

CAPTIONS_PER_IMAGE, CAPTION_TOKENS, PROMPT_TOKENS = 5, 16, 4  # Flickr8k: 5 captions, ~15 words; "a photo of" + EOS
EPOCH_CAPTIONS = 30_000  # Flickr8k's train split: 6,000 images x 5 captions
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16, vendors' datasheets


def blip2_config(size):
    from transformers import Blip2Config, T5Config
    if size == "tiny":
        import demo
        return demo.tiny_config(vocab_size=64, image_token_id=63)
    if size == "full":  # Salesforce/blip2-flan-t5-xl: ViT-g/14, Q-Former, Flan-T5-XL
        vision, qformer = {}, {}
        text = T5Config(vocab_size=32128, d_model=2048, d_kv=64, d_ff=5120, num_layers=24, num_decoder_layers=24,
                        num_heads=32, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    else:  # small: the same 257 vision tokens and 32 queries, widths and depths about a quarter
        vision = dict(hidden_size=352, intermediate_size=1536, num_hidden_layers=10, num_attention_heads=4)
        qformer = dict(hidden_size=192, intermediate_size=768, num_hidden_layers=3, num_attention_heads=3)
        text = T5Config(vocab_size=32128, d_model=512, d_kv=64, d_ff=1280, num_layers=6, num_decoder_layers=6,
                        num_heads=8, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    text.decoder_start_token_id, text.pad_token_id, text.eos_token_id = 0, 0, 1
    return Blip2Config(vision_config=vision, qformer_config=qformer, text_config=text, num_query_tokens=32,
                       image_token_id=32100)


def build(size, device, dtype):
    config = blip2_config(size)
    config.vision_config.initializer_range = 0.02  # random weights with signal (the default is 1e-10)
    # small and full stand for blip2-flan-t5-xl, whose checkpoint has its own lm_head; tiny is the demo's, which has not
    return memory.train_ready(config, device, dtype, SETTINGS, own_lm_head=size != "tiny")


def make_world(root, size, images, device):
    """A collection and a model folder for running train.py itself at `size` (bench_results/gpu_run.sh): random
    weights in the real architecture saved with save_pretrained, the demo's tokenizer and drawings at the ViT's
    image size, `images` images with five captions each (90/5/5 train/val/test). Measures speed, not quality."""
    import random
    import demo
    from transformers import Blip2ForConditionalGeneration
    config = blip2_config(size)
    processor = demo.build_processor(config.vision_config.image_size, config.num_query_tokens)
    config.image_token_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    config.vision_config.initializer_range = 0.02  # random weights with signal (the default is 1e-10)
    torch.manual_seed(0)
    with torch.device(device):
        model = Blip2ForConditionalGeneration(config).to(torch.bfloat16 if size == "full" else torch.float32)
        if size != "tiny":  # an lm_head of its own, as blip2-flan-t5-xl's (other values: loading keeps it apart)
            separate_lm_head(model)
            torch.nn.init.normal_(model.language_model.lm_head.weight)
    model.save_pretrained(os.path.join(root, f"blip2-{size}"))
    processor.save_pretrained(os.path.join(root, f"blip2-{size}"))
    held_out = max(1, images // 20)
    demo.build_dataset(os.path.join(root, "flickr8k"), random.Random(8), images,
                       (images - 2 * held_out, held_out, held_out))
    print(f"{root}: blip2-{size}/ (random weights) and flickr8k/ ({images} images)")


def make_batch(model, batch_images, device):
    config, g = model.config, torch.Generator().manual_seed(0)
    size, words = config.vision_config.image_size, min(1000, config.text_config.vocab_size - 1)
    prompt = [config.image_token_id] * config.num_query_tokens + torch.randint(2, words, (PROMPT_TOKENS - 1,),
                                                                                 generator=g).tolist() + [1]
    n = batch_images * CAPTIONS_PER_IMAGE
    labels = torch.randint(2, words, (n, CAPTION_TOKENS), generator=g)
    labels[:, -1] = 1  # EOS
    batch = {"pixel_values": torch.randn(batch_images, 3, size, size, generator=g),
             "input_ids": torch.tensor(prompt).expand(batch_images, -1).clone(),
             "attention_mask": torch.ones(batch_images, len(prompt), dtype=torch.long),
             "labels": labels, "caption_image": torch.arange(batch_images).repeat_interleave(CAPTIONS_PER_IMAGE)}
    return {k: v.to(device) for k, v in batch.items()}, prompt


def step_fn(model, batch, mode, cached_embeds, optimizer, autocast, grouped_loss=grouped_caption_loss):
    """One optimizer step in the given mode; returns the loss."""
    def run():
        with autocast:
            if mode == "per_pair":
                loss_sum, tokens = per_pair_caption_loss(model, batch)
            else:
                if mode == "grouped_cached":
                    # as train.py: the cache lives in (memory-mapped) host memory and is copied in each step
                    image_embeds = cached_embeds.to(batch["labels"].device, non_blocking=True)
                else:
                    with torch.no_grad():
                        image_embeds = vision_embeds(model, batch["pixel_values"])
                loss_sum, tokens = grouped_loss(model, batch, image_embeds)
        (loss_sum / tokens).backward()
        torch.nn.utils.clip_grad_norm_(optimizer.param_groups[0]["params"], SETTINGS["grad_clip"])  # as train.py
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss_sum / tokens
    return run


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device, warmup, repeats):
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]  # the median


def count_flops(fn):
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def count_ops(fn):
    """aten operations dispatched by one call of fn (one eager optimizer step). A GPU step that is launch-bound takes
    time in proportion to this count, not to its FLOPs."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops += 1
            return func(*args, **(kwargs or {}))
    with Counter() as counter:
        fn()
    return counter.ops


def provenance():
    """What produced the figures: the commit (with '+changes' if the tree differs from it) and the versions."""
    import subprocess
    import transformers
    def git(*args):
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10).stdout.strip()
        except OSError:
            return ""
    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return {"commit": commit + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else ""),
            "torch": torch.__version__, "transformers": transformers.__version__}


def measure(model, batch_images, device, dtype, repeats, grouped_loss):
    """One batch size: every mode's speed, memory, FLOPs and operation count, and beam-search generation."""
    cuda = device.startswith("cuda")
    batch, prompt = make_batch(model, batch_images, device)
    autocast = autocast_context(device, dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-6, fused=cuda)  # fused on CUDA, as train.py
    train_mode(model)
    with torch.no_grad(), autocast:
        cached = vision_embeds(model, batch["pixel_values"]).to("cpu")
    if cuda:
        cached = cached.pin_memory()
    captions = batch_images * CAPTIONS_PER_IMAGE
    run, flops = {"batch_images": batch_images, "captions_per_step": captions}, {}
    peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in torch.cuda.get_device_name()), None) if cuda else None
    for mode in ("per_pair", "grouped", "grouped_cached"):
        eager = step_fn(model, batch, mode, cached, optimizer, autocast)
        fn = step_fn(model, batch, mode, cached, optimizer, autocast, grouped_loss)
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            flops[mode] = count_flops(eager) / captions
            ops = count_ops(eager)
            first_step = timed(fn, device, warmup=0, repeats=1)  # with --compile, grouped's first step compiles
            seconds = timed(fn, device, warmup=1, repeats=repeats)
        except torch.cuda.OutOfMemoryError:  # a batch too large for this GPU: say so, measure the rest
            optimizer.zero_grad(set_to_none=True)
            run[mode] = {"error": "out of memory"}
            continue
        run[mode] = {"captions_per_s": round(captions / seconds, 1), "ms_per_step": round(1000 * seconds, 1),
                     "first_step_s": round(first_step, 2), "gflops_per_caption": round(flops[mode] / 1e9, 2),
                     "ops_per_step": ops,
                     "peak_mem_mb": round(torch.cuda.max_memory_allocated() / 2**20) if cuda else None}
        if peak:
            run[mode]["mfu"] = round(flops[mode] * captions / seconds / (peak * 1e12), 3)
    for mode in ("grouped", "grouped_cached"):
        if "error" not in run[mode] and "error" not in run["per_pair"]:
            run[f"speedup_{mode}"] = round(run[mode]["captions_per_s"] / run["per_pair"]["captions_per_s"], 2)
            run[f"predicted_speedup_{mode}"] = round(flops["per_pair"] / flops[mode], 2)
    if "error" not in run["grouped_cached"]:
        run["epoch_seconds_projected"] = round(EPOCH_CAPTIONS / run["grouped_cached"]["captions_per_s"], 1)
    model.eval()

    def generate():
        with torch.no_grad(), autocast:
            generate_captions(model, None, prompt, cached.to(device), num_beams=5, max_new_tokens=20,
                              min_new_tokens=20)
    seconds = timed(generate, device, warmup=1, repeats=max(2, repeats // 3))
    run["generation"] = {"images_per_s": round(batch_images / seconds, 1), "num_beams": 5, "new_tokens": 20,
                         "vision": "cached"}
    return run


def batch_list(text):
    try:
        sizes = [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be at least 1, got {text!r}")
    return sizes


def print_run(run):
    print(f"\nbatch {run['batch_images']} images x {CAPTIONS_PER_IMAGE} captions of {CAPTION_TOKENS} tokens")
    print(f"{'mode':16s}{'captions/s':>12s}{'ms/step':>10s}{'GFLOP/caption':>15s}{'ops/step':>10s}{'peak MB':>10s}"
          f"{'MFU':>7s}{'first step s':>14s}")
    for mode in ("per_pair", "grouped", "grouped_cached"):
        r = run[mode]
        if "error" in r:
            print(f"{mode:16s}{r['error']}")
            continue
        print(f"{mode:16s}{r['captions_per_s']:12.1f}{r['ms_per_step']:10.1f}{r['gflops_per_caption']:15.2f}"
              f"{r['ops_per_step']:10,d}{r['peak_mem_mb'] if r['peak_mem_mb'] is not None else '-':>10}"
              f"{r.get('mfu', '-'):>7}{r['first_step_s']:14.2f}")
    for mode in ("grouped", "grouped_cached"):
        if f"speedup_{mode}" in run:
            print(f"speedup {mode} vs per_pair: {run[f'speedup_{mode}']}x measured, "
                  f"{run[f'predicted_speedup_{mode}']}x predicted by FLOPs")
    print(f"generation (beam 5, 20 new tokens, cached vision): {run['generation']['images_per_s']} images/s")
    if "epoch_seconds_projected" in run:
        print(f"one Flickr8k epoch ({EPOCH_CAPTIONS:,} captions), grouped_cached: {run['epoch_seconds_projected']} s")


def choices(kind, allowed):
    """An option that takes one value or several separated by commas: every combination is predicted."""
    def parse(text):
        values = [kind(v) for v in text.split(",")]
        if not values or any(v not in allowed for v in values):
            raise argparse.ArgumentTypeError(f"expected {', '.join(map(str, allowed))}, got {text!r}")
        return values
    parse.__name__ = kind.__name__
    return parse


def boolean(text):
    if text.lower() not in ("true", "false"):
        raise ValueError(text)
    return text.lower() == "true"


def predict_memory(args, dtype):
    """--memory: the predicted peak of each batch size and lever combination, in GB (1e9 bytes)."""
    import itertools
    config = blip2_config(args.model)
    runs = []
    for batch_images, bits, checkpointing, vision_on_gpu in itertools.product(
            args.batch_images or [16], args.base_bits, args.gradient_checkpointing, args.vision_on_gpu):
        shapes = type("Shapes", (), {"config": config})()
        batch, _ = make_batch(shapes, batch_images, "cpu")
        batch.pop("pixel_values")  # train.py's default step reads the ViT's outputs from the vision cache
        levers = memory.Levers(bits, checkpointing, vision_on_gpu)
        counted = memory.predict(config, batch, dtype, levers, SETTINGS, eval_batch=args.eval_batch,
                                 own_lm_head=args.model != "tiny")
        runs.append({"batch_images": batch_images, "base_bits": bits, "gradient_checkpointing": checkpointing,
                     "vision_on_gpu": vision_on_gpu, "eval_batch": args.eval_batch,
                     **{f"{k}_gb": round(v / 1e9, 4) for k, v in counted.items() if k != "seconds"},
                     "seconds": counted["seconds"]})
        if not args.json:
            print_memory_run(runs[-1])
    return runs


def print_memory_run(run):
    print(f"batch {run['batch_images']:3d}  base_bits {run['base_bits']:2d}  gradient_checkpointing "
          f"{str(run['gradient_checkpointing']):5s}  vision_on_gpu {str(run['vision_on_gpu']):5s}:  peak "
          f"{run['predicted_peak_gb']:6.2f} GB = weights {run['frozen_weights_gb']:.2f} + LoRA, grads, AdamW "
          f"{run['lora_weights_grads_adamw_gb']:.2f} + activations {run['activations_peak_gb']:.2f};  beam-5 "
          f"generation at batch {run['eval_batch']}: {run['generation_peak_gb']:.2f} GB  ({run['seconds']} s)")


def parse_arguments(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("tiny", "small", "full"), default="small")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("auto", "bfloat16", "float16", "float32"), default="auto")
    parser.add_argument("--batch-images", type=batch_list, default=None,
                        help="images per step, one size or several: 16,32,64 (default: 16 on CUDA, 4 on CPU)")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per mode (median reported)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the grouped loss (as train.py on "
                        "CUDA); compiling is in grouped's first_step_s, not in the timings")
    parser.add_argument("--compile-mode", default="default", choices=("default", "reduce-overhead", "max-autotune"),
                        help="torch.compile mode; reduce-overhead adds CUDA graphs")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend (aot_eager: a quick "
                        "check that compiling works, as gpu_run.sh --dry-run does)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--memory", action="store_true", help="predict the peak GPU memory on the CPU (memory.py) "
                        "instead of timing; bf16 unless --dtype says otherwise")
    parser.add_argument("--base_bits", "--base-bits", type=choices(int, (16, 8, 4)), default=[16])
    parser.add_argument("--gradient_checkpointing", "--gradient-checkpointing", type=choices(boolean, (False, True)),
                        default=[False])
    parser.add_argument("--vision_on_gpu", "--vision-on-gpu", type=choices(boolean, (False, True)), default=[False])
    parser.add_argument("--eval-batch", type=int, default=32, help="--memory: images per beam-search batch")
    parser.add_argument("--make-world", metavar="DIR", help="write a random-weight model of --model's size and a "
                        "generated collection into DIR, for timing train.py itself; then exit")
    parser.add_argument("--images", type=int, default=2000, help="--make-world: how many images")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_arguments(argv)
    if args.make_world:
        return make_world(args.make_world, args.model, args.images, args.device)
    device = args.device
    cuda = device.startswith("cuda") or args.memory  # a memory prediction is for a GPU: bf16 by default
    dtype = {"auto": torch.bfloat16 if cuda else torch.float32, "bfloat16": torch.bfloat16,
             "float16": torch.float16, "float32": torch.float32}[args.dtype]
    if args.memory:
        report = {"model": args.model, "dtype": str(dtype).replace("torch.", ""), **provenance(),
                  "counted_by": "memory.py: train.py's step on fake tensors, live tensor storages counted once each",
                  "not_counted": "the CUDA context, allocator rounding and fragmentation, cuBLAS workspaces"}
        report["runs"] = predict_memory(args, dtype)
        if args.json:
            print(json.dumps(report))
        return
    repeats = args.repeats or (10 if cuda else 5)
    torch.manual_seed(0)
    model = build(args.model, device, dtype)
    mode = {"mode": args.compile_mode} if args.compile_backend == "inductor" else {}
    grouped_loss = (torch.compile(grouped_caption_loss, fullgraph=True, backend=args.compile_backend, **mode)
                    if args.compile else grouped_caption_loss)
    report = {"model": args.model, "device": torch.cuda.get_device_name() if cuda else "cpu",
              "dtype": str(dtype).replace("torch.", ""), "compiled": args.compile,
              "compile_mode": args.compile_mode if args.compile else None, **provenance(),
              "flops_counted_by": "torch.utils.flop_counter (forward + backward)",
              "ops_counted_by": "TorchDispatchMode: aten operations in one eager optimizer step"}
    if not args.json:
        print(f"BLIP-2 {args.model} on {report['device']}, {report['dtype']}, LoRA on the default targets"
              + (f", grouped loss compiled ({args.compile_mode})" if args.compile else "")
              + f"; commit {report['commit']}, torch {report['torch']}, transformers {report['transformers']}")
    report["runs"] = []
    for batch_images in args.batch_images or [16 if cuda else 4]:
        report["runs"].append(measure(model, batch_images, device, dtype, repeats, grouped_loss))
        if not args.json:
            print_run(report["runs"][-1])
    if args.json:
        print(json.dumps(report))


if __name__ == "__main__":
    main()
