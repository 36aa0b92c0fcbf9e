"""Captions from generation.py's beam search are transformers' generate() captions, token for token (float32, the
CPU), for both families, beams 1, 3 and 5, with the repetition controls too; the image side runs once per image and
every beam reads it; the decode step is one graph for torch.compile."""
import os

import pytest
import torch

from blip2lora.blip2 import embed_prompt, image_features, vision_embeds
from blip2lora.generation import caption_tokens as captions
from blip2lora.generation import generate_ids
from blip2lora.model import family, lora_targets
from data import prompt_ids
from lora import inject_lora

BASES = ["data/demo/blip2-tiny", "data/demo/blip2-opt-tiny", "data/demo/instructblip-tiny"]


def load(base):
    """(model, processor, prompt ids) of a demo base in eval mode, with the prompt its demo trains with (for the
    InstructBLIP base, the instruction its Q-Former reads too)."""
    from blip2lora.blip2 import is_instructblip, set_instruction
    from blip2lora.model import load_blip2
    model, processor = load_blip2(base, log=lambda *a: None)
    prompt = "A short image description:" if is_instructblip(model) else "a photo of"
    set_instruction(model, processor, prompt)
    return model.eval(), processor, prompt_ids(processor.tokenizer, prompt, model.config)


def with_adapter(model, random_lora_b):
    """The model with LoRA on the default targets and a non-zero B: generation goes through the adapters."""
    inject_lora(model, lora_targets(model.config))
    return random_lora_b(model, scale=0.02).eval()


def demo_images(model, processor, count):
    """(count, V, Dv): the ViT's outputs of the demo collection's first images."""
    from blip2lora.images import load_image
    from data import read_captions
    items = [item for split in read_captions("data/demo/flickr8k").splits.values() for item in split][:count]
    pixels = processor.image_processor([load_image(item.image) for item in items], return_tensors="pt").pixel_values
    with torch.no_grad():
        return vision_embeds(model, pixels)


def transformers_ids(model, prompt, embeds, **settings):
    """The language model's own generate() on the same inputs, as model.generate_captions(generation="transformers")
    calls it; T5's output starts with its decoder start token, which is not a new token."""
    text = model.config.text_config
    ids = torch.tensor(prompt).expand(embeds.shape[0], -1)
    with torch.no_grad():
        output = model.language_model.generate(inputs_embeds=embed_prompt(model, ids, image_features(model, embeds)),
                                               attention_mask=torch.ones_like(ids), eos_token_id=text.eos_token_id,
                                               pad_token_id=text.pad_token_id, **settings)
    return output[:, 1:] if model.config.text_config.is_encoder_decoder else output


def mean_log_prob(model, prompt, embeds, caption):
    """A caption's score as beam search ranks it (length penalty 1): its tokens' summed log-probability over their
    count, teacher-forced through the family's loss."""
    lm = family(model.config)
    batch = {"input_ids": torch.tensor([prompt]), "attention_mask": torch.ones(1, len(prompt), dtype=torch.long),
             "labels": torch.tensor([caption]), "caption_image": torch.zeros(1, dtype=torch.long)}
    with torch.no_grad():
        loss_sum, tokens = lm.grouped_caption_loss(model, batch, embeds[None])
    return -(loss_sum / tokens).item()


def assert_same_captions(model, prompt, embeds, ours, theirs, eos):
    """Token for token; where two captions differ, only because two candidates scored within 1e-5 (said)."""
    differ = [i for i, (a, b) in enumerate(zip(captions(ours, eos), captions(theirs, eos))) if a != b]
    for i in differ:
        a, b = captions(ours[i:i + 1], eos)[0], captions(theirs[i:i + 1], eos)[0]
        gap = abs(mean_log_prob(model, prompt, embeds[i], a) - mean_log_prob(model, prompt, embeds[i], b))
        assert gap < 1e-5, (i, a, b, gap)
        print(f"image {i}: a tie within {gap:.1e} decided the other way: {a} vs {b}")
    assert len(differ) <= len(ours) // 20, differ


@pytest.mark.parametrize("base", BASES)
def test_the_same_captions_as_transformers_on_100_images_for_beams_1_3_and_5(demo_world, base, random_lora_b):
    model, processor, prompt = load(base)
    model, embeds = with_adapter(model, random_lora_b), demo_images(model, processor, 100)
    settings = dict(max_new_tokens=20, min_new_tokens=6)
    for beams in (1, 3, 5):
        ours = generate_ids(model, family(model.config), prompt, embeds, num_beams=beams, **settings)
        theirs = transformers_ids(model, prompt, embeds, num_beams=beams, **settings)
        assert_same_captions(model, prompt, embeds, ours, theirs, model.config.text_config.eos_token_id)


@pytest.mark.parametrize("base", BASES)
def test_repetition_controls_give_transformers_captions_and_stop_repeats(demo_world, base, random_lora_b):
    """Made to write 14 tokens or more, the demo base repeats itself ("... black backdrop in in in in in");
    repetition_penalty and no_repeat_ngram_size change its captions exactly as transformers' processors do, and with
    no_repeat_ngram_size=2 no caption holds a pair of tokens twice."""
    model, processor, prompt = load(base)
    model, embeds = with_adapter(model, random_lora_b), demo_images(model, processor, 30)
    eos, lm, long = model.config.text_config.eos_token_id, family(model.config), dict(max_new_tokens=16,
                                                                                      min_new_tokens=14)
    for beams in (1, 3, 5):
        plain = captions(generate_ids(model, lm, prompt, embeds, num_beams=beams, **long), eos)
        assert any(len(set(zip(c, c[1:]))) < len(c) - 1 for c in plain)  # some pair of tokens repeats
        for controls in (dict(repetition_penalty=1.5), dict(no_repeat_ngram_size=2),
                         dict(repetition_penalty=1.3, no_repeat_ngram_size=3)):
            settings = dict(num_beams=beams, **long, **controls)
            ours = generate_ids(model, lm, prompt, embeds, **settings)
            assert_same_captions(model, prompt, embeds, ours, transformers_ids(model, prompt, embeds, **settings),
                                 eos)
            assert captions(ours, eos) != plain, controls
            if controls.get("no_repeat_ngram_size") == 2:
                assert all(len(set(zip(c, c[1:]))) == len(c) - 1 for c in captions(ours, eos))


