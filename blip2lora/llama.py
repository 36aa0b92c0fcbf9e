r"""
blip2lora/llama.py: the LLaMA family: everything LLaMA-specific (InstructBLIP's Vicuna checkpoints).

Salesforce/instructblip-vicuna-7b and -13b have a LLaMA language model (Vicuna): every LLaMA-specific name of this
project is in this file. model.py picks it for a model whose text_config.model_type is "llama"; t5.py and opt.py
are the other families, with the same public functions (model.FAMILY_CONTRACT).

LLaMA is decoder-only, as OPT: the image features, the prompt and the caption are one sequence, and each position
predicts the next token; the caption ends with text_config.eos_token_id:
    [Q image features][<s> A short image description:][ a dog runs</s>]
     \______________ the prefix: L ______________/      \_ caption: T _/
What differs from OPT: positions are rotations of the queries and keys (RoPE), applied inside each layer from the
positions it is given, so the caption pass continues the prefix's positions by passing them; RMSNorm; a SiLU-gated
feed-forward; attention projections q/k/v/o_proj; lm_head of its own.

Checked against transformers 5.24; where its behaviour matters here, a comment says so.
"""
import functools

import torch
from transformers import LlamaConfig

from blip2lora import decoder_only
from blip2lora.blip2 import checkpointed

# LoRA on the attention of every decoder layer: language_model.model.layers.N.self_attn.q_proj, ...
LORA_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
KEEP_UNQUANTIZED = ()  # a 4/8-bit base leaves only BLIP-2's own parts 16-bit (model.quantization_config)

# The language models of the released checkpoints, as their config.json files give them, and two stand-ins for the
# CPU (bench.py, memory.py, demo.py): the same architecture, smaller.
SIZES = {"vicuna-7b": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=11008, num_attention_heads=32),
         "vicuna-13b": dict(hidden_size=5120, num_hidden_layers=40, intermediate_size=13824, num_attention_heads=40),
         "small": dict(hidden_size=640, num_hidden_layers=8, intermediate_size=1728, num_attention_heads=10),
         "tiny": dict(hidden_size=128, num_hidden_layers=2, intermediate_size=256, num_attention_heads=4,
                      max_position_embeddings=128)}
# InstructBLIP-Vicuna's vocabulary as transformers 4.47 re-saved it: LLaMA's 32,000, [PAD] 32000, <image> 32001,
# <video> 32002, padded to 32,064.
VOCAB_SIZE, IMAGE_TOKEN_ID = 32064, 32001
# How LLaMA's tokenizer lays out its special tokens, for a word-level tokenizer in its image (demo.build_processor):
# <unk> 0, <s> 1 (the BOS before each text), </s> 2 (the end of a caption), then a pad.
SPECIAL_TOKENS = {"first_ids": ("<unk>", "<s>", "</s>", "<pad>"), "template": "<s> $A", "bos": "<s>",
                  "caption_end": "</s>"}


def text_config(size, **changes):
    """A LlamaConfig for one of SIZES: RMSNorm (eps 1e-6), SiLU, RoPE (theta 10,000), as many key/value heads as
    heads, no biases, lm_head of its own."""
    return LlamaConfig(**{"vocab_size": VOCAB_SIZE, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
                          "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3,
                          **SIZES[size], **changes})


def caption_ids(tokenizer, captions, eos_token_id):
    """Each caption as LLaMA learns it: its tokens with no BOS of their own, then the end token. (data.CaptionCollator
    cuts and pads them.)"""
    return [ids + [eos_token_id] for ids in tokenizer(captions, add_special_tokens=False).input_ids]


# ------------------------------------------------------------------------------------------------- the loss

def per_pair_caption_loss(model, batch):
    """The plain way: one whole forward per (image, caption) pair over [prefix][caption], as transformers runs it
    (decoder_only.per_pair_caption_loss). Returns (summed loss, caption tokens)."""
    return decoder_only.per_pair_caption_loss(model, batch)


def grouped_caption_loss(model, batch, image_embeds):
    """per_pair_caption_loss with the prefix run once per image instead of once per caption, each caption attending
    to its image's keys and values (decoder_only.grouped_caption_loss): the prefix at positions 0..P-1, its keys
    kept already rotated for them; the caption pass at P..P+T-1. Returns (summed loss, caption tokens)."""
    return decoder_only.grouped_caption_loss(model, batch, image_embeds, functools.partial(_layers, _text(model)))


