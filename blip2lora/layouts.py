"""
blip2lora/layouts.py: the caption-collection layouts data.py recognises.

The caption-collection layouts data.py reads. Each is a detect + read pair in LAYOUTS (tried in that order), and every
read returns the same record, Found: the captions of each image, where each image is (a path inside the collection,
or a cell of a dataset file), the split or None, and what was skipped and why. To read a new layout, write its two
functions and add it to LAYOUTS; data.read_captions does the rest (containment checks, the split when there is none,
the report) and knows nothing of any one layout.

    flickr8k-text  Flickr8k.token.txt + Flickr_8k.{train,dev,test}Images.txt + Flicker8k_Dataset/   (original release)
    karpathy       dataset_{flickr8k,flickr30k,coco}.json + the image folder (COCO: train2014/, val2014/)
    kaggle         captions.txt (CSV: image,caption) + Images/                                      (Kaggle Flickr8k)
    imagefolder    metadata.jsonl or metadata.csv (file_name + a caption column), at the top or in split folders
                   (train/, validation/, test/, ...): the Hugging Face `imagefolder` convention
    parquet        *.parquet shards with the images inside them, as `hf download --repo-type dataset` gives them
    arrow          a folder written by the `datasets` library's save_to_disk (Arrow files)

A malformed file is one DataError line naming the file and the line or key; a malformed row or image entry is
skipped with its reason.
"""
import csv
import json
import os
import posixpath
import re
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

from blip2lora import images
from blip2lora.files import UserError, first_line, inside, read_json
from blip2lora.images import DatasetImage

SPLITS = ("train", "val", "test")
# The words the Hugging Face `datasets` library reads as split names (folder or file names, a `split` column) -> ours
SPLIT_WORDS = {"train": "train", "training": "train", "validation": "val", "valid": "val", "val": "val",
               "dev": "val", "test": "test", "testing": "test", "eval": "test", "evaluation": "test"}
CAPTION_COLUMNS = ("text", "caption", "captions", "sentences")  # tried in order unless caption_column names some


class DataError(UserError):
    """A problem with the user's files, reported in one line without a traceback."""


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
    caption_columns: list = field(default_factory=list)  # the columns the captions came from (tables only)


class Layout(NamedTuple):
    name: str
    detect: Callable   # root -> what marks the layout (a file, a list of files), or None
    read: Callable     # (root, marker, options) -> Found


def clean_relative_path(path):
    """'./a\\b.jpg' -> 'a/b.jpg': backslashes are separators too (turned into '/' BEFORE normalising, so
    'x\\..\\..\\y' cannot slip past the check); None for a path that leaves the folder or is absolute."""
    name = posixpath.normpath(path.strip().replace("\\", "/"))
    if name.startswith("/") or name == ".." or name.startswith("../") or re.match(r"^[A-Za-z]:", name):
        return None
    return name


def _image_folder(root, names):
    """The folder (relative to root) among IMAGE_DIRS, or root itself, that holds most of a sample of the names."""
    listings = {}

    def holds(folder, name):
        path = clean_relative_path(_in_folder(folder, name))
        if path is None:
            return False
        sub, _, base = posixpath.join(root, path).rpartition("/")
        if sub not in listings:
            listings[sub] = images.list_folder(sub)
        return base in listings[sub]
    candidates = [d for d in IMAGE_DIRS if os.path.isdir(os.path.join(root, d))]
    return max(candidates, key=lambda folder: sum(holds(folder, n) for n in names[:200]))  # the first, on a tie


def _in_folder(folder, name):
    return posixpath.join(folder, name) if folder else name


def _valid_text(text):
    """Text that every later step can encode: not empty, no lone surrogates (JSON '\\ud800' gives one)."""
    try:
        text.encode("utf-8")
        return bool(text.strip())
    except UnicodeEncodeError:
        return False


def refuse_a_link_out(path, root, symlinks_out):
    """A file whose contents would be used, reached through a symbolic link to outside the collection: one line,
    unless symlinks_out."""
    if not symlinks_out and not inside(path, root):
        raise DataError(f"{path}: a symbolic link to outside the collection's folder; its captions are not used "
                        "(symlinks_out=True in train.py, --symlinks-out in data.py and evaluate.py, follows it)")


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


