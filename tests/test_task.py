"""The real CLI, run in a subprocess as a user runs it."""

import glob
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests import images
from tests.conftest import REPO, TINY_MODEL, cli_env, error_line, run_module, unavailable

pytestmark = pytest.mark.slow  # every test here runs the CLI in a subprocess


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """`python -m trainer.task` with no flags, in an empty folder."""
    cwd = tmp_path_factory.mktemp("smoke")
    process = run_module("trainer.task", cwd=str(cwd))
    assert process.returncode == 0, process.stderr[-3000:]
    return process, os.path.join(cwd, "runs", "smoke")


def read_metrics(model_dir):
    with open(os.path.join(model_dir, "metrics.json")) as handle:
        return json.load(handle)


@pytest.mark.compat
def test_smoke_job_learns_and_writes_every_output(smoke):
    process, model_dir = smoke
    metrics = read_metrics(model_dir)
    assert metrics["val_accuracy"] >= 0.8, metrics["history"]
    assert [(row["epoch"], row["phase"]) for row in metrics["history"]] == (
        [(epoch, "head") for epoch in range(1, 6)] + [(epoch, "fine_tune") for epoch in (6, 7, 8)])
    for key in ("val_loss", "epochs_completed", "skipped_images", "resumed_from_epoch",
                "train_images", "val_images", "wall_seconds"):
        assert key in metrics
    assert set(metrics["phase_seconds"]) == {"head", "fine_tune"} and metrics["pass_seconds"] > 0
    assert metrics["resumed_from_epoch"] is None and metrics["epochs_completed"] == 8
    assert (metrics["train_images"], metrics["val_images"], metrics["skipped_images"]) == (360, 90, 0)
    with open(os.path.join(model_dir, "labels.txt")) as handle:
        assert handle.read().split() == ["circles", "squares", "triangles"]
    assert "backbone: small_cnn" in open(os.path.join(model_dir, "config.yaml")).read()
    assert os.path.exists(os.path.join(model_dir, "export", "saved_model.pb"))
    assert glob.glob(os.path.join(model_dir, "checkpoints", "ckpt-*.index"))
    for split in ("train", "validation"):
        assert glob.glob(os.path.join(model_dir, "logs", split, "events.out.tfevents.*"))
    assert "validation accuracy" in process.stdout.splitlines()[-1]
    assert re.search(r"^TensorFlow 2\.\d+\.\d+\S*, Keras 3\.", process.stdout, re.M)
    assert "older than" not in process.stderr
    # What keeps the default job quick: one backbone pass for both phases, no decoding after.
    assert metrics["cached_features"] == ["head", "fine_tune"]
    assert "decoded" not in process.stdout


def test_a_normal_run_shows_only_the_jobs_own_lines(smoke):
    process, _ = smoke
    ours = ("TensorFlow ", "data ", "strategy ", "phase head trains on ",
            "phase fine_tune trains on ", "cached backbone features",
            "epoch ", "predicting the 90 validation images", "exporting the SavedModel to ",
            "writing report.png", "validation accuracy")
    assert [line for line in process.stdout.splitlines() if not line.startswith(ours)] == []
    assert process.stderr == ""


def test_smoke_job_reports_per_class_metrics_and_a_plot(smoke):
    _, model_dir = smoke
    metrics = read_metrics(model_dir)
    confusion = metrics["confusion_matrix"]
    assert len(confusion) == 3 and sum(map(sum, confusion)) == metrics["val_images"]
    assert sum(confusion[i][i] for i in range(3)) / 90 == pytest.approx(metrics["val_accuracy"])
    for name in ("circles", "squares", "triangles"):
        assert set(metrics["per_class"][name]) == {"precision", "recall", "f1", "support"}
        assert metrics["per_class"][name]["support"] == 30
    mistakes = metrics["most_confident_mistakes"]
    assert len(mistakes) <= 10
    assert all(m["true"] != m["predicted"] and 0 < m["probability"] <= 1 for m in mistakes)
    assert [m["probability"] for m in mistakes] == sorted(
        (m["probability"] for m in mistakes), reverse=True)
    with open(os.path.join(model_dir, "report.png"), "rb") as handle:
        png = handle.read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert width >= 1000 and height >= 300


