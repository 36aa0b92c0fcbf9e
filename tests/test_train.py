"""train.py as a user runs it: the demo end to end, exact resume after a crash, DDP, the NaN guard, settings errors."""
import json
import os
import re
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, run_script

SHORT = ["config/demo.py", "--max_steps=8", "--checkpoint_interval=2", "--eval_interval=0", "--final_eval=False",
         "--lora_dropout=0.1"]  # dropout on: a resumed run must also restore the random state


def adapter(out_dir):
    return load_file(os.path.join(out_dir, "adapter", "adapter_model.safetensors"))


def test_demo_end_to_end(demo_run):
    out_dir, result = demo_run
    results = json.load(open(os.path.join(out_dir, "results.json")))
    for name in ("zero_shot", "fine_tuned"):
        assert set(results[name]) >= {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"}
    assert results["fine_tuned"]["CIDEr"] >= 1.0
    assert results["fine_tuned"]["CIDEr"] >= 2 * results["zero_shot"]["CIDEr"]
    assert "zero-shot" in result.stdout and "fine-tuned" in result.stdout and "CIDEr" in result.stdout
    records = [json.loads(line) for line in open(os.path.join(out_dir, "log.jsonl"))]
    steps = [r for r in records if "loss" in r]
    assert steps and {"step", "loss", "lr", "ms_per_step", "captions_per_s"} <= set(steps[0])
    assert steps[-1]["loss"] < steps[0]["loss"]
    val = [r["val_CIDEr"] for r in records if "val_CIDEr" in r]
    assert max(val) > val[0]  # training improves val CIDEr; the best adapter is the one kept
    assert os.path.isfile(os.path.join(out_dir, "adapter", "adapter_config.json"))


def test_a_finished_run_is_not_trained_again(demo_run):
    out_dir, _ = demo_run
    before = adapter(out_dir)
    result = run_script("train.py", "config/demo.py", f"--out_dir={out_dir}")
    assert result.returncode == 0 and "has finished" in result.stdout
    assert not any(line.startswith("step ") for line in result.stdout.splitlines())
    after = adapter(out_dir)
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.fixture(scope="module")
def uninterrupted(demo_world, tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("uninterrupted"))
    result = run_script("train.py", *SHORT, f"--out_dir={out_dir}")
    assert result.returncode == 0, result.stderr[-2000:]
    return out_dir


CRASHING_RUN = """
import os, sys
sys.path.insert(0, {root!r})
import train
real_save, calls = train.save_checkpoint, []

def save_then_die(path, *args, **kwargs):
    calls.append(path)
    if len(calls) < 2:
        return real_save(path, *args, **kwargs)
    if {where!r} == "writing":       # half of the new checkpoint written, then kill -9
        os.makedirs(path + ".tmp", exist_ok=True)
        open(os.path.join(path + ".tmp", "adapter_model.safetensors"), "wb").write(b"half a file")
    else:                            # killed between the two renames: only checkpoint.old is left
        real_save(path + ".tmp_full", *args, **kwargs)
        os.replace(path, path + ".old")
        os.replace(path + ".tmp_full", path + ".tmp")
    os._exit(137)

train.save_checkpoint = save_then_die
sys.argv = ["train.py"] + {args!r}
train.main()
"""


@pytest.mark.parametrize("where", ["writing", "renaming"])
def test_resume_after_a_kill_during_a_save_gives_the_identical_adapter(uninterrupted, tmp_path, where):
    args = SHORT + [f"--out_dir={tmp_path}"]
    crashed = run_script("-c", CRASHING_RUN.format(root=ROOT, where=where, args=args))
    assert crashed.returncode == 137
    assert not os.path.isdir(tmp_path / "adapter")  # it really died before finishing
    resumed = run_script("train.py", *args)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout and "at step 2" in resumed.stdout
    expected, got = adapter(uninterrupted), adapter(tmp_path)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)  # bit-identical on CPU


SLOW_STEPS = """
import runpy, signal, sys, time, torch
signal.signal(signal.SIGINT, signal.default_int_handler)  # a shell's background job starts with Ctrl-C ignored
real_step = torch.optim.AdamW.step

def slow_step(self, *args, **kwargs):  # 0.3 s a step: Ctrl-C lands mid-run however busy the machine is
    result = real_step(self, *args, **kwargs)
    time.sleep(0.3)
    return result

torch.optim.AdamW.step = slow_step
sys.argv = ["train.py"] + {args!r}
runpy.run_path("train.py", run_name="__main__")  # train.py as a script: its own Ctrl-C handling
"""


