"""
blip2lora/adapter_files.py: saving and loading adapters in the layout peft reads (train.py, evaluate.py, caption.py).

Adapter files in the layout Hugging Face peft reads: adapter_model.safetensors (the LoRA tensors, named as
lora.lora_state_dict names them) and adapter_config.json, so `peft.PeftModel.from_pretrained(base_model, adapter_dir)`
loads what save_adapter writes (tested); this project never imports peft. load_adapter checks everything it reads
(the config's values, every tensor's name, shape and finiteness) and says what is wrong in one line (AdapterError).
"""
import json
import math
import os

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from blip2lora.files import UserError, atomic_write, first_line, read_json
from lora import MAX_RANK, inject_lora, lora_layers, lora_state_dict


class AdapterError(UserError):
    """An adapter that cannot be used, said in one line: which file, what is wrong, what to do."""


def save_adapter(model, out_dir, base_model_name_or_path):
    """Write only the LoRA tensors (safetensors) and a peft-compatible adapter_config.json into out_dir."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers to save: call inject_lora first")
    first = layers[0][1]
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": str(base_model_name_or_path),
        "r": first.r,
        "lora_alpha": first.alpha,
        "lora_dropout": first.dropout.p if isinstance(first.dropout, nn.Dropout) else 0.0,
        # The exact wrapped paths: peft wraps precisely these, whatever target suffixes found them.
        "target_modules": [path for path, _ in layers],
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
    }
    os.makedirs(out_dir, exist_ok=True)
    tensors = {k: v.to("cpu", torch.float32).contiguous() for k, v in lora_state_dict(model).items()}
    # each file written whole or not at all (files.atomic_write): a kill never leaves half an adapter file
    atomic_write(os.path.join(out_dir, "adapter_model.safetensors"), lambda path: save_file(tensors, path))
    atomic_write(os.path.join(out_dir, "adapter_config.json"), json.dumps(config, indent=2) + "\n")


def read_adapter_config(adapter_dir):
    """adapter_config.json as a dict, or a one-line AdapterError saying what is wrong with the directory."""
    path = os.path.join(adapter_dir, "adapter_config.json")
    if not os.path.isfile(path) or not os.path.isfile(os.path.join(adapter_dir, "adapter_model.safetensors")):
        raise AdapterError(f"{adapter_dir}: not an adapter directory (needs adapter_config.json and "
                           "adapter_model.safetensors, as written by train.py)")
    try:
        config = read_json(path)
    except UserError as e:
        raise AdapterError(str(e)) from None
    if not isinstance(config, dict):
        raise AdapterError(f"{path}: expected a JSON object")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in config:
            raise AdapterError(f"{path}: missing key {key!r}")
    targets, dropout, alpha = config["target_modules"], config.get("lora_dropout", 0.0), config["lora_alpha"]
    checks = {"r": type(config["r"]) is int and 0 < config["r"] <= MAX_RANK,
              "lora_alpha": type(alpha) in (int, float) and 0 < alpha < math.inf,
              "target_modules": isinstance(targets, str) or (isinstance(targets, list) and len(targets) > 0 and
                                                            all(isinstance(t, str) for t in targets)),
              "lora_dropout": type(dropout) in (int, float) and 0 <= dropout < 1}
    for key, valid in checks.items():
        if not valid:
            raise AdapterError(f"{path}: {key} has an invalid value {config.get(key)!r} (r: an integer from 1 to "
                               f"{MAX_RANK}, lora_alpha: a finite positive number, target_modules: a list of module "
                               "names)")
    return config


def load_adapter(model, adapter_dir):
    """Inject LoRA as adapter_config.json says (unless already injected) and load the tensors, checking every key."""
    config = read_adapter_config(adapter_dir)
    if not lora_layers(model):
        try:
            inject_lora(model, config["target_modules"], config["r"], config["lora_alpha"],
                        config.get("lora_dropout", 0.0))
        except ValueError as e:
            raise AdapterError(f"{adapter_dir}: {e} (was the adapter trained on a different base model?)") from None
    expected = {k: v.shape for k, v in lora_state_dict(model).items()}
    file = os.path.join(adapter_dir, "adapter_model.safetensors")
    try:
        tensors = load_file(file)  # safetensors: never pickle
    except Exception as e:
        raise AdapterError(f"{file}: unreadable ({first_line(e)})") from None
    for key, tensor in tensors.items():
        if key not in expected:
            raise AdapterError(f"{adapter_dir}: tensor {key} has no LoRA layer in this model "
                               "(was the adapter trained on a different base model?)")
        if tensor.shape != expected[key]:
            raise AdapterError(f"{adapter_dir}: tensor {key} has shape {tuple(tensor.shape)}, the model expects "
                               f"{tuple(expected[key])} (was the adapter trained on a different base model?)")
        if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
            raise AdapterError(f"{file}: tensor {key} is " + ("not finite (NaN or infinity)" if
                               tensor.is_floating_point() else f"{tensor.dtype}, not floating point") +
                               "; this adapter is damaged: train it again")
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise AdapterError(f"{adapter_dir}: no tensor for {missing[0]} ({len(missing)} LoRA tensors missing)")
    with torch.no_grad():
        for path, layer in lora_layers(model):
            layer.lora_A.copy_(tensors[f"base_model.model.{path}.lora_A.weight"])
            layer.lora_B.copy_(tensors[f"base_model.model.{path}.lora_B.weight"])
    return config
