"""Fits the GPU you have: the peak-memory prediction is a count of real tensors, the memory levers do what they
say, and a 4-bit base still fine-tunes into an adapter the 16-bit base (and peft) can use."""
import json
import os

import pytest
import torch

from blip2lora import memory
from conftest import run_main
from train import SETTINGS, train_step


def shapes_batch(config, images):
    import bench
    batch, _ = bench.make_batch(config, images, "cpu")
    batch.pop("pixel_values")  # the step reads the ViT's outputs from the vision cache
    return batch


@pytest.mark.parametrize("levers", [memory.Levers(), memory.Levers(gradient_checkpointing=True),
                                    memory.Levers(vision_on_gpu=True)])
def test_the_prediction_is_the_count_of_real_tensors(levers):
    """The same step, counted the same way, on fake tensors and on real ones (bench.py's small model, bf16): the
    weights to the byte; the step and generation peaks within 1%. (Libraries take other code paths for fake tensors
    in a few places: transformers builds attention masks explicitly, clip_grad_norm_ uses no foreach kernel; here
    that is a fraction of a percent.)"""
    import bench
    config, batch = bench.blip2_config("small"), None
    batch = shapes_batch(config, 2)
    fake = memory.predict(config, batch, torch.bfloat16, levers, SETTINGS, train_step, eval_batch=2)
    real = memory.predict(config, batch, torch.bfloat16, levers, SETTINGS, train_step, eval_batch=2, fake=False)
    assert fake["frozen_weights"] == real["frozen_weights"] and fake["language_model_weights"] == real[
        "language_model_weights"]
    assert fake["predicted_peak"] == pytest.approx(real["predicted_peak"], rel=0.01)
    assert fake["generation_peak"] == pytest.approx(real["generation_peak"], rel=0.01)


@pytest.mark.parametrize("base, bits", [("data/demo/blip2-tiny", 4), ("data/demo/blip2-tiny", 8),
                                        ("data/demo/blip2-opt-tiny", 4)])
def test_a_quantized_base_is_predicted_as_bitsandbytes_holds_it(demo_world, base, bits):
    """The 4/8-bit base is emulated in the prediction; counted with bitsandbytes' real layers (they run on the CPU)
    the same step agrees within 5%: an independent count. bitsandbytes quantizes the language model's Linear layers
    and nothing else: not the ViT, the Q-Former, the projection, lm_head, nor T5's wo."""
    from transformers import Blip2Config
    from blip2lora.model import load_blip2, prepare_for_training
    config = Blip2Config.from_pretrained(base)
    batch, levers = shapes_batch(config, 4), memory.Levers(base_bits=bits)
    predicted = memory.predict(config, batch, torch.bfloat16, levers, SETTINGS, train_step, eval_batch=4,
                               released=False)
    model, _ = load_blip2(base, "cpu", dtype=torch.bfloat16, base_bits=bits, log=lambda *a: None)
    quantized = [name for name, m in model.named_modules() if type(m).__module__.startswith("bitsandbytes")]
    assert quantized and all(n.startswith("language_model.") and not n.endswith(("lm_head", "wo")) for n in quantized)
    assert len(quantized) == sum(isinstance(m, torch.nn.Linear) for m in model.language_model.modules()) - (
        1 + (config.text_config.num_layers * 2 if not config.use_decoder_only_language_model else 0))
    prepare_for_training(model, torch.bfloat16, SETTINGS)  # as train.py prepares it
    counted = memory.predict(config, batch, torch.bfloat16, levers, SETTINGS, train_step, eval_batch=4, model=model)
    for key in ("language_model_weights", "predicted_peak", "generation_peak"):
        assert predicted[key] == pytest.approx(counted[key], rel=0.05), key