def test_ctrl_c_says_how_to_resume_and_the_same_settings_end_as_an_uninterrupted_run(uninterrupted, tmp_path):
    import signal
    import subprocess
    args = SHORT + [f"--out_dir={tmp_path}", "--log_interval=1"]
    run = subprocess.Popen([sys.executable, "-c", SLOW_STEPS.format(args=args)], cwd=ROOT, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in run.stdout:
        if line.startswith("step 4 "):  # checkpoint 2 is written; 4 more steps to go
            run.send_signal(signal.SIGINT)
            break
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == 130 and "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1].startswith("interrupted: run the same command again to resume from")
    changed = run_script("train.py", *args, "--batch_images=4")  # the data order would no longer be the run's
    assert changed.returncode == 1 and "Traceback" not in changed.stderr
    assert "batch_images=8, this run has batch_images=4" in changed.stderr.strip().splitlines()[-1]
    resumed = run_script("train.py", *args)
    assert resumed.returncode == 0 and "resuming from" in resumed.stdout, resumed.stderr[-2000:]
    expected, got = adapter(uninterrupted), adapter(tmp_path)
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_two_processes_match_one_with_the_same_global_batch(demo_world, tmp_path):
    common = ["config/demo.py", "--max_steps=3", "--batch_images=4", "--eval_interval=0", "--final_eval=False",
              "--lora_dropout=0.0"]
    single = run_script("train.py", *common, "--grad_accum=2", f"--out_dir={tmp_path / 'one'}")
    assert single.returncode == 0, single.stderr[-2000:]
    ddp = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", *common,
                     "--grad_accum=1", f"--out_dir={tmp_path / 'two'}", env={"OMP_NUM_THREADS": "1"})
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one, two = adapter(tmp_path / "one"), adapter(tmp_path / "two")
    assert any(t.abs().max() > 0 for k, t in one.items() if "lora_B" in k)  # it trained
    for k in one:
        assert torch.allclose(one[k], two[k], atol=1e-6, rtol=1e-4), k
    assert sum(line.startswith("step 3 ") for line in ddp.stdout.splitlines()) == 1  # only rank 0 logs


NAN_AT_STEP_3 = """
import sys
sys.path.insert(0, {root!r})
import model, train
real_loss, calls = model.grouped_caption_loss, []

def nan_at_step_3(*args, **kwargs):
    loss, tokens = real_loss(*args, **kwargs)
    calls.append(1)
    return (loss * float("nan") if len(calls) == 4 else loss), tokens

model.grouped_caption_loss = nan_at_step_3
sys.argv = ["train.py"] + {args!r}
train.main()
"""


def test_a_non_finite_loss_stops_and_keeps_a_checkpoint_whose_loss_was_finite(demo_world, tmp_path):
    args = ["config/demo.py", "--max_steps=6", "--checkpoint_interval=1", "--eval_interval=0", "--final_eval=False",
            f"--out_dir={tmp_path}"]
    result = run_script("-c", NAN_AT_STEP_3.format(root=ROOT, args=args))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "the loss became nan at step 3" in result.stderr and "step 2) is kept" in result.stderr
    state = json.load(open(tmp_path / "checkpoint" / "state.json"))
    assert state["step"] == 2 and not state["finished"]  # not step 3: those weights are the ones that gave the NaN
    fixed = run_script("train.py", *args, "--learning_rate=0.005")
    assert fixed.returncode == 0, fixed.stderr[-2000:]  # as the message says: fix the setting, run again, resume
    assert "resuming with changed settings: learning_rate 0.01 -> 0.005" in fixed.stdout
    assert "at step 2" in fixed.stdout


