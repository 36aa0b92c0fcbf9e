r"""
blip2lora/opt.py: the OPT family: everything OPT-specific.

BLIP-2 with OPT (Salesforce/blip2-opt-2.7b, blip2-opt-6.7b and their -coco versions): every OPT-specific name of
this project is in this file. model.py picks it for a model whose text_config.model_type is "opt"; t5.py is the
other family, with the same public functions (model.FAMILY_CONTRACT).

OPT is decoder-only: the image features, the prompt and the caption are one sequence, and each position predicts
the next token. As LAVIS trains it, a caption starts with a space and ends with "\n", OPT-BLIP-2's end token:
    [Q image features][</s> a photo of][ a dog runs\n]        </s> is OPT's BOS; "\n" is text_config.eos_token_id
     \________ the prefix: L ________/ \_ caption: T _/
The prefix is the same for all of an image's captions, so grouped_caption_loss runs it once per image.

Checked against transformers 5.24; where its behaviour matters here, a comment says so.
"""
import functools

import torch
from transformers import OPTConfig

from blip2lora import decoder_only
from blip2lora.blip2 import checkpointed

# LoRA on the attention of every decoder layer: language_model.model.decoder.layers.N.self_attn.q_proj, ...
LORA_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj")
KEEP_UNQUANTIZED = ()  # a 4/8-bit base leaves only BLIP-2's own parts 16-bit (model.quantization_config)

# The language models of the released checkpoints, as their config.json files give them, and two stand-ins for the
# CPU (bench.py, memory.py, demo.py): the same architecture, smaller.
SIZES = {"opt-2.7b": dict(hidden_size=2560, num_hidden_layers=32, ffn_dim=10240, num_attention_heads=32),
         "opt-6.7b": dict(hidden_size=4096, num_hidden_layers=32, ffn_dim=16384, num_attention_heads=32),
         "small": dict(hidden_size=640, num_hidden_layers=8, ffn_dim=2560, num_attention_heads=10),
         "tiny": dict(hidden_size=128, num_hidden_layers=2, ffn_dim=256, num_attention_heads=4,
                      max_position_embeddings=128, dropout=0.0)}
# BLIP-2's OPT vocabulary is 50304 (OPT's own is 50272), <image> is 50265, and its end token is 50118, "\n".
VOCAB_SIZE, IMAGE_TOKEN_ID, _NEWLINE_ID = 50304, 50265, 50118
# How OPT's tokenizer lays out its special tokens, for a word-level tokenizer in its image (demo.build_processor): the
# first ids in this order (pad 1, </s> 2), </s> as the BOS before each text, and a caption ending in "\n".
SPECIAL_TOKENS = {"first_ids": ("<s>", "<pad>", "</s>", "<unk>", "\n"), "template": "</s> $A", "bos": "</s>",
                  "caption_end": "\n"}


def text_config(size, **changes):
    r"""An OPTConfig for one of SIZES: pre-LayerNorm layers, ReLU, lm_head tied to the embeddings, pad 1, BOS 2 (</s>),
    and "\n" as the end of a caption."""
    width = SIZES[size]["hidden_size"]
    return OPTConfig(**{"vocab_size": VOCAB_SIZE, "max_position_embeddings": 2048, **SIZES[size],
                        "word_embed_proj_dim": width, "pad_token_id": 1, "bos_token_id": 2,
                        "eos_token_id": _NEWLINE_ID, **changes})


def caption_ids(tokenizer, captions, eos_token_id):
    r"""Each caption as OPT learns it: a leading space (it follows the prompt's last word), its tokens with no BOS of
    their own, then the end token "\n". (data.CaptionCollator cuts and pads them.)"""
    spaced = [" " + caption for caption in captions]
    return [ids + [eos_token_id] for ids in tokenizer(spaced, add_special_tokens=False).input_ids]


# ------------------------------------------------------------------------------------------------- the loss

def per_pair_caption_loss(model, batch):
    """The plain way: one whole forward per (image, caption) pair over [prefix][caption], as transformers runs it
    (decoder_only.per_pair_caption_loss). Returns (summed loss, caption tokens)."""
    return decoder_only.per_pair_caption_loss(model, batch)


def grouped_caption_loss(model, batch, image_embeds):
    """per_pair_caption_loss with the prefix run once per image instead of once per caption, each caption attending
    to its image's keys and values (decoder_only.grouped_caption_loss, with OPT's layers): at blip2-opt-2.7b's size,
    with 5 captions of 16 tokens, 2.26 times fewer FLOPs per caption. Returns (summed loss, caption tokens)."""
    return decoder_only.grouped_caption_loss(model, batch, image_embeds, _layers(model))


def _layers(model):
    """decoder_only's `layers` for this model: OPT's decoder stack (_decoder_layers)."""
    return functools.partial(_decoder_layers, model.language_model.model.decoder)


