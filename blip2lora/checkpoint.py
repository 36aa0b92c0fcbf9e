"""
blip2lora/checkpoint.py: train.py's out_dir: checkpoints, resuming from them, and the lock.

Checkpoints that let a run continue exactly, an OS lock so that two runs never share the folder, and the promise
that train.py changes only what it wrote itself.

    out_dir/checkpoint/   adapter (peft layout) + caption_settings.json, optimizer.pt (tensors only), rng.safetensors,
                          state.json (step, best val CIDEr, val history, settings, loss scaler)
    out_dir/.lock         held by the running train.py (fcntl.flock); released by the OS however the process ends

A checkpoint is written into a new folder beside the old one and renamed over it, so a kill at any moment leaves a
complete one (checkpoint/, or checkpoint.old/ if the kill fell between the two renames). Everything read back is
checked (types, ranges, tensor shapes): a damaged checkpoint is one line naming the file, never a traceback, and a
pickle holding code is refused, never run.
"""
import hashlib
import json
import math
import os
import pickle
import re
import shutil
import signal
import stat

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from blip2lora.adapter_files import load_adapter
from blip2lora.captioning import CAPTION_SETTINGS_FILE
from blip2lora.files import (UserError, first_line, make_temp_dir, printable, read_json, user_permissions_tree,
                             write_json, writer_errors_as_os_errors)
from blip2lora.scoring import SCALE, is_our_report, print_table

# Settings a resumed run must keep: they define the adapter's shape and meaning, the inputs, and the data order.
# Others (learning rate after a NaN, evaluation, logging, memory levers) may change; the log says which did.
FIXED_ON_RESUME = {"model", "data_dir", "caption_column", "image_column", "prompt", "lora_r", "lora_alpha",
                   "lora_targets", "batch_images", "grad_accum", "max_caption_tokens", "seed", "val_from_train"}


class CheckpointError(UserError):
    pass


def rng_state():
    """The random state dropout draws from: CPU and every GPU."""
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return rng


def save(path, state, save_adapter, optimizer, scaler, rng):
    """Everything needed to continue exactly, into a new folder then renamed: a kill mid-save leaves the old one."""
    tmp, old = make_temp_dir(path), path + ".old"
    try:
        save_adapter(tmp)  # the adapter, as out_dir/adapter holds it
        with writer_errors_as_os_errors(os.path.join(tmp, "optimizer.pt")):
            torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))  # tensors only: weights_only loads
        with writer_errors_as_os_errors(os.path.join(tmp, "rng.safetensors")):
            save_file(rng, os.path.join(tmp, "rng.safetensors"))
        write_json(os.path.join(tmp, "state.json"), {**state, "scaler": scaler.state_dict()})
        user_permissions_tree(tmp)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)  # a full disk or a kill leaves nothing half-written behind
        if isinstance(e, OSError) and str(e.filename or "").startswith(tmp):  # name the file as the user knows it
            raise OSError(e.errno, e.strerror, path + str(e.filename)[len(tmp):]) from None
        raise
    if os.path.isdir(path):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def find(path):
    """The checkpoint to resume from, if any: a crash between the two renames leaves only path.old."""
    for candidate in (path, path + ".old"):
        if os.path.isfile(os.path.join(candidate, "state.json")):
            return candidate
    return None


def _number(value, low, high=math.inf):
    return type(value) in (int, float) and math.isfinite(value) and low <= value <= high


STATE_CHECKS = {
    "step": lambda v: type(v) is int and 0 <= v <= 10**9,
    "best_cider": lambda v: _number(v, -1.0),
    "history": lambda v: isinstance(v, list) and all(isinstance(h, dict) and type(h.get("step")) is int and
                                                     _number(h.get("val_CIDEr"), 0.0) for h in v),
    "finished": lambda v: type(v) is bool,
    "settings": lambda v: isinstance(v, dict),
    "scaler": lambda v: isinstance(v, dict) and all(_number(x, 0.0) for x in v.values()),
}


def read_state(path):
    """A checkpoint's state.json, checked: a damaged or tampered file is a one-line CheckpointError."""
    file = os.path.join(path, "state.json")
    try:
        state = read_json(file)
    except UserError as e:
        raise CheckpointError(str(e)) from None
    for key, valid in STATE_CHECKS.items():
        if not isinstance(state, dict) or key not in state or not valid(state[key]):
            raise CheckpointError(f"{file}: no valid {key!r} entry")
    return state