def test_predict_prints_top_classes_from_the_export(smoke, cache_home):
    _, model_dir = smoke
    demo = os.path.join(cache_home, "trainer", "demo_v1", "validation")
    circle = os.path.join(demo, "circles", "circles_0000.jpg")
    square = os.path.join(demo, "squares", "squares_0004.png")
    process = run_module("trainer.predict", f"--model_dir={model_dir}", circle, square)
    assert process.returncode == 0, process.stderr[-2000:]
    header, *rows = [line.split("\t") for line in process.stdout.splitlines()]
    assert header == ["path", "top 1", "top 2", "top 3"]
    assert [row[0] for row in rows] == [circle, square]
    assert rows[0][1].startswith("circles ") and rows[1][1].startswith("squares ")
    assert len(rows[0]) == 1 + 3  # path and the top 3 classes
    probabilities = [float(cell.split()[1]) for cell in rows[0][1:]]
    assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) <= 1.0001


def test_predict_json_on_a_folder(smoke, cache_home):
    _, model_dir = smoke
    folder = os.path.join(cache_home, "trainer", "demo_v1", "validation", "triangles")
    process = run_module("trainer.predict", f"--model_dir={model_dir}/export", "--json",
                         "--top_k=1", folder)
    assert process.returncode == 0, process.stderr[-2000:]
    records = [json.loads(line) for line in process.stdout.splitlines()]
    assert len(records) == 30
    correct = sum(record["top"][0]["class"] == "triangles" for record in records)
    assert correct >= 24


def test_predict_is_quiet_refuses_huge_images_and_stops_quietly_when_the_reader_does(
        smoke, cache_home, tmp_path):
    _, model_dir = smoke
    folder = os.path.join(cache_home, "trainer", "demo_v1", "validation")
    circle = os.path.join(folder, "circles", "circles_0000.jpg")
    huge = run_module("trainer.predict", f"--model_dir={model_dir}", "--max_image_pixels=100",
                      circle)
    assert huge.returncode == 2
    assert huge.stdout.splitlines()[1] == (f"{circle}\terror: more than "
                                           "--max_image_pixels=100 pixels")
    assert error_line(huge) == "error: 1 file(s) could not be classified (see their rows)"
    # No TensorFlow start-up chatter: the error line is all there is.
    assert huge.stderr.splitlines() == [error_line(huge)]
    piped = subprocess.run(
        f"{sys.executable} -m trainer.predict --model_dir={model_dir} --json {folder} | head -2",
        shell=True, capture_output=True, text=True, env=cli_env(), cwd=REPO, timeout=300)
    assert len(piped.stdout.splitlines()) == 2
    assert piped.stderr == ""


def test_finished_run_rerun_exits_at_once(smoke):
    _, model_dir = smoke
    checkpoints = sorted(os.listdir(os.path.join(model_dir, "checkpoints")))
    process = run_module("trainer.task", f"--model_dir={model_dir}")
    assert process.returncode == 0, process.stderr[-2000:]
    # The only line: no strategy was created, no data scanned, no model built.
    assert process.stdout.splitlines() == [
        f"run in {model_dir} is already complete; nothing to do (use --overwrite to train again)"]
    assert sorted(os.listdir(os.path.join(model_dir, "checkpoints"))) == checkpoints


def test_different_config_in_the_same_model_dir_is_refused(smoke):
    _, model_dir = smoke
    before = open(os.path.join(model_dir, "metrics.json")).read()
    process = run_module("trainer.task", f"--model_dir={model_dir}", "--epochs=2")
    assert process.returncode == 2
    assert "holds a run with a different config (epochs: 5 -> 2)" in error_line(process)
    assert "--overwrite" in error_line(process)
    assert open(os.path.join(model_dir, "metrics.json")).read() == before


