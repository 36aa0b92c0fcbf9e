"""
blip2lora/images.py: reading one image, whatever its format, size or orientation.

Reading images, one way for the whole project: training batches, the vision cache, evaluation, caption.py and the
HTML report all call load_image(source).

A source is a file path, or a DatasetImage: an image held inside a dataset file (parquet or Arrow, as the Hugging
Face hub ships datasets), read from it on demand.

Images are read as a person sees them: EXIF orientation applied (phone photos are stored sideways with a tag
saying so), 16-bit and float greyscale scaled from their real range (Pillow's own conversion turns every value
above 255 into white), transparency composited onto white, any other mode converted to RGB.

And within bounds: only regular files are opened (a FIFO named photo.jpg would block for ever); a JPEG is decoded
at a reduced scale when it is far larger than the model needs; an image whose decoded size would exceed
MAX_IMAGE_PIXELS is refused before decoding; anything larger than MAX_SIDE is shrunk right after decoding (the model
reads 224 pixels: an image processor given a 20,000-pixel image would first make a float copy of many GB).
Whatever goes wrong, load_image raises UnreadableImage with a one-line reason.
"""
import bisect
import functools
import io
import os
import stat
import sys
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from blip2lora.files import printable

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# The formats an image is opened as, whatever its name: Pillow otherwise tells a format by the file's first bytes, and
# would hand a PostScript file named x.png to Ghostscript. (The MPO many phone cameras write opens as JPEG.)
READ_FORMATS = ("JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF")
Image.init()  # Pillow registers most formats only when first asked; READ_FORMATS must name registered ones
# Decoding time and memory grow with the pixel count: 100M pixels (10,000 x 10,000) decode in about a second here.
# A JPEG is decoded at 1/2, 1/4 or 1/8 scale first when it is that much larger than MAX_SIDE, so a 200 MP phone
# photo is read; a PNG claiming 24,000 x 24,000 is refused before any decoding.
MAX_IMAGE_PIXELS = 100_000_000
MAX_SIDE = 4096
# Part of the vision cache's key: a change to how pixels are decoded must rebuild caches made the old way.
DECODE_VERSION = 2


class UnreadableImage(Exception):
    """An image that cannot be read; the message is one line saying why."""


def warn_unreadable(error):
    """What a run says of an image it leaves out, on stderr."""
    print(f"warning: skipping an unreadable image: {printable(str(error))}", file=sys.stderr)


@dataclass(frozen=True)
class DatasetImage:
    """An image stored in a cell of a dataset file: `column` of row `row` in `file` (.parquet or .arrow)."""
    file: str
    row: int
    column: str

    def __str__(self):  # how messages name it
        return f"{self.file} row {self.row}"

    def read(self):
        """The encoded image bytes (PNG, JPEG, ...). A cell is a struct {bytes, path} or plain bytes."""
        cell = _dataset_cell(self.file, self.row, self.column)
        data = cell.get("bytes") if isinstance(cell, dict) else cell
        if not isinstance(data, bytes) or not data:
            raise UnreadableImage(f"{self}: no image bytes in column {self.column!r}")
        return data


def source_key(source):
    """What identifies a source's pixels cheaply: its file's path, size and modification time (and the row)."""
    path = source.file if isinstance(source, DatasetImage) else source
    where = os.path.abspath(path) + (f"#{source.row}:{source.column}" if isinstance(source, DatasetImage) else "")
    try:
        st = os.stat(path)
        return f"{where}\t{st.st_size}\t{st.st_mtime_ns}"
    except OSError:
        return f"{where}\tmissing"


def list_folder(folder):
    """{name: 'file' | 'link' | 'other'} for a folder's entries, from one scandir (no stat per file: fast for COCO's
    123,287 images); {} if it is not a folder."""
    try:
        with os.scandir(folder) as entries:
            return {e.name: "link" if e.is_symlink() else "file" if e.is_file(follow_symlinks=False) else "other"
                    for e in entries}
    except OSError:
        return {}


