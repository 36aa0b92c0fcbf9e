"""lora.py's and adapter_files.py's promises: identity at init, exact merge, only adapters train, faithful save and
load (in peft too), clear errors."""
import json
import os
import re

import pytest
import torch
import torch.nn as nn

from blip2lora.adapter_files import AdapterError, load_adapter, save_adapter
from lora import LoRALinear, inject_lora, lora_layers, lora_summary, merge_lora
from blip2lora.model import lora_targets


def inputs(model, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    config = model.config
    size = config.vision_config.image_size
    ids = [config.image_token_id] * config.num_query_tokens + [5, 6, 7, 1]
    return {"pixel_values": torch.randn(batch, 3, size, size, generator=g),
            "input_ids": torch.tensor([ids] * batch), "attention_mask": torch.ones(batch, len(ids), dtype=torch.long),
            "decoder_input_ids": torch.tensor([[0, 8, 9, 10]] * batch)}


def logits(model, x):
    with torch.no_grad():
        return model(**x).logits


def test_zero_init_is_identity(tiny_blip2):
    base, injected = tiny_blip2(), tiny_blip2()
    inject_lora(injected, lora_targets(injected.config))
    x = inputs(base)
    assert torch.equal(logits(base, x), logits(injected, x))  # B = 0: exactly the base model, bit for bit


def test_lora_linear_formula():
    base = nn.Linear(6, 4)
    layer = LoRALinear(base, r=2, alpha=6)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 6)
    expected = base(x) + x @ layer.lora_A.T @ layer.lora_B.T * (6 / 2)
    assert torch.allclose(layer(x), expected, atol=1e-6)
    assert layer.lora_A.shape == (2, 6) and layer.lora_B.shape == (4, 2)
    assert layer.weight is base.weight and layer.bias is base.bias
    assert (layer.in_features, layer.out_features) == (6, 4)
    assert "LoRA r=2" in repr(layer)


@pytest.mark.parametrize("r, alpha", [(0, 16), (-1, 16), (8, 0), (8, -2), (10**11, 16), (8, float("inf"))])
def test_bad_rank_or_alpha_is_an_error(r, alpha):
    with pytest.raises(ValueError):
        LoRALinear(nn.Linear(4, 4), r, alpha)


def test_merge_matches_unmerged_float32(tiny_blip2, random_lora_b):
    model = tiny_blip2()
    inject_lora(model, lora_targets(model.config))
    random_lora_b(model)
    x = inputs(model)
    before = logits(model, x)
    layer_path, layer = lora_layers(model)[0]
    expected_weight = layer.base.weight + layer.scaling * layer.lora_B @ layer.lora_A
    merge_lora(model)
    assert not lora_layers(model)  # plain nn.Linear again: save_pretrained writes a normal checkpoint
    assert torch.allclose(model.get_submodule(layer_path).weight, expected_weight, atol=1e-6)  # W' = W + s·BA
    assert torch.allclose(logits(model, x), before, atol=1e-5)


def test_merge_matches_unmerged_bfloat16(tiny_blip2, random_lora_b):
    model = tiny_blip2().to(torch.bfloat16)
    inject_lora(model, lora_targets(model.config))
    random_lora_b(model)
    x = inputs(model)
    x["pixel_values"] = x["pixel_values"].to(torch.bfloat16)
    before = logits(model, x).float()
    merge_lora(model)
    after = logits(model, x).float()
    assert (after - before).abs().max() <= 0.05 * before.abs().max()  # within bf16 rounding of the merged weights


def test_only_lora_tensors_get_gradients(tiny_blip2):
    model = tiny_blip2()
    paths = inject_lora(model, lora_targets(model.config), r=4)
    x = inputs(model)
    model(**x).logits.sum().backward()
    for name, p in model.named_parameters():
        if "lora_" in name:
            assert p.requires_grad and p.grad is not None
        else:
            assert not p.requires_grad and p.grad is None, name
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    expected = sum(4 * (m.in_features + m.out_features) for p, m in lora_layers(model))
    assert trainable == expected and len(paths) == len(lora_layers(model))
    assert f"{trainable:,} trainable" in lora_summary(model)


