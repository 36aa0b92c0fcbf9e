"""
How much GPU memory does a training step of blip2-flan-t5-xl take? Predicted on the CPU, allocating nothing:

    python bench.py --model full --memory --batch-images 8,16 --json
    python bench.py --model full --memory --batch-images 16 --gradient_checkpointing=True --base_bits=4

The model is built on the meta device (shapes, no data) and moved into FakeTensorMode, where every operation runs for
its output's shape and dtype only. train.py's step runs on it (the grouped loss on cached ViT outputs, backward,
gradient clipping, AdamW whose state already exists, as from the second step on) while a dispatch mode counts the
bytes of every tensor storage for as long as it lives, each storage once: a view (say the transpose of a weight that
autograd keeps for the backward pass) adds nothing, as on a GPU. The weights are registered first.

Not counted (add them): the CUDA context (0.3 to 0.5 GB), the caching allocator's rounding and fragmentation, cuBLAS
workspaces. The CPU's autocast rules stand in for CUDA's (both run matmuls in bf16). A 4- or 8-bit base is emulated
as bitsandbytes stores and computes it: NF4 holds half a byte a weight plus its double-quantized scales, int8 a byte a
weight plus a float32 scale a row, and the weight is dequantized into a temporary in the forward pass and again in
the backward pass (nothing of it is kept in between).
"""
import math
import time
import weakref
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from transformers.cache_utils import DynamicCache, EncoderDecoderCache

from lora import inject_lora
from model import (cast_frozen_qformer, encode_images, grouped_caption_loss, separate_lm_head, train_mode,
                   use_fused_gelu, use_gradient_checkpointing)


@dataclass
class Levers:
    """train.py's memory settings, by their names there."""
    base_bits: int = 16
    gradient_checkpointing: bool = False
    vision_on_gpu: bool = False


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of live tensor storages: each operation's outputs are added once per storage, and taken off
    when the storage is freed. `peak` is the most that lived at once."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.seen = set()

    def track(self, tensor):
        if not isinstance(tensor, torch.Tensor):
            return
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self.seen:
            return
        self.seen.add(key)
        self.live += storage.nbytes()
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key, storage.nbytes())

    def _free(self, key, nbytes):
        self.seen.discard(key)
        self.live -= nbytes

    def reset_peak(self):
        self.peak = self.live

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            self.track(tensor)
        return out


# ------------------------------------------------------------------------------ a 4/8-bit base, emulated

