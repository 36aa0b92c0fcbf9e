"""evaluate.py and caption.py: the toolkit's numbers, clear errors, captions that match the standard inference path."""
import json
import os

import pytest
import torch

from conftest import run_script
from evaluate import score_captions

REFERENCES = {"a.jpg": ["A dog runs on the grass .", "A brown dog is running outside", "dog on grass"],
              "b.jpg": ["Two children play in the water .", "kids splash in a lake", "Children , swimming ."],
              "c.jpg": ["A man rides a bike", "a cyclist on a road .", "A man is riding his bicycle ."]}
PREDICTIONS = {"a.jpg": "a dog running on grass", "b.jpg": "two kids playing in water", "c.jpg": "a man on a bike"}


def test_scores_equal_direct_pycocoevalcap_calls():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({k: [{"caption": c} for c in v] for k, v in REFERENCES.items()})
    res = tokenizer.tokenize({k: [{"caption": v}] for k, v in PREDICTIONS.items()})
    expected = dict(zip(["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"], Bleu(4).compute_score(gts, res)[0]))
    expected["METEOR"] = Meteor().compute_score(gts, res)[0]
    expected["ROUGE_L"] = Rouge().compute_score(gts, res)[0]
    expected["CIDEr"] = Cider().compute_score(gts, res)[0]
    assert score_captions(PREDICTIONS, REFERENCES) == pytest.approx(expected, abs=1e-12)


def test_scoring_cut_short_inside_meteor_does_not_hang_the_process():
    """A Ctrl-C (or a Java crash) inside METEOR must not leave the process stuck on exit."""
    program = (
        "import pycocoevalcap.meteor.meteor as m, evaluate\n"
        "def cut_short(*args): raise KeyboardInterrupt\n"
        "m.Meteor._stat = cut_short\n"
        "try:\n"
        f"    evaluate.score_captions({PREDICTIONS!r}, {REFERENCES!r})\n"
        "except KeyboardInterrupt:\n"
        "    print('interrupted')\n")
    result = run_script("-c", program, timeout=60)  # hangs for ever (TimeoutExpired) if the lock is left held
    assert result.returncode == 0 and result.stdout.strip() == "interrupted", result.stderr[-2000:]


def test_a_perfect_caption_scores_higher_than_a_wrong_one():
    good = score_captions({k: v[0] for k, v in REFERENCES.items()}, REFERENCES, metrics=("CIDEr", "Bleu_4"))
    bad = score_captions({k: "a red car" for k in REFERENCES}, REFERENCES, metrics=("CIDEr", "Bleu_4"))
    assert set(good) == {"CIDEr", "Bleu_4"} and good["CIDEr"] > bad["CIDEr"]


def test_predictions_file_missing_an_image_or_naming_a_stranger_is_an_error(demo_world, tmp_path):
    from data import read_captions
    names = [i.name for i in read_captions(demo_world[0]).splits["test"]]
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({n: "a red circle" for n in names[:-1]}))
    result = run_script("evaluate.py", "--adapter", "none", "--model", demo_world[1], "--predictions", str(partial))
    assert result.returncode == 1 and f"no caption for '{names[-1]}'" in result.stderr
    stranger = tmp_path / "stranger.json"
    stranger.write_text(json.dumps({**{n: "x" for n in names}, "not_in_split.jpg": "x"}))
    result = run_script("evaluate.py", "--adapter", "none", "--model", demo_world[1], "--predictions", str(stranger))
    assert result.returncode == 1 and "'not_in_split.jpg' is not an image of the test split" in result.stderr
    assert "Traceback" not in result.stderr


