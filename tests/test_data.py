"""data.py and images.py: every Flickr8k layout and quirk, the check report, images as a person sees them, and
batches the model really sees."""
import json
import os

import pytest
import torch
from PIL import Image

from conftest import collate, run_main, run_script
from data import clean_caption, prompt_ids, read_captions
from blip2lora.images import load_image

IDS = [f"{1000 + i}_abc{i}.jpg" for i in range(12)]


def write_images(folder, names):
    os.makedirs(folder, exist_ok=True)
    for i, name in enumerate(names):
        Image.new("RGB", (8, 8), (20 * i, 0, 0)).save(os.path.join(folder, name))


def write_original(root, token_text=None, newline="\n"):
    """The original release: Flicker8k_Dataset/ (sic), Flickr8k.token.txt, three split files, macOS litter."""
    write_images(root / "Flicker8k_Dataset", IDS)
    (root / "Flicker8k_Dataset" / "._1000_abc0.jpg").write_bytes(b"\x00\x05\x16\x07 resource fork")
    write_images(root / "__MACOSX" / "Flicker8k_Dataset", ["._" + IDS[0]])
    if token_text is None:
        lines = [f"{name}#{k}\tA caption {k} of image {name} ." for name in IDS for k in range(5)]
        lines.append("2258277193_586949ec62.jpg.1#0\tThe phantom id has no image .")
        lines.append(f"{IDS[0]}#5\tThe Sooners # 28 player .")  # '#' inside a caption
        token_text = "\n".join(lines) + "\n"
    (root / "Flickr8k.token.txt").write_bytes(token_text.replace("\n", newline).encode())
    for split, names in (("train", IDS[:8]), ("dev", IDS[8:10]), ("test", IDS[10:11])):  # IDS[11]: in no split
        (root / f"Flickr_8k.{split}Images.txt").write_text("\n".join(names) + "\n")


def reasons(data):
    return {s["item"]: s["reason"] for s in data.skipped}


def test_original_release_layout(tmp_path):
    write_original(tmp_path)
    data = read_captions(str(tmp_path))
    assert data.layout == "flickr8k-text" and data.split_source == "official split files"
    assert [len(data.splits[s]) for s in ("train", "val", "test")] == [8, 2, 1]  # dev == val
    first = data.splits["train"][0]
    assert first.name == IDS[0] and len(first.captions) == 6
    assert first.captions[5] == "The Sooners # 28 player ."  # split on the LAST '#' of the key, not the caption's
    skipped = reasons(data)
    assert skipped["2258277193_586949ec62.jpg.1"].startswith("no image file")  # the phantom id, never guessed
    assert skipped[IDS[11]] == "in no split"
    assert not any("._" in item for item in skipped)  # macOS resource forks are not images


@pytest.mark.parametrize("newline", ["\r\n", "\n"])
def test_token_file_variants_crlf_space_instead_of_tab_no_final_newline(tmp_path, newline):
    lines = [f"{IDS[i]}#{k}{' ' if i % 2 else chr(9)}A dog number {i} runs ." for i in range(12) for k in range(5)]
    lines.append("garbage line without a caption number")
    write_original(tmp_path, token_text="\n".join(lines), newline=newline)  # and no final newline
    data = read_captions(str(tmp_path))
    counts = data.report()["splits"]
    assert counts["train"] == {"images": 8, "captions": 40}
    assert all(c.endswith(" .") and "\r" not in c for i in data.splits["train"] for c in i.captions)
    assert any(s["item"].startswith("Flickr8k.token.txt line") for s in data.skipped)


def test_karpathy_layout_with_restval(tmp_path):
    write_images(tmp_path / "Flicker8k_Dataset", IDS[:4])
    images = [{"filename": name, "split": split, "sentences": [{"raw": f"caption {k} "} for k in range(5)]}
              for name, split in zip(IDS[:4], ["train", "restval", "val", "test"])]
    images.append({"filename": "missing.jpg", "split": "test", "sentences": [{"raw": "x"}]})
    (tmp_path / "dataset_flickr8k.json").write_text(json.dumps({"images": images, "dataset": "flickr8k"}))
    data = read_captions(str(tmp_path))
    assert data.layout == "karpathy"
    assert [len(data.splits[s]) for s in ("train", "val", "test")] == [2, 1, 1]  # restval counts as train
    assert reasons(data)["missing.jpg"].startswith("no image file")