def _decoder_layers(decoder, embeds, kept_from, attends, cache):
    """OPT's decoder over token embeddings (rows, T, D) at positions kept_from.. kept_from + T - 1, each layer
    attending as `attends` (T, keys) says (True: may attend) to the keys and values the cache hands it. OPT's learned
    positions count from 0 whether the prefix came in the same call or not (its embedding adds its offset of 2)."""
    positions = torch.arange(kept_from, kept_from + embeds.shape[1], device=embeds.device)[None]  # (1, T)
    hidden = embeds + decoder.embed_positions(None, position_ids=positions).to(embeds.dtype)
    for layer in decoder.layers:
        # a boolean mask goes to scaled_dot_product_attention as it is (model.load_blip2 asks for sdpa attention)
        hidden = layer(hidden, attention_mask=attends[None, None], cache=cache, position_ids=positions)
    return decoder.final_layer_norm(hidden)


# ------------------------------------------------------------------------------------------------- precision, memory

def prepare(model, compute_dtype):
    """Nothing to change: OPT was trained in float16, and its activations fit float16 and bfloat16 alike. Returns
    what a user should know of it: nothing."""
    return ""


def use_gradient_checkpointing(model):
    """OPT's decoder layers keep only their inputs in the forward pass and recompute the rest in the backward pass.
    transformers' own checkpointing (model.gradient_checkpointing_enable) does nothing in eval mode, where the frozen
    base runs here, and drops the cache that the prefix-shared loss needs (transformers 5.24, modeling_layers.py)."""
    for layer in model.language_model.model.decoder.layers:
        layer.forward = checkpointed(layer.forward)  # the module itself stays: adapter paths do not change


def as_released(model):
    """A model built from a config holds its weights as the released checkpoints do: lm_head tied to the embeddings."""


def prepare_export(model):
    """Nothing to change: a merged model's generate() without a prompt starts with OPT's BOS, as it should."""


# ------------------------------------------------------------------------------------------------- generation

def start_generation(model, input_ids, image_embeds, beams, max_new_tokens):
    """generation.py's start: the prefix once per image, its keys and values read by all the image's beams
    (decoder_only.start_generation, with OPT's layers). Returns (state, the first new token's logits (R, vocab))."""
    return decoder_only.start_generation(model, input_ids, image_embeds, beams, max_new_tokens, _layers(model))


def decode_step(model, state, tokens, n):
    """The decoder on the n-th new token of each row, tokens (R,), at position L + n - 1 after the prefix: each layer
    attends to the row's image prefix and its own cache (written at n - 1). Returns the next token's logits
    (R, vocab)."""
    decoder = model.language_model.model.decoder
    index = torch.as_tensor(n - 1, device=tokens.device).view(1)
    positions = (index + state.extra["prefix_length"])[None]                           # (1, 1)
    places = decoder_only.cache_places(state, index)                                    # the same in every layer
    hidden = decoder.embed_tokens(tokens)[:, None]                                      # (R, 1, D)
    hidden = hidden + decoder.embed_positions(None, position_ids=positions).to(hidden.dtype)
    for i, layer in enumerate(decoder.layers):
        hidden = _decode_layer(layer, state, i, hidden, places)
    if decoder.final_layer_norm is not None:
        hidden = decoder.final_layer_norm(hidden)
    return model.language_model.lm_head(hidden)[:, 0]


def _decode_layer(layer, state, i, hidden, places):
    """One OPT decoder layer (OPTDecoderLayer's order: attention, then the feed-forward, each with its residual; the
    layer norms before or after them as the config says) on one token per row."""
    before = layer.do_layer_norm_before
    x = layer.self_attn_layer_norm(hidden) if before else hidden
    hidden = hidden + _attention(layer.self_attn, state, i, x, places)
    if not before:
        hidden = layer.self_attn_layer_norm(hidden)
    x = layer.final_layer_norm(hidden) if before else hidden
    hidden = hidden + layer.fc2(layer.activation_fn(layer.fc1(x)))
    return hidden if before else layer.final_layer_norm(hidden)


def _attention(attention, state, i, x, places):
    """One new token per row (x: (R, 1, D)) attends to its image's prefix and to its own keys so far, its new key and
    value written first at `places` (decoder_only.attention)."""
    def split(projected):                                                               # (R, 1, D) -> (R, H, 1, d)
        return projected.view(x.shape[0], 1, attention.num_heads, -1).transpose(1, 2)
    query = split(attention.q_proj(x) * attention.scaling)
    out = decoder_only.attention(state, i, query, split(attention.k_proj(x)), split(attention.v_proj(x)), places)
    return attention.out_proj(out.transpose(1, 2).flatten(2))                           # (R, 1, D)


def new_tokens(output, input_ids):
    """What model.generate(pixel_values=..., input_ids=...) wrote, without the prompt's ids it begins with."""
    return output[:, input_ids.shape[1]:]
