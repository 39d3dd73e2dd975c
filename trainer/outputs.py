"""What a job keeps in --model_dir (local or gs://), and whether a run there is new, half
done or complete.

    config.yaml  labels.txt  data.json  metrics.json  checkpoints/  logs/{train,validation}/
    export/  cache/ (while the run is not complete: see caching.py)

data.json records what the run trains on (each split's count per class and fingerprint), so
that a run resumes only on the data it started with.

Vertex AI's AIP_CHECKPOINT_DIR and AIP_TENSORBOARD_LOG_DIR, when set, take the place of
checkpoints/ and logs/.
"""

import dataclasses
import os

import tensorflow as tf

from trainer import config as config_lib
from trainer import files
from trainer import sources
from trainer.errors import UserError, first_line


@dataclasses.dataclass
class Layout:
    model_dir: str
    checkpoint_dir: str
    log_dir: str

    @classmethod
    def of(cls, model_dir, environ=os.environ):
        return cls(model_dir,
                   environ.get("AIP_CHECKPOINT_DIR") or files.join(model_dir, "checkpoints"),
                   environ.get("AIP_TENSORBOARD_LOG_DIR") or files.join(model_dir, "logs"))

    def path(self, name):
        return files.join(self.model_dir, name)

    @property
    def export_dir(self):
        return self.path("export")

    @property
    def cache_dir(self):
        """Where the pass over the images keeps its chunks without --feature_cache (see
        caching.py), until the run completes."""
        return self.path("cache")


def wipe(layout):
    """Deletes the run in layout: what --overwrite asks for, after check() said 'overwrite'."""
    for path in (layout.checkpoint_dir, layout.log_dir, layout.export_dir, layout.cache_dir,
                 layout.path("metrics.json"), layout.path("labels.txt"), layout.path("config.yaml"),
                 layout.path(DATA_RECORD)):
        files.remove_tree(path)


def check(layout, config, overwrite):
    """What is in layout for this config: 'fresh', 'resume', 'complete', or 'overwrite' (a run
    that --overwrite is to replace); a different run there without --overwrite is an error.
    Reads only: deleting is wipe()'s."""
    try:
        _check_buckets(layout)
        recorded = layout.path("config.yaml")
        if not files.exists(recorded):
            return "fresh"
        if overwrite:
            return "overwrite"
        old = config_lib.from_yaml_text(files.read_text(recorded), recorded)
        metrics = layout.path("metrics.json")
        complete = files.exists(metrics) and files.read_json(metrics).get("status") == "complete"
    except tf.errors.OpError as error:  # an unreachable bucket, most often
        raise UserError(f"cannot use --model_dir={layout.model_dir}: "
                        f"{first_line(error.message)}; check the path and your access") from None
    except ValueError as error:  # a metrics.json cut short
        raise UserError(f"{layout.model_dir} holds a damaged metrics.json ({first_line(error)}): "
                        "use another --model_dir, or --overwrite to start afresh there") from None
    changed = config_lib.differences(old, config)
    if changed:
        listing = "; ".join(f"{name}: {before!r} -> {after!r}" for name, before, after in changed)
        raise UserError(f"{layout.model_dir} holds a run with a different config ({listing}); "
                        "use another --model_dir, or --overwrite to start afresh there")
    return "complete" if complete else "resume"


def _check_buckets(layout):
    # Writes to a missing bucket fail only later, and TensorBoard's writer retries. One probe
    # a bucket: the three folders are usually in the same one.
    by_bucket = {}
    for path in (layout.model_dir, layout.checkpoint_dir, layout.log_dir):
        by_bucket.setdefault(files.bucket_root(path), path)
    for path in by_bucket.values():
        files.check_reachable(path)


def ensure_writable(layout):
    """Creates --model_dir and writes a probe file there, so that a --model_dir under a file,
    at a file or somewhere read-only is a one-line error before any work."""
    probe = layout.path(f".write-probe-{os.getpid()}")
    try:
        tf.io.gfile.makedirs(layout.model_dir)
        files.write_text(probe, "")
        tf.io.gfile.remove(probe)
    except tf.errors.OpError as error:
        raise UserError(f"cannot write to --model_dir={layout.model_dir}: "
                        f"{first_line(error.message)}; choose a folder you can write to") from None


DATA_RECORD = "data.json"
SPLITS = ("train", "validation")


def data_record(source):
    """What the run trains on: each split's examples per class and fingerprint (for image
    folders, as listed: their paths, labels and stamps; see sources.fingerprint)."""
    return {name: {"per_class": {class_name: int(count) for class_name, count in zip(
                       source.class_names, split.class_counts(len(source.class_names)))},
                   "fingerprint": sources.fingerprint(split)}
            for name, split in zip(SPLITS, (source.train, source.validation))}


def check_same_data(layout, record, data):
    """A run resumes only on the data it started with: another set of examples would change
    the steps of an epoch, the order of every batch, and the history already recorded."""
    path = layout.path(DATA_RECORD)
    if not files.exists(path):
        return  # recorded by a version before this check
    recorded = files.read_json(path)
    changes = []
    for name in SPLITS:
        before, after = recorded.get(name, {}), record[name]
        if before.get("fingerprint") == after["fingerprint"]:
            continue
        counts = before.get("per_class", {})
        moved = [f"{class_name} {counts.get(class_name, 0)} -> {after['per_class'].get(class_name, 0)}"
                 for class_name in sorted({*counts, *after["per_class"]})
                 if counts.get(class_name, 0) != after["per_class"].get(class_name, 0)]
        changes.append(f"{name}: {', '.join(moved)}" if moved else
                       f"{name}: the same counts per class, but other files or contents")
    if changes:
        raise UserError(f"the data in --data={data} changed since the run in {layout.model_dir} "
                        f"started ({'; '.join(changes)}): a run resumes only on the data it "
                        "started with; restore that data, or start again with --overwrite (or "
                        "another --model_dir)")


def write_start(layout, config, class_names, record):
    files.write_text(layout.path("config.yaml"), config.to_yaml())
    files.write_lines(layout.path("labels.txt"), class_names)
    files.write_json(layout.path(DATA_RECORD), record)


def write_metrics(layout, metrics):
    files.write_json(layout.path("metrics.json"), metrics)


def report_to_hyperparameter_tuning(val_accuracy, global_step):
    """Tells a Vertex AI tuning job the trial's result, as its prebuilt containers expect
    (cloudml-hypertune); without the package there is no tuning job to tell."""
    try:
        import hypertune
    except ImportError:
        return
    hypertune.HyperTune().report_hyperparameter_tuning_metric(
        hyperparameter_metric_tag="val_accuracy", metric_value=val_accuracy,
        global_step=global_step)
