"""
The BLIP-2 pieces that train.py, evaluate.py, caption.py and bench.py share: loading with clear errors, the forward
pass split into its parts, the grouped loss, the frozen-vision cache, and caption generation.

BLIP-2 (Li et al. 2023) captions an image in four stages:
    pixels (B, 3, 224, 224) --ViT-g--> vision_embeds (B, 257, 1408)             frozen, no LoRA: cacheable
          --Q-Former, 32 learned queries cross-attend the image--> (B, 32, 768)
          --language_projection--> image_features (B, 32, 2048), written over the 32 image tokens of the prompt
          --T5 encoder--> (B, Q+P, 2048) --T5 decoder, one pass per caption--> logits (N, T, vocab)
Flickr8k has five captions per image. Running stages 1-4 once per image and only the decoder once per caption
(`grouped_caption_loss`) gives the same loss and gradients as five full forwards, for a fraction of the compute.
"""
import hashlib
import json
import os
import socket

import torch
import torch.nn.functional as F

from lora import lora_layers


class ModelError(Exception):
    """A model or adapter that cannot be loaded, reported in one line without a traceback."""


def _hub_reachable():
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
        return True
    except OSError:
        return False


def load_blip2(name_or_path, device="cpu", dtype=torch.float32):
    """Blip2ForConditionalGeneration + Blip2Processor from a hub id or a local directory, in eval mode."""
    from transformers import Blip2ForConditionalGeneration, Blip2Processor
    from transformers.utils import logging as hf_logging
    offline = False
    if not os.path.isdir(name_or_path):
        from huggingface_hub import try_to_load_from_cache
        looks_like_hub_id = name_or_path.count("/") == 1 and not name_or_path.startswith((".", "/"))
        cached = looks_like_hub_id and isinstance(try_to_load_from_cache(name_or_path, "config.json"), str)
        offline = not (looks_like_hub_id and _hub_reachable())  # then only the local cache can serve it
        if not looks_like_hub_id or (offline and not cached):
            raise ModelError(
                f"model {name_or_path!r} is not a local directory and cannot be downloaded here. On a machine with "
                f"internet: `hf download Salesforce/blip2-flan-t5-xl --local-dir models/blip2-flan-t5-xl`, then "
                f"pass --model=models/blip2-flan-t5-xl (about 16 GB). Offline demo: python train.py config/demo.py")
    if os.path.isdir(name_or_path):
        files = os.listdir(name_or_path)
        pickles = sorted(f for f in files if f.endswith((".bin", ".pt", ".pth", ".ckpt")))
        if pickles and not any(f.endswith(".safetensors") for f in files):
            raise ModelError(f"{name_or_path}: its weights are {pickles[0]}, a pickle, which can run code when "
                             "loaded; this project loads safetensors weights only. Convert it once where you trust "
                             "the file: from_pretrained(dir).save_pretrained(new_dir) writes model.safetensors")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # keep load reports and progress bars out of the user's output
    hf_logging.disable_progress_bar()
    try:
        processor = Blip2Processor.from_pretrained(name_or_path, local_files_only=offline)
        model = Blip2ForConditionalGeneration.from_pretrained(name_or_path, dtype=dtype, local_files_only=offline,
                                                              use_safetensors=True)  # never a pickle
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load BLIP-2 from {name_or_path!r}: {str(e).splitlines()[0]}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    if model.config.text_config.is_encoder_decoder is not True:
        raise ModelError(f"{name_or_path}: this project fine-tunes BLIP-2 with a T5 language model; "
                         f"found {model.config.text_config.model_type}")
    return model.to(device).eval(), processor


def autocast_dtype(device):
    """bf16 where the GPU supports it (Flan-T5 overflows in fp16), float32 on the CPU."""
    if str(device).startswith("cuda") and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def autocast_context(device, dtype):
    """One code path for every precision: matmuls in `dtype` on that device, or plain float32 (a no-op context)."""
    return torch.autocast(str(device).split(":")[0], dtype=dtype, enabled=dtype != torch.float32)


def cast_frozen_qformer(model, dtype):
    """from_pretrained keeps the Q-Former in float32 (_keep_in_fp32_modules). Under bf16 autocast every frozen
    Linear weight of it is then cast to bf16 again on every call (autocast caches only the casts of weights that
    require grad). Casting them once gives the matmuls bit-identical inputs with fewer operations per step;
    LayerNorms, the query tokens and the LoRA tensors stay float32. For training and evaluation under autocast."""
    if dtype != torch.bfloat16:
        return
    for module in model.qformer.modules():
        if isinstance(module, torch.nn.Linear) and not module.weight.requires_grad:
            module.to(dtype)


