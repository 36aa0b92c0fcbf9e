"""
The BLIP-2 pieces that train.py, evaluate.py, caption.py and bench.py share: loading with clear errors (16-bit, or
a 4/8-bit base through bitsandbytes), the forward pass split into its parts, the grouped loss, the memory levers,
the frozen-vision cache, and caption generation.

BLIP-2 (Li et al. 2023) captions an image in four stages:
    pixels (B, 3, 224, 224) --ViT-g--> vision_embeds (B, 257, 1408)             frozen, no LoRA: cacheable
          --Q-Former, 32 learned queries cross-attend the image--> (B, 32, 768)
          --language_projection--> image_features (B, 32, 2048), written over the 32 image tokens of the prompt
          --T5 encoder--> (B, Q+P, 2048) --T5 decoder, one pass per caption--> logits (N, T, vocab)
Flickr8k has five captions per image. Running stages 1-4 once per image, and in the decoder only what depends on the
caption once per caption (`grouped_caption_loss`), gives the same loss and gradients as five full forwards, for a
fraction of the compute.
"""
import hashlib
import json
import os

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from transformers.cache_utils import DynamicCache, EncoderDecoderCache

from files import UserError, first_line, read_json, write_json
from images import DECODE_VERSION, source_key
from lora import lora_layers

DEFAULT_MODEL = "Salesforce/blip2-flan-t5-xl"
DOWNLOAD_HINT = (f"On a machine with internet: `hf download {DEFAULT_MODEL} --local-dir models/blip2-flan-t5-xl`, then "
                 "pass --model=models/blip2-flan-t5-xl (about 16 GB). Offline demo: python train.py config/demo.py")


class ModelError(UserError):
    """A model or adapter that cannot be loaded, reported in one line without a traceback."""


def _hub_offline():
    from huggingface_hub import constants
    return bool(constants.HF_HUB_OFFLINE)


def looks_like_hub_id(name):
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and not os.path.exists(name)


def check_model_source(name_or_path, log=print):
    """Before any work: a local BLIP-2 folder (safetensors weights only), or a hub id that is cached or can be
    downloaded. Returns local_files_only for from_pretrained. HF_HUB_OFFLINE=1 means: never try the network."""
    if os.path.isdir(name_or_path):
        files = os.listdir(name_or_path)
        pickles = sorted(f for f in files if f.endswith((".bin", ".pt", ".pth", ".ckpt")))
        if pickles and not any(f.endswith(".safetensors") for f in files):
            raise ModelError(f"{name_or_path}: its weights are {pickles[0]}, a pickle, which can run code when "
                             "loaded; this project loads safetensors weights only. Convert it once where you trust "
                             "the file: from_pretrained(dir).save_pretrained(new_dir) writes model.safetensors")
        return True
    if not looks_like_hub_id(name_or_path):
        raise ModelError(f"model {name_or_path!r}: no such folder. {DOWNLOAD_HINT}")
    from huggingface_hub import try_to_load_from_cache
    if isinstance(try_to_load_from_cache(name_or_path, "config.json"), str):
        return True  # in the local cache: no network needed
    if _hub_offline():
        raise ModelError(f"model {name_or_path!r} is not in the local cache and HF_HUB_OFFLINE is set. {DOWNLOAD_HINT}")
    log(f"downloading {name_or_path} from the Hugging Face hub (set HF_HUB_OFFLINE=1 to never try the network)")
    return False


