"""Your own captions: every collection layout data.py reads beside Flickr8k, each bad-input case, and COCO's scale."""
import csv
import json
import os
import re

import pytest

from conftest import data_report as report
from conftest import ROOT, run_main, run_script, split_counts as counts, write_images, write_jsonl
from data import DataError, read_captions


def test_imagefolder_split_folders_with_caption_lists_repeated_rows_and_subfolders(tmp_path):
    """Hugging Face's layout: train/, validation/, test/ each with metadata.jsonl; any number of captions each."""
    for folder, n in (("train", 6), ("validation", 2), ("test", 3)):
        names = [f"shots/{i}.png" for i in range(n)]
        write_images(tmp_path / folder, names)
        rows = [{"file_name": name, "text": [f"caption {k}" for k in range(1 + i)]} for i, name in enumerate(names)]
        rows.append({"file_name": names[0], "text": "one more caption of the first image"})  # a repeated file_name
        rows.append({"file_name": "shots/gone.png", "text": "an image that is not there"})
        rows.append({"text": "a row without file_name"})
        write_jsonl(tmp_path / folder / "metadata.jsonl", rows)
    got = report(tmp_path)
    assert got["layout"] == "imagefolder" and got["split_source"].startswith("split folders")
    # image i has 1 + i captions, the first one more: n images, n (n + 1) / 2 + 1 captions
    assert counts(got) == {"train": (6, 22), "val": (2, 4), "test": (3, 7)}
    reasons = {s["item"]: s["reason"] for s in got["skipped"]}
    assert reasons["train/shots/gone.png"].startswith("no image file")
    assert reasons["validation/metadata.jsonl line 5"].startswith("file_name is missing")


def test_flat_metadata_csv_one_caption_each_without_a_split_is_split_by_hash(tmp_path):
    names = [f"photo_{i:03d}.jpg" for i in range(40)]
    write_images(tmp_path, names)
    with open(tmp_path / "metadata.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file_name", "caption", "photographer"])
        writer.writerows([n, f"A red shoe, number {i}, on a \"white\" table", "anne"] for i, n in enumerate(names))
    got = report(tmp_path)
    assert got["layout"] == "imagefolder" and got["split_source"].startswith("deterministic md5 split")
    assert counts(got) == {"train": (32, 32), "val": (4, 4), "test": (4, 4)} and got["skipped"] == []
    first = read_captions(str(tmp_path)).splits
    again = read_captions(str(tmp_path)).splits
    assert [i.name for i in first["test"]] == [i.name for i in again["test"]]  # the same split every time
    assert any(c.captions == ['A red shoe, number 0, on a "white" table'] for s in first.values() for c in s)


def test_a_split_column_and_a_named_caption_column(tmp_path):
    names = [f"{i}.jpg" for i in range(6)]
    write_images(tmp_path / "img", names)
    splits = ["train", "train", "train", "validation", "test", "holdout"]
    write_jsonl(tmp_path / "metadata.jsonl", [{"file_name": f"img/{n}", "description": f"item {n}", "split": s}
                                              for n, s in zip(names, splits)])
    assert counts(report(tmp_path, "--caption-column", "description")) == {
        "train": (3, 3), "val": (1, 1), "test": (1, 1)}
    skipped = report(tmp_path, "--caption-column", "description")["skipped"]
    assert skipped == [{"item": "img/5.jpg", "reason": "split 'holdout' is not train, validation or test"}]
    with pytest.raises(DataError, match="metadata.jsonl: no caption column .*caption_column"):
        read_captions(str(tmp_path))  # no text/caption/captions column and none named


def test_a_collection_too_small_to_hold_out_images_says_so(tmp_path):
    write_images(tmp_path, ["a.jpg", "b.jpg", "c.jpg"])
    write_jsonl(tmp_path / "metadata.jsonl", [{"file_name": n, "text": "x"} for n in ("a.jpg", "b.jpg", "c.jpg")])
    got = report(tmp_path)
    assert counts(got) == {"train": (3, 3), "val": (0, 0), "test": (0, 0)}
    assert "too few to hold out val and test images" in got["split_source"]
    code, _, err = run_main("evaluate", "--adapter", "none", "--model", "data/demo/blip2-tiny", "--data", tmp_path)
    assert code == 1 and "the test split has no images" in err.strip().splitlines()[-1]


