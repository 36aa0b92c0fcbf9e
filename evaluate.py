"""
Score captions the way captioning papers do: the COCO caption toolkit (scoring.py) on a collection's test split.

    python evaluate.py                                   # out/adapter, on its own collection's test split
    python evaluate.py --adapter out/demo/adapter        # the demo's adapter (it names its base model and collection)
    python evaluate.py --adapter none --model Salesforce/blip2-flan-t5-xl --data data/flickr8k   # zero-shot base
    python evaluate.py --predictions preds.json --data data/flickr8k   # captions from elsewhere: {"<image>": "..."}
    python evaluate.py --adapter out/demo/adapter --out out/demo/scores.json --html out/demo/test.html

An adapter written by train.py remembers the collection it was trained on (and its caption and image columns), its
base model, prompt and generation settings (caption_settings.json): they are used unless an option says otherwise,
and the first line printed says which collection and split are scored. Every image is captioned with beam search
(5 beams, 8 to 30 new tokens by default) and scored against all its references; scores are x100, as papers print
them.
"""
import argparse
import os
import sys

import demo
from blip2lora.blip2 import autocast_context, autocast_dtype, set_instruction
from blip2lora.captioning import (add_generation_arguments, caption_items, captions_without_adapter, generation_of,
                                  load_for_captioning, read_caption_settings, resolve_generation, resolve_model)
from blip2lora.files import check_output, one_line_errors, read_json, require_writable_folder, write_json
from blip2lora.scoring import SCALE, ScoringError, check_lengths, print_table, score_split, write_html
from data import add_collection_arguments, prompt_ids, read_captions


def main(argv=None):
    parser = argparse.ArgumentParser(description="COCO-toolkit scores for a BLIP-2 adapter on a caption collection.")
    parser.add_argument("--adapter", help="adapter directory, or 'none' for the zero-shot base (default: out/adapter)")
    parser.add_argument("--model", help="base model hub id or directory (default: the adapter's base model)")
    parser.add_argument("--data", "--data_dir", "--data-dir", help="caption collection directory, any layout data.py "
                        "reads (default: the one the adapter was trained on, else data/flickr8k)")
    add_collection_arguments(parser)
    parser.add_argument("--split", default="test", choices=("train", "val", "test"))
    parser.add_argument("--predictions", help="score this JSON {image: caption} instead of generating")
    add_generation_arguments(parser, batch_size=32)
    parser.add_argument("--spice", action="store_true", help="also try SPICE (needs Java 8 and a download)")
    parser.add_argument("--out", help="write metrics, settings and every caption as JSON")
    parser.add_argument("--html", help="write a self-contained HTML page: scores, then every image with its "
                        "captions and references, the lowest CIDEr first")
    parser.add_argument("--zero-shot-too", "--zero_shot_too", action=argparse.BooleanOptionalAction,
                        help="with an adapter: also caption with the zero-shot base and show both, a second "
                        "captioning pass (default: on with --html, off otherwise)")
    args = parser.parse_args(argv)
    return one_line_errors(lambda: run(args))

def run(args):
    for path in filter(None, (args.out, args.html)):  # now, not after the captioning
        if os.path.isdir(path):
            raise ScoringError(f"{path}: is a directory; give a file name, e.g. {os.path.join(path, 'scores.json')}")
        if check_output(path) != "stream":  # a link to a file, a socket: refused; a device or FIFO: written through
            require_writable_folder(os.path.dirname(os.path.abspath(path)), f"file {path}")
    notes = []
    adapter, model_name = resolve_model(args.adapter, args.model, log=notes.append)  # said if no error follows
    saved = read_caption_settings(adapter) if adapter else {}
    resolve_generation(args, saved, None if args.predictions else model_name)  # predictions: no model is run
    collection = choose_collection(args, saved.get("trained_on", {}), model_name)
    data = read_captions(collection["data_dir"], collection["caption_column"], collection["image_column"],
                         collection["symlinks_out"], collection["val_from_train"])
    items = data.splits[args.split]
    if not items:
        raise ScoringError(f"{collection['data_dir']}: the {args.split} split has no images (split: "
                           f"{data.split_source}); python data.py DIR shows the splits")
    step = saved.get("trained_on", {}).get("step")
    what = f"adapter {adapter}" + (f" (step {step})" if step is not None else "") if adapter else "zero-shot base"
    notes.insert(0, f"scoring {what} on {collection['data_dir']} ({data.layout}), {args.split} split, {len(items)} "
                    "images" + (f" [{collection['source']}]" if collection["source"] else ""))
    if args.predictions:
        predictions, zero_shot = read_predictions(args.predictions, items, args.split), None
        print("\n".join(notes[:1]), file=sys.stderr)
    else:
        predictions, zero_shot = caption_split(args, adapter, model_name, items, notes)
    label = "zero-shot" if adapter is None else "fine-tuned"
    columns, rows = score_split(items, predictions, label, zero_shot,
                                spice=args.spice, log=lambda message: print(message, file=sys.stderr))
    print(f"{args.split} split, {len(predictions)} of {len(items)} images scored, {what}, scores x100:")
    print_table(columns)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "html")}
    settings.update(adapter=adapter, model=model_name, data=collection["data_dir"])
    if args.out:
        write_json(args.out, {"scale": SCALE, "metrics": columns[label], "settings": settings,
                              "captions": [{k: r[k] for k in ("image", "caption", "cider", "references")}
                                           for r in rows]})
        print(f"scores and captions: {args.out}")
    if args.html:
        write_html(args.html, f"BLIP-2 captions, {collection['data_dir']} {args.split} split", columns, rows,
                   about=[what, f"collection: {collection['data_dir']} ({data.layout}), {args.split} split, "
                          f"{len(predictions)} images", f"base model: {model_name}"])
        print(f"report: {args.html}")
    return 0