def load_blip2(name_or_path, device="cpu", dtype=torch.float32, base_bits=16, log=print):
    """Blip2ForConditionalGeneration + Blip2Processor from a hub id or a local folder, in eval mode. base_bits 8 or 4:
    the language model's Linear weights held by bitsandbytes in int8 or NF4 (QLoRA's double-quantized 4-bit)."""
    from transformers import Blip2ForConditionalGeneration, Blip2Processor
    from transformers.utils import logging as hf_logging
    local_only = check_model_source(name_or_path, log)
    extra = {"quantization_config": quantization_config(base_bits, dtype), "device_map": {"": device}} \
        if base_bits < 16 else {}
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # keep load reports and progress bars out of the user's output
    hf_logging.disable_progress_bar()
    try:
        processor = Blip2Processor.from_pretrained(name_or_path, local_files_only=local_only)
        model = Blip2ForConditionalGeneration.from_pretrained(name_or_path, dtype=dtype, local_files_only=local_only,
                                                              use_safetensors=True, **extra)  # never a pickle
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load BLIP-2 from {name_or_path!r}: {first_line(e)}. {DOWNLOAD_HINT}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    if model.config.text_config.is_encoder_decoder is not True:
        raise ModelError(f"{name_or_path}: this project fine-tunes BLIP-2 with a T5 language model; "
                         f"found {model.config.text_config.model_type}")
    use_fused_gelu(model)
    return (model if base_bits < 16 else model.to(device)).eval(), processor


def quantization_config(base_bits, compute_dtype):
    """bitsandbytes for the frozen language model only: the ViT, Q-Former, projection and lm_head stay 16-bit
    (transformers also keeps T5's `wo` unquantized). 4-bit is QLoRA's recipe: NF4, double quantization."""
    try:
        import bitsandbytes  # noqa: F401  (imported only when asked for)
    except ImportError:
        raise ModelError(f"base_bits={base_bits} needs bitsandbytes: pip install bitsandbytes") from None
    from transformers import BitsAndBytesConfig
    keep = ["vision_model", "qformer", "language_projection", "lm_head"]
    if base_bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=keep)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=keep)


def use_fused_gelu(model):
    """Flan-T5's feed-forward activation, gelu_new, is written as seven element-wise operations, and autograd keeps
    the output of each for the backward pass: about 2 GB at the default batch. GELUTanh (F.gelu(approximate="tanh"))
    computes the same function (transformers' own `gelu_pytorch_tanh`; 2e-7 apart in float32) in one operation that
    keeps only its input. Fewer kernels, too."""
    from transformers.activations import GELUTanh, NewGELUActivation
    for module in model.language_model.modules():
        if isinstance(getattr(module, "act", None), NewGELUActivation):
            module.act = GELUTanh()


def separate_lm_head(model):
    """T5 v1.1 checkpoints, Flan-T5's among them, hold an lm_head of their own; transformers 5 builds T5 from a config
    with lm_head tied to the embeddings and unties it only when it loads such a checkpoint. A model built from a config
    to stand for blip2-flan-t5-xl in measurements (bench.py, memory.py) gets its own lm_head here, as the real one."""
    text = model.language_model
    if text.lm_head.weight is text.shared.weight:
        text.lm_head.weight = torch.nn.Parameter(text.shared.weight.detach().clone(), requires_grad=False)


def autocast_dtype(device):
    """bf16 where the GPU supports it; float16 on GPUs without bf16 (T4, V100), with a GradScaler and T5's `wo`
    layers in float32 (keep_wo_in_float32); float32 on the CPU."""
    if str(device).startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
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


def keep_wo_in_float32(model):
    """Flan-T5's feed-forward output `wo` overflows float16 (its activations reach ~1e5): transformers keeps its
    weight in float32 for float16 models. Under autocast that is not enough (autocast would run the matmul in
    float16 anyway), so here `wo` runs in float32 with autocast off. Used with dtype float16 only."""
    for name, module in model.language_model.named_modules():
        if name.endswith("DenseReluDense.wo"):
            module.float()
            module.forward = _float32_forward(module.forward)


def _float32_forward(forward):
    def run(x):
        with torch.autocast(x.device.type, enabled=False):
            return forward(x.float())
    return run


