"""
Fine-tune BLIP-2 (Salesforce/blip2-flan-t5-xl, or an OPT one) on image captions with hand-written LoRA (lora.py).

    python train.py config/demo.py                              # offline demo: under a minute on 2 CPU cores
    python train.py config/demo_opt.py                          # the same with an OPT language model
    python train.py --model=models/blip2-flan-t5-xl --data_dir=data/flickr8k
    python train.py --model=Salesforce/blip2-opt-2.7b --data_dir=data/flickr8k
    python train.py --data my_photos --prompt "a product photo of"        # your own captions (README)
    python train.py --data my_photos --base_bits=4 --gradient_checkpointing=True     # a 6-8 GB GPU (README)
    torchrun --standalone --nproc_per_node=4 train.py --data_dir=data/flickr8k       # several GPUs (or processes)
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 train.py ...  # machines

What a run does, top to bottom:
- LoRA on the Q-Former and the language model's attention; everything else frozen; AdamW over the LoRA tensors only.
- Grouped steps: a micro-batch is B images with all their captions; what depends only on the image runs once per
  image (ViT, Q-Former, and T5's encoder or a decoder's prefix), the rest once per caption (model.grouped_caption_loss:
  t5.py, opt.py, llama.py). The frozen ViT's outputs are computed once and memory-mapped from disk (vision_cache.py),
  and the ViT then leaves the GPU.
- Loss = summed caption-token cross-entropy / caption tokens in the whole optimizer step (all micro-batches, all
  ranks), so long and short captions weigh the same however the batch is split.
- Linear warmup then cosine decay; gradient clipping; bf16 autocast on GPUs that have it, fp16 + GradScaler on those
  that do not, float32 on the CPU; on CUDA the loss is compiled (torch_compile). A non-finite loss stops the run.
- Before the first step (the base's, zero-shot), every eval_interval steps and at the last step: CIDEr on the val split,
  its captions written by generation.py's beam search (the image side once per image); the best adapter goes to
  out_dir/adapter (with a val split too small to choose by, the last one), with the prompt and generation settings and
  what it was trained on (caption.py and evaluate.py use them).
- Every checkpoint_interval steps, and on SIGTERM: out_dir/checkpoint. Running the same command again resumes from it
  and ends with the adapter an uninterrupted run gives; with a larger max_steps or epochs, a finished run trains on.
- Every log_interval steps: a line with the step of how many and the time left, and an entry in out_dir/log.jsonl
  (and TensorBoard's files with tensorboard=True).
- At the end: zero-shot base and adapter scored on the test split -> out_dir/results.json (with where the run's time
  went), out_dir/report.html (with the training curves) and the adapter's model card (out_dir/adapter/README.md).

Settings: the block below; `python train.py --help` lists them. Config files (Python assignments of literals, e.g.
config/demo.py) and --key=value or --key value override them (settings.py); a mistake is one line.
"""
import math
import os
import sys
import time
from dataclasses import dataclass, field
from types import SimpleNamespace as Settings  # the settings of this run, as attributes (cfg.batch_images, ...)

import torch
import torch.distributed as dist

import demo
from blip2lora import checkpoint, settings
from blip2lora.adapter_files import load_adapter, save_adapter
from blip2lora.blip2 import autocast_context, autocast_dtype, set_instruction, train_mode, vision_embeds
from blip2lora.captioning import (GENERATION_DEFAULTS, base_model_reference, caption_items, captions_without_adapter,
                                  default_prompt, generation_of, save_caption_settings)
from blip2lora.checkpoint import (Interrupted, StopRequest, Terminated, check_resume, check_same_collection,
                                  collection_state, restore_run, stop_on_a_non_finite_loss)
from blip2lora.curves import curves_html, read_log
from blip2lora.files import UserError, printable, read_json, write_json
from blip2lora.model import DEFAULT_MODEL, caption_tokenizer, family, load_blip2, prepare_for_training, weights_dtype
from blip2lora.progress import duration
from blip2lora.run_log import RunState, Speedometer, check_tensorboard, time_spent, why_not_better, write_model_card
from blip2lora.scoring import SCALE, print_table, require_java, score_captions, score_split, write_html
from blip2lora.vision_cache import prepare_vision_cache
from data import (CaptionCollator, ImageCaptionDataset, caption_notes, image_loader, prompt_ids, read_captions,
                  split_many_captions)
from lora import lora_state_dict, lora_summary