def train_mode(model):
    """Only the adapters train: their dropout is on; the frozen base runs in eval mode, since its own dropout would
    only add noise to features it cannot adapt (and would make runs depend on how batches are split)."""
    model.eval()
    for _, layer in lora_layers(model):
        layer.train()


# ------------------------------------------------------------------------------------------- the forward, in parts

def vision_embeds(model, pixel_values):
    """(B, 3, H, W) -> (B, V, Dv): the ViT's last hidden state. V = 257 and Dv = 1408 for blip2-flan-t5-xl."""
    dtype = model.vision_model.embeddings.patch_embedding.weight.dtype
    return model.vision_model(pixel_values=pixel_values.to(dtype)).last_hidden_state


def image_features(model, image_embeds):
    """(B, V, Dv) -> (B, Q, Dt): Q-Former queries read the image, then are projected to T5's width."""
    queries = model.query_tokens.expand(image_embeds.shape[0], -1, -1)                  # (B, Q, Dq)
    mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
    query_output = model.qformer(query_embeds=queries, encoder_hidden_states=image_embeds,
                                 encoder_attention_mask=mask).last_hidden_state          # (B, Q, Dq), fp32
    return model.language_projection(query_output.to(image_embeds.dtype))               # (B, Q, Dt)


def encoder_inputs(model, input_ids, features):
    """Embed the prompt ids (B, L) and write the image features over the image-token positions -> (B, L, Dt).
    Each row of input_ids must hold exactly Q image tokens, or the image is silently left out: data.encoder_prompt_ids
    makes and checks the prompt once, outside the step, so that this stays one graph for torch.compile."""
    embeds = model.get_input_embeddings()(input_ids)
    image_positions = (input_ids == model.config.image_token_id).unsqueeze(-1)          # (B, L, 1)
    return embeds.masked_scatter(image_positions, features.to(embeds.dtype))


def decoder_inputs(model, labels):
    """Teacher forcing: the decoder reads [start] + labels[:-1], with -100 padding turned into the pad id."""
    start = torch.full_like(labels[:, :1], model.config.text_config.decoder_start_token_id)
    shifted = torch.cat([start, labels[:, :-1]], dim=1)
    return shifted.masked_fill(shifted == -100, model.config.text_config.pad_token_id)


def caption_loss_sum(logits, labels):
    """Summed token cross-entropy (padding ignored) and the token count: the caller divides, so micro-batches
    and captions of different lengths are weighted by their tokens."""
    loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum")
    return loss, (labels != -100).sum()


def grouped_caption_loss(model, batch, image_embeds):
    """Stages 2-4 once per image, the decoder once per caption. image_embeds: (B, V, Dv) from vision_embeds or the
    cache. Returns (summed loss, caption tokens)."""
    text = model.language_model
    features = image_features(model, image_embeds)                                      # (B, Q, Dt)
    embeds = encoder_inputs(model, batch["input_ids"], features)                        # (B, L, Dt)
    encoded = text.encoder(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).last_hidden_state
    per_caption = batch["caption_image"]                                                # (N,) image of each caption
    logits = text(encoder_outputs=(encoded[per_caption],),                              # (N, L, Dt) -> (N, T, vocab)
                  attention_mask=batch["attention_mask"][per_caption],
                  decoder_input_ids=decoder_inputs(model, batch["labels"]),
                  use_cache=False).logits  # the base is in eval mode, where T5 would keep a generation cache
    return caption_loss_sum(logits, batch["labels"])


def per_pair_caption_loss(model, batch):
    """The usual way, for comparison: one full BLIP-2 forward per (image, caption) pair."""
    per_caption = batch["caption_image"]
    logits = model(pixel_values=batch["pixel_values"][per_caption], input_ids=batch["input_ids"][per_caption],
                   attention_mask=batch["attention_mask"][per_caption],
                   decoder_input_ids=decoder_inputs(model, batch["labels"]), use_cache=False).logits
    return caption_loss_sum(logits, batch["labels"])


@torch.no_grad()
def generate_captions(model, tokenizer, prompt_ids, image_embeds, num_beams=5, max_new_tokens=30, min_new_tokens=8):
    """Beam-search captions for (B, V, Dv) image embeddings; the same computation as model.generate(**processor(
    images, text=prompt)), split so that cached vision outputs can be used."""
    input_ids = torch.tensor(prompt_ids, device=image_embeds.device).expand(image_embeds.shape[0], -1)
    embeds = encoder_inputs(model, input_ids, image_features(model, image_embeds))
    output = model.language_model.generate(inputs_embeds=embeds, attention_mask=torch.ones_like(input_ids),
                                           num_beams=num_beams, max_new_tokens=max_new_tokens,
                                           min_new_tokens=min_new_tokens)
    if tokenizer is None:
        return output  # token ids (N, T): bench.py times generation without decoding
    return [c.strip() for c in tokenizer.batch_decode(output, skip_special_tokens=True)]


