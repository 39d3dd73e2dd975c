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
from tests.conftest import REPO, cli_env, error_line, run_module


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """`python -m trainer.task` with no flags, in an empty folder."""
    cwd = tmp_path_factory.mktemp("smoke")
    began = time.time()
    process = run_module("trainer.task", cwd=str(cwd))
    assert process.returncode == 0, process.stderr[-3000:]
    return process, os.path.join(cwd, "runs", "smoke"), time.time() - began


def read_metrics(model_dir):
    with open(os.path.join(model_dir, "metrics.json")) as handle:
        return json.load(handle)


def test_smoke_job_learns_and_writes_every_output(smoke):
    process, model_dir, seconds = smoke
    metrics = read_metrics(model_dir)
    assert metrics["val_accuracy"] >= 0.8, metrics["history"]
    assert [(row["epoch"], row["phase"]) for row in metrics["history"]] == (
        [(epoch, "head") for epoch in range(1, 6)] + [(epoch, "fine_tune") for epoch in (6, 7, 8)])
    for key in ("val_loss", "epochs_completed", "skipped_images", "resumed_from_epoch",
                "train_images", "val_images", "wall_seconds"):
        assert key in metrics
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
    assert seconds < 180


def test_predict_prints_top_classes_from_the_export(smoke, cache_home):
    _, model_dir, _ = smoke
    demo = os.path.join(cache_home, "trainer", "demo_v1", "validation")
    circle = os.path.join(demo, "circles", "circles_0000.jpg")
    square = os.path.join(demo, "squares", "squares_0004.png")
    process = run_module("trainer.predict", f"--model_dir={model_dir}", circle, square)
    assert process.returncode == 0, process.stderr[-2000:]
    rows = [line.split("\t") for line in process.stdout.splitlines()]
    assert [row[0] for row in rows] == [circle, square]
    assert rows[0][1].startswith("circles ") and rows[1][1].startswith("squares ")
    assert len(rows[0]) == 1 + 3  # path and the top 3 classes
    probabilities = [float(cell.split()[1]) for cell in rows[0][1:]]
    assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) <= 1.0001


def test_predict_json_on_a_folder(smoke, cache_home):
    _, model_dir, _ = smoke
    folder = os.path.join(cache_home, "trainer", "demo_v1", "validation", "triangles")
    process = run_module("trainer.predict", f"--model_dir={model_dir}/export", "--json",
                         "--top_k=1", folder)
    assert process.returncode == 0, process.stderr[-2000:]
    records = [json.loads(line) for line in process.stdout.splitlines()]
    assert len(records) == 30
    correct = sum(record["top"][0]["class"] == "triangles" for record in records)
    assert correct >= 24


def test_finished_run_rerun_exits_at_once(smoke):
    _, model_dir, _ = smoke
    checkpoints = sorted(os.listdir(os.path.join(model_dir, "checkpoints")))
    began = time.time()
    process = run_module("trainer.task", f"--model_dir={model_dir}")
    assert process.returncode == 0, process.stderr[-2000:]
    assert "already complete" in process.stdout
    assert time.time() - began < 30
    assert sorted(os.listdir(os.path.join(model_dir, "checkpoints"))) == checkpoints


def test_different_config_in_the_same_model_dir_is_refused(smoke):
    _, model_dir, _ = smoke
    before = open(os.path.join(model_dir, "metrics.json")).read()
    process = run_module("trainer.task", f"--model_dir={model_dir}", "--epochs=2")
    assert process.returncode == 2
    assert "holds a run with a different config (epochs: 5 -> 2)" in error_line(process)
    assert "--overwrite" in error_line(process)
    assert open(os.path.join(model_dir, "metrics.json")).read() == before


def _checkpoint_steps(directory):
    return sorted(int(re.search(r"ckpt-(\d+)\.index", path).group(1))
                  for path in glob.glob(os.path.join(directory, "ckpt-*.index")))


def test_killed_run_resumes_where_it_stopped(tmp_path):
    model_dir = str(tmp_path / "run")
    args = [f"--model_dir={model_dir}", "--data=demo", "--backbone=small_cnn",
            "--base_weights=none", "--image_size=48", "--epochs=30", "--fine_tune_epochs=2",
            "--learning_rate=1e-2"]
    command = [sys.executable, "-m", "trainer.task", *args]
    job = subprocess.Popen(command, env=cli_env(), cwd=REPO, stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL, text=True)
    deadline = time.time() + 120
    # 12 steps an epoch: kill once epoch 3 is checkpointed, well before epoch 32.
    while not [step for step in _checkpoint_steps(os.path.join(model_dir, "checkpoints"))
               if step >= 36]:
        assert job.poll() is None and time.time() < deadline, "job ended before it was killed"
        time.sleep(0.05)
    job.send_signal(signal.SIGKILL)
    job.wait()
    first_output = job.stdout.read()
    assert not os.path.exists(os.path.join(model_dir, "metrics.json"))
    saved = _checkpoint_steps(os.path.join(model_dir, "checkpoints"))

    process = run_module("trainer.task", *args)
    assert process.returncode == 0, process.stderr[-2000:]
    resumed = re.search(r"resuming from epoch (\d+) \(step (\d+) of 384\)", process.stdout)
    assert resumed, process.stdout
    resumed_epoch, resumed_step = int(resumed.group(1)), int(resumed.group(2))
    # The newest checkpoint, or the one before it if the kill landed while it was written.
    assert resumed_step in saved[-2:] and resumed_step >= 36 and resumed_epoch == resumed_step // 12
    trained_again = [int(m) for m in re.findall(r"^epoch (\d+)/32", process.stdout, re.M)]
    assert trained_again == list(range(resumed_epoch + 1, 33))  # no finished epoch redone
    metrics = read_metrics(model_dir)
    assert [row["epoch"] for row in metrics["history"]] == list(range(1, 33))
    assert metrics["resumed_from_epoch"] == resumed_epoch
    assert f"epoch {resumed_epoch}/32" in first_output


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
])
def test_user_errors_are_one_line(tmp_path, args, message):
    model_dir = tmp_path / "run"
    process = run_module("trainer.task", f"--model_dir={model_dir}", *args, timeout=120)
    assert process.returncode == 2
    assert message in error_line(process)
    assert not model_dir.exists() or not os.listdir(model_dir)


def test_unreadable_images_are_counted_in_metrics(tmp_path):
    root = images.folder(str(tmp_path / "data"), per_class=8, validation_per_class=3, size=32)
    images.save_corrupt(os.path.join(root, "train", "red", "cut.jpg"), "truncated")
    images.save_corrupt(os.path.join(root, "validation", "green", "empty.jpg"), "empty")
    model_dir = str(tmp_path / "run")
    process = run_module("trainer.task", f"--data={root}", f"--model_dir={model_dir}",
                         "--backbone=small_cnn", "--base_weights=none", "--image_size=32",
                         "--epochs=1", "--fine_tune_epochs=1", "--batch_size=4")
    assert process.returncode == 0, process.stderr[-2000:]
    metrics = read_metrics(model_dir)
    assert metrics["skipped_images"] == 2
    assert sorted(os.path.basename(path) for path in metrics["skipped_examples"]) == [
        "cut.jpg", "empty.jpg"]
    assert (metrics["train_images"], metrics["val_images"]) == (16, 6)
