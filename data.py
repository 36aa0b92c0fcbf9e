"""
Image-caption collections for BLIP-2: read the layouts people have, and turn images + captions into model batches.

Check a collection before training (prints the layout found, images and captions per split, what was skipped and why):
    python data.py data/flickr8k
    python data.py my_photos/ --json
    python data.py my_hub_dataset/ --caption-column=caption_0,caption_1,caption_2 --image-column=img

Layouts (README, "Your own captions"), tried in this order; each is a detect + read pair in LAYOUTS below, and every
one returns the same record (Found), so the shared code knows nothing of any one layout:
    flickr8k-text  Flickr8k.token.txt + Flickr_8k.{train,dev,test}Images.txt + Flicker8k_Dataset/   (original release)
    karpathy       dataset_{flickr8k,flickr30k,coco}.json + the image folder (COCO: train2014/, val2014/)
    kaggle         captions.txt (CSV: image,caption) + Images/                                      (Kaggle Flickr8k)
    imagefolder    metadata.jsonl or metadata.csv (file_name + a caption column), at the top or in split folders
                   (train/, validation/, test/, ...): the Hugging Face `imagefolder` convention
    parquet        *.parquet shards with the images inside them, as `hf download --repo-type dataset` gives them
    arrow          a folder written by the `datasets` library's save_to_disk (Arrow files)
An image is a file inside the collection's folder or an image held inside a dataset file (images.DatasetImage).
Nothing is dropped silently: every skipped row, image or split entry is listed with its reason, and a malformed
file is one error line naming the file and the line or key. An image path that leaves the collection's folder
(`../x.jpg`, an absolute path, `a\\..\\..\\x.jpg`, a symbolic link to elsewhere) is skipped, never read; set
symlinks_out=True (train.py) or --symlinks-out to follow symbolic links out of the folder on purpose.

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
import posixpath
import re
import sys
import unicodedata
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import torch

from files import UserError, read_json
from images import IMAGE_SUFFIXES, DatasetImage, UnreadableImage, load_image

SPLITS = ("train", "val", "test")
# The words the Hugging Face `datasets` library reads as split names (folder or file names, a `split` column) -> ours
SPLIT_WORDS = {"train": "train", "training": "train", "validation": "val", "valid": "val", "val": "val",
               "dev": "val", "test": "test", "testing": "test", "eval": "test", "evaluation": "test"}
CAPTION_COLUMNS = ("text", "caption", "captions", "sentences")  # tried in order unless caption_column names some
MIN_IMAGES_TO_HOLD_OUT = 10  # a hash split of fewer images keeps them all for training


class DataError(UserError):
    """A problem with the user's files, reported in one line without a traceback."""


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

    def report(self):
        return {"layout": self.layout, "split_source": self.split_source, "files": self.files, "rows": self.rows,
                "splits": {s: {"images": len(items), "captions": sum(len(i.captions) for i in items)}
                           for s, items in self.splits.items()},
                "skipped": self.skipped}


@dataclass
class Options:
    caption_column: str = ""     # the caption column(s), comma-separated; "" = the first of CAPTION_COLUMNS found
    image_column: str = ""       # parquet/arrow: the image column; "" = the one the dataset marks as Image, or image
    symlinks_out: bool = False   # follow symbolic links that lead out of the collection's folder


@dataclass
class Found:
    """What every layout's reader returns."""
    captions: dict                                   # name -> [captions], in file order
    images: dict                                     # name -> a path relative to the collection, or a DatasetImage
    files: list                                      # the caption files read
    rows: int = 0
    split: dict = None                               # split -> [names], or None: a hash split of the names
    split_source: str = None
    split_fractions: tuple = (0.8, 0.1)              # (train, val) of a hash split
    skipped: list = field(default_factory=list)


class Layout(NamedTuple):
    name: str
    detect: Callable   # root -> what marks the layout (a file, a list of files), or None
    read: Callable     # (root, marker, options) -> Found


