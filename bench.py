"""
How fast is a fine-tuning step, three ways? Random weights, no download, one run:

    python bench.py --model small                       # CPU: the architecture scaled down (257 vision tokens)
    python bench.py --model full --device cuda --dtype bfloat16 --json    # blip2-flan-t5-xl's exact shapes

(a) per_pair       one full BLIP-2 forward + backward per (image, caption) pair: the usual loop
(b) grouped        ViT, Q-Former and T5 encoder once per image, the decoder once per caption (train.py's step)
(c) grouped_cached (b) with the frozen ViT's outputs read from a cache instead of computed (train.py's default)
Each is one optimizer step as train.py takes it (its LoRA settings, frozen base in eval mode, gradient clipping,
AdamW) over the same images x 5 captions of 16 tokens. Also: beam-5 caption generation, images/s; FLOPs per caption
counted by torch.utils.flop_counter (matmuls and attention), the speedups those FLOPs predict beside the measured
ones, and on CUDA the model FLOPs utilisation against the bf16 peak.
"""
import argparse
import json
import time

import torch

import train  # its settings block: the LoRA defaults a training run uses
from lora import inject_lora
from model import autocast_context, generate_captions, grouped_caption_loss, per_pair_caption_loss, train_mode
from model import vision_embeds

CAPTIONS_PER_IMAGE, CAPTION_TOKENS, PROMPT_TOKENS = 5, 16, 4  # Flickr8k: 5 captions, ~15 words; "a photo of" + EOS
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
    from transformers import Blip2ForConditionalGeneration
    config = blip2_config(size)
    config.vision_config.initializer_range = 0.02  # random weights with signal (the default is 1e-10)
    with torch.device(device):
        model = Blip2ForConditionalGeneration(config)
    model.to(dtype)
    model.qformer.float()  # as from_pretrained does (_keep_in_fp32_modules): the Q-Former stays float32
    model.query_tokens.data = model.query_tokens.data.float()
    inject_lora(model, train.lora_targets, train.lora_r, train.lora_alpha, train.lora_dropout)
    train_mode(model)  # as train.py: adapters train (dropout on), the frozen base runs in eval mode
    return model


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
        torch.nn.utils.clip_grad_norm_(optimizer.param_groups[0]["params"], train.grad_clip)  # as train.py
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("tiny", "small", "full"), default="small")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("auto", "bfloat16", "float16", "float32"), default="auto")
    parser.add_argument("--batch-images", type=int, default=None,
                        help="images per step (default: 16 on CUDA, 4 on CPU)")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per mode (median reported)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the grouped loss (as train.py's "
                        "torch_compile); compiling is in grouped's first_step_s, not in the timings")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    device = args.device
    cuda = device.startswith("cuda")
    dtype = {"auto": torch.bfloat16 if cuda else torch.float32, "bfloat16": torch.bfloat16,
             "float16": torch.float16, "float32": torch.float32}[args.dtype]
    batch_images = args.batch_images or (16 if cuda else 4)
    repeats = args.repeats or (10 if cuda else 5)
    torch.manual_seed(0)
    model = build(args.model, device, dtype)
    batch, prompt = make_batch(model, batch_images, device)
    autocast = autocast_context(device, dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-6, fused=cuda)  # fused on CUDA, as train.py
    with torch.no_grad(), autocast:
        cached = vision_embeds(model, batch["pixel_values"]).to("cpu")
    if cuda:
        cached = cached.pin_memory()
    captions = batch_images * CAPTIONS_PER_IMAGE
    report = {"model": args.model, "device": torch.cuda.get_device_name() if cuda else "cpu",
              "dtype": str(dtype).replace("torch.", ""), "batch_images": batch_images, "captions_per_step": captions,
              "flops_counted_by": "torch.utils.flop_counter (forward + backward)"}
    flops = {}
    grouped_loss = torch.compile(grouped_caption_loss) if args.compile else grouped_caption_loss
    report["compiled"] = args.compile
    for mode in ("per_pair", "grouped", "grouped_cached"):
        flops[mode] = count_flops(step_fn(model, batch, mode, cached, optimizer, autocast)) / captions  # eager
        fn = step_fn(model, batch, mode, cached, optimizer, autocast, grouped_loss)
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        first_step = timed(fn, device, warmup=0, repeats=1)  # with --compile, grouped's first step compiles
        seconds = timed(fn, device, warmup=1, repeats=repeats)
        report[mode] = {"captions_per_s": round(captions / seconds, 1), "ms_per_step": round(1000 * seconds, 1),
                        "first_step_s": round(first_step, 2),
                        "gflops_per_caption": round(flops[mode] / 1e9, 2),
                        "peak_mem_mb": round(torch.cuda.max_memory_allocated() / 2**20) if cuda else None}
        if cuda:
            name = torch.cuda.get_device_name()
            peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)
            if peak:
                report[mode]["mfu"] = round(flops[mode] * captions / seconds / (peak * 1e12), 3)
    for mode in ("grouped", "grouped_cached"):
        report[f"speedup_{mode}"] = round(report[mode]["captions_per_s"] / report["per_pair"]["captions_per_s"], 2)
        report[f"predicted_speedup_{mode}"] = round(flops["per_pair"] / flops[mode], 2)
    model.eval()

    def generate():
        with torch.no_grad(), autocast:
            generate_captions(model, None, prompt, cached.to(device), num_beams=5, max_new_tokens=20,
                              min_new_tokens=20)
    seconds = timed(generate, device, warmup=1, repeats=max(2, repeats // 3))
    report["generation"] = {"images_per_s": round(batch_images / seconds, 1), "num_beams": 5, "new_tokens": 20,
                            "vision": "cached"}
    if cuda:
        report["epoch_seconds_projected"] = round(30000 / report["grouped_cached"]["captions_per_s"], 1)
    if args.json:
        print(json.dumps(report))
        return
    print(f"BLIP-2 {args.model} on {report['device']}, {report['dtype']}, {batch_images} images x "
          f"{CAPTIONS_PER_IMAGE} captions of {CAPTION_TOKENS} tokens per step, LoRA on the default targets"
          + (", grouped loss compiled" if args.compile else ""))
    print(f"{'mode':16s}{'captions/s':>12s}{'ms/step':>10s}{'GFLOP/caption':>15s}{'peak MB':>10s}{'MFU':>7s}"
          f"{'first step s':>14s}")
    for mode in ("per_pair", "grouped", "grouped_cached"):
        r = report[mode]
        print(f"{mode:16s}{r['captions_per_s']:12.1f}{r['ms_per_step']:10.1f}{r['gflops_per_caption']:15.2f}"
              f"{r['peak_mem_mb'] if r['peak_mem_mb'] is not None else '-':>10}{r.get('mfu', '-'):>7}"
              f"{r['first_step_s']:14.2f}")
    for mode in ("grouped", "grouped_cached"):
        print(f"speedup {mode} vs per_pair: {report[f'speedup_{mode}']}x measured, "
              f"{report[f'predicted_speedup_{mode}']}x predicted by FLOPs")
    print(f"generation (beam 5, 20 new tokens, cached vision): {report['generation']['images_per_s']} images/s")
    if cuda:
        print(f"one Flickr8k epoch (30,000 captions), grouped_cached: {report['epoch_seconds_projected']} s")


if __name__ == "__main__":
    main()
