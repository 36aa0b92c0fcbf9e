"""
The offline demo world: a synthetic Flickr8k and a tiny pretrained BLIP-2, so that everything runs with no download.

    python demo.py            # builds data/demo/ if missing (about a minute on 2 CPU cores); train.py does it too

Only this and `python train.py config/demo.py` (or config/demo_opt.py, demo_instructblip.py) build the world, train.py
only the parts its settings name; caption.py and evaluate.py never do (a missing base or collection is one error line
there).

data/demo/flickr8k/    300 images of a coloured circle on a plain background, in the ORIGINAL release layout
                       (Flicker8k_Dataset/, Flickr8k.token.txt with five captions per image, the three split files),
                       so data.py's real reader is what reads it.
data/demo/blip2-tiny/  a BLIP-2 (ViT + Q-Former + T5) of 0.40M parameters, saved with save_pretrained with its
                       Blip2Processor, so it loads through the same from_pretrained code as Salesforce/blip2-flan-t5-xl.
data/demo/blip2-opt-tiny/  the same with an OPT-style decoder, standing for Salesforce/blip2-opt-2.7b.
data/demo/instructblip-tiny/  an InstructBLIP (its Q-Former reads the instruction, with a tokenizer of its own) with
                       a LLaMA-style decoder, standing for Salesforce/instructblip-vicuna-7b.

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
                          InstructBlipConfig, InstructBlipForConditionalGeneration, InstructBlipProcessor,
                          PreTrainedTokenizerFast)
from transformers.utils import logging as hf_logging

from blip2lora import llama, opt, t5
from blip2lora.blip2 import is_instructblip, set_instruction, vision_embeds
from blip2lora.model import caption_tokenizer, grouped_caption_loss
from data import caption_labels, prompt_ids

DEMO_ROOT = "data/demo"
DEMO_DATA, DEMO_MODEL, DEMO_OPT_MODEL = "data/demo/flickr8k", "data/demo/blip2-tiny", "data/demo/blip2-opt-tiny"
DEMO_INSTRUCTBLIP_MODEL = "data/demo/instructblip-tiny"
INSTRUCTION = "A short image description:"  # InstructBLIP's captioning instruction, as LAVIS evaluates it
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
# The word embeddings' initial spread, by language model type, where it is not the model's own. Pretraining shows the
# base a dozen words; every other word keeps its initial embedding, which for OPT is also its output row (tied). At
# OPT's std of 0.02 those rows stay small beside the trained ones, and LoRA hardly makes the model say the demo's
# words (config/demo_opt.py, beam 2: fine-tuned CIDEr 94, zero-shot 19); at 0.125 it does (276 to 374 over three
# seeds, zero-shot 34). A real OPT has trained its whole vocabulary. LLaMA's output rows are its own lm_head, drawn the
# same way (config/demo_instructblip.py: fine-tuned CIDEr 162.5 at 0.02, 265.5 at 0.125, zero-shot 23 and 26).
# (The T5 base keeps transformers' initialisation.)
EMBEDDING_STD = {"opt": 0.125, "llama": 0.125}


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


def build_processor(image_pixels=MODEL_PIXELS, num_query_tokens=NUM_QUERY_TOKENS, lm=t5, instruct=False):
    """A word-level tokenizer over every word the demo uses, with the special tokens laid out as the family's real
    tokenizer lays them out (lm.SPECIAL_TOKENS; T5: pad 0, </s> 1 at the end of a text; OPT: pad 1, </s> 2 as BOS at
    the start, and "\n" to end a caption), inside a Blip2Processor; instruct: an InstructBlipProcessor, with the
    Q-Former's own tokenizer over the same words laid out as BERT's ([PAD] 0, [CLS] text [SEP])."""
    words = set("a photo of . backdrop".split()) | (set(INSTRUCTION.lower().split()) if instruct else set())
    for text in CAPTION_TEMPLATES + (PRETRAIN_TEMPLATE,):
        words |= set(re.sub(r"\{\w+\}", " ", text).split())  # the template's own words, not its {fields}
    for group in (COLOURS, BACKGROUNDS, SIZES, PRETRAIN_WORDS.values()):
        words |= {w for phrase in group for w in phrase.split()}
    special = lm.SPECIAL_TOKENS
    tokenizer = _word_tokenizer(special["first_ids"], sorted(words) + ["<image>"], special["template"],
                                pad_token="<pad>", eos_token="</s>", bos_token=special["bos"], unk_token="<unk>")
    image_processor = BlipImageProcessorPil(size={"height": image_pixels, "width": image_pixels})
    if not instruct:
        return Blip2Processor(image_processor, tokenizer, num_query_tokens=num_query_tokens)
    qformer_tokenizer = _word_tokenizer(("[PAD]", "[UNK]", "[CLS]", "[SEP]"), sorted(words), "[CLS] $A [SEP]",
                                        pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]")
    return InstructBlipProcessor(image_processor, tokenizer, qformer_tokenizer, num_query_tokens=num_query_tokens)


def _word_tokenizer(first_ids, words, template, **special_tokens):
    """A lower-casing, whitespace-splitting word-level tokenizer: first_ids, then the words; `template` adds the
    special tokens around a text (TemplateProcessing's notation)."""
    vocab = {token: i for i, token in enumerate([*first_ids, *words])}
    core = Tokenizer(WordLevel(vocab, unk_token=special_tokens["unk_token"]))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(t, vocab[t]) for t in template.split() if t in first_ids])
    return PreTrainedTokenizerFast(tokenizer_object=core, **special_tokens)