def _official_split(root, found):
    paths = {s: _find(root, [f], TEXT_DIRS) for s, f in SPLIT_FILES.items()}
    if not all(paths.values()):
        return None
    found.files += list(paths.values())  # read, so checked like the caption file (read_captions)
    return {s: [line.strip() for _, line in _lines(p, found.skipped) if line.strip()] for s, p in paths.items()}


def _flickr8k_split(root, found):
    """The Flickr8k caption files' split: the official split files, else Karpathy's JSON beside them, else none."""
    official = _official_split(root, found)
    if official:
        return official, "official split files"
    karpathy = _find(root, KARPATHY_FILES[:1])
    if karpathy:
        found.files.append(karpathy)
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
    found.split, found.split_source = _flickr8k_split(root, found)
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
    found.split, found.split_source = _flickr8k_split(root, found)
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
    found.caption_columns += [c for c in caption_columns if c not in found.caption_columns]
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
    """save_to_disk's folder: dataset_dict.json (several splits) or state.json (one), then each split's state.json."""
    marked = any(os.path.isfile(os.path.join(root, f)) for f in ("dataset_dict.json", "state.json"))
    return [f for f in _files_below(root, ".json") or [] if os.path.basename(f) == "state.json"] if marked else None


def _read_arrow(root, states, options):
    """Exactly the Arrow files each split's state.json lists (`_data_files`). Others beside them are not the
    dataset's: `datasets` leaves cache-*.arrow files there after a map() or filter(), and reading them would count
    rows twice; they are listed as skipped."""
    files, unlisted = [], []
    for state in states:
        folder, listed = os.path.dirname(state), _json(state)
        names = listed.get("_data_files") if isinstance(listed, dict) else None
        if not isinstance(names, list) or not all(isinstance(n, dict) and isinstance(n.get("filename"), str)
                                                  for n in names):
            raise DataError(f"{state}: no list of the split's files (_data_files); save the dataset again with "
                            "save_to_disk")
        ours = [os.path.join(folder, n["filename"]) for n in names]
        missing = [f for f in ours if not os.path.isfile(f)]
        if missing:
            raise DataError(f"{missing[0]}: listed in {state} but not there; copy the whole dataset folder")
        files += ours
        unlisted += sorted(os.path.join(folder, f) for f in os.listdir(folder)
                           if f.endswith(".arrow") and os.path.join(folder, f) not in ours)
    found = _read_dataset_files(root, files, options)
    found.files += states + [f for f in (os.path.join(root, "dataset_dict.json"),) if os.path.lexists(f)]
    found.skipped += [{"item": os.path.relpath(f, root), "reason": "not listed in its state.json (a cache file "
                       "`datasets` leaves after map() or filter()): not read"} for f in unlisted]
    return found


_READ_IN_A_CHILD = set()  # (path, size, mtime) of dataset files a child process read without dying
_CHILD_READS = """
import json, sys
sys.path.insert(0, sys.argv[1])
from blip2lora import layouts
request = json.loads(sys.stdin.read())  # the files on stdin: 10,000 of them are too long for a command line
options = layouts.Options(**request["options"])
for path in request["files"]:
    print(path, flush=True)  # the file being read, should the process die
    try:
        for _ in layouts._dataset_rows(path, options, layouts.Found({}, {}, [])):
            pass
    except Exception:
        pass  # an error pyarrow raises: the parent meets it again and says it in one line
"""


def _die_with_parent():
    """In the child, before it runs: the kernel kills it when its parent dies (a SIGTERM to data.py must not leave it
    reading on; Linux's prctl PR_SET_PDEATHSIG, elsewhere nothing)."""
    import ctypes
    import signal
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)
    except (AttributeError, OSError):
        pass


