"""
Image-caption collections for BLIP-2: read one in any layout people have, check it, and turn images + captions into
model batches.

Check a collection before training (prints the layout found, images and captions per split, what was skipped and why):
    python data.py data/flickr8k
    python data.py my_photos/ --json
    python data.py my_photos/ --check-images                   # also decode every image: lists the unreadable ones
    python data.py my_hub_dataset/ --caption-column=caption_0,caption_1,caption_2 --image-column=img

read_captions finds the layout (layouts.py: Flickr8k's three, Karpathy's JSON, Hugging Face imagefolder metadata,
parquet shards and save_to_disk folders from the hub), then does what every layout needs: it checks that each image
is inside the collection's folder, makes a deterministic split when the collection has none, and lists everything
it skipped with the reason. An image path that leaves the folder (`../x.jpg`, an absolute path, `a\\..\\..\\x.jpg`,
a symbolic link to elsewhere) is skipped, never read; symlinks_out=True (train.py) or --symlinks-out follows symbolic
links out of the folder on purpose. Images held inside dataset files need no such check.

A training batch (CaptionCollator) holds B images, each with ALL its captions, so the image side of the model can run
once per image (train.py's grouped step). The prompt is what Blip2Processor(images=..., text=prompt) gives:
num_query_tokens image tokens, then the prompt's tokens. BLIP-2 writes its 32 image vectors into exactly those
positions; without them it would train and caption blind, with no error (the "image-token trap").
"""
import argparse
import hashlib
import json
import os
import posixpath
import sys
from dataclasses import dataclass, field

import torch

from blip2lora import images
from blip2lora.files import inside, one_line_errors, printable
from blip2lora.images import IMAGE_SUFFIXES, DatasetImage, UnreadableImage, load_image, warn_unreadable
from blip2lora.layouts import (CAPTION_COLUMNS, LAYOUTS, SPLITS, DataError, Options, clean_relative_path,
                               refuse_a_link_out)
from blip2lora.progress import progress

MIN_IMAGES_TO_HOLD_OUT = 10  # a hash split of fewer images keeps them all for training
# A training batch holds each image with all its captions, up to this many: an image with more (a scraped collection
# can append thousands to one image) is trained on as several items of at most this many, so that one step's memory
# stays bounded while every caption still counts once an epoch (split_many_captions).
MAX_CAPTIONS_PER_IMAGE = 50

# A collection with train but no val (hub datasets ship train and test): val is carved from train, 5% of it by the
# md5 order, at least enough images to choose an adapter by (train.py's MIN_VAL_TO_CHOOSE) and at most 500 (the
# default eval_images), from a train split large enough to keep 80% of itself.
VAL_FROM_TRAIN = (0.05, 20, 500)


@dataclass
class ImageCaptions:
    name: str            # the key used everywhere: the image's path in the collection, or FILE#ROW inside a dataset
    image: object        # where the pixels are: a file path, or an images.DatasetImage
    captions: list       # every reference caption, as written in the source files


@dataclass
class CaptionCollection:
    layout: str
    split_source: str
    splits: dict                                     # "train" | "val" | "test" -> list[ImageCaptions]
    skipped: list = field(default_factory=list)      # [{"item": ..., "reason": ...}]
    files: list = field(default_factory=list)        # the caption files read
    rows: int = 0                                    # the records read from them (lines, rows, images)
    caption_columns: list = field(default_factory=list)  # the table columns the captions came from
    val_note: str = ""                               # how val was carved from train, when the collection had none

    def report(self):
        return {"layout": self.layout, "split_source": self.split_source, "files": self.files, "rows": self.rows,
                "caption_columns": self.caption_columns, "val_note": self.val_note,
                "splits": {s: {"images": len(items), "captions": sum(len(i.captions) for i in items)}
                           for s, items in self.splits.items()},
                "skipped": self.skipped, "many_captions": many_captions_note(self.splits["train"])}