def read_captions(root, caption_column=None, image_column=None, symlinks_out=False):
    """Detect the layout in `root` and return a CaptionCollection with every split's images and captions."""
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
        raise DataError(f"{root}: no captions found (looked for {TOKEN_FILE}, {', '.join(KARPATHY_FILES)}, "
                        f"{KAGGLE_FILE}, metadata.jsonl or metadata.csv, *.parquet, a save_to_disk folder; README: "
                        "'Your own captions')")
    images = _locate(root, found, options)
    usable = {n for n in found.captions if n in images and found.captions[n]}
    for name in found.captions:
        if name in images and not found.captions[name]:
            found.skipped.append({"item": name, "reason": "no captions"})
    split, split_source = found.split, found.split_source
    if split is None:  # the collection has no split: a deterministic one, and the report says so
        split = _hash_split(usable, *found.split_fractions)
        split_source = split_source or "deterministic md5 split of the file names (80/10/10)"
        if len(usable) < MIN_IMAGES_TO_HOLD_OUT:
            split_source = (f"all {len(usable)} images in train: fewer than {MIN_IMAGES_TO_HOLD_OUT} are too few "
                            "to hold out val and test images (add a split column or split folders to evaluate)")
    splits = _place(split, found, images, usable)
    return CaptionCollection(layout.name, split_source, splits, found.skipped, found.files, found.rows)


def _place(split, found, images, usable):
    """The split's names as ImageCaptions, each image once; names in no split are reported."""
    splits, placed = {}, set()
    for s in SPLITS:
        splits[s] = []
        for name in split.get(s, []):
            if name in usable and name not in placed:
                placed.add(name)
                splits[s].append(ImageCaptions(name, images[name], found.captions[name]))
            elif name not in found.captions:  # (a name with captions but no image was reported already)
                found.skipped.append({"item": name, "reason": f"listed in the {s} split but has no captions"})
    reported = {entry["item"] for entry in found.skipped}
    for name in sorted(usable - placed - reported):
        found.skipped.append({"item": name, "reason": "in no split"})  # 91 real images of the Flickr8k release
    return splits


def _hash_split(names, train_fraction, val_fraction):
    """A deterministic split when the collection has none: order by md5 of the name, cut by the fractions."""
    ordered = sorted(names, key=lambda n: hashlib.md5(n.encode("utf-8", "surrogateescape")).hexdigest())
    if len(ordered) < MIN_IMAGES_TO_HOLD_OUT:
        return {"train": ordered, "val": [], "test": []}
    n_train, n_val = round(len(ordered) * train_fraction), max(1, round(len(ordered) * val_fraction))
    n_train = min(n_train, len(ordered) - n_val - 1)  # at least one test image
    return {"train": ordered[:n_train], "val": ordered[n_train:n_train + n_val], "test": ordered[n_train + n_val:]}


# ------------------------------------------------------------------------- images inside the collection's folder

def clean_relative_path(path):
    """'./a\\b.jpg' -> 'a/b.jpg': backslashes are separators too (turned into '/' BEFORE normalising, so
    'x\\..\\..\\y' cannot slip past the check); None for a path that leaves the folder or is absolute."""
    name = posixpath.normpath(path.strip().replace("\\", "/"))
    if name.startswith("/") or name == ".." or name.startswith("../") or re.match(r"^[A-Za-z]:", name):
        return None
    return name


class _Folders:
    """Folder listings (one scandir per folder, fast for COCO's 123,287 files) and whether paths stay inside root."""

    def __init__(self, root, symlinks_out):
        self.root, self.real_root, self.symlinks_out = root, os.path.realpath(root), symlinks_out
        self.listings, self.folder_inside = {}, {}

    def listing(self, folder):
        if folder not in self.listings:
            self.listings[folder] = _list_folder(folder)
        return self.listings[folder]

    def inside(self, path):
        real = os.path.realpath(path)
        return real == self.real_root or real.startswith(self.real_root.rstrip(os.sep) + os.sep)

    def leaves(self, folder, path, entry):
        """Whether path (an entry of folder) resolves to outside root: a symbolic link, or a folder reached by one."""
        if folder not in self.folder_inside:
            self.folder_inside[folder] = self.inside(folder)
        return (entry == "link" or not self.folder_inside[folder]) and not self.inside(path)

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


def _list_folder(folder):
    """{name: 'file' | 'link' | 'other'} for a folder's entries; {} if it is not a folder."""
    try:
        with os.scandir(folder) as entries:
            return {e.name: "link" if e.is_symlink() else "file" if e.is_file(follow_symlinks=False) else "other"
                    for e in entries}
    except OSError:
        return {}


