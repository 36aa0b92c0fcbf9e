"""
Caption images with BLIP-2 and a LoRA adapter; or export base + adapter as one plain transformers checkpoint.

    python caption.py photo.jpg more_photos/                     # adapter in out/adapter if present, else zero-shot
    python caption.py --adapter out/demo/adapter data/demo/flickr8k/Flicker8k_Dataset
    python caption.py --adapter none --model Salesforce/blip2-flan-t5-xl photo.jpg
    python caption.py --adapter out/adapter --export-merged out/merged    # then: from_pretrained("out/merged")

Prints `path<TAB>caption` per image. The prompt and generation settings default to those the adapter was trained
with (its caption_settings.json, written by train.py). The model input is exactly Blip2Processor(images=...,
text=prompt): captioning goes through evaluate.py's own path (tested equal to model.generate on the processor's
output), autocast included, so caption.py and evaluate.py caption an image alike on any device. A missing,
non-image or corrupt file, or a directory with no images, gets one line on stderr; the rest are still captioned,
and the exit code is then 1.
"""
import argparse
import json
import os
import sys

import torch

from data import IMAGE_SUFFIXES

DEFAULT_ADAPTER, DEFAULT_MODEL = "out/adapter", "Salesforce/blip2-flan-t5-xl"
GENERATION_DEFAULTS = {"prompt": "a photo of", "num_beams": 5, "max_new_tokens": 30, "min_new_tokens": 8}
GENERATION_MINIMUMS = {"num_beams": 1, "max_new_tokens": 1, "min_new_tokens": 0}
# Written by train.py beside each adapter: the prompt it was trained with and its generation settings. peft ignores it.
CAPTION_SETTINGS_FILE = "caption_settings.json"


def add_generation_arguments(parser, batch_size):
    """The options caption.py and evaluate.py share: the prompt, beam search, batch size and device. The prompt and
    generation options left out come from the adapter's caption_settings.json, else GENERATION_DEFAULTS."""
    def at_least(low):
        def parse(text):
            value = int(text)  # not a number: argparse says so
            if value < low:
                raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
            return value
        parse.__name__ = "int"  # how argparse names the type in its messages
        return parse
    given = "default: the adapter's training setting, else %s"
    parser.add_argument("--prompt", help=given % repr(GENERATION_DEFAULTS["prompt"]))
    for key, low in GENERATION_MINIMUMS.items():
        parser.add_argument("--" + key.replace("_", "-"), "--" + key, type=at_least(low),  # train.py's spelling too
                            help=given % GENERATION_DEFAULTS[key])
    parser.add_argument("--batch-size", "--batch_size", type=at_least(1), default=batch_size)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def save_caption_settings(adapter_dir, settings):
    """Write the prompt and generation settings beside an adapter (atomically, as the adapter files are)."""
    path = os.path.join(adapter_dir, CAPTION_SETTINGS_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump({k: settings[k] for k in GENERATION_DEFAULTS}, f, indent=2)
    os.replace(path + ".tmp", path)


def read_caption_settings(adapter_dir):
    """The settings an adapter was trained with ({} for an adapter from elsewhere); a damaged file is a ValueError."""
    path = os.path.join(adapter_dir, CAPTION_SETTINGS_FILE)
    if not os.path.isfile(path):
        return {}
    try:
        settings = json.loads(open(path, "rb").read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); delete it to use the default generation settings") from None
    if not isinstance(settings, dict):
        raise ValueError(f"{path}: expected a JSON object of generation settings; fix or delete the file")
    for key, value in settings.items():
        valid = isinstance(value, str) if key == "prompt" else (
            type(value) is int and value >= GENERATION_MINIMUMS.get(key, 0))
        if key in GENERATION_DEFAULTS and not valid:
            raise ValueError(f"{path}: {key} has an invalid value {value!r}; fix or delete the file")
    return {k: settings[k] for k in GENERATION_DEFAULTS if k in settings}


def resolve_generation(args, adapter):
    """Fill the prompt and generation options the user left out: the adapter's settings, else the defaults."""
    saved = read_caption_settings(adapter) if adapter else {}
    for key, default in GENERATION_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, saved.get(key, default))


def resolve_model(adapter, model, log=lambda m: print(m, file=sys.stderr)):
    """(adapter dir or None, base model) from the flags: out/adapter when present; the adapter names its base."""
    from lora import read_adapter_config
    if adapter is None:
        adapter = DEFAULT_ADAPTER if os.path.isdir(DEFAULT_ADAPTER) else "none"
        log(f"note: using the adapter in {DEFAULT_ADAPTER}" if adapter != "none" else
            f"note: no adapter in {DEFAULT_ADAPTER}: using the zero-shot base model")
    elif adapter == "none":
        log("note: no adapter: using the zero-shot base model")
    if adapter == "none":
        return None, model or DEFAULT_MODEL
    config = read_adapter_config(adapter)
    return adapter, model or config.get("base_model_name_or_path") or DEFAULT_MODEL


def load_for_captioning(model_name, adapter, device):
    """The base model (bf16 on GPUs that have it, else float32) with the adapter loaded, in eval mode."""
    import demo
    from lora import load_adapter
    from model import autocast_dtype, load_blip2
    demo.ensure_demo_world(model_name)  # the offline demo's model is built on first use; any other path is left alone
    model, processor = load_blip2(model_name, device, dtype=autocast_dtype(device))
    if adapter is not None:
        load_adapter(model, adapter)
    return model.eval(), processor