def read_captions(root, caption_column=None, image_column=None, symlinks_out=False, val_from_train=True):
    """Detect the layout in `root` and return a CaptionCollection with every split's images and captions; a
    collection with no val split gets one carved from train (VAL_FROM_TRAIN) unless val_from_train is False."""
    if not os.path.isdir(root):
        raise DataError(f"{root}: no such directory. Put your images and captions there (README: 'Your own "
                        "captions') or try the offline demo: python train.py config/demo.py")
    options = Options(caption_column or "", image_column or "", symlinks_out)
    for layout in LAYOUTS:
        marker = layout.detect(root)
        if marker:
            found = layout.read(root, marker, options)
            break
    else:
        raise DataError(f"{root}: no captions found (looked for Flickr8k.token.txt, dataset_*.json, captions.txt, "
                        "metadata.jsonl or metadata.csv, *.parquet, a save_to_disk folder; README: 'Your own "
                        "captions')" + _caption_file_hint(root))
    for file in found.files:  # the caption files read: what came from outside is not used, as images are not
        refuse_a_link_out(file if os.path.lexists(file) else os.path.join(root, file), root, symlinks_out)
    located = _locate(root, found, options)  # name -> file path or DatasetImage
    usable = {n for n in found.captions if n in located and found.captions[n]}
    for name in found.captions:
        if name in located and not found.captions[name]:
            found.skipped.append({"item": name, "reason": "no captions"})
    split, split_source = found.split, found.split_source
    if split is None:  # the collection has no split: a deterministic one, and the report says so
        split = _hash_split(usable, *found.split_fractions)
        split_source = split_source or "deterministic md5 split of the file names (80/10/10)"
        if len(usable) < MIN_IMAGES_TO_HOLD_OUT:
            split_source = (f"all {len(usable)} images in train: fewer than {MIN_IMAGES_TO_HOLD_OUT} are too few "
                            "to hold out val and test images (add a split column or split folders to evaluate)")
    splits = _place(split, found, located, usable)
    val_note = _carve_val(splits) if val_from_train and not splits["val"] and found.split is not None else ""
    return CaptionCollection(layout.name, split_source, splits, found.skipped, found.files, found.rows,
                             found.caption_columns, val_note)


def _carve_val(splits):
    """Val images taken from train by the md5 order of their names, for a collection that has none; returns the
    line that says so."""
    fraction, fewest, most = VAL_FROM_TRAIN
    train = splits["train"]
    count = min(most, max(fewest, round(fraction * len(train))))
    if len(train) < 5 * count:
        return (f"no val split, and {len(train)} train images are too few to take {fewest} from: nothing is "
                "evaluated during training")
    held_out = set(_md5_order([i.name for i in train])[:count])
    splits["val"] = [i for i in train if i.name in held_out]
    splits["train"] = [i for i in train if i.name not in held_out]
    return (f"no val split: {count} of the {len(train)} train images are val, chosen by the md5 of their names "
            "(val_from_train=False in train.py, --no-val-from-train here, keeps them in train)")


def _caption_file_hint(root):
    """For a folder whose caption file has a name this project does not look for: how to name it."""
    try:
        tables = sorted(n for n in os.listdir(root) if n.lower().endswith((".csv", ".jsonl", ".tsv")))
    except OSError:
        return ""
    if not tables:
        return ""
    return (f". Found {', '.join(printable(n) for n in tables[:3])}: if it holds your captions, name it "
            "metadata.csv (or metadata.jsonl) with a file_name column (the image's path in this folder) and a caption "
            "column, the Hugging Face imagefolder layout")

def _place(split, found, located, usable):
    """The split's names as ImageCaptions, each image once; names in no split are reported."""
    splits, placed = {}, set()
    for s in SPLITS:
        splits[s] = []
        for name in split.get(s, []):
            if name in usable and name not in placed:
                placed.add(name)
                splits[s].append(ImageCaptions(name, located[name], found.captions[name]))
            elif name not in found.captions:  # (a name with captions but no image was reported already)
                found.skipped.append({"item": name, "reason": f"listed in the {s} split but has no captions"})
    reported = {entry["item"] for entry in found.skipped}
    for name in sorted(usable - placed - reported):
        found.skipped.append({"item": name, "reason": "in no split"})  # 91 real images of the Flickr8k release
    return splits


