"""
Caption images with BLIP-2 and a LoRA adapter; or export base + adapter as one plain transformers checkpoint.

    python caption.py photo.jpg more_photos/                     # adapter in out/adapter if present, else zero-shot
    python caption.py --adapter out/demo/adapter data/demo/flickr8k/Flicker8k_Dataset
    python caption.py --adapter none --model Salesforce/blip2-flan-t5-xl photo.jpg
    python caption.py --adapter out/adapter --export-merged out/merged    # then: from_pretrained("out/merged")
    python caption.py --recursive --write jsonl my_photos/       # label a folder: my_photos/metadata.jsonl, which
                                                                 # train.py --data my_photos reads (README)
    python caption.py --recursive --write txt my_photos/         # a caption file beside each image (photo.txt)

Prints `path<TAB>caption` per image, one line each (control characters in a file name are written as escapes), or with
--json one JSON object a line, {"path": ..., "caption": ...}, for programs (a name that is not UTF-8 also as
"path_base64", its bytes); --num-captions N gives each image's N best (`captions` in JSON). With --write the captions go
to files instead (blip2lora/labels.py), with a progress line, and --resume leaves the images already captioned there.
The adapter names its base model and carries the prompt and generation settings it was trained with
(caption_settings.json); options override them. Captioning goes through captioning.caption_stream, the path
evaluate.py and train.py use. A missing, non-image or corrupt file, or a folder with no images, gets one line on
stderr; the rest are still captioned, and the exit code is then 1.
"""
import argparse
import base64
import json
import os
import shutil
import sys

from blip2lora.blip2 import autocast_context, autocast_dtype, set_instruction
from blip2lora.captioning import (CAPTION_SETTINGS_FILE, GENERATION_DEFAULTS, add_generation_arguments,
                                  base_model_reference, caption_stream, generation_of, load_for_captioning,
                                  read_caption_settings, resolve_generation, resolve_model)
from blip2lora.files import (UserError, inside, make_temp_dir, one_line_errors, printable, read_json,
                             user_permissions_tree, write_json, writer_errors_as_os_errors)
from blip2lora.images import IMAGE_SUFFIXES
from blip2lora.labels import FORMATS, METADATA, Labels
from blip2lora.model import KINDS, family
from blip2lora.model_card import merged_card
from data import ImageCaptions, prompt_ids
from lora import merge_lora

EXPORT_MARKER = "merged_from.json"  # written into every export: how a folder is known to be an earlier export


def main(argv=None):
    parser = argparse.ArgumentParser(description="Caption images with BLIP-2 (+ a LoRA adapter).")
    parser.add_argument("images", nargs="*", help="image files or directories of images")
    parser.add_argument("--adapter", help="adapter directory, or 'none' (default: out/adapter if present)")
    parser.add_argument("--model", help="base model hub id or directory (default: the adapter's base model)")
    add_generation_arguments(parser, batch_size=16)
    parser.add_argument("--export-merged", metavar="DIR", help="merge the adapter into the base and save it to DIR")
    parser.add_argument("--json", action="store_true",
                        help='print JSON lines {"path": ..., "caption": ...} instead of path<TAB>caption')
    parser.add_argument("--recursive", action="store_true", help="also the images in the folders' subfolders")
    parser.add_argument("--write", choices=FORMATS, help="write the captions instead of printing them: txt or "
                        "caption, a file beside each image; jsonl or csv, one metadata file in the folder (the "
                        "imagefolder format train.py --data reads)")
    parser.add_argument("--caption-extension", help="--write txt/caption: the file's suffix (default .txt, .caption)")
    parser.add_argument("--overwrite", action="store_true", help="--write: replace captions already there")
    parser.add_argument("--resume", action="store_true", help="--write jsonl/csv: keep the metadata file's rows and "
                        "caption only the images it lacks (sidecars already there are always kept)")
    parser.add_argument("--num-captions", type=int, default=1, help="each image's N best captions (N beams at most)")
    args = parser.parse_args(argv)
    if not args.images and not args.export_merged:
        parser.error("give image files or directories (or --export-merged DIR)")
    return one_line_errors(lambda: run(args))


