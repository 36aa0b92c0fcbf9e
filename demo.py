"""
The offline demo world: a synthetic Flickr8k and a tiny pretrained BLIP-2, so that everything runs with no download.

    python demo.py            # builds data/demo/ if missing (about 40 s on 2 CPU cores); train.py does it too

Only this and `python train.py config/demo.py` build the world; caption.py and evaluate.py never do (a missing
base or collection is one error line there).

data/demo/flickr8k/    300 images of a coloured circle on a plain background, in the ORIGINAL release layout
                       (Flicker8k_Dataset/, Flickr8k.token.txt with five captions per image, the three split files),
                       so data.py's real reader is what reads it.
data/demo/blip2-tiny/  a BLIP-2 (ViT + Q-Former + T5) of 0.40M parameters, saved with save_pretrained with its
                       Blip2Processor, so it loads through the same from_pretrained code as Salesforce/blip2-flan-t5-xl.

The tiny model was first trained, all of its weights, on other images of the same kind described in a DIFFERENT
style ("red dot . tiny . white backdrop"). Like the real BLIP-2 before it sees Flickr8k, it describes the demo
images correctly in the wrong words; LoRA fine-tuning on the demo captions ("a small red circle on a plain white
background") is what fixes that, which the scores before and after show.
"""
import os
import random
import re
import shutil
import sys
import time

import torch
from PIL import Image, ImageDraw
from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessorPil,
                          PreTrainedTokenizerFast, T5Config)
from transformers.utils import logging as hf_logging

from data import encoder_prompt_ids
from model import grouped_caption_loss, vision_embeds

DEMO_ROOT = "data/demo"
DEMO_DATA, DEMO_MODEL = "data/demo/flickr8k", "data/demo/blip2-tiny"
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (40, 60, 220), "yellow": (240, 210, 30)}
BACKGROUNDS = {"white": (245, 245, 245), "black": (15, 15, 15), "gray": (128, 128, 128)}
SIZES = {"small": (14, 24), "big": (44, 60)}  # circle diameter in pixels of the 96 x 96 image
PRETRAIN_WORDS = {"small": "tiny", "big": "huge"}
# Five differently worded captions per image, as Flickr8k has: each at least 9 words, as real captions are.
CAPTION_TEMPLATES = (
    "a {size} {colour} circle on a plain {background} background",
    "there is one {size} {colour} circle on this {background} picture",
    "a picture of a {size} {colour} circle against {background}",
    "a plain {background} image with a {size} {colour} circle in it",
    "the {background} picture shows a single {size} {colour} circle",
)
PRETRAIN_TEMPLATE = "{colour} dot . {size} . {background} backdrop"  # the base model's "wrong" style
IMAGE_PIXELS, MODEL_PIXELS = 96, 48
NUM_QUERY_TOKENS = 8  # the real model has 32


def draw(attributes, rng):
    """One circle of one colour and size, anywhere on a plain background."""
    image = Image.new("RGB", (IMAGE_PIXELS, IMAGE_PIXELS), BACKGROUNDS[attributes["background"]])
    size = rng.randint(*SIZES[attributes["size"]])
    x0, y0 = rng.randint(2, IMAGE_PIXELS - size - 2), rng.randint(2, IMAGE_PIXELS - size - 2)
    ImageDraw.Draw(image).ellipse((x0, y0, x0 + size, y0 + size), fill=COLOURS[attributes["colour"]])
    return image


def random_attributes(rng):
    return {"colour": rng.choice(list(COLOURS)), "size": rng.choice(list(SIZES)),
            "background": rng.choice(list(BACKGROUNDS))}


def build_dataset(root, rng, num_images=300, split=(200, 50, 50)):
    """Write the images, Flickr8k.token.txt and the three split files, as the original release lays them out."""
    os.makedirs(os.path.join(root, "Flicker8k_Dataset"))
    names, lines = [], []
    for i in range(num_images):
        attributes = random_attributes(rng)
        name = f"{1000000 + i * 7919}_{rng.getrandbits(40):010x}.jpg"  # Flickr-like ids
        draw(attributes, rng).save(os.path.join(root, "Flicker8k_Dataset", name), quality=90)
        names.append(name)
        lines += [f"{name}#{k}\t{template.format(**attributes).capitalize()} ." for k, template in
                  enumerate(CAPTION_TEMPLATES)]
    with open(os.path.join(root, "Flickr8k.token.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    starts = [0, split[0], split[0] + split[1], num_images]
    for (s, file), a, b in zip([("train", "Flickr_8k.trainImages.txt"), ("val", "Flickr_8k.devImages.txt"),
                                ("test", "Flickr_8k.testImages.txt")], starts, starts[1:]):
        with open(os.path.join(root, file), "w") as f:
            f.write("\n".join(names[a:b]) + "\n")


def build_processor(image_pixels=MODEL_PIXELS, num_query_tokens=NUM_QUERY_TOKENS):
    """A word-level tokenizer over every word the demo uses, with T5's special ids, inside a Blip2Processor."""
    words = set("a photo of . backdrop".split())
    for text in CAPTION_TEMPLATES + (PRETRAIN_TEMPLATE,):
        words |= set(re.sub(r"\{\w+\}", " ", text).split())  # the template's own words, not its {fields}
    for group in (COLOURS, BACKGROUNDS, SIZES, PRETRAIN_WORDS.values()):
        words |= {w for phrase in group for w in phrase.split()}
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}  # T5's ids: pad 0 (also the decoder start), eos 1, unk 2
    for w in sorted(words):
        vocab[w] = len(vocab)
    vocab["<image>"] = len(vocab)
    core = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>",
                                        unk_token="<unk>")
    image_processor = BlipImageProcessorPil(size={"height": image_pixels, "width": image_pixels})
    return Blip2Processor(image_processor, tokenizer, num_query_tokens=num_query_tokens)


