"""
blip2lora/blip2.py: what every BLIP-2 shares, whichever language model it has (step 3 of the README's reading path).

t5.py, opt.py and llama.py hold what differs between the families; model.py picks one from the model's config.

BLIP-2 (Li et al. 2023) captions an image in four stages:
    pixels (B, 3, 224, 224) --ViT-g--> vision_embeds (B, 257, 1408)             frozen, no LoRA: cacheable
          --Q-Former: 32 learned queries cross-attend the image--> (B, 32, 768)
          --language_projection--> image features (B, 32, D), written over the 32 image tokens of the prompt
          --the language model (Flan-T5 or OPT, width D)--> the caption's logits
The first three stages are the same for both families and depend only on the image, so a batch of B images with
all their N captions runs them once per image (B rows), not once per caption (N rows).
"""
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lora import lora_layers

# LoRA on the Q-Former's self-attention (qformer.encoder.layer.N.attention.attention.query) and its cross-attention to
# the image (...crossattention.attention.query), as "attention.query" matches both. The language model's targets
# are its family's (t5.LORA_TARGETS, opt.LORA_TARGETS). Nothing is inside the ViT, so its outputs never change
# during training and can be computed once (vision_cache.py).
QFORMER_TARGETS = ("attention.query", "attention.key", "attention.value")


def vision_embeds(model, pixel_values):
    """(B, 3, H, W) -> (B, V, Dv): the ViT's last hidden state. V = 257 and Dv = 1408 for the released checkpoints."""
    weight = model.vision_model.embeddings.patch_embedding.weight
    return model.vision_model(pixel_values=pixel_values.to(weight.device, weight.dtype)).last_hidden_state


def image_features(model, image_embeds):
    """(B, V, Dv) -> (B, Q, D): the Q-Former's queries read the image, then are projected to the language model's
    width D. InstructBLIP's Q-Former also reads the instruction (set_instruction): its tokens follow the queries in
    the Q-Former's self-attention, and only the queries' outputs go on."""
    queries = model.query_tokens.expand(image_embeds.shape[0], -1, -1)                  # (B, Q, Dq)
    mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
    instruction = {}
    if is_instructblip(model):  # the instruction's tokens (B, Li) after the queries, all attended to
        ids = model_inputs(model, image_embeds.shape[0])["qformer_input_ids"]
        instruction = {"input_ids": ids, "attention_mask": torch.ones(ids.shape[0], queries.shape[1] + ids.shape[1],
                                                                      dtype=torch.long, device=ids.device)}
    query_output = model.qformer(query_embeds=queries, encoder_hidden_states=image_embeds, encoder_attention_mask=mask,
                                 **instruction).last_hidden_state[:, :queries.shape[1]]  # (B, Q, Dq), fp32
    return model.language_projection(query_output.to(image_embeds.dtype))               # (B, Q, D)


def embed_prompt(model, input_ids, features):
    """Embed the prompt ids (B, L) and write the image features (B, Q, D) over the image-token positions -> (B, L, D).
    Each row of input_ids must hold exactly Q image tokens, or the image is silently left out (BLIP-2 raises no error
    for none): data.prompt_ids makes and checks the prompt once, outside the step, so that this stays one graph for
    torch.compile."""
    embeds = model.get_input_embeddings()(input_ids)
    image_positions = (input_ids == model.config.image_token_id).unsqueeze(-1)          # (B, L, 1)
    return embeds.masked_scatter(image_positions, features.to(embeds.dtype))


def caption_loss_sum(logits, labels):
    """Summed token cross-entropy of logits (N, T, vocab) against labels (N, T) (padding -100 ignored) and the token
    count: the caller divides, so micro-batches and captions of different lengths are weighted by their tokens.
    16-bit logits are summed in float32, float64 ones (the tests' exactness checks) in float64."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
    return loss, (labels != -100).sum()


def train_mode(model):
    """Only the adapters train: their dropout is on; the frozen base runs in eval mode, since its own dropout would
    only add noise to features it cannot adapt (and would make runs depend on how batches are split)."""
    model.eval()
    for _, layer in lora_layers(model):
        layer.train()


def autocast_dtype(device):
    """bf16 where the GPU supports it; float16 on GPUs without bf16 (T4, V100), with a GradScaler (and, for T5, its
    `wo` layers in float32: t5.prepare); float32 on the CPU."""
    if str(device).startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def autocast_context(device, dtype):
    """One code path for every precision: matmuls in `dtype` on that device, or plain float32 (a no-op context)."""
    return torch.autocast(str(device).split(":")[0], dtype=dtype, enabled=dtype != torch.float32)


def cast_frozen_qformer(model, dtype):
    """from_pretrained keeps the Q-Former in float32 (_keep_in_fp32_modules). Under bf16 autocast every Linear weight
    of it, all frozen, is then cast to bf16 again on every call (autocast caches only the casts of weights that
    require grad). Casting them once gives the matmuls bit-identical inputs with fewer operations per step;
    LayerNorms, the query tokens and the LoRA tensors (lora.py's A and B, beside the Linear they wrap, injected
    before or after this) stay float32."""
    if dtype != torch.bfloat16:
        return
    for module in model.qformer.modules():
        if isinstance(module, torch.nn.Linear):
            module.to(dtype)


def move_vision(model, device):
    """Put the ViT on `device`: off the GPU (2 GB in bf16) while the vision cache serves every image, back to it
    when new images must be seen."""
    model.vision_model.to(device)


def checkpointed(forward):
    """A layer's forward that keeps only its inputs for the backward pass and recomputes the rest there (gradient
    checkpointing). The recomputation restores the random state first, so LoRA dropout draws the same masks: the
    same loss and gradients, tested for both families."""
    def run(*args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return run


# ------------------------------------------------------------------ InstructBLIP: the Q-Former reads the instruction

def is_instructblip(model_or_config):
    config = getattr(model_or_config, "config", model_or_config)
    return config.model_type == "instructblip"


def set_instruction(model, processor, prompt):
    """InstructBLIP: its Q-Former reads the prompt too, in its own vocabulary (processor.qformer_tokenizer, BERT's:
    [CLS] ... [SEP]), the same for every image of a run; image_features and model_inputs read it. A no-op for
    BLIP-2."""
    if is_instructblip(model):
        model.instruction_ids = torch.tensor([processor.qformer_tokenizer(prompt).input_ids])  # (1, Li)


def model_inputs(model, rows):
    """What a forward or generate() of the whole model takes besides pixels and prompt: InstructBLIP's
    qformer_input_ids (rows, Li); nothing for BLIP-2."""
    if not is_instructblip(model):
        return {}
    ids = getattr(model, "instruction_ids", None)
    if ids is None:
        raise RuntimeError("InstructBLIP without an instruction: call blip2.set_instruction first")
    device = model.query_tokens.device
    return {"qformer_input_ids": ids.to(device).expand(rows, -1)}
