"""Hostile input and faults: nothing is read from outside the collection, nothing of the user's is deleted or
overwritten, no value read back goes unchecked, and every fault is one line (in-process: no start-up per case)."""
import json
import os
import re
import struct
import zlib

import pytest
import torch
from PIL import Image

from blip2lora import checkpoint
from conftest import data_report, run_main, write_images, write_jsonl


# ------------------------------------------------------------------------------- nothing read from outside

@pytest.fixture
def outside(tmp_path):
    """A secret image next to the collection, which no collection entry may reach."""
    write_images(tmp_path, ["secret.jpg"])
    os.makedirs(tmp_path / "photos")
    return tmp_path / "photos"


def reasons(report):
    return {entry["item"]: entry["reason"] for entry in report["skipped"]}


def test_imagefolder_paths_that_leave_the_collection_are_skipped(outside):
    write_images(outside, [f"{i}.jpg" for i in range(3)] + ["images/ok.jpg"])
    os.symlink(outside.parent / "secret.jpg", outside / "link.jpg")
    write_jsonl(outside / "metadata.jsonl", [
        {"file_name": "0.jpg", "text": "fine"},
        {"file_name": ".\\..\\secret.jpg", "text": "backslash escape"},
        {"file_name": "images\\..\\..\\secret.jpg", "text": "backslash escape through a folder"},
        {"file_name": str(outside.parent / "secret.jpg"), "text": "an absolute path"},
        {"file_name": "link.jpg", "text": "a symbolic link out"}])
    report = data_report(outside)
    assert report["splits"]["train"]["images"] == 1
    why = reasons(report)
    assert why["metadata.jsonl line 2"] == why["metadata.jsonl line 3"] == why["metadata.jsonl line 4"] == (
        "file_name is missing or leaves the collection's folder")
    assert why["link.jpg"].startswith("a symbolic link to outside the collection's folder")
    followed = data_report(outside, "--symlinks-out")  # on purpose: the option follows links out
    assert followed["splits"]["train"]["images"] == 2


def test_karpathy_and_flickr_token_paths_that_leave_the_collection_are_skipped(outside):
    write_images(outside / "images", ["a.jpg"])
    images = [{"filename": "a.jpg", "split": "train", "sentences": [{"raw": "fine"}]},
              {"filename": "../../secret.jpg", "split": "train", "sentences": [{"raw": "up and out"}]},
              {"filename": str(outside.parent / "secret.jpg"), "split": "train", "sentences": [{"raw": "absolute"}]},
              {"filepath": "/", "filename": "secret.jpg", "split": "test", "sentences": [{"raw": "a filepath out"}]},
              {"filepath": 5, "filename": "a.jpg", "split": "train", "sentences": [{"raw": "filepath not text"}]},
              {"filename": "a.jpg", "split": ["train"], "sentences": [{"raw": "split not text"}]}]
    (outside / "dataset_flickr30k.json").write_text(json.dumps({"images": images}))
    report = data_report(outside)
    assert report["splits"]["train"]["images"] == 1
    leaving = [r for r in report["skipped"] if r["reason"].startswith("its path leaves the collection's folder")]
    assert len(leaving) == 3
    assert sum(r["reason"] == "filepath or split is not a string" for r in report["skipped"]) == 2
    token = outside.parent / "flickr"
    write_images(token / "Flicker8k_Dataset", ["b.jpg"])
    (token / "Flickr8k.token.txt").write_text("b.jpg#0\tfine\n../../secret.jpg#0\tout\n")
    assert reasons(data_report(token))["../../secret.jpg"].startswith("its path leaves the collection's folder")
    kaggle = outside.parent / "kaggle"
    write_images(kaggle / "Images", ["c.jpg"])
    (kaggle / "captions.txt").write_text(f"image,caption\nc.jpg,fine\n{outside.parent / 'secret.jpg'},absolute\n")
    assert reasons(data_report(kaggle))[str(outside.parent / "secret.jpg")].startswith("its path leaves")


def test_data_py_lists_a_backslash_escape_a_symlink_out_and_an_absolute_path_as_skipped(outside):
    """The issue's check, as a user runs it: python data.py DIR names all three and why."""
    write_images(outside, ["0.jpg"])
    os.symlink(outside.parent / "secret.jpg", outside / "link.jpg")
    with open(outside / "metadata.csv", "w") as f:
        f.write(f"file_name,text\n0.jpg,fine\n.\\..\\secret.jpg,escape\n{outside.parent / 'secret.jpg'},absolute\n"
                "link.jpg,link\n")
    code, out, _ = run_main("data", outside)
    assert code == 0 and "skipped: 3" in out
    assert "2 x file_name is missing or leaves the collection's folder: metadata.csv line 3, metadata.csv line 4" in out
    assert "1 x a symbolic link to outside the collection's folder" in out


# ------------------------------------------------------------------------------- nothing of the user's lost

@pytest.mark.parametrize("theirs", ["checkpoint/notes.txt", "results.json", "report.html", "log.jsonl", ".lock"])
def test_train_py_never_touches_what_it_did_not_write(demo_world, tmp_path, theirs):
    """A file of the user's where train.py keeps its own: refused, untouched; and the refused run leaves no lock."""
    (tmp_path / theirs).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / theirs).write_text("the user's own")
    code, _, err = run_main("train", "config/demo.py", f"--out_dir={tmp_path}", "--max_steps=2")
    assert code == 1 and err.count("\n") == 1
    assert "exists and was not written by train.py; move it away or choose another out_dir" in err
    assert (tmp_path / theirs).read_text() == "the user's own" and not (tmp_path / "vision_cache").exists()
    assert sorted(p.name for p in tmp_path.rglob("*")) == sorted({*theirs.split("/")})  # no .lock left behind


