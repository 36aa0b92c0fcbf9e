"""
Image-caption collections for BLIP-2: read the layouts people have, and turn images + captions into model batches.

Check a collection before training (prints the layout found, images and captions per split, what was skipped and why):
    python data.py data/flickr8k
    python data.py my_photos/ --json
    python data.py my_photos/ --caption-column=description

Layouts (README, "Your own captions"); the first one found wins:
    flickr8k-text  Flickr8k.token.txt + Flickr_8k.{train,dev,test}Images.txt + Flicker8k_Dataset/   (original release)
    karpathy       dataset_{flickr8k,flickr30k,coco}.json + the image folder (COCO: train2014/, val2014/)
    kaggle         captions.txt (CSV: image,caption) + Images/                                      (Kaggle Flickr8k)
    imagefolder    metadata.jsonl or metadata.csv (file_name + a caption column), at the top or in train/,
                   validation/, test/ folders: the Hugging Face `imagefolder` convention
An image may have any number of captions. Nothing is dropped silently: every skipped row, image or split entry is
listed with its reason, and a malformed file is one error line naming the file and the line or key.

A training batch (CaptionCollator) holds B images, each with ALL its captions, so the image side of the model can run
once per image (train.py's grouped step). The encoder input is what Blip2Processor(images=..., text=prompt) gives:
num_query_tokens image tokens, then the prompt. BLIP-2 writes its 32 image vectors into exactly those positions;
without them it would train and caption blind, with no error (the "image-token trap").
"""
import argparse
import csv
import hashlib
import json
import os
import sys
import warnings
from dataclasses import dataclass, field

import torch
from PIL import Image

SPLITS = ("train", "val", "test")
# Where the images of a caption file may be; "" is the collection's folder itself (COCO: DIR/train2014/...).
IMAGE_DIRS = ("Flicker8k_Dataset", "Flickr8k_Dataset", "flickr30k-images", "flickr30k_images", "Images", "images", "")
TEXT_DIRS = ("", "Flickr8k_text")  # the Flickr8k text zip may be unpacked in place or into its own folder
TOKEN_FILE, KAGGLE_FILE = "Flickr8k.token.txt", "captions.txt"
KARPATHY_FILES = ("dataset_flickr8k.json", "dataset_flickr30k.json", "dataset_coco.json")
SPLIT_FILES = {"train": "Flickr_8k.trainImages.txt", "val": "Flickr_8k.devImages.txt",  # official dev == val
               "test": "Flickr_8k.testImages.txt"}
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
# Hugging Face's split folder names (and the values of a `split` column) -> ours
SPLIT_NAMES = {"train": "train", "training": "train", "validation": "val", "valid": "val", "val": "val",
               "dev": "val", "test": "test", "testing": "test", "eval": "test"}
CAPTION_COLUMNS = ("text", "caption", "captions")  # tried in this order unless caption_column names one
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
MIN_IMAGES_TO_HOLD_OUT = 10  # a hash split of fewer images keeps them all for training


class DataError(Exception):
    """A problem with the user's files, reported in one line without a traceback."""


@dataclass
class ImageCaptions:
    name: str            # path relative to the collection (a file name for Flickr): the key used everywhere
    path: str
    captions: list       # every reference caption, as written in the source files


@dataclass
class CaptionCollection:
    layout: str
    split_source: str
    splits: dict                                     # "train" | "val" | "test" -> list[ImageCaptions]
    skipped: list = field(default_factory=list)      # [{"item": ..., "reason": ...}]

    def report(self):
        return {"layout": self.layout, "split_source": self.split_source,
                "splits": {s: {"images": len(items), "captions": sum(len(i.captions) for i in items)}
                           for s, items in self.splits.items()},
                "skipped": self.skipped}


# --------------------------------------------------------------------------------------------------- reading files

def _find(root, names, dirs=TEXT_DIRS):
    for d in dirs:
        for name in names:
            path = os.path.join(root, d, name)
            if os.path.isfile(path):
                return path
    return None


