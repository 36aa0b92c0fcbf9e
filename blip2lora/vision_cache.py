"""
blip2lora/vision_cache.py: the frozen ViT's outputs, computed once and read from disk.

Memory-mapped, for train.py's vision_cache setting.

No LoRA target is inside the ViT and the images are not augmented, so what the ViT makes of an image never changes
during training: train.py computes it once per image (out_dir/vision_cache/, about 0.7 MB an image for
blip2-flan-t5-xl in bf16) and every step, epoch and evaluation reads it from here instead of running the 1B-parameter
ViT. A first reading of the project can skip this file: with vision_cache=False the step computes the same thing.
"""
import hashlib
import json
import os
import re
import shutil

import torch
import torch.distributed as dist

from blip2lora.blip2 import move_vision, vision_embeds
from blip2lora.files import UserError, read_json, require_writable_folder, write_json
from blip2lora.images import DECODE_VERSION, source_key
from blip2lora.progress import progress


def _fingerprint(items):
    """A hash of each image's name and source (file path, size, modification time): a cheap sign of a change."""
    lines = [f"{item.name}\t{source_key(item.image)}" for item in items]
    return hashlib.sha1("\n".join(lines).encode("utf-8", "surrogateescape")).hexdigest()


def _row_sums(rows):
    """(R, V, Dv) -> (R,) int64: each row's bits summed as integers. Exact and order-free, so a check recomputes the
    same number from the same bytes, and a zeroed or overwritten row gives another."""
    as_int = {2: torch.int16, 4: torch.int32}[rows.element_size()]
    return rows.contiguous().view(as_int).to(torch.int64).flatten(1).sum(1)


class CacheDamaged(UserError):
    pass