@pytest.mark.parametrize("flag, message", [
    ("--backbone=mobilenet_v3", "unknown --backbone=mobilenet_v3: choose one of"),
    ("--image_size=7", "--image_size=7 is outside what small_cnn can train on here"),
])
def test_flag_checks_come_before_the_model_dir_comparison(smoke, flag, message):
    _, model_dir = smoke
    process = run_module("trainer.task", f"--model_dir={model_dir}", flag)
    assert process.returncode == 2
    assert message in error_line(process)


def _latest_checkpoint_step(directory):
    """The step of the checkpoint a restart would restore (the `checkpoint` state file)."""
    try:
        with open(os.path.join(directory, "checkpoint")) as handle:
            return int(re.search(r'model_checkpoint_path: "ckpt-(\d+)"', handle.read()).group(1))
    except (OSError, AttributeError):
        return None


def _start_and_stop(args, model_dir, ready, sig):
    """Starts the job, waits until ready(latest checkpoint step), sends the signal; returns
    the process and its stdout and stderr."""
    job = _start_when(args, model_dir, ready)
    job.send_signal(sig)
    output, errors = job.communicate(timeout=60)
    return job, output, errors


def _start_when(args, model_dir, ready):
    """The job, started, once ready(latest checkpoint step)."""
    job = subprocess.Popen([sys.executable, "-m", "trainer.task", *args], env=cli_env(), cwd=REPO,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not ready(_latest_checkpoint_step(os.path.join(model_dir, "checkpoints"))):
        assert job.poll() is None and time.time() < deadline, "job ended before it was stopped"
        time.sleep(0.02)
    return job


def _resume_and_check(args, model_dir, first_output, step):
    """Reruns the command; asserts it resumed at `step` and redid no finished epoch."""
    assert not os.path.exists(os.path.join(model_dir, "metrics.json"))
    process = run_module("trainer.task", *args)
    assert process.returncode == 0, process.stderr[-2000:]
    epoch = step // 12
    into = f"{step % 12} of its 12 steps done" if step % 12 else "from its start"
    assert f"resuming at step {step} of 384: epoch {epoch + 1}/32, {into}" in process.stdout
    before = [int(m) for m in re.findall(r"^epoch (\d+)/32", first_output, re.M)]
    after = [int(m) for m in re.findall(r"^epoch (\d+)/32", process.stdout, re.M)]
    assert before == list(range(1, len(before) + 1)) and len(before) <= epoch
    assert after == list(range(epoch + 1, 33))
    metrics = read_metrics(model_dir)
    assert [row["epoch"] for row in metrics["history"]] == list(range(1, 33))
    assert (metrics["resumed_from_epoch"], metrics["resumed_from_step"]) == (epoch, step)


def _long_job(tmp_path, *extra):
    model_dir = str(tmp_path / "run")
    return model_dir, [f"--model_dir={model_dir}", "--data=demo", *TINY_MODEL,
                       "--image_size=48", "--epochs=30",
                       "--fine_tune_epochs=2", "--learning_rate=1e-2", *extra]


def test_sigkill_mid_epoch_resumes_at_the_last_step_checkpoint(tmp_path):
    model_dir, args = _long_job(tmp_path, "--checkpoint_every_steps=5")
    # 12 steps an epoch: wait for a checkpoint in the middle of epoch 3 or later.
    job, output, _ = _start_and_stop(args, model_dir,
                                     lambda step: step and step >= 25 and step % 12,
                                     signal.SIGKILL)
    assert job.returncode == -signal.SIGKILL
    # The kill may land after a checkpoint's files are written and before the state file names
    # it: a restart restores the newest one whose files are all there.
    names = os.listdir(os.path.join(model_dir, "checkpoints"))
    step = max(int(name[len("ckpt-"):-len(".index")]) for name in names
               if name.endswith(".index") and name.replace(".index", ".data-00000-of-00001")
               in names)
    assert step >= 25 and (step % 5 == 0 or step % 12 == 0)
    _resume_and_check(args, model_dir, output, step)


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 42), (signal.SIGINT, 130)])
def test_sigterm_or_ctrl_c_checkpoints_the_current_step_and_resumes_there(tmp_path, sig, code):
    model_dir, args = _long_job(tmp_path)
    job, output, errors = _start_and_stop(args, model_dir, lambda step: step and step >= 36, sig)
    assert job.returncode == code and "Traceback" not in errors, errors
    stopped = int(re.search(rf"stopped by {sig.name} at step (\d+): checkpoint saved",
                            output).group(1))
    assert _latest_checkpoint_step(os.path.join(model_dir, "checkpoints")) == stopped
    _resume_and_check(args, model_dir, output, stopped)