def image_paths(arguments):
    """Files as given, directories expanded to their image files (sorted); a missing path is an error line."""
    paths, errors = [], []
    for arg in arguments:
        if os.path.isdir(arg):
            found = sorted(os.path.join(arg, n) for n in os.listdir(arg)
                           if n.lower().endswith(IMAGE_SUFFIXES) and not n.startswith("._"))
            if not found:
                errors.append(f"{arg}: no image files in this directory ({', '.join(IMAGE_SUFFIXES)})")
            paths += found
        elif os.path.isfile(arg):
            paths.append(arg)
        else:
            errors.append(f"{arg}: no such file or directory")
    return paths, errors


EXPORT_MARKER = "merged_from.json"  # written into every export: how a folder is known to be an earlier export


def check_export_folder(out_dir, adapter, model_name):
    """An export writes a whole folder, so refuse any folder that could hold something of the user's: one that exists
    and is neither empty nor an earlier export, or one that holds the adapter or the base model."""
    target = os.path.realpath(out_dir)
    for what, path in (("the adapter", adapter), ("the base model", model_name)):
        if path and os.path.exists(path):
            held = os.path.realpath(path)
            if held == target or held.startswith(target.rstrip(os.sep) + os.sep):
                raise ValueError(f"--export-merged {out_dir}: that folder holds {what} ({path}); name a new folder")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"--export-merged {out_dir}: a file of that name exists; name a new folder")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not os.path.isfile(os.path.join(out_dir, EXPORT_MARKER)):
        raise ValueError(f"--export-merged {out_dir}: the folder is not empty and is not an earlier export; "
                         "name a new folder (nothing was written)")


def export_merged(model, processor, out_dir, adapter, model_name):
    """Fold the adapter into the weights and save a plain checkpoint that needs neither this project nor peft.
    Written into a new folder beside out_dir, then renamed; an earlier export there is replaced, nothing else."""
    import shutil
    import tempfile
    from lora import merge_lora
    merge_lora(model)
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".export-", dir=parent)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    with open(os.path.join(tmp, EXPORT_MARKER), "w") as f:
        json.dump({"adapter": adapter, "base_model": model_name}, f, indent=2)
    if os.path.isdir(out_dir):  # empty, or an earlier export (check_export_folder): move it aside, then drop it
        old = tempfile.mkdtemp(prefix=".export-old-", dir=parent)
        os.replace(out_dir, os.path.join(old, "export"))
        os.replace(tmp, out_dir)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out_dir)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Caption images with BLIP-2 (+ a LoRA adapter).")
    parser.add_argument("images", nargs="*", help="image files or directories of images")
    parser.add_argument("--adapter", help=f"adapter directory, or 'none' (default: {DEFAULT_ADAPTER} if present)")
    parser.add_argument("--model", help="base model hub id or directory (default: the adapter's base model)")
    add_generation_arguments(parser, batch_size=16)
    parser.add_argument("--export-merged", metavar="DIR", help="merge the adapter into the base and save it to DIR")
    args = parser.parse_args(argv)
    if not args.images and not args.export_merged:
        parser.error("give image files or directories (or --export-merged DIR)")
    from data import ImageCaptions, encoder_prompt_ids
    from evaluate import caption_stream
    from model import ModelError, autocast_context, autocast_dtype
    try:
        notes = []  # said once the model has loaded: an error is then the only line
        adapter, model_name = resolve_model(args.adapter, args.model, log=notes.append)
        resolve_generation(args, adapter)
        if args.export_merged:
            if adapter is None:
                raise ValueError("--export-merged needs an adapter (--adapter DIR)")
            check_export_folder(args.export_merged, adapter, model_name)  # before any work
        model, processor = load_for_captioning(model_name, adapter, args.device)
        prompt_ids = encoder_prompt_ids(processor.tokenizer, args.prompt, model.config.num_query_tokens,
                                        model.config.image_token_id)  # refuses a prompt holding the image token
    except (ModelError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for note in notes:
        print(note, file=sys.stderr)
    if args.export_merged:
        export_merged(model, processor, args.export_merged, adapter, model_name)
        print(f"merged {adapter} into {model_name}: {args.export_merged} loads with "
              f"Blip2ForConditionalGeneration.from_pretrained alone", file=sys.stderr)
        return 0
    paths, errors = image_paths(args.images)
    for e in errors:
        print(f"error: {e}", file=sys.stderr)

    def unreadable(item, error):
        errors.append(item.path)
        print(f"error: {item.path}: not a readable image ({type(error).__name__}: {str(error).splitlines()[0]})",
              file=sys.stderr)
    items = [ImageCaptions(path, path, []) for path in paths]  # the name is the path as given
    # evaluate.py's path exactly (autocast included), so that both tools caption an image alike on any device
    for item, text in caption_stream(model, processor, items, prompt_ids, args.device,
                                     autocast_context(args.device, autocast_dtype(args.device)),
                                     batch_size=args.batch_size, on_unreadable=unreadable, num_beams=args.num_beams,
                                     max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens):
        print(f"{item.path}\t{text}", flush=True)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