_names_before_the_settings = set(globals())
# ----------------------------------------------------------------------------------------------------- settings
model = DEFAULT_MODEL                  # hub id or local directory
data_dir = "data/flickr8k"             # any layout data.py reads (python data.py DIR checks it); --data is the same
caption_column = ""                    # the caption column(s), comma-separated ("" = text, caption, captions, ...)
image_column = ""                      # parquet/arrow datasets: the image column ("" = the one marked as images)
symlinks_out = False                   # follow symbolic links that lead out of the collection's folder
val_from_train = True                  # a collection without a val split: take val images from train (data.py)
out_dir = "out"                        # checkpoint/, adapter/, vision_cache/, log.jsonl, results.json, report.html
prompt = GENERATION_DEFAULTS["prompt"]  # the text after the image tokens: "a photo of", as LAVIS's recipe
# LoRA
lora_r = 8                             # the rank r of each update B @ A
lora_alpha = 16.0                      # the update is scaled by lora_alpha / lora_r
lora_dropout = 0.05                    # dropout on the adapters' input (the frozen base has none)
lora_targets = []                      # module-path suffixes; [] = Q-Former and all language-model attention
                                       # (blip2.QFORMER_TARGETS + t5.LORA_TARGETS or opt.LORA_TARGETS)
# optimisation
batch_images = 16                      # images per micro-batch, each with all its captions (80 captions on Flickr8k)
grad_accum = 1                         # micro-batches per optimizer step (per process)
epochs = 3                             # passes over the train split (unless max_steps is set)
max_steps = 0                          # optimizer steps; 0 = epochs over the train split
learning_rate = 2e-4                   # AdamW's peak learning rate, reached after warmup_steps
min_lr_ratio = 0.1                     # cosine decays to learning_rate * min_lr_ratio
warmup_steps = 50                      # linear warmup from 0 (at most a fifth of the run), then cosine decay
weight_decay = 0.0                     # AdamW weight decay on the LoRA tensors
grad_clip = 1.0                        # max global gradient norm; 0 = off
max_caption_tokens = 40                # training cuts longer captions (reported at the start); memory grows with it
# precision and memory (README "Which GPU")
dtype = "auto"                         # auto (bf16 on GPUs that have it, else fp16; float32 on CPU) | bfloat16 | ...
device = "auto"                        # auto | cpu | cuda | cuda:N
base_bits = 16                         # 16, or 8 / 4: the frozen language model in int8 / NF4 (bitsandbytes, QLoRA)
gradient_checkpointing = False         # recompute the language model's activations in the backward pass: far less
                                       # memory, ~1/3 more time
vision_cache = True                    # compute the frozen ViT's outputs once (valid while no LoRA is in the ViT)
vision_on_gpu = False                  # keep the ViT (2 GB in bf16) on the GPU once the vision cache has every image
torch_compile = "auto"                 # compile the grouped loss: far fewer kernel launches, minutes to compile;
                                       # auto = on CUDA, off on CPU; True or False to force
num_workers = 4                        # image-decoding processes (only when images are read: cache build, no cache)
# evaluation, checkpoints, logs
eval_interval = 500                    # steps between val CIDEr evaluations (and at the last step); 0 = none
eval_images = 500                      # val images used for that (0 = all)
eval_batch = 32                        # images per beam-search batch in evaluations (memory: README "Which GPU")
final_eval = True                      # score zero-shot and fine-tuned on the test split at the end
num_beams = GENERATION_DEFAULTS["num_beams"]            # beam search in evaluations (saved with the adapter)
max_new_tokens = GENERATION_DEFAULTS["max_new_tokens"]  # longest generated caption in tokens (saved, as above)
min_new_tokens = GENERATION_DEFAULTS["min_new_tokens"]  # shortest generated caption in tokens (saved, as above)
repetition_penalty = GENERATION_DEFAULTS["repetition_penalty"]  # > 1: tokens already written are less likely (saved)
no_repeat_ngram_size = GENERATION_DEFAULTS["no_repeat_ngram_size"]  # > 0: no n-gram of this size twice (saved)
generation = "own"                     # own: generation.py's beam search, the image side once per image, the same
                                       # captions as transformers' generate() (generation = "transformers")
checkpoint_interval = 200              # steps between checkpoints
log_interval = 10                      # steps between log lines (also written to log.jsonl)
tensorboard = False                    # also write the curves as TensorBoard event files in out_dir/tensorboard/
seed = 1337                            # LoRA init, dropout and the data order
# -------------------------------------------------------------------------------------------------------------
SETTINGS = {k: v for k, v in globals().items()  # the block's names and defaults, in order
            if k not in _names_before_the_settings and not k.startswith("_")}
