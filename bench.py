"""
How fast is a fine-tuning step, three ways, and how much GPU memory does it need? Random weights, no download:

    python bench.py --model small                       # CPU: blip2-flan-t5-xl's architecture scaled down
    python bench.py --arch opt-2.7b --model small       # the same for blip2-opt-2.7b
    python bench.py --model full --device cuda --dtype bfloat16 --batch-images 16,32,64 --json   # blip2-flan-t5-xl
    python bench.py --model full --device cuda --dtype bfloat16 --batch-images 16,32,64 --compile --json
    python bench.py --model full --memory --batch-images 8,16 --json      # peak GPU memory, predicted on the CPU
    python bench.py --model full --memory --batch-images 8,16 --base_bits 16,4 --gradient_checkpointing False,True
    python bench.py --arch opt-6.7b --model full --memory --data my_photos   # the step's shape from your captions
    python bench.py --model full --make-world /tmp/world --images 2000 --device cuda   # for train.py at full size

--arch names the checkpoint whose architecture is built (flan-t5-xl, flan-t5-xxl, opt-2.7b, opt-6.7b): at --model full
with its real configuration (t5.SIZES, opt.SIZES), at small and tiny scaled down in the same family.
--memory runs train.py's step on fake tensors (memory.py) for every batch size and every combination of the levers
given (named as train.py's settings) and prints each run's predicted peak with its breakdown and its FLOPs per
caption; nothing is timed. The step's shape is Flickr8k's (5 captions of 16 tokens per image) unless --data DIR or
--captions-per-image and --caption-tokens say otherwise.

(a) per_pair       one full BLIP-2 forward + backward per (image, caption) pair: the usual loop
(b) grouped        ViT, Q-Former and what depends only on the image (T5's encoder and cross-attention keys and
                   values, OPT's prefix) once per image, the rest once per caption (train.py's step)
(c) grouped_cached (b) with the frozen ViT's outputs read from a cache instead of computed (train.py's default)
Each is one optimizer step as train.py takes it (train.train_step with train.make_optimizer's AdamW and scaler, its
LoRA settings, frozen base in eval mode, gradient clipping) over the same images x 5 captions of 16 tokens. Also:
beam-5 caption generation, images/s; FLOPs per caption counted by torch.utils.flop_counter (matmuls and attention),
the speedups those FLOPs predict beside the measured ones, aten operations per step (what a launch-bound GPU step's
time follows), peak memory, the projected time of a Flickr8k epoch, and on CUDA the model FLOPs utilisation against
the bf16 peak. The JSON records the commit and the
torch and transformers versions.
"""
import argparse
import json
import os
import time
from dataclasses import dataclass

import torch

import train
from blip2lora import llama, memory, opt, t5
from blip2lora.blip2 import autocast_context, model_inputs, train_mode, vision_embeds
from blip2lora.files import UserError, one_line_errors
from blip2lora.generation import caption_tokens
from blip2lora.model import family, generate_captions, grouped_caption_loss, model_class, per_pair_caption_loss
from train import SETTINGS  # its settings block: the LoRA, clipping and optimizer defaults a training run uses
from data import add_collection_arguments

ARCHS = {"flan-t5-xl": (t5, "Salesforce/blip2-flan-t5-xl"), "flan-t5-xxl": (t5, "Salesforce/blip2-flan-t5-xxl"),
         "opt-2.7b": (opt, "Salesforce/blip2-opt-2.7b"), "opt-6.7b": (opt, "Salesforce/blip2-opt-6.7b"),
         "instructblip-flan-t5-xl": (t5, "Salesforce/instructblip-flan-t5-xl"),
         "instructblip-flan-t5-xxl": (t5, "Salesforce/instructblip-flan-t5-xxl"),
         "instructblip-vicuna-7b": (llama, "Salesforce/instructblip-vicuna-7b"),
         "instructblip-vicuna-13b": (llama, "Salesforce/instructblip-vicuna-13b")}
