"""The recipe with a real backbone from a weights file: what .ci/compat also runs on the oldest
TensorFlow we ship in an image (the TPU image's 2.20)."""

import json
import os

import keras
import pytest

from tests.conftest import run_module

pytestmark = [pytest.mark.slow, pytest.mark.compat]


def test_mobilenet_v2_from_a_weights_file_trains_resumes_exports_and_predicts(tmp_path,
                                                                               cache_home):
    keras.utils.set_random_seed(1)
    weights = str(tmp_path / "mobilenet_v2_no_top.weights.h5")
    keras.applications.MobileNetV2(input_shape=(96, 96, 3), include_top=False,
                                   weights=None).save_weights(weights)
    model_dir = tmp_path / "run"
    args = ["--data=demo", f"--model_dir={model_dir}", "--backbone=mobilenet_v2",
            f"--base_weights={weights}", "--image_size=96", "--epochs=1",
            "--fine_tune_epochs=1", "--learning_rate=1e-3", "--batch_size=60"]
    first = run_module("trainer.task", *args)
    assert first.returncode == 0, first.stderr[-3000:]
    # As if killed after the first epoch: its checkpoint is the newest left.
    checkpoints = model_dir / "checkpoints"
    for name in os.listdir(checkpoints):
        if name.startswith("ckpt-12.") or name == "checkpoint":
            os.remove(checkpoints / name)
    os.remove(model_dir / "metrics.json")
    resumed = run_module("trainer.task", *args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming at step 6 of 12: epoch 2/2, from its start" in resumed.stdout
    with open(model_dir / "metrics.json") as handle:
        metrics = json.load(handle)
    assert [row["phase"] for row in metrics["history"]] == ["head", "fine_tune"]
    image = os.path.join(cache_home, "trainer", "demo_v1", "validation", "circles",
                         "circles_0000.jpg")
    predicted = run_module("trainer.predict", f"--model_dir={model_dir}", "--json", image)
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    top = json.loads(predicted.stdout)["top"]
    # What the export itself gives for the image, best first.
    import tensorflow as tf
    from trainer import export
    with open(image, "rb") as handle:
        served = export.load(str(model_dir / "export"))(image_bytes=tf.constant([handle.read()]))
    probabilities = served["probabilities"].numpy()[0]
    classes = [name.decode() for name in served["classes"].numpy()[0]]
    assert [(row["class"], row["probability"]) for row in top] == [
        (classes[index], round(float(probabilities[index]), 6))
        for index in probabilities.argsort()[::-1]]