def _locate(root, found, options):
    """{name: file path or DatasetImage} for every name whose image can be read; the rest are reported skipped."""
    folders, images, why = _Folders(root, options.symlinks_out), {}, {}
    for name, image in found.images.items():
        if isinstance(image, DatasetImage):
            images[name] = image
            continue
        path, reason = folders.why_not(image)
        if path:
            images[name] = path
        else:
            why[name] = reason
    for name in found.captions:
        if name not in images:
            why.setdefault(name, "no image file")
            found.skipped.append({"item": name, "reason": f"{why[name]} ({len(found.captions[name])} captions)"})
    if found.captions and not images:
        first = next(iter(why))
        raise DataError(f"{root}: none of the {len(found.captions)} images named in {', '.join(found.files)} can be "
                        f"used ({printable(first)}: {why[first]}); python data.py {root} lists them all")
    return images


def _image_folder(root, names):
    """The folder (relative to root) among IMAGE_DIRS, or root itself, that holds most of a sample of the names."""
    folders = _Folders(root, symlinks_out=True)
    candidates = [d for d in IMAGE_DIRS if os.path.isdir(os.path.join(root, d))]
    sample = names[:200]

    def hits(folder):
        return sum(folders.why_not(posixpath.join(folder, n) if folder else n)[0] is not None for n in sample)
    return max(candidates, key=hits)  # the first, on a tie


def _in_folder(folder, name):
    return posixpath.join(folder, name) if folder else name


def _valid_text(text):
    """Text that every later step can encode: not empty, no lone surrogates (JSON '\\ud800' gives one)."""
    try:
        text.encode("utf-8")
        return bool(text.strip())
    except UnicodeEncodeError:
        return False


def printable(name):
    """A name as one line: control characters (newline, tab, ...) and undecodable bytes written as escapes, so a file
    name can never forge a line or a column of the output."""
    return "".join(repr(ch)[1:-1] if unicodedata.category(ch) in ("Cc", "Cs") else ch for ch in name)


# ------------------------------------------------------------------------------------------- reading text files

def _find(root, names, dirs=("",)):
    for d in dirs:
        for name in names:
            path = os.path.join(root, d, name)
            if os.path.isfile(path):
                return path
    return None


def _lines(path, skipped):
    """(line number, text) of a text file, tolerating CRLF and a missing final newline; a line that is not UTF-8 is
    skipped with its reason (decoding it with replacement characters would silently change a file name)."""
    with open(path, "rb") as f:
        raw = f.read()
    for number, line in enumerate(raw.splitlines(), 1):
        try:
            yield number, line.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as e:
            skipped.append({"item": f"{os.path.basename(path)} line {number}",
                            "reason": f"not UTF-8 text (byte {e.start})"})


def _text(path):
    """A JSON or metadata file's text; not UTF-8 is an error (a wrong byte would silently change a file name)."""
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None


def _json(path):
    try:
        return read_json(path)
    except UserError as e:
        raise DataError(str(e)) from None