def test_default_targets_cover_qformer_and_t5_attention_but_not_the_vit(tiny_blip2):
    model = tiny_blip2()
    paths = inject_lora(model, lora_targets(model.config))
    assert any(".crossattention.attention.query" in p for p in paths)
    assert any("qformer" in p and ".attention.attention.value" in p for p in paths)
    for part in ("encoder.block.0.layer.0.SelfAttention.o", "decoder.block.1.layer.0.SelfAttention.q",
                 "decoder.block.0.layer.1.EncDecAttention.v"):
        assert f"language_model.{part}" in paths
    assert not any(p.startswith("vision_model.") for p in paths)


def test_save_then_load_into_fresh_base_reproduces_outputs(tiny_blip2, random_lora_b, tmp_path):
    trained = tiny_blip2()
    inject_lora(trained, lora_targets(trained.config), r=4, alpha=8)
    random_lora_b(trained)
    save_adapter(trained, tmp_path, "some/base")
    config = json.load(open(tmp_path / "adapter_config.json"))
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["base_model_name_or_path"] == "some/base" and config["bias"] == "none"
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    from safetensors.torch import load_file
    keys = load_file(tmp_path / "adapter_model.safetensors")
    assert all(k.startswith("base_model.model.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    fresh = tiny_blip2()
    load_adapter(fresh, tmp_path)  # injects as the config says, then loads
    x = inputs(fresh)
    assert torch.equal(logits(fresh, x), logits(trained, x))


def test_loading_into_a_differently_shaped_base_fails_clearly(tiny_blip2, random_lora_b, tmp_path):
    import demo
    from transformers import Blip2ForConditionalGeneration
    trained = tiny_blip2()
    inject_lora(trained, lora_targets(trained.config))
    save_adapter(trained, tmp_path, "tiny")
    config = demo.tiny_config(vocab_size=48, image_token_id=47)
    config.text_config.d_model = 32  # another base model: T5 width 32 instead of 64
    other = Blip2ForConditionalGeneration(config)
    with pytest.raises(AdapterError, match="shape .* different base model"):
        load_adapter(other, tmp_path)


def test_adapter_with_a_tensor_for_no_layer_fails_naming_the_key(tiny_blip2, tmp_path):
    from safetensors.torch import load_file, save_file
    trained = tiny_blip2()
    inject_lora(trained, lora_targets(trained.config))
    save_adapter(trained, tmp_path, "tiny")
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    tensors["base_model.model.nowhere.lora_A.weight"] = torch.zeros(8, 4)
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match="nowhere.lora_A.weight"):
        load_adapter(tiny_blip2(), tmp_path)


@pytest.mark.parametrize("change, message", [
    (lambda t: t.fill_(float("nan")), "is not finite (NaN or infinity)"),
    (lambda t: t.to(torch.int64), "is torch.int64, not floating point"),
])
def test_adapter_weights_that_are_not_finite_floats_are_refused(tiny_blip2, tmp_path, change, message):
    from safetensors.torch import load_file, save_file
    trained = tiny_blip2()
    inject_lora(trained, lora_targets(trained.config))
    save_adapter(trained, tmp_path, "tiny")
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = sorted(tensors)[0]
    tensors[key] = change(tensors[key].clone())
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match=re.escape(f"{key} {message}")):
        load_adapter(tiny_blip2(), tmp_path)


@pytest.mark.parametrize("change, key", [({"lora_alpha": float("inf")}, "lora_alpha"), ({"r": 10**11}, "r"),
                                         ({"r": "8"}, "r"), ({"lora_alpha": None}, "lora_alpha"),
                                         ({"target_modules": [1]}, "target_modules")])
