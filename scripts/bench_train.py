"""The whole two-phase recipe: the TF tutorial's against trainer.task, measured in one run.

    python scripts/bench_train.py [--data=DIR] [--images=900] [--epochs=10] [--image_size=160]
                                  [--rounds=3] [--base_weights=FILE]

1. the recipe as the TF transfer-learning tutorial writes it: image_dataset_from_directory,
   MobileNetV2 without top, frozen, GAP + Dropout + Dense, model.fit at 1e-4 (Adam); then
   layers 100 and up unfrozen, model.fit on at 1e-5 (RMSprop), as the tutorial does;
2. python -m trainer.task --cache_features=off: both phases read images;
3. python -m trainer.task with the defaults: both phases on what one backbone pass cached.
Same folder (photo-like JPEGs of 500x375, two classes, 2:1 train/validation as in
cats_and_dogs_filtered), backbone weights, image size, batch size, epochs, learning rates and
seed; no augmentation. Each run is a process of its own, timed from the outside (the whole
process) and inside (each phase), with its peak resident memory. The runs take turns, round
after round, and the table gives medians: a busy neighbour then slows a round rather than
one side of a ratio.

Without --base_weights the backbone is MobileNetV2 with random weights whose BatchNorm
statistics are estimated on the training images (a random network with identity statistics
passes on nothing, features ~1e-9): not ImageNet, but the same computation, and a head can
learn from its features. With --base_weights=FILE every run uses that file.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

TUTORIAL_RECIPE = textwrap.dedent("""
    import json, sys, time
    import tensorflow as tf
    data, size, batch, epochs, weights, seed = sys.argv[1:7]
    size, batch, epochs, seed = int(size), int(batch), int(epochs), int(seed)
    tf.keras.utils.set_random_seed(seed)
    train = tf.keras.utils.image_dataset_from_directory(
        data + "/train", shuffle=True, batch_size=batch, image_size=(size, size), seed=seed)
    validation = tf.keras.utils.image_dataset_from_directory(
        data + "/validation", shuffle=False, batch_size=batch, image_size=(size, size))
    train = train.prefetch(tf.data.AUTOTUNE)
    validation = validation.prefetch(tf.data.AUTOTUNE)
    base = tf.keras.applications.MobileNetV2(input_shape=(size, size, 3), include_top=False,
                                             weights=None if weights == "none" else weights)
    base.trainable = False
    inputs = tf.keras.Input(shape=(size, size, 3))
    x = tf.keras.applications.mobilenet_v2.preprocess_input(inputs)
    x = base(x, training=False)
    x = tf.keras.layers.GlobalAveragePooling2D()(x)
    x = tf.keras.layers.Dropout(0.2)(x)
    outputs = tf.keras.layers.Dense(2)(x)
    model = tf.keras.Model(inputs, outputs)
    model.compile(optimizer=tf.keras.optimizers.Adam(1e-4),
                  loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    began = time.time()
    history = model.fit(train, epochs=epochs, validation_data=validation, verbose=0)
    frozen = time.time() - began
    base.trainable = True
    for layer in base.layers[:100]:
        layer.trainable = False
    model.compile(optimizer=tf.keras.optimizers.RMSprop(1e-5),
                  loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    began = time.time()
    history = model.fit(train, epochs=2 * epochs, initial_epoch=epochs,
                        validation_data=validation, verbose=0)
    print(json.dumps({"head": frozen, "fine_tune": time.time() - began,
                      "val_accuracy": history.history["val_accuracy"][-1]}))
""")

CALIBRATE = textwrap.dedent("""
    import os, sys
    import keras, tensorflow as tf
    data, size, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    keras.utils.set_random_seed(0)
    base = keras.applications.MobileNetV2(input_shape=(size, size, 3), include_top=False,
                                          weights=None)
    images = tf.keras.utils.image_dataset_from_directory(
        os.path.join(data, "train"), batch_size=64, image_size=(size, size), seed=0)
    for layer in base.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.0
    base(keras.applications.mobilenet_v2.preprocess_input(next(iter(images))[0]), training=True)
    base.save_weights(path)
""")


def make_folder(root, images):
    from trainer import demo
    per_class = images // 2
    demo.write(root, train_per_class=per_class * 2 // 3, validation_per_class=per_class // 3,
               size=(500, 375), classes=demo.CLASSES[:2], photos=True)
    return root


def timed(command):
    """(wall seconds, stdout, peak resident MB) of a process."""
    with tempfile.TemporaryFile("w+") as output, tempfile.TemporaryFile("w+") as errors:
        began = time.time()
        process = subprocess.Popen(command, stdout=output, stderr=errors, cwd=REPO,
                                   env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.time() - began
        output.seek(0)
        errors.seek(0)
        if status:
            sys.exit(f"failed: {' '.join(command)}\n{errors.read()[-3000:]}")
        return seconds, output.read(), usage.ru_maxrss / 1024


def run_tutorial(data, weights, args):
    seconds, out, peak = timed([sys.executable, "-c", TUTORIAL_RECIPE, data,
                                str(args.image_size), str(args.batch_size), str(args.epochs),
                                weights, "0"])
    return dict(json.loads(out.splitlines()[-1]), process=seconds, peak_mb=peak,
                cache_kb=0.0)


def run_trainer(data, weights, args, cache, workdir):
    model_dir = os.path.join(workdir, f"run_{cache}")
    seconds, _, peak = timed([
        sys.executable, "-m", "trainer.task", f"--data={data}", f"--model_dir={model_dir}",
        "--overwrite", "--backbone=mobilenet_v2", f"--base_weights={weights}",
        f"--image_size={args.image_size}", f"--batch_size={args.batch_size}",
        f"--epochs={args.epochs}", f"--fine_tune_epochs={args.epochs}", "--fine_tune_at=100",
        "--learning_rate=1e-4", "--fine_tune_learning_rate=1e-5", "--seed=0",
        "--strategy=cpu", f"--cache_features={cache}", "--export_tflite=false"])
    with open(os.path.join(model_dir, "metrics.json")) as handle:
        metrics = json.load(handle)
    phases = metrics["phase_seconds"]
    # Phase 1 as the tutorial times it: the backbone pass that feeds it, then its epochs.
    return {"head": metrics["pass_seconds"] + phases["head"], "fine_tune": phases["fine_tune"],
            "val_accuracy": metrics["val_accuracy"],
            "process": seconds, "peak_mb": peak,
            "cache_kb": metrics["cache_bytes_per_image"] / 1024,
            "train_images": metrics["train_images"]}


def median_row(rows):
    return {key: statistics.median(row[key] for row in rows)
            for key in ("head", "fine_tune", "process", "val_accuracy", "peak_mb", "cache_kb")}


def arguments(description, epochs_help):
    """The arguments both training benchmarks take."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--data", help="image folder (default: generate one)")
    parser.add_argument("--images", type=int, default=900)
    parser.add_argument("--epochs", type=int, default=10, help=epochs_help)
    parser.add_argument("--image_size", type=int, default=160)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--base_weights", default=None)
    return parser.parse_args()


def set_up(args, prefix):
    """(work folder, image folder, backbone weights file): generated unless given."""
    workdir = tempfile.mkdtemp(prefix=prefix)
    data = args.data or make_folder(os.path.join(workdir, "data"), args.images)
    weights = args.base_weights or os.path.join(workdir, "mobilenet_v2_bn.weights.h5")
    if not args.base_weights:  # in a process of its own, so that this one stays small
        timed([sys.executable, "-c", CALIBRATE, data, str(args.image_size), weights])
    return workdir, data, weights


def main():
    args = arguments(__doc__.splitlines()[0], "of each phase")
    workdir, data, weights = set_up(args, "bench-train-")

    runs = {"tutorial": [], "off": [], "auto": []}
    for _ in range(args.rounds):
        runs["tutorial"].append(run_tutorial(data, weights, args))
        runs["off"].append(run_trainer(data, weights, args, "off", workdir))
        runs["auto"].append(run_trainer(data, weights, args, "auto", workdir))
    train_images = runs["off"][0]["train_images"]
    rows = {name: median_row(values) for name, values in runs.items()}
    base, off = rows["tutorial"], rows["off"]

    print(f"{train_images} train images, {args.epochs} + {args.epochs} epochs, MobileNetV2 at "
          f"{args.image_size} px, layers 100+ fine-tuned, batch {args.batch_size}, "
          f"{os.cpu_count()} CPUs; medians of {args.rounds} round(s)")
    print(f"{'run':<32}{'head s':>8}{'tune s':>8}{'process s':>11}{'val acc':>9}"
          f"{'peak MB':>9}{'cache KB/img':>14}{'whole x':>9}{'tune x':>8}{'tune x off':>12}")
    for name, label in (("tutorial", "1 tutorial recipe (fit)"),
                        ("off", "2 trainer --cache_features=off"),
                        ("auto", "3 trainer (defaults)")):
        row = rows[name]
        print(f"{label:<32}{row['head']:>8.1f}{row['fine_tune']:>8.1f}{row['process']:>11.1f}"
              f"{row['val_accuracy']:>9.3f}{row['peak_mb']:>9.0f}{row['cache_kb']:>14.1f}"
              f"{base['process'] / row['process']:>8.2f}x"
              f"{base['fine_tune'] / row['fine_tune']:>7.2f}x"
              f"{off['fine_tune'] / row['fine_tune']:>11.2f}x")
    print("head s / tune s: each phase's wall time inside the process (the trainer's include "
          "its backbone pass and validation); whole x: tutorial process time / this one's; "
          "tune x: phase-2 time ratio against the tutorial and against --cache_features=off")


if __name__ == "__main__":
    main()