def test_a_lock_that_is_a_link_is_never_followed_and_a_killed_runs_lock_is_taken_over(demo_world, tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("the user's own")
    (tmp_path / "out").mkdir()
    os.symlink(outside, tmp_path / "out" / ".lock")
    code, _, err = run_main("train", "config/demo.py", f"--out_dir={tmp_path / 'out'}", "--max_steps=2")
    assert code == 1 and "out/.lock: exists and was not written by train.py" in err
    assert outside.read_text() == "the user's own"
    os.remove(tmp_path / "out" / ".lock")
    (tmp_path / "out" / ".lock").write_text("train.py lock, process 999999\n")  # what kill -9 leaves: not locked
    code, out, err = run_main("train", "config/demo.py", f"--out_dir={tmp_path / 'out'}", "--max_steps=2",
                              "--eval_interval=0", "--final_eval=False")
    assert code == 0 and "step 2/" in out, err[-2000:]
    assert not (tmp_path / "out" / ".lock").exists()  # removed by the run that held it


@pytest.mark.parametrize("path, kind", [("results.json", "dir"), ("log.jsonl", "dir"), ("adapter", "file"),
                                        ("checkpoint", "file"), (".lock", "dir"), ("vision_cache", "file"),
                                        ("report.html", "fifo")])
def test_a_project_path_of_the_wrong_type_is_one_line(demo_world, tmp_path, path, kind):
    {"dir": os.mkdir, "file": lambda p: open(p, "w").close(), "fifo": os.mkfifo}[kind](tmp_path / path)
    code, _, err = run_main("train", "config/demo.py", f"--out_dir={tmp_path}", "--max_steps=2")
    assert code == 1 and err.count("\n") == 1 and str(tmp_path / path) in err


def test_a_temporary_file_never_overwrites_a_file_of_the_users(demo_world, tmp_path):
    from data import read_captions
    predictions = tmp_path / "predictions.json"
    predictions.write_text(json.dumps({i.name: "a circle" for i in read_captions(demo_world[0]).splits["test"]}))
    (tmp_path / "scores.json.tmp").write_text("mine")
    code, _, err = run_main("evaluate", "--adapter", "none", "--model", demo_world[1], "--predictions", predictions,
                            "--out", tmp_path / "scores.json")
    assert code == 0, err
    assert (tmp_path / "scores.json.tmp").read_text() == "mine"
    assert sorted(os.listdir(tmp_path)) == ["predictions.json", "scores.json", "scores.json.tmp"]


def test_export_refuses_a_folder_that_holds_the_adapter_or_anything_else(demo_run, tmp_path):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(os.path.join(demo_run[0], "adapter"), run / "adapter")
    (run / "notes.txt").write_text("mine")
    (run / "empty").mkdir()
    os.symlink(run / "empty", run / "link")
    before = {str(p) for p in tmp_path.rglob("*")}
    for target, message in ((run, "that folder holds the adapter"), (run / "adapter", "that folder holds the adapter"),
                            (tmp_path, "that folder holds the adapter"),
                            (run / "notes.txt", "a file of that name exists"),
                            (run / "adapter" / "merged", "that is inside the adapter"),
                            (run / "link", "a symbolic link; name the folder itself, or a new one")):
        code, _, err = run_main("caption", "--adapter", run / "adapter", "--export-merged", target)
        assert code == 1 and err.startswith(f"error: --export-merged {target}: ") and message in err
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    code, _, err = run_main("caption", "--adapter", run / "adapter", "--export-merged", other)
    assert code == 1 and "is not empty and is not an earlier export" in err
    assert {str(p) for p in tmp_path.rglob("*")} == before | {str(other), str(other / "keep.txt")}  # all kept
    code, _, err = run_main("caption", "--adapter", run / "adapter", "--export-merged", "/proc/self/merged")
    assert code == 1 and err.startswith("error: --export-merged /proc/self/merged: cannot write beside it (")


def test_an_export_named_with_a_newline_is_said_on_one_line(demo_run, tmp_path):
    code, _, err = run_main("caption", "--adapter", os.path.join(demo_run[0], "adapter"), "--export-merged",
                            tmp_path / "two\nlines")
    assert code == 0 and err.count("\n") == 1 and f"{tmp_path}/two\\nlines loads with" in err, err
    assert os.path.isfile(tmp_path / "two\nlines" / "model.safetensors")


def test_re_export_keeps_files_the_user_added(demo_run, tmp_path):
    adapter, merged = os.path.join(demo_run[0], "adapter"), tmp_path / "merged"
    assert run_main("caption", "--adapter", adapter, "--export-merged", merged)[0] == 0
    assert run_main("caption", "--adapter", adapter, "--export-merged", merged)[0] == 0  # its own: replaced
    (merged / "my_notes.md").write_text("mine")
    code, _, err = run_main("caption", "--adapter", adapter, "--export-merged", merged)
    assert code == 1 and "holds files the export did not write (my_notes.md)" in err
    assert (merged / "my_notes.md").read_text() == "mine"


# What a full disk raises (seen on a 64 kB tmpfs): torch.save a RuntimeError, safetensors its own error.
TORCH_FULL = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")


def safetensors_full():
    from safetensors import SafetensorError
    return SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


@pytest.mark.parametrize("what", ["optimizer", "adapter"])
def test_a_full_disk_during_a_checkpoint_is_one_line_naming_the_file_and_leaves_nothing_half_written(
        demo_world, tmp_path, monkeypatch, what):
    from blip2lora import adapter_files
    def disk_full(*args, **kwargs):
        raise TORCH_FULL if what == "optimizer" else safetensors_full()
    monkeypatch.setattr(*((torch, "save") if what == "optimizer" else (adapter_files, "save_file")), disk_full)
    code, _, err = run_main("train", "config/demo.py", f"--out_dir={tmp_path}", "--max_steps=4",
                            "--checkpoint_interval=2", "--eval_interval=0", "--final_eval=False")
    file = "optimizer.pt" if what == "optimizer" else "adapter_model.safetensors"
    assert code == 1 and err.count("\n") == 1 and err.startswith(f"error: {tmp_path / 'checkpoint' / file}: ")
    assert "cannot be written" in err and "nothing was left half-written" in err
    assert not any(name.endswith(".tmp") for name in os.listdir(tmp_path)) and not (tmp_path / "checkpoint").exists()


def test_a_full_disk_during_an_export_is_one_line_and_leaves_no_folder(demo_run, tmp_path, monkeypatch):
    import transformers.modeling_utils

    def disk_full(*args, **kwargs):
        raise safetensors_full()
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", disk_full)  # save_pretrained's writer
    code, _, err = run_main("caption", "--adapter", os.path.join(demo_run[0], "adapter"), "--export-merged",
                            tmp_path / "merged")
    assert code == 1 and err.count("\n") == 1 and "cannot write the export (cannot be written" in err
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------- values checked when read back

def a_checkpoint(tmp_path, demo_world):
    code, _, err = run_main("train", "config/demo.py", f"--out_dir={tmp_path}", "--max_steps=3",
                            "--checkpoint_interval=2", "--eval_interval=0", "--final_eval=False")
    assert code == 0, err
    return tmp_path / "checkpoint"


@pytest.fixture(scope="module")
def trained(demo_world, tmp_path_factory):
    return a_checkpoint(tmp_path_factory.mktemp("trained"), demo_world)


def optimizer_for(checkpoint_dir):
    """An AdamW over tensors shaped like the checkpoint's adapter: what restore() loads into."""
    from safetensors.torch import load_file
    tensors = load_file(os.path.join(checkpoint_dir, "adapter_model.safetensors"))
    return torch.optim.AdamW([torch.nn.Parameter(torch.zeros_like(t)) for t in tensors.values()])


class Payload:
    def __reduce__(self):
        return (print, ("this ran while loading",))


def tamper_state(key, value):
    def apply(c):
        state = json.load(open(c / "state.json"))
        (c / "state.json").write_text(json.dumps({**state, key: value}) if value is not ... else
                                      json.dumps({k: v for k, v in state.items() if k != key}))
    return apply


def tamper_optimizer(change):
    def apply(c):
        saved = torch.load(c / "optimizer.pt", weights_only=True)
        change(saved)
        torch.save(saved, c / "optimizer.pt")
    return apply


@pytest.mark.parametrize("damage, message", [
    (lambda c: (c / "state.json").write_text("{garbage"), "state.json: not valid JSON"),
    (lambda c: (c / "state.json").write_text("[" * 100_000), "state.json: not a valid file (JSON nested too deep)"),
    (tamper_state("scaler", ...), "no valid 'scaler' entry"),
    (tamper_state("step", -3), "no valid 'step' entry"),
    (tamper_state("step", True), "no valid 'step' entry"),
    (tamper_state("step", 10**12), "no valid 'step' entry"),
    (lambda c: (c / "state.json").write_text((c / "state.json").read_text().replace('"best_cider": -1.0',
                                                                                     '"best_cider": NaN')),
     "no valid 'best_cider' entry"),
    (lambda c: os.truncate(c / "optimizer.pt", 0), "optimizer.pt: unreadable"),  # what a full disk leaves
    (lambda c: os.truncate(c / "optimizer.pt", 100), "optimizer.pt: unreadable"),
    (lambda c: torch.save({"state": Payload(), "param_groups": []}, c / "optimizer.pt"),
     "optimizer.pt: holds more than tensors"),
    (tamper_optimizer(lambda s: s["state"][0].update(exp_avg=torch.zeros(3))),
     "exp_avg of parameter 0 does not fit its shape"),
    (lambda c: torch.save({"state": {}, "param_groups": []}, c / "optimizer.pt"),
     "not an optimizer state of this run"),
    (lambda c: os.remove(c / "rng.safetensors"), "rng.safetensors: unreadable (FileNotFoundError"),
    (tamper_optimizer(lambda s: s["param_groups"][0].update(betas="0.9")), "its betas='0.9' is not what AdamW takes"),
    (tamper_optimizer(lambda s: s["param_groups"][0].update(weight_decay="0")), "its weight_decay='0' is not what"),
    (tamper_optimizer(lambda s: s["param_groups"][0].update(amsgrad=True)), "its amsgrad=True is not what AdamW"),
    (tamper_optimizer(lambda s: s["state"][0]["exp_avg"].view(-1)[0].fill_(float("nan"))),
     "exp_avg of parameter 0 holds NaN or infinity"),  # shapes valid: it would turn every weight into NaN
])
def test_a_damaged_or_tampered_checkpoint_is_one_line_naming_the_file(trained, tmp_path, damage, message, capfd):
    import shutil
    copy = shutil.copytree(trained, tmp_path / "checkpoint")
    damage(copy)
    with pytest.raises(checkpoint.CheckpointError, match=re.escape(message)) as error:
        state = checkpoint.read_state(str(copy))
        checkpoint.restore(str(copy), state, optimizer_for(copy), torch.amp.GradScaler("cpu", enabled=False), "cpu")
    assert "\n" not in str(error.value) and "weights_only" not in str(error.value)
    assert "this ran while loading" not in capfd.readouterr().out  # the pickled code was never run


def test_a_damaged_checkpoint_stops_train_py_with_one_line(trained, tmp_path):
    import shutil
    shutil.copytree(trained, tmp_path / "checkpoint")
    (tmp_path / "checkpoint" / "state.json").write_bytes(b"\xff\xfe not json")
    code, _, err = run_main("train", "config/demo.py", f"--out_dir={tmp_path}", "--max_steps=3",
                            "--checkpoint_interval=2", "--eval_interval=0", "--final_eval=False")
    assert code == 1 and err == (f"error: {tmp_path / 'checkpoint' / 'state.json'}: not UTF-8 text (byte 0); delete "
                                 f"{tmp_path / 'checkpoint'} to train this run afresh\n")


def adapter_copy(demo_run, tmp_path):
    import shutil
    return shutil.copytree(os.path.join(demo_run[0], "adapter"), tmp_path / "adapter")


@pytest.mark.parametrize("file, content, message", [
    ("caption_settings.json", {"num_beams": 1_000_000}, "num_beams=1000000 must be a whole number from 1 to 32"),
    ("caption_settings.json", {"max_new_tokens": 10**9}, "max_new_tokens=1000000000 must be a whole number"),
    ("caption_settings.json", {"prompt": "x" * 1_000_000}, "prompt must be text of at most 1000 characters"),
    ("caption_settings.json", {"min_new_tokens": 40, "max_new_tokens": 30}, "min_new_tokens=40 is more than"),
    ("caption_settings.json", "[" * 100_000, "not a valid file (JSON nested too deep)"),
    ("adapter_config.json", "[" * 100_000, "not a valid file (JSON nested too deep)"),
    ("adapter_config.json", '{"r": ' + "1" * 5000 + "}", "not valid JSON (ValueError: Exceeds the limit"),
    ("caption_settings.json", {"trained_on": {"data_dir": ["/photos"]}}, "trained_on.data_dir=['/photos'] must be "
     "text; fix or delete the file"),
    ("caption_settings.json", {"trained_on": {"step": {"n": 4}}}, "trained_on.step={'n': 4} must be a whole number"),
])
def test_settings_read_back_from_an_adapter_are_checked(demo_run, tmp_path, file, content, message):
    adapter = adapter_copy(demo_run, tmp_path)
    if isinstance(content, dict):
        content = json.dumps({**json.load(open(adapter / file)), **content})
    (adapter / file).write_text(content)
    code, _, err = run_main("caption", "--adapter", adapter, "x.jpg")
    assert code == 1 and err.count("\n") == 1 and str(adapter / file) in err and message in err


def test_a_nan_adapter_is_refused_and_a_merge_that_overflows_is_one_line(demo_run, tmp_path):
    from safetensors.torch import load_file, save_file
    adapter = adapter_copy(demo_run, tmp_path)
    tensors = load_file(adapter / "adapter_model.safetensors")
    save_file({k: v * 1e30 for k, v in tensors.items()}, adapter / "adapter_model.safetensors")  # finite, yet B A = inf
    code, _, err = run_main("caption", "--adapter", adapter, "--export-merged", tmp_path / "merged")
    assert code == 1 and "gives non-finite weights; nothing was changed" in err and not (tmp_path / "merged").exists()
    save_file({k: v * float("nan") for k, v in tensors.items()}, adapter / "adapter_model.safetensors")
    code, _, err = run_main("caption", "--adapter", adapter, "x.jpg")
    assert code == 1 and "is not finite (NaN or infinity)" in err


def test_captions_and_names_that_are_not_valid_unicode_are_skipped(tmp_path):
    """JSON can hold a lone surrogate ('\\ud800'), which no tokenizer or terminal accepts: such rows are skipped."""
    write_images(tmp_path, ["a.jpg", "b.jpg"])
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.jpg", "text": "fine"}\n'
                                             '{"file_name": "b.jpg", "text": "bad \\ud800 caption"}\n'
                                             '{"file_name": "\\udc80.jpg", "text": "bad name"}\n')
    report = data_report(tmp_path)
    assert report["splits"]["train"]["captions"] == 1
    assert {r["reason"] for r in report["skipped"]} == {"no caption", "file_name is missing or leaves the "
                                                        "collection's folder"}


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


