"""The fast path and the memory levers change nothing but speed and memory, for both language-model families: the
grouped step (T5: encoder and cross-attention keys and values once per image; OPT: the prefix once per image), the
vision cache, gradient checkpointing and float32 `wo` give the per-pair loss and gradients."""
import os

import pytest
import torch

from blip2lora import llama, opt
from blip2lora import t5
from blip2lora.blip2 import caption_loss_sum, vision_embeds
from lora import inject_lora, lora_layers
from blip2lora.model import grouped_caption_loss, lora_targets, per_pair_caption_loss, use_gradient_checkpointing
from blip2lora.t5 import _decoder_inputs as decoder_inputs, _encode_images as encode_images
from blip2lora.vision_cache import VisionCache

FAMILIES = pytest.mark.parametrize("lm", [t5, opt, llama], ids=["t5", "opt", "llama"])


def batch_for(model, images=3, captions_per_image=(5, 4, 5), seed=0):
    """B images, a different number of captions each and captions of different lengths (padding -100)."""
    g = torch.Generator().manual_seed(seed)
    config = model.config
    size = config.vision_config.image_size
    prompt = [config.image_token_id] * config.num_query_tokens + [5, 6, 7, 1]
    caption_image = torch.cat([torch.full((n,), i) for i, n in enumerate(captions_per_image)])
    labels = torch.randint(2, 40, (len(caption_image), 9), generator=g)
    lengths = torch.randint(3, 10, (len(caption_image),), generator=g)
    labels[torch.arange(9)[None, :] >= lengths[:, None]] = -100
    return {"pixel_values": torch.randn(len(captions_per_image), 3, size, size, generator=g),
            "input_ids": torch.tensor([prompt] * len(captions_per_image)),
            "attention_mask": torch.ones(len(captions_per_image), len(prompt)).long(),
            "labels": labels, "caption_image": caption_image}


def lora_grads(model):
    return [g for _, l in lora_layers(model) for g in (l.lora_A.grad.clone(), l.lora_B.grad.clone())]


def loss_and_grads(model, loss_fn, *args):
    loss, tokens = loss_fn(model, *args)
    (loss / tokens).backward()
    grads = lora_grads(model)
    model.zero_grad()
    return loss.detach(), grads


def llama_in_float64(monkeypatch):
    """transformers' LLaMA (5.24) computes RMSNorm and the RoPE angles in float32 whatever the input's dtype; for the
    float64 comparisons they compute in the input's dtype here, so that only the order of operations can differ."""
    from transformers.models.llama import modeling_llama

    def rms_norm(self, hidden):
        return self.weight * hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)

    def rotation(self, x, position_ids):
        angles = torch.cat([position_ids[..., None].to(x.dtype) * self.inv_freq.to(x.dtype)] * 2, dim=-1)
        return angles.cos() * self.attention_scaling, angles.sin() * self.attention_scaling
    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", rms_norm)
    monkeypatch.setattr(modeling_llama.LlamaRotaryEmbedding, "forward", rotation)


@FAMILIES
@pytest.mark.parametrize("captions_per_image", [(5, 5, 5), (1, 4, 2), (1, 1, 1), (1, 12, 2)])
def test_grouped_loss_and_gradients_equal_per_pair(tiny_blip2, random_lora_b, lm, captions_per_image, monkeypatch):
    """In float64, to 1e-10 of each value for OPT and LLaMA (llama_in_float64): the loss, and every LoRA tensor's
    gradient (the largest difference within a tensor against its largest gradient). Captions of 3 to 9 tokens,
    padded. transformers' T5 (5.24) takes its LayerNorm's variance in float32 whatever the input's dtype, so T5's are
    equal to float32's rounding (2e-8 seen here): 1e-6."""
    if lm is llama:
        llama_in_float64(monkeypatch)
    model = tiny_blip2(lm=lm)
    inject_lora(model, lora_targets(model.config))
    random_lora_b(model)  # B != 0, so gradients reach A too
    model.double()
    batch = batch_for(model, captions_per_image=captions_per_image)
    batch["pixel_values"] = batch["pixel_values"].double()
    per_pair, per_pair_grads = loss_and_grads(model, per_pair_caption_loss, batch)
    grouped, grouped_grads = loss_and_grads(model, grouped_caption_loss, batch,
                                            vision_embeds(model, batch["pixel_values"]))
    exact = 1e-6 if lm is t5 else 1e-10
    assert per_pair.dtype == torch.float64 and abs(per_pair - grouped) <= exact * abs(per_pair)
    assert all(a.abs().max() > 0 for a in per_pair_grads)
    assert all((a - b).abs().max() <= exact * a.abs().max() for a, b in zip(per_pair_grads, grouped_grads))