def test_kaggle_csv_quotes_and_deterministic_split(tmp_path):
    write_images(tmp_path / "Images", IDS)
    rows = ["image,caption"] + [f'{n},"A boy, with a black "" ADHD "" t-shirt {k}"' for n in IDS for k in range(5)]
    (tmp_path / "captions.txt").write_text("\n".join(rows) + "\n")
    data = read_captions(str(tmp_path))
    assert data.layout == "kaggle" and data.split_source.startswith("deterministic")
    caption = data.splits["train"][0].captions[0]
    assert caption.startswith('A boy, with a black " ADHD " t-shirt')  # csv module: commas and doubled quotes
    assert sum(len(v) for v in data.splits.values()) == 12
    again = read_captions(str(tmp_path))
    assert [i.name for i in again.splits["test"]] == [i.name for i in data.splits["test"]]


def test_kaggle_uses_official_split_files_when_present(tmp_path):
    write_images(tmp_path / "Images", IDS)
    (tmp_path / "captions.txt").write_text("image,caption\n" + "".join(f"{n},a dog\n" for n in IDS))
    for split, names in (("train", IDS[:6]), ("dev", IDS[6:9]), ("test", IDS[9:])):
        (tmp_path / f"Flickr_8k.{split}Images.txt").write_text("\n".join(names))
    data = read_captions(str(tmp_path))
    assert data.split_source == "official split files"
    assert [len(data.splits[s]) for s in ("train", "val", "test")] == [6, 3, 3]


def test_report_command_json_and_text(tmp_path):
    write_original(tmp_path)
    code, out, _ = run_main("data", tmp_path, "--json")
    assert code == 0
    report = json.loads(out)
    assert report["layout"] == "flickr8k-text" and report["files"] == [  # every file whose contents were used
        str(tmp_path / name) for name in ("Flickr8k.token.txt", "Flickr_8k.trainImages.txt", "Flickr_8k.devImages.txt",
                                          "Flickr_8k.testImages.txt")]
    assert report["splits"]["train"] == {"images": 8, "captions": 41} and report["rows"] == 62
    assert {"item": "2258277193_586949ec62.jpg.1", "reason": "no image file (1 captions)"} in report["skipped"]
    text = run_main("data", tmp_path)[1]
    assert "layout: flickr8k-text" in text and "no image file" in text


def test_report_on_a_directory_with_no_layout_is_one_line(tmp_path):
    result = run_script("data.py", str(tmp_path))
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Flickr8k.token.txt" in lines[0] and "captions.txt" in lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "RGBA", "LA", "I", "F", "I;16", "1"])
def test_every_image_mode_loads_as_rgb(tmp_path, mode):
    image = Image.new("RGB", (10, 10), (200, 100, 50)).convert(mode if mode != "I;16" else "L").convert(mode)
    path = tmp_path / ("x.jpg" if mode in ("L", "CMYK") else "x.tif" if mode in ("I", "F") else "x.png")
    image.save(path)
    loaded = load_image(str(path))
    assert loaded.mode == "RGB" and loaded.size == (10, 10)


def test_16_bit_greyscale_keeps_its_shades(tmp_path):
    """A 16-bit PNG of mid-grey (32768 of 65535) is mid-grey (128 of 255), not white (Pillow's own conversion clips
    every value above 255)."""
    import numpy as np
    ramp = (np.arange(100, dtype=np.uint16).reshape(10, 10) * 600)  # 0 .. 59,400
    Image.fromarray(ramp).save(tmp_path / "ramp.png")  # uint16: mode I;16
    Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16)).save(tmp_path / "grey.png")
    grey = np.asarray(load_image(str(tmp_path / "grey.png")))
    assert grey.min() == grey.max() == 128
    shades = np.asarray(load_image(str(tmp_path / "ramp.png")))[..., 0]
    assert shades[0, 0] == 0 and shades[-1, -1] == round(59400 * 255 / 65535) and len(np.unique(shades)) > 90


def test_exif_orientation_is_applied(tmp_path):
    """A phone photo stored landscape with 'rotate 90' in its EXIF is read portrait, as every viewer shows it."""
    image = Image.new("RGB", (40, 20), (0, 0, 0))
    image.paste((255, 0, 0), (0, 0, 20, 20))  # left half red, as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 clockwise to display
    image.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    loaded = load_image(str(tmp_path / "phone.jpg"))
    assert loaded.size == (20, 40)
    top, bottom = loaded.getpixel((10, 5)), loaded.getpixel((10, 35))
    assert top[0] > 200 and top[1] < 60 and bottom[0] < 60  # the stored left half is now the top