INSTRUCTBLIP = "instructblip-"  # an arch named so is InstructBLIP with the language model named after it
PROMPT_TOKENS = 4  # "a photo of" + T5's end token, or OPT's BOS + "a photo of"
# Generation as timed here: beam 5, always 20 new tokens (the end token is held off until then), so that every run
# writes the same number of tokens whatever the random weights prefer.
GENERATION = {"num_beams": 5, "max_new_tokens": 20, "min_new_tokens": 20}
EPOCH_CAPTIONS = 30_000  # Flickr8k's train split: 6,000 images x 5 captions
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16, vendors' datasheets


@dataclass
class StepShape:
    """How many captions each image has and how long they are, in tokens with the end token: what a step's cost and
    memory grow with. Flickr8k's by default: 5 captions of about 15 words."""
    captions_per_image: int = 5
    caption_tokens: int = 16
    source: str = "Flickr8k's (the default)"


def blip2_config(size, arch="flan-t5-xl"):
    """BLIP-2 (or InstructBLIP) with the language model of `arch`: at full size as released, else a stand-in of the
    same family."""
    from transformers import Blip2Config, InstructBlipConfig
    import demo
    lm, instruct = ARCHS[arch][0], arch.startswith(INSTRUCTBLIP)
    if size == "tiny":  # the demo's base, with its processor's vocabulary
        return demo.processor_config(demo.build_processor(lm=lm, instruct=instruct), lm)
    if size == "full":  # ViT-g/14 and the Q-Former with transformers' defaults, which are the released ones
        vision, qformer = {}, {}
    else:  # small: the same 257 vision tokens and 32 queries, widths and depths about a quarter
        vision = dict(hidden_size=352, intermediate_size=1536, num_hidden_layers=10, num_attention_heads=4)
        qformer = dict(hidden_size=192, intermediate_size=768, num_hidden_layers=3, num_attention_heads=3)
    text = lm.text_config(arch.removeprefix(INSTRUCTBLIP) if size == "full" else "small")
    if instruct:  # its Q-Former has word embeddings for the instruction: BERT's vocabulary and [DEC], 30,523
        return InstructBlipConfig(vision_config=vision, qformer_config={**qformer, "vocab_size": 30523},
                                  text_config=text, num_query_tokens=32, image_token_id=lm.IMAGE_TOKEN_ID)
    return Blip2Config(vision_config=vision, qformer_config=qformer, text_config=text, num_query_tokens=32,
                       image_token_id=lm.IMAGE_TOKEN_ID)


def build(size, device, dtype, arch="flan-t5-xl"):
    config = blip2_config(size, arch)
    config.vision_config.initializer_range = 0.02  # random weights with signal (the default is 1e-10)
    # small and full stand for a released checkpoint (t5.as_released: Flan-T5's own lm_head); tiny for the demo's base
    return memory.train_ready(config, device, dtype, SETTINGS, released=size != "tiny")