def tiny_config(vocab_size, image_token_id):
    """BLIP-2's architecture at toy size: ViT 2x64 on 48-pixel images (16 patches), Q-Former 2x64, T5 2+2 x 64."""
    text = T5Config(vocab_size=vocab_size, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2,
                    num_heads=4, feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0,
                    decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return Blip2Config(
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           image_size=MODEL_PIXELS, patch_size=12,
                           initializer_range=0.02),  # the default (1e-10) starts the ViT with no signal at all
        qformer_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            encoder_hidden_size=64, cross_attention_frequency=1),
        text_config=text, num_query_tokens=NUM_QUERY_TOKENS, image_token_id=image_token_id)


def pretrain_base(processor, rng, steps=600, batch_images=32, log=print):
    """Train every weight of a fresh tiny BLIP-2 on freshly drawn images with PRETRAIN_TEMPLATE captions."""
    torch.manual_seed(0)
    tokenizer = processor.tokenizer
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    model = Blip2ForConditionalGeneration(tiny_config(len(tokenizer), image_token_id))
    # transformers starts the queries at zero; the Q-Former's first LayerNorm of an all-zero input has a huge
    # gradient (1 / sqrt(eps)). BLIP-2's own pretraining draws them from N(0, 0.02), as here.
    torch.nn.init.normal_(model.query_tokens, std=0.02)
    prompt_ids = encoder_prompt_ids(tokenizer, "a photo of", NUM_QUERY_TOKENS, image_token_id)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    model.train()
    for step in range(steps):
        attributes = [random_attributes(rng) for _ in range(batch_images)]
        pixels = processor.image_processor([draw(a, rng) for a in attributes], return_tensors="pt").pixel_values
        captions = [PRETRAIN_TEMPLATE.format(**{**a, "size": PRETRAIN_WORDS[a["size"]]}) for a in attributes]
        tokens = tokenizer(captions, padding="longest", return_tensors="pt")
        batch = {"input_ids": torch.tensor(prompt_ids).expand(batch_images, -1),
                 "attention_mask": torch.ones(batch_images, len(prompt_ids), dtype=torch.long),
                 "labels": tokens.input_ids.masked_fill(tokens.attention_mask == 0, -100),
                 "caption_image": torch.arange(batch_images)}
        loss_sum, n_tokens = grouped_caption_loss(model, batch, vision_embeds(model, pixels))
        (loss_sum / n_tokens).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == steps - 1:
            log(f"  pretraining the tiny base: step {step:4d}  loss {(loss_sum / n_tokens).item():.3f}")
    return model.eval()


def ensure_demo_world(path, log=print):
    """Build the demo world if `path` points into it and is missing; any other path is left alone."""
    if os.path.normpath(path) in (DEMO_DATA, DEMO_MODEL) and not os.path.isdir(path):
        build_demo_world(log=log)


def build_demo_world(root=DEMO_ROOT, log=print):
    """Build whatever of data/demo/ is missing. Written under a temporary name, then renamed: never half a world.
    The caller's random state and thread count are left as they were, so a training run that starts by building
    the world trains exactly like one that finds it built."""
    t0, threads = time.time(), torch.get_num_threads()
    torch.set_num_threads(min(4, os.cpu_count() or 1))  # a fixed thread count: float sums can depend on it
    try:
        with torch.random.fork_rng():
            for part, build in (("flickr8k", _build_flickr8k), ("blip2-tiny", _build_model)):
                final = os.path.join(root, part)
                if os.path.isdir(final):
                    continue
                log(f"building the demo world: {final} ...")
                tmp = final + ".tmp"
                shutil.rmtree(tmp, ignore_errors=True)
                os.makedirs(os.path.dirname(tmp) or ".", exist_ok=True)
                build(tmp, log)
                os.replace(tmp, final)
    finally:
        torch.set_num_threads(threads)
    log(f"demo world ready in {root}/ ({time.time() - t0:.0f} s)")


def _build_flickr8k(path, log):
    build_dataset(path, random.Random(8))


def _build_model(path, log):
    processor = build_processor()
    model = pretrain_base(processor, random.Random(1), log=log)
    hf_logging.disable_progress_bar()
    model.save_pretrained(path)
    processor.save_pretrained(path)


if __name__ == "__main__":
    import argparse
    argparse.ArgumentParser(description="Build the offline demo world in data/demo/ (a synthetic Flickr8k and a tiny "
                            "pretrained BLIP-2), if it is not there yet.").parse_args()
    build_demo_world()
    sys.exit(0)