def _csv_rows(path):
    """(line number, row) of a real CSV: quoted fields may hold commas, newlines and doubled quotes."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = csv.reader(f)
        try:
            for row in rows:
                yield rows.line_num, row
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text (near line {rows.line_num + 1}, byte {e.start}); save it as "
                            "UTF-8") from None
        except csv.Error as e:  # a field over the csv module's limit (131,072 characters), a NUL byte, ...
            raise DataError(f"{path}: line {rows.line_num}: not readable as CSV ({e})") from None


def _csv_header(path, rows, required):
    _, header = next(rows, (1, None))
    if not header:
        raise DataError(f"{path}: empty; expected a CSV header with {required}")
    header = [h.strip() for h in header]
    twice = sorted({h for h in header if header.count(h) > 1})
    if twice:
        raise DataError(f"{path}: column {twice[0]!r} appears twice in the header; rename one of them")
    return header


def _official_split(root, skipped):
    paths = {s: _find(root, [f], TEXT_DIRS) for s, f in SPLIT_FILES.items()}
    if not all(paths.values()):
        return None
    return {s: [line.strip() for _, line in _lines(p, skipped) if line.strip()] for s, p in paths.items()}


def _flickr8k_split(root, skipped):
    """The Flickr8k caption files' split: the official split files, else Karpathy's JSON beside them, else none."""
    official = _official_split(root, skipped)
    if official:
        return official, "official split files"
    karpathy = _find(root, KARPATHY_FILES[:1])
    if karpathy:
        return _read_karpathy(root, karpathy, Options()).split, KARPATHY_FILES[0]
    return None, None


# ------------------------------------------------------------------------------------------------- the layouts

TOKEN_FILE, KAGGLE_FILE = "Flickr8k.token.txt", "captions.txt"
TEXT_DIRS = ("", "Flickr8k_text")  # the Flickr8k text zip may be unpacked in place or into its own folder
SPLIT_FILES = {"train": "Flickr_8k.trainImages.txt", "val": "Flickr_8k.devImages.txt",  # official dev == val
               "test": "Flickr_8k.testImages.txt"}
KARPATHY_FILES = ("dataset_flickr8k.json", "dataset_flickr30k.json", "dataset_coco.json")
# Where the images of a caption file may be; "" is the collection's folder itself (COCO: DIR/train2014/...).
IMAGE_DIRS = ("Flicker8k_Dataset", "Flickr8k_Dataset", "flickr30k-images", "flickr30k_images", "Images", "images", "")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")


def _read_token_file(root, path, options):
    """Flickr8k.token.txt: '<file>.jpg#<n><TAB><caption>'; split the line on its first TAB (or space, in edited
    copies), the key on its LAST '#' (captions may hold '#')."""
    found = Found({}, {}, [path])
    for number, line in _lines(path, found.skipped):
        if not line.strip():
            continue
        found.rows += 1
        key, sep, caption = line.partition("\t")
        if not sep:
            key, _, caption = line.partition(" ")
        name, hash_sign, index = key.strip().rpartition("#")
        if not hash_sign or not index.strip().isdigit() or not _valid_text(caption):
            found.skipped.append({"item": f"{os.path.basename(path)} line {number}",
                                  "reason": "not '<image>#<n><TAB><caption>'"})
            continue
        found.captions.setdefault(name, []).append(caption.strip())
    folder = _image_folder(root, list(found.captions))
    found.images = {name: _in_folder(folder, name) for name in found.captions}
    found.split, found.split_source = _flickr8k_split(root, found.skipped)
    return found


def _read_kaggle(root, path, options):
    """Kaggle's Flickr8k captions.txt: a CSV 'image,caption'. It has no split: the official files or Karpathy's JSON
    if they are beside it, else a hash split with the official proportions (6000/1000/rest of 8091)."""
    found, rows = Found({}, {}, [path]), _csv_rows(path)
    header = _csv_header(path, rows, "'image,caption'")
    if [h.lower() for h in header[:2]] != ["image", "caption"]:
        raise DataError(f"{path}: expected a CSV with header 'image,caption', found {header}")
    for number, row in rows:
        found.rows += 1
        if len(row) != 2 or not row[0].strip() or not _valid_text(row[1]):
            if row:
                found.skipped.append({"item": f"{os.path.basename(path)} line {number}",
                                      "reason": "not 'image,caption'"})
            continue
        found.captions.setdefault(row[0].strip(), []).append(row[1].strip())
    folder = _image_folder(root, list(found.captions))
    found.images = {name: _in_folder(folder, name) for name in found.captions}
    found.split, found.split_source = _flickr8k_split(root, found.skipped)
    if found.split is None:
        found.split_fractions = (6000 / 8091, 1000 / 8091)
        found.split_source = "deterministic md5 split (6000/1000/rest of 8091, scaled)"
    return found


def _read_karpathy(root, path, options):
    """Karpathy's dataset_*.json: {"images": [{"filepath"?, "filename", "split", "sentences": [{"raw"}]}]}. COCO names
    an image 'val2014/COCO_...jpg' (filepath/filename); its restval split is training data."""
    data = _json(path)
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise DataError(f"{path}: not one of Karpathy's dataset_*.json files ('images' must be a list of objects)")
    found = Found({}, {}, [path], rows=len(images), split={s: [] for s in SPLITS}, split_source=os.path.basename(path))
    for i, image in enumerate(images):
        if not isinstance(image, dict) or not isinstance(image.get("filename"), str):
            raise DataError(f"{path}: images[{i}] is not an object with a 'filename'")
        folder, label = image.get("filepath", ""), image.get("split")
        sentences = image.get("sentences", [])
        if not isinstance(sentences, list) or not all(isinstance(s, dict) and isinstance(s.get("raw"), str)
                                                      for s in sentences):
            raise DataError(f"{path}: images[{i}] ({image['filename']}): every entry of 'sentences' needs a 'raw' "
                            "caption")
        if not isinstance(folder, str) or not isinstance(label, (str, type(None))):
            found.skipped.append({"item": f"{os.path.basename(path)} images[{i}]",
                                  "reason": "filepath or split is not a string"})
            continue
        name = "/".join(filter(None, (folder, image["filename"])))
        label = {"restval": "train"}.get(label, label)  # restval: training data in every Karpathy-split paper
        if label in found.split:
            found.split[label].append(name)
        found.captions[name] = [s["raw"].strip() for s in sentences if _valid_text(s["raw"])]
    folder = _image_folder(root, list(found.captions))
    found.images = {name: _in_folder(folder, name) for name in found.captions}
    return found


def _metadata_records(path):
    """Each row of metadata.jsonl (one JSON object a line) or metadata.csv as (line number, {column: value})."""
    if path.endswith(".csv"):
        rows = _csv_rows(path)
        header = _csv_header(path, rows, "file_name and a caption column")
        return [(number, dict(zip(header, row))) for number, row in rows if any(cell.strip() for cell in row)]
    records = []
    for number, line in enumerate(_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except RecursionError:
            raise DataError(f"{path}: line {number}: JSON nested too deep") from None
        except ValueError as e:
            raise DataError(f"{path}: line {number}: not valid JSON ({getattr(e, 'msg', e)})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}: line {number}: expected a JSON object with file_name and a caption")
        records.append((number, record))
    return records


def _caption_columns(path, columns, wanted):
    """The caption column(s): the ones named (comma-separated), else the first of CAPTION_COLUMNS present, else all
    columns caption_0, caption_1, ... (one caption a column, as Flickr copies on the hub have them)."""
    if wanted:
        named = [c.strip() for c in wanted.split(",") if c.strip()]
        missing = [c for c in named if c not in columns]
        if missing:
            raise DataError(f"{path}: no caption column {missing[0]!r}; found: {', '.join(sorted(columns))}")
        return named
    numbered = sorted((c for c in columns if re.fullmatch(r"caption_?\d+", c)), key=lambda c: int(re.sub(r"\D", "", c)))
    chosen = next(([c] for c in CAPTION_COLUMNS if c in columns), numbered)
    if not chosen:
        raise DataError(f"{path}: no caption column (looked for {', '.join(CAPTION_COLUMNS)}, caption_0...; name "
                        "yours with caption_column=NAME in train.py, --caption-column NAME in data.py and evaluate.py)"
                        f"; found: {', '.join(sorted(columns))}")
    return chosen


def _cell_captions(values):
    """A row's caption cells (strings, or lists of strings) -> its captions, or None if one is not text."""
    captions = []
    for value in values:
        texts = [value] if isinstance(value, str) else value if isinstance(value, list) else None
        if value is None:
            continue
        if texts is None or not all(isinstance(t, str) for t in texts):
            return None
        captions += [t.strip() for t in texts if _valid_text(t)]
    return captions