MIN_VAL_TO_CHOOSE = (20, 50)  # a val split of fewer images or captions is too noisy to pick the best adapter by


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if {"-h", "--help"} & set(argv):
        print(settings.help_text(__file__, SETTINGS))
        return 0
    stop = StopRequest()
    cfg = None
    try:
        cfg = Settings(**settings.apply(argv, SETTINGS))
        train(cfg, stop)
    except UserError as e:
        print(f"error: {printable(str(e))}", file=sys.stderr)
        return getattr(e, "exit_code", 1)
    except OSError as e:  # a full disk, a folder that cannot be written: the files are atomic, so nothing is half
        where = printable(str(e.filename or (cfg.out_dir if cfg else "")))
        print(f"error: {where}: {e.strerror or e}; nothing was left half-written", file=sys.stderr)
        return 1
    except Interrupted as e:  # Ctrl-C during training: the current step was saved
        print(f"\ninterrupted: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # Ctrl-C elsewhere: checkpoints are written atomically, so the last one is whole
        print("\ninterrupted: " + resume_hint(cfg), file=sys.stderr)
        return 130
    except Terminated as e:
        print(f"stopped by SIGTERM: {str(e) or resume_hint(cfg)}", file=sys.stderr)
        return 143
    except torch.cuda.OutOfMemoryError:
        print(f"error: {out_of_memory_hint(cfg)}", file=sys.stderr)
        return 1
    finally:
        stop.restore()
        checkpoint.unlock_out_dir()
    return 0


def train(cfg, stop):
    """The whole run, stage by stage."""
    check_tensorboard(cfg)  # run_log.py: the package, and folders it can write, before any work
    cfg.prompt = default_prompt(cfg.model, cfg.prompt)  # an InstructBLIP base given BLIP-2's: its instruction
    started, p = time.time(), start_processes(cfg)
    torch.manual_seed(cfg.seed)
    resume = check_resume(cfg, p)  # checkpoint.py: lock out_dir, read its checkpoint, refuse changed settings
    if resume is None:
        return  # finished before: its results were printed
    resume_from, state = resume
    t = load_data_and_model(cfg, p)
    if resume_from:  # on the collection it was written on, or not at all
        check_same_collection(cfg, resume_from, state, t.collection)
    t.seconds["started"], since = started, time.time()
    t.cache = prepare_vision_cache(cfg, p, t, lambda items: image_loader(items, t.processor, cfg.num_workers))
    t.seconds["vision_cache"] = time.time() - since
    prepare_training(cfg, p, t)
    run = RunState(cfg, p, t.steps_per_epoch)  # run_log.py: the step, the val record, log.jsonl
    if resume_from:
        restore_run(cfg, p, t, run, resume_from, state)
        if state["finished"] and run.step < t.total_steps:
            p.log(f"extending the finished run from step {run.step} to {t.total_steps}: the learning rate's cosine is "
                  f"re-planned to end at step {t.total_steps} (now {lr_at(cfg, t, run.step):.3g}, it ended at "
                  f"{cfg.learning_rate * cfg.min_lr_ratio:.3g})")
    run.open_log(resumed=bool(resume_from))
    try:
        stop.deferred = True  # from here a SIGTERM ends the current step, then saves a checkpoint (train_steps)
        train_mode(t.model)
        train_steps(cfg, p, t, run, stop)
        stop.deferred = False
        if p.master and not t.choose_by_val:  # no (usable) evaluation: the final adapter is the one kept
            keep_adapter(cfg, p, t, run.step)
        save_checkpoint(cfg, p, t, run, checkpoint.rng_state(), finished=True)
        if cfg.final_eval and p.master:
            final_evaluation(cfg, p, t, run)
    finally:
        run.close_log()
    if p.ddp:
        dist.barrier()
        dist.destroy_process_group()


# What the loop reads (the classes are in "the run's state" below):
#   cfg  Settings: the block above, as attributes (cfg.grad_accum, cfg.checkpoint_interval, ...)
#   p    Processes: device, dtype, autocast (a context), ddp, rank, world_size, master (rank 0 logs and saves)
#   t    Training: model, params (exactly the LoRA tensors), optimizer, scaler (GradScaler, on for float16 only),
#        total_steps, steps_per_epoch, cache (vision cache or None), train_items, evaluating (val CIDEr during
#        training?)
#   run  RunState (run_log.py): step (optimizer steps done), best_cider, history; run.record(...) logs
def train_steps(cfg, p, t, run, stop):
    """The loop: from run.step to the last step, epoch by epoch, with the data order fixed by (seed, epoch)."""
    # The loss: the family's (t5.py or opt.py) grouped_caption_loss, what depends only on an image once per image.
    # fullgraph: a graph break is an error, not a silent slowdown (tests/test_fast.py keeps the loss one graph).
    caption_loss = family(t.model.config).grouped_caption_loss
    if p.compiling:
        caption_loss = torch.compile(caption_loss, fullgraph=True)
    loader_rng = torch.Generator()  # the loader draws its worker seeds here, not from the global RNG (dropout's)
    resumed_at, speed = run.step, Speedometer(cfg, p, t, run)
    if t.evaluating and run.step == 0:  # the val curve starts at the base's CIDEr (every LoRA B is zero at step 0)
        speed.pause(lambda: evaluate_val(cfg, p, t, run), evaluation=True)
    while run.step < t.total_steps:
        epoch, offset = divmod(run.step, t.steps_per_epoch)
        batches = iter(epoch_loader(cfg, p, t, epoch, offset, loader_rng))
        for _ in range(t.steps_per_epoch - offset):
            if run.step >= t.total_steps:
                break
            started = time.time()
            lr = lr_at(cfg, t, run.step)
            for group in t.optimizer.param_groups:
                group["lr"] = lr
            step_batches = [next(batches) for _ in range(cfg.grad_accum)]
            skipped = sum(b["skipped"] for b in step_batches)
            step_batches = [b for b in step_batches if "labels" in b]
            # The checkpoint of step s (the weights after s updates) is written in the step that uses those weights,
            # once their loss is known to be finite and before they change: it never holds weights that gave a NaN.
            saving = run.step % cfg.checkpoint_interval == 0 and run.step != resumed_at
            rng_before_step = checkpoint.rng_state() if saving else None  # what a resumed run starts this step from

            def before_update(loss):
                stop_on_a_non_finite_loss(cfg, p, loss.item(), run.step)
                if saving:
                    speed.pause(lambda: save_checkpoint(cfg, p, t, run, rng_before_step))
            loss = train_step(t.model, step_batches, caption_loss, lambda b: image_embeds(t, b, p.device),
                              t.optimizer, t.scaler, p.autocast, cfg.grad_clip, p.ddp, before_update).item()
            run.step += 1
            if p.compiling and run.step == resumed_at + 1:
                p.log(f"torch.compile: the first step took {time.time() - started:.0f} s, compiling included")
            speed.update(epoch, loss, lr, sum(b["labels"].shape[0] for b in step_batches), skipped)
            if t.evaluating and (run.step % cfg.eval_interval == 0 or run.step == t.total_steps):
                speed.pause(lambda: evaluate_val(cfg, p, t, run), evaluation=True)
            if stop.requested(p):  # SIGTERM or Ctrl-C: the step is whole; keep it, and say how to go on
                save_checkpoint(cfg, p, t, run, checkpoint.rng_state())
                stop.stop(f"checkpoint saved at step {run.step}; run the same command again to resume")


def train_step(model, micro_batches, caption_loss, image_embeds, optimizer, scaler, autocast, grad_clip, ddp=False,
               before_update=None):
    """One optimizer step, the one that train.py, bench.py and memory.py all take: each micro-batch forward and
    backward, then (several processes) the gradients summed over them, clipping, and AdamW through the GradScaler
    (which does nothing unless float16). caption_loss(model, batch, image_embeds(batch)) is a summed loss and its
    token count (t5.py, ...). Returns the step's loss, a tensor: the caption-token mean over every micro-batch
    of every rank. before_update(loss) runs once the loss is known and before the weights change."""
    params = optimizer.param_groups[0]["params"]  # exactly the LoRA tensors
    device = params[0].device
    # every token of the step, on every rank, counts once: the gradient is of the mean over all of them
    tokens = sum(((b["labels"] != -100).sum() for b in micro_batches), torch.zeros(())).to(device, torch.float32)
    if ddp:
        dist.all_reduce(tokens)
    loss_sum = torch.zeros((), device=device)
    for b in micro_batches:
        b = {k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()}
        with autocast:
            batch_loss, _ = caption_loss(model, b, image_embeds(b))  # summed over the micro-batch's caption tokens
        scaler.scale(batch_loss / tokens).backward()
        loss_sum += batch_loss.detach()
    if ddp:
        sum_over_ranks(params, loss_sum)
    loss = loss_sum / tokens
    if before_update:
        before_update(loss)
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss


def sum_over_ranks(params, loss_sum):
    """Data parallelism by hand: sum the LoRA gradients over ranks (one flat buffer; they are 0.26% of the model)
    and the losses for the log. Each rank divided by the global token count already."""
    flat = torch.cat([q.grad.flatten() if q.grad is not None else torch.zeros_like(q).flatten() for q in params])
    dist.all_reduce(flat)
    start = 0
    for q in params:
        q.grad = flat[start:start + q.numel()].view_as(q)
        start += q.numel()
    dist.all_reduce(loss_sum)


def image_embeds(t, batch, device):
    """(B, V, Dv): the frozen ViT's outputs for the batch's images, read from the vision cache (computed once before
    training: the identical rows, tested) or computed now, with no gradient flowing into the frozen ViT."""
    if t.cache is not None:
        return t.cache.lookup([t.train_items[i].name for i in batch["image_index"].tolist()], device)
    with torch.no_grad():
        return vision_embeds(t.model, batch["pixel_values"])


def make_optimizer(model, learning_rate, weight_decay, device_type, dtype):
    """AdamW over exactly the LoRA tensors (fused on CUDA), and the GradScaler, on for float16 only: the optimizer
    of train.py's step, and bench.py's."""
    params = [q for q in model.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay, fused=device_type == "cuda")
    return optimizer, torch.amp.GradScaler(device_type, enabled=dtype == torch.float16)


def lr_at(cfg, t, step):
    """Linear warmup to learning_rate, then cosine decay to learning_rate * min_lr_ratio."""
    if step < t.warmup_steps:
        return cfg.learning_rate * (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, t.total_steps - t.warmup_steps)
    return cfg.learning_rate * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 *
                                (1 + math.cos(math.pi * min(1.0, progress))))