def test_a_huge_image_is_refused_before_decoding_and_the_rest_are_still_captioned(demo_world, tmp_path):
    """24,000 x 24,000 is refused from its header (decoding it would take a minute and gigabytes); a broken image
    under the limit is one line; the good image is captioned."""
    from blip2lora.images import UnreadableImage, load_image
    bomb = fake_png(tmp_path / "bomb.png", 24_000, 24_000)
    with pytest.raises(UnreadableImage, match="24000 x 24000 pixels is over the 100,000,000 this project decodes"):
        load_image(bomb)
    broken = fake_png(tmp_path / "big.png", 9_000, 9_000)
    good = os.path.join(demo_world[0], "Flicker8k_Dataset", sorted(os.listdir(os.path.join(demo_world[0],
                                                                                       "Flicker8k_Dataset")))[0])
    code, out, err = run_main("caption", "--adapter", "none", "--model", demo_world[1], "--num-beams", "1", bomb,
                              broken, good)
    assert code == 1 and [line.split("\t")[0] for line in out.splitlines()] == [good]
    assert sum("bomb.png" in line for line in err.splitlines()) == 1
    assert sum("big.png" in line for line in err.splitlines()) == 1


def test_a_model_folder_with_only_pickle_weights_is_refused_without_loading_it(demo_world, tmp_path):
    from blip2lora.model import ModelError, load_blip2
    import shutil
    folder = shutil.copytree(demo_world[1], tmp_path / "model")
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(ModelError, match="pytorch_model.bin, a pickle.*safetensors weights only"):
        load_blip2(str(folder))


