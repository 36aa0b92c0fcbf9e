"""
blip2lora/generation.py: beam search and greedy captions, the image side once per image (captioning.py's path).

The same captions as transformers' generate() with the same settings (tests/test_generation.py holds them equal, token
for token): beam search with length penalty 1 and transformers' default early stop, greedy for one beam, min_new_tokens,
repetition_penalty and no_repeat_ngram_size as its logits processors apply them. What differs is the work: the family
(t5.py, opt.py, llama.py) runs what depends only on the image once per image (T5's encoder and every layer's
cross-attention keys and values; a decoder-only model's prefix of image queries and prompt) and every beam of an image
reads those keys and values, never a copy per beam; the decoder's own keys and values live in a cache allocated once for
max_new_tokens; beams are reordered by index; an image whose captions can no longer improve leaves the batch.

    ids = generate_ids(model, prompt_ids, image_embeds, num_beams=5, max_new_tokens=30, min_new_tokens=8)
    # (B, T): each image's best caption, its end token included, then padding

The family's part, for B images and R = B * beams rows (beams of an image next to each other):
    state, logits = lm.start_generation(model, input_ids, image_embeds, beams, max_new_tokens)  # logits (R, vocab)
    logits = lm.decode_step(model, state, tokens, n)      # tokens (R,): the n-th new token of each row (1-based)
    state.reorder(rows) / state.keep(images)              # DecodeState, below
"""
from dataclasses import dataclass, field

import torch

# transformers' beam search: a finished caption scores sum(log p) / (its new tokens ** LENGTH_PENALTY)
LENGTH_PENALTY = 1.0
NEVER = -1.0e9  # transformers' "cannot be chosen" score


@dataclass
class DecodeState:
    """What a decode step reads: per layer, the image side's keys and values (B, H, P, d), one entry per image, and
    each row's own keys and values (R, H, T, d), allocated for every new token at once (T5's; a decoder-only model
    keeps both in one tensor per image: decoder_only.PrefixAndBeams). `prompt_ids` (R, p): the ids transformers'
    processors see before the new ones (T5's decoder start token; none for OPT). `extra`: what the family needs
    besides (T5's position bias, OPT's prefix length)."""
    beams: int
    image_keys: list = field(default_factory=list)
    image_values: list = field(default_factory=list)
    keys: list = field(default_factory=list)
    values: list = field(default_factory=list)
    prompt_ids: torch.Tensor = None
    extra: dict = field(default_factory=dict)

    def reorder(self, rows):
        """Each row continues the row it was chosen from: rows (R,) indexes the current rows."""
        for caches in (self.keys, self.values):
            replace_each(caches, lambda cache: cache.index_select(0, rows))

    def keep(self, images):
        """Only these images (indices into the current ones) go on; the others have their captions."""
        rows = (images[:, None] * self.beams + torch.arange(self.beams, device=images.device)).flatten()
        for caches in (self.image_keys, self.image_values):
            replace_each(caches, lambda cache: cache.index_select(0, images))
        self.reorder(rows)
        self.prompt_ids = self.prompt_ids.index_select(0, rows)


def replace_each(caches, change):
    """caches[i] = change(caches[i]), one layer after the other: each old tensor is freed before the next new one is
    made, so that a reordering holds one layer's copy at most, not every layer's twice (the evaluation's peak)."""
    for i, cache in enumerate(caches):
        caches[i] = change(cache)


def process(scores, seen, new_tokens, eos, min_new_tokens, repetition_penalty, no_repeat_ngram_size):
    """transformers' logits processors, in place on scores (R, vocab): the end token is banned before
    min_new_tokens new tokens; every token already in `seen` (R, S; the ids before the new one) is penalised (a
    negative score times the penalty, a positive one divided by it); a token that would repeat an n-gram of `seen` is
    banned. seen() is called only when a repetition control is on."""
    if new_tokens < min_new_tokens:
        scores[:, eos] = -float("inf")
    if repetition_penalty == 1.0 and not no_repeat_ngram_size:
        return scores
    seen = seen()
    if repetition_penalty != 1.0 and seen.shape[1]:
        picked = scores.gather(1, seen)
        scores.scatter_(1, seen, torch.where(picked < 0, picked * repetition_penalty, picked / repetition_penalty))
    n = no_repeat_ngram_size
    if n and seen.shape[1] >= n:  # (fewer tokens than n hold no n-gram to repeat)
        windows = seen.unfold(1, n, 1)                                          # (R, S - n + 1, n)
        repeats = (windows[:, :, :-1] == seen[:, None, seen.shape[1] - n + 1:]).all(-1)  # starts as the last n-1 end
        vocab = scores.shape[1]  # a window that does not repeat bans the extra column vocab, dropped after
        banned = torch.zeros(scores.shape[0], vocab + 1, dtype=torch.bool, device=scores.device)
        banned.scatter_(1, torch.where(repeats, windows[:, :, -1], vocab), True)
        scores.masked_fill_(banned[:, :vocab], -float("inf"))
    return scores