def epoch_micro_batches(cfg, num_images, epoch, group):
    """The epoch's shuffled image order cut into micro-batches; a trailing part too small for a full optimizer step
    on every rank is dropped. Deterministic in (seed, epoch), so a resumed run sees the same batches."""
    order = torch.randperm(num_images, generator=torch.Generator().manual_seed(cfg.seed + epoch)).tolist()
    size = cfg.batch_images
    batches = [order[i:i + size] for i in range(0, num_images - size + 1, size)]
    return batches[:len(batches) - len(batches) % group]


def epoch_loader(cfg, p, t, epoch, offset, loader_rng):
    """This rank's micro-batches of the epoch from step `offset` on (sharded by rank within each step)."""
    micro = epoch_micro_batches(cfg, len(t.train_items), epoch, t.group)[offset * t.group:]
    mine = [b for i, b in enumerate(micro) if i % p.world_size == p.rank]
    workers = 0 if t.cache else min(cfg.num_workers, os.cpu_count() or 1)
    return torch.utils.data.DataLoader(t.dataset, batch_sampler=mine, collate_fn=t.collate, generator=loader_rng,
                                       num_workers=workers)


# ------------------------------------------------------------------------------------------- the run's state

@dataclass
class Processes:
    """Where this process computes, in which precision, and its place among the others under torchrun."""
    ddp: bool
    rank: int
    world_size: int
    local_rank: int                # the process's number on its own machine (node)
    device: str
    dtype: torch.dtype
    compiling: bool
    master: bool = field(init=False)
    device_type: str = field(init=False)

    def __post_init__(self):
        self.master, self.device_type = self.rank == 0, "cuda" if self.device.startswith("cuda") else "cpu"
        self.autocast = autocast_context(self.device, self.dtype)  # bf16/fp16 autocast, or nothing for float32

    def log(self, *args, **kwargs):
        if self.master:
            print(*args, **kwargs, flush=True)


