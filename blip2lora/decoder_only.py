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
import torch.nn.functional as F

from blip2lora.blip2 import caption_loss_sum, embed_prompt, image_features, model_inputs
from blip2lora.generation import DecodeState, replace_each


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
    once per image. Each layer's keys and values are one tensor per image (PrefixAndBeams): the prefix's L positions,
    which all of the image's beams read, then each beam's own T = max_new_tokens - 1 (the first new token is
    predicted at the prefix's last position). Returns (state, that first token's logits for each row (R, vocab))."""
    prefix = embed_prompt(model, input_ids, image_features(model, image_embeds))       # (B, L, D)
    images, length = prefix.shape[:2]
    recorded = RecordedKeysValues()
    causal = torch.ones(length, length, dtype=torch.bool, device=prefix.device).tril()
    hidden = layers(prefix, kept_from=0, attends=causal, cache=recorded)                # (B, L, D)
    state = PrefixAndBeams(beams, extra={"prefix_length": length, "own_length": max(1, max_new_tokens - 1)})
    for i in range(len(recorded.layers)):
        for kept, recorded_part in zip((state.keys, state.values), recorded.layers[i]):  # (B, H, L, d) each
            heads, width = recorded_part.shape[1], recorded_part.shape[3]
            kept.append(recorded_part.new_zeros(images, heads, length + beams * state.extra["own_length"], width))
            kept[-1][:, :, :length] = recorded_part
    state.prompt_ids = torch.zeros(images * beams, 0, dtype=torch.long, device=prefix.device)
    logits = model.language_model.lm_head(hidden[:, -1])                                # (B, vocab)
    return state, logits.repeat_interleave(beams, dim=0)


class PrefixAndBeams(DecodeState):
    """A decoder-only model's decode state: per layer, the keys (and values) of each image in one tensor,
    (B, H, K, d) with K = L + beams * T:

        [ prefix: L | beam 0: T | beam 1: T | ... ]     the prefix written once, at the start; beam j's n-th new
                                                        token at L + j * T + n - 1

    so that one fused attention call, masked so that a beam reads the prefix and its own keys, serves all of an
    image's beams, and the prefix is never copied per beam."""

    def layout(self, device):
        """For each of the K key positions, (K,) each: its beam (-1 in the prefix) and its place among that beam's."""
        length, own = self.extra["prefix_length"], self.extra["own_length"]
        after = torch.arange(length + self.beams * own, device=device) - length        # negative in the prefix
        return torch.where(after < 0, -1, after.div(own, rounding_mode="floor")), after % own

    def reorder(self, rows):
        """rows (R,) = image * beams + the beam each row continues (beams never change image): each beam's keys
        become its source beam's; the prefix stays in place."""
        length, own, beams = self.extra["prefix_length"], self.extra["own_length"], self.beams
        images, device = len(rows) // beams, rows.device
        beam, offset = self.layout(device)
        source_beam = (rows % beams).view(images, beams)[:, beam.clamp(min=0)]        # (B, K)
        source = torch.where(beam < 0, torch.arange(len(beam), device=device), length + source_beam * own + offset)
        # the tensors as rows of d numbers, (B * H * K, d): one index_select of whole rows each, the same index in
        # every layer
        heads = self.keys[0].shape[1]
        image_head = torch.arange(images * heads, device=device).view(images, heads, 1)
        rows_read = (image_head * len(beam) + source[:, None, :]).flatten()            # (B * H * K,)
        for caches in (self.keys, self.values):
            replace_each(caches, lambda cache: cache.flatten(0, 2).index_select(0, rows_read).view(cache.shape))

    def keep(self, images):
        """Only these images (indices into the current ones) go on."""
        rows = (images[:, None] * self.beams + torch.arange(self.beams, device=images.device)).flatten()
        for caches in (self.keys, self.values):
            replace_each(caches, lambda cache: cache.index_select(0, images))
        self.prompt_ids = self.prompt_ids.index_select(0, rows)


def cache_places(state, index):
    """What every layer of a decode step shares. index: the new token's place among its beam's own keys (0-based,
    a tensor). Returns where each beam's new key goes, (beams,), and what each beam reads, as a bias on the scores
    (beams, K): 0 for the prefix and its own keys up to the new one, -inf elsewhere, in the keys' dtype."""
    length, own = state.extra["prefix_length"], state.extra["own_length"]
    each_beam = torch.arange(state.beams, device=index.device)[:, None]                # (beams, 1)
    beam, offset = state.layout(index.device)
    reads = (beam < 0) | ((beam == each_beam) & (offset <= index))                      # (beams, K)
    bias = torch.zeros_like(reads, dtype=state.keys[0].dtype).masked_fill(~reads, -float("inf"))
    return length + each_beam[:, 0] * own + index, bias


def attention(state, i, query, key, value, places):
    """A decode step's attention in layer i: query, key, value (R, H, 1, d), one new token per row, the query
    already scaled; places: cache_places'. The new keys and values are written into their image's tensors, then
    each image's beams attend together: (B, H, beams, d) queries over its (B, H, K, d) keys, one fused call.
    Returns (R, H, 1, d)."""
    written, bias = places
    rows, heads = query.shape[:2]
    images = rows // state.beams

    def by_image(x):                                                   # (R, H, 1, d) -> (B, H, beams, d)
        return x.view(images, state.beams, heads, -1).transpose(1, 2)
    state.keys[i].index_copy_(2, written, by_image(key))
    state.values[i].index_copy_(2, written, by_image(value))
    out = F.scaled_dot_product_attention(by_image(query), state.keys[i], state.values[i], attn_mask=bias, scale=1.0)
    return out.transpose(1, 2).reshape(rows, heads, 1, -1)            # (B, beams, H, d) -> (R, H, 1, d)


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