def test_a_prompt_holding_the_image_token_is_one_line(demo_world):
    code, _, err = run_main("caption", "--adapter", "none", "--model", demo_world[1], "--prompt", "<image> a photo of",
                            "x.jpg")
    assert code == 1 and "contains the image token '<image>'" in err


@pytest.mark.parametrize("out, message", [
    ("/proc/blip2-test/scores.json", "/proc/blip2-test: cannot write the file /proc/blip2-test/scores.json"),
    ("{tmp}/a_file/scores.json", "{tmp}/a_file: is a file, not a folder"),
    ("{tmp}", "{tmp}: is a directory; give a file name, e.g. {tmp}/scores.json"),
])
def test_an_out_path_that_cannot_be_written_is_said_before_any_work(demo_world, tmp_path, out, message):
    """A read-only folder (as root, /proc is one; chmod would not stop root), a folder that is a file, a file that is
    a folder: one line, before anything is captioned, and nothing written."""
    (tmp_path / "a_file").write_text("")
    code, _, err = run_main("evaluate", "--adapter", "none", "--model", demo_world[1], "--out",
                            out.format(tmp=tmp_path))
    assert code == 1 and err.startswith(f"error: {message.format(tmp=tmp_path)}") and err.count("\n") == 1
    assert os.listdir(tmp_path) == ["a_file"]