def test_an_adapter_config_out_of_bounds_is_one_line(tiny_blip2, tmp_path, change, key):
    import json
    trained = tiny_blip2()
    inject_lora(trained, lora_targets(trained.config))
    save_adapter(trained, tmp_path, "tiny")
    config = json.load(open(tmp_path / "adapter_config.json"))
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, **change}))  # inf: Python writes Infinity
    with pytest.raises(AdapterError, match=f"{key} has an invalid value") as error:
        load_adapter(tiny_blip2(), tmp_path)
    assert "\n" not in str(error.value)


def test_target_matching_respects_dot_boundaries():
    model = nn.Module()
    model.attn = nn.Module()
    model.attn.q, model.attn.xq = nn.Linear(4, 4), nn.Linear(4, 4)
    assert inject_lora(model, ["q"]) == ["attn.q"]  # "q" must not match "attn.xq"
    assert isinstance(model.attn.xq, nn.Linear) and not isinstance(model.attn.xq, LoRALinear)


def test_unknown_target_and_double_injection_are_refused(tiny_blip2):
    model = tiny_blip2()
    with pytest.raises(ValueError, match="'SelfAttention.qq'"):
        inject_lora(model, ["SelfAttention.q", "SelfAttention.qq"])
    inject_lora(model, lora_targets(model.config))
    with pytest.raises(ValueError, match="already has LoRA"):
        inject_lora(model, lora_targets(model.config))


def test_bfloat16_base_with_float32_adapters_trains(tiny_blip2):
    model = tiny_blip2().to(torch.bfloat16)
    inject_lora(model, lora_targets(model.config))
    x = inputs(model)
    x["pixel_values"] = x["pixel_values"].to(torch.bfloat16)
    out = model(**x).logits
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    for _, layer in lora_layers(model):
        assert layer.lora_A.dtype == torch.float32 and layer.lora_A.grad is not None
        assert layer.base.weight.dtype == torch.bfloat16


def test_wrapping_t5_feed_forward_wo_still_runs(tiny_blip2):
    model = tiny_blip2()
    paths = inject_lora(model, ["DenseReluDense.wo"])  # T5 reads self.wo.weight.dtype in its forward
    assert paths and all(p.endswith("DenseReluDense.wo") for p in paths)
    model(**inputs(model)).logits.sum().backward()


def test_peft_loads_what_save_adapter_writes_with_caption_settings_beside_it(tiny_blip2, random_lora_b, tmp_path):
    """The adapter folder as train.py leaves it (caption_settings.json beside peft's two files) loads in peft and
    gives the same logits. (OPT's: tests/test_opt.py.)"""
    peft = pytest.importorskip("peft")  # not a project dependency: checked where it is installed
    from blip2lora.captioning import save_caption_settings
    trained = tiny_blip2()
    inject_lora(trained, lora_targets(trained.config))
    random_lora_b(trained)
    save_adapter(trained, tmp_path, "tiny")
    save_caption_settings(str(tmp_path), {"prompt": "a picture of", "num_beams": 2, "max_new_tokens": 9,
                                          "min_new_tokens": 1}, {"data_dir": "/photos", "step": 4})
    loaded = peft.PeftModel.from_pretrained(tiny_blip2(), str(tmp_path)).eval()
    x = inputs(trained)
    assert torch.allclose(logits(loaded, x), logits(trained, x), atol=1e-5)


def test_merge_with_a_non_finite_adapter_in_a_later_layer_changes_nothing(tiny_blip2, random_lora_b):
    model = tiny_blip2()
    inject_lora(model, lora_targets(model.config))
    random_lora_b(model)
    before = {name: p.clone() for name, p in model.named_parameters()}
    count = len(lora_layers(model))
    last_path, last = lora_layers(model)[-1]
    with torch.no_grad():
        last.lora_B[0, 0] = float("inf")
    with pytest.raises(ValueError, match=f"into {last_path} gives non-finite weights; nothing was changed"):
        merge_lora(model)
    assert len(lora_layers(model)) == count  # no layer was merged, the earlier ones included
    after = dict(model.named_parameters())
    assert all(torch.equal(before[n], after[n]) or n.endswith(last_path + ".lora_B") for n in before)
