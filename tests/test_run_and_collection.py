"""A run and what it reads: one image's captions bounded per step, a collection changed under a checkpoint refused,
old vision caches removed, a data folder named two ways still the same, a config.json that does not describe its
weights refused (in-process: train.main, caption.main)."""
import json
import os
import shutil

import pytest

import train
from conftest import data_report, run_main, write_jsonl
from data import MAX_CAPTIONS_PER_IMAGE, read_captions

RUN = ["--model=data/demo/blip2-tiny", "--eval_interval=0", "--final_eval=False", "--num_workers=0"]


def copy_demo_collection(demo_world, root, train_images=12, extra_captions=0):
    """An imagefolder of demo images (train, validation and test folders, one caption each); the first train image
    gets `extra_captions` more."""
    source = read_captions(demo_world[0]).splits
    for folder, items in (("train", source["train"][:train_images]), ("validation", source["val"][:4]),
                          ("test", source["test"][:4])):
        os.makedirs(root / folder, exist_ok=True)
        for item in items:
            shutil.copy(item.image, root / folder / item.name)
        rows = [{"file_name": item.name, "text": item.captions[0]} for item in items]
        rows += [{"file_name": items[0].name, "text": items[0].captions[k % 5]} for k in range(extra_captions)
                 if folder == "train"]
        write_jsonl(root / folder / "metadata.jsonl", rows)


def test_an_image_with_thousands_of_captions_is_read_a_bounded_number_at_a_time(demo_world, tmp_path, monkeypatch):
    copy_demo_collection(demo_world, tmp_path / "data", extra_captions=1999)  # 2,000 captions on one image
    seen = []  # (captions of each image) in every micro-batch a step trains on
    real_step = train.train_step

    def recording_step(model, micro_batches, *args, **kwargs):
        for batch in micro_batches:
            seen.append(batch["caption_image"].bincount().tolist())
        return real_step(model, micro_batches, *args, **kwargs)
    monkeypatch.setattr(train, "train_step", recording_step)
    code, out, err = run_main("train", *RUN, f"--data_dir={tmp_path / 'data'}", "--batch_images=3", "--epochs=1",
                              f"--out_dir={tmp_path / 'out'}")
    assert code == 0, err
    note = (f"1 train images have more than {MAX_CAPTIONS_PER_IMAGE} captions (the most: 2,000): training reads each "
            f"{MAX_CAPTIONS_PER_IMAGE} at a time, as 40 batch entries, to bound a step's memory")
    assert note in out and note == data_report(str(tmp_path / "data"))["many_captions"]
    assert max(max(counts) for counts in seen) == MAX_CAPTIONS_PER_IMAGE
    assert sum(map(sum, seen)) == 2000 + 11  # an epoch (51 entries, 17 steps of 3) still reads every caption once


def test_a_changed_collection_is_refused_on_resume_and_a_touched_one_named_another_way_is_not(demo_world, tmp_path):
    data, out = tmp_path / "data", f"--out_dir={tmp_path / 'out'}"
    copy_demo_collection(demo_world, data)
    code, _, err = run_main("train", *RUN, f"--data_dir={data}", "--batch_images=4", "--max_steps=2", out)
    assert code == 0, err
    original = (data / "train" / "metadata.jsonl").read_text()
    copy_demo_collection(demo_world, data, train_images=15)  # 3 train images added
    code, _, err = run_main("train", *RUN, f"--data_dir={data}", "--batch_images=4", "--max_steps=4", out)
    assert code == 1 and err.startswith(f"error: {data}: the collection changed since ") and err.count("\n") == 1
    assert "(train 12 -> 15 images): resuming would not continue that run" in err
    (data / "train" / "metadata.jsonl").write_text(original)
    rows = [json.loads(line) for line in open(data / "validation" / "metadata.jsonl")]
    write_jsonl(data / "validation" / "metadata.jsonl", [{**rows[0], "text": "another caption"}] + rows[1:])
    code, _, err = run_main("train", *RUN, f"--data_dir={data}", "--batch_images=4", "--max_steps=4", out)
    assert code == 1 and "(val: other images or captions)" in err
    write_jsonl(data / "validation" / "metadata.jsonl", rows)
    os.utime(data / "train" / os.listdir(data / "train")[0], (1, 1))  # touched: the same collection
    code, stdout, err = run_main("train", *RUN, f"--data_dir={data}/", "--batch_images=4", "--max_steps=4", out)
    assert code == 0, err  # and data_dir with a trailing slash is the same folder
    assert "resuming from" in stdout and "at step 2" in stdout


