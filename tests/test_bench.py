"""bench.py measures what train.py does: its step (LoRA settings, the frozen base in eval mode), for both families,
with the keys its readers use, and FLOPs that --memory counts the same on fake tensors."""
import json

import pytest
import torch

from conftest import run_main
from lora import lora_layers


def test_bench_times_the_step_train_py_takes(monkeypatch):
    """bench.py's figures are about train.py's step: its LoRA settings, no dropout but the adapters' own, train.py's
    own step function with its optimizer (weight decay) and its GradScaler (on for float16 only)."""
    import bench
    import train
    from train import SETTINGS
    model = bench.build("tiny", "cpu", torch.float32)
    layers = lora_layers(model)
    settings = (SETTINGS["lora_r"], SETTINGS["lora_alpha"], SETTINGS["lora_dropout"])
    assert layers and all((l.r, l.alpha, getattr(l.dropout, "p", 0.0)) == settings for _, l in layers)
    inside_adapters = {id(m) for _, l in layers for m in l.modules()}
    assert [name for name, m in model.named_modules() if m.training and id(m) not in inside_adapters] == []
    batch, _ = bench.make_batch(model.config, 2, "cpu")
    for dtype in (torch.float32, torch.float16):
        step = bench.step_fn(model, batch, "grouped", None, "cpu", dtype)
        ours, theirs = train.make_optimizer(model, SETTINGS["learning_rate"], SETTINGS["weight_decay"], "cpu", dtype)
        assert step.optimizer.defaults == ours.defaults
        assert step.scaler.is_enabled() == theirs.is_enabled() == (dtype == torch.float16)
    steps = []
    monkeypatch.setattr(train, "train_step", lambda *args, **kwargs: steps.append(args) or torch.tensor(1.0))
    bench.step_fn(model, batch, "grouped_cached", torch.zeros(2, 17, 64), "cpu", torch.float32)()
    assert len(steps) == 1 and steps[0][0] is model


@pytest.mark.parametrize("arch", ["flan-t5-xl", "opt-2.7b"])
def test_bench_json_has_the_keys_its_readers_use_and_memory_counts_the_same_flops(arch):
    code, out, err = run_main("bench", "--arch", arch, "--model", "tiny", "--repeats", "1", "--batch-images", "2",
                              "--json")
    assert code in (0, None), err[-2000:]
    report = json.loads(out)
    assert {"commit", "torch", "transformers", "device", "dtype"} <= set(report) and report["arch"] == arch
    (run,) = report["runs"]
    assert run["batch_images"] == 2 and run["epoch_seconds_projected"] > 0 and run["generation"]["images_per_s"] > 0
    keys = {"captions_per_s", "peak_mem_mb", "first_step_s", "ops_per_step", "gflops_per_caption"}
    assert all(keys <= set(run[mode]) for mode in ("per_pair", "grouped", "grouped_cached"))
    # what depends only on the image runs once per image (T5: vision, encoder, cross-attention keys and values; OPT:
    # vision and the prefix), and reading the cache skips the ViT's operations
    assert run["predicted_speedup_grouped_cached"] > run["predicted_speedup_grouped"] > 1
    assert run["grouped_cached"]["ops_per_step"] < run["grouped"]["ops_per_step"]
    # --memory counts the FLOPs of the same step on fake tensors: the same count as on real ones
    code, out, err = run_main("bench", "--arch", arch, "--model", "tiny", "--memory", "--batch-images", "2",
                              "--eval-batch", "1", "--json")
    assert code == 0, err[-2000:]
    (memory_run,) = json.loads(out)["runs"]
    assert memory_run["gflops_per_caption"] == pytest.approx(run["grouped_cached"]["gflops_per_caption"], rel=1e-6)