def _read_in_a_child_first(files, options):
    """Some damaged parquet files make pyarrow abort the whole process (a C++ exception it does not catch:
    "terminate called after throwing an instance of 'parquet::ParquetException'", exit 134), which no except clause
    can turn into one line. So the files are first read as _dataset_rows reads them in a child process (once per
    file version per process, about a second); if it dies, the file it was reading is named."""
    import subprocess
    import sys
    stamps = {f: (f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files}
    todo = [f for f in files if stamps[f] not in _READ_IN_A_CHILD]
    if not todo:
        return
    project = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the folder that holds blip2lora/
    # -P: the working directory is not put on the child's import path (a json.py there would run); the project's
    # folder is, first, as the parent has it
    child = subprocess.run([sys.executable, "-P", "-c", _CHILD_READS, project], capture_output=True, text=True,
                           errors="surrogateescape", input=json.dumps({"options": vars(options), "files": todo}),
                           preexec_fn=_die_with_parent)
    if child.returncode != 0:
        reading = (child.stdout.splitlines() or todo)[-1]
        said = [line.strip() for line in child.stderr.splitlines() if line.strip()]
        why = said[-1][:200] if said else f"exit status {child.returncode}"
        raise DataError(f"{reading}: damaged: reading it stopped the reading process itself ({why}); download the "
                        "file again")
    _READ_IN_A_CHILD.update(stamps[f] for f in todo)


def _read_dataset_files(root, files, options):
    """parquet shards or Arrow files -> Found. The split of a file comes from its name or its folder
    (train-00000-of-00001.parquet, validation/data-00000-of-00001.arrow), else from a `split` column, else none.

    An image inside a file is one image: cells that share a name (`datasets` keeps only a file's base name, so
    cats/0.png and dogs/0.png are both 0.png) are one image only if their bytes are the same (a dataset with a row per
    caption); different bytes are different images, named FILE#ROW. A cell holding only a path names a file beside
    the data, and the same path is the same file. Only regular files are opened: a FIFO or a device named *.parquet
    would block the reading for ever."""
    for path in files:  # before any is opened: a link out is not read at all
        refuse_a_link_out(path, root, options.symlinks_out)
    special = [f for f in files if not os.path.isfile(f)]  # (isfile follows a link to what it names)
    files = [f for f in files if f not in special]
    _read_in_a_child_first(files, options)
    found, labels, from_names = Found({}, {}, [os.path.relpath(f, root) for f in files]), {}, False
    found.skipped += [{"item": os.path.relpath(f, root), "reason": "not a regular file (a FIFO, a device): not read"}
                      for f in special]
    cells = {}  # name -> [(DatasetImage, captions, split)] of the rows whose image is inside the file
    for path in files:
        relative = os.path.relpath(path, root)
        file_split = next(filter(None, map(_split_word, reversed(relative.split(os.sep)))), None)
        from_names = from_names or file_split is not None
        for row, image_column, image_path, embedded, captions, label in _dataset_rows(path, options, found):
            found.rows += 1
            split = file_split or (label.strip() if isinstance(label, str) else label)  # another label is reported
            if not captions or not (embedded or image_path):
                reason = ("no image (neither bytes nor a path)" if captions else
                          "no caption" if captions is not None else "a caption is not text")
                found.skipped.append({"item": f"{relative} row {row}", "reason": reason})
            elif embedded:
                name = (f"{split}/" if split else "") + image_path.strip() if image_path else f"{relative}#{row}"
                cells.setdefault(name, []).append((DatasetImage(path, row, image_column), captions, split))
            else:  # only a path: a file beside the data, which must be inside the collection's folder like any other
                name = os.path.relpath(os.path.join(os.path.dirname(path), image_path), root)
                _add(found, labels, name, name, captions, split)
    for name, image, captions, split in _one_per_image(cells, root):
        _add(found, labels, name, image, captions, split)
    if labels:
        found.split = _split_from_labels(labels, found.skipped)
        found.split_source = "the file names" if from_names else "the split column"
    return found


def _add(found, labels, name, image, captions, split):
    found.captions.setdefault(name, []).extend(captions)
    found.images.setdefault(name, image)
    if split is not None:
        labels.setdefault(name, split)


def _one_per_image(cells, root):
    """(name, DatasetImage, captions, split) per image: a name held by one cell as it is; the cells of a name held by
    several grouped by their bytes (read batch by batch, only for those rows), each group one image."""
    repeated = {}  # (file, column) -> the rows whose bytes must be compared
    for group in (g for g in cells.values() if len(g) > 1):
        for cell, _, _ in group:
            repeated.setdefault((cell.file, cell.column), set()).add(cell.row)
    digests = {(file, row): digest for (file, column), rows in repeated.items()
               for row, digest in _cell_digests(file, column, rows)}
    for name, group in cells.items():
        by_bytes = {}
        for cell, captions, split in group:
            by_bytes.setdefault(digests.get((cell.file, cell.row)), []).append((cell, captions, split))
        for same in by_bytes.values():
            first = same[0][0]
            key = name if len(by_bytes) == 1 else f"{os.path.relpath(first.file, root)}#{first.row}"
            yield key, first, [c for _, captions, _ in same for c in captions], same[0][2]


def _cell_digests(path, column, rows):
    """(row, sha1 of its image bytes) for the given rows of a dataset file, reading only that column batch by batch."""
    import hashlib
    import pyarrow as pa
    import pyarrow.compute as pc
    source, _ = _open_dataset_file(path)
    kind = (source.schema_arrow if path.endswith(".parquet") else source.schema).field(column).type
    nested = pa.types.is_struct(kind)
    batches = (source.iter_batches(batch_size=1024, columns=[f"{column}.bytes" if nested else column])
               if path.endswith(".parquet") else source.to_batches(max_chunksize=1024))
    start = 0
    for batch in batches:
        cells = batch.column(column)
        data = pc.struct_field(cells, "bytes") if nested else cells
        for row in (r for r in rows if start <= r < start + batch.num_rows):
            yield row, hashlib.sha1(data[row - start].as_py() or b"").hexdigest()
        start += batch.num_rows


def _dataset_rows(path, options, found):
    """(row, image column, the image's own path or None, whether its bytes are in the file, captions or None, split
    label or None) for each row of a parquet or Arrow file. Image bytes are not read, only their presence."""
    import pyarrow as pa
    try:
        source, whole = _open_dataset_file(path)
        schema = source.schema_arrow if path.endswith(".parquet") else source.schema
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{path}: not a readable {os.path.splitext(path)[1][1:]} file ({type(e).__name__}: "
                        f"{first_line(e)[:200]})") from None
    except UnicodeDecodeError:  # pyarrow decodes the names it reads as UTF-8
        raise DataError(f"{path}: a column name in it is not UTF-8 text (a damaged file, or not one the datasets "
                        "library wrote); download it again or rename the column") from None
    image_column, caption_columns, split_names = _dataset_columns(path, schema, options)
    found.caption_columns += [c for c in caption_columns if c not in found.caption_columns]
    text_columns = caption_columns + (["split"] if "split" in schema.names else [])
    row, batches = 0, _dataset_batches(path, source, image_column, text_columns)
    while True:
        try:
            text, paths, embedded = next(batches)
        except StopIteration:
            break
        except (OSError, pa.ArrowException) as e:  # a damaged page ("Corrupt snappy compressed data", ...)
            raise DataError(f"{path}: damaged after row {row} ({first_line(e)}); download the file again") from None
        for i in range(len(paths)):
            captions = _cell_captions([text[c][i] for c in caption_columns])
            label = text["split"][i] if "split" in text else None
            if type(label) is int and 0 <= label < len(split_names):  # a ClassLabel: its names are in the features
                label = split_names[label]
            yield row, image_column, paths[i], embedded[i], captions, label
            row += 1
    if not whole:
        found.skipped.append({"item": path, "reason": f"the Arrow stream ends without its end marker: the file was "
                              f"cut short, and only the {row} rows before the cut were read"})


ARROW_END = b"\xff\xff\xff\xff\x00\x00\x00\x00"  # the last 8 bytes of every whole Arrow IPC stream


def _open_dataset_file(path):
    """(the file opened with pyarrow, whether it is whole). An Arrow stream cut at a batch boundary reads without an
    error, only fewer rows: its missing end marker tells."""
    import pyarrow as pa
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq
        return pq.ParquetFile(path), True
    with pa.memory_map(path) as source:  # save_to_disk's Arrow IPC stream, memory-mapped: no copy of the images
        table = pa.ipc.open_stream(source).read_all()
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - len(ARROW_END)))
        return table, f.read() == ARROW_END