@dataclass
class Training:
    """What the loop uses: the model and data, the optimizer and the schedule."""
    model: object
    processor: object
    data: object
    prompt_ids: list               # the language model's input before the caption (data.prompt_ids)
    caption_ids: object            # captions -> token ids (model.caption_tokenizer)
    train_items: list
    val_items: list
    test_items: list
    cache: object = None
    dataset: object = None
    collate: object = None
    group: int = 1                 # micro-batches per optimizer step, all ranks together
    steps_per_epoch: int = 0
    total_steps: int = 0
    warmup_steps: int = 0
    optimizer: object = None       # AdamW over exactly the LoRA tensors
    scaler: object = None
    collection_about: tuple = None  # (name, description) the model card gives the collection (demo.collection_about)
    collection: dict = None        # the train and val splits' record in checkpoints (checkpoint.collection_state)
    evaluating: bool = False       # val CIDEr during training
    choose_by_val: bool = False    # keep the best adapter by val CIDEr (else the last)
    seconds: dict = field(default_factory=dict)  # where this run's time goes (run_log.time_spent)


# ------------------------------------------------------------------------------------------- the run, in stages

def start_processes(cfg):
    """One process per GPU under torchrun (gloo on CPU), or just this one; and the precision they compute in."""
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if ddp:
        cuda = torch.cuda.is_available() and cfg.device != "cpu"
        dist.init_process_group(backend="nccl" if cuda else "gloo")
        rank, world_size = dist.get_rank(), dist.get_world_size()
        device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if cuda else "cpu"
        if cuda:
            torch.cuda.set_device(device)
    else:
        rank, world_size = 0, 1
        device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dtype = {"auto": autocast_dtype(device), "bfloat16": torch.bfloat16, "float16": torch.float16,
             "float32": torch.float32}[cfg.dtype]
    compiling = device.startswith("cuda") if cfg.torch_compile == "auto" else cfg.torch_compile
    p = Processes(ddp, rank, world_size, local_rank, device, dtype, compiling)
    if dtype == torch.float16:
        p.log("float16" + (" (this GPU has no bfloat16)" if cfg.dtype == "auto" else "") + ": a GradScaler guards the "
              "gradients; a NaN loss stops the run, naming the cause")
    return p


