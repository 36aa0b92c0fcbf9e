"""Hostile input to caption.py, evaluate.py and the loaders: nothing of the user's is deleted, no traceback."""
import json
import os
import struct
import zlib

import pytest
from PIL import Image

from conftest import run_script


def last_error(capsys):
    """The last line a script's main() wrote to stderr (main is called in this process: no start-up per case)."""
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_export_refuses_a_folder_that_holds_the_adapter_or_anything_else(demo_run, tmp_path, capsys):
    import shutil
    import caption
    run = tmp_path / "run"
    shutil.copytree(os.path.join(demo_run[0], "adapter"), run / "adapter")
    (run / "notes.txt").write_text("mine")
    before = {str(p) for p in tmp_path.rglob("*")}
    for target, message in ((run, "that folder holds the adapter"), (run / "adapter", "that folder holds the adapter"),
                            (tmp_path, "that folder holds the adapter"),
                            (run / "notes.txt", "a file of that name exists")):
        assert caption.main(["--adapter", str(run / "adapter"), "--export-merged", str(target)]) == 1
        error = last_error(capsys)
        assert error.startswith(f"error: --export-merged {target}: ") and message in error
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    assert caption.main(["--adapter", str(run / "adapter"), "--export-merged", str(other)]) == 1
    assert "is not empty and is not an earlier export" in last_error(capsys)
    assert {str(p) for p in tmp_path.rglob("*")} == before | {str(other), str(other / "keep.txt")}  # all kept


def fake_png(path, width, height):
    """A real 8x8 PNG whose header claims width x height: Pillow sees the size without decoding anything."""
    import io
    buffer = io.BytesIO()
    Image.new("L", (8, 8)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4:ihdr + 12] = struct.pack(">II", width, height)
    data[ihdr + 17:ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr:ihdr + 17])))
    path.write_bytes(bytes(data))
    return str(path)


def test_a_huge_image_is_one_line_and_the_rest_are_still_captioned(demo_world, tmp_path):
    """14000 x 14000 is over Pillow's own bomb limit (an error type nobody caught); 30000 x 30000 is over ours."""
    from data import load_rgb
    over_ours = fake_png(tmp_path / "panorama.png", 30_000, 30_000)
    with pytest.raises(ValueError, match="over the 576,000,000 this project reads"):
        load_rgb(over_ours)
    over_pillows = fake_png(tmp_path / "big.png", 14_000, 14_000)
    good = os.path.join(demo_world[0], "Flicker8k_Dataset", sorted(os.listdir(os.path.join(demo_world[0],
                                                                                       "Flicker8k_Dataset")))[0])
    result = run_script("caption.py", "--adapter", "none", "--model", demo_world[1], "--num-beams", "1",
                        over_ours, over_pillows, good)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert [line.split("\t")[0] for line in result.stdout.splitlines()] == [good]
    assert sum("panorama.png" in line for line in result.stderr.splitlines()) == 1
    assert sum("big.png" in line for line in result.stderr.splitlines()) == 1


@pytest.mark.parametrize("change, message", [
    ({"r": "8"}, "r has an invalid value '8'"),
    ({"r": 8.0}, "r has an invalid value 8.0"),
    ({"lora_alpha": None}, "lora_alpha has an invalid value None"),
    ({"target_modules": [1]}, "target_modules has an invalid value [1]"),
])
def test_an_adapter_config_with_wrong_types_is_one_line(demo_run, tmp_path, change, message, capsys):
    import shutil
    import caption
    adapter = shutil.copytree(os.path.join(demo_run[0], "adapter"), tmp_path / "adapter")
    config = json.load(open(adapter / "adapter_config.json"))
    (adapter / "adapter_config.json").write_text(json.dumps({**config, **change}))
    assert caption.main(["--adapter", str(adapter), "x.jpg"]) == 1
    assert last_error(capsys) == f"error: {adapter / 'adapter_config.json'}: {message} (r: a positive integer, " \
                                 "lora_alpha: a positive number, target_modules: a list of module names)"


def test_a_model_folder_with_only_pickle_weights_is_refused_without_loading_it(demo_world, tmp_path):
    from model import ModelError, load_blip2
    import shutil
    folder = shutil.copytree(demo_world[1], tmp_path / "model")
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(ModelError, match="pytorch_model.bin, a pickle.*safetensors weights only"):
        load_blip2(str(folder))


def test_a_prompt_holding_the_image_token_is_one_line(demo_world, capsys):
    import caption
    assert caption.main(["--adapter", "none", "--model", demo_world[1], "--prompt", "<image> a photo of", "x.jpg"]) == 1
    assert "contains the image token '<image>'" in last_error(capsys)


def test_evaluate_refuses_an_out_path_that_is_a_directory_before_any_work(tmp_path, capsys):
    import evaluate
    assert evaluate.main(["--adapter", "none", "--model", "data/demo/blip2-tiny", "--out", str(tmp_path)]) == 1
    assert last_error(capsys) == f"error: {tmp_path}: is a directory; give a file name, e.g. {tmp_path / 'scores.json'}"
    assert os.listdir(tmp_path) == []


def test_predictions_that_are_not_utf8_name_the_file(demo_world, tmp_path, capsys):
    import evaluate
    predictions = tmp_path / "predictions.json"
    predictions.write_bytes(b'{"a.jpg": "caf\xe9"}')
    assert evaluate.main(["--adapter", "none", "--model", demo_world[1], "--predictions", str(predictions)]) == 1
    assert last_error(capsys).startswith(f"error: {predictions}: cannot read predictions")


def test_scoring_nothing_says_so():
    from evaluate import ScoringError, score_captions
    with pytest.raises(ScoringError, match="no captions to score"):
        score_captions({}, {})