def test_a_second_ctrl_c_stops_at_once_with_one_line(tmp_path):
    """The second Ctrl-C goes when the job says it heard the first. Whether it lands before
    the job stops at the step (the usual case) or while it exits, one line and 130 follow;
    test_train's test_a_second_ctrl_c_raises_at_once pins the handler itself."""
    model_dir, args = _long_job(tmp_path)
    job = _start_when(args, model_dir, lambda step: step and step >= 36)
    job.send_signal(signal.SIGINT)
    heard = ""
    for line in job.stderr:
        heard += line
        if line.startswith("SIGINT: stopping at the next step or batch, keeping the work done; "
                           "Ctrl-C again to stop at once"):
            job.send_signal(signal.SIGINT)
            break
    output, errors = job.communicate(timeout=60)
    errors = heard + errors
    # Exit 130, or killed by SIGINT when it came while Python was already exiting: a shell
    # reports both as 130.
    assert job.returncode in (130, -signal.SIGINT) and "Traceback" not in errors, errors
    lines = [line for line in (output + errors).splitlines() if line.startswith("stopped by")]
    assert len(lines) == 1, output + errors


@pytest.mark.parametrize("args, message", [
    (["--data=/no/such/folder"], "--data=/no/such/folder does not exist"),
    (["--data=demo", "--backbone=vgg99"], "unknown --backbone=vgg99"),
    (["--data=demo", "--epochs=many"], "flag --epochs=many"),
    (["--data=demo", "--strategy=quantum"], "--strategy='quantum' is not one of"),
    (["--data=demo", "--nonsense=1"], "Unknown command line flag 'nonsense'"),
    (["--data=demo", "--backbone=small_cnn", "--base_weights=/no/weights.h5"],
     "--base_weights=/no/weights.h5 not found"),
    (["--data=demo", "--strategy=gpu"], "--strategy=gpu but TensorFlow sees no GPU"),
    (["--data=demo", "--strategy=tpu"], "--strategy=tpu needs a TPU"),
    (["--fine_tune_at=13"], "--fine_tune_at=13 but small_cnn has only 13 layers"),
    (["--data=demo", "--seed=-1"], "--seed=-1 must be from 0 to 4294967295"),
])
def test_user_errors_are_one_line(tmp_path, args, message):
    model_dir = tmp_path / "run"
    process = run_module("trainer.task", f"--model_dir={model_dir}", *args, timeout=120)
    assert process.returncode == 2
    assert message in error_line(process)
    assert not model_dir.exists()  # nothing written, not even an empty folder


def test_unreadable_images_are_counted_in_metrics(tmp_path):
    root = images.folder(str(tmp_path / "data"), per_class=8, validation_per_class=3, size=32)
    images.save_corrupt(os.path.join(root, "train", "red", "cut.jpg"), "truncated")
    images.save_corrupt(os.path.join(root, "validation", "green", "empty.jpg"), "empty")
    model_dir = str(tmp_path / "run")
    process = run_module("trainer.task", f"--data={root}", f"--model_dir={model_dir}",
                         *TINY_MODEL, "--image_size=32",
                         "--epochs=1", "--fine_tune_epochs=1", "--batch_size=4")
    assert process.returncode == 0, process.stderr[-2000:]
    metrics = read_metrics(model_dir)
    assert metrics["skipped_images"] == 2
    assert sorted(os.path.basename(path) for path in metrics["skipped_examples"]) == [
        "cut.jpg", "empty.jpg"]
    assert (metrics["train_images"], metrics["val_images"]) == (16, 6)