def repeating_encoder_states(model, batch, image_embeds):
    """The grouped loss as it was before: the encoder states repeated per caption, so that every decoder layer
    projected them to cross-attention keys and values once per caption."""
    encoded, per_caption = encode_images(model, batch, image_embeds), batch["caption_image"]
    logits = model.language_model(encoder_outputs=(encoded[per_caption],),
                                  attention_mask=batch["attention_mask"][per_caption],
                                  decoder_input_ids=decoder_inputs(model, batch["labels"]), use_cache=False).logits
    return caption_loss_sum(logits, batch["labels"])


def flops(fn):
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_cross_attention_keys_and_values_are_computed_once_per_image(tiny_blip2, random_lora_b):
    """The FLOPs saved are exactly the key/value projections (forward and backward, LoRA included) of the rows that
    repeating the encoder states per caption added: (N - B) rows of L tokens in every decoder layer."""
    model = tiny_blip2()
    inject_lora(model, lora_targets(model.config))
    random_lora_b(model)
    batch = batch_for(model, captions_per_image=(5, 4, 5))
    embeds = vision_embeds(model, batch["pixel_values"]).detach()
    before = flops(lambda: (lambda l, t: (l / t).backward())(*repeating_encoder_states(model, batch, embeds)))
    after = flops(lambda: (lambda l, t: (l / t).backward())(*grouped_caption_loss(model, batch, embeds)))
    model.zero_grad()
    width, tokens = model.config.text_config.d_model, batch["input_ids"].shape[1]
    images, captions = len(batch["pixel_values"]), len(batch["labels"])

    def projections(rows):  # k and v of every decoder layer on `rows` encoder rows, forward and backward
        x = torch.randn(rows, tokens, width, requires_grad=True)
        return flops(lambda: sum(block.layer[1].EncDecAttention.k(x).sum() + block.layer[1].EncDecAttention.v(x).sum()
                                 for block in model.language_model.decoder.block).backward())
    saved = projections(captions) - projections(images)
    assert saved > 0 and before - after == saved


@FAMILIES
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_blip2, random_lora_b, lm):
    """With LoRA dropout on: the recomputation must draw the same dropout masks as the first pass; for OPT, it must
    also record the prefix's keys and values again without doubling them (opt._RecordedKeysValues)."""
    results = []
    for checkpointing in (False, True):
        model = tiny_blip2(lm=lm)
        inject_lora(model, lora_targets(model.config), dropout=0.3)
        random_lora_b(model)
        if checkpointing:
            use_gradient_checkpointing(model)
        for _, layer in lora_layers(model):
            layer.train()
        batch = batch_for(model)
        embeds = vision_embeds(model, batch["pixel_values"]).detach()
        torch.manual_seed(5)
        results.append(loss_and_grads(model, grouped_caption_loss, batch, embeds))
        torch.manual_seed(5)
        results.append(loss_and_grads(model, per_pair_caption_loss, batch))  # bench.py's comparison, as it runs
    for plain, checkpointed in zip(results[:2], results[2:]):
        assert torch.equal(plain[0], checkpointed[0])
        assert all(torch.equal(a, b) for a, b in zip(plain[1], checkpointed[1]))


def test_float16_keeps_t5_wo_in_float32(tiny_blip2):
    """Under float16 autocast, Flan-T5's feed-forward output runs in float32: its activations reach beyond float16's
    65,504 (here 128 inputs of 1,000 through weights of 1: 128,000), which would otherwise become infinity."""
    from blip2lora.t5 import _keep_wo_in_float32 as keep_wo_in_float32
    model = tiny_blip2()
    wo = model.language_model.encoder.block[0].layer[1].DenseReluDense.wo
    with torch.no_grad():
        wo.weight.fill_(1.0)
    x = torch.full((1, 2, wo.in_features), 1000.0)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        plain = wo(x)
        keep_wo_in_float32(model)
        kept = wo(x)
    assert torch.isinf(plain).all()
    assert kept.dtype == torch.float32 and torch.equal(kept, torch.full_like(kept, 1000.0 * wo.in_features))


@FAMILIES
def test_the_grouped_loss_traces_as_one_graph(tiny_blip2, lm):
    """torch.compile sees one graph: a graph break (e.g. a Python check on a tensor's value) would split it, and
    train.py compiles with fullgraph=True, where a break is an error."""
    model = tiny_blip2(lm=lm)
    inject_lora(model, lora_targets(model.config))
    batch = batch_for(model)
    explanation = torch._dynamo.explain(grouped_caption_loss)(model, batch, vision_embeds(model, batch["pixel_values"]))
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons


