"""
blip2lora/run_log.py: what train.py records of a run as it goes: the log line, log.jsonl, TensorBoard, the model card.

    RunState      the step, the best val CIDEr and the val history (what a checkpoint saves beside the weights), and
                  the log: out_dir/log.jsonl, one JSON object a line (the report's curves are drawn from it), and with
                  tensorboard=True the same scalars in out_dir/tensorboard/
    Speedometer   the line printed every log_interval steps: step N/TOTAL, loss, learning rate, speed, time left
    write_model_card  out_dir/adapter/README.md, the card the Hugging Face hub shows (model_card.py)
"""
import importlib.util
import json
import os
import threading
import time

import torch

from blip2lora.captioning import GENERATION_DEFAULTS, base_model_reference
from blip2lora.files import UserError, require_writable_folder
from blip2lora.model import lora_targets
from blip2lora.model_card import adapter_card
from blip2lora.progress import duration


TENSORBOARD_RUNS = ("train", "zero_shot", "fine_tuned")  # out_dir/tensorboard/RUN, the runs TensorBoard lists


def _quiet_tensorboard_thread(args, say=threading.excepthook):
    """TensorBoard's writer thread re-raises a failed write (a traceback on stderr); the run says it in one line
    (RunState._tensorboard), so that thread's traceback is left out. Any other thread's is printed as usual."""
    if type(args.thread).__name__ != "_AsyncWriterThread":
        say(args)


def check_tensorboard(cfg):
    """tensorboard=True: the package is there, and out_dir/tensorboard and its runs are folders (or not yet made) that
    can be written, not a file or a link that would send the final evaluation's scalars elsewhere or nowhere."""
    if not cfg.tensorboard:
        return
    if importlib.util.find_spec("tensorboard") is None:
        raise UserError("tensorboard=True needs the tensorboard package: pip install tensorboard (or leave it False; "
                        "the curves are in out_dir/report.html either way)")
    folder = os.path.join(cfg.out_dir, "tensorboard")
    for path in (folder, *(os.path.join(folder, run) for run in TENSORBOARD_RUNS)):
        if os.path.islink(path) or (os.path.lexists(path) and not os.path.isdir(path)):
            raise UserError(f"{path}: {'a symbolic link' if os.path.islink(path) else 'not a folder'}, where "
                            "tensorboard=True writes its files; move it away, or leave tensorboard False")
        if os.path.isdir(path):
            require_writable_folder(path, "TensorBoard files")


class RunState:
    """What the loop carries from step to step and a checkpoint saves beside the weights (step, best_cider x100,
    history), and the run's log."""
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
        if self.cfg.tensorboard:  # the run TensorBoard lists as "train"; a resumed one drops the stopped run's steps
            threading.excepthook = _quiet_tensorboard_thread
            self._tensorboard("train", {}, self.step, purge_step=self.step + 1 if resumed else None)

    def record(self, entry):
        if self.p.master:
            with open(os.path.join(self.cfg.out_dir, "log.jsonl"), "a") as log_file:
                log_file.write(json.dumps(entry) + "\n")
            scalars = {tag: entry[key] for key, tag in self.SCALARS.items() if key in entry}
            if scalars and "train" in self.writers:
                self._tensorboard("train", scalars, entry["step"])

    def record_test_scores(self, columns):
        """The final scores (x100) as test/<metric>, in the runs zero_shot and fine_tuned: one chart per metric
        with both beside each other in TensorBoard."""
        if "train" not in self.writers:
            return
        for label, scores in columns.items():  # the runs zero_shot and fine_tuned
            self._tensorboard(label.replace("-", "_"), {f"test/{k}": v for k, v in scores.items()}, self.step)

    def _tensorboard(self, run, scalars, step, purge_step=None):
        """{tag: value} at `step` into out_dir/tensorboard/RUN, flushed at once. TensorBoard's writer thread, on a full
        disk or a folder made read-only, printed a traceback and left the run to fail steps later naming out_dir;
        flushed here, the run stops at this step with one line naming the folder (its last checkpoint kept), and an
        empty event file this process began is removed."""
        from torch.utils.tensorboard import SummaryWriter  # (checked installed before any work)
        folder = os.path.join(self.cfg.out_dir, "tensorboard", run)
        try:
            if run not in self.writers:
                self.writers[run] = SummaryWriter(folder, purge_step=purge_step, flush_secs=10)
            for tag, value in scalars.items():
                self.writers[run].add_scalar(tag, value, step)
            self.writers[run].flush()
        except OSError as e:
            for name in os.listdir(folder) if os.path.isdir(folder) else []:
                path = os.path.join(folder, name)
                if f".{os.getpid()}." in name and name.startswith("events.") and os.path.getsize(path) == 0:
                    os.remove(path)
            self.writers.pop(run, None)
            raise UserError(f"{folder}: cannot write TensorBoard's files ({e.strerror or e}); free space there or set "
                            "tensorboard=False (report.html has the curves too), then run the same command to resume "
                            "from the last checkpoint") from None

    def close_log(self):
        for writer in self.writers.values():
            try:
                writer.close()
            except OSError:
                pass  # the run already stopped on it, with the line that says so

    def saved_state(self, finished):
        """What a checkpoint saves beside the weights: the step and the data position (batches are seeded), the val
        record, whether the run has finished, and the settings."""
        epoch, step_in_epoch = divmod(self.step, self.steps_per_epoch)
        return {"step": self.step, "epoch": epoch, "step_in_epoch": step_in_epoch, "best_cider": self.best_cider,
                "history": self.history, "finished": finished, "settings": vars(self.cfg)}


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
        key = "val_evaluations" if evaluation else "checkpoints"
        self.t.seconds[key] = self.t.seconds.get(key, 0.0) + time.time() - since
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
        self.t.seconds["steps"] = self.train_seconds
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
        """The steps left at this run's measured speed, plus the evaluations left at the time per image of the last
        one (the final one captions the test split twice: zero-shot and fine-tuned)."""
        step, total, interval = self.run.step, self.t.total_steps, self.cfg.eval_interval
        seconds = self.train_seconds / (step - self.first_step) * (total - step)
        if self.eval_seconds:
            per_image = self.eval_seconds[-1] / len(self.t.val_items)
            evaluations = total // interval - step // interval + (total % interval > 0 and step < total)
            seconds += evaluations * per_image * len(self.t.val_items)
            seconds += 2 * per_image * len(self.t.test_items) if self.cfg.final_eval else 0
        return seconds


