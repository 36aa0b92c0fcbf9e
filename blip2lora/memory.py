"""
blip2lora/memory.py: the peak GPU memory of a training step, predicted on the CPU (bench.py --memory).

How much GPU memory does a training step of a BLIP-2 checkpoint take? Predicted on the CPU, allocating nothing:

    python bench.py --model full --memory --batch-images 8,16 --json
    python bench.py --model full --memory --batch-images 16 --gradient_checkpointing=True --base_bits=4
    python bench.py --arch opt-2.7b --model full --memory --data data/flickr8k     # the shape of your own captions

The model is built on the meta device (shapes, no data) and moved into FakeTensorMode, where every operation runs for
its output's shape and dtype only. train.py's step runs on it (train.train_step, handed in by bench.py: the grouped
loss on cached ViT outputs, backward, gradient clipping, AdamW whose state already exists, as from the second step on:
one uncounted step makes it) while a dispatch mode counts the
bytes of every tensor storage for as long as it lives, each storage once: a view (say the transpose of a weight that
autograd keeps for the backward pass) adds nothing, as on a GPU. The weights are registered first.

Not counted (add them): the CUDA context (0.3 to 0.5 GB), the caching allocator's rounding and fragmentation, cuBLAS
workspaces. The CPU's autocast rules stand in for CUDA's (both run matmuls in bf16). A 4- or 8-bit base is emulated
as bitsandbytes stores and computes it: NF4 holds half a byte a weight plus its double-quantized scales, int8 a byte a
weight plus a float32 scale a row, and the weight is dequantized into a temporary in the forward pass and again in
the backward pass (nothing of it is kept in between).

The same fake step is counted for FLOPs (torch.utils.flop_counter needs only shapes): full-size FLOPs per caption
without full-size compute.
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

from torch.utils.flop_counter import FlopCounterMode

from blip2lora.blip2 import is_instructblip
from blip2lora.model import (family, grouped_caption_loss, model_class, per_pair_caption_loss, prepare_for_training,
                             unquantized)


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
        self.bias = linear.bias  # 16-bit, as bitsandbytes keeps it (OPT's layers have one)

    def dequantized(self, dtype):
        return self.packed.new_empty((self.out_features, self.in_features), dtype=dtype)

    def forward(self, x):
        out = _DequantizedMatmul.apply(x, self)
        return out if self.bias is None else out + self.bias


def quantize_language_model(model, bits):
    """Swap the language model's Linear layers that bitsandbytes quantizes: all but model.unquantized's."""
    keep = unquantized(model.config)
    for name, module in list(model.named_modules()):
        kept = any(name == k or name.startswith(k + ".") or name.endswith(k) for k in keep)
        if isinstance(module, nn.Linear) and name.startswith("language_model.") and not kept:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, EmulatedQuantLinear(module, bits))


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


def train_ready(config, device, dtype, settings, levers=Levers(), released=True):
    """BLIP-2 built from a config on `device` and prepared as from_pretrained and train.py prepare it: dtypes (the
    Q-Former float32), a 4/8-bit base emulated, then model.prepare_for_training (prepare, LoRA with train.py's
    settings, gradient checkpointing, train mode for the adapters only). released: hold the weights as the released
    checkpoint does (t5.as_released: Flan-T5's own lm_head; the demo's tiny base has none). bench.py times this
    model."""
    with torch.device(device):
        model = model_class(config)(config)
        if released:
            family(config).as_released(model)
    if is_instructblip(model):  # an instruction of LAVIS's captioning one's length: [CLS] 5 words [SEP]
        model.instruction_ids = torch.arange(2, 9)[None]
    model.to(dtype)
    model.qformer.float()  # as from_pretrained does (_keep_in_fp32_modules)
    model.query_tokens.data = model.query_tokens.data.float()
    if levers.base_bits < 16:
        quantize_language_model(model, levers.base_bits)
    prepare_for_training(model, dtype, settings, levers.gradient_checkpointing)
    return model


def prepared_model(config, dtype, levers, settings, fake=True, released=True):
    """train_ready's model with fake weights (or real, uninitialised ones, to check the count on a small model); and
    the mode its tensors live in."""
    model = train_ready(config, "meta", dtype, settings, levers, released)
    mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else _RealTensors()
    with mode:
        model.to_empty(device="cpu")
        model.tie_weights()  # to_empty gives a shared embedding one tensor per module that uses it: one again
        if released:
            family(config).as_released(model)
    return model, mode


def weights_on_gpu(model, levers):
    """The parameter and buffer tensors the GPU holds: all but the ViT's once it has left (vision_on_gpu=False)."""
    vision = {id(t) for t in [*model.vision_model.parameters(), *model.vision_model.buffers()]}
    return [t for t in [*model.parameters(), *model.buffers()] if levers.vision_on_gpu or id(t) not in vision]


