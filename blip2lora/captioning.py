"""
blip2lora/captioning.py: captioning images with a base and an adapter (train.py's evaluations, evaluate.py, caption.py).

The captioning path that train.py, evaluate.py and caption.py share: the prompt and generation settings (their
defaults, their bounds, and the file that carries them beside an adapter), finding an adapter's base model, loading
both, and captioning a list of images batch by batch.

An adapter folder written by train.py holds, beside peft's two files, caption_settings.json: the prompt and the
generation settings it was trained and evaluated with, and what it was trained on (the collection, its caption and
image columns, the base model as an absolute path or a hub id, the training step). evaluate.py and caption.py use
them unless told otherwise, from any working directory. peft ignores the file.
"""
import argparse
import os

import torch

from blip2lora.adapter_files import load_adapter, read_adapter_config
from blip2lora.blip2 import autocast_dtype, move_vision, vision_embeds
from blip2lora.files import UserError, printable, read_json, write_json
from blip2lora.images import UnreadableImage, load_image, warn_unreadable
from blip2lora.model import DEFAULT_MODEL, check_model_source, generate_captions, load_prepared, looks_like_hub_id
from blip2lora.progress import print_to_stderr, progress as progress_of
from lora import lora_layers

DEFAULT_ADAPTER = "out/adapter"
# The prompt and the generation settings an adapter carries (caption_settings.json). repetition_penalty and
# no_repeat_ngram_size are transformers' repetition controls, off by default (1.0 and 0).
GENERATION_DEFAULTS = {"prompt": "a photo of", "num_beams": 5, "max_new_tokens": 30, "min_new_tokens": 8,
                       "repetition_penalty": 1.0, "no_repeat_ngram_size": 0}
# Bounds on what is read back from a settings file (or given): beyond them generation takes hours or all memory.
GENERATION_LIMITS = {"num_beams": (1, 32), "max_new_tokens": (1, 512), "min_new_tokens": (0, 512),
                     "repetition_penalty": (1.0, 10.0), "no_repeat_ngram_size": (0, 16)}
# Which beam search writes the captions: this project's (generation.py: the image side once per image, the same
# captions) or transformers' generate() (for comparison, and for what the project's does not do)
GENERATION_PATHS = ("own", "transformers")
# InstructBLIP was tuned to follow instructions, and its Q-Former reads the instruction too: LAVIS evaluates its
# captions with this one, which an InstructBLIP base gets where BLIP-2's default prompt would be (default_prompt).
INSTRUCTBLIP_PROMPT = "A short image description:"
MAX_PROMPT_CHARACTERS = 1000
CAPTION_SETTINGS_FILE = "caption_settings.json"
# What caption_settings.json's trained_on holds, and the type each value must have when read back
TRAINED_ON = {"data_dir": str, "caption_column": str, "image_column": str, "symlinks_out": bool, "base_model": str,
              "step": int, "adapter": str, "val_from_train": bool}


def check_generation(settings, where):
    """A UserError naming `where` if a prompt or generation setting is of the wrong type or out of bounds."""
    prompt = settings.get("prompt", "")
    if not isinstance(prompt, str) or len(prompt) > MAX_PROMPT_CHARACTERS:
        raise UserError(f"{where}: prompt must be text of at most {MAX_PROMPT_CHARACTERS} characters")
    for key, (low, high) in GENERATION_LIMITS.items():
        value = settings.get(key, low)
        kind = (int, float) if isinstance(low, float) else (int,)
        if type(value) not in kind or not low <= value <= high:
            what = "a number" if isinstance(low, float) else "a whole number"
            raise UserError(f"{where}: {key}={value!r} must be {what} from {low} to {high}")
    if settings.get("min_new_tokens", 0) > settings.get("max_new_tokens", 512):
        raise UserError(f"{where}: min_new_tokens={settings['min_new_tokens']} is more than "
                        f"max_new_tokens={settings['max_new_tokens']}")


def generation_of(settings):
    """generate_captions' keyword arguments from train.py's settings or caption.py's and evaluate.py's options."""
    return {key: getattr(settings, key) for key in (*GENERATION_LIMITS, "generation")}


def base_model_reference(name):
    """How an adapter names its base: an absolute path for a local folder (found from any working directory), the
    hub id otherwise."""
    return os.path.abspath(name) if os.path.isdir(name) else name