class _DequantizedMatmul(torch.autograd.Function):
    """y = x @ dequantize(W).T, keeping nothing for the backward pass but the (frozen) quantized weight."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return F.linear(x, layer.dequantized(x.dtype))

    @staticmethod
    def backward(ctx, grad):
        return grad @ ctx.layer.dequantized(grad.dtype), None


class EmulatedQuantLinear(nn.Linear):
    """A frozen Linear held as bitsandbytes holds it (an nn.Linear to LoRA, as bitsandbytes' layers are), for
    counting bytes only: its values mean nothing."""

    def __init__(self, linear, bits):
        nn.Module.__init__(self)
        self.in_features, self.out_features, self.bits = linear.in_features, linear.out_features, bits
        count = self.in_features * self.out_features
        if bits == 4:  # NF4, double quantization: a uint8 scale per 64 weights, a float32 one per 256 scales
            self.register_buffer("packed", torch.empty(count // 2, dtype=torch.uint8))
            self.register_buffer("scales", torch.empty(math.ceil(count / 64), dtype=torch.uint8))
            self.register_buffer("scale_scales", torch.empty(math.ceil(count / 64 / 256), dtype=torch.float32))
        else:  # LLM.int8: int8 weights and a float32 scale per output row
            self.register_buffer("packed", torch.empty(count, dtype=torch.int8))
            self.register_buffer("scales", torch.empty(self.out_features, dtype=torch.float32))
        self.weight = torch.nn.Parameter(torch.empty(0, dtype=torch.bfloat16), requires_grad=False)  # T5 reads .dtype
        self.bias = None

    def dequantized(self, dtype):
        return self.packed.new_empty((self.out_features, self.in_features), dtype=dtype)

    def forward(self, x):
        return _DequantizedMatmul.apply(x, self)


def quantize_language_model(model, bits):
    """Swap the T5 Linear layers bitsandbytes would quantize (all but `wo` and lm_head, as transformers does)."""
    for name, module in list(model.language_model.named_modules()):
        if isinstance(module, nn.Linear) and not name.endswith("wo") and name != "lm_head":
            parent, _, child = name.rpartition(".")
            setattr(model.language_model.get_submodule(parent), child, EmulatedQuantLinear(module, bits))


# ------------------------------------------------------------------------------ the prediction

class _RealTensors:
    """What FakeTensorMode provides, for real tensors: the same counting on a model small enough to run."""
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    @staticmethod
    def from_tensor(tensor):
        return tensor


def train_ready(config, device, dtype, settings, levers=Levers(), own_lm_head=True):
    """BLIP-2 built from a config on `device` and prepared as from_pretrained and train.py prepare it: dtypes (the
    Q-Former float32), the fused GELU, the levers, LoRA with train.py's settings, train mode for the adapters only.
    own_lm_head: as blip2-flan-t5-xl's checkpoint has (the demo's has not). bench.py times this model."""
    from transformers import Blip2ForConditionalGeneration
    with torch.device(device):
        model = Blip2ForConditionalGeneration(config)
        if own_lm_head:
            separate_lm_head(model)
    model.to(dtype)
    model.qformer.float()  # as from_pretrained does (_keep_in_fp32_modules)
    model.query_tokens.data = model.query_tokens.data.float()
    use_fused_gelu(model)  # as load_blip2 does
    if levers.base_bits < 16:
        quantize_language_model(model, levers.base_bits)
    inject_lora(model, settings["lora_targets"], settings["lora_r"], settings["lora_alpha"], settings["lora_dropout"])
    cast_frozen_qformer(model, dtype)  # as train.py: under bf16 autocast, the frozen Q-Former's Linears in bf16
    if levers.gradient_checkpointing:
        use_gradient_checkpointing(model)
    train_mode(model)  # as train.py: adapters train (dropout on), the frozen base runs in eval mode
    return model


def prepared_model(config, dtype, levers, settings, fake=True, own_lm_head=True):
    """train_ready's model with fake weights (or real, uninitialised ones, to check the count on a small model); and
    the mode its tensors live in."""
    model = train_ready(config, "meta", dtype, settings, levers, own_lm_head)
    mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else _RealTensors()
    with mode:
        model.to_empty(device="cpu")
        model.tie_weights()  # to_empty gives T5's shared embedding one tensor per module that uses it: one again
        if own_lm_head:
            separate_lm_head(model)
    return model, mode


def weights_on_gpu(model, levers):
    """The parameter and buffer tensors the GPU holds: all but the ViT's once it has left (vision_on_gpu=False)."""
    vision = {id(t) for t in [*model.vision_model.parameters(), *model.vision_model.buffers()]}
    return [t for t in [*model.parameters(), *model.buffers()] if levers.vision_on_gpu or id(t) not in vision]