def use_gradient_checkpointing(model):
    """The T5 blocks keep only their inputs in the forward pass and recompute the rest in the backward pass: the
    activation memory of 48 blocks becomes that of about one, for about a third more compute. The recomputation
    restores the random state first, so LoRA dropout draws the same masks (same loss and gradients, tested)."""
    text = model.language_model
    for block in [*text.encoder.block, *text.decoder.block]:
        block.forward = _checkpointed(block.forward)  # the module itself stays: adapter paths do not change


def _checkpointed(forward):
    def run(*args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return run


def move_vision(model, device):
    """Put the ViT on `device`: off the GPU (2 GB in bf16) while the vision cache serves every image, back to it
    when new images must be seen."""
    model.vision_model.to(device)


def train_mode(model):
    """Only the adapters train: their dropout is on; the frozen base runs in eval mode, since its own dropout would
    only add noise to features it cannot adapt (and would make runs depend on how batches are split)."""
    model.eval()
    for _, layer in lora_layers(model):
        layer.train()


# ------------------------------------------------------------------------------------------- the forward, in parts

def vision_embeds(model, pixel_values):
    """(B, 3, H, W) -> (B, V, Dv): the ViT's last hidden state. V = 257 and Dv = 1408 for blip2-flan-t5-xl."""
    weight = model.vision_model.embeddings.patch_embedding.weight
    return model.vision_model(pixel_values=pixel_values.to(weight.device, weight.dtype)).last_hidden_state


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


def encode_images(model, batch, image_embeds):
    """Stages 2-4, once per image: (B, V, Dv) -> the T5 encoder's output (B, L, Dt)."""
    features = image_features(model, image_embeds)                                      # (B, Q, Dt)
    embeds = encoder_inputs(model, batch["input_ids"], features)                        # (B, L, Dt)
    return model.language_model.encoder(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).last_hidden_state


def grouped_caption_loss(model, batch, image_embeds):
    """Stages 2-4 once per image, the decoder once per caption. image_embeds: (B, V, Dv) from vision_embeds or the
    cache. Returns (summed loss, caption tokens).

    In the decoder, each layer's cross-attention projects the encoder states to keys and values. Those depend on the
    image, not on the caption: they are computed here once per image (LoRA on EncDecAttention.k/.v included, whose
    gradients then sum over the image's captions) and handed to the decoder through transformers' encoder-decoder
    cache, which T5's cross-attention reads instead of projecting again."""
    text = model.language_model
    encoded = encode_images(model, batch, image_embeds)                                 # (B, L, Dt)
    per_caption = batch["caption_image"]                                                # (N,) image of each caption
    cross = DynamicCache()
    for i, block in enumerate(text.decoder.block):
        attention = block.layer[1].EncDecAttention
        heads = (*encoded.shape[:2], -1, attention.key_value_proj_dim)                  # (B, L, H, d)
        keys = attention.k(encoded).view(heads).transpose(1, 2)[per_caption]            # (N, H, L, d)
        values = attention.v(encoded).view(heads).transpose(1, 2)[per_caption]
        cross.update(keys, values, i)
    # The decoder reads only the shape of encoder_hidden_states: every layer's keys and values come from the cache.
    shape_only = encoded[:1].expand(per_caption.shape[0], -1, -1)                       # (N, L, Dt), a view
    logits = text(encoder_outputs=(shape_only,), attention_mask=batch["attention_mask"][per_caption],
                  decoder_input_ids=decoder_inputs(model, batch["labels"]),
                  cache=EncoderDecoderCache(NoSelfAttentionCache(), cross), use_cache=False).logits  # (N, T, vocab)
    return caption_loss_sum(logits, batch["labels"])


class NoSelfAttentionCache(DynamicCache):
    """The decoder's self-attention keeps nothing: training reads each caption in one pass, and a kept copy would be
    doubled by gradient checkpointing's recomputation."""

    def update(self, key_states, value_states, *args, **kwargs):
        return key_states, value_states


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
        for batch in loader:
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