def _read_metadata(path, options, prefix, found):
    """One metadata file's rows into found: several rows with one file_name are several captions of one image; a
    caption cell may also be a list of captions (JSONL; a project extension: `datasets` wants one type a column)."""
    records = _metadata_records(path)
    found.files.append(path)
    found.rows += len(records)
    columns = {key for _, record in records for key in record}
    if not records:
        return {}
    if "file_name" not in columns:
        raise DataError(f"{path}: no 'file_name' column (found: {', '.join(sorted(columns))})")
    caption_columns, row_split = _caption_columns(path, columns, options.caption_column), {}
    for number, record in records:
        file_name = record.get("file_name")
        name = clean_relative_path(file_name) if isinstance(file_name, str) and _valid_text(file_name) else None
        captions = _cell_captions([record.get(c) for c in caption_columns])
        if name is None:
            reason = "file_name is missing or leaves the collection's folder"
        elif captions is None:
            reason = f"{' or '.join(caption_columns)} is not a caption or a list of captions"
        elif not captions:
            reason = "no caption"
        else:
            found.captions.setdefault(prefix + name, []).extend(captions)
            found.images[prefix + name] = prefix + name
            if "split" in record:
                row_split[prefix + name] = record["split"]
            continue
        found.skipped.append({"item": f"{prefix}{os.path.basename(path)} line {number}", "reason": reason})
    return row_split