@pytest.mark.parametrize("base", BASES)
def test_the_image_side_runs_once_per_image_and_every_beam_reads_it(demo_world, base):
    """The encoder (T5) or the prefix (OPT) sees B rows, once; the keys and values every beam reads are one per image
    (B, H, L, d), never B * beams copies; the first new token's scores are computed once per image (all its beams
    start alike); each later call sees one token per row of the images still going."""
    model, processor, prompt = load(base)
    lm = family(model.config)
    embeds = demo_images(model, processor, 4)
    shapes, first = [], model.language_model.get_input_embeddings()
    scored_rows = []  # the rows of each lm_head call
    hooks = [first.register_forward_hook(lambda module, args, out: shapes.append(tuple(args[0].shape))),
             model.language_model.lm_head.register_forward_hook(
                 lambda module, args, out: scored_rows.append(args[0].shape[0]))]
    try:
        with torch.no_grad():
            state, _ = lm.start_generation(model, torch.tensor(prompt).expand(4, -1), embeds, 5, 12)
            generate_ids(model, lm, prompt, embeds, num_beams=5, max_new_tokens=12, min_new_tokens=2)
    finally:
        for hook in hooks:
            hook.remove()
    # per layer, the key positions held: the image side once per image (4 x L) and each row's own 12 at most; a copy
    # per beam would hold 20 x L
    for i in range(len(state.keys)):
        held = sum(k.numel() // (k.shape[1] * k.shape[3]) for k in (*state.image_keys[i:i + 1], state.keys[i]))
        assert held <= 4 * len(prompt) + 20 * 12
    assert scored_rows[:3] == [4, 4, 20]  # each start_generation: 4 images; then the first decode step: 20 rows
    image_side = [s for s in shapes if len(s) == 2 and s[1] > 1]  # embedding lookups of more than one token
    assert image_side == [(4, len(prompt))] * 2  # the prompt's embeddings, once per image, in each of the two calls
    assert all(s[0] <= 20 and (len(s) == 1 or s[1] == 1) for s in shapes if s not in image_side)


@pytest.mark.parametrize("base", BASES)
def test_reordering_the_beams_holds_one_layers_new_cache_at_most(demo_world, base):
    """A reordering replaces the caches one layer at a time: at its peak it holds one new tensor beside the old ones
    (and its small index), never a new copy of every layer's (the evaluation's peak memory, memory.py's count)."""
    from blip2lora.memory import LiveBytes
    model, processor, prompt = load(base)
    embeds = demo_images(model, processor, 4)
    each_image_reversed = torch.arange(20) // 5 * 5 + torch.tensor([4, 3, 2, 1, 0]).repeat(4)  # beams stay in image
    with torch.no_grad(), LiveBytes() as counter:
        state, _ = family(model.config).start_generation(model, torch.tensor(prompt).expand(4, -1), embeds, 5, 12)
        counter.reset_peak()
        before = counter.live
        state.reorder(each_image_reversed)
    largest = max(cache.untyped_storage().nbytes() for cache in state.keys + state.values)
    assert len(state.keys) >= 2 and counter.peak - before <= 1.5 * largest


@pytest.mark.parametrize("base", BASES)
def test_the_decode_step_is_one_graph(demo_world, base):
    """torch.compile covers the whole decode step (CUDA graphs on a GPU): no graph break, whatever the step index."""
    import torch._dynamo
    model, processor, prompt = load(base)
    lm = family(model.config)
    with torch.no_grad():
        state, logits = lm.start_generation(model, torch.tensor(prompt).expand(2, -1), demo_images(model, processor, 2),
                                            3, 10)
        explained = torch._dynamo.explain(lm.decode_step)(model, state, logits.argmax(-1), torch.tensor(1))
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons


def test_the_demo_adapter_captions_as_transformers_and_peft_generate(demo_run, demo_world):
    """caption.py (generation.py's search) and a transformers user (peft on the base, generate() with the
    processor's inputs) write the same captions for the demo's 50 test images. (The OPT demo's: tests/test_opt.py.)"""
    peft = pytest.importorskip("peft")
    from transformers import Blip2ForConditionalGeneration, Blip2Processor
    from blip2lora.images import load_image
    from conftest import run_main
    from data import read_captions
    adapter = os.path.join(demo_run[0], "adapter")
    images = [item.image for item in read_captions(demo_world[0]).splits["test"]]
    code, out, err = run_main("caption", "--adapter", adapter, *images)
    assert code == 0, err[-2000:]
    ours = [line.split("\t")[1] for line in out.splitlines()]
    processor = Blip2Processor.from_pretrained(demo_world[1])
    inputs = processor(images=[load_image(i) for i in images], text=["a photo of"] * len(images), return_tensors="pt")
    theirs = peft.PeftModel.from_pretrained(Blip2ForConditionalGeneration.from_pretrained(demo_world[1]), adapter)
    with torch.no_grad():
        ids = theirs.eval().generate(**inputs, num_beams=5, max_new_tokens=30, min_new_tokens=8)
    assert [c.strip() for c in processor.tokenizer.batch_decode(ids, skip_special_tokens=True)] == ours