def test_a_diverging_learning_rate_is_stopped_with_one_line(demo_world, tmp_path):
    result = run_script("train.py", "config/demo.py", "--learning_rate=1e30", "--warmup_steps=0", "--max_steps=6",
                        "--eval_interval=0", "--final_eval=False", f"--out_dir={tmp_path}")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: the loss became")
    assert "Lower learning_rate (now 1e+30)" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--lerning_rate=1e-3"], "unknown setting 'lerning_rate'"),
    (["--max_steps=ten"], "max_steps must be int"),
    (["--final_eval=1"], "final_eval must be bool"),
    (["--learning_rate"], "write settings as --key=value"),
    (["config/missing.py"], "cannot read config file"),
    (["--batch_images=0"], "batch_images=0: must be at least 1"),
    (["--checkpoint_interval=0"], "checkpoint_interval=0: must be at least 1"),
    (["--lora_dropout=1.5"], "lora_dropout=1.5: must be between 0.0 and 0.99"),
    (["--learning_rate=-1"], "learning_rate=-1.0: must be at least 0.0"),
    (["--lora_targets=[]"], "lora_targets=[]: must be a non-empty list"),
    (["--lora_targets=[1,2]"], "lora_targets=[1, 2]: must be a non-empty list"),
    (["--device=foo"], "device='foo': use auto, cpu, cuda or cuda:N"),
    pytest.param(["--device=cuda"], "device='cuda': torch sees no CUDA GPU here",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")),
    (["--seed=99999999999999999999"], "seed=99999999999999999999: must be between 0 and 4294967295"),
    (["--out_dir="], "out_dir is empty"),
    (["--out_dir=README.md"], "out_dir='README.md' is a file, not a folder"),
])
def test_a_settings_mistake_is_refused_before_any_work(args, message):
    import train
    with pytest.raises(train.SettingsError, match=re.escape(message)):
        train.apply_settings(args, train.default_settings())


def test_a_settings_mistake_is_one_line_on_stderr():
    result = run_script("train.py", "--lerning_rate=1e-3")
    assert result.returncode == 1 and result.stderr == (
        "error: --lerning_rate=1e-3: unknown setting 'lerning_rate' (settings are listed at the top of train.py)\n")


def test_a_config_file_may_only_assign_literals(tmp_path):
    config = tmp_path / "bad.py"
    config.write_text("import os\nout_dir = os.getcwd()\n")
    result = run_script("train.py", str(config))
    assert result.returncode == 1 and "bad.py:1: only 'key = value' lines" in result.stderr


def test_a_missing_model_says_what_to_download(tmp_path):
    result = run_script("train.py", f"--model={tmp_path / 'no-such-model'}", "--data_dir=data/demo/flickr8k")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "hf download Salesforce/blip2-flan-t5-xl" in result.stderr and "config/demo.py" in result.stderr


def test_missing_data_says_where_to_put_it(tmp_path):
    result = run_script("train.py", f"--data_dir={tmp_path / 'flickr8k'}")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "no such directory" in result.stderr and "config/demo.py" in result.stderr


def test_without_val_images_the_final_adapter_is_kept(demo_world, tmp_path):
    import shutil
    data = tmp_path / "flickr8k"
    shutil.copytree(demo_world[0], data)
    (data / "Flickr_8k.devImages.txt").write_text("")  # a dataset of one's own, with no val split
    result = run_script("train.py", "config/demo.py", f"--data_dir={data}", f"--out_dir={tmp_path / 'out'}",
                        "--max_steps=2", "--eval_interval=1", "--final_eval=False")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "no val images" in result.stdout
    assert os.path.isfile(tmp_path / "out" / "adapter" / "adapter_model.safetensors")


def test_torch_compile_trains_like_eager(demo_world, tmp_path):
    """torch_compile=True (captions padded to a fixed length, the loss compiled) follows the eager run."""
    common = ["config/demo.py", "--max_steps=3", "--eval_interval=0", "--final_eval=False", "--lora_dropout=0.0",
              "--log_interval=1"]
    eager = run_script("train.py", *common, f"--out_dir={tmp_path / 'eager'}")
    compiled = run_script("train.py", *common, "--torch_compile=True", f"--out_dir={tmp_path / 'compiled'}",
                          timeout=600)
    assert eager.returncode == 0 and compiled.returncode == 0, compiled.stderr[-3000:]
    losses = [[json.loads(line)["loss"] for line in open(tmp_path / run / "log.jsonl")] for run in ("eager", "compiled")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
    a, b = adapter(tmp_path / "eager"), adapter(tmp_path / "compiled")
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)


def test_missing_java_is_said_before_training(demo_world, tmp_path):
    bin_dir = tmp_path / "bin"  # a PATH with python but no java
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    result = run_script("train.py", "config/demo.py", f"--out_dir={tmp_path / 'out'}",
                        env={"PATH": str(bin_dir)})
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "java is not installed" in result.stderr
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
    result = run_script("train.py", *SHORT, f"--out_dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-2000:]
    rebuilt = "cannot be used (vision.bin has" in result.stdout
    assert rebuilt == (cache == "found truncated")
    expected, got = adapter(uninterrupted), adapter(tmp_path)
    assert all(torch.equal(expected[k], got[k]) for k in expected)


@pytest.fixture
def checkpoint_copy(uninterrupted, tmp_path):
    import shutil
    return shutil.copytree(os.path.join(uninterrupted, "checkpoint"), tmp_path / "checkpoint")


def optimizer_for(checkpoint):
    """An AdamW over as many tensors as the checkpoint's adapter has: what restore() loads into."""
    count = len(load_file(os.path.join(checkpoint, "adapter_model.safetensors")))
    return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1)) for _ in range(count)])