def _split_word(name):
    """Our split for a folder or file name the way `datasets` reads one: a split word alone or followed by a
    separator ('train', 'train-2024', 'validation_images', 'test-00000-of-00001.parquet'); else None."""
    match = re.match(r"([a-z]+)(?:[-._ 0-9].*)?$", name.lower())
    return SPLIT_WORDS.get(match.group(1)) if match else None


def _metadata_folders(root):
    """(split folders, other folders) of root that hold their own metadata file."""
    with_metadata = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))
                           and _find(os.path.join(root, d), METADATA_FILES))
    return [d for d in with_metadata if _split_word(d)], [d for d in with_metadata if not _split_word(d)]


def _detect_imagefolder(root):
    return _find(root, METADATA_FILES) or any(_metadata_folders(root)[0])


def _read_imagefolder(root, marker, options):
    """Hugging Face imagefolder metadata. Splits come from split folders each with its own metadata, else a `split`
    column, else a first path component named like a split; else none (a hash split)."""
    found, (split_folders, others) = Found({}, {}, []), _metadata_folders(root)
    for d in others:
        found.skipped.append({"item": d + "/", "reason": "a folder with a metadata file whose name is not a split "
                              "(train, validation, test, ...): not read"})
    if split_folders:
        found.split = {s: [] for s in SPLITS}
        for d in split_folders:
            before = set(found.captions)
            _read_metadata(_find(os.path.join(root, d), METADATA_FILES), options, d + "/", found)
            found.split[_split_word(d)] += [n for n in found.captions if n not in before]
        found.split_source = "split folders (" + ", ".join(d + "/" for d in split_folders) + ")"
        return found
    labels, source = _read_metadata(_find(root, METADATA_FILES), options, "", found), "the metadata's split column"
    names = list(found.captions)
    if not labels and names and all("/" in n and _split_word(n.split("/")[0]) for n in names):
        labels, source = {n: n.split("/")[0] for n in names}, "the folder in each file_name"
    if labels:
        found.split, found.split_source = _split_from_labels(labels, found.skipped), source
    return found


def _split_from_labels(labels, skipped):
    split = {s: [] for s in SPLITS}
    for name, label in labels.items():
        ours = SPLIT_WORDS.get(label.strip().lower()) if isinstance(label, str) else None
        if ours:
            split[ours].append(name)
        else:
            skipped.append({"item": name, "reason": f"split {label!r} is not train, validation or test"})
    return split


# Datasets as the Hugging Face hub ships them: parquet shards, or save_to_disk's Arrow files, images inside.
# Read batch by batch with pyarrow, so a dataset larger than memory streams; image bytes are not read here at all
# (only each image's `path`), but later, one image at a time, by images.load_image.

def _files_below(root, suffix, depth=3):
    """Files ending in suffix in root and up to `depth` folders below it (DIR/, DIR/data/, DIR/config/split/)."""
    found = []
    for folder, dirs, names in os.walk(root):
        if os.path.relpath(folder, root).count(os.sep) >= depth - 1:
            dirs.clear()
        found += [os.path.join(folder, f) for f in names if f.endswith(suffix)]
    return sorted(found) or None


def _detect_arrow(root):
    """save_to_disk's folder: dataset_dict.json (several splits) or state.json (one), then the .arrow files."""
    marked = any(os.path.isfile(os.path.join(root, f)) for f in ("dataset_dict.json", "state.json"))
    return _files_below(root, ".arrow") if marked else None


