"""python -m trainer.predict --model_dir=DIR image.jpg folder/ gs://bucket/x.png

Prints each image's top classes with probabilities, from the exported SavedModel.

TensorFlow is loaded once the flags are known to be good (in main, and by the functions that
need it), so that --help and a flag error answer at once.
"""

import json
import os
import sys

from absl import flags

from trainer.cli import quiet_tensorflow_load, run_main
from trainer.config import Config
from trainer.errors import UserError

flags.DEFINE_string("model_dir", None, "A training run's --model_dir, or an export/ folder.")
flags.DEFINE_integer("top_k", 3, "How many classes to print per image.")
flags.DEFINE_bool("json", False, "Print one JSON object per image instead of a table.")
flags.DEFINE_integer("max_image_pixels", Config.max_image_pixels, "Images with more pixels "
                     "are refused, never decoded (as in training).")
FLAGS = flags.FLAGS


def export_dir(model_dir):
    from trainer import files
    for candidate in (model_dir, files.join(model_dir, "export")):
        if files.exists(files.join(candidate, "saved_model.pb")):
            return candidate
    raise UserError(f"no exported model in {model_dir}: pass the --model_dir of a finished "
                    "training run, or its export/ folder")


def expand(paths):
    """Files as given; folders (local or gs://) to the images anywhere beneath them."""
    import tensorflow as tf
    from trainer import files, sources
    images = []
    for path in paths:
        if not files.exists(path):
            raise UserError(f"{path} not found")
        if files.isdir(path):
            found = sorted(files.join(folder, name) for folder, _, names in tf.io.gfile.walk(path)
                           for name in names if name.lower().endswith(sources.IMAGE_EXTENSIONS))
            if not found:
                raise UserError(f"folder {path} holds no images ({', '.join(sources.IMAGE_EXTENSIONS)})")
            images += found
        else:
            images.append(path)
    return images


def predict(serve, path, top_k, max_pixels):
    """([(class, probability)] best first, None) or (None, why the image was refused)."""
    import tensorflow as tf
    from trainer import files, sources
    content = files.read_bytes(path)
    pixels = sources.header_pixels(content)
    if pixels is not None and pixels > max_pixels:
        return None, f"more than --max_image_pixels={max_pixels} pixels"
    try:
        result = serve(image_bytes=tf.constant([content]))
    except tf.errors.InvalidArgumentError:
        return None, "cannot decode image"
    probabilities = result["probabilities"].numpy()[0]
    classes = [name.decode() for name in result["classes"].numpy()[0]]
    best = probabilities.argsort()[::-1][:top_k]
    return [(classes[index], float(probabilities[index])) for index in best], None


def main(argv):
    paths = argv[1:]
    if not FLAGS.model_dir:
        raise UserError("pass --model_dir=DIR of a training run (or its export/ folder)")
    if not paths:
        raise UserError("name one or more image files or folders to classify")
    if FLAGS.top_k < 1:
        raise UserError(f"--top_k={FLAGS.top_k}: give how many classes to print, 1 or more")
    with quiet_tensorflow_load():
        import tensorflow as tf
    tf.get_logger().setLevel("ERROR")
    from trainer import export
    serve = export.load(export_dir(FLAGS.model_dir))
    try:
        failed = _print_predictions(serve, expand(paths))
    except BrokenPipeError:
        # The reader stopped (`| head`): stop quietly, as Unix tools do, and let no flush of
        # stdout at exit complain again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(128 + 13)  # as a process ended by SIGPIPE
    if failed:
        raise UserError(f"{failed} file(s) could not be classified (see their rows)")


def _print_predictions(serve, paths):
    """Prints a row a path; returns how many could not be classified."""
    failed = 0
    if not FLAGS.json:
        print("path\t" + "\t".join(f"top {rank + 1}" for rank in range(FLAGS.top_k)),
              flush=True)
    for path in paths:
        top, why = predict(serve, path, FLAGS.top_k, FLAGS.max_image_pixels)
        failed += top is None
        if FLAGS.json:
            record = {"path": path, "error": why} if top is None else {
                "path": path, "top": [{"class": name, "probability": round(p, 6)} for name, p in top]}
            print(json.dumps(record), flush=True)
        elif top is None:
            print(f"{path}\terror: {why}", flush=True)
        else:
            print(f"{path}\t" + "\t".join(f"{name} {p:.4f}" for name, p in top), flush=True)
    return failed


if __name__ == "__main__":
    run_main(main)