def _md5_order(names):
    return sorted(names, key=lambda n: hashlib.md5(n.encode("utf-8", "surrogateescape")).hexdigest())


def _hash_split(names, train_fraction, val_fraction):
    """A deterministic split when the collection has none: order by md5 of the name, cut by the fractions."""
    ordered = _md5_order(names)
    if len(ordered) < MIN_IMAGES_TO_HOLD_OUT:
        return {"train": ordered, "val": [], "test": []}
    n_train, n_val = round(len(ordered) * train_fraction), max(1, round(len(ordered) * val_fraction))
    n_train = min(n_train, len(ordered) - n_val - 1)  # at least one test image
    return {"train": ordered[:n_train], "val": ordered[n_train:n_train + n_val], "test": ordered[n_train + n_val:]}


# ------------------------------------------------------------------------- images inside the collection's folder

class _Folders:
    """Folder listings (one scandir per folder, fast for COCO's 123,287 files) and whether paths stay inside root."""

    def __init__(self, root, symlinks_out):
        self.root, self.symlinks_out = root, symlinks_out
        self.listings, self.folder_inside = {}, {}

    def listing(self, folder):
        if folder not in self.listings:
            self.listings[folder] = images.list_folder(folder)
        return self.listings[folder]

    def leaves(self, folder, path, entry):
        """Whether path (an entry of folder) resolves to outside root: a symbolic link, or a folder reached by one."""
        if folder not in self.folder_inside:
            self.folder_inside[folder] = inside(folder, self.root)
        return (entry == "link" or not self.folder_inside[folder]) and not inside(path, self.root)

    def why_not(self, relative):
        """(root/relative, None) if it is an image file inside the collection, else (None, the reason it is not)."""
        name = clean_relative_path(relative)
        if name is None:
            return None, "its path leaves the collection's folder"
        folder, _, base = posixpath.join(self.root, name).rpartition("/")
        entry = self.listing(folder).get(base)
        if entry is None:
            return None, "no image file"
        if not base.lower().endswith(IMAGE_SUFFIXES) or base.startswith("._"):  # ._x.jpg: macOS resource forks
            return None, "not an image file name (" + ", ".join(IMAGE_SUFFIXES) + ")"
        path = posixpath.join(folder, base)
        if not self.symlinks_out and self.leaves(folder, path, entry):
            return None, "a symbolic link to outside the collection's folder (symlinks_out=True follows it)"
        if entry == "other" or (entry == "link" and not os.path.isfile(path)):
            return None, "not a regular file (a folder, FIFO or device)"
        return path, None


def _locate(root, found, options):
    """{name: file path or DatasetImage} for every name whose image can be read; the rest are reported skipped."""
    folders, located, why = _Folders(root, options.symlinks_out), {}, {}
    for name, image in found.images.items():
        if isinstance(image, DatasetImage):
            located[name] = image
            continue
        path, reason = folders.why_not(image)
        if path:
            located[name] = path
        else:
            why[name] = reason
    for name in found.captions:
        if name not in located:
            why.setdefault(name, "no image file")
            found.skipped.append({"item": name, "reason": f"{why[name]} ({len(found.captions[name])} captions)"})
    if found.captions and not located:
        first = next(iter(why))
        raise DataError(f"{root}: none of the {len(found.captions)} images named in {', '.join(found.files)} can be "
                        f"used ({printable(first)}: {why[first]}); python data.py {root} lists them all")
    return located


# --------------------------------------------------------------------------------------------------- model batches

def split_many_captions(items, most=MAX_CAPTIONS_PER_IMAGE):
    """The train items with at most `most` captions each: an image with more is repeated, each time with the next
    `most` of its captions (the same name, so the vision cache computes it once)."""
    bounded = []
    for item in items:
        if len(item.captions) <= most:
            bounded.append(item)
        else:
            bounded += [ImageCaptions(item.name, item.image, item.captions[k:k + most])
                        for k in range(0, len(item.captions), most)]
    return bounded