def _read_dataset_files(root, files, options):
    """parquet shards or Arrow files -> Found. The split of a file comes from its name or its folder
    (train-00000-of-00001.parquet, validation/data-00000-of-00001.arrow), else from a `split` column, else none."""
    found, labels, from_names = Found({}, {}, [os.path.relpath(f, root) for f in files]), {}, False
    for path in files:
        relative = os.path.relpath(path, root)
        file_split = next(filter(None, map(_split_word, reversed(relative.split(os.sep)))), None)
        from_names = from_names or file_split is not None
        for row, image_column, image_path, captions, label in _dataset_rows(path, options):
            found.rows += 1
            split = file_split or (label.strip() if isinstance(label, str) else None)
            if not captions:
                reason = "no caption" if captions is not None else "a caption is not text"
                found.skipped.append({"item": f"{relative} row {row}", "reason": reason})
                continue
            # rows with the same image path are one image (within a split: split folders may repeat file names)
            name = (f"{split}/" if split else "") + image_path.strip() if image_path else f"{relative}#{row}"
            found.captions.setdefault(name, []).extend(captions)
            found.images.setdefault(name, DatasetImage(path, row, image_column))
            if split is not None:
                labels.setdefault(name, split)
    if labels:
        found.split = _split_from_labels(labels, found.skipped)
        found.split_source = "the file names" if from_names else "the split column"
    return found


def _dataset_rows(path, options):
    """(row, image column, the image's own path or None, captions or None, split label or None) for each row of a
    parquet or Arrow file; the image bytes are not read."""
    import pyarrow as pa
    import pyarrow.compute as pc
    try:
        if path.endswith(".parquet"):
            import pyarrow.parquet as pq
            reader = pq.ParquetFile(path)
            schema = reader.schema_arrow
        else:
            table = _arrow_stream(path)
            schema = table.schema
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{path}: not a readable {os.path.splitext(path)[1][1:]} file ({type(e).__name__})") from None
    image_column, caption_columns = _dataset_columns(path, schema, options)
    text_columns = caption_columns + (["split"] if "split" in schema.names else [])
    kind = schema.field(image_column).type
    has_path = pa.types.is_struct(kind) and "path" in [kind.field(i).name for i in range(kind.num_fields)]
    if path.endswith(".parquet"):
        batches = (b.to_pydict() for b in reader.iter_batches(
            batch_size=4096, columns=text_columns + ([f"{image_column}.path"] if has_path else [])))
    else:
        batches = ({**b.select(text_columns).to_pydict(),
                    image_column: [{"path": p} for p in pc.struct_field(b.column(image_column), "path").to_pylist()]}
                   if has_path else b.select(text_columns).to_pydict() for b in table.to_batches(max_chunksize=4096))
    row = 0
    for batch in batches:
        count = len(batch[text_columns[0]])
        cells = batch.get(image_column, [None] * count)
        for i in range(count):
            image_path = cells[i].get("path") if isinstance(cells[i], dict) else None
            captions = _cell_captions([batch[c][i] for c in caption_columns])
            yield row, image_column, image_path, captions, batch.get("split", [None] * count)[i]
            row += 1


def _arrow_stream(path):
    import pyarrow as pa
    with pa.memory_map(path) as source:
        return pa.ipc.open_stream(source).read_all()


def _dataset_columns(path, schema, options):
    """(image column, caption columns) of a dataset file: as named in options, else from the features the `datasets`
    library records in the file (an Image feature), else `image`."""
    import pyarrow as pa
    features = {}
    try:
        features = json.loads((schema.metadata or {}).get(b"huggingface", b"{}")).get("info", {}).get("features", {})
    except (ValueError, AttributeError):
        pass
    marked = [name for name, f in features.items() if isinstance(f, dict) and f.get("_type") == "Image"]
    image_column = options.image_column or (marked[0] if marked else "image")
    if image_column not in schema.names:
        raise DataError(f"{path}: no image column {image_column!r} (columns: {', '.join(schema.names)}); name it "
                        "with image_column=NAME in train.py, --image-column NAME in data.py and evaluate.py")
    kind = schema.field(image_column).type
    if not (pa.types.is_struct(kind) or pa.types.is_binary(kind) or pa.types.is_large_binary(kind)):
        raise DataError(f"{path}: column {image_column!r} holds {kind}, not images (a struct of bytes and path, or "
                        "bytes)")
    caption_columns = _caption_columns(path, set(schema.names) - {image_column}, options.caption_column)
    for c in caption_columns:
        kind = schema.field(c).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind) or (
                (pa.types.is_list(kind) or pa.types.is_large_list(kind)) and
                (pa.types.is_string(kind.value_type) or pa.types.is_large_string(kind.value_type)))):
            raise DataError(f"{path}: caption column {c!r} holds {kind}, not text; name the caption column with "
                            "caption_column=NAME")
    return image_column, caption_columns