def restore(path, state, optimizer, scaler, device):
    """Load the optimizer, loss scaler and random state of a checkpoint, each file checked (CheckpointError)."""
    file = os.path.join(path, "optimizer.pt")
    try:
        # weights_only: tensors and plain containers only; a file holding code is refused, never run
        saved = torch.load(file, weights_only=True, map_location=device)
        _check_optimizer_state(saved, optimizer)
        optimizer.load_state_dict(saved)
    except pickle.UnpicklingError:  # (torch's own message would suggest weights_only=False: never do that here)
        raise CheckpointError(f"{file}: holds more than tensors (code, or another program's data): not loaded")
    except (OSError, RuntimeError, EOFError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{file}: unreadable ({first_line(e)})") from None
    file = os.path.join(path, "rng.safetensors")
    try:
        scaler.load_state_dict(state["scaler"])
        rng = load_file(file)
        torch.set_rng_state(rng["cpu"])
        for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
            if f"cuda{i}" in rng:
                torch.cuda.set_rng_state(rng[f"cuda{i}"], i)
    except (OSError, RuntimeError, KeyError, SafetensorError) as e:
        raise CheckpointError(f"{file}: unreadable ({first_line(e)})") from None


def _check_optimizer_state(saved, optimizer):
    """An AdamW state that fits these parameters: one (step, exp_avg, exp_avg_sq) per LoRA tensor, each of its shape
    and finite, and hyperparameters of the types AdamW uses (its flags as this run sets them). load_state_dict would
    take a wrong one without a word; the first step would crash, or turn every weight into NaN."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state, groups = (saved.get("state"), saved.get("param_groups")) if isinstance(saved, dict) else (None, None)
    if not isinstance(state, dict) or not isinstance(groups, list) or len(groups) != len(optimizer.param_groups):
        raise ValueError("not an optimizer state of this run")
    for group, ours in zip(groups, optimizer.param_groups):
        if not isinstance(group, dict):
            raise ValueError("not an optimizer state of this run")
        for key, value in ours.items():
            if key in group and key != "params" and not _same_kind(key, group[key], value):
                raise ValueError(f"its {key}={printable(repr(group[key])[:60])} is not what AdamW takes here")
    for index, entry in state.items():
        if type(index) is not int or not 0 <= index < len(params) or not isinstance(entry, dict):
            raise ValueError(f"state entry {index!r} fits no parameter")
        for name in ("exp_avg", "exp_avg_sq"):
            tensor = entry.get(name)
            if not torch.is_tensor(tensor) or tensor.shape != params[index].shape or not tensor.is_floating_point():
                raise ValueError(f"{name} of parameter {index} does not fit its shape {tuple(params[index].shape)}")
            if not torch.isfinite(tensor).all():
                raise ValueError(f"{name} of parameter {index} holds NaN or infinity")


def _same_kind(key, saved, ours):
    """A saved hyperparameter that AdamW can take here: a number a finite number, betas two of them, a flag a flag;
    amsgrad and maximize as this run sets them (amsgrad needs a state train.py never keeps)."""
    if key in ("amsgrad", "maximize"):
        return saved is ours
    if isinstance(ours, bool) or ours is None:
        return isinstance(saved, bool) or saved is None
    if isinstance(ours, (tuple, list)):
        return isinstance(saved, (tuple, list)) and len(saved) == len(ours) and all(
            _same_kind(key, s, o) for s, o in zip(saved, ours))
    return type(saved) in (int, float) and math.isfinite(saved)


_held_locks = []  # (descriptor, path) of the lock files this process made or took over
LOCK_MARK = "train.py lock, process "  # a lock file's first words: how an earlier run's is told from a user's file


def lock_out_dir(path):
    """An OS lock on out_dir/.lock for the life of the run: a second run into the same folder stops with one line
    instead of overwriting the first run's checkpoint. The OS releases it on any exit, kill -9 included, and the next
    run takes such a file over; the run that made it removes it. A .lock that is not a lock file of train.py's (the
    user's file, a symbolic link) is refused, never written to."""
    import fcntl
    os.makedirs(path, exist_ok=True)
    file = os.path.join(path, ".lock")
    while True:
        fd, holder = _open_lock(file)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise CheckpointError(f"{path} is in use by another train.py (process {holder or '?'}): wait for it to "
                                  "end, or give this run another out_dir") from None
        try:  # the run that held it may have removed it between our open and our lock: then start again
            if os.stat(file, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{LOCK_MARK}{os.getpid()}\n".encode(), 0)  # for the second run's message
    _held_locks.append((fd, file))


def _open_lock(file):
    """(descriptor, the process named in it) of a new lock file made exclusively, or of an earlier run's; one line
    for anything else there. Links are never followed."""
    flags = os.O_RDWR | os.O_NOFOLLOW
    try:
        return os.open(file, flags | os.O_CREAT | os.O_EXCL, 0o666), None
    except FileExistsError:
        pass
    except OSError as e:
        raise CheckpointError(f"{file}: cannot make this run's lock file ({e.strerror}); out_dir must be a folder you "
                              "can write to") from None
    try:
        fd = os.open(file, flags)
    except OSError:  # a symbolic link (ELOOP), a folder, a file we may not open
        fd = None
    text = os.pread(fd, 100, 0).decode("utf-8", "replace") if fd is not None and stat.S_ISREG(
        os.fstat(fd).st_mode) else ""
    if text.startswith(LOCK_MARK) or re.fullmatch(r"\d+\n?", text):  # ours (or an earlier version's: a process id)
        return fd, text.removeprefix(LOCK_MARK).strip()
    if fd is not None:
        os.close(fd)
    raise CheckpointError(f"{file}: exists and was not written by train.py; move it away or choose another out_dir "
                          "(nothing was changed)")


def unlock_out_dir():
    """Release this process's out_dir lock and remove its file (at the end of train.main, however it ends)."""
    while _held_locks:
        fd, file = _held_locks.pop()
        try:
            os.remove(file)  # while still holding the lock: a run that opened it before will see it is gone
        except FileNotFoundError:
            pass
        os.close(fd)


def _ours(path, kind):
    """Whether an existing out_dir entry was written by train.py (each kind carries a mark of it)."""
    if kind == "checkpoint":
        return os.path.isdir(path) and (find(path) == path or not os.listdir(path))
    if kind == "adapter":
        marked = os.path.isfile(os.path.join(path, CAPTION_SETTINGS_FILE))
        return os.path.isdir(path) and (marked or not os.listdir(path))
    if not os.path.isfile(path) or os.path.islink(path):  # (a FIFO would block the read below)
        return False
    if kind == "results":
        try:
            return isinstance(read_json(path).get("fine_tuned"), dict)
        except (UserError, AttributeError):
            return False
    if kind == "log":  # one JSON object a line, each with the step it was written at
        with open(path, "rb") as f:
            first = f.readline(10_000)
        try:
            return not first or "step" in json.loads(first)
        except (ValueError, TypeError):
            return False
    return is_our_report(path)


def check_out_dir(out_dir):
    """Before any work: everything train.py will write into out_dir is either absent or its own. A folder of the
    user's called checkpoint/, a results.json or report.html from elsewhere, or a project path of the wrong type
    (a file where a folder goes, a folder where a file goes) is one line, and nothing is touched."""
    for name, kind in (("checkpoint", "checkpoint"), ("checkpoint.old", "checkpoint"), ("adapter", "adapter"),
                       ("results.json", "results"), ("report.html", "report"), ("log.jsonl", "log")):
        path = os.path.join(out_dir, name)
        if os.path.lexists(path) and not _ours(path, kind):
            raise CheckpointError(f"{path}: exists and was not written by train.py; move it away or choose "
                                  "another out_dir (nothing was changed)")
    for name, folder in (("vision_cache", True), ("tensorboard", True)):
        path = os.path.join(out_dir, name)
        if os.path.lexists(path) and os.path.isdir(path) != folder:
            raise CheckpointError(f"{path}: is a {'file' if folder else 'folder'}, where train.py keeps its "
                                  f"{'vision cache folder' if folder else name + ' file'}; move it away or choose "
                                  "another out_dir")


# ------------------------------------------------------------------------------------------- train.py's stages
# How a run starts and stops around its checkpoints. They read train.py's objects: cfg (its settings), p (its
# processes: rank, device, log), t (the model, optimizer and data) and run (run_log.RunState).

class Terminated(BaseException):
    """SIGTERM (a cluster scheduler, a preemptible VM, docker stop): stop, saying how to resume."""


class Interrupted(BaseException):
    """Ctrl-C (SIGINT) inside the loop: the step ended and was saved; the message says how to resume."""


class StopRequest:
    """SIGTERM and Ctrl-C (SIGINT), caught: before the loop and after it, they stop the run at once (Terminated,
    KeyboardInterrupt); inside the loop (deferred) the current step finishes, a checkpoint is saved, and then the run
    stops (stop()). A second Ctrl-C stops at once. A SIGINT the process was started ignoring stays ignored."""

    def __init__(self):
        self.deferred, self.signalled = False, None
        self.previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)
                         if signal.getsignal(s) is not signal.SIG_IGN}
        for s in self.previous:
            signal.signal(s, self.handle)

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def handle(self, signum, frame):
        again, self.signalled = self.signalled is not None, self.signalled or signum
        if not self.deferred or (again and signum == signal.SIGINT):
            raise KeyboardInterrupt if signum == signal.SIGINT else Terminated()

    def requested(self, p):
        if not p.ddp:
            return self.signalled is not None
        flag = torch.tensor(float(self.signalled or 0), device=p.device)  # every rank stops at the same step
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self.signalled = int(flag.item()) or None
        return self.signalled is not None

    def stop(self, message):
        raise (Interrupted if self.signalled == signal.SIGINT else Terminated)(message)


