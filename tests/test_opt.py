"""BLIP-2 with OPT, as a user of Salesforce/blip2-opt-2.7b meets it, on the demo's OPT base: captions become OPT's
tokens, the demo learns, and its adapter works in evaluate.py, caption.py, peft and a merged export. (The loss itself,
prefix shared against per pair, is in test_fast.py with T5's.)"""
import json

import pytest
import torch
from PIL import Image

from conftest import demo_image_paths, resumes_exactly, run_main

DEMO_OPT_MODEL = "data/demo/blip2-opt-tiny"


@pytest.fixture(scope="module")
def opt_run(demo_world, tmp_path_factory):
    """python train.py config/demo_opt.py, into a temporary out_dir."""
    out_dir = tmp_path_factory.mktemp("demo_opt")
    code, out, err = run_main("train", "config/demo_opt.py", f"--out_dir={out_dir}")
    assert code == 0, err[-3000:]
    return out_dir, out


def test_a_caption_is_a_space_its_words_and_a_newline_with_no_bos(demo_world):
    """As LAVIS trains OPT: the caption follows the prompt's last word, so it starts with a space, has no BOS of its
    own, and ends with "\\n", the config's end token; the prompt is the image tokens, BOS, then the prompt's words."""
    from transformers import Blip2Config, Blip2Processor
    from data import prompt_ids
    from blip2lora.model import caption_tokenizer
    config, processor = Blip2Config.from_pretrained(DEMO_OPT_MODEL), Blip2Processor.from_pretrained(DEMO_OPT_MODEL)
    tokenizer = processor.tokenizer
    assert config.use_decoder_only_language_model
    assert tokenizer.convert_ids_to_tokens(config.text_config.eos_token_id) == "\n"
    (ids,) = caption_tokenizer(tokenizer, config)(["a big red circle"])
    assert tokenizer.convert_ids_to_tokens(ids) == ["a", "big", "red", "circle", "\n"]
    prompt = prompt_ids(tokenizer, "a photo of", config)
    assert prompt == [config.image_token_id] * config.num_query_tokens + [tokenizer.bos_token_id] + \
        tokenizer("a photo of", add_special_tokens=False).input_ids
    assert prompt == processor(images=Image.new("RGB", (20, 20)), text="a photo of").input_ids[0]


def test_the_opt_demo_learns_and_evaluate_and_caption_use_its_adapter(opt_run, demo_world):
    out_dir, out = opt_run
    results = json.load(open(out_dir / "results.json"))
    assert results["fine_tuned"]["CIDEr"] > 100 and results["fine_tuned"]["CIDEr"] >= 2 * results["zero_shot"]["CIDEr"]
    assert "LoRA: 20 layers" in out  # the Q-Former's 12 and OPT's q, k, v, out_proj in both decoder layers
    code, stdout, stderr = run_main("evaluate", "--adapter", out_dir / "adapter", "--num-beams", "2",
                                    "--html", out_dir / "test.html")
    assert code == 0 and "fine-tuned" in stdout and "zero-shot" in stdout, stderr[-2000:]
    images = demo_image_paths(demo_world, 4)
    code, stdout, stderr = run_main("caption", "--adapter", out_dir / "adapter", *images)
    assert code == 0, stderr[-2000:]
    captions = [line.split("\t")[1] for line in stdout.splitlines()]
    assert len(captions) == 4 and all("circle" in c and "\n" not in c and "<" not in c for c in captions)


def test_peft_and_a_merged_export_caption_as_caption_py(opt_run, demo_world, tmp_path):
    """The adapter loads in peft on the OPT base and gives caption.py's captions; so does the merged export with plain
    transformers, whose generate() returns the prompt before the caption (decode from its length on)."""
    peft = pytest.importorskip("peft")
    from transformers import Blip2ForConditionalGeneration, Blip2Processor
    from blip2lora.images import load_image
    out_dir, _ = opt_run
    images = demo_image_paths(demo_world, 20)
    _, ours, _ = run_main("caption", "--adapter", out_dir / "adapter", *images)
    expected = [line.split("\t")[1] for line in ours.splitlines()]
    processor = Blip2Processor.from_pretrained(DEMO_OPT_MODEL)
    inputs = processor(images=[load_image(i) for i in images], text=["a photo of"] * 20, return_tensors="pt")
    settings = dict(num_beams=5, max_new_tokens=30, min_new_tokens=8)
    theirs = peft.PeftModel.from_pretrained(Blip2ForConditionalGeneration.from_pretrained(DEMO_OPT_MODEL),
                                            str(out_dir / "adapter")).eval()
    code, _, err = run_main("caption", "--adapter", out_dir / "adapter", "--export-merged", tmp_path / "merged")
    assert code == 0, err[-2000:]
    merged = Blip2ForConditionalGeneration.from_pretrained(str(tmp_path / "merged"))
    for model, generation in ((theirs, settings), (merged, {"generation_config": merged.generation_config})):
        with torch.no_grad():
            ids = model.generate(**inputs, **generation)[:, inputs.input_ids.shape[1]:]
        assert [c.strip() for c in processor.tokenizer.batch_decode(ids, skip_special_tokens=True)] == expected


def test_a_run_on_the_opt_base_resumes_exactly(demo_world, tmp_path, monkeypatch):
    """Ctrl-C in the middle of a run on the OPT base, then the same command: the adapter an uninterrupted run gives,
    bit for bit (dropout on, so the random state is restored too)."""
    resumes_exactly(["config/demo_opt.py", "--max_steps=8", "--checkpoint_interval=2", "--eval_interval=0",
                     "--final_eval=False", "--lora_dropout=0.1"], tmp_path, monkeypatch)


@pytest.mark.parametrize("script, args, setting", [
    ("caption", ["--adapter", "none", "--model", "data/demo/blip2-opt-tiny", "--max-new-tokens", "512",
                 "--min-new-tokens", "300", "data/demo/flickr8k/Flicker8k_Dataset"], "max_new_tokens=512"),
    ("train", ["config/demo_opt.py", "--max_caption_tokens=300"], "max_caption_tokens=300"),
])
def test_tokens_past_opt_s_positions_are_one_line_before_any_work(demo_world, tmp_path, script, args, setting):
    """OPT's positions are learned, 128 for the demo base (2,048 for blip2-opt-2.7b): a prompt with more new or
    caption tokens than that would be an IndexError deep inside the model."""
    code, out, err = run_main(script, *args, *([f"--out_dir={tmp_path}"] if script == "train" else []))
    assert code == 1 and err.count("\n") == 1 and setting in err and "128 positions" in err
    assert "step " not in out