def _open_regular_file(path):
    """A readable file object, or UnreadableImage: never blocks on a FIFO or reads a device."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # O_NONBLOCK: opening a FIFO returns at once
    except OSError as e:
        raise UnreadableImage(f"{path}: cannot open ({e.strerror})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UnreadableImage(f"{path}: not a regular file (a folder, FIFO or device)")
    return os.fdopen(fd, "rb")


def load_image(source):
    """A JPEG, PNG, BMP, GIF, WebP or TIFF image (READ_FORMATS, told by its bytes), as an RGB PIL image the way a
    viewer shows it; UnreadableImage if it is not one."""
    try:
        stream = io.BytesIO(source.read()) if isinstance(source, DatasetImage) else _open_regular_file(source)
        with stream, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's own size warning: our limit below replaces it
            pillow_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
            try:
                image = Image.open(stream, formats=READ_FORMATS)
            finally:
                Image.MAX_IMAGE_PIXELS = pillow_limit
            with image:
                if image.format == "JPEG":
                    image.draft("RGB", (MAX_SIDE, MAX_SIDE))  # decode at 1/2..1/8 scale if that still covers MAX_SIDE
                if image.width * image.height > MAX_IMAGE_PIXELS:
                    raise UnreadableImage(f"{source}: {image.width} x {image.height} pixels is over the "
                                          f"{MAX_IMAGE_PIXELS:,} this project decodes (images.MAX_IMAGE_PIXELS)")
                image.load()
                return _as_rgb(ImageOps.exif_transpose(image))
    except UnreadableImage:
        raise
    except UnidentifiedImageError:
        raise UnreadableImage(f"{source}: not a readable image (not a JPEG, PNG, BMP, GIF, WebP or TIFF)") from None
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError, Image.DecompressionBombError) as e:
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnreadableImage(f"{source}: not a readable image ({text})") from None


def _as_rgb(image):
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        image = _greyscale_to_8bit(image)
    if image.mode in ("RGBA", "LA", "P", "PA", "La", "RGBa"):  # composite transparency onto white, not black
        image = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image)
    image = image.convert("RGB")
    if max(image.size) > MAX_SIDE:
        image.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.BICUBIC)
    return image


def _greyscale_to_8bit(image):
    """16-bit, 32-bit and float greyscale -> 8-bit, scaled by the range of the type (0..65535 for 16-bit data, 0..1
    for floats), or by the largest value when it goes beyond that."""
    values = np.asarray(image, dtype=np.float64)
    largest = float(values.max()) if values.size else 0.0
    if image.mode == "F" and largest <= 1.0:
        top = 1.0
    elif largest <= 255 and not image.mode.startswith("I;16"):
        top = 255.0
    else:
        top = max(65535.0, largest)
    return Image.fromarray(np.clip(values * (255.0 / top), 0, 255).round().astype(np.uint8))  # uint8: mode L


# ------------------------------------------------------------------------------ images inside dataset files
# Cells are read on demand, so that a dataset larger than memory is never loaded whole. The last files and row
# groups read are kept open: training and evaluation read images mostly in file order.

@functools.lru_cache(maxsize=8)
def _parquet(path):
    import pyarrow.parquet as pq
    file = pq.ParquetFile(path)
    starts = [0]
    for i in range(file.metadata.num_row_groups):
        starts.append(starts[-1] + file.metadata.row_group(i).num_rows)
    return file, starts


@functools.lru_cache(maxsize=4)
def _parquet_row_group(path, index, column):
    file, _ = _parquet(path)
    return file.read_row_group(index, columns=[column]).column(0)


@functools.lru_cache(maxsize=4)
def _arrow_table(path):
    """A save_to_disk Arrow file (IPC stream), memory-mapped: reading it costs no memory of its own."""
    import pyarrow as pa
    with pa.memory_map(path) as source:
        return pa.ipc.open_stream(source).read_all()


def _dataset_cell(path, row, column):
    try:
        if path.endswith(".arrow"):
            return _arrow_table(path).column(column)[row].as_py()
        _, starts = _parquet(path)
        group = bisect.bisect_right(starts, row) - 1
        return _parquet_row_group(path, group, column)[row - starts[group]].as_py()
    except UnreadableImage:
        raise
    except Exception as e:  # pyarrow's errors have no common base: any of them means this cell cannot be read
        raise UnreadableImage(f"{path} row {row}: cannot read column {column!r} ({type(e).__name__})") from None