def test_bench_memory_gives_each_lever_combination_its_peak():
    code, out, err = run_main("bench", "--model", "tiny", "--memory", "--batch-images", "1,4", "--base_bits", "16,4",
                              "--gradient_checkpointing", "False,True", "--eval-batch", "2", "--json")
    assert code in (0, None), err[-2000:]
    report = json.loads(out)
    runs = {(r["batch_images"], r["base_bits"], r["gradient_checkpointing"]): r for r in report["runs"]}
    assert len(runs) == 8 and all(r["vision_on_gpu"] is False and r["predicted_peak_gb"] > 0 for r in runs.values())
    for r in runs.values():  # the breakdown adds up to the peak (each rounded to 0.0001 GB)
        parts = r["frozen_weights_gb"] + r["lora_weights_grads_adamw_gb"] + r["activations_peak_gb"]
        assert parts == pytest.approx(r["predicted_peak_gb"], abs=0.0003)
    assert report["dtype"] == "bfloat16" and "CUDA context" in report["not_counted"]


def test_memory_takes_the_steps_shape_from_a_collection_or_from_the_options(demo_world):
    """A user's captions are not Flickr8k's: --data takes captions per image and the 95th percentile of their length
    in the model's tokens (the demo's five templates give 10, 11, 10, 12 and 10 tokens with the end token)."""
    def shape(*args):
        code, out, err = run_main("bench", "--model", "tiny", "--memory", "--batch-images", "1", "--eval-batch", "1",
                                  "--json", *args)
        assert code == 0, err[-2000:]
        report = json.loads(out)
        return report["step_shape"], len(report["runs"])
    for arch in ("flan-t5-xl", "opt-2.7b"):
        found, runs = shape("--arch", arch, "--data", demo_world[0])
        assert (found["captions_per_image"], found["caption_tokens"], runs) == (5, 12, 1)
        assert found["source"].startswith(f"{demo_world[0]}: 5 captions per image") and "by its tokenizer" in found[
            "source"]
    given, _ = shape("--captions-per-image", "3", "--caption-tokens", "20")
    assert (given["captions_per_image"], given["caption_tokens"]) == (3, 20) and "--caption-tokens" in given["source"]


def test_the_levers_lower_the_full_models_predicted_peak():
    """On blip2-flan-t5-xl (fake tensors: seconds, no memory): checkpointing at least halves the activations, 4-bit
    at least halves the language model's weights, and keeping the ViT on the GPU costs its 2 GB."""
    import bench
    config = bench.blip2_config("full")
    batch = shapes_batch(config, 4)
    plain = memory.predict(config, batch, torch.bfloat16, memory.Levers(), SETTINGS, train_step, eval_batch=1)
    levers = memory.predict(config, batch, torch.bfloat16, memory.Levers(4, True, True), SETTINGS, train_step,
                            eval_batch=1)
    assert levers["activations_peak"] < plain["activations_peak"] / 2
    assert levers["language_model_weights"] < plain["language_model_weights"] / 2
    rest = [r["frozen_weights"] - r["language_model_weights"] for r in (plain, levers)]
    assert rest[1] - rest[0] > 1.9e9  # ViT-g: 986M parameters in bf16


def test_a_4bit_base_gives_nearly_the_16bit_loss_and_without_bitsandbytes_says_what_to_install(demo_world,
                                                                                                 monkeypatch):
    """NF4 rounds every T5 weight, so the loss is not the same; on the demo base it stays within 5%."""
    import builtins
    from blip2lora.blip2 import vision_embeds
    from conftest import collate
    from data import read_captions
    from blip2lora.model import ModelError, grouped_caption_loss, load_blip2
    losses = []
    for bits in (16, 4):
        model, processor = load_blip2(demo_world[1], base_bits=bits, log=lambda *a: None)
        batch = collate(model, processor, read_captions(demo_world[0]).splits["train"][:8])
        with torch.no_grad():
            loss, tokens = grouped_caption_loss(model, batch, vision_embeds(model, batch["pixel_values"]))
        losses.append((loss / tokens).item())
    assert losses[1] == pytest.approx(losses[0], rel=0.05) and losses[1] != losses[0]
    real_import = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                        if name == "bitsandbytes" else real_import(name, *a, **k))
    with pytest.raises(ModelError, match="base_bits=4 needs bitsandbytes: pip install bitsandbytes"):
        load_blip2(demo_world[1], base_bits=4)