def many_captions_note(items, most=MAX_CAPTIONS_PER_IMAGE):
    """The line train.py and data.py print when some train images have more than `most` captions, else ""."""
    over = [len(item.captions) for item in items if len(item.captions) > most]
    if not over:
        return ""
    return (f"{len(over):,} train images have more than {most} captions (the most: {max(over):,}): training reads each "
            f"{most} at a time, as {sum(-(-n // most) for n in over):,} batch entries, to bound a step's memory")


def clean_caption(caption):
    """Training target: one space between words, no trailing ' .', lower case ('A dog runs .' -> 'a dog runs')."""
    return " ".join(caption.split()).rstrip(" .").lower()


def caption_token_stats(items, caption_ids, max_tokens, unknown_id):
    """What train.py says at the start about the train captions, tokenized once: how many are over max_tokens tokens
    (the end token included; CaptionCollator cuts them), the longest, and the fraction of tokens the tokenizer does
    not know. caption_ids: captions -> token ids, as model.caption_tokenizer makes it."""
    captions = [clean_caption(c) for item in items for c in item.captions]
    lengths, unknown, tokens = [], 0, 0
    for start in range(0, len(captions), 4096):
        for ids in caption_ids(captions[start:start + 4096]):
            lengths.append(len(ids))
            tokens += len(ids)
            unknown += sum(i == unknown_id for i in ids)
    return {"too_long": sum(n > max_tokens for n in lengths), "longest": max(lengths, default=0),
            "unknown_fraction": unknown / max(tokens, 1)}


def caption_notes(items, caption_ids, max_tokens, unknown_id):
    """What train.py says at the start about the train captions: cut captions, unknown words, images with many."""
    stats, notes = caption_token_stats(items, caption_ids, max_tokens, unknown_id), []
    if stats["too_long"]:
        notes.append(f"{stats['too_long']} train captions are longer than max_caption_tokens={max_tokens} (the "
                     f"longest: {stats['longest']} tokens); training reads their first {max_tokens} tokens. Raise "
                     "max_caption_tokens to keep them whole: memory and time per caption grow with it")
    if stats["unknown_fraction"] > 0.02:
        notes.append(f"warning: {100 * stats['unknown_fraction']:.0f}% of the train captions' tokens are unknown to "
                     "this model's tokenizer (<unk>): it can neither learn nor write those words. The demo base knows "
                     "only its own few dozen words; the released BLIP-2 checkpoints' tokenizers cover English text")
    many = many_captions_note(items)
    return notes + ([many] if many else [])


def prompt_ids(tokenizer, prompt, config, after=None):
    """The language model's input before the caption, as Blip2Processor(images, text=prompt) makes it:
    config.num_query_tokens image tokens, then the tokenized prompt (T5: the prompt and </s>; OPT: BOS, the prompt).
    after: {setting: tokens} that follow the prompt in one sequence (max_caption_tokens, max_new_tokens), checked
    against a language model with learned positions (OPT's max_position_embeddings) before any work."""
    ids = tokenizer(prompt).input_ids
    positions = getattr(config.text_config, "max_position_embeddings", None)  # None: T5's relative positions
    for setting, tokens in (after or {}).items():
        if positions is not None and config.num_query_tokens + len(ids) + tokens > positions:
            raise DataError(f"{setting}={tokens}: the image's {config.num_query_tokens} tokens, the prompt's "
                            f"{len(ids)} and {tokens} more are over the {positions} positions this language model "
                            f"has (max_position_embeddings); lower {setting} to at most "
                            f"{positions - config.num_query_tokens - len(ids)}")
    # Checked here, once: then every input holds exactly num_query_tokens image tokens, which blip2.embed_prompt
    # relies on (without a per-step check that would split a compiled graph).
    if config.image_token_id in ids:
        raise DataError(f"prompt {prompt!r} contains the image token "
                        f"{tokenizer.convert_ids_to_tokens(config.image_token_id)!r}: the image tokens are put before "
                        "the prompt for you, so leave it out")
    return [config.image_token_id] * config.num_query_tokens + ids