def test_a_collection_without_train_images_says_so(demo_world, tmp_path):
    import shutil
    data = shutil.copytree(demo_world[0], tmp_path / "flickr8k")
    (data / "Flickr_8k.trainImages.txt").write_text("")
    code, _, err = run_main("train", "config/demo.py", f"--data_dir={data}", f"--out_dir={tmp_path / 'out'}")
    assert code == 1 and err == f"error: {data}: no train images\n"


def test_predictions_that_are_not_utf8_name_the_file(demo_world, tmp_path):
    predictions = tmp_path / "predictions.json"
    predictions.write_bytes(b'{"a.jpg": "caf\xe9"}')
    code, _, err = run_main("evaluate", "--adapter", "none", "--model", demo_world[1], "--predictions", predictions)
    assert code == 1 and err.startswith(f"error: {predictions}: not UTF-8 text")


@pytest.mark.parametrize("script", ["caption", "evaluate"])
def test_ctrl_c_in_caption_and_evaluate_is_one_line_and_exit_130(demo_world, script, monkeypatch):
    from blip2lora import captioning
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
        yield
    monkeypatch.setattr(captioning, "caption_stream", interrupted)
    monkeypatch.setattr(__import__(script), "caption_stream" if script == "caption" else "caption_items",
                        interrupted if script == "caption" else lambda *a, **k: dict(interrupted()))
    image = os.path.join(demo_world[0], "Flicker8k_Dataset", sorted(os.listdir(os.path.join(demo_world[0],
                                                                                        "Flicker8k_Dataset")))[0])
    code, _, err = run_main(script, "--adapter", "none", "--model", demo_world[1],
                            *([image] if script == "caption" else ["--data", demo_world[0]]))
    assert code == 130 and err.strip().splitlines()[-1] == "interrupted"


def test_scoring_nothing_says_so():
    from blip2lora.scoring import ScoringError, score_captions
    with pytest.raises(ScoringError, match="no captions to score"):
        score_captions({}, {})


# ------------------------------------------------------------------------------- round 4

def test_an_export_marker_with_other_contents_is_one_line(demo_run, tmp_path):
    """merged_from.json lists the files an export wrote; edited into something else, it is refused, not crashed on."""
    adapter, merged = os.path.join(demo_run[0], "adapter"), tmp_path / "merged"
    assert run_main("caption", "--adapter", adapter, "--export-merged", merged)[0] == 0
    (merged / "merged_from.json").write_text(json.dumps({"files": [["model.safetensors"]]}))
    code, _, err = run_main("caption", "--adapter", adapter, "--export-merged", merged)
    assert code == 1 and err.count("\n") == 1 and "merged_from.json: not the list of files an export writes" in err