def run(args):
    notes = []  # said once the model has loaded: an error is then the only line
    adapter, model_name = resolve_model(args.adapter, args.model, log=notes.append)
    resolve_generation(args, read_caption_settings(adapter) if adapter else {}, model_name)
    if args.export_merged:
        if adapter is None:
            raise UserError("--export-merged needs an adapter (--adapter DIR)")
        if args.base_bits != 16:
            raise UserError("--export-merged merges into the 16-bit base: leave out --base-bits (an adapter trained "
                            "on a 4- or 8-bit base is the same file)")
        check_export_folder(args.export_merged, adapter, model_name)  # before any work
    if not 1 <= args.num_captions <= args.num_beams:
        raise UserError(f"--num-captions {args.num_captions}: from 1 to the number of beams ({args.num_beams})")
    labels = open_labels(args) if args.images else None  # before any work: a metadata file there already is refused
    model, processor = load_for_captioning(model_name, adapter, args.device, args.base_bits, log=notes.append)
    # refuses a prompt holding the image token, or new tokens past the language model's positions
    prompt = prompt_ids(processor.tokenizer, args.prompt, model.config, after={"max_new_tokens": args.max_new_tokens})
    set_instruction(model, processor, args.prompt)  # InstructBLIP's Q-Former reads the prompt too
    for note in notes:
        print(note, file=sys.stderr)
    if args.export_merged:
        export_merged(model, processor, args, adapter, model_name)
        print(f"merged {printable(adapter)} into {printable(model_name)}: {printable(args.export_merged)} loads with "
              f"{KINDS[model.config.model_type][1]}.from_pretrained alone", file=sys.stderr)
        return 0
    paths, errors = image_paths(args.images, args.recursive)
    for e in errors:
        print(f"error: {printable(e)}", file=sys.stderr)
    todo = [p for p in paths if not (labels and labels.done(p))]
    if labels and len(todo) < len(paths):
        print(f"{len(paths) - len(todo)} of {len(paths)} images are captioned in the --write {args.write} output "
              "already: kept" + ("" if args.overwrite else " (--overwrite to replace them)"), file=sys.stderr)

    def unreadable(item, error):
        errors.append(item.name)
        print(f"error: {printable(str(error))}", file=sys.stderr)
    items = [ImageCaptions(path, path, []) for path in todo]  # the name is the path as given
    stream = caption_stream(model, processor, items, prompt, args.device,
                            autocast_context(args.device, autocast_dtype(args.device)), batch_size=args.batch_size,
                            on_unreadable=unreadable, num_captions=args.num_captions,
                            progress="captioning" if labels else "", **generation_of(args))
    for done, (item, text) in enumerate(stream, 1):
        captions = text if args.num_captions > 1 else [text]
        if labels:
            labels.add(item.name, captions)
            if done % args.batch_size == 0:
                labels.flush()  # an interrupted run leaves a complete file, and --resume goes on from it
        elif args.json:
            print(json.dumps({**json_path(item.name), **({"caption": text} if args.num_captions == 1 else
                                                    {"captions": captions})}), flush=True)
        else:
            print("\t".join([printable(item.name), *captions]), flush=True)
    if labels:
        labels.flush()
        where = labels.path if args.write in METADATA else f"a {labels.extension} file beside each image"
        print(f"captioned {len(items) - len(errors)} images: {where}", file=sys.stderr)
    return 1 if errors else 0


def json_path(name):
    """{"path": name} for --json; a file name that is not UTF-8 (bytes Python holds as lone surrogates, which other
    programs' JSON readers turn into U+FFFD) also as "path_base64", its bytes, so a program can open the file."""
    raw = os.fsencode(name)
    try:
        return {"path": raw.decode("utf-8")}
    except UnicodeDecodeError:
        return {"path": raw.decode("utf-8", "replace"), "path_base64": base64.b64encode(raw).decode("ascii")}


