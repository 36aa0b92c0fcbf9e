"""
blip2lora/t5.py: the Flan-T5 family: everything T5-specific.

BLIP-2 with Flan-T5 (Salesforce/blip2-flan-t5-xl, blip2-flan-t5-xxl): every T5-specific name of this project is in
this file. model.py picks it for a model whose text_config.model_type is "t5"; opt.py is the other family, with the
same public functions (model.FAMILY_CONTRACT).

T5 is an encoder-decoder. The image features and the prompt are the encoder's input; the caption is the decoder's:
    encoder:  [Q image features][a photo of </s>]            (B, L)  once per image: it does not see the caption
    decoder:  <pad> a dog runs      ->   a dog runs </s>     (N, T)  once per caption, teacher-forced
where <pad> is T5's decoder start token and -> marks what each position predicts.
"""
import torch
import torch.nn.functional as F
from transformers import T5Config
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

from blip2lora.blip2 import caption_loss_sum, checkpointed, embed_prompt, image_features, model_inputs
from blip2lora.generation import DecodeState

# LoRA on T5's attention: "SelfAttention.q" matches encoder and decoder self-attention
# (language_model.encoder.block.N.layer.0.SelfAttention.q), "EncDecAttention.q" the decoder's cross-attention to the
# encoder (language_model.decoder.block.N.layer.1.EncDecAttention.q).
LORA_TARGETS = ("SelfAttention.q", "SelfAttention.k", "SelfAttention.v", "SelfAttention.o",
                "EncDecAttention.q", "EncDecAttention.k", "EncDecAttention.v", "EncDecAttention.o")
# A 4/8-bit base leaves these 16-bit besides BLIP-2's own (model.quantization_config): the feed-forward output `wo`,
# whose activations reach ~1e5 in Flan-T5 (transformers keeps it unquantized too).
KEEP_UNQUANTIZED = ("DenseReluDense.wo",)

# The language models of the released checkpoints, as their config.json files give them, and two stand-ins for the
# CPU (bench.py, memory.py, demo.py): the same architecture, smaller.
SIZES = {"flan-t5-xl": dict(d_model=2048, d_kv=64, d_ff=5120, num_layers=24, num_heads=32),
         "flan-t5-xxl": dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64),
         "small": dict(d_model=512, d_kv=64, d_ff=1280, num_layers=6, num_heads=8),
         "tiny": dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, dropout_rate=0.0)}
VOCAB_SIZE, IMAGE_TOKEN_ID = 32128, 32100  # blip2-flan-t5-xl's: <image> is the token after T5's 100 sentinels
# How T5's tokenizer lays out its special tokens, for a word-level tokenizer in its image (demo.build_processor): the
# first ids in this order (pad 0, </s> 1), </s> after each text (no BOS), and a caption ending in </s>.
SPECIAL_TOKENS = {"first_ids": ("<pad>", "</s>", "<unk>"), "template": "$A </s>", "bos": None, "caption_end": "</s>"}


def text_config(size, **changes):
    """A T5Config for one of SIZES: Flan-T5's gated GELU, its own lm_head, pad 0 (also the decoder start), eos 1."""
    return T5Config(**{"vocab_size": VOCAB_SIZE, **SIZES[size], "num_decoder_layers": SIZES[size]["num_layers"],
                       "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False, "decoder_start_token_id": 0,
                       "pad_token_id": 0, "eos_token_id": 1, **changes})


def caption_ids(tokenizer, captions, eos_token_id):
    """Each caption as T5's decoder learns it: its tokens, then </s>. (data.CaptionCollator cuts and pads them.)"""
    return [ids + [eos_token_id] for ids in tokenizer(captions, add_special_tokens=False).input_ids]


# ------------------------------------------------------------------------------------------------- the loss

def _decoder_inputs(model, labels):
    """Teacher forcing: the decoder reads [start] + labels[:, :-1] (N, T), with -100 padding turned into the pad id."""
    start = torch.full_like(labels[:, :1], model.config.text_config.decoder_start_token_id)
    shifted = torch.cat([start, labels[:, :-1]], dim=1)
    return shifted.masked_fill(shifted == -100, model.config.text_config.pad_token_id)


