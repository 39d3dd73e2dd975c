"""python -m trainer.predict --model_dir=DIR image.jpg folder/ gs://bucket/x.png

Prints each image's top classes with probabilities, from the exported SavedModel.

TensorFlow is loaded once the flags are known to be good (in main, and by the functions that
need it), so that --help and a flag error answer at once.
"""

import json
import os
import sys

from absl import flags

from trainer.cli import loading_tensorflow, run_main
from trainer.config import Config
from trainer.errors import UserError

flags.DEFINE_string("model_dir", None, "A training run's --model_dir, or an export/ folder.")
flags.DEFINE_integer("top_k", 3, "How many classes to print per image.")
flags.DEFINE_bool("json", False, "Print one JSON object per image instead of a table.")
flags.DEFINE_integer("max_image_pixels", Config.max_image_pixels, "Images with more pixels "
                     "are refused, never decoded (as in training).")
FLAGS = flags.FLAGS


def main(argv):
    paths = argv[1:]
    if not FLAGS.model_dir:
        raise UserError("pass --model_dir=DIR of a training run (or its export/ folder)")
    if not paths:
        raise UserError("name one or more image files or folders to classify")
    if FLAGS.top_k < 1:
        raise UserError(f"--top_k={FLAGS.top_k}: give how many classes to print, 1 or more")
    with loading_tensorflow():
        import tensorflow as tf
        from trainer import predictor
    tf.get_logger().setLevel("ERROR")
    model = predictor.Predictor(FLAGS.model_dir, FLAGS.max_image_pixels)
    try:
        failed = _print_predictions(model, predictor.expand(paths))
    except BrokenPipeError:
        # The reader stopped (`| head`): stop quietly, as Unix tools do, and let no flush of
        # stdout at exit complain again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(128 + 13)  # as a process ended by SIGPIPE
    if failed:
        raise UserError(f"{failed} file(s) could not be classified (see their rows)")


def _print_predictions(model, paths):
    """Prints a row a path as it is classified; returns how many could not be."""
    failed = 0
    if not FLAGS.json:
        print("path\t" + "\t".join(f"top {rank + 1}" for rank in range(FLAGS.top_k)),
              flush=True)
    for path in paths:
        row = model.row(path, FLAGS.top_k)
        failed += "error" in row
        if FLAGS.json:
            print(json.dumps(row), flush=True)
        elif "error" in row:
            print(f"{path}\terror: {row['error']}", flush=True)
        else:
            print(f"{path}\t" + "\t".join(f"{top['class']} {top['probability']:.4f}"
                                           for top in row["top"]), flush=True)
    return failed


if __name__ == "__main__":
    run_main(main)