def caption_labels(caption_ids, max_tokens, width=None):
    """Token id lists (each ending in the end token) -> labels (N, T): cut to max_tokens keeping the end token, padded
    with -100 (ignored by the loss) to the longest, or to `width`."""
    cut = [ids if len(ids) <= max_tokens else ids[:max_tokens - 1] + ids[-1:] for ids in caption_ids]
    labels = torch.full((len(cut), width or max(map(len, cut))), -100, dtype=torch.long)
    for row, ids in zip(labels, cut):
        row[:len(ids)] = torch.tensor(ids)
    return labels


class CaptionCollator:
    """Turns [(index, pixel_values)] into one batch of B images and their N captions (N = 5 B for Flickr8k).

    batch["pixel_values"]   (B, 3, H, W) float        (absent when images are not loaded: the vision cache has them)
    batch["image_index"]    (B,) long                 dataset index of each image
    batch["input_ids"]      (B, L) long               Q image tokens + the prompt's tokens, the same for every image
    batch["attention_mask"] (B, L) long
    batch["labels"]         (N, T) long               caption tokens + the end token, padding = -100 (ignored)
    batch["caption_image"]  (N,) long                 which of the B images each caption describes (sorted)
    batch["skipped"]        number of unreadable images dropped from this batch

    caption_ids: captions -> token ids as the language model learns them (model.caption_tokenizer).
    """

    def __init__(self, items, caption_ids, prompt_ids, max_caption_tokens=40, load_images=True, fixed_length=False):
        self.items, self.caption_ids, self.prompt_ids = items, caption_ids, prompt_ids
        self.max_caption_tokens, self.load_images = max_caption_tokens, load_images
        # fixed_length: pad every caption to max_caption_tokens, so that a compiled step sees one shape only
        self.width = max_caption_tokens if fixed_length else None

    def __call__(self, samples):
        good = [(i, px) for i, px in samples if px is not None or not self.load_images]
        captions, caption_image = [], []
        for b, (i, _) in enumerate(good):
            for caption in self.items[i].captions:
                captions.append(clean_caption(caption))
                caption_image.append(b)
        batch = {"image_index": torch.tensor([i for i, _ in good], dtype=torch.long),
                 "skipped": len(samples) - len(good)}
        if not good:
            return batch
        if self.load_images:
            batch["pixel_values"] = torch.stack([px for _, px in good])
        prompt = torch.tensor(self.prompt_ids, dtype=torch.long)
        batch["input_ids"] = prompt.expand(len(good), -1).clone()
        batch["attention_mask"] = torch.ones_like(batch["input_ids"])
        batch["labels"] = caption_labels(self.caption_ids(captions), self.max_caption_tokens, self.width)
        batch["caption_image"] = torch.tensor(caption_image, dtype=torch.long)
        return batch


def image_loader(items, processor, num_workers):
    """The images of `items`, 32 at a time, decoded in num_workers processes: what train.py builds its vision cache
    from. Its own generator: drawing worker seeds from the global RNG would change a run's dropout."""
    return torch.utils.data.DataLoader(ImageCaptionDataset(items, processor.image_processor), batch_size=32,
                                       num_workers=min(num_workers, os.cpu_count() or 1), collate_fn=collate_images,
                                       generator=torch.Generator())


def collate_images(samples):
    """[(index, pixel_values (3, H, W) or None)] -> image_index (B,) and pixel_values (B, 3, H, W) of the readable
    images (none: no pixel_values)."""
    good = [(i, px) for i, px in samples if px is not None]
    batch = {"image_index": torch.tensor([i for i, _ in good], dtype=torch.long), "skipped": len(samples) - len(good)}
    if good:
        batch["pixel_values"] = torch.stack([px for _, px in good])
    return batch


