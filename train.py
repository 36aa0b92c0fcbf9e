"""
Fine-tune BLIP-2 (Salesforce/blip2-flan-t5-xl) on image captions with hand-written LoRA (lora.py).

    python train.py config/demo.py                              # offline demo: about 2 minutes on 2 CPU cores
    python train.py --model=models/blip2-flan-t5-xl --data_dir=data/flickr8k
    python train.py --data_dir=my_photos --prompt="a product photo of"     # your own captions (README)
    torchrun --standalone --nproc_per_node=4 train.py --data_dir=data/flickr8k       # several GPUs (or processes)

What the loop does, top to bottom:
- LoRA on the Q-Former and T5 attention; everything else frozen; AdamW over the LoRA tensors only.
- Grouped steps: a micro-batch is B images with all their captions; ViT, Q-Former and T5 encoder run once per image,
  the decoder once per caption (model.grouped_caption_loss). The ViT is frozen, so its outputs are computed once and
  memory-mapped from disk (model.VisionCache); `vision_cache=False` turns that off.
- Loss = summed caption-token cross-entropy / caption tokens in the whole optimizer step (all micro-batches, all
  ranks), so long and short captions weigh the same however the batch is split.
- On CUDA that loss is compiled with torch.compile as one graph (`torch_compile`; captions then padded to a fixed
  length, so it compiles once); on the CPU it runs eagerly.
- Linear warmup then cosine decay; gradient clipping; bf16 autocast on GPUs that support it, fp16 + GradScaler only
  when asked (T5 overflows in fp16), float32 on CPU. A non-finite loss stops the run, keeping the last checkpoint.
- Every `eval_interval` steps and at each epoch end: CIDEr on the val split; the best adapter goes to out_dir/adapter,
  with the prompt and generation settings it was trained with (caption.py and evaluate.py use them).
- Every `checkpoint_interval` steps: out_dir/checkpoint (adapter, optimizer, RNG, step, settings), written atomically.
  Running the same command again resumes from it (a change to a setting in FIXED_ON_RESUME is refused); a
  finished run is not trained again.
- At the end: zero-shot base and best adapter scored on the test split -> out_dir/results.json, and
  out_dir/report.html with every test image and both captions, the lowest CIDEr first.

The code reads in the order it runs: train(cfg) calls start_processes, check_resume, load_data_and_model,
prepare_vision_cache, prepare_training, then train_epochs (forward_backward in each step, evaluate_val now and
then), and final_evaluation. Settings reach every stage as `cfg`, explicitly.

Settings: the block below. Override with a config file (Python assignments of literals, e.g. config/demo.py) and/or
--key=value; an unknown key or a value of the wrong type is an error.
"""
import ast
import json
import math
import os
import pickle
import re
import shutil
import sys
import time
from types import SimpleNamespace

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from caption import GENERATION_DEFAULTS, save_caption_settings  # the generation defaults, defined once
from lora import DEFAULT_TARGETS, save_adapter

# ----------------------------------------------------------------------------------------------------- settings
model = "Salesforce/blip2-flan-t5-xl"  # hub id or local directory
data_dir = "data/flickr8k"             # Flickr8k, Karpathy JSON or imagefolder metadata (python data.py DIR checks it)
caption_column = ""                    # imagefolder metadata: the caption column ("" = text, caption or captions)
out_dir = "out"                        # checkpoint/, adapter/, vision_cache/, log.jsonl, results.json
prompt = GENERATION_DEFAULTS["prompt"]  # T5 encoder prompt after the image tokens: "a photo of", as LAVIS's recipe
# LoRA
lora_r = 8                             # the rank r of each update B @ A
lora_alpha = 16                        # the update is scaled by lora_alpha / lora_r
lora_dropout = 0.05                    # dropout on the adapters' input (the frozen base has none)
lora_targets = list(DEFAULT_TARGETS)   # module-path suffixes: Q-Former self/cross and all T5 attention (lora.py)
# optimisation
batch_images = 16                      # images per micro-batch, each with all its captions (80 captions on Flickr8k)
grad_accum = 1                         # micro-batches per optimizer step (per process)
epochs = 3                             # passes over the train split (unless max_steps is set)
max_steps = 0                          # optimizer steps; 0 = epochs over the train split
learning_rate = 2e-4                   # AdamW's peak learning rate, reached after warmup_steps
min_lr_ratio = 0.1                     # cosine decays to learning_rate * min_lr_ratio
warmup_steps = 50                      # linear warmup from 0, then cosine decay
weight_decay = 0.0                     # AdamW weight decay on the LoRA tensors
grad_clip = 1.0                        # max global gradient norm; 0 = off
max_caption_tokens = 40                # training cuts longer captions (reported at the start); memory grows with it
dtype = "auto"                         # auto (bf16 on GPUs that have it, else float32) | bfloat16 | float16 | float32
device = "auto"                        # auto | cpu | cuda
vision_cache = True                    # compute the frozen ViT's outputs once (valid while no LoRA is in the ViT)
torch_compile = "auto"                 # compile the grouped loss: far fewer kernel launches, minutes to compile;
                                       # auto = on CUDA, off on CPU; True or False to force
