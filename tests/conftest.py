"""Shared fixtures and helpers: a tiny BLIP-2 built from configs (no download), the demo world, one finished demo
run, image and metadata writers, and the scripts run in this process (no start-up cost) or as a user runs them."""
import contextlib
import io
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.chdir(ROOT)  # the scripts resolve data/demo/ and out/ from the repository root, as a user runs them
os.environ["HF_HUB_OFFLINE"] = "1"  # no test waits on the network


def run_script(*args, timeout=300, env=None, cwd=ROOT):
    """Run one of the project's scripts as a user would; returns the CompletedProcess."""
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env={**os.environ, **(env or {})})


def run_main(module, *args):
    """(exit code, stdout, stderr) of a script's main(argv), run in this process."""
    import importlib
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = importlib.import_module(module).main([str(a) for a in args])
        except SystemExit as e:  # argparse's usage errors
            code = e.code
    return code, out.getvalue(), err.getvalue()


def data_report(root, *extra):
    """`python data.py ROOT --json`, in this process."""
    code, out, err = run_main("data", root, "--json", *extra)
    assert code == 0, err
    return json.loads(out)


def split_counts(report):
    return {s: (c["images"], c["captions"]) for s, c in report["splits"].items()}


def write_images(folder, names):
    for i, name in enumerate(names):
        path = os.path.join(folder, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.new("RGB", (8, 8), (10 * i % 255, 40, 90)).save(path)


def write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("".join(json.dumps(row) + "\n" for row in rows))


def collate(model, processor, items, prompt="a photo of"):
    """A train.py batch of these items, with all their captions, for this model: its prompt ids and its family's
    caption tokens; an unreadable image is dropped, as in training."""
    from data import CaptionCollator, ImageCaptionDataset, prompt_ids
    from blip2lora.model import caption_tokenizer
    dataset = ImageCaptionDataset(items, processor.image_processor)
    collator = CaptionCollator(items, caption_tokenizer(processor.tokenizer, model.config),
                               prompt_ids(processor.tokenizer, prompt, model.config))
    return collator([dataset[i] for i in range(len(items))])


def demo_image_paths(demo_world, count):
    """The first `count` image files of the demo collection, by name."""
    folder = os.path.join(demo_world[0], "Flicker8k_Dataset")
    return [os.path.join(folder, name) for name in sorted(os.listdir(folder))[:count]]


def resumes_exactly(args, tmp_path, monkeypatch):
    """train.py with `args` whole, and again with Ctrl-C at the 6th of its steps then the same command: the second
    resumes and ends with the first's adapter, bit for bit."""
    import train
    code, _, err = run_main("train", *args, f"--out_dir={tmp_path / 'whole'}")
    assert code == 0, err[-2000:]
    real_step, steps = train.train_step, []

    def interrupted_at_step_6(*a, **k):
        steps.append(1)
        if len(steps) == 6:
            raise KeyboardInterrupt
        return real_step(*a, **k)
    monkeypatch.setattr(train, "train_step", interrupted_at_step_6)
    code, _, err = run_main("train", *args, f"--out_dir={tmp_path / 'cut'}")
    assert code == 130 and "run the same command again to resume" in err
    monkeypatch.setattr(train, "train_step", real_step)
    code, out, err = run_main("train", *args, f"--out_dir={tmp_path / 'cut'}")
    assert code == 0 and "resuming from" in out, err[-2000:]
    assert same_tensors(adapter_tensors(tmp_path / "whole"), adapter_tensors(tmp_path / "cut"))


def adapter_tensors(out_dir):
    from safetensors.torch import load_file
    return load_file(os.path.join(out_dir, "adapter", "adapter_model.safetensors"))


def same_tensors(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def tiny_blip2():
    """A fresh tiny BLIP-2 (ViT + Q-Former + T5, or OPT with lm=opt) with random weights, in float32 and eval mode:
    vocabulary 48, the image token 47 (OPT's end token 46)."""
    import demo
    from blip2lora import t5
    from transformers import Blip2ForConditionalGeneration

    def make(seed=0, lm=t5):
        torch.manual_seed(seed)
        model = Blip2ForConditionalGeneration(demo.tiny_config(vocab_size=48, image_token_id=47, lm=lm))
        torch.nn.init.normal_(model.query_tokens, std=0.02)
        return model.eval()
    return make


@pytest.fixture(scope="session")
def demo_world():
    import demo
    demo.build_demo_world(log=lambda *a: None)
    return demo.DEMO_DATA, demo.DEMO_MODEL


@pytest.fixture(scope="session")
def demo_run(demo_world, tmp_path_factory):
    """python train.py config/demo.py --tensorboard=True, as the README's quick start, into a temporary out_dir."""
    out_dir = str(tmp_path_factory.mktemp("demo_run"))
    result = run_script("train.py", "config/demo.py", f"--out_dir={out_dir}", "--tensorboard=True", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return out_dir, result


@pytest.fixture
def random_lora_b():
    """Give every LoRA layer a non-zero B, as after some training."""
    from lora import lora_layers

    def apply(model, seed=1, scale=0.05):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, layer in lora_layers(model):
                layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * scale)
        return model
    return apply