class ImageCaptionDataset(torch.utils.data.Dataset):
    """Item i = (i, pixel_values (3, H, W) or None if the image cannot be read)."""

    def __init__(self, items, image_processor, load_images=True, on_unreadable=warn_unreadable):
        self.items, self.image_processor, self.load_images = items, image_processor, load_images
        self.on_unreadable = on_unreadable

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        if not self.load_images:
            return i, None
        try:
            image = load_image(self.items[i].image)
        except UnreadableImage as e:
            self.on_unreadable(e)
            return i, None
        return i, self.image_processor(image, return_tensors="pt").pixel_values[0]


# --------------------------------------------------------------------------------------------------- the report

def print_report(data):
    print(f"layout: {data.layout}   split: {data.split_source}")
    print(f"read: {', '.join(printable(f) for f in data.files)} ({data.rows:,} records)"
          + (f"; captions from the column(s) {', '.join(map(printable, data.caption_columns))}"
             if data.caption_columns else ""))
    if data.val_note:
        print(data.val_note)
    report = data.report()
    for s, counts in report["splits"].items():
        print(f"  {s:5s} {counts['images']:6,d} images {counts['captions']:7,d} captions")
    if report["many_captions"]:
        print(report["many_captions"])
    by_reason = {}
    for entry in data.skipped:
        by_reason.setdefault(entry["reason"], []).append(printable(entry["item"]))
    print(f"skipped: {len(data.skipped)}" + ("" if data.skipped else " (nothing)"))
    for reason, items in by_reason.items():
        shown = ", ".join(items[:3]) + (f", ... ({len(items) - 3} more)" if len(items) > 3 else "")
        print(f"  {len(items):5d} x {reason}: {shown}")


def add_collection_arguments(parser):
    """The options data.py, evaluate.py (and, as settings, train.py) share for reading a collection."""
    parser.add_argument("--caption-column", "--caption_column", help="the caption column, or several separated by "
                        f"commas (default: the first of {', '.join(CAPTION_COLUMNS)}, else caption_0, caption_1, ...)")
    parser.add_argument("--image-column", "--image_column", help="parquet/arrow datasets: the image column "
                        "(default: the column the dataset marks as images, else image)")
    parser.add_argument("--symlinks-out", "--symlinks_out", action="store_true",
                        help="follow symbolic links that lead out of the collection's folder")
    parser.add_argument("--no-val-from-train", "--no_val_from_train", dest="val_from_train", action="store_false",
                        help="a collection without a val split: keep every train image in train (by default some "
                        "are taken as val, as train.py does)")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Check an image-caption collection: the layout found, images and "
                                     "captions per split, and every skipped entry with its reason.")
    parser.add_argument("dir", help="the collection's folder")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    parser.add_argument("--check-images", "--check_images", action="store_true",
                        help="also decode every image, as training will, and list those that cannot be read")
    add_collection_arguments(parser)
    args = parser.parse_args(argv)
    return one_line_errors(lambda: report(args))


def report(args):
    data = read_captions(args.dir, args.caption_column, args.image_column, args.symlinks_out, args.val_from_train)
    unreadable = unreadable_images(data) if args.check_images else []
    if args.json:
        print(json.dumps({**data.report(), **({"unreadable": unreadable} if args.check_images else {})},
                         ensure_ascii=False, default=str).encode("utf-8", "backslashreplace").decode("utf-8"))
    else:
        print_report(data)
        if args.check_images:
            print(f"images decoded: {sum(map(len, data.splits.values())) - len(unreadable):,}, unreadable: "
                  f"{len(unreadable)}" + (" (training leaves them out)" if unreadable else ""))
            for entry in unreadable:
                print(f"  {printable(entry['reason'])}")
    return 1 if unreadable else 0


def unreadable_images(data):
    """Decode every image of every split as training does: [{"item", "reason"}] for each that fails (a cut or
    corrupt file, a format Pillow cannot read, one too large), which the caption files alone cannot show."""
    items = [item for split in data.splits.values() for item in split]
    unreadable = []
    for item in progress(items, len(items), "decoding images", "images"):
        try:
            load_image(item.image)
        except UnreadableImage as e:
            unreadable.append({"item": item.name, "reason": str(e)})
    return unreadable


if __name__ == "__main__":
    sys.exit(main())