def test_evaluate_an_adapter_writes_json_and_a_page_with_every_image(demo_run, tmp_path):
    out_dir, _ = demo_run
    out, page = tmp_path / "scores.json", tmp_path / "report.html"
    result = run_script("evaluate.py", "--adapter", os.path.join(out_dir, "adapter"), "--split", "val",
                        "--num-beams", "2", "--out", str(out), "--html", str(page))  # html: zero-shot too
    assert result.returncode == 0, result.stderr[-2000:]
    assert "CIDEr" in result.stdout and "zero-shot" in result.stdout and "fine-tuned" in result.stdout
    assert f"report: {page}" in result.stdout and f"scores and captions: {out}" in result.stdout
    report = json.load(open(out))
    assert set(report["metrics"]) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"}
    assert report["settings"]["num_beams"] == 2 and report["settings"]["model"] == "data/demo/blip2-tiny"
    assert len(report["captions"]) == 50 and len(report["captions"][0]["references"]) == 5
    html = page.read_text()
    assert html.count("<img src='data:image/jpeg;base64,") == 50  # self-contained: every image embedded
    assert "Scores x100" in html and html.count("zero-shot: ") == 50  # the base's caption beside each one
    # the images appear lowest CIDEr first: the failures are on the first screen
    by_cider = sorted(report["captions"], key=lambda c: c["cider"])
    positions = [html.index(f"<div>{c['image']}</div>") for c in by_cider]
    assert positions == sorted(positions) and by_cider[0]["cider"] < by_cider[-1]["cider"]


@pytest.fixture
def bad_inputs(tmp_path, demo_world):
    text = tmp_path / "notes.txt.jpg"
    text.write_text("not an image")
    corrupt = tmp_path / "corrupt.jpg"
    first = sorted(os.listdir(os.path.join(demo_world[0], "Flicker8k_Dataset")))[0]
    corrupt.write_bytes(open(os.path.join(demo_world[0], "Flicker8k_Dataset", first), "rb").read()[:150])
    (tmp_path / "no_images").mkdir()
    return [str(tmp_path / "missing.jpg"), str(text), str(corrupt), str(tmp_path / "no_images")]


def test_caption_without_adapter_reports_bad_inputs_and_captions_the_rest(demo_world, bad_inputs):
    good = os.path.join(demo_world[0], "Flicker8k_Dataset")
    images = sorted(os.listdir(good))[:3]
    result = run_script("caption.py", "--adapter", "none", "--model", demo_world[1], *bad_inputs,
                        *[os.path.join(good, n) for n in images])
    assert result.returncode == 1
    lines = result.stdout.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == [os.path.join(good, n) for n in images]
    assert all(len(line.split("\t")[1]) > 0 for line in lines)
    for bad in bad_inputs:
        assert sum(bad in line for line in result.stderr.splitlines()) == 1
    assert "Traceback" not in result.stderr


def test_caption_a_directory_with_the_trained_adapter(demo_run, demo_world, tmp_path):
    out_dir, _ = demo_run
    source = os.path.join(demo_world[0], "Flicker8k_Dataset")
    folder = tmp_path / "photos"  # 60 of the demo's images: a folder of someone's photos
    folder.mkdir()
    for name in sorted(os.listdir(source))[::5]:
        os.symlink(os.path.abspath(os.path.join(source, name)), folder / name)
    result = run_script("caption.py", "--adapter", os.path.join(out_dir, "adapter"), "--num-beams", "1", str(folder))
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert len(lines) == len(os.listdir(folder)) == 60
    assert sum("circle" in line for line in lines) > 50  # the demo captions' style, learned by the adapter
    base = run_script("caption.py", "--adapter", "none", "--model", demo_world[1], "--num-beams", "1",
                      os.path.join(source, sorted(os.listdir(source))[0]))
    assert "zero-shot" in base.stderr and "backdrop" in base.stdout  # the base model's own style


