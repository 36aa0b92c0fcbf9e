"""
Flickr8k for BLIP-2: read any of the three layouts people download, and turn images + captions into model batches.

Check a download before training (prints the layout found, images and captions per split, what was skipped and why):
    python data.py data/flickr8k
    python data.py data/flickr8k --json

Layouts (README, "Fine-tuning on Flickr8k"); the first one found wins:
    flickr8k-text  Flickr8k.token.txt + Flickr_8k.{train,dev,test}Images.txt + Flicker8k_Dataset/   (original release)
    karpathy       dataset_flickr8k.json + Flicker8k_Dataset/                                      (Karpathy split)
    kaggle         captions.txt (CSV: image,caption) + Images/                                      (Kaggle)
Nothing is dropped silently: every skipped caption line, image id or split entry is listed with its reason.

A training batch (CaptionCollator) holds B images, each with ALL its captions, so the image side of the model can run
once per image (train.py's grouped step). The encoder input is what Blip2Processor(images=..., text=prompt) gives:
num_query_tokens image tokens, then the prompt. BLIP-2 writes its 32 image vectors into exactly those positions;
without them it would train and caption blind, with no error (the "image-token trap").
"""
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
IMAGE_DIRS = ("Flicker8k_Dataset", "Flickr8k_Dataset", "Images", "images")  # "Flicker" (sic) is the official name
TEXT_DIRS = ("", "Flickr8k_text")  # the text zip may be unpacked in place or into its own folder
TOKEN_FILE, KARPATHY_FILE, KAGGLE_FILE = "Flickr8k.token.txt", "dataset_flickr8k.json", "captions.txt"
SPLIT_FILES = {"train": "Flickr_8k.trainImages.txt", "val": "Flickr_8k.devImages.txt",  # official dev == val
               "test": "Flickr_8k.testImages.txt"}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class DataError(Exception):
    """A problem with the user's files, reported in one line without a traceback."""


@dataclass
class ImageCaptions:
    name: str            # file name, the key used everywhere (reports, predictions files, the vision cache)
    path: str
    captions: list       # every reference caption, as written in the source files


@dataclass
class Flickr8k:
    layout: str
    split_source: str
    splits: dict                                     # "train" | "val" | "test" -> list[ImageCaptions]
    skipped: list = field(default_factory=list)      # [{"item": ..., "reason": ...}]

    def report(self):
        return {"layout": self.layout, "split_source": self.split_source,
                "splits": {s: {"images": len(items), "captions": sum(len(i.captions) for i in items)}
                           for s, items in self.splits.items()},
                "skipped": self.skipped}


def _find(root, names, dirs=TEXT_DIRS, want_dir=False):
    for d in dirs:
        for name in names:
            path = os.path.join(root, d, name)
            if (os.path.isdir(path) if want_dir else os.path.isfile(path)):
                return path
    return None


def _read_lines(path):
    # Tolerate CRLF, a missing final newline and stray non-UTF-8 bytes in edited copies.
    with open(path, "rb") as f:
        return f.read().decode("utf-8-sig", errors="replace").splitlines()


def _image_index(root):
    folder = _find(root, IMAGE_DIRS, dirs=("",), want_dir=True)
    if folder is None:
        raise DataError(f"{root}: no image folder (looked for {', '.join(d + '/' for d in IMAGE_DIRS)})")
    # Only the folder's own files: macOS zips add "._name.jpg" resource forks (and a __MACOSX/ tree beside it).
    return {n: os.path.join(folder, n) for n in os.listdir(folder)
            if n.lower().endswith(IMAGE_SUFFIXES) and not n.startswith("._")}


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
    captions = {}
    with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
        rows = csv.reader(f)  # a real CSV: captions with commas are quoted, inner quotes doubled
        header = next(rows, None)
        if header is None or [h.strip().lower() for h in header[:2]] != ["image", "caption"]:
            raise DataError(f"{path}: expected a CSV with header 'image,caption', found {header}")
        for number, row in enumerate(rows, 2):
            if len(row) != 2 or not row[0].strip() or not row[1].strip():
                if row:
                    skipped.append({"item": f"{os.path.basename(path)} line {number}",
                                    "reason": "not 'image,caption'"})
                continue
            captions.setdefault(row[0].strip(), []).append(row[1].strip())
    return captions


def _hash_split(names):
    """A deterministic split when the download has none: sort by md5 of the name, cut 6000/1000/rest of 8091."""
    ordered = sorted(names, key=lambda n: hashlib.md5(n.encode()).hexdigest())
    n_train, n_val = round(len(ordered) * 6000 / 8091), round(len(ordered) * 1000 / 8091)
    return {"train": ordered[:n_train], "val": ordered[n_train:n_train + n_val], "test": ordered[n_train + n_val:]}