def load_data_and_model(cfg, p):
    """The caption collection, BLIP-2 ready to train (LoRA injected), the prompt's ids and the captions' tokenizer."""
    if p.master:  # the demo world is built only for the demo's own paths (python train.py config/demo.py)
        demo.ensure_demo_world(cfg.data_dir, log=p.log)
        demo.ensure_demo_world(cfg.model, log=p.log)
    if p.ddp:
        dist.barrier()
    data = read_captions(cfg.data_dir, cfg.caption_column, cfg.image_column, cfg.symlinks_out, cfg.val_from_train)
    if cfg.eval_interval or cfg.final_eval:
        require_java()  # now, not after hours of training
    # the frozen base in the compute dtype on a GPU (half the memory); LoRA tensors stay float32 (lora.py)
    blip2, processor = load_blip2(cfg.model, p.device, weights_dtype(p.device, p.dtype), cfg.base_bits, log=p.log)
    try:
        note = prepare_for_training(blip2, p.dtype, vars(cfg), cfg.gradient_checkpointing)
    except ValueError as e:  # a LoRA target that matches nothing, or matches inside the frozen ViT
        raise settings.SettingsError(f"lora_targets: {e}") from None
    if note:
        p.log(note)
    prompt = prompt_ids(processor.tokenizer, cfg.prompt, blip2.config,
                        after={k: getattr(cfg, k) for k in ("max_caption_tokens", "max_new_tokens")})
    set_instruction(blip2, processor, cfg.prompt)  # InstructBLIP's Q-Former reads the prompt too
    caption_ids = caption_tokenizer(processor.tokenizer, blip2.config)
    splits = data.splits
    p.log(f"{data.layout}: " + ", ".join(f"{s} {len(v)} images" for s, v in splits.items())
          + (f"; {len(data.skipped)} entries skipped (python data.py {cfg.data_dir})" if data.skipped else ""))
    if data.val_note:
        p.log(data.val_note)
    p.log(lora_summary(blip2))
    for note in caption_notes(splits["train"], caption_ids, cfg.max_caption_tokens, processor.tokenizer.unk_token_id):
        p.log(note)
    val_items = splits["val"][:cfg.eval_images] if cfg.eval_images else splits["val"]
    train_items = split_many_captions(splits["train"])  # at most MAX_CAPTIONS_PER_IMAGE captions of an image a step
    return Training(blip2, processor, data, prompt, caption_ids, train_items, val_items, splits["test"],
                    collection_about=demo.collection_about(cfg.data_dir), collection=collection_state(data.splits))