def write_karpathy(root, dataset, images):
    (root / f"dataset_{dataset}.json").write_text(json.dumps({"dataset": dataset, "images": images}))


def test_karpathy_coco_joins_filepath_and_trains_on_restval(tmp_path):
    entries = []
    for i, (folder, split) in enumerate([("train2014", "train")] * 3 + [("val2014", "restval")] * 2 +
                                        [("val2014", "val"), ("val2014", "test"), ("val2014", "test")]):
        name = f"COCO_{folder}_{i:012d}.jpg"
        write_images(tmp_path / folder, [name])
        entries.append({"filepath": folder, "filename": name, "split": split, "cocoid": i,
                        "sentences": [{"raw": f"A caption {k} ."} for k in range(5 + (i == 0) + 2 * (i == 1))]})
    write_karpathy(tmp_path, "coco", entries)
    got = report(tmp_path)
    assert got["layout"] == "karpathy" and got["split_source"] == "dataset_coco.json"
    assert counts(got) == {"train": (5, 28), "val": (1, 5), "test": (2, 10)}  # restval is train; 6 and 7 captions
    names = [i.name for i in read_captions(str(tmp_path)).splits["train"]]
    assert names[0] == "train2014/COCO_train2014_000000000000.jpg" and names[-1].startswith("val2014/")


def test_karpathy_flickr30k_in_its_image_folder(tmp_path):
    names = [f"{1000 + i}.jpg" for i in range(5)]
    write_images(tmp_path / "flickr30k-images", names)
    write_karpathy(tmp_path, "flickr30k", [{"filename": n, "split": s, "sentences": [{"raw": "a dog"}] * 5}
                                           for n, s in zip(names, ["train", "train", "train", "val", "test"])])
    got = report(tmp_path)
    assert got["layout"] == "karpathy" and counts(got) == {"train": (3, 15), "val": (1, 5), "test": (1, 5)}


@pytest.mark.parametrize("content, message", [
    ({"images": [{"split": "train", "sentences": []}]}, "images[0] is not an object with a 'filename'"),
    ({"images": ["1.jpg", "2.jpg"]}, "images[0] is not an object with a 'filename'"),
    ({"images": [{"filename": "1.jpg", "sentences": [{"tokens": ["a"]}]}]}, "needs a 'raw' caption"),
    ({"images": {"1.jpg": "a dog"}}, "'images' must be a list"),
    (b'{"images": [{"filename": "caf\xe9.jpg"}]}', "not UTF-8 text"),
])
def test_a_malformed_karpathy_file_is_one_line_naming_it(tmp_path, content, message):
    path = tmp_path / "dataset_flickr30k.json"
    path.write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())
    with pytest.raises(DataError, match=re.escape(message)) as error:
        read_captions(str(tmp_path))
    assert str(path) in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("name, content, message", [
    ("metadata.jsonl", b'{"file_name": "a.jpg", "text": "x"}\n{"file_name": "b.jpg", \n', "line 2: not valid JSON"),
    ("metadata.jsonl", b'["a.jpg", "x"]\n', "line 1: expected a JSON object"),
    ("metadata.jsonl", b"[" * 100_000, "line 1: JSON nested too deep"),
    ("metadata.csv", b"image,text\na.jpg,x\n", "no 'file_name' column"),
    ("metadata.csv", "file_name,text\na.jpg,caf\xe9\n".encode("latin-1"), "not UTF-8 text"),
    ("metadata.csv", b"file_name,text,text\na.jpg,x,y\n", "column 'text' appears twice in the header"),
    ("captions.txt", b"image,caption\na.jpg," + b"x" * 200_000 + b"\n", "line 2: not readable as CSV"),
    ("dataset_flickr30k.json", b"[" * 100_000, "not a valid file (JSON nested too deep)"),
])
def test_a_malformed_caption_file_is_one_line_naming_file_and_line(tmp_path, name, content, message):
    """read_captions raises one DataError line naming the file (and the line); data.py prints it and exits 1."""
    write_images(tmp_path, ["a.jpg"])
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError) as error:
        read_captions(str(tmp_path))
    assert str(error.value).startswith(f"{tmp_path / name}: ") and message in str(error.value)
    code, _, err = run_main("data", tmp_path)
    assert code == 1 and err == f"error: {error.value}\n"