class VisionCache:
    """ViT outputs of every image, computed once and memory-mapped from disk: (num_images, V, Dv) in `dtype`.

    Valid only while nothing inside the ViT trains (no LoRA target there, no augmentation). The directory name is a
    hash of (model, image size, dtype, ViT shape, how images are decoded, the images: name and source of each): change
    any of them and a new cache is built. A cache is used only once complete (its meta.json is written last, so an
    interrupted build starts over) and only if its contents check out: the file's size, and each row's checksum
    (recorded when it was written) on a sample of rows when opened and on every row when read; a cache that fails
    is built again, never read as zeros or noise.
    """

    def __init__(self, root, model, model_name, image_size, items, dtype):
        vision = model.config.vision_config
        tokens = (vision.image_size // vision.patch_size) ** 2 + 1
        self.key = {"model": model_name, "image_size": image_size, "dtype": str(dtype), "decode": DECODE_VERSION,
                    "shape": [len(items), tokens, vision.hidden_size], "images": _fingerprint(items)}
        digest = hashlib.sha1(json.dumps(self.key, sort_keys=True).encode()).hexdigest()[:16]
        self.dir = os.path.join(root, digest)
        self.row = {item.name: i for i, item in enumerate(items)}
        self.dtype, self.shape = dtype, tuple(self.key["shape"])
        self.nbytes = self.shape[0] * self.shape[1] * self.shape[2] * torch.finfo(dtype).bits // 8
        self.complete, self.table, self.missing, self.sums = False, None, set(), None  # missing: unreadable images
        self.problem = self._open() if os.path.exists(os.path.join(self.dir, "meta.json")) else None

    def _open(self):
        """Use a finished cache, or say why it cannot be used."""
        try:
            meta = read_json(os.path.join(self.dir, "meta.json"))
            missing, sums = set(meta["missing"]), torch.tensor(meta["row_sums"], dtype=torch.int64)
        except (UserError, KeyError, TypeError, ValueError, RuntimeError, OverflowError):
            return "its meta.json is unreadable"
        if {k: meta.get(k) for k in self.key} != self.key or sums.shape != (self.shape[0],):
            return "its meta.json describes another cache"
        path = os.path.join(self.dir, "vision.bin")
        size = os.path.getsize(path) if os.path.isfile(path) else 0
        if size != self.nbytes:
            return f"vision.bin has {size:,} bytes, not {self.nbytes:,}"
        self.table, self.sums = self._map(), sums
        sample = torch.linspace(0, self.shape[0] - 1, min(self.shape[0], 64)).long()
        if not torch.equal(_row_sums(self.table[sample]), sums[sample]):
            self.table = None
            return "its contents changed since they were written (checksums differ)"
        self.complete, self.missing = True, missing
        return None

    def _map(self):
        numel = self.shape[0] * self.shape[1] * self.shape[2]
        path = os.path.join(self.dir, "vision.bin")
        return torch.from_file(path, shared=True, size=numel, dtype=self.dtype).view(self.shape)

    @torch.no_grad()
    def build(self, model, loader, device, autocast, log=print, should_stop=lambda: False):
        """Fill the cache from a loader over all the images (batches from data.CaptionCollator)."""
        os.makedirs(self.dir, exist_ok=True)
        if os.path.exists(os.path.join(self.dir, "meta.json")):  # a damaged cache: unfinished until written again
            os.remove(os.path.join(self.dir, "meta.json"))
        with open(os.path.join(self.dir, "vision.bin"), "wb") as f:
            f.truncate(self.nbytes)
        self.table = self._map()
        items = loader.dataset.items
        self.missing = set(self.row)
        for batch in progress(loader, len(loader), "vision cache", "batches", log):
            should_stop()
            if "pixel_values" not in batch:
                continue  # every image of this batch was unreadable (already said)
            self.missing -= {items[i].name for i in batch["image_index"].tolist()}
            with autocast:
                embeds = vision_embeds(model, batch["pixel_values"].to(device))
            rows = torch.tensor([self.row[items[i].name] for i in batch["image_index"].tolist()])
            self.table[rows] = embeds.to("cpu", self.dtype)
        self.sums = _row_sums(self.table)
        write_json(os.path.join(self.dir, "meta.json"),
                   {**self.key, "missing": sorted(self.missing), "row_sums": self.sums.tolist()})
        self.complete = True
        log(f"vision cache: {self.shape[0]} images written to {self.dir}")

    def lookup(self, names, device):
        rows = torch.tensor([self.row[n] for n in names])
        embeds = self.table[rows]
        if not torch.equal(_row_sums(embeds), self.sums[rows]):
            os.remove(os.path.join(self.dir, "meta.json"))  # ours: the next run builds the cache again
            raise CacheDamaged(f"vision cache {self.dir}: rows changed on disk since they were written (checksums "
                               "differ); it will be built again when you run the same command again")
        return embeds.to(device, non_blocking=True)


def prepare_vision_cache(cfg, p, t, image_loader):
    """train.py's stage: the frozen ViT's outputs of every image, computed once (rank 0 builds, the others wait);
    None when off. image_loader(items) reads the images (a DataLoader of data.py's batches). Once complete, the ViT
    leaves the GPU (vision_on_gpu=False): training and evaluation read the cache."""
    if not cfg.vision_cache:
        return None
    items = t.data.splits["train"] + t.data.splits["val"] + t.test_items
    image_size = "x".join(str(t.processor.image_processor.size[k]) for k in ("height", "width"))
    key = (t.model, cfg.model, image_size, items, p.dtype)
    cache = VisionCache(os.path.join(cfg.out_dir, "vision_cache"), *key)
    if cache.problem and p.master:
        p.log(f"vision cache: {cache.dir} cannot be used ({cache.problem}); building it again")
    if p.master:
        _remove_older_caches(cache.dir, p.log)
    if not cache.complete and p.master:
        _build(p, t, cache, image_loader(items), log=p.log)
    if p.ddp:
        dist.barrier()
        cache = VisionCache(os.path.join(cfg.out_dir, "vision_cache"), *key)  # complete where rank 0 built it
        if not cache.complete and p.local_rank == 0:  # a node that does not share rank 0's out_dir: its own copy
            _build(p, t, cache, image_loader(items), log=lambda line: print(f"[rank {p.rank}] {line}", flush=True))
        dist.barrier()
        cache = VisionCache(os.path.join(cfg.out_dir, "vision_cache"), *key)  # now complete on every rank
    if cache.missing:
        p.log(f"vision cache: {len(cache.missing)} unreadable images are left out")
        t.train_items = [i for i in t.train_items if i.name not in cache.missing]
    if not cfg.vision_on_gpu and p.device_type == "cuda":
        move_vision(t.model, "cpu")
        torch.cuda.empty_cache()
    return cache


def _remove_older_caches(keep, log):
    """Delete the caches this project wrote in out_dir/vision_cache/ for an earlier state of the run (another
    collection, model or dtype: each is a new folder, 6 GB for Flickr8k). Only folders of its own kind go: a
    16-hex-digit name holding nothing but vision.bin and meta.json; anything else there is left alone."""
    root, freed, removed = os.path.dirname(keep), 0, 0
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        folder = os.path.join(root, name)
        if folder == keep or not re.fullmatch(r"[0-9a-f]{16}", name) or os.path.islink(folder) or \
                not os.path.isdir(folder):
            continue
        files = [os.path.join(folder, f) for f in os.listdir(folder)]
        if not files or not {os.path.basename(f) for f in files} <= {"vision.bin", "meta.json"} or \
                not all(os.path.isfile(f) and not os.path.islink(f) for f in files):
            continue
        freed += sum(os.path.getsize(f) for f in files)
        shutil.rmtree(folder)
        removed += 1
    if removed:
        log(f"vision cache: removed {removed} cache(s) of an earlier collection or setting ({size(freed)}) in {root}")


def _build(p, t, cache, loader, log):
    images = len(loader.dataset)
    log(f"vision cache: computing ViT outputs of {images} images once ({size(cache.nbytes)} in {cache.dir}) ...")
    _require_disk_space(cache, images)
    cache.build(t.model, loader, p.device, p.autocast, log=log)


def size(nbytes):
    return f"{nbytes / 1e9:.1f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.1f} MB"


def _require_disk_space(cache, num_images):
    """The vision cache must fit on its disk (COCO in bf16 is about 90 GB): say so now, not when the disk is full."""
    folder = os.path.dirname(cache.dir)
    require_writable_folder(folder, "vision cache")
    free = shutil.disk_usage(folder).free
    if cache.nbytes > free:
        raise UserError(f"vision cache: {num_images} images need {size(cache.nbytes)} in {folder}, but only "
                       f"{size(free)} is free there. Set vision_cache=False (the ViT then runs in every step) or use "
                       "an out_dir on a disk with room")