def open_labels(args):
    """--write's output (blip2lora/labels.py), checked before any captioning: jsonl and csv go in one folder."""
    if not args.write:
        if args.overwrite or args.resume or args.caption_extension:
            raise UserError("--overwrite, --resume and --caption-extension go with --write")
        return None
    folders = [a for a in args.images if os.path.isdir(a)]
    if args.write in METADATA and (len(args.images) != 1 or len(folders) != 1):
        raise UserError(f"--write {args.write} writes one {METADATA[args.write]} into one folder: give that folder "
                        "alone (with --recursive for its subfolders)")
    if args.caption_extension and not args.caption_extension.startswith("."):
        raise UserError(f"--caption-extension {args.caption_extension!r}: a suffix such as .txt")
    return Labels(args.write, folders[0] if folders else ".", args.caption_extension, args.overwrite, args.resume)


def image_paths(arguments, recursive=False):
    """Files as given, directories expanded to their image files (sorted; recursive: their subfolders' too, but for
    hidden ones); a missing path is an error line."""
    paths, errors = [], []
    for arg in arguments:
        if os.path.isdir(arg):
            found = []
            for folder, subfolders, names in os.walk(arg):
                subfolders[:] = sorted(d for d in subfolders if not d.startswith(".")) if recursive else []
                found += sorted(os.path.join(folder, n) for n in names
                                if n.lower().endswith(IMAGE_SUFFIXES) and not n.startswith("._"))
            if not found:
                errors.append(f"{arg}: no image files in this directory ({', '.join(IMAGE_SUFFIXES)})")
            paths += found
        elif os.path.exists(arg):
            paths.append(arg)  # a non-image or non-regular file is said by the image loader, in one line
        else:
            errors.append(f"{arg}: no such file or directory")
    return paths, errors


def check_export_folder(out_dir, adapter, model_name):
    """An export writes a whole folder, so refuse any folder that could hold something of the user's: one that is
    neither new, empty nor an earlier export holding only what the export wrote, or one holding the adapter or base."""
    for what, path in (("the adapter", adapter), ("the base model", model_name)):
        if path and os.path.exists(path) and inside(path, out_dir):
            raise UserError(f"--export-merged {out_dir}: that folder holds {what} ({path}); name a new folder")
        if path and os.path.isdir(path) and inside(out_dir, path):
            raise UserError(f"--export-merged {out_dir}: that is inside {what} ({path}); name a folder outside it")
    if os.path.islink(out_dir):  # the export replaces its folder: it would replace the link, not write through it
        raise UserError(f"--export-merged {out_dir}: a symbolic link; name the folder itself, or a new one")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"--export-merged {out_dir}: a file of that name exists; name a new folder")
    if not os.path.isdir(out_dir) or not os.listdir(out_dir):
        return
    marker = os.path.join(out_dir, EXPORT_MARKER)
    if not os.path.isfile(marker):
        raise UserError(f"--export-merged {out_dir}: the folder is not empty and is not an earlier export; name a "
                        "new folder (nothing was written)")
    marked = read_json(marker)
    written = marked.get("files") if isinstance(marked, dict) else None
    if not isinstance(written, list) or not all(isinstance(name, str) for name in written):
        raise UserError(f"{marker}: not the list of files an export writes (damaged or edited); move the folder's "
                        "contents out or name a new folder (nothing was written)")
    added = sorted(set(os.listdir(out_dir)) - set(written) - {EXPORT_MARKER})
    if added:
        raise UserError(f"--export-merged {out_dir}: an earlier export, but it now holds files the export did not "
                        f"write ({', '.join(added[:3])}); move them out or name a new folder (nothing was written)")


