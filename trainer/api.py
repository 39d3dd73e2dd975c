"""The job from Python: trainer.fit runs what `python -m trainer.task` runs, with the flags as
keyword arguments, and returns the Run it wrote; trainer.load classifies with an export.

    run = trainer.fit(data="cats_and_dogs_filtered", epochs=10, model_dir="runs/cats")
    run.plot()
    run.predict("my_photos/", top_k=3)

Nothing parses absl flags here, and TensorFlow loads only once fit or load runs."""

import contextlib
import dataclasses
import gc
import random
import signal
import sys

from trainer import config as config_lib
from trainer.errors import Stopped, UserError


def fit(config=None, /, *, overwrite=False, dry_run=False, **settings):
    """Trains as `python -m trainer.task` does, on `config` (a trainer.Config, or the path of
    a YAML preset, also given as config=...) with `settings` named as the flags are and
    overriding it. Returns the Run (for dry_run, the plan, also printed). Raises UserError
    with the message the CLI prints, and Stopped when Ctrl-C (the notebook's stop button) or
    SIGTERM stopped the job after it saved its work: calling fit again resumes."""
    resolved = config_lib.from_settings(dict(settings), config)
    with _as_a_separate_job():
        from trainer import task
        outcome = _reraised_plainly(task.run, resolved, overwrite, dry_run)
    return outcome if dry_run else Run.of(resolved.model_dir)


def load(model_dir):
    """The predictor of a finished run's model_dir, or of an export/ folder:
    .predict(paths_or_folder, top_k=3) gives the rows of `trainer.predict --json`."""
    with _as_a_separate_job():
        from trainer import predictor
        return _reraised_plainly(predictor.Predictor, model_dir)


@dataclasses.dataclass
class Run:
    """A run's outputs in its model_dir: metrics.json's contents and where the rest is."""
    model_dir: str
    metrics: dict       # metrics.json; {} where the run wrote none (not the chief, or stopped)
    export_dir: str
    report_png: str

    @classmethod
    def of(cls, model_dir):
        from trainer import files, outputs
        layout = outputs.Layout.of(model_dir)
        metrics_path = layout.path("metrics.json")
        metrics = files.read_json(metrics_path) if files.exists(metrics_path) else {}
        return cls(model_dir, metrics, layout.export_dir, layout.path("report.png"))

    @property
    def history(self):
        """One dict per epoch, as in metrics.json."""
        return self.metrics.get("history", [])

    def plot(self):
        """report.png (the curves and the confusion matrix), shown inline in Jupyter."""
        from IPython.display import Image
        from trainer import files
        return Image(data=files.read_bytes(self.report_png), format="png")

    def predict(self, paths, top_k=3):
        """Rows as `trainer.predict --json` prints them, for an image, a folder or a list."""
        if not hasattr(self, "_predictor"):
            self._predictor = load(self.export_dir)
        with _as_a_separate_job():
            return _reraised_plainly(self._predictor.predict, paths, top_k)

    def __repr__(self):
        if not self.metrics:
            return f"Run(model_dir={self.model_dir!r}, no metrics.json yet)"
        return (f"Run(model_dir={self.model_dir!r}, val_accuracy="
                f"{self.metrics['val_accuracy']:.4f}, epochs={len(self.history)}, "
                f"export_dir={self.export_dir!r})")


def _reraised_plainly(function, *args):
    """function(*args); its UserError or Stopped raised afresh, outside the except clause, so
    that the error a notebook keeps (sys.last_value) does not hold the job's frames, and its
    input pipelines, alive (see errors.exit_with)."""
    try:
        return function(*args)
    except UserError as error:
        failure = UserError(str(error))
    except Stopped as stopped:
        failure = Stopped(stopped.step, signal.Signals[stopped.signal])
    gc.collect()
    raise failure


@contextlib.contextmanager
def _as_a_separate_job():
    """What a job sets for the whole process (the signal handlers, the Keras dtype policy, the
    random seeds, log levels) is put back afterwards, so that several calls in one kernel
    behave as separate jobs and leave the notebook as it was."""
    import numpy as np
    from absl import logging
    from trainer import cli
    with cli.loading_tensorflow():
        import keras
        import tensorflow as tf
    saved = (random.getstate(), np.random.get_state(), tf.compat.v1.get_seed(None)[0],
             keras.mixed_precision.global_policy().name, logging.get_verbosity(),
             tf.get_logger().level,
             {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)})
    logging.set_verbosity(logging.WARNING)  # as the CLI does: TensorFlow's routine INFO lines
    try:
        yield
    finally:
        python_state, numpy_state, tf_seed, policy, verbosity, tf_level, handlers = saved
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        tf.random.set_seed(tf_seed)
        keras.mixed_precision.set_global_policy(policy)
        logging.set_verbosity(verbosity)
        tf.get_logger().setLevel(tf_level)
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        sys.stdout.flush()
