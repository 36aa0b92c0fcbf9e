"""
blip2lora/decoder_only.py: what the decoder-only families share (opt.py for OPT, llama.py for LLaMA).

A decoder-only language model reads one sequence, [image features][prompt][caption], each position predicting the
next token. Everything before the caption (the prefix, L positions) is the same for all of an image's captions, so
the loss and generation here run it once per image and let each caption, or each beam, attend to its keys and
values. What differs between OPT and LLaMA is how a stack of layers is run (learned positions added to the
embeddings, or rotations inside each layer): the family hands that in as `layers`:

    layers(embeds, kept_from, attends, cache) -> hidden (rows, T, D) after the final norm: the decoder's layers over
        embeddings (rows, T, D) at positions kept_from.. kept_from + T - 1, each attending as `attends` (T, keys)
        says (True: may attend) to the keys and values `cache` hands it (cache.update(keys, values, layer, ...): the
        attention of OPT and LLaMA in transformers 5.24).
"""
import torch

from blip2lora.blip2 import caption_loss_sum, embed_prompt, image_features, model_inputs
from blip2lora.generation import DecodeState


def per_pair_caption_loss(model, batch):
    """The plain way: one whole forward per (image, caption) pair over [prefix][caption], as transformers runs it;
    right padding masked. Returns (summed loss, caption tokens)."""
    per_caption, labels = batch["caption_image"], batch["labels"]                      # (N,), (N, T)
    prefix_length = batch["input_ids"].shape[1]                                         # L
    caption = labels.masked_fill(labels == -100, model.config.text_config.pad_token_id)
    input_ids = torch.cat([batch["input_ids"][per_caption], caption], dim=1)           # (N, L + T)
    attention_mask = torch.cat([batch["attention_mask"][per_caption], (labels != -100).long()], dim=1)
    logits = model(pixel_values=batch["pixel_values"][per_caption], input_ids=input_ids, attention_mask=attention_mask,
                   use_cache=False, **model_inputs(model, len(per_caption))).logits   # (N, L + T, vocab)
    # the logit at position i predicts token i + 1: the caption's T tokens are predicted from position L - 1 on
    return caption_loss_sum(logits[:, prefix_length - 1:-1], labels)


def grouped_caption_loss(model, batch, image_embeds, layers):
    """per_pair_caption_loss with the prefix run once per image instead of once per caption (tests/test_fast.py holds
    the two equal, in loss and LoRA gradients). image_embeds: (B, V, Dv). Returns (summed loss, caption tokens).

    1. Once per image: the layers over the prefix minus its last token, (B, P) with P = L - 1, keeping every layer's
       keys and values (B, H, P, d). No logits: nothing before the caption is predicted.
    2. Once per caption: [last prefix token][caption minus its last token] (N, T) at positions P..P+T-1, each layer
       attending to its image's prefix keys and values and then causally to itself. The logit at the last prefix
       token predicts the caption's first token, and so on: the T logits predict the caption's T tokens, as in the
       per-pair forward."""
    prefix = embed_prompt(model, batch["input_ids"], image_features(model, image_embeds))   # (B, L, D)
    per_caption, labels = batch["caption_image"], batch["labels"]                           # (N,), (N, T)
    kept, tokens = prefix.shape[1] - 1, labels.shape[1]                                     # P, T
    recorded = RecordedKeysValues()
    causal = torch.ones(kept, kept, dtype=torch.bool, device=prefix.device).tril()          # (P, P)
    layers(prefix[:, :-1], kept_from=0, attends=causal, cache=recorded)
    caption = labels[:, :-1].masked_fill(labels[:, :-1] == -100, model.config.text_config.pad_token_id)
    inputs = torch.cat([prefix[per_caption, -1:], model.get_input_embeddings()(caption)], dim=1)  # (N, T, D)
    # each caption position sees the whole prefix and its own caption up to itself; right padding needs no mask,
    # since no real token comes after a pad (and a pad's logit is ignored: its label is -100)
    attends = torch.cat([torch.ones(tokens, kept, dtype=torch.bool, device=prefix.device),
                         torch.ones(tokens, tokens, dtype=torch.bool, device=prefix.device).tril()], dim=1)
    hidden = layers(inputs, kept_from=kept, attends=attends, cache=PrefixThenCaption(recorded, per_caption))
    return caption_loss_sum(model.language_model.lm_head(hidden), labels)                  # hidden: (N, T, D)