LAYOUTS = [
    Layout("flickr8k-text", lambda root: _find(root, [TOKEN_FILE], TEXT_DIRS), _read_token_file),
    Layout("karpathy", lambda root: _find(root, KARPATHY_FILES), _read_karpathy),
    Layout("kaggle", lambda root: _find(root, [KAGGLE_FILE]), _read_kaggle),
    Layout("imagefolder", _detect_imagefolder, _read_imagefolder),
    Layout("parquet", lambda root: _files_below(root, ".parquet"), _read_dataset_files),
    Layout("arrow", _detect_arrow, _read_dataset_files),
]


# --------------------------------------------------------------------------------------------------- model batches

def clean_caption(caption):
    """Training target: one space between words, no trailing ' .', lower case ('A dog runs .' -> 'a dog runs')."""
    return " ".join(caption.split()).rstrip(" .").lower()


def caption_token_stats(items, tokenizer, max_tokens):
    """What train.py says at the start about the train captions, tokenized once: how many are over max_tokens tokens
    (EOS included; CaptionCollator cuts them), the longest, and the fraction of tokens the tokenizer does not know."""
    captions = [clean_caption(c) for item in items for c in item.captions]
    lengths, unknown, tokens = [], 0, 0
    for start in range(0, len(captions), 4096):
        for ids in tokenizer(captions[start:start + 4096]).input_ids:
            lengths.append(len(ids))
            tokens += len(ids)
            unknown += sum(i == tokenizer.unk_token_id for i in ids)
    return {"too_long": sum(n > max_tokens for n in lengths), "longest": max(lengths, default=0),
            "unknown_fraction": unknown / max(tokens, 1)}


def encoder_prompt_ids(tokenizer, prompt, num_query_tokens, image_token_id):
    """num_query_tokens image tokens, then the tokenized prompt: the ids Blip2Processor(images, text=prompt) makes."""
    prompt_ids = tokenizer(prompt).input_ids
    # Checked here, once: then every encoder input holds exactly num_query_tokens image tokens, which
    # model.encoder_inputs relies on (without a per-step check that would split a compiled graph).
    if image_token_id in prompt_ids:
        raise DataError(f"prompt {prompt!r} contains the image token "
                        f"{tokenizer.convert_ids_to_tokens(image_token_id)!r}: the image tokens are put before the "
                        "prompt for you, so leave it out")
    return [image_token_id] * num_query_tokens + prompt_ids


def warn_unreadable(error):
    print(f"warning: skipping an unreadable image: {printable(str(error))}", file=sys.stderr)


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


class CaptionCollator:
    """Turns [(index, pixel_values)] into one batch of B images and their N captions (N = 5 B for Flickr8k).

    batch["pixel_values"]   (B, 3, H, W) float        (absent when images are not loaded: the vision cache has them)
    batch["image_index"]    (B,) long                 dataset index of each image
    batch["input_ids"]      (B, Q + P) long            Q image tokens + P prompt tokens, the same for every image
    batch["attention_mask"] (B, Q + P) long
    batch["labels"]         (N, T) long                caption tokens + EOS, padding = -100 (ignored by the loss)
    batch["caption_image"]  (N,) long                 which of the B images each caption describes (sorted)
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
    print(f"read: {', '.join(printable(f) for f in data.files)} ({data.rows:,} records)")
    for s, counts in data.report()["splits"].items():
        print(f"  {s:5s} {counts['images']:6,d} images {counts['captions']:7,d} captions")
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


def main(argv=None):
    parser = argparse.ArgumentParser(description="Check an image-caption collection: the layout found, images and "
                                     "captions per split, and every skipped entry with its reason.")
    parser.add_argument("dir", help="the collection's folder")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    add_collection_arguments(parser)
    args = parser.parse_args(argv)
    try:
        data = read_captions(args.dir, args.caption_column, args.image_column, args.symlinks_out)
    except DataError as e:
        print(f"error: {printable(str(e))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(data.report(), ensure_ascii=False, default=str).encode("utf-8", "backslashreplace")
              .decode("utf-8"))
    else:
        print_report(data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