@torch.no_grad()
def generate_ids(model, lm, prompt_ids, image_embeds, num_beams=5, max_new_tokens=30, min_new_tokens=8,
                 repetition_penalty=1.0, no_repeat_ngram_size=0, compile=False, num_captions=1):
    """Each image's caption ids (B, T), T the longest caption's length, padded with the pad token; with
    num_captions N (at most num_beams), each image's N best, (B * N, T), as num_return_sequences gives them. lm: the
    family (model.family). prompt_ids: the language model's input before the caption (data.prompt_ids);
    image_embeds: (B, V, Dv) from the ViT or the vision cache. compile: the decode step compiled (one graph: far fewer
    launches on a GPU); True for inductor, or a torch.compile backend's name."""
    text = model.config.text_config
    input_ids = torch.tensor(prompt_ids, device=image_embeds.device).expand(image_embeds.shape[0], -1)
    state, logits = lm.start_generation(model, input_ids, image_embeds, num_beams, max_new_tokens)
    controls = dict(eos=text.eos_token_id, min_new_tokens=min_new_tokens, repetition_penalty=repetition_penalty,
                    no_repeat_ngram_size=no_repeat_ngram_size)
    step = _compiled(lm.decode_step, "inductor" if compile is True else compile) if compile else lm.decode_step
    if num_beams == 1:
        return _greedy(model, step, state, logits, image_embeds.shape[0], max_new_tokens, text.pad_token_id, controls)
    return _beam_search(model, step, state, logits, image_embeds.shape[0], max_new_tokens, text.pad_token_id,
                        controls, num_captions)


_COMPILED = {}


def _compiled(decode_step, backend):
    """The family's decode step compiled once per process: one graph (tests/test_generation.py), the step index a
    tensor and the row count dynamic, so that neither recompiles it."""
    if (decode_step, backend) not in _COMPILED:
        _COMPILED[decode_step, backend] = torch.compile(decode_step, fullgraph=True, dynamic=True, backend=backend)
    return _COMPILED[decode_step, backend]


def _greedy(model, decode_step, state, logits, images, max_new_tokens, pad, controls):
    """transformers' greedy search: the most likely token each step (the processors applied to the logits), pad
    after the end token; a finished caption leaves the batch."""
    device = logits.device
    tokens = torch.full((images, max_new_tokens), pad, dtype=torch.long, device=device)
    left = torch.arange(images, device=device)                                # the images still going
    for n in range(max_new_tokens):
        seen = lambda: torch.cat([state.prompt_ids, tokens[left, :n]], dim=1)  # noqa: E731
        chosen = process(logits.float(), seen, n, **controls).argmax(-1)    # (rows,)
        tokens[left, n] = chosen
        going = (chosen != controls["eos"]).nonzero().flatten()
        if n + 1 == max_new_tokens or len(going) == 0:
            break
        if len(going) < len(left):
            state.keep(going)
            left, chosen = left[going], chosen[going]
        logits = decode_step(model, state, chosen, torch.tensor(n + 1))
    return _cropped(tokens, controls["eos"])


