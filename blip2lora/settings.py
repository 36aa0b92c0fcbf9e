"""
blip2lora/settings.py: train.py's settings from config files and the command line.

The settings block at the top of train.py is the one place that defines the settings,
their defaults and their help; this file applies config files and the command line over it, checks every value,
and prints --help from that block.

    python train.py config/demo.py --max_steps=20 --data data/my_photos --learning-rate 1e-3
Config files hold Python assignments of literals (config/demo.py). On the command line: --key=value or --key value;
`-` and `_` are the same in a key (--max-steps is --max_steps); --data is --data_dir, as in evaluate.py. Strings may
be bare or quoted, lists written as [...]. An unknown key, a wrong type or a value out of range is one line and
exit code 2, before any work.
"""
import ast
import math
import os
import re

import torch

from blip2lora.captioning import GENERATION_LIMITS, GENERATION_PATHS, check_generation
from blip2lora.files import UserError
from lora import MAX_RANK

ALIASES = {"data": "data_dir"}  # evaluate.py's and bench.py's name for the same thing
# The range of each numeric setting (lowest, highest or None): a value outside it is a one-line error, not a crash.
LIMITS = {"learning_rate": (0.0, 10.0), "seed": (0, 2**32 - 1), "lora_r": (1, MAX_RANK), "lora_alpha": (1e-6, 1e6),
          "lora_dropout": (0.0, 0.99), "batch_images": (1, 100_000), "grad_accum": (1, 100_000), "epochs": (1, 100_000),
          "max_steps": (0, 10**9), "min_lr_ratio": (0.0, 1.0), "warmup_steps": (0, 10**9), "weight_decay": (0.0, 10.0),
          "grad_clip": (0.0, None), "max_caption_tokens": (2, 4096), "num_workers": (0, 256),
          "eval_interval": (0, None), "eval_images": (0, None), "eval_batch": (1, 4096),
          "checkpoint_interval": (1, None), "log_interval": (1, None), **GENERATION_LIMITS}
CHOICES = {"device": "auto, cpu, cuda or cuda:N", "dtype": ("auto", "bfloat16", "float16", "float32"),
           "torch_compile": ("auto", True, False), "base_bits": (16, 8, 4), "generation": GENERATION_PATHS}


class SettingsError(UserError):
    """A mistake in how train.py was called (a setting, a config file): exit code 2, as for any usage error."""
    exit_code = 2


def apply(argv, defaults):
    """Config files and --key=value / --key value over the defaults; returns the checked settings."""
    settings = {k: (list(v) if isinstance(v, list) else v) for k, v in defaults.items()}
    for kind, key, value, where in _assignments(argv):
        key = ALIASES.get(key, key)
        if key not in settings:
            raise SettingsError(f"{where}: unknown setting {key!r} (python train.py --help lists them)")
        if kind == "option":  # command-line text: a literal, except that a text setting takes any text (--prompt 1)
            literal = _literal(value)
            value = value if isinstance(defaults[key], str) and type(literal) in (int, float) else literal
        settings[key] = _typed(key, value, settings[key], defaults[key], where)
    check(settings)
    return settings


def _assignments(argv):
    """(kind, key, value, where) for each config-file line and command-line option, in order."""
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--"):
            key, sep, text = arg[2:].partition("=")
            if not sep and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                i, text, sep = i + 1, argv[i + 1], " "
            if not sep or not key:
                raise SettingsError(f"{arg}: give a value: --key=value or --key value")
            yield "option", key.replace("-", "_"), text, arg
        elif arg.startswith("-") and arg != "-":
            raise SettingsError(f"{arg}: settings are written --key=value (python train.py --help lists them)")
        else:
            yield from _config_file(arg)
        i += 1


def _literal(text):
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text  # a bare word is a string: --model=models/blip2


