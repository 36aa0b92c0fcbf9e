"""InstructBLIP, as a user of Salesforce/instructblip-vicuna-7b meets it, on the demo's InstructBLIP base (a LLaMA
language model): the Q-Former reads the instruction as transformers' does, the demo learns, the instruction travels
with the adapter, and the adapter works in evaluate.py, caption.py, peft and a merged export. The prefix-shared loss
of InstructBLIP with each family equals the per-pair one."""
import json

import pytest
import torch

from conftest import demo_image_paths, resumes_exactly, run_main

BASE = "data/demo/instructblip-tiny"
INSTRUCTION = "A short image description:"


@pytest.fixture(scope="module")
def instructblip_run(demo_world, tmp_path_factory):
    """python train.py config/demo_instructblip.py, into a temporary out_dir."""
    out_dir = tmp_path_factory.mktemp("demo_instructblip")
    code, out, err = run_main("train", "config/demo_instructblip.py", f"--out_dir={out_dir}")
    assert code == 0, err[-3000:]
    return out_dir, out


def test_the_qformer_reads_the_instruction_as_transformers_does(demo_world):
    """image_features (the grouped loss's and generation's) equal transformers' get_image_features with the
    processor's qformer_input_ids, and another instruction gives other features."""
    from blip2lora.blip2 import image_features, set_instruction, vision_embeds
    from blip2lora.images import load_image
    from blip2lora.model import load_blip2
    model, processor = load_blip2(BASE, log=lambda *a: None)
    images = [load_image(path) for path in demo_image_paths(demo_world, 3)]
    inputs = processor(images=images, text=[INSTRUCTION] * 3, return_tensors="pt")
    set_instruction(model, processor, INSTRUCTION)
    with torch.no_grad():
        ours = image_features(model, vision_embeds(model, inputs.pixel_values))
        theirs = model.get_image_features(pixel_values=inputs.pixel_values, qformer_input_ids=inputs.qformer_input_ids,
                                          qformer_attention_mask=inputs.qformer_attention_mask).pooler_output
        set_instruction(model, processor, "a photo of")
        other = image_features(model, vision_embeds(model, inputs.pixel_values))
    assert torch.allclose(ours, theirs, atol=1e-6) and not torch.allclose(ours, other, atol=1e-3)


@pytest.mark.parametrize("family", ["t5", "opt", "llama"])
def test_an_instructblip_s_grouped_loss_equals_per_pair_for_every_family(family, random_lora_b, monkeypatch):
    """A tiny InstructBLIP of each family, in float64: the prefix-shared loss (the Q-Former with the instruction
    once per image) against transformers' whole forward per pair with qformer_input_ids, loss and LoRA gradients
    (T5 to float32's rounding, as in test_fast.py)."""
    import demo
    from blip2lora import llama, opt, t5
    from blip2lora.model import lora_targets
    from lora import inject_lora
    from test_fast import batch_for, llama_in_float64, loss_and_grads
    from transformers import InstructBlipForConditionalGeneration
    lm = {"t5": t5, "opt": opt, "llama": llama}[family]
    if lm is llama:
        llama_in_float64(monkeypatch)
    torch.manual_seed(0)
    model = InstructBlipForConditionalGeneration(demo.tiny_config(48, 47, lm=lm, qformer_vocab_size=20)).eval()
    torch.nn.init.normal_(model.query_tokens, std=0.02)
    model.instruction_ids = torch.tensor([[2, 7, 11, 5, 3]])  # [CLS] four words [SEP], in the Q-Former's vocabulary
    inject_lora(model, lora_targets(model.config))
    random_lora_b(model)
    model.double()
    batch = batch_for(model, captions_per_image=(5, 1, 3))
    batch["pixel_values"] = batch["pixel_values"].double()
    from blip2lora.blip2 import vision_embeds
    per_pair, per_pair_grads = loss_and_grads(model, lm.per_pair_caption_loss, batch)
    grouped, grouped_grads = loss_and_grads(model, lm.grouped_caption_loss, batch,
                                            vision_embeds(model, batch["pixel_values"]))
    exact = 1e-6 if lm is t5 else 1e-10
    assert abs(per_pair - grouped) <= exact * abs(per_pair)
    assert all((a - b).abs().max() <= exact * a.abs().max() for a, b in zip(per_pair_grads, grouped_grads))


def test_the_instructblip_demo_learns_and_the_instruction_travels_with_the_adapter(instructblip_run, demo_world):
    out_dir, out = instructblip_run
    results = json.load(open(out_dir / "results.json"))
    assert results["fine_tuned"]["CIDEr"] > 100 and results["fine_tuned"]["CIDEr"] >= 2 * results["zero_shot"]["CIDEr"]
    assert "LoRA: 20 layers" in out  # the Q-Former's 12 and LLaMA's q, k, v, o_proj in both layers
    assert json.load(open(out_dir / "adapter" / "caption_settings.json"))["prompt"] == INSTRUCTION
    card = open(out_dir / "adapter" / "README.md").read()
    assert "InstructBLIP LoRA adapter" in card and f"the instruction {INSTRUCTION!r}" in card
    assert "InstructBlipForConditionalGeneration.from_pretrained(base)" in card
    code, stdout, stderr = run_main("evaluate", "--adapter", out_dir / "adapter", "--num-beams", "2")
    assert code == 0 and "fine-tuned" in stdout, stderr[-2000:]
    code, stdout, stderr = run_main("caption", "--adapter", out_dir / "adapter", *demo_image_paths(demo_world, 4))
    assert code == 0, stderr[-2000:]
    assert all("circle" in line.split("\t")[1] for line in stdout.splitlines())