def _beam_search(model, decode_step, state, logits, images, max_new_tokens, pad, controls, num_captions=1):
    """transformers' beam search (GenerationMixin._beam_search, early_stopping=False), vectorised over the images
    still going: the 2 * beams best continuations of all beams, the beams best that did not end go on, those that
    ended among the first `beams` compete for the `beams` finished places (score / new tokens), and an image stops
    when its best running beam, at its current length, cannot beat its worst finished caption."""
    beams, eos, device = state.beams, controls["eos"], logits.device
    vocab, k = logits.shape[-1], 2 * beams
    captions = torch.full((images, num_captions, max_new_tokens), pad, dtype=torch.long, device=device)  # the answer
    left = torch.arange(images, device=device)
    running = torch.full((images, beams, max_new_tokens), pad, dtype=torch.long, device=device)
    running_scores = torch.zeros(images, beams, device=device)
    running_scores[:, 1:] = NEVER                            # all beams start equal: only the first one's count
    finished = running.clone()
    finished_scores = torch.full((images, beams), NEVER, device=device)
    is_finished = torch.zeros(images, beams, dtype=torch.bool, device=device)
    improvable = torch.ones(images, 1, dtype=torch.bool, device=device)
    first_beams = torch.arange(k, device=device) < beams     # only these may finish
    for n in range(max_new_tokens):
        b = len(left)
        seen = lambda: torch.cat([state.prompt_ids, running[:, :, :n].flatten(0, 1)], dim=1)  # noqa: E731
        log_probs = process(torch.log_softmax(logits.float(), -1), seen, n, **controls)      # (R, vocab)
        scores = (log_probs.view(b, beams, vocab) + running_scores[:, :, None]).view(b, beams * vocab)
        top_scores, top = torch.topk(scores, k)                                              # (b, k)
        source, token = top // vocab, top % vocab
        candidates = running.gather(1, source[:, :, None].expand(-1, -1, max_new_tokens))  # a new tensor
        candidates[:, :, n] = token
        ends = (token == eos) | (n + 1 == max_new_tokens)
        # the beams best candidates that did not end go on
        going_scores = top_scores + ends.float() * NEVER
        pick = torch.topk(going_scores, beams).indices                                       # (b, beams)
        running = candidates.gather(1, pick[:, :, None].expand(-1, -1, max_new_tokens))
        running_scores = going_scores.gather(1, pick)
        rows = (source.gather(1, pick) + torch.arange(b, device=device)[:, None] * beams).flatten()
        # those that ended among the first `beams` candidates compete for the finished places
        ended_scores = top_scores / (n + 1) ** LENGTH_PENALTY
        ended_scores = ended_scores + (~improvable).float() * NEVER + (~(ends & first_beams)).float() * NEVER
        merged_scores = torch.cat([finished_scores, ended_scores], dim=1)
        best = torch.topk(merged_scores, beams).indices
        finished = torch.cat([finished, candidates], dim=1).gather(1, best[:, :, None].expand(-1, -1, max_new_tokens))
        finished_scores = merged_scores.gather(1, best)
        is_finished = torch.cat([is_finished, ends & first_beams], dim=1).gather(1, best)
        # can the best running beam, were it to end now, beat the worst finished caption?
        worst = torch.where(is_finished, finished_scores.min(1, keepdim=True).values, NEVER)
        improvable = improvable & (running_scores[:, :1] / (n + 1) ** LENGTH_PENALTY > worst).any(-1, keepdim=True)
        done = ~improvable[:, 0]
        if n + 1 == max_new_tokens or done.all() or ends.all():
            break
        state.reorder(rows)
        if done.any():  # these images have their captions: out of the work
            captions[left[done]] = finished[done, :num_captions]
            going = (~done).nonzero().flatten()
            state.keep(going)
            left, running, running_scores = left[going], running[going], running_scores[going]
            finished, finished_scores, is_finished, improvable = (finished[going], finished_scores[going],
                                                                  is_finished[going], improvable[going])
        logits = decode_step(model, state, running[:, :, n].flatten(), torch.tensor(n + 1))
    captions[left] = finished[:, :num_captions]
    return _cropped(captions.flatten(0, 1), eos)


def caption_tokens(ids, eos):
    """(B, T) ids -> each row's tokens up to its end token, included, as lists: what two ways of writing captions
    are compared by."""
    rows = [row.tolist() for row in ids]
    return [row[:row.index(eos) + 1] if eos in row else row for row in rows]


def _cropped(captions, eos):
    """(B, T) cut after the longest caption: up to its end token, or all of it if it has none."""
    ends = captions == eos
    lengths = torch.where(ends.any(1), ends.int().argmax(1) + 1, captions.shape[1])
    return captions[:, :int(lengths.max())]