def _official_split(root):
    paths = {s: _find(root, [f]) for s, f in SPLIT_FILES.items()}
    if not all(paths.values()):
        return None
    return {s: [line.strip() for line in _read_lines(p) if line.strip()] for s, p in paths.items()}


def _karpathy_split(path):
    try:
        images = json.load(open(path, encoding="utf-8"))["images"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DataError(f"{path}: not Karpathy's split file ({e.__class__.__name__}: {e})") from None
    split = {s: [] for s in SPLITS}
    for image in images:
        label = {"restval": "train"}.get(image.get("split"), image.get("split"))  # restval counts as train
        if label in split:
            split[label].append(image["filename"])
    captions = {image["filename"]: [s["raw"].strip() for s in image.get("sentences", [])] for image in images}
    return split, captions


def read_flickr8k(root):
    """Detect the layout in `root` and return a Flickr8k with every split's images and captions."""
    if not os.path.isdir(root):
        raise DataError(f"{root}: no such directory. Put Flickr8k there (README: 'Fine-tuning on Flickr8k') "
                        "or try the offline demo: python train.py config/demo.py")
    skipped = []
    token, karpathy, kaggle = _find(root, [TOKEN_FILE]), _find(root, [KARPATHY_FILE]), _find(root, [KAGGLE_FILE])
    if token:
        layout, captions = "flickr8k-text", _parse_token_file(token, skipped)
    elif karpathy:
        layout, (split, captions) = "karpathy", _karpathy_split(karpathy)
    elif kaggle:
        layout, captions = "kaggle", _parse_kaggle(kaggle, skipped)
    else:
        raise DataError(f"{root}: no Flickr8k captions found (looked for {TOKEN_FILE}, {KARPATHY_FILE}, "
                        f"{KAGGLE_FILE}, also under Flickr8k_text/)")
    images = _image_index(root)

    # Ids with captions but no image file (the release has one: '2258277193_586949ec62.jpg.1'). Never guess a name.
    for name in captions:
        if name not in images:
            skipped.append({"item": name, "reason": f"no image file ({len(captions[name])} captions)"})
        elif not captions[name]:
            skipped.append({"item": name, "reason": "no captions"})
    usable = {n for n in captions if n in images and captions[n]}

    official = None if layout == "karpathy" else _official_split(root)
    if layout == "karpathy":
        split_source = KARPATHY_FILE
    elif official:
        split, split_source = official, "official split files"
    elif karpathy:
        split, split_source = _karpathy_split(karpathy)[0], KARPATHY_FILE
    else:
        split, split_source = _hash_split(usable), "deterministic md5 split (6000/1000/rest of 8091, scaled)"

    splits, placed = {}, set()
    for s in SPLITS:
        splits[s] = []
        for name in split[s]:
            if name in usable and name not in placed:
                placed.add(name)
                splits[s].append(ImageCaptions(name, images[name], captions[name]))
            elif name not in captions:  # (an id with captions but no image was reported above)
                skipped.append({"item": name, "reason": f"listed in the {s} split but has no captions"})
    for name in sorted(usable - placed):
        skipped.append({"item": name, "reason": "in no split"})  # 91 real images of the release
    return Flickr8k(layout, split_source, splits, skipped)


# --------------------------------------------------------------------------------------------------- model batches

def load_rgb(path):
    """Open any image Pillow reads (L, P, CMYK, RGBA, ...) as RGB; raises OSError/ValueError if it is not one."""
    with Image.open(path) as image:
        image.load()
        if image.mode in ("RGBA", "LA", "P"):  # composite transparency onto white rather than black
            image = image.convert("RGBA")
            background = Image.new("RGBA", image.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, image)
        return image.convert("RGB")


def clean_caption(caption):
    """Training target: one space between words, no trailing ' .', lower case ('A dog runs .' -> 'a dog runs')."""
    return " ".join(caption.split()).rstrip(" .").lower()


def encoder_prompt_ids(tokenizer, prompt, num_query_tokens, image_token_id):
    """num_query_tokens image tokens, then the tokenized prompt: the ids Blip2Processor(images, text=prompt) makes."""
    return [image_token_id] * num_query_tokens + tokenizer(prompt).input_ids


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


def main(argv):
    args = [a for a in argv if a != "--json"]
    if len(args) != 1:
        print("usage: python data.py DIR [--json]", file=sys.stderr)
        return 2
    try:
        data = read_flickr8k(args[0])
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if "--json" in argv:
        print(json.dumps(data.report()))
    else:
        print_report(data)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