def _config_file(path):
    try:
        with open(path, "rb") as f:
            tree = ast.parse(f.read().decode("utf-8"), path)
    except OSError as e:
        raise SettingsError(f"{path}: cannot read config file ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise SettingsError(f"{path}: not UTF-8 text (byte {e.start}); save the config file as UTF-8") from None
    except SyntaxError as e:
        raise SettingsError(f"{path}:{e.lineno}: not valid Python ({e.msg})") from None
    except (RecursionError, MemoryError, ValueError):
        raise SettingsError(f"{path}: not a config file of 'key = value' lines") from None
    for node in tree.body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # a docstring
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            raise SettingsError(f"{path}:{node.lineno}: only 'key = value' lines are allowed")
        try:
            value = ast.literal_eval(node.value)
        except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
            raise SettingsError(f"{path}:{node.lineno}: the value must be a literal") from None
        yield "config", node.targets[0].id, value, f"{path}:{node.lineno}"


def _typed(key, value, current, default, where):
    """value with the type of the setting's default, or a SettingsError."""
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(default, list) and isinstance(value, (tuple, str)):
        value = [value] if isinstance(value, str) else list(value)
    if default == "auto" and isinstance(value, bool):  # torch_compile: auto, True or False
        return value
    if type(value) is not type(default):
        raise SettingsError(f"{where}: {key} must be {type(default).__name__}, got {value!r}")
    return value


def check(s):
    """Ranges, choices and what a type cannot say: one-line errors for settings that would fail later, or do harm."""
    for key, (low, high) in LIMITS.items():
        value = s[key]
        out_of_range = value < low or (high is not None and value > high)
        if (isinstance(value, float) and not math.isfinite(value)) or out_of_range:
            raise SettingsError(f"{key}={value!r}: must be " + (f"between {low} and {high}" if high is not None
                                                                 else f"at least {low}"))
    for key, allowed in CHOICES.items():
        if key == "device":
            valid = s[key] in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", s[key])
        else:
            valid = s[key] in allowed
        if not valid:
            shown = allowed if isinstance(allowed, str) else ", ".join(map(str, allowed))
            raise SettingsError(f"{key}={s[key]!r}: use {shown}")
    if s["device"].startswith("cuda") and not torch.cuda.is_available():
        raise SettingsError(f"device={s['device']!r}: torch sees no CUDA GPU here; use device=cpu (or auto)")
    targets = s["lora_targets"]
    if not all(isinstance(t, str) and t for t in targets):
        raise SettingsError(f"lora_targets={targets!r}: must be a list of module-path suffixes, e.g. "
                            "['SelfAttention.q', 'SelfAttention.v'], or [] for the defaults (model.lora_targets)")
    if not s["out_dir"].strip():
        raise SettingsError("out_dir is empty: name the folder for the checkpoint, adapter and vision cache")
    if os.path.exists(s["out_dir"]) and not os.path.isdir(s["out_dir"]):
        raise SettingsError(f"out_dir={s['out_dir']!r} is a file, not a folder: name another out_dir")
    try:
        check_generation(s, "settings")
    except UserError as e:
        raise SettingsError(str(e)) from None


def help_text(source_file, defaults):
    """--help: every setting with its default and its comment, read from the settings block of source_file."""
    lines = ["usage: python train.py [CONFIG.py ...] [--key=value | --key value ...]", "",
             "Fine-tune BLIP-2 with LoRA. Settings (default, then what it does); a config file holds 'key = value'",
             "lines, options override it (strings bare or quoted, lists as [...], - or _ in a key):"]
    with open(source_file, encoding="utf-8") as f:
        source = f.read().splitlines()
    start = next(i for i, line in enumerate(source) if line.startswith("# ---") and line.endswith(" settings"))
    end = next(i for i in range(start + 1, len(source)) if source[i].startswith("# ---"))
    for line in source[start + 1:end]:
        setting = re.match(r"(\w+) = (.*?)(?:\s+# (.*))?$", line)
        if setting:
            name, _, comment = setting.groups()
            option = f"  --{name}={defaults[name]!r}"
            lines.append(option.ljust(42) + (comment or "") if len(option) < 42 else
                         option + ("\n" + " " * 42 + comment if comment else ""))
        elif line.startswith("# "):
            lines.append(line[2:] + ":")  # a group: LoRA, optimisation, ...
        elif line.strip().startswith("# "):
            lines.append(" " * 42 + line.strip()[2:])  # a comment's second line
    return "\n".join(lines)