def special_ids(processor, lm=t5):
    """(the image token's id, the caption end's id) in a processor build_processor made (T5: </s>, OPT: "\n")."""
    tokenizer = processor.tokenizer
    return tokenizer.convert_tokens_to_ids("<image>"), tokenizer.convert_tokens_to_ids(lm.SPECIAL_TOKENS["caption_end"])


def processor_config(processor, lm=t5):
    """tiny_config over a build_processor vocabulary, with its image token and caption end (and for an
    InstructBlipProcessor, an InstructBLIP's, its Q-Former reading the Q-Former tokenizer's words)."""
    image_token_id, end = special_ids(processor, lm)
    qformer_tokenizer = getattr(processor, "qformer_tokenizer", None)
    return tiny_config(len(processor.tokenizer), image_token_id, lm, end,
                       qformer_vocab_size=len(qformer_tokenizer) if qformer_tokenizer else None)


def tiny_config(vocab_size, image_token_id, lm=t5, eos_token_id=None, qformer_vocab_size=None):
    """BLIP-2's architecture at toy size: ViT 2x64 on 48-pixel images (16 patches), Q-Former 2x64, and the family's
    language model (lm.SIZES["tiny"]; T5: 2 + 2 layers x 64, OPT and LLaMA: 2 x 128). eos_token_id: the caption's end
    token; None: its place among the first ids of a build_processor vocabulary (T5 </s>: 1, OPT "\n": 4, LLaMA
    </s>: 2). qformer_vocab_size: an InstructBLIP's config, its Q-Former with word embeddings for the instruction."""
    if eos_token_id is None:
        eos_token_id = lm.SPECIAL_TOKENS["first_ids"].index(lm.SPECIAL_TOKENS["caption_end"])
    text = lm.text_config("tiny", vocab_size=vocab_size, eos_token_id=eos_token_id)
    kind, qformer = Blip2Config, {}
    if qformer_vocab_size:
        kind, qformer = InstructBlipConfig, dict(vocab_size=qformer_vocab_size, max_position_embeddings=64)
    return kind(
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           image_size=MODEL_PIXELS, patch_size=12,
                           initializer_range=0.02),  # the default (1e-10) starts the ViT with no signal at all
        qformer_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            encoder_hidden_size=64, cross_attention_frequency=1, **qformer),
        text_config=text, num_query_tokens=NUM_QUERY_TOKENS, image_token_id=image_token_id)