num_workers = 4                        # image-decoding processes (only when images are read: cache build, no cache)
# evaluation, checkpoints, logs
eval_interval = 500                    # steps between val CIDEr evaluations (and at each epoch end); 0 = none
eval_images = 500                      # val images used for that (0 = all)
final_eval = True                      # score zero-shot and fine-tuned on the test split at the end
num_beams = GENERATION_DEFAULTS["num_beams"]            # beam search in evaluations (saved with the adapter)
max_new_tokens = GENERATION_DEFAULTS["max_new_tokens"]  # longest generated caption in tokens (saved, as above)
min_new_tokens = GENERATION_DEFAULTS["min_new_tokens"]  # shortest generated caption in tokens (saved, as above)
checkpoint_interval = 200              # steps between checkpoints
log_interval = 10                      # steps between log lines (also written to log.jsonl)
seed = 1337                            # LoRA init, dropout and the data order
# -------------------------------------------------------------------------------------------------------------


class SettingsError(Exception):
    pass


# The range of each numeric setting (lowest, highest or None): a value outside it is a one-line error, not a crash.
LIMITS = {"learning_rate": (0.0, None), "seed": (0, 2**32 - 1), "lora_r": (1, None), "lora_dropout": (0.0, 0.99),
          "batch_images": (1, None), "grad_accum": (1, None),
          "epochs": (1, None), "max_steps": (0, None), "min_lr_ratio": (0.0, 1.0), "warmup_steps": (0, None),
          "weight_decay": (0.0, None), "grad_clip": (0.0, None), "max_caption_tokens": (2, None),
          "num_workers": (0, None), "eval_interval": (0, None), "eval_images": (0, None), "num_beams": (1, None),
          "max_new_tokens": (1, None), "min_new_tokens": (0, None), "checkpoint_interval": (1, None),
          "log_interval": (1, None)}


def settings_help():
    """The text of --help: every setting with its default and its comment, read from the settings block above."""
    lines = ["usage: python train.py [CONFIG.py ...] [--key=value ...]", "",
             "Fine-tune BLIP-2 with LoRA. Settings (default, then what it does); a config file holds 'key = value'",
             "lines, --key=value overrides it (strings bare or quoted, lists as [...]):"]
    source = open(__file__, encoding="utf-8").read().splitlines()
    start = next(i for i, line in enumerate(source) if line.startswith("# ---") and line.endswith(" settings"))
    end = next(i for i in range(start + 1, len(source)) if source[i].startswith("# ---"))
    for line in source[start + 1:end]:
        setting = re.match(r"(\w+) = (.*?)(?:\s+# (.*))?$", line)
        if setting:
            name, _, comment = setting.groups()
            option = f"  --{name}={globals()[name]!r}"
            lines.append(option.ljust(42) + (comment or "") if len(option) < 42 else
                         option + ("\n" + " " * 42 + comment if comment else ""))
        elif line.startswith("# "):
            lines.append(line[2:] + ":")  # a group: LoRA, optimisation, ...
        elif line.strip().startswith("# "):
            lines.append(" " * 42 + line.strip()[2:])  # a comment's second line
    return "\n".join(lines)


def apply_settings(argv, settings):
    """Config files and --key=value over the defaults above; a typo, a wrong type or a value out of range is a
    one-line error."""
    def assign(key, value, where):
        if key not in settings:
            raise SettingsError(f"{where}: unknown setting {key!r} (settings are listed at the top of train.py)")
        default = settings[key]
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(default, list) and isinstance(value, (tuple, str)):
            value = [value] if isinstance(value, str) else list(value)
        if default == "auto" and isinstance(value, bool):  # torch_compile: auto, True or False
            default = value
        if type(value) is not type(default):
            raise SettingsError(f"{where}: {key} must be {type(default).__name__}, got {value!r}")
        settings[key] = value

    for arg in argv:
        if arg.startswith("--"):
            key, sep, text = arg[2:].partition("=")
            if not sep:
                raise SettingsError(f"{arg}: write settings as --key=value")
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                value = text  # a bare word is a string: --model=models/blip2
            assign(key, value, arg)
        else:
            try:
                tree = ast.parse(open(arg, "rb").read().decode("utf-8"), arg)
            except OSError as e:
                raise SettingsError(f"{arg}: cannot read config file ({e.strerror})") from None
            except UnicodeDecodeError as e:
                raise SettingsError(f"{arg}: not UTF-8 text (byte {e.start}); save the config file as UTF-8") from None
            except SyntaxError as e:
                raise SettingsError(f"{arg}:{e.lineno}: not valid Python ({e.msg})") from None
            for node in tree.body:
                if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
                    continue  # a docstring
                simple = isinstance(node, ast.Assign) and len(node.targets) == 1
                if not (simple and isinstance(node.targets[0], ast.Name)):
                    raise SettingsError(f"{arg}:{node.lineno}: only 'key = value' lines are allowed")
                try:
                    value = ast.literal_eval(node.value)
                except ValueError:
                    raise SettingsError(f"{arg}:{node.lineno}: the value must be a literal") from None
                assign(node.targets[0].id, value, f"{arg}:{node.lineno}")
    for key, (low, high) in LIMITS.items():
        if settings[key] < low or (high is not None and settings[key] > high):
            raise SettingsError(f"{key}={settings[key]!r}: must be "
                                + (f"between {low} and {high}" if high is not None else f"at least {low}"))
    check_settings(settings)
    return settings