def test_a_rerun_on_changed_data_stops_instead_of_resuming(tmp_path):
    root = images.folder(str(tmp_path / "data"), per_class=8, validation_per_class=3, size=32)
    model_dir = str(tmp_path / "run")
    args = [f"--data={root}", f"--model_dir={model_dir}", *TINY_MODEL, "--image_size=32",
            "--epochs=2", "--fine_tune_epochs=1", "--batch_size=4"]  # 4 steps an epoch
    assert run_module("trainer.task", *args).returncode == 0
    # As if stopped after epoch 2: its checkpoint is the newest left; then images are added.
    checkpoints = os.path.join(model_dir, "checkpoints")
    for name in os.listdir(checkpoints):
        if name.startswith("ckpt-12.") or name == "checkpoint":
            os.remove(os.path.join(checkpoints, name))
    os.remove(os.path.join(model_dir, "metrics.json"))
    for index in range(4):
        images.save(os.path.join(root, "train", "red", f"added_{index}.jpg"), size=32, seed=index)
    process = run_module("trainer.task", *args)
    assert process.returncode == 2
    assert error_line(process).startswith(
        f"error: the data in --data={root} changed since the run in {model_dir} started "
        "(train: red 8 -> 12): a run resumes only on the data it started with")
    assert "epoch " not in process.stdout  # nothing trained, no history row again
    assert not os.path.exists(os.path.join(model_dir, "metrics.json"))
    assert [name for name in os.listdir(checkpoints) if name.endswith(".index")] == [
        "ckpt-8.index"]


def test_overwrite_replaces_a_finished_run_with_another_config(tmp_path):
    root = images.folder(str(tmp_path / "data"), per_class=8, validation_per_class=3, size=32)
    model_dir = str(tmp_path / "run")
    args = [f"--data={root}", f"--model_dir={model_dir}", *TINY_MODEL, "--image_size=32",
            "--fine_tune_epochs=1", "--batch_size=4"]  # 4 steps an epoch
    assert run_module("trainer.task", *args, "--epochs=3").returncode == 0
    refused = run_module("trainer.task", *args, "--epochs=1")
    assert refused.returncode == 2 and "--overwrite" in error_line(refused)
    process = run_module("trainer.task", *args, "--epochs=1", "--overwrite")
    assert process.returncode == 0, process.stderr[-2000:]
    assert "resuming" not in process.stdout  # started afresh, not from the old checkpoints
    metrics = read_metrics(model_dir)
    assert [row["epoch"] for row in metrics["history"]] == [1, 2]
    assert sorted(name for name in os.listdir(os.path.join(model_dir, "checkpoints"))
                  if name.endswith(".index")) == ["ckpt-4.index", "ckpt-8.index"]


def test_a_vertex_job_resumes_from_aip_checkpoint_dir(tmp_path):
    root = images.folder(str(tmp_path / "data"), per_class=8, validation_per_class=3, size=32)
    checkpoints = str(tmp_path / "vertex" / "checkpoints")
    env = cli_env(AIP_MODEL_DIR=str(tmp_path / "vertex" / "model"),
                  AIP_CHECKPOINT_DIR=checkpoints)
    args = [f"--data={root}", *TINY_MODEL, "--image_size=32", "--epochs=2",
            "--fine_tune_epochs=1", "--batch_size=4"]  # 4 steps an epoch
    assert run_module("trainer.task", *args, env=env).returncode == 0
    # As if the job was restarted after epoch 2: its checkpoint is the newest left.
    for name in os.listdir(checkpoints):
        if name.startswith("ckpt-12.") or name == "checkpoint":
            os.remove(os.path.join(checkpoints, name))
    os.remove(tmp_path / "vertex" / "model" / "metrics.json")
    process = run_module("trainer.task", *args, env=env)
    assert process.returncode == 0, process.stderr[-2000:]
    assert "resuming at step 8 of 12: epoch 3/3, from its start" in process.stdout
    assert not os.path.exists(tmp_path / "vertex" / "model" / "checkpoints")
    assert read_metrics(str(tmp_path / "vertex" / "model"))["resumed_from_step"] == 8