def time_spent(seconds):
    """Where this run's time went, in seconds: the vision cache, the steps, the val evaluations, the checkpoints,
    the test evaluation, and the rest (loading, starting, writing), from train.py's record (Training.seconds)."""
    spent = {k: round(seconds.get(k, 0.0), 1) for k in ("vision_cache", "steps", "val_evaluations", "checkpoints",
                                                         "test_evaluation")}
    total = time.time() - seconds["started"]
    return {**spent, "other": round(max(0.0, total - sum(spent.values())), 1), "total": round(total, 1)}


CARD_SETTINGS = ("batch_images", "grad_accum", "epochs", "max_steps", "learning_rate", "warmup_steps", "min_lr_ratio",
                 "weight_decay", "grad_clip", "max_caption_tokens", "base_bits", "gradient_checkpointing", "seed")


def write_model_card(cfg, p, t, step, scores=None, test_images=0):
    """out_dir/adapter/README.md, the model card the hub shows (model_card.py): rewritten with each adapter kept,
    and with the test scores once the final evaluation has them."""
    generation = {k: getattr(cfg, k) for k in GENERATION_DEFAULTS if k != "prompt"}
    adapter_card(os.path.join(cfg.out_dir, "adapter"), {
        "base_model": base_model_reference(cfg.model), "r": cfg.lora_r, "alpha": cfg.lora_alpha,
        "dropout": cfg.lora_dropout, "targets": cfg.lora_targets or lora_targets(t.model.config),
        "collection": cfg.data_dir, "collection_about": t.collection_about, "layout": t.data.layout,
        "epochs_trained": step / t.steps_per_epoch,
        "splits": {name: (len(items), sum(len(i.captions) for i in items)) for name, items in t.data.splits.items()},
        "settings": {**{k: getattr(cfg, k) for k in CARD_SETTINGS}, "precision": str(p.dtype).split(".")[-1],
                     "processes": p.world_size},
        "step": step, "total_steps": t.total_steps, "prompt": cfg.prompt, "generation": generation,
        "scores": scores, "test_images": test_images, "model_type": t.model.config.model_type})


def why_not_better(cfg, t, steps, unchanged, losses):
    """One line for a run that did not beat the zero-shot base: what happened, and the likely causes among those the
    run can see: its length, its training loss (losses: [(step, loss)] from log.jsonl) against the learning rate, and
    its val split."""
    causes, rates = [], "the offline demo base wants about 1e-2, a real BLIP-2 about 1e-4"
    if steps < 100:
        causes.append(f"only {steps} steps (a small collection needs a few hundred: README 'Small collections')")
    first, last = (losses[0][1], losses[-1][1]) if len(losses) >= 2 else (None, None)
    if first is not None and last > 0.9 * first:
        causes.append(f"the training loss hardly fell ({first:.3g} to {last:.3g}): a low learning_rate "
                      f"({cfg.learning_rate:g}) for this base ({rates})")
    elif first is not None:
        causes.append(f"the training loss fell ({first:.3g} to {last:.3g}) but the test captions did not follow: the "
                      "train and test captions may differ in style, or the adapter learned the train captions too "
                      "closely (fewer steps, a lower learning_rate, or a val split to choose the best adapter by)")
    elif cfg.learning_rate < 1e-4:
        causes.append(f"a low learning_rate ({cfg.learning_rate:g}) for this base ({rates})")
    if not t.choose_by_val and t.evaluating:
        causes.append("a val split too small to choose by")
    return ("note: fine-tuned CIDEr is not above zero-shot" + (" (the fine-tuned captions are the zero-shot ones: "
            "the adapter changed nothing they show)" if unchanged else "") + ". Likely: "
            + ("; ".join(causes) if causes else "the base already captions this collection well, or the captions' "
               "style is too varied to learn from this many images"))
