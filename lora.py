"""
LoRA (Low-Rank Adaptation, Hu et al. 2021, arXiv:2106.09685), written by hand: the layer, how it is put into a
model, its tensors, and how it is folded back into the weights. Nothing here knows BLIP-2 (model.lora_targets says
where LoRA goes in it) or files (adapter_files.py saves and loads adapters in peft's layout).

Fine-tuning a 3.9B-parameter model normally means an optimizer state for every weight. LoRA freezes every
pretrained weight W and learns a low-rank *change* to a few of them instead:

         x (in_features)
         |
    +----+--------------------+
    |                         |
    |                  +--------------+
 +-----+               |  A  (r, in)  |   A: random init (kaiming uniform)
 |  W  | frozen        +--------------+
 |     | (out, in)            | (r)         r << in, out: the "rank"
 +-----+               +--------------+
    |                  |  B  (out, r) |   B: zeros, so at step 0 the model is exactly the base model
    |                  +--------------+
    |                         | * alpha / r
    +---------- + ------------+
                |
         y = W x + (alpha / r) * B A x

Why it works (paper, sections 4.1 and 7): the update a fine-tune makes to a weight has low "intrinsic rank", so a rank-r
product B @ A captures most of it. Each wrapped (out, in) layer trains r * (in + out) numbers instead of in * out:
for T5-XL's 2048 x 2048 attention projections at r = 8 that is 32,768 instead of 4,194,304 (0.8%).

Why A random and B zero: B = 0 makes the wrapped model start as exactly the base model; A must not also be zero,
since dL/dB is proportional to (dL/dy)(A x)^T and dL/dA to B^T (dL/dy) x^T: with both zero, neither would ever
move. With A random, B moves at the first step, and A from the second.
`alpha` (section 4.1) scales the product by alpha / r, which reduces how much the learning rate must be retuned when
r changes, without removing it: the update's size still grows with r (rsLoRA, Kalajdzievski 2023, argues for
alpha / sqrt(r) instead). The code works on rows, as PyTorch does: a batch x of shape (..., in) gives
x @ W.T + (alpha / r) * x @ A.T @ B.T, the same thing as the picture's column-vector W x + (alpha / r) B A x.

After training, B @ A can be folded into W (`merge_lora`): the deployed model is a plain model with no extra cost.

With a 4-bit or 8-bit base (QLoRA, Dettmers et al. 2023: model.load_blip2(base_bits=4)) nothing here changes: W is
then a bitsandbytes layer that dequantizes in its own forward, `base(x)` is all this file asks of it, and A and B stay
float32. The adapter saved from such a run is the same file and loads on the 16-bit base.

Public API: LoRALinear, inject_lora, lora_layers, lora_state_dict, merge_lora, lora_summary; the tensors are named
as peft names them, so adapter_files.save_adapter writes what peft.PeftModel.from_pretrained loads.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

MAX_RANK = 1024  # wider than most layers it would wrap: a larger r is a typo (and would not fit in memory)


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update: y = base(x) + dropout(x) @ A.T @ B.T * (alpha / r)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if not (0 < r <= MAX_RANK) or not (0 < alpha < math.inf):
            raise ValueError(f"LoRA needs 0 < r <= {MAX_RANK} and a finite alpha > 0, got r={r}, alpha={alpha}")
        self.base = base
        self.base.requires_grad_(False)
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # The adapter is kept in float32 even when the base weight is bf16/fp16: its updates are tiny relative to
        # the weights, and in 16-bit arithmetic many of them would round away.
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=device, dtype=torch.float32))
        # Same init as nn.Linear's weight (and loralib/peft): A random, B zero, so B @ A = 0 at the start
        # (and B gets a gradient through A x from the first step; see the top of this file).
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    # Look like the layer we wrap: transformers' T5 code reads e.g. `self.wo.weight.dtype` directly.
    weight = property(lambda self: self.base.weight)
    bias = property(lambda self: self.base.bias)
    in_features = property(lambda self: self.base.in_features)
    out_features = property(lambda self: self.base.out_features)

    def forward(self, x):  # x: (..., in_features) -> (..., out_features)
        result = self.base(x)                                           # (..., out)
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.lora_A.dtype)  # e.g. a bf16 base run without autocast: the adapter computes in float32
        # Under autocast (bf16 on GPUs) both matmuls run in bf16 like the base's: A and B are float32 *master*
        # weights, cast for the matmul, while the optimizer accumulates their updates in float32.
        update = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)  # (..., r) -> (..., out)
        return result.add(update.to(result.dtype), alpha=self.scaling)  # result + (alpha / r) * update, one kernel

    def extra_repr(self):
        return f"LoRA r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}"


def _matches(path, targets):
    # Exact path, or a suffix on a dot boundary: "SelfAttention.q" matches "...layer.0.SelfAttention.q",
    # and "q" would not match "...xq". This is also the rule peft applies to a list of target names.
    return any(path == t or path.endswith("." + t) for t in targets)


def lora_layers(model):
    """(path, LoRALinear) for every adapter in the model, in module order."""
    return [(path, m) for path, m in model.named_modules() if isinstance(m, LoRALinear)]


def inject_lora(model, targets, r=8, alpha=16, dropout=0.0):
    """Wrap every nn.Linear whose path matches a target (a module-path suffix: BLIP-2's are model.lora_targets), freeze
    everything else, and return the wrapped paths."""
    if lora_layers(model):
        raise ValueError("the model already has LoRA layers: inject once (or merge_lora first)")
    targets = [targets] if isinstance(targets, str) else list(targets)
    paths = [p for p, m in model.named_modules() if isinstance(m, nn.Linear) and _matches(p, targets)]
    for t in targets:
        if not any(_matches(p, [t]) for p in paths):
            raise ValueError(f"LoRA target {t!r} matches no nn.Linear in {type(model).__name__}")
    model.requires_grad_(False)
    for path in paths:
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        setattr(parent, child, LoRALinear(getattr(parent, child), r, alpha, dropout))
    return paths


def lora_state_dict(model):
    """The adapter tensors, keyed as peft names them: base_model.model.<path>.lora_A.weight, (r, in) / (out, r)."""
    tensors = {}
    for path, layer in lora_layers(model):
        tensors[f"base_model.model.{path}.lora_A.weight"] = layer.lora_A.detach()
        tensors[f"base_model.model.{path}.lora_B.weight"] = layer.lora_B.detach()
    return tensors


@torch.no_grad()
def merge_lora(model):
    """Fold every adapter into its weight (W' = W + (alpha/r) * B @ A) and put the plain nn.Linear back.

    There is no unmerge: the LoRA tensors are gone afterwards (save the adapter first if you need it). W + dBA is
    computed in float32 and rounded once to the weight's dtype; in bf16 that rounding (8 bits of mantissa) can
    swallow much of a small update, so a merged bf16 model captions close to, not exactly like, base + adapter.
    All layers are computed and checked first: if any would get a non-finite weight, none is changed."""
    def merged(layer):
        delta = (layer.lora_B @ layer.lora_A) * layer.scaling                # (out, r) @ (r, in) -> (out, in)
        return layer.base.weight.to(torch.float32) + delta                   # in float32, then cast once

    layers = lora_layers(model)
    for path, layer in layers:  # a first pass only checks (keeping every merged weight would double the memory)
        if not isinstance(layer.base, nn.Linear) or type(layer.base).__module__.startswith("bitsandbytes"):
            raise ValueError(f"{path} is a quantized layer: merge into the 16-bit base (load it with base_bits=16; "
                             "the adapter is the same file)")
        if not torch.isfinite(merged(layer)).all():
            raise ValueError(f"merging the adapter into {path} gives non-finite weights; nothing was changed")
    for path, layer in layers:
        layer.base.weight.copy_(merged(layer).to(layer.base.weight.dtype))
        parent_path, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent_path), child, layer.base)
    return model


def lora_summary(model):
    """One line for logs: how many parameters train, out of how many."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return (f"LoRA: {len(lora_layers(model))} layers, {trainable:,} trainable of {total:,} parameters "
            f"({100 * trainable / max(total, 1):.3f}%)")