def test_a_4bit_base_trains_the_same_whether_an_evaluation_ran_first(demo_world):
    """bitsandbytes repacks 4-bit weights for bf16 matmuls on CPUs with AVX512-BF16 at the first forward without
    gradients; the training loss after an evaluation must be the one without it, bit for bit, on any CPU."""
    from blip2lora.blip2 import train_mode, vision_embeds
    from blip2lora.model import grouped_caption_loss, load_blip2, prepare_for_training
    from conftest import collate
    from data import read_captions
    losses = []
    for evaluate_first in (False, True):
        model, processor = load_blip2(demo_world[1], base_bits=4, log=lambda *a: None)
        prepare_for_training(model, torch.float32, SETTINGS)
        batch = collate(model, processor, read_captions(demo_world[0]).splits["train"][:4])
        embeds = vision_embeds(model, batch["pixel_values"])
        if evaluate_first:
            with torch.no_grad():
                model.eval()
                grouped_caption_loss(model, batch, embeds)
            train_mode(model)  # as train.py after a val evaluation: only the adapters in train mode
        loss, tokens = grouped_caption_loss(model, batch, embeds)
        losses.append((loss / tokens).item())
    assert losses[0] == losses[1]


def test_the_demo_on_a_4bit_base_learns_and_its_adapter_loads_on_the_16bit_base(demo_world, tmp_path):
    """python train.py config/demo.py --base_bits=4 --gradient_checkpointing=True: the base's T5 in NF4, its blocks
    recomputed in the backward pass; the adapter is the usual file, which peft loads on the 16-bit base."""
    peft = pytest.importorskip("peft")
    from transformers import Blip2ForConditionalGeneration
    from blip2lora.adapter_files import load_adapter
    out = tmp_path / "demo4"
    code, stdout, err = run_main("train", "config/demo.py", "--base_bits=4", "--gradient_checkpointing=True",
                                 "--epochs=2", "--eval_interval=0", f"--out_dir={out}")
    assert code == 0, err[-2000:]
    results = json.load(open(out / "results.json"))
    assert results["fine_tuned"]["CIDEr"] > 100 and results["fine_tuned"]["CIDEr"] > 10 * results["zero_shot"]["CIDEr"]
    ours = Blip2ForConditionalGeneration.from_pretrained(demo_world[1]).eval()
    load_adapter(ours, str(out / "adapter"))
    theirs = peft.PeftModel.from_pretrained(Blip2ForConditionalGeneration.from_pretrained(demo_world[1]),
                                            str(out / "adapter")).eval()
    config = ours.config
    x = {"pixel_values": torch.randn(2, 3, 48, 48), "decoder_input_ids": torch.tensor([[0, 7, 9]] * 2),
         "input_ids": torch.tensor([[config.image_token_id] * 8 + [5, 1]] * 2)}
    with torch.no_grad():
        assert torch.allclose(ours(**x).logits, theirs(**x).logits, atol=1e-5)
    assert os.path.isfile(out / "report.html")


def test_an_8bit_run_says_each_bitsandbytes_notice_once(demo_world, tmp_path):
    """bitsandbytes logs its notice at every 8-bit matmul (24 lines in 3 steps of the demo): once is enough."""
    pytest.importorskip("bitsandbytes")
    code, out, err = run_main("train", "config/demo.py", "--base_bits=8", "--max_steps=3", "--eval_interval=0",
                              "--final_eval=False", f"--out_dir={tmp_path}")
    assert code == 0, err[-2000:]
    lines = [line for line in (out + err).splitlines() if "MatMul8bitLt" in line]
    assert len(lines) <= 1 and "step 3/" in out