def test_weights_that_became_nan_are_never_saved(demo_world, tmp_path, monkeypatch):
    """An optimizer step that turns the weights into NaN at the last step (the loss of that step was finite): the run
    stops with one line, no adapter is written and the last checkpoint is the one before, unfinished."""
    real_step, calls = torch.optim.AdamW.step, []

    def nan_at_the_last_step(self, *args, **kwargs):
        result = real_step(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            with torch.no_grad():
                for group in self.param_groups:
                    for q in group["params"]:
                        q.fill_(float("nan"))
        return result
    monkeypatch.setattr(torch.optim.AdamW, "step", nan_at_the_last_step)
    code, _, err = run_main("train", "config/demo.py", "--max_steps=3", "--checkpoint_interval=2",
                            "--eval_interval=0", "--final_eval=False", f"--out_dir={tmp_path}")
    assert code == 1 and err.count("\n") == 1 and "the LoRA weights hold NaN or infinity after step 3" in err
    assert not os.path.exists(tmp_path / "adapter" / "adapter_model.safetensors")
    state = json.load(open(tmp_path / "checkpoint" / "state.json"))
    assert state["step"] == 2 and state["finished"] is False


def test_sigterm_before_the_loop_says_how_to_go_on(demo_world, tmp_path, monkeypatch):
    """SIGTERM while the vision cache is built (or the final evaluation runs): the line says what to do."""
    import train
    from blip2lora import vision_cache
    def terminated(*args, **kwargs):
        raise train.Terminated()
    monkeypatch.setattr(vision_cache.VisionCache, "build", terminated)
    code, _, err = run_main("train", "config/demo.py", f"--out_dir={tmp_path}")
    assert code == 143 and err == "stopped by SIGTERM: no checkpoint was written yet\n"


def test_a_text_setting_takes_any_text_and_lora_alpha_any_number():
    from blip2lora import settings
    import train
    given = settings.apply(["--lora_alpha=0.5", "--out_dir", "2024", "--prompt", "1", "--max_steps=3"], train.SETTINGS)
    assert (given["lora_alpha"], given["out_dir"], given["prompt"], given["max_steps"]) == (0.5, "2024", "1", 3)
    with pytest.raises(settings.SettingsError, match="lora_alpha=0.0: must be between"):
        settings.apply(["--lora_alpha=0"], train.SETTINGS)


def test_captions_on_a_gpu_without_bf16_stay_finite(demo_world, tmp_path, monkeypatch):
    """caption.py, evaluate.py and train.py load through model.load_prepared, which runs T5's wo in float32 under
    float16 (a T4 or a V100). Shown on the CPU's float16 autocast with a base whose wo activations pass float16's
    65,504 (its wo weights x 10,000): the captions are the float32 ones, not NaN's garbage."""
    import caption
    from blip2lora import captioning
    from blip2lora.model import load_blip2
    model, processor = load_blip2(demo_world[1])
    with torch.no_grad():
        for name, module in model.language_model.named_modules():
            if name.endswith("DenseReluDense.wo"):
                module.weight.mul_(1e4)
    model.save_pretrained(tmp_path / "base")
    processor.save_pretrained(tmp_path / "base")
    folder = os.path.join(demo_world[0], "Flicker8k_Dataset")
    images = [os.path.join(folder, name) for name in sorted(os.listdir(folder))[:4]]
    _, in_float32, _ = run_main("caption", "--adapter", "none", "--model", tmp_path / "base", *images)
    for module in (caption, captioning):
        monkeypatch.setattr(module, "autocast_dtype", lambda device: torch.float16)
    code, in_float16, err = run_main("caption", "--adapter", "none", "--model", tmp_path / "base", *images)
    assert code == 0 and len(in_float16.splitlines()) == len(in_float32.splitlines()) == 4, err[-2000:]
    # equal here for all four; float16's rounding may flip a beam on another CPU, NaN's garbage would flip them all
    assert sum(a == b for a, b in zip(in_float16.splitlines(), in_float32.splitlines())) >= 3


def test_a_report_names_a_file_that_is_not_utf8(tmp_path):
    """A file name with a byte that is not UTF-8 (Linux allows any): the report is written, the name escaped."""
    from blip2lora.scoring import write_html
    name = os.fsdecode(b"caf\xff.jpg")
    write_images(tmp_path, [name])
    rows = [{"image": name, "source": str(tmp_path / name), "caption": "a dog", "references": ["a dog"],
             "cider": 10.0}]
    write_html(tmp_path / "report.html", "test", {"fine-tuned": {"CIDEr": 10.0}}, rows, about=[f"collection: {name}"])
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert page.count("caf\\udcff.jpg") == 2 and page.count("<img src='data:image/jpeg;base64,") == 1


def test_an_output_that_is_a_device_or_fifo_is_written_through_and_a_link_to_a_file_is_refused(demo_world, tmp_path):
    """evaluate.py --out onto a link to /dev/null, onto a FIFO a reader drains, onto a link to someone's file: the
    first two are written in place and stay what they were; the third is refused and the file left as it was."""
    import stat
    import threading
    from data import read_captions
    predictions = tmp_path / "predictions.json"
    predictions.write_text(json.dumps({i.name: i.captions[0] for i in read_captions(demo_world[0]).splits["test"]}))
    common = ["evaluate", "--adapter", "none", "--model", demo_world[1], "--predictions", predictions, "--out"]
    os.symlink("/dev/null", tmp_path / "null")
    assert run_main(*common, tmp_path / "null")[0] == 0
    assert os.path.islink(tmp_path / "null") and stat.S_ISCHR(os.stat("/dev/null").st_mode)
    os.mkfifo(tmp_path / "fifo")
    received = []
    reader = threading.Thread(target=lambda: received.append(open(tmp_path / "fifo", "rb").read()))
    reader.start()
    code, _, err = run_main(*common, tmp_path / "fifo")
    reader.join(timeout=60)
    assert code == 0 and json.loads(received[0])["metrics"]["CIDEr"] > 100, err[-2000:]
    assert stat.S_ISFIFO(os.lstat(tmp_path / "fifo").st_mode)
    (tmp_path / "theirs.json").write_text("mine")
    os.symlink(tmp_path / "theirs.json", tmp_path / "link.json")
    code, _, err = run_main(*common, tmp_path / "link.json")
    assert code == 1 and err.count("\n") == 1 and "is a symbolic link, which is not replaced" in err
    assert (tmp_path / "theirs.json").read_text() == "mine" and os.path.islink(tmp_path / "link.json")


def test_an_export_checks_its_folder_again_when_it_replaces_it(demo_run, tmp_path, monkeypatch):
    """Loading and merging take minutes for the real model: a file the user puts into the earlier export meanwhile
    is kept, and the export refused, not the file deleted."""
    import caption
    adapter, merged = os.path.join(demo_run[0], "adapter"), tmp_path / "merged"
    assert run_main("caption", "--adapter", adapter, "--export-merged", merged)[0] == 0
    real_merge = caption.merge_lora

    def merge_while_the_user_adds_a_file(model):
        (merged / "my_notes.md").write_text("mine")
        return real_merge(model)
    monkeypatch.setattr(caption, "merge_lora", merge_while_the_user_adds_a_file)
    code, _, err = run_main("caption", "--adapter", adapter, "--export-merged", merged)
    assert code == 1 and err.count("\n") == 1 and "holds files the export did not write (my_notes.md)" in err
    assert (merged / "my_notes.md").read_text() == "mine" and (merged / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no temporary folder left


@pytest.mark.parametrize("layout", ["parquet", "imagefolder", "flickr8k split file", "save_to_disk state.json"])
def test_caption_files_reached_through_a_link_out_of_the_collection_are_not_used(outside, layout):
    """A parquet shard, a metadata.jsonl, a Flickr8k split file or a save_to_disk state.json that is a symbolic link
    to elsewhere: what it says is not used, unless symlinks_out says to follow links out."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    write_images(outside, [f"{i}.jpg" for i in range(3)])
    elsewhere = outside.parent / "elsewhere"
    elsewhere.mkdir()
    if layout == "parquet":
        (outside / "data").mkdir()
        pq.write_table(pa.table({"image": [{"bytes": open(outside / f"{i}.jpg", "rb").read(), "path": f"{i}.jpg"}
                                           for i in range(3)], "text": ["from outside"] * 3}),
                       elsewhere / "train-00000-of-00001.parquet")
        os.symlink(elsewhere / "train-00000-of-00001.parquet", outside / "data" / "train-00000-of-00001.parquet")
    elif layout == "imagefolder":
        write_jsonl(elsewhere / "metadata.jsonl", [{"file_name": f"{i}.jpg", "text": "from outside"} for i in range(3)])
        os.symlink(elsewhere / "metadata.jsonl", outside / "metadata.jsonl")
    elif layout == "flickr8k split file":  # the captions are inside; the split that decides train and test is not
        (outside / "Flickr8k.token.txt").write_text("".join(f"{i}.jpg#0\tcaption {i}\n" for i in range(3)))
        (outside / "Flickr_8k.devImages.txt").write_text("")
        (outside / "Flickr_8k.testImages.txt").write_text("")
        (elsewhere / "Flickr_8k.trainImages.txt").write_text("0.jpg\n1.jpg\n2.jpg\n")
        os.symlink(elsewhere / "Flickr_8k.trainImages.txt", outside / "Flickr_8k.trainImages.txt")
    else:
        table = pa.table({"image": [{"bytes": open(outside / f"{i}.jpg", "rb").read(), "path": f"{i}.jpg"}
                                    for i in range(3)], "text": ["a caption"] * 3})
        (outside / "train").mkdir()
        (outside / "dataset_dict.json").write_text(json.dumps({"splits": ["train"]}))
        with pa.OSFile(str(outside / "train" / "data-00000-of-00001.arrow"), "wb") as sink:
            with pa.ipc.new_stream(sink, table.schema) as writer:
                writer.write_table(table)
        (elsewhere / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
        os.symlink(elsewhere / "state.json", outside / "train" / "state.json")
    code, _, err = run_main("data", outside, "--json")
    assert code == 1 and err.count("\n") == 1 and "a symbolic link to outside the collection's folder" in err
    assert data_report(outside, "--symlinks-out")["splits"]["train"]["captions"] == 3


@pytest.mark.parametrize("target", ["a shard", "a FIFO"])
def test_a_shard_linking_out_is_refused_before_any_shard_is_opened(outside, monkeypatch, target):
    """Containment is checked first: no shard of the collection reaches the reading child (which opens them), and a
    link to a FIFO outside is refused, not skipped as a FIFO inside is."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from blip2lora import layouts
    write_images(outside, ["0.jpg"])
    (outside / "data").mkdir()
    shard = pa.table({"image": [{"bytes": open(outside / "0.jpg", "rb").read(), "path": "0.jpg"}], "text": ["in"]})
    pq.write_table(shard, outside / "data" / "train-00000-of-00002.parquet")
    elsewhere = outside.parent / "elsewhere.parquet"
    pq.write_table(shard, elsewhere) if target == "a shard" else os.mkfifo(elsewhere)
    os.symlink(elsewhere, outside / "data" / "train-00001-of-00002.parquet")
    opened = []
    monkeypatch.setattr(layouts, "_read_in_a_child_first", lambda files, options: opened.extend(files))
    code, _, err = run_main("data", outside)
    assert code == 1 and err.count("\n") == 1 and opened == []
    assert err.startswith(f"error: {outside / 'data' / 'train-00001-of-00002.parquet'}: a symbolic link to outside")


def test_the_reading_child_dies_with_its_parent(tmp_path):
    """SIGTERM to data.py while its child reads (here a child that only sleeps) must not leave the child running,
    adopted by init: the kernel kills it with its parent (PR_SET_PDEATHSIG)."""
    import signal
    import subprocess
    import sys
    import time
    from conftest import ROOT
    pid_file, program = tmp_path / "child.pid", tmp_path / "parent.py"
    sleeping_child = f"import os, time\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\ntime.sleep(120)\n"
    program.write_text(f"import sys\nsys.path.insert(0, {ROOT!r})\nfrom blip2lora import layouts\n"
                       f"layouts._CHILD_READS = {sleeping_child!r}\n"
                       "layouts._read_in_a_child_first([__file__], layouts.Options('', '', False))\n")
    parent = subprocess.Popen([sys.executable, str(program)], cwd=ROOT)
    deadline = time.time() + 60
    while not (pid_file.exists() and pid_file.read_text()) and time.time() < deadline:
        time.sleep(0.1)
    child = int(pid_file.read_text())
    parent.send_signal(signal.SIGTERM)
    parent.wait(timeout=30)
    deadline = time.time() + 10
    while os.path.exists(f"/proc/{child}") and "State:\tZ" not in open(f"/proc/{child}/status").read() and \
            time.time() < deadline:  # gone, or a zombie (dead, not yet reaped by init)
        time.sleep(0.1)
    assert not os.path.exists(f"/proc/{child}") or "State:\tZ" in open(f"/proc/{child}/status").read()


def test_a_damaged_or_odd_parquet_file_is_one_line_naming_it(tmp_path):
    """An image path that is a number (int64), and a damaged data page ("Corrupt snappy compressed data"): one line
    naming the file, never a traceback."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    image = pa.struct([("bytes", pa.binary()), ("path", pa.int64())])
    (tmp_path / "numbers" / "data").mkdir(parents=True)
    numbers = tmp_path / "numbers" / "data" / "train-00000-of-00001.parquet"
    pq.write_table(pa.table({"image": pa.array([{"bytes": b"x", "path": i} for i in range(3)], type=image),
                             "text": ["a", "b", "c"]}), numbers)
    code, _, err = run_main("data", tmp_path / "numbers")
    assert code == 1 and err.count("\n") == 1 and f"{numbers}: column 'image' holds struct<bytes: binary, path: " \
        "int64>, not images" in err
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    (tmp_path / "damaged" / "data").mkdir(parents=True)
    damaged = tmp_path / "damaged" / "data" / "train-00000-of-00001.parquet"
    pq.write_table(pa.table({"image": pa.array([{"bytes": b"x", "path": f"{i}.jpg"} for i in range(2000)], type=image),
                             "text": [f"caption number {i} about things and more words" for i in range(2000)]}),
                   damaged, compression="snappy")
    data = bytearray(damaged.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 400):  # a damaged stretch inside the text column's pages
        data[i] ^= 0x5A
    damaged.write_bytes(bytes(data))
    code, _, err = run_main("data", tmp_path / "damaged")
    assert code == 1 and err.count("\n") == 1 and f"{damaged}: damaged after row" in err


def test_a_parquet_column_name_that_is_not_utf8_and_a_damaged_footer_are_one_line_naming_the_file(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    (tmp_path / "names" / "data").mkdir(parents=True)
    names = tmp_path / "names" / "data" / "train-00000-of-00001.parquet"
    pq.write_table(pa.table({"image": [{"bytes": b"x", "path": f"{i}.jpg"} for i in range(3)], "QQQQ": ["a"] * 3}),
                   names)
    names.write_bytes(names.read_bytes().replace(b"QQQQ", b"\xffQQQ"))  # a column named with byte 0xff
    code, _, err = run_main("data", tmp_path / "names", "--caption-column", "QQQQ")
    assert code == 1 and err.count("\n") == 1 and f"{names}: a column name in it is not UTF-8 text" in err
    (tmp_path / "footer" / "data").mkdir(parents=True)
    footer = tmp_path / "footer" / "data" / "train-00000-of-00001.parquet"
    footer.write_bytes(names.read_bytes()[:-12] + b"\x01\x02\x03\x04" + b"\x00\x01\x00\x00PAR1")  # its length wrong
    code, _, err = run_main("data", tmp_path / "footer")
    assert code == 1 and err.count("\n") == 1 and f"{footer}: not a readable parquet file (" in err


def test_a_dataset_file_that_kills_pyarrow_is_named_and_this_process_lives(demo_world, tmp_path, monkeypatch):
    """Some damaged parquet files make pyarrow abort the process (`terminate called after throwing an instance of
    'parquet::ParquetException'`, exit 134): the files are read in a child process first, so only the child dies.
    The child here aborts on the second file as pyarrow would."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from blip2lora import layouts
    (tmp_path / "hub" / "data").mkdir(parents=True)
    for split in ("train", "test"):
        shard = tmp_path / "hub" / "data" / f"{split}-00000-of-00001.parquet"
        pq.write_table(pa.table({"image": [{"bytes": b"x", "path": f"{split}{i}.jpg"} for i in range(3)],
                                 "text": ["a caption"] * 3}), shard)
    monkeypatch.setattr(layouts, "_CHILD_READS", layouts._CHILD_READS.replace(
        "        for _ in layouts", "        if 'train-' in path:\n"
        "            print(\"terminate called after throwing an instance of 'parquet::ParquetException'\", "
        "file=sys.stderr, flush=True)\n            import os; os.abort()\n        for _ in layouts"))
    code, _, err = run_main("data", tmp_path / "hub")
    shard = tmp_path / "hub" / "data" / "train-00000-of-00001.parquet"
    assert code == 1 and err.count("\n") == 1
    assert f"{shard}: damaged: reading it stopped the reading process itself (terminate called after throwing an " \
        "instance of 'parquet::ParquetException')" in err


def test_an_image_is_opened_only_as_a_format_this_project_reads(tmp_path, monkeypatch):
    """Pillow tells a format by the first bytes: a PostScript file named .png would be handed to Ghostscript (any
    collection image could reach it). Only JPEG, PNG, BMP, GIF, WebP and TIFF are opened; the rest is one line."""
    from PIL import EpsImagePlugin
    from blip2lora.images import UnreadableImage, load_image
    opened = []
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", lambda self: opened.append(self) or 1 / 0)
    path = tmp_path / "photo.png"
    path.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n")
    with pytest.raises(UnreadableImage, match="not a readable image") as error:
        load_image(str(path))
    assert opened == [] and "\n" not in str(error.value)