def export_merged(model, processor, args, adapter, model_name):
    """Fold the adapter into the weights and save a plain checkpoint that needs neither this project nor peft, with
    the prompt and generation settings the adapter was trained with. Written into a new folder beside the target,
    then renamed; an earlier export there is replaced, nothing else."""
    try:
        merge_lora(model)
    except ValueError as e:  # a quantized base, or weights the merge would make non-finite: nothing was changed
        raise UserError(f"--export-merged: {e}") from None
    generation = {k: getattr(args, k) for k in GENERATION_DEFAULTS}
    family(model.config).prepare_export(model)  # T5: a prompt-less generate() starts as --prompt "" does
    text = model.config.text_config  # what the language model's own generation config starts from when loaded
    text.max_new_tokens, text.min_new_tokens = generation["max_new_tokens"], generation["min_new_tokens"]
    model.generation_config.update(**{k: v for k, v in generation.items() if k != "prompt"})
    try:
        tmp = make_temp_dir(args.export_merged)  # beside the target, so that a rename puts it in place
    except OSError as e:
        raise UserError(f"--export-merged {args.export_merged}: cannot write beside it ({e.strerror}); nothing was "
                        "changed") from None
    try:
        with writer_errors_as_os_errors(args.export_merged):  # safetensors says a full disk in its own exception
            model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        write_json(os.path.join(tmp, CAPTION_SETTINGS_FILE), {**generation, "trained_on": {"adapter": adapter}})
        write_merged_card(tmp, model_name, adapter, generation, model.config.model_type)
        write_json(os.path.join(tmp, EXPORT_MARKER), {"adapter": os.path.abspath(adapter), "base_model": model_name,
                                                     "files": sorted(os.listdir(tmp))})
        user_permissions_tree(tmp)
        # checked again now: loading and merging took a while, and the folder may have changed since
        check_export_folder(args.export_merged, adapter, model_name)
        if os.path.isdir(args.export_merged):  # empty, or an earlier export: set aside, then only its own files go
            old = make_temp_dir(args.export_merged)
            os.replace(args.export_merged, os.path.join(old, "export"))
            os.replace(tmp, args.export_merged)
            remove_export(os.path.join(old, "export"), args.export_merged + ".earlier")
            os.rmdir(old)
        else:
            os.replace(tmp, args.export_merged)
    except (OSError, UserError) as e:  # a full disk, or the folder changed meanwhile: no half export is left behind
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(e, OSError):
            raise
        raise UserError(f"--export-merged {args.export_merged}: cannot write the export ({e.strerror}); nothing "
                        "was changed") from None


def write_merged_card(folder, model_name, adapter, generation, kind):
    """The export's model card (model_card.py), with the test scores of train.py's results.json beside the adapter
    when they are this adapter's."""
    trained_on = read_caption_settings(adapter).get("trained_on", {})
    results_path, scores, images = os.path.join(os.path.dirname(os.path.abspath(adapter)), "results.json"), None, 0
    try:
        results = read_json(results_path)
        if os.path.abspath(str(results.get("adapter"))) == os.path.abspath(adapter):
            scores = {"zero-shot": dict(results["zero_shot"]), "fine-tuned": dict(results["fine_tuned"])}
            images = int(results["images"])
    except (UserError, AttributeError, KeyError, TypeError, ValueError):
        pass  # no scores of this adapter's: the card says what it is and how to use it
    merged_card(folder, base_model_reference(model_name), adapter, trained_on, generation["prompt"],
                {k: v for k, v in generation.items() if k != "prompt"}, scores, images, kind)


def remove_export(folder, keep_as):
    """Delete an earlier export: exactly the files its marker lists (the export wrote them), then the folder; if
    something else came in after the last check, the folder is kept, renamed keep_as."""
    marker = os.path.join(folder, EXPORT_MARKER)
    written = read_json(marker).get("files", []) if os.path.isfile(marker) else []  # checked: a list of names
    for name in [*written, EXPORT_MARKER]:
        path = os.path.join(folder, name)
        if os.path.isfile(path) and not os.path.islink(path):
            os.remove(path)
    try:
        os.rmdir(folder)
    except OSError:
        os.replace(folder, keep_as)
        print(f"note: {keep_as}: what came into the earlier export while this one was written", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