def test_exploding_loss_stops_without_overwriting_the_good_checkpoint(tmp_path):
    model_dir = str(tmp_path / "run")
    process = run_module("trainer.task", f"--model_dir={model_dir}", "--data=demo",
                         *TINY_MODEL, "--image_size=32",
                         "--epochs=2", "--fine_tune_epochs=2", "--learning_rate=1e-2",
                         "--fine_tune_learning_rate=1e30")
    assert process.returncode == 2
    assert re.search(r"training loss became (nan|inf) by step 2\d .*phase fine_tune.*last good "
                     r"checkpoint was kept", error_line(process))
    assert _latest_checkpoint_step(os.path.join(model_dir, "checkpoints")) == 24


@pytest.mark.parametrize("precision, policy", [("fp16", "mixed_float16"),
                                               ("bf16", "mixed_bfloat16")])
def test_mixed_precision_trains_and_exports(tmp_path, precision, policy):
    model_dir = str(tmp_path / "run")
    process = run_module("trainer.task", f"--model_dir={model_dir}", "--data=demo",
                         *TINY_MODEL, "--learning_rate=1e-2",
                         f"--mixed_precision={precision}", "--image_size=32", "--epochs=5",
                         "--fine_tune_epochs=1", "--steps_per_execution=4")
    assert process.returncode == 0, process.stderr[-2000:]
    assert f"{policy}, 4 step(s) per execution" in process.stdout
    metrics = read_metrics(model_dir)
    # Three classes: chance is 0.33; these settings reach 0.83 (bf16) and 0.84 (fp16) here.
    assert metrics["global_steps"] == 72 and metrics["val_accuracy"] >= 0.7


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MB filesystem (tmpfs), or a skip where this user may not mount one."""
    mount_point = tmp_path / "small_disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode:
        unavailable(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=True)


@pytest.mark.parametrize("where", ["under a file", "at a file", "read-only"])
def test_a_model_dir_that_cannot_be_written_is_one_line(tmp_path, request, where):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    if where == "read-only":  # the only one that needs a file system of its own
        small_disk = request.getfixturevalue("small_disk")
        subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    model_dir = {"under a file": a_file / "run", "at a file": a_file,
                 "read-only": tmp_path / "small_disk" / "run"}[where]
    process = run_module("trainer.task", f"--model_dir={model_dir}", "--data=demo", *TINY_MODEL,
                         "--image_size=32", "--epochs=1", "--fine_tune_epochs=0")
    assert process.returncode == 2
    assert f"cannot write to --model_dir={model_dir}" in error_line(process)
    assert a_file.read_text() == "not a folder"


def test_a_full_disk_stops_with_one_line_and_the_run_resumes_once_there_is_room(small_disk):
    model_dir = small_disk / "run"
    args = [f"--model_dir={model_dir}", "--data=demo", *TINY_MODEL, "--image_size=32",
            "--epochs=2", "--fine_tune_epochs=1"]
    process = run_module("trainer.task", *args)
    assert process.returncode == 2
    assert "a disk is full" in error_line(process) and "run the same command" in error_line(process)
    assert (model_dir / "config.yaml").exists()
    subprocess.run(["mount", "-o", "remount,size=50m", str(small_disk)], check=True)
    process = run_module("trainer.task", *args)
    assert process.returncode == 0, process.stderr[-2000:]
    assert read_metrics(model_dir)["epochs_completed"] == 3