def choose_collection(args, trained_on, model_name):
    """The collection to score: --data; else the one the adapter was trained on; else the demo's for the demo base;
    else data/flickr8k. Column options likewise."""
    demo_base = os.path.realpath(model_name) in map(os.path.realpath, (demo.DEMO_MODEL, demo.DEMO_OPT_MODEL))
    if args.data:
        data_dir, source = args.data, ""
    elif trained_on.get("data_dir"):
        data_dir, source = trained_on["data_dir"], "the collection the adapter was trained on"
    else:
        data_dir, source = (demo.DEMO_DATA, "the demo's collection") if demo_base else ("data/flickr8k", "the default")
    own = not args.data or os.path.realpath(args.data) == os.path.realpath(trained_on.get("data_dir", ""))
    return {"data_dir": data_dir, "source": source,
            "caption_column": args.caption_column or (trained_on.get("caption_column", "") if own else ""),
            "image_column": args.image_column or (trained_on.get("image_column", "") if own else ""),
            "symlinks_out": args.symlinks_out or (trained_on.get("symlinks_out") is True and own),
            "val_from_train": args.val_from_train and (trained_on.get("val_from_train") is not False or not own)}


def read_predictions(path, items, split):
    predictions = read_json(path, "predictions file")
    if not isinstance(predictions, dict) or not all(isinstance(v, str) for v in predictions.values()):
        raise ScoringError(f"{path}: expected a JSON object {{\"<image file name>\": \"<caption>\"}}")
    references = {i.name for i in items}
    unknown, missing = sorted(set(predictions) - references), sorted(references - set(predictions))
    if unknown:
        raise ScoringError(f"{path}: {unknown[0]!r} is not an image of the {split} split ({len(unknown)} such names)")
    if missing:
        raise ScoringError(f"{path}: no caption for {missing[0]!r} of the {split} split ({len(missing)} of "
                           f"{len(references)} images missing)")
    check_lengths(predictions, {i.name: [] for i in items}, where=f"{path}: ")  # the references: when scored
    return predictions


def caption_split(args, adapter, model_name, items, notes):
    """The adapter's captions of the split (and the zero-shot base's, for the page or when asked)."""
    model, processor = load_for_captioning(model_name, adapter, args.device, args.base_bits, log=notes.append)
    for note in notes:
        print(note, file=sys.stderr)
    prompt = prompt_ids(processor.tokenizer, args.prompt, model.config, after={"max_new_tokens": args.max_new_tokens})
    set_instruction(model, processor, args.prompt)  # InstructBLIP's Q-Former reads the prompt too
    generation = dict(batch_size=args.batch_size, progress="captioning", **generation_of(args))
    autocast = autocast_context(args.device, autocast_dtype(args.device))
    predictions = caption_items(model, processor, items, prompt, args.device, autocast, **generation)
    zero_shot = None
    if adapter is not None and (args.zero_shot_too if args.zero_shot_too is not None else bool(args.html)):
        zero_shot = captions_without_adapter(model, processor, items, prompt, args.device, autocast,
                                             **{**generation, "progress": "captioning zero-shot"})
    return predictions, zero_shot


if __name__ == "__main__":
    sys.exit(main())