def prepare_training(cfg, p, t):
    """Batching, the optimizer and the schedule."""
    t.collate = CaptionCollator(t.train_items, t.caption_ids, t.prompt_ids, cfg.max_caption_tokens,
                                load_images=t.cache is None, fixed_length=p.compiling)
    t.dataset = ImageCaptionDataset(t.train_items, t.processor.image_processor, load_images=t.cache is None)
    t.group = cfg.grad_accum * p.world_size
    t.steps_per_epoch = len(epoch_micro_batches(cfg, len(t.train_items), 0, t.group)) // t.group
    if t.steps_per_epoch == 0:
        raise UserError(f"{cfg.data_dir}: no train images" if not t.train_items else
                        f"{cfg.data_dir}: {len(t.train_items)} train images is fewer than one step needs "
                        f"(batch_images * grad_accum * processes = {cfg.batch_images * t.group}); lower batch_images")
    t.total_steps = cfg.max_steps or cfg.epochs * t.steps_per_epoch
    t.warmup_steps = min(cfg.warmup_steps, t.total_steps // 5)
    if t.warmup_steps < cfg.warmup_steps:
        p.log(f"warmup: {t.warmup_steps} steps, not warmup_steps={cfg.warmup_steps}: a warmup longer than a fifth of "
              f"this run's {t.total_steps} steps would leave the learning rate low for most of it")
    t.optimizer, t.scaler = make_optimizer(t.model, cfg.learning_rate, cfg.weight_decay, p.device_type, p.dtype)
    choose_evaluation(cfg, p, t)


def choose_evaluation(cfg, p, t):
    """Whether val CIDEr is measured during training, and whether the adapter kept is the best by it."""
    captions = sum(len(i.captions) for i in t.val_items)
    t.evaluating = cfg.eval_interval > 0 and len(t.val_items) > 0
    t.choose_by_val = t.evaluating and len(t.val_items) >= MIN_VAL_TO_CHOOSE[0] and captions >= MIN_VAL_TO_CHOOSE[1]
    if cfg.eval_interval and not t.val_items:
        p.log("no val images: no evaluation during training; the final adapter is the one kept")
    elif t.evaluating and not t.choose_by_val:
        p.log(f"val split: {len(t.val_items)} images, {captions} captions, too few to choose an adapter by (at least "
              f"{MIN_VAL_TO_CHOOSE[0]} images and {MIN_VAL_TO_CHOOSE[1]} captions): val CIDEr is logged, and the "
              "final adapter is the one kept")


def save_checkpoint(cfg, p, t, run, rng, finished=False):
    """out_dir/checkpoint (checkpoint.py): the adapter, AdamW's and the scaler's state, the random state and the
    run's (run.saved_state); rank 0 writes it."""
    if p.master:
        state = {**run.saved_state(finished), "collection": t.collection}  # checkpoint.check_same_collection reads it
        checkpoint.save(os.path.join(cfg.out_dir, "checkpoint"), state,
                        lambda path: save_trained_adapter(cfg, t.model, path, run.step), t.optimizer, t.scaler, rng)


def save_trained_adapter(cfg, blip2, path, step):
    """The adapter (peft's layout) and, first, caption_settings.json beside it: the prompt and generation settings
    caption.py and evaluate.py use, and what it was trained on (checkpoint.py knows the folder as ours by it).
    Weights that are not finite are never saved, as an adapter or in a checkpoint: the run stops instead."""
    if not all(torch.isfinite(q).all() for q in lora_state_dict(blip2).values()):
        kept = checkpoint.find(os.path.join(cfg.out_dir, "checkpoint"))
        raise UserError(f"the LoRA weights hold NaN or infinity after step {step}; nothing was saved. "
                        + (f"The last good checkpoint ({kept}) is kept; lower learning_rate (now "
                           f"{cfg.learning_rate:g}) and run again to resume from it" if kept else
                           "Lower learning_rate or check the data"))
    os.makedirs(path, exist_ok=True)
    trained_on = {"data_dir": os.path.abspath(cfg.data_dir), "caption_column": cfg.caption_column,
                  "image_column": cfg.image_column, "symlinks_out": cfg.symlinks_out,
                  "val_from_train": cfg.val_from_train, "base_model": base_model_reference(cfg.model), "step": step}
    save_caption_settings(path, vars(cfg), trained_on)
    save_adapter(blip2, path, base_model_reference(cfg.model))


def keep_adapter(cfg, p, t, step):
    """The adapter the run keeps, in out_dir/adapter, with its model card (run_log.write_model_card)."""
    save_trained_adapter(cfg, t.model, os.path.join(cfg.out_dir, "adapter"), step)
    write_model_card(cfg, p, t, step)


def evaluate_val(cfg, p, t, run):
    """CIDEr (x100) on the val images; rank 0 only, the others wait. Keeps the best adapter in out_dir/adapter."""
    if p.master:
        t.model.eval()
        predictions = caption_items(t.model, t.processor, t.val_items, t.prompt_ids, p.device, p.autocast, t.cache,
                                    progress=f"step {run.step}: val captions", progress_log=p.log,
                                    batch_size=cfg.eval_batch, compile=p.compiling, **generation_of(cfg))
        cider = score_captions(predictions, {i.name: i.captions for i in t.val_items}, metrics=("CIDEr",))["CIDEr"]
        run.history.append({"step": run.step, "val_CIDEr": cider})
        run.record({"step": run.step, "val_CIDEr": cider})
        improved = t.choose_by_val and run.step > 0 and cider > run.best_cider  # step 0 is the zero-shot reference
        if improved:
            run.best_cider = cider
            keep_adapter(cfg, p, t, run.step)
        p.log(f"step {run.step}: val CIDEr {cider:.1f}" + (" (zero-shot, before training)" if run.step == 0 else
                                                           " (best so far: adapter saved)" if improved else
                                                           f" (best {run.best_cider:.1f})" if t.choose_by_val else ""))
        train_mode(t.model)
    if p.ddp:
        dist.barrier()


def final_evaluation(cfg, p, t, run):
    """The kept adapter and the zero-shot base on the test split: results.json, the table, and report.html."""
    if not t.test_items:
        p.log("no test images: no final evaluation")
        return
    adapter, since = os.path.join(cfg.out_dir, "adapter"), time.time()
    t.model.eval()
    load_adapter(t.model, adapter)  # the best one by val CIDEr, or the final one
    kept_step = read_json(os.path.join(adapter, "caption_settings.json")).get("trained_on", {}).get("step", "?")
    generation = dict(batch_size=cfg.eval_batch, compile=p.compiling, progress_log=p.log, **generation_of(cfg))
    args = (t.model, t.processor, t.test_items, t.prompt_ids, p.device, p.autocast, t.cache)
    fine_tuned = caption_items(*args, **generation, progress="test captions, fine-tuned")
    zero_shot = captions_without_adapter(*args, **generation, progress="test captions, zero-shot")
    columns, rows = score_split(t.test_items, fine_tuned, "fine-tuned", zero_shot)
    run.record_test_scores(columns)
    write_model_card(cfg, p, t, kept_step, scores=columns, test_images=len(fine_tuned))
    t.seconds["test_evaluation"] = time.time() - since
    results_path, report_path = os.path.join(cfg.out_dir, "results.json"), os.path.join(cfg.out_dir, "report.html")
    log_path = os.path.join(cfg.out_dir, "log.jsonl")
    write_json(results_path, {"scale": SCALE, "split": "test", "images": len(fine_tuned), "adapter": adapter,
                              "step": kept_step, "zero_shot": columns["zero-shot"],
                              "fine_tuned": columns["fine-tuned"], "seconds": time_spent(t.seconds)})
    write_html(report_path, f"BLIP-2 captions, {cfg.data_dir} test split", columns, rows,
               about=[f"adapter: {adapter} (step {kept_step} of {run.step})", f"collection: {cfg.data_dir} "
                      f"({t.data.layout}), test split, {len(fine_tuned)} images", f"base model: {cfg.model}"],
               curves=curves_html(log_path))
    unread = len(t.test_items) - len(fine_tuned)
    p.log(f"test split: {len(fine_tuned)} images" + (f" ({unread} unreadable, left out)" if unread else "")
          + f", beam {cfg.num_beams}, scores x100:")
    print_table({"zero-shot": columns["zero-shot"], "fine-tuned": columns["fine-tuned"]})
    if columns["fine-tuned"]["CIDEr"] <= columns["zero-shot"]["CIDEr"]:
        p.log(why_not_better(cfg, t, run.step, fine_tuned == zero_shot, read_log(log_path)["loss"]))
    p.log("time: " + ", ".join(f"{k.replace('_', ' ')} {duration(v)}" for k, v in time_spent(t.seconds).items()))
    p.log(f"adapter: {adapter}   scores: {results_path}   report: {report_path}")


# ------------------------------------------------------------------------------------------- messages

def resume_hint(cfg):
    kept = checkpoint.find(os.path.join(cfg.out_dir, "checkpoint")) if cfg else None
    return f"run the same command again to resume from {kept}" if kept else "no checkpoint was written yet"


def out_of_memory_hint(cfg):
    half = max(1, cfg.batch_images // 2)
    return (f"the GPU ran out of memory with batch_images={cfg.batch_images}. Try --batch_images={half} (with "
            f"--grad_accum={2 * cfg.grad_accum} for the same step), --gradient_checkpointing=True, "
            "--vision_on_gpu=False, --base_bits=4; `python bench.py --model full --memory` predicts the peak "
            "(README 'Which GPU')")


if __name__ == "__main__":
    sys.exit(main())