def test_coco_scale_index_reads_with_exact_counts(tmp_path, monkeypatch):
    """dataset_coco.json at full size (123,287 images, 616k captions): exact counts and an epoch's batches. The folder
    listing is given (123,287 empty files would only test the file system)."""
    from blip2lora import images
    layout = [("train2014", "train", 82_783), ("val2014", "restval", 30_504), ("val2014", "val", 5_000),
              ("val2014", "test", 5_000)]
    entries, listing, i = [], {"train2014": {}, "val2014": {}}, 0
    for folder, split, n in layout:
        os.makedirs(tmp_path / folder, exist_ok=True)
        for _ in range(n):
            name = f"COCO_{folder}_{i:012d}.jpg"
            listing[folder][name] = "file"
            entries.append({"filepath": folder, "filename": name, "split": split,
                            "sentences": [{"raw": "A man riding a wave on top of a surfboard ."}] * 5})
            i += 1
    write_karpathy(tmp_path, "coco", entries)
    real_listing = images.list_folder
    monkeypatch.setattr(images, "list_folder", lambda folder: listing.get(os.path.basename(folder)) or
                        real_listing(folder))
    collection = read_captions(str(tmp_path))
    assert {s: len(v) for s, v in collection.splits.items()} == {"train": 113_287, "val": 5_000, "test": 5_000}
    assert sum(len(i.captions) for i in collection.splits["train"]) == 566_435 and collection.skipped == []
    import train
    batches = train.epoch_micro_batches(train.Settings(**train.SETTINGS), 113_287, epoch=0, group=1)
    assert len(batches) == 113_287 // train.SETTINGS["batch_images"]
    assert sorted(i for b in batches for i in b) == sorted(set(i for b in batches for i in b))  # no image twice


@pytest.fixture(scope="module")
def own_collection(demo_world, tmp_path_factory):
    """Demo images as someone's own collection: split folders, 1 to 12 captions an image, one caption of 51 tokens."""
    import shutil
    root = tmp_path_factory.mktemp("own_collection")
    source = read_captions(demo_world[0]).splits
    for folder, items in (("train", source["train"][:24]), ("validation", source["val"][:4]),
                          ("test", source["test"][:4])):
        os.makedirs(root / folder / "photos")
        rows = []
        for i, item in enumerate(items):
            shutil.copy(item.image, root / folder / "photos" / item.name)
            rows += [{"file_name": f"photos/{item.name}", "text": item.captions[k % 5]} for k in range(1 + i % 12)]
        write_jsonl(root / folder / "metadata.jsonl", rows)
    write_jsonl(root / "train" / "metadata.jsonl",
                [json.loads(line) for line in open(root / "train" / "metadata.jsonl")]
                + [{"file_name": f"photos/{source['train'][0].name}", "text": " ".join(["circle"] * 50)}])
    return root


