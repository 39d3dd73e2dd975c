"""Before and after training: the dry-run plan, imbalance, TFLite."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from tests import images
from tests.conftest import TINY_MODEL, error_line, run_module
from trainer import config as config_lib
from trainer import pipelines
from trainer import sources
from trainer import export

pytestmark = pytest.mark.slow  # every test here runs the CLI in a subprocess


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path):
    model_dir = tmp_path / "run"
    process = run_module("trainer.task", f"--model_dir={model_dir}", "--dry_run")
    assert process.returncode == 0, process.stderr[-2000:]
    plan = process.stdout
    for expected in ("strategy cpu", "1 replica(s); global batch 32, 32 per replica",
                     "circles         120          30", "total           360          90",
                     "unreadable    found when the job first reads the images", "phase head      epochs 1-5",
                     "60 steps, 387 trainable parameters\n    trains on pooled backbone "
                     "features, cached in one backbone pass",
                     "phase fine_tune epochs 6-8", "backbone layers 10+ trainable",
                     "trains on the activations entering backbone layer 10 (12x12x64, 18.0 KB an "
                     "image as float16 unless their values do not fit it, then twice that as "
                     "float32), cached in the same pass",
                     f"model_dir     {model_dir} (fresh)", f"checkpoints   {model_dir}/checkpoints"):
        assert expected in plan, (expected, plan)
    assert not model_dir.exists()


def test_imbalance_is_warned_and_class_weight_balances(tmp_path):
    root = str(tmp_path / "data")
    images.folder(root, classes=("red",), per_class=12, validation_per_class=2, size=32)
    images.folder(root, classes=("green",), per_class=4, validation_per_class=2, size=32)
    images.save_corrupt(os.path.join(root, "train", "red", "broken.jpg"), "empty")
    process = run_module("trainer.task", f"--data={root}", f"--model_dir={tmp_path / 'run'}",
                         *TINY_MODEL, "--image_size=32", "--batch_size=8", "--dry_run")
    assert process.returncode == 0, process.stderr[-2000:]
    # As listed: the broken image is found when the job reads it.
    assert "class imbalance in train: green 4, red 13 (largest/smallest 3.2)" in process.stdout
    assert "--class_weight=auto" in process.stdout
    assert "broken.jpg" not in process.stdout  # the plan reads no image
    folder = sources.check(sources.scan(root), 10**6, 5)
    weights = sources.class_weights(folder.train, 2)
    assert np.allclose(weights, [16 / (2 * 4), 16 / (2 * 12)])  # green, red
    trained = run_module("trainer.task", f"--data={root}", f"--model_dir={tmp_path / 'run'}",
                         *TINY_MODEL, "--image_size=32",
                         "--epochs=1", "--fine_tune_epochs=0", "--batch_size=8",
                         "--class_weight=auto")
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert "class imbalance" not in trained.stderr  # balanced: nothing left to warn about
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["skipped_images"] == 1 and metrics["train_images"] == 16
    assert metrics["skipped_examples"][0].endswith("broken.jpg")
    from tests.test_train import tiny_trainer
    with tiny_trainer(tmp_path / "in_process", data=root, class_weight="auto") as trainer:
        np.testing.assert_allclose(trainer.class_weights.numpy(), weights)


def test_tflite_export_agrees_with_the_saved_model(tmp_path):
    model_dir = str(tmp_path / "run")
    process = run_module("trainer.task", f"--model_dir={model_dir}", "--data=demo",
                         *TINY_MODEL, "--image_size=48",
                         "--epochs=2", "--fine_tune_epochs=1", "--learning_rate=1e-2",
                         "--export_tflite")
    assert process.returncode == 0, process.stderr[-2000:]
    folder = sources.scan(config_lib.data_root("demo"))
    paths = list(folder.validation.paths[::15])
    contents = [tf.io.read_file(path) for path in paths]
    saved = export.load(os.path.join(model_dir, "export"))(image_bytes=tf.stack(contents))
    interpreter = tf.lite.Interpreter(model_path=os.path.join(model_dir, "model.tflite"))
    source, = interpreter.get_input_details()
    result, = interpreter.get_output_details()
    interpreter.resize_tensor_input(source["index"], [1, 48, 48, 3])
    interpreter.allocate_tensors()
    for index, content in enumerate(contents):
        pixels = pipelines.decode_and_resize(content, 48).numpy()[np.newaxis]
        interpreter.set_tensor(source["index"], pixels)
        interpreter.invoke()
        np.testing.assert_allclose(interpreter.get_tensor(result["index"])[0],
                                   saved["probabilities"].numpy()[index], rtol=1e-4, atol=1e-5)


def test_predict_names_the_signature_a_foreign_saved_model_lacks(tmp_path):
    import keras
    inputs = keras.Input((4,), name="features")
    keras.Model(inputs, keras.layers.Dense(2)(inputs)).export(str(tmp_path / "foreign"))
    image = images.save(str(tmp_path / "a.jpg"))
    process = run_module("trainer.predict", f"--model_dir={tmp_path / 'foreign'}", image)
    assert process.returncode == 2
    assert ("is not a trainer export: expected serving_default(image_bytes: string[batch]), "
            "found features: float32(None, 4)") in error_line(process)


def test_predict_names_the_outputs_a_foreign_saved_model_gives(tmp_path):
    import tensorflow as tf

    class Foreign(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
        def serve(self, image_bytes):
            return {"scores": tf.zeros([tf.shape(image_bytes)[0], 2])}

    module = Foreign()
    tf.saved_model.save(module, str(tmp_path / "foreign"),
                        signatures={"serving_default": module.serve})
    image = images.save(str(tmp_path / "a.jpg"))
    process = run_module("trainer.predict", f"--model_dir={tmp_path / 'foreign'}", image)
    assert process.returncode == 2
    assert ("is not a trainer export: its serving_default returns scores, not probabilities "
            "and classes") in error_line(process)


def test_report_axes_show_whole_epochs_plain_values_and_a_legend_that_fits():
    from trainer import report
    history = [{"epoch": epoch, "phase": "head" if epoch <= 3 else "fine_tune",
                "accuracy": 0.5, "val_accuracy": 0.5, "loss": 0.6931 + epoch * 1e-7,
                "val_loss": 0.6931} for epoch in range(1, 6)]
    heads = {"chosen": 5, "heads": [{"name": f"learning_rate={index}", "history": history[:3]}
                                    for index in range(64)]}
    drawn = report.figure(history, [[1, 0], [0, 1]], ["a", "b"], heads)
    drawn.canvas.draw()
    accuracy, loss, _, sweep_panel = drawn.axes
    for axis in (accuracy, loss, sweep_panel):
        ticks = [tick for tick in axis.get_xticks() if axis.get_xlim()[0] <= tick <= axis.get_xlim()[1]]
        assert ticks and all(float(tick).is_integer() for tick in ticks), ticks
    assert loss.yaxis.get_offset_text().get_text() == ""
    labels = [text.get_text() for text in sweep_panel.get_legend().get_texts()]
    assert labels == ["learning_rate=5 (chosen)"]
    assert "63 others in grey" in sweep_panel.get_title()
