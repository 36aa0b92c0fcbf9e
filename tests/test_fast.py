"""The fast path changes nothing but speed: grouped steps and the vision cache give the per-pair loss and gradients."""
import os

import pytest
import torch

from lora import inject_lora, lora_layers
from model import VisionCache, grouped_caption_loss, per_pair_caption_loss, vision_embeds


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
    return {"pixel_values": torch.randn(images, 3, size, size, generator=g),
            "input_ids": torch.tensor([prompt] * images), "attention_mask": torch.ones(images, len(prompt)).long(),
            "labels": labels, "caption_image": caption_image}


def lora_grads(model):
    return torch.cat([torch.cat([l.lora_A.grad.flatten(), l.lora_B.grad.flatten()]) for _, l in lora_layers(model)])


@pytest.mark.parametrize("captions_per_image", [(5, 4, 5), (1, 12, 2)])  # Flickr-like, and a collection of one's own
def test_grouped_loss_and_gradients_equal_per_pair(tiny_blip2, random_lora_b, captions_per_image):
    model = tiny_blip2()
    inject_lora(model)
    random_lora_b(model)  # B != 0, so gradients reach A too
    batch = batch_for(model, captions_per_image=captions_per_image)

    loss, tokens = per_pair_caption_loss(model, batch)
    (loss / tokens).backward()
    per_pair_grads = lora_grads(model)
    model.zero_grad()

    grouped, grouped_tokens = grouped_caption_loss(model, batch, vision_embeds(model, batch["pixel_values"]))
    (grouped / grouped_tokens).backward()
    grouped_grads = lora_grads(model)

    assert tokens == grouped_tokens == (batch["labels"] != -100).sum()
    assert torch.allclose(loss, grouped, rtol=1e-5)
    assert per_pair_grads.abs().max() > 0
    assert torch.allclose(per_pair_grads, grouped_grads, rtol=1e-4, atol=1e-6)  # float32 noise: ~1e-6 here


class FakeLoader:
    """What VisionCache.build reads: batches with pixel_values and image_index, and .dataset.items."""

    def __init__(self, items, batches):
        self.dataset, self.batches = type("D", (), {"items": items})(), batches

    def __iter__(self):
        return iter(self.batches)


def test_cached_vision_gives_the_identical_loss_and_a_changed_key_rebuilds(tiny_blip2, tmp_path):
    from contextlib import nullcontext
    from data import ImageCaptions
    model = tiny_blip2()
    inject_lora(model)
    batch = batch_for(model)
    items = [ImageCaptions(f"img{i}.jpg", "", ["x"]) for i in range(3)]
    names = [i.name for i in items]
    cache = VisionCache(str(tmp_path), model, "tiny", "48x48", items, torch.float32)
    assert not cache.complete
    loader = FakeLoader(items, [{"pixel_values": batch["pixel_values"][:2], "image_index": torch.tensor([0, 1])},
                                {"pixel_values": batch["pixel_values"][2:], "image_index": torch.tensor([2])}])
    cache.build(model, loader, "cpu", nullcontext(), log=lambda *a: None)

    reopened = VisionCache(str(tmp_path), model, "tiny", "48x48", items, torch.float32)  # memory-mapped from disk
    assert reopened.complete and reopened.missing == set()
    with torch.no_grad():
        direct, _ = grouped_caption_loss(model, batch, vision_embeds(model, batch["pixel_values"]))
        cached, _ = grouped_caption_loss(model, batch, reopened.lookup(names, "cpu"))
    assert torch.equal(direct, cached)

    for changed in [dict(model_name="other"), dict(image_size="64x64"), dict(dtype=torch.bfloat16),
                    dict(items=items[::-1])]:
        args = dict(model_name="tiny", image_size="48x48", items=items, dtype=torch.float32) | changed
        other = VisionCache(str(tmp_path), model, args["model_name"], args["image_size"], args["items"],
                            args["dtype"])
        assert not other.complete and other.dir != reopened.dir  # a new key means a new cache, built again


def test_bench_times_the_step_train_py_takes():
    """bench.py's figures are about train.py's step: its LoRA settings, and no dropout but the adapters' own."""
    import bench
    import train
    model = bench.build("tiny", "cpu", torch.float32)
    layers = lora_layers(model)
    settings = (train.lora_r, train.lora_alpha, train.lora_dropout)
    assert layers and all((l.r, l.alpha, getattr(l.dropout, "p", 0.0)) == settings for _, l in layers)
    inside_adapters = {id(m) for _, l in layers for m in l.modules()}
    assert [name for name, m in model.named_modules() if m.training and id(m) not in inside_adapters] == []