def test_train_on_your_own_collection_then_evaluate_with_the_prompt_it_was_trained_with(own_collection, tmp_path):
    out = tmp_path / "out"
    result = run_script("train.py", "--model=data/demo/blip2-tiny", f"--data_dir={own_collection}", "--max_steps=4",
                        "--eval_interval=0", "--final_eval=False", "--batch_images=4", "--num_workers=0",
                        "--prompt=a picture of", "--num_beams=2", f"--out_dir={out}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "imagefolder: train 24 images, val 4 images, test 4 images" in result.stdout
    assert "1 train captions are longer than max_caption_tokens=40 (the longest: 51 tokens)" in result.stdout
    assert os.path.isfile(out / "adapter" / "adapter_model.safetensors")
    saved = json.load(open(out / "adapter" / "caption_settings.json"))
    assert {k: saved[k] for k in ("prompt", "num_beams", "max_new_tokens", "min_new_tokens")} == {
        "prompt": "a picture of", "num_beams": 2, "max_new_tokens": 30, "min_new_tokens": 8}
    assert saved["trained_on"]["data_dir"] == str(own_collection) and saved["trained_on"]["step"] == 4

    scores = tmp_path / "scores.json"
    evaluated = run_script("evaluate.py", "--adapter", str(out / "adapter"), "--data", str(own_collection),
                           "--max-new-tokens", "12", "--out", str(scores))
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    report = json.load(open(scores))
    settings = report["settings"]
    assert (settings["prompt"], settings["num_beams"], settings["max_new_tokens"]) == ("a picture of", 2, 12)
    # every reference an image has is scored, however many: test images 0..3 have 1..4 captions
    assert sorted(len(c["references"]) for c in report["captions"]) == [1, 2, 3, 4]


def test_a_vision_cache_that_does_not_fit_on_the_disk_is_refused_before_building(demo_world, tmp_path, monkeypatch):
    import collections
    import shutil
    monkeypatch.setattr(shutil, "disk_usage", lambda path: collections.namedtuple("usage", "total used free")(
        10**9, 10**9 - 1000, 1000))
    code, out, err = run_main("train", "config/demo.py", "--max_steps=2", "--eval_interval=0", "--final_eval=False",
                              f"--out_dir={tmp_path}")
    assert code == 1
    assert err.strip() == (f"error: vision cache: 300 images need 1.3 MB in {tmp_path / 'vision_cache'}, but only "
                           "0.0 MB is free there. Set vision_cache=False (the ViT then runs in every step) or use an "
                           "out_dir on a disk with room")
    assert "vision cache: computing ViT outputs of 300 images once (1.3 MB in" in out  # the size is said first
    assert not os.path.exists(tmp_path / "checkpoint")


# ------------------------------------------------------------------ datasets as the Hugging Face hub ships them

HF_FEATURES = {"image": {"_type": "Image"}, "text": {"dtype": "string", "_type": "Value"}}


def demo_image_bytes(demo_world, count):
    folder = os.path.join(demo_world[0], "Flicker8k_Dataset")
    return [open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder))[:count]]


def image_table(images, paths, columns):
    """A table as `datasets` writes one: an `image` struct {bytes, path} marked as an Image feature, then columns."""
    import pyarrow as pa
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({"image": pa.array([{"bytes": b, "path": p} for b, p in zip(images, paths)], type=image_type),
                      **columns})
    return table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": HF_FEATURES}})})