def _read_lines(path):
    # Tolerate CRLF, a missing final newline and stray non-UTF-8 bytes in edited copies.
    with open(path, "rb") as f:
        return f.read().decode("utf-8-sig", errors="replace").splitlines()


def _read_text(path):
    """A JSON or metadata file's text; not UTF-8 is an error (a wrong byte would silently change a file name)."""
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None


def _csv_rows(path):
    """(line number, row) of a real CSV: quoted fields may hold commas, newlines and doubled quotes."""
    with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
        rows = csv.reader(f)
        try:
            for row in rows:
                yield rows.line_num, row
        except csv.Error as e:  # a field over the csv module's limit (131,072 characters), a NUL byte, ...
            raise DataError(f"{path}: line {rows.line_num}: not readable as CSV ({e})") from None


def _find_images(folder, names):
    """{name: path} for the names (paths relative to folder, '/'-separated) that are image files in it."""
    listings, found = {}, {}
    for name in names:
        sub, _, base = name.rpartition("/")
        if sub not in listings:
            directory = os.path.join(folder, sub)
            listings[sub] = set(os.listdir(directory)) if os.path.isdir(directory) else set()
        # "._name.jpg" are macOS resource forks, not images (zips made on a Mac are full of them)
        if base in listings[sub] and base.lower().endswith(IMAGE_SUFFIXES) and not base.startswith("._"):
            found[name] = os.path.join(folder, name)
    return found


def _image_folder(root, names):
    """The folder among IMAGE_DIRS (or root itself) that holds most of the named images (judged on a sample)."""
    candidates = [os.path.join(root, d) for d in IMAGE_DIRS if os.path.isdir(os.path.join(root, d))]
    sample = names[:200]
    return max(candidates, key=lambda folder: len(_find_images(folder, sample)))  # the first, on a tie


def _parse_token_file(path, skipped):
    """Flickr8k.token.txt: '<file>.jpg#<n><TAB><caption>' -> {file: [captions]} in file order."""
    captions = {}
    for number, line in enumerate(_read_lines(path), 1):
        if not line.strip():
            continue
        key, sep, caption = line.partition("\t")
        if not sep:  # some edited copies use a space instead of the TAB
            key, _, caption = line.partition(" ")
        name, hash_sign, index = key.strip().rpartition("#")  # the LAST '#': captions may contain '#' too
        if not hash_sign or not index.strip().isdigit() or not caption.strip():
            skipped.append({"item": f"{os.path.basename(path)} line {number}",
                            "reason": "not '<image>#<n><TAB><caption>'"})
            continue
        captions.setdefault(name, []).append(caption.strip())
    return captions


def _parse_kaggle(path, skipped):
    captions, rows = {}, _csv_rows(path)
    _, header = next(rows, (1, None))
    if header is None or [h.strip().lower() for h in header[:2]] != ["image", "caption"]:
        raise DataError(f"{path}: expected a CSV with header 'image,caption', found {header}")
    for number, row in rows:
        if len(row) != 2 or not row[0].strip() or not row[1].strip():
            if row:
                skipped.append({"item": f"{os.path.basename(path)} line {number}", "reason": "not 'image,caption'"})
            continue
        captions.setdefault(row[0].strip(), []).append(row[1].strip())
    return captions


def _hash_split(names, train_fraction, val_fraction):
    """A deterministic split when the collection has none: order by md5 of the name, cut by the fractions."""
    ordered = sorted(names, key=lambda n: hashlib.md5(n.encode()).hexdigest())
    if len(ordered) < MIN_IMAGES_TO_HOLD_OUT:
        return {"train": ordered, "val": [], "test": []}
    n_train, n_val = round(len(ordered) * train_fraction), max(1, round(len(ordered) * val_fraction))
    n_train = min(n_train, len(ordered) - n_val - 1)  # at least one test image
    return {"train": ordered[:n_train], "val": ordered[n_train:n_train + n_val], "test": ordered[n_train + n_val:]}