def predict(config, batch, dtype, levers, settings, eval_batch=32, num_beams=5, new_tokens=30, fake=True, model=None,
            own_lm_head=True):
    """Bytes on the GPU during one training step (and during beam-search generation), with their breakdown.
    fake=False counts the same with real tensors (a small model only), or counts `model`, prepared elsewhere (say by
    bitsandbytes): the tests that the prediction is the count."""
    started = time.time()
    model, fake = (model, _RealTensors()) if model is not None else prepared_model(config, dtype, levers, settings,
                                                                                   fake, own_lm_head)
    counter = LiveBytes()
    for tensor in weights_on_gpu(model, levers):
        counter.track(tensor)
    lora = [p for p in model.parameters() if p.requires_grad]
    lora_bytes = sum(p.numel() * p.element_size() for p in lora)
    frozen = counter.live - lora_bytes
    text = sum(t.untyped_storage().nbytes() for t in [*model.language_model.parameters(),
                                                      *model.language_model.buffers()] if not t.requires_grad)
    autocast = torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32)
    with fake:
        optimizer = torch.optim.AdamW(lora, lr=1e-4)
        for p in lora:  # AdamW's state exists from the first step on: make it, uncounted, before the counted step
            p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with counter:
            for tensor in (t for state in optimizer.state.values() for t in state.values()):
                counter.track(tensor)
            steady = counter.live
            with autocast:
                step_peak = count_step(model, {k: fake.from_tensor(v) for k, v in batch.items()}, optimizer, lora,
                                       settings["grad_clip"], dtype, counter)
                generation_peak = count_generation(model, eval_batch, num_beams, new_tokens, dtype, counter)
    return {"frozen_weights": frozen, "language_model_weights": text,
            "lora_weights_grads_adamw": steady - frozen + lora_bytes,  # weights and AdamW state, and the gradients
            "activations_peak": step_peak - steady - lora_bytes, "predicted_peak": step_peak,
            "generation_peak": generation_peak, "seconds": round(time.time() - started, 1)}


def vision_tokens(config):
    vision = config.vision_config
    return (vision.image_size // vision.patch_size) ** 2 + 1, vision.hidden_size


def count_step(model, batch, optimizer, lora, grad_clip, dtype, counter):
    """The peak of train.py's step: cached ViT outputs copied in, the grouped loss, backward, clipping, AdamW."""
    counter.reset_peak()
    images = batch["input_ids"].shape[0]
    embeds = torch.empty(images, *vision_tokens(model.config), dtype=dtype)  # (B, V, Dv), the cache's rows
    loss, count = grouped_caption_loss(model, batch, embeds)
    (loss / count).backward()
    torch.nn.utils.clip_grad_norm_(lora, grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return counter.peak


def count_generation(model, images, beams, new_tokens, dtype, counter):
    """The peak of beam search at its last step (generation itself cannot run on fake tensors: it stops on their
    values). The images' encoder states, repeated for each beam, the cross-attention keys and values of every decoder
    layer, the self-attention cache of new_tokens positions, and the scores over the vocabulary."""
    counter.reset_peak()
    model.eval()
    text, config = model.language_model, model.config
    ids = torch.full((images, config.num_query_tokens + 4), 1, dtype=torch.long)  # image tokens and a short prompt
    ids[:, :config.num_query_tokens] = config.image_token_id
    rows, heads, width = images * beams, text.config.num_heads, text.config.d_kv
    with torch.no_grad():
        encoded = encode_images(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                                torch.empty(images, *vision_tokens(config), dtype=dtype))
        encoded = encoded.repeat_interleave(beams, dim=0)                                   # (rows, L, D)
        own, cross = DynamicCache(), DynamicCache()
        for i in range(text.config.num_decoder_layers):
            own.update(torch.empty(rows, heads, new_tokens - 1, width, dtype=dtype),
                       torch.empty(rows, heads, new_tokens - 1, width, dtype=dtype), i)
            cross.update(torch.empty(rows, heads, ids.shape[1], width, dtype=dtype),
                         torch.empty(rows, heads, ids.shape[1], width, dtype=dtype), i)
        logits = text(encoder_outputs=(encoded,), decoder_input_ids=torch.zeros(rows, 1, dtype=torch.long),
                      cache=EncoderDecoderCache(own, cross)).logits                         # (rows, 1, vocab)
        torch.log_softmax(logits[:, -1].float(), dim=-1)
    return counter.peak