def test_a_new_vision_cache_replaces_the_ones_the_run_wrote_before_and_nothing_else(demo_world, tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    copy_demo_collection(demo_world, data)
    code, _, err = run_main("train", *RUN, f"--data_dir={data}", "--batch_images=4", "--max_steps=1",
                            f"--out_dir={out}")
    assert code == 0, err
    [first] = os.listdir(out / "vision_cache")
    keep = [out / "vision_cache" / "0123456789abcdef", out / "vision_cache" / "notes"]  # not the project's caches
    os.makedirs(keep[0])
    (keep[0] / "vision.bin").write_bytes(b"")
    (keep[0] / "mine.txt").write_text("a file the project did not write")
    keep[1].write_text("the user's")
    shutil.rmtree(out / "checkpoint")  # a new run in the same out_dir, on the collection with an image added
    copy_demo_collection(demo_world, data, train_images=13)
    code, stdout, err = run_main("train", *RUN, f"--data_dir={data}", "--batch_images=4", "--max_steps=1",
                                 f"--out_dir={out}")
    assert code == 0, err
    caches = sorted(set(os.listdir(out / "vision_cache")) - {"0123456789abcdef", "notes"})
    assert len(caches) == 1 and caches != [first] and all(os.path.exists(k) for k in keep)
    assert "vision cache: removed 1 cache(s) of an earlier collection or setting" in stdout


@pytest.mark.parametrize("change, message", [
    ({"text_config": {"num_hidden_layers": 3}}, "16 weights it describes are not in the files (such as "
     "language_model.model.decoder.layers.2."),
    ({"text_config": {"num_hidden_layers": 1}}, "16 in the files have no place in it (such as "
     "language_model.model.decoder.layers.1."),
    ({"text_config": {"vocab_size": 41}}, "1 have another shape (language_model.model.decoder.embed_tokens.weight: "
     "(40, 128) in the files, (41, 128) by the config)"),
    ({"text_config": {"hidden_size": 256}}, "have another shape"),
    ({"text_config": {"max_position_embeddings": 129}}, "(language_model.model.decoder.embed_positions.weight: "
     "(130, 128) in the files, (131, 128) by the config)"),
    ({"text_config": {"word_embed_proj_dim": 64}}, "have another shape"),
    ({"num_query_tokens": 9}, "1 have another shape (query_tokens: (1, 8, 64) in the files, (1, 9, 64) by the config)"),
    ({"text_config": None}, "weights it describes are not in the files"),  # transformers' default OPT config
    ({"text_config": {"model_type": "t5", "decoder_start_token_id": 2}}, "weights it describes are not in the "
     "files (such as language_model.decoder.block.0."),
])
@pytest.mark.parametrize("script", ["caption", "train"])
def test_a_config_that_does_not_describe_its_weights_is_one_line(demo_world, tmp_path, change, message, script):
    """The OPT demo base with an edited config.json: transformers would fill what is missing with random weights
    and drop what is extra, silently; here every script refuses it in one line naming the folder."""
    folder = tmp_path / "model"
    shutil.copytree("data/demo/blip2-opt-tiny", folder)
    config = json.load(open(folder / "config.json"))
    for key, value in change.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) else value
    if config["text_config"] is None:
        del config["text_config"]
    (folder / "config.json").write_text(json.dumps(config))
    if "num_query_tokens" in change:  # the processor agrees with the config: only the weights disagree
        processor = json.load(open(folder / "processor_config.json"))
        (folder / "processor_config.json").write_text(json.dumps({**processor, **change}))
    args = {"caption": ["--adapter", "none", "--model", folder, "photo.jpg"],
            "train": [f"--model={folder}", "--data_dir=data/demo/flickr8k", f"--out_dir={tmp_path / 'out'}"]}[script]
    code, _, err = run_main(script, *args)
    assert code == 1 and err.count("\n") == 1, err[-2000:]
    assert err.startswith(f"error: {folder}: its config.json does not describe its weights: ") and message in err