def _official_split(root):
    paths = {s: _find(root, [f]) for s, f in SPLIT_FILES.items()}
    if not all(paths.values()):
        return None
    return {s: [line.strip() for line in _read_lines(p) if line.strip()] for s, p in paths.items()}


def _karpathy(path):
    """Karpathy's dataset_*.json -> ({split: [names]}, {name: [captions]}). COCO names are 'val2014/COCO_...jpg'."""
    try:
        images = json.loads(_read_text(path))["images"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DataError(f"{path}: not one of Karpathy's dataset_*.json files ({e.__class__.__name__}: {e})") from None
    if not isinstance(images, list):
        raise DataError(f"{path}: 'images' must be a list of objects")
    split, captions = {s: [] for s in SPLITS}, {}
    for i, image in enumerate(images):
        if not isinstance(image, dict) or not isinstance(image.get("filename"), str):
            raise DataError(f"{path}: images[{i}] is not an object with a 'filename'")
        name = "/".join(filter(None, (image.get("filepath"), image["filename"])))  # filepath: COCO's train2014/...
        sentences = image.get("sentences", [])
        if not isinstance(sentences, list) or not all(isinstance(s, dict) and isinstance(s.get("raw"), str)
                                                      for s in sentences):
            raise DataError(f"{path}: images[{i}] ({name}): every entry of 'sentences' needs a 'raw' caption")
        label = {"restval": "train"}.get(image.get("split"), image.get("split"))  # restval is training data
        if label in split:
            split[label].append(name)
        captions[name] = [s["raw"].strip() for s in sentences if s["raw"].strip()]
    return split, captions


def _metadata_records(path):
    """Each row of metadata.jsonl (one JSON object a line) or metadata.csv as (line number, {column: value})."""
    if path.endswith(".jsonl"):
        records = []
        for number, line in enumerate(_read_text(path).splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {number}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}: line {number}: expected a JSON object with file_name and a caption")
            records.append((number, record))
        return records
    rows = _csv_rows(path)
    _, header = next(rows, (1, None))
    if not header:
        raise DataError(f"{path}: empty; expected a CSV header with file_name and a caption column")
    header = [h.strip() for h in header]
    return [(number, dict(zip(header, row))) for number, row in rows if any(cell.strip() for cell in row)]


def _relative_name(file_name):
    """'./a\\b.jpg' -> 'a/b.jpg'; None for a path that leaves the collection's folder."""
    name = os.path.normpath(file_name.strip()).replace(os.sep, "/").replace("\\", "/")
    return None if os.path.isabs(name) or name == ".." or name.startswith("../") else name


def _read_metadata(path, caption_column, prefix, skipped):
    """One metadata file -> ({prefix + file_name: [captions]}, {name: split column value}). Several rows with one
    file_name are several captions of that image; a caption cell may also be a list of captions (JSONL)."""
    records = _metadata_records(path)
    columns = {key for _, record in records for key in record}
    if records and "file_name" not in columns:
        raise DataError(f"{path}: no 'file_name' column (found: {', '.join(sorted(columns))})")
    column = caption_column or next((c for c in CAPTION_COLUMNS if c in columns), None)
    if records and column not in columns:
        raise DataError(f"{path}: no caption column " + (f"{caption_column!r}" if caption_column else
                        f"(looked for {', '.join(CAPTION_COLUMNS)}; name yours with caption_column=NAME in "
                        "train.py, --caption-column NAME in data.py and evaluate.py)")
                        + f"; found: {', '.join(sorted(columns))}")
    captions, row_split = {}, {}
    for number, record in records:
        item = f"{prefix}{os.path.basename(path)} line {number}"
        file_name, value = record.get("file_name"), record.get(column)
        name = _relative_name(file_name) if isinstance(file_name, str) and file_name.strip() else None
        texts = [value] if isinstance(value, str) else value
        if name is None:
            reason = "file_name is missing or leaves the collection's folder"
        elif not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            reason = f"{column} is not a caption or a list of captions"
        elif not any(t.strip() for t in texts):
            reason = "no caption"
        else:
            captions.setdefault(prefix + name, []).extend(t.strip() for t in texts if t.strip())
            if "split" in record:
                row_split[prefix + name] = record["split"]
            continue
        skipped.append({"item": item, "reason": reason})
    return captions, row_split


def _split_folders(root):
    """The folders of root named like a split (train/, validation/, ...) that hold their own metadata file."""
    return sorted(d for d in os.listdir(root)
                  if d.lower() in SPLIT_NAMES and _find(os.path.join(root, d), METADATA_FILES, ("",)))


def _imagefolder(root, caption_column, skipped):
    """Hugging Face imagefolder metadata -> (captions, split or None, split_source). Splits come from split folders
    each with its own metadata, else a `split` column, else a first path component named like a split."""
    folders = _split_folders(root)
    if folders:
        captions, split = {}, {s: [] for s in SPLITS}
        for d in folders:
            part, _ = _read_metadata(_find(os.path.join(root, d), METADATA_FILES, ("",)), caption_column, d + "/",
                                     skipped)
            captions.update(part)
            split[SPLIT_NAMES[d.lower()]] += list(part)
        return captions, split, "split folders (" + ", ".join(d + "/" for d in folders) + ")"
    captions, row_split = _read_metadata(_find(root, METADATA_FILES, ("",)), caption_column, "", skipped)
    labels, source = row_split, "the metadata's split column"
    if not labels and captions and all("/" in n and n.split("/")[0].lower() in SPLIT_NAMES for n in captions):
        labels, source = {n: n.split("/")[0] for n in captions}, "the folder in each file_name"
    if not labels:
        return captions, None, None
    split = {s: [] for s in SPLITS}
    for name, label in labels.items():
        ours = SPLIT_NAMES.get(str(label).strip().lower())
        if ours:
            split[ours].append(name)
        else:
            skipped.append({"item": name, "reason": f"split {label!r} is not train, validation or test"})
    return captions, split, source


def read_captions(root, caption_column=None):
    """Detect the layout in `root` and return a CaptionCollection with every split's images and captions."""
    if not os.path.isdir(root):
        raise DataError(f"{root}: no such directory. Put your images and captions there (README: 'Your own "
                        "captions') or try the offline demo: python train.py config/demo.py")
    skipped, split, split_source = [], None, None
    token, karpathy, kaggle = _find(root, [TOKEN_FILE]), _find(root, KARPATHY_FILES), _find(root, [KAGGLE_FILE])
    if token:
        layout, source, captions = "flickr8k-text", token, _parse_token_file(token, skipped)
    elif karpathy:
        layout, source, (split, captions) = "karpathy", karpathy, _karpathy(karpathy)
        split_source = os.path.basename(karpathy)
    elif kaggle:
        layout, source, captions = "kaggle", kaggle, _parse_kaggle(kaggle, skipped)
    elif _find(root, METADATA_FILES, ("",)) or _split_folders(root):
        layout, source = "imagefolder", "the metadata"
        captions, split, split_source = _imagefolder(root, caption_column, skipped)
    else:
        raise DataError(f"{root}: no captions found (looked for {TOKEN_FILE}, {', '.join(KARPATHY_FILES)}, "
                        f"{KAGGLE_FILE}, metadata.jsonl or metadata.csv; README: 'Your own captions')")
    names = list(captions)
    images = _find_images(root if layout == "imagefolder" else _image_folder(root, names), names)
    if names and not images:
        raise DataError(f"{root}: none of the {len(names)} images named in {source} was found "
                        f"(looked in {', '.join(d + '/' for d in IMAGE_DIRS if d)} and the folder itself)")

    # Names with captions but no image file (Flickr8k has one: '2258277193_586949ec62.jpg.1'). Never guess a name.
    for name in names:
        if name not in images:
            skipped.append({"item": name, "reason": f"no image file ({len(captions[name])} captions)"})
        elif not captions[name]:
            skipped.append({"item": name, "reason": "no captions"})
    usable = {n for n in names if n in images and captions[n]}

    if split is None:
        official = _official_split(root)
        flickr8k_json = _find(root, KARPATHY_FILES[:1])
        if official:
            split, split_source = official, "official split files"
        elif flickr8k_json:
            split, split_source = _karpathy(flickr8k_json)[0], KARPATHY_FILES[0]
        else:  # no split in the collection: a deterministic one, and the report says so
            kaggle_cut = layout == "kaggle"
            split = _hash_split(usable, *((6000 / 8091, 1000 / 8091) if kaggle_cut else (0.8, 0.1)))
            split_source = ("deterministic md5 split (6000/1000/rest of 8091, scaled)" if kaggle_cut else
                            "deterministic md5 split of the file names (80/10/10)")
            if len(usable) < MIN_IMAGES_TO_HOLD_OUT:
                split_source = (f"all {len(usable)} images in train: fewer than {MIN_IMAGES_TO_HOLD_OUT} are too few "
                                "to hold out val and test images (add a split column or split folders to evaluate)")

    splits, placed = {}, set()
    for s in SPLITS:
        splits[s] = []
        for name in split[s]:
            if name in usable and name not in placed:
                placed.add(name)
                splits[s].append(ImageCaptions(name, images[name], captions[name]))
            elif name not in captions:  # (a name with captions but no image was reported above)
                skipped.append({"item": name, "reason": f"listed in the {s} split but has no captions"})
    reported = {entry["item"] for entry in skipped}
    for name in sorted(usable - placed - reported):
        skipped.append({"item": name, "reason": "in no split"})  # 91 real images of the Flickr8k release
    return CaptionCollection(layout, split_source, splits, skipped)


# --------------------------------------------------------------------------------------------------- model batches

# Pillow refuses images over 179M pixels as possible "decompression bombs" with an error of its own type. Here the
# limit is ours, on purpose: up to 24,000 x 24,000 pixels (a 576M-pixel panorama takes 1.7 GB to decode) an image is
# read and resized to the model's 224 like any other; above it, it is skipped with a ValueError, like a broken file.
MAX_IMAGE_PIXELS = 24_000 * 24_000


def load_rgb(path):
    """Open any image Pillow reads (L, P, CMYK, RGBA, ...) as RGB; raises OSError/ValueError if it is not one."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        pillow_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            image = Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = pillow_limit
    with image:
        if image.width * image.height > MAX_IMAGE_PIXELS:
            raise ValueError(f"{image.width} x {image.height} pixels is over the {MAX_IMAGE_PIXELS:,} this project "
                             "reads (data.MAX_IMAGE_PIXELS)")
        image.load()
        if image.mode in ("RGBA", "LA", "P"):  # composite transparency onto white rather than black
            image = image.convert("RGBA")
            background = Image.new("RGBA", image.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, image)
        return image.convert("RGB")


def clean_caption(caption):
    """Training target: one space between words, no trailing ' .', lower case ('A dog runs .' -> 'a dog runs')."""
    return " ".join(caption.split()).rstrip(" .").lower()


def long_captions(items, tokenizer, max_tokens):
    """(how many captions are over max_tokens tokens, EOS included; the longest length). CaptionCollator cuts such
    captions to max_tokens, so train.py reports them once at the start rather than cutting silently."""
    captions = [clean_caption(c) for item in items for c in item.captions]
    lengths = [len(ids) for start in range(0, len(captions), 4096)
               for ids in tokenizer(captions[start:start + 4096]).input_ids]
    return sum(n > max_tokens for n in lengths), max(lengths, default=0)


def encoder_prompt_ids(tokenizer, prompt, num_query_tokens, image_token_id):
    """num_query_tokens image tokens, then the tokenized prompt: the ids Blip2Processor(images, text=prompt) makes."""
    prompt_ids = tokenizer(prompt).input_ids
    # Checked here, once: then every encoder input holds exactly num_query_tokens image tokens, which
    # model.encoder_inputs relies on (without a per-step check that would split a compiled graph).
    if image_token_id in prompt_ids:
        raise ValueError(f"prompt {prompt!r} contains the image token "
                         f"{tokenizer.convert_ids_to_tokens(image_token_id)!r}: the image tokens are put before the "
                         "prompt for you, so leave it out")
    return [image_token_id] * num_query_tokens + prompt_ids


class ImageCaptionDataset(torch.utils.data.Dataset):
    """Item i = (i, pixel_values (3, H, W) or None if the image cannot be read)."""

    def __init__(self, items, image_processor, load_images=True):
        self.items, self.image_processor, self.load_images = items, image_processor, load_images

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        if not self.load_images:
            return i, None
        try:
            image = load_rgb(self.items[i].path)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            warnings.warn(f"skipping unreadable image {self.items[i].path}: {e}")
            return i, None
        return i, self.image_processor(image, return_tensors="pt").pixel_values[0]


class CaptionCollator:
    """Turns [(index, pixel_values)] into one batch of B images and their N captions (N = 5 B for Flickr8k).

    batch["pixel_values"]   (B, 3, H, W) float        (absent when images are not loaded: the vision cache has them)
    batch["image_index"]    (B,) long                 dataset index of each image
    batch["input_ids"]      (B, Q + P) long            Q image tokens + P prompt tokens, the same for every image
    batch["attention_mask"] (B, Q + P) long
    batch["labels"]         (N, T) long                caption tokens + EOS, padding = -100 (ignored by the loss)
    batch["caption_image"]  (N,) long                 which of the B images each caption describes
    batch["skipped"]        number of unreadable images dropped from this batch
    """

    def __init__(self, items, tokenizer, prompt_ids, max_caption_tokens=40, load_images=True, fixed_length=False):
        self.items, self.tokenizer, self.prompt_ids = items, tokenizer, prompt_ids
        self.max_caption_tokens, self.load_images = max_caption_tokens, load_images
        # fixed_length: pad every caption to max_caption_tokens, so that a compiled step sees one shape only
        self.padding = "max_length" if fixed_length else "longest"

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
        tokens = self.tokenizer(captions, padding=self.padding, truncation=True, max_length=self.max_caption_tokens,
                                return_tensors="pt")
        batch["labels"] = tokens.input_ids.masked_fill(tokens.attention_mask == 0, -100)
        batch["caption_image"] = torch.tensor(caption_image, dtype=torch.long)
        return batch


# --------------------------------------------------------------------------------------------------- the report

def print_report(data):
    print(f"layout: {data.layout}   split: {data.split_source}")
    for s, counts in data.report()["splits"].items():
        print(f"  {s:5s} {counts['images']:6,d} images {counts['captions']:7,d} captions")
    by_reason = {}
    for entry in data.skipped:
        by_reason.setdefault(entry["reason"], []).append(entry["item"])
    print(f"skipped: {len(data.skipped)}" + ("" if data.skipped else " (nothing)"))
    for reason, items in by_reason.items():
        shown = ", ".join(items[:3]) + (f", ... ({len(items) - 3} more)" if len(items) > 3 else "")
        print(f"  {len(items):5d} x {reason}: {shown}")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Check an image-caption collection: the layout found, images and "
                                     "captions per split, and every skipped entry with its reason.")
    parser.add_argument("dir", help="the collection's folder")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    parser.add_argument("--caption-column", "--caption_column", help="imagefolder metadata: the caption column "
                        f"(default: the first of {', '.join(CAPTION_COLUMNS)})")
    args = parser.parse_args(argv)
    try:
        data = read_captions(args.dir, args.caption_column)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(data.report()))
    else:
        print_report(data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