def save_caption_settings(adapter_dir, settings, trained_on):
    """Write the prompt, the generation settings and what the adapter was trained on beside it (atomically)."""
    write_json(os.path.join(adapter_dir, CAPTION_SETTINGS_FILE),
               {**{k: settings.get(k, v) for k, v in GENERATION_DEFAULTS.items()}, "trained_on": trained_on})


def read_caption_settings(adapter_dir):
    """What an adapter's caption_settings.json says ({} for an adapter from elsewhere); a damaged or out-of-bounds
    file is a UserError."""
    path = os.path.join(adapter_dir, CAPTION_SETTINGS_FILE)
    if not os.path.exists(path):
        return {}
    settings = read_json(path)
    if not isinstance(settings, dict) or not isinstance(settings.get("trained_on", {}), dict):
        raise UserError(f"{path}: expected a JSON object of generation settings; fix or delete the file")
    check_generation(settings, f"{path} (fix or delete the file)")
    for key, value in settings.get("trained_on", {}).items():
        kind = TRAINED_ON.get(key)
        if kind is not None and not isinstance(value, kind):
            what = {str: "text", bool: "true or false", int: "a whole number"}[kind]
            raise UserError(f"{path}: trained_on.{key}={printable(repr(value)[:80])} must be {what}; fix or delete "
                            "the file")
    return {k: settings[k] for k in (*GENERATION_DEFAULTS, "trained_on") if k in settings}


def resolve_generation(args, saved, model_name):
    """Fill the prompt and generation options left out: the adapter's settings, else the defaults (the prompt:
    default_prompt); then check."""
    for key, default in GENERATION_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, saved.get(key, default))
    if "prompt" not in saved and model_name is not None:  # None: no model will be run
        args.prompt = default_prompt(model_name, args.prompt)
    check_generation({k: getattr(args, k) for k in GENERATION_DEFAULTS}, "generation settings")


def default_prompt(model_name, prompt):
    """The prompt, but for an InstructBLIP base given BLIP-2's default ("a photo of"): its captioning instruction
    (INSTRUCTBLIP_PROMPT). The model's kind comes from its config.json, a folder's or the hub's (a config that
    cannot be read leaves the prompt as it is: loading the model then says what is wrong)."""
    if prompt != GENERATION_DEFAULTS["prompt"] or not (os.path.isdir(model_name) or looks_like_hub_id(model_name)):
        return prompt  # (a folder not there yet, as the demo's before it is built: loading says what is wrong)
    from transformers import AutoConfig
    try:
        local_only = check_model_source(model_name, log=lambda *a: None)
        kind = AutoConfig.from_pretrained(model_name, local_files_only=local_only).model_type
    except (UserError, OSError, ValueError):  # not to be had (yet): loading says so, after the data's checks
        return prompt
    return INSTRUCTBLIP_PROMPT if kind == "instructblip" else prompt


def resolve_model(adapter, model, log):
    """(adapter folder or None, base model) from the flags: out/adapter when present; an adapter names its base."""
    if adapter is None:
        adapter = DEFAULT_ADAPTER if os.path.isdir(DEFAULT_ADAPTER) else "none"
        log(f"note: using the adapter in {DEFAULT_ADAPTER}" if adapter != "none" else
            f"note: no adapter in {DEFAULT_ADAPTER}: using the zero-shot base model")
    elif adapter == "none":
        log("note: no adapter: using the zero-shot base model")
    if adapter == "none":
        return None, model or DEFAULT_MODEL
    named = read_adapter_config(adapter).get("base_model_name_or_path")
    if model:
        return adapter, model
    if not isinstance(named, str) or not named:
        return adapter, DEFAULT_MODEL
    if not os.path.isdir(named) and not looks_like_hub_id(named):
        raise UserError(f"{adapter}/adapter_config.json names the base model {named!r}, which is not a folder seen "
                        "from here; pass --model PATH (the demo's base is made by python demo.py)")
    return adapter, named