def test_clean_caption():
    assert clean_caption("A child  in a pink dress .") == "a child in a pink dress"
    assert clean_caption("A") == "a"


@pytest.fixture(scope="module")
def demo_processor(demo_world):
    from transformers import Blip2Processor
    return Blip2Processor.from_pretrained(demo_world[1])


def test_demo_base_loads_with_plain_transformers(demo_world):
    from transformers import Blip2ForConditionalGeneration, Blip2Processor
    model = Blip2ForConditionalGeneration.from_pretrained(demo_world[1])
    processor = Blip2Processor.from_pretrained(demo_world[1])
    assert processor.num_query_tokens == model.config.num_query_tokens
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == model.config.image_token_id
    report = read_captions(demo_world[0]).report()
    assert report["layout"] == "flickr8k-text" and report["skipped"] == []
    assert [report["splits"][s]["images"] for s in ("train", "val", "test")] == [200, 50, 50]


def test_building_the_demo_world_leaves_the_callers_random_state_alone(tmp_path, monkeypatch):
    """train.py seeds, then may build the demo world: the run must train the same whether or not it built it."""
    import functools
    import demo
    monkeypatch.setattr(demo, "pretrain_base", functools.partial(demo.pretrain_base, steps=2))  # same code path
    torch.manual_seed(7)
    expected = torch.rand(4)
    torch.manual_seed(7)
    demo.build_demo_world(root=str(tmp_path), log=lambda *a: None)
    assert os.path.isdir(tmp_path / "blip2-tiny") and torch.equal(torch.rand(4), expected)


def test_encoder_input_is_what_blip2processor_makes(demo_world, demo_processor):
    from transformers import Blip2Config
    config = Blip2Config.from_pretrained(demo_world[1])
    ids = prompt_ids(demo_processor.tokenizer, "a photo of", config)
    reference = demo_processor(images=Image.new("RGB", (20, 20)), text="a photo of").input_ids[0]
    assert ids == list(reference)
    assert ids.count(config.image_token_id) == config.num_query_tokens


def test_batches_hold_image_tokens_labels_pad_with_minus_100_and_skip_corrupt_images(demo_world, demo_processor,
                                                                                   tmp_path, capsys):
    items = read_captions(demo_world[0]).splits["train"][:3]
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(open(items[1].image, "rb").read()[:200])  # a truncated JPEG
    items[1] = type(items[1])(items[1].name, str(corrupt), items[1].captions)
    items[2].captions.append("short")
    from transformers import Blip2Config
    config = Blip2Config.from_pretrained(demo_world[1])
    batch = collate(type("Model", (), {"config": config}), demo_processor, items)
    warning = capsys.readouterr().err.strip().splitlines()
    assert len(warning) == 1 and "corrupt.jpg" in warning[0]  # one line per unreadable image
    assert batch["skipped"] == 1 and batch["image_index"].tolist() == [0, 2]
    assert batch["pixel_values"].shape[0] == 2
    image_tokens = (batch["input_ids"] == config.image_token_id).sum(dim=1)
    assert (image_tokens == config.num_query_tokens).all()  # every encoder input: exactly Q image tokens
    assert batch["labels"].shape[0] == 11 and batch["caption_image"].tolist() == [0] * 5 + [1] * 6
    short = batch["labels"][-1]
    assert short[1].item() == 1 and (short[2:] == -100).all()  # "short" + EOS, then padding = -100


@pytest.mark.parametrize("base", ["data/demo/blip2-tiny", "data/demo/blip2-opt-tiny"])
def test_changing_the_image_changes_the_loss(demo_world, base):
    """The proof that the model sees the image, for both families (the image-token trap would make both losses
    equal). The grouped loss equals this per-pair one: tests/test_fast.py."""
    from data import ImageCaptionDataset
    from blip2lora.model import load_blip2, per_pair_caption_loss
    model, processor = load_blip2(base)
    items = read_captions(demo_world[0]).splits["train"]
    batch = collate(model, processor, items[:1])
    dataset = ImageCaptionDataset(items, processor.image_processor)
    other = dataset[next(i for i in range(1, len(items)) if items[i].captions[0] != items[0].captions[0])][1]
    with torch.no_grad():
        loss, _ = per_pair_caption_loss(model, batch)
        swapped, _ = per_pair_caption_loss(model, {**batch, "pixel_values": other[None]})
    assert abs(loss.item() - swapped.item()) > 1.0