def test_peft_and_a_merged_export_caption_as_caption_py(instructblip_run, demo_world, tmp_path):
    """The adapter loads in peft on InstructBlipForConditionalGeneration and, given the processor's inputs for the
    instruction (qformer_input_ids too), writes caption.py's captions; so does the merged export, with transformers
    alone."""
    peft = pytest.importorskip("peft")
    from transformers import InstructBlipForConditionalGeneration, InstructBlipProcessor
    from blip2lora.images import load_image
    out_dir, _ = instructblip_run
    images = demo_image_paths(demo_world, 20)
    _, ours, _ = run_main("caption", "--adapter", out_dir / "adapter", *images)
    expected = [line.split("\t")[1] for line in ours.splitlines()]
    processor = InstructBlipProcessor.from_pretrained(BASE)
    inputs = processor(images=[load_image(i) for i in images], text=[INSTRUCTION] * 20, return_tensors="pt")
    settings = dict(num_beams=5, max_new_tokens=30, min_new_tokens=8)
    theirs = peft.PeftModel.from_pretrained(InstructBlipForConditionalGeneration.from_pretrained(BASE),
                                            str(out_dir / "adapter")).eval()
    code, _, err = run_main("caption", "--adapter", out_dir / "adapter", "--export-merged", tmp_path / "merged")
    assert code == 0, err[-2000:]
    merged = InstructBlipForConditionalGeneration.from_pretrained(str(tmp_path / "merged"))
    for model, generation in ((theirs, settings), (merged, {"generation_config": merged.generation_config})):
        with torch.no_grad():
            ids = model.generate(**inputs, **generation)[:, inputs.input_ids.shape[1]:]
        assert [c.strip() for c in processor.tokenizer.batch_decode(ids, skip_special_tokens=True)] == expected


def test_an_instructblip_base_gets_its_captioning_instruction_when_no_prompt_is_set(demo_world, tmp_path):
    """BLIP-2's default prompt ("a photo of") means InstructBLIP's captioning instruction on an InstructBLIP base, the
    same on every run of the command (the run below finishes, then is found finished, not refused as changed)."""
    run = ["train", f"--model={BASE}", "--data_dir=data/demo/flickr8k", "--max_steps=1", "--eval_interval=0",
           "--final_eval=False", "--num_workers=0", f"--out_dir={tmp_path}"]
    code, _, err = run_main(*run)
    assert code == 0, err[-2000:]
    assert json.load(open(tmp_path / "adapter" / "caption_settings.json"))["prompt"] == INSTRUCTION
    code, out, err = run_main(*run)
    assert code == 0 and "this run has finished" in out, err[-2000:]


def test_a_run_with_a_4bit_llama_and_checkpointing_resumes_exactly(demo_world, tmp_path, monkeypatch):
    """The InstructBLIP base with its LLaMA in 4 bits and gradient checkpointing: Ctrl-C at step 6 of 8, then the
    same command, gives the adapter an uninterrupted run gives, bit for bit (dropout on)."""
    resumes_exactly(["config/demo_instructblip.py", "--base_bits=4", "--gradient_checkpointing=True", "--max_steps=8",
                     "--checkpoint_interval=2", "--eval_interval=0", "--final_eval=False", "--lora_dropout=0.1"],
                    tmp_path, monkeypatch)


def test_an_instructblip_with_flan_t5_trains_and_captions_from_its_folder(demo_world, tmp_path):
    """The Flan-T5 InstructBLIPs' path, at toy size: an InstructBLIP with a T5 language model saved with
    save_pretrained (random weights, the demo's words in both tokenizers) loads, trains two steps with its
    instruction and captions through caption.py with the adapter."""
    import demo
    from blip2lora import t5
    from transformers import InstructBlipForConditionalGeneration
    processor = demo.build_processor(lm=t5, instruct=True)
    torch.manual_seed(0)
    InstructBlipForConditionalGeneration(demo.processor_config(processor, t5)).save_pretrained(tmp_path / "base")
    processor.save_pretrained(tmp_path / "base")
    code, out, err = run_main("train", f"--model={tmp_path / 'base'}", "--data_dir=data/demo/flickr8k",
                              "--max_steps=2", "--batch_images=4", "--eval_interval=0", "--final_eval=False",
                              "--num_workers=0", f"--out_dir={tmp_path / 'out'}")
    assert code == 0, err[-2000:]
    assert "LoRA: 36 layers" in out  # the Q-Former's 12 and T5's attention: 2 encoder layers x 4, 2 decoder x 8
    assert json.load(open(tmp_path / "out" / "adapter" / "caption_settings.json"))["prompt"] == INSTRUCTION
    code, stdout, err = run_main("caption", "--adapter", tmp_path / "out" / "adapter", "--max-new-tokens", "5",
                                 "--min-new-tokens", "1", *demo_image_paths(demo_world, 2))
    assert code == 0 and len(stdout.splitlines()) == 2, err[-2000:]


def test_a_llama_sharing_keys_across_heads_is_one_line_before_its_weights(demo_world, tmp_path):
    """A LLaMA with fewer key/value heads than heads (grouped-query attention) is refused from its config: the decode
    step attends with one key per head."""
    import shutil
    folder = tmp_path / "model"
    shutil.copytree(BASE, folder)
    (folder / "model.safetensors").write_bytes(b"")
    config = json.load(open(folder / "config.json"))
    config["text_config"]["num_key_value_heads"] = 2
    (folder / "config.json").write_text(json.dumps(config))
    code, _, err = run_main("caption", "--adapter", "none", "--model", folder, "photo.jpg")
    assert code == 1 and err.count("\n") == 1 and "(2 for 4 heads)" in err