class Payload:
    def __reduce__(self):
        return (print, ("this ran while loading",))


@pytest.mark.parametrize("damage, message", [
    (lambda c: (c / "state.json").write_text("{garbage"), "state.json: unreadable (JSONDecodeError)"),
    (lambda c: (c / "state.json").write_text(json.dumps({k: v for k, v in json.load(open(c / "state.json")).items()
                                                         if k != "scaler"})), "no valid 'scaler' entry"),
    (lambda c: os.truncate(c / "optimizer.pt", 100), "optimizer.pt: unreadable"),
    (lambda c: torch.save({"state": Payload(), "param_groups": []}, c / "optimizer.pt"),
     "optimizer.pt: holds more than tensors"),
    (lambda c: os.remove(c / "rng.safetensors"), "rng.safetensors: unreadable (FileNotFoundError"),
])
def test_a_damaged_checkpoint_is_one_line_naming_the_file(checkpoint_copy, damage, message, capfd):
    import train
    damage(checkpoint_copy)
    with pytest.raises(train.CheckpointError, match=re.escape(message)) as error:
        state = train.read_state(str(checkpoint_copy))
        train.restore(str(checkpoint_copy), state, optimizer_for(checkpoint_copy),
                      torch.amp.GradScaler("cpu", enabled=False), "cpu")
    assert "\n" not in str(error.value) and "weights_only" not in str(error.value)
    assert "this ran while loading" not in capfd.readouterr().out  # the pickled code was never run


def test_a_damaged_checkpoint_stops_train_py_with_one_line(uninterrupted, tmp_path):
    import shutil
    shutil.copytree(os.path.join(uninterrupted, "checkpoint"), tmp_path / "checkpoint")
    (tmp_path / "checkpoint" / "state.json").write_bytes(b"\xff\xfe not json")
    result = run_script("train.py", *SHORT, f"--out_dir={tmp_path}")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'checkpoint' / 'state.json'}: unreadable (UnicodeDecodeError); "
        f"delete {tmp_path / 'checkpoint'} to train this run afresh"]


def test_a_finished_run_with_other_data_is_refused_not_reported_as_finished(demo_run, tmp_path):
    out_dir, _ = demo_run
    result = run_script("train.py", "config/demo.py", f"--out_dir={out_dir}", f"--data_dir={tmp_path}")
    assert result.returncode == 1 and "has finished" not in result.stdout
    assert "was written with data_dir='data/demo/flickr8k'" in result.stderr


def test_a_second_run_into_the_same_out_dir_is_refused_while_the_first_holds_it(tmp_path):
    import fcntl
    with open(tmp_path / ".lock", "w") as held:
        held.write("4242\n")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running train.py holds it
        result = run_script("train.py", "config/demo.py", f"--out_dir={tmp_path}")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (f"error: {tmp_path} is in use by another train.py (process 4242): wait for it "
                                     "to end, or give this run another out_dir")


def test_a_config_file_that_is_not_utf8_is_one_line(tmp_path):
    config = tmp_path / "latin1.py"
    config.write_bytes('prompt = "une photo de caf\xe9"\n'.encode("latin-1"))
    result = run_script("train.py", str(config))
    assert result.returncode == 1 and result.stderr.strip() == (
        f"error: {config}: not UTF-8 text (byte 26); save the config file as UTF-8")


def test_help_lists_every_setting_with_its_default_and_comment():
    import train
    result = run_script("train.py", "--help")
    assert result.returncode == 0 and result.stderr == ""
    for name, default in train.default_settings().items():
        assert f"  --{name}={default!r}" in result.stdout, name
    assert "  --lora_r=8" in result.stdout and "the rank r of each update B @ A" in result.stdout
    assert run_script("train.py", "-h").stdout == result.stdout


def test_the_demo_writes_a_report_with_both_captions_worst_first(demo_run):
    out_dir, result = demo_run
    page = open(os.path.join(out_dir, "report.html")).read()
    assert f"report: {os.path.join(out_dir, 'report.html')}" in result.stdout
    assert page.count("<img src='data:image/jpeg;base64,") == 50 and page.count("zero-shot: ") == 50
    ciders = [float(c) for c in re.findall(r"<td class='[a-z]*'>([0-9.]+)</td>", page)]
    assert len(ciders) == 50 and ciders == sorted(ciders)