def test_split_generation_equals_the_standard_inference_path(demo_run, demo_world):
    """generate_captions (used with the vision cache) == model.generate(**Blip2Processor(images, text=prompt))."""
    from data import encoder_prompt_ids, load_rgb, read_captions
    from lora import load_adapter
    from model import generate_captions, load_blip2, vision_embeds
    model, processor = load_blip2(demo_world[1])
    load_adapter(model, os.path.join(demo_run[0], "adapter"))
    images = [load_rgb(i.path) for i in read_captions(demo_world[0]).splits["test"][:6]]
    inputs = processor(images=images, text=["a photo of"] * 6, return_tensors="pt")
    with torch.no_grad():
        standard = processor.tokenizer.batch_decode(model.generate(**inputs, num_beams=3, max_new_tokens=20),
                                                    skip_special_tokens=True)
    prompt_ids = encoder_prompt_ids(processor.tokenizer, "a photo of", 8, model.config.image_token_id)
    split = generate_captions(model, processor.tokenizer, prompt_ids, vision_embeds(model, inputs.pixel_values),
                              num_beams=3, max_new_tokens=20, min_new_tokens=0)
    assert [s.strip() for s in standard] == split


def test_exported_merged_model_captions_like_base_plus_adapter(demo_run, demo_world, tmp_path):
    out_dir, _ = demo_run
    merged = tmp_path / "merged"
    result = run_script("caption.py", "--adapter", os.path.join(out_dir, "adapter"), "--export-merged", str(merged))
    assert result.returncode == 0, result.stderr[-2000:]
    from transformers import Blip2ForConditionalGeneration
    model = Blip2ForConditionalGeneration.from_pretrained(str(merged))  # plain transformers, no LoRA anywhere
    assert not any("lora" in name for name, _ in model.named_parameters())
    folder = os.path.join(demo_world[0], "Flicker8k_Dataset")
    images = [os.path.join(folder, n) for n in sorted(os.listdir(folder))[:8]]
    with_adapter = run_script("caption.py", "--adapter", os.path.join(out_dir, "adapter"), "--num-beams", "1", *images)
    from_merged = run_script("caption.py", "--adapter", "none", "--model", str(merged), "--num-beams", "1", *images)
    assert with_adapter.stdout == from_merged.stdout and len(with_adapter.stdout.splitlines()) == 8


def test_spice_that_cannot_run_is_one_line_and_the_rest_is_reported(demo_world, tmp_path):
    from data import read_captions
    predictions = tmp_path / "predictions.json"
    predictions.write_text(json.dumps({i.name: i.captions[0] for i in read_captions(demo_world[0]).splits["test"]}))
    result = run_script("evaluate.py", "--adapter", "none", "--model", demo_world[1], "--predictions",
                        str(predictions), "--spice", "--out", str(tmp_path / "scores.json"))
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.load(open(tmp_path / "scores.json"))["metrics"]
    assert metrics["CIDEr"] > 1.0 and "METEOR" in metrics
    if "SPICE" not in metrics:  # offline, or a Java newer than SPICE supports
        spice_lines = [line for line in result.stderr.splitlines() if "SPICE" in line]
        assert len(spice_lines) == 1 and "could not run" in spice_lines[0]


@pytest.mark.parametrize("script", ["caption.py", "evaluate.py"])
def test_a_directory_that_is_not_an_adapter_is_one_line(tmp_path, script):
    result = run_script(script, "--adapter", str(tmp_path), *(["x.jpg"] if script == "caption.py" else []))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "not an adapter directory" in errors[0]


@pytest.mark.parametrize("script", ["caption.py", "evaluate.py"])
def test_a_generation_option_out_of_range_is_refused_before_any_work(script):
    result = run_script(script, "--num-beams", "0", "photo.jpg" if script == "caption.py" else "--split=test")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "argument --num-beams/--num_beams: must be at least 1, got 0" in result.stderr


def test_an_unwritable_out_path_is_said_before_any_captioning(demo_run, tmp_path):
    (tmp_path / "a_file").write_text("")
    result = run_script("evaluate.py", "--adapter", os.path.join(demo_run[0], "adapter"),
                        "--out", str(tmp_path / "a_file" / "scores.json"))
    assert result.returncode == 1 and "Traceback" not in result.stderr and "captioning" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {tmp_path / 'a_file' / 'scores.json'}")