def check_resume(cfg, p):
    """Lock out_dir, check that what train.py writes there is its own, and read its checkpoint if any: (path or None,
    state). A changed setting that defines the run is refused; a finished run prints its results, returning None.
    Under torchrun every process must start from the same checkpoint, or all stop (_agree_on_the_start)."""
    problem, (resume_from, state, finished) = None, (None, {}, False)
    try:
        if p.master:
            lock_out_dir(cfg.out_dir)  # held until the process ends, however it ends
            check_out_dir(cfg.out_dir)
        resume_from, state, finished = _read_checkpoint(cfg, p)
    except UserError as e:
        problem = e
    if p.ddp:
        finished = _agree_on_the_start(cfg, p, problem, state.get("step", -1), finished)
    if problem:
        raise problem
    return None if finished else (resume_from, state)


def _agree_on_the_start(cfg, p, problem, step, finished):
    """One collective before any work: if a process failed to start, all stop (none waits for it); rank 0 says
    whether the run has finished; a checkpoint that differs between processes (machines that do not share out_dir)
    stops the run. Returns whether it has finished."""
    flags = torch.tensor([float(problem is not None), float(p.master and finished), step, -step], device=p.device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    failed, finished, highest, lowest = flags[0].item(), flags[1].item(), flags[2].item(), -flags[3].item()
    if failed and not problem:
        raise CheckpointError(f"rank {p.rank}: stopping, another process could not start (its error says why)")
    if not failed and not finished and highest != lowest:
        other = highest if step != highest else lowest
        found = [f"the checkpoint of step {s:g}" if s >= 0 else "no checkpoint" for s in (step, other)]
        raise CheckpointError(f"rank {p.rank}: the processes found different checkpoints ({cfg.out_dir}: {found[0]} "
                              f"here, {found[1]} elsewhere): a run over several machines resumes only when every "
                              "machine sees rank 0's out_dir/checkpoint; put out_dir on a shared filesystem, or copy "
                              "rank 0's checkpoint folder to each machine's out_dir")
    return bool(finished)


def _differs(now, was, is_path):
    """Whether a setting changed: a folder named two ways (data/x/ and data/x, ./data/x) is the same folder."""
    if is_path and isinstance(now, str) and isinstance(was, str):
        return os.path.normpath(now) != os.path.normpath(was)
    return now != was


def _read_checkpoint(cfg, p):
    """check_resume's reading: (path or None, state, whether the run has finished)."""
    checkpoint_dir, results_path = os.path.join(cfg.out_dir, "checkpoint"), os.path.join(cfg.out_dir, "results.json")
    resume_from = find(checkpoint_dir)
    try:
        state = read_state(resume_from) if resume_from else {}
    except CheckpointError as e:
        raise CheckpointError(f"{e}; delete {checkpoint_dir} to train this run afresh") from None
    settings_now = vars(cfg)
    changed = {k: was for k, was in state.get("settings", {}).items() if k in settings_now and
               _differs(settings_now[k], was, is_path=k in ("model", "data_dir", "out_dir"))}
    for key in sorted(FIXED_ON_RESUME & changed.keys()):  # sorted: the same key is reported every time
        raise CheckpointError(f"{resume_from} was written with {key}={changed[key]!r}, this run has {key}="
                              f"{settings_now[key]!r}: resume with the same value, or train afresh in another out_dir "
                              f"(or delete {checkpoint_dir})")
    extended = {"max_steps", "epochs"} & changed.keys()  # a finished run given more steps trains on (restore)
    if "epochs" in extended and "max_steps" not in extended and cfg.max_steps:
        p.log(f"epochs {changed['epochs']!r} -> {cfg.epochs!r} changes nothing: max_steps={cfg.max_steps} decides the "
              "run's length (raise max_steps, or set max_steps=0 for epochs to count)")
        extended = set()
    if state.get("finished") and not extended and (os.path.isfile(results_path) or not cfg.final_eval):
        p.log(f"{cfg.out_dir}: this run has finished (raise max_steps or epochs to train it on from its last step; "
              f"delete {checkpoint_dir} to train again from the start)")
        if os.path.isfile(results_path) and p.master:
            _print_results(results_path)
        return resume_from, state, True
    if changed:
        p.log("resuming with changed settings: " + ", ".join(f"{k} {w!r} -> {settings_now[k]!r}"
                                                           for k, w in changed.items()))
    return resume_from, state, False


def _print_results(path):
    try:
        results = read_json(path)
        print(f"test split (scores {results.get('scale', SCALE).split(':')[0]}):")
        print_table({"zero-shot": results["zero_shot"], "fine-tuned": results["fine_tuned"]})
    except (UserError, KeyError, TypeError, AttributeError, ValueError):
        print(f"({path} could not be read)")


def restore_run(cfg, p, t, run, resume_from, state):
    """The run as its checkpoint left it: the adapter, the optimizer and scaler, the random state, the step and the
    val record; one line for a checkpoint that does not fit this run."""
    try:
        load_adapter(t.model, resume_from)  # checks every tensor against the model
        restore(resume_from, state, t.optimizer, t.scaler, p.device)
    except UserError as e:
        raise CheckpointError(f"{e}; to start this run afresh, delete {os.path.join(cfg.out_dir, 'checkpoint')}") \
            from None
    if state["step"] > t.total_steps:
        raise CheckpointError(f"{resume_from}: step {state['step']} is beyond this run's {t.total_steps} steps "
                              "(max_steps or epochs lowered?); resume with the settings it was written with, or train "
                              "afresh")
    run.step, run.best_cider, run.history = state["step"], state["best_cider"], state["history"]
    p.log(f"resuming from {resume_from} at step {run.step}")


def collection_state(splits):
    """What a checkpoint records of the collection under it: the train and val splits' image counts and a hash of
    their names and captions, in order (not the files' times: touching a file changes nothing)."""
    def digest(items):
        return hashlib.sha1(json.dumps([[i.name, i.captions] for i in items]).encode()).hexdigest()
    return {split: {"images": len(splits[split]), "sha1": digest(splits[split])} for split in ("train", "val")}


def check_same_collection(cfg, resume_from, state, collection):
    """A checkpoint resumes only on the collection it was trained on: with images added, removed or recaptioned,
    the epochs' order and the val images (best_cider's yardstick) are not the stopped run's. One line says what
    changed; a checkpoint from before this check records nothing and is not compared."""
    was = state.get("collection")
    if not isinstance(was, dict) or was == collection:
        return
    changes = [f"{split} {was[split]['images']} -> {now['images']} images" if was[split].get("images") != now["images"]
               else f"{split}: other images or captions" for split, now in collection.items()
               if was.get(split) != now and isinstance(was.get(split), dict)]
    raise CheckpointError(f"{cfg.data_dir}: the collection changed since {resume_from} was written ("
                          f"{', '.join(changes) or 'its record differs'}): resuming would not continue that run "
                          "(another data order, other val images). Put the collection back as it was to resume, or "
                          f"train afresh on it in another out_dir (or delete {os.path.join(cfg.out_dir, 'checkpoint')}"
                          ")")


def stop_on_a_non_finite_loss(cfg, p, loss, step):
    """train.py's check of every step's loss, before the weights change: a non-finite one stops the run in one line
    saying the likely cause and which checkpoint is kept."""
    if math.isfinite(loss):
        return
    kept = find(os.path.join(cfg.out_dir, "checkpoint"))
    kept_step = read_state(kept)["step"] if kept else None
    raise CheckpointError(f"the loss became {loss} at step {step}. "
                          + ("float16 overflowed: use dtype=bfloat16 (on a GPU that has it) or float32. "
                             if p.dtype == torch.float16 else f"Lower learning_rate (now {cfg.learning_rate:g}) or "
                             "check the data. ")
                          + (f"The last good checkpoint ({kept}, step {kept_step}) is kept; fix the setting and run "
                             "again to resume from it." if kept else "No checkpoint was written yet."))
