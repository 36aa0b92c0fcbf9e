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
  image (ViT, Q-Former, and T5's encoder or OPT's prefix), the rest once per caption (model.grouped_caption_loss:
  t5.py, opt.py). The ViT is frozen, so its outputs are computed once and memory-mapped from disk (vision_cache.py),
  and the ViT then leaves the GPU.
- Loss = summed caption-token cross-entropy / caption tokens in the whole optimizer step (all micro-batches, all
  ranks), so long and short captions weigh the same however the batch is split.
- Linear warmup then cosine decay; gradient clipping; bf16 autocast on GPUs that have it, fp16 + GradScaler on those
  that do not, float32 on the CPU; on CUDA the loss is compiled (torch_compile). A non-finite loss stops the run.
- Every eval_interval steps and at the last step: CIDEr on the val split; the best adapter goes to out_dir/adapter
  (with a val split too small to choose by, the last one), with the prompt and generation settings and what it was
  trained on (caption.py and evaluate.py use them).
- Every checkpoint_interval steps, and on SIGTERM: out_dir/checkpoint. Running the same command again resumes from it
  and ends with the adapter an uninterrupted run gives; with a larger max_steps or epochs, a finished run trains on.
- Every log_interval steps: a line with the step of how many and the time left, and an entry in out_dir/log.jsonl
  (and TensorBoard's files with tensorboard=True).
- At the end: zero-shot base and adapter scored on the test split -> out_dir/results.json, out_dir/report.html (with
  the training curves) and the adapter's model card (out_dir/adapter/README.md, model_card.py).

Settings: the block below; `python train.py --help` lists them. Config files (Python assignments of literals, e.g.
config/demo.py) and --key=value or --key value override them (settings.py); a mistake is one line.
"""
import importlib.util
import json
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

import checkpoint
import demo
import settings
from adapter_files import load_adapter, save_adapter
from blip2 import autocast_context, autocast_dtype, move_vision, train_mode, vision_embeds
from captioning import GENERATION_DEFAULTS, base_model_reference, caption_items, captions_without_adapter
from captioning import save_caption_settings
from curves import curves_html
from data import CaptionCollator, ImageCaptionDataset, caption_token_stats, prompt_ids, read_captions
from files import UserError, printable, read_json, require_writable_folder, write_json
from lora import inject_lora, lora_state_dict, lora_summary
from model import DEFAULT_MODEL, caption_tokenizer, grouped_caption_loss, load_prepared, use_gradient_checkpointing
from model import lora_targets as default_lora_targets  # (lora_targets is a setting's name)
from model_card import adapter_card
from progress import duration
from scoring import SCALE, print_table, require_java, score_captions, score_split, write_html
from vision_cache import VisionCache

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
checkpoint_interval = 200              # steps between checkpoints
log_interval = 10                      # steps between log lines (also written to log.jsonl)
tensorboard = False                    # also write the curves as TensorBoard event files in out_dir/tensorboard/
seed = 1337                            # LoRA init, dropout and the data order
# -------------------------------------------------------------------------------------------------------------
SETTINGS = {k: v for k, v in globals().items()  # the block's names and defaults, in order
            if k not in _names_before_the_settings and not k.startswith("_")}
MIN_VAL_TO_CHOOSE = (20, 50)  # a val split of fewer images or captions is too noisy to pick the best adapter by


class RunError(UserError):
    pass


class Terminated(BaseException):
    """SIGTERM (a cluster scheduler, a preemptible VM, docker stop): stop, saying how to resume."""


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
    except KeyboardInterrupt:  # Ctrl-C: checkpoints are written atomically, so only the steps since the last are lost
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
    if cfg.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise RunError("tensorboard=True needs the tensorboard package: pip install tensorboard (or leave it False; "
                       "the curves are in out_dir/report.html either way)")
    p = start_processes(cfg)
    torch.manual_seed(cfg.seed)
    resume = check_resume(cfg, p)
    if resume is None:
        return  # finished before: its results were printed
    resume_from, state = resume
    t = load_data_and_model(cfg, p)
    t.cache = prepare_vision_cache(cfg, p, t)
    prepare_training(cfg, p, t)
    run = RunState(cfg, p, t.steps_per_epoch)
    if resume_from:
        restore(cfg, p, t, run, resume_from, state)
    run.open_log(resumed=bool(resume_from))
    try:
        stop.deferred = True  # from here a SIGTERM ends the current step, then saves a checkpoint (train_steps)
        train_mode(t.model)
        train_steps(cfg, p, t, run, stop)
        stop.deferred = False
        if p.master and not t.choose_by_val:  # no (usable) evaluation: the final adapter is the one kept
            keep_adapter(cfg, p, t, run.step)
        run.checkpoint(t, checkpoint.rng_state(), finished=True)
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
#   t    Training: model, caption_loss (the grouped loss, maybe compiled), params (exactly the LoRA tensors),
#        optimizer, scaler (GradScaler, on for float16 only), total_steps, steps_per_epoch, cache (vision cache or
#        None), train_items, evaluating (val CIDEr during training?)
#   run  RunState: step (optimizer steps done), best_cider, history; run.checkpoint(...), run.record(...)
def train_steps(cfg, p, t, run, stop):
    """The loop: from run.step to the last step, epoch by epoch, with the data order fixed by (seed, epoch)."""
    loader_rng = torch.Generator()  # the loader draws its worker seeds here, not from the global RNG (dropout's)
    resumed_at, speed = run.step, Speedometer(cfg, p, t, run)
    while run.step < t.total_steps:
        epoch, offset = divmod(run.step, t.steps_per_epoch)
        batches = iter(epoch_loader(cfg, p, t, epoch, offset, loader_rng))
        for _ in range(t.steps_per_epoch - offset):
            if run.step >= t.total_steps:
                break
            # The checkpoint of step s (the weights after s updates) is written in the step that uses those weights,
            # once their loss is known to be finite and before they change: it never holds weights that gave a NaN.
            started = time.time()
            saving = run.step % cfg.checkpoint_interval == 0 and run.step != resumed_at
            rng_before_step = checkpoint.rng_state() if saving else None  # what a resumed run starts this step from
            lr = lr_at(cfg, t, run.step)
            for group in t.optimizer.param_groups:
                group["lr"] = lr
            step_batches = [next(batches) for _ in range(cfg.grad_accum)]
            skipped = sum(b["skipped"] for b in step_batches)
            step_batches = [b for b in step_batches if "labels" in b]
            loss = forward_backward(p, t, step_batches)
            stop_on_a_non_finite_loss(cfg, p, loss, run.step)
            if saving:
                speed.pause(lambda: run.checkpoint(t, rng_before_step))
            if cfg.grad_clip > 0:
                t.scaler.unscale_(t.optimizer)
                torch.nn.utils.clip_grad_norm_(t.params, cfg.grad_clip)
            t.scaler.step(t.optimizer)
            t.scaler.update()
            t.optimizer.zero_grad(set_to_none=True)
            run.step += 1
            if p.compiling and run.step == resumed_at + 1:
                p.log(f"torch.compile: the first step took {time.time() - started:.0f} s, compiling included")
            speed.update(epoch, loss, lr, sum(b["labels"].shape[0] for b in step_batches), skipped)
            if t.evaluating and (run.step % cfg.eval_interval == 0 or run.step == t.total_steps):
                speed.pause(lambda: evaluate_val(cfg, p, t, run), evaluation=True)
            if stop.requested(p):  # SIGTERM: the step is whole; keep it, and say how to go on
                run.checkpoint(t, checkpoint.rng_state())
                raise Terminated(f"checkpoint saved at step {run.step}; run the same command again to resume")


def forward_backward(p, t, step_batches):
    """One optimizer step's micro-batches forward and backward; with several processes, the gradients summed over
    them. Returns the step's loss: the caption-token mean over every micro-batch of every rank."""
    # every token of the step, on every rank, counts once: the gradient is of the mean over all of them
    tokens = torch.tensor(float(sum((b["labels"] != -100).sum() for b in step_batches)), device=p.device)
    if p.ddp:
        dist.all_reduce(tokens)
    loss_sum = torch.zeros((), device=p.device)
    for b in step_batches:
        b = {k: v.to(p.device) if torch.is_tensor(v) else v for k, v in b.items()}
        with p.autocast:
            if t.cache is None:
                with torch.no_grad():  # the frozen ViT: no gradient flows into it
                    image_embeds = vision_embeds(t.model, b["pixel_values"])                   # (B, V, Dv)
            else:  # the same rows, computed once before training: skips the ViT (tests: the identical loss)
                image_embeds = t.cache.lookup([t.train_items[i].name for i in b["image_index"].tolist()], p.device)
            batch_loss, _ = t.caption_loss(t.model, b, image_embeds)  # summed over the micro-batch's caption tokens
        t.scaler.scale(batch_loss / tokens).backward()
        loss_sum += batch_loss.detach()
    if p.ddp:
        # data parallelism by hand: sum the LoRA gradients over ranks (one flat buffer; they are 0.26% of the
        # model) and the losses for the log. Each rank divided by the global token count already.
        flat = torch.cat([q.grad.flatten() if q.grad is not None else torch.zeros_like(q).flatten() for q in t.params])
        dist.all_reduce(flat)
        start = 0
        for q in t.params:
            q.grad = flat[start:start + q.numel()].view_as(q)
            start += q.numel()
        dist.all_reduce(loss_sum)
    return (loss_sum / tokens).item()


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

class Settings:
    """The settings of this run, as attributes (cfg.batch_images, ...)."""

    def __init__(self, **values):
        self.__dict__.update(values)


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
    """What the loop uses: the model and data, the (compiled) loss, the optimizer and the schedule."""
    model: object
    processor: object
    data: object
    prompt_ids: list               # the language model's input before the caption (data.prompt_ids)
    caption_ids: object            # captions -> token ids (model.caption_tokenizer)
    train_items: list
    val_items: list
    test_items: list
    cache: object = None
    caption_loss: object = None
    dataset: object = None
    collate: object = None
    group: int = 1                 # micro-batches per optimizer step, all ranks together
    steps_per_epoch: int = 0
    total_steps: int = 0
    warmup_steps: int = 0
    params: list = None            # exactly the LoRA tensors
    optimizer: object = None
    scaler: object = None
    evaluating: bool = False       # val CIDEr during training
    choose_by_val: bool = False    # keep the best adapter by val CIDEr (else the last)


class RunState:
    """What the loop carries from step to step and a checkpoint saves beside the weights: the step, the best val
    CIDEr so far (x100) and the val history; and the log: out_dir/log.jsonl (one JSON object a line, what the
    report's curves are drawn from) and, with tensorboard=True, the same scalars in out_dir/tensorboard/."""
    SCALARS = {"loss": "train/loss", "lr": "train/lr", "captions_per_s": "train/captions_per_s",
               "val_CIDEr": "val/CIDEr"}  # log.jsonl key -> TensorBoard tag

    def __init__(self, cfg, p, steps_per_epoch):
        self.cfg, self.p, self.steps_per_epoch = cfg, p, steps_per_epoch
        self.step, self.best_cider, self.history = 0, -1.0, []
        self.writers = {}

    def open_log(self, resumed):
        """A resumed run goes on from its checkpoint's step: what the stopped run logged after it is superseded
        (a "resumed" line in log.jsonl; TensorBoard's purge_step), so every curve reads as one uninterrupted run."""
        if not self.p.master:
            return
        if resumed:
            self.record({"step": self.step, "resumed": True})
        if self.cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # (checked installed before any work)
            folder = os.path.join(self.cfg.out_dir, "tensorboard")
            self.writers[""] = SummaryWriter(folder, purge_step=self.step + 1 if resumed else None, flush_secs=10)

    def record(self, entry):
        if self.p.master:
            with open(os.path.join(self.cfg.out_dir, "log.jsonl"), "a") as log_file:
                log_file.write(json.dumps(entry) + "\n")
            for key, tag in self.SCALARS.items():
                if key in entry and "" in self.writers:
                    self.writers[""].add_scalar(tag, entry[key], entry["step"])

    def record_test_scores(self, columns):
        """The final scores (x100) as test/<metric>, in the runs zero_shot and fine_tuned: one chart per metric
        with both beside each other in TensorBoard."""
        if "" not in self.writers:
            return
        from torch.utils.tensorboard import SummaryWriter
        for label, scores in columns.items():
            run = label.replace("-", "_")  # zero_shot, fine_tuned
            writer = self.writers.setdefault(run, SummaryWriter(os.path.join(self.cfg.out_dir, "tensorboard", run)))
            for metric, value in scores.items():
                writer.add_scalar(f"test/{metric}", value, self.step)

    def close_log(self):
        for writer in self.writers.values():
            writer.close()

    def checkpoint(self, t, rng, finished=False):
        if self.p.master:
            epoch, step_in_epoch = divmod(self.step, self.steps_per_epoch)  # the data position (batches are seeded)
            checkpoint.save(os.path.join(self.cfg.out_dir, "checkpoint"),
                            {"step": self.step, "epoch": epoch, "step_in_epoch": step_in_epoch,
                             "best_cider": self.best_cider, "history": self.history, "finished": finished,
                             "settings": vars(self.cfg)},
                            lambda path: save_trained_adapter(self.cfg, t.model, path, self.step), t.optimizer,
                            t.scaler, rng)


class StopRequest:
    """SIGTERM, caught: before the loop and after it, it stops the run at once (Terminated); inside the loop
    (deferred) the current step finishes, a checkpoint is saved, and then the run stops."""

    def __init__(self):
        self.deferred, self.signalled = False, False
        self.previous = signal.signal(signal.SIGTERM, self.handle)

    def restore(self):
        signal.signal(signal.SIGTERM, self.previous)

    def handle(self, signum, frame):
        self.signalled = True
        if not self.deferred:
            raise Terminated()

    def requested(self, p):
        if not p.ddp:
            return self.signalled
        flag = torch.tensor(float(self.signalled), device=p.device)  # every rank stops at the same step
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


class Speedometer:
    """The log line every log_interval steps: the step of how many, loss, learning rate, speed over the steps since
    the last line (leaving out the time spent on checkpoints and evaluations) and the time left."""

    def __init__(self, cfg, p, t, run):
        self.cfg, self.p, self.t, self.run = cfg, p, t, run
        self.t_last, self.step_last, self.captions, self.skipped = time.time(), run.step, 0, 0
        self.first_step, self.train_seconds, self.eval_seconds = run.step, 0.0, []

    def pause(self, work, evaluation=False):
        """Run work (a checkpoint, an evaluation) without counting its time as training time."""
        since = time.time()
        work()
        self.t_last += time.time() - since
        if evaluation:
            self.eval_seconds.append(time.time() - since)

    def update(self, epoch, loss, lr, captions, skipped):
        self.captions, self.skipped = self.captions + captions, self.skipped + skipped
        step = self.run.step
        if step % self.cfg.log_interval and step != self.t.total_steps:
            return
        if self.p.device_type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.time() - self.t_last
        self.train_seconds += elapsed
        entry = {"step": step, "epoch": epoch, "loss": round(loss, 5), "lr": float(f"{lr:.3g}"),
                 "ms_per_step": round(1000 * elapsed / (step - self.step_last), 1),
                 "captions_per_s": round(self.captions * self.p.world_size / elapsed, 1)}
        if self.p.device_type == "cuda":
            entry["peak_mem_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
        if self.skipped:
            entry["skipped_images"] = self.skipped
        entry["eta_s"] = round(self.seconds_left())
        shown = {**entry, "step": f"{step}/{self.t.total_steps}", "eta_s": None, "eta": duration(entry["eta_s"])}
        self.p.log("  ".join(f"{k} {v}" for k, v in shown.items() if v is not None))
        self.run.record(entry)
        self.t_last, self.step_last, self.captions, self.skipped = time.time(), step, 0, 0

    def seconds_left(self):
        """The steps left at this run's measured speed, plus the evaluations left at the measured time per image
        of those done (the final one captions the test split twice: zero-shot and fine-tuned)."""
        step, total, interval = self.run.step, self.t.total_steps, self.cfg.eval_interval
        seconds = self.train_seconds / (step - self.first_step) * (total - step)
        if self.eval_seconds:
            per_image = sum(self.eval_seconds) / len(self.eval_seconds) / len(self.t.val_items)
            evaluations = total // interval - step // interval + (total % interval > 0 and step < total)
            seconds += evaluations * per_image * len(self.t.val_items)
            seconds += 2 * per_image * len(self.t.test_items) if self.cfg.final_eval else 0
        return seconds


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
              "gradients (and T5's wo layers run in float32); a NaN loss stops the run, naming the cause")
    return p


def check_resume(cfg, p):
    """Lock out_dir, check that what train.py writes there is its own, and read its checkpoint if any: (path or None,
    state). A changed setting that defines the run is refused; a finished run prints its results, returning None.
    Under torchrun every process must start from the same checkpoint, or all stop (agree_on_the_start)."""
    problem, (resume_from, state, finished) = None, (None, {}, False)
    try:
        if p.master:
            checkpoint.lock_out_dir(cfg.out_dir)  # held until the process ends, however it ends
            checkpoint.check_out_dir(cfg.out_dir)
        resume_from, state, finished = read_checkpoint(cfg, p)
    except UserError as e:
        problem = e
    if p.ddp:
        finished = agree_on_the_start(cfg, p, problem, state.get("step", -1), finished)
    if problem:
        raise problem
    return None if finished else (resume_from, state)


def agree_on_the_start(cfg, p, problem, step, finished):
    """One collective before any work: if a process failed to start, all stop (none waits for it); rank 0 says
    whether the run has finished; a checkpoint that differs between processes (machines that do not share out_dir)
    stops the run. Returns whether it has finished."""
    flags = torch.tensor([float(problem is not None), float(p.master and finished), step, -step], device=p.device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    failed, finished, highest, lowest = flags[0].item(), flags[1].item(), flags[2].item(), -flags[3].item()
    if failed and not problem:
        raise RunError(f"rank {p.rank}: stopping, another process could not start (its error says why)")
    if not failed and not finished and highest != lowest:
        other = highest if step != highest else lowest
        found = [f"the checkpoint of step {s:g}" if s >= 0 else "no checkpoint" for s in (step, other)]
        raise RunError(f"rank {p.rank}: the processes found different checkpoints ({cfg.out_dir}: {found[0]} here, "
                       f"{found[1]} elsewhere): a run over several machines resumes only when every machine sees rank "
                       "0's out_dir/checkpoint; put out_dir on a shared filesystem, or copy rank 0's checkpoint folder "
                       "to each machine's out_dir")
    return bool(finished)


def read_checkpoint(cfg, p):
    """check_resume's reading: (path or None, state, whether the run has finished)."""
    checkpoint_dir, results_path = os.path.join(cfg.out_dir, "checkpoint"), os.path.join(cfg.out_dir, "results.json")
    resume_from = checkpoint.find(checkpoint_dir)
    try:
        state = checkpoint.read_state(resume_from) if resume_from else {}
    except checkpoint.CheckpointError as e:
        raise RunError(f"{e}; delete {checkpoint_dir} to train this run afresh") from None
    settings_now = vars(cfg)
    changed = {k: was for k, was in state.get("settings", {}).items() if k in settings_now and settings_now[k] != was}
    for key in sorted(checkpoint.FIXED_ON_RESUME & changed.keys()):  # sorted: the same key is reported every time
        raise RunError(f"{resume_from} was written with {key}={changed[key]!r}, this run has {key}="
                       f"{settings_now[key]!r}: resume with the same value, or train afresh in another out_dir "
                       f"(or delete {checkpoint_dir})")
    extended = {"max_steps", "epochs"} & changed.keys()  # a finished run given more steps trains on (restore)
    if state.get("finished") and not extended and (os.path.isfile(results_path) or not cfg.final_eval):
        p.log(f"{cfg.out_dir}: this run has finished (raise max_steps or epochs to train it on from its last step; "
              f"delete {checkpoint_dir} to train again from the start)")
        if os.path.isfile(results_path) and p.master:
            print_results(results_path)
        return resume_from, state, True
    if changed:
        p.log("resuming with changed settings: " + ", ".join(f"{k} {w!r} -> {settings_now[k]!r}"
                                                           for k, w in changed.items()))
    return resume_from, state, False


def print_results(path):
    try:
        results = read_json(path)
        print(f"test split (scores {results.get('scale', SCALE).split(':')[0]}):")
        print_table({"zero-shot": results["zero_shot"], "fine-tuned": results["fine_tuned"]})
    except (UserError, KeyError, TypeError, AttributeError, ValueError):
        print(f"({path} could not be read)")


def load_data_and_model(cfg, p):
    """The caption collection, BLIP-2 with LoRA injected, the prompt's ids and the captions' tokenizer."""
    if p.master:  # the demo world is built only for the demo's own paths (python train.py config/demo.py)
        demo.ensure_demo_world(cfg.data_dir, log=p.log)
        demo.ensure_demo_world(cfg.model, log=p.log)
    if p.ddp:
        dist.barrier()
    data = read_captions(cfg.data_dir, cfg.caption_column, cfg.image_column, cfg.symlinks_out, cfg.val_from_train)
    if cfg.eval_interval or cfg.final_eval:
        require_java()  # now, not after hours of training
    # the frozen base in the compute dtype on a GPU (half the memory); LoRA tensors stay float32 (lora.py)
    blip2, processor = load_prepared(cfg.model, p.device, p.dtype, base_bits=cfg.base_bits, log=p.log)
    inject(cfg, blip2)
    if cfg.gradient_checkpointing:
        use_gradient_checkpointing(blip2)
    prompt = prompt_ids(processor.tokenizer, cfg.prompt, blip2.config)
    caption_ids = caption_tokenizer(processor.tokenizer, blip2.config)
    splits = data.splits
    p.log(f"{data.layout}: " + ", ".join(f"{s} {len(v)} images" for s, v in splits.items())
          + (f"; {len(data.skipped)} entries skipped (python data.py {cfg.data_dir})" if data.skipped else ""))
    if data.val_note:
        p.log(data.val_note)
    p.log(lora_summary(blip2))
    describe_captions(cfg, p, splits["train"], caption_ids, processor.tokenizer.unk_token_id)
    val_items = splits["val"][:cfg.eval_images] if cfg.eval_images else splits["val"]
    return Training(blip2, processor, data, prompt, caption_ids, splits["train"], val_items, splits["test"])


def inject(cfg, blip2):
    """LoRA on the lora_targets (none given: the model family's); one line for a target that matches nothing or lies
    inside the frozen ViT."""
    targets = cfg.lora_targets or default_lora_targets(blip2.config)
    try:
        wrapped = inject_lora(blip2, targets, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout)
    except ValueError as e:
        raise settings.SettingsError(f"lora_targets: {e}") from None
    inside_vit = sorted({t for t in targets for path in wrapped
                         if path.startswith("vision_model.") and (path == t or path.endswith("." + t))})
    if inside_vit:
        raise settings.SettingsError(f"lora_targets: {inside_vit[0]!r} matches layers inside the ViT "
                                     "(vision_model...), which this project keeps frozen so that its outputs can be "
                                     "computed once (the vision cache); leave it out")


def describe_captions(cfg, p, train_items, caption_ids, unknown_id):
    """What the tokenizer makes of the train captions, said once at the start: cut captions, unknown words."""
    stats = caption_token_stats(train_items, caption_ids, cfg.max_caption_tokens, unknown_id)
    if stats["too_long"]:
        p.log(f"{stats['too_long']} train captions are longer than max_caption_tokens={cfg.max_caption_tokens} (the "
              f"longest: {stats['longest']} tokens); training reads their first {cfg.max_caption_tokens} tokens. "
              "Raise max_caption_tokens to keep them whole: memory and time per caption grow with it")
    if stats["unknown_fraction"] > 0.02:
        p.log(f"warning: {100 * stats['unknown_fraction']:.0f}% of the train captions' tokens are unknown to this "
              "model's tokenizer (<unk>): it can neither learn nor write those words. The demo base knows only its "
              "own few dozen words; blip2-flan-t5-xl's tokenizer covers English text")


def prepare_vision_cache(cfg, p, t):
    """The frozen ViT's outputs of every image, computed once (rank 0 builds, the others wait); None when off.
    Once complete, the ViT leaves the GPU (vision_on_gpu=False): training and evaluation read the cache."""
    if not cfg.vision_cache:
        return None
    items = t.data.splits["train"] + t.data.splits["val"] + t.test_items
    image_size = "x".join(str(t.processor.image_processor.size[k]) for k in ("height", "width"))
    key = (t.model, cfg.model, image_size, items, p.dtype)
    cache = VisionCache(os.path.join(cfg.out_dir, "vision_cache"), *key)
    if cache.problem and p.master:
        p.log(f"vision cache: {cache.dir} cannot be used ({cache.problem}); building it again")
    if not cache.complete and p.master:
        build_vision_cache(cfg, p, t, cache, items, log=p.log)
    if p.ddp:
        dist.barrier()
        cache = VisionCache(os.path.join(cfg.out_dir, "vision_cache"), *key)  # complete where rank 0 built it
        if not cache.complete and p.local_rank == 0:  # a node that does not share rank 0's out_dir: its own copy
            build_vision_cache(cfg, p, t, cache, items, log=lambda line: print(f"[rank {p.rank}] {line}", flush=True))
        dist.barrier()
        cache = VisionCache(os.path.join(cfg.out_dir, "vision_cache"), *key)  # now complete on every rank
    if cache.missing:
        p.log(f"vision cache: {len(cache.missing)} unreadable images are left out")
        t.train_items = [i for i in t.train_items if i.name not in cache.missing]
    if not cfg.vision_on_gpu and p.device_type == "cuda":
        move_vision(t.model, "cpu")
        torch.cuda.empty_cache()
    return cache


def build_vision_cache(cfg, p, t, cache, items, log):
    log(f"vision cache: computing ViT outputs of {len(items)} images once ({size(cache.nbytes)} in {cache.dir}) ...")
    require_disk_space(cache, len(items))
    # its own generator: drawing worker seeds from the global RNG would change the dropout of the run
    loader = torch.utils.data.DataLoader(ImageCaptionDataset(items, t.processor.image_processor), batch_size=32,
                                         num_workers=min(cfg.num_workers, os.cpu_count() or 1),
                                         collate_fn=CaptionCollator(items, t.caption_ids, t.prompt_ids),
                                         generator=torch.Generator())
    cache.build(t.model, loader, p.device, p.autocast, log=log)


def size(nbytes):
    return f"{nbytes / 1e9:.1f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.1f} MB"


def require_disk_space(cache, num_images):
    """The vision cache must fit on its disk (COCO in bf16 is about 90 GB): say so now, not when the disk is full."""
    folder = os.path.dirname(cache.dir)
    require_writable_folder(folder, "vision cache")
    free = shutil.disk_usage(folder).free
    if cache.nbytes > free:
        raise RunError(f"vision cache: {num_images} images need {size(cache.nbytes)} in {folder}, but only "
                       f"{size(free)} is free there. Set vision_cache=False (the ViT then runs in every step) or use "
                       "an out_dir on a disk with room")


def prepare_training(cfg, p, t):
    """Batching, the (compiled) loss, the optimizer and the schedule."""
    t.collate = CaptionCollator(t.train_items, t.caption_ids, t.prompt_ids, cfg.max_caption_tokens,
                                load_images=t.cache is None, fixed_length=p.compiling)
    # fullgraph: a graph break is an error, not a silent slowdown (tests/test_fast.py keeps the loss one graph)
    t.caption_loss = torch.compile(grouped_caption_loss, fullgraph=True) if p.compiling else grouped_caption_loss
    t.dataset = ImageCaptionDataset(t.train_items, t.processor.image_processor, load_images=t.cache is None)
    t.group = cfg.grad_accum * p.world_size
    t.steps_per_epoch = len(epoch_micro_batches(cfg, len(t.train_items), 0, t.group)) // t.group
    if t.steps_per_epoch == 0:
        raise RunError(f"{cfg.data_dir}: no train images" if not t.train_items else
                       f"{cfg.data_dir}: {len(t.train_items)} train images is fewer than one step needs "
                       f"(batch_images * grad_accum * processes = {cfg.batch_images * t.group}); lower batch_images")
    t.total_steps = cfg.max_steps or cfg.epochs * t.steps_per_epoch
    t.warmup_steps = min(cfg.warmup_steps, t.total_steps // 5)
    if t.warmup_steps < cfg.warmup_steps:
        p.log(f"warmup: {t.warmup_steps} steps, not warmup_steps={cfg.warmup_steps}: a warmup longer than a fifth of "
              f"this run's {t.total_steps} steps would leave the learning rate low for most of it")
    t.params = [q for q in t.model.parameters() if q.requires_grad]  # exactly the LoRA tensors
    t.optimizer = torch.optim.AdamW(t.params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                    fused=p.device_type == "cuda")
    t.scaler = torch.amp.GradScaler(p.device_type, enabled=p.dtype == torch.float16)
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


def restore(cfg, p, t, run, resume_from, state):
    try:
        load_adapter(t.model, resume_from)  # checks every tensor against the model
        checkpoint.restore(resume_from, state, t.optimizer, t.scaler, p.device)
    except UserError as e:
        raise RunError(f"{e}; to start this run afresh, delete {os.path.join(cfg.out_dir, 'checkpoint')}") from None
    if state["step"] > t.total_steps:
        raise RunError(f"{resume_from}: step {state['step']} is beyond this run's {t.total_steps} steps (max_steps or "
                       "epochs lowered?); resume with the settings it was written with, or train afresh")
    run.step, run.best_cider, run.history = state["step"], state["best_cider"], state["history"]
    p.log(f"resuming from {resume_from} at step {run.step}")
    if state["finished"] and run.step < t.total_steps:
        p.log(f"extending the finished run from step {run.step} to {t.total_steps}: the learning rate's cosine is "
              f"re-planned to end at step {t.total_steps} (now {lr_at(cfg, t, run.step):.3g}, it ended at "
              f"{cfg.learning_rate * cfg.min_lr_ratio:.3g})")


def save_trained_adapter(cfg, blip2, path, step):
    """The adapter (peft's layout) and, first, caption_settings.json beside it: the prompt and generation settings
    caption.py and evaluate.py use, and what it was trained on (checkpoint.py knows the folder as ours by it).
    Weights that are not finite are never saved, as an adapter or in a checkpoint: the run stops instead."""
    if not all(torch.isfinite(q).all() for q in lora_state_dict(blip2).values()):
        kept = checkpoint.find(os.path.join(cfg.out_dir, "checkpoint"))
        raise RunError(f"the LoRA weights hold NaN or infinity after step {step}; nothing was saved. "
                       + (f"The last good checkpoint ({kept}) is kept; lower learning_rate (now {cfg.learning_rate:g}) "
                          "and run again to resume from it" if kept else "Lower learning_rate or check the data"))
    os.makedirs(path, exist_ok=True)
    trained_on = {"data_dir": os.path.abspath(cfg.data_dir), "caption_column": cfg.caption_column,
                  "image_column": cfg.image_column, "symlinks_out": cfg.symlinks_out,
                  "val_from_train": cfg.val_from_train, "base_model": base_model_reference(cfg.model), "step": step}
    save_caption_settings(path, vars(cfg), trained_on)
    save_adapter(blip2, path, base_model_reference(cfg.model))


def keep_adapter(cfg, p, t, step):
    """The adapter the run keeps, in out_dir/adapter, with its model card."""
    save_trained_adapter(cfg, t.model, os.path.join(cfg.out_dir, "adapter"), step)
    write_model_card(cfg, p, t, step)


CARD_SETTINGS = ("batch_images", "grad_accum", "epochs", "max_steps", "learning_rate", "warmup_steps", "min_lr_ratio",
                 "weight_decay", "grad_clip", "max_caption_tokens", "base_bits", "gradient_checkpointing", "seed")


def write_model_card(cfg, p, t, step, scores=None, test_images=0):
    """out_dir/adapter/README.md, the model card the hub shows (model_card.py): rewritten with each adapter kept,
    and with the test scores once the final evaluation has them."""
    generation = {k: getattr(cfg, k) for k in GENERATION_DEFAULTS if k != "prompt"}
    adapter_card(os.path.join(cfg.out_dir, "adapter"), {
        "base_model": base_model_reference(cfg.model), "r": cfg.lora_r, "alpha": cfg.lora_alpha,
        "dropout": cfg.lora_dropout, "targets": cfg.lora_targets or default_lora_targets(t.model.config),
        "collection": cfg.data_dir, "layout": t.data.layout,
        "splits": {name: (len(items), sum(len(i.captions) for i in items)) for name, items in t.data.splits.items()},
        "settings": {**{k: getattr(cfg, k) for k in CARD_SETTINGS}, "precision": str(p.dtype).split(".")[-1],
                     "processes": p.world_size},
        "step": step, "total_steps": t.total_steps, "prompt": cfg.prompt, "generation": generation,
        "scores": scores, "test_images": test_images})


def stop_on_a_non_finite_loss(cfg, p, loss, step):
    if math.isfinite(loss):
        return
    kept = checkpoint.find(os.path.join(cfg.out_dir, "checkpoint"))
    kept_step = checkpoint.read_state(kept)["step"] if kept else None
    raise RunError(f"the loss became {loss} at step {step}. "
                   + ("float16 overflowed: use dtype=bfloat16 (on a GPU that has it) or float32. "
                      if p.dtype == torch.float16 else f"Lower learning_rate (now {cfg.learning_rate:g}) or check the "
                      "data. ")
                   + (f"The last good checkpoint ({kept}, step {kept_step}) is kept; fix the setting and run again to "
                      "resume from it." if kept else "No checkpoint was written yet."))


def evaluate_val(cfg, p, t, run):
    """CIDEr (x100) on the val images; rank 0 only, the others wait. Keeps the best adapter in out_dir/adapter."""
    if p.master:
        t.model.eval()
        predictions = caption_items(t.model, t.processor, t.val_items, t.prompt_ids, p.device, p.autocast, t.cache,
                                    progress=f"step {run.step}: val captions", progress_log=p.log,
                                    batch_size=cfg.eval_batch, num_beams=cfg.num_beams,
                                    max_new_tokens=cfg.max_new_tokens, min_new_tokens=cfg.min_new_tokens)
        cider = score_captions(predictions, {i.name: i.captions for i in t.val_items}, metrics=("CIDEr",))["CIDEr"]
        run.history.append({"step": run.step, "val_CIDEr": cider})
        run.record({"step": run.step, "val_CIDEr": cider})
        improved = t.choose_by_val and cider > run.best_cider
        if improved:
            run.best_cider = cider
            keep_adapter(cfg, p, t, run.step)
        p.log(f"step {run.step}: val CIDEr {cider:.1f}" + (" (best so far: adapter saved)" if improved else
                                                           f" (best {run.best_cider:.1f})" if t.choose_by_val else ""))
        train_mode(t.model)
    if p.ddp:
        dist.barrier()


def final_evaluation(cfg, p, t, run):
    """The kept adapter and the zero-shot base on the test split: results.json, the table, and report.html."""
    if not t.test_items:
        p.log("no test images: no final evaluation")
        return
    adapter = os.path.join(cfg.out_dir, "adapter")
    t.model.eval()
    load_adapter(t.model, adapter)  # the best one by val CIDEr, or the final one
    kept_step = read_json(os.path.join(adapter, "caption_settings.json")).get("trained_on", {}).get("step", "?")
    generation = dict(batch_size=cfg.eval_batch, num_beams=cfg.num_beams, max_new_tokens=cfg.max_new_tokens,
                      min_new_tokens=cfg.min_new_tokens, progress_log=p.log)
    args = (t.model, t.processor, t.test_items, t.prompt_ids, p.device, p.autocast, t.cache)
    fine_tuned = caption_items(*args, **generation, progress="test captions, fine-tuned")
    zero_shot = captions_without_adapter(*args, **generation, progress="test captions, zero-shot")
    columns, rows = score_split(t.test_items, fine_tuned, "fine-tuned", zero_shot)
    run.record_test_scores(columns)
    write_model_card(cfg, p, t, kept_step, scores=columns, test_images=len(fine_tuned))
    results_path, report_path = os.path.join(cfg.out_dir, "results.json"), os.path.join(cfg.out_dir, "report.html")
    write_json(results_path, {"scale": SCALE, "split": "test", "images": len(fine_tuned), "adapter": adapter,
                              "step": kept_step, "zero_shot": columns["zero-shot"],
                              "fine_tuned": columns["fine-tuned"]})
    write_html(report_path, f"BLIP-2 captions, {cfg.data_dir} test split", columns, rows,
               about=[f"adapter: {adapter} (step {kept_step} of {run.step})", f"collection: {cfg.data_dir} "
                      f"({t.data.layout}), test split, {len(fine_tuned)} images", f"base model: {cfg.model}"],
               curves=curves_html(os.path.join(cfg.out_dir, "log.jsonl")))
    unread = len(t.test_items) - len(fine_tuned)
    p.log(f"test split: {len(fine_tuned)} images" + (f" ({unread} unreadable, left out)" if unread else "")
          + f", beam {cfg.num_beams}, scores x100:")
    print_table({"zero-shot": columns["zero-shot"], "fine-tuned": columns["fine-tuned"]})
    if columns["fine-tuned"]["CIDEr"] <= columns["zero-shot"]["CIDEr"]:
        p.log(why_not_better(cfg, t, run, fine_tuned == zero_shot))
    p.log(f"adapter: {adapter}   scores: {results_path}   report: {report_path}")


def why_not_better(cfg, t, run, unchanged):
    """One line for a run that did not beat the zero-shot base: what happened, and the likely causes."""
    causes = []
    if run.step < 100:
        causes.append(f"only {run.step} steps (a small collection needs a few hundred: README 'Small collections')")
    if cfg.learning_rate < 1e-4:
        causes.append(f"a low learning_rate ({cfg.learning_rate:g})")
    if not t.choose_by_val and t.evaluating:
        causes.append("a val split too small to choose by")
    return ("note: fine-tuned CIDEr is not above zero-shot" + (" (the fine-tuned captions are the zero-shot ones: "
            "the adapter changed nothing they show)" if unchanged else "") + ". Likely: "
            + ("; ".join(causes) if causes else "the base already captions this collection well, or the captions' "
               "style is too varied to learn from this many images"))


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