def per_pair_caption_loss(model, batch):
    """The plain way: one whole BLIP-2 forward per (image, caption) pair, as transformers runs it. Returns (summed
    loss, caption tokens)."""
    per_caption = batch["caption_image"]                                                # (N,) image of each caption
    logits = model(pixel_values=batch["pixel_values"][per_caption], input_ids=batch["input_ids"][per_caption],
                   attention_mask=batch["attention_mask"][per_caption],
                   decoder_input_ids=_decoder_inputs(model, batch["labels"]), use_cache=False,
                   **model_inputs(model, len(per_caption))).logits                     # (N, T, vocab)
    return caption_loss_sum(logits, batch["labels"])


def _encode_images(model, batch, image_embeds):
    """Stages 2-4, once per image: (B, V, Dv) -> the T5 encoder's output (B, L, D)."""
    embeds = embed_prompt(model, batch["input_ids"], image_features(model, image_embeds))  # (B, L, D)
    return model.language_model.encoder(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).last_hidden_state


def grouped_caption_loss(model, batch, image_embeds):
    """per_pair_caption_loss with everything that depends only on the image done once per image: the Q-Former, the T5
    encoder and the decoder's cross-attention keys and values (tests/test_fast.py holds the two equal). image_embeds:
    (B, V, Dv) from blip2.vision_embeds or the vision cache. Returns (summed loss, caption tokens).

    In the decoder, each layer's cross-attention projects the encoder states to keys and values. Those depend on the
    image, not on the caption: they are computed here once per image (LoRA on EncDecAttention.k/.v included, whose
    gradients then sum over the image's captions) and handed to the decoder through transformers' encoder-decoder
    cache, which T5's cross-attention reads instead of projecting again."""
    text = model.language_model
    encoded = _encode_images(model, batch, image_embeds)                                 # (B, L, D)
    per_caption = batch["caption_image"]                                                # (N,)
    cross = DynamicCache()
    for i, block in enumerate(text.decoder.block):
        attention = block.layer[1].EncDecAttention
        heads = (*encoded.shape[:2], -1, attention.key_value_proj_dim)                  # (B, L, H, d)
        keys = attention.k(encoded).view(heads).transpose(1, 2)[per_caption]            # (N, H, L, d)
        values = attention.v(encoded).view(heads).transpose(1, 2)[per_caption]
        cross.update(keys, values, i)
    # The decoder reads only the shape of encoder_hidden_states: every layer's keys and values come from the cache.
    shape_only = encoded[:1].expand(per_caption.shape[0], -1, -1)                       # (N, L, D), a view
    logits = text(encoder_outputs=(shape_only,), attention_mask=batch["attention_mask"][per_caption],
                  decoder_input_ids=_decoder_inputs(model, batch["labels"]),
                  cache=EncoderDecoderCache(_NoSelfAttentionCache(), cross), use_cache=False).logits  # (N, T, vocab)
    return caption_loss_sum(logits, batch["labels"])


class _NoSelfAttentionCache(DynamicCache):
    """The decoder's self-attention keeps nothing: training reads each caption in one pass, and a kept copy would be
    doubled by gradient checkpointing's recomputation."""

    def update(self, key_states, value_states, *args, **kwargs):
        return key_states, value_states


# ------------------------------------------------------------------------------------------------- precision, memory

def prepare(model, compute_dtype):
    """What T5 needs once loaded: its GELU as one fused operation, and under float16 its `wo` layers in float32.
    Returns what a user should know of it ("" if nothing)."""
    _use_fused_gelu(model)
    if compute_dtype == torch.float16:
        _keep_wo_in_float32(model)
        return "float16: T5's feed-forward outputs (wo) run in float32, since Flan-T5's activations overflow float16"
    return ""


