"""A new user's first hour: three small collections of their own (40 images: split folders, a flat metadata.csv, a
converted hub dataset) learn with the README's small-collection recipe, and a run that cannot learn says why."""
import csv
import json
import os
import shutil

import pytest

from conftest import data_report, run_main, write_jsonl
from data import read_captions

# README "Small collections", as checked on the demo base (whose tiny model wants a larger learning rate)
RECIPE = ["--model=data/demo/blip2-tiny", "--learning_rate=1e-2", "--max_steps=40", "--warmup_steps=4",
          "--batch_images=8", "--eval_interval=20", "--num_workers=0", "--num_beams=2"]


@pytest.fixture(scope="module")
def collections(demo_world, tmp_path_factory):
    """40 demo images (32 train, 4 val, 4 test) with one caption each, in three layouts people bring."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    root, source = tmp_path_factory.mktemp("first_hour"), read_captions(demo_world[0]).splits
    parts = {"train": source["train"][:32], "validation": source["val"][:4], "test": source["test"][:4]}
    for split, items in parts.items():  # 1. split folders, each with its metadata.jsonl
        os.makedirs(root / "folders" / split)
        for item in items:
            shutil.copy(item.image, root / "folders" / split / item.name)
        write_jsonl(root / "folders" / split / "metadata.jsonl",
                    [{"file_name": i.name, "text": i.captions[0]} for i in items])
    os.makedirs(root / "flat")  # 2. one metadata.csv, no split: the md5 split (32/4/4 here)
    with open(root / "flat" / "metadata.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file_name", "caption"])
        for item in sum(parts.values(), []):
            shutil.copy(item.image, root / "flat" / item.name)
            writer.writerow([item.name, item.captions[0]])
    os.makedirs(root / "hub" / "data")  # 3. a hub download: parquet shards with the images inside
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    for split, items in parts.items():
        images = pa.array([{"bytes": open(i.image, "rb").read(), "path": i.name} for i in items], type=image_type)
        pq.write_table(pa.table({"image": images, "text": [i.captions[0] for i in items]}),
                       root / "hub" / "data" / f"{split}-00000-of-00001.parquet")
    return root


@pytest.mark.parametrize("layout", ["folders", "flat", "hub"])
def test_a_small_collection_learns_with_the_readme_recipe(collections, tmp_path, layout):
    code, out, err = run_main("train", *RECIPE, f"--data_dir={collections / layout}", f"--out_dir={tmp_path}")
    assert code == 0, err[-2000:]
    assert "train 32 images, val 4 images, test 4 images" in out
    # 4 val images cannot choose an adapter: the last one is kept, and the run says so
    assert "val split: 4 images, 4 captions, too few to choose an adapter by" in out
    results = json.load(open(tmp_path / "results.json"))
    assert results["step"] == 40 and results["fine_tuned"]["CIDEr"] > results["zero_shot"]["CIDEr"] + 50
    assert "not above zero-shot" not in out


def test_a_run_too_short_to_learn_says_why(collections, tmp_path):
    """4 steps at a learning rate of 0: the warmup is cut to a fifth of the run (and said), the adapter cannot move
    (on any machine), and the end says why the fine-tuned captions are no better than the zero-shot ones. (Whether 4
    steps at the default rate lift CIDEr depends on the machine's float sums: it did on one, not on another.)"""
    code, out, err = run_main("train", "--model=data/demo/blip2-tiny", f"--data_dir={collections / 'flat'}",
                              "--max_steps=4", "--learning_rate=0", "--batch_images=8", "--eval_interval=0",
                              "--num_workers=0", "--num_beams=1", "--log_interval=1", f"--out_dir={tmp_path}")
    assert code == 0, err[-2000:]
    assert "warmup: 0 steps, not warmup_steps=50: a warmup longer than a fifth of this run's 4 steps" in out
    results = json.load(open(tmp_path / "results.json"))
    assert results["fine_tuned"]["CIDEr"] == results["zero_shot"]["CIDEr"]  # B stays 0: exactly the base model
    (note,) = [line for line in out.splitlines() if line.startswith("note: fine-tuned CIDEr is not above zero-shot")]
    assert "the fine-tuned captions are the zero-shot ones" in note
    assert "only 4 steps" in note and "README 'Small collections'" in note and "a low learning_rate (0)" in note
    assert "the training loss hardly fell" in note and "the offline demo base wants about 1e-2" in note


def test_captions_in_words_the_tokenizer_does_not_know_are_reported(collections, tmp_path):
    """The demo base knows a few dozen words: a collection in other words is said to be unlearnable by it."""
    folder = tmp_path / "other_words"
    shutil.copytree(collections / "flat", folder)
    rows = list(csv.reader(open(folder / "metadata.csv")))
    with open(folder / "metadata.csv", "w", newline="") as f:
        other_words = [[name, "three stars over a quiet harbour at dusk"] for name, _ in rows[1:]]
        csv.writer(f).writerows([rows[0]] + other_words)
    code, out, err = run_main("train", "--model=data/demo/blip2-tiny", f"--data_dir={folder}", "--max_steps=1",
                              "--batch_images=8", "--eval_interval=0", "--final_eval=False", "--num_workers=0",
                              f"--out_dir={tmp_path / 'out'}")
    assert code == 0, err[-2000:]
    (warning,) = [line for line in out.splitlines() if line.startswith("warning: ")]
    assert "% of the train captions' tokens are unknown to this model's tokenizer (<unk>)" in warning


@pytest.fixture
def photos(demo_world, tmp_path):
    """A folder of 12 demo images, 2 of them in a subfolder, as a user's photos."""
    source = os.path.join(demo_world[0], "Flicker8k_Dataset")
    names = sorted(os.listdir(source))[:12]
    os.makedirs(tmp_path / "photos" / "sub")
    for i, name in enumerate(names):
        shutil.copy(os.path.join(source, name), tmp_path / "photos" / ("sub" if i >= 10 else "") / name)
    return tmp_path / "photos", names


def test_caption_py_labels_a_folder_as_a_collection_train_py_reads(demo_run, photos):
    """caption.py --recursive --write jsonl: every image, the subfolder's too, in metadata.jsonl with file_name
    relative to the folder; data.py (and so train.py --data) reads it as an imagefolder collection."""
    folder, names = photos
    code, _, err = run_main("caption", "--adapter", os.path.join(demo_run[0], "adapter"), "--recursive",
                            "--write", "jsonl", folder)
    assert code == 0 and "captioned 12 images" in err, err[-2000:]
    rows = [json.loads(line) for line in open(folder / "metadata.jsonl")]
    assert sorted(r["file_name"] for r in rows) == sorted(names[:10] + [f"sub/{n}" for n in names[10:]])
    assert all("circle" in r["text"] for r in rows)
    assert sum(c["images"] for c in data_report(folder)["splits"].values()) == 12
    code, _, err = run_main("caption", "--adapter", os.path.join(demo_run[0], "adapter"), "--write", "jsonl", folder)
    assert code == 1 and "metadata.jsonl exists: --resume" in err  # never overwritten unasked


def test_resume_captions_only_what_an_interrupted_run_left_and_keeps_hand_corrections(demo_run, photos):
    folder, names = photos
    adapter = os.path.join(demo_run[0], "adapter")
    write_jsonl(folder / "metadata.jsonl", [{"file_name": n, "text": "corrected by hand"} for n in names[:5]])
    code, _, err = run_main("caption", "--adapter", adapter, "--recursive", "--write", "jsonl", "--resume", folder)
    assert code == 0 and "5 of 12 images are captioned" in err and "captioned 7 images" in err, err[-2000:]
    rows = [json.loads(line) for line in open(folder / "metadata.jsonl")]
    assert len(rows) == 12 and [r["text"] for r in rows[:5]] == ["corrected by hand"] * 5


def test_sidecar_captions_are_written_beside_each_image_and_kept(demo_run, photos):
    folder, names = photos
    adapter = os.path.join(demo_run[0], "adapter")
    code, _, err = run_main("caption", "--adapter", adapter, "--recursive", "--write", "txt", folder)
    assert code == 0, err[-2000:]
    sidecars = sorted(str(p.relative_to(folder)) for p in folder.rglob("*.txt"))
    assert sidecars == sorted([n.replace(".jpg", ".txt") for n in names[:10]] +
                              [f"sub/{n.replace('.jpg', '.txt')}" for n in names[10:]])
    (folder / sidecars[0]).write_text("mine\n")
    code, _, err = run_main("caption", "--adapter", adapter, "--recursive", "--write", "caption",
                            "--caption-extension", ".txt", folder)
    assert code == 0 and "12 of 12 images are captioned" in err and (folder / sidecars[0]).read_text() == "mine\n"


def test_num_captions_gives_each_image_its_best_captions_in_json(demo_run, photos):
    folder, _ = photos
    code, out, err = run_main("caption", "--adapter", os.path.join(demo_run[0], "adapter"), "--num-captions", "3",
                              "--json", folder / "sub")
    assert code == 0, err[-2000:]
    rows = [json.loads(line) for line in out.splitlines()]
    assert len(rows) == 2 and all(len(r["captions"]) == 3 and len(set(r["captions"])) == 3 for r in rows)
