"""
blip2lora/labels.py: captions written as labels for a folder of images (caption.py --write).

    txt, caption   a caption file beside each image: photo.jpg -> photo.txt (or photo.caption; --caption-extension),
                   as kohya's sd-scripts and taggui write them
    jsonl, csv     one metadata.jsonl or metadata.csv in the folder, file_name relative to it: Hugging Face
                   imagefolder's format, so `python train.py --data FOLDER` reads the result as a collection
                   (caption, correct by hand, fine-tune)

An image already captioned in the chosen output is not captioned again: a sidecar that exists is kept unless
--overwrite; a metadata file that exists is refused unless --resume (its rows are kept and the images it lacks are
added) or --overwrite. Every write is atomic (files.atomic_write): a sidecar at once, the metadata file rewritten
after each batch, so an interrupted run leaves complete files and --resume goes on from them.
"""
import csv
import io
import json
import os
import posixpath

from blip2lora.files import UserError, atomic_write

SIDECAR = {"txt": ".txt", "caption": ".caption"}
METADATA = {"jsonl": "metadata.jsonl", "csv": "metadata.csv"}
FORMATS = (*SIDECAR, *METADATA)


class Labels:
    """Where captions go and what is there already: done(path) says an image has its caption in the output,
    add(path, captions) writes one, flush() rewrites a metadata file with what it holds."""

    def __init__(self, fmt, folder, extension=None, overwrite=False, resume=False):
        self.fmt, self.folder, self.overwrite = fmt, folder, overwrite
        self.extension = extension or SIDECAR.get(fmt)
        self.rows, self.pending = [], 0
        if fmt in METADATA:
            self.path = os.path.join(folder, METADATA[fmt])
            if os.path.lexists(self.path) and not (overwrite or resume):
                raise UserError(f"{self.path} exists: --resume adds the images it lacks, --overwrite replaces it")
            if os.path.lexists(self.path) and resume and not overwrite:
                self.rows = read_rows(self.path, fmt)
        self.captioned = {row["file_name"] for row in self.rows}

    def name(self, path):
        """The image's file_name in a metadata file: relative to the folder, with / between folders."""
        return posixpath.join(*os.path.relpath(path, self.folder).split(os.sep))

    def sidecar(self, path):
        return os.path.splitext(path)[0] + self.extension

    def done(self, path):
        if self.fmt in SIDECAR:
            return os.path.lexists(self.sidecar(path)) and not self.overwrite
        return self.name(path) in self.captioned

    def add(self, path, captions):
        """captions: the image's captions, best first."""
        if self.fmt in SIDECAR:
            atomic_write(self.sidecar(path), "\n".join(captions) + "\n")
            return
        key = "text" if len(captions) == 1 else "captions"
        self.rows.append({"file_name": self.name(path), key: captions[0] if len(captions) == 1 else captions})
        self.pending += 1

    def flush(self):
        if self.fmt in METADATA and self.pending:
            atomic_write(self.path, format_rows(self.rows, self.fmt))
            self.pending = 0


def read_rows(path, fmt):
    """The rows of an existing metadata file, each with its file_name; a file that cannot be read is one line."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            rows = ([json.loads(line) for line in f if line.strip()] if fmt == "jsonl" else list(csv.DictReader(f)))
    except (OSError, UnicodeDecodeError, ValueError, csv.Error) as e:
        raise UserError(f"{path}: cannot be read to resume ({e}); --overwrite replaces it") from None
    if not all(isinstance(row, dict) and isinstance(row.get("file_name"), str) for row in rows):
        raise UserError(f"{path}: a row without a file_name; --overwrite replaces it")
    return rows


def format_rows(rows, fmt):
    """The metadata file's text: JSON lines, or CSV with file_name first and one caption column, a row per caption
    (several captions of an image are several rows, as imagefolder reads them)."""
    if fmt == "jsonl":
        return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["file_name", "text"])
    for row in rows:
        captions = row.get("captions") or [row.get("text", "")]
        for caption in (captions if isinstance(captions, list) else [captions]):
            writer.writerow([row["file_name"], caption])
    return out.getvalue()