# ------------------------------------------------------------------------------------------- frozen-vision cache

def _fingerprint(items):
    """A hash of each image's name, path, size and modification time: a cheap sign that the images changed."""
    lines = []
    for item in items:
        try:
            stat = os.stat(item.path)
            lines.append(f"{item.name}\t{os.path.abspath(item.path)}\t{stat.st_size}\t{stat.st_mtime_ns}")
        except OSError:
            lines.append(f"{item.name}\t{item.path}\tmissing")
    return hashlib.sha1("\n".join(lines).encode()).hexdigest()


class VisionCache:
    """ViT outputs of every image, computed once and memory-mapped from disk: (num_images, V, Dv) in `dtype`.

    Valid only while nothing inside the ViT trains (no LoRA target there, no augmentation). The directory name is a
    hash of (model, image size, dtype, ViT shape, the images: name, path, size and modification time of each file):
    change any of them and a new cache is built. A cache is used only once complete (its meta.json is written last,
    so an interrupted build starts over) and only if its files are whole: a damaged one is built again.
    """

    def __init__(self, root, model, model_name, image_size, items, dtype):
        vision = model.config.vision_config
        tokens = (vision.image_size // vision.patch_size) ** 2 + 1
        self.key = {"model": model_name, "image_size": image_size, "dtype": str(dtype),
                    "shape": [len(items), tokens, vision.hidden_size], "images": _fingerprint(items)}
        digest = hashlib.sha1(json.dumps(self.key, sort_keys=True).encode()).hexdigest()[:16]
        self.dir = os.path.join(root, digest)
        self.row = {item.name: i for i, item in enumerate(items)}
        self.dtype, self.shape = dtype, tuple(self.key["shape"])
        self.nbytes = self.shape[0] * self.shape[1] * self.shape[2] * torch.finfo(dtype).bits // 8
        self.complete, self.table, self.missing = False, None, set()  # missing: the unreadable images
        self.problem = self._open() if os.path.isfile(os.path.join(self.dir, "meta.json")) else None

    def _open(self):
        """Use a finished cache, or say why it cannot be used (a damaged file would otherwise read as zeros)."""
        try:
            meta = json.loads(open(os.path.join(self.dir, "meta.json"), "rb").read().decode("utf-8"))
            missing = set(meta["missing"])
        except (ValueError, KeyError, TypeError):  # ValueError: bad JSON or bytes that are not UTF-8
            return "its meta.json is unreadable"
        if {k: meta.get(k) for k in self.key} != self.key:
            return "its meta.json describes another cache"
        path = os.path.join(self.dir, "vision.bin")
        size = os.path.getsize(path) if os.path.isfile(path) else 0
        if size != self.nbytes:
            return f"vision.bin has {size:,} bytes, not {self.nbytes:,}"
        self.complete, self.table, self.missing = True, self._map(), missing
        return None

    def _map(self):
        numel = self.shape[0] * self.shape[1] * self.shape[2]
        path = os.path.join(self.dir, "vision.bin")
        return torch.from_file(path, shared=True, size=numel, dtype=self.dtype).view(self.shape)

    @torch.no_grad()
    def build(self, model, loader, device, autocast, log=print):
        """Fill the cache from a loader over all the images (batches from data.CaptionCollator)."""
        os.makedirs(self.dir, exist_ok=True)
        if os.path.isfile(os.path.join(self.dir, "meta.json")):  # a damaged cache: unfinished until written again
            os.remove(os.path.join(self.dir, "meta.json"))
        with open(os.path.join(self.dir, "vision.bin"), "wb") as f:
            f.truncate(self.nbytes)
        self.table = self._map()
        items = loader.dataset.items
        self.missing = set(self.row)
        for batch in loader:
            if "pixel_values" not in batch:
                continue  # every image of this batch was unreadable (already warned and counted)
            self.missing -= {items[i].name for i in batch["image_index"].tolist()}
            with autocast:
                embeds = vision_embeds(model, batch["pixel_values"].to(device))
            rows = torch.tensor([self.row[items[i].name] for i in batch["image_index"].tolist()])
            self.table[rows] = embeds.to("cpu", self.dtype)
        with open(os.path.join(self.dir, "meta.json.tmp"), "w") as f:
            json.dump({**self.key, "missing": sorted(self.missing)}, f)
        os.replace(os.path.join(self.dir, "meta.json.tmp"), os.path.join(self.dir, "meta.json"))
        self.complete = True
        log(f"vision cache: {self.shape[0]} images written to {self.dir}")

    def lookup(self, names, device):
        rows = torch.tensor([self.row[n] for n in names])
        return self.table[rows].to(device, non_blocking=True)