def _use_fused_gelu(model):
    """Flan-T5's feed-forward activation, gelu_new, is written as seven element-wise operations, and autograd keeps
    the output of each for the backward pass: about 2 GB at the default batch. GELUTanh (F.gelu(approximate="tanh"))
    computes the same function (transformers' own `gelu_pytorch_tanh`; 2e-7 apart in float32) in one operation that
    keeps only its input. Fewer kernels, too."""
    from transformers.activations import GELUTanh, NewGELUActivation
    for module in model.language_model.modules():
        if isinstance(getattr(module, "act", None), NewGELUActivation):
            module.act = GELUTanh()


def _keep_wo_in_float32(model):
    """Flan-T5's feed-forward output `wo` overflows float16 (its activations reach ~1e5): transformers keeps its
    weight in float32 for float16 models. Under autocast that is not enough (autocast would run the matmul in
    float16 anyway), so here `wo` runs in float32 with autocast off."""
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
    activation memory of 48 blocks becomes that of about one, for about a third more compute."""
    text = model.language_model
    for block in [*text.encoder.block, *text.decoder.block]:
        block.forward = checkpointed(block.forward)  # the module itself stays: adapter paths do not change


def as_released(model):
    """A model built from a config holds its weights as the released checkpoints do. T5 v1.1 checkpoints, Flan-T5's
    among them, hold an lm_head of their own; transformers 5 builds T5 from a config with lm_head tied to the
    embeddings and unties it only when it loads such a checkpoint. A model built to stand for blip2-flan-t5-xl in
    measurements (bench.py, memory.py) gets its own lm_head here, as the real one."""
    text = model.language_model
    if text.lm_head.weight is text.shared.weight:
        text.lm_head.weight = torch.nn.Parameter(text.shared.weight.detach().clone(), requires_grad=False)


def prepare_export(model):
    """A merged model's generate() without a prompt starts T5's encoder input with text_config.bos_token_id, which T5
    has not: the end token is what an empty prompt tokenizes to, so a prompt-less generate is caption.py with
    --prompt ""."""
    text = model.config.text_config
    text.bos_token_id = text.eos_token_id
    model.generation_config.bos_token_id = text.eos_token_id


# ------------------------------------------------------------------------------------------------- generation

def start_generation(model, input_ids, image_embeds, beams, max_new_tokens):
    """generation.py's start, for B images with `beams` rows each: the encoder once per image, every decoder layer's
    cross-attention keys and values once per image (B, H, L, d), which all of an image's beams read; the decoder's
    own keys and values allocated for max_new_tokens positions, and its relative position bias for every (query, key)
    position pair with later keys masked, (1, H, T, T). Then the decoder start token at position 0, once per image
    (all of an image's beams begin with it), its keys and values copied to each beam's rows (R, H, T, d).
    Returns (state, the first new token's logits (R, vocab))."""
    text = model.language_model
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    encoded = _encode_images(model, batch, image_embeds)                                 # (B, L, D)
    images, heads, width = encoded.shape[0], text.config.num_heads, text.config.d_kv
    state = DecodeState(beams=1)                                                         # one row per image, first
    for block in text.decoder.block:
        attention = block.layer[1].EncDecAttention
        shape = (*encoded.shape[:2], heads, width)
        state.image_keys.append(attention.k(encoded).view(shape).transpose(1, 2))       # (B, H, L, d)
        state.image_values.append(attention.v(encoded).view(shape).transpose(1, 2))
        own = state.image_keys[-1].new_zeros(images, heads, max_new_tokens, width)     # (B, H, T, d), in the
        state.keys.append(own)                                                          # keys' dtype (autocast's)
        state.values.append(torch.zeros_like(own))
    positions = text.decoder.block[0].layer[0].SelfAttention
    bias = positions.compute_bias(max_new_tokens, max_new_tokens, device=encoded.device)  # (1, H, T, T)
    later = torch.ones(max_new_tokens, max_new_tokens, dtype=torch.bool, device=encoded.device).triu(1)
    lowest = torch.finfo(state.keys[0].dtype).min  # a masked position, in the dtype the attention runs in
    state.extra["bias"] = bias.masked_fill(later, lowest).to(state.keys[0].dtype)
    state.prompt_ids = torch.full((images, 1), text.config.decoder_start_token_id, device=encoded.device)
    logits = decode_step(model, state, state.prompt_ids[:, 0], 0)                      # (B, vocab)
    state.beams = beams
    state.reorder(torch.arange(images, device=encoded.device).repeat_interleave(beams))  # each image's row to its beams
    state.prompt_ids = state.prompt_ids.repeat_interleave(beams, dim=0)
    return state, logits.repeat_interleave(beams, dim=0)


def decode_step(model, state, tokens, n):
    """The decoder on one token per row, tokens (R,), at decoder position n (the decoder start token is position 0,
    the n-th new token position n): each layer attends to its own cache, then to the row's image, then feeds
    forward. Returns the next token's logits (R, vocab)."""
    text = model.language_model
    position = torch.as_tensor(n, device=tokens.device).view(1)
    hidden = text.decoder.embed_tokens(tokens)[:, None]                                 # (R, 1, D)
    bias = state.extra["bias"].index_select(2, position)                                # (1, H, 1, T)
    for i, block in enumerate(text.decoder.block):
        own, cross, feed_forward = block.layer
        hidden = _clamped(hidden + _own_attention(own, state, i, hidden, bias, position))
        hidden = _clamped(hidden + _image_attention(cross, state, i, hidden))
        hidden = _clamped(feed_forward(hidden))      # T5LayerFF: hidden + DenseReluDense(layer_norm(hidden))
    hidden = text.decoder.final_layer_norm(hidden)
    if text.config.scale_decoder_outputs:  # T5 v1.0's tied embeddings; Flan-T5 has its own lm_head
        hidden = hidden * text.model_dim ** -0.5
    return text.lm_head(hidden)[:, 0]


def _heads(x, attention):
    """(rows, 1, H * d) -> (rows, H, 1, d)"""
    return x.view(x.shape[0], 1, -1, attention.key_value_proj_dim).transpose(1, 2)


def _own_attention(layer, state, i, hidden, bias, position):
    """Self-attention of one new token per row: its keys and values written at `position` of the row's cache, then
    attention over the cache, the relative position bias masking the positions not written yet (T5 does not scale
    the scores)."""
    attention, x = layer.SelfAttention, layer.layer_norm(hidden)
    query, key, value = (_heads(project(x), attention) for project in (attention.q, attention.k, attention.v))
    state.keys[i].index_copy_(2, position, key)
    state.values[i].index_copy_(2, position, value)
    out = F.scaled_dot_product_attention(query, state.keys[i], state.values[i], attn_mask=bias, scale=1.0)
    return attention.o(out.transpose(1, 2).flatten(2))                                  # (R, 1, D)


def _image_attention(layer, state, i, hidden):
    """Cross-attention to the image: the queries of an image's beams, (B, H, beams, d), against its keys and values
    (B, H, L, d), computed once per image."""
    attention, x = layer.EncDecAttention, layer.layer_norm(hidden)
    images, width = state.image_keys[i].shape[0], attention.key_value_proj_dim
    query = attention.q(x).view(images, state.beams, -1, width).transpose(1, 2)        # (B, H, beams, d)
    out = F.scaled_dot_product_attention(query, state.image_keys[i], state.image_values[i], scale=1.0)
    return attention.o(out.transpose(1, 2).reshape(hidden.shape[0], 1, -1))             # (R, 1, D)


def _clamped(hidden):
    """T5's float16 guard after each sublayer, as transformers' T5Block applies it."""
    if hidden.dtype != torch.float16:
        return hidden
    largest = torch.finfo(hidden.dtype).max
    limit = torch.where(torch.isinf(hidden).any(), largest - 1000, largest)
    return hidden.clamp(-limit, limit)


def new_tokens(output, input_ids):
    """What model.generate(pixel_values=..., input_ids=...) wrote, without the decoder start token it begins with."""
    return output[:, 1:]