def make_world(root, size, images, device, arch="flan-t5-xl"):
    """A collection and a model folder for running train.py itself at `size` (bench_results/gpu_run.sh): random
    weights in the real architecture saved with save_pretrained, the demo's tokenizer and drawings at the ViT's
    image size, `images` images with five captions each (90/5/5 train/val/test). Measures speed, not quality."""
    import random
    import demo
    lm = ARCHS[arch][0]
    config = blip2_config(size, arch)
    processor = demo.build_processor(config.vision_config.image_size, config.num_query_tokens, lm,
                                     instruct=arch.startswith(INSTRUCTBLIP))
    config.image_token_id, config.text_config.eos_token_id = demo.special_ids(processor, lm)
    config.vision_config.initializer_range = 0.02  # random weights with signal (the default is 1e-10)
    torch.manual_seed(0)
    with torch.device(device):
        model = model_class(config)(config).to(torch.bfloat16 if size == "full" else torch.float32)
        if size != "tiny":  # the weights laid out as the checkpoint's: blip2-flan-t5-xl has an lm_head of its own
            lm.as_released(model)
        if model.language_model.lm_head.weight is not model.get_input_embeddings().weight:
            torch.nn.init.normal_(model.language_model.lm_head.weight)  # other values: loading keeps it apart
    name = f"blip2-{size}" + ("" if arch == "flan-t5-xl" else f"-{arch}")
    model.save_pretrained(os.path.join(root, name))
    processor.save_pretrained(os.path.join(root, name))
    held_out = max(1, images // 20)
    demo.build_dataset(os.path.join(root, "flickr8k"), random.Random(8), images,
                       (images - 2 * held_out, held_out, held_out))
    print(f"{root}: {name}/ (random weights) and flickr8k/ ({images} images)")


def make_batch(config, batch_images, device, shape=StepShape()):
    """Random images and captions in the shape of a train.py batch: B images, each with shape.captions_per_image
    captions of shape.caption_tokens tokens ending in the end token."""
    g = torch.Generator().manual_seed(0)
    size, words = config.vision_config.image_size, min(1000, config.text_config.vocab_size - 1)
    prompt = [config.image_token_id] * config.num_query_tokens + torch.randint(2, words, (PROMPT_TOKENS,),
                                                                                 generator=g).tolist()
    n = batch_images * shape.captions_per_image
    labels = torch.randint(2, words, (n, shape.caption_tokens), generator=g)
    labels[:, -1] = config.text_config.eos_token_id
    batch = {"pixel_values": torch.randn(batch_images, 3, size, size, generator=g),
             "input_ids": torch.tensor(prompt).expand(batch_images, -1).clone(),
             "attention_mask": torch.ones(batch_images, len(prompt), dtype=torch.long),
             "labels": labels,
             "caption_image": torch.arange(batch_images).repeat_interleave(shape.captions_per_image)}
    return {k: v.to(device) for k, v in batch.items()}, prompt


def step_fn(model, batch, mode, cached_embeds, device, dtype, grouped_loss=grouped_caption_loss):
    """train.py's step (train.train_step) in the given mode, with its optimizer and scaler (train.make_optimizer):
    a function taking one step. The optimizer and scaler are attributes of it."""
    def per_pair_loss(model, batch, _):
        return per_pair_caption_loss(model, batch)

    def image_embeds(batch):
        if mode == "grouped_cached":  # as train.py: the cache lives in (memory-mapped) host memory, copied in
            return cached_embeds.to(batch["labels"].device, non_blocking=True)
        with torch.no_grad():
            return vision_embeds(model, batch["pixel_values"])
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    optimizer, scaler = train.make_optimizer(model, SETTINGS["learning_rate"], SETTINGS["weight_decay"],
                                             device_type, dtype)
    loss = per_pair_loss if mode == "per_pair" else grouped_loss

    def run():
        return train.train_step(model, [batch], loss, image_embeds, optimizer, scaler,
                                autocast_context(device, dtype), SETTINGS["grad_clip"])
    run.optimizer, run.scaler = optimizer, scaler
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


def measure(model, batch_images, device, dtype, repeats, grouped_loss, compiled=False):
    """One batch size: every mode's speed, memory, FLOPs and operation count, and beam-search generation."""
    cuda = device.startswith("cuda")
    batch, prompt = make_batch(model.config, batch_images, device)
    autocast = autocast_context(device, dtype)
    train_mode(model)
    with torch.no_grad(), autocast:
        cached = vision_embeds(model, batch["pixel_values"]).to("cpu")
    if cuda:
        cached = cached.pin_memory()
    shape = StepShape()
    captions = batch_images * shape.captions_per_image
    run = {"batch_images": batch_images, "captions_per_step": captions, "caption_tokens": shape.caption_tokens}
    flops = {}
    peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in torch.cuda.get_device_name()), None) if cuda else None
    for mode in ("per_pair", "grouped", "grouped_cached"):
        eager = step_fn(model, batch, mode, cached, device, dtype)
        fn = step_fn(model, batch, mode, cached, device, dtype, grouped_loss)
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            flops[mode] = count_flops(eager) / captions
            ops = count_ops(eager)
            first_step = timed(fn, device, warmup=0, repeats=1)  # with --compile, grouped's first step compiles
            seconds = timed(fn, device, warmup=1, repeats=repeats)
        except torch.cuda.OutOfMemoryError:  # a batch too large for this GPU: say so, measure the rest
            model.zero_grad(set_to_none=True)
            run[mode] = {"error": "out of memory"}
            continue
        run[mode] = {"captions_per_s": round(captions / seconds, 1), "ms_per_step": round(1000 * seconds, 1),
                     "first_step_s": round(first_step, 2), "gflops_per_caption": round(flops[mode] / 1e9, 4),
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
    run["generation"] = measure_generation(model, batch, prompt, device, dtype, max(2, repeats // 3), compiled)
    return run


def measure_generation(model, batch, prompt, device, dtype, repeats, compiled):
    """Beam-5 captions of the batch's images from their pixels, both ways, side by side: the project's path
    (model.generate_captions: the ViT, as caption.py runs it on new images, then generation.py's search with the
    image side once per image; its decode step compiled with --compile) and model.generate(pixel_values=...,
    input_ids=...) as a transformers user writes it. Speed, FLOPs per image, aten operations per new token, and
    whether the captions are the same; and the project's path from the vision cache, as train.py's evaluations run."""
    autocast, lm, images = autocast_context(device, dtype), family(model.config), batch["pixel_values"].shape[0]
    with torch.no_grad(), autocast:
        cached = vision_embeds(model, batch["pixel_values"])

    def ours(embeds=None, compile=compiled):
        with torch.no_grad(), autocast:
            embeds = vision_embeds(model, batch["pixel_values"]) if embeds is None else embeds
            return generate_captions(model, None, prompt, embeds, compile=compile, **GENERATION)

    def theirs():
        with torch.no_grad(), autocast:
            output = model.generate(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"],
                                    attention_mask=batch["attention_mask"], **GENERATION,
                                    **model_inputs(model, len(batch["input_ids"])))  # InstructBLIP's instruction
        return lm.new_tokens(output, batch["input_ids"])
    eos = model.config.text_config.eos_token_id
    same = [a == b for a, b in zip(caption_tokens(ours(), eos), caption_tokens(theirs(), eos))]
    result = {"captions_compared": len(same), "captions_identical": sum(same)}
    for prefix, generate, eager in (("", ours, lambda: ours(compile=False)), ("transformers_", theirs, theirs)):
        seconds = timed(generate, device, warmup=1, repeats=repeats)
        result[f"{prefix}images_per_s"] = round(images / seconds, 2)
        # counted on the eager path, as the step's are: a dispatch mode cannot run inside a compiled graph
        result[f"{prefix}gflops_per_image"] = round(count_flops(eager) / images / 1e9, 3)
        result[f"{prefix}ops_per_new_token"] = round(count_ops(eager) / GENERATION["max_new_tokens"])
    result["speedup"] = round(result["images_per_s"] / result["transformers_images_per_s"], 2)
    result["cached_images_per_s"] = round(images / timed(lambda: ours(cached), device, warmup=1, repeats=repeats), 2)
    return {**result, **GENERATION, "compiled": compiled, "vision": "computed from the pixels, both ways"}


def batch_list(text):
    try:
        sizes = [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be at least 1, got {text!r}")
    return sizes


def print_run(run):
    print(f"\nbatch {run['batch_images']} images, {run['captions_per_step']} captions of {run['caption_tokens']} "
          "tokens")
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
    g = run["generation"]
    print(f"generation (beam 5, 20 new tokens, from pixels): {g['images_per_s']} images/s, transformers' generate() "
          f"{g['transformers_images_per_s']} ({g['speedup']}x); {g['gflops_per_image']} vs "
          f"{g['transformers_gflops_per_image']} GFLOP/image, {g['ops_per_new_token']:,} vs "
          f"{g['transformers_ops_per_new_token']:,} operations per new token; captions identical: "
          f"{g['captions_identical']} of {g['captions_compared']}; from the vision cache: {g['cached_images_per_s']} "
          "images/s")
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


def predict_memory(args, dtype, shape):
    """--memory: the predicted peak of each batch size and lever combination, in GB (1e9 bytes), and the step's
    FLOPs per caption."""
    import itertools
    config = blip2_config(args.model, args.arch)
    runs = []
    for batch_images, bits, checkpointing, vision_on_gpu in itertools.product(
            args.batch_images or [16], args.base_bits, args.gradient_checkpointing, args.vision_on_gpu):
        batch, _ = make_batch(config, batch_images, "cpu", shape)  # the step itself reads the ViT's outputs cached
        levers = memory.Levers(bits, checkpointing, vision_on_gpu)
        counted = memory.predict(config, batch, dtype, levers, SETTINGS, train.train_step,
                                 eval_batch=args.eval_batch, released=args.model != "tiny", flops=True)
        flops = {name: counted.pop(f"{name}_flops") / 1e9 / len(batch["labels"]) for name in ("step", "per_pair")}
        runs.append({"batch_images": batch_images, "base_bits": bits, "gradient_checkpointing": checkpointing,
                     "vision_on_gpu": vision_on_gpu, "eval_batch": args.eval_batch,
                     **{f"{k}_gb": round(v / 1e9, 4) for k, v in counted.items() if k != "seconds"},
                     "gflops_per_caption": round(flops["step"], 4),
                     "per_pair_gflops_per_caption": round(flops["per_pair"], 4), "seconds": counted["seconds"]})
        if not args.json:
            print_memory_run(runs[-1])
    return runs


def print_memory_run(run):
    print(f"batch {run['batch_images']:3d}  base_bits {run['base_bits']:2d}  gradient_checkpointing "
          f"{str(run['gradient_checkpointing']):5s}  vision_on_gpu {str(run['vision_on_gpu']):5s}:  peak "
          f"{run['predicted_peak_gb']:6.2f} GB = weights {run['frozen_weights_gb']:.2f} + LoRA, grads, AdamW "
          f"{run['lora_weights_grads_adamw_gb']:.2f} + activations {run['activations_peak_gb']:.2f};  beam-5 "
          f"generation at batch {run['eval_batch']}: {run['generation_peak_gb']:.2f} GB;  "
          f"{run['gflops_per_caption']:.1f} GFLOP/caption (per pair: {run['per_pair_gflops_per_caption']:.1f})  "
          f"({run['seconds']} s)")


def step_shape(args):
    """The step's shape for --memory: from a collection (--data), from --captions-per-image / --caption-tokens, or
    Flickr8k's; a collection's caption lengths are its 95th percentile in tokens, cut at max_caption_tokens."""
    if not args.data:
        default = StepShape()
        given = StepShape(args.captions_per_image or default.captions_per_image,
                          args.caption_tokens or default.caption_tokens)
        return default if given == default else StepShape(given.captions_per_image, given.caption_tokens,
                                                           "--captions-per-image and --caption-tokens")
    from data import clean_caption, read_captions
    items = read_captions(args.data, args.caption_column, args.image_column, args.symlinks_out).splits["train"]
    if not items:
        raise UserError(f"{args.data}: no train images to take the step's shape from")
    captions = [clean_caption(c) for item in items for c in item.captions]
    per_image = max(1, round(len(captions) / len(items)))
    lengths, how = caption_lengths(captions, args.arch, args.model)
    longest = SETTINGS["max_caption_tokens"]
    tokens = min(longest, sorted(lengths)[int(0.95 * (len(lengths) - 1))])
    return StepShape(per_image, tokens, f"{args.data}: {per_image} captions per image (mean), {tokens} tokens (95th "
                                        f"percentile, {how}, at most max_caption_tokens={longest})")


def caption_lengths(captions, arch, size):
    """Each caption's length in the arch's tokens with its end token: by its own tokenizer where one is at hand (the
    demo's for tiny; the checkpoint's if it is in the local Hugging Face cache), else estimated from words."""
    from blip2lora.model import caption_tokenizer
    lm, hub_id = ARCHS[arch]
    try:
        if size == "tiny":
            import demo
            tokenizer = demo.build_processor(lm=lm).tokenizer
        else:
            from transformers import AutoTokenizer
            tokenizer = AutoTokenizer.from_pretrained(hub_id, local_files_only=True)
    except OSError:
        # no tokenizer at hand: about 1.3 tokens a word, a rough rate of subword tokenizers on English text
        return [round(1.3 * len(c.split())) + 1 for c in captions], "estimated as 1.3 tokens a word: no tokenizer " \
            f"of {hub_id} in the local cache"
    config = blip2_config("tiny" if size == "tiny" else "full", arch)
    return [len(ids) for ids in caption_tokenizer(tokenizer, config)(captions)], "by its tokenizer"


def parse_arguments(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("tiny", "small", "full"), default="small",
                        help="full: the checkpoint's own architecture; small, tiny: scaled down in the same family")
    parser.add_argument("--arch", choices=tuple(ARCHS), default="flan-t5-xl", help="the BLIP-2 checkpoint whose "
                        "architecture is built: " + ", ".join(f"{k} ({v[1]})" for k, v in ARCHS.items()))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("auto", "bfloat16", "float16", "float32"), default="auto")
    parser.add_argument("--batch-images", type=batch_list, default=None,
                        help="images per step, one size or several: 16,32,64 (default: 16 on CUDA, 4 on CPU)")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per mode (median reported)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the grouped loss and generation's "
                        "decode step (as train.py on CUDA); compiling is in grouped's first_step_s, not in the "
                        "timings")
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
    parser.add_argument("--data", help="--memory: take the step's shape (captions per image, their length in tokens at "
                        "the 95th percentile) from this collection's train split")
    add_collection_arguments(parser)
    parser.add_argument("--captions-per-image", type=int, help="--memory: captions per image (default 5, Flickr8k's)")
    parser.add_argument("--caption-tokens", type=int, help="--memory: tokens per caption with its end token (default "
                        "16, Flickr8k's)")
    parser.add_argument("--make-world", metavar="DIR", help="write a random-weight model of --model's size and a "
                        "generated collection into DIR, for timing train.py itself; then exit")
    parser.add_argument("--images", type=int, default=2000, help="--make-world: how many images")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_arguments(argv)
    if args.make_world:
        return make_world(args.make_world, args.model, args.images, args.device, args.arch)
    device = args.device
    cuda = device.startswith("cuda") or args.memory  # a memory prediction is for a GPU: bf16 by default
    dtype = {"auto": torch.bfloat16 if cuda else torch.float32, "bfloat16": torch.bfloat16,
             "float16": torch.float16, "float32": torch.float32}[args.dtype]
    if args.memory:
        return one_line_errors(lambda: print_memory(args, dtype))
    repeats = args.repeats or (10 if cuda else 5)
    torch.manual_seed(0)
    model = build(args.model, device, dtype, args.arch)
    mode = {"mode": args.compile_mode} if args.compile_backend == "inductor" else {}
    grouped_loss = (torch.compile(grouped_caption_loss, fullgraph=True, backend=args.compile_backend, **mode)
                    if args.compile else grouped_caption_loss)
    report = {"model": args.model, "arch": args.arch, "device": torch.cuda.get_device_name() if cuda else "cpu",
              "dtype": str(dtype).replace("torch.", ""), "compiled": args.compile,
              "compile_mode": args.compile_mode if args.compile else None, **provenance(),
              "flops_counted_by": "torch.utils.flop_counter (forward + backward)",
              "ops_counted_by": "TorchDispatchMode: aten operations in one eager optimizer step"}
    if not args.json:
        print(f"BLIP-2 {args.arch}, {args.model}, on {report['device']}, {report['dtype']}, LoRA on the default targets"
              + (f", grouped loss compiled ({args.compile_mode})" if args.compile else "")
              + f"; commit {report['commit']}, torch {report['torch']}, transformers {report['transformers']}")
    report["runs"] = []
    for batch_images in args.batch_images or [16 if cuda else 4]:
        compiled = args.compile_backend if args.compile else False  # generation's decode step as the loss
        report["runs"].append(measure(model, batch_images, device, dtype, repeats, grouped_loss, compiled))
        if not args.json:
            print_run(report["runs"][-1])
    if args.json:
        print(json.dumps(report))


def print_memory(args, dtype):
    shape = step_shape(args)
    report = {"model": args.model, "arch": args.arch, "dtype": str(dtype).replace("torch.", ""), **provenance(),
              "step_shape": vars(shape),
              "counted_by": "memory.py: train.py's step on fake tensors, live tensor storages counted once each",
              "not_counted": "the CUDA context, allocator rounding and fragmentation, cuBLAS workspaces"}
    if not args.json:
        print(f"BLIP-2 {args.arch}, {args.model}, {report['dtype']}: {shape.captions_per_image} captions of "
              f"{shape.caption_tokens} tokens per image, {shape.source}")
    report["runs"] = predict_memory(args, dtype, shape)
    if args.json:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    main()