def predict(config, batch, dtype, levers, settings, step, eval_batch=32, num_beams=5, new_tokens=30, fake=True,
            model=None, released=True, flops=False):
    """Bytes on the GPU during one training step (and during beam-search generation), with their breakdown; and with
    flops=True the FLOPs of that step and of the usual per-pair step (on batch["pixel_values"]), in passes of their
    own. step: train.train_step (bench.py hands it in; the library imports no script). fake=False counts the same with
    real tensors (a small model only), or counts `model`, prepared elsewhere (say by bitsandbytes): the tests that
    the prediction is the count."""
    started = time.time()
    model, fake = (model, _RealTensors()) if model is not None else prepared_model(config, dtype, levers, settings,
                                                                                   fake, released)
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
        optimizer = torch.optim.AdamW(lora, lr=settings["learning_rate"], weight_decay=settings["weight_decay"])
        take_step = StepOf(model, step, optimizer, autocast, settings["grad_clip"], dtype)
        counted_flops = {f"{kind}_flops": count_flops(take_step, {k: fake.from_tensor(v) for k, v in batch.items()},
                                                      kind) for kind in (("step", "per_pair") if flops else ())}
        step_batch = {k: fake.from_tensor(v) for k, v in batch.items() if k != "pixel_values"}  # the cache has them
        if not optimizer.state:  # AdamW's state exists from the first step on: one uncounted step makes it
            take_step(step_batch)
        with counter:
            for tensor in (t for state in optimizer.state.values() for t in state.values()):
                counter.track(tensor)
            steady = counter.live
            counter.reset_peak()
            take_step(step_batch)
            step_peak = counter.peak
            with autocast:
                generation_peak = count_generation(model, eval_batch, num_beams, new_tokens, dtype, counter)
    return {"frozen_weights": frozen, "language_model_weights": text,
            "lora_weights_grads_adamw": steady - frozen + lora_bytes,  # weights and AdamW state, and the gradients
            "activations_peak": step_peak - steady - lora_bytes, "predicted_peak": step_peak,
            "generation_peak": generation_peak, **counted_flops, "seconds": round(time.time() - started, 1)}


def vision_tokens(config):
    vision = config.vision_config
    return (vision.image_size // vision.patch_size) ** 2 + 1, vision.hidden_size


class StepOf:
    """train.py's step (train.train_step) on one micro-batch, as train.py takes it: "step" is its own (the grouped
    loss on cached ViT outputs, (B, V, Dv) rows as the cache holds them), "per_pair" the usual one (the ViT and
    everything else once per caption, from batch["pixel_values"]). float16's GradScaler keeps no tensors worth
    counting: off."""

    def __init__(self, model, step, optimizer, autocast, grad_clip, dtype):
        self.model, self.step, self.optimizer, self.autocast = model, step, optimizer, autocast
        self.grad_clip, self.dtype, self.scaler = grad_clip, dtype, torch.amp.GradScaler("cpu", enabled=False)

    def __call__(self, batch, kind="step"):
        if kind == "per_pair":
            loss, image_embeds = (lambda model, b, _: per_pair_caption_loss(model, b)), (lambda b: None)
        else:
            rows = torch.empty(batch["input_ids"].shape[0], *vision_tokens(self.model.config), dtype=self.dtype)
            loss, image_embeds = grouped_caption_loss, (lambda b: rows)
        self.step(self.model, [batch], loss, image_embeds, self.optimizer, self.scaler, self.autocast, self.grad_clip)


def count_flops(take_step, batch, kind):
    """The FLOPs of one step of `kind` (matmuls and attention, as bench.py counts them; AdamW and clipping have none
    that count). In a pass of its own: FlopCounterMode runs the CPU's attention kernel as its decomposition, which
    keeps other tensors than the step does (torch 2.13), so it must not run inside the memory count."""
    with FlopCounterMode(display=False) as flops:
        take_step(batch, kind)
    return flops.get_total_flops()


def count_generation(model, images, beams, new_tokens, dtype, counter):
    """The peak of generation.py's beam search at its last step, for `images` images with a prompt of 4 tokens
    after the image tokens: the family's start (the image side once per image, the decoder's own keys and values
    allocated for every new token), the beams reordered (each layer's cache copied by index), and the last decode
    step with its scores over the vocabulary. (Generation cannot run on fake tensors as a whole: it stops on their
    values.)"""
    counter.reset_peak()
    model.eval()
    config, lm = model.config, family(model.config)
    ids = torch.full((images, config.num_query_tokens + 4), 1, dtype=torch.long)  # image tokens and a short prompt
    ids[:, :config.num_query_tokens] = config.image_token_id
    with torch.no_grad():
        embeds = torch.empty(images, *vision_tokens(config), dtype=dtype)
        state, logits = lm.start_generation(model, ids, embeds, beams, new_tokens)
        state.reorder(torch.arange(images * beams))
        del logits
        logits = lm.decode_step(model, state, torch.ones(images * beams, dtype=torch.long), new_tokens - 1)
        torch.log_softmax(logits.float(), -1)
    return counter.peak