def check_settings(s):
    """What a type and a range cannot say: one-line errors for settings that would fail later, or do harm."""
    targets = s["lora_targets"]
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise SettingsError(f"lora_targets={targets!r}: must be a non-empty list of module-path suffixes, "
                            "e.g. ['SelfAttention.q', 'SelfAttention.v'] (the defaults are in lora.py)")
    if not s["out_dir"].strip():
        raise SettingsError("out_dir is empty: name the folder for the checkpoint, adapter and vision cache")
    if os.path.exists(s["out_dir"]) and not os.path.isdir(s["out_dir"]):
        raise SettingsError(f"out_dir={s['out_dir']!r} is a file, not a folder: name another out_dir")
    device_name = s["device"]
    if device_name not in ("auto", "cpu", "cuda") and not (device_name.startswith("cuda:") and
                                                           device_name[5:].isdigit()):
        raise SettingsError(f"device={device_name!r}: use auto, cpu, cuda or cuda:N")
    if device_name.startswith("cuda") and not torch.cuda.is_available():
        raise SettingsError(f"device={device_name!r}: torch sees no CUDA GPU here; use device=cpu (or auto)")
    if s["torch_compile"] not in ("auto", True, False):
        raise SettingsError(f"torch_compile={s['torch_compile']!r}: use auto, True or False")
    if s["dtype"] not in ("auto", "bfloat16", "float16", "float32"):
        raise SettingsError(f"dtype={s['dtype']!r}: use auto, bfloat16, float16 or float32")


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


def lr_at(cfg, step, total_steps):
    """Linear warmup to learning_rate, then cosine decay to learning_rate * min_lr_ratio."""
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    return cfg.learning_rate * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 *
                                (1 + math.cos(math.pi * min(1.0, progress))))


def epoch_micro_batches(cfg, num_images, epoch, group):
    """The epoch's shuffled image order cut into micro-batches; a trailing part too small for a full optimizer step
    on every rank is dropped. Deterministic in (seed, epoch), so a resumed run sees the same batches."""
    order = torch.randperm(num_images, generator=torch.Generator().manual_seed(cfg.seed + epoch)).tolist()
    size = cfg.batch_images
    batches = [order[i:i + size] for i in range(0, num_images - size + 1, size)]
    return batches[:len(batches) - len(batches) % group]


# ------------------------------------------------------------------------------------------------- checkpoints

# Settings a resumed run must keep: they define the adapter's shape and meaning, the inputs, and the data order.
# Others (learning rate after a NaN, evaluation, logging) may change; the log says which did.
FIXED_ON_RESUME = {"model", "data_dir", "caption_column", "prompt", "lora_r", "lora_alpha", "lora_targets",
                   "batch_images", "grad_accum", "max_caption_tokens", "seed"}


def rng_state():
    """The random state dropout draws from: CPU and every GPU."""
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return rng


def save_trained_adapter(blip2, path, settings):
    """The adapter (peft's layout) and, beside it, the prompt and generation settings caption.py/evaluate.py use."""
    save_adapter(blip2, path, settings["model"])
    save_caption_settings(path, settings)


def save_checkpoint(path, state, blip2, optimizer, scaler, rng):
    """Everything needed to continue exactly, into path.tmp then renamed: a kill mid-save leaves the old one."""
    tmp, old = path + ".tmp", path + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_trained_adapter(blip2, tmp, state["settings"])  # the adapter, as out_dir/adapter holds it
    torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))  # tensors only: loads with weights_only
    save_file(rng, os.path.join(tmp, "rng.safetensors"))
    with open(os.path.join(tmp, "state.json"), "w") as f:
        json.dump({**state, "scaler": scaler.state_dict()}, f, indent=1)
    if os.path.isdir(path):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def require_disk_space(cache, num_images):
    """The vision cache must fit on its disk (COCO in bf16 is about 90 GB): say so now, not when the disk is full."""
    os.makedirs(os.path.dirname(cache.dir), exist_ok=True)
    free = shutil.disk_usage(os.path.dirname(cache.dir)).free
    if cache.nbytes > free:
        fail(f"vision cache: {num_images} images need {cache.nbytes / 1e9:.1f} GB in {os.path.dirname(cache.dir)}, "
             f"but only {free / 1e9:.1f} GB is free there. Set vision_cache=False (the ViT then runs in every step) "
             "or use an out_dir on a disk with room")


class CheckpointError(Exception):
    pass


STATE_KEYS = {"step": int, "best_cider": float, "history": list, "finished": bool, "settings": dict, "scaler": dict}


def read_state(path):
    """A checkpoint's state.json, checked: a damaged file is a one-line CheckpointError, not a traceback."""
    file = os.path.join(path, "state.json")
    try:
        state = json.loads(open(file, "rb").read().decode("utf-8"))
    except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8
        raise CheckpointError(f"{file}: unreadable ({type(e).__name__})") from None
    for key, kind in STATE_KEYS.items():
        if not isinstance(state, dict) or not isinstance(state.get(key), (int, float) if kind is float else kind):
            raise CheckpointError(f"{file}: no valid {key!r} entry")
    return state


