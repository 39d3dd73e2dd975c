"""Input pipeline speed: images/s decoding and resizing to 224 and batching 32, in one run.

    python scripts/bench_input.py [--images=1000] [--no_gcs]

(a) tf.keras.utils.image_dataset_from_directory, (b) our image-folder pipeline, (c) our
TFRecord pipeline (trainer.prepare at full size) and (d) the same with --max_side=256, each
over the same generated folder of photo-sized JPEGs (500x375, quality 90, about 40 KB each,
like cats_and_dogs_filtered: trainer.demo's shapes on scenes that compress like photographs),
from local disk and from gs:// on the GCS emulator the tests use.
Each measurement runs in a process of its own; ratios are against (a) on the same storage.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

IMAGE_SIZE, BATCH = 224, 32


def measure(kind, data, epochs):
    """Images per second through one pipeline over `epochs` passes, after a warm-up batch (in
    this process)."""
    # trainer first, as in a job: it sets TensorFlow's gs:// read buffer before TF reads it.
    from trainer import pipelines
    from trainer import sources
    import tensorflow as tf
    if kind == "keras":
        dataset = tf.keras.utils.image_dataset_from_directory(
            f"{data}/train", batch_size=BATCH, image_size=(IMAGE_SIZE, IMAGE_SIZE), seed=0,
            verbose=False).repeat(epochs).prefetch(tf.data.AUTOTUNE)
        count = sum(len(files) for _, _, files in tf.io.gfile.walk(f"{data}/train")) * epochs
    else:
        split = sources.scan(data, seed=0).train
        steps = pipelines.steps_per_epoch(len(split), BATCH) * epochs
        dataset = pipelines.training_pipeline(split, 0, steps, BATCH, IMAGE_SIZE, 0,
                                             tf.distribute.InputContext())
        count = steps * BATCH
    iterator = iter(dataset)
    first = next(iterator)[0].shape[0]
    began = time.time()
    seen = sum(int(batch[0].shape[0]) for batch in iterator)
    assert seen + first == count, (seen + first, count)
    return (count - first) / (time.time() - began)


def child(kind, data, epochs):
    print(f"RESULT {measure(kind, data, int(epochs)):.1f}")


def run_child(kind, data, env, epochs):
    result = subprocess.run([sys.executable, __file__, "--child", kind, data, str(epochs)],
                            capture_output=True, text=True, env=env, cwd=REPO)
    line = [line for line in result.stdout.splitlines() if line.startswith("RESULT")]
    if result.returncode or not line:
        sys.exit(f"{kind} on {data} failed:\n{result.stderr[-3000:]}")
    return float(line[0].split()[1])


def measure_store(paths, env, rounds, epochs):
    """Median images/s of (a)-(d) and median ratio to (a). The four run in turn, `rounds`
    times, each round giving its own ratios: this machine is shared and noisy, and a busy
    neighbour then slows a whole round rather than one side of a ratio."""
    import numpy as np
    runs = [("keras", paths["images"]), ("ours", paths["images"]), ("ours", paths["full"]),
            ("ours", paths["small"])]
    rates = np.array([[run_child(kind, data, env, epochs) for kind, data in runs]
                      for _ in range(rounds)])
    return np.median(rates, axis=0), np.median(rates / rates[:, :1], axis=0)


def prepare(images, output, env, *args):
    subprocess.run([sys.executable, "-m", "trainer.prepare", f"--images={images}",
                    f"--output={output}", *args], check=True, capture_output=True, env=env,
                   cwd=REPO)
    return output


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--no_gcs", action="store_true", help="local disk only")
    parser.add_argument("--rounds", type=int, default=7, help="rounds of local measurements "
                        "(median)")
    parser.add_argument("--gcs_rounds", type=int, default=3, help="rounds through the GCS "
                        "emulator, which serves about 25 single files a second")
    parser.add_argument("--epochs", type=int, default=5, help="passes over the images per "
                        "local measurement (one through the emulator)")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)

    from trainer import demo
    workdir = tempfile.mkdtemp(prefix="bench-input-")
    local = demo.write(os.path.join(workdir, "images"), train_per_class=args.images // 2,
                       validation_per_class=4, size=(500, 375), classes=demo.CLASSES[:2],
                       photos=True)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=REPO)
    stores = [("local", env, args.rounds, args.epochs, {"images": local,
                              "full": prepare(local, os.path.join(workdir, "full"), env),
                              "small": prepare(local, os.path.join(workdir, "small"), env,
                                               "--max_side=256")})]
    emulator = None
    if not args.no_gcs:
        from tests.gcs import Emulator
        emulator = Emulator(workdir)
        gcs_env = dict(env, **emulator.env)
        bucket = emulator.bucket("bench")
        stores.append(("gs://", gcs_env, args.gcs_rounds, 1, {
            "images": emulator.upload_tree(local, f"{bucket}/images"),
            "full": prepare(local, f"{bucket}/full", gcs_env),
            "small": prepare(local, f"{bucket}/small", gcs_env, "--max_side=256")}))
    try:
        print(f"{args.images} train JPEGs of 500x375 -> {IMAGE_SIZE}x{IMAGE_SIZE}, batch {BATCH}, "
              f"{os.cpu_count()} CPUs; images/s (ratio to a), "
              f"median of {args.rounds} rounds of {args.epochs} epochs locally, "
              f"{args.gcs_rounds} of 1 epoch on gs://")
        print(f"{'storage':<8}{'a keras':>16}{'b folder':>16}{'c tfrecord':>16}{'d max_side 256':>18}")
        for name, store_env, rounds, epochs, paths in stores:
            rates, ratios = measure_store(paths, store_env, rounds, epochs)
            cells = [f"{rate:8.0f} ({ratio:.2f}x)" for rate, ratio in zip(rates, ratios)]
            print(f"{name:<8}{cells[0]:>16}{cells[1]:>16}{cells[2]:>16}{cells[3]:>18}")
    finally:
        if emulator:
            emulator.stop()


if __name__ == "__main__":
    main()
