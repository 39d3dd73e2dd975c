"""Both phases on what the backbone pass cached, through the CLI; random augmentation."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.conftest import TINY_MODEL, cli_env, error_line, run_module
from trainer import export
from trainer import model

JOB = ["--data=demo", *TINY_MODEL, "--image_size=48",
       "--epochs=3", "--fine_tune_epochs=1", "--learning_rate=1e-2", "--dropout=0.2"]


def _train(tmp_path, name, *args, env=None):
    model_dir = str(tmp_path / name)
    process = run_module("trainer.task", f"--model_dir={model_dir}", *JOB, *args, env=env)
    assert process.returncode == 0, process.stderr[-2000:]
    with open(os.path.join(model_dir, "metrics.json")) as handle:
        return model_dir, process.stdout, json.load(handle)


def _model_weights(model_dir):
    """Every model variable of the final checkpoint: the head and the backbone."""
    reader = tf.train.load_checkpoint(os.path.join(model_dir, "checkpoints"))
    names = sorted(name for name in reader.get_variable_to_shape_map()
                   if name.startswith("model/"))
    assert len(names) > 10
    return [reader.get_tensor(name) for name in names]


@pytest.fixture(scope="module")
def uncached(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("uncached"), "run", "--cache_features=off")


@pytest.mark.slow
def test_cached_and_uncached_runs_agree(tmp_path, uncached):
    model_dir, stdout, metrics = _train(tmp_path, "cached", "--cache_features=auto")
    assert ("phase fine_tune trains on the activations entering backbone layer 10 (6x6x64, "
            "4.5 KB an image as float16 unless their values do not fit it") in stdout
    assert ("cached backbone features and activations entering layer 10 of 360 train and 90 "
            "validation images") in stdout
    assert "cached backbone" not in uncached[1]
    assert "phase fine_tune trains on images every epoch (--cache_features=off)" in uncached[1]
    assert metrics["cached_features"] == ["head", "fine_tune"]
    assert metrics["cache_bytes_per_image"] == 128 * 4 + 6 * 6 * 64 * 2
    assert not uncached[2]["cached_features"]
    # float16 activations in phase 2: see test_train's test_both_cached_phases_train_like...
    assert len(metrics["history"]) == len(uncached[2]["history"]) == 4
    for mine, theirs in zip(metrics["history"], uncached[2]["history"]):
        assert mine["phase"] == theirs["phase"]
        for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-3, abs=1e-4), (key, mine)
    for mine, theirs in zip(_model_weights(model_dir), _model_weights(uncached[0])):
        np.testing.assert_allclose(mine, theirs, rtol=1e-3, atol=1e-4)


@pytest.mark.slow
def test_features_over_the_memory_budget_go_to_a_file(tmp_path, uncached, cache_home):
    temp = tmp_path / "tmp"
    temp.mkdir()
    # The final report is computed from the cached activations too.
    model_dir, stdout, metrics = _train(tmp_path, "on_disk", "--cache_features=on",
                                        "--memory_budget_mb=0", env=cli_env(TMPDIR=str(temp)))
    assert "KB an image; activations as float16, in files in the temp dir" in stdout
    assert len(metrics["history"]) == len(uncached[2]["history"]) == 4
    for mine, theirs in zip(metrics["history"], uncached[2]["history"]):
        assert mine["val_loss"] == pytest.approx(theirs["val_loss"], rel=1e-3, abs=1e-4)
    assert not os.listdir(temp)  # the feature file was removed
    # The exported model, reading the image files, gives the same confusion matrix.
    serve = export.load(os.path.join(model_dir, "export"))
    confusion = np.zeros((3, 3), int)
    for label, name in enumerate(("circles", "squares", "triangles")):
        folder = os.path.join(cache_home, "trainer", "demo_v1", "validation", name)
        contents = [tf.io.read_file(os.path.join(folder, file)) for file in os.listdir(folder)]
        predicted = serve(image_bytes=tf.stack(contents))["probabilities"].numpy().argmax(1)
        np.add.at(confusion, (label, predicted), 1)
    assert confusion.tolist() == metrics["confusion_matrix"]


@pytest.mark.slow
def test_augmentation_turns_caching_off_and_trains(tmp_path):
    _, stdout, metrics = _train(tmp_path, "augmented", "--augment=tutorial")
    assert "cached backbone" not in stdout
    assert stdout.count("trains on images every epoch: --augment changes them") == 2
    assert "decoded 450 images once" in stdout  # within --memory_budget_mb
    assert not metrics["cached_features"] and metrics["epochs_completed"] == 4


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["--cache_features=on", "--augment=flip"], "--cache_features='on' cannot be 'on' with "
                                                "--augment"),
    (["--augment=flip,wobble"], "--augment='flip,wobble' names unknown augmentation(s) "
                                "['wobble']"),
])
def test_bad_caching_and_augmentation_flags(tmp_path, args, message):
    process = run_module("trainer.task", f"--model_dir={tmp_path / 'run'}", *JOB, *args)
    assert process.returncode == 2
    assert message in error_line(process)


def test_augmentation_acts_in_training_only():
    keras.utils.set_random_seed(0)
    classifier = model.build("small_cnn", "none", 32, 2, 0.0, ("flip", "rotate", "zoom"))
    images = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype(np.float32)
    inference = classifier.model(images, training=False).numpy()
    np.testing.assert_allclose(inference, classifier.head(classifier.features(images)).numpy(),
                               rtol=1e-5)
    assert not np.allclose(classifier.model(images, training=True).numpy(), inference)