def load_for_captioning(model_name, adapter, device, base_bits=16, log=print):
    """The base model with the adapter loaded, in eval mode, prepared for its dtype as train.py prepares it
    (model.load_prepared): its matmuls in bf16 on GPUs that have it, float16 on those that do not (T5's `wo` then in
    float32), float32 on the CPU."""
    model, processor = load_prepared(model_name, device, autocast_dtype(device), base_bits=base_bits, log=log)
    if adapter is not None:
        load_adapter(model, adapter)
    return model.eval(), processor


@torch.no_grad()
def caption_stream(model, processor, items, prompt_ids, device, autocast, cache=None, batch_size=32, progress="",
                   progress_log=print_to_stderr, on_unreadable=lambda item, error: warn_unreadable(error),
                   **generate_kwargs):
    """Caption data.ImageCaptions items batch by batch, yielding (item, caption): the one captioning path of
    train.py, evaluate.py and caption.py. Vision outputs come from the cache when it has them; an image that cannot
    be read goes to on_unreadable(item, error) and the rest are still captioned. progress: what to call the work
    in a progress bar (a terminal) or an occasional line (progress_log), "" for neither."""
    starts = range(0, len(items), batch_size)
    counted = progress_of(starts, len(items), progress, "images", progress_log,
                          size=lambda start: min(batch_size, len(items) - start)) if progress else starts
    for start in counted:
        chunk = items[start:start + batch_size]
        if cache is not None and cache.complete:
            chunk = [i for i in chunk if i.name not in cache.missing]
            with autocast:
                embeds = cache.lookup([i.name for i in chunk], device) if chunk else None
        else:
            images, kept = [], []
            for item in chunk:
                try:
                    images.append(load_image(item.image))
                    kept.append(item)
                except UnreadableImage as e:
                    on_unreadable(item, e)
            chunk = kept
            if chunk:
                if model.vision_model.embeddings.patch_embedding.weight.device != torch.device(device):
                    move_vision(model, device)  # new images: the ViT comes back to the GPU (vision_on_gpu=False)
                pixels = processor.image_processor(images, return_tensors="pt").pixel_values.to(device)
                with autocast:
                    embeds = vision_embeds(model, pixels)
        if not chunk:
            continue
        with autocast:
            texts = generate_captions(model, processor.tokenizer, prompt_ids, embeds, **generate_kwargs)
        yield from zip(chunk, texts)


def caption_items(*args, **kwargs):
    """caption_stream's captions as {image name: caption}."""
    return {item.name: text for item, text in caption_stream(*args, **kwargs)}


@torch.no_grad()
def captions_without_adapter(model, *args, **kwargs):
    """caption_items with every LoRA B set to 0, which is exactly the base model; B is put back afterwards."""
    saved = [(layer, layer.lora_B.clone()) for _, layer in lora_layers(model)]
    for layer, _ in saved:
        layer.lora_B.zero_()
    try:
        return caption_items(model, *args, **kwargs)
    finally:
        for layer, lora_b in saved:
            layer.lora_B.copy_(lora_b)


def add_generation_arguments(parser, batch_size):
    """The options caption.py and evaluate.py share: the prompt, beam search, batch size, device and base precision.
    The prompt and generation options left out come from the adapter's caption_settings.json, else the defaults."""
    def within(low, high):
        kind = type(low)

        def parse(text):
            value = kind(text)  # not a number: argparse says so
            if not low <= value <= high:
                raise argparse.ArgumentTypeError(f"must be from {low} to {high}, got {value}")
            return value
        parse.__name__ = kind.__name__  # how argparse names the type in its messages
        return parse
    given = "default: the adapter's training setting, else %s"
    parser.add_argument("--prompt", help=given % repr(GENERATION_DEFAULTS["prompt"]))
    for key, (low, high) in GENERATION_LIMITS.items():
        parser.add_argument("--" + key.replace("_", "-"), "--" + key, type=within(low, high),  # train.py's spelling
                            help=given % GENERATION_DEFAULTS[key])
    parser.add_argument("--generation", choices=GENERATION_PATHS, default="own", help="own: this project's beam "
                        "search (the image side once per image); transformers: generate(), the same captions")
    parser.add_argument("--batch-size", "--batch_size", type=within(1, 4096), default=batch_size)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--base-bits", "--base_bits", type=int, choices=(16, 8, 4), default=16,
                        help="hold the base's language model in 8 or 4 bits (bitsandbytes) to save GPU memory")