def test_bench_json_has_the_keys_its_readers_use():
    import json
    from conftest import run_script
    result = run_script("bench.py", "--model", "tiny", "--repeats", "1", "--batch-images", "1,2", "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert {"commit", "torch", "transformers", "device", "dtype"} <= set(report)
    assert [run["batch_images"] for run in report["runs"]] == [1, 2]
    for run in report["runs"]:
        assert run["epoch_seconds_projected"] > 0 and run["generation"]["images_per_s"] > 0
        keys = {"captions_per_s", "peak_mem_mb", "first_step_s", "ops_per_step", "gflops_per_caption"}
        assert all(keys <= set(run[mode]) for mode in ("per_pair", "grouped", "grouped_cached"))
        # one vision and encoder pass per image does less work, and reading the cache skips the ViT's operations
        assert run["predicted_speedup_grouped_cached"] > run["predicted_speedup_grouped"] > 1
        assert run["grouped_cached"]["ops_per_step"] < run["grouped"]["ops_per_step"]


def test_a_damaged_cache_is_never_read_and_changed_images_get_a_new_one(tiny_blip2, tmp_path):
    from contextlib import nullcontext
    from data import ImageCaptions
    model = tiny_blip2()
    batch = batch_for(model)
    items = []
    for i in range(3):
        (tmp_path / f"img{i}.jpg").write_bytes(b"pixels %d" % i)  # the cache key reads size and time, not pixels
        items.append(ImageCaptions(f"img{i}.jpg", str(tmp_path / f"img{i}.jpg"), ["x"]))

    def open_cache():
        return VisionCache(str(tmp_path / "cache"), model, "tiny", "48x48", items, torch.float32)
    loader = FakeLoader(items, [{"pixel_values": batch["pixel_values"], "image_index": torch.tensor([0, 1, 2])}])
    open_cache().build(model, loader, "cpu", nullcontext(), log=lambda *a: None)
    built = open_cache()
    assert built.complete and built.problem is None
    bin_file, meta = os.path.join(built.dir, "vision.bin"), os.path.join(built.dir, "meta.json")

    os.truncate(bin_file, built.nbytes // 2)  # torch.from_file would silently extend this with zeros
    damaged = open_cache()
    assert not damaged.complete
    assert damaged.problem == f"vision.bin has {built.nbytes // 2:,} bytes, not {built.nbytes:,}"
    os.truncate(bin_file, built.nbytes)
    with open(meta, "w") as f:
        f.write("{garbage")
    assert not open_cache().complete and open_cache().problem == "its meta.json is unreadable"

    os.utime(items[1].path, ns=(1, 1))  # the same name, another file: a new cache, not the old outputs
    assert open_cache().dir != built.dir


def test_the_grouped_loss_traces_as_one_graph(tiny_blip2):
    """torch.compile sees one graph: a graph break (e.g. a Python check on a tensor's value) would split it, and
    train.py compiles with fullgraph=True, where a break is an error."""
    model = tiny_blip2()
    inject_lora(model)
    batch = batch_for(model)
    explanation = torch._dynamo.explain(grouped_caption_loss)(model, batch, vision_embeds(model, batch["pixel_values"]))
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons


def test_frozen_qformer_cast_once_to_bf16_gives_the_same_loss_and_gradients(tiny_blip2, random_lora_b):
    from model import autocast_context, cast_frozen_qformer
    batch = batch_for(tiny_blip2())
    results = []
    for cast in (False, True):
        model = tiny_blip2()  # the same seed: the same weights
        inject_lora(model)
        random_lora_b(model)
        if cast:
            cast_frozen_qformer(model, torch.bfloat16)
            assert model.qformer.encoder.layer[0].attention.attention.query.base.weight.dtype == torch.bfloat16
            assert model.qformer.layernorm.weight.dtype == torch.float32  # LayerNorms stay float32
        with autocast_context("cpu", torch.bfloat16):
            loss, tokens = grouped_caption_loss(model, batch, vision_embeds(model, batch["pixel_values"]))
        (loss / tokens).backward()
        results.append((loss.detach(), lora_grads(model)))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
