"""python -m trainer.predict --model_dir=DIR image.jpg folder/ gs://bucket/x.png

Prints each image's top classes with probabilities, from the exported SavedModel.
"""

import json

from absl import flags
import tensorflow as tf

from trainer import export
from trainer import files
from trainer import sources
from trainer.cli import run_main
from trainer.errors import UserError

flags.DEFINE_string("model_dir", None, "A training run's --model_dir, or an export/ folder.")
flags.DEFINE_integer("top_k", 3, "How many classes to print per image.")
flags.DEFINE_bool("json", False, "Print one JSON object per image instead of a table.")
FLAGS = flags.FLAGS


def export_dir(model_dir):
    for candidate in (model_dir, files.join(model_dir, "export")):
        if files.exists(files.join(candidate, "saved_model.pb")):
            return candidate
    raise UserError(f"no exported model in {model_dir}: pass the --model_dir of a finished "
                    "training run, or its export/ folder")


def expand(paths):
    """Files as given; folders (local or gs://) to the images anywhere beneath them."""
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


def predict(serve, path, top_k):
    """[(class, probability)] best first; None if the file cannot be decoded."""
    try:
        result = serve(image_bytes=tf.constant([files.read_bytes(path)]))
    except tf.errors.InvalidArgumentError:
        return None
    probabilities = result["probabilities"].numpy()[0]
    classes = [name.decode() for name in result["classes"].numpy()[0]]
    best = probabilities.argsort()[::-1][:top_k]
    return [(classes[index], float(probabilities[index])) for index in best]


def main(argv):
    paths = argv[1:]
    if not FLAGS.model_dir:
        raise UserError("pass --model_dir=DIR of a training run (or its export/ folder)")
    if not paths:
        raise UserError("name one or more image files or folders to classify")
    serve = export.load(export_dir(FLAGS.model_dir))
    failed = 0
    for path in expand(paths):
        top = predict(serve, path, FLAGS.top_k)
        if top is None:
            failed += 1
        if FLAGS.json:
            record = {"path": path, "error": "cannot decode image"} if top is None else {
                "path": path, "top": [{"class": name, "probability": round(p, 6)} for name, p in top]}
            print(json.dumps(record), flush=True)
        elif top is None:
            print(f"{path}\terror: cannot decode image", flush=True)
        else:
            print(f"{path}\t" + "\t".join(f"{name} {p:.4f}" for name, p in top), flush=True)
    if failed:
        raise UserError(f"{failed} file(s) could not be decoded as images")


if __name__ == "__main__":
    run_main(main)