def pretrain_base(processor, rng, lm=t5, steps=600, batch_images=32, log=print, seed=0):
    """Train every weight of a fresh tiny BLIP-2 on freshly drawn images with PRETRAIN_TEMPLATE captions. Another
    seed gives a base as another CPU's float sums might (python demo.py --base-seed N DIR)."""
    torch.manual_seed(seed)
    config = processor_config(processor, lm)
    model = (InstructBlipForConditionalGeneration if is_instructblip(config) else Blip2ForConditionalGeneration)(config)
    # transformers starts the queries at zero; the Q-Former's first LayerNorm of an all-zero input has a huge
    # gradient (1 / sqrt(eps)). BLIP-2's own pretraining draws them from N(0, 0.02), as here.
    torch.nn.init.normal_(model.query_tokens, std=0.02)
    std = EMBEDDING_STD.get(model.config.text_config.model_type)
    if std is not None:
        torch.nn.init.normal_(model.get_input_embeddings().weight, std=std)
        if model.get_output_embeddings().weight is not model.get_input_embeddings().weight:  # LLaMA's lm_head: its own
            torch.nn.init.normal_(model.get_output_embeddings().weight, std=std)
    instruction = INSTRUCTION if is_instructblip(model) else "a photo of"
    prompt = prompt_ids(processor.tokenizer, instruction, model.config)
    set_instruction(model, processor, instruction)
    caption_ids = caption_tokenizer(processor.tokenizer, model.config)
    # A loop of its own, not train.py's step: this trains every weight of a model made from scratch (no LoRA, nothing
    # frozen, dropout on everywhere), with weight decay and a one-cycle schedule suited to that.
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    model.train()
    for step in range(steps):
        attributes = [random_attributes(rng) for _ in range(batch_images)]
        pixels = processor.image_processor([draw(a, rng) for a in attributes], return_tensors="pt").pixel_values
        captions = [PRETRAIN_TEMPLATE.format(**{**a, "size": PRETRAIN_WORDS[a["size"]]}) for a in attributes]
        batch = {"input_ids": torch.tensor(prompt).expand(batch_images, -1),
                 "attention_mask": torch.ones(batch_images, len(prompt), dtype=torch.long),
                 "labels": caption_labels(caption_ids(captions), max_tokens=64),
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


def collection_about(path):
    """(name, description) a model card gives a collection: the demo's is synthetic, whatever its folder is called;
    None for any other."""
    if os.path.realpath(path) == os.path.realpath(DEMO_DATA):
        return "demo-circles", ("The offline demo's synthetic collection: coloured circles on plain backgrounds in "
                                "Flickr8k's file layout, not Flickr8k")
    return None


def ensure_demo_world(path, log=print):
    """Build the part of the demo world `path` names (the collection or one of the two bases) if it is missing; any
    other path is left alone."""
    part = os.path.relpath(os.path.normpath(path), DEMO_ROOT)
    if part in PARTS and not os.path.isdir(path):
        build_demo_world(log=log, parts=[part])


def build_demo_world(root=DEMO_ROOT, log=print, parts=None):
    """Build whatever of data/demo/ is missing (or of `parts`). Written under a temporary name, then renamed: never
    half a world. The caller's random state and thread count are left as they were, so a training run that starts by
    building the world trains exactly like one that finds it built."""
    t0, threads = time.time(), torch.get_num_threads()
    torch.set_num_threads(min(4, os.cpu_count() or 1))  # a fixed thread count: float sums can depend on it
    try:
        with torch.random.fork_rng():
            for part in parts or PARTS:
                final = os.path.join(root, part)
                if os.path.isdir(final):
                    continue
                log(f"building the demo world: {final} ...")
                tmp = final + ".tmp"
                shutil.rmtree(tmp, ignore_errors=True)
                os.makedirs(os.path.dirname(tmp) or ".", exist_ok=True)
                PARTS[part](tmp, log)
                os.replace(tmp, final)
    finally:
        torch.set_num_threads(threads)
    log(f"demo world ready in {root}/ ({time.time() - t0:.0f} s)")


def _build_flickr8k(path, log):
    build_dataset(path, random.Random(8))


def _build_model(path, log, lm=t5, seed=0, instruct=False):
    processor = build_processor(lm=lm, instruct=instruct)
    model = pretrain_base(processor, random.Random(1), lm, log=log, seed=seed)
    hf_logging.disable_progress_bar()
    model.save_pretrained(path)
    processor.save_pretrained(path)


PARTS = {"flickr8k": _build_flickr8k, "blip2-tiny": _build_model,
         "blip2-opt-tiny": lambda path, log: _build_model(path, log, opt),
         "instructblip-tiny": lambda path, log: _build_model(path, log, llama, instruct=True)}


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description="Build the offline demo world in data/demo/ (a synthetic Flickr8k and "
                                     "two tiny pretrained BLIP-2s, with T5 and with OPT), if it is not there yet.")
    parser.add_argument("--base-seed", type=int, help="instead, pretrain a demo base with this torch seed "
                        "(the demo's is 0) into --out: how a result holds on a base another machine pretrains "
                        "(README 'Which GPU')")
    parser.add_argument("--family", choices=("t5", "opt", "instructblip"), default="t5", help="--base-seed's model: "
                        "BLIP-2 with T5 (config/demo.py's base) or OPT (config/demo_opt.py's), or InstructBLIP with "
                        "LLaMA (config/demo_instructblip.py's)")
    parser.add_argument("--out", help="the new folder for --base-seed's base")
    args = parser.parse_args()
    if args.base_seed is not None:
        if not args.out or os.path.exists(args.out):
            parser.error("--base-seed needs --out NEW_FOLDER")
        torch.set_num_threads(min(4, os.cpu_count() or 1))  # as build_demo_world: float sums depend on it
        _build_model(args.out, print, {"t5": t5, "opt": opt, "instructblip": llama}[args.family], seed=args.base_seed,
                     instruct=args.family == "instructblip")
    else:
        build_demo_world()
    sys.exit(0)
