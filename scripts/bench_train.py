"""Frozen-phase speed: the plain tutorial recipe against trainer.task, measured in one run.

    python scripts/bench_train.py [--data=DIR] [--images=1000] [--epochs=10] [--image_size=224]

1. the recipe as the TF tutorial writes it: image_dataset_from_directory, MobileNetV2
   without top, frozen, GAP + Dropout + Dense, model.fit;
2. python -m trainer.task --cache_features=off;
3. python -m trainer.task --cache_features=auto.
Same folder, backbone weights, image size, batch size, epochs and seed; phase 1 only. Each
runs in its own process, timed from the outside (whole process) and inside (the frozen
phase). Also: the input pipeline's overhead, step time on files / on the same tensors in memory.

Without --base_weights the backbone is MobileNetV2 with random weights whose BatchNorm
statistics are estimated on the training images (a random network with identity statistics
passes on nothing, features ~1e-12): not ImageNet, but the same computation, and a head
can learn from its features. With --base_weights=FILE every run uses that file.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

PLAIN_RECIPE = textwrap.dedent("""
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
    model.compile(optimizer=tf.keras.optimizers.Adam(1e-3),
                  loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    began = time.time()
    history = model.fit(train, epochs=epochs, validation_data=validation, verbose=0)
    print(json.dumps({"frozen_seconds": time.time() - began,
                      "val_accuracy": history.history["val_accuracy"][-1]}))
""")


ROUNDS = 7  # of the input-pipeline overhead measurement


def make_folder(root, images):
    from trainer import demo
    per_class = images // 2
    # Photo-sized (500x375 like cats_and_dogs_filtered) JPEGs at quality 90, 80/20 split.
    demo.write(root, train_per_class=per_class * 4 // 5, validation_per_class=per_class // 5,
               size=(500, 375), classes=demo.CLASSES[:2], photos=True)
    return root


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


def calibrated_weights(data, size, path):
    """MobileNetV2 random weights with BatchNorm statistics estimated on 64 training images
    (in a process of its own, so that this one stays small while the runs are timed)."""
    timed([sys.executable, "-c", CALIBRATE, data, str(size), path])
    return path


def timed(command):
    began = time.time()
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO,
                            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    if result.returncode:
        sys.exit(f"failed: {' '.join(command)}\n{result.stderr[-3000:]}")
    return time.time() - began, result.stdout


def run_trainer(data, weights, args, cache, workdir):
    model_dir = os.path.join(workdir, f"run_{cache}")
    seconds, _ = timed([sys.executable, "-m", "trainer.task", f"--data={data}",
                        f"--model_dir={model_dir}", "--backbone=mobilenet_v2",
                        f"--base_weights={weights}", f"--image_size={args.image_size}",
                        f"--batch_size={args.batch_size}", f"--epochs={args.epochs}",
                        "--fine_tune_epochs=0", "--learning_rate=1e-3", "--seed=0",
                        "--strategy=cpu", f"--cache_features={cache}"])
    with open(os.path.join(model_dir, "metrics.json")) as handle:
        metrics = json.load(handle)
    return {"frozen_seconds": metrics["phase_seconds"]["head"],
            "val_accuracy": metrics["val_accuracy"], "process_seconds": seconds,
            "train_images": metrics["train_images"]}


def pipeline_overhead(data, weights, args, steps=8, rounds=ROUNDS):
    """Frozen training step time through an input pipeline / on the same tensors in memory:
    the trainer's, which decodes images once when they fit --memory_budget_mb, and the
    streaming one it falls back to, which decodes every epoch. The three are timed in turn,
    `rounds` times, and each round gives a ratio: a busy neighbour then slows a whole round
    rather than one side of a ratio. Returns the in-memory step time and, per pipeline, the
    median, lowest and highest ratio."""
    import keras
    import numpy as np
    import tensorflow as tf
    from trainer import pipelines
    from trainer import sources
    from trainer import model
    folder = sources.scan(data, seed=0)
    classifier = model.build("mobilenet_v2", weights, args.image_size, 2, 0.2)
    model.set_phase(classifier, "head", 0)
    optimizer = keras.optimizers.Adam(1e-3)
    variables = classifier.model.trainable_variables

    @tf.function
    def train_step(images, labels):
        with tf.GradientTape() as tape:
            logits = classifier.model(images, training=True)
            loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
                labels, logits, from_logits=True))
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return loss

    order = pipelines.train_order(len(folder.train), args.batch_size, 0, 0, steps + 2)
    ones = np.ones(len(order), np.float32)
    context = tf.distribute.InputContext()
    streaming = pipelines.pipeline(folder.train, order, ones, args.batch_size, args.image_size,
                                   context)
    eval_order, eval_weights = pipelines.evaluation_order(len(folder.train), args.batch_size)
    decoded = np.zeros((len(folder.train), args.image_size, args.image_size, 3), np.float32)
    for step, (images, _, _) in enumerate(pipelines.pipeline(
            folder.train, eval_order, eval_weights, args.batch_size, args.image_size, context)):
        decoded[eval_order[step * args.batch_size:(step + 1) * args.batch_size]] = images
    from_memory = pipelines.array_pipeline(decoded, folder.train.labels, order, ones,
                                           args.batch_size, context)
    batches = [(images, labels) for images, labels, _ in streaming]
    for images, labels in batches[:2]:  # trace and warm up
        train_step(images, labels).numpy()

    def time_steps(source):
        began = time.time()
        for images, labels in source:
            loss = train_step(images, labels)
        loss.numpy()
        return (time.time() - began) / steps

    def time_pipeline(dataset):
        iterator = iter(dataset)
        for _ in range(2):  # let the pipeline start and fill its prefetch buffer
            next(iterator)
        return time_steps((images, labels) for images, labels, _ in iterator)

    in_memory, ratios = [], {"decoded_once": [], "streaming": []}
    for _ in range(rounds):
        in_memory.append(time_steps(batches[2:]))
        for name, dataset in (("decoded_once", from_memory), ("streaming", streaming)):
            ratios[name].append(time_pipeline(dataset) / in_memory[-1])
    return float(np.median(in_memory)), {
        name: (float(np.median(values)), min(values), max(values))
        for name, values in ratios.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="image folder (default: generate one)")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--base_weights", default=None)
    args = parser.parse_args()

    workdir = tempfile.mkdtemp(prefix="bench-train-")
    data = args.data or make_folder(os.path.join(workdir, "data"), args.images)
    weights = args.base_weights or calibrated_weights(
        data, args.image_size, os.path.join(workdir, "mobilenet_v2_bn.weights.h5"))

    seconds, out = timed([sys.executable, "-c", PLAIN_RECIPE, data, str(args.image_size),
                          str(args.batch_size), str(args.epochs), weights, "0"])
    plain = dict(json.loads(out.splitlines()[-1]), process_seconds=seconds)
    uncached = run_trainer(data, weights, args, "off", workdir)
    cached = run_trainer(data, weights, args, "auto", workdir)
    images = uncached["train_images"] * args.epochs

    print(f"{images // args.epochs} train images, {args.epochs} frozen epochs, MobileNetV2 at "
          f"{args.image_size} px, batch {args.batch_size}, {os.cpu_count()} CPUs")
    print(f"{'run':<34}{'frozen s':>9}{'images/s':>10}{'val acc':>9}{'process s':>11}"
          f"{'frozen x':>10}{'process x':>11}")
    for name, row in (("1 plain recipe (fit)", plain),
                      ("2 trainer --cache_features=off", uncached),
                      ("3 trainer --cache_features=auto", cached)):
        print(f"{name:<34}{row['frozen_seconds']:>9.1f}{images / row['frozen_seconds']:>10.0f}"
              f"{row['val_accuracy']:>9.3f}{row['process_seconds']:>11.1f}"
              f"{plain['frozen_seconds'] / row['frozen_seconds']:>9.2f}x"
              f"{plain['process_seconds'] / row['process_seconds']:>10.2f}x")
    in_memory, ratios = pipeline_overhead(data, weights, args)
    print(f"input pipeline overhead, step time / step time on the same tensors in memory "
          f"({in_memory * 1000:.0f} ms), median (range) of {ROUNDS} rounds: "
          + "; ".join(f"{label} {ratios[name][0]:.3f} ({ratios[name][1]:.3f}-{ratios[name][2]:.3f})"
                      for name, label in (("decoded_once", "trainer (decoded once)"),
                                          ("streaming", "streaming files"))))

if __name__ == "__main__":
    main()