def start_generation(model, input_ids, image_embeds, beams, max_new_tokens, layers):
    """generation.py's start, for B images with `beams` rows each: the prefix (image features and prompt, (B, L, D))
    once per image, keeping every layer's keys and values (B, H, L, d), which all of an image's beams read; the new
    tokens' own keys and values allocated for max_new_tokens - 1 positions (R, H, T, d). Returns (state, the first
    new token's logits, predicted at the prefix's last position, for each row (R, vocab))."""
    prefix = embed_prompt(model, input_ids, image_features(model, image_embeds))       # (B, L, D)
    images, length = prefix.shape[:2]
    recorded = RecordedKeysValues()
    causal = torch.ones(length, length, dtype=torch.bool, device=prefix.device).tril()
    hidden = layers(prefix, kept_from=0, attends=causal, cache=recorded)                # (B, L, D)
    state = DecodeState(beams, extra={"prefix_length": length})
    for i in range(len(recorded.layers)):
        keys, values = recorded.layers[i]                                               # (B, H, L, d)
        state.image_keys.append(keys)
        state.image_values.append(values)
        state.keys.append(keys.new_zeros(images * beams, keys.shape[1], max(1, max_new_tokens - 1), keys.shape[3]))
        state.values.append(torch.zeros_like(state.keys[-1]))
    state.prompt_ids = torch.zeros(images * beams, 0, dtype=torch.long, device=prefix.device)
    logits = model.language_model.lm_head(hidden[:, -1])                                # (B, vocab)
    return state, logits.repeat_interleave(beams, dim=0)


def attention(state, i, query, key, value, index):
    """A decode step's attention of one new token per row in layer i: query, key, value (R, H, 1, d), the query
    already scaled. The row's own key and value are written at `index` of its cache (R, H, T, d); then one softmax
    over its image's prefix keys (B, H, L, d), read by all the image's beams (never copied per beam), and its own
    keys up to `index`. Returns (R, H, 1, d)."""
    rows, heads = query.shape[:2]
    images, beams = rows // state.beams, state.beams
    state.keys[i].index_copy_(2, index, key)
    state.values[i].index_copy_(2, index, value)
    by_image = query.view(images, beams, heads, -1).transpose(1, 2)                     # (B, H, beams, d)
    prefix_scores = by_image @ state.image_keys[i].transpose(2, 3)                      # (B, H, beams, L)
    own_scores = (query @ state.keys[i].transpose(2, 3)).view(images, beams, heads, -1).transpose(1, 2)
    unwritten = torch.arange(own_scores.shape[-1], device=query.device) > index        # (T,)
    own_scores = own_scores.masked_fill(unwritten, -float("inf"))                       # (B, H, beams, T)
    weights = torch.softmax(torch.cat([prefix_scores, own_scores], -1).float(), -1).to(query.dtype)
    length = prefix_scores.shape[-1]
    out = (weights[..., :length] @ state.image_values[i]).transpose(1, 2).reshape(rows, heads, 1, -1)
    own_weights = weights[..., length:].transpose(1, 2).reshape(rows, heads, 1, -1)    # (R, H, 1, T)
    return out + own_weights @ state.values[i]                                          # (R, H, 1, d)


class RecordedKeysValues:
    """The prefix pass's cache: each layer hands it its keys and values (B, H, P, d) and attends to what it returns.
    This one keeps them by overwriting, so the recomputation of gradient checkpointing records the same tensors
    again; transformers' DynamicCache appends (torch.cat), and a replayed layer would then hold two copies and fail
    in the backward pass."""

    def __init__(self):
        self.layers = {}

    def update(self, keys, values, layer, **kwargs):
        self.layers[layer] = keys, values
        return keys, values


class PrefixThenCaption:
    """The caption pass's cache: each layer attends to its image's prefix keys and values (indexed per caption:
    (N, H, P, d)), then to the caption's own (N, H, T, d). It stores nothing, so a recomputation reads the same."""

    def __init__(self, recorded, per_caption):
        self.recorded, self.per_caption = recorded, per_caption

    def update(self, keys, values, layer, **kwargs):
        prefix_keys, prefix_values = self.recorded.layers[layer]
        return (torch.cat([prefix_keys[self.per_caption], keys], dim=2),
                torch.cat([prefix_values[self.per_caption], values], dim=2))