def restore(path, state, optimizer, scaler, device):
    """Load the optimizer, loss scaler and random state of a checkpoint, each file checked (CheckpointError)."""
    file = os.path.join(path, "optimizer.pt")
    try:
        # weights_only: tensors and plain containers only; a file holding code is refused, never run
        optimizer.load_state_dict(torch.load(file, weights_only=True, map_location=device))
    except pickle.UnpicklingError:  # (torch's own message would suggest weights_only=False: never do that here)
        raise CheckpointError(f"{file}: holds more than tensors (code, or another program's data): not loaded")
    except (OSError, RuntimeError, EOFError, ValueError, KeyError) as e:
        raise CheckpointError(f"{file}: unreadable ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    file = os.path.join(path, "rng.safetensors")
    try:
        scaler.load_state_dict(state["scaler"])
        rng = load_file(file)
        torch.set_rng_state(rng["cpu"])
        for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
            if f"cuda{i}" in rng:
                torch.cuda.set_rng_state(rng[f"cuda{i}"], i)
    except (OSError, RuntimeError, KeyError, SafetensorError) as e:
        raise CheckpointError(f"{file}: unreadable ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None


_held_locks = []  # open lock files: a lock lasts while its file stays open


def lock_out_dir(path):
    """An OS lock on out_dir/.lock for the life of the process: a second run into the same folder stops with one
    line instead of overwriting the first run's checkpoint. The OS releases it on any exit, kill -9 included."""
    import fcntl
    os.makedirs(path, exist_ok=True)
    handle = open(os.path.join(path, ".lock"), "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        fail(f"{path} is in use by another train.py (process {handle.read().strip() or '?'}): wait for it to end, "
             "or give this run another out_dir")
    handle.truncate(0)
    handle.write(f"{os.getpid()}\n")  # for the second run's message
    handle.flush()
    _held_locks.append(handle)


def find_checkpoint(path):
    """The checkpoint to resume from, if any: a crash between the two renames leaves only path.old."""
    for candidate in (path, path + ".old"):
        if os.path.isfile(os.path.join(candidate, "state.json")):
            return candidate
    return None


def default_settings():
    """The settings block above as a dict (a fresh copy: lists included)."""
    return {k: (list(v) if isinstance(v, list) else v) for k, v in globals().items()
            if not k.startswith("_") and isinstance(v, (int, float, bool, str, list))}


# ------------------------------------------------------------------------------------------- the run, in stages

def start_processes(cfg):
    """One process per GPU under torchrun (gloo on CPU), or just this one; and the precision they compute in."""
    from model import autocast_context, autocast_dtype
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if ddp:
        cuda = torch.cuda.is_available() and cfg.device != "cpu"
        dist.init_process_group(backend="nccl" if cuda else "gloo")
        rank, world_size = dist.get_rank(), dist.get_world_size()
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu"
        if cuda:
            torch.cuda.set_device(device)
    else:
        rank, world_size = 0, 1
        device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    dtype = {"auto": autocast_dtype(device), "bfloat16": torch.bfloat16, "float16": torch.float16,
             "float32": torch.float32}[cfg.dtype]
    p = SimpleNamespace(ddp=ddp, rank=rank, world_size=world_size, master=rank == 0, device=device,
                        device_type=device_type, dtype=dtype,
                        autocast=autocast_context(device, dtype),  # bf16/fp16 autocast, or nothing for float32
                        compiling=device_type == "cuda" if cfg.torch_compile == "auto" else cfg.torch_compile,
                        log=print if rank == 0 else (lambda *a, **k: None))
    if dtype == torch.float16:
        p.log("warning: float16 with T5 often overflows (NaN/inf loss); bfloat16 or float32 are safer")
    return p


def check_resume(cfg, p):
    """Lock out_dir and read its checkpoint, if any: (path or None, state). A changed setting that defines the run is
    refused, and a finished run prints its results and returns None."""
    if p.master:
        lock_out_dir(cfg.out_dir)  # held until the process ends, however it ends
    checkpoint_dir, results_path = os.path.join(cfg.out_dir, "checkpoint"), os.path.join(cfg.out_dir, "results.json")
    resume_from = find_checkpoint(checkpoint_dir)
    try:
        state = read_state(resume_from) if resume_from else {}
    except CheckpointError as e:
        fail(f"{e}; delete {checkpoint_dir} to train this run afresh")
    settings = vars(cfg)
    changed = {k: was for k, was in state.get("settings", {}).items() if k in settings and settings[k] != was}
    for key in sorted(FIXED_ON_RESUME & changed.keys()):  # sorted: the same key is reported every time
        fail(f"{resume_from} was written with {key}={changed[key]!r}, this run has {key}={settings[key]!r}: resume "
             f"with the same value, or train afresh in another out_dir (or delete {checkpoint_dir})")
    if state.get("finished") and (os.path.isfile(results_path) or not cfg.final_eval):
        p.log(f"{cfg.out_dir}: this run has finished (delete {checkpoint_dir} to train again)")
        if os.path.isfile(results_path) and p.master:
            from evaluate import print_table
            results = json.load(open(results_path))
            print("test split:")
            print_table({"zero-shot": results["zero_shot"], "fine-tuned": results["fine_tuned"]})
        return None
    if changed:
        p.log("resuming with changed settings: " + ", ".join(f"{k} {w!r} -> {settings[k]!r}"
                                                           for k, w in changed.items()))
    return resume_from, state


def load_data_and_model(cfg, p):
    """The caption collection, BLIP-2 with LoRA injected, and the encoder's prompt ids; any problem is one line."""
    # (The project's modules are imported inside the stages: the settings block's `model` would hide model.py.)
    import demo
    from data import DataError, encoder_prompt_ids, long_captions, read_captions
    from evaluate import ScoringError, require_java
    from lora import inject_lora, lora_summary
    from model import ModelError, cast_frozen_qformer, load_blip2
    try:
        if p.master:
            demo.ensure_demo_world(cfg.data_dir, log=p.log)
            demo.ensure_demo_world(cfg.model, log=p.log)
        if p.ddp:
            dist.barrier()
        data = read_captions(cfg.data_dir, cfg.caption_column or None)
        # frozen base in the compute dtype (halves memory on GPUs); LoRA tensors stay float32 (lora.py)
        blip2, processor = load_blip2(cfg.model, p.device, dtype=p.dtype if p.device_type == "cuda" else torch.float32)
        wrapped = inject_lora(blip2, cfg.lora_targets, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout)
        cast_frozen_qformer(blip2, p.dtype)  # bf16: fewer casts per step, the same numbers
        prompt_ids = encoder_prompt_ids(processor.tokenizer, cfg.prompt, blip2.config.num_query_tokens,
                                        blip2.config.image_token_id)
        if cfg.eval_interval or cfg.final_eval:
            require_java()  # now, not after hours of training
    except (DataError, ModelError, ScoringError, ValueError) as e:
        fail(e)
    p.log(f"{data.layout}: " + ", ".join(f"{s} {len(v)} images" for s, v in data.splits.items())
          + (f"; {len(data.skipped)} entries skipped (python data.py {cfg.data_dir})" if data.skipped else ""))
    p.log(lora_summary(blip2))
    too_long, longest = long_captions(data.splits["train"], processor.tokenizer, cfg.max_caption_tokens)
    if too_long:
        p.log(f"{too_long} train captions are longer than max_caption_tokens={cfg.max_caption_tokens} (the longest: "
              f"{longest} tokens); training reads their first {cfg.max_caption_tokens} tokens. Raise "
              "max_caption_tokens to keep them whole: memory and time per caption grow with it")
    return data, blip2, processor, prompt_ids, wrapped


def prepare_vision_cache(cfg, p, blip2, processor, items, prompt_ids, wrapped):
    """The frozen ViT's outputs of every image, computed once (rank 0 builds, the others wait); None when off."""
    from data import CaptionCollator, ImageCaptionDataset
    from model import VisionCache
    if not cfg.vision_cache:
        return None
    if any(path.startswith("vision_model.") for path in wrapped):
        p.log("vision cache: off (a LoRA target is inside the ViT, so its outputs change while training)")
        return None
    image_size = "x".join(str(processor.image_processor.size[k]) for k in ("height", "width"))
    key = (blip2, cfg.model, image_size, items, p.dtype)
    cache = VisionCache(os.path.join(cfg.out_dir, "vision_cache"), *key)
    if cache.problem and p.master:
        p.log(f"vision cache: {cache.dir} cannot be used ({cache.problem}); building it again")
    if not cache.complete and p.master:
        p.log(f"vision cache: computing ViT outputs of {len(items)} images once "
              f"({cache.nbytes / 1e9:.1f} GB in {cache.dir}) ...")
        require_disk_space(cache, len(items))
        # its own generator: drawing worker seeds from the global RNG would change the dropout of the run
        loader = torch.utils.data.DataLoader(ImageCaptionDataset(items, processor.image_processor), batch_size=32,
                                             num_workers=min(cfg.num_workers, os.cpu_count() or 1),
                                             collate_fn=CaptionCollator(items, processor.tokenizer, prompt_ids),
                                             generator=torch.Generator())
        cache.build(blip2, loader, p.device, p.autocast, log=p.log)
    if p.ddp:
        dist.barrier()
        cache = VisionCache(os.path.join(cfg.out_dir, "vision_cache"), *key)  # now complete on every rank
    return cache


def forward_backward(cfg, p, blip2, step_batches, cache, train_items, caption_loss, scaler, params):
    """One optimizer step's micro-batches forward and backward; with several processes, the gradients summed over
    them. Returns the step's loss: the caption-token mean over every micro-batch of every rank."""
    from model import vision_embeds
    # every token of the step, on every rank, counts once: the gradient is of the mean over all of them
    tokens = torch.tensor(float(sum((b["labels"] != -100).sum() for b in step_batches)), device=p.device)
    if p.ddp:
        dist.all_reduce(tokens)
    loss_sum = torch.zeros((), device=p.device)
    for b in step_batches:
        b = {k: v.to(p.device) if torch.is_tensor(v) else v for k, v in b.items()}
        with p.autocast:
            if cache is not None:
                image_embeds = cache.lookup([train_items[i].name for i in b["image_index"].tolist()], p.device)
            else:
                with torch.no_grad():
                    image_embeds = vision_embeds(blip2, b["pixel_values"])
            batch_loss, _ = caption_loss(blip2, b, image_embeds)
        scaler.scale(batch_loss / tokens).backward()
        loss_sum += batch_loss.detach()
    if p.ddp:
        # data parallelism by hand: sum the LoRA gradients over ranks (one flat buffer; they are 0.26% of the
        # model) and the losses for the log. Each rank divided by the global token count already.
        flat = torch.cat([q.grad.flatten() if q.grad is not None else torch.zeros_like(q).flatten() for q in params])
        dist.all_reduce(flat)
        start = 0
        for q in params:
            q.grad = flat[start:start + q.numel()].view_as(q)
            start += q.numel()
        dist.all_reduce(loss_sum)
    return (loss_sum / tokens).item()


def stop_on_a_non_finite_loss(cfg, p, loss, step):
    if not math.isfinite(loss):
        kept = find_checkpoint(os.path.join(cfg.out_dir, "checkpoint"))
        fail(f"the loss became {loss} at step {step}. "
             + ("float16 overflows in T5: use dtype=bfloat16 or float32. " if p.dtype == torch.float16
                else f"Lower learning_rate (now {cfg.learning_rate:g}) or check the data. ")
             + (f"The last good checkpoint ({kept}, step {json.load(open(os.path.join(kept, 'state.json')))['step']})"
                " is kept; fix the setting and run again to resume from it." if kept else
                "No checkpoint was written yet."))


def evaluate_val(cfg, p, run, blip2, processor, val_items, prompt_ids, cache):
    """CIDEr on the val images; rank 0 only, the others wait. Keeps the best adapter in out_dir/adapter."""
    from evaluate import caption_items, score_captions
    from model import train_mode
    if p.master:
        blip2.eval()
        predictions = caption_items(blip2, processor, val_items, prompt_ids, p.device, p.autocast, cache,
                                    num_beams=cfg.num_beams, max_new_tokens=cfg.max_new_tokens,
                                    min_new_tokens=cfg.min_new_tokens)
        cider = score_captions(predictions, {i.name: i.captions for i in val_items}, metrics=("CIDEr",))["CIDEr"]
        run.history.append({"step": run.step, "val_CIDEr": cider})
        run.record({"step": run.step, "val_CIDEr": cider})
        improved = cider > run.best_cider
        if improved:
            run.best_cider = cider
            save_trained_adapter(blip2, os.path.join(cfg.out_dir, "adapter"), vars(cfg))
        p.log(f"step {run.step}: val CIDEr {cider:.3f}" + (" (best so far: adapter saved)" if improved else
                                                            f" (best {run.best_cider:.3f})"))
        train_mode(blip2)
    if p.ddp:
        dist.barrier()


def final_evaluation(cfg, p, blip2, processor, test_items, prompt_ids, cache):
    """The kept adapter and the zero-shot base on the test split: results.json, the table, and report.html."""
    from evaluate import caption_items, captions_without_adapter, print_table, score_split, write_html
    from lora import load_adapter
    blip2.eval()
    load_adapter(blip2, os.path.join(cfg.out_dir, "adapter"))  # the best one by val CIDEr, or the final one
    generation = dict(num_beams=cfg.num_beams, max_new_tokens=cfg.max_new_tokens, min_new_tokens=cfg.min_new_tokens)
    fine_tuned = caption_items(blip2, processor, test_items, prompt_ids, p.device, p.autocast, cache, **generation)
    zero_shot = captions_without_adapter(blip2, processor, test_items, prompt_ids, p.device, p.autocast, cache,
                                         **generation)
    columns, rows = score_split(test_items, fine_tuned, "fine-tuned", zero_shot)
    results_path = os.path.join(cfg.out_dir, "results.json")
    with open(results_path + ".tmp", "w") as f:
        json.dump({"zero_shot": columns["zero-shot"], "fine_tuned": columns["fine-tuned"]}, f, indent=1)
    os.replace(results_path + ".tmp", results_path)
    report_path = os.path.join(cfg.out_dir, "report.html")  # both captions are at hand: no extra pass
    write_html(report_path, f"BLIP-2 captions, {cfg.data_dir} test split", columns, rows)
    p.log(f"test split ({len(test_items)} images), beam {cfg.num_beams}:")
    print_table({"zero-shot": columns["zero-shot"], "fine-tuned": columns["fine-tuned"]})
    p.log(f"adapter: {os.path.join(cfg.out_dir, 'adapter')}   scores: {results_path}   report: {report_path}")


class RunState:
    """What the loop carries from step to step and a checkpoint saves beside the weights: the step, the best val
    CIDEr so far and the val history; and the log file."""

    def __init__(self, cfg, p, steps_per_epoch):
        self.cfg, self.p, self.steps_per_epoch = cfg, p, steps_per_epoch
        self.step, self.best_cider, self.history = 0, -1.0, []
        os.makedirs(cfg.out_dir, exist_ok=True)
        self.log_file = open(os.path.join(cfg.out_dir, "log.jsonl"), "a") if p.master else None

    def record(self, entry):
        if self.log_file:
            self.log_file.write(json.dumps(entry) + "\n")
            self.log_file.flush()

    def checkpoint(self, t, rng, finished=False):
        if self.p.master:
            epoch, step_in_epoch = divmod(self.step, self.steps_per_epoch)  # the data position (batches are seeded)
            save_checkpoint(os.path.join(self.cfg.out_dir, "checkpoint"),
                            {"step": self.step, "epoch": epoch, "step_in_epoch": step_in_epoch,
                             "best_cider": self.best_cider, "history": self.history, "finished": finished,
                             "settings": vars(self.cfg)}, t.blip2, t.optimizer, t.scaler, rng)


def prepare_training(cfg, p, blip2, processor, train_items, prompt_ids, cache):
    """Everything the loop uses, in one namespace: batching, the (compiled) loss, the optimizer and the schedule."""
    from data import CaptionCollator, ImageCaptionDataset
    from model import grouped_caption_loss
    t = SimpleNamespace(blip2=blip2, train_items=train_items, cache=cache)
    t.collate = CaptionCollator(train_items, processor.tokenizer, prompt_ids, cfg.max_caption_tokens,
                                load_images=cache is None, fixed_length=p.compiling)
    # fullgraph: a graph break is an error, not a silent slowdown (tests/test_fast.py keeps the loss one graph)
    t.caption_loss = torch.compile(grouped_caption_loss, fullgraph=True) if p.compiling else grouped_caption_loss
    t.dataset = ImageCaptionDataset(train_items, processor.image_processor, load_images=cache is None)
    t.group = cfg.grad_accum * p.world_size  # micro-batches per optimizer step, all ranks together
    t.steps_per_epoch = len(epoch_micro_batches(cfg, len(train_items), 0, t.group)) // t.group
    if t.steps_per_epoch == 0:
        fail(f"{cfg.data_dir}: {len(train_items)} train images is fewer than one step needs "
             f"(batch_images * grad_accum * processes = {cfg.batch_images * t.group}); lower batch_images")
    t.total_steps = cfg.max_steps or cfg.epochs * t.steps_per_epoch
    t.params = [q for q in blip2.parameters() if q.requires_grad]  # exactly the LoRA tensors
    t.optimizer = torch.optim.AdamW(t.params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                    fused=p.device_type == "cuda")
    t.scaler = torch.amp.GradScaler(p.device_type, enabled=p.dtype == torch.float16)
    return t


def train_epochs(cfg, p, run, t, on_step_end):
    """The loop: from run.step to the last step, epoch by epoch, with the data order fixed by (seed, epoch)."""
    loader_rng = torch.Generator()  # the loader draws its worker seeds here, not from the global RNG (dropout's)
    resumed_at = run.step
    while run.step < t.total_steps:
        epoch, offset = divmod(run.step, t.steps_per_epoch)
        micro = epoch_micro_batches(cfg, len(t.train_items), epoch, t.group)[offset * t.group:]
        mine = [b for i, b in enumerate(micro) if i % p.world_size == p.rank]  # shard by rank within each step
        loader = torch.utils.data.DataLoader(t.dataset, batch_sampler=mine, collate_fn=t.collate,
                                             generator=loader_rng,
                                             num_workers=0 if t.cache else min(cfg.num_workers, os.cpu_count() or 1))
        batches = iter(loader)
        for _ in range(t.steps_per_epoch - offset):
            if run.step >= t.total_steps:
                break
            # The checkpoint of step s (the weights after s updates) is written in the step that uses those weights,
            # once their loss is known to be finite and before they change: it never holds weights that gave a NaN.
            started = time.time()
            saving = run.step % cfg.checkpoint_interval == 0 and run.step != resumed_at
            rng_before_step = rng_state() if saving else None  # what a resumed run must start this step from
            lr = lr_at(cfg, run.step, t.total_steps)
            for g in t.optimizer.param_groups:
                g["lr"] = lr
            step_batches = [next(batches) for _ in range(cfg.grad_accum)]
            skipped = sum(b["skipped"] for b in step_batches)
            step_batches = [b for b in step_batches if "labels" in b]
            loss = forward_backward(cfg, p, t.blip2, step_batches, t.cache, t.train_items, t.caption_loss, t.scaler,
                                    t.params)
            stop_on_a_non_finite_loss(cfg, p, loss, run.step)
            saving_s = 0.0
            if saving:
                saving_since = time.time()
                run.checkpoint(t, rng_before_step)
                saving_s = time.time() - saving_since  # the log's speed is of training steps alone
            if cfg.grad_clip > 0:
                t.scaler.unscale_(t.optimizer)
                torch.nn.utils.clip_grad_norm_(t.params, cfg.grad_clip)
            t.scaler.step(t.optimizer)
            t.scaler.update()
            t.optimizer.zero_grad(set_to_none=True)
            run.step += 1
            if p.compiling and run.step == resumed_at + 1:
                p.log(f"torch.compile: the first step took {time.time() - started:.0f} s, compiling included")
            on_step_end(epoch, loss, lr, sum(b["labels"].shape[0] for b in step_batches), skipped, saving_s)


class Speedometer:
    """The log line every log_interval steps: loss, learning rate, and speed over the steps since the last line,
    leaving out the time spent on checkpoints and evaluations."""

    def __init__(self, cfg, p, run, total_steps):
        self.cfg, self.p, self.run, self.total_steps = cfg, p, run, total_steps
        self.t_last, self.step_last, self.captions, self.skipped = time.time(), run.step, 0, 0

    def exclude(self, seconds):
        self.t_last += seconds

    def update(self, epoch, loss, lr, captions, skipped, saving_s):
        self.exclude(saving_s)
        self.captions, self.skipped = self.captions + captions, self.skipped + skipped
        step = self.run.step
        if step % self.cfg.log_interval and step != self.total_steps:
            return
        if self.p.device_type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.time() - self.t_last
        entry = {"step": step, "epoch": epoch, "loss": round(loss, 5), "lr": float(f"{lr:.3g}"),
                 "ms_per_step": round(1000 * elapsed / (step - self.step_last), 1),
                 "captions_per_s": round(self.captions * self.p.world_size / elapsed, 1)}
        if self.p.device_type == "cuda":
            entry["peak_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        if self.skipped:
            entry["skipped_images"] = self.skipped
        self.p.log("  ".join(f"{k} {v}" for k, v in entry.items()))
        self.run.record(entry)
        self.t_last, self.step_last, self.captions, self.skipped = time.time(), step, 0, 0


def train(cfg):
    """The whole run, stage by stage."""
    from lora import load_adapter
    from model import train_mode
    p = start_processes(cfg)
    torch.manual_seed(cfg.seed)
    resume = check_resume(cfg, p)
    if resume is None:
        return  # finished before
    resume_from, state = resume
    data, blip2, processor, prompt_ids, wrapped = load_data_and_model(cfg, p)
    train_items, val_items, test_items = data.splits["train"], data.splits["val"], data.splits["test"]
    val_items = val_items[:cfg.eval_images] if cfg.eval_images else val_items
    evaluating = cfg.eval_interval > 0 and len(val_items) > 0
    if cfg.eval_interval and not val_items:
        p.log("no val images: no evaluation during training; the final adapter is the one kept")
    cache = prepare_vision_cache(cfg, p, blip2, processor, train_items + data.splits["val"] + test_items,
                                 prompt_ids, wrapped)
    if cache is not None and cache.missing:
        p.log(f"vision cache: {len(cache.missing)} unreadable images are left out")
        train_items = [i for i in train_items if i.name not in cache.missing]
    t = prepare_training(cfg, p, blip2, processor, train_items, prompt_ids, cache)
    run = RunState(cfg, p, t.steps_per_epoch)
    if resume_from:
        try:
            load_adapter(blip2, resume_from)  # checks every tensor against the model
            restore(resume_from, state, t.optimizer, t.scaler, p.device)
        except (ValueError, CheckpointError) as e:
            fail(f"{e}; to start this run afresh, delete {os.path.join(cfg.out_dir, 'checkpoint')}")
        run.step, run.best_cider, run.history = state["step"], state["best_cider"], state["history"]
        p.log(f"resuming from {resume_from} at step {run.step}")
    speed = Speedometer(cfg, p, run, t.total_steps)

    def on_step_end(epoch, loss, lr, captions, skipped, saving_s):
        speed.update(epoch, loss, lr, captions, skipped, saving_s)
        end_of_epoch = run.step % t.steps_per_epoch == 0
        if evaluating and (run.step % cfg.eval_interval == 0 or end_of_epoch or run.step == t.total_steps):
            since = time.time()
            evaluate_val(cfg, p, run, blip2, processor, val_items, prompt_ids, cache)
            speed.exclude(time.time() - since)

    train_mode(blip2)
    train_epochs(cfg, p, run, t, on_step_end)
    if p.master and not evaluating:  # no evaluation: the final adapter is the one kept
        save_trained_adapter(blip2, os.path.join(cfg.out_dir, "adapter"), vars(cfg))
    run.checkpoint(t, rng_state(), finished=True)
    if cfg.final_eval and p.master and not test_items:
        p.log("no test images: no final evaluation")
    elif cfg.final_eval and p.master:
        final_evaluation(cfg, p, blip2, processor, test_items, prompt_ids, cache)
    if p.ddp:
        dist.barrier()
        dist.destroy_process_group()


def main():
    if {"-h", "--help"} & set(sys.argv[1:]):
        print(settings_help())
        return
    try:
        cfg = SimpleNamespace(**apply_settings(sys.argv[1:], default_settings()))
    except SettingsError as e:
        fail(e)
    try:
        train(cfg)
    except KeyboardInterrupt:  # Ctrl-C: checkpoints are written atomically, so only the steps since the last are lost
        kept = find_checkpoint(os.path.join(cfg.out_dir, "checkpoint"))
        print("\ninterrupted: " + (f"run the same command again to resume from {kept}" if kept else
                                   "no checkpoint was written yet"), file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