def _dataset_batches(path, source, image_column, text_columns):
    """Per batch of up to 4,096 rows: ({text column: values}, each image's path or None, whether its bytes are there).
    From parquet only the columns needed are read: the image's `path` field, and its bytes only if the file's
    statistics say some may be missing (then their presence is all that is looked at)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    kind = (source.schema_arrow if path.endswith(".parquet") else source.schema).field(image_column).type
    fields = [kind.field(i).name for i in range(kind.num_fields)] if pa.types.is_struct(kind) else []
    if path.endswith(".parquet"):
        leaf = f"{image_column}.bytes" if fields else image_column
        wanted = text_columns + [f"{image_column}.{f}" for f in fields if f == "path" or
                                 (f == "bytes" and _may_lack(source, leaf))] + ([leaf] if not fields else [])
        batches = source.iter_batches(batch_size=4096, columns=list(dict.fromkeys(wanted)))
    else:
        batches = source.to_batches(max_chunksize=4096)
    for batch in batches:
        image = batch.column(image_column) if image_column in batch.schema.names else None
        names = [image.type.field(i).name for i in range(image.type.num_fields)] if fields and image is not None else []
        paths = pc.struct_field(image, "path").to_pylist() if "path" in names else [None] * batch.num_rows
        present = (pc.is_valid(pc.struct_field(image, "bytes")).to_pylist() if "bytes" in names else
                   pc.is_valid(image).to_pylist() if image is not None and not fields else [True] * batch.num_rows)
        yield {c: batch.column(c).to_pylist() for c in text_columns}, paths, present


def _may_lack(parquet_file, leaf):
    """Whether any row of a parquet file may have no value in column `leaf`, from the null counts in its metadata."""
    meta = parquet_file.metadata
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        for c in range(group.num_columns):
            if group.column(c).path_in_schema == leaf:
                stats = group.column(c).statistics
                if stats is None or not stats.has_null_count or stats.null_count > 0:
                    return True
    return False


def _holds_images(kind):
    """Whether a column's type is an image as `datasets` stores one: bytes, or a struct whose `bytes` are bytes and
    whose `path` is text (either may be null)."""
    import pyarrow as pa
    binary = lambda t: pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_null(t)  # noqa: E731
    text = lambda t: pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t)  # noqa: E731
    if not pa.types.is_struct(kind):
        return binary(kind) and not pa.types.is_null(kind)
    fields = {kind.field(i).name: kind.field(i).type for i in range(kind.num_fields)}
    return binary(fields.get("bytes", pa.null())) and text(fields.get("path", pa.null()))


def _dataset_columns(path, schema, options):
    """(image column, caption columns, the split column's label names) of a dataset file: as named in options, else
    from the features the `datasets` library records in the file (an Image feature, a ClassLabel split), else
    `image`."""
    import pyarrow as pa
    features = {}
    try:
        features = json.loads((schema.metadata or {}).get(b"huggingface", b"{}")).get("info", {}).get("features", {})
    except (ValueError, AttributeError, RecursionError):  # not JSON, not the shape `datasets` writes, nested deep
        pass
    features = features if isinstance(features, dict) else {}
    marked = [name for name, f in features.items() if isinstance(f, dict) and f.get("_type") == "Image"]
    image_column = options.image_column or (marked[0] if marked else "image")
    if image_column not in schema.names:
        raise DataError(f"{path}: no image column {image_column!r} (columns: {', '.join(schema.names)}); name it "
                        "with image_column=NAME in train.py, --image-column NAME in data.py and evaluate.py")
    kind = schema.field(image_column).type
    if not _holds_images(kind):
        raise DataError(f"{path}: column {image_column!r} holds {kind}, not images (a struct of bytes and a text "
                        "path, or bytes)")
    caption_columns = _caption_columns(path, set(schema.names) - {image_column}, options.caption_column)
    for c in caption_columns:
        kind = schema.field(c).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind) or (
                (pa.types.is_list(kind) or pa.types.is_large_list(kind)) and
                (pa.types.is_string(kind.value_type) or pa.types.is_large_string(kind.value_type)))):
            raise DataError(f"{path}: caption column {c!r} holds {kind}, not text; name the caption column with "
                            "caption_column=NAME")
    split = features.get("split")
    names = split.get("names") if isinstance(split, dict) and split.get("_type") == "ClassLabel" else None
    return image_column, caption_columns, names if isinstance(names, list) else []


LAYOUTS = [
    Layout("flickr8k-text", lambda root: _find(root, [TOKEN_FILE], TEXT_DIRS), _read_token_file),
    Layout("karpathy", lambda root: _find(root, KARPATHY_FILES), _read_karpathy),
    Layout("kaggle", lambda root: _find(root, [KAGGLE_FILE]), _read_kaggle),
    Layout("imagefolder", _detect_imagefolder, _read_imagefolder),
    Layout("parquet", lambda root: _files_below(root, ".parquet"), _read_dataset_files),
    Layout("arrow", _detect_arrow, _read_arrow),
]