@pytest.fixture(scope="module")
def hub_datasets(demo_world, tmp_path_factory):
    """Four datasets as people download them from the hub, each holding 30 demo images, 20/5/5 train/val/test."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    root, images = tmp_path_factory.mktemp("hub"), demo_image_bytes(demo_world, 30)
    captions = read_captions(demo_world[0]).splits
    texts = [i.captions for s in ("train", "val", "test") for i in captions[s]][:30]
    splits = [("train", slice(0, 10)), ("train", slice(10, 20)), ("validation", slice(20, 25)), ("test", slice(25, 30))]
    # 1. one caption per row, split by the shard names, two train shards (hf download ... --local-dir DIR)
    os.makedirs(root / "hub" / "data")
    for shard, (split, rows) in enumerate(splits):
        name = f"{split}-0000{shard % 2 if split == 'train' else 0}-of-0000{2 if split == 'train' else 1}.parquet"
        pq.write_table(image_table(images[rows], [f"{i:03d}.jpg" for i in range(30)][rows],
                                   {"text": [t[0] for t in texts[rows]]}), root / "hub" / "data" / name)
    # 2. a Flickr30k copy: five captions a row as a list, and a split column, in one file
    os.makedirs(root / "flickr30k" / "data")
    pq.write_table(image_table(images, [f"{i}.jpg" for i in range(30)], {
        "caption": [t[:5] for t in texts], "split": ["train"] * 20 + ["val"] * 5 + ["test"] * 5}),
        root / "flickr30k" / "data" / "flickr30k-00000-of-00001.parquet")
    # 3. a Flickr8k copy: one column per caption, images without a path
    os.makedirs(root / "columns" / "data")
    for split, rows in (("train", slice(0, 20)), ("validation", slice(20, 25)), ("test", slice(25, 30))):
        pq.write_table(image_table(images[rows], [None] * 30, {f"caption_{k}": [t[k] for t in texts[rows]]
                                                               for k in range(5)}),
                       root / "columns" / "data" / f"{split}-00000-of-00001.parquet")
    # 4. save_to_disk: dataset_dict.json, and per split an Arrow IPC stream with its state.json
    (root / "saved").mkdir()
    (root / "saved" / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "validation", "test"]}))
    for split, rows in (("train", slice(0, 20)), ("validation", slice(20, 25)), ("test", slice(25, 30))):
        (root / "saved" / split).mkdir()
        table = image_table(images[rows], [f"{i:03d}.jpg" for i in range(30)][rows],
                            {"text": [t[1] for t in texts[rows]]})
        with pa.OSFile(str(root / "saved" / split / "data-00000-of-00001.arrow"), "wb") as sink:
            with pa.ipc.new_stream(sink, table.schema) as writer:
                writer.write_table(table)
        (root / "saved" / split / "state.json").write_text(json.dumps({"_data_files": [
            {"filename": "data-00000-of-00001.arrow"}]}))
    return root


@pytest.mark.parametrize("name, layout, split_source, captions_each", [
    ("hub", "parquet", "the file names", 1), ("flickr30k", "parquet", "the split column", 5),
    ("columns", "parquet", "the file names", 5), ("saved", "arrow", "the file names", 1)])
def test_hub_datasets_read_with_exact_counts_and_train(hub_datasets, tmp_path, name, layout, split_source,
                                                       captions_each):
    got = report(hub_datasets / name)
    assert (got["layout"], got["split_source"], got["rows"]) == (layout, split_source, 30)
    assert counts(got) == {"train": (20, 20 * captions_each), "val": (5, 5 * captions_each),
                           "test": (5, 5 * captions_each)} and got["skipped"] == []
    code, out, err = run_main("train", "--model=data/demo/blip2-tiny", f"--data_dir={hub_datasets / name}",
                              "--max_steps=4", "--eval_interval=0", "--final_eval=False", "--batch_images=4",
                              f"--out_dir={tmp_path}")
    assert code == 0, err[-2000:]
    assert f"{layout}: train 20 images, val 5 images, test 5 images" in out and "step 4/" in out
    assert os.path.isfile(tmp_path / "adapter" / "adapter_model.safetensors")


def test_evaluate_html_shows_the_images_held_inside_a_parquet_dataset(hub_datasets, tmp_path):
    page = tmp_path / "report.html"
    code, out, err = run_main("evaluate", "--adapter", "none", "--model", "data/demo/blip2-tiny", "--data",
                              hub_datasets / "hub", "--num-beams", "1", "--html", page)
    assert code == 0, err[-2000:]
    html = page.read_text()
    assert html.count("<img src='data:image/jpeg;base64,") == 5 and "<div>test/025.jpg</div>" in html


def test_damaged_hub_datasets_are_one_line_or_one_skipped_image(demo_world, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    images = demo_image_bytes(demo_world, 12)
    images[3] = b"\x89PNG but not really"
    os.makedirs(tmp_path / "damaged" / "data")
    pq.write_table(image_table(images, [f"{i}.jpg" for i in range(12)], {"text": ["a small circle"] * 12}),
                   tmp_path / "damaged" / "data" / "train-00000-of-00001.parquet")
    code, out, err = run_main("train", "--model=data/demo/blip2-tiny", f"--data_dir={tmp_path / 'damaged'}",
                              "--max_steps=2", "--eval_interval=0", "--final_eval=False", "--batch_images=4",
                              "--num_workers=0", f"--out_dir={tmp_path / 'out'}")  # workers: their own stderr
    assert code == 0, err[-2000:]
    (line,) = [line for line in err.splitlines() if "row 3" in line]  # one line for the damaged image
    assert line.startswith(f"warning: skipping an unreadable image: {tmp_path / 'damaged' / 'data'} "[:-1])
    assert "train-00000-of-00001.parquet row 3: not a readable image" in line
    assert "1 unreadable images are left out" in out
    for table, message in ((pa.table({"picture": [b"x"], "text": ["a"]}), "no image column 'image'"),
                           (image_table([images[0]], ["a.jpg"], {"text": [5]}), "caption column 'text' holds int64")):
        folder = tmp_path / message.split()[0]
        os.makedirs(folder)
        pq.write_table(table, folder / "train-00000-of-00001.parquet")
        code, _, err = run_main("data", folder)
        assert code == 1 and err.count("\n") == 1 and message in err


def test_imagefolder_split_folders_as_datasets_reads_them(tmp_path):
    """evaluation/ is a test split; train-2024/ is a train split (a split word, then a separator); images_2024/ is no
    split, and the report says it was not read."""
    for folder in ("train-2024", "evaluation", "images_2024"):
        write_images(tmp_path / folder, ["a.jpg", "b.jpg"])
        write_jsonl(tmp_path / folder / "metadata.jsonl", [{"file_name": n, "text": "x"} for n in ("a.jpg", "b.jpg")])
    got = report(tmp_path)
    assert counts(got) == {"train": (2, 2), "val": (0, 0), "test": (2, 2)}
    assert got["skipped"] == [{"item": "images_2024/", "reason": "a folder with a metadata file whose name is not a "
                                                                 "split (train, validation, test, ...): not read"}]


def saved_split(folder, table, name="data-00000-of-00001.arrow", batches=1):
    """One split of a save_to_disk folder: the Arrow stream (in `batches` record batches) and its state.json."""
    import pyarrow as pa
    folder.mkdir(parents=True, exist_ok=True)
    with pa.OSFile(str(folder / name), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as writer:
            for batch in table.to_batches(max_chunksize=-(-table.num_rows // batches)):
                writer.write_batch(batch)
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": name}]}))


def test_a_save_to_disk_folder_is_read_as_its_state_json_lists_it(hub_datasets, tmp_path):
    """After load_from_disk(...).map(...), `datasets` leaves cache-*.arrow files beside the data: they are not read
    (12 rows were read as 24), and the report says so."""
    import shutil
    saved = shutil.copytree(hub_datasets / "saved", tmp_path / "saved")
    shutil.copy(saved / "train" / "data-00000-of-00001.arrow", saved / "train" / "cache-1a2b3c.arrow")
    got = report(saved)
    assert got["rows"] == 30 and counts(got)["train"] == (20, 20)
    assert got["skipped"] == [{"item": "train/cache-1a2b3c.arrow", "reason": "not listed in its state.json (a cache "
                               "file `datasets` leaves after map() or filter()): not read"}]


def test_an_arrow_stream_cut_short_and_a_split_column_of_numbers_say_what_they_did(demo_world, tmp_path):
    """A stream cut at a batch boundary reads without an error, only fewer rows: the report says so. A split column
    of numbers is a ClassLabel's, named in the file's features; numbers without names are reported, not ignored."""
    import pyarrow as pa
    images = demo_image_bytes(demo_world, 30)
    table = image_table(images, [f"{i:03d}.jpg" for i in range(30)], {"text": ["a red circle"] * 30})
    saved_split(tmp_path / "cut" / "train", table)
    (tmp_path / "cut" / "dataset_dict.json").write_text(json.dumps({"splits": ["train"]}))
    sink = pa.BufferOutputStream()
    writer = pa.ipc.new_stream(sink, table.schema)
    for batch in table.to_batches(max_chunksize=10)[:2]:
        writer.write_batch(batch)
    # what a copy interrupted between two batches leaves: 20 of the 30 rows, and no end marker
    (tmp_path / "cut" / "train" / "data-00000-of-00001.arrow").write_bytes(sink.getvalue().to_pybytes())
    got = report(tmp_path / "cut")
    (note,) = [s for s in got["skipped"] if "end marker" in s["reason"]]
    assert got["rows"] == 20 and note["reason"].endswith("only the 20 rows before the cut were read")
    labelled = image_table(images, [f"{i:03d}.jpg" for i in range(30)],
                           {"text": ["a red circle"] * 30, "split": [0] * 20 + [1] * 5 + [2] * 5})
    features = {**HF_FEATURES, "split": {"_type": "ClassLabel", "names": ["train", "validation", "test"]}}
    named = labelled.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})})
    saved_split(tmp_path / "named", named)
    assert counts(report(tmp_path / "named")) == {"train": (20, 20), "val": (5, 5), "test": (5, 5)}
    saved_split(tmp_path / "numbers", labelled)
    got = report(tmp_path / "numbers")
    assert counts(got)["train"] == (0, 0) and len(got["skipped"]) == 30
    assert got["skipped"][0]["reason"] == "split 0 is not train, validation or test"


def test_images_inside_a_dataset_are_never_merged_by_a_name_that_repeats(demo_world, tmp_path):
    """`datasets` keeps only an image's base name: cats/0.png and dogs/0.png are both 0.png, and 12 different images
    may all be 0001.jpg. Different bytes are different images (named FILE#ROW); the same bytes under one name are one
    image with all its captions (a dataset with a row per caption)."""
    import pyarrow.parquet as pq
    images = demo_image_bytes(demo_world, 12)
    (tmp_path / "same_names" / "data").mkdir(parents=True)
    pq.write_table(image_table(images, ["0001.jpg"] * 12, {"text": [f"caption {i}" for i in range(12)]}),
                   tmp_path / "same_names" / "data" / "train-00000-of-00001.parquet")
    got = report(tmp_path / "same_names")
    assert counts(got)["train"] == (12, 12)
    rows = json.loads(run_main("data", tmp_path / "same_names", "--json")[1])["rows"]
    assert rows == 12
    (tmp_path / "per_caption" / "data").mkdir(parents=True)
    pq.write_table(image_table([images[i // 3] for i in range(12)], [f"{i // 3}.jpg" for i in range(12)],
                               {"text": [f"caption {i}" for i in range(12)]}),
                   tmp_path / "per_caption" / "data" / "train-00000-of-00001.parquet")
    assert counts(report(tmp_path / "per_caption"))["train"] == (4, 12)  # 4 images, 3 captions each
    names = {i.name for i in read_captions(str(tmp_path / "same_names")).splits["train"]}
    assert names == {f"data/train-00000-of-00001.parquet#{row}" for row in range(12)}


def test_a_hub_dataset_with_train_and_test_only_gets_val_from_train(demo_world, tmp_path):
    """Hub datasets usually ship train and test shards: val is carved from train (by the md5 of the names, the same
    every time), said in one line, so that training can choose its adapter; --no-val-from-train keeps train whole."""
    import pyarrow.parquet as pq
    images = demo_image_bytes(demo_world, 130)
    os.makedirs(tmp_path / "hub" / "data")
    for split, rows in (("train", slice(0, 120)), ("test", slice(120, 130))):
        pq.write_table(image_table(images[rows], [f"{i:03d}.jpg" for i in range(130)][rows],
                                   {"text": [f"picture {i}" for i in range(130)][rows]}),
                       tmp_path / "hub" / "data" / f"{split}-00000-of-00001.parquet")
    got = report(tmp_path / "hub")
    assert counts(got) == {"train": (100, 100), "val": (20, 20), "test": (10, 10)}
    assert got["val_note"].startswith("no val split: 20 of the 120 train images are val, chosen by the md5")
    assert got["caption_columns"] == ["text"]
    data = read_captions(str(tmp_path / "hub"))
    assert not {i.name for i in data.splits["val"]} & {i.name for i in data.splits["train"]}
    assert [i.name for i in data.splits["val"]] == [i.name for i in read_captions(str(tmp_path / "hub")).splits["val"]]
    kept_whole = report(tmp_path / "hub", "--no-val-from-train")
    assert counts(kept_whole)["train"] == (120, 120) and counts(kept_whole)["val"] == (0, 0)
    code, out, err = run_main("train", "--model=data/demo/blip2-tiny", f"--data_dir={tmp_path / 'hub'}",
                              "--max_steps=1", "--eval_interval=0", "--final_eval=False", "--batch_images=4",
                              f"--out_dir={tmp_path / 'out'}")
    assert code == 0, err[-2000:]
    assert "parquet: train 100 images, val 20 images, test 10 images" in out
    assert sum(line.startswith("no val split: 20 of the 120 train images") for line in out.splitlines()) == 1


def test_a_caption_file_with_another_name_says_how_to_name_it(tmp_path):
    write_images(tmp_path, ["a.jpg", "b.jpg"])
    (tmp_path / "captions.csv").write_text("image,caption\na.jpg,a dog\nb.jpg,a cat\n")
    code, _, err = run_main("data", tmp_path)
    assert code == 1 and err.count("\n") == 1
    assert "Found captions.csv: if it holds your captions, name it metadata.csv" in err and "file_name" in err


def test_check_images_decodes_every_image_and_lists_the_unreadable_ones(tmp_path):
    write_images(tmp_path, [f"{i:02d}.jpg" for i in range(12)])
    cut = (tmp_path / "05.jpg").read_bytes()
    (tmp_path / "05.jpg").write_bytes(cut[:len(cut) // 3])  # a download cut short: its captions are all fine
    write_jsonl(tmp_path / "metadata.jsonl", [{"file_name": f"{i:02d}.jpg", "text": f"photo {i}"} for i in range(12)])
    assert report(tmp_path)["skipped"] == [] and "unreadable" not in report(tmp_path)  # not decoded without asking
    code, out, err = run_main("data", tmp_path, "--check-images")
    assert code == 1, err
    assert "images decoded: 11, unreadable: 1" in out and re.search(r"^  .*05\.jpg: not a readable image", out, re.M)
    code, out, _ = run_main("data", tmp_path, "--check-images", "--json")
    assert code == 1 and [e["item"] for e in json.loads(out)["unreadable"]] == ["05.jpg"]


def test_reading_a_hub_dataset_runs_no_code_from_the_working_directory(hub_datasets, tmp_path):
    """The child process that first reads the parquet files imports what the parent does, not a json.py (or
    numpy.py, pyarrow.py) lying where the user stands."""
    marker = tmp_path / "ran"
    for name in ("json", "numpy", "pyarrow"):
        (tmp_path / f"{name}.py").write_text(f"open({str(marker)!r}, 'a').write('{name}')\n")
    result = run_script(os.path.join(ROOT, "data.py"), str(hub_datasets / "hub"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert not marker.exists()


def test_nine_thousand_shards_under_a_long_folder_name_are_read(demo_world, tmp_path):
    """Their paths (2.2 MB) are more than a command line holds: the child process that first reads them gets the
    list another way."""
    import pyarrow.parquet as pq
    root = tmp_path / ("x" * 190)
    (root / "data").mkdir(parents=True)
    image = demo_image_bytes(demo_world, 1)[0]
    for i in range(9000):
        pq.write_table(image_table([image], [f"{i}.jpg"], {"text": ["a small circle"]}),
                       root / "data" / f"train-{i:05d}-of-09000.parquet")
    data = read_captions(str(root))
    assert sum(len(items) for items in data.splits.values()) == 9000


def test_a_fifo_named_like_a_shard_is_skipped_not_waited_on(hub_datasets, tmp_path):
    """A FIFO named *.parquet blocked data.py and train.py for ever: only regular files are opened."""
    import shutil
    folder = tmp_path / "hub"
    shutil.copytree(hub_datasets / "hub", folder)
    os.mkfifo(folder / "data" / "train-00009-of-00010.parquet")
    result = run_script(os.path.join(ROOT, "data.py"), str(folder), timeout=60)  # TimeoutExpired if it waits
    assert result.returncode == 0, result.stderr[-2000:]
    assert "not a regular file" in result.stdout and "train-00009-of-00010.parquet" in result.stdout