def _text(model):
    """The LLaMA stack (LlamaModel: embeddings, layers, rotary embedding, final norm), without lm_head."""
    return model.language_model.model


def _layers(text, embeds, kept_from, attends, cache):
    """LLaMA's layers over embeddings (rows, T, D) at positions kept_from.. kept_from + T - 1: the rotation of those
    positions (cos, sin) goes to every layer, each attending as `attends` (T, keys) says (True: may attend) to the
    keys and values the cache hands it; then the final RMSNorm."""
    positions = torch.arange(kept_from, kept_from + embeds.shape[1], device=embeds.device)[None]  # (1, T)
    rotation = text.rotary_emb(embeds, position_ids=positions)                              # (1, T, d) twice
    hidden = embeds
    for layer in text.layers:
        hidden = layer(hidden, attention_mask=attends[None, None], position_ids=positions,
                       position_embeddings=rotation, cache=cache)
    return text.norm(hidden)


# ------------------------------------------------------------------------------------------------- precision, memory

def prepare(model, compute_dtype):
    """Nothing to change: Vicuna was trained in float16, and its activations fit float16 and bfloat16 alike. Returns
    what a user should know of it: nothing."""
    return ""


def use_gradient_checkpointing(model):
    """LLaMA's layers keep only their inputs in the forward pass and recompute the rest in the backward pass (as
    opt.use_gradient_checkpointing, and for the same reasons)."""
    for layer in _text(model).layers:
        layer.forward = checkpointed(layer.forward)  # the module itself stays: adapter paths do not change


def as_released(model):
    """A model built from a config holds its weights as the released checkpoints do: lm_head of its own."""


def prepare_export(model):
    """Nothing to change: a merged model's generate() without a prompt starts with LLaMA's BOS, as it should."""


# ------------------------------------------------------------------------------------------------- generation

def start_generation(model, input_ids, image_embeds, beams, max_new_tokens):
    """generation.py's start: the prefix once per image, its keys and values read by all the image's beams
    (decoder_only.start_generation). Returns (state, the first new token's logits (R, vocab))."""
    return decoder_only.start_generation(model, input_ids, image_embeds, beams, max_new_tokens,
                                         functools.partial(_layers, _text(model)))


def decode_step(model, state, tokens, n):
    """The layers on the n-th new token of each row, tokens (R,), at position L + n - 1 after the prefix: each layer
    attends to the row's image prefix and its own cache (written at n - 1). Returns the next token's logits
    (R, vocab)."""
    text = _text(model)
    index = torch.as_tensor(n - 1, device=tokens.device).view(1)
    positions = (index + state.extra["prefix_length"])[None]                           # (1, 1)
    places = decoder_only.cache_places(state, index)                                    # the same in every layer
    hidden = text.embed_tokens(tokens)[:, None]                                         # (R, 1, D)
    cos, sin = text.rotary_emb(hidden, position_ids=positions)                          # (1, 1, d)
    for i, layer in enumerate(text.layers):
        x = layer.input_layernorm(hidden)
        hidden = hidden + _attention(layer.self_attn, state, i, x, places, cos[:, None], sin[:, None])
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    return model.language_model.lm_head(text.norm(hidden))[:, 0]


def _attention(attention, state, i, x, places, cos, sin):
    """One new token per row (x: (R, 1, D)): its query and key rotated for its position (cos, sin: (1, 1, 1, d)),
    then attention to its image's prefix and its own cache (decoder_only.attention)."""
    def split(projected):                                                               # (R, 1, D) -> (R, H, 1, d)
        return projected.view(x.shape[0], 1, -1, attention.head_dim).transpose(1, 2)
    query, key = (_rotate(split(project(x)), cos, sin) for project in (attention.q_proj, attention.k_proj))
    out = decoder_only.attention(state, i, query * attention.scaling, key, split(attention.v_proj(x)), places)
    return attention.o_proj(out.transpose(1, 2).flatten(2))                             # (R, 1, D)


def _rotate(x, cos, sin):
    """RoPE as LLaMA applies it (transformers' rotate_half layout): x * cos + rotate_half(x) * sin."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-second, first], dim=-1) * sin


def new_tokens(output, input_ids):
    """What model.generate(pixel_values=..., input_ids=...) wrote, without the prompt's ids it begins with."""
    return output[:, input_ids.shape[1]:]