def test_frozen_qformer_cast_once_to_bf16_gives_the_same_loss_and_gradients(tiny_blip2, random_lora_b):
    from blip2lora.blip2 import autocast_context, cast_frozen_qformer
    batch = batch_for(tiny_blip2())
    results = []
    for cast in (False, True):
        model = tiny_blip2()  # the same seed: the same weights
        inject_lora(model, lora_targets(model.config))
        random_lora_b(model)
        if cast:
            cast_frozen_qformer(model, torch.bfloat16)
            assert model.qformer.encoder.layer[0].attention.attention.query.base.weight.dtype == torch.bfloat16
            assert model.qformer.layernorm.weight.dtype == torch.float32  # LayerNorms stay float32
        with autocast_context("cpu", torch.bfloat16):
            results.append(loss_and_grads(model, grouped_caption_loss, batch,
                                          vision_embeds(model, batch["pixel_values"])))
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))


class FakeLoader:
    """What VisionCache.build reads: batches with pixel_values and image_index, and .dataset.items."""

    def __init__(self, items, batches):
        self.dataset, self.batches = type("D", (), {"items": items})(), batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


def built_cache(model, tmp_path, items, batch):
    def open_cache(**changed):
        args = dict(model_name="tiny", image_size="48x48", items=items, dtype=torch.float32) | changed
        return VisionCache(str(tmp_path / "cache"), model, args["model_name"], args["image_size"], args["items"],
                           args["dtype"])
    loader = FakeLoader(items, [{"pixel_values": batch["pixel_values"][:2], "image_index": torch.tensor([0, 1])},
                                {"pixel_values": batch["pixel_values"][2:], "image_index": torch.tensor([2])}])
    assert not open_cache().complete
    open_cache().build(model, loader, "cpu", torch.autocast("cpu", enabled=False), log=lambda *a: None)
    return open_cache


def image_items(tmp_path):
    from data import ImageCaptions
    items = []
    for i in range(3):
        (tmp_path / f"img{i}.jpg").write_bytes(b"pixels %d" % i)  # the cache key reads size and time, not pixels
        items.append(ImageCaptions(f"img{i}.jpg", str(tmp_path / f"img{i}.jpg"), ["x"]))
    return items


def test_cached_vision_gives_the_identical_loss_and_a_changed_key_rebuilds(tiny_blip2, tmp_path):
    model = tiny_blip2()
    inject_lora(model, lora_targets(model.config))
    batch = batch_for(model)
    items = image_items(tmp_path)
    open_cache = built_cache(model, tmp_path, items, batch)
    reopened = open_cache()  # memory-mapped from disk
    assert reopened.complete and reopened.missing == set()
    with torch.no_grad():
        direct, _ = grouped_caption_loss(model, batch, vision_embeds(model, batch["pixel_values"]))
        cached, _ = grouped_caption_loss(model, batch, reopened.lookup([i.name for i in items], "cpu"))
    assert torch.equal(direct, cached)
    for changed in [dict(model_name="other"), dict(image_size="64x64"), dict(dtype=torch.bfloat16),
                    dict(items=items[::-1])]:
        other = open_cache(**changed)
        assert not other.complete and other.dir != reopened.dir  # a new key means a new cache, built again
    os.utime(items[1].image, ns=(1, 1))  # the same name, another file: a new cache, not the old outputs
    assert open_cache().dir != reopened.dir


@pytest.mark.parametrize("damage, problem", [
    (lambda bin_file, size: os.truncate(bin_file, size // 2), "vision.bin has"),  # from_file would add zeros
    (lambda bin_file, size: open(bin_file, "wb").write(bytes(size)), "its contents changed"),  # zeroed, right size
    (lambda bin_file, size: open(bin_file, "wb").write(os.urandom(size)), "its contents changed"),  # noise
    (lambda bin_file, size: open(os.path.join(os.path.dirname(bin_file), "meta.json"), "w").write("{garbage"),
     "its meta.json is unreadable"),
    (lambda bin_file, size: open(os.path.join(os.path.dirname(bin_file), "meta.json"), "w").write("[" * 100_000),
     "its meta.json is unreadable"),  # nested beyond Python's recursion limit
])
def test_a_damaged_cache_is_never_read(tiny_blip2, tmp_path, damage, problem):
    model = tiny_blip2()
    open_cache = built_cache(model, tmp_path, image_items(tmp_path), batch_for(model))
    built = open_cache()
    damage(os.path.join(built.dir, "vision.bin"), built.nbytes)
    damaged = open_cache()
    assert not damaged.complete and damaged.problem.startswith(problem)


def test_a_cache_row_changed_after_opening_is_refused_when_read(tiny_blip2, tmp_path):
    from blip2lora.vision_cache import CacheDamaged
    model = tiny_blip2()
    items = image_items(tmp_path)
    cache = built_cache(model, tmp_path, items, batch_for(model))()
    cache.table[1] = 0  # what a disk fault or another program writing the file would do (the sample misses it)
    with pytest.raises(CacheDamaged, match="rows changed on disk"):
        cache.lookup([items[1].name], "cpu")
    assert not os.path.exists(os.path.join(cache.dir, "meta.json"))  # the next run builds it again
