"""A run and the collection under it: one image's captions bounded per step, a collection changed under a checkpoint
refused, old vision caches removed, a data folder named two ways still the same (in-process: train.main)."""
import json
import os
import shutil

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
    code, _, err = run_main("train", *RUN, f"--data_dir={data}", "--batch_images=4", "--max_steps=1", f"--out_dir={out}")
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
